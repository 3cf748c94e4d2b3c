"""`ftkit up`: walk the plan, journaling each step before and after it runs.

Steps run in order; after a failure the rest are marked skipped, but `always` steps (power
restore, handing GPUs back to the serving service) still run. SIGTERM is treated like
Ctrl-C so those restores happen when a run is stopped too. Nothing here re-reads the recipe.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import ConfigError, FtkitError, PlanError
from ftkit.plan.machine_checks import findings
from ftkit.plan.spec import Plan
from ftkit.recipe.resolve import Resolved
from ftkit.run import envinfo
from ftkit.run.executors import Context, describe_failure, execute, stop_servers
from ftkit.run.planning import plan_for, runs_root
from ftkit.run.rundir import Journal, RunDir, new_run_dir


class Stopped(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so restores run."""


@dataclass
class RunResult:
    run_dir: Path
    status: str
    failed_step: str | None
    message: str
    left_running: list[str]


def preflight(res: Resolved, plan: Plan, loaded_doc: Any) -> None:
    """Refuse to start - before any cap is set or service stopped - when the recipe does not
    fit this machine or needs an executor this ftkit lacks (exit 2, nothing written)."""
    problems = [loaded_doc.issue(p, m, key=k) for p, m, k in findings(res, plan)]
    if problems:
        raise ConfigError(problems)
    docker_steps = [s.id for s in plan.steps if s.executor == "docker"]
    if docker_steps:
        raise PlanError(
            f"machine {res.machine.name!r} runs steps in containers (executor: docker), which this ftkit "
            f"cannot run yet (steps: {', '.join(docker_steps)})",
            hint="`ftkit plan` shows the containers it will run; to run now, use a machine profile with "
                 "`executor: local` (steps run in this Python environment: pip install ftkit[train])",
        )


def start_run(res: Resolved, *, argv: list[str], runs_dir: Path | None = None) -> tuple[RunDir, Plan]:
    root = runs_dir or runs_root(res.machine)
    path = new_run_dir(root, res.recipe.name).resolve()
    plan = plan_for(res, run_dir=str(path))
    run = RunDir(path)
    run.write_inputs(res.to_yaml_data(), plan.to_dict(), argv, envinfo.snapshot())
    return run, plan


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def execute_plan(run: RunDir, plan: Plan, *, echo: bool = False) -> RunResult:
    journal = Journal(run, [s.id for s in plan.steps])
    ctx = Context(run=run, journal=journal, echo=echo)
    failed: str | None = None
    message = ""
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise Stopped()

    if os.name == "posix":
        signal.signal(signal.SIGTERM, on_term)
    total = len(plan.steps)
    try:
        for n, step in enumerate(plan.steps, 1):
            if step.always:
                continue
            if failed:
                journal.step(step.id, "skipped", reason=f"step {failed} failed")
                continue
            _say(f"[{n}/{total}] {step.id}: {step.description}")
            journal.step(step.id, "running", log=str(run.log(step.id).relative_to(run.path)))
            run.write_generated([{"path": f.path, "content": f.content} for f in step.files])
            t0 = time.monotonic()
            try:
                outcome = execute(step, ctx)
            except (FtkitError, OSError) as e:
                failed, message = step.id, describe_failure(e)
                journal.step(step.id, "failed", error=message)
                _say(f"[{n}/{total}] {step.id}: FAILED\n{message}")
                continue
            journal.step(step.id, outcome.status, **outcome.detail, **({"message": outcome.message} if outcome.message else {}))
            took = f"{time.monotonic() - t0:.1f} s"
            if outcome.status == "failed":
                failed, message = step.id, outcome.message
                _say(f"[{n}/{total}] {step.id}: FAILED after {took}: {outcome.message}")
            else:
                note = f" ({outcome.message})" if outcome.message else ""
                _say(f"[{n}/{total}] {step.id}: {outcome.status} in {took}{note}")
    except (KeyboardInterrupt, Stopped) as e:
        failed = failed or "interrupted"
        message = "stopped by " + ("SIGTERM" if isinstance(e, Stopped) else "Ctrl-C")
        _say(f"ftkit: {message}; restoring the machine before exit")
    finally:
        left = stop_servers(ctx, keep=failed is None)
        for n, step in enumerate(plan.steps, 1):
            if not step.always:
                continue
            journal.step(step.id, "running")
            try:
                outcome = execute(step, ctx)
                journal.step(step.id, outcome.status, **outcome.detail)
                _say(f"[{n}/{total}] {step.id}: {outcome.status}" + (f" ({outcome.message})" if outcome.message else ""))
            except (FtkitError, OSError) as e:
                journal.step(step.id, "failed", error=describe_failure(e))
                _say(f"[{n}/{total}] {step.id}: FAILED: {describe_failure(e)}")
                if not failed:
                    failed, message = step.id, describe_failure(e)
        status = "succeeded" if failed is None else "failed"
        journal.finish(status, failed_step=failed, message=message or None, left_running=left)
        if ctx.nvml is not None:
            ctx.nvml.close()
        if os.name == "posix":
            signal.signal(signal.SIGTERM, old_term)
    return RunResult(run.path, status, failed, message, left)
