"""`ftkit up` and the commands around a run: status, logs, down, and power limits."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ftkit.cli.params import CheckedPath
from ftkit.errors import FtkitError, UserError

if TYPE_CHECKING:
    from ftkit.plan.spec import Plan


def _runs_root(runs_dir: Path | None, machine_path: str | None) -> Path:
    if runs_dir is not None:
        return runs_dir
    if machine_path:
        from ftkit.prepare import runs_root
        from ftkit.recipe.validate import load_machine

        return runs_root(load_machine(machine_path).machine)
    return Path("runs")


def _find_run(run: str | None, root: Path) -> Path:
    """A run directory: a path, a name under the runs root, or (None or `latest`) the newest run."""
    from ftkit.run.stale import runs_in

    if run == "latest" and not (Path(run) / "state.json").is_file():
        run = None
    if run:
        for cand in (Path(run), root / run, Path(run) / "run"):  # the last: a stack `ftkit compose` wrote
            journal = cand / "state.json"
            if journal.exists() or journal.is_symlink():  # a FIFO too: the reader says what is wrong
                return cand.resolve()
        if any((c / "plan.json").is_file() for c in (Path(run), Path(run) / "run")):
            raise UserError(f"{run}: a stack's run directory that no step has started in yet (no state.json)",
                            hint="its containers journal the run: docker compose --profile train up")
        raise UserError(f"{run}: not a run directory (no state.json)", hint=f"runs live under {root}/")
    runs = runs_in(root)
    if not runs:
        raise UserError(f"no runs under {root}/", hint="pass the run directory, or --runs-dir")
    return runs[-1].resolve()


@click.command()
@click.argument("recipe", required=False, type=click.Path(path_type=str))
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile (default: this host, detected; steps run locally)")
@click.option("--runs-dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None,
              help="where run directories go (default: the profile's paths.runs, else ./runs)")
@click.option("--executor", type=click.Choice(["docker", "local"]), default=None,
              help="run steps in the images (docker) or in this Python environment (local); default: the profile's")
@click.option("--resume", "resume_run", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=str), default=None,
              help="continue this run directory: finished steps are not redone, training resumes from its "
                   "newest complete checkpoint")
@click.option("--dry-run", is_flag=True, help="print exactly what would run, and run nothing")
@click.option("--quiet", "-q", is_flag=True, help="no live display: a few plain lines per step")
@click.option("--verbose", "-v", is_flag=True, help="also copy every step's output to the console (it is in logs/ either way)")
@click.option("--json", "as_json", is_flag=True,
              help="when the run ends, print its summary (run directory, status, what was left running, the eval "
                   "result) as JSON on stdout, for scripts; the console lines go to stderr either way")
def up(recipe: str | None, machine_path: str | None, runs_dir: Path | None, executor: str | None,
       resume_run: str | None, dry_run: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Run a recipe: power caps, training, merge, serving, test prompts, evaluation, power
    restored. Every run leaves runs/<UTC timestamp>-<name>/ with the resolved recipe, plan,
    environment, journal, logs, metrics and outputs."""
    from ftkit.cli.plan_text import render_plan
    from ftkit.run import runner
    from ftkit.run.display import make_display

    if resume_run:
        from ftkit.run.resume import prepare_resume

        run, plan = prepare_resume(resume_run, dry_run=dry_run)
        if dry_run:
            click.echo(render_plan(plan, configs=True))  # exactly what would run and be written
            return
    else:
        if recipe is None:
            raise click.UsageError("give a RECIPE (or --resume RUN)")
        from ftkit.prepare import prepare
        from ftkit.run.rundir import Reservation

        reservation = Reservation(runs_dir, dry_run=dry_run)  # removed again if the run is refused
        try:
            prepared = prepare(recipe, machine_path, run_dir=reservation, executor=executor)
        except BaseException:
            reservation.release()
            raise
        plan = prepared.plan
        path = Path(plan.run_dir)
        root = path.parent
        if dry_run:
            click.echo(render_plan(plan, configs=True))  # exactly what would run and be written
            problems = prepared.problems()
            if problems:
                click.echo("\n`ftkit up` would refuse this plan:")
                for issue in problems:
                    click.echo(f"  {issue.render()}")
            return
        from ftkit.run import preflight

        try:
            prepared.check()  # refuse before anything is written, capped or stopped
            preflight.inputs(prepared)
            preflight.engines(prepared)
            preflight.machine(plan)
        except BaseException:
            reservation.release()
            raise
        _clean_stale(root)
        run = runner.create_run(path, plan, prepared.res.to_yaml_data(), ["ftkit", *sys.argv[1:]])
    display = make_display(plan, live=False if quiet or verbose else None)
    t0 = time.monotonic()
    result = runner.execute_plan(run, plan, display=display, echo=verbose, resume=bool(resume_run))
    from ftkit.run.display import closing_lines

    try:
        for line in closing_lines(status=result.status, run_dir=result.run_dir, failed_step=result.failed_step,
                                  message=result.message, left_running=result.left_running,
                                  seconds=time.monotonic() - t0):
            click.echo(line, err=True)
    except OSError:
        pass  # a console gone (SIGHUP): the journal says it all
    if as_json:
        summary = {"run_dir": str(result.run_dir), "status": result.status, "failed_step": result.failed_step,
                   "left_running": result.left_running}
        from ftkit.files import read_json

        for s in reversed(plan.steps):  # the last evaluation's result
            if s.kind == "eval" and "summary" in s.outputs:
                try:
                    summary["eval"] = read_json(run.file(s.outputs["summary"]))  # bounded, never a FIFO or a link
                    break
                except (OSError, ValueError, FtkitError):
                    continue
        click.echo(json.dumps(summary, indent=2))
    if result.exit_code:
        sys.exit(result.exit_code)


def _clean_stale(root: Path) -> None:
    from ftkit.run.stale import clean, is_stale, runs_in

    for run in runs_in(root):
        if is_stale(run):
            click.echo(f"ftkit: run {run.name} went stale (its ftkit died); cleaning up after it", err=True)
            clean(run, say=lambda m: click.echo(f"  {m}", err=True))


@click.command()
@click.argument("run", required=False)
@click.option("--runs-dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None)
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str), help="for its paths.runs")
@click.option("--json", "as_json", is_flag=True)
def status(run: str | None, runs_dir: Path | None, machine_path: str | None, as_json: bool) -> None:
    """Show a run's steps with status and times, and a running step's progress. RUN: a run
    directory, its name, or `latest` (the default: the newest run)."""
    from ftkit.run.record import RunState
    from ftkit.run.stale import is_stale, state_of

    path = _find_run(run, _runs_root(runs_dir, machine_path))
    raw = state_of(path)
    if not isinstance(raw.get("steps"), dict):
        raise UserError(f"{path / 'state.json'}: unreadable or not a journal")
    stale = is_stale(path)
    if as_json:
        click.echo(json.dumps({"run_dir": str(path), "stale": stale, **raw}, indent=2))
        return
    from ftkit.text import printable

    problems: list[str] = []
    st = RunState.from_dict(raw, problems)  # what does not have its shape is left out, and said below

    def shown(v: object, limit: int = 90) -> str:
        text = printable(str(v))
        return text if len(text) <= limit else text[: limit - 3] + "..."

    head = shown(st.status or "?") + (" (STALE: its ftkit died; `ftkit down` cleans up)" if stale else "")
    click.echo(f"{printable(path.name)}: {head}")
    click.echo(f"  started {shown(st.started)}, finished {shown(st.finished or '-')}")
    for sid in st.step_ids():
        e = st.entry(sid)
        secs = f"{e.seconds:.1f} s" if e is not None and e.seconds is not None else ""
        why = (e.error or e.reason or e.message or "") if e is not None else ""
        first = shown(why.splitlines()[0]) if why.strip() else ""
        if e is not None and e.status == "running" and not stale:
            first = first or _running_note(path, sid, e.started)
        click.echo(f"  {shown(sid, 22):<22} {shown(e.status if e is not None else '?', 12):<12} {secs:>10}  {first}")
    if st.left_running:
        click.echo("  left running: " + "; ".join(shown(x, 200) for x in st.left_running))
    for problem in problems:
        click.echo(f"  note: {shown(problem, 200)}")
    from ftkit.run.record import load_plan

    _lease_lines(load_plan(path)[0])
    click.echo(f"  logs: {printable(str(path / 'logs'))}/")


def _running_note(run: Path, sid: str, started: str | None) -> str:
    """For a step running now: how long it has run, and for training its progress (step,
    loss, tokens/s, ETA) from the newest line of its metrics.jsonl."""
    from datetime import datetime, timezone

    from ftkit.run.display import _fmt_s, latest_progress, progress_text
    from ftkit.run.record import load_plan

    parts = []
    if started is not None:
        try:
            since = (datetime.now(timezone.utc) - datetime.fromisoformat(started)).total_seconds()
            if 0 <= since < 1e8:
                parts.append(f"running for {_fmt_s(since)}")
        except (ValueError, TypeError):
            pass
    plan = load_plan(run)[0]
    spec = next((s for s in plan.steps if s.id == sid), None) if plan is not None else None
    metrics = spec.outputs.get("metrics") if spec is not None else None
    if metrics is not None:  # a train step (Plan.from_dict checked the path stays inside the run)
        p = latest_progress(run / metrics, spec.max_steps)
        parts.append(progress_text(p) if p is not None else "no training step logged yet")
    return "; ".join(parts)


def _lease_lines(plan: Plan | None) -> None:
    """Who holds or waits for the GPUs now (the lease directory the run's plan names)."""
    lease_dir = plan.lease_dir if plan is not None else None
    if not lease_dir or not Path(lease_dir).is_dir():
        return
    from ftkit.lease import holders
    from ftkit.text import printable

    for p in holders(lease_dir):  # records anyone who may write the lease directory wrote: escaped
        who = p.service or p.container or f"pid {p.pid}"
        click.echo(f"  lease: GPU {p.gpu_label}: {printable(str(p.role))[:20]} {printable(str(who))[:60]} "
                   f"{printable(str(p.state))[:20]} since {printable(str(p.since))[:40]}")


@click.command()
@click.argument("run", required=False)
@click.argument("step", required=False)
@click.option("--runs-dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None)
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str), help="for its paths.runs")
@click.option("--follow", "-f", is_flag=True, help="keep printing as the log grows (until the run ends)")
def logs(run: str | None, step: str | None, runs_dir: Path | None, machine_path: str | None, follow: bool) -> None:
    """Print a step's log. RUN: a run directory, its name, or `latest` (default: the newest
    run); STEP: default the step running now, else the last one that ran."""
    from ftkit.run.record import RunState, view_state
    from ftkit.run.stale import is_stale, state_of

    path = _find_run(run, _runs_root(runs_dir, machine_path))
    raw = state_of(path)
    if not isinstance(raw.get("steps"), dict):
        raise UserError(f"{path / 'state.json'}: unreadable or not a journal")
    st = RunState.from_dict(raw, [])
    if step is None:
        ran = [s for s in st.order if st.status_of(s) not in ("pending", "skipped")]
        running = [s for s in ran if st.status_of(s) == "running"]
        if not ran:
            raise UserError(f"{path.name}: no step has run yet")
        step = (running or ran)[-1]
    log = path / "logs" / f"{step}.log"
    if not log.is_file():
        have = sorted(p.stem for p in (path / "logs").glob("*.log"))
        raise UserError(f"{path.name}: no log for step {step!r}", hint=f"logs: {', '.join(have) or 'none yet'}")
    with open(log, encoding="utf-8", errors="replace") as fh:
        sys.stdout.write(fh.read())
        sys.stdout.flush()
        while follow:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
                continue
            if (now := view_state(path)) is None or now.status != "running" or is_stale(path):
                break
            time.sleep(0.5)


@click.command()
@click.argument("run", required=False)
@click.option("--runs-dir", type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path), default=None)
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str), help="for its paths.runs")
def down(run: str | None, runs_dir: Path | None, machine_path: str | None) -> None:
    """Stop what a run left running (servers, containers). A run whose ftkit died is also
    cleaned up: power limits back to the recorded originals, the serving service started
    again, the journal closed. Default: every stale run, else the newest run."""
    from ftkit.run.record import view_state
    from ftkit.run.stale import clean, compose_driven, is_stale, runs_in

    root = _runs_root(runs_dir, machine_path)
    if run is None:
        targets = [r for r in runs_in(root) if is_stale(r)] or [_find_run(None, root)]
    else:
        targets = [_find_run(run, root)]
    for path in targets:
        st = view_state(path)
        if compose_driven(st):
            raise UserError(f"{path}: docker compose drives this run, not ftkit",
                            hint="stop it in its stack directory: docker compose --profile train --profile serve down")
        if st is not None and st.status == "running" and not is_stale(path):
            raise UserError(f"{path.name} is running (ftkit pid {st.pid}): stop it there (Ctrl-C) or with "
                            f"kill -TERM {st.pid}")
        click.echo(f"{path.name}:")
        clean(path, say=lambda m: click.echo(f"  {m}"))


COMMANDS = [up, status, logs, down]
