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


class LocalHandle:
    def __init__(self, bg: sp.Background) -> None:
        self.bg = bg
        self.ident: dict[str, Any] = {"pid": bg.proc.pid, "pid_start": process_start(bg.proc.pid)}

    def alive(self) -> bool:
        return self.bg.alive()

    def tail(self, lines: int = 40) -> str:
        return self.bg.tail(lines)

    def stop(self, grace_s: float = 30.0) -> int | None:
        return self.bg.stop(grace_s)


class LocalExecutor:
    name = "local"

    def __init__(self, plan: Plan, run: RunDir) -> None:
        self.plan = plan
        self.run_dir = run

    def _line(self, io: StepIO) -> Any:
        def on_line(line: str) -> None:
            if io.echo:
                sys.stderr.write(line + "\n")
            io.on_line(line)

        return on_line

    def _tethered(self, step: StepSpec) -> list[str]:
        """The command, tethered to this ftkit's owner lock: it dies with ftkit, whole tree."""
        lock = str(self.run_dir.path / OWNER_LOCK)
        return [self.plan.python, "-m", "ftkit.run.tether", lock, "--", *step_command(step, self.plan)]

    def run(self, step: StepSpec, io: StepIO) -> Outcome:
        def started(proc: Any) -> None:
            io.on_started({"pid": proc.pid, "pid_start": process_start(proc.pid)})

        sp.run(self._tethered(step), env=step.env, log_file=io.log, on_line=self._line(io),
               die_with_parent=True, on_start=started)
        return Outcome("succeeded")

    def start(self, step: StepSpec, io: StepIO) -> LocalHandle:
        argv = step_command(step, self.plan) if step.keep_running else self._tethered(step)
        bg = sp.start(argv, log_file=io.log, env=step.env, die_with_parent=not step.keep_running)
        handle = LocalHandle(bg)
        io.on_started(handle.ident)
        return handle
