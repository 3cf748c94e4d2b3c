"""Fault injection on `ftkit up`: whatever breaks, the machine is put back.

Every test ends with the simulated GPUs' limits at their TRUE originals (read from the
simulated backend's state file, not from ftkit's own journal), the machine's serving
service answering again (the previous model), a journal that says what happened, no
process or container of the run left, and - where the run can be completed - `ftkit up
--resume` completing it. See faultkit.py for the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require, run_label

require("trl")

from tests.e2e.faultkit import ORIGINALS, STANDIN, Machine, answers  # noqa: E402

pytestmark = pytest.mark.slow
EXECUTORS = ["local", pytest.param("docker", marks=pytest.mark.docker)]


@pytest.fixture
def machine_factory(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    made: list[Machine] = []

    def make(executor: str = "local", **kw) -> Machine:  # type: ignore[no-untyped-def]
        if executor == "docker":
            request.getfixturevalue("cpu_images")  # the CPU images, built once per session
        m = Machine(tmp_path, executor, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


def finish(proc: subprocess.Popen[str], timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def resume_completes(m: Machine) -> dict:  # type: ignore[type-arg]
    run = m.run_dir()
    code, out, err = finish(m.up("--resume", str(run)))
    assert code == 0, err[-3000:]
    st = m.state()
    assert st["status"] == "succeeded" and st["finished"], st
    assert len(st["resumes"]) >= 1
    m.assert_machine_back()
    m.assert_nothing_left()
    return st


def sim_change(m: Machine, **fields) -> None:  # type: ignore[no-untyped-def]
    """Inject a fault into the simulated GPUs (under the backend's own lock)."""
    from ftkit.gpu.nvml import SimulatedNvml

    SimulatedNvml(["RTX 4090", "RTX 3090 Ti"], str(m.sim))._sync(lambda st: st.update(fields))


# The docker executor's signal path is covered by the SIGKILL and container-kill tests below
# (the tether and `docker stop`); SIGINT runs once, locally, to keep CI inside its time.
@pytest.mark.parametrize("executor", ["local"])
def test_sigint_during_training(machine_factory, executor: str) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(executor, serve=False, max_steps=60)
    m.start_service()
    proc = m.up()
    m.wait_checkpoint(proc)
    assert m.limits() == {0: 300.0, 1: 300.0}
    assert not answers(m.service_port), "the serving service should have yielded GPU 0 to training"
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err[-3000:]
    st = m.state()
    assert st["status"] == "interrupted" and st["signal"] == "Ctrl-C" and st["finished"]
    assert st["steps"]["train"]["status"] == "interrupted"
    assert st["steps"]["merge"]["status"] == "skipped"
    assert st["steps"]["power-restore-final"]["status"] == "succeeded"
    m.assert_machine_back()
    m.assert_nothing_left()
    st = resume_completes(m)
    assert st["steps"]["train"]["summary"]["resumed_from"], "training did not continue from its checkpoint"
    assert st["steps"]["tiny-model"]["attempt"] == 1  # finished steps are not redone


def test_sigterm_twice_during_cleanup(machine_factory) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(serve=False, max_steps=60)
    m.start_service()
    proc = m.up()
    m.wait_checkpoint(proc)
    sim_change(m, delay_set_s=2.0)  # every limit change now takes 2 s: the restore is slow
    proc.send_signal(signal.SIGTERM)
    m.wait_for(lambda: '"power-restore-final"' in (m.run_dir() / "state.json").read_text()
               and m.state()["steps"]["power-restore-final"]["status"] == "running", 60, "the restore to start")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    sim_change(m, delay_set_s=0)
    assert code == 143, err[-3000:]
    assert "the restore goes on" in err
    st = m.state()
    assert st["status"] == "interrupted" and st["signal"] == "SIGTERM"
    assert st["steps"]["power-restore-final"]["status"] == "succeeded"
    m.assert_machine_back()
    m.assert_nothing_left()


def test_one_gpu_that_fails_to_restore_does_not_stop_the_other(machine_factory) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(serve=False, max_steps=20)
    proc = m.up()
    m.wait_checkpoint(proc)
    sim_change(m, fail_set=[0])  # GPU 0 stops taking limit changes (fell off the bus, driver hiccup)
    code, out, err = finish(proc)
    assert code == 1, err[-3000:]
    st = m.state()
    restore = st["steps"]["power-restore-final"]
    assert restore["status"] == "failed" and "GPU 0" in restore["error"] and "ftkit power restore" in restore["error"]
    assert st["status"] == "failed"
    assert m.limits() == {0: 300.0, 1: ORIGINALS[1]}  # GPU 1 went back although GPU 0 failed
    shown = json.loads(m.ftkit("power", "show", "--json").stdout)["gpus"]
    assert shown[0]["limit_w"] == 300.0 and shown[0]["original_w"] == ORIGINALS[0] and shown[1]["original_w"] is None
    sim_change(m, fail_set=[])
    res = m.ftkit("power", "restore")
    assert res.returncode == 0, res.stderr
    m.assert_machine_back()
    m.assert_nothing_left()


def test_failure_inside_merge(machine_factory) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(serve=False, max_steps=10)
    m.start_service()
    proc = m.up()
    m.wait_for(lambda: m.step_status("merge") == "running", 600, "merge to start")
    adapter = m.run_dir() / "steps/train/adapter/adapter_model.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[:16])  # a truncated adapter: the merge engine fails inside
    code, out, err = finish(proc)
    assert code == 1, err[-3000:]
    st = m.state()
    assert st["failed_step"] == "merge" and st["steps"]["merge"]["status"] == "failed"
    assert "Traceback" not in st["steps"]["merge"]["error"]
    merge_dir = m.run_dir() / "steps/merge"
    assert not (merge_dir / "model").exists() and not list(merge_dir.glob(".*partial*")), "half a merge left behind"
    m.assert_machine_back()
    m.assert_nothing_left()
    adapter.write_bytes(good)
    st = resume_completes(m)
    assert st["steps"]["train"]["attempt"] == 1 and st["steps"]["merge"]["attempt"] == 2


def test_serve_that_never_becomes_ready(machine_factory) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(max_steps=5, serve_timeout=1)
    m.start_service()
    code, out, err = finish(m.up())
    assert code == 1
    st = m.state()
    assert st["failed_step"] == "serve"
    assert "did not become ready within 1 s" in st["steps"]["serve"]["error"]
    assert st["steps"]["serve"].get("stopped") is True
    assert not answers(m.serve_port)
    m.assert_machine_back()
    m.assert_nothing_left()


def test_stale_server_on_the_serve_port(machine_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(max_steps=5)
    script = tmp_path / "stale.py"
    script.write_text(STANDIN)
    stale = subprocess.Popen([sys.executable, str(script), str(m.serve_port)])
    try:
        Machine.wait_for(lambda: answers(m.serve_port), 30, "the stale server")
        code, out, err = finish(m.up())
        assert code == 1
        st = m.state()
        assert st["failed_step"] == "serve" and f"port {m.serve_port} is already taken" in st["steps"]["serve"]["error"]
        assert not (m.run_dir() / "steps/serve/responses.jsonl").exists()  # the stale server answered nothing of ours
        assert stale.poll() is None  # not ours to kill
        m.assert_machine_back()
        m.assert_nothing_left()
    finally:
        stale.terminate()
        stale.wait(10)
    st = resume_completes(m)
    rows = [json.loads(x) for x in (m.run_dir() / "steps/serve/responses.jsonl").read_text().splitlines()]
    assert rows and rows[0]["passed"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_ftkit_killed_mid_train_then_power_restore_and_resume(machine_factory, executor: str) -> None:  # type: ignore[no-untyped-def]
    m = machine_factory(executor, serve=False, max_steps=60)
    m.start_service()
    proc = m.up()
    m.wait_checkpoint(proc)
    run = m.run_dir()
    os.killpg(proc.pid, signal.SIGKILL) if executor == "local" else proc.kill()
    proc.wait(30)
    # every step is tethered to ftkit's owner lock: its process tree (or container) dies with ftkit
    m.assert_nothing_left(stopped_containers_ok=True)
    assert m.limits() == {0: 300.0, 1: 300.0}  # SIGKILL cannot be caught: the caps are still set
    status = m.ftkit("status", str(run), "--json")
    assert json.loads(status.stdout)["stale"] is True
    res = m.ftkit("power", "restore")
    assert res.returncode == 0, res.stderr
    assert m.limits() == ORIGINALS  # the true originals, from the machine-wide record
    st = resume_completes(m)
    assert st["steps"]["train"]["summary"]["resumed_from"]


@pytest.mark.docker
def test_trainer_container_killed_mid_step(machine_factory) -> None:  # type: ignore[no-untyped-def]
    from ftkit.gateways import docker as dk

    m = machine_factory("docker", serve=False, max_steps=60)
    m.start_service()
    proc = m.up()
    m.wait_checkpoint(proc)
    run = m.run_dir()
    [c] = dk.containers_with_label(f"dev.ftkit.run={run_label(run)}", all=False)
    dk.kill_container(c["Id"])
    code, out, err = finish(proc)
    assert code == 1, err[-3000:]
    st = m.state()
    assert st["failed_step"] == "train" and "exit code 137" in st["steps"]["train"]["error"]
    m.assert_machine_back()
    m.assert_nothing_left()
    st = resume_completes(m)
    assert st["steps"]["train"]["summary"]["resumed_from"]
