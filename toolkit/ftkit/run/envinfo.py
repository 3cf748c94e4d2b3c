"""env.json: what this run ran on. Drift between hosts shows up here first."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

import ftkit

PACKAGES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "bitsandbytes",
    "safetensors", "tokenizers", "vllm", "pydantic", "docker", "nvidia-ml-py",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def docker_version() -> str | None:
    from ftkit.gateways import docker as docker_gw

    return docker_gw.server_version()


def snapshot(*, include_docker: bool = True) -> dict[str, Any]:
    from ftkit.gpu.nvml import inventory_or_empty

    gpus, driver = inventory_or_empty()
    return {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "ftkit": ftkit.__version__,
        "packages": package_versions(),
        "docker": docker_version() if include_docker else None,
        "gpus": [g.as_dict() for g in gpus],
        "gpu_driver": driver,
    }
