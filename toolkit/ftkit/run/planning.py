"""Load -> resolve -> plan, shared by `ftkit plan`, `ftkit validate --machine` and `ftkit up`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ftkit.plan.build import build_plan
from ftkit.plan.spec import Plan
from ftkit.recipe.models import Machine
from ftkit.recipe.resolve import Resolved, resolve
from ftkit.recipe.validate import load_machine, load_recipe


def load_and_resolve(recipe_path: str, machine_path: str | None) -> Resolved:
    loaded = load_recipe(recipe_path)
    if machine_path:
        machine: Machine = load_machine(machine_path).machine
    else:
        from ftkit.gpu.inventory import detect_machine

        machine = detect_machine()
    return resolve(loaded, machine)


def runs_root(machine: Machine) -> Path:
    return Path(machine.paths.runs).expanduser() if machine.paths.runs else Path("runs")


def image_refs(res: Resolved) -> dict[str, str]:
    """Image references for docker steps: the recipe's digest pins, else the content tags
    `ftkit build` would produce from this checkout."""
    refs: dict[str, str] = {}
    try:
        from ftkit.images.catalog import expected_refs

        refs.update(expected_refs(res.machine, res.host_paths.get("images_lock")))
    except Exception:  # noqa: BLE001 - no checkout templates here: plan shows placeholders
        refs.update({"train": "ftkit/train:<variant> (run ftkit build)",
                     "serve-vllm": "ftkit/serve:vllm (run ftkit build)",
                     "serve-transformers": "ftkit/serve:transformers (run ftkit build)"})
    if res.recipe.images:
        if res.recipe.images.train:
            refs["train"] = res.recipe.images.train
        if res.recipe.images.serve:
            refs["serve-vllm"] = refs["serve-transformers"] = res.recipe.images.serve
    return refs


def local_model_config(res: Resolved) -> dict[str, Any] | None:
    p = res.host_paths.get("model")
    if p is None or not (p / "config.json").is_file():
        return None
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def make_plan(recipe_path: str, machine_path: str | None, *, run_dir: str | None) -> Plan:
    res = load_and_resolve(recipe_path, machine_path)
    return plan_for(res, run_dir=run_dir)


def plan_for(res: Resolved, *, run_dir: str | None) -> Plan:
    if run_dir is None:
        run_dir = str(runs_root(res.machine) / f"<UTC timestamp>-{res.recipe.name}")
    images = image_refs(res) if res.machine.executor == "docker" else {}
    return build_plan(res, run_dir=run_dir, python=sys.executable, images=images,
                      local_model_config=local_model_config(res))
