"""The executor interface: `run(step) -> Outcome` for one-shot steps, `start(step) -> Handle`
for servers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ftkit.plan.spec import StepSpec


@dataclass
class Outcome:
    status: str  # succeeded | failed | skipped
    detail: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass
class StepIO:
    """Where a step's output goes: everything to its log file, each line to `on_line`
    (the display picks out what people should see), `on_started` learns what runs (pid or
    container) so the journal can name it."""

    log: Path
    on_line: Callable[[str], None] = lambda line: None
    on_started: Callable[[dict[str, Any]], None] = lambda ident: None
    echo: bool = False


class Handle(Protocol):
    """A server started by an executor."""

    ident: dict[str, Any]  # {"pid", "pid_start"} or {"container"}

    def alive(self) -> bool: ...
    def tail(self, lines: int = 40) -> str: ...
    def stop(self, grace_s: float = 30.0) -> int | None: ...


class Executor(Protocol):
    name: str

    def ensure_image(self, step: StepSpec, io: StepIO) -> None:
        """Make sure the step's image is here (built when missing and the machine allows it)
        and fits this machine's driver, before any step changes the machine. Executors
        without images do nothing."""
        ...

    def run(self, step: StepSpec, io: StepIO) -> Outcome:
        """Run a one-shot step to completion; raise CommandFailed (with the last lines)
        when it fails. Interrupted (a signal) stops what runs before propagating."""
        ...

    def start(self, step: StepSpec, io: StepIO) -> Handle:
        """Start a server and return at once."""
        ...
