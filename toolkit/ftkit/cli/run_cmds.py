"""`ftkit up`: run a recipe end to end and leave a run directory that explains it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.argument("recipe", type=click.Path(path_type=str))
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile (default: this host, detected; steps run locally)")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where run directories go (default: the profile's paths.runs, else ./runs)")
@click.option("--dry-run", is_flag=True, help="print exactly what would run, and run nothing")
@click.option("--quiet", "-q", is_flag=True, help="do not echo step output (it is in logs/ either way)")
def up(recipe: str, machine_path: str | None, runs_dir: Path | None, dry_run: bool, quiet: bool) -> None:
    """Run a recipe: power caps, training, merge, serving, test prompts, evaluation, power
    restored. Every run leaves runs/<UTC timestamp>-<name>/ with the resolved recipe, plan,
    environment, journal, logs, metrics and outputs."""
    from ftkit.cli.render import render_plan
    from ftkit.recipe.resolve import resolve
    from ftkit.recipe.validate import load_machine, load_recipe
    from ftkit.run import runner
    from ftkit.run.planning import plan_for

    loaded = load_recipe(recipe)
    if machine_path:
        machine = load_machine(machine_path).machine
    else:
        from ftkit.gpu.inventory import detect_machine

        machine = detect_machine()
    res = resolve(loaded, machine)
    preview = plan_for(res, run_dir=str((runs_dir or runner.runs_root(machine)).resolve() / f"<UTC timestamp>-{res.recipe.name}"))
    if dry_run:  # the plan is worth seeing even when it would be refused below
        click.echo(render_plan(preview))
    runner.preflight(res, preview, loaded.doc)
    if dry_run:
        return
    run, plan = runner.start_run(res, argv=["ftkit", *sys.argv[1:]], runs_dir=runs_dir)
    click.echo(f"run directory: {run.path}", err=True)
    result = runner.execute_plan(run, plan, echo=not quiet)
    summary = {"run_dir": str(result.run_dir), "status": result.status, "failed_step": result.failed_step,
               "left_running": result.left_running}
    eval_summary = next(run.path.glob("steps/*/summary.json"), None)
    if eval_summary is not None:
        summary["eval"] = json.loads(eval_summary.read_text())
    click.echo(json.dumps(summary, indent=2))
    if result.status != "succeeded":
        click.echo(f"run failed at step {result.failed_step}: {result.message}", err=True)
        sys.exit(1)


COMMANDS = [up]
