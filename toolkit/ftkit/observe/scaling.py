"""`ftkit bench`: the scaling guide's test, and its decision.

The same recipe runs on each GPU set with everything else held equal - data, steps, global
batch, checkpoint policy, power caps - as short fixed-step training runs (the recipe's merge,
serve and eval steps are left out). From the run directories come samples/s, tokens/s,
scaling efficiency, peak temperature and power, throttling and checkpoint times; from those,
by the written rules below, one of the guide's four decisions, in decision.md.

How a variant differs from the recipe (identically for every GPU set):
- gpus: the set; distribution: single for one GPU, else the recipe's (ddp when it said single)
- batch: the recipe's global batch (batch_size x grad_accum x its GPUs) is kept; each GPU set
  gets the largest per-device batch that divides it and is not above the recipe's, the rest
  goes to grad_accum (a set that cannot split it evenly is refused)
- max_steps: --max-steps; epochs off; evaluation during training off (it would be timed too)
- checkpoint.every_steps: the recipe's when a save falls inside the run, else half the run,
  so every variant times its saves; logging every max_steps/10 steps at most

The decision rules (first match wins). Thresholds are options; telemetry rules apply only
to real GPU figures (the simulated backend's are synthetic, and the note says so):
1. the baseline (fewest GPUs) failed                      -> fix another bottleneck first
2. a multi-GPU variant failed                             -> fix another bottleneck first
3. HwPowerBrake/HwSlowdown under load, thermal slowdown,
   or a GPU at >= 87 C                                    -> fix another bottleneck first (power, cooling)
4. the runs cannot tell: a run trained < 30 s, repeats
   spread > 10%, efficiency beyond linear (> 1.05), or
   the repeats' range straddles a threshold               -> no decision: measure again (and how)
5. scaling efficiency of the largest set >= keep (0.70)  -> keep the multi-GPU plan
6. a GPU's PCIe link under load narrower than it can be  -> fix another bottleneck first (slot, lanes)
7. checkpoint saves >= 25% of the training time           -> fix another bottleneck first (storage)
8. the baseline GPU busy < 60% of the time                -> fix another bottleneck first (input pipeline)
9. more GPUs were slower (speedup < 1)                    -> stop scaling for now
10. otherwise: faster, but well short of linear           -> simplify to workload sharding

Rule 4 is why a bench may decide nothing: the trainer's runtime holds fixed costs (start-up,
the first steps' allocations, the DDP set-up) that a short run cannot amortise, so a 3 s run
can show one GPU slower than two per GPU - "faster than linear", which data parallelism over
the same global batch does not do. Decisions 5-10 compare throughputs, so they are made only
from runs long and steady enough to compare; 1-3 are facts whatever the run's length.

`--simulate N` (run_bench's `simulate`): N simulated GPUs for a machine without any, each a
training process on this CPU (FTKIT_SIMULATED_GPUS, with its state and the power record kept
in the bench directory, not the machine's). The timings are real; the GPU figures are not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import ConfigError, FtkitError, UserError
from ftkit.observe.rundata import RunData, gpu_summary, load_run, throughput
from ftkit.strict import gpu_index

KEEP = "keep the multi-GPU plan"
SIMPLIFY = "simplify to workload sharding"
FIX = "fix another bottleneck first"
STOP = "stop scaling for now"
DECISIONS = (KEEP, SIMPLIFY, FIX, STOP)  # the guide's four
NONE = "none - measure again"  # rule 4: the runs cannot tell; not one of the guide's decisions

SIMULATED_NAME = "simulated"  # a --simulate GPU's model name, where no profile names one

HOT_C = 87.0
CKPT_SHARE = 0.25
LOW_UTIL = 60.0


class BenchStopped(FtkitError):
    """A run was stopped (Ctrl-C, SIGTERM): the bench stops too, without a decision."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Thresholds:
    keep_efficiency: float = 0.70
    checkpoint_share: float = CKPT_SHARE
    low_util: float = LOW_UTIL
    hot_c: float = HOT_C
    # rule 4, when the runs cannot tell. 30 s: a run's fixed costs (start-up, first steps, the
    # DDP set-up: a few seconds) stay under ~10%, well inside the keep threshold's margin.
    min_seconds: float = 30.0
    max_spread: float = 0.10  # (max - min) / median samples/s over one GPU set's repeats
    beyond_linear: float = 1.05  # efficiency above this (the repeats' low end) is a bad measurement


@dataclass
class Variant:
    gpus: list[int]
    label: str  # "0" | "0,1"
    distribution: str
    batch_size: int
    grad_accum: int
    global_batch: int
    max_steps: int
    every_steps: int
    recipe: Any = None  # the trimmed Recipe this variant runs
    plan: Any = None
    res: Any = None
    run_dirs: list[Path] = field(default_factory=list)


@dataclass
class Measure:
    label: str
    gpus: list[int]
    run_dir: str
    status: str
    steps: int = 0
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    steady_samples_per_s: float | None = None
    steady_tokens_per_s: float | None = None
    train_runtime_s: float | None = None
    step_seconds: float | None = None
    checkpoint_s: float | None = None  # all saves together
    checkpoint_max_s: float | None = None
    checkpoints: int = 0
    checkpoint_approximate: bool = False
    speedup: float | None = None
    efficiency: float | None = None
    telemetry_source: str | None = None
    gpus_telemetry: dict[str, Any] = field(default_factory=dict)
    util_mean: float | None = None
    temp_max_c: float | None = None
    power_max_w: float | None = None
    limit_w: float | None = None
    throttle: dict[str, float] = field(default_factory=dict)  # flag -> largest share over the GPUs
    pcie_narrow: list[str] = field(default_factory=list)
    run_dir_growth_mib: float | None = None
    message: str | None = None
    simulated_gpus: bool = False  # FTKIT_SIMULATED_GPUS: the "GPUs" trained on the CPU
    # the repeats of this GPU set (the run above is their median)
    runs: int = 1
    samples_per_s_runs: list[float] = field(default_factory=list)
    spread: float | None = None  # (max - min) / median of samples_per_s_runs; None with one run
    train_runtime_min_s: float | None = None  # the shortest repeat's training time
    efficiency_low: float | None = None  # efficiency from the repeats' worst and best runs
    efficiency_high: float | None = None

    def rates(self) -> list[float]:
        return self.samples_per_s_runs or ([self.samples_per_s] if self.samples_per_s else [])

    def shortest_s(self) -> float | None:
        return self.train_runtime_min_s if self.train_runtime_min_s is not None else self.train_runtime_s


@dataclass
class Decision:
    choice: str
    rule: int
    reason: str
    next_action: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- variants


def parse_gpu_sets(values: tuple[str, ...] | list[str]) -> list[list[int]]:
    sets: list[list[int]] = []
    for v in values:
        gpus = [gpu_index(x) for x in v.replace(" ", "").split(",") if x != ""]  # ASCII digits only
        if not gpus or len(set(gpus)) != len(gpus):
            raise UserError(f"--gpus {v!r}: give distinct GPU indices, e.g. 0,1")
        if sorted(gpus) in [sorted(s) for s in sets]:
            raise UserError(f"--gpus {v!r} is given twice")
        sets.append(gpus)
    if len(sets) < 2:
        raise UserError("bench compares GPU sets: give at least two, e.g. --gpus 0 --gpus 0,1")
    if max(map(len, sets)) == min(map(len, sets)):
        raise UserError(f"bench compares fewer GPUs with more: the sets given all have {len(sets[0])} GPU(s); give "
                        "a larger one too, e.g. --gpus 0 --gpus 0,1")
    return sets


def _split(per_device_total: int, max_batch: int) -> tuple[int, int]:
    """(batch_size, grad_accum) with batch_size * grad_accum == total, batch_size the largest
    divisor of total not above max_batch (the recipe's per-device batch fits memory)."""
    for bs in range(min(max_batch, per_device_total), 0, -1):
        if per_device_total % bs == 0:
            return bs, per_device_total // bs
    return 1, per_device_total  # pragma: no cover - bs=1 always divides


def make_variants(res: Any, gpu_sets: list[list[int]], *, max_steps: int) -> tuple[int, list[Variant]]:
    """The train step's index in the recipe and one Variant per GPU set (pure)."""
    from ftkit.recipe.models import PowerStep, TrainStep

    recipe = res.recipe
    trains = [i for i, s in enumerate(recipe.steps) if isinstance(s, TrainStep)]
    if not trains:
        raise UserError(f"{res.source}: the recipe has no train step to benchmark")
    ti = trains[0]
    base = recipe.steps[ti]
    machine_gpus = [g.index for g in res.machine.gpus]
    if not machine_gpus:
        raise UserError(f"machine {res.machine.name!r} has no GPUs: bench compares GPU sets",
                        hint="on a machine without GPUs add --simulate 2 (two simulated GPUs, each a training process "
                             "on this CPU), or use a machine profile that lists the GPUs (--machine)")
    for gpus in gpu_sets:
        missing = [g for g in gpus if g not in machine_gpus]
        if missing:
            raise UserError(f"--gpus {','.join(map(str, gpus))}: GPU {missing[0]} is not on machine "
                            f"{res.machine.name!r} (has {machine_gpus})")
    world = max(1, len(base.gpus) if isinstance(base.gpus, list) else 1)
    global_batch = base.batch_size * base.grad_accum * world
    every = base.checkpoint.every_steps if base.checkpoint.every_steps <= max_steps else max(1, math.ceil(max_steps / 2))
    logging = max(1, min(base.logging_steps, max_steps // 10 or 1))
    out = []
    for gpus in gpu_sets:
        n = len(gpus)
        if global_batch % n:
            raise UserError(f"--gpus {','.join(map(str, gpus))}: the recipe's global batch {global_batch} "
                            f"(batch_size {base.batch_size} x grad_accum {base.grad_accum} x {world} GPU(s)) does not "
                            f"split evenly over {n} GPUs", hint="choose GPU counts that divide it, or change the batch")
        bs, ga = _split(global_batch // n, base.batch_size)
        dist = "single" if n == 1 else (base.distribution if base.distribution != "single" else "ddp")
        r = recipe.model_copy(deep=True)
        t = r.steps[ti]
        t.gpus, t.distribution, t.batch_size, t.grad_accum = list(gpus), dist, bs, ga
        t.max_steps, t.epochs, t.eval_every_steps = max_steps, None, None
        t.checkpoint.every_steps, t.logging_steps = every, logging
        r.name = f"{recipe.name[:40]}-gpus-{'-'.join(map(str, gpus))}"
        # only the work being measured: power steps (caps equal for every set) and this train step
        r.steps = [s for j, s in enumerate(r.steps) if j == ti or isinstance(s, PowerStep)]
        v = Variant(list(gpus), ",".join(map(str, gpus)), dist, bs, ga, global_batch, max_steps, every, recipe=r)
        out.append(v)
    return ti, out


def plan_variants(prepared: Any, gpu_sets: list[list[int]], *, max_steps: int, runs_root: Path,
                  executor: str | None = None) -> list[Variant]:
    """Variants with their plans, each checked against the machine like `ftkit up` checks a
    recipe (memory fit, PSU budget, GPUs): a problem is the recipe's line, exit 2."""
    from ftkit.run.planning import Prepared, plan_for
    from ftkit.run.rundir import new_run_path

    res = prepared.res
    ti, variants = make_variants(res, gpu_sets, max_steps=max_steps)
    problems = []
    for v in variants:
        # checked with every recipe step in place, so a problem points at the right line
        full = res.recipe.model_copy(deep=True)
        full.steps[ti] = next(s for s in v.recipe.steps if s.type == "train")
        full_res = dataclasses.replace(res, recipe=full)
        check = Prepared(prepared.loaded, full_res, plan_for(full_res, run_dir=None, executor=executor),
                         prepared.machine_path)
        problems += [dataclasses.replace(i, message=f"bench --gpus {v.label}: {i.message}") for i in check.problems()]
        v.res = dataclasses.replace(res, recipe=v.recipe)
        path = new_run_path(runs_root, v.recipe.name)
        v.plan = plan_for(v.res, run_dir=str(path), executor=executor)
    if problems:
        raise ConfigError(problems)
    return variants


def run_variant(v: Variant, *, argv: list[str], runs_root: Path, echo: bool = False) -> Path:
    """Run one variant through the runner, as `ftkit up` would. The one place bench touches
    the runner's API."""
    from ftkit.run import runner
    from ftkit.run.display import make_display
    from ftkit.run.planning import plan_for
    from ftkit.run.rundir import new_run_path

    path = new_run_path(runs_root, v.recipe.name)
    plan = plan_for(v.res, run_dir=str(path), executor=v.plan.executor)
    run = runner.create_run(path, plan, v.res.to_yaml_data(), argv)
    result = runner.execute_plan(run, plan, display=make_display(plan, live=False), echo=echo)
    v.run_dirs.append(path)
    if result.status == "interrupted":  # the person stopped it: no further runs, no decision
        raise BenchStopped(f"bench stopped during GPUs {v.label} ({result.message}); runs so far in {runs_root}",
                           result.exit_code or 130)
    return path


# --------------------------------------------------------------------------- measuring


def measure(rd: RunData, label: str, gpus: list[int]) -> Measure:
    m = Measure(label, gpus, str(rd.path), rd.status, message=rd.state.message,
                simulated_gpus=rd.plan.simulated_gpus)
    train_id = next(iter(rd.metrics), None)
    if train_id is None:
        return m
    t = throughput(rd, train_id)
    m.steps = t["steps"]
    m.samples_per_s, m.tokens_per_s = t["samples_per_s"], t["tokens_per_s"]
    m.steady_samples_per_s, m.steady_tokens_per_s = t["steady_samples_per_s"], t["steady_tokens_per_s"]
    m.train_runtime_s, m.step_seconds = t["train_runtime_s"], t["step_seconds"]
    cks = [c for c in rd.checkpoints.get(train_id, []) if c.seconds is not None]
    if cks:
        m.checkpoint_s = round(sum(c.seconds or 0 for c in cks), 3)
        m.checkpoint_max_s = max(c.seconds or 0 for c in cks)
        m.checkpoints = len(cks)
        m.checkpoint_approximate = any(c.approximate for c in cks)
    rows = [r for r in rd.telemetry if r.get("step") == train_id]
    g = gpu_summary(rows)
    m.gpus_telemetry = g
    if g:
        sources = {x["source"] for x in g.values()}
        m.telemetry_source = "simulated" if "simulated" in sources else ",".join(sorted(sources))
        utils = [x["util_mean"] for x in g.values() if x["util_mean"] is not None]
        m.util_mean = round(sum(utils) / len(utils), 1) if utils else None
        m.temp_max_c = max((x["temp_max_c"] for x in g.values() if x["temp_max_c"] is not None), default=None)
        # peak power against its own cap, on the GPU closest to its cap
        with_cap = [x for x in g.values() if x["power_max_w"] is not None and x["limit_w"]]
        if with_cap:
            top = max(with_cap, key=lambda x: x["power_max_w"] / x["limit_w"])
            m.power_max_w, m.limit_w = top["power_max_w"], top["limit_w"]
        else:
            m.power_max_w = max((x["power_max_w"] for x in g.values() if x["power_max_w"] is not None), default=None)
        for x in g.values():
            for flag, share in (x["throttle_fraction"] or {}).items():
                if share:
                    m.throttle[flag] = max(m.throttle.get(flag, 0.0), share)
        for gpu, x in g.items():
            w, mx = x["pcie_width_busy_min"], x["pcie_max_width"]
            if w is not None and mx is not None and (w < mx or mx < 16):
                m.pcie_narrow.append(f"GPU {gpu} x{w:g} of x{mx:g}")
    disk = [float(r["run_dir_mib"]) for r in rd.telemetry if r.get("run_dir_mib") not in (None, "")]
    if len(disk) >= 2:
        m.run_dir_growth_mib = round(disk[-1] - disk[0], 2)
    return m


def _failed(m: Measure) -> bool:
    return m.status != "succeeded" or m.samples_per_s is None


def _why(m: Measure) -> str:
    """What went wrong with a run, in a few words: its message, else its status, or that it
    recorded no throughput although it finished."""
    return m.message or ("it recorded no samples/s" if m.status == "succeeded" else m.status)


def _median_measure(ms: list[Measure]) -> Measure:
    """Repeats of one variant: the run with the median throughput stands for it, carrying
    every repeat's samples/s, their spread and the shortest training time (rule 4). A set
    with a failed repeat is failed: its first failed run stands for it (rules 1 and 2), so a
    failure between two good runs is never averaged away."""
    failed = [m for m in ms if _failed(m)]
    if failed:
        first = dataclasses.replace(failed[0])
        if len(ms) > 1:
            k = ms.index(failed[0]) + 1
            first.message = f"repeat {k} of {len(ms)}: {_why(failed[0])}"
        first.runs = len(ms)
        first.samples_per_s_runs = sorted(m.samples_per_s for m in ms if not _failed(m) and m.samples_per_s)
        return first
    ok = list(ms)
    ok.sort(key=lambda m: m.samples_per_s or 0)
    mid = dataclasses.replace(ok[len(ok) // 2])
    rates = [m.samples_per_s or 0.0 for m in ok]
    mid.runs, mid.samples_per_s_runs = len(ok), rates
    median = rates[len(rates) // 2] if len(rates) % 2 else (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2
    mid.spread = round((rates[-1] - rates[0]) / median, 3) if len(rates) > 1 and median else None
    times = [m.train_runtime_s for m in ok]
    mid.train_runtime_min_s = None if any(t is None for t in times) else min(t or 0.0 for t in times)
    return mid


def add_scaling(measures: list[Measure]) -> Measure:
    """Speedup and efficiency against the baseline (the set with the fewest GPUs); returns it.
    With repeats, also the efficiency's range: this set's slowest run against the baseline's
    fastest, and its fastest against the baseline's slowest."""
    base = min(measures, key=lambda m: len(m.gpus))
    for m in measures:
        if base.samples_per_s and m.samples_per_s:
            ratio = len(m.gpus) / len(base.gpus)
            m.speedup = round(m.samples_per_s / base.samples_per_s, 3)
            m.efficiency = round(m.speedup / ratio, 3)
            mine, theirs = m.rates(), base.rates()
            if m is base or not (mine and theirs and min(theirs) > 0):
                m.efficiency_low = m.efficiency_high = m.efficiency
            else:
                m.efficiency_low = round(min(mine) / max(theirs) / ratio, 3)
                m.efficiency_high = round(max(mine) / min(theirs) / ratio, 3)
    return base


def _steps_for(measures: list[Measure], th: Thresholds) -> int | None:
    """--max-steps that makes the shortest run train at least min_seconds (with a margin),
    from the steps and seconds measured; rounded up to a tidy number."""
    rates = [m.steps / t for m in measures if m.steps and (t := m.shortest_s())]
    if not rates:
        return None
    need = math.ceil(max(rates) * th.min_seconds * 1.25)  # the fastest set sets the pace
    tidy = 10 ** max(0, len(str(need)) - 2)
    return -(-need // tidy) * tidy


def inconclusive(measures: list[Measure], th: Thresholds) -> tuple[str, str] | None:
    """Rule 4: why these runs cannot tell one decision from another, and what to change; or
    None when they can. Called once every run has succeeded."""
    base = min(measures, key=lambda m: len(m.gpus))
    big = max(measures, key=lambda m: len(m.gpus))
    steps = _steps_for(measures, th)
    longer = f"--max-steps {steps}" if steps else "more --max-steps"
    repeats = max(m.runs for m in measures)
    more = f"--repeat {max(3, repeats + 2)}"
    untimed = [m.label for m in measures if m.shortest_s() is None]
    if untimed:
        return (f"the runs on GPU(s) {', '.join(untimed)} recorded no training time, so nothing can be compared",
                "check the train step's metrics.jsonl (the trainer's final line holds its runtime), then bench again")
    short = [m for m in measures if (m.shortest_s() or 0.0) < th.min_seconds]
    if short:
        worst = min(short, key=lambda m: m.shortest_s() or 0.0)
        return (f"the runs are too short to judge: GPU(s) {worst.label} trained {worst.shortest_s():.1f} s, under the "
                f"{th.min_seconds:g} s a run needs before start-up and warm-up stop weighing on its samples/s "
                f"(efficiency {_f(big.efficiency)} from these runs says nothing)",
                f"bench again with {longer} (every run >= {th.min_seconds:g} s) and {more} to see the spread")
    noisy = [m for m in measures if m.spread is not None and m.spread > th.max_spread]
    if noisy:
        worst = max(noisy, key=lambda m: m.spread or 0.0)
        return (f"the runs are too noisy to judge: samples/s on GPU(s) {worst.label} varied by {worst.spread:.0%} "
                f"over its {worst.runs} runs (more than {th.max_spread:.0%})",
                f"bench again on a quiet machine (nothing else training, serving or building), with {more} "
                "and longer runs (--max-steps)")
    low = big.efficiency_low if big.efficiency_low is not None else big.efficiency
    high = big.efficiency_high if big.efficiency_high is not None else big.efficiency
    if low is not None and low > th.beyond_linear:
        return (f"GPUs {big.label} ran {big.speedup:.2f}x the baseline on {len(big.gpus)}x the GPUs: efficiency "
                f"{big.efficiency:.2f}, faster than linear, which splitting the same global batch over more GPUs "
                "does not do; the measurement is off (warm-up weighing on the baseline, other load, caching)",
                f"bench again on a quiet machine with longer runs ({longer}) and {more}")
    if repeats > 1 and low is not None and high is not None:
        ratio = len(big.gpus) / len(base.gpus)
        for threshold, what in ((th.keep_efficiency, f"the keep threshold {th.keep_efficiency:.2f}"),
                                (1 / ratio, "a speedup of 1 (no faster than the baseline)")):
            if low < threshold <= high:
                return (f"the repeats put the efficiency of GPUs {big.label} anywhere from {low:.2f} to {high:.2f}, "
                        f"on both sides of {what}: the runs cannot tell which decision holds",
                        f"bench again with {more} and longer runs ({longer}), on a quiet machine")
    return None


# --------------------------------------------------------------------------- deciding


def decide(measures: list[Measure], th: Thresholds) -> Decision:
    """One of the guide's four decisions by the rules in this module's docstring."""
    base = min(measures, key=lambda m: len(m.gpus))
    big = max(measures, key=lambda m: len(m.gpus))
    notes: list[str] = []
    real = all(m.telemetry_source not in (None, "simulated") for m in measures)
    if any(m.simulated_gpus for m in measures):
        notes.append("the GPUs are simulated (FTKIT_SIMULATED_GPUS): each \"GPU\" was a training process on this "
                     "host's CPU, so the timings are real but measure CPU processes, not GPUs")
    if not real:
        notes.append("GPU telemetry is simulated or missing: the power, thermal, PCIe and utilization rules "
                     "(3, 6, 8) were not applied; run the bench on the real machine for them")
    if _failed(base):
        return Decision(FIX, 1, f"the baseline on GPU(s) {base.label} did not complete ({_why(base)}): "
                        "there is no stable single-GPU run to scale from",
                        "make the single-GPU run reliable first (data, script, environment), then bench again", notes)
    failed = [m for m in measures if m is not base and _failed(m)]
    if failed:
        f = failed[0]
        return Decision(FIX, 2, f"the run on GPU(s) {f.label} failed ({_why(f)}) while the baseline works",
                        "debug the multi-GPU launch one layer at a time: devices visible, framework sees them, "
                        "launcher starts a tiny job, then the real script for a few steps", notes)
    if real:
        for m in measures:
            brake = {k: v for k, v in m.throttle.items() if k in ("hw_power_brake", "hw_slowdown")}
            if brake:
                which = ", ".join(f"{k} in {v:.0%} of samples" for k, v in brake.items())
                return Decision(FIX, 3, f"GPU(s) {m.label}: {which}: the power delivery cannot hold the load "
                                "(HwPowerBrake/HwSlowdown point at the PSU or its cables)",
                                "check the PSU rating and cabling, lower the power caps, then bench again", notes)
            thermal = {k: v for k, v in m.throttle.items() if "thermal" in k}
            if thermal or (m.temp_max_c is not None and m.temp_max_c >= th.hot_c):
                return Decision(FIX, 3, f"GPU(s) {m.label}: thermal limits (peak {m.temp_max_c} °C"
                                + (f", {', '.join(thermal)}" if thermal else "") + ")",
                                "improve airflow and spacing, or lower the power caps, then bench again", notes)
    if max(m.runs for m in measures) == 1:
        notes.append("one run per GPU set: the spread between runs is unknown; --repeat 3 measures it")
    cannot = inconclusive(measures, th)
    if cannot is not None:
        return Decision(NONE, 4, cannot[0], cannot[1], notes)
    eff = big.efficiency or 0.0
    speed = big.speedup or 0.0
    if eff >= th.keep_efficiency:
        return Decision(KEEP, 5, f"{len(big.gpus)} GPUs run {speed:.2f}x the baseline's samples/s: scaling efficiency "
                        f"{eff:.2f} >= {th.keep_efficiency:.2f}" + (" with no throttling" if real else ""),
                        "keep the multi-GPU recipe; rerun this bench after changes to the host or the recipe", notes)
    if real and big.pcie_narrow:
        return Decision(FIX, 6, f"efficiency {eff:.2f} and PCIe links narrower than they can be under load: "
                        + ", ".join(big.pcie_narrow),
                        "move the card to a CPU-attached x16 slot (check lane sharing with M.2), then bench again", notes)
    for m in measures:
        if m.checkpoint_s and m.train_runtime_s and m.checkpoint_s / m.train_runtime_s >= th.checkpoint_share:
            share = m.checkpoint_s / m.train_runtime_s
            return Decision(FIX, 7, f"checkpoint saves take {share:.0%} of the training time on GPU(s) {m.label}: "
                            "storage stalls the run, more GPUs will not", "put checkpoints on a faster disk or save "
                            "less often (checkpoint.every_steps), then bench again", notes)
    if real and base.util_mean is not None and base.util_mean < th.low_util:
        return Decision(FIX, 8, f"the baseline GPU is busy only {base.util_mean:.0f}% of the time: the input pipeline or "
                        "the host feeds it too slowly, and a second GPU would wait the same way",
                        "profile data loading and preprocessing (workers, packing, tokenization ahead of time)", notes)
    if speed < 1.0:
        return Decision(STOP, 9, f"{len(big.gpus)} GPUs ran at {speed:.2f}x the baseline: slower than one; on this host "
                        "more GPUs make this workload worse", "keep training on one GPU; do not add GPUs for this "
                        "workload here (a second GPU is still useful for evaluation or serving)", notes)
    return Decision(SIMPLIFY, 10, f"{len(big.gpus)} GPUs run only {speed:.2f}x the baseline (efficiency {eff:.2f} < "
                    f"{th.keep_efficiency:.2f}): the gain does not pay for the synchronization and its failure modes",
                    "train on one GPU and give the other a separate role (evaluation or serving) so training never "
                    "blocks them", notes)


# --------------------------------------------------------------------------- writing


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def decision_markdown(recipe: str, machine: str, variants: list[Variant], measures: list[Measure], decision: Decision,
                      th: Thresholds, *, bottleneck: str | None, fairness: list[Any], out_dir: Path) -> str:
    import ftkit

    base = min(measures, key=lambda m: len(m.gpus))
    big = max(measures, key=lambda m: len(m.gpus))
    v0 = variants[0]
    target = (base.samples_per_s or 0) * (len(big.gpus) / len(base.gpus)) * th.keep_efficiency
    lines = [f"# Scaling decision: {recipe} on {machine}", "",
             f"Measured {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `ftkit bench` "
             f"(ftkit {ftkit.__version__}); runs in `{out_dir / 'runs'}`.", "",
             "## Bottleneck", ""]
    if bottleneck:
        lines += [f"Stated: {bottleneck}", ""]
    lines += [f"Measured: training {recipe} on GPU {base.label} runs at {_f(base.samples_per_s)} samples/s "
              f"({_f(base.tokens_per_s, 0)} tokens/s). The question is whether spreading the same work over GPUs "
              f"{big.label} raises that enough to be worth its cost.", "",
              "## Success threshold", "",
              f"Scaling efficiency >= {th.keep_efficiency:.2f} on GPUs {big.label}, i.e. >= {target:.2f} samples/s, "
              "with no power, thermal or PCIe problems and checkpoint saves under "
              f"{th.checkpoint_share:.0%} of the training time.", "",
              "## Expansion option", "",
              f"{next(v.distribution for v in variants if v.label == big.label)} over GPUs {big.label} "
              f"(data parallelism), against the baseline on GPU {base.label}.", "",
              "## Evidence", "",
              f"Same recipe, data and checkpoint policy; {v0.max_steps} steps; global batch {v0.global_batch} in every "
              "run; evaluation during training off.", "",
              "| GPUs | distribution | batch x accum | status | samples/s | tokens/s | steady tokens/s | speedup | "
              "efficiency | train s | runs (spread) | checkpoint s (n) | mean util % | peak °C | peak W / cap W | "
              "clock events |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, m in zip(variants, measures, strict=True):
        events = ", ".join(f"{k} {x:.0%}" for k, x in sorted(m.throttle.items())) or "none"
        sim = " (sim)" if m.telemetry_source == "simulated" else ""
        lines.append(f"| {m.label} | {v.distribution} | {v.batch_size} x {v.grad_accum} | {m.status} | "
                     f"{_f(m.samples_per_s)} | {_f(m.tokens_per_s, 0)} | {_f(m.steady_tokens_per_s, 0)} | "
                     f"{_f(m.speedup)} | {_f(m.efficiency)} | {_f(m.train_runtime_s, 1)} | "
                     f"{m.runs} ({'-' if m.spread is None else f'{m.spread:.0%}'}) | "
                     f"{_f(m.checkpoint_s)} ({m.checkpoints}) | {_f(m.util_mean, 0)}{sim} | {_f(m.temp_max_c, 0)}{sim} | "
                     f"{_f(m.power_max_w, 0)} / {_f(m.limit_w, 0)}{sim} | {events}{sim} |")
    lines += ["", "samples/s and tokens/s: the trainer's runtime for the whole run (saves included); steady: "
              "median of logged intervals after the first. Efficiency = speedup / (GPUs / baseline GPUs)."]
    if any(m.checkpoint_approximate for m in measures):
        lines.append("Checkpoint times come from file times (a lower bound).")
    lines.append(_measurement_line(measures, big, th))
    unfair = [f for f in fairness if not f.expected]
    lines.append("Fairness check: " + ("only GPUs, distribution and the per-device split of the same global batch "
                                       "differ." if not unfair else "DIFFERS in " + ", ".join(f.field for f in unfair)))
    lines += ["", "## Operational side effects", ""]
    for m in measures:
        side = [f"peak {_f(m.temp_max_c, 0)} °C", f"peak {_f(m.power_max_w, 0)} W against a {_f(m.limit_w, 0)} W cap",
                f"slowest checkpoint {_f(m.checkpoint_max_s)} s", f"run directory grew {_f(m.run_dir_growth_mib, 1)} MiB"]
        if m.pcie_narrow:
            side.append("PCIe " + ", ".join(m.pcie_narrow))
        tag = " (GPU figures SIMULATED)" if m.telemetry_source == "simulated" else ""
        lines.append(f"- GPUs {m.label}{tag}: " + "; ".join(side))
    lines += ["", f"## Decision: {decision.choice}", "", f"Reason (rule {decision.rule}): {decision.reason}.", "",
              f"Next action: {decision.next_action}.", ""]
    for n in decision.notes:
        lines.append(f"Note: {n}.")
    lines += ["", "## How the decision is made", "",
              "First matching rule wins; telemetry rules use real GPU figures only.", "",
              "1. the baseline failed -> fix another bottleneck first",
              "2. a multi-GPU run failed -> fix another bottleneck first",
              f"3. HwPowerBrake/HwSlowdown, thermal slowdown or >= {th.hot_c:g} °C -> fix another bottleneck first",
              f"4. a run trained < {th.min_seconds:g} s, one GPU set's repeats spread > {th.max_spread:.0%}, efficiency "
              f"beyond linear (> {th.beyond_linear:.2f}), or the repeats' range straddles a threshold -> no decision: "
              "the runs cannot tell; measure again as the next action says",
              f"5. efficiency >= {th.keep_efficiency:.2f} -> keep the multi-GPU plan",
              "6. PCIe under load narrower than it can be -> fix another bottleneck first",
              f"7. checkpoint saves >= {th.checkpoint_share:.0%} of training time -> fix another bottleneck first",
              f"8. baseline GPU busy < {th.low_util:.0f}% -> fix another bottleneck first",
              "9. more GPUs were slower -> stop scaling for now",
              "10. otherwise -> simplify to workload sharding", ""]
    return "\n".join(lines)


def _measurement_line(measures: list[Measure], big: Measure, th: Thresholds) -> str:
    """Whether the runs can be compared at all (rule 4), in one line of evidence."""
    timed = [m for m in measures if m.shortest_s() is not None]
    shortest = min(timed, key=lambda m: m.shortest_s() or 0.0) if timed else None
    parts = [f"shortest run {shortest.shortest_s():.1f} s (GPUs {shortest.label}; {th.min_seconds:g} s needed)"
             if shortest else "no training time recorded"]
    runs = max(m.runs for m in measures)
    spreads = [m.spread for m in measures if m.spread is not None]
    parts.append(f"{runs} run(s) per GPU set" + (f", spread up to {max(spreads):.0%} ({th.max_spread:.0%} allowed)"
                                                 if spreads else ", spread unknown"))
    if big.efficiency_low is not None and big.efficiency_high is not None and big.efficiency_low != big.efficiency_high:
        parts.append(f"efficiency of GPUs {big.label} {big.efficiency_low:.2f} to {big.efficiency_high:.2f} over the "
                     "repeats")
    return "Measurement: " + "; ".join(parts) + "."


@dataclass
class BenchResult:
    """What `run_bench` did: the variants it planned and, unless it was a dry run, what they
    measured and the decision (a dry run: `decision` None, nothing ran or was written)."""

    variants: list[Variant]
    out_dir: Path
    decision: Decision | None = None
    measures: list[Measure] = field(default_factory=list)
    decision_md: Path | None = None
    report: Path | None = None


@contextmanager
def _environ(*keys: str) -> Iterator[None]:
    """Put `keys` of os.environ back as they were on the way out: --simulate sets them for
    this bench only (its steps inherit them), not for whatever runs in this process next."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def simulated_names(n: int, machine_path: str | None, gpu_sets: list[list[int]]) -> list[str]:
    """The models of `--simulate N`'s GPUs: a profile's first N (so its power ranges and
    memory hold), else SIMULATED_NAME for this host's detected profile."""
    outside = sorted({g for gs in gpu_sets for g in gs if g >= n})
    if outside:
        raise UserError(f"--gpus: GPU {outside[0]} is not simulated: --simulate {n} makes GPUs 0 to {n - 1}")
    if not machine_path:
        return [SIMULATED_NAME] * n
    from ftkit.recipe.validate import load_machine

    machine = load_machine(machine_path).machine
    if len(machine.gpus) < n:
        raise UserError(f"--simulate {n}: machine profile {machine.name!r} lists {len(machine.gpus)} GPU(s)",
                        hint="leave out --machine (this host, with the simulated GPUs), or use a profile that "
                             f"lists {n} GPUs")
    return [g.model for g in sorted(machine.gpus, key=lambda g: g.index)][:n]


def run_bench(recipe_path: str, machine_path: str | None, gpu_values: list[str], *, max_steps: int,
              out_dir: Path | None = None, executor: str | None = None, th: Thresholds | None = None,
              bottleneck: str | None = None, repeat: int = 1, echo: bool = False, dry_run: bool = False,
              simulate: int | None = None, say: Any = None) -> BenchResult:
    """Plan the variants, run them (`repeat` times, alternating), measure and decide.
    `simulate`: that many simulated GPUs (see the module's docstring)."""
    from ftkit.gpu.nvml import SIMULATED_ENV, SIMULATED_STATE_ENV
    from ftkit.gpu.power import STATE_ENV

    with _environ(SIMULATED_ENV, SIMULATED_STATE_ENV, STATE_ENV):
        return _run_bench(recipe_path, machine_path, gpu_values, max_steps=max_steps, out_dir=out_dir,
                          executor=executor, th=th or Thresholds(), bottleneck=bottleneck, repeat=repeat, echo=echo,
                          dry_run=dry_run, simulate=simulate,
                          say=say or (lambda msg: print(msg, file=sys.stderr, flush=True)))


def _run_bench(recipe_path: str, machine_path: str | None, gpu_values: list[str], *, max_steps: int,
               out_dir: Path | None, executor: str | None, th: Thresholds, bottleneck: str | None, repeat: int,
               echo: bool, dry_run: bool, simulate: int | None, say: Any) -> BenchResult:
    from ftkit.files import write_atomic, write_json
    from ftkit.gpu.nvml import SIMULATED_ENV, SIMULATED_STATE_ENV
    from ftkit.gpu.power import STATE_ENV
    from ftkit.run.planning import prepare, runs_root
    from ftkit.run.rundir import utc_stamp

    if max_steps < 1:
        raise UserError("--max-steps must be at least 1")
    gpu_sets = parse_gpu_sets(gpu_values)
    if simulate:
        os.environ[SIMULATED_ENV] = ",".join(simulated_names(simulate, machine_path, gpu_sets))
    prepared = prepare(recipe_path, machine_path, executor=executor)
    res = prepared.res
    out = out_dir or (runs_root(res.machine) / f"bench-{utc_stamp()}-{res.recipe.name}")
    variants = plan_variants(prepared, gpu_sets, max_steps=max_steps, runs_root=out / "runs", executor=executor)
    if dry_run:
        return BenchResult(variants, out)
    out.mkdir(parents=True, exist_ok=True)
    if simulate:  # the simulated GPUs' limits and their power record stay with this bench (each run plans again)
        (out / "simulated").mkdir(exist_ok=True)
        os.environ[SIMULATED_STATE_ENV] = str((out / "simulated" / "gpus.json").absolute())
        os.environ[STATE_ENV] = str((out / "simulated" / "state").absolute())
    argv = ["ftkit", "bench", recipe_path, *[f"--gpus={g}" for g in gpu_values], f"--max-steps={max_steps}",
            *([f"--simulate={simulate}"] if simulate else [])]
    per: dict[str, list[Measure]] = {v.label: [] for v in variants}
    for r in range(repeat):  # alternate the sets, so drift (heat, other load) hits each alike
        for v in variants:
            say(f"bench: GPUs {v.label} ({v.distribution}, batch {v.batch_size} x accum {v.grad_accum}, {max_steps} steps)"
                + (f", repeat {r + 1}/{repeat}" if repeat > 1 else ""))
            path = run_variant(v, argv=argv, runs_root=out / "runs", echo=echo)
            per[v.label].append(measure(load_run(path), v.label, v.gpus))
    measures = [_median_measure(per[v.label]) for v in variants]
    base = add_scaling(measures)
    decision = decide(measures, th)
    big = max(measures, key=lambda m: len(m.gpus))
    from ftkit.observe.report import fairness as fair_check

    runs_by_label = {m.label: Path(m.run_dir) for m in measures}
    fairness = fair_check(load_run(runs_by_label[base.label]), load_run(runs_by_label[big.label]))
    md = decision_markdown(res.recipe.name, res.machine.name, variants, measures, decision, th, bottleneck=bottleneck,
                           fairness=fairness, out_dir=out)
    write_atomic(out / "decision.md", md)
    write_json(out / "bench.json", {
        "recipe": res.recipe.name, "machine": res.machine.name, "max_steps": max_steps, "repeat": repeat,
        "thresholds": dataclasses.asdict(th), "bottleneck": bottleneck,
        "variants": [{k: v for k, v in dataclasses.asdict(x).items() if k not in ("recipe", "plan", "res")}
                     | {"run_dirs": [str(p) for p in x.run_dirs]} for x in variants],
        "measures": [dataclasses.asdict(m) for m in measures],
        "decision": dataclasses.asdict(decision),
        "fairness": [dataclasses.asdict(f) for f in fairness],
    })
    report = None
    try:
        from ftkit.observe.report import make_report

        report = make_report([runs_by_label[base.label], runs_by_label[big.label]], out / "report").html
    except UserError as e:  # matplotlib missing: the decision stands without plots
        say(f"bench: no report ({e.message}; {e.hint})")
    return BenchResult(variants, out, decision, measures, out / "decision.md", report)


def describe_variants(variants: list[Variant]) -> str:
    lines = []
    for v in variants:
        lines.append(f"GPUs {v.label}: {v.distribution}, batch_size {v.batch_size} x grad_accum {v.grad_accum} x "
                     f"{len(v.gpus)} GPU(s) = global batch {v.global_batch}; max_steps {v.max_steps}; checkpoint "
                     f"every {v.every_steps} steps; run directory {v.plan.run_dir}")
        for s in v.plan.steps:
            lines.append(f"  {s.id} ({s.kind}): {s.description}")
    return "\n".join(lines)
