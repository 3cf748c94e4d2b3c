"""The CPU preference quickstart end to end (issue #20): `ftkit up recipes/quickstart-dpo.yaml`
with the local executor makes a tiny model, trains a DPO adapter on the quickstart's pairs and
merges it. Held-out pairs go from about a coin toss to clearly preferring the chosen answer,
the run directory records it (train_summary.json, metrics.jsonl with trl's rewards/*, the report's Preference table), the
console says it, and the merged model ranks the held-out pairs as the adapter did (the merge
step takes a preference adapter like any other)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import require

require("trl")

from tests.conftest import RECIPES, run_ftkit  # noqa: E402

RECIPE = RECIPES / "quickstart-dpo.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """(run directory, console, seconds)."""
    runs = tmp_path_factory.mktemp("dpo-runs")
    t0 = time.monotonic()
    proc = run_ftkit("up", str(RECIPE), "--runs-dir", str(runs), timeout=600)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    return next(runs.iterdir()), proc.stderr + proc.stdout, seconds


def test_dpo_makes_the_held_out_chosen_answers_likelier(run: tuple[Path, str, float]) -> None:
    run_dir, console, seconds = run
    summary = json.loads((run_dir / "steps/preference/train_summary.json").read_text())
    before, after = summary["preference"]["before"], summary["preference"]["after"]
    assert summary["objective"] == "dpo" and summary["global_step"] == 30 and before["pairs"] == 60
    assert 25 <= before["accuracy"] <= 75 and after["accuracy"] >= 80, (before, after)
    assert after["margin"] > before["margin"]
    assert f"held-out pair accuracy {before['accuracy']:.0f}% -> {after['accuracy']:.0f}%" in console
    rows = [json.loads(x) for x in (run_dir / "steps/preference/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["pair_accuracy"] == before["accuracy"] and rows[-1]["pair_accuracy"] == after["accuracy"]
    trained = [r for r in rows if "loss" in r]
    assert all("rewards/accuracies" in r and "rewards/margins" in r for r in trained)
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["eval_rewards/margins"] > 0
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "succeeded" and state["order"] == ["tiny-model", "preference", "merge"]
    assert seconds < 110, seconds  # well under 2 minutes on two cores


def test_the_merged_model_ranks_the_pairs_as_the_adapter_did(run: tuple[Path, str, float]) -> None:
    from transformers import AutoModelForCausalLM

    from ftkit.engines import preference, train

    run_dir, _, _ = run
    job = json.loads((run_dir / "configs/preference-preference.json").read_text())
    tok = train.load_tokenizer({"path": str(run_dir / "model")})
    _, held = preference.load_pairs(job["pairs"])
    pairs = preference.to_pairs(held, job["pairs"], job["dataset"], "alpaca", tok)
    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "steps/merge/model"))
    scores = preference.pair_scores(merged, tok, pairs, 64)
    after = json.loads((run_dir / "steps/preference/train_summary.json").read_text())["preference"]["after"]
    assert scores["accuracy"] == after["accuracy"] and scores["margin"] == pytest.approx(after["margin"], abs=1e-2)


def test_the_report_has_the_preference_table(run: tuple[Path, str, float]) -> None:
    run_dir, _, _ = run
    proc = run_ftkit("report", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "steps/preference/train_summary.json").read_text())["preference"]
    text = (run_dir / "report/report.md").read_text()
    table = text.split("## Preference", 1)[1].split("##", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith("| preference |"))
    assert "| DPO | base | 60 |" in row
    assert f"{summary['before']['accuracy']:g} -> {summary['after']['accuracy']:g}" in row
