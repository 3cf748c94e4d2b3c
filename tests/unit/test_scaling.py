"""ftkit bench without running anything: variants keep everything but the GPUs equal (the
global batch above all), each decision rule fires on its evidence and no other, and the
measurements read back from a run directory are the run's own numbers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from ftkit.errors import UserError
from ftkit.observe import bench, scaling
from ftkit.observe.scaling import FIX, KEEP, NONE, SIMPLIFY, STOP, Measure, Thresholds, decide
from tests.conftest import RECIPES, run_cli

SIM = {"FTKIT_SIMULATED_GPUS": "RTX 4090,RTX 4090,RTX 4090"}


def _machine(tmp_path: Path, gpus: int = 3, psu: int = 2000) -> Path:
    m = tmp_path / "lab.yaml"
    m.write_text("ftkit: 1\nkind: machine\nname: lab\nexecutor: local\n"
                 f"psu: {{watts: {psu}}}\npaths: {{datasets: {tmp_path}}}\ngpus:\n"
                 + "".join(f"  - {{index: {i}, model: RTX 4090}}\n" for i in range(gpus)))
    return m


def _resolved(recipe: Path, machine: Path) -> Any:
    from ftkit.prepare import prepare

    return prepare(str(recipe), str(machine)).res


def test_gpu_sets_are_parsed_strictly() -> None:
    assert bench.parse_gpu_sets(["0", "0,1"]) == [[0], [0, 1]]
    for bad in (["0"], ["0", "x"], ["0", "0,0"], ["0,1", "1,0"], ["0", ""], ["0", "-1"]):
        with pytest.raises(UserError):
            bench.parse_gpu_sets(bad)


def test_variants_keep_the_global_batch_and_drop_what_is_not_measured(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = _resolved(RECIPES / "quickstart.yaml", _machine(tmp_path))  # batch 16, 1 GPU: global 16
    ti, vs = bench.make_variants(res, [[0], [0, 1]], max_steps=30)
    one, two = vs
    assert (one.distribution, one.batch_size, one.grad_accum) == ("single", 16, 1)
    assert (two.distribution, two.batch_size, two.grad_accum) == ("ddp", 8, 1)
    assert one.global_batch == two.global_batch == 16
    for v in vs:
        kinds = [s.type for s in v.recipe.steps]
        assert kinds == ["power", "train"], kinds  # merge, serve and eval are not what is measured
        t = v.recipe.steps[1]
        assert t.max_steps == 30 and t.epochs is None and t.eval_every_steps is None
        assert t.checkpoint.every_steps == 15  # the recipe's 100 would never save in 30 steps
        assert t.seed == res.recipe.steps[ti].seed and t.learning_rate == res.recipe.steps[ti].learning_rate
    assert res.recipe.steps[ti].gpus == [0]  # the resolved recipe itself is untouched
    with pytest.raises(UserError, match="does not split evenly over 3 GPUs"):
        bench.make_variants(res, [[0], [0, 1, 2]], max_steps=30)
    with pytest.raises(UserError, match="GPU 5 is not on machine"):
        bench.make_variants(res, [[0], [0, 5]], max_steps=30)


def test_a_two_gpu_recipe_scaled_down_keeps_its_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = _resolved(RECIPES / "llama31-8b-lora-2gpu.yaml", _machine(tmp_path))
    t = next(s for s in res.recipe.steps if s.type == "train")
    g = t.batch_size * t.grad_accum * len(t.gpus)
    _, (one, two) = bench.make_variants(res, [[0], [0, 1]], max_steps=40)
    assert one.batch_size * one.grad_accum == g and two.batch_size * two.grad_accum * 2 == g
    assert one.batch_size <= t.batch_size and two.distribution == t.distribution


def test_a_variant_that_does_not_fit_is_refused_at_the_recipe_line(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = run_cli("bench", str(RECIPES / "llama31-8b-lora-2gpu.yaml"), "--machine", str(_machine(tmp_path, psu=800)),
                  "--gpus", "0", "--gpus", "0,1", "--dry-run", "--out", str(tmp_path / "b"))
    assert res.code == 2, res.out + res.err
    assert "bench --gpus 0,1: PSU budget exceeded" in res.err and "llama31-8b-lora-2gpu.yaml:" in res.err
    assert not (tmp_path / "b").exists()


def test_dry_run_prints_each_variant_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = run_cli("bench", str(RECIPES / "quickstart.yaml"), "--machine", str(_machine(tmp_path)), "--gpus", "0",
                  "--gpus", "0,1", "--max-steps", "12", "--dry-run", "--out", str(tmp_path / "b"))
    assert res.code == 0, res.err
    assert "GPUs 0: single, batch_size 16 x grad_accum 1" in res.out and "GPUs 0,1: ddp, batch_size 8" in res.out
    assert "merge" not in res.out and not (tmp_path / "b").exists()


def _m(label: str, sps: float | None, *, status: str = "succeeded", source: str = "nvml", **kw: Any) -> Measure:
    """A run's measures; by default long enough (120 s) to judge, as one run per set."""
    gpus = [int(x) for x in label.split(",")]
    kw.setdefault("train_runtime_s", 120.0)
    kw.setdefault("steps", 100)
    return Measure(label, gpus, f"/runs/{label}", status, samples_per_s=sps, telemetry_source=source, **kw)


def _decide(*ms: Measure, th: Thresholds | None = None) -> scaling.Decision:
    scaling.add_scaling(list(ms))
    return decide(list(ms), th or Thresholds())


@pytest.mark.parametrize(("base", "big", "choice", "rule"), [
    (_m("0", 100), _m("0,1", 180), KEEP, 5),
    (_m("0", 100), _m("0,1", 120), SIMPLIFY, 10),
    (_m("0", 100), _m("0,1", 80), STOP, 9),
    (_m("0", None, status="failed", message="OOM"), _m("0,1", 150), FIX, 1),
    (_m("0", 100), _m("0,1", None, status="failed", message="NCCL timeout"), FIX, 2),
    (_m("0", 100), _m("0,1", 190, throttle={"hw_power_brake": 0.1}), FIX, 3),
    (_m("0", 100), _m("0,1", 190, temp_max_c=91.0), FIX, 3),
    (_m("0", 100), _m("0,1", 190, throttle={"hw_thermal_slowdown": 0.02}), FIX, 3),
    (_m("0", 100), _m("0,1", 120, pcie_narrow=["GPU 1 x4 of x16"]), FIX, 6),
    (_m("0", 100, checkpoint_s=40.0, train_runtime_s=100.0), _m("0,1", 120), FIX, 7),
    (_m("0", 100, util_mean=35.0), _m("0,1", 120), FIX, 8),
    (_m("0", 100, train_runtime_s=3.3), _m("0,1", 220, train_runtime_s=1.5), NONE, 4),
    (_m("0", 100), _m("0,1", 240), NONE, 4),
])
def test_each_rule_fires_on_its_evidence(base: Measure, big: Measure, choice: str, rule: int) -> None:
    d = _decide(dataclasses.replace(base), dataclasses.replace(big))
    assert (d.choice, d.rule) == (choice, rule), d
    assert d.choice in (*scaling.DECISIONS, NONE) and d.reason and d.next_action


def test_good_scaling_is_kept_despite_a_narrow_link_but_not_despite_a_power_brake() -> None:
    assert _decide(_m("0", 100), _m("0,1", 190, pcie_narrow=["GPU 1 x8 of x16"])).choice == KEEP
    assert _decide(_m("0", 100), _m("0,1", 190, throttle={"hw_slowdown": 0.5})).choice == FIX


def test_simulated_telemetry_never_decides() -> None:
    d = _decide(_m("0", 100, source="simulated", util_mean=10.0),
                _m("0,1", 120, source="simulated", throttle={"hw_power_brake": 1.0}, temp_max_c=99.0,
                   pcie_narrow=["GPU 1 x1 of x16"]))
    assert (d.choice, d.rule) == (SIMPLIFY, 10)
    assert any("simulated" in n for n in d.notes)


def test_thresholds_are_options() -> None:
    assert _decide(_m("0", 100), _m("0,1", 150), th=Thresholds(keep_efficiency=0.7)).choice == KEEP
    assert _decide(_m("0", 100), _m("0,1", 150), th=Thresholds(keep_efficiency=0.8)).choice == SIMPLIFY


def test_efficiency_against_the_smallest_set() -> None:
    ms = [_m("0,1", 180), _m("0", 100), _m("0,1,2", 240)]
    base = scaling.add_scaling(ms)
    assert base.label == "0"
    assert [(m.speedup, m.efficiency) for m in ms] == [(1.8, 0.9), (1.0, 1.0), (2.4, 0.8)]
    assert decide(ms, Thresholds()).choice == KEEP  # judged on the largest set


def test_measure_reads_a_run_directory(tmp_path: Path) -> None:
    from ftkit.observe.rundata import load_run
    from tests.unit.test_report import make_run

    run = make_run(tmp_path, gpus=(0, 1), source="nvml")
    m = scaling.measure(load_run(run), "0,1", [0, 1])
    metrics = [json.loads(x) for x in (run / "steps" / "train" / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]
    assert m.status == "succeeded" and m.steps == 100
    assert m.samples_per_s == final["train_samples_per_second"]
    assert m.tokens_per_s == round(final["num_tokens"] / final["train_runtime"], 1)
    assert m.checkpoints == 2 and m.checkpoint_s == pytest.approx(4.0) and m.checkpoint_approximate
    assert m.telemetry_source == "nvml" and set(m.gpus_telemetry) == {"0", "1"}
    # GPU 0 is capped at 300 W, GPU 1 runs at its 450 W default: the peak is shown against its own cap
    closest = max(m.gpus_telemetry.values(), key=lambda x: x["power_max_w"] / x["limit_w"])
    assert (m.power_max_w, m.limit_w) == (closest["power_max_w"], closest["limit_w"])
    assert m.power_max_w <= m.limit_w
    assert "sw_power_cap" in m.throttle and "hw_power_brake" not in m.throttle


def test_a_stopped_run_stops_the_bench_without_a_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit.run import runner

    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    calls: list[str] = []

    def create_run(path: Path, plan: Any, resolved: Any, argv: list[str]) -> Any:
        calls.append(path.name)
        return object()

    def execute_plan(run: Any, plan: Any, **kw: Any) -> Any:
        return runner.RunResult(Path(plan.run_dir), "interrupted", None, "stopped by SIGINT", [], 130)

    monkeypatch.setattr(runner, "create_run", create_run)
    monkeypatch.setattr(runner, "execute_plan", execute_plan)
    res = run_cli("bench", str(RECIPES / "quickstart.yaml"), "--machine", str(_machine(tmp_path)), "--gpus", "0",
                  "--gpus", "0,1", "--max-steps", "5", "--out", str(tmp_path / "b"))
    assert res.code == 130 and "bench stopped during GPUs 0" in res.err
    assert len(calls) == 1 and not (tmp_path / "b" / "decision.md").exists()


# -- rule 4: runs that cannot tell ---------------------------------------------------------


def test_a_short_run_decides_nothing_and_says_how_long_to_run() -> None:
    """The issue's run: 12 steps, 3.3 s, efficiency 1.10 - it used to keep the multi-GPU plan."""
    d = _decide(_m("0", 4.8, train_runtime_s=3.3, steps=12), _m("0,1", 10.56, train_runtime_s=1.5, steps=12))
    assert (d.choice, d.rule) == (NONE, 4), d
    assert "too short to judge" in d.reason and "1.5 s" in d.reason and "30 s" in d.reason
    # 12 steps in 1.5 s: 30 s (and a quarter more) is 300 steps
    assert "--max-steps 300" in d.next_action and "--repeat 3" in d.next_action
    assert any("--repeat 3 measures it" in n for n in d.notes)
    assert _decide(_m("0", 4.8, train_runtime_s=3.3), _m("0,1", 10.56, train_runtime_s=1.5),
                   th=Thresholds(min_seconds=1.0)).rule == 4  # long enough now, but still beyond linear


def test_beyond_linear_is_a_bad_measurement_not_a_reason_to_keep() -> None:
    d = _decide(_m("0", 100), _m("0,1", 230))  # efficiency 1.15 from two-minute runs
    assert (d.choice, d.rule) == (NONE, 4) and "faster than linear" in d.reason, d
    assert _decide(_m("0", 100), _m("0,1", 208)).choice == KEEP  # 1.04: within what timing jitter gives


def _repeats(label: str, rates: list[float], runtime: float = 120.0) -> Measure:
    gpus = [int(x) for x in label.split(",")]
    runs = [Measure(label, gpus, f"/runs/{label}-{i}", "succeeded", steps=100, samples_per_s=r,
                    train_runtime_s=runtime + i, telemetry_source="nvml") for i, r in enumerate(rates)]
    return scaling.median_measure(runs)


def test_repeats_carry_their_spread_and_shortest_run() -> None:
    m = _repeats("0", [100.0, 90.0, 110.0])
    assert m.samples_per_s == 100.0 and m.runs == 3 and m.samples_per_s_runs == [90.0, 100.0, 110.0]
    assert m.spread == pytest.approx(0.2) and m.train_runtime_min_s == 120.0
    one = _repeats("0", [100.0])
    assert one.runs == 1 and one.spread is None


def test_noisy_repeats_decide_nothing() -> None:
    d = _decide(_repeats("0", [100.0, 80.0, 120.0]), _repeats("0,1", [180.0, 182.0, 181.0]))
    assert (d.choice, d.rule) == (NONE, 4) and "too noisy" in d.reason and "40%" in d.reason, d
    assert "quiet machine" in d.next_action and "--repeat 5" in d.next_action
    d = _decide(_repeats("0", [100.0, 80.0, 120.0]), _repeats("0,1", [180.0, 182.0, 181.0]),
                th=Thresholds(max_spread=0.5))
    assert d.choice == KEEP


def test_repeats_that_straddle_a_threshold_decide_nothing() -> None:
    # spread 8% each: efficiency anywhere from 0.67 to 0.75 around the 0.70 keep threshold
    d = _decide(_repeats("0", [96.0, 100.0, 104.0]), _repeats("0,1", [134.0, 140.0, 145.0]))
    assert (d.choice, d.rule) == (NONE, 4) and "both sides of the keep threshold 0.70" in d.reason, d
    # the same spread well clear of it decides
    assert _decide(_repeats("0", [96.0, 100.0, 104.0]), _repeats("0,1", [170.0, 176.0, 182.0])).choice == KEEP
    d = _decide(_repeats("0", [96.0, 100.0, 104.0]), _repeats("0,1", [97.0, 100.0, 103.0]))
    assert (d.choice, d.rule) == (NONE, 4) and "speedup of 1" in d.reason, d


def _fake_runs(monkeypatch: pytest.MonkeyPatch, timings: dict[str, tuple[float, float]],
               seen: list[dict[str, str | None]] | None = None) -> None:
    """The runner replaced: each GPU set's run is a synthetic run directory that trained
    `seconds` at `samples/s` (test_report's make_run, its final metrics rewritten)."""
    import os

    from ftkit.run import runner
    from tests.unit.test_report import make_run

    def execute_plan(run: Any, plan: Any, **kw: Any) -> Any:
        path = Path(plan.run_dir)
        label = ",".join(str(g) for g in next(s.gpus for s in plan.steps if s.kind == "train"))
        seconds, rate = timings[label]
        make_run(path.parent, path.name, gpus=tuple(int(g) for g in label.split(",")), max_steps=12, every_steps=6)
        metrics = path / "steps" / "train" / "metrics.jsonl"
        rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "train_runtime" not in r]
        rows.append({"step": 12, "train_runtime": seconds, "train_samples_per_second": rate, "num_tokens": 6000.0})
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if seen is not None:
            seen.append({k: os.environ.get(k) for k in ("FTKIT_SIMULATED_GPUS", "FTKIT_SIMULATED_GPUS_STATE",
                                                         "FTKIT_STATE_DIR")})
        return runner.RunResult(path, "succeeded", None, "", [], 0)

    monkeypatch.setattr(runner, "create_run", lambda path, plan, resolved, argv: object())
    monkeypatch.setattr(runner, "execute_plan", execute_plan)


def test_a_short_bench_says_so_on_the_console_and_in_decision_md(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    _fake_runs(monkeypatch, {"0": (3.3, 4.8), "0,1": (1.5, 10.56)})
    res = run_cli("bench", str(RECIPES / "quickstart.yaml"), "--machine", str(_machine(tmp_path)), "--gpus", "0",
                  "--gpus", "0,1", "--max-steps", "12", "--out", str(tmp_path / "b"))
    assert res.code == 0, res.out + res.err
    assert "decision: none - measure again (rule 4): the runs are too short to judge" in res.out
    assert "next: bench again with --max-steps 300" in res.out and "keep the multi-GPU plan" not in res.out
    md = (tmp_path / "b" / "decision.md").read_text()
    assert "## Decision: none - measure again" in md and "too short to judge" in md
    assert "Measurement: shortest run 1.5 s (GPUs 0,1; 30 s needed); 1 run(s) per GPU set, spread unknown." in md
    assert "| 1 (-) |" in md
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert bench["decision"]["choice"] == NONE and bench["thresholds"]["min_seconds"] == 30.0


def test_simulate_runs_the_bench_on_a_machine_without_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--simulate N: the CPU path, named in the help and in the refusal that needs it; the
    simulated GPUs' state and power record stay in the bench directory, and the environment
    is as it was afterwards."""
    import os

    import ftkit.gpu.nvml as nvml

    for k in ("FTKIT_SIMULATED_GPUS", "FTKIT_SIMULATED_GPUS_STATE", "FTKIT_STATE_DIR"):
        monkeypatch.delenv(k, raising=False)
    real_open = nvml.open_nvml
    monkeypatch.setattr(nvml, "open_nvml", lambda: real_open() if os.environ.get("FTKIT_SIMULATED_GPUS") else None)
    monkeypatch.chdir(tmp_path)
    args = ("bench", str(RECIPES / "quickstart.yaml"), "--gpus", "0", "--gpus", "0,1")
    refused = run_cli(*args, "--dry-run")
    assert refused.code == 2 and "has no GPUs" in refused.err and "--simulate 2" in refused.err
    assert "--simulate N" in run_cli("bench", "--help").out
    dry = run_cli(*args, "--simulate", "2", "--dry-run")
    assert dry.code == 0, dry.err
    assert "GPUs 0,1: ddp" in dry.out
    assert run_cli(*args, "--gpus", "0,1,2", "--simulate", "2", "--dry-run").code == 2
    profile = run_cli(*args, "--simulate", "2", "--machine", str(RECIPES / "machines" / "cpu.yaml"), "--dry-run")
    assert profile.code == 2 and "lists 0 GPU(s)" in profile.err
    seen: list[dict[str, str | None]] = []
    _fake_runs(monkeypatch, {"0": (40.0, 4.8), "0,1": (30.0, 6.4)}, seen)
    res = run_cli(*args, "--simulate", "2", "--out", str(tmp_path / "b"))
    assert res.code == 0, res.out + res.err
    assert len(seen) == 2 and seen[0] == {"FTKIT_SIMULATED_GPUS": "simulated,simulated",
                                          "FTKIT_SIMULATED_GPUS_STATE": str(tmp_path / "b" / "simulated" / "gpus.json"),
                                          "FTKIT_STATE_DIR": str(tmp_path / "b" / "simulated" / "state")}
    assert "decision: simplify to workload sharding (rule 10)" in res.out and "note: the GPUs are simulated" in res.out
    assert all(k not in os.environ for k in ("FTKIT_SIMULATED_GPUS", "FTKIT_SIMULATED_GPUS_STATE", "FTKIT_STATE_DIR"))


# -- review: failed repeats, equal sets, broken records ----------------------------------------


def test_a_set_with_a_failed_repeat_is_failed() -> None:
    """18.0, failed, 18.2 samples/s: the failure used to vanish (only runs with samples/s were
    kept), the set read as succeeded and the bench kept the multi-GPU plan."""
    base = _repeats("0", [10.0, 10.1, 10.2])
    runs = [Measure("0,1", [0, 1], f"/runs/0,1-{i}", status, steps=100, samples_per_s=r, train_runtime_s=120.0,
                    telemetry_source="nvml", message=msg)
            for i, (status, r, msg) in enumerate([("succeeded", 18.0, None), ("failed", None, "NCCL timeout"),
                                                   ("succeeded", 18.2, None)])]
    big = scaling.median_measure(runs)
    assert big.status == "failed" and big.runs == 3 and big.message == "repeat 2 of 3: NCCL timeout"
    d = _decide(base, big)
    assert (d.choice, d.rule) == (FIX, 2) and "repeat 2 of 3: NCCL timeout" in d.reason, d
    # the baseline likewise (rule 1), also when a repeat finished without a throughput
    flaky = scaling.median_measure([dataclasses.replace(runs[0], label="0", gpus=[0]),
                                     dataclasses.replace(runs[0], label="0", gpus=[0], samples_per_s=None)])
    d = _decide(flaky, _repeats("0,1", [18.0, 18.1]))
    assert (d.choice, d.rule) == (FIX, 1) and "repeat 2 of 2: it recorded no samples/s" in d.reason, d


def test_gpu_sets_of_one_size_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--gpus 0 --gpus 1 compared one GPU with one GPU and kept "the multi-GPU plan"."""
    with pytest.raises(UserError, match="the sets given all have 1 GPU"):
        bench.parse_gpu_sets(["0", "1"])
    with pytest.raises(UserError, match="all have 2 GPU"):
        bench.parse_gpu_sets(["0,1", "2,3"])
    assert bench.parse_gpu_sets(["0", "1", "0,1"]) == [[0], [1], [0, 1]]
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = run_cli("bench", str(RECIPES / "quickstart.yaml"), "--machine", str(_machine(tmp_path)), "--gpus", "0",
                  "--gpus", "1", "--dry-run", "--out", str(tmp_path / "b"))
    assert res.code == 2 and len(res.err.strip().splitlines()) <= 2 and "Traceback" not in res.err, res.err
    assert "bench compares fewer GPUs with more" in res.err


def test_times_and_rates_at_or_below_zero_are_not_recorded(tmp_path: Path) -> None:
    """A negative training time used to suggest --max-steps -60, and a baseline of 0 samples/s
    "stop scaling"; neither is a measurement."""
    from ftkit.observe.rundata import load_run, positive
    from tests.unit.test_report import make_run

    assert [positive(v) for v in (-60, 0, "0", -1.5, 2.5, "nan", None)] == [None, None, None, None, 2.5, None, None]
    run = make_run(tmp_path, gpus=(0,), source="nvml")
    metrics = run / "steps" / "train" / "metrics.jsonl"
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "train_runtime" not in r]
    rows.append({"step": 100, "train_runtime": -60.0, "train_samples_per_second": 0.0, "num_tokens": -5.0})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = scaling.measure(load_run(run), "0", [0])
    assert (m.train_runtime_s, m.samples_per_s, m.tokens_per_s) == (None, None, None)
    d = _decide(m, _m("0,1", 18.0))
    assert (d.choice, d.rule) == (FIX, 1) and "recorded no samples/s" in d.reason, d
    rows[-1] = {"step": 100, "train_runtime": -60.0, "train_samples_per_second": 10.0}
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = scaling.measure(load_run(run), "0", [0])
    two = dataclasses.replace(one, label="0,1", gpus=[0, 1], samples_per_s=18.0)
    d = _decide(one, two)
    assert (d.choice, d.rule) == (NONE, 4) and "recorded no training time" in d.reason, d
    assert "--max-steps -" not in d.next_action


def test_a_dry_run_returns_the_same_type_as_a_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_bench returns a BenchResult either way: a dry run's has the variants and no decision."""
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    result = bench.run_bench(str(RECIPES / "quickstart.yaml"), str(_machine(tmp_path)), ["0", "0,1"],
                               max_steps=12, out_dir=tmp_path / "b", dry_run=True)
    assert isinstance(result, bench.BenchResult) and result.decision is None and not result.measures
    assert [v.label for v in result.variants] == ["0", "0,1"] and not (tmp_path / "b").exists()
