"""tests/builders.py: the defaults load, plan and merge as the tests that use them expect."""

from __future__ import annotations

from pathlib import Path

from ftkit.plan.build import build_plan
from ftkit.recipe.resolve import resolve
from tests.builders import (
    RUN,
    machine,
    machine_data,
    merged,
    plan_json,
    recipe,
    recipe_data,
    recipe_file,
    step,
)


def test_a_bug_test_is_one_line_of_inputs() -> None:
    plan = build_plan(resolve(recipe(steps=[{"type": "train", "method": "lora", "max_steps": 2},
                                             {"type": "merge"}]), machine()), run_dir=RUN)
    assert [s.kind for s in plan.steps][-2:] == ["train", "merge"]


def test_overrides_change_one_field_or_one_step() -> None:
    data = recipe_data(model={"tiny": {"heads": 4}}, steps={0: {"max_steps": 3}})
    assert data["model"]["tiny"] == {**recipe_data()["model"]["tiny"], "heads": 4}
    assert data["model"]["dtype"] == "fp32" and data["steps"] == [{"type": "train", "method": "lora", "max_steps": 3}]
    assert recipe_data(steps=[{"type": "merge"}])["steps"] == [{"type": "merge"}]  # a list replaces
    assert machine_data(executor="docker") == {**machine_data(), "executor": "docker"}
    base = {"a": {"b": 1}}
    assert merged(base, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}} and base == {"a": {"b": 1}}


def test_files_plan_through_the_cli(tmp_path: Path) -> None:
    steps = "  - {type: train, name: t1, method: lora, max_steps: 1}\n"
    p = plan_json(recipe_file(tmp_path, steps=steps), None, cwd=tmp_path)
    assert step(p, "t1")["kind"] == "train"
