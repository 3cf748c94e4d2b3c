"""ftkit's exception tree.

Every outside system (YAML files, Docker, NVML, subprocesses, HTTP servers) translates its
failures into one of these at a single place, so the CLI can map them to exit codes and
one-line messages instead of tracebacks. Exit code 2 means "bad input, nothing ran".
"""

from __future__ import annotations

from dataclasses import dataclass


class FtkitError(Exception):
    """Base of everything ftkit raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The text the CLI prints: the message, then the hint on its own line."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UserError(FtkitError):
    """The user's input is wrong (a file, a flag, a combination). Nothing was run."""

    exit_code = 2


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int  # 1-based; 0 when the problem is not tied to a place in the file
    col: int  # 1-based
    path: str  # field path such as `steps[1].lora.r`; "" for the whole document
    message: str

    def render(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else f"{self.file}:0:0"
        return f"{where}: {self.path or '<document>'}: {self.message}"


class ConfigError(UserError):
    """One or more problems in recipe or machine files, all collected before raising."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.file, i.line, i.col, i.path))
        super().__init__("\n".join(i.render() for i in self.issues))


class PlanError(UserError):
    """A valid recipe cannot be planned for this machine (missing GPU, no image, ...)."""


class ImageError(FtkitError):
    """Rendering, locking or building an image failed."""


class LockError(ImageError):
    """A lock file is missing, stale or tampered with."""

    exit_code = 2


class BuildError(ImageError):
    """`docker build` failed; the message names the failing step and its last lines."""


class DockerUnavailable(FtkitError):
    """No Docker engine (or no usable docker CLI) could be reached."""


class DockerError(FtkitError):
    """The Docker engine refused or failed an operation."""


class CommandFailed(FtkitError):
    """A subprocess exited non-zero. Carries the tail of its output for the message."""

    def __init__(self, argv: list[str], returncode: int, tail: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.tail = tail
        shown = " ".join(argv[:6]) + (" ..." if len(argv) > 6 else "")
        msg = f"command failed with exit code {returncode}: {shown}"
        if tail:
            msg += "\n--- last lines ---\n" + tail.rstrip()
        super().__init__(msg)


class GpuError(FtkitError):
    """NVML reported an error or a GPU is not in the expected state."""


class EngineError(FtkitError):
    """A training, merge, serving or evaluation engine failed."""


class DatasetError(UserError):
    """The dataset cannot be used: a bad row (with its number), an empty file, a wrong format."""


class ServerNotReady(EngineError):
    """A model server never answered /health and /v1/models in time."""


class HttpError(FtkitError):
    """An HTTP request to a model server failed."""


class LeaseBusy(FtkitError):
    """`ftkit lease`: the GPUs are held by someone else (--no-wait) or --timeout ran out.
    75 is sysexits' EX_TEMPFAIL: nothing ran, try again later."""

    exit_code = 75


class LeaseRefused(FtkitError):
    """`ftkit lease` holds the GPUs but a backstop refuses to start the command: a process
    outside the lease holds GPU memory, or an enforced power limit is above the cap.
    78 is sysexits' EX_CONFIG: the machine is not in the state the command needs."""

    exit_code = 78
