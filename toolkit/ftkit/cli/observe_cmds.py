"""doctor, report, bench: measure before deciding (the scaling guide's discipline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ftkit.cli.params import CheckedPath, FiniteFloat

MARK = {"ok": "ok   ", "info": "info ", "warn": "WARN ", "error": "ERROR"}


def _machine(machine_path: str | None):  # type: ignore[no-untyped-def]
    if machine_path:
        from ftkit.recipe.validate import load_machine

        return load_machine(machine_path).machine, True
    from ftkit.gpu.inventory import detect_machine

    return detect_machine(), False


@click.command()
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile to check against (default: this host, detected)")
@click.option("--recipe", "recipes", multiple=True, type=click.Path(path_type=str),
              help="estimate the disk these recipes need (model download, checkpoints, merges); repeatable")
@click.option("--runs-dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None,
              help="where run directories are (default: the profile's paths.runs, else ./runs)")
@click.option("--offline", is_flag=True, help="do not ask a web server for the time (clock-skew check)")
@click.option("--json", "as_json", is_flag=True, help="print a machine snapshot (facts + findings) for --compare")
@click.option("--compare", nargs=2, type=CheckedPath(dir_okay=False, exists=True, path_type=Path), default=None,
              metavar="A.json B.json", help="show drift between two hosts' `doctor --json` snapshots")
@click.option("--cluster", "cluster", is_flag=True,
              help="run the doctor on every node of the profile's cluster (in the training image, through each "
                   "node's engine) and compare each node with the first")
@click.option("--image", default=None, help="--cluster: the image to check in (default: the profile's train image)")
def doctor(machine_path: str | None, recipes: tuple[str, ...], runs_dir: Path | None, offline: bool, as_json: bool,
           compare: tuple[Path, Path] | None, cluster: bool, image: str | None) -> None:
    """Check this machine before running: Docker and the NVIDIA runtime, driver against the
    images' CUDA, each GPU's PCIe link and power limits, the PSU budget, free disk, clock
    skew, the GPU lease directory and runs that died. Exit 1 when anything is an error.

    With --compare, the environment-parity check before a multi-host run: Python, torch,
    CUDA, driver, ftkit, images and lock hashes of two hosts (exit 1 on error-level drift)."""
    from ftkit.observe import doctor as dr

    if cluster:
        _doctor_cluster(machine_path, image, as_json)
        return
    if compare is not None:
        a, b = (dr.load_snapshot(p) for p in compare)
        drift = dr.compare(a, b)
        if as_json:
            click.echo(json.dumps([d.__dict__ for d in drift], indent=2, default=str))
        else:  # every value came from a file someone handed us: shown escaped, cut short
            from ftkit.text import printable

            def shown(v: object, limit: int = 80) -> str:
                text = printable(str(v))
                return text if len(text) <= limit else text[: limit - 3] + "..."

            ha, hb = shown(a.get("host")), shown(b.get("host"))
            na, nb = printable(compare[0].name), printable(compare[1].name)
            if not drift:
                click.echo(f"no drift between {ha} ({na}) and {hb} ({nb})")
            else:
                click.echo(f"drift between A = {ha} ({na}) and B = {hb} ({nb}):")
                fields = [shown(d.field, 60) for d in drift]
                w = max(len(f) for f in fields)
                for d, f in zip(drift, fields, strict=True):
                    click.echo(f"  {MARK.get(d.severity, d.severity)} {f.ljust(w)}  A: {shown(d.a)}  B: {shown(d.b)}  "
                               f"({d.why})")
        if any(d.severity == "error" for d in drift):
            sys.exit(1)
        return
    machine, given = _machine(machine_path)
    resolved = []
    if recipes:
        from ftkit.recipe.resolve import resolve
        from ftkit.recipe.validate import load_recipe

        resolved = [resolve(load_recipe(r), machine) for r in recipes]
    src = dr.Sources(docker_host=machine.docker.host, offline=offline)
    result = dr.diagnose(machine, src, runs_root=runs_dir, recipes=resolved, machine_given=given)
    if as_json:
        click.echo(json.dumps(dr.snapshot(result), indent=2, default=str))
    else:
        click.echo(f"ftkit doctor: machine {machine.name} (executor {machine.executor}) on {result.facts.get('host')}")
        w = max((len(f.check) for f in result.findings), default=5)
        for f in result.findings:
            click.echo(f"  {MARK[f.severity]} {f.check.ljust(w)}  {f.message}")
            if f.remediation and f.severity != "ok":
                click.echo(f"  {'':5} {''.ljust(w)}  fix: {f.remediation}")
        c = result.counts()
        click.echo(f"{c['error']} error(s), {c['warn']} warning(s)")
    if result.worst() == "error":
        sys.exit(1)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=CheckedPath(file_okay=False, exists=True, path_type=Path))
@click.option("--out", "-o", "out_dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None,
              help="where to write the report (default: RUN/report/, or RUN/report-vs-RUN2/ for two runs)")
def report(runs: tuple[Path, ...], out_dir: Path | None) -> None:
    """Report on a run (or compare two): a self-contained HTML page, a Markdown summary and
    PNG plots of loss, throughput, GPU power against its cap, temperature, utilization, checkpoint
    save times and disk growth, with the outcome, environment and evaluation. Two runs get a
    fairness check (data slice, steps, global batch, checkpoint policy). Needs matplotlib:
    the quickstart's `ftkit[train]` brings it, `ftkit[observe]` alone too."""
    from ftkit.observe.report import make_report

    if len(runs) > 2:
        raise click.UsageError("give one run directory, or two to compare")
    result = make_report(list(runs), out_dir)
    click.echo(f"report: {result.html}")
    click.echo(f"summary: {result.markdown}")
    click.echo(f"plots: {', '.join(f.file for f in result.figures) or 'none (no metrics or telemetry)'}")
    if len(runs) == 2 and not result.fair:
        unfair = ", ".join(f.field for f in result.fairness if not f.expected)
        click.echo(f"warning: the runs are not a fair comparison: they differ in {unfair}", err=True)


@click.command()
@click.argument("recipe", type=click.Path(path_type=str))
@click.option("--gpus", "gpu_sets", multiple=True, metavar="LIST",
              help="a GPU set to run on, e.g. --gpus 0 --gpus 0,1 (repeat; the fewest GPUs is the baseline)")
@click.option("--allreduce", is_flag=True,
              help="instead: all-reduce bandwidth between the nodes of the recipe's multi-node train step, with its "
                   "backend, rendezvous and interfaces (kept for `ftkit plan`'s expected scaling)")
@click.option("--sizes", default=None, metavar="BYTES,...",
              help="--allreduce: message sizes in bytes (default 1 MiB, 4 MiB, 16 MiB)")
@click.option("--max-steps", type=int, default=100, show_default=True,
              help="training steps per run (fixed; enough that every run trains --min-seconds)")
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile (default: this host, detected)")
@click.option("--executor", type=click.Choice(["docker", "local"]), default=None,
              help="run steps in the images or in this Python environment (default: the profile's)")
@click.option("--out", "-o", "out_dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None,
              help="bench directory (default: RUNS/bench-<UTC timestamp>-<recipe>/)")
@click.option("--repeat", type=click.IntRange(1, 10), default=1, show_default=True,
              help="runs per GPU set, alternating; the median stands, and their spread says whether they can be trusted")
@click.option("--simulate", type=click.IntRange(1, 16), default=None, metavar="N",
              help="a machine without GPUs: N simulated GPUs, each a training process on this CPU (real timings, "
                   "synthetic GPU figures; e.g. --simulate 2 --gpus 0 --gpus 0,1)")
@click.option("--keep-efficiency", type=FiniteFloat(0.05, 1.0), default=0.70, show_default=True,
              help="scaling efficiency at or above which the multi-GPU plan is kept")
@click.option("--min-seconds", type=FiniteFloat(0, 86400), default=30.0, show_default=True,
              help="no decision from a run that trained less (start-up and warm-up would weigh on it)")
@click.option("--max-spread", type=FiniteFloat(0.0, 10.0), default=0.10, show_default=True,
              help="no decision when one GPU set's repeats differ by more than this share of their median")
@click.option("--bottleneck", help="your bottleneck statement (metric, threshold, why it matters), quoted in decision.md")
@click.option("--dry-run", is_flag=True, help="print each GPU set's variant and plan; run nothing")
@click.option("--verbose", "-v", is_flag=True, help="copy every step's output to the console")
def bench(recipe: str, gpu_sets: tuple[str, ...], allreduce: bool, sizes: str | None, max_steps: int,
          machine_path: str | None, executor: str | None, out_dir: Path | None, repeat: int, simulate: int | None,
          keep_efficiency: float, min_seconds: float, max_spread: float, bottleneck: str | None, dry_run: bool,
          verbose: bool) -> None:
    """The scaling test: the same recipe's training on each GPU set, everything else equal
    (data, steps, global batch, checkpoint policy, caps), as fixed-step runs. Reports
    samples/s, tokens/s, scaling efficiency, peak temperature and power, throttling and
    checkpoint time, and writes decision.md: the bottleneck, the evidence and one decision -
    keep the multi-GPU plan, simplify to workload sharding, fix another bottleneck first, or
    stop scaling for now - with the rule that chose it.

    No decision ("none - measure again") when the runs cannot tell: a run shorter than
    --min-seconds, repeats that spread more than --max-spread, or faster than linear scaling
    (a bad measurement); it says what to change (more steps, more repeats).

    On a machine without GPUs: --simulate 2 (each simulated GPU is a training process on
    this CPU), e.g. `ftkit bench recipes/quickstart.yaml --simulate 2 --gpus 0 --gpus 0,1
    --max-steps 1000 --repeat 3` (a decision needs every run to train 30 s or more: a few
    minutes on two cores; a shorter bench says it cannot tell, and how many steps would do)."""
    if allreduce:
        _allreduce(recipe, machine_path, out_dir, sizes, verbose)
        return
    if not gpu_sets:
        raise click.UsageError("give the GPU sets to compare (--gpus 0 --gpus 0,1), or --allreduce")
    from ftkit.observe import bench as bench_runs
    from ftkit.observe import scaling

    th = scaling.Thresholds(keep_efficiency=keep_efficiency, min_seconds=min_seconds, max_spread=max_spread)
    result = bench_runs.run_bench(recipe, machine_path, list(gpu_sets), max_steps=max_steps, out_dir=out_dir,
                               executor=executor, th=th, bottleneck=bottleneck, repeat=repeat, echo=verbose,
                               dry_run=dry_run, simulate=simulate, say=lambda m: click.echo(m, err=True))
    if result.decision is None:  # --dry-run: the variants, nothing ran
        click.echo(bench_runs.describe_variants(result.variants))
        return
    for m in result.measures:
        took = m.shortest_s()
        runs = f", {m.runs} runs (spread {m.spread:.0%})" if m.runs > 1 and m.spread is not None else ""
        click.echo(f"GPUs {m.label}: {m.status}, {m.samples_per_s or '-'} samples/s, {m.tokens_per_s or '-'} tokens/s, "
                   f"speedup {m.speedup or '-'}, efficiency {m.efficiency or '-'}, "
                   f"trained {'-' if took is None else f'{took:.1f}'} s{runs}")
    d = result.decision
    click.echo(f"decision: {d.choice} (rule {d.rule}): {d.reason}")
    click.echo(f"next: {d.next_action}")
    for note in d.notes:
        click.echo(f"note: {note}")
    click.echo(f"written: {result.decision_md}" + (f", {result.report}" if result.report else ""))
    if any(m.status != "succeeded" for m in result.measures):
        sys.exit(1)


def _doctor_cluster(machine_path: str | None, image: str | None, as_json: bool) -> None:
    from ftkit.errors import UserError
    from ftkit.observe import nodes

    if not machine_path:
        raise UserError("--cluster needs the machine profile with the cluster (--machine)")
    from ftkit.recipe.validate import load_machine

    machine = load_machine(machine_path).machine
    if image is None:
        from ftkit.images.tags import expected_refs

        lock = Path(machine.docker.images_lock).expanduser() if machine.docker.images_lock else None
        image = expected_refs(machine, lock)["train"]
    report = nodes.check_cluster(machine, image, say=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        first = report.nodes[0].name if report.nodes else "?"
        for n in report.nodes:
            click.echo(f"node {n.name} ({n.host or 'this machine'}):")
            for f in n.checks:
                click.echo(f"  {MARK[f.severity]} {f.check:<10} {f.message}")
                if f.remediation and f.severity != "ok":
                    click.echo(f"  {'':5} {'':<10} fix: {f.remediation}")
            if n.name != first and n.snapshot is not None:
                if not n.drift:
                    click.echo(f"  ok    drift      none against {first}")
                for d in n.drift:
                    click.echo(f"  {MARK.get(d.severity, d.severity)} drift      {d.field}: {first} {d.a}, "
                               f"{n.name} {d.b} ({d.why})")
        click.echo(f"{report.errors()} error(s) across {len(report.nodes)} node(s) (image {report.image})")
    if report.errors():
        sys.exit(1)


def _allreduce(recipe: str, machine_path: str | None, out_dir: Path | None, sizes: str | None, verbose: bool) -> None:
    from ftkit.errors import UserError
    from ftkit.observe import allreduce as ar

    try:
        size_list = [int(x) for x in sizes.split(",") if x.strip()] if sizes else None
    except ValueError:
        raise UserError(f"--sizes {sizes!r}: expected byte counts separated by commas, e.g. 1048576,16777216") from None
    if size_list is not None and (not size_list or any(not 4 <= n <= 1 << 34 for n in size_list)):
        raise UserError(f"--sizes {sizes!r}: each size is 4 bytes to 16 GiB")
    res = ar.run_bench(recipe, machine_path, out_dir=out_dir, sizes=size_list, echo=verbose,
                       say=lambda m: click.echo(m, err=True))
    r = res.result
    click.echo(f"all-reduce between {', '.join(r.get('nodes', []))} ({r.get('backend')}, {r.get('world_size')} processes, "
               f"rendezvous {r.get('rendezvous')}):")
    for row in r.get("results", []):
        click.echo(f"  {row['bytes']:>12} bytes  {row['time_s'] * 1e3:9.2f} ms  algbw {row['algbw_gbps']:8.3f} GB/s  "
                   f"busbw {row['busbw_gbps']:8.3f} GB/s")
    click.echo(f"written: {res.bench_dir / ar.RESULT}; kept for `ftkit plan`: {res.latest}")


COMMANDS = [doctor, report, bench]
