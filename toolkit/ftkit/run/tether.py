"""A step's command dies with the ftkit that started it - in a container too, and even when
ftkit was killed with SIGKILL - and nothing the command starts outlives the step.

`ftkit up` holds an exclusive flock on RUN/.owner.lock for as long as it drives the run.
Every one-shot step (and every server not meant to outlive the run) starts as

    python -m ftkit.run.tether [--grace S] RUN/.owner.lock -- CMD...

which runs CMD as a whole process tree (its own process group; orphans re-parented to the
tether) and waits for a shared lock on the same file in a thread. The kernel releases
ftkit's lock the moment ftkit dies, however it dies, so the tether learns of it at once and
stops the tree (SIGTERM, the step's grace, SIGKILL). The grace is the one ftkit itself would
give the step (`--grace`: a leased step's engine gets the lease's grace to save its
checkpoint, and the lease time to let go; GRACE_S without it). A parent-death signal cannot
do this for a container (its processes are not ftkit's children), nor for workers a launcher
started in another session; a flock on a file bind-mounted into the container can.

If the lock is free when the tether starts, ftkit is already gone: CMD is not started. A
CMD that cannot be started is one line and exit status 127 (126: not executable), as in a
shell. SIGTERM, SIGINT and SIGHUP to the tether go to the whole tree - CMD's process group and
every orphan re-parented to the tether (a daemon that double-forked into a session of its
own); the tether exits with CMD's code (128+N after signal N).

Nothing outlives the step either: the tether is a subreaper, so whatever CMD started and
left behind becomes the tether's child. Once CMD has exited, what it left gets LINGER_S to
finish on its own (a launcher's workers writing their last lines), then SIGTERM and
LEFTOVER_GRACE_S, then SIGKILL. After a signal passed on, nothing lingers: what CMD left has
had the signal, and gets LEFTOVER_GRACE_S from it. That is no longer than any grace ftkit
gives a step it stops (10 s at least, gateways.subprocess.STOP_GRACE_S; 5 s for a server that
failed to start), so the tether stops the leftovers itself, a SIGTERM-ignoring daemon
included, before ftkit would SIGKILL it. Every stop is said in the step's log: which
processes (pid and name), by which signal, and when they were all gone.

A SIGKILLed tether must not set its orphans free (they would go to PID 1), so the tether is
two processes, both subreapers: the keeper, which ftkit started and signals, and under it,
in a process group of its own, the tether proper, which runs CMD and adopts its orphans.
The keeper passes each signal on (once: ftkit's killpg reaches the keeper alone) and waits.
- The tether proper SIGKILLed: CMD gets SIGKILL (its parent-death signal) and the orphans
  are re-parented to the keeper, which SIGKILLs them, and all they start, until none is left.
  The same when the tether proper ended any other way with processes left (it gave up on
  some stuck in the kernel, or failed): the keeper SIGKILLs each of them, its process group
  and everything under it - a child whose stuck parent keeps it from the keeper included -
  for up to KILL_WAIT_S.
- The keeper SIGKILLed (ftkit's last resort after its grace, or `ftkit down`): the tether
  proper sees its parent change and SIGKILLs the whole tree. SIGKILL to the step is SIGKILL
  to everything the step started, whichever half gets it.
Only both halves killed at once (nothing in ftkit does that) lets an orphan escape; in a
container not even that: the container's processes die with it (its PID namespace).

A subreaper rather than a cgroup per step: it needs no privileges, no systemd and no
cgroup delegation, works the same inside a container, and a process cannot leave it (a
cgroup can be left only by one with rights to move itself, which a step's process has not,
but making one per step needs what ftkit may not have on a workstation). A PID namespace
per step (what a container gives) would need a user namespace, which distributions restrict,
and would hide the pids that the GPU lease records. ftkit itself is no subreaper: orphans
adopted by ftkit could not be told apart from other processes' (a keep_running server's),
while everything the keeper adopts is the step's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import signal
import sys
import threading
import time
import traceback

from ftkit.procs import group_members

GRACE_S = 20.0  # ftkit gone: the tree gets this long after SIGTERM, then SIGKILL (--grace: the step's own)
LINGER_S = 5.0  # after CMD exits: what it left may finish by itself this long, then it is stopped
LEFTOVER_GRACE_S = 5.0  # what CMD left: SIGKILL this long after its SIGTERM (after a signal passed on, from that)
KILL_WAIT_S = 30.0  # after SIGKILL: a process stuck in the kernel (a GPU driver call) may take this long to go
EXIT_OWNER_GONE = 143
EXIT_KILLED = 137
EXIT_NOT_FOUND = 127  # CMD cannot be started, as a shell says it
EXIT_NOT_EXECUTABLE = 126
TICK_S = 0.05
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _say(msg: str) -> None:
    try:
        os.write(2, f"ftkit tether: {msg}\n".encode())
    except OSError:
        pass


# -- naming what is stopped ----------------------------------------------------------------

def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or "?"
    except OSError:
        return "gone"


def _names(left: list[int], limit: int = 12) -> tuple[int, str]:
    """How many processes are behind these pids and groups (-pgid), and `4242 (python3), 4250 (sleep)`."""
    pids: list[int] = []
    for p in left:
        for q in ([p] if p > 0 else group_members(-p) or [p]):
            if q not in pids:
                pids.append(q)
    names = [f"{p} ({_comm(p)})" if p > 0 else f"group {-p}" for p in pids]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return len(pids), ", ".join(names[:limit]) + more


def _describe(left: list[int]) -> str:
    n, names = _names(left)
    return f"{n} process(es): {names}"


def _children() -> list[int]:
    """This process's children, zombies included (the keeper has one thread: one read)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", encoding="ascii") as fh:
            return [int(x) for x in fh.read().split()]
    except (OSError, ValueError):  # a kernel without the children file: scan every process
        out = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    if entry.isdigit() and int(fh.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
        return out


def _send(targets: list[int], sig: int) -> None:
    for p in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if p < 0:
                os.killpg(-p, sig)
            else:
                os.kill(p, sig)


# -- the tether proper: runs CMD, adopts its orphans, stops all of it ----------------------

def _tether(fd: int, cmd: list[str], keeper: int, grace_s: float = GRACE_S) -> int:
    from ftkit.lease.child import Tree

    gone = threading.Event()

    def watch() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks until ftkit's exclusive lock is released
        except OSError:
            return
        os.close(fd)
        gone.set()

    pending: list[tuple[int, bool]] = []  # (signal, whether the group has had it)
    started: list[Tree] = []  # the handler is in place before CMD starts: no signal is lost

    def forward(signum: int, frame: object) -> None:
        if started:
            started[0].signal(signum)  # the group at once; the orphans from the loop (no waitpid in a handler)
        pending.append((signum, bool(started)))

    for sig in FORWARDED:
        signal.signal(sig, forward)
    if os.getppid() != keeper:  # the keeper died before we got here
        return EXIT_KILLED
    try:
        tree = Tree(cmd)
    except OSError as e:  # not found, not executable: a shell's one line and its status, no traceback
        _say(f"cannot start {cmd[0]}: {e.strerror or e}")
        return EXIT_NOT_EXECUTABLE if e.errno in (errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.EISDIR) \
            else EXIT_NOT_FOUND
    started.append(tree)
    threading.Thread(target=watch, daemon=True, name="owner").start()

    code: int | None = None  # the tether's own exit code, where it (not CMD) decides
    signalled: tuple[float, str] | None = None  # when the first signal was passed on, and which
    exited_at: float | None = None
    stop_at: float | None = None  # a stop began (SIGTERM, or the signal passed on, counts from here)
    kill_at: float | None = None  # ... and SIGKILL goes to what is left at this time
    killed_at: float | None = None
    termed: set[int] = set()  # what has had SIGTERM (or the signal passed on) already
    while True:
        finished = tree.reap()
        left = tree.leftovers()
        if finished and not left:
            break
        now = time.monotonic()
        while pending:
            sig, sent = pending.pop(0)
            if not sent:  # it came while CMD was being started
                tree.signal(sig)
            tree.signal_orphans(sig)
            termed.update(left)
            if signalled is None:
                signalled = (now, signal.Signals(sig).name)
                orphans = [p for p in left if p > 0]
                _say(f"{signalled[1]}: passed to the command's process group"
                     + (f" and to what it left: {_describe(orphans)}" if orphans else ""))
        if killed_at is None and os.getppid() != keeper:
            _say(f"the tether's keeper ({keeper}) was killed, so the step is: SIGKILL to {_describe(left)}")
            code, stop_at, kill_at = EXIT_KILLED, stop_at or now, now
        elif gone.is_set() and code is None:
            _say(f"the ftkit that started this step is gone; stopping it: SIGTERM to {_describe(left)}, "
                 f"SIGKILL after {grace_s:g} s")
            code, stop_at = EXIT_OWNER_GONE, stop_at if stop_at is not None else now
            kill_at = now + grace_s if kill_at is None else min(kill_at, now + grace_s)
        elif finished and stop_at is None:
            exited_at = exited_at if exited_at is not None else now
            if signalled is not None:  # they have had the signal: no lingering, the grace counts from it
                stop_at, kill_at = signalled[0], signalled[0] + LEFTOVER_GRACE_S
            elif now - exited_at >= LINGER_S:
                n, names = _names(left)
                _say(f"the command exited ({tree.returncode}) but left {n} process(es) running ({names}; "
                     f"a daemon?): stopping them - nothing a step starts outlives it: SIGTERM, SIGKILL after "
                     f"{LEFTOVER_GRACE_S:.0f} s")
                stop_at, kill_at = now, now + LEFTOVER_GRACE_S
        if kill_at is not None and now >= kill_at:
            if killed_at is None:
                killed_at = now
                if code != EXIT_KILLED:
                    _say(f"SIGKILL to {_describe(left)}: still running {now - (stop_at or now):.1f} s after "
                         f"{signalled[1] if signalled and stop_at == signalled[0] else 'SIGTERM'}")
            _send(left, signal.SIGKILL)  # again each tick: what a dying process's children become
            if now - killed_at >= KILL_WAIT_S:
                _say(f"{_describe(left)} still there {KILL_WAIT_S:.0f} s after SIGKILL (stuck in the kernel?); "
                     "they die when it lets them")
                return code if code is not None else int(tree.returncode or EXIT_KILLED)
        elif stop_at is not None:
            new = [p for p in left if p not in termed]  # SIGTERM to what appeared since (once each)
            _send(new, signal.SIGTERM)
            termed.update(new)
        time.sleep(TICK_S)
    if stop_at is not None:
        since = killed_at if code == EXIT_KILLED and killed_at is not None else stop_at
        _say(f"stopped: everything the step started is gone, {time.monotonic() - since:.1f} s after "
             f"{'SIGKILL' if code == EXIT_KILLED else 'the first signal' if signalled else 'SIGTERM'}")
    return code if code is not None else int(tree.returncode or 0)


# -- the keeper: passes signals on, and kills whatever a killed tether left ----------------

def _reap_any() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _descendants(roots: list[int]) -> list[int]:
    """Every process under `roots` (their children, theirs, ...): a child whose parent is stuck
    in the kernel stays that parent's, out of the keeper's reach as its child."""
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out and k not in roots:
                    out.append(k)
                    todo.append(k)
    return out


def _kill_adopted(wait_s: float) -> bool:
    """SIGKILL every child of this process - its process group and everything under it too -
    and each child they leave on dying, until there are none (True, at once when there were
    none) or `wait_s` passed (what SIGKILL cannot stop at once is stuck in the kernel)."""
    deadline = time.monotonic() + wait_s
    own = os.getpgrp()
    while True:
        _reap_any()
        kids = _children()
        if not kids:
            return True
        if time.monotonic() >= deadline:
            _say(f"{_describe(kids)} still there {wait_s:.0f} s after SIGKILL (stuck in the kernel?); "
                 "they die when it lets them")
            return False
        groups = {g for g in map(_pgid, kids) if g is not None and g > 1 and g != own}
        _send(kids + _descendants(kids) + [-g for g in sorted(groups)], signal.SIGKILL)
        time.sleep(0.02)


def _keep(inner: int) -> int:
    from ftkit.lease.child import exit_code

    reaped = [False]

    def forward(signum: int, frame: object) -> None:
        if reaped[0]:  # the tether proper is gone and reaped: its pid may be another process's now
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(inner, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    status: int | None = None
    try:  # until it has exited, not reaped: a zombie's pid is not reused, so a signal passed on now is harmless
        os.waitid(os.P_PID, inner, os.WEXITED | os.WNOWAIT)  # a signal runs `forward`, the wait goes on (PEP 475)
    except ChildProcessError:
        pass
    reaped[0] = True  # from here on nothing is passed on
    try:
        _, status = os.waitpid(inner, 0)
    except ChildProcessError:
        status = None
    killed = status is None or os.WIFSIGNALED(status)
    kids = _children()
    if killed:
        name = signal.Signals(os.WTERMSIG(status)).name if status is not None else "?"
        _say(f"the tether ({inner}) was killed by {name}; SIGKILL to what it left"
             + (f": {_describe(kids)}" if kids else " (nothing)"))
    elif kids:  # it gave up waiting for them (they have had SIGKILL), or it failed
        _say(f"the tether left {_describe(kids)}: SIGKILL")
    t0 = time.monotonic()
    if _kill_adopted(KILL_WAIT_S) and kids:  # at once when nothing is left
        _say(f"stopped: everything the step started is gone, {time.monotonic() - t0:.1f} s after SIGKILL")
    return exit_code(status) if status is not None else EXIT_KILLED


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    grace_s = GRACE_S
    if args[:1] == ["--grace"] and len(args) >= 2:
        try:
            grace_s = float(args[1])
        except ValueError:
            grace_s = -1.0
        if not (math.isfinite(grace_s) and grace_s >= 0):
            _say(f"--grace {args[1]!r}: expected seconds, 0 or more")
            return 2
        args = args[2:]
    if len(args) < 3 or args[1] != "--":
        _say("usage: python -m ftkit.run.tether [--grace S] OWNER_LOCK -- CMD...")
        return 2
    lock_path, cmd = args[0], args[2:]
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _say(f"cannot open {lock_path}: {e.strerror}")
        return 2
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # ftkit holds it: alive
    else:
        _say("the ftkit that started this step is gone; not starting it")
        return EXIT_OWNER_GONE

    from ftkit.lease.child import become_subreaper

    become_subreaper()  # the keeper: a killed tether's orphans come here, not to PID 1
    keeper = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    inner = os.fork()
    if inner == 0:
        code = EXIT_KILLED
        try:
            os.setpgid(0, 0)  # ftkit's killpg reaches the keeper alone: each signal arrives once
            become_subreaper()  # not inherited across fork
            code = _tether(fd, cmd, keeper, grace_s)
        except BaseException:  # noqa: BLE001 - say why, then die: the keeper stops what is left
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(fd)  # the tether proper watches the lock
    return _keep(inner)


if __name__ == "__main__":
    sys.exit(main())
