"""Workload sharding as a recipe shape: GPU 1 serves the current model while GPU 0 trains,
then the merged model replaces the server on GPU 1. Simulated GPUs, tiny model: the test
checks the server answered WHILE training ran, and was replaced (not left waiting on its
own GPU) when the new server started."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require

require("trl")

from tests.e2e.faultkit import Machine, answers  # noqa: E402
from tests.e2e_inputs import free_port  # noqa: E402

pytestmark = pytest.mark.slow


def test_serve_on_one_gpu_while_training_on_the_other(tmp_path: Path) -> None:
    m = Machine(tmp_path, serve=False)
    old, new = free_port(), free_port()
    m.recipe.write_text(m.recipe.read_text().replace("  - type: merge\n    dtype: fp32\n", "") + f"""
  - type: merge
    dtype: fp32
  - {{type: serve, name: serve-new, engine: transformers, model: merged, gpus: [1], port: {new}, keep_running: false,
      ready_timeout_s: 300, prompts: [{{prompt: "kiwi", max_tokens: 2}}]}}
""")
    text = m.recipe.read_text().replace("  - type: train\n", f"""  - {{type: serve, name: serve-current, engine: transformers, model: base, gpus: [1], port: {old},
      keep_running: false, ready_timeout_s: 300, prompts: [{{prompt: "kiwi", max_tokens: 2}}]}}
  - type: train
""", 1)
    m.recipe.write_text(text)
    probes: list[tuple[float, bool]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            probes.append((time.time(), answers(old, "/health")))
            time.sleep(0.5)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    try:
        proc = m.up()
        out, err = proc.communicate(timeout=900)
    finally:
        stop.set()
        t.join(5)
        m.cleanup()
    assert proc.returncode == 0, err[-3000:]
    st = m.state()
    train = st["steps"]["train"]

    def ts(s: str) -> float:
        from datetime import datetime

        return datetime.fromisoformat(s).timestamp()

    during = [ok for when, ok in probes if ts(train["started"]) + 1 < when < ts(train["finished"]) - 1]
    assert during and all(during), "the current model was not served while GPU 0 trained"
    assert st["steps"]["serve-current"]["replaced_by"] == "serve-new"
    assert st["steps"]["serve-new"]["status"] == "succeeded"
    plan = json.loads((m.run_dir() / "plan.json").read_text())
    notes = next(s["notes"] for s in plan["steps"] if s["id"] == "serve-current")
    assert any("workload sharding" in n for n in notes)
    m.assert_nothing_left()
