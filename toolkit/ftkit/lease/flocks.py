"""The GPU locks themselves: one exclusive flock per lock file, taken in one global order.

flock belongs to the open file description, so (1) the kernel drops it when the last
process holding that description dies - SIGKILL included - and nothing can go stale, and
(2) a child that inherits the descriptor keeps the GPU locked for as long as it lives,
even if the lease process itself is killed. Lock files are never deleted: deleting a
flocked file lets two processes "hold" two different inodes of one name.

Waiting blocks in the kernel (the hand-off takes microseconds, not a polling interval).
In a single-threaded main thread an interval timer interrupts the wait now and then so we
can give up at --timeout, notice a signal, and say when the holder changed; elsewhere
(a library caller's thread) we poll every 10 ms instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ftkit.errors import UserError

POLL_S = 0.01


class WaitInterrupted(Exception):
    """A termination signal arrived while waiting for a lock (an Exception the lease handles;
    not run.signals.Interrupted, the BaseException a run's signal gate raises)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Wake(Exception):
    pass


class Waker:
    """Signal plumbing for the blocking wait: handlers record signals and break a blocked
    flock (only while one is in progress, so no other code is ever interrupted)."""

    TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.in_flock = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGALRM:
            self.pending.append(signum)
        if self.in_flock:
            raise _Wake()

    def take_terminating(self) -> int | None:
        for s in self.pending:
            if s in self.TERMINATING:
                return s
        return None


def _can_interrupt() -> bool:
    return threading.current_thread() is threading.main_thread() and threading.active_count() == 1


class GpuLocks:
    """The lock files for one set of GPUs, opened once and kept open."""

    def __init__(self, lease_dir: Path, names: Sequence[str]) -> None:
        self.lease_dir = Path(lease_dir)
        self.names = list(names)  # already in global order
        self.fds: dict[str, int] = {}
        self.writable: dict[str, bool] = {}
        self.held: list[str] = []
        for name in self.names:
            path = self.lease_dir / name
            try:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
                    self.writable[name] = True
                    if os.fstat(fd).st_uid == os.getuid():
                        with contextlib.suppress(OSError):
                            os.fchmod(fd, 0o666)  # other users and containers lock it too
                except PermissionError:
                    # Another user's lock file we may not write: flock works on a read-only
                    # descriptor; only the record copy inside it is skipped.
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
                    self.writable[name] = False
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise IsADirectoryError(errno.EISDIR, "not a regular file")
            except OSError as e:
                self.close()
                raise UserError(f"lease directory {self.lease_dir}: cannot use lock file {name}: "
                                f"{e.strerror or e}") from e
            self.fds[name] = fd

    def path(self, name: str) -> Path:
        return self.lease_dir / name

    # -- taking ---------------------------------------------------------------------------

    def try_lock(self, name: str) -> bool:
        try:
            fcntl.flock(self.fds[name], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        if name not in self.held:
            self.held.append(name)
        return True

    def try_all(self) -> str | None:
        """Take every lock without waiting; on the first busy one, let go of all and name it."""
        for name in self.names:
            if name in self.held:
                continue
            if not self.try_lock(name):
                self.release()
                return name
        return None

    def acquire(
        self,
        *,
        deadline: float | None,
        on_busy: Callable[[str], None],
        on_tick: Callable[[str], None] | None = None,
        waker: Waker | None = None,
        tick_s: float = 1.0,
    ) -> str | None:
        """Take every lock in order, waiting as long as `deadline` (monotonic; None: for
        ever) allows. Returns None when all are held, or the name still busy at the
        deadline (after letting go of the rest). `on_busy(name)` runs once per lock we have
        to wait for, `on_tick(name)` about every `tick_s` while waiting. Raises WaitInterrupted
        on a terminating signal (see Waker), holding nothing."""
        for name in self.names:
            if name in self.held or self.try_lock(name):
                continue
            on_busy(name)
            try:
                got = self._wait(name, deadline, on_tick, waker, tick_s)
            except WaitInterrupted:
                self.release()
                raise
            if not got:
                self.release()
                return name
        return None

    def _wait(self, name: str, deadline: float | None, on_tick: Callable[[str], None] | None,
              waker: Waker | None, tick_s: float) -> bool:
        fd = self.fds[name]
        if waker is None or not _can_interrupt():
            next_tick = time.monotonic() + tick_s
            while True:
                if self.try_lock(name):
                    return True
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                if waker is not None and (sig := waker.take_terminating()) is not None:
                    raise WaitInterrupted(sig)
                if on_tick is not None and now >= next_tick:
                    on_tick(name)
                    next_tick = now + tick_s
                time.sleep(POLL_S)
        old = signal.signal(signal.SIGALRM, waker.handler)
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return self.try_lock(name)
                if (sig := waker.take_terminating()) is not None:
                    raise WaitInterrupted(sig)
                wait = tick_s if deadline is None else max(0.001, min(tick_s, deadline - now))
                waker.in_flock = True  # before the timer: a tick can never be lost
                try:
                    signal.setitimer(signal.ITIMER_REAL, wait)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    waker.in_flock = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    if name not in self.held:
                        self.held.append(name)
                    return True
                except _Wake:
                    waker.in_flock = False
                    # a timer tick or a signal: check the deadline and signals, then wait on
                    if on_tick is not None and (deadline is None or time.monotonic() < deadline):
                        on_tick(name)
        finally:
            waker.in_flock = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    # -- the record copy and letting go ----------------------------------------------------

    def write_record(self, record: dict[str, Any]) -> None:
        """Our holder record inside each lock file, for people (`cat gpu-0.lock`)."""
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        for name in self.held:
            if not self.writable.get(name):
                continue
            fd = self.fds[name]
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            except OSError:
                pass

    def release(self) -> None:
        """Let go of every lock we hold (the record copy is emptied first)."""
        for name in reversed(self.held):
            fd = self.fds[name]
            if self.writable.get(name):
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self.held = []

    def close(self) -> None:
        self.release()
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}

    @property
    def held_fds(self) -> list[int]:
        return [self.fds[n] for n in self.held]
