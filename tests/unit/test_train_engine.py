"""The training engine on CPU: a fixed seed gives the same loss curve twice; a run resumes
from the newest complete checkpoint and ignores one whose save was interrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("trl")

from ftkit.engines import tiny, train  # noqa: E402
from ftkit.recipe.models import TrainStep  # noqa: E402
from tests.conftest import RECIPES  # noqa: E402

DATASET = {
    "path": str(RECIPES / "data" / "quickstart-train.jsonl"), "format": "alpaca", "template": "alpaca",
    "system_prompt": None, "eval": {"path": str(RECIPES / "data" / "quickstart-eval.jsonl")},
    "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
               "role": "role", "content": "content", "text": "text"},
}
TINY = {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
        "max_position_embeddings": 128, "initializer_range": 0.1, "seed": 0}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny.generate(TINY, DATASET, out)
    return out


def config(model: Path, out: Path, **step_kw) -> dict:  # type: ignore[no-untyped-def]
    step = TrainStep.model_validate({
        "type": "train", "name": "train", "max_steps": 12, "learning_rate": 0.003, "batch_size": 8, "seq_len": 96,
        "precision": "fp32", "gradient_checkpointing": False, "seed": 7, "gpus": [],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "checkpoint": {"every_steps": 6, "keep_last": 2},
        "logging_steps": 2, **step_kw,
    })
    return {"model": {"source": "path", "path": str(model), "dtype": "fp32"}, "dataset": DATASET,
            "train": step.model_dump(mode="json"), "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl"),
            "deepspeed_config": None}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_same_seed_same_loss_curve(base_model: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train.run(config(base_model, a))
    train.run(config(base_model, b))
    assert len(losses(a)) == 6
    assert losses(a) == losses(b)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "loss" in r and "tokens_per_s" in r)
    for key in ("learning_rate", "samples_per_s", "step_time_s", "tokens_per_s", "peak_rss_mib"):
        assert key in logged, key
    assert (a / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((a / "train_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["resumed_from"] is None


def test_resume_skips_an_interrupted_checkpoint(base_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.run(config(base_model, out))  # checkpoints at 6 and 12
    ckpts = out / "checkpoints"
    # a crash during the save of step 18: the directory exists but has no manifest
    partial = ckpts / "checkpoint-18"
    shutil.copytree(ckpts / "checkpoint-12", partial)
    (partial / "ftkit-complete.json").unlink()
    summary = train.run(config(base_model, out, max_steps=18))
    assert summary["resumed_from"] == "checkpoint-12"
    assert summary["global_step"] == 18
    names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-18"]  # keep_last 2; the partial one was replaced
