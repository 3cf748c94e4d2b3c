"""The local executor: a step's command as a subprocess of ftkit, in this Python environment.

Every child gets its own process group (to stop all of it) and dies with ftkit: the kernel
sends it SIGTERM when ftkit dies, even by SIGKILL (a parent-death signal), so no trainer or
accelerate worker outlives the run. Servers the recipe keeps running are the exception:
they are meant to outlive ftkit, and the journal records their pid for `ftkit down`.
"""

from __future__ import annotations

import sys
from typing import Any

from ftkit.gateways import subprocess as sp
from ftkit.plan.container import step_command
from ftkit.plan.spec import Plan, StepSpec
from ftkit.procs import process_start
from ftkit.run.executors.base import Outcome, StepIO
from ftkit.run.rundir import OWNER_LOCK, RunDir

SERVER_STOP_GRACE_S = 30.0  # a server stopped without a lease: SIGTERM, then SIGKILL after this


def stop_grace(step: StepSpec, default: float = sp.STOP_GRACE_S) -> float:
    """How long a stopped step gets between SIGTERM and SIGKILL: under a lease, the lease's
    grace for the engine (a train step saving its checkpoint) plus time for the lease to let
    go - what docker stop gives the same step in a container; else `default`."""
    return float(step.lease.grace_s + 10) if step.lease is not None else default


class LocalHandle:
    def __init__(self, bg: sp.Background, grace_s: float = SERVER_STOP_GRACE_S) -> None:
        self.bg = bg
        self.grace_s = grace_s
        self.ident: dict[str, Any] = {"pid": bg.proc.pid, "pid_start": process_start(bg.proc.pid)}

    def alive(self) -> bool:
        return self.bg.alive()

    def tail(self, lines: int = 40) -> str:
        return self.bg.tail(lines)

    def stop(self, grace_s: float | None = None) -> int | None:
        return self.bg.stop(grace_s if grace_s is not None else self.grace_s)


class LocalExecutor:
    name = "local"

    def __init__(self, plan: Plan, run: RunDir) -> None:
        self.plan = plan
        self.run_dir = run

    def ensure_image(self, step: StepSpec, io: StepIO) -> None:
        """Local steps run in this Python environment: no image to check."""

    def _line(self, io: StepIO) -> Any:
        def on_line(line: str) -> None:
            if io.echo:
                sys.stderr.write(line + "\n")
            io.on_line(line)

        return on_line

    def _tethered(self, step: StepSpec, grace_s: float) -> list[str]:
        """The command, tethered to this ftkit's owner lock: it dies with ftkit, whole tree, with
        the grace ftkit's own stop would give it."""
        lock = str(self.run_dir.path / OWNER_LOCK)
        return [self.plan.python, "-m", "ftkit.run.tether", "--grace", f"{grace_s:g}", lock, "--",
                *step_command(step, self.plan)]

    def run(self, step: StepSpec, io: StepIO) -> Outcome:
        def started(proc: Any) -> None:
            io.on_started({"pid": proc.pid, "pid_start": process_start(proc.pid)})

        grace = stop_grace(step)
        sp.run(self._tethered(step, grace), env=step.env, log_file=io.log, on_line=self._line(io),
               die_with_parent=True, on_start=started, stop_grace_s=grace)
        return Outcome("succeeded")

    def start(self, step: StepSpec, io: StepIO) -> LocalHandle:
        grace = stop_grace(step, SERVER_STOP_GRACE_S)
        argv = step_command(step, self.plan) if step.keep_running else self._tethered(step, grace)
        bg = sp.start(argv, log_file=io.log, env=step.env, die_with_parent=not step.keep_running)
        handle = LocalHandle(bg, grace)
        io.on_started(handle.ident)
        return handle
