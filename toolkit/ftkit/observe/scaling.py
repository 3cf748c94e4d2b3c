"""The scaling guide's decision from measured runs: the runs `ftkit bench` (observe.bench) made
are measured here (samples/s, tokens/s, efficiency, temperature, power, throttling, checkpoint
times) and one of the guide's four decisions is taken by the written rules below.


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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.observe.rundata import RunData, gpu_summary, throughput

if TYPE_CHECKING:
    from ftkit.observe.bench import Variant

KEEP = "keep the multi-GPU plan"
SIMPLIFY = "simplify to workload sharding"
FIX = "fix another bottleneck first"
STOP = "stop scaling for now"
DECISIONS = (KEEP, SIMPLIFY, FIX, STOP)  # the guide's four
NONE = "none - measure again"  # rule 4: the runs cannot tell; not one of the guide's decisions

HOT_C = 87.0
CKPT_SHARE = 0.25
LOW_UTIL = 60.0


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


def median_measure(ms: list[Measure]) -> Measure:
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
