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
4. scaling efficiency of the largest set >= keep (0.70)  -> keep the multi-GPU plan
5. a GPU's PCIe link under load narrower than it can be  -> fix another bottleneck first (slot, lanes)
6. checkpoint saves >= 25% of the training time           -> fix another bottleneck first (storage)
7. the baseline GPU busy < 60% of the time                -> fix another bottleneck first (input pipeline)
8. more GPUs were slower (speedup < 1)                    -> stop scaling for now
9. otherwise: faster, but well short of linear            -> simplify to workload sharding
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import sys
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
DECISIONS = (KEEP, SIMPLIFY, FIX, STOP)

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
                        hint="use a machine profile that lists them (FTKIT_SIMULATED_GPUS simulates GPUs for a dry run)")
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
    from ftkit.run.runner import new_run_path

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

    path = runner.new_run_path(runs_root, v.recipe.name)
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
    m = Measure(label, gpus, str(rd.path), rd.status, message=rd.state.get("message"),
                simulated_gpus=bool(rd.plan.get("simulated_gpus")))
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


def _median_measure(ms: list[Measure]) -> Measure:
    """Repeats of one variant: the run with the median throughput stands for it."""
    ok = [m for m in ms if m.samples_per_s is not None]
    if not ok:
        return ms[-1]
    ok.sort(key=lambda m: m.samples_per_s or 0)
    return ok[len(ok) // 2]


def add_scaling(measures: list[Measure]) -> Measure:
    """Speedup and efficiency against the baseline (the set with the fewest GPUs); returns it."""
    base = min(measures, key=lambda m: len(m.gpus))
    for m in measures:
        if base.samples_per_s and m.samples_per_s:
            m.speedup = round(m.samples_per_s / base.samples_per_s, 3)
            m.efficiency = round(m.speedup / (len(m.gpus) / len(base.gpus)), 3)
    return base


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
                     "(3, 5, 7) were not applied; run the bench on the real machine for them")
    if base.status != "succeeded" or base.samples_per_s is None:
        return Decision(FIX, 1, f"the baseline on GPU(s) {base.label} did not complete ({base.message or base.status}): "
                        "there is no stable single-GPU run to scale from",
                        "make the single-GPU run reliable first (data, script, environment), then bench again", notes)
    failed = [m for m in measures if m is not base and (m.status != "succeeded" or m.samples_per_s is None)]
    if failed:
        f = failed[0]
        return Decision(FIX, 2, f"the run on GPU(s) {f.label} failed ({f.message or f.status}) while the baseline works",
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
    eff = big.efficiency or 0.0
    speed = big.speedup or 0.0
    if eff >= th.keep_efficiency:
        return Decision(KEEP, 4, f"{len(big.gpus)} GPUs run {speed:.2f}x the baseline's samples/s: scaling efficiency "
                        f"{eff:.2f} >= {th.keep_efficiency:.2f}" + (" with no throttling" if real else ""),
                        "keep the multi-GPU recipe; rerun this bench after changes to the host or the recipe", notes)
    if real and big.pcie_narrow:
        return Decision(FIX, 5, f"efficiency {eff:.2f} and PCIe links narrower than they can be under load: "
                        + ", ".join(big.pcie_narrow),
                        "move the card to a CPU-attached x16 slot (check lane sharing with M.2), then bench again", notes)
    for m in measures:
        if m.checkpoint_s and m.train_runtime_s and m.checkpoint_s / m.train_runtime_s >= th.checkpoint_share:
            share = m.checkpoint_s / m.train_runtime_s
            return Decision(FIX, 6, f"checkpoint saves take {share:.0%} of the training time on GPU(s) {m.label}: "
                            "storage stalls the run, more GPUs will not", "put checkpoints on a faster disk or save "
                            "less often (checkpoint.every_steps), then bench again", notes)
    if real and base.util_mean is not None and base.util_mean < th.low_util:
        return Decision(FIX, 7, f"the baseline GPU is busy only {base.util_mean:.0f}% of the time: the input pipeline or "
                        "the host feeds it too slowly, and a second GPU would wait the same way",
                        "profile data loading and preprocessing (workers, packing, tokenization ahead of time)", notes)
    if speed < 1.0:
        return Decision(STOP, 8, f"{len(big.gpus)} GPUs ran at {speed:.2f}x the baseline: slower than one; on this host "
                        "more GPUs make this workload worse", "keep training on one GPU; do not add GPUs for this "
                        "workload here (a second GPU is still useful for evaluation or serving)", notes)
    return Decision(SIMPLIFY, 9, f"{len(big.gpus)} GPUs run only {speed:.2f}x the baseline (efficiency {eff:.2f} < "
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
              "efficiency | train s | checkpoint s (n) | mean util % | peak °C | peak W / cap W | clock events |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, m in zip(variants, measures, strict=True):
        events = ", ".join(f"{k} {x:.0%}" for k, x in sorted(m.throttle.items())) or "none"
        sim = " (sim)" if m.telemetry_source == "simulated" else ""
        lines.append(f"| {m.label} | {v.distribution} | {v.batch_size} x {v.grad_accum} | {m.status} | "
                     f"{_f(m.samples_per_s)} | {_f(m.tokens_per_s, 0)} | {_f(m.steady_tokens_per_s, 0)} | "
                     f"{_f(m.speedup)} | {_f(m.efficiency)} | {_f(m.train_runtime_s, 1)} | "
                     f"{_f(m.checkpoint_s)} ({m.checkpoints}) | {_f(m.util_mean, 0)}{sim} | {_f(m.temp_max_c, 0)}{sim} | "
                     f"{_f(m.power_max_w, 0)} / {_f(m.limit_w, 0)}{sim} | {events}{sim} |")
    lines += ["", "samples/s and tokens/s: the trainer's runtime for the whole run (saves included); steady: "
              "median of logged intervals after the first. Efficiency = speedup / (GPUs / baseline GPUs)."]
    if any(m.checkpoint_approximate for m in measures):
        lines.append("Checkpoint times come from file times (a lower bound).")
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
              f"4. efficiency >= {th.keep_efficiency:.2f} -> keep the multi-GPU plan",
              "5. PCIe under load narrower than it can be -> fix another bottleneck first",
              f"6. checkpoint saves >= {th.checkpoint_share:.0%} of training time -> fix another bottleneck first",
              f"7. baseline GPU busy < {th.low_util:.0f}% -> fix another bottleneck first",
              "8. more GPUs were slower -> stop scaling for now",
              "9. otherwise -> simplify to workload sharding", ""]
    return "\n".join(lines)


@dataclass
class BenchResult:
    out_dir: Path
    decision: Decision
    measures: list[Measure]
    decision_md: Path
    report: Path | None


def run_bench(recipe_path: str, machine_path: str | None, gpu_values: list[str], *, max_steps: int,
              out_dir: Path | None = None, executor: str | None = None, th: Thresholds | None = None,
              bottleneck: str | None = None, repeat: int = 1, echo: bool = False, dry_run: bool = False,
              say: Any = None) -> BenchResult | list[Variant]:
    from ftkit.files import write_atomic, write_json
    from ftkit.run.planning import prepare, runs_root
    from ftkit.run.rundir import utc_stamp

    th = th or Thresholds()
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if max_steps < 1:
        raise UserError("--max-steps must be at least 1")
    gpu_sets = parse_gpu_sets(gpu_values)
    prepared = prepare(recipe_path, machine_path, executor=executor)
    res = prepared.res
    out = out_dir or (runs_root(res.machine) / f"bench-{utc_stamp()}-{res.recipe.name}")
    variants = plan_variants(prepared, gpu_sets, max_steps=max_steps, runs_root=out / "runs", executor=executor)
    if dry_run:
        return variants
    out.mkdir(parents=True, exist_ok=True)
    argv = ["ftkit", "bench", recipe_path, *[f"--gpus={g}" for g in gpu_values], f"--max-steps={max_steps}"]
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
    return BenchResult(out, decision, measures, out / "decision.md", report)


def describe_variants(variants: list[Variant]) -> str:
    lines = []
    for v in variants:
        lines.append(f"GPUs {v.label}: {v.distribution}, batch_size {v.batch_size} x grad_accum {v.grad_accum} x "
                     f"{len(v.gpus)} GPU(s) = global batch {v.global_batch}; max_steps {v.max_steps}; checkpoint "
                     f"every {v.every_steps} steps; run directory {v.plan.run_dir}")
        for s in v.plan.steps:
            lines.append(f"  {s.id} ({s.kind}): {s.description}")
    return "\n".join(lines)
