"""Turn a loaded YAML document into a Recipe or Machine, or into a list of located issues.

Stage 2 of the config pipeline (parse -> validate -> resolve -> plan). Every problem is
collected - shape errors from pydantic, then the cross-field rules in `checks` - and raised
once as a ConfigError whose lines read `FILE:LINE:COL: field.path: message`.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError

from ftkit.errors import ConfigError, ConfigIssue
from ftkit.recipe import checks
from ftkit.recipe.models import FORMAT_VERSION, Machine, Recipe
from ftkit.recipe.yamlpos import Located, Path_, load


@dataclass
class LoadedRecipe:
    recipe: Recipe
    doc: Located
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


@dataclass
class LoadedMachine:
    machine: Machine
    doc: Located
    path: Path


def _detect_kind(doc: Located) -> str:
    kind = doc.data.get("kind", "recipe")
    return kind if kind in ("recipe", "machine") else "recipe"


def _version_issue(doc: Located) -> ConfigIssue | None:
    """A wrong or missing format version hides every other message behind it."""
    if "ftkit" not in doc.data:
        return doc.issue(("ftkit",), f"missing format version; add `ftkit: {FORMAT_VERSION}` at the top")
    version = doc.data["ftkit"]
    if type(version) is not int or version != FORMAT_VERSION:  # `true` and 1.0 equal 1 in Python
        return doc.issue(
            ("ftkit",), f"format version {version!r} is not supported; this ftkit reads {FORMAT_VERSION} (an integer)"
        )
    return None


def load_recipe(path: str | os.PathLike[str]) -> LoadedRecipe:
    doc = load(path, display=str(path))
    if _detect_kind(doc) != "recipe":
        raise ConfigError([doc.issue(("kind",), "this is a machine profile; pass it with --machine")])
    recipe = _validate(doc, Recipe)
    if not isinstance(recipe, Recipe):  # pragma: no cover - _validate returns the model it was given
        raise TypeError("internal: not a Recipe")
    loaded = LoadedRecipe(recipe, doc, Path(path))
    issues = [doc.issue(p, m, key=k) for p, m, k in checks.recipe_findings(recipe, loaded.base_dir)]
    if issues:
        raise ConfigError(issues)
    return loaded


def load_machine(path: str | os.PathLike[str]) -> LoadedMachine:
    doc = load(path, display=str(path))
    if _detect_kind(doc) != "machine":
        raise ConfigError([doc.issue(("kind",), "not a machine profile: add `kind: machine`")])
    machine = _validate(doc, Machine)
    if not isinstance(machine, Machine):  # pragma: no cover
        raise TypeError("internal: not a Machine")
    issues = [doc.issue(p, m, key=k) for p, m, k in checks.machine_findings(machine)]
    if issues:
        raise ConfigError(issues)
    return LoadedMachine(machine, doc, Path(path))


def load_any(path: str | os.PathLike[str]) -> LoadedRecipe | LoadedMachine:
    """Load a recipe or a machine profile, telling them apart by `kind:`."""
    doc = load(path, display=str(path))
    if _detect_kind(doc) == "machine":
        return load_machine(path)
    return load_recipe(path)


def _validate(doc: Located, model: type[BaseModel]) -> BaseModel:
    version = _version_issue(doc)
    if version is not None:
        raise ConfigError([version])
    numbers = _number_issues(doc)
    try:
        result = model.model_validate(doc.data)
    except ValidationError as e:
        issues = _issues_from(e, doc, model)
        flagged = {i.path for i in numbers}
        raise ConfigError(numbers + [i for i in issues if i.path not in flagged]) from None
    if numbers:  # a non-finite value in a free-form place (serve args) that pydantic let through
        raise ConfigError(numbers)
    return result


MAX_INT = 2**63 - 1


def _number_issues(doc: Located) -> list[ConfigIssue]:
    """Numbers no field accepts, said plainly wherever they are: `.inf`/`.nan` (no setting is
    infinite) and integers beyond 64 bits (they would overflow the first C library they reach)."""
    out: list[ConfigIssue] = []
    stack: list[tuple[Path_, Any]] = [((), doc.data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(doc.issue(path, f"{value} is not a finite number"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            out.append(doc.issue(path, f"integer {str(value)[:24]}{'...' if len(str(value)) > 24 else ''} is too large"))
    return out


# --------------------------------------------------------------------------- pydantic -> issues


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """Map pydantic's error location onto the document: union and discriminator tags that
    pydantic inserts are skipped; a final element not in the data (a missing field, an
    unknown key) is kept so the path names it."""
    out: list[str | int] = []
    cur = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict):
            key = part
            if key not in cur and isinstance(part, str) and part.lstrip("-").isdigit() and int(part) in cur:
                key = int(part)
            if key in cur:
                out.append(key)
                cur = cur[key]
                continue
            if last:
                out.append(part)
            continue
        if isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
            continue
    return tuple(out)


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    if field is None:
        return None
    ann = _unwrap(field.annotation)
    if typing.get_origin(ann) is Literal:
        return str(typing.get_args(ann)[0])
    return None


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that the (pydantic) location points into, to list its field names."""
    tp: Any = root
    parts = list(loc)
    while True:
        tp = _unwrap(tp)
        if _is_union(tp):
            members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if parts and isinstance(parts[0], str):
                tagged = [m for m in models if _type_tag(m) == parts[0]]
                if tagged:
                    tp = tagged[0]
                    parts.pop(0)
                    continue
            if len(models) == 1:
                tp = models[0]
                continue
            containers = [m for m in members if typing.get_origin(m) in (list, dict)]
            if len(containers) == 1:
                tp = containers[0]
                continue
            return None
        if not parts:
            return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
        part = parts.pop(0)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None


def suggest(word: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return match[0] if match else None


def _message(err: dict[str, Any], root: type[BaseModel]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(root, loc[:-1])
        names = sorted(model.model_fields) if model else []
        hint = suggest(key, names)
        msg = f"unknown key {key!r}"
        if hint:
            msg += f"; did you mean {hint!r}?"
        elif names:
            msg += f"; expected one of: {', '.join(names)}"
        return msg
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown step type {ctx.get('tag')!r}; expected one of: {ctx.get('expected_tags', '')}"
    if kind == "union_tag_not_found":
        return "each step needs a `type:` (power, train, merge, serve or eval)"
    if kind == "literal_error":
        return f"got {_short(err.get('input'))}; {err['msg'].lower()}"
    msg = str(err["msg"])
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _issues_from(exc: ValidationError, doc: Located, root: type[BaseModel]) -> list[ConfigIssue]:
    merged: dict[Path_, list[str]] = {}
    keyed: set[Path_] = set()
    for err in exc.errors(include_url=False):
        path = _data_path(doc.data, tuple(err["loc"]))
        if err["type"] == "union_tag_invalid":
            path = path + ("type",)  # point at the tag itself
        msg = _message(err, root)
        bucket = merged.setdefault(path, [])
        if msg not in bucket:
            bucket.append(msg)
        if err["type"] == "extra_forbidden":
            keyed.add(path)
    issues = []
    for path, msgs in merged.items():
        # A boolean in a number-or-mapping union: the number message is the one that helps.
        boolean = [m for m in msgs if m.startswith("expected a number, got the boolean")]
        msgs = boolean[:1] or msgs
        issues.append(doc.issue(path, "; or ".join(msgs) if len(msgs) > 1 else msgs[0], key=path in keyed))
    return issues
