"""Property: `validate` answers every document with a result or a ConfigError - never a
traceback, never a hang. Hypothesis generates YAML documents of every shape, mutates the
shipped recipes and machine profiles value by value, and flips bytes in their text."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require

hypothesis = require("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as s  # noqa: E402

from ftkit.errors import ConfigError  # noqa: E402
from ftkit.recipe.validate import LoadedRecipe, load_any, load_machine  # noqa: E402
from tests.conftest import RECIPES  # noqa: E402

SETTINGS = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="ftkit-property-"))
shutil.copytree(RECIPES / "data", WORK / "data")
RECIPE_DATA = {p.name: yaml.safe_load(p.read_text()) for p in sorted(RECIPES.glob("*.yaml"))}
MACHINE_DATA = {p.name: yaml.safe_load(p.read_text()) for p in sorted((RECIPES / "machines").glob("*.yaml"))}
KEYS = sorted({"ftkit", "kind", "name", "model", "dataset", "steps", "type", "path", "id", "revision", "tiny", "lora",
               "r", "alpha", "epochs", "max_steps", "port", "args", "gpus", "caps_w", "output", "dtype", "expect",
               "regex", "prompts", "models", "serving", "paths", "runs", "bind_address", "psu", "watts", "images",
               "lock", "<<", "on", "heads", "hidden_size"})

scalars = s.one_of(
    s.none(), s.booleans(), s.integers(), s.integers(min_value=-(2**80), max_value=2**80),
    s.floats(allow_nan=True, allow_infinity=True), s.text(max_size=30),
    s.sampled_from(["all", "merged", "adapter", "train", "merge", "serve", "eval", "power", "${datasets}/../x",
                    "../../etc/passwd", "/dev/zero", "(a+)+$", "tiny-model", "0.0.0.0", "--host", "a\nb", ".inf",
                    "data/quickstart-train.jsonl", "bf16", "fp32", "qlora", "vllm", "transformers", "-1", "1e309"]),
)
keys = s.one_of(s.sampled_from(KEYS), s.text(min_size=1, max_size=12), s.integers(-3, 3))
values = s.recursive(scalars, lambda inner: s.one_of(s.lists(inner, max_size=4),
                                                     s.dictionaries(keys, inner, max_size=5)), max_leaves=25)


def check(text: str, name: str = "doc.yaml") -> None:
    """Validate text as a file next to the quickstart's data; anything but a ConfigError fails."""
    path = WORK / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        loaded = load_any(path)
    except ConfigError as e:
        assert e.issues, "a ConfigError without issues"
        for issue in e.issues:
            assert "\n" not in issue.render(), issue.render()
        return
    if isinstance(loaded, LoadedRecipe):  # valid: resolving it on a bare machine must not crash either
        from ftkit.recipe.resolve import resolve

        machine = load_machine(RECIPES / "machines" / "cpu.yaml").machine
        try:
            resolve(loaded, machine)
        except ConfigError:
            pass


def dump(data: Any) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, UnicodeEncodeError):
        return "ftkit: 1\n"


@pytest.mark.timeout(600)
@SETTINGS
@given(doc=s.dictionaries(keys, values, max_size=8))
def test_generated_documents(doc: dict) -> None:  # type: ignore[type-arg]
    check(dump(doc))


@pytest.mark.timeout(600)
@SETTINGS
@given(doc=s.dictionaries(s.sampled_from(KEYS), values, max_size=8), version=s.sampled_from([1, True, 1.0, "1", None]))
def test_generated_documents_with_a_version(doc: dict, version: Any) -> None:  # type: ignore[type-arg]
    check(dump({"ftkit": version, **doc}))


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(data: Any, path: tuple, action: str, value: Any, key: Any) -> Any:  # type: ignore[type-arg]
    if not path:
        return value if action == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif action == "add" and isinstance(parent[last], list):
        parent[last].append(value)
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[last])
    return data


@pytest.mark.timeout(600)
@SETTINGS
@given(source=s.sampled_from(sorted(RECIPE_DATA) + sorted(MACHINE_DATA)), data=s.data(),
       n=s.integers(min_value=1, max_value=3))
def test_mutated_recipes_and_profiles(source: str, data: Any, n: int) -> None:
    import copy

    doc = copy.deepcopy(RECIPE_DATA.get(source) or MACHINE_DATA[source])
    for _ in range(n):
        path = data.draw(s.sampled_from(_paths(doc)))
        action = data.draw(s.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        doc = _mutate(doc, path, action, data.draw(values), data.draw(keys))
    check(dump(doc))


@pytest.mark.timeout(600)
@SETTINGS
@given(source=s.sampled_from(sorted(RECIPES.glob("*.yaml")) + sorted((RECIPES / "machines").glob("*.yaml"))),
       edits=s.lists(s.tuples(s.integers(min_value=0), s.sampled_from(["\x00", "\t", ":", "-", "[", "{", "&a", "*a",
                                                                       "!!python/object:os.system", "\n", "'", '"',
                                                                       "\ufeff", "\x1b", ".inf", "  ", "#", "<<: "]),
                              s.booleans()), min_size=1, max_size=4))
def test_text_level_edits(source: Path, edits: list) -> None:  # type: ignore[type-arg]
    text = source.read_text()
    for pos, piece, remove in edits:
        i = pos % (len(text) + 1)
        text = text[:i] + (text[i + 1:] if remove else piece + text[i:])
    check(text)


def test_non_finite_numbers_never_reach_a_model() -> None:
    """Spot check of the property's strongest case: a recipe that validates holds only finite numbers."""
    from ftkit.recipe.validate import load_recipe

    loaded = load_recipe(RECIPES / "quickstart.yaml")

    def walk(v: Any) -> None:
        if isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(loaded.recipe.model_dump())
