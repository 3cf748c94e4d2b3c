"""The CPU QLoRA quickstart end to end (issue #18), with both executors and bitsandbytes
itself (NF4 4-bit layers and the 8-bit AdamW on the CPU; nothing mocked).

The local run is interrupted (SIGINT) once its first checkpoint is complete and finished
with `ftkit up --resume`: training continues from that checkpoint (the 4-bit base is
quantized again at load, the adapter and the 8-bit optimizer states come from the
checkpoint). The docker run (the train/cpu image, which pins bitsandbytes) goes through
uninterrupted. Both must learn (at least 50 points on held-out prompts), the merged model
(into the base rounded through NF4 as training saw it) must answer like the adapter on the
4-bit base, and the two runs must give the same evaluation. bitsandbytes' noise stays in the
step logs, off the console.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import require

require("trl")
require("bitsandbytes")

from tests.conftest import RECIPES, ROOT, run_ftkit, run_label  # noqa: E402

RECIPE = RECIPES / "quickstart-qlora.yaml"


def locked(package: str, lock: str = "train-cpu") -> str:
    """The version an image's lock pins (images/locks/LOCK.txt: `package==version \\`)."""
    text = (ROOT / "images" / "locks" / f"{lock}.txt").read_text(encoding="utf-8")
    found = re.search(rf"^{re.escape(package)}==(\S+)", text, re.MULTILINE)
    assert found, f"{package} is not in the {lock} lock"
    return found.group(1)


NOISE = ("gemm_4bit_forward", "kernels-community", "bitsandbytes", "Traceback")


def _complete_checkpoint(runs: Path) -> bool:
    return any(runs.glob("*/steps/train/checkpoints/checkpoint-*/ftkit-complete.json"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(run directory, what the console showed across both invocations)."""
    runs = tmp_path_factory.mktemp("qlora-runs")
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", "up", str(RECIPE), "--runs-dir", str(runs), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _complete_checkpoint(runs):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint within 600 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == 130, err[-3000:]  # interrupted during training, not after it
    run = next(runs.iterdir())
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "interrupted" and state["steps"]["train"]["status"] == "interrupted"
    resumed = run_ftkit("up", "--resume", str(run), "--quiet", "--json", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout)["status"] == "succeeded"
    return run, err + resumed.stderr


def test_qlora_learns_on_the_cpu(local_run: tuple[Path, str]) -> None:
    run, _ = local_run
    summary = json.loads((run / "steps/eval/summary.json").read_text())
    models = summary["models"]
    assert summary["prompts"] == 60
    assert models["adapter"]["accuracy"] - models["base"]["accuracy"] >= 50  # the adapter on the 4-bit base
    assert models["merged"]["accuracy"] == models["adapter"]["accuracy"]  # the NF4 merge kept what was learned
    answers: dict[str, dict[str, str]] = {}
    for row in map(json.loads, (run / "steps/eval/results.jsonl").read_text().splitlines()):
        answers.setdefault(row["model"], {})[row["prompt"]] = row["answer"]
    assert answers["merged"] == answers["adapter"]  # prompt by prompt, not just the count


def test_the_real_qlora_path_ran_and_resumed(local_run: tuple[Path, str]) -> None:
    run, _ = local_run
    plan = json.loads((run / "plan.json").read_text())
    train_cfg = json.loads((run / "configs/train-train.json").read_text())["train"]
    assert (train_cfg["method"], train_cfg["precision"], train_cfg["optimizer"]) == ("qlora", "bf16", "adamw_8bit")
    merge = next(s for s in plan["steps"] if s["id"] == "merge")
    assert merge["argv"][-3:] == ["--nf4-dequantized-base", "--nf4-dtype", "bf16"]
    log = (run / "logs/train.log").read_text()
    assert "4-bit layers on the CPU kept in the training layout" in log  # bitsandbytes' Linear4bit, prepared
    summary = json.loads((run / "steps/train/train_summary.json").read_text())
    assert summary["method"] == "qlora" and summary["global_step"] == 120
    assert summary["resumed_from"] and summary["resumed_from"].startswith("checkpoint-")
    assert summary["eval_loss_last"] < summary["eval_loss_first"]
    ckpts = sorted((run / "steps/train/checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "ftkit-complete.json").is_file() and (c / "optimizer.pt").is_file() for c in ckpts)
    merge_out = _merge_summary(run)
    assert merge_out["nf4_rounding"] == f"bitsandbytes {version('bitsandbytes')}"  # the one installed here (>=0.50)
    assert merge_out["nf4_dtype"] == "bf16"


def test_bitsandbytes_noise_stays_in_the_step_log(local_run: tuple[Path, str]) -> None:
    run, console = local_run
    for word in NOISE:
        assert word not in console, (word, console[-2000:])
    import bitsandbytes.functional as bnbf

    if bnbf.has_avx512bf16():  # the CPUs where bitsandbytes looks for that kernel at import
        assert "gemm_4bit_forward" in (run / "logs/train.log").read_text()  # where it went


@pytest.fixture(scope="module")
def docker_run(tmp_path_factory: pytest.TempPathFactory, cpu_images) -> Path:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import machine_profile

    work = tmp_path_factory.mktemp("qlora-docker")
    machine = machine_profile(work / "machine.yaml", "ci-docker")
    proc = run_ftkit("up", str(RECIPE), "--machine", str(machine), "--runs-dir", str(work / "runs"), "--quiet", "--json",
                     timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for word in NOISE:
        assert word not in proc.stderr, (word, proc.stderr[-2000:])
    return Path(json.loads(proc.stdout)["run_dir"])


@pytest.mark.docker
def test_docker_executor_gives_the_same_qlora_result(local_run: tuple[Path, str], docker_run: Path) -> None:
    local = json.loads((local_run[0] / "steps/eval/summary.json").read_text())
    docker = json.loads((docker_run / "steps/eval/summary.json").read_text())
    assert docker["models"] == local["models"]
    state = json.loads((docker_run / "state.json").read_text())
    assert state["status"] == "succeeded" and state["steps"]["train"]["process"]["container"]
    summary = json.loads((docker_run / "steps/train/train_summary.json").read_text())
    assert summary["method"] == "qlora" and summary["resumed_from"] is None
    merge_out = _merge_summary(docker_run)
    assert merge_out["nf4_rounding"] == f"bitsandbytes {locked('bitsandbytes')}"  # the image's, as its lock pins it
    from ftkit.gateways import docker as dk

    assert dk.containers_with_label(f"dev.ftkit.run={run_label(docker_run)}") == []  # none left behind


def _merge_summary(run: Path) -> dict:  # type: ignore[type-arg]
    """The merge's JSON summary from its step log: the last line that is one (in a container
    its stdout and stderr reach the log as two streams, so a stderr line may come after it)."""
    for line in reversed((run / "logs/merge.log").read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("no JSON summary in the merge's log")
