"""The single place ftkit starts processes (like pip-tools' one subprocess module).

Output is streamed line by line to the terminal (optional) and to a log file, and the last
lines are kept so a failure can say what went wrong without a second read of the log.
"""

from __future__ import annotations

import collections
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ftkit.errors import CommandFailed, FtkitError
from ftkit.files import open_append

TAIL_LINES = 40
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL for a child stopped because we were interrupted (the least; a step's own may be longer)
DRAIN_S = 3.0  # after that stop: how long its last lines may take to reach the log
PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved once here in the parent: the child must not dlopen between
    fork and exec (other threads may hold the loader's locks)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM us when the process that started us dies (even by
    SIGKILL), so no trainer or server outlives the ftkit that owns it. SIGTERM rather than
    SIGKILL lets a launcher (accelerate, torchrun, the lease) take its own children down."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != _PARENT[0]:  # the parent died before the line above took effect
            os._exit(143)


_PARENT = [os.getpid()]  # the pid the child must not outlive: the forking process, set just before each fork


def _note_parent() -> None:
    _PARENT[0] = os.getpid()


os.register_at_fork(before=_note_parent)


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    tail: str
    output: str | None = None  # the whole output, only when capture=True


def quote(argv: Sequence[str]) -> str:
    """The argv as a shell-safe line, for logs, plans and --dry-run output."""
    return " ".join(shlex.quote(a) for a in argv)


def _merged_env(env: Mapping[str, str] | None, inherit: bool) -> dict[str, str]:
    base = dict(os.environ) if inherit else {}
    if env:
        base.update(env)
    return base


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    echo: bool = False,
    on_line: Callable[[str], None] | None = None,
    capture: bool = False,
    check: bool = True,
    timeout: float | None = None,
    stdin_data: str | None = None,
    die_with_parent: bool = False,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
    stop_grace_s: float = STOP_GRACE_S,
) -> Completed:
    """Run argv to completion, streaming its combined stdout/stderr.

    `on_line` sees every line (progress displays use it); `echo` copies lines to stderr;
    `log_file` receives everything. With `check`, a non-zero exit raises CommandFailed
    carrying the last lines of output. `die_with_parent` makes the child receive SIGTERM
    when this process dies; `on_start` sees the Popen (to record its pid). Stopped because we
    were interrupted, the child gets `stop_grace_s` between SIGTERM and SIGKILL (a leased
    engine saving its checkpoint: the lease's grace and then some).
    """
    argv = [str(a) for a in argv]
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    captured: list[str] = []
    log: IO[str] | None = None
    try:
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            log = open_append(log_file)  # never through a link planted where the log goes
            log.write(f"$ {quote(argv)}\n")
            log.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_merged_env(env, inherit_env),
                cwd=cwd,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,  # its own process group: we can stop all of it
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        except FileNotFoundError as e:
            raise FtkitError(f"cannot run {argv[0]!r}: not found on PATH") from e
        except PermissionError as e:
            raise FtkitError(f"cannot run {argv[0]!r}: permission denied") from e
        timer = None
        try:  # from here on, whatever happens (a signal while we record the pid), the child is stopped
            if on_start is not None:
                on_start(proc)
            if stdin_data is not None:
                assert proc.stdin is not None  # we asked for a pipe above
                proc.stdin.write(stdin_data)
                proc.stdin.close()
            if timeout is not None:
                timer = threading.Timer(timeout, proc.kill)
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                if capture:
                    captured.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
                if echo:
                    sys.stderr.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            rc = proc.wait()
        except BaseException:
            # Ctrl-C, SIGTERM (the runner turns it into an exception) or a bug: never
            # leave the child and its children running behind us. Its output is read from
            # before the stop: a tree that writes more than a pipe holds while it shuts down
            # would block on it, and get SIGKILL for it. What it says goes to the log (the
            # tether names what it stopped, and how).
            drain = _Drain(proc.stdout, log)
            _stop_group(proc, stop_grace_s)
            drain.finish()
            raise
        finally:
            if timer is not None:
                timer.cancel()
    finally:
        if log is not None:
            log.close()
    result = Completed(argv, rc, "".join(tail), "".join(captured) if capture else None)
    if check and rc != 0:
        raise CommandFailed(argv, rc, result.tail)
    return result


def output(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30) -> str:
    """Run a short query command and return its stdout; raises CommandFailed on failure."""
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, env=_merged_env(env, True), timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise FtkitError(f"cannot run {argv[0]!r}: not found on PATH") from e
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(argv, -1, f"timed out after {timeout} s") from e
    if cp.returncode != 0:
        raise CommandFailed(argv, cp.returncode, (cp.stderr or cp.stdout)[-4000:])
    return cp.stdout


def _stop_group(proc: subprocess.Popen[str], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's process group, SIGKILL after `grace_s`. Our SIGKILL need not be
    the end of its story: a child that owns a tree of its own (the tether) turns it into
    SIGKILL for the whole tree and says so on its output, which `_Drain` still collects."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


class _Drain:
    """Copies what a child being stopped still writes into its log (or nowhere, without one),
    in a thread started before the stop so the child never blocks on a full pipe; `finish`
    waits for its output to close for at most `seconds` after the stop (a process stuck in the
    kernel may hold the pipe open for ever). Nothing is written once the wait is over (the
    log is closed then); what comes later is read and dropped."""

    def __init__(self, stream: IO[str] | None, log: IO[str] | None) -> None:
        self.over = threading.Event()
        self.lock = threading.Lock()
        self.reader: threading.Thread | None = None
        if stream is None:
            return

        def copy() -> None:
            out = log
            try:
                for line in stream:  # to the end: whatever still writes never blocks on the pipe
                    with self.lock:
                        if out is not None and not self.over.is_set():
                            try:
                                out.write(line)
                                out.flush()
                            except (OSError, ValueError):  # the log closed under us: read on, write nothing
                                out = None
            except (OSError, ValueError):
                pass

        self.reader = threading.Thread(target=copy, daemon=True, name="drain")
        self.reader.start()

    def finish(self, seconds: float = DRAIN_S) -> None:
        if self.reader is not None:
            self.reader.join(seconds)
        with self.lock:
            self.over.set()


@dataclass
class Background:
    """A process left running (a model server), with its output going to a log file."""

    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the whole process group, then SIGKILL after `grace_s`."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return self.proc.poll()
        try:
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return self.proc.wait()


def start(
    argv: Sequence[str],
    *,
    log_file: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    die_with_parent: bool = False,
) -> Background:
    """Start argv in its own process group, output appended to log_file. A server meant to
    outlive ftkit (keep_running) is started without `die_with_parent`."""
    argv = [str(a) for a in argv]
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(path, binary=True) as log:
        log.write(f"$ {quote(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_merged_env(env, True),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        except FileNotFoundError as e:
            raise FtkitError(f"cannot run {argv[0]!r}: not found on PATH") from e
    return Background(argv, proc, path)
