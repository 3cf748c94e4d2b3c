"""This host as a machine profile, for commands run without --machine."""

from __future__ import annotations

import socket

from ftkit.gpu.nvml import inventory_or_empty
from ftkit.recipe.models import GpuSpec, Machine, PowerRange


def detect_machine() -> Machine:
    """GPUs from NVML (none on a CPU machine); steps run in this Python environment."""
    gpus, _ = inventory_or_empty()
    specs = []
    for g in gpus:
        power = None
        if g.power_min_w and g.power_max_w:
            power = PowerRange(
                min_w=int(g.power_min_w), max_w=int(g.power_max_w),
                default_w=int(g.power_default_w) if g.power_default_w else None,
            )
        specs.append(
            GpuSpec(index=g.index, model=g.name, vram_gib=round(g.memory_total_mib / 1024, 1), power=power,
                    compute_capability=g.compute_capability)
        )
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname().lower())[:50] or "host"
    return Machine(ftkit=1, kind="machine", name=f"{host}-detected" if host[0].isalnum() else "this-host",
                   gpus=specs, executor="local")
