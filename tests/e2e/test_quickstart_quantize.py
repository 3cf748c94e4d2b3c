"""Issue #19 end to end, in the images, on the CPU (`recipes/quickstart-quantize.yaml`):
a tiny Llama is trained and merged (train/cpu), quantized to W4A16 by llm-compressor's GPTQ
on rows of its own training data (the quantize image), served from the 4-bit directory by
vLLM's CPU build (serve/vllm-cpu), which answers the test prompts, and scored against the
16-bit merge (the quantize image, where transformers reads compressed-tensors). One vLLM
cold start; the images are the session's (cpu_images) plus the quantize image."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import require

require("trl")

from tests.conftest import RECIPES, run_ftkit, run_label, shared_dir  # noqa: E402
from tests.e2e_inputs import BASE, build_args  # noqa: E402
from tests.integration.conftest import machine_profile  # noqa: E402
from tests.shared_build import note_built  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def quantize_image(cpu_images, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """This checkout's quantize/cpu image, built like the session's train and serve images
    (same base, wheelhouse and CA bundle, so a profile with those settings plans its tag);
    removed when the run ends if this fixture built it (tests/shared_build.py)."""
    from ftkit.gateways import docker as dk
    from ftkit.images import builder, project

    tag = builder.plan_build(project.find_root(), "quantize", "cpu", base_image=BASE).tag
    if dk.image_attrs(tag) is None:
        note_built(shared_dir(), [tag])  # first: also a build that fails half way leaves nothing
        lock = tmp_path_factory.mktemp("quantize-lock") / "images.lock.json"  # not the checkout's
        proc = run_ftkit(*build_args("--image", "quantize", "--variant", "cpu", "--images-lock", str(lock)), timeout=2400)
        assert proc.returncode == 0, proc.stderr[-5000:]
    return tag


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, quantize_image: str) -> Path:
    work = tmp_path_factory.mktemp("quantize-docker")
    machine = machine_profile(work / "machine.yaml", "ci-docker")
    proc = run_ftkit("up", str(RECIPES / "quickstart-quantize.yaml"), "--machine", str(machine),
                     "--runs-dir", str(work / "runs"), "--quiet", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "succeeded"
    return Path(summary["run_dir"])


def test_the_plan_ran_each_step_in_its_image(run_dir: Path, quantize_image: str) -> None:
    plan = json.loads((run_dir / "plan.json").read_text())
    images = {s["id"]: s["image"] for s in plan["steps"]}
    assert images["quantize"] == images["eval"] == quantize_image
    assert images["train"].startswith("ftkit/train:cpu-") and images["serve"].startswith("ftkit/serve:vllm-cpu-")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "succeeded"
    assert all(state["steps"][s]["status"] == "succeeded" for s in ("train", "merge", "quantize", "serve", "eval"))


def test_llm_compressor_wrote_4_bit_compressed_tensors(run_dir: Path) -> None:
    out = run_dir / "steps/quantize/model"
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == 128 and weights["type"] == "int"
    assert q["ignore"] == ["lm_head"]
    summary = json.loads((run_dir / "steps/quantize/quantize.json").read_text())
    assert summary["method"] == "gptq" and summary["rows"] == 64 and summary["rows_available"] == 600
    assert 0 < summary["output_bytes"] < summary["input_bytes"]
    assert not list(run_dir.glob("steps/quantize/.*"))  # the partial directory was renamed into place
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # files follow the umask (safetensors' writer makes its file 0600)
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_vllm_served_the_4_bit_model_and_it_answered(run_dir: Path) -> None:
    log = (run_dir / "logs/serve.log").read_text()
    assert "CPUWNA16LinearKernel" in log and "quantization=compressed-tensors" in log
    rows = [json.loads(x) for x in (run_dir / "steps/serve/responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["passed"] for r in rows), rows


def test_the_eval_compares_quantized_with_the_16_bit_merge(run_dir: Path) -> None:
    summary = json.loads((run_dir / "steps/eval/summary.json").read_text())
    models = summary["models"]
    assert summary["order"] == ["merged", "quantized"] and summary["prompts"] == 60
    assert models["merged"]["accuracy"] >= 90
    # 4 bits cost the tiny model little on its own task
    assert models["quantized"]["accuracy"] >= models["merged"]["accuracy"] - 10
    from ftkit.gateways import docker as dk

    assert dk.containers_with_label(f"dev.ftkit.run={run_label(run_dir)}") == []  # none left behind
