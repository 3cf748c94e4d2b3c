"""Preference tuning (issue #20) before anything runs: the `preference` step validates its pairs
row by row (located, one line each, exit 2), refuses what cannot work (an adapter that is not
one, another method than the adapter's, packing), plans the train step's launch with its own
engine and job (pairs, the adapter it starts from), and has its own memory fit. No torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftkit.plan import memory
from ftkit.plan.figures import find_arch
from ftkit.plan.jobs import PreferenceJob
from ftkit.recipe.models import PreferenceStep, TrainStep
from tests import builders
from tests.builders import LOCATED, plan_json, shipped, step, step_config
from tests.conftest import RECIPES, run_cli

CPU = str(builders.CPU)
DPO = RECIPES / "quickstart-dpo.yaml"
SFT = """  - type: train
    name: sft
    method: lora
    max_steps: 5
    precision: fp32
"""


def variant(tmp_path: Path, pairs: str | None = None, **replace: str) -> Path:
    """The DPO quickstart with some lines replaced, beside a copy of its data (or other pairs)."""
    out = shipped(tmp_path, DPO.name, **replace)
    if pairs is not None:
        (tmp_path / "data" / "quickstart-pairs.jsonl").write_text(pairs)
    return out


def errors(recipe: Path) -> list[re.Match[str]]:
    result = run_cli("validate", str(recipe), "--machine", CPU)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    found = [LOCATED.match(line) for line in lines]
    assert all(found), lines
    return [m for m in found if m]


def test_the_dpo_quickstart_plans_the_preference_engine_in_the_train_launch() -> None:
    assert run_cli("validate", str(DPO), "--machine", CPU).code == 0
    plan = plan_json(DPO, CPU)
    steps = {s["id"]: s for s in plan["steps"]}
    pref = steps["preference"]
    assert pref["kind"] == "train"  # merge, serve, eval, report and export take it as a train step
    assert pref["description"] == "DPO preference (lora, from the base) training on the CPU"
    argv = pref["argv"]
    assert argv[argv.index("-m", 3) + 1] == "ftkit.engines.preference"  # under accelerate launch, like train
    assert "accelerate.commands.launch" in argv
    job = PreferenceJob.model_validate(step_config(pref, "configs/preference-preference.json"))
    assert job.train.objective == "dpo" and job.init_adapter is None
    assert job.pairs.path.endswith("data/quickstart-pairs.jsonl") and job.pairs.eval == {"size": 60, "seed": 0}
    assert job.dataset.template == "alpaca"  # the pairs' prompts are formatted as the dataset's
    assert pref["outputs"]["adapter"] == "steps/preference/adapter"
    assert any("no second copy of the weights" in n for n in pref["notes"])
    assert steps["merge"]["argv"][steps["merge"]["argv"].index("--adapter") + 1].endswith("steps/preference/adapter")
    assert "reference_forward" in plan["fit"]["preference"][0]["components_gib"]


def test_plan_shows_the_preference_config_in_one_line() -> None:
    result = run_cli("plan", str(DPO), "--machine", CPU)
    assert result.code == 0, result.err
    line = next(x for x in result.out.splitlines() if "configs/preference-preference.json" in x and "writes" in x)
    assert "DPO beta 0.1, lora; from the base; pairs " in line and "held-out pairs scored before and after" in line


def test_from_an_sft_adapter_the_engine_starts_from_its_adapter(tmp_path: Path) -> None:
    recipe = variant(tmp_path, **{"steps:\n": "steps:\n" + SFT, "    objective: dpo\n": "    objective: orpo\n    adapter: sft\n",
                                  "    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n": ""})
    plan = plan_json(recipe, CPU)
    steps = {s["id"]: s for s in plan["steps"]}
    job = step_config(steps["preference"], "configs/preference-")
    assert job["init_adapter"].endswith("steps/sft/adapter") and job["train"]["objective"] == "orpo"
    assert steps["preference"]["description"] == "ORPO preference (lora, from sft's adapter) training on the CPU"
    assert "reference_forward" not in plan["fit"]["preference"][0]["components_gib"]  # ORPO: no reference
    merge = steps["merge"]["argv"]
    assert merge[merge.index("--adapter") + 1].endswith("steps/preference/adapter")  # the last adapter by default


@pytest.mark.parametrize(("pairs", "line", "message"), [
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "rejected": "b"}\n', 2, "field 'chosen' is missing"),
    ('{"prompt": "p", "chosen": "a", "rejected": 3}\n', 1, "field 'rejected' must be text, got a number"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same "}\n', 1,
     "fields 'chosen' and 'rejected' are the same answer: nothing to prefer"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n', 2, "not valid JSON"),
])
def test_bad_pairs_are_refused_at_validate_with_their_line(tmp_path: Path, pairs: str, line: int, message: str) -> None:
    recipe = variant(tmp_path, pairs=pairs * 40 if line == 1 else pairs + '{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 80)
    found = errors(recipe)
    first = found[0]
    where = recipe.read_text().splitlines().index("      path: data/quickstart-pairs.jsonl") + 1
    assert first["path"] == "steps[0].data.path" and first["line"] == str(where)  # the recipe's line: data.path
    assert f"quickstart-pairs.jsonl:{line}: {message}" in first["msg"]


def test_too_few_pairs_for_the_batch_after_the_eval_split(tmp_path: Path) -> None:
    recipe = variant(tmp_path, pairs='{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 70)
    found = errors(recipe)
    assert [(m["path"], m["msg"]) for m in found] == [
        ("steps[0].batch_size", "batch_size 16 is more than the 10 training pair(s) after the eval split")]


@pytest.mark.parametrize(("replace", "path", "message"), [
    ({"    objective: dpo\n": "    objective: dpo\n    adapter: nosuch\n"}, "steps[0].adapter",
     "preference needs train step 'nosuch' before it (the adapter it trains further)"),
    ({"steps:\n": "steps:\n" + SFT.replace("method: lora", "method: full"), "    objective: dpo\n": "    adapter: sft\n",
      "    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n": ""}, "steps[1].adapter",
     "train step 'sft' is full fine-tuning: it has no adapter to train further (start from the base: leave out adapter)"),
    ({"steps:\n": "steps:\n" + SFT, "    objective: dpo\n": "    adapter: sft\n"}, "steps[1].lora",
     "the adapter of 'sft' keeps its own LoRA settings: drop lora"),
    ({"    gradient_checkpointing: false\n": "    gradient_checkpointing: false\n    packing: true\n"}, "steps[0].packing",
     "preference pairs are not packed: each pair is a chosen and a rejected sequence scored apart"),
    ({"    method: lora\n    data:": "    method: full\n    data:"}, "steps[0].method", "got 'full'; input should be 'lora' or 'qlora'"),
])
def test_what_cannot_work_is_refused_located(tmp_path: Path, replace: dict[str, str], path: str, message: str) -> None:
    found = errors(variant(tmp_path, **replace))
    assert (path, message) in [(m["path"], m["msg"]) for m in found], [m.group(0) for m in found]


def test_another_method_than_the_adapters_is_refused(tmp_path: Path) -> None:
    recipe = variant(tmp_path, **{"steps:\n": "steps:\n" + SFT.replace("precision: fp32", "precision: bf16").replace(
        "method: lora", "method: qlora"), "    objective: dpo\n": "    adapter: sft\n",
        "    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n": ""})
    found = errors(recipe)
    assert ("steps[1].method", "train step 'sft' trained a qlora adapter: set method: qlora to train it further") in [
        (m["path"], m["msg"]) for m in found]


def _steps(**kw: object) -> tuple[TrainStep, PreferenceStep]:
    common = {"method": "lora", "batch_size": 2, "seq_len": 1024, "precision": "bf16", "gpus": [0], **kw}
    sft = TrainStep.model_validate({"type": "train", **common})
    pref = PreferenceStep.model_validate({"type": "preference", "data": {"path": "p.jsonl"}, **common})
    return sft, pref


def test_memory_dpo_doubles_the_batch_and_adds_the_reference_forward() -> None:
    arch = find_arch("meta-llama/Llama-3.1-8B-Instruct")
    assert arch is not None
    sft, dpo = _steps()
    a = memory.estimate(sft, arch, n_gpus=1)
    b = memory.estimate(dpo, arch, n_gpus=1)
    for same in ("weights", "adapters", "gradients", "optimizer"):
        assert b[same] == a[same]  # the reference is the same weights (adapter disabled)
    double = memory.estimate(sft.model_copy(update={"batch_size": 4}), arch, n_gpus=1)
    assert b["activations"] == double["activations"] and b["logits"] == double["logits"]  # chosen + rejected
    tokens = 2 * 2 * 1024
    h, i = arch.hidden_size, arch.intermediate_size
    assert b["reference_forward"] == tokens * arch.vocab_size * 6 + tokens * (15 * h + 4.75 * i)
    assert "reference_adapter" not in b
    from_sft = memory.estimate(dpo.model_copy(update={"adapter": "sft"}), arch, n_gpus=1)
    assert from_sft["reference_adapter"] == a["adapters"]  # trl's frozen copy of the adapter trained further
    orpo = memory.estimate(dpo.model_copy(update={"objective": "orpo"}), arch, n_gpus=1)
    assert "reference_forward" not in orpo and orpo["activations"] == b["activations"]


def test_memory_fit_of_a_preference_step_on_a_gpu() -> None:
    arch = find_arch("meta-llama/Llama-3.1-8B-Instruct")
    assert arch is not None
    sft, dpo = _steps()
    fit_sft = memory.fit(sft, arch, {0: 24.0})[0]
    fit_dpo = memory.fit(dpo, arch, {0: 24.0})[0]
    assert fit_dpo.total_gib > fit_sft.total_gib
    assert fit_dpo.verdict == "does not fit" and fit_dpo.suggestions[0].startswith("method: qlora")


def test_in_the_images_the_pairs_are_mounted_read_only_and_the_job_names_them_there() -> None:
    pref = step(plan_json(DPO, builders.CPU_DOCKER), "preference")
    inside = "/ftkit/inputs/pairs-preference/quickstart-pairs.jsonl"
    assert {"host": str(RECIPES / "data" / "quickstart-pairs.jsonl"), "container": inside, "read_only": True} in pref["mounts"]
    assert step_config(pref, "configs/preference-")["pairs"]["path"] == inside
    assert pref["argv"][:2] == ["accelerate", "launch"] and "ftkit.engines.preference" in pref["argv"]
