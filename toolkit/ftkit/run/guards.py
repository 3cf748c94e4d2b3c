"""Guards: what a run changed on the machine, undone in reverse order whatever happens.

Each step that changes the machine pushes a guard as it starts - a power cap (restore the
originals), stopping the serving service (start it again), a server (stop it, unless the
recipe keeps it running after a successful run). At the end of the run, on success,
failure, Ctrl-C or SIGTERM, the stack unwinds: every guard runs even when one before it
failed, and each failure is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftkit.errors import FtkitError
from ftkit.gateways import subprocess as sp
from ftkit.plan.spec import StepSpec
from ftkit.run.executors.base import Handle, Outcome


def describe_failure(err: BaseException) -> str:
    if isinstance(err, FtkitError):
        return err.render()
    return f"{err.__class__.__name__}: {err}"


class Guard:
    """Something to undo. `journal_id` is the plan's always-step this unwinding is recorded
    under (power-restore-final, handoff-start), None when it belongs to its own step."""

    journal_id: str | None = None
    label: str = "guard"

    def unwind(self, succeeded: bool) -> Outcome:  # pragma: no cover - interface
        raise NotImplementedError


class PowerGuard(Guard):
    """This run lets go of its caps: each GPU goes back to the limit recorded before ftkit
    first changed it - unless another live run still caps it (then that run's cap stays)."""

    journal_id = "power-restore-final"
    label = "power limits"

    def __init__(self, nvml: Callable[[], Any], holder: str) -> None:
        self.nvml = nvml
        self.holder = holder
        self.indices: set[int] = set()

    def restore(self, indices: list[int] | None = None) -> Outcome:
        from ftkit.gpu import power

        which = sorted(self.indices if indices is None else set(indices) & self.indices)
        if not which:
            return Outcome("skipped", message="no limit was changed")
        report = power.release(self.nvml(), holder=self.holder, indices=which)
        self.indices -= set(report.changed) | set(report.kept)
        detail = {"restored_w": report.changed, "kept": report.kept, "failed": report.failed}
        if report.failed:
            return Outcome("failed", detail, "could not restore " + "; ".join(
                f"{who}: {why}" for who, why in sorted(report.failed.items())) + " (retry: ftkit power restore)")
        return Outcome("succeeded", detail, "; ".join(f"GPU {i} {why}" for i, why in sorted(report.kept.items())))

    def unwind(self, succeeded: bool) -> Outcome:
        return self.restore()


class HandoffGuard(Guard):
    """The serving service stopped for training is started again."""

    journal_id = "handoff-start"
    label = "serving service"

    def __init__(self, start: StepSpec | None, log: Any, replaced: Callable[[], bool]) -> None:
        self.start = start
        self.log = log
        self.replaced = replaced

    def unwind(self, succeeded: bool) -> Outcome:
        if self.start is None:
            return Outcome("skipped", message="the plan does not start the service again")
        if succeeded and self.replaced():
            return Outcome("skipped", message=f"{self.start.replaced_by} serves on these GPUs now")
        sp.run(self.start.argv, log_file=self.log)
        return Outcome("succeeded", {"argv": self.start.argv})


@dataclass
class ServerGuard(Guard):
    """A server this run started: stopped at the end, unless the run succeeded and the
    recipe keeps it running."""

    step: StepSpec
    handle: Handle
    on_left: Callable[[StepSpec, Handle], None] = lambda s, h: None
    # the previous server, started again after the one replacing it failed: a server the
    # recipe keeps running is the service, and stays up after the failed run too
    restored: bool = False
    left: bool = field(default=False, init=False)

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"server {self.step.id}"

    def unwind(self, succeeded: bool) -> Outcome:
        alive = self.handle.alive()
        if (succeeded or self.restored) and self.step.keep_running:
            if alive:
                self.left = True
                self.on_left(self.step, self.handle)
                return Outcome("skipped", {"left_running": self.handle.ident}, "left running")
            code = self.handle.stop()  # collect it (and its log stream)
            return Outcome("failed", {"exit_code": code, "exited": True}, "the server the recipe keeps running exited "
                           f"(exit code {code}) after its test prompts; see its log")
        code = self.handle.stop()
        if self.handle.alive():
            return Outcome("failed", {"exit_code": code}, "could not be stopped: still running")
        return Outcome("succeeded", {"stopped": True, "exit_code": code})


class GuardStack:
    def __init__(self) -> None:
        self.guards: list[Guard] = []

    def push(self, guard: Guard) -> Guard:
        self.guards.append(guard)
        return guard

    def find(self, kind: type) -> Any:
        return next((g for g in self.guards if isinstance(g, kind)), None)

    def unwind(self, succeeded: bool, report: Callable[[Guard, Outcome], None],
               starting: Callable[[Guard], None] = lambda g: None) -> None:
        """Undo everything in reverse order. Nothing stops the unwinding: each guard's
        failure becomes an Outcome and the next guard runs."""
        while self.guards:
            guard = self.guards.pop()
            try:
                starting(guard)
            except Exception:  # noqa: BLE001 - journaling the start must not stop the undo
                pass
            try:
                outcome = guard.unwind(succeeded)
            except BaseException as e:  # noqa: BLE001 - a guard must never stop the others
                outcome = Outcome("failed", message=f"{guard.label}: {describe_failure(e)}")
            try:
                report(guard, outcome)
            except Exception:  # noqa: BLE001 - a full disk (journal) or a dead terminal stops nothing
                pass
