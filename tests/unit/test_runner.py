"""The runner on small synthetic plans (plain `python -c` steps, simulated GPUs): the journal
tells the truth, guards unwind whatever happens, signals cannot stop a restore, resume
skips what is done, and the console shows people progress, not third-party noise. Fast:
no model is loaded."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from ftkit.plan.spec import LoadRequest, Plan, Ready, StepSpec
from ftkit.run import runner
from ftkit.run.display import Display
from ftkit.run.rundir import RunDir
from tests.conftest import RECIPES, limits, run_cli

PY = sys.executable


def step(sid: str, code: str, **kw) -> StepSpec:  # type: ignore[no-untyped-def]
    return StepSpec(id=sid, kind=kw.pop("kind", "eval"), description=f"{sid} step", executor="local",
                    argv=[PY, "-c", code], **kw)


def plan_of(tmp: Path, *steps: StepSpec, gpus: bool = False) -> Plan:
    all_steps = list(steps)
    if any(s.kind == "power" for s in all_steps):
        all_steps.append(StepSpec(id="power-restore-final", kind="power-restore", executor="nvml", gpus=[0, 1],
                                  always=True, description="restore"))
    return Plan(recipe="t", recipe_file="t.yaml", machine="m", executor="local", run_dir=str(tmp / "run"),
                steps=all_steps, fit={}, psu=None, psu_uncapped=None, layout={}, python=PY,
                simulated_gpus=["RTX 4090", "RTX 3090 Ti"] if gpus else None)


def execute(tmp: Path, plan: Plan, **kw) -> tuple[runner.RunResult, str, dict]:  # type: ignore[no-untyped-def,type-arg]
    run_path = tmp / "run"
    run = runner.create_run(run_path, plan, {"name": "t"}, ["ftkit", "up", "t.yaml"]) if not run_path.exists() \
        else RunDir(run_path)
    out = io.StringIO()
    result = runner.execute_plan(run, plan, display=Display(plan, stream=out), **kw)
    return result, out.getvalue(), json.loads((run_path / "state.json").read_text())


def test_success_keeps_third_party_noise_in_the_logs(tmp_path: Path) -> None:
    noisy = "import sys\nfor i in range(50): print(f'{i}%|####| tqdm noise'); sys.stderr.write('UserWarning: noise\\n')"
    result, console, st = execute(tmp_path, plan_of(tmp_path, step("a", noisy), step("b", "print('ok')")))
    assert result.status == "succeeded" and result.exit_code == 0
    assert st["status"] == "succeeded" and st["finished"] and st["pid"] == os.getpid() and st["pid_start"]
    assert [st["steps"][s]["status"] for s in ("a", "b")] == ["succeeded", "succeeded"]
    assert "noise" not in console and "[1/2] a" in console
    assert "tqdm noise" in (tmp_path / "run/logs/a.log").read_text()
    assert st["steps"]["a"]["log"] == "logs/a.log" and st["steps"]["a"]["process"]["pid"]


def test_a_failed_step_skips_the_rest_and_names_its_last_lines(tmp_path: Path) -> None:
    bad = "import sys; print('loading...'); print('RuntimeError: out of memory'); sys.exit(3)"
    result, console, st = execute(tmp_path, plan_of(tmp_path, step("a", bad), step("b", "print(1)")))
    assert result.exit_code == 1 and result.failed_step == "a"
    assert st["status"] == "failed" and st["failed_step"] == "a" and st["finished"]
    assert "exit code 3" in st["steps"]["a"]["error"] and "out of memory" in st["steps"]["a"]["error"]
    assert st["steps"]["b"]["status"] == "skipped" and "step a failed" in st["steps"]["b"]["reason"]
    assert "FAILED" in console


def test_an_exception_in_ftkit_itself_marks_the_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          sim: Path) -> None:
    plan = plan_of(tmp_path, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1],
                                      power_caps_w={0: 300, 1: 300}, description="cap"), step("a", "print(1)"),
                   gpus=True)
    real = runner._execute

    def broken(ctx, s):  # type: ignore[no-untyped-def]
        if s.id == "a":
            raise ValueError("a bug")
        return real(ctx, s)

    monkeypatch.setattr(runner, "_execute", broken)
    result, console, st = execute(tmp_path, plan)
    assert result.status == "failed" and st["status"] == "failed" and st["finished"]
    assert st["steps"]["a"]["status"] == "failed" and "internal error: ValueError: a bug" in st["steps"]["a"]["error"]
    assert "Traceback" in (tmp_path / "run/logs/ftkit.log").read_text()
    assert limits(sim) == [450.0, 350.0]  # the guard still restored the caps


def test_sigterm_interrupts_the_step_and_the_restore_still_runs(tmp_path: Path, sim: Path) -> None:
    plan = plan_of(tmp_path, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1],
                                      power_caps_w={0: 300, 1: 280}, description="cap"),
                   step("a", "import time; time.sleep(60)", gpus=[]), step("b", "print(1)"), gpus=True)
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    result, console, st = execute(tmp_path, plan)
    assert time.monotonic() - t0 < 30
    assert result.status == "interrupted" and result.exit_code == 143
    assert st["status"] == "interrupted" and st["signal"] == "SIGTERM"
    assert st["steps"]["a"]["status"] == "interrupted" and st["steps"]["b"]["status"] == "skipped"
    assert st["steps"]["power-restore-final"]["status"] == "succeeded"
    assert limits(sim) == [450.0, 350.0]
    pid = st["steps"]["a"]["process"]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_second_signal_during_the_restore_is_ignored(tmp_path: Path, sim: Path, capfd: pytest.CaptureFixture) -> None:
    from ftkit.gpu.nvml import SimulatedNvml

    plan = plan_of(tmp_path, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1],
                                      power_caps_w={0: 300, 1: 300}, description="cap"),
                   step("a", "import time; time.sleep(60)"), gpus=True)

    def signals() -> None:
        time.sleep(2)
        SimulatedNvml(["RTX 4090", "RTX 3090 Ti"], str(sim))._sync(lambda s: s.update(delay_set_s=1.5))
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(4):  # Ctrl-C hammered while the GPUs go back
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=signals, daemon=True).start()
    result, console, st = execute(tmp_path, plan)
    assert result.exit_code == 130 and st["status"] == "interrupted"
    assert "the restore goes on" in capfd.readouterr().err  # written by the handler straight to fd 2
    assert limits(sim) == [450.0, 350.0]
    assert st["steps"]["power-restore-final"]["status"] == "succeeded"


def test_one_gpu_failing_to_restore_does_not_stop_the_other(tmp_path: Path, sim: Path) -> None:
    from ftkit.gpu.nvml import SimulatedNvml

    fault = "from ftkit.gpu.nvml import SimulatedNvml\n" \
            f"SimulatedNvml([], {str(sim)!r})._sync(lambda s: s.update(fail_set=[0]))"
    plan = plan_of(tmp_path, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1],
                                      power_caps_w={0: 300, 1: 300}, description="cap"), step("a", fault), gpus=True)
    result, console, st = execute(tmp_path, plan)
    restore = st["steps"]["power-restore-final"]
    assert restore["status"] == "failed" and "GPU 0" in restore["error"]
    assert result.status == "failed" and result.exit_code == 1
    assert limits(sim) == [300.0, 350.0]
    SimulatedNvml([], str(sim))._sync(lambda s: s.update(fail_set=[]))
    from ftkit.gpu import power
    from ftkit.gpu.nvml import open_nvml

    report = power.restore(open_nvml())  # the run's ftkit is gone (this test process holds nothing)
    assert report.ok and limits(sim) == [450.0, 350.0]


def test_originals_survive_a_crashed_run(tmp_path: Path, sim: Path) -> None:
    """A crashed run left GPU 0 capped at 300 W: the next run must restore 450 W, not 300."""
    from ftkit.gpu import power
    from ftkit.gpu.nvml import open_nvml

    power.set_limits(open_nvml(), {0: 300}, holder=power.Holder("crashed-run", 999999, 1))  # and then it died
    plan = plan_of(tmp_path, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1],
                                      power_caps_w={0: 320, 1: 320}, description="cap"), step("a", "print(1)"),
                   gpus=True)
    result, console, st = execute(tmp_path, plan)
    assert result.status == "succeeded"
    assert limits(sim) == [450.0, 350.0]
    assert st["power"]["original_w"] == {"0": 450.0, "1": 350.0}


def test_resume_skips_what_is_done(tmp_path: Path) -> None:
    marker = tmp_path / "count"
    counting = f"import pathlib; p = pathlib.Path({str(marker)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    gate = tmp_path / "gate"
    flaky = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(gate)!r}).exists() else 1)"
    plan = plan_of(tmp_path, step("a", counting), step("b", flaky), step("c", "print(1)"))
    result, _, st = execute(tmp_path, plan)
    assert result.status == "failed" and st["steps"]["c"]["status"] == "skipped"
    gate.write_text("")
    result, console, st = execute(tmp_path, plan, resume=True)
    assert result.status == "succeeded"
    assert marker.read_text() == "x"  # a ran once
    assert st["steps"]["a"]["attempt"] == 1 and st["steps"]["b"]["attempt"] == 2
    assert len(st["resumes"]) == 1


def test_a_taken_port_fails_the_serve_step_before_anything_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        serve = StepSpec(id="serve", kind="serve", executor="local", description="serve",
                         argv=[PY, "-m", "http.server", str(port)], background=True,
                         ready=Ready(health=f"http://127.0.0.1:{port}/", models=f"http://127.0.0.1:{port}/",
                                     timeout_s=5, base_url="", served_name="x", port=port, host="127.0.0.1"),
                         outputs={"responses": "steps/serve/responses.jsonl"})
        result, console, st = execute(tmp_path, plan_of(tmp_path, serve))
    assert result.status == "failed"
    assert f"port {port} is already taken" in st["steps"]["serve"]["error"]
    assert "process" not in st["steps"]["serve"]  # nothing was started


@pytest.mark.parametrize("recipe,machine", [("mistral-small-24b-qlora-2x24gb.yaml", "zorac.yaml"),
                                            ("gemma2-27b-qlora-zero3-2x4090.yaml", "dual-4090.yaml"),
                                            ("quickstart.yaml", "cpu.yaml")])
def test_plan_json_round_trips(recipe: str, machine: str) -> None:
    """--resume executes the stored plan.json: it must rebuild the very same plan."""
    from ftkit.prepare import prepare

    plan = prepare(str(RECIPES / recipe), str(RECIPES / "machines" / machine)).plan
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict(), default=str)))
    assert again == plan


DRIVER = """
import sys
from pathlib import Path
from tests.unit.test_runner import execute, plan_of, step
from ftkit.plan.spec import StepSpec
tmp = Path(sys.argv[1])
plan = plan_of(tmp, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1], power_caps_w={0: 300, 1: 300},
                             description="cap"), step("a", "import time; time.sleep(120)"), gpus=True)
execute(tmp, plan)
"""


def _killed_mid_step(tmp_path: Path) -> int:
    """An ftkit run killed with SIGKILL while its step runs (caps set); the step's pid."""
    import subprocess

    from tests.conftest import ROOT

    proc = subprocess.Popen([PY, "-c", DRIVER, str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    state = tmp_path / "run" / "state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if state.exists() and '"process"' in state.read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run never started its step")
    child = json.loads(state.read_text())["steps"]["a"]["process"]["pid"]
    proc.kill()
    proc.wait()
    return int(child)


def test_ftkit_down_cleans_up_after_a_killed_ftkit(tmp_path: Path, sim: Path) -> None:
    """SIGKILL cannot be caught: the caps stay and the journal says running. The next
    ftkit sees the run is stale (pid + start time), and `ftkit down` puts the machine back,
    stops what is left and closes the journal."""
    from tests.conftest import run_cli

    child = _killed_mid_step(tmp_path)
    state = tmp_path / "run" / "state.json"
    assert limits(sim) == [300.0, 300.0]
    status = run_cli("status", str(tmp_path / "run"), "--json")
    assert json.loads(status.out)["stale"] is True
    result = run_cli("down", "--runs-dir", str(tmp_path))
    assert result.code == 0, result.err
    assert "power:" in result.out
    assert limits(sim) == [450.0, 350.0]
    st = json.loads(state.read_text())
    assert st["status"] == "failed" and st["finished"] and st["steps"]["a"]["status"] == "interrupted"
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the step died with ftkit (parent-death signal)
        os.kill(child, 0)


# -- servers: load-adapter, restore, resume (a stand-in OpenAI-style server, not vLLM) ---------

FAKE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import time
port, name, loads = int(sys.argv[1]), sys.argv[2], sys.argv[3]
models = [name, *sys.argv[4:]]  # the served model, then the adapters it was started with
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, code, body, text=False):
        data = body.encode() if text else json.dumps(body).encode()
        self.send_response(code); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/health": return self._send(200, {})
        if self.path == "/v1/models": return self._send(200, {"data": [{"id": m} for m in models]})
        self._send(404, {})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/load_lora_adapter":
            with open(loads, "a") as fh: fh.write(json.dumps(body) + "\n")
            if body["lora_name"].startswith("big"):  # what vLLM answers for a LoRA above --max-lora-rank
                return self._send(400, {"error": {"message": "LoRA rank 32 is greater than max_lora_rank 16.",
                                                  "type": "BadRequestError", "param": None, "code": 400}})
            if body["lora_name"].startswith("slow"):
                time.sleep(30)
            if body["lora_name"] not in models: models.append(body["lora_name"])
            return self._send(200, f"Success: LoRA adapter {body['lora_name']!r} added successfully.", text=True)
        model = body.get("model")
        if model not in models:
            return self._send(404, {"error": {"message": f"The model `{model}` does not exist."}})
        self._send(200, {"choices": [{"text": "fruit" if model != name else "base"}]})
print("serving", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server(tmp: Path, sid: str, *, gpus: list[int] | None = None, keep: bool = False, fail: bool = False,
           prompts: list | None = None, adapters: list[str] | None = None,  # type: ignore[type-arg]
           listed: list[str] | None = None) -> StepSpec:
    """A stand-in vLLM step; `adapters`: what the plan started it with (ready["adapters"]),
    `listed`: the adapters it lists in /v1/models (default: all of them)."""
    script = tmp / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    failing = tmp / "failing_server.py"  # what vLLM prints when its engine cannot start
    failing.write_text("import sys\nprint('RuntimeError: Cannot find any model weights')\n"
                       "print('RuntimeError: Engine core initialization failed. See root cause above.')\nsys.exit(1)\n")
    argv = [PY, str(failing)] if fail else [PY, str(script), str(port), sid, str(tmp / f"loads-{sid}.jsonl"),
                                            *(adapters or [] if listed is None else listed)]
    return StepSpec(id=sid, kind="serve", description=f"{sid} server", executor="local", argv=argv, gpus=gpus or [],
                    background=True, keep_running=keep, engine="vllm", outputs={"responses": f"steps/{sid}/r.jsonl"},
                    prompts=prompts or [],
                    ready=Ready(health=f"{base}/health", models=f"{base}/v1/models", timeout_s=30,
                                base_url=f"{base}/v1", served_name=sid, port=port, host="127.0.0.1",
                                adapters=adapters or []))


def load(sid: str, srv: StepSpec, name: str, adapter: str = "steps/train/adapter") -> StepSpec:
    ready = dataclasses.replace(srv.ready or Ready(), served_name=name)
    url = f"http://127.0.0.1:{ready.port}/v1/load_lora_adapter"
    return StepSpec(id=sid, kind="load-adapter", description="load", executor="http", ready=ready,
                    prompts=[{"prompt": "kiwi", "expect": {"equals": "fruit"}}], outputs={"responses": f"steps/{sid}/r.jsonl"},
                    request=LoadRequest(server=srv.id, method="POST", url=url, adapter_dir=adapter,
                                        body={"lora_name": name, "lora_path": "/x", "load_inplace": True}))


def adapter_written(tmp: Path) -> None:
    d = tmp / "run" / "steps" / "train" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")


def test_load_adapter_puts_it_live_in_the_running_server_and_resume_loads_it_again(tmp_path: Path) -> None:
    srv = server(tmp_path, "srv")
    plan = plan_of(tmp_path, srv, step("train", "print('trained')", kind="train"), load("live", srv, "v1"))
    create = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit"])
    adapter_written(tmp_path)
    result = runner.execute_plan(create, plan, display=Display(plan, stream=io.StringIO()))
    st = json.loads((tmp_path / "run/state.json").read_text())
    assert result.status == "succeeded", st
    live = st["steps"]["live"]
    assert live["loaded_as"] == "v1" and live["models"] == ["srv", "v1"] and live["passed"] == 1
    assert live["live_after_written_s"] is not None and live["load_s"] < 5
    assert [json.loads(x)["lora_name"] for x in (tmp_path / "loads-srv.jsonl").read_text().splitlines()] == ["v1"]
    # --resume: the server is a new process, so the adapter goes into it again
    result = runner.execute_plan(RunDir(tmp_path / "run"), plan, display=Display(plan, stream=io.StringIO()), resume=True)
    assert result.status == "succeeded"
    assert len((tmp_path / "loads-srv.jsonl").read_text().splitlines()) == 2


def test_an_earlier_attempts_fatal_line_does_not_fail_a_new_start(tmp_path: Path) -> None:
    srv = server(tmp_path, "srv")
    plan = plan_of(tmp_path, srv)
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit"])
    (tmp_path / "run/logs/srv.log").write_text("ERROR ... RuntimeError: Engine core initialization failed.\n")
    result = runner.execute_plan(run, plan, display=Display(plan, stream=io.StringIO()))
    assert result.status == "succeeded"


def test_a_failed_replacement_restores_its_predecessor_with_its_adapters(tmp_path: Path) -> None:
    old = server(tmp_path, "old", gpus=[0], keep=True)
    new = server(tmp_path, "new", gpus=[0], keep=True, fail=True)
    plan = plan_of(tmp_path, old, step("train", "print('trained')", kind="train"), load("live", old, "v1"), new)
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit"])
    adapter_written(tmp_path)
    out = io.StringIO()
    result = runner.execute_plan(run, plan, display=Display(plan, stream=out))
    st = json.loads((tmp_path / "run/state.json").read_text())
    try:
        assert result.status == "failed" and st["failed_step"] == "new"
        error = st["steps"]["new"]["error"]
        assert "RuntimeError: Cannot find any model weights" in error and "\n" not in error, error
        assert st["steps"]["old"]["restored_after"] == "new"
        assert any(x.startswith("old (") for x in result.left_running)  # the service stays up after the failure
        assert len((tmp_path / "loads-old.jsonl").read_text().splitlines()) == 2  # its adapter loaded again
        assert "old serves again" in out.getvalue()
    finally:
        pid = st["steps"]["old"]["process"]["pid"]
        os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("listed", [None, ["a1"]], ids=["all listed", "one missing"])
def test_a_multi_lora_server_must_list_every_adapter(tmp_path: Path, listed: list[str] | None) -> None:
    """A server started with several adapters (`adapters:`): /v1/models must list the served
    model and each of them, or the step fails in one line naming the one missing (no prompts
    sent); the list is journaled either way."""
    srv = server(tmp_path, "srv", adapters=["a1", "a2"], listed=listed, prompts=[{"prompt": "kiwi", "max_tokens": 1}])
    result, console, st = execute(tmp_path, plan_of(tmp_path, srv))
    entry = st["steps"]["srv"]
    if listed is None:
        assert result.status == "succeeded", entry
        assert entry["models"] == ["srv", "a1", "a2"] and entry["passed"] == 1
        return
    assert result.status == "failed" and result.failed_step == "srv"
    assert entry["error"] == "vLLM is ready, but /v1/models does not list the adapter 'a2' (it lists 'srv', 'a1')"
    assert entry["models"] == ["srv", "a1"] and "prompts" not in entry
    assert console.count("does not list the adapter 'a2'") == 1
    assert entry["stopped"] is True  # the guard stopped it: nothing left running
    assert result.left_running == []


@pytest.mark.parametrize("keep", [False, True], ids=["stopped at the end", "kept running"])
def test_an_adapter_vllm_refuses_fails_the_step_in_vllms_words_and_the_server_goes_on(tmp_path: Path,
                                                                                      keep: bool) -> None:
    """vLLM answers POST /v1/load_lora_adapter with 400 and its JSON error (a LoRA above
    --max-lora-rank): the load-adapter step fails with one line in vLLM's words, the steps
    after it are skipped, and the server is not harmed: it serves on, and is stopped at the
    end or left running as the recipe says."""
    srv = server(tmp_path, "srv", keep=keep)
    plan = plan_of(tmp_path, srv, step("train", "print('trained')", kind="train"), load("live", srv, "big"),
                   step("after", "print(1)"))
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit"])
    adapter_written(tmp_path)
    out = io.StringIO()
    result = runner.execute_plan(run, plan, display=Display(plan, stream=out))
    st = json.loads((tmp_path / "run/state.json").read_text())
    pid = st["steps"]["srv"]["process"]["pid"]
    try:
        assert result.status == "failed" and result.failed_step == "live"
        error = st["steps"]["live"]["error"]
        assert error == "vLLM did not load the adapter 'big': LoRA rank 32 is greater than max_lora_rank 16", error
        assert out.getvalue().count("LoRA rank 32 is greater than max_lora_rank 16") == 1
        assert st["steps"]["after"]["status"] == "skipped"
        assert "exited" not in st["steps"]["srv"]  # the refusal did not take the server down
        if keep:
            assert any(x.startswith("srv (") for x in result.left_running)
            assert st["steps"]["srv"]["left_running"] is True
            os.kill(pid, 0)  # still up, and still answering
            port = srv.ready.port if srv.ready else 0
            from ftkit.gateways import http

            assert http.answers(f"http://127.0.0.1:{port}/health")
        else:
            assert result.left_running == [] and st["steps"]["srv"]["stopped"] is True
            time.sleep(0.5)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if keep:
            os.kill(pid, signal.SIGTERM)


def trainer(tmp: Path, *, wind_s: float, marker: bool = True, code: int = 0) -> str:
    """A train step's code: writes the final adapter, then (`marker`) its completion marker as
    the engine does, then takes `wind_s` to exit (an engine winding down)."""
    from ftkit.plan.jobs import complete_marker

    d = tmp / "run" / "steps" / "train" / "adapter"
    return ("import pathlib, sys, time\n"
            f"d = pathlib.Path({str(d)!r}); d.mkdir(parents=True, exist_ok=True)\n"
            "(d / 'adapter_config.json').write_text('{}'); (d / 'adapter_model.safetensors').write_bytes(b'x')\n"
            + (f"pathlib.Path({complete_marker(str(d))!r}).write_text('{{}}')\n" if marker else "")
            + f"time.sleep({wind_s}); sys.exit({code})\n")


def loads_of(tmp: Path, sid: str) -> list[str]:
    return [json.loads(x)["lora_name"] for x in (tmp / f"loads-{sid}.jsonl").read_text().splitlines()]


def test_the_adapter_goes_live_as_soon_as_it_is_written_while_the_trainer_winds_down(tmp_path: Path) -> None:
    """The train engine marks its adapter complete before its process ends (seconds of
    interpreter, launcher and container teardown): the load-adapter step right after it runs
    then, journaled under its own step, and the run goes on as before; a resume loads it
    again after the (skipped) train step, as it always did."""
    srv = server(tmp_path, "srv")
    train = step("train", trainer(tmp_path, wind_s=4), kind="train", outputs={"adapter": "steps/train/adapter"})
    plan = plan_of(tmp_path, srv, train, load("live", srv, "v1"), step("after", "print(1)"))
    result, console, st = execute(tmp_path, plan)
    assert result.status == "succeeded", result.message
    live, tr = st["steps"]["live"], st["steps"]["train"]
    assert live["status"] == "succeeded" and live["during_step"] == "train" and live["passed"] == 1
    assert live["live_after_written_s"] < 1.0, live  # not the 4 s the trainer takes to end
    assert live["finished"] < tr["finished"] and tr["seconds"] >= 4
    assert st["steps"]["after"]["status"] == "succeeded"
    assert loads_of(tmp_path, "srv") == ["v1"]  # loaded once: the runner did not load it again after the step
    assert "'v1' live in" in console and "as soon as train wrote it" in console
    assert console.index("[3/4] live: ok") < console.index("[2/4] train: ok")
    result, console, st = execute(tmp_path, plan, resume=True)
    assert result.status == "succeeded", result.message
    assert "during_step" not in st["steps"]["live"] and st["steps"]["live"]["attempt"] == 2
    assert loads_of(tmp_path, "srv") == ["v1", "v1"]  # the new server process got it again


@pytest.mark.parametrize("why", ["the server yields the trainer's GPU", "only an earlier attempt's marker"])
def test_the_load_waits_for_the_train_step_when_it_cannot_go_early(tmp_path: Path, sim: Path, why: str) -> None:
    """A server on a GPU the trainer holds is not serving while it trains (it yielded): the
    load waits for the step to end, as before. So does a load whose only marker is older than
    this attempt of the train step (a resumed run's)."""
    from ftkit.plan.jobs import complete_marker

    shared = why.startswith("the server")
    srv = server(tmp_path, "srv", gpus=[0] if shared else [])
    train = step("train", trainer(tmp_path, wind_s=2, marker=shared), kind="train", gpus=[0] if shared else [],
                 outputs={"adapter": "steps/train/adapter"})
    plan = plan_of(tmp_path, srv, train, load("live", srv, "v1"), gpus=True)
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit"])
    if not shared:  # an earlier attempt's adapter and marker
        adapter_written(tmp_path)
        (tmp_path / "run/steps/train/adapter/adapter_config.json").write_text("{}")
        Path(complete_marker(str(tmp_path / "run/steps/train/adapter"))).write_text("{}")
    result = runner.execute_plan(run, plan, display=Display(plan, stream=io.StringIO()))
    st = json.loads((tmp_path / "run/state.json").read_text())
    assert result.status == "succeeded", result.message
    live, tr = st["steps"]["live"], st["steps"]["train"]
    assert "during_step" not in live and live["started"] >= tr["finished"]
    assert loads_of(tmp_path, "srv") == ["v1"]


def test_a_load_still_going_when_the_train_step_fails_is_left_and_marked_interrupted(tmp_path: Path) -> None:
    """The trainer fails after its adapter was marked complete, while vLLM is still loading
    it (here: a load that takes 30 s): the run does not wait for the load, marks it
    interrupted, and fails at the train step."""
    srv = server(tmp_path, "srv")
    train = step("train", trainer(tmp_path, wind_s=1, code=3), kind="train", outputs={"adapter": "steps/train/adapter"})
    plan = plan_of(tmp_path, srv, train, load("live", srv, "slow-v1"))
    t0 = time.monotonic()
    result, console, st = execute(tmp_path, plan)
    assert time.monotonic() - t0 < 25
    assert result.status == "failed" and result.failed_step == "train"
    live = st["steps"]["live"]
    assert live["status"] == "interrupted" and live["reason"] == "train ended while the adapter was being loaded"
    assert st["steps"]["srv"]["stopped"] is True


def test_a_step_that_exits_0_without_its_outputs_failed_and_resume_reruns_what_is_gone(tmp_path: Path) -> None:
    """A merge that writes no model is not `succeeded` (the run used to fail later in serve and
    could never complete: resume skipped the merge); resume runs a step again when its outputs
    are gone since, and every step after it."""
    run = tmp_path / "run"
    count = tmp_path / "count"
    counting = (f"import pathlib; p = pathlib.Path({str(count)!r}); "
                "p.write_text(p.read_text() + 'x' if p.exists() else 'x')")
    writes_model = ("import pathlib; d = pathlib.Path({0!r}); d.mkdir(parents=True, exist_ok=True); "
                    "(d / 'config.json').write_text('{{}}'); (d / 'model.safetensors').write_bytes(b'x')")
    gate = tmp_path / "gate"
    merge = step("merge", f"import pathlib, sys; sys.exit(0) if not pathlib.Path({str(gate)!r}).exists() else None; "
                 + writes_model.format(str(run / "steps" / "merge" / "model")),
                 kind="merge", outputs={"model": "steps/merge/model"})
    after = step("after", counting)
    plan = plan_of(tmp_path, merge, after)
    result, console, st = execute(tmp_path, plan)
    assert result.status == "failed" and result.failed_step == "merge"
    assert st["steps"]["merge"]["status"] == "failed"
    assert "exited 0 but left no model at steps/merge/model" in st["steps"]["merge"]["error"]
    assert st["steps"]["after"]["status"] == "skipped" and not count.exists()
    gate.write_text("")
    result, _, st = execute(tmp_path, plan, resume=True)
    assert result.status == "succeeded" and count.read_text() == "x"
    import shutil

    shutil.rmtree(run / "steps" / "merge" / "model")  # gone since (a disk clean-up, a mistake)
    result, console, st = execute(tmp_path, plan, resume=True)
    assert result.status == "succeeded", result.message
    assert "merge: done before the resume, but left no model at steps/merge/model" in console
    assert (run / "steps" / "merge" / "model" / "config.json").is_file()
    assert count.read_text() == "xx"  # the step after it ran again too
    assert st["steps"]["merge"]["attempt"] == 3


@pytest.mark.parametrize("damage", ["plan.json deleted", "state.json truncated", "both"])
def test_ftkit_down_restores_the_caps_whatever_the_runs_files_say(tmp_path: Path, sim: Path, damage: str) -> None:
    """After a SIGKILL, plan.json deleted or state.json torn: `down` still finds the run
    stale and restores what the machine-wide record says it holds, and says so."""
    from tests.conftest import run_cli

    _killed_mid_step(tmp_path)
    run = tmp_path / "run"
    assert limits(sim) == [300.0, 300.0]
    if damage in ("plan.json deleted", "both"):
        (run / "plan.json").unlink()
    if damage in ("state.json truncated", "both"):
        (run / "state.json").write_text((run / "state.json").read_text()[:25])
    result = run_cli("down", "--runs-dir", str(tmp_path))
    assert result.code == 0 and "Traceback" not in result.err, result.err
    assert "nothing was left running" not in result.out
    assert "power: GPU 0: 450 W, GPU 1: 350 W" in result.out, result.out
    if damage != "state.json truncated":  # no plan to say what was capped: the record says it
        assert "from the machine-wide record" in result.out and "plan.json" in result.out, result.out
    assert limits(sim) == [450.0, 350.0]
    st = json.loads((run / "state.json").read_text())
    assert st["status"] == "failed" and st["cleaned"] is True
    again = run_cli("down", "--runs-dir", str(tmp_path))
    assert again.code == 0 and limits(sim) == [450.0, 350.0]


def test_a_server_whose_gpu_vanished_says_so(tmp_path: Path, sim: Path) -> None:
    """A GPU that fell off the bus: the server's own log says only that its engine failed;
    the step's error names the GPU NVML no longer lists (simulated NVML, an injected loss)."""
    from ftkit.gpu.nvml import SimulatedNvml

    srv = server(tmp_path, "srv", gpus=[1], fail=True)
    SimulatedNvml([], str(sim))._sync(lambda st: st.update(lost=[1]))
    result, _, st = execute(tmp_path, plan_of(tmp_path, srv, gpus=True))
    assert result.status == "failed"
    error = st["steps"]["srv"]["error"]
    assert "Cannot find any model weights" in error and "fallen off the bus" in error, error


def test_true_originals_come_back_from_the_dead_runs_journal(tmp_path: Path, sim: Path) -> None:
    """The originals record was torn and removed as its message suggests, while a killed run
    still caps the GPUs: the next run records the true originals from that run's journal
    (not the cap), says where they came from, and `ftkit down` of the dead run puts them back."""
    from ftkit.gpu import power
    from tests.conftest import run_cli

    _killed_mid_step(tmp_path)
    assert limits(sim) == [300.0, 300.0]
    power.originals_path().unlink()  # what the "fix or remove it" message led to
    plan = plan_of(tmp_path, StepSpec(id="power", kind="power", executor="nvml", gpus=[0, 1],
                                      power_caps_w={0: 250}, description="cap"), step("b", "print(1)"), gpus=True)
    run2 = runner.create_run(tmp_path / "run2", plan, {"name": "t"}, ["ftkit", "up", "t.yaml"])
    out = io.StringIO()
    result = runner.execute_plan(run2, plan, display=Display(plan, stream=out))
    assert result.status == "succeeded", result.message
    console = out.getvalue()
    assert "GPU 0: the machine-wide record had no original limit" in console and "450 W" in console, console
    assert str(tmp_path / "run" / "state.json") in console
    assert limits(sim)[0] == 450.0  # run 2 put back the true original, not run 1's cap
    down = run_cli("down", "--runs-dir", str(tmp_path))
    assert down.code == 0, down.err
    assert limits(sim) == [450.0, 350.0], down.out
    assert "the machine-wide record had lost them" in down.out, down.out


STOPPED_DRIVER = """
import sys
from pathlib import Path
from tests.unit.test_runner import execute, plan_of, PY
from tests.unit.test_tether import STUBBORN
from ftkit.plan.spec import StepSpec
tmp, mode = Path(sys.argv[1]), sys.argv[2]
plan = plan_of(tmp, StepSpec(id="a", kind="eval", description="a step", executor="local",
                             argv=[PY, "-c", STUBBORN, str(tmp / "daemon.pid"), mode]))
result, _, _ = execute(tmp, plan)
sys.exit(result.exit_code)
"""


@pytest.mark.parametrize("mode", ["obey", "ignore"])
def test_sigterm_to_ftkit_stops_a_daemon_that_ignores_it(tmp_path: Path, mode: str) -> None:
    """ftkit gets SIGTERM while a step runs whose child double-forked a daemon that ignores
    SIGTERM: ftkit exits 143 and the daemon is gone (it used to run on under PID 1), whether
    the command obeys SIGTERM (the tether kills the daemon LEFTOVER_GRACE_S after the signal)
    or ignores it too (ftkit's SIGKILL after its grace: the tether takes the whole tree
    along). The step's log says what was stopped and how."""
    import subprocess

    from tests.conftest import ROOT
    from tests.unit.test_tether import _daemon_pid, _gone_within, _kill

    proc = subprocess.Popen([PY, "-c", STOPPED_DRIVER, str(tmp_path), mode], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    daemon = None
    try:
        daemon = _daemon_pid(tmp_path / "daemon.pid")
        log = tmp_path / "run" / "logs" / "a.log"
        deadline = time.monotonic() + 30
        while "up" not in (log.read_text() if log.exists() else "").splitlines():
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        assert time.monotonic() - t0 < (9 if mode == "obey" else 16)
        assert _gone_within(daemon, 5), "ftkit stopped by SIGTERM left the step's daemon running"
        text = log.read_text()
        assert "ftkit tether: SIGTERM: passed to the command's process group" in text, text
        assert "SIGKILL to" in text and str(daemon) in text and "stopped: everything the step started is gone" in text, text
    finally:
        _kill(daemon)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(30)


def test_a_replacing_server_takes_over_the_port(tmp_path: Path) -> None:
    """Workload sharding's hand-over on one URL: the new server on the old one's GPUs and port
    starts once the old one is stopped (its test prompts' connections closed), and answers there."""
    old = server(tmp_path, "old", gpus=[0], prompts=[{"prompt": "kiwi", "max_tokens": 1}])
    new = server(tmp_path, "new", gpus=[0], keep=False, prompts=[{"prompt": "kiwi", "max_tokens": 1}])
    assert old.ready is not None and new.ready is not None
    port, was = old.ready.port, str(new.ready.port)
    new.argv[2] = str(port)
    new.ready = dataclasses.replace(new.ready, port=port, health=new.ready.health.replace(was, str(port)),
                                    models=new.ready.models.replace(was, str(port)),
                                    base_url=new.ready.base_url.replace(was, str(port)))
    result, console, st = execute(tmp_path, plan_of(tmp_path, old, new))
    assert result.status == "succeeded", (console, st)
    assert st["steps"]["old"]["replaced_by"] == "new" and st["steps"]["new"]["passed"] == 1
    assert "new replaces old on GPU(s) [0]: stopping old" in console


def test_ftkit_down_stops_only_its_own_runs_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs whose directories share a name (every compose stack's is `run`; tests make many)
    get different container labels, and cleaning one up asks Docker only for its own: a label
    from the directory's name alone let `ftkit down` of one stop the other's containers."""
    from ftkit.gateways import docker as dk
    from ftkit.plan.spec import run_label
    from ftkit.run import stale

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert run_label(str(a)) != run_label(str(b)) and run_label(str(a)).startswith("run-")
    asked: list[str] = []
    monkeypatch.setattr(dk, "reachable", lambda host: True)
    monkeypatch.setattr(dk, "containers_with_label", lambda label, host=None, **kw: asked.append(label) or [])
    a.mkdir(parents=True)
    plan = plan_of(a.parent, StepSpec(id="t", kind="train", description="t", executor="docker",
                                      labels={"dev.ftkit.run": run_label(str(a))}))
    stale.stop_leftovers(a, plan)
    stale.stop_leftovers(a, None)  # plan.json gone: the label its path gives
    assert asked == [f"dev.ftkit.run={run_label(str(a))}"] * 2


def test_an_early_load_that_never_finished_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The early-load thread dies after journaling the load as running (a bug, a full disk):
    the run does not end `succeeded` with no adapter loaded, and no thread traceback reaches
    the console (ftkit's log has it)."""
    srv = server(tmp_path, "srv")
    train = step("train", trainer(tmp_path, wind_s=2), kind="train", outputs={"adapter": "steps/train/adapter"})
    plan = plan_of(tmp_path, srv, train, load("live", srv, "v1"))
    real = Display.step_started

    def broken(self, s):  # type: ignore[no-untyped-def]
        if s.id == "live" and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("display broke")
        return real(self, s)

    monkeypatch.setattr(Display, "step_started", broken)
    result, console, st = execute(tmp_path, plan)
    assert result.status == "failed" and result.failed_step == "live", (result, console)
    assert st["steps"]["live"]["status"] == "interrupted" and "Traceback" not in console
    assert "display broke" in (tmp_path / "run/logs/ftkit.log").read_text()


def test_ftkit_down_of_a_finished_run_records_what_it_stopped(tmp_path: Path) -> None:
    """A server the recipe kept running, stopped later by `ftkit down`: the journal no longer
    says it is left running (`ftkit status` reads that), and says when it was stopped."""
    from ftkit.run import stale

    srv = server(tmp_path, "srv", keep=True)
    result, console, st = execute(tmp_path, plan_of(tmp_path, srv))
    pid = st["steps"]["srv"]["process"]["pid"]
    try:
        assert result.status == "succeeded" and result.left_running
        report = stale.clean(tmp_path / "run")
        assert report.processes == [pid]
        st = json.loads((tmp_path / "run/state.json").read_text())
        assert st["left_running"] == [] and st["stopped_by_down"]["stopped"] == [str(pid)]
        assert st["steps"]["srv"].get("stopped") is True and "left_running" not in st["steps"]["srv"]
        status = run_cli("status", str(tmp_path / "run"))
        assert "left running" not in status.out, status.out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
