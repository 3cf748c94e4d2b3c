"""The command under the lease: started, signalled and waited for as a whole process tree.

The GPUs may be let go only once nothing the command started can still hold GPU memory.
So the command runs in its own process group; the lease makes itself a child subreaper
(orphans of the command are re-parented to it, not to init); and "done" means the group is
empty and the lease has no children left. The command also dies with the lease
(PR_SET_PDEATHSIG) and inherits the lock descriptors, so a SIGKILLed lease leaves nothing
running on an unlocked GPU: the locks go only when the last holder of them is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


_LIBC: list[object] = []


def _libc() -> object | None:
    """libc, loaded once in the lease (never between fork and exec: that is too slow)."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _prctl(option: int, value: int, libc: object | None = None) -> bool:
    libc = libc or _libc()
    if libc is None:
        return False
    try:
        return libc.prctl(option, value, 0, 0, 0) == 0  # type: ignore[attr-defined]
    except AttributeError:
        return False


def become_subreaper() -> bool:
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: the code, or 128+N after signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _foreground_tty() -> int | None:
    """fd 0 when it is a terminal whose foreground group is ours (we may hand it over)."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _ignoring_ttou() -> Iterator[None]:
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTTOU, old)


def _children_of(pid: int) -> list[int]:
    """Direct children of `pid` (zombies included), from /proc: its tasks' `children`
    files where the kernel has them (one read), else a scan of every process."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        kids: list[int] = []
        for tid in tasks:
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
            try:
                kids += [int(x) for x in os.read(fd, 1 << 16).split()]
            finally:
                os.close(fd)
        return kids
    except (OSError, ValueError):
        pass
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{e}/stat", os.O_RDONLY | os.O_CLOEXEC)
            try:
                stat = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        try:
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(e))
    return out


class Tree:
    """One command, started in its own process group."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 pass_fds: Sequence[int] = (), reap_all: bool = True) -> None:
        self.argv = list(argv)
        self.reap_all = reap_all  # the lease CLI owns every child of its process
        self.returncode: int | None = None
        self.forwarded: list[int] = []
        tty = _foreground_tty()
        parent = os.getpid()
        libc = _libc()

        def preexec() -> None:  # runs in the child between fork and exec
            os.setpgid(0, 0)
            if tty is not None:
                signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                with contextlib.suppress(OSError):
                    os.tcsetpgrp(tty, os.getpgrp())
            for s in (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
                signal.signal(s, signal.SIG_DFL)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, libc)
            if os.getppid() != parent:  # the lease died before the line above took effect
                os._exit(137)

        self.proc = subprocess.Popen(self.argv, env=dict(env) if env is not None else None, pass_fds=tuple(pass_fds),
                                     preexec_fn=preexec, close_fds=True)
        self.pid = self.proc.pid
        self.pgid = self.pid
        self._tty = tty
        if tty is not None:  # the parent sets it too: whichever runs first wins the race
            with _ignoring_ttou(), contextlib.suppress(OSError):
                os.tcsetpgrp(tty, self.pgid)

    # -- waiting ----------------------------------------------------------------------------

    def reap(self) -> bool:
        """Collect exited children; True once the command itself has exited."""
        while True:
            try:
                pid, status = os.waitpid(-1 if self.reap_all else self.pid, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if os.WIFSTOPPED(status):
                if pid == self.pid:
                    self._job_stopped()
                continue
            if pid == self.pid and self.returncode is None:
                self.returncode = exit_code(status)
                self.proc.returncode = self.returncode  # Popen must not wait for it again
                self._take_back_tty()
        return self.returncode is not None

    def _job_stopped(self) -> None:
        """Ctrl-Z stopped the command (it has the terminal, we do not). Do what a shell
        would: take the terminal back and stop ourselves, so the user's shell sees its job
        stopped; on `fg`/`bg` hand the terminal back (fg only) and continue the command."""
        if self._tty is None:
            return  # stopped by someone's SIGSTOP: not ours to manage
        tty = self._tty
        with _ignoring_ttou(), contextlib.suppress(OSError):
            os.tcsetpgrp(tty, os.getpgrp())
        os.kill(os.getpid(), signal.SIGSTOP)  # ... until SIGCONT
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(tty) == os.getpgrp():  # `fg`: the shell gave us the terminal
                with _ignoring_ttou():
                    os.tcsetpgrp(tty, self.pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGCONT)

    def _take_back_tty(self) -> None:
        if self._tty is not None:
            with _ignoring_ttou(), contextlib.suppress(OSError):
                os.tcsetpgrp(self._tty, os.getpgrp())
            self._tty = None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def leftovers(self) -> list[int]:
        """Processes the command left: its group, and orphans re-parented to us."""
        self.reap()
        kids = [p for p in _children_of(os.getpid()) if p != self.pid] if self.reap_all else []
        if self.group_alive():
            kids.append(-self.pgid)
        return kids

    def done(self) -> bool:
        return self.reap() and not self.leftovers()

    # -- signalling -------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole group (what a terminal does on Ctrl-C)."""
        self.forwarded.append(sig)
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal_orphans(self, sig: int) -> None:
        """Send `sig` to what the command left that is not in its group: orphans
        re-parented to us (we are a subreaper), such as a daemon in a session of its own."""
        for p in self.leftovers():
            if p > 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)

    def _signal_all(self, sig: int) -> None:
        for p in self.leftovers():
            try:
                if p < 0:
                    os.killpg(-p, sig)
                else:
                    os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_done(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, grace_s: float, *, kill_wait_s: float = 30.0) -> int | None:
        """SIGTERM everything, SIGKILL what is left after `grace_s`; wait until it is gone
        (up to `kill_wait_s` more: a process stuck in the driver cannot be killed sooner)."""
        self._signal_all(signal.SIGTERM)
        if not self.wait_done(grace_s):
            self._signal_all(signal.SIGKILL)
            self.wait_done(kill_wait_s)
        self._take_back_tty()
        return self.returncode


def wait_for_signal_or_timeout(rfd: int, timeout: float) -> None:
    """Sleep until a signal arrives (signal.set_wakeup_fd writes to `rfd`) or `timeout`."""
    import select

    try:
        ready, _, _ = select.select([rfd], [], [], timeout)
    except InterruptedError:
        return
    if ready:
        try:
            while os.read(rfd, 512):
                pass
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
