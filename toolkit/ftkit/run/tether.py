"""A step's command dies with the ftkit that started it - in a container too, and even when
ftkit was killed with SIGKILL.

`ftkit up` holds an exclusive flock on RUN/.owner.lock for as long as it drives the run.
Every one-shot step (and every server not meant to outlive the run) starts as

    python -m ftkit.run.tether RUN/.owner.lock -- CMD...

which runs CMD as a whole process tree (its own process group; orphans re-parented to the
tether) and waits for a shared lock on the same file in a thread. The kernel releases
ftkit's lock the moment ftkit dies, however it dies, so the tether learns of it at once and
stops the tree (SIGTERM, grace, SIGKILL). A parent-death signal cannot do this for a
container (its processes are not ftkit's children), nor for workers a launcher started in
another session; a flock on a file bind-mounted into the container can.

If the lock is free when the tether starts, ftkit is already gone: CMD is not started.
SIGTERM, SIGINT and SIGHUP to the tether go to the whole tree - CMD's process group and
every orphan re-parented to the tether (a daemon that double-forked into a session of its
own); the tether exits with CMD's code (128+N after signal N).

Nothing outlives the step either: the tether is a subreaper, so whatever CMD started and
left behind becomes the tether's child. Once CMD has exited, what it left gets LINGER_S to
finish on its own (a launcher's workers writing their last lines), then is stopped (SIGTERM,
grace, SIGKILL) and named in the step's log. A subreaper rather than a cgroup per step:
it needs no privileges, no systemd and no cgroup delegation, works the same inside a
container, and a process cannot leave it (a cgroup can be left only by one with rights to
move itself, which a step's process has not, but making one per step needs what ftkit
may not have on a workstation).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time

GRACE_S = 20.0
LINGER_S = 5.0  # after CMD exits: what it left may finish by itself this long, then it is stopped
EXIT_OWNER_GONE = 143


def _say(msg: str) -> None:
    try:
        os.write(2, f"ftkit tether: {msg}\n".encode())
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        _say("usage: python -m ftkit.run.tether OWNER_LOCK -- CMD...")
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

    from ftkit.lease.child import Tree, become_subreaper

    become_subreaper()
    gone = threading.Event()

    def watch() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks until ftkit's exclusive lock is released
        except OSError:
            return
        os.close(fd)
        gone.set()

    tree = Tree(cmd)
    threading.Thread(target=watch, daemon=True, name="owner").start()

    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        tree.signal(signum)  # the group at once; the orphans from the loop (no waitpid in a handler)
        pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    exited_at: float | None = None
    while True:
        finished = tree.reap()
        left = tree.leftovers()
        if finished and not left:
            break
        while pending:
            tree.signal_orphans(pending.pop(0))
        if gone.is_set():
            _say("the ftkit that started this step is gone; stopping it")
            tree.stop(GRACE_S)
            return EXIT_OWNER_GONE
        if finished:
            exited_at = exited_at if exited_at is not None else time.monotonic()
            if time.monotonic() - exited_at >= LINGER_S:
                pids = ", ".join(str(p) if p > 0 else f"group {-p}" for p in left)
                _say(f"the command exited ({tree.returncode}) but left {len(left)} process(es) running ({pids}; "
                     "a daemon?): stopping them - nothing a step starts outlives it")
                tree.stop(GRACE_S)
                break
        time.sleep(0.05)
    return int(tree.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
