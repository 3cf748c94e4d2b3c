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


# -- daemons that ignore SIGTERM, and a tether that is itself SIGKILLed (issue 24) -----------

STUBBORN = """
import os, signal, sys, time
if os.fork() == 0:  # a double-forked daemon in a session of its own that ignores SIGTERM
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(300)
    os._exit(0)
if sys.argv[2] == "ignore":  # the command itself ignores SIGTERM too
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[2] == "exit":
    time.sleep(0.5)
    sys.exit(0)
print("up", flush=True)
time.sleep(300)
"""


def _kill(*pids: int | None) -> None:
    """Test cleanup: nothing a failed test started may stay behind."""
    for pid in pids:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def _inner(keeper: int) -> int:
    """The tether proper: the keeper's one child."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{keeper}/task/{keeper}/children") as fh:
            kids = fh.read().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise AssertionError("the tether never started its command")


def _stubborn(tmp_path: Path, lock: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    pid_file = tmp_path / "daemon.pid"
    p = subprocess.Popen([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c", STUBBORN, str(pid_file), mode],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return p, _daemon_pid(pid_file)


def test_a_daemon_that_ignores_sigterm_is_killed_once_the_step_exits(tmp_path: Path) -> None:
    lock, fd = _owned(tmp_path)
    p, daemon = None, None
    try:
        t0 = time.monotonic()
        p, daemon = _stubborn(tmp_path, lock, "exit")
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert f"SIGKILL to 1 process(es): {daemon} (python" in err, err
        assert "still running 5.0 s after SIGTERM" in err and "stopped: everything the step started is gone" in err
        assert time.monotonic() - t0 < 30  # LINGER_S + LEFTOVER_GRACE_S, and some slack
        assert _gone_within(daemon, 5), "a daemon that ignores SIGTERM outlived its step"
    finally:
        os.close(fd)
        _kill(daemon, p.pid if p else None)


def test_sigterm_to_the_step_stops_a_daemon_that_ignores_it_within_the_grace(tmp_path: Path) -> None:
    """ftkit stops a step with SIGTERM and SIGKILLs the tether 10 s later: the tether itself
    must have killed the daemon by then (it gets LEFTOVER_GRACE_S after the signal)."""
    lock, fd = _owned(tmp_path)
    p, daemon = None, None
    try:
        p, daemon = _stubborn(tmp_path, lock, "obey")
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGTERM)  # as ftkit's stop does
        _, err = p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM, err
        assert time.monotonic() - t0 < 9, err  # before ftkit's SIGKILL would come
        assert "SIGTERM: passed to the command's process group and to what it left" in err, err
        assert f"SIGKILL to 1 process(es): {daemon} (python" in err, err
        assert _gone_within(daemon, 5), "SIGTERM left a daemon that ignores it running under PID 1"
    finally:
        os.close(fd)
        _kill(daemon, p.pid if p else None)


def test_a_sigkilled_tether_leaves_nothing_behind(tmp_path: Path) -> None:
    """The tether proper (which adopted the daemon) is SIGKILLed: its keeper adopts what it
    left and SIGKILLs it all - the command (which ignores SIGTERM) and the daemon."""
    lock, fd = _owned(tmp_path)
    p, daemon, inner = None, None, None
    try:
        p, daemon = _stubborn(tmp_path, lock, "ignore")
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        inner = _inner(p.pid)
        with open(f"/proc/{inner}/task/{inner}/children") as fh:
            command = int(fh.read().split()[0])
        os.kill(inner, signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGKILL, err
        assert f"the tether ({inner}) was killed by SIGKILL; SIGKILL to what it left" in err and str(daemon) in err, err
        assert _gone_within(daemon, 5), "a SIGKILLed tether set its daemon free"
        assert _gone_within(command, 5)
    finally:
        os.close(fd)
        _kill(daemon, inner, p.pid if p else None)


def test_a_sigkilled_keeper_takes_the_whole_tree_along(tmp_path: Path) -> None:
    """ftkit's last resort (SIGKILL to the step after its grace) reaches the keeper only: the
    tether proper sees it go and SIGKILLs everything, and says so."""
    lock, fd = _owned(tmp_path)
    p, daemon, inner = None, None, None
    try:
        p, daemon = _stubborn(tmp_path, lock, "ignore")
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        inner = _inner(p.pid)
        os.killpg(p.pid, signal.SIGKILL)  # as ftkit's stop escalates: the keeper's group, not the tether's
        p.wait(30)
        assert _gone_within(daemon, 10), "SIGKILL to the step left its daemon running"
        assert _gone_within(inner, 10)
        err = p.stderr.read() if p.stderr else ""
        assert f"the tether's keeper ({p.pid}) was killed, so the step is: SIGKILL to" in err, err
        assert str(daemon) in err, err
    finally:
        os.close(fd)
        _kill(daemon, inner, p.pid if p else None)


def test_a_signal_to_the_step_arrives_once(tmp_path: Path) -> None:
    """The keeper passes each signal on; ftkit's killpg must not reach the tether proper too
    (a second SIGTERM or SIGINT makes many programs give up their cleanup)."""
    lock, fd = _owned(tmp_path)
    counter = tmp_path / "count"
    code = (f"import signal, time\nn = []\nsignal.signal(signal.SIGTERM, lambda *a: n.append(1))\n"
            f"print('up', flush=True)\nt = time.monotonic()\nwhile time.monotonic() - t < 60 and not n: time.sleep(0.01)\n"
            f"time.sleep(1)\nopen({str(counter)!r}, 'w').write(str(len(n)))\n")
    p = None
    try:
        p = subprocess.Popen([PY, "-m", "ftkit.run.tether", str(lock), "--", PY, "-c", code], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(30) == 0
        assert counter.read_text() == "1"
    finally:
        os.close(fd)
        _kill(p.pid if p else None)


def test_the_tether_stops_leftovers_before_ftkit_would_kill_it() -> None:
    """ftkit's stop (SIGTERM, its grace, SIGKILL) must find the tether done with what the step
    left, so the log says how it went; ftkit's SIGKILL stays the last resort (and safe)."""
    from ftkit.gateways import subprocess as sp
    from ftkit.run import tether

    assert tether.LEFTOVER_GRACE_S < sp.STOP_GRACE_S
    assert tether.LEFTOVER_GRACE_S <= 5  # a server that failed to start is stopped with 5 s (runner)
