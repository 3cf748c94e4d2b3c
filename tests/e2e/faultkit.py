"""A machine to break: simulated GPUs whose power limits live in a state file (as a real
GPU keeps its limit after the process that set it dies), a machine-wide record of the
original limits, a GPU lease directory, and the machine's own serving service - a stand-in
server under the lease's preemptible `serve` role that yields GPU 0 to training and must
come back after every run, whatever happened to it.

No GPU exists here: the simulated NVML backend is named as such in every file it touches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import run_label
from tests.e2e_inputs import BASE, CA, WHEELHOUSE, free_port, quickstart_data, tiny

GPUS = "RTX 4090,RTX 3090 Ti"
ORIGINALS = {0: 450.0, 1: 350.0}

STANDIN = r'''
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "previous-model"}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def answers(port: int, path: str = "/health", timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


class Machine:
    def __init__(self, tmp: Path, executor: str = "local", *, max_steps: int = 30, every: int = 5,
                 serve_timeout: int = 120, serve: bool = True) -> None:
        self.tmp = tmp
        self.executor = executor
        self.runs = tmp / "runs"
        self.sim = tmp / "sim-gpus.json"
        self.lease = tmp / "lease"
        self.lease.mkdir(exist_ok=True)
        self.state_dir = tmp / "state"
        self.serve_port = free_port()
        self.service_port = free_port()
        self.env = {**os.environ, "FTKIT_SIMULATED_GPUS": GPUS, "FTKIT_SIMULATED_GPUS_STATE": str(self.sim),
                    "FTKIT_STATE_DIR": str(self.state_dir), "FTKIT_LEASE_DIR": str(self.lease),
                    "PYTHONUNBUFFERED": "1"}
        self.machine = tmp / "machine.yaml"
        docker = (f"ca_bundle: {CA}\ndocker: {{base_image: {BASE}, wheelhouse: {WHEELHOUSE}, build_missing: true}}\n"
                  if executor == "docker" else "")
        self.machine.write_text(
            f"ftkit: 1\nkind: machine\nname: sim\nexecutor: {executor}\npsu: {{watts: 1500}}\n{docker}"
            f"paths: {{lease: {self.lease}}}\n"
            "gpus:\n  - {index: 0, model: RTX 4090}\n  - {index: 1, model: RTX 3090 Ti}\n"
            f"serving: {{service: previous-model, manager: compose, gpus: [0], port: {self.service_port}}}\n")
        quickstart_data(tmp / "data" / "quickstart-train.jsonl")
        data = "data"
        serve_step = f"""
  - type: serve
    engine: transformers
    gpus: [1]
    port: {self.serve_port}
    ready_timeout_s: {serve_timeout}
    keep_running: false
    prompts:
      - {{prompt: "### Instruction:\\nName the category of these words.\\n\\n### Input:\\nkiwi mango lemon\\n\\n### Response:\\n", max_tokens: 2}}
""" if serve else ""
        self.recipe = tmp / "recipe.yaml"
        self.recipe.write_text(f"""ftkit: 1
name: faults
model:
  tiny: {tiny()}
  dtype: fp32
dataset:
  path: {data}/quickstart-train.jsonl
  format: alpaca
  template: alpaca
steps:
  - type: power
    caps_w: 300
  - type: train
    max_steps: {max_steps}
    batch_size: 8
    seq_len: 96
    precision: fp32
    gradient_checkpointing: false
    gpus: [0]
    logging_steps: 5
    checkpoint: {{every_steps: {every}, keep_last: 2, keep_best: false}}
  - type: merge
    dtype: fp32
{serve_step}""")
        self.standin: subprocess.Popen[bytes] | None = None

    # -- the machine's serving service --------------------------------------------------

    def start_service(self) -> None:
        script = self.tmp / "standin.py"
        script.write_text(STANDIN)
        argv = [sys.executable, "-m", "ftkit", "lease", "--gpus", "0", "--role", "serve", "--service", "previous-model",
                "--grace", "5", "--", sys.executable, str(script), str(self.service_port)]
        log = open(self.tmp / "service.log", "ab")  # noqa: SIM115 - the process keeps it
        self.standin = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for(lambda: answers(self.service_port), 60, "the stand-in serving service never answered")

    def stop_service(self) -> None:
        if self.standin is not None and self.standin.poll() is None:
            os.killpg(self.standin.pid, signal.SIGTERM)
            try:
                self.standin.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.standin.pid, signal.SIGKILL)
                self.standin.wait()

    # -- ftkit ----------------------------------------------------------------------------

    def up(self, *extra: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "ftkit", "up"]
        if "--resume" not in extra:
            argv += [str(self.recipe), "--machine", str(self.machine), "--runs-dir", str(self.runs)]
        argv += ["--quiet", *extra]
        return subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def ftkit(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ftkit", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def run_dir(self) -> Path:
        runs = sorted(p for p in self.runs.iterdir() if p.is_dir())
        return runs[-1]

    def state(self) -> dict[str, Any]:
        return json.loads((self.run_dir() / "state.json").read_text())

    def step_status(self, step: str) -> str | None:
        try:
            return self.state()["steps"].get(step, {}).get("status")
        except (OSError, ValueError, IndexError, StopIteration, FileNotFoundError):
            return None

    @staticmethod
    def wait_for(cond: Any, timeout: float, what: str, poll: float = 0.2) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if cond():
                return
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout} s: {what}")

    def wait_checkpoint(self, proc: subprocess.Popen[str], timeout: float = 400) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ftkit exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
            try:
                ck = self.run_dir() / "steps" / "train" / "checkpoints"
            except (FileNotFoundError, IndexError):
                return False
            return any((c / "ftkit-complete.json").is_file() for c in ck.glob("checkpoint-*")) if ck.is_dir() else False

        self.wait_for(ready, timeout, "a complete checkpoint")

    # -- what must hold after every fault ---------------------------------------------------

    def limits(self) -> dict[int, float]:
        gpus = json.loads(self.sim.read_text())["gpus"]
        return {i: float(g["power_limit_w"]) for i, g in enumerate(gpus)}

    def assert_machine_back(self) -> None:
        assert self.limits() == ORIGINALS, self.limits()
        originals = self.state_dir / "power-originals.json"
        if originals.exists():
            assert json.loads(originals.read_text()).get("gpus") == {}, originals.read_text()
        if self.standin is not None:
            self.wait_for(lambda: answers(self.service_port), 60, "the machine's serving service came back")

    def assert_nothing_left(self, *, stopped_containers_ok: bool = False) -> None:
        """No process of the run, no container of the run (`stopped_containers_ok`: none
        running - after a SIGKILL nobody is left to remove an exited container until the
        next `ftkit up --resume` or `ftkit down`)."""
        run = self.run_dir()

        def leftovers() -> list[str]:
            out = subprocess.run(["pgrep", "-af", str(run)], capture_output=True, text=True).stdout.splitlines()
            return [ln for ln in out if "pgrep" not in ln]

        try:
            self.wait_for(lambda: not leftovers(), 30, "processes of the run to end")
        except AssertionError:
            raise AssertionError(f"processes of the run are left: {leftovers()}") from None
        if self.executor == "docker":
            from ftkit.gateways import docker as dk

            def containers() -> list[dict]:  # type: ignore[type-arg]
                return dk.containers_with_label(f"dev.ftkit.run={run_label(run)}", all=not stopped_containers_ok)

            try:
                self.wait_for(lambda: not containers(), 60, "containers of the run to end")
            except AssertionError:
                raise AssertionError(f"containers of the run are left: {containers()}") from None

    def cleanup(self) -> None:
        self.stop_service()
        if self.runs.exists():
            for run in self.runs.iterdir():
                subprocess.run(["pkill", "-KILL", "-f", str(run)], check=False)
                if self.executor == "docker":
                    try:
                        from ftkit.gateways import docker as dk

                        for c in dk.containers_with_label(f"dev.ftkit.run={run_label(run)}"):
                            dk.remove_container(c["Id"])
                    except Exception:  # noqa: BLE001
                        pass
