"""Executors run one StepSpec: `local` in this Python environment (subprocesses), `docker`
in the step's image (containers). Both take the same step and give the same result; the
runner never asks which one it has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftkit.run.executors.base import Executor, Handle, Outcome, StepIO

if TYPE_CHECKING:
    from ftkit.plan.spec import ExecutorKind, Plan
    from ftkit.run.rundir import RunDir

__all__ = ["Executor", "Handle", "Outcome", "StepIO", "executor_for"]


def executor_for(kind: ExecutorKind, plan: Plan, run: RunDir) -> Executor:
    """The executor for `kind` (local | docker)."""
    if kind == "docker":
        from ftkit.run.executors.docker import DockerExecutor

        return DockerExecutor(plan, run)
    from ftkit.run.executors.local import LocalExecutor

    return LocalExecutor(plan, run)
