"""Cross-field rules for recipes and machine profiles.

Each function returns every finding as (field path, message, point-at-key) so the caller
can locate them in the YAML and report them together. Nothing here touches the machine
beyond looking at paths (that is `plan.machine_checks`) or raises.

The rule of thumb: whatever can be checked before a run is checked here, so a run never
fails an hour in on a value that was wrong from the start (a merge output that would
overwrite the run's journal, an eval file that is a directory, a regex that never returns).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path

from ftkit.dockerhost import docker_host_problem
from ftkit.files import TooLarge, UnsafeFile, read_bounded
from ftkit.recipe import datarows, imagerefs, serveargs, tracking
from ftkit.recipe.models import (
    Cluster,
    EvalStep,
    LoadAdapterStep,
    Machine,
    MergeStep,
    PowerStep,
    PreferenceStep,
    QuantizeStep,
    Recipe,
    ServePrompt,
    ServeStep,
    TrainStep,
)
from ftkit.recipe.yamlpos import Path_, special_kind
from ftkit.recipe.yamlpos import printable as printable  # re-exported: the plan printer escapes with it

try:  # the regex parser the re module itself uses
    import re._parser as _sre  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

Finding = tuple[Path_, str, bool]

PATH_VARS = ("models", "datasets", "runs", "hf_cache")
_VAR = re.compile(r"\$\{([^}]*)\}")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")

# Step ids the planner adds itself (plan.build), and names kept for steps it will add.
# A recipe step with one of these names would share steps/<name>/ and logs/<name>.log.
RESERVED_STEP_NAMES = frozenset({"tiny-model", "handoff-stop", "handoff-start", "power-restore-final",
                                 "lease", "telemetry"})
RESERVED_STEP_PREFIX = "ftkit-"
# What a run directory holds besides steps/ (plan.build.RUN_LAYOUT; recipe/ may not import plan/).
RUN_ENTRIES = frozenset({"recipe.resolved.yaml", "plan.json", "command.txt", "env.json", "state.json", "configs",
                         "logs", "model", "steps", "telemetry.csv", "recipe.yaml"})
# Engine arguments the plan sets for every serve step: the recipe may not override them in `args`.
PLAN_SET_SERVE_ARGS = {
    "host": "the server's address comes from the machine profile (bind_address)",
    "port": "set the step's `port:` instead",
    "served-model-name": "set the step's `served_name:` instead",
    "enable-lora": "serve `model: adapter` instead",
    "lora-modules": "serve `model: adapter` instead",
    "device": "the device comes from the step's `gpus:`",
    "model": "the model comes from the step's `model:` and `adapter:`",
    "max-lora-rank": "ftkit sets it from the ranks of the adapters the server gets",
    "enable-sleep-mode": "set the step's `preempt: sleep` instead",
}
MAX_REGEX = 1000
MAX_UNBOUNDED_ANY = 3


# printable (imported above from yamlpos, where field paths use it) escapes control characters
# for anything printed from a recipe: the plan printer uses it as ftkit.recipe.checks.printable.


# --------------------------------------------------------------------------- regular expressions


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` may not be used to check a model's answer, or None when it may.

    It must compile, and it must not be able to backtrack for exponential time: the answer it
    runs on comes from a model, so a pattern like `(a+)+$` could stall the run's check for
    hours. Refused shapes: a variable quantifier inside an unbounded one (`(a+)+`, `(\\w*)*`),
    alternatives inside an unbounded repeat that can start with the same character or match
    nothing (`(a|ab)*`), backreferences, and more than three unbounded wildcards (`.*`) whose
    combinations grow polynomially. Possessive quantifiers and atomic groups do not backtrack
    and are fine."""
    if len(pattern) > MAX_REGEX:
        return f"regular expression of {len(pattern)} characters; the limit is {MAX_REGEX}"
    try:
        re.compile(pattern)
        tree = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        return f"not a valid regular expression: {e}"
    try:
        problem = _walk(list(tree), False)
        if problem is None and _count_unbounded_any(list(tree)) > MAX_UNBOUNDED_ANY:
            problem = f"more than {MAX_UNBOUNDED_ANY} unbounded wildcards (.*, \\w+ ...) in a row"
    except RecursionError:
        problem = "nested too deeply"
    if problem:
        return f"{problem}: matching can backtrack for a very long time on a model's answer; simplify the pattern"
    return None


_ANY = "any"
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT")
_MANY = 16  # a bounded repeat above this many counts as unbounded for nesting


def _unbounded(hi: int) -> bool:
    return hi == _sre.MAXREPEAT or hi > _MANY


def _name(op: object) -> str:
    return str(op)


def _nullable(items: list) -> bool:  # type: ignore[type-arg]
    return all(_item_nullable(op, av) for op, av in items)


def _item_nullable(op: object, av: object) -> bool:
    n = _name(op)
    if n in ("AT", "ASSERT", "ASSERT_NOT", "GROUPREF", "GROUPREF_EXISTS"):
        return True
    if n in _REPEATS or n == "POSSESSIVE_REPEAT":
        lo, _hi, sub = av  # type: ignore[misc]
        return lo == 0 or _nullable(list(sub))
    if n == "SUBPATTERN":
        return _nullable(list(av[-1]))  # type: ignore[index]
    if n == "ATOMIC_GROUP":
        return _nullable(list(av))  # type: ignore[arg-type]
    if n == "BRANCH":
        return any(_nullable(list(b)) for b in av[1])  # type: ignore[index]
    return False


def _first(items: list) -> set[int] | str:  # type: ignore[type-arg]
    """Characters a match of `items` can start with (or _ANY)."""
    out: set[int] = set()
    for op, av in items:
        f = _item_first(op, av)
        if f == _ANY:
            return _ANY
        out |= f  # type: ignore[arg-type]
        if not _item_nullable(op, av):
            break
    return out


def _item_first(op: object, av: object) -> set[int] | str:
    n = _name(op)
    if n == "LITERAL":
        ch = chr(av)  # type: ignore[arg-type]
        return {ord(ch.lower()), ord(ch.upper())}
    if n == "IN":
        chars: set[int] = set()
        for sop, sav in av:  # type: ignore[attr-defined]
            sn = _name(sop)
            if sn == "LITERAL":
                chars |= {ord(chr(sav).lower()), ord(chr(sav).upper())}
            elif sn == "RANGE" and sav[1] - sav[0] <= 256:
                for c in range(sav[0], sav[1] + 1):
                    chars |= {ord(chr(c).lower()), ord(chr(c).upper())}
            else:
                return _ANY
        return chars
    if n in _REPEATS or n == "POSSESSIVE_REPEAT":
        return _first(list(av[2]))  # type: ignore[index]
    if n == "SUBPATTERN":
        return _first(list(av[-1]))  # type: ignore[index]
    if n == "ATOMIC_GROUP":
        return _first(list(av))  # type: ignore[arg-type]
    if n == "BRANCH":
        out: set[int] = set()
        for b in av[1]:  # type: ignore[index]
            f = _first(list(b))
            if f == _ANY:
                return _ANY
            out |= f  # type: ignore[arg-type]
        return out
    if n in ("AT", "ASSERT", "ASSERT_NOT"):
        return set()
    return _ANY


def _walk(items: list, in_unbounded: bool) -> str | None:  # type: ignore[type-arg]
    for op, av in items:
        n = _name(op)
        if n in _REPEATS:
            lo, hi, sub = av
            if in_unbounded and hi > lo:
                return "a quantifier inside a repeated group"
            unbounded = _unbounded(hi)
            if unbounded and _nullable(list(sub)):
                return "a repeated group that can match nothing"
            problem = _walk(list(sub), in_unbounded or unbounded)
            if problem:
                return problem
        elif n == "POSSESSIVE_REPEAT":
            problem = _walk(list(av[2]), False)
            if problem:
                return problem
        elif n == "ATOMIC_GROUP":
            problem = _walk(list(av), False)
            if problem:
                return problem
        elif n == "SUBPATTERN":
            problem = _walk(list(av[-1]), in_unbounded)
            if problem:
                return problem
        elif n in ("ASSERT", "ASSERT_NOT"):
            problem = _walk(list(av[1]), in_unbounded)
            if problem:
                return problem
        elif n == "BRANCH":
            branches = [list(b) for b in av[1]]
            if in_unbounded:
                firsts = [_first(b) for b in branches]
                if any(_nullable(b) for b in branches):
                    return "an alternative that can match nothing inside a repeated group"
                for i in range(len(firsts)):
                    for j in range(i + 1, len(firsts)):
                        if firsts[i] == _ANY or firsts[j] == _ANY or firsts[i] & firsts[j]:  # type: ignore[operator]
                            return "overlapping alternatives inside a repeated group"
            for b in branches:
                problem = _walk(b, in_unbounded)
                if problem:
                    return problem
        elif n in ("GROUPREF", "GROUPREF_EXISTS"):
            return "a backreference"
    return None


def _count_unbounded_any(items: list) -> int:  # type: ignore[type-arg]
    count = 0
    for op, av in items:
        n = _name(op)
        if n in _REPEATS:
            if av[1] == _sre.MAXREPEAT and _first(list(av[2])) == _ANY:
                count += 1
            count += _count_unbounded_any(list(av[2])) * min(av[1], _MANY + 1)
        elif n == "SUBPATTERN":
            count += _count_unbounded_any(list(av[-1]))
        elif n == "BRANCH":
            count += max((_count_unbounded_any(list(b)) for b in av[1]), default=0)
        elif n in ("ASSERT", "ASSERT_NOT"):
            count += _count_unbounded_any(list(av[1]))
    return count


# --------------------------------------------------------------------------- paths


def climbs_out(value: str) -> bool:
    """Whether a relative path (after any leading ${var}) leaves its root with `..`."""
    rest = value
    m = _VAR.match(value)
    if m:
        rest = value[m.end():]
    depth = 0
    for part in rest.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


def path_problem(value: str) -> str | None:
    """Why a path may not appear in a portable recipe, or None when it may."""
    if not value:
        return "empty path"
    if any(not (c == " " or c.isprintable()) for c in value):
        return f"path {value!r} contains control characters"
    if value.startswith(("/", "~", "\\\\")) or _WINDOWS_ABS.match(value):
        return (
            f"absolute path {value!r}: recipes must stay portable; use a path relative to the recipe, "
            "or ${models}/... / ${datasets}/... from the machine profile"
        )
    if "://" in value:
        return f"{value!r} looks like a URL or host; recipes hold no host names (use the machine profile)"
    for var in _VAR.findall(value):
        if var not in PATH_VARS:
            return f"unknown variable ${{{var}}}; known: {', '.join('${' + v + '}' for v in PATH_VARS)}"
    if _VAR.search(value):
        m = _VAR.match(value)
        if m is None or len(_VAR.findall(value)) > 1:
            return "a ${...} variable may only start a path"
        if value[m.end():] and not value[m.end():].startswith("/"):
            return f"write {m.group(0)}/name, with a / after the variable"
    if climbs_out(value):
        root = f"${{{_VAR.match(value).group(1)}}}" if _VAR.match(value) else "the recipe's directory"  # type: ignore[union-attr]
        return f"{value!r} climbs out of {root} with '..'; keep paths inside it"
    return None


def uses_variable(value: str) -> bool:
    return bool(_VAR.search(value))


def kind_problem(path: Path, want: str) -> str | None:
    """Why an existing path is not of the kind an input needs ("file", "dir" or "file-or-dir"),
    or None (also when it does not exist). Looks with stat only: a FIFO or a device is never
    opened, so nothing can block or stream forever."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"cannot look at {str(path)!r}: {e.strerror}"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None if want in ("file", "file-or-dir") else "is a file; a directory is expected"
    if stat.S_ISDIR(mode):
        return None if want in ("dir", "file-or-dir") else "is a directory; a file is expected"
    return f"is {special_kind(mode)}, not a regular file or directory"


_HUB_PART = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")


def hub_id_problem(model_id: str) -> str | None:
    """The hub's own rules for repo ids (huggingface_hub's validate_repo_id): `name` or
    `org/name`, each part letters, digits, '_', '.', '-' (96 at most), no '..' or '--', no part
    starting or ending with . or -: anything else would fail only once a step asks the hub."""
    parts = model_id.split("/")
    if ".." in model_id or "--" in model_id:
        return f"{model_id!r} is not a valid hub id: '..' and '--' are not allowed"
    if len(parts) > 2 or not all(_HUB_PART.match(p) for p in parts):
        return (f"{model_id!r} is not a valid hub id: name or org/name, of letters, digits, '_', '.' and '-' "
                "(96 characters a part at most)")
    for part in parts:
        if part.startswith((".", "-")) or part.endswith((".", "-")):
            return f"{model_id!r} is not a valid hub id: a part may not start or end with . or -"
    return None


_SPLIT_NAME = re.compile(r"^\w+([.-]\w+)*$")


def read_lock_file(path: Path) -> tuple[object | None, str | None]:
    """Parse an images.lock.json for validation: (data, None) or (None, why not). Regular files
    only, at most 4 MiB, opened without blocking."""
    import json

    problem = kind_problem(path, "file")
    if problem:
        return None, problem
    try:
        raw = read_bounded(path, 4 << 20, follow=True)
    except TooLarge:
        return None, "larger than 4 MiB: not an images.lock.json"
    except UnsafeFile as e:
        return None, f"cannot read: {e.reason}"
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, f"not valid JSON: {str(e).splitlines()[0]}"


def lock_file_problem(path: Path) -> str | None:
    data, problem = read_lock_file(path)
    if problem:
        return problem
    problems = imagerefs.lock_problems(data)
    return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "") if problems else None


# --------------------------------------------------------------------------- recipes


def recipe_findings(recipe: Recipe, base_dir: Path) -> list[Finding]:
    out: list[Finding] = []
    _model(recipe, out)
    _dataset(recipe, out)
    _paths(recipe, base_dir, out)
    _steps(recipe, out)
    out.extend(tracking.findings(recipe.tracking, ("tracking",)))
    return out


def _pinned_hub(where: Path_, repo_id: str, revision: str | None, what: str, out: list[Finding]) -> None:
    """A hub model or dataset: a valid repo id, and a revision that is a commit (a branch or tag
    can move, and the run would use other weights or data than its plan says)."""
    problem = hub_id_problem(repo_id)
    if problem:
        out.append((where, problem, False))
    if revision is None:
        out.append((where, f"a hub {what} needs `revision:` pinned to a commit (40 hex characters)", True))
    elif not _SHA.match(revision):
        out.append((where[:-1] + ("revision",),
                    f"{revision!r} is not a commit hash; a branch or tag can move, pin the commit", False))


def _dataset(recipe: Recipe, out: list[Finding]) -> None:
    """Where the data comes from: a local path or a hub dataset pinned to a commit (a branch or
    tag can move, and the run would train on other data than its plan says)."""
    d = recipe.dataset
    sources = [k for k in ("path", "hub") if getattr(d, k) is not None]
    if len(sources) != 1:
        what = "none" if not sources else " and ".join(sources)
        out.append((("dataset",), f"give exactly one of path (local) or hub (a hub dataset); got {what}", False))
    if d.hub is not None:
        _pinned_hub(("dataset", "hub"), d.hub, d.revision, "dataset", out)
        if not hub_id_problem(d.hub) and "/" not in d.hub:
            out.append((("dataset", "hub"), f"{d.hub!r}: a hub dataset is named org/name", False))
    else:
        for key in ("revision", "subset"):
            if getattr(d, key) is not None:
                out.append((("dataset", key), f"{key} applies to hub datasets (`hub:`) only", True))
    for where, value in ((("dataset", "split"), d.split), (("dataset", "subset"), d.subset),
                         (("dataset", "eval", "split"), d.eval.split if d.eval is not None else None)):
        if value is not None and not _SPLIT_NAME.match(value):
            out.append((where, f"{value!r}: a split or subset name is letters, digits and '_', joined by '.' or '-'",
                        False))
    local_file = d.path is not None and Path(d.path).suffix.lower() in datarows.FILE_SUFFIXES
    if local_file and "split" in d.model_fields_set:
        out.append((("dataset", "split"), "split applies to hub datasets and directories; a file is one split", True))
    if local_file and d.eval is not None and d.eval.split is not None:
        out.append((("dataset", "eval", "split"), "a file is one split: hold rows out with fraction or size, or "
                    "give the eval rows' path", True))
    elif d.eval is not None and d.eval.split is not None and d.eval.split == d.split:
        out.append((("dataset", "eval", "split"), f"{d.split!r} is the split trained on", False))
    if d.format == "text" and "train_on" in d.model_fields_set:
        out.append((("dataset", "train_on"), "train_on applies to chat and alpaca data; text trains on every token", True))
    elif (d.format == "chat" and d.template == "alpaca" and d.train_on == "all_assistant_turns"
          and "train_on" in d.model_fields_set):
        out.append((("dataset", "train_on"), "the alpaca template is one prompt and one answer: it trains the last "
                    "assistant turn only; use a chat template (auto, tokenizer, chatml, ...) or last_assistant_turn", False))


def _model(recipe: Recipe, out: list[Finding]) -> None:
    m = recipe.model
    sources = [k for k in ("id", "path", "tiny") if getattr(m, k) is not None]
    if len(sources) != 1:
        what = "none" if not sources else " and ".join(sources)
        out.append((("model",), f"give exactly one of id (hub), path (local) or tiny (generated); got {what}", False))
    if m.id is not None:
        _pinned_hub(("model", "id"), m.id, m.revision, "model", out)
    elif m.revision is not None:
        out.append((("model", "revision"), "revision applies to hub models (`id:`) only", True))
    if m.tiny is not None:
        t = m.tiny
        if t.hidden_size % t.heads:
            out.append((("model", "tiny", "heads"), f"{t.heads} heads do not divide hidden_size {t.hidden_size}", False))
        elif (t.hidden_size // t.heads) % 2:
            out.append((("model", "tiny", "heads"),
                        f"head size {t.hidden_size}/{t.heads} = {t.hidden_size // t.heads} is odd; rotary embeddings need an even one",
                        False))
    if recipe.dataset.eval is not None:
        ev = recipe.dataset.eval
        given = [k for k in ("fraction", "size", "path", "split") if getattr(ev, k) is not None]
        if len(given) != 1:
            out.append((("dataset", "eval"), "give exactly one of fraction, size, path or split", False))
    if recipe.images is not None:
        for key in ("train", "serve", "quantize"):
            ref = getattr(recipe.images, key)
            if ref is not None:
                problem = imagerefs.reference_problem(ref, require_digest=True)
                if problem:
                    out.append((("images", key), problem, False))


def _paths(recipe: Recipe, base_dir: Path, out: list[Finding]) -> None:
    # (field, value, kind it must have when it exists here, must it exist)
    candidates: list[tuple[Path_, str | None, str, bool]] = [
        (("model", "path"), recipe.model.path, "dir", True),
        (("dataset", "path"), recipe.dataset.path, "file-or-dir", True),
        (("dataset", "eval", "path"), recipe.dataset.eval.path if recipe.dataset.eval else None, "file", True),
        (("images", "lock"), recipe.images.lock if recipe.images else None, "file", True),
    ]
    tmpl = recipe.dataset.template
    if tmpl.endswith((".jinja", ".j2")):
        candidates.append((("dataset", "template"), tmpl, "file", True))
    merge_outputs: dict[str, int] = {}
    for i, step in enumerate(recipe.steps):
        if isinstance(step, (MergeStep, QuantizeStep)) and step.output is not None:
            problem = _merge_output_problem(step.output, recipe.step_name(i), step.type)
            if problem:
                out.append((("steps", i, "output"), problem, False))
            else:
                norm = "/".join(p for p in step.output.split("/") if p not in ("", "."))
                for other, j in merge_outputs.items():
                    if norm == other or norm.startswith(other + "/") or other.startswith(norm + "/"):
                        out.append((("steps", i, "output"), f"overlaps the output of step {recipe.step_name(j)!r}", False))
                merge_outputs[norm] = i
        if isinstance(step, EvalStep) and step.path:
            candidates.append((("steps", i, "path"), step.path, "file", True))
        if isinstance(step, EvalStep) and step.harness is not None:
            from ftkit.recipe.harness import is_path

            candidates += [(("steps", i, "harness", "tasks", j), t, "file-or-dir", True)
                           for j, t in enumerate(step.harness.tasks) if is_path(t)]
        if isinstance(step, PreferenceStep):
            candidates.append((("steps", i, "data", "path"), step.data.path, "file-or-dir", True))
            if step.data.eval is not None and step.data.eval.path:
                candidates.append((("steps", i, "data", "eval", "path"), step.data.eval.path, "file", True))
    if recipe.images is not None and recipe.images.lock is not None and not uses_variable(recipe.images.lock):
        lock = base_dir / recipe.images.lock
        if not path_problem(recipe.images.lock) and kind_problem(lock, "file") is None and lock.is_file():
            problem = lock_file_problem(lock)
            if problem:
                out.append((("images", "lock"), f"{recipe.images.lock}: {problem}", False))
    datasets: dict[Path_, Path] = {}
    pairs: dict[Path_, Path] = {}
    tasks: dict[Path_, Path] = {}
    for path, value, kind, must_exist in candidates:
        if value is None:
            continue
        problem = path_problem(value)
        if problem:
            out.append((path, problem, False))
            continue
        if uses_variable(value):
            continue
        local = base_dir / value
        problem = kind_problem(local, kind)
        if problem:
            out.append((path, f"{value!r} {problem}", False))
        elif must_exist and not os.path.lexists(local):
            out.append((path, f"{value!r} does not exist (relative to {base_dir or '.'})", False))
        elif must_exist and not local.exists():
            out.append((path, f"{value!r} is a broken symbolic link", False))
        elif path in (("dataset", "path"), ("dataset", "eval", "path")):
            datasets[path] = local
        elif path[0] == "steps" and "data" in path:
            pairs[path] = local
        elif path[0] == "steps" and "harness" in path:
            tasks[path] = local
    out.extend(harness_type_findings(recipe, tasks))
    out.extend(dataset_findings(recipe, datasets))
    out.extend(pair_findings(recipe, pairs))


def dataset_findings(recipe: Recipe, paths: dict[Path_, Path]) -> list[Finding]:
    """Every row of the dataset (and of its eval file) through the trainer's own checker
    (recipe.datarows), then its size against the eval split and each train step's batch.
    `paths`: recipe field -> the file on this machine (only those that exist)."""
    out: list[Finding] = []
    ds = recipe.dataset
    fields = ds.fields.model_dump()
    counts: dict[Path_, int] = {}
    for where, local in paths.items():
        try:
            sc = datarows.scan(local, ds.format, fields)
        except OSError as e:
            out.append((where, f"cannot read {local}: {e.strerror or e}", False))
            continue
        out.extend((where, printable(line), False) for line in sc.lines(str(local)))
        if sc.ok and not local.is_dir() and local.suffix.lower() != ".parquet":
            counts[where] = sc.count
    total = counts.get(("dataset", "path"))
    if total is None:
        return out
    ev = ds.eval
    held = 0
    if ev is not None and ev.path is None:
        held = datarows.eval_count(total, ev.fraction, ev.size)
        if held >= total:
            what = ("size",) if ev.size else ("fraction",)
            out.append((("dataset", "eval") + what, f"the eval split holds out {held} of the dataset's {total} "
                        "row(s) and leaves none to train on", False))
            return out
    for i, step in enumerate(recipe.steps):
        if isinstance(step, TrainStep) and not isinstance(step, PreferenceStep) and total - held < step.batch_size:
            out.append((("steps", i, "batch_size"), f"batch_size {step.batch_size} is more than the "
                        f"{total - held} training row(s) the dataset has{' after the eval split' if held else ''}",
                        False))
    return out


def _merge_output_problem(value: str, step: str, kind: str = "merge") -> str | None:
    """A merge's (or quantize step's) output: a directory of its own inside the run."""
    if uses_variable(value) or value.startswith(("/", "~")) or ".." in value.replace("\\", "/").split("/"):
        return f"{kind} output is a directory inside the run; no variables, absolute paths or .."
    problem = path_problem(value)
    if problem:
        return problem
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts:
        return f"{kind} output names the run directory itself; give a directory inside it"
    if any(p.startswith(".") for p in parts):
        return f"{kind} output may not contain hidden (.name) directories; the {kind} keeps its partial output there"
    if parts[0] == "steps":
        if len(parts) < 3 or parts[1] != step:
            return f"under steps/ a {kind} step writes only into its own directory: steps/{step}/<dir>"
    elif parts[0] in RUN_ENTRIES:
        return f"{parts[0]!r} belongs to the run directory (journal, logs, configs); choose another name"
    return None


def _steps(recipe: Recipe, out: list[Finding]) -> None:
    names: dict[str, int] = {}
    seen_train: list[tuple[int, TrainStep]] = []
    seen_merge: list[tuple[int, MergeStep]] = []
    seen_serve: list[tuple[int, ServeStep]] = []
    seen_quantize: list[tuple[int, QuantizeStep]] = []
    ports: dict[int, int] = {}
    for i, step in enumerate(recipe.steps):
        name = recipe.step_name(i)
        if name in names:
            out.append(
                (("steps", i, "name" if step.name else "type"), f"step name {name!r} is used twice; give each a `name:`", False)
            )
        names.setdefault(name, i)
        if name in RESERVED_STEP_NAMES or name.startswith(RESERVED_STEP_PREFIX):
            out.append((("steps", i, "name"), f"step name {name!r} is reserved for the steps ftkit adds itself", False))
        here: Path_ = ("steps", i)
        if isinstance(step, PowerStep):
            if (step.caps_w is None) == (not step.restore):
                out.append((here, "a power step either sets `caps_w` or has `restore: true`", False))
            caps = step.caps_w if isinstance(step.caps_w, dict) else {"all": step.caps_w} if step.caps_w else {}
            for gpu, watts in caps.items():
                if not 50 <= watts <= 1500:
                    sub = here + ("caps_w",) + ((gpu,) if gpu != "all" else ())
                    out.append((sub, f"{watts} W is not a plausible GPU power cap (50-1500 W)", False))
        elif isinstance(step, TrainStep):
            _train(step, here, out)
            if isinstance(step, PreferenceStep):
                _preference(step, here, recipe, seen_train, out)
            seen_train.append((i, step))
        elif isinstance(step, MergeStep):
            target = _find(step.adapter, seen_train, recipe)
            if target is None:
                what = f"train step {step.adapter!r}" if step.adapter else "a train step"
                out.append((here + (("adapter",) if step.adapter else ()), f"merge needs {what} before it", bool(step.adapter)))
            elif target.method == "full":
                out.append((here, "full fine-tuning writes whole weights; there is no adapter to merge", False))
            elif step.base == "nf4-dequantized" and target.method != "qlora":
                out.append((here + ("base",), "nf4-dequantized applies to QLoRA adapters only", False))
            seen_merge.append((i, step))
        elif isinstance(step, QuantizeStep):
            _quantize(step, here, recipe, seen_merge, out)
            seen_quantize.append((i, step))
        elif isinstance(step, ServeStep):
            _serve(step, here, recipe, seen_train, seen_merge, out, seen_quantize)
            # the servers this one replaces (GPUs both name) are stopped before it starts: their
            # ports are free again, whichever port this one takes
            for port, j in list(ports.items()):
                other = recipe.steps[j]
                if isinstance(other, ServeStep) and _may_replace(step, other):
                    del ports[port]
            earlier = recipe.steps[ports[step.port]] if step.port in ports else None
            if isinstance(earlier, ServeStep):
                out.append((here + ("port",), f"port {step.port} is also used by serve step "
                            f"{recipe.step_name(ports[step.port])!r}, which still runs then; give each serve step its own "
                            "port, or name the same GPUs in both (`gpus: [1]`): then this one replaces it and "
                            "takes over the port", False))
            ports[step.port] = i
        elif isinstance(step, LoadAdapterStep):
            _load_adapter(step, here, recipe, seen_train, seen_serve, out)
        elif isinstance(step, EvalStep):
            _eval(step, here, recipe, seen_train, seen_merge, out, seen_quantize, seen_serve)
        if isinstance(step, ServeStep):
            seen_serve.append((i, step))


def _may_replace(later: ServeStep, earlier: ServeStep) -> bool:
    """Whether `later` may take over `earlier`'s port: it replaces that server (the runner stops
    it, then starts on its GPUs), which needs GPUs both name. `all` does not count: on a machine
    without GPUs it is none, and both servers would run."""
    return isinstance(later.gpus, list) and isinstance(earlier.gpus, list) and bool(set(later.gpus) & set(earlier.gpus))


def _find(name: str | None, seen: list, recipe: Recipe):  # type: ignore[no-untyped-def]
    if not seen:
        return None
    if name is None:
        return seen[-1][1]
    for i, step in seen:
        if recipe.step_name(i) == name:
            return step
    return None


def _train(step: TrainStep, here: Path_, out: list[Finding]) -> None:
    if step.epochs is not None and step.max_steps is not None:
        out.append((here + ("max_steps",), "give epochs or max_steps, not both", True))
    if step.method == "qlora" and step.precision == "fp32":
        out.append((here + ("precision",), "QLoRA computes in 16-bit: use bf16 or fp16", False))
    if isinstance(step.gpus, list):
        if len(set(step.gpus)) != len(step.gpus):
            out.append((here + ("gpus",), "a GPU is listed twice", False))
        if step.distribution == "single" and len(step.gpus) > 1:
            out.append(
                (here + ("distribution",), f"{len(step.gpus)} GPUs listed but distribution is single; use ddp or deepspeed-zero2/3", False)
            )
        if step.distribution != "single" and len(step.gpus) < 2 and step.nodes == 1:
            out.append((here + ("gpus",), f"{step.distribution} needs at least 2 GPUs", False))
    if step.nodes > 1 and step.distribution == "single":
        out.append((here + ("distribution",), f"nodes: {step.nodes} runs one process per GPU on every node: "
                    "use ddp or deepspeed-zero2/3", False))
    if step.cpu_offload and not step.distribution.startswith("deepspeed"):
        out.append((here + ("cpu_offload",), "cpu_offload needs distribution deepspeed-zero2 or deepspeed-zero3", False))
    if step.optimizer in ("paged_adamw_8bit", "adamw_8bit") and step.distribution.startswith("deepspeed"):
        out.append(
            (here + ("optimizer",), "8-bit bitsandbytes optimizers do not shard under DeepSpeed ZeRO; use adamw_torch", False)
        )
    if step.method == "full" and step.lora.model_fields_set:
        out.append((here + ("lora",), "lora settings have no effect with method full", True))


def pair_findings(recipe: Recipe, paths: dict[Path_, Path]) -> list[Finding]:
    """Every preference pair (a preference step's `data`) through the trainer's own checker, and
    the training pairs left after the eval split against the step's batch."""
    out: list[Finding] = []
    counts: dict[Path_, int] = {}
    for where, local in paths.items():
        step = recipe.steps[int(where[1])]
        if not isinstance(step, PreferenceStep):
            continue
        try:
            sc = datarows.scan(local, "preference", step.data.fields.model_dump())
        except OSError as e:
            out.append((where, f"cannot read {local}: {e.strerror or e}", False))
            continue
        out.extend((where, printable(line), False) for line in sc.lines(str(local)))
        if sc.ok and where[-2:] == ("data", "path") and not local.is_dir() and local.suffix.lower() != ".parquet":
            counts[where] = sc.count
    for where, total in counts.items():
        step = recipe.steps[int(where[1])]
        if not isinstance(step, PreferenceStep):
            continue
        ev = step.data.eval
        held = datarows.eval_count(total, ev.fraction, ev.size) if ev is not None and ev.path is None else 0
        if held >= total:
            out.append((where[:-1] + ("eval",), f"the eval split holds out {held} of the {total} pair(s) and leaves "
                        "none to train on", False))
        elif total - held < step.batch_size:
            out.append((where[:2] + ("batch_size",), f"batch_size {step.batch_size} is more than the {total - held} "
                        f"training pair(s){' after the eval split' if held else ''}", False))
    return out


def _preference(step: PreferenceStep, here: Path_, recipe: Recipe, trains: list, out: list[Finding]) -> None:
    if step.packing:
        out.append((here + ("packing",), "preference pairs are not packed: each pair is a chosen and a rejected "
                    "sequence scored apart", False))
    if step.adapter is None:
        return
    start = _find(step.adapter, trains, recipe)
    if start is None:
        out.append((here + ("adapter",), f"preference needs train step {step.adapter!r} before it (the adapter it "
                    "trains further)", False))
    elif start.method == "full":
        out.append((here + ("adapter",), f"train step {step.adapter!r} is full fine-tuning: it has no adapter to "
                    "train further (start from the base: leave out adapter)", False))
    elif start.method != step.method:
        out.append((here + ("method",), f"train step {step.adapter!r} trained a {start.method} adapter: set method: "
                    f"{start.method} to train it further", False))
    elif step.lora.model_fields_set:
        out.append((here + ("lora",), f"the adapter of {step.adapter!r} keeps its own LoRA settings: drop lora",
                    True))


def _arg_value_problem(value: object) -> str | None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, str):
            if any(not (c == " " or c.isprintable()) for c in v):
                return f"value {v!r} contains control characters"
            if v.startswith("-") and not re.match(r"^-\d+(\.\d+)?$", v):
                return f"value {v!r} starts with '-': it would be read as another flag"
    return None


W4A16_GROUP = 128  # the W4A16 scheme's group: every quantized Linear's input size must be a multiple


def _quantize(step: QuantizeStep, here: Path_, recipe: Recipe, merges: list, out: list[Finding]) -> None:
    # the layer sizes the recipe states (a tiny model's, model.arch's); a local model's
    # config.json and tensor-parallel serving are checked with the machine (plan.machine_checks)
    for block in ("tiny", "arch"):
        spec = getattr(recipe.model, block)
        if spec is None:
            continue
        for key in ("hidden_size", "intermediate_size"):
            size = getattr(spec, key)
            if size is not None and size % W4A16_GROUP:
                up = (size // W4A16_GROUP + 1) * W4A16_GROUP
                out.append((("model", block, key), f"{size}: W4A16 quantizes each Linear in groups of "
                            f"{W4A16_GROUP} inputs, so its layer sizes must be multiples of {W4A16_GROUP} (use {up}); "
                            f"quantize step {recipe.step_name(int(here[1]))!r} needs it", False))
    if _find(step.merge, merges, recipe) is None:
        what = f"merge step {step.merge!r}" if step.merge else "a merge step"
        out.append((here + (("merge",) if step.merge else ()), f"quantize needs {what} before it: it quantizes "
                    "the merged model", bool(step.merge)))
    for j, pattern in enumerate(step.ignore):
        if not pattern or any(not c.isprintable() for c in pattern):
            out.append((here + ("ignore", j), "a module name or re: pattern, without control characters", False))
        elif pattern.startswith("re:"):
            problem = regex_problem(pattern[3:])
            if problem:
                out.append((here + ("ignore", j), problem, False))


def _serve(step: ServeStep, here: Path_, recipe: Recipe, trains: list, merges: list, out: list[Finding],
           quantized: list | None = None) -> None:
    if step.model == "merged":
        if _find(step.adapter, merges, recipe) is None:
            out.append((here + ("model",), "serving the merged model needs a merge step before this one", False))
    elif step.model == "quantized":
        if _find(step.adapter, quantized or [], recipe) is None:
            what = f"quantize step {step.adapter!r}" if step.adapter else "a quantize step"
            out.append((here + ("model",), f"serving the quantized model needs {what} before this one", False))
        if step.engine == "transformers":
            out.append((here + ("engine",), "the quantized model (compressed-tensors, 4-bit) is served by vLLM: use "
                        "engine vllm or auto", False))
        for key in ("quantization", "dtype"):
            if key in step.args:
                out.append((here + ("args", key), f"the quantized model carries its own quantization "
                            f"(compressed-tensors): drop args.{key}", True))
    elif step.model == "adapter":
        target = _find(step.adapter, trains, recipe)
        if target is None or target.method == "full":
            out.append((here + ("model",), "serving an adapter needs a lora/qlora train step before this one", False))
        if step.engine == "transformers":
            out.append((here + ("engine",), "base + adapter serving needs engine vllm (--enable-lora); merge for transformers", False))
    for j, name in enumerate(step.adapters):
        target = _find(name, trains, recipe)
        if target is None or target.method == "full":
            out.append((here + ("adapters", j), f"{name!r} is not a lora/qlora train step before this one", False))
        elif name in step.adapters[:j]:
            out.append((here + ("adapters", j), f"{name!r} is listed twice", False))
    if step.adapters and step.model == "merged":
        out.append((here + ("adapters",), "LoRA adapters apply to the base they were trained on, not to a merged "
                    "model: serve model: base with these adapters", False))
    if step.adapters and step.engine == "transformers":
        out.append((here + ("adapters",), "serving several LoRA adapters needs engine vllm (multi-LoRA)", False))
    if step.preempt == "sleep" and step.engine == "transformers":
        out.append((here + ("preempt",), "sleep mode is vLLM's; transformers serve can only be stopped", False))
    flagged: set[str] = set()
    for key, value in step.args.items():
        if not re.match(r"^[a-z0-9][a-z0-9_-]*$", key):
            out.append((here + ("args", key), f"engine argument {key!r} should look like max_model_len", True))
            continue
        flag = key.replace("_", "-")
        if flag in PLAN_SET_SERVE_ARGS:
            out.append((here + ("args", key), f"--{flag} is set by ftkit: {PLAN_SET_SERVE_ARGS[flag]}", True))
            continue
        problem = _arg_value_problem(value)
        if problem:
            out.append((here + ("args", key), problem, False))
            flagged.add(key)
    # the values the serving memory fit reads too: as vLLM reads them, or refused here
    for key, problem in serveargs.problems(step.args):
        if key not in flagged:
            out.append((here + ("args", key), problem, False))
    if step.engine == "transformers" and step.gpus != "all" and len(step.gpus) > 1:
        out.append((here + ("gpus",), "transformers serve uses one device", False))
    if isinstance(step.gpus, list) and len(set(step.gpus)) != len(step.gpus):
        out.append((here + ("gpus",), "a GPU is listed twice", False))
    for j, prompt in enumerate(step.prompts):
        _prompt_expect(prompt, here + ("prompts", j), out)


def _load_adapter(step: LoadAdapterStep, here: Path_, recipe: Recipe, trains: list, serves: list,
                  out: list[Finding]) -> None:
    server = _find(step.server, serves, recipe)
    if server is None:
        what = f"serve step {step.server!r}" if step.server else "a serve step"
        out.append((here + (("server",) if step.server else ()), f"load-adapter needs {what} before it: the "
                    "adapter goes into that step's running server", False))
    elif server.engine == "transformers":
        out.append((here + ("server",), "runtime LoRA loading is vLLM's: the server's engine is transformers", False))
    elif server.model == "merged":
        out.append((here + ("server",), "the server serves a merged model; an adapter applies to the base it was "
                    "trained on: load it into a server with model: base", False))
    target = _find(step.adapter, trains, recipe)
    if target is None or target.method == "full":
        what = f"train step {step.adapter!r}" if step.adapter else "a train step"
        out.append((here + (("adapter",) if step.adapter else ()), f"load-adapter needs {what} with method lora or "
                    "qlora before it", False))
    if server is not None and step.served_name is not None and step.served_name == (server.served_name or recipe.name):
        out.append((here + ("served_name",), f"{step.served_name!r} is the server's own model name; give the "
                    "adapter another", False))
    for j, prompt in enumerate(step.prompts):
        _prompt_expect(prompt, here + ("prompts", j), out)


def _prompt_expect(prompt: ServePrompt, where: Path_, out: list[Finding]) -> None:
    exp = prompt.expect
    if exp is None:
        return
    if exp.contains is None and exp.equals is None and exp.regex is None:
        out.append((where + ("expect",), "give contains, equals or regex (or drop expect)", False))
    if exp.regex is not None:
        problem = regex_problem(exp.regex)
        if problem:
            out.append((where + ("expect", "regex"), problem, False))


def _eval(step: EvalStep, here: Path_, recipe: Recipe, trains: list, merges: list, out: list[Finding],
          quantized: list | None = None, serves: list | None = None) -> None:
    if step.harness is not None:
        _harness(step, here, recipe, serves or [], out)
    if not step.models:
        if step.harness is None:
            out.append((here + ("models",), "no models to score: name at least one, or give harness", False))
        for key in ("prompts", "path"):
            if getattr(step, key) is not None:
                out.append((here + (key,), f"{key} are scored on models, and models is empty", False))
        return
    if step.prompts is not None and step.path is not None:
        out.append((here, "give prompts or path, not both", False))
    if step.prompts is None and step.path is None and recipe.dataset.eval is None:
        out.append((here, "no prompts: give prompts, path, or an eval split in dataset.eval", False))
    if step.prompts is not None and not step.prompts:
        out.append((here + ("prompts",), "an empty list of prompts scores nothing", False))
    seen: set[str] = set()
    for j, model in enumerate(step.models):
        if model in seen:
            out.append((here + ("models", j), f"{model!r} is listed twice", False))
        seen.add(model)
        if model == "merged" and not merges:
            out.append((here + ("models", j), "no merge step before this one", False))
        if model == "adapter" and not [t for _, t in trains if t.method != "full"]:
            out.append((here + ("models", j), "no lora/qlora train step before this one", False))
        if model == "quantized" and not quantized:
            out.append((here + ("models", j), "no quantize step before this one", False))
    if "quantized" in step.models and "adapter" in step.models:
        out.append((here + ("models", step.models.index("adapter")), "an eval of the quantized model runs in the "
                    "quantize image (llm-compressor's transformers and compressed-tensors), which has no peft: "
                    "score the adapter in an eval step of its own", False))
    if step.min_improvement is not None and len(step.models) < 2:
        out.append((here + ("min_improvement",), "needs two models to compare", True))


def _harness(step: EvalStep, here: Path_, recipe: Recipe, serves: list, out: list[Finding]) -> None:
    """The server is a serve step before this one; names and paths are told apart by form
    (recipe.harness); a chat endpoint or transformers serve cannot score log-probabilities."""
    h = step.harness
    if h is None:
        return
    hh = here + ("harness",)
    server = _find(h.server, serves, recipe)
    if server is None:
        what = f"serve step {h.server!r}" if h.server else "a serve step"
        out.append((hh + (("server",) if h.server else ()), f"the harness needs {what} before this step: it scores "
                    "that server's OpenAI-compatible endpoint", False))
    seen: set[str] = set()
    for j, task in enumerate(h.tasks):
        if not task.strip() or task != task.strip():
            out.append((hh + ("tasks", j), f"{task!r}: a task name or path without surrounding spaces", False))
        elif task in seen:
            out.append((hh + ("tasks", j), f"{task!r} is listed twice", False))
        elif _at_recipe_root(task):
            out.append((hh + ("tasks", j), f"{task!r}: put task files in a directory of their own (tasks/...): "
                        "lm-eval indexes every YAML file beside a task file, the recipe's directory included", False))
        seen.add(task)
    if step.min_improvement is not None and not step.models:
        out.append((hh, "min_improvement compares models; the harness's scores are recorded, not compared", False))
    d = recipe.dataset
    if h.model == "chat" and recipe.model.tiny is not None and (d.template == "alpaca" or (d.template == "auto"
                                                                                          and d.format != "chat")):
        # the tiny model's tokenizer is made here, with no chat template; alpaca installs none
        out.append((hh + ("model",), "the served model has no chat template (a tiny model with alpaca prompts): "
                    "/v1/chat/completions answers 400; use model: completions", False))


def _at_recipe_root(task: str) -> bool:
    from ftkit.recipe.harness import is_path

    if not is_path(task):
        return False
    parts = [p for p in task.replace("\\", "/").split("/") if p not in ("", ".")]
    return not parts or (len(parts) == 1 and task.endswith((".yaml", ".yml")))


def harness_type_findings(recipe: Recipe, paths: dict[Path_, Path]) -> list[Finding]:
    """Task files that cannot be read, define no task, or ask for log-probabilities that the
    step's server cannot give (a chat endpoint or transformers serve: vLLM gives them)."""
    from ftkit.recipe import harness

    out: list[Finding] = []
    for where, local in paths.items():
        step = recipe.steps[where[1]]
        if not isinstance(step, EvalStep) or step.harness is None:
            continue
        try:
            types = harness.task_types(local)
        except (OSError, ValueError) as e:
            out.append((where, f"unreadable task YAML: {e}", False))
            continue
        for task_file, ref, module in harness.python_imports(local):
            root = local if local.is_dir() else local.parent
            rel = str(module.relative_to(root)) if module.is_relative_to(root) else str(module)
            if not module.is_file():
                out.append((where, f"{task_file.name}: !function {ref} imports {rel}, which does not exist (lm-eval "
                            "would fail after the server has started)", False))
        if not types and local.is_dir():
            out.append((where, f"{local.name}/ defines no lm-eval task (no YAML with a `task:` name)", False))
            continue
        logprob = harness.logprob_tasks(types)
        if not logprob:
            continue
        kinds = ", ".join(f"{t} ({types[t]})" for t in logprob[:4])
        if step.harness.model == "chat":
            out.append((where, f"{kinds}: a chat endpoint gives no prompt log-probabilities; use model: completions "
                        "or generate_until tasks", False))
            continue
        server = _find(step.harness.server, [(i, s) for i, s in enumerate(recipe.steps[:where[1]])
                                             if isinstance(s, ServeStep)], recipe)
        if isinstance(server, ServeStep) and server.engine == "transformers":
            out.append((where, f"{kinds}: needs the prompt's log-probabilities (echo + logprobs), which transformers "
                        "serve does not give; serve with engine: vllm, or use generate_until tasks", False))
    return out


# --------------------------------------------------------------------------- machine profiles

MACHINE_PATHS = ("models", "datasets", "runs", "hf_cache", "lease")
WRITABLE_PATHS = ("runs", "lease")


def machine_findings(machine: Machine) -> list[Finding]:
    out: list[Finding] = []
    seen: set[int] = set()
    for i, gpu in enumerate(machine.gpus):
        if gpu.index in seen:
            out.append((("gpus", i, "index"), f"GPU index {gpu.index} appears twice", False))
        seen.add(gpu.index)
        if not _GPU_MODEL.match(gpu.model):
            out.append((("gpus", i, "model"), f"GPU model {printable(gpu.model[:60])!r} is not a model name (letters, "
                        "digits, spaces and - _ . ( ) +; no path, newline or control character)", False))
        if gpu.power is not None:
            p = gpu.power
            if p.min_w > p.max_w:
                out.append((("gpus", i, "power"), "min_w is above max_w", False))
            if p.default_w is not None and not p.min_w <= p.default_w <= p.max_w:
                out.append((("gpus", i, "power", "default_w"), "default_w must lie between min_w and max_w", False))
    if machine.serving is not None:
        for j, idx in enumerate(machine.serving.gpus):
            if idx not in seen:
                out.append((("serving", "gpus", j), f"GPU {idx} is not listed under gpus", False))
    if machine.psu is not None and machine.psu.watts * machine.psu.safety_margin <= machine.system_watts:
        out.append((("psu", "watts"), f"{machine.psu.watts} W x {machine.psu.safety_margin:g} is no more than the "
                    f"system's own {machine.system_watts} W (system_watts): nothing is left for the GPUs", False))
    if machine.paths.lease is not None:
        problem = _lease_dir_mode_problem(machine.paths.lease)
        if problem:
            out.append((("paths", "lease"), problem, False))
    for key in MACHINE_PATHS:
        value = getattr(machine.paths, key)
        if value is None:
            continue
        problem = _machine_path_problem(value, writable=key in WRITABLE_PATHS, kind="dir")
        if problem:
            out.append((("paths", key), problem, False))
    for path, value, kind in ((("docker", "wheelhouse"), machine.docker.wheelhouse, "dir"),
                              (("docker", "images_lock"), machine.docker.images_lock, "file"),
                              (("ca_bundle",), machine.ca_bundle, "file")):
        if value is None:
            continue
        problem = _machine_path_problem(value, writable=False, kind=kind)
        if problem:
            out.append((path, problem, False))
        elif path == ("docker", "images_lock"):
            lock = Path(value).expanduser()
            if lock.is_file():
                problem = lock_file_problem(lock)
                if problem:
                    out.append((path, f"{value}: {problem}", False))
    if machine.docker.base_image is not None:
        problem = imagerefs.reference_problem(machine.docker.base_image)
        if problem:
            out.append((("docker", "base_image"), problem, False))
    if machine.docker.host is not None:
        problem = docker_host_problem(machine.docker.host)
        if problem:
            out.append((("docker", "host"), problem, False))
    try:
        ipaddress.ip_address(machine.bind_address)
    except ValueError:
        out.append((("bind_address",), f"{machine.bind_address!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)", False))
    if machine.cluster is not None:
        out.extend(_cluster_findings(machine, machine.cluster))
    out.extend(tracking.findings(machine.tracking, ("tracking",)))
    return out


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by the plan for every node: a profile may not override them per node.
PLAN_SET_NODE_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "PET_RDZV_ID", "CUDA_VISIBLE_DEVICES",
                     "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _address_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        return f"{value!r} is neither an IP address nor a host name"
    return None


def _cluster_findings(machine: Machine, cluster: Cluster) -> list[Finding]:
    """A cluster's nodes: unique names and addresses, an interface for NCCL/Gloo on every
    node, the rendezvous in the first node, and a run directory every node sees."""
    out: list[Finding] = []
    names: dict[str, int] = {}
    addresses: dict[str, int] = {}
    for i, node in enumerate(cluster.nodes):
        here: Path_ = ("cluster", "nodes", i)
        if node.name in names:
            out.append((here + ("name",), f"node name {node.name!r} is used twice", False))
        names.setdefault(node.name, i)
        problem = _address_problem(node.address)
        if problem:
            out.append((here + ("address",), problem, False))
        elif node.address in addresses:
            out.append((here + ("address",), f"address {node.address!r} is also node "
                        f"{cluster.nodes[addresses[node.address]].name!r}'s", False))
        addresses.setdefault(node.address, i)
        if node.docker_host is not None:
            problem = docker_host_problem(node.docker_host)
            if problem:
                out.append((here + ("docker_host",), problem, False))
        if node.interface is None and cluster.interface is None:
            out.append((here, f"node {node.name!r} names no network interface (set cluster.interface or this node's "
                        "interface): without GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME, Gloo binds the address the host "
                        "name resolves to (often 127.0.1.1) and start-up fails", False))
        if len(set(node.gpus)) != len(node.gpus):
            out.append((here + ("gpus",), "a GPU is listed twice", False))
        for key, value in node.env.items():
            if not _ENV_NAME.match(key):
                out.append((here + ("env", key), f"{key!r} is not an environment variable name", True))
            elif key in PLAN_SET_NODE_ENV:
                out.append((here + ("env", key), f"{key} is set by the plan for every node", True))
            elif any(not (c == " " or c.isprintable()) for c in value):
                out.append((here + ("env", key), "the value contains control characters", False))
    if cluster.nodes and cluster.rendezvous.host is not None and cluster.rendezvous.host not in (
            cluster.nodes[0].address, cluster.nodes[0].name):
        out.append((("cluster", "rendezvous", "host"), f"the c10d store runs in the first node's launcher "
                    f"({cluster.nodes[0].name}, {cluster.nodes[0].address}): list that host first, or drop host", False))
    if cluster.network == "none":
        out.append((("cluster", "network"), "network none: the nodes could not reach each other", False))
    problem = _machine_path_problem(cluster.shared, writable=True, kind="dir")
    if problem:
        out.append((("cluster", "shared"), problem, False))
    elif machine.paths.runs is None:
        out.append((("paths",), "a cluster needs paths.runs inside cluster.shared: every node writes checkpoints "
                    "into the same run directory", False))
    elif not _inside(machine.paths.runs, cluster.shared):
        out.append((("paths", "runs"), f"{machine.paths.runs} is not inside cluster.shared ({cluster.shared}): "
                    "the other nodes would not see the run directory", False))
    return out


def _inside(path: str, root: str) -> bool:
    p, r = Path(path).expanduser(), Path(root).expanduser()
    return p == r or r in p.parents


_GPU_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,79}$")


def _lease_dir_mode_problem(value: str) -> str | None:
    """A lease directory everyone may write without the sticky bit lets any user delete or
    replace another's lock files, and so take GPUs that are held (like /tmp without +t)."""
    try:
        st = os.stat(Path(value).expanduser())
    except (OSError, ValueError):
        return None  # created by ftkit with the right mode; other path problems are said elsewhere
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return (f"{value} is writable by everyone without the sticky bit: any user could delete another's GPU "
                f"locks; chmod +t {value} (or chmod o-w)")
    return None


def _machine_path_problem(value: str, *, writable: bool, kind: str) -> str | None:
    if not value or any(not (c == " " or c.isprintable()) for c in value):
        return f"path {value!r} is empty or contains control characters"
    if not (value.startswith("/") or value.startswith("~")):
        return "machine paths are absolute (this file describes one machine)"
    p = Path(value).expanduser()
    problem = kind_problem(p, kind)
    if problem:
        return f"{value} {problem}"
    # A parent that is a file makes the path impossible to create.
    for parent in p.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                return f"{value}: {parent} is not a directory"
            break
    if writable and p.is_dir() and not _writable(p):
        return f"{value} is not writable by this user"
    return None


def _writable(p: Path) -> bool:
    return os.access(p, os.W_OK | os.X_OK)
