"""`ftkit up --resume RUN`: everything a resume trusts, checked before anything runs or is written.

The run directory is only its owner's and holds no links, plan.json is the one the run
started with (its digest in the journal), and plan.json and state.json load back into a Plan
and a RunState of the right types (run/record.py: RunRecord.load). A run still driven by a
live ftkit, or one that succeeded, is refused; what a dead ftkit left running is stopped.
"""

from __future__ import annotations

from pathlib import Path

from ftkit.errors import UserError
from ftkit.plan.spec import Plan
from ftkit.run.record import RunRecord
from ftkit.run.rundir import RunDir


def prepare_resume(run_dir: str, *, dry_run: bool) -> tuple[RunDir, Plan]:
    """The run directory and the plan to execute again; UserError (exit 2, one line naming
    the file) when it may not be resumed. A dry run checks, and touches nothing."""
    from ftkit.run.stale import is_stale, stop_leftovers

    try:
        path = Path(run_dir).resolve()
    except (OSError, RuntimeError) as e:  # a link loop, a name too long
        raise UserError(f"{run_dir}: not a run directory ({e})") from None
    record = RunRecord.load(path)
    plan, state = record.plan, record.state
    if state.status == "running" and not is_stale(path):
        raise UserError(f"{path.name} is still running (ftkit pid {state.pid})",
                        hint="stop it first (Ctrl-C there, or kill -TERM that pid)")
    if state.status == "succeeded":
        raise UserError(f"{path.name} already succeeded: nothing to resume")
    if not dry_run:
        from ftkit.run import preflight

        preflight.machine(plan)
        preflight.engines_of_plan(plan)
        stop_leftovers(path, plan, docker_host=plan.docker_host)
    return RunDir(path), plan
