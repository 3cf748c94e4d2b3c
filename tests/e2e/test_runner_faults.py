"""Fault injection on `ftkit up` with the local executor and simulated GPUs (no GPU can run
here; the simulated NVML is named as such in env.json): power caps are restored when a step
fails and when the run is stopped with SIGTERM, and the journal says what happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tests.conftest import RECIPES  # noqa: E402

SIM_ENV = {"FTKIT_SIMULATED_GPUS": "RTX 4090,RTX 3090 Ti"}


def machine(tmp_path: Path) -> Path:
    p = tmp_path / "machine.yaml"
    p.write_text(
        "ftkit: 1\nkind: machine\nname: sim\nexecutor: local\npsu: {watts: 1500}\n"
        "gpus:\n  - {index: 0, model: RTX 4090}\n  - {index: 1, model: RTX 3090 Ti}\n"
    )
    return p


def recipe(tmp_path: Path, serve_timeout: int = 1, max_steps: int = 4) -> Path:
    data = RECIPES / "data"
    p = tmp_path / "recipe.yaml"
    p.write_text(f"""ftkit: 1
name: faults
model:
  tiny: {{hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, vocab_size: 300}}
  dtype: fp32
dataset:
  path: {data / 'quickstart-train.jsonl'}
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
  - type: merge
    dtype: fp32
  - type: serve
    engine: transformers
    gpus: [0]
    port: 8771
    ready_timeout_s: {serve_timeout}
    keep_running: false
""".replace(str(data), os.path.relpath(data, tmp_path)))
    return p


def up(tmp_path: Path, recipe_path: Path, **popen_kw):  # type: ignore[no-untyped-def]
    env = {**os.environ, **SIM_ENV}
    argv = [sys.executable, "-m", "ftkit", "up", str(recipe_path), "--machine", str(machine(tmp_path)),
            "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)


def state(tmp_path: Path) -> dict:
    run = next((tmp_path / "runs").iterdir())
    return json.loads((run / "state.json").read_text())


def test_failed_step_still_restores_power(tmp_path: Path) -> None:
    proc = up(tmp_path, recipe(tmp_path, serve_timeout=1))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    s = state(tmp_path)
    assert s["status"] == "failed" and s["failed_step"] == "serve"
    assert "did not become ready within 1 s" in s["steps"]["serve"]["error"]
    assert "last log lines" in s["steps"]["serve"]["error"]
    assert s["steps"]["power"]["caps_w"] == {"0": 300, "1": 300} and s["steps"]["power"]["simulated"] is True
    assert s["power"]["original_w"] == {"0": 450.0, "1": 350.0}
    assert s["steps"]["power-restore-final"]["status"] == "succeeded"
    assert s["steps"]["power-restore-final"]["restored_w"] == {"0": 450.0, "1": 350.0}
    assert s["steps"]["train"]["status"] == "succeeded"
    run = next((tmp_path / "runs").iterdir())
    env = json.loads((run / "env.json").read_text())
    assert env["gpu_driver"]["simulated"] is True and len(env["gpus"]) == 2
    assert "FAILED" in err


def test_sigterm_restores_power(tmp_path: Path) -> None:
    proc = up(tmp_path, recipe(tmp_path, serve_timeout=60, max_steps=400))
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = tmp_path / "runs"
        if runs.exists() and any(runs.iterdir()):
            try:
                if state(tmp_path)["steps"].get("train", {}).get("status") == "running":
                    break
            except (json.JSONDecodeError, FileNotFoundError, StopIteration):
                pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the run never reached the train step")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    s = state(tmp_path)
    assert s["status"] == "failed"
    assert s["steps"]["power-restore-final"]["restored_w"] == {"0": 450.0, "1": 350.0}
    assert "SIGTERM" in (s.get("message") or "") or "SIGTERM" in err
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "runs")], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the training process outlived the run"
