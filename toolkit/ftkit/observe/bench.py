"""`ftkit bench`: the scaling guide's test, run. This module makes the variants, runs them and
writes decision.md; which decision the measured runs lead to, and why, is `observe.scaling`.

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

`--simulate N` (run_bench's `simulate`): N simulated GPUs for a machine without any, each a
training process on this CPU (FTKIT_SIMULATED_GPUS, with its state and the power record kept
in the bench directory, not the machine's). The timings are real; the GPU figures are not.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import ConfigError, FtkitError, UserError
from ftkit.observe.rundata import load_run
from ftkit.observe.scaling import (
    Decision,
    Measure,
    Thresholds,
    add_scaling,
    decide,
    decision_markdown,
    measure,
    median_measure,
)
from ftkit.strict import gpu_index

SIMULATED_NAME = "simulated"  # a --simulate GPU's model name, where no profile names one


class BenchStopped(FtkitError):
    """A run was stopped (Ctrl-C, SIGTERM): the bench stops too, without a decision."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    from ftkit.prepare import Prepared, plan_for
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
    from ftkit.prepare import plan_for
    from ftkit.run import runner
    from ftkit.run.display import make_display
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
    from ftkit.prepare import prepare, runs_root
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
    measures = [median_measure(per[v.label]) for v in variants]
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
