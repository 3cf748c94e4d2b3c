"""`transformers serve` as ftkit plans it lists the model it serves at /v1/models.

Before 5.24, transformers serve built /v1/models from the Hugging Face hub cache alone: the
model of its command line - a local directory, which is what ftkit serves (a merged model,
the tiny base) - was never listed, and /v1/models answered an empty list. 5.24 lists the
model a server is pinned to. The serve/transformers image pins such a release, and so does
the `train` extra for this Python environment; here the plan's own command, with its
environment, serves a real tiny model."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from ftkit.plan.container import step_command
from tests.conftest import ROOT, require

FIRST_LISTING = "5.24"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_the_transformers_serve_image_pins_a_release_that_lists_its_model() -> None:
    lock = (ROOT / "images" / "locks" / "serve-transformers.txt").read_text()
    pinned = re.search(r"^transformers==(\S+)", lock, re.M)
    assert pinned and _version(pinned.group(1)) >= _version(FIRST_LISTING), pinned
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers>={FIRST_LISTING},<6"' in pyproject  # the local engines' floor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RECIPE = """\
ftkit: 1
name: tserve
model: {tiny: {hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, vocab_size: 300}, dtype: fp32}
dataset: {path: data.jsonl, format: alpaca, template: alpaca}
steps:
  - {type: serve, engine: transformers, model: base, port: PORT, ready_timeout_s: 120,
     prompts: [{prompt: "kiwi", max_tokens: 2}]}
"""


@pytest.mark.timeout(300)
def test_the_planned_server_lists_the_model_it_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = require("transformers")
    if _version(transformers.__version__) < _version(FIRST_LISTING):
        pytest.fail(f"transformers {transformers.__version__} here: the `train` extra needs {FIRST_LISTING} or newer")
    require("fastapi")
    from ftkit.gateways import serving
    from ftkit.prepare import prepare

    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    rows = [{"instruction": f"name {w}", "input": "", "output": w} for w in ("kiwi", "mango", "cello", "flute")]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("PORT", str(_free_port())))
    run = tmp_path / "run"
    plan = prepare(str(recipe), None, run_dir=str(run), executor="local").plan
    for step in plan.steps:
        for f in step.files:
            (run / f.path).parent.mkdir(parents=True, exist_ok=True)
            (run / f.path).write_text(f.content)
    tiny, serve = plan.step("tiny-model"), plan.step("serve")
    assert serve.engine == "transformers"
    made = subprocess.run(step_command(tiny, plan), env={**os.environ, **tiny.env}, capture_output=True, text=True,
                          timeout=240, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(step_command(serve, plan), env={**os.environ, **serve.env}, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        ready = serve.ready
        assert ready is not None
        serving.wait_ready(ready.health, ready.models, ready.timeout_s, alive=lambda: server.poll() is None,
                           log_tail=lambda: log.read_text(errors="replace"), poll_s=0.5)
        listed = serving.model_ids(ready.models)
        assert listed == [ready.served_name], (listed, log.read_text()[-2000:])
        # and that name is the one the server answers to
        [result] = serving.run_prompts(ready.base_url, listed[0], serve.prompts)
        assert result["error"] is None, result
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
