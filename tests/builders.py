"""Test inputs built in one place: a recipe and a machine profile from defaults plus the few
fields a test is about, so a bug test reads

    build_plan(resolve(recipe(steps={0: {"max_steps": 2}}), machine(executor="docker")), run_dir=RUN)

plus an assertion, and a plan-level test through the CLI reads
`plan_json(recipe_file(tmp_path, name="srv"), machine_file(tmp_path, executor="docker"))`.

The objects come through ftkit's own stages (the files are written and read back by
`load_recipe` / `load_machine`, so positions, validation and the cross-field checks are the
real ones); nothing here builds a Recipe or a Plan by hand. Overrides merge deeply
(`merged`): a dict merges key by key, a dict given for a list changes the items it names by
index (`steps={1: {"port": 8002}}`), anything else replaces. `steps` may also be YAML text
(the lines under `steps:`), written as it is, for tests whose steps read best as flow lines.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.conftest import RECIPES, run_cli

if TYPE_CHECKING:
    from ftkit.plan.spec import Plan
    from ftkit.recipe.models import Machine
    from ftkit.recipe.validate import LoadedRecipe

RUN = "/runs/r"  # the run directory of a plan built in memory
ROW = {"instruction": "a", "input": "", "output": "b"}
MACHINES = RECIPES / "machines"
CPU = MACHINES / "cpu.yaml"
CPU_DOCKER = MACHINES / "cpu-docker.yaml"

# The guide recipes and the machine each is written for.
GUIDES = {
    "mistral": ("mistral-small-24b-qlora-2x24gb.yaml", "zorac.yaml"),
    "gemma": ("gemma2-27b-qlora-zero3-2x4090.yaml", "dual-4090.yaml"),
    "llama-1gpu": ("llama31-8b-lora-1gpu.yaml", "dual-4090.yaml"),
    "llama-2gpu": ("llama31-8b-lora-2gpu.yaml", "dual-4090.yaml"),
}

RECIPE: dict[str, Any] = {
    "ftkit": 1,
    "name": "t",
    "model": {"tiny": {"hidden_size": 64, "layers": 1, "heads": 2, "intermediate_size": 128, "vocab_size": 300},
              "dtype": "fp32"},
    "dataset": {"path": "data.jsonl", "format": "alpaca", "template": "alpaca"},
    "steps": [{"type": "train", "method": "lora", "max_steps": 1}],
}
MACHINE: dict[str, Any] = {"ftkit": 1, "kind": "machine", "name": "cpu", "executor": "local"}


def merged(base: Any, override: Any) -> Any:
    """`override` laid over `base` (neither is changed): dicts key by key, a dict over a list
    by index, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = merged(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(override, dict) and all(isinstance(k, int) for k in override):
        out_list = copy.deepcopy(base)
        for index, value in override.items():
            out_list[index] = merged(out_list[index], value)
        return out_list
    return copy.deepcopy(override)


def recipe_data(**overrides: Any) -> dict[str, Any]:
    """The raw recipe: a tiny fp32 model, an alpaca data.jsonl beside it, one LoRA train step."""
    return merged(RECIPE, overrides)


def machine_data(**overrides: Any) -> dict[str, Any]:
    """The raw machine profile: this CPU, the local executor, no GPU."""
    return merged(MACHINE, overrides)


def gpus(*models: str, vram_gib: float | None = None) -> list[dict[str, Any]]:
    """A profile's `gpus:` list, indices in order."""
    return [{"index": i, "model": m, **({"vram_gib": vram_gib} if vram_gib is not None else {})}
            for i, m in enumerate(models)]


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("\n...").strip()


def _dump(data: dict[str, Any]) -> str:
    """One line a top-level key (its value in flow style), the steps last, one line each:
    the layout the tests wrote by hand, so a recipe's steps start at line 6."""
    lines = [f"{key}: {_flow(value)}\n" for key, value in data.items() if key != "steps"]
    steps = data.get("steps")
    if isinstance(steps, str):  # YAML text of the steps, kept as the test wrote it
        return "".join(lines) + "steps:\n" + steps
    if steps is not None:
        lines += ["steps:\n", *(f"  - {_flow(s)}\n" for s in steps)]
    return "".join(lines)


def write_recipe(where: Path, data: dict[str, Any], *, rows: list[dict[str, Any]] | None = None,
                 name: str = "recipe.yaml") -> Path:
    """Write `data` as `where/name`, with `rows` (one alpaca row unless given) as its dataset
    where the dataset is a relative path not already there."""
    where.mkdir(parents=True, exist_ok=True)
    dataset = data.get("dataset") or {}
    path = dataset.get("path") if isinstance(dataset, dict) else None
    if isinstance(path, str) and "${" not in path and not Path(path).is_absolute():
        target = where / path
        if rows is not None or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(json.dumps(r) + "\n" for r in (rows if rows is not None else [ROW])))
    out = where / name
    out.write_text(_dump(data))
    return out


def recipe_file(where: Path, *, rows: list[dict[str, Any]] | None = None, file: str = "recipe.yaml",
                **overrides: Any) -> Path:
    """`recipe_data(**overrides)` written in `where` beside its data: the path to pass the CLI."""
    return write_recipe(where, recipe_data(**overrides), rows=rows, name=file)


def machine_file(where: Path, *, file: str | None = None, **overrides: Any) -> Path:
    """`machine_data(**overrides)` written in `where` (a file named for the profile unless `file`)."""
    data = machine_data(**overrides)
    where.mkdir(parents=True, exist_ok=True)
    out = where / (file or f"machine-{data['name']}.yaml")
    out.write_text(_dump(data))
    return out


_SCRATCH: tempfile.TemporaryDirectory[str] | None = None


def _scratch() -> Path:
    """A fresh directory for a recipe built without one (removed when the tests end)."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="ftkit-builders-")
    return Path(tempfile.mkdtemp(dir=_SCRATCH.name))


def recipe(where: Path | None = None, /, *, rows: list[dict[str, Any]] | None = None, **overrides: Any) -> LoadedRecipe:
    """The recipe parsed and validated (`load_recipe`), written in `where` or a fresh directory."""
    from ftkit.recipe.validate import load_recipe

    return load_recipe(write_recipe(where or _scratch(), recipe_data(**overrides), rows=rows))


def machine(where: Path | None = None, /, **overrides: Any) -> Machine:
    """The machine profile parsed and validated (`load_machine`)."""
    from ftkit.recipe.validate import load_machine

    return load_machine(machine_file(where or _scratch(), **overrides)).machine


def plan_of(recipe_path: Path | str, machine_path: Path | str | None = None, *, run_dir: str | None = RUN,
            check: bool = False) -> Plan:
    """The plan of two files as `ftkit plan` builds it (`prepare.prepare`); `check`
    refuses, as `ftkit up` does, a recipe that does not fit the machine."""
    from ftkit.prepare import prepare

    prepared = prepare(str(recipe_path), None if machine_path is None else str(machine_path), run_dir=run_dir)
    if check:
        prepared.check()
    return prepared.plan


def guide_plan(name: str, run_dir: str | None = RUN) -> Plan:
    """The plan of a guide recipe (a GUIDES key) on its machine."""
    recipe_name, machine_name = GUIDES[name]
    return plan_of(RECIPES / recipe_name, MACHINES / machine_name, run_dir=run_dir)


def plan_json(recipe_path: Path | str, machine_path: Path | str | None = None, *extra: str,
              cwd: Path | None = None) -> dict[str, Any]:
    """`ftkit plan RECIPE [--machine M] --json`, which must succeed, as a dict."""
    args = ["plan", str(recipe_path), *(["--machine", str(machine_path)] if machine_path is not None else []),
            "--json", *extra]
    result = run_cli(*args, cwd=cwd)
    assert result.code == 0, result.err
    return json.loads(result.out)  # type: ignore[no-any-return]


def step(plan: dict[str, Any], sid: str) -> dict[str, Any]:
    """The step `sid` of a plan.json."""
    return next(s for s in plan["steps"] if s["id"] == sid)


def step_config(step: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The JSON of the first file the step writes whose path starts with `prefix`."""
    return json.loads(next(f["content"] for f in step["files"] if f["path"].startswith(prefix)))  # type: ignore[no-any-return]


def shipped(where: Path, name: str, *, data: bool = True, file: str = "recipe.yaml", **replace: str) -> Path:
    """A shipped recipe (recipes/NAME) written in `where` with `replace`'s texts replaced (each
    must be there), beside a copy of recipes/data unless `data` is false."""
    text = (RECIPES / name).read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    if data:
        shutil.copytree(RECIPES / "data", where / "data", dirs_exist_ok=True)
    where.mkdir(parents=True, exist_ok=True)
    out = where / file
    out.write_text(text)
    return out


# FILE:LINE:COL: field.path: message, the one line every located error is
LOCATED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")


def located(err: str) -> list[re.Match[str]]:
    """The located error lines of a command's stderr, parsed."""
    return [m for m in map(LOCATED.match, err.strip().splitlines()) if m]


def shipped_machine(where: Path, name: str, *, file: str | None = None, **overrides: Any) -> Path:
    """A shipped machine profile (recipes/machines/NAME) with `overrides` merged in, written in `where`."""
    data = merged(yaml.safe_load((MACHINES / name).read_text()), overrides)
    where.mkdir(parents=True, exist_ok=True)
    out = where / (file or name)
    out.write_text(_dump(data))
    return out
