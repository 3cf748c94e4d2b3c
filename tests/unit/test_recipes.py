"""The example recipes and machine profiles: valid, schema-annotated, schema copy in sync."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from ftkit.recipe.models import json_schema
from tests.builders import GUIDES
from tests.conftest import RECIPES, run_cli

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
MACHINE_FILES = sorted((RECIPES / "machines").glob("*.yaml"))
GUIDE_PAIRS = list(GUIDES.values())


def test_every_recipe_and_profile_validates() -> None:
    result = run_cli("validate", *map(str, RECIPE_FILES + MACHINE_FILES))
    assert result.code == 0, result.err
    assert result.out.count("ok: ") == len(RECIPE_FILES) + len(MACHINE_FILES)


@pytest.mark.parametrize("recipe,machine", GUIDE_PAIRS)
def test_guide_recipes_fit_their_machines(recipe: str, machine: str) -> None:
    result = run_cli("validate", str(RECIPES / recipe), "--machine", str(RECIPES / "machines" / machine))
    assert result.code == 0, result.err


def test_schema_copies_are_identical_to_ftkit_schema() -> None:
    for kind, path in (("recipe", RECIPES / "recipe.schema.json"), ("machine", RECIPES / "machines" / "machine.schema.json")):
        result = run_cli("schema", "--kind", kind)
        assert result.code == 0
        assert json.loads(path.read_text()) == json.loads(result.out), f"{path} is stale: ftkit schema --kind {kind} -o {path}"


@pytest.mark.parametrize("path", RECIPE_FILES + MACHINE_FILES, ids=lambda p: p.name)
def test_modeline_and_schema_validation(path) -> None:  # type: ignore[no-untyped-def]
    first = path.read_text().splitlines()[0]
    schema_name = "machine.schema.json" if path.parent.name == "machines" else "recipe.schema.json"
    assert first == f"# yaml-language-server: $schema={schema_name}"
    kind = "machine" if schema_name.startswith("machine") else "recipe"
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema(kind))  # type: ignore[arg-type]


def test_recipes_hold_no_absolute_paths_or_hosts() -> None:
    for path in RECIPE_FILES:
        text = path.read_text()
        assert "/srv/" not in text and "/home/" not in text and "://" not in text.split("\n", 1)[1], path.name


def test_fair_pair_differs_only_in_gpus_and_accumulation() -> None:
    one = yaml.safe_load((RECIPES / "llama31-8b-lora-1gpu.yaml").read_text())
    two = yaml.safe_load((RECIPES / "llama31-8b-lora-2gpu.yaml").read_text())
    t1, t2 = one["steps"][1], two["steps"][1]
    assert t1["batch_size"] * t1["grad_accum"] * len(t1["gpus"]) == t2["batch_size"] * t2["grad_accum"] * len(t2["gpus"])
    for key in ("max_steps", "seed", "seq_len", "learning_rate", "checkpoint", "lora", "precision"):
        assert t1[key] == t2[key], key
    assert one["dataset"] == two["dataset"] and one["model"] == two["model"]
