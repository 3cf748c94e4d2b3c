"""`ftkit lease`: keying, ordering, holder records, busy/timeout messages and exit codes,
signal forwarding, exit-code passthrough, serve preemption (stop and sleep), and the
backstops against a simulated NVML. Commands under the lease are small Python stand-ins;
every lease runs as a real process (`python -m ftkit lease`), never inside pytest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftkit.errors import UserError
from ftkit.lease import default_lease_dir, holders
from ftkit.lease.gpus import GpuRef, lock_order, parse_gpus, resolve
from ftkit.lease.records import Presence, new_party
from tests.conftest import run_cli

PY = sys.executable
FTKIT = [PY, "-m", "ftkit", "lease"]

# An engine stand-in: logs "up PID" (and serves /sleep, /wake_up on PORT if given), logs
# "term" on SIGTERM and exits 0 - or ignores SIGTERM when MODE is "stubborn".
ENGINE = r'''
import http.server, os, signal, sys, threading, time
log, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def w(s):
    with open(log, "a") as fh:
        fh.write(s + "\n")
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        w("http " + self.path)
        code = 500 if mode == "sleepfail" and self.path.startswith("/sleep") else 200
        self.send_response(code); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a):
        pass
if port:
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
stop = []
signal.signal(signal.SIGTERM, (lambda *a: None) if mode == "stubborn" else (lambda *a: stop.append(1)))
w(f"up {os.getpid()}")
while not stop:
    time.sleep(0.02)
w("term")
'''


@pytest.fixture
def lease_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FTKIT_SIMULATED", "NVIDIA_", "FTKIT_LEASE", "FTKIT_SERVICE"))}
    env["FTKIT_LEASE_DIR"] = str(tmp_path / "lease")
    return env


def lease(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FTKIT, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*FTKIT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def holding(env: dict[str, str], service: str) -> bool:
    return any(p.service == service and p.state == "holding" for p in holders(env["FTKIT_LEASE_DIR"]))


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- keying and ordering --------------------------------------------------------------------


def test_parse_gpus() -> None:
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus(" 1 , 0 ") == [1, 0]
    assert parse_gpus("none") == [] and parse_gpus("") == [] and parse_gpus(None) == []
    assert parse_gpus("GPU-8f3a-11") == ["GPU-8f3a-11"]
    for bad in ("0,x", "-1", "0,0", "all", "0;1"):
        with pytest.raises(UserError):
            parse_gpus(bad)


class FakeNvml:
    """NVML as a container sees it: only its GPUs, renumbered from 0."""

    def __init__(self, uuids: list[str]) -> None:
        self.uuids = uuids

    def inventory(self) -> list[object]:
        return [type("G", (), {"uuid": u})() for u in self.uuids]


def test_keys_without_nvml_are_host_indices() -> None:
    refs, warnings = resolve([1, 0], None)
    assert [r.lock_names for r in refs] == [["gpu-1.lock"], ["gpu-0.lock"]] and not warnings
    assert lock_order(refs) == ["gpu-0.lock", "gpu-1.lock"]


def test_keys_with_simulated_nvml_add_the_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit.gpu.nvml import SimulatedNvml

    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    refs, _ = resolve([1], SimulatedNvml(["RTX 4090", "RTX 4090"]))
    assert refs == [GpuRef(index=1, uuid="GPU-simulated-1", nvml_index=1)]
    assert refs[0].lock_names == ["gpu-1.lock", "gpu-GPU-simulated-1.lock"]
    with pytest.raises(UserError, match="no GPU 2 here"):
        resolve([2], SimulatedNvml(["RTX 4090", "RTX 4090"]))


def test_container_view_maps_host_index_by_nvidia_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker passed host GPUs 3 and 1: the container's NVML sees them as 0 and 1, in PCI
    # (= host index) order.
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "3,1")
    nv = FakeNvml(["GPU-b", "GPU-d"])
    refs, _ = resolve([3, 1], nv)
    assert [(r.index, r.uuid, r.nvml_index) for r in refs] == [(3, "GPU-d", 1), (1, "GPU-b", 0)]
    with pytest.raises(UserError, match="host GPU 0 is not visible in this container"):
        resolve([0], nv)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-b,GPU-d")
    refs, warnings = resolve([3], nv)
    assert refs == [GpuRef(index=3)] and "lists UUIDs" in warnings[0]
    refs, _ = resolve(["GPU-d"], nv)
    assert refs[0].uuid == "GPU-d" and refs[0].nvml_index == 1


def test_opposite_orders_never_deadlock(lease_env: dict[str, str]) -> None:
    """Two two-GPU holders asking in opposite orders take the locks in one global order."""
    cmd = [PY, "-c", "import time; time.sleep(0.05)"]
    for _ in range(4):
        a = start(lease_env, "--gpus", "0,1", "--", *cmd)
        b = start(lease_env, "--gpus", "1,0", "--", *cmd)
        assert a.wait(30) == 0 and b.wait(30) == 0


def test_default_lease_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(tmp_path / "env"))
    assert default_lease_dir("/from/profile") == tmp_path / "env"
    monkeypatch.setenv("FTKIT_LEASE_DIR", "")
    assert default_lease_dir("/from/profile") == Path("/from/profile")
    monkeypatch.delenv("FTKIT_LEASE_DIR")
    assert default_lease_dir(None) in (Path("/run/lock/ftkit"), Path.home() / ".cache" / "ftkit" / "lease")


# -- holder records, busy, timeout ----------------------------------------------------------


def test_holder_record_no_wait_and_timeout(lease_env: dict[str, str], tmp_path: Path) -> None:
    lease_dir = Path(lease_env["FTKIT_LEASE_DIR"])
    holder = start({**lease_env, "FTKIT_SERVICE": "trainer"}, "--gpus", "0", "--", PY, "-c",
                   "import time; time.sleep(30)")
    try:
        wait_for(lambda: holding(lease_env, "trainer"), what="the holder")
        [p] = holders(lease_dir)
        assert (p.role, p.service, p.state, p.pid) == ("train", "trainer", "holding", holder.pid)
        assert p.gpus[0]["index"] == 0 and p.since.endswith("Z") and p.command[:2] == [PY, "-c"]
        record = json.loads((lease_dir / "gpu-0.lock").read_text())  # the copy for people
        assert record["service"] == "trainer" and record["pid"] == holder.pid

        busy = lease(lease_env, "--gpus", "0", "--no-wait", "--", "true")
        assert busy.returncode == 75, busy.stderr
        line = busy.stderr.strip()
        assert "GPU busy (--no-wait): GPU 0: held by train 'trainer'" in line and "since 20" in line
        assert f"pid {holder.pid}" in line and "\n" not in line

        t0 = time.monotonic()
        timed = lease(lease_env, "--gpus", "1,0", "--timeout", "0.5", "--", "true")
        assert timed.returncode == 75 and 0.4 < time.monotonic() - t0 < 10
        assert "waiting for GPU 0: held by train 'trainer'" in timed.stderr
        assert "gave up after 0.5 s (--timeout): GPU 0: held by train 'trainer'" in timed.stderr
        # GPU 1 was taken on the way and let go again
        assert lease(lease_env, "--gpus", "1", "--no-wait", "--", "true").returncode == 0

        show = lease(lease_env, "--show", "--json")
        assert [p["service"] for p in json.loads(show.stdout)["parties"]] == ["trainer"]
    finally:
        holder.terminate()
        holder.wait(20)
    assert holders(lease_dir) == []
    assert (lease_dir / "gpu-0.lock").read_text() == ""  # emptied before letting go


def test_sigkilled_holder_leaves_nothing_behind(lease_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = start({**lease_env, "FTKIT_SERVICE": "victim"}, "--gpus", "0", "--", PY, "-c",
                   f"import os, time; open({str(out)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    wait_for(lambda: holding(lease_env, "victim") and read(out), what="the holder")
    child = int(read(out))
    waiter = start(lease_env, "--gpus", "0", "--", "true")
    time.sleep(0.3)
    holder.kill()
    holder.wait(10)
    assert waiter.wait(20) == 0, waiter.stderr.read() if waiter.stderr else ""
    # the command died with its lease (PR_SET_PDEATHSIG), and its record went with it
    wait_for(lambda: not Path(f"/proc/{child}").exists() or b"Z" in Path(f"/proc/{child}/stat").read_bytes()[-60:],
             what="the command to die")
    assert holders(lease_env["FTKIT_LEASE_DIR"]) == []


def test_bad_arguments_exit_2(lease_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_LEASE_DIR", lease_env["FTKIT_LEASE_DIR"])
    cases = [
        (["--", "true"], "--gpus is required"),
        (["--gpus", "0,x", "--", "true"], "not a GPU index"),
        (["--gpus", "0"], "no command"),
        (["--gpus", "0", "--no-wait", "--timeout", "3", "--", "true"], "exclude each other"),
        (["--gpus", "0", "--sleep-url", "http://127.0.0.1:1", "--", "true"], "--sleep-url is for --role serve"),
        (["--gpus", "0", "--role", "serve", "--sleep-url", "localhost:8000", "--", "true"], "not a loopback http URL"),
        (["--gpus", "0", "--max-power-w", "1=300", "--", "true"], "GPU 1 is not among --gpus"),
        (["--gpus", "0", "--max-power-w", "lots", "--", "true"], "watts must be a number"),
        (["--gpus", "0", "--role", "boss", "--", "true"], "boss"),
        (["--show", "true"], "--show takes no command"),
    ]
    for args, message in cases:
        r = run_cli("lease", *args)
        assert r.code == 2, (args, r.code, r.err)
        assert message in r.err, (args, r.err)
    # an unusable lease directory: exit 2 and what is wrong, nothing runs
    bad = Path(lease_env["FTKIT_LEASE_DIR"]).parent / "not-a-dir"
    bad.write_text("")
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(bad))
    r = run_cli("lease", "--gpus", "0", "--", "true")
    assert r.code == 2 and "cannot create it" in r.err
    odd = Path(lease_env["FTKIT_LEASE_DIR"]).parent / "odd"
    (odd / "gpu-0.lock").mkdir(parents=True)
    r = run_cli("lease", "--lease-dir", str(odd), "--gpus", "0", "--", "true")
    assert r.code == 2 and "cannot use lock file gpu-0.lock" in r.err


# -- exit codes and signals -------------------------------------------------------------------


def test_exit_code_passthrough(lease_env: dict[str, str]) -> None:
    assert lease(lease_env, "--gpus", "0", "--", PY, "-c", "raise SystemExit(7)").returncode == 7
    assert lease(lease_env, "--gpus", "0", "--", PY, "-c", "import os; os.kill(os.getpid(), 9)").returncode == 137
    missing = lease(lease_env, "--gpus", "0", "--", "no-such-command-ftkit")
    assert missing.returncode == 127 and "not found" in missing.stderr
    assert lease(lease_env, "--gpus", "none", "--", PY, "-c", "raise SystemExit(4)").returncode == 4
    assert holders(lease_env["FTKIT_LEASE_DIR"]) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signals_are_forwarded_and_the_code_comes_back(lease_env: dict[str, str], tmp_path: Path,
                                                       sig: signal.Signals) -> None:
    out = tmp_path / "got"
    script = (f"import signal, sys, time\n"
              f"def h(n, f):\n    open({str(out)!r}, 'w').write(str(n)); sys.exit(5)\n"
              f"signal.signal({int(sig)}, h)\nopen({str(out)!r}, 'w').write('ready')\n"
              f"while True: time.sleep(0.02)\n")
    p = start({**lease_env, "FTKIT_SERVICE": "sig"}, "--gpus", "0", "--", PY, "-c", script)
    wait_for(lambda: read(out) == "ready", what="the command")
    p.send_signal(sig)
    assert p.wait(20) == 5
    assert read(out) == str(int(sig))


def test_leftover_processes_are_stopped_before_the_gpu_is_let_go(lease_env: dict[str, str], tmp_path: Path) -> None:
    pidfile = tmp_path / "bg"
    r = lease(lease_env, "--gpus", "0", "--", "sh", "-c", f"sleep 60 & echo $! > {pidfile}; exit 3")
    assert r.returncode == 3 and "left processes behind" in r.stderr
    bg = int(read(pidfile))
    assert not Path(f"/proc/{bg}").exists()


def test_nested_lease_runs_under_its_parent(lease_env: dict[str, str]) -> None:
    inner = f"{PY} -m ftkit lease --gpus 0 -- {PY} -c 'raise SystemExit(6)'"
    r = lease(lease_env, "--gpus", "0,1", "--timeout", "20", "--", "sh", "-c", inner, timeout=40)
    assert r.returncode == 6, r.stderr


# -- serve preemption -------------------------------------------------------------------------


def _engine(tmp_path: Path, log: Path, mode: str = "serve", port: int = 0) -> list[str]:
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    return [PY, str(script), str(log), mode, str(port)]


def test_serve_yields_to_train_and_comes_back(lease_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    serve = start({**lease_env, "FTKIT_SERVICE": "vllm"}, "--gpus", "0", "--role", "serve", "--grace", "5", "--",
                  *_engine(tmp_path, log))
    try:
        wait_for(lambda: "up" in read(log), what="the engine")
        trained = tmp_path / "trained"
        t = lease({**lease_env, "FTKIT_SERVICE": "train"}, "--gpus", "0", "--", PY, "-c",
                  f"open({str(trained)!r}, 'w').write(open({str(log)!r}).read())")
        assert t.returncode == 0, t.stderr
        assert read(trained).splitlines() == [read(trained).splitlines()[0], "term"]  # stopped before training ran
        wait_for(lambda: read(log).count("up ") == 2, what="the engine to come back")
        assert holding(lease_env, "vllm")
    finally:
        serve.terminate()
        rc = serve.wait(20)
    assert rc == 0  # SIGTERM forwarded to the engine, which exited 0
    err = serve.stderr.read() if serve.stderr else ""
    assert "stopping the engine (grace 5 s) to yield the GPUs to train 'train'" in err
    assert "GPUs back: engine restarted" in err


def test_stubborn_engine_is_killed_after_the_grace(lease_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    serve = start(lease_env, "--gpus", "0", "--role", "serve", "--grace", "0.5", "--",
                  *_engine(tmp_path, log, "stubborn"))
    try:
        wait_for(lambda: "up" in read(log), what="the engine")
        first = int(read(log).split()[1])
        # the training command runs only once the engine that ignored SIGTERM is gone
        t = lease(lease_env, "--gpus", "0", "--", PY, "-c", f"import os; raise SystemExit(os.path.exists('/proc/{first}'))")
        assert t.returncode == 0, t.stderr
        assert "term" not in read(log)
        wait_for(lambda: read(log).count("up ") == 2, what="the engine to come back")
    finally:
        serve.kill()
        serve.wait(10)


def test_serve_does_not_take_the_gpus_back_while_train_waits(lease_env: dict[str, str], tmp_path: Path) -> None:
    log, order = tmp_path / "engine.log", tmp_path / "order"
    t1 = start({**lease_env, "FTKIT_SERVICE": "t1"}, "--gpus", "0", "--", PY, "-c",
               f"import time; open({str(order)!r}, 'a').write('t1\\n'); time.sleep(1.5)")
    wait_for(lambda: holding(lease_env, "t1"), what="t1")
    serve = start(lease_env, "--gpus", "0", "--role", "serve", "--grace", "2", "--", *_engine(tmp_path, log))
    time.sleep(0.3)
    t2 = start({**lease_env, "FTKIT_SERVICE": "t2"}, "--gpus", "0", "--", PY, "-c",
               f"open({str(order)!r}, 'a').write('t2\\n')")
    try:
        assert t1.wait(20) == 0 and t2.wait(20) == 0
        wait_for(lambda: "up" in read(log), what="the engine")
        assert read(order).split() == ["t1", "t2"]  # t2 ran before the engine ever started
    finally:
        serve.terminate()
        serve.wait(20)


def test_serve_sleeps_and_wakes_the_engine_with_sleep_url(lease_env: dict[str, str], tmp_path: Path) -> None:
    log, port = tmp_path / "engine.log", free_port()
    serve = start(lease_env, "--gpus", "0", "--role", "serve", "--sleep-url", f"http://127.0.0.1:{port}",
                  "--", *_engine(tmp_path, log, port=port))
    try:
        wait_for(lambda: "up" in read(log), what="the engine")
        time.sleep(0.3)  # its HTTP server
        seen = tmp_path / "seen"
        t = lease(lease_env, "--gpus", "0", "--", PY, "-c",
                  f"open({str(seen)!r}, 'w').write(open({str(log)!r}).read())")
        assert t.returncode == 0, t.stderr
        assert read(seen).splitlines()[1:] == ["http /sleep?level=1"]  # asleep, not stopped, while training
        wait_for(lambda: "http /wake_up" in read(log), what="wake_up")
        assert read(log).count("up ") == 1  # the same engine process, never restarted
    finally:
        serve.terminate()
        serve.wait(20)
    assert "engine asleep; yielding the GPUs" in (serve.stderr.read() if serve.stderr else "")


def test_failed_sleep_falls_back_to_stopping(lease_env: dict[str, str], tmp_path: Path) -> None:
    log, port = tmp_path / "engine.log", free_port()
    serve = start(lease_env, "--gpus", "0", "--role", "serve", "--sleep-url", f"http://127.0.0.1:{port}",
                  "--grace", "5", "--", *_engine(tmp_path, log, "sleepfail", port))
    try:
        wait_for(lambda: "up" in read(log), what="the engine")
        time.sleep(0.3)
        assert lease(lease_env, "--gpus", "0", "--", "true").returncode == 0
        assert "term" in read(log)
        wait_for(lambda: read(log).count("up ") == 2, what="the engine to restart")
    finally:
        serve.terminate()
        serve.wait(20)
    assert "stopping it instead" in (serve.stderr.read() if serve.stderr else "")


# -- backstops (simulated NVML) ---------------------------------------------------------------


@pytest.fixture
def sim_env(lease_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    from ftkit.gpu.nvml import SimulatedNvml

    state = tmp_path / "gpus.json"
    SimulatedNvml(["RTX 4090", "RTX 4090"], str(state)).inventory()  # writes the state file
    return {**lease_env, "FTKIT_SIMULATED_GPUS": "RTX 4090,RTX 4090", "FTKIT_SIMULATED_GPUS_STATE": str(state),
            "FTKIT_LEASE_SETTLE_S": "0.5"}


def _sim_state(env: dict[str, str], **changes: object) -> None:
    path = Path(env["FTKIT_SIMULATED_GPUS_STATE"])
    state = json.loads(path.read_text())
    for k, v in changes.items():
        if k == "limits":
            for i, w in v.items():  # type: ignore[attr-defined]
                state["gpus"][i]["power_limit_w"] = w
        else:
            state[k] = v
    path.write_text(json.dumps(state))


def test_simulated_gpus_lock_by_uuid_too(sim_env: dict[str, str]) -> None:
    r = lease(sim_env, "--gpus", "1", "--", "true")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in Path(sim_env["FTKIT_LEASE_DIR"]).glob("gpu-*.lock"))
    assert names == ["gpu-1.lock", "gpu-GPU-simulated-1.lock"]


def test_foreign_process_is_refused(sim_env: dict[str, str]) -> None:
    _sim_state(sim_env, processes={"0": [[4242, 20480]]})
    r = lease(sim_env, "--gpus", "0", "--", "true")
    assert r.returncode == 78, r.stderr
    assert "GPU 0 (GPU-simulated-0): pid 4242 holds 20480 MiB" in r.stderr
    assert "host pids" in r.stderr
    assert lease(sim_env, "--gpus", "1", "--", "true").returncode == 0  # the other GPU is clean


def test_a_sleeping_engine_of_the_lease_is_tolerated(sim_env: dict[str, str]) -> None:
    _sim_state(sim_env, processes={"0": [[4242, 900]]})
    lease_dir = Path(sim_env["FTKIT_LEASE_DIR"])
    lease_dir.mkdir(parents=True, exist_ok=True)
    party = new_party("serve", gpus=[{"index": 0}], locks=["gpu-0.lock", "gpu-GPU-simulated-0.lock"],
                      command=["vllm"], service="vllm", state="yielded")
    party.sleeping, party.gpu_pids = True, [4242]
    presence = Presence(lease_dir, party)
    try:
        r = lease(sim_env, "--gpus", "0", "--", "true")
        assert r.returncode == 0, r.stderr
    finally:
        presence.close()
    assert lease(sim_env, "--gpus", "0", "--", "true").returncode == 78  # without it: foreign


def test_power_backstop(sim_env: dict[str, str]) -> None:
    _sim_state(sim_env, limits={0: 450.0, 1: 300.0})
    r = lease(sim_env, "--gpus", "0,1", "--max-power-w", "0=350,1=300", "--", "true")
    assert r.returncode == 78
    assert "GPU 0 (GPU-simulated-0) enforces 450 W, above the cap of 350 W" in r.stderr
    assert "ftkit power set --gpus 0 --watts 350" in r.stderr and "GPU 1" not in r.stderr.split("hint")[0]
    r = lease(sim_env, "--gpus", "0,1", "--max-power-w", "300", "--", "true")
    assert r.returncode == 78 and "ftkit power set --gpus 0 --watts 300" in r.stderr
    assert lease(sim_env, "--gpus", "0,1", "--max-power-w", "0=450,1=300", "--", "true").returncode == 0
    no_nvml = {k: v for k, v in sim_env.items() if not k.startswith("FTKIT_SIMULATED")}
    r = lease(no_nvml, "--gpus", "0", "--max-power-w", "350", "--", "true")
    assert r.returncode == 0 and "power backstop skipped" in r.stderr


def test_show_lists_nobody(lease_env: dict[str, str]) -> None:
    r = lease(lease_env, "--show")
    assert r.returncode == 0 and "nobody holds or waits" in r.stdout


def test_hold_in_process(lease_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit.errors import LeaseBusy
    from ftkit.lease import hold

    for k in ("FTKIT_SIMULATED_GPUS", "FTKIT_SIMULATED_GPUS_STATE", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    d = lease_env["FTKIT_LEASE_DIR"]
    with hold([0], lease_dir=d, service="runner") as party:
        assert party.state == "holding" and holding(lease_env, "runner")
        r = lease(lease_env, "--gpus", "0", "--no-wait", "--", "true")
        assert r.returncode == 75 and "held by train 'runner'" in r.stderr
        with pytest.raises(LeaseBusy, match="held by train 'runner'"), hold([0], lease_dir=d, timeout=0):
            pass
        t0 = time.monotonic()
        with pytest.raises(LeaseBusy, match="gave up after 0.2 s"), hold([1, 0], lease_dir=d, timeout=0.2):
            pass
        assert time.monotonic() - t0 < 5
    assert holders(d) == []
    assert lease(lease_env, "--gpus", "0,1", "--no-wait", "--", "true").returncode == 0


def test_unreadable_simulated_state_falls_back_to_index_keys(lease_env: dict[str, str], tmp_path: Path) -> None:
    env = {**lease_env, "FTKIT_SIMULATED_GPUS": "RTX 4090", "FTKIT_SIMULATED_GPUS_STATE": str(tmp_path / "no" / "s.json")}
    r = lease(env, "--gpus", "0", "--", "true")
    assert r.returncode == 0, r.stderr
    assert "locking by host index only" in r.stderr
