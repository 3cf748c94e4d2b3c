"""Executors run one StepSpec: `local` in this Python environment (subprocesses), `docker`
in the step's image (containers). Both take the same step and give the same result; the
runner never asks which one it has."""

from ftkit.run.executors.base import Executor, Handle, Outcome, StepIO

__all__ = ["Executor", "Handle", "Outcome", "StepIO", "executor_for"]


def executor_for(kind: str, plan, run):  # type: ignore[no-untyped-def]
    """The executor for `kind` (local | docker)."""
    if kind == "docker":
        from ftkit.run.executors.docker import DockerExecutor

        return DockerExecutor(plan, run)
    from ftkit.run.executors.local import LocalExecutor

    return LocalExecutor(plan, run)
