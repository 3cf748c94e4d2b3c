"""What the e2e and integration tests give ftkit, written in one place: the local base image,
wheelhouse and CA bundle every test build and docker machine profile uses (so they all plan
the same image tags), the tiny models' YAML, the LoRA training recipe the distributed and
multi-node tests share, the quickstart's data and a free port. Unit tests build their inputs
with tests/builders.py; these are the texts the slower tests write to disk as a user would.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from tests.conftest import RECIPES

BASE = os.environ.get("FTKIT_TEST_BASE_IMAGE", "ftkit-test/bookworm-python:latest")
WHEELHOUSE = os.environ.get("FTKIT_TEST_WHEELHOUSE", "/opt/wheels")
CA = os.environ.get("FTKIT_TEST_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
QUICKSTART_DATA = RECIPES / "data" / "quickstart-train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quickstart_data(dest: Path) -> Path:
    """Copy the quickstart's training rows to `dest` (a file path; its directory is made):
    recipe paths may not climb out of the recipe's directory."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(QUICKSTART_DATA, dest)
    return dest


def build_args(*args: str) -> list[str]:
    """`ftkit build ARGS` from the local base image, with the CA bundle and wheelhouse where
    this machine has them: the flags `cpu_images` builds with, so the tags are the same."""
    out = ["build", *args, "--base-image", BASE]
    if Path(CA).is_file():
        out += ["--ca-bundle", CA]
    if Path(WHEELHOUSE).is_dir():
        out += ["--wheelhouse", WHEELHOUSE]
    return out


def docker_lines(*extra: str) -> list[str]:
    """A machine profile's `docker:` block (then `ca_bundle:`) for the test images; `extra`
    are more `docker:` keys, e.g. "images_lock: PATH"."""
    lines = ["docker:", f"  base_image: {BASE}", "  build_missing: false", *(f"  {e}" for e in extra)]
    if Path(WHEELHOUSE).is_dir():
        lines.append(f"  wheelhouse: {WHEELHOUSE}")
    if Path(CA).is_file():
        lines.append(f"ca_bundle: {CA}")
    return lines


def tiny(hidden_size: int = 32, **extra: object) -> str:
    """A tiny Llama as a recipe's `model: {tiny: ...}` flow mapping (seconds to train on a CPU)."""
    fields = {"hidden_size": hidden_size, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300, **extra}
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def lora_recipe(name: str, *, steps: int, batch: int, distribution: str, every: int, logging_steps: int,
                **more: object) -> str:
    """The LoRA recipe the distributed (one machine) and multi-node tests train and compare:
    fp32, fixed seed and learning rate, no warm-up or dropout, so runs that should match do.
    `more` adds train-step keys (gpus, nodes, cpu_offload, optimizer)."""
    extra = "".join(f"    {k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in more.items())
    return f"""\
ftkit: 1
name: {name}
model:
  tiny: {tiny(initializer_range=0.1)}
  dtype: fp32
dataset: {{path: data/quickstart-train.jsonl, format: alpaca, template: alpaca}}
steps:
  - type: train
    method: lora
    lora: {{r: 8, alpha: 16, dropout: 0.0}}
    max_steps: {steps}
    learning_rate: 0.003
    warmup_ratio: 0.0
    batch_size: {batch}
    grad_accum: 2
    seq_len: 96
    precision: fp32
    gradient_checkpointing: false
    seed: 7
    distribution: {distribution}
{extra}    checkpoint: {{every_steps: {every}, keep_last: 2, keep_best: false}}
    logging_steps: {logging_steps}
"""
