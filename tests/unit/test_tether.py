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

import pytest

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
    left, so the log says how it went; ftkit's SIGKILL stays the last resort (and safe). The
    least grace ftkit gives a step is sp.STOP_GRACE_S; a leased step's is longer, never shorter."""
    from ftkit.gateways import subprocess as sp
    from ftkit.plan.spec import LeaseSpec
    from ftkit.run import tether
    from ftkit.run.executors import local

    assert tether.LEFTOVER_GRACE_S < sp.STOP_GRACE_S
    assert tether.LEFTOVER_GRACE_S <= 5  # a server that failed to start is stopped with 5 s (runner)

    class Step:  # the least a lease can give: grace 0
        lease = LeaseSpec(role="train", gpus=[0], grace_s=0)

    assert local.stop_grace(Step()) >= sp.STOP_GRACE_S > tether.LEFTOVER_GRACE_S  # type: ignore[arg-type]


# -- the step's own grace, output while stopping, a command that cannot start (review) ---------


def test_a_leased_local_step_gets_the_leases_grace_when_stopped_or_orphaned(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A train step under the lease saves its checkpoint on SIGTERM within the lease's grace:
    ftkit's stop and the tether's (ftkit gone) must not cut it short - the grace docker stop
    gives the same step in a container (lease grace + 10)."""
    from ftkit.gateways import subprocess as sp
    from ftkit.plan.container import container_spec
    from ftkit.prepare import prepare
    from ftkit.run.executors.base import StepIO
    from ftkit.run.executors.local import LocalExecutor
    from ftkit.run.rundir import RunDir
    from tests.conftest import RECIPES

    plan = prepare(str(RECIPES / "llama31-8b-lora-1gpu.yaml"), str(RECIPES / "machines" / "dual-4090.yaml"),
                   run_dir="/runs/x", executor="local").plan
    train = plan.step("train")
    assert train.lease is not None
    train.lease.grace_s = 90
    seen: dict = {}  # type: ignore[type-arg]

    def fake_run(argv, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(argv=list(argv), **kwargs)

    monkeypatch.setattr(sp, "run", fake_run)
    io = StepIO(log=Path("/nonexistent/train.log"), on_line=lambda line: None, on_started=lambda ident: None)
    LocalExecutor(plan, RunDir(Path("/runs/x"))).run(train, io)
    argv = seen["argv"]
    assert argv[argv.index("--grace") + 1] == "100" and argv.index("--grace") < argv.index("--")
    assert seen["stop_grace_s"] == 100.0
    train.executor, train.image = "docker", "ftkit/train:x"
    assert container_spec(train, plan).stop_grace_s == 100  # the same grace as in a container


def test_grace_is_the_grace_when_ftkit_is_gone(tmp_path: Path) -> None:
    """`--grace S`: the tree gets S after SIGTERM once ftkit is gone (not GRACE_S)."""
    lock = tmp_path / ".owner.lock"
    owner = subprocess.Popen([PY, "-c", f"import fcntl, os, time; fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT);"
                                        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"],
                             stdout=subprocess.PIPE, text=True)
    tether = None
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
        tether = subprocess.Popen([PY, "-m", "ftkit.run.tether", "--grace", "1", str(lock), "--", PY, "-c",
                                   "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                   "print('up', flush=True); time.sleep(120)"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert tether.stdout is not None and tether.stdout.readline().strip() == "up"
        owner.kill()
        owner.wait()
        t0 = time.monotonic()
        _, err = tether.communicate(timeout=60)
        assert tether.returncode == 143, err
        assert "SIGKILL after 1 s" in err and time.monotonic() - t0 < 10, err
    finally:
        _kill(owner.pid, tether.pid if tether else None)
    for bad in ("-1", "nan", "x"):
        res = subprocess.run([PY, "-m", "ftkit.run.tether", "--grace", bad, str(lock), "--", "true"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "--grace" in res.stderr and "Traceback" not in res.stderr


def test_a_step_that_writes_much_while_it_stops_is_not_killed_for_it(tmp_path: Path) -> None:
    """ftkit stops a step (Ctrl-C, SIGTERM): the step's pipe is read from before the stop, or a
    tree that writes more than a pipe holds while it shuts down blocks on it and gets SIGKILL."""
    from ftkit.gateways import subprocess as sp

    class Stop(Exception):
        pass

    def on_line(line: str) -> None:
        if line == "up":
            raise Stop  # as the runner's SIGTERM does, in the middle of the stream

    for log in (tmp_path / "step.log", None):
        clean = tmp_path / "clean"
        clean.unlink(missing_ok=True)
        code = ("import signal, sys, time\n"
                "def stop(*a):\n"
                "    for i in range(2000): sys.stdout.write(f'{i:05d} ' + 'x' * 94 + '\\n')\n"
                "    sys.stdout.flush()\n"
                f"    open({str(clean)!r}, 'w').write('saved')\n"
                "    sys.exit(0)\n"
                "signal.signal(signal.SIGTERM, stop)\nprint('up', flush=True)\ntime.sleep(60)\n")
        t0 = time.monotonic()
        with pytest.raises(Stop):
            sp.run([PY, "-c", code], log_file=log, on_line=on_line, stop_grace_s=3)
        assert clean.exists(), "the step was killed while it wrote its last 200 kB"
        assert time.monotonic() - t0 < 3
        if log is not None:
            text = log.read_text()
            assert "01999 " in text and text.count("\n") >= 2001


def test_a_command_that_cannot_start_is_one_line_and_a_shells_status(tmp_path: Path) -> None:
    lock, fd = _owned(tmp_path)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho hi\n")
    try:
        for cmd, code in (("no-such-binary-ftkit", 127), (str(script), 126)):
            res = subprocess.run([PY, "-m", "ftkit.run.tether", str(lock), "--", cmd], capture_output=True, text=True,
                                 timeout=60)
            assert res.returncode == code, res.stderr
            assert "Traceback" not in res.stderr and res.stderr.strip().splitlines() == [
                f"ftkit tether: cannot start {cmd}: {'No such file or directory' if code == 127 else 'Permission denied'}"]
    finally:
        os.close(fd)


# -- the keeper -----------------------------------------------------------------------------------

CHAIN = """
import os, sys, time
from ftkit.lease.child import become_subreaper
from ftkit.run import tether
become_subreaper()  # the keeper
r, w = os.pipe()
inner = os.fork()
if inner == 0:  # the tether proper: leaves a chain, each process in a session of its own, the parent of the next
    devnull = os.open(os.devnull, os.O_WRONLY)  # the test reads the keeper's output to its end
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for i in range(int(sys.argv[1])):
        if os.fork():
            if i == 0:
                os._exit(1)  # the tether proper ends, not by a signal (as after a traceback, or giving up)
            time.sleep(300)
            os._exit(0)
        os.setsid()
        os.write(w, f"{os.getpid()}\\n".encode())
    time.sleep(300)
    os._exit(0)
os.close(w)
pids = []
with os.fdopen(r) as fh:
    while len(pids) < int(sys.argv[1]):
        pids.append(int(fh.readline()))
print(" ".join(map(str, pids)), flush=True)
print("exit", tether._keep(inner), flush=True)
"""


def test_the_keeper_kills_everything_when_the_tether_ended_by_itself(tmp_path: Path) -> None:
    """The tether proper ended without a signal (its exception exit, its give-up) and left a deep
    tree: the keeper SIGKILLs all of it, not only what it can reach in half a second."""
    p = subprocess.Popen([PY, "-c", CHAIN, "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert p.stdout is not None
        pids = [int(x) for x in p.stdout.readline().split()]
        out, err = p.communicate(timeout=90)
        assert len(pids) == 60 and out.strip() == "exit 1", err
        left = [q for q in pids if not _gone_within(q, 2)]
        assert not left, f"{len(left)} of the 60 outlived the keeper: {err}"
        assert "the tether left" in err and "stopped: everything the step started is gone" in err, err
    finally:
        _kill(*pids, p.pid)


FORWARD_AFTER_REAP = """
import os, signal
from ftkit.run import tether
inner = os.fork()
if inner == 0:
    os._exit(3)
sent = []
os.kill = lambda pid, sig: sent.append((pid, sig))  # nothing is really signalled


def adopted(wait_s):  # a stop arrives while the keeper kills what the tether left
    signal.raise_signal(signal.SIGTERM)
    return True


tether._kill_adopted = adopted
code = tether._keep(inner)
print(code, [p for p, _ in sent if p == inner])
"""


def test_the_keeper_passes_nothing_on_once_the_tether_is_reaped() -> None:
    """After waitpid reaped the tether proper its pid may be another process's: a SIGTERM to
    the keeper then must not reach it."""
    res = subprocess.run([PY, "-c", FORWARD_AFTER_REAP], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "3 []", res.stdout + res.stderr
