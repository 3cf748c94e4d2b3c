"""The preference engine on CPU (issue #20): DPO and ORPO with trl on a tiny model and the
quickstart's pairs make held-out pairs' chosen answers the more likely ones (from about a
coin toss to clearly better), with trl's rewards/* in metrics.jsonl and the train step's
artifacts (adapter, marker, summary); from an SFT adapter the reference is that adapter (DPO's
first rewards are 0) and only the trained adapter is saved, not trl's frozen copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import require

require("trl")

from ftkit.engines import preference, tiny, train  # noqa: E402
from ftkit.plan.jobs import PreferenceJob, complete_marker  # noqa: E402
from ftkit.recipe.models import PreferenceStep, TrainStep  # noqa: E402
from tests.conftest import RECIPES  # noqa: E402

DATASET = {
    "path": str(RECIPES / "data" / "quickstart-train.jsonl"), "format": "alpaca", "template": "alpaca",
    "system_prompt": None, "eval": None,
    "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
               "role": "role", "content": "content", "text": "text"},
}
PAIRS = {"path": str(RECIPES / "data" / "quickstart-pairs.jsonl"),
         "fields": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}, "eval": {"size": 60}}
TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "vocab_size": 400,
        "max_position_embeddings": 128, "initializer_range": 0.1, "seed": 0}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-pref") / "model"
    tiny.generate(TINY, DATASET, out)
    return out


def job(model: Path, out: Path, init_adapter: Path | None = None, **step_kw: object) -> dict:  # type: ignore[type-arg]
    step = PreferenceStep.model_validate({
        "type": "preference", "name": "pref", "data": {"path": PAIRS["path"]}, "max_steps": 24,
        "learning_rate": 0.01, "warmup_ratio": 0.05, "batch_size": 16, "seq_len": 64, "precision": "fp32",
        "gradient_checkpointing": False, "seed": 0, "gpus": [], "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "checkpoint": {"every_steps": 12, "keep_last": 1, "keep_best": False}, "eval_every_steps": 24,
        "logging_steps": 4, **step_kw,
    })
    cfg = {"model": {"source": "path", "path": str(model), "dtype": "fp32"}, "dataset": DATASET, "pairs": PAIRS,
           "train": step.model_dump(mode="json"), "init_adapter": str(init_adapter) if init_adapter else None,
           "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl")}
    return PreferenceJob.model_validate(cfg).to_json()  # the contract the plan writes


def rows(out: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_training_makes_held_out_chosen_answers_likelier(base_model: Path, tmp_path: Path,
                                                                   objective: str) -> None:
    out = tmp_path / objective
    # ORPO's beta is its odds-ratio term's weight (lambda), DPO's how far from the reference the policy may go
    summary = preference.run(job(base_model, out, objective=objective, beta=0.1 if objective == "dpo" else 1.0))
    before, after = summary["preference"]["before"], summary["preference"]["after"]
    assert before["pairs"] == after["pairs"] == 60
    assert 25 <= before["accuracy"] <= 75  # the random tiny model: about a coin toss per pair
    assert after["accuracy"] >= 70 and after["accuracy"] - before["accuracy"] >= 25, (before, after)  # 88, 78 measured
    assert after["margin"] > before["margin"] + 1.0
    assert summary["objective"] == objective and summary["started_from"] == "base" and summary["global_step"] == 24
    logged = rows(out)
    assert logged[0] == {**logged[0], "step": 0, "pair_accuracy": before["accuracy"]}
    assert logged[-1] == {**logged[-1], "step": 24, "pair_accuracy": after["accuracy"]}
    trained = [r for r in logged if "loss" in r]
    assert [r["step"] for r in trained] == [4, 8, 12, 16, 20, 24]
    key = "rewards/accuracies" if objective == "dpo" else "log_odds_ratio"
    assert all(key in r for r in trained), trained[0]
    evals = [r for r in logged if "eval_loss" in r]
    assert evals and ("eval_rewards/margins" if objective == "dpo" else "eval_log_odds_ratio") in evals[-1]
    if objective == "dpo":
        assert trained[-1]["rewards/accuracies"] > 0.7 and trained[-1]["rewards/margins"] > 0
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    assert Path(complete_marker(str(adapter))).is_file() and (out / "train_summary.json").is_file()
    assert (out / "checkpoints" / "checkpoint-24" / "ftkit-complete.json").is_file()  # train's checkpoints


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference_and_saves_only_it(base_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sft_out = tmp_path / "sft"
    sft = TrainStep.model_validate({
        "type": "train", "name": "sft", "max_steps": 6, "learning_rate": 0.003, "batch_size": 16, "seq_len": 64,
        "precision": "fp32", "gradient_checkpointing": False, "seed": 0, "gpus": [],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "logging_steps": 3,
    })
    train.run({"model": {"source": "path", "path": str(base_model), "dtype": "fp32"}, "dataset": DATASET,
               "train": sft.model_dump(mode="json"), "output_dir": str(sft_out),
               "metrics_path": str(sft_out / "metrics.jsonl")})
    out = tmp_path / "dpo"
    summary = preference.run(job(base_model, out, init_adapter=sft_out / "adapter", max_steps=6, logging_steps=1,
                                 lora={"r": 8, "alpha": 16, "dropout": 0.0}, eval_every_steps=None))
    assert summary["started_from"] == "adapter"
    first = next(r for r in rows(out) if "loss" in r)
    # step 1 is scored before any update: policy and reference are the same SFT adapter
    assert first["step"] == 1 and abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    saved = out / "adapter"
    assert not (saved / preference.REF_ADAPTER).exists()  # trl's frozen copy is not part of the result
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8  # the SFT adapter's own settings
    start, end = load_file(str(sft_out / "adapter" / "adapter_model.safetensors")), load_file(
        str(saved / "adapter_model.safetensors"))
    assert start.keys() == end.keys()  # the same adapter, trained further
    assert any((start[k] - end[k]).abs().max() > 1e-4 for k in start)


class Crash(Exception):
    pass


def test_a_crashed_dpo_run_resumes_from_its_checkpoint(base_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The train engine's crash safety, unchanged: started again in the same directory, it goes
    on from the newest complete checkpoint, moves the rows logged after it aside, and keeps the
    held-out score the first attempt took before training."""
    from transformers import TrainerCallback

    real = train.make_callbacks

    class Die(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: object, state: object, control: object, **k: object) -> None:
            if getattr(state, "global_step", 0) == 10:
                raise Crash("killed after step 10")

    out = tmp_path / "dpo"
    kw = {"max_steps": 12, "checkpoint": {"every_steps": 6, "keep_last": 2, "keep_best": False}, "logging_steps": 3,
          "eval_every_steps": None}
    monkeypatch.setattr(train, "make_callbacks", lambda *a: [*real(*a), Die()])
    with pytest.raises(Crash):
        preference.run(job(base_model, out, **kw))
    monkeypatch.setattr(train, "make_callbacks", real)
    first = rows(out)[0]
    summary = preference.run(job(base_model, out, **kw))
    assert summary["resumed_from"] == "checkpoint-6" and summary["global_step"] == 12
    assert summary["preference"]["before"]["accuracy"] == first["pair_accuracy"]  # from the first attempt
    logged = rows(out)
    assert [r["step"] for r in logged if "loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in logged if "pair_accuracy" in r] == [0, 12]
    assert [json.loads(x)["step"] for x in (out / "metrics.superseded.jsonl").read_text().splitlines()] == [9]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_dpo_trains_on_the_4bit_base(base_model: Path, tmp_path: Path) -> None:
    """The train engine's QLoRA load (bitsandbytes' NF4 layers kept in their training layout on
    the CPU) under trl's DPO: the adapter trains and is saved; the reference is the 4-bit base
    with the adapter disabled."""
    require("bitsandbytes")
    out = tmp_path / "qlora"
    summary = preference.run(job(base_model, out, method="qlora", precision="bf16", max_steps=6, eval_every_steps=None,
                                 checkpoint={"every_steps": 6, "keep_last": 1, "keep_best": False}, logging_steps=3))
    assert summary["method"] == "qlora" and summary["global_step"] == 6
    assert summary["preference"]["after"]["margin"] != summary["preference"]["before"]["margin"]
    assert all("rewards/margins" in r for r in rows(out) if "loss" in r)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
