"""What every step's container runs first (ftkit.run.incontainer): threads sized to the
container's CPU allowance, and - in a stack plain `docker compose` runs - the journal the
containers keep in the stack's run directory (ftkit.run.stackjournal), which `ftkit status`
and `ftkit report` read as they read a run `ftkit up` drove.

Real processes throughout (the journal's writers are separate processes sharing one file);
the docker-marked test runs the prefix in a real container with a CPU quota."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftkit.run import incontainer, stackjournal
from tests.conftest import ROOT, run_cli

PY = sys.executable


# -- threads -----------------------------------------------------------------------------------------


def _cgroup_v2(tmp: Path, levels: dict[str, str]) -> tuple[Path, Path]:
    root = tmp / "cg"
    for rel, cpu_max in levels.items():
        d = root / rel.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp / "proc-cgroup"
    proc.write_text("0::" + max(levels, key=len) + "\n")
    return root, proc


def test_cpu_quota_from_cgroup_v2_takes_the_tightest_level(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, {"/": "max 100000", "/a": "400000 100000", "/a/b": "150000 100000"})
    assert incontainer.cpu_quota(root, proc) == 1.5
    root, proc = _cgroup_v2(tmp_path / "x", {"/": "max 100000", "/a": "max 100000"})
    assert incontainer.cpu_quota(root, proc) is None


def test_cpu_quota_from_cgroup_v1_in_a_container(tmp_path: Path) -> None:
    """docker's v1 namespace: /proc/self/cgroup names the host's path, the mount is the container's own."""
    mount = tmp_path / "cg" / "cpu,cpuacct"
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text("200000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert incontainer.cpu_quota(tmp_path / "cg", proc) == 2.0
    (mount / "cpu.cfs_quota_us").write_text("-1\n")
    assert incontainer.cpu_quota(tmp_path / "cg", proc) is None


def _topology(tmp: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cores.items():
        d = tmp / "sys" / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return tmp / "sys"


def test_allowance_is_physical_cores_of_the_affinity_within_the_quota(tmp_path: Path) -> None:
    # 8 logical CPUs: 4 cores with two hyper-threads each
    sysfs = _topology(tmp_path, {c: (0, c % 4) for c in range(8)})
    assert incontainer.cpu_allowance(set(range(8)), None, sysfs=sysfs) == 4
    assert incontainer.cpu_allowance({0, 4}, None, sysfs=sysfs) == 1  # one core's two threads
    assert incontainer.cpu_allowance(set(range(8)), 2.5, sysfs=sysfs) == 2  # a thread over the quota is throttled
    assert incontainer.cpu_allowance(set(range(8)), 0.5, sysfs=sysfs) == 1
    assert incontainer.cpu_allowance({0, 1}, None, sysfs=tmp_path / "none") == 2  # no topology: CPUs


def test_thread_env_leaves_what_someone_set() -> None:
    assert incontainer.thread_env({}, 3) == {"OMP_NUM_THREADS": "3"}
    assert incontainer.thread_env({"OMP_NUM_THREADS": "8"}, 3) == {}
    assert incontainer.thread_env({"OMP_NUM_THREADS": " "}, 3) == {"OMP_NUM_THREADS": "3"}


def _prefix(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([PY, "-m", "ftkit.run.incontainer", "--", *cmd], capture_output=True, text=True,
                          env={**full, **(env or {})}, timeout=60, check=False)


def test_prefix_sets_threads_then_execs_the_command() -> None:
    show = "import os, sys; print(os.environ.get('OMP_NUM_THREADS'), os.getpid()); sys.exit(7)"
    proc = _prefix(PY, "-c", show)
    assert proc.returncode == 7, proc.stderr  # exec: the command's own exit status
    assert proc.stdout.split()[0] == str(incontainer.cpu_allowance(quota=incontainer.cpu_quota()))
    assert _prefix(PY, "-c", show, env={"OMP_NUM_THREADS": "5"}).stdout.split()[0] == "5"  # the recipe's wins
    assert _prefix("/no/such/engine").returncode == 127


def test_the_exec_command_gets_sigpipe_back() -> None:
    """exec keeps ignored signals ignored, and Python ignores SIGPIPE (and SIGXFSZ): `yes | head -1`
    must end as in a shell, by the signal, not with `Broken pipe` on stderr."""
    proc = _prefix("sh", "-c", "yes | head -1; trap")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "y", proc.stderr
    assert "Broken pipe" not in proc.stderr and "PIPE" not in proc.stdout, proc.stdout + proc.stderr


def test_processes_of_one_container_share_its_allowance() -> None:
    """accelerate launch with one process per GPU: each gets its share (torchrun would give each
    the whole OMP_NUM_THREADS), never less than one."""
    from ftkit.plan.container import container_spec, local_processes
    from ftkit.prepare import prepare
    from tests.conftest import RECIPES

    plan = prepare(str(RECIPES / "mistral-small-24b-qlora-2x24gb.yaml"), str(RECIPES / "machines" / "zorac.yaml"),
                   run_dir="/runs/x", executor="docker").plan
    train, merge = plan.step("train"), plan.step("merge")
    assert len(train.gpus) == 2 and local_processes(train, train.argv) == 2 and local_processes(merge, merge.argv) == 1
    assert container_spec(train, plan).command[3:6] == ["--processes", "2", "--"]
    assert "--processes" not in container_spec(merge, plan).command
    show = "import os; print(os.environ.get('OMP_NUM_THREADS'))"
    full = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([PY, "-m", "ftkit.run.incontainer", "--processes", "2", "--", PY, "-c", show],
                          capture_output=True, text=True, env=full, timeout=60, check=False)
    allowance = incontainer.cpu_allowance(quota=incontainer.cpu_quota())
    assert proc.stdout.strip() == str(max(1, allowance // 2)), proc.stderr


@pytest.mark.docker
def test_a_container_with_a_cpu_quota_gets_that_many_threads() -> None:
    """The case that made a compose run's training slow: the container may use 1 CPU, torch and
    accelerate see every core of the host."""
    from tests.conftest import _docker_reason

    reason = _docker_reason()
    if reason:
        pytest.skip(reason)
    base = os.environ.get("FTKIT_TEST_BASE_IMAGE", "ftkit-test/bookworm-python:latest")
    show = "import os; print('threads', os.environ.get('OMP_NUM_THREADS'), 'sees', os.cpu_count())"
    proc = subprocess.run(["docker", "run", "--rm", "--cpus=1", "-v", f"{ROOT / 'toolkit'}:/src:ro", "-e",
                           "PYTHONPATH=/src", base, "python3", "-m", "ftkit.run.incontainer", "--", "python3", "-c",
                           show], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["threads", "1"], proc.stdout
    if int(proc.stdout.split()[3]) > 1:
        assert "OMP_NUM_THREADS=1: this container's CPU quota 1" in proc.stderr


# -- the journal of a compose-driven run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def _stack_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ftkit compose` once per module (5-8 s each time on two cores); each test gets a copy.
    The copy sits as deep as the original, so its relative paths mean the same."""
    out = tmp_path_factory.mktemp("stack") / "stack"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FTKIT_LEASE_DIR", raising=False)
        mp.delenv("FTKIT_SIMULATED_GPUS", raising=False)
        result = run_cli("compose", "recipes/quickstart.yaml", "--machine", "recipes/machines/cpu-docker.yaml",
                         "-o", str(out), cwd=ROOT)
    assert result.code == 0, result.err
    assert f"ftkit status {out} && ftkit report {out}/run" in result.out  # where the run's journal is read
    return out


@pytest.fixture
def stack(_stack_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("FTKIT_LEASE_DIR", raising=False)
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    out = tmp_path / "stack"
    shutil.copytree(_stack_once, out, symlinks=True)
    return out


def _model(d: str) -> str:
    return f"mkdir -p {d} && echo '{{}}' > {d}/config.json && echo w > {d}/model.safetensors"


def outputs(run: Path) -> dict[str, str]:
    """Stand-in commands that leave what each step of the quickstart must leave."""
    summary = json.dumps({"passed": True, "models": {"base": {"accuracy": 0.0}, "merged": {"accuracy": 1.0}}})
    metrics = "\\n".join(json.dumps({"step": s, "loss": 2.0 / s, "samples_per_s": 10.0}) for s in (20, 40))
    train = run / "steps" / "train"
    return {
        "tiny-model": _model(str(run / "model")),
        "train": (f"mkdir -p {train}/adapter && echo '{{}}' > {train}/adapter/adapter_config.json && echo w > "
                  f"{train}/adapter/adapter_model.safetensors && printf '{metrics}\\n' > {train}/metrics.jsonl"),
        "merge": _model(str(run / "steps" / "merge" / "model")),
        "eval": f"mkdir -p {run}/steps/eval && echo '{summary}' > {run}/steps/eval/summary.json",
    }


def step(run: Path, step_id: str, shell: str) -> int:
    return incontainer.run_journaled(run, step_id, ["sh", "-c", shell])


def state(run: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run / "state.json").read_text())


def test_compose_writes_the_plan_the_containers_journal_against(stack: Path) -> None:
    plan = json.loads((stack / "run" / "plan.json").read_text())
    assert plan["run_dir"] == "${FTKIT_RUN_DIR}" and plan["python"] == "python"
    mounts = {m["container"]: m["host"] for s in plan["steps"] for m in s["mounts"]}
    assert mounts["/ftkit/run"] == "${FTKIT_RUN_DIR}" and mounts["/ftkit/inputs/dataset/quickstart-train.jsonl"] == \
        "${FTKIT_INPUT_DATASET}"
    assert str(stack) not in (stack / "run" / "plan.json").read_text()  # the same wherever the stack lies
    assert not (stack / "run" / "state.json").exists()  # the first container starts the journal
    result = run_cli("status", str(stack))
    assert result.code == 2 and "no step has started in yet" in result.err


def test_a_compose_run_is_journaled_and_reported_like_an_up_run(stack: Path) -> None:
    run = stack / "run"
    made = outputs(run)
    assert step(run, "tiny-model", made["tiny-model"]) == 0
    assert step(run, "train", made["train"] + " && echo 'ValueError: the trainer says why' >&2 && exit 3") == 3
    st = state(run)
    assert st["driver"] == "compose" and st["status"] == "failed" and st["failed_step"] == "train"
    assert st["steps"]["tiny-model"]["status"] == "succeeded" and st["steps"]["tiny-model"]["attempt"] == 1
    assert st["steps"]["train"]["error"] == "exited with code 3: ValueError: the trainer says why (log: logs/train.log)"
    assert st["steps"]["power"]["status"] == "skipped" and "host step" in st["steps"]["power"]["reason"]
    assert st["order"] == ["tiny-model", "power", "train", "merge", "serve", "eval", "power-restore-final"]
    assert "the trainer says why" in (run / "logs" / "train.log").read_text()
    result = run_cli("status", str(stack))  # the stack directory or its run/
    assert result.code == 0, result.err
    assert "failed" in result.out and "ValueError: the trainer says why" in result.out and "STALE" not in result.out

    # `docker compose --profile train up` again: the whole chain, a new pass in the same directory
    assert step(run, "tiny-model", made["tiny-model"]) == 0
    st = state(run)
    assert st["status"] == "running" and st["steps"]["train"] == {"status": "pending"}
    for sid in ("train", "merge", "eval"):
        assert step(run, sid, made[sid]) == 0, state(run)["steps"][sid]
    st = state(run)
    assert st["status"] == "succeeded" and st["finished"] and "failed_step" not in st
    assert all(st["steps"][s]["status"] == "succeeded" for s in ("tiny-model", "train", "merge", "eval"))
    assert json.loads((run / "env.json").read_text())["ftkit"]  # what the steps ran on
    result = run_cli("status", str(run), "--json")
    assert result.code == 0 and json.loads(result.out)["stale"] is False

    pytest.importorskip("matplotlib")
    result = run_cli("report", str(run))
    assert result.code == 0, result.err
    md = (run / "report" / "report.md").read_text()
    assert "succeeded" in md and "train" in md


def test_a_step_that_exits_0_without_its_output_failed(stack: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """...and its container exits 1: compose's service_completed_successfully must not start the
    next step on it (`ftkit up` stops the chain there)."""
    run = stack / "run"
    assert step(run, "tiny-model", "true") == 1
    st = state(run)
    assert st["steps"]["tiny-model"]["status"] == "failed" and st["steps"]["tiny-model"]["exit_code"] == 0
    assert st["steps"]["tiny-model"]["error"] == "the step exited 0 but left no model at model"
    assert "tiny-model: the step exited 0 but left no model at model: exit status 1" in capfd.readouterr().err
    assert step(run, "tiny-model", outputs(run)["tiny-model"]) == 0


def _journaled_in_subprocess(run: Path, step_id: str, shell: str) -> subprocess.Popen[str]:
    code = f"import sys; from pathlib import Path; from ftkit.run.incontainer import run_journaled; " \
           f"sys.exit(run_journaled(Path({str(run)!r}), {step_id!r}, ['sh', '-c', {shell!r}]))"
    return subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(run: Path, step_id: str, status: str, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "state.json").is_file() and state(run)["steps"].get(step_id, {}).get("status") == status:
            return state(run)
        time.sleep(0.05)
    raise AssertionError(f"{step_id} never {status}: {state(run) if (run / 'state.json').is_file() else None}")


def test_a_server_runs_until_compose_stops_it(stack: Path) -> None:
    run = stack / "run"
    made = outputs(run)
    for sid in ("tiny-model", "train", "merge", "eval"):
        assert step(run, sid, made[sid]) == 0
    server = _journaled_in_subprocess(run, "serve", "echo serving; exec sleep 60")
    st = _wait_for(run, "serve", "running")
    assert st["status"] == "succeeded" and st["left_running"][0].startswith("serve (compose service serve")
    assert st["steps"]["serve"]["server"] is True
    from ftkit.run.stale import is_stale

    assert not is_stale(run)
    server.send_signal(signal.SIGTERM)  # docker compose stop: tini passes it on
    assert server.wait(timeout=30) == 128 + signal.SIGTERM
    st = state(run)
    assert st["steps"]["serve"]["status"] == "succeeded" and st["steps"]["serve"]["message"] == "stopped (SIGTERM)"
    assert st["left_running"] == [] and st["status"] == "succeeded"


def test_a_one_shot_step_stopped_is_interrupted_and_the_run_not_stale(stack: Path) -> None:
    run = stack / "run"
    assert step(run, "tiny-model", outputs(run)["tiny-model"]) == 0
    train = _journaled_in_subprocess(run, "train", "exec sleep 60")
    st = _wait_for(run, "train", "running")
    assert st["status"] == "running"
    from ftkit.run.stale import is_stale

    assert not is_stale(run)  # no ftkit drives it: docker compose does
    result = run_cli("down", str(run))
    assert result.code == 2 and "docker compose drives this run" in result.err
    assert train.poll() is None  # `ftkit down` stopped nothing of a compose project
    train.send_signal(signal.SIGTERM)
    assert train.wait(timeout=30) == 128 + signal.SIGTERM
    st = state(run)
    assert st["status"] == "interrupted" and st["failed_step"] == "train"
    assert st["steps"]["train"]["message"].startswith("stopped by SIGTERM")
    result = run_cli("up", "--resume", str(run))
    assert result.code == 2 and "docker compose drives" in result.err


def test_a_stop_before_the_command_starts_is_journaled_and_nothing_starts(stack: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """docker compose stop in the moment between the journal's start and the command's."""
    run = stack / "run"
    real, before = stackjournal.started, signal.getsignal(signal.SIGTERM)

    def started_then_stopped(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: run_journaled's handler takes it

    monkeypatch.setattr(stackjournal, "started", started_then_stopped)
    marker = run / "started-anyway"
    assert step(run, "tiny-model", f"touch {marker}") == 128 + signal.SIGTERM
    assert not marker.exists()
    entry = state(run)["steps"]["tiny-model"]
    assert entry["status"] == "interrupted" and entry["message"].startswith("stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == before  # this process's own handler is back


def test_concurrent_containers_never_lose_an_entry(stack: Path) -> None:
    """Writers in separate processes at once (a server and the chain, several stacks' worth):
    every start and end lands, state.json is whole JSON at every moment."""
    run = stack / "run"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ftkit.run import stackjournal
        run, sid = Path({str(run)!r}), sys.argv[1]
        for _ in range(15):
            stackjournal.started(run, sid, ["x"], say=print)
            stackjournal.ended(run, sid, 0, [], "", say=print)
    """)
    procs = [subprocess.Popen([PY, "-c", script, f"extra-{i}"]) for i in range(6)]
    torn = 0
    while any(p.poll() is None for p in procs):
        try:
            json.loads((run / "state.json").read_text())
        except FileNotFoundError:
            pass
        except ValueError:
            torn += 1
    assert all(p.wait() == 0 for p in procs)
    st = state(run)
    assert torn == 0
    for i in range(6):
        assert st["steps"][f"extra-{i}"]["attempt"] == 15 and st["steps"][f"extra-{i}"]["status"] == "succeeded"


def test_a_regenerated_plan_starts_a_new_journal(stack: Path) -> None:
    run = stack / "run"
    assert step(run, "tiny-model", "true") == 1
    assert state(run)["steps"]["tiny-model"]["status"] == "failed"
    plan = json.loads((run / "plan.json").read_text())
    plan["warnings"] = [*plan["warnings"], "regenerated"]
    (run / "plan.json").write_text(json.dumps(plan))
    step(run, "train", "true")
    st = state(run)
    assert st["steps"]["tiny-model"] == {"status": "pending"}  # the old plan's journal is not this one's


def test_settle_counts_servers_only_when_they_fail() -> None:
    st = {"order": ["a", "b", "s"], "steps": {"a": {"status": "succeeded", "finished": "2026-01-01T00:00:01+00:00"},
                                           "b": {"status": "pending"}, "s": {"status": "failed", "error": "boom"}}}
    stackjournal.settle(st, ["a", "b"], ["s"])
    assert st["status"] == "failed" and st["failed_step"] == "s" and st["message"] == "boom"
    st["steps"]["s"] = {"status": "running", "container": "c1"}
    stackjournal.settle(st, ["a", "b"], ["s"])
    assert st["status"] == "running" and st["finished"] is None and st["left_running"] == [
        "s (compose service s, container c1)"]
    st["steps"] = {"s": {"status": "running"}}
    stackjournal.settle(st, ["a", "b"], ["s"])
    assert st["status"] == "running"  # only the server is up
    st["steps"] = {}
    stackjournal.settle(st, ["a", "b"], ["s"])
    assert st["status"] == "pending"


# -- a journal that goes wrong never stops or changes the step (review) --------------------------------


DAMAGED = {
    "attempt text": lambda st: st["steps"]["train"].update(attempt="2x"),
    "attempt a list": lambda st: st["steps"]["train"].update(attempt=[1]),
    "order holds an object, no plan.json": lambda st: st.update(order=[{"a": 1}, "train"], plan_sha256=None),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_journal_never_stops_or_changes_the_step(stack: Path, case: str,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """Valid JSON of the wrong shape in state.json (a hand edit, a bug): the step runs, its exit
    status is its own, and the journal goes on."""
    run = stack / "run"
    made = outputs(run)
    assert step(run, "tiny-model", made["tiny-model"]) == 0 and step(run, "train", made["train"]) == 0
    st = state(run)
    DAMAGED[case](st)
    if "plan.json" in case:
        (run / "plan.json").unlink()
    (run / "state.json").write_text(json.dumps(st))
    marker = run / "ran"
    assert step(run, "train", f"touch {marker}; exit 3") == 3
    assert marker.exists()
    entry = state(run)["steps"]["train"]
    assert entry["status"] == "failed" and entry["exit_code"] == 3
    assert "Traceback" not in capfd.readouterr().err


def test_a_journal_that_raises_is_one_line_and_the_status_stays_the_commands(
        stack: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    run = stack / "run"

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in the journal\nsecond line")

    monkeypatch.setattr(stackjournal, "settle", broken)  # every write fails, the fresh retry too
    marker = run / "ran"
    assert step(run, "tiny-model", f"touch {marker}; exit 3") == 3
    assert step(run, "tiny-model", "true") == 0  # not 1: the journal could not say it failed
    err = capfd.readouterr().err
    assert marker.exists() and "Traceback" not in err and "second line" not in err
    assert "(RuntimeError: a bug in the journal); starting a fresh journal" in err
    assert "(RuntimeError: a bug in the journal); the step runs unjournaled" in err
    monkeypatch.undo()
    monkeypatch.setattr(stackjournal, "started", broken)  # the caller's own guard
    monkeypatch.setattr(stackjournal, "ended", broken)
    assert step(run, "tiny-model", "exit 4") == 4
    err = capfd.readouterr().err
    assert "journal (start) failed: RuntimeError: a bug in the journal; the step runs on" in err
    assert "journal (end) failed" in err and "Traceback" not in err


def test_only_a_stop_signal_makes_a_step_interrupted(stack: Path) -> None:
    """SIGUSR1 (and SIGQUIT, SIGUSR2) go to the command, which may handle them and go on: the
    step is not stopped by them, and is journaled as it ended."""
    run = stack / "run"
    ready = run / "ready"
    made = outputs(run)["tiny-model"]
    shell = f"trap '{made}; exit 0' USR1; touch {ready}; while :; do sleep 0.1; done"
    proc = _journaled_in_subprocess(run, "tiny-model", shell)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the command never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    entry = state(run)["steps"]["tiny-model"]
    assert entry["status"] == "succeeded" and "message" not in entry, entry
