"""Issue #20, standard evaluation: lm-evaluation-harness against the running quickstart server.

A short variant of recipes/quickstart.yaml (fewer steps, one test prompt, its own port so it
never meets another quickstart test's server) ends with an eval step that scores the merged
model itself and runs an lm-eval task (recipes/tasks/quickstart-category.yaml: a generate_until
task on the quickstart's own eval data, exact match on the category word; its first rows) through
`local-completions` against the serve step's `transformers serve`. The harness's score lands in summary.json, the
console's closing line for the step and the report, and agrees with ftkit's own score of the
same model on the same rows: the harness reached the model the run served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import require

require("trl")
require("lm_eval")
require("tenacity")

from tests.conftest import RECIPES, run_ftkit  # noqa: E402

ROWS = 8
PORT = 8779  # the quickstart's own is 8765: a port of its own, so this runs beside the other quickstart tests


def variant(tmp: Path) -> Path:
    """recipes/quickstart.yaml, shortened, with the harness on its eval step."""
    data = tmp / "data"
    data.mkdir()
    for name in ("quickstart-train.jsonl", "quickstart-eval.jsonl"):
        (data / name).write_text((RECIPES / "data" / name).read_text())
    # the shipped task, beside the data as in recipes/: its data_files are relative to its directory
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "quickstart-category.yaml").write_text((RECIPES / "tasks" / "quickstart-category.yaml").read_text())
    r = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    r["name"] = "quickstart-harness"
    steps = {s["type"]: s for s in r["steps"]}
    steps["train"].update(max_steps=80, checkpoint={"every_steps": 80, "keep_last": 1}, eval_every_steps=80)
    steps["serve"].update(port=PORT, prompts=steps["serve"]["prompts"][:1])
    steps["eval"] = {"type": "eval", "score": "exact", "models": ["merged"], "limit": ROWS, "max_new_tokens": 6,
                     "harness": {"tasks": ["tasks/quickstart-category.yaml"], "server": "serve", "limit": ROWS}}
    r["steps"] = [steps[t] for t in ("train", "merge", "serve", "eval")]
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("harness")
    recipe = variant(tmp)
    proc = run_ftkit("up", str(recipe), "--runs-dir", str(tmp / "runs"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = next((tmp / "runs").glob("*-quickstart-harness"))
    return run_dir, proc.stdout + proc.stderr  # the console's lines (stderr when not a terminal)


def test_harness_scores_land_in_the_summary(run: tuple[Path, str]) -> None:
    run_dir, _ = run
    summary = json.loads((run_dir / "steps/eval/summary.json").read_text())
    h = summary["harness"]
    assert h["server"] == "serve" and h["lm_eval_model"] == "local-completions"
    assert h["endpoint"] == f"http://127.0.0.1:{PORT}/v1/completions"
    assert h["model"] == str(run_dir / "steps/merge/model")  # transformers serve names the model by its path
    [row] = h["results"]
    assert row["task"] == "quickstart_category" and row["metric"] == "exact_match" and row["samples"] == ROWS
    assert 0 <= row["value"] <= 1 and row["stderr"] is not None
    # the same model on the same rows, greedy: the harness (through the server) and ftkit agree
    assert round(row["value"] * ROWS) == summary["models"]["merged"]["correct"], (row, summary["models"])
    assert summary["passed"] is True
    assert json.loads((run_dir / "steps/eval/harness.json").read_text())["n-samples"]["quickstart_category"][
        "effective"] == ROWS
    log = (run_dir / "logs/eval.log").read_text()
    assert "harness: quickstart_category: exact_match" in log


def test_console_and_report_show_them(run: tuple[Path, str]) -> None:
    run_dir, out = run
    value = json.loads((run_dir / "steps/eval/summary.json").read_text())["harness"]["results"][0]["value"]
    assert f"lm-eval quickstart_category exact_match {value:.4g}" in out, out[-2000:]
    assert "run lm-evaluation-harness (local-completions) on tasks/quickstart-category.yaml against serve's endpoint" in out
    proc = run_ftkit("report", str(run_dir), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (run_dir / "report/report.md").read_text()
    assert "## Standard evaluation (lm-evaluation-harness)" in md
    line = next(x for x in md.splitlines() if x.startswith("| eval | quickstart_category |"))
    assert f"| exact_match | none | {value:g} |" in line and f"| {ROWS} |" in line
    assert "quickstart_category" in (run_dir / "report/report.html").read_text()
