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
from ftkit.observe import scaling
from ftkit.observe.scaling import FIX, KEEP, SIMPLIFY, STOP, Measure, Thresholds, decide
from tests.conftest import RECIPES, run_cli

SIM = {"FTKIT_SIMULATED_GPUS": "RTX 4090,RTX 4090,RTX 4090"}


def _machine(tmp_path: Path, gpus: int = 3, psu: int = 2000) -> Path:
    m = tmp_path / "lab.yaml"
    m.write_text("ftkit: 1\nkind: machine\nname: lab\nexecutor: local\n"
                 f"psu: {{watts: {psu}}}\npaths: {{datasets: {tmp_path}}}\ngpus:\n"
                 + "".join(f"  - {{index: {i}, model: RTX 4090}}\n" for i in range(gpus)))
    return m


def _resolved(recipe: Path, machine: Path) -> Any:
    from ftkit.run.planning import prepare

    return prepare(str(recipe), str(machine)).res


def test_gpu_sets_are_parsed_strictly() -> None:
    assert scaling.parse_gpu_sets(["0", "0,1"]) == [[0], [0, 1]]
    for bad in (["0"], ["0", "x"], ["0", "0,0"], ["0,1", "1,0"], ["0", ""], ["0", "-1"]):
        with pytest.raises(UserError):
            scaling.parse_gpu_sets(bad)


def test_variants_keep_the_global_batch_and_drop_what_is_not_measured(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = _resolved(RECIPES / "quickstart.yaml", _machine(tmp_path))  # batch 16, 1 GPU: global 16
    ti, vs = scaling.make_variants(res, [[0], [0, 1]], max_steps=30)
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
        scaling.make_variants(res, [[0], [0, 1, 2]], max_steps=30)
    with pytest.raises(UserError, match="GPU 5 is not on machine"):
        scaling.make_variants(res, [[0], [0, 5]], max_steps=30)


def test_a_two_gpu_recipe_scaled_down_keeps_its_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SIM.items():
        monkeypatch.setenv(k, v)
    res = _resolved(RECIPES / "llama31-8b-lora-2gpu.yaml", _machine(tmp_path))
    t = next(s for s in res.recipe.steps if s.type == "train")
    g = t.batch_size * t.grad_accum * len(t.gpus)
    _, (one, two) = scaling.make_variants(res, [[0], [0, 1]], max_steps=40)
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
    gpus = [int(x) for x in label.split(",")]
    return Measure(label, gpus, f"/runs/{label}", status, samples_per_s=sps, telemetry_source=source, **kw)


def _decide(*ms: Measure, th: Thresholds | None = None) -> scaling.Decision:
    scaling.add_scaling(list(ms))
    return decide(list(ms), th or Thresholds())


@pytest.mark.parametrize(("base", "big", "choice", "rule"), [
    (_m("0", 100), _m("0,1", 180), KEEP, 4),
    (_m("0", 100), _m("0,1", 120), SIMPLIFY, 9),
    (_m("0", 100), _m("0,1", 80), STOP, 8),
    (_m("0", None, status="failed", message="OOM"), _m("0,1", 150), FIX, 1),
    (_m("0", 100), _m("0,1", None, status="failed", message="NCCL timeout"), FIX, 2),
    (_m("0", 100), _m("0,1", 190, throttle={"hw_power_brake": 0.1}), FIX, 3),
    (_m("0", 100), _m("0,1", 190, temp_max_c=91.0), FIX, 3),
    (_m("0", 100), _m("0,1", 190, throttle={"hw_thermal_slowdown": 0.02}), FIX, 3),
    (_m("0", 100), _m("0,1", 120, pcie_narrow=["GPU 1 x4 of x16"]), FIX, 5),
    (_m("0", 100, checkpoint_s=40.0, train_runtime_s=100.0), _m("0,1", 120), FIX, 6),
    (_m("0", 100, util_mean=35.0), _m("0,1", 120), FIX, 7),
])
def test_each_rule_fires_on_its_evidence(base: Measure, big: Measure, choice: str, rule: int) -> None:
    d = _decide(dataclasses.replace(base), dataclasses.replace(big))
    assert (d.choice, d.rule) == (choice, rule), d
    assert d.choice in scaling.DECISIONS and d.reason and d.next_action


def test_good_scaling_is_kept_despite_a_narrow_link_but_not_despite_a_power_brake() -> None:
    assert _decide(_m("0", 100), _m("0,1", 190, pcie_narrow=["GPU 1 x8 of x16"])).choice == KEEP
    assert _decide(_m("0", 100), _m("0,1", 190, throttle={"hw_slowdown": 0.5})).choice == FIX


def test_simulated_telemetry_never_decides() -> None:
    d = _decide(_m("0", 100, source="simulated", util_mean=10.0),
                _m("0,1", 120, source="simulated", throttle={"hw_power_brake": 1.0}, temp_max_c=99.0,
                   pcie_narrow=["GPU 1 x1 of x16"]))
    assert (d.choice, d.rule) == (SIMPLIFY, 9)
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
