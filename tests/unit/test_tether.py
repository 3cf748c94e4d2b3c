"""The tether: a step's whole process tree dies with the ftkit that started it, however
ftkit dies - including workers a launcher started in a session of their own, which a
parent-death signal never reaches."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
TREE = """
import subprocess, sys, time
w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(w.pid))
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_tree_dies_with_its_owner(tmp_path: Path) -> None:
    lock, worker = tmp_path / ".owner.lock", tmp_path / "worker.pid"
    owner = subprocess.Popen([PY, "-c", f"import fcntl, os, time; fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT);"
                                        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"],
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
    tether = subprocess.Popen([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c", TREE, str(worker)],
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (worker.exists() and worker.read_text()):
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.1)
    w = int(worker.read_text())
    assert alive(w)
    owner.kill()  # ftkit SIGKILLed
    owner.wait()
    assert tether.wait(60) == 143
    assert "is gone; stopping it" in (tether.stderr.read() if tether.stderr else "")
    deadline = time.monotonic() + 10
    while alive(w) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(w), "a worker in its own session outlived ftkit"


def test_nothing_starts_when_the_owner_is_already_gone(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    res = subprocess.run([PY, "-m", "ftkit.run.tether", str(tmp_path / ".owner.lock"), "--", PY, "-c",
                          f"open({str(marker)!r}, 'w')"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 143 and not marker.exists()


def test_signals_reach_the_command_and_its_code_comes_back(tmp_path: Path) -> None:
    lock = tmp_path / ".owner.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test process is the owner
    try:
        code = subprocess.run([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c", "import sys; sys.exit(7)"],
                              timeout=60).returncode
        assert code == 7
        p = subprocess.Popen([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c",
                              "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(5)); "
                              "print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 5
    finally:
        os.close(fd)


DAEMON = """
import os, sys, time
if os.fork() == 0:  # the classic double fork: a daemon in a session of its own
    os.setsid()
    if os.fork() == 0:
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(300)
    os._exit(0)
time.sleep(0.5)
"""


def _owned(tmp_path: Path) -> tuple[Path, int]:
    lock = tmp_path / ".owner.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test process is the owner (ftkit, alive)
    return lock, fd


def _daemon_pid(path: Path) -> int:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, "the daemon never started"
        time.sleep(0.05)
    return int(path.read_text())


def test_a_daemon_the_step_left_is_stopped_once_the_step_exits(tmp_path: Path) -> None:
    """The command double-forks a daemon and exits 0: the step must end (it used to wait for
    ever, the run stuck in `running`), and the daemon with it, named in the log."""
    lock, fd = _owned(tmp_path)
    pid_file = tmp_path / "daemon.pid"
    try:
        t0 = time.monotonic()
        res = subprocess.run([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c", DAEMON, str(pid_file)],
                             capture_output=True, text=True, timeout=90)
        daemon = _daemon_pid(pid_file)
        assert res.returncode == 0, res.stderr
        assert "left 1 process(es) running" in res.stderr and str(daemon) in res.stderr, res.stderr
        assert time.monotonic() - t0 < 60
        deadline = time.monotonic() + 10
        while alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(daemon), "a daemon outlived its step"
    finally:
        os.close(fd)


def test_sigterm_reaches_a_daemon_in_its_own_session(tmp_path: Path) -> None:
    """SIGTERM to the step (ftkit stopping it) reaches the daemon too, not only the group."""
    lock, fd = _owned(tmp_path)
    pid_file = tmp_path / "daemon.pid"
    code = DAEMON.replace("time.sleep(0.5)", "print('up', flush=True); time.sleep(300)")
    try:
        p = subprocess.Popen([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c", code, str(pid_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        daemon = _daemon_pid(pid_file)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(daemon), "SIGTERM left the daemon running under PID 1"
    finally:
        os.close(fd)
