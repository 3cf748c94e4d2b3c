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
SIGTERM, SIGINT and SIGHUP to the tether go to the whole tree; the tether exits with CMD's
code (128+N after signal N).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time

GRACE_S = 20.0
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

    def forward(signum: int, frame: object) -> None:
        tree.signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while not tree.done():
        if gone.is_set():
            _say("the ftkit that started this step is gone; stopping it")
            tree.stop(GRACE_S)
            return EXIT_OWNER_GONE
        time.sleep(0.05)
    return int(tree.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
