"""`ftkit bench` end to end: the CPU quickstart, shortened, on two GPUs simulated with
`--simulate 2` (the newcomer's path on a machine without GPUs), [0] against [0,1] (two DDP
processes on the CPU). The measurements are the runs' real timings; the GPU figures are
simulated and every artifact says so. 12 steps train for a few seconds: too short to judge,
so the bench decides nothing and says how many steps would do (rule 4)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import RECIPES, run_ftkit


@pytest.mark.slow
def test_bench_on_the_cpu_quickstart_writes_a_decision_from_real_timings(tmp_path: Path) -> None:
    machine = tmp_path / "sim2.yaml"
    machine.write_text("ftkit: 1\nkind: machine\nname: sim2\nexecutor: local\npsu: {watts: 1600}\ngpus:\n"
                       "  - {index: 0, model: RTX 4090, power: {min_w: 150, max_w: 600, default_w: 450}}\n"
                       "  - {index: 1, model: RTX 4090, power: {min_w: 150, max_w: 600, default_w: 450}}\n")
    env = {"FTKIT_LEASE_DIR": str(tmp_path / "lease"), "FTKIT_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "bench"
    r = run_ftkit("bench", str(RECIPES / "quickstart.yaml"), "--machine", str(machine), "--simulate", "2",
                  "--gpus", "0", "--gpus", "0,1", "--max-steps", "12", "--out", str(out),
                  "--bottleneck", "one run blocks the evening", env={**env, "FTKIT_SIMULATED_GPUS": ""}, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    # the simulated GPUs' state and power record stayed in the bench directory, the caps given back
    assert json.loads((out / "simulated" / "state" / "power-originals.json").read_text())["gpus"] == {}
    assert not (tmp_path / "state").exists()
    bench = json.loads((out / "bench.json").read_text())
    m1, m2 = bench["measures"]
    assert (m1["label"], m2["label"]) == ("0", "0,1") and m1["status"] == m2["status"] == "succeeded"
    # the numbers are the runs' own: the trainer's samples/s over its runtime, in each run directory
    for m in (m1, m2):
        rows = [json.loads(x) for x in (Path(m["run_dir"]) / "steps" / "train" / "metrics.jsonl").read_text().splitlines()]
        final = next(x for x in reversed(rows) if "train_runtime" in x)
        assert m["samples_per_s"] == final["train_samples_per_second"] > 0
        assert max(x["step"] for x in rows) == m["steps"] == 12
        assert m["telemetry_source"] == "simulated" and m["simulated_gpus"]
        state = json.loads((Path(m["run_dir"]) / "state.json").read_text())
        assert [s for s in state["order"] if not s.startswith("power")] == ["tiny-model", "train"]
    assert m2["speedup"] == pytest.approx(m2["samples_per_s"] / m1["samples_per_s"], abs=1e-3)
    assert m2["efficiency"] == pytest.approx(m2["speedup"] / 2, abs=1e-3)
    variants = {v["label"]: v for v in bench["variants"]}
    assert variants["0"]["batch_size"] * variants["0"]["grad_accum"] == 16
    assert variants["0,1"]["batch_size"] * variants["0,1"]["grad_accum"] * 2 == 16
    assert all(f["expected"] for f in bench["fairness"])  # only what a scaling test varies differs
    md = (out / "decision.md").read_text()
    decisions = re.findall(r"^## Decision: (.+)$", md, re.M)
    assert decisions == [bench["decision"]["choice"]] == ["none - measure again"]
    assert bench["decision"]["rule"] == 4 and "too short to judge" in bench["decision"]["reason"]
    assert re.search(r"^next: bench again with --max-steps \d+ ", r.stdout, re.M), r.stdout
    assert "keep the multi-GPU plan" not in r.stdout
    for text in ("## Bottleneck", "one run blocks the evening", "## Success threshold", "## Evidence",
                 f"| 0,1 | ddp | {variants['0,1']['batch_size']} x {variants['0,1']['grad_accum']} | succeeded |",
                 "## Operational side effects", "SIMULATED", "the GPUs are simulated", "## How the decision is made",
                 "Measurement: shortest run", "1 run(s) per GPU set, spread unknown"):
        assert text in md, text
    assert f"{m2['samples_per_s']:.2f}" in md
    assert (out / "report" / "report.html").is_file()
    assert "decision: " + bench["decision"]["choice"] in r.stdout
