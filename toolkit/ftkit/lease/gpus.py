"""Which lock files stand for a GPU.

`--gpus` names HOST indices, as the plan knows them. Indices are a weak name for a GPU:
inside a container NVML sees only the container's GPUs, renumbered from 0. So a GPU is
locked under two names where NVML can tell its UUID - `gpu-<host index>.lock` and
`gpu-<UUID>.lock` - and under its index alone where NVML cannot (CPU machines, CI, a
container started without NVML). Every participant takes its names in one global (sorted)
order, so the union of both schemes stays deadlock-free, and a process that can read only
indices still excludes one that reads UUIDs.

In a container, Docker sets NVIDIA_VISIBLE_DEVICES to the host device ids it was given.
NVML numbers the visible GPUs in PCI order, which is the host's NVML order too, so host
index i is the container's NVML index `sorted(visible).index(i)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ftkit.errors import GpuError, UserError
from ftkit.strict import MAX_GPU_INDEX, ascii_int

VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
_SAFE = re.compile(r"[^0-9A-Za-z._-]")


@dataclass(frozen=True)
class GpuRef:
    """One leased GPU: its host index, its UUID where NVML told us, and its index in this
    process's NVML view (for the backstops; None without NVML)."""

    index: int | None
    uuid: str | None = None
    nvml_index: int | None = None

    @property
    def lock_names(self) -> list[str]:
        names = []
        if self.index is not None:
            names.append(f"gpu-{self.index}.lock")
        if self.uuid:
            names.append(f"gpu-{_SAFE.sub('_', self.uuid)}.lock")
        return names

    @property
    def label(self) -> str:
        if self.index is None:
            return f"GPU {self.uuid}"
        return f"GPU {self.index}" + (f" ({self.uuid})" if self.uuid else "")

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "uuid": self.uuid, "locks": self.lock_names}


def parse_gpus(text: str | None) -> list[int | str]:
    """`0,1` -> [0, 1]; `none` or empty -> [] (no GPU); UUIDs pass through. Exit 2 on junk,
    including digits that are not ASCII (`int("١")` is 1: a typo must not lease GPU 1)."""
    if text is None:
        return []
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    out: list[int | str] = []
    for tok in (t.strip() for t in text.split(",")):
        index = ascii_int(tok)
        if index is not None and index <= MAX_GPU_INDEX:
            item: int | str = index
        elif _UUID.fullmatch(tok):
            item = tok
        else:
            raise UserError(f"--gpus: {tok!r} is not a GPU index (0, 1, ... in ASCII digits) or UUID (GPU-...); "
                            "--gpus takes host indices, e.g. --gpus 0,1, or `none`")
        if item in out:
            raise UserError(f"--gpus: GPU {tok} is named twice")
        out.append(item)
    return out


def _visible() -> list[str] | None:
    """The host device ids this container was given; None outside a container (or `all`)."""
    raw = os.environ.get(VISIBLE_ENV)
    if raw is None:
        return None
    raw = raw.strip()
    if raw in ("", "all"):
        return None
    if raw in ("void", "none"):
        return []
    return [t.strip() for t in raw.split(",") if t.strip()]


def resolve(gpus: Sequence[int | str], nvml: object | None) -> tuple[list[GpuRef], list[str]]:
    """GpuRefs for `gpus` (host indices or UUIDs), plus warnings to show.

    `nvml` is an ftkit.gpu.nvml backend or None. A host index that does not exist, or is
    not visible in this container, is an error (exit 2): leasing a GPU we cannot see would
    protect nothing."""
    warnings: list[str] = []
    if not gpus:
        return [], warnings
    if nvml is None:
        refs = []
        for g in gpus:
            if isinstance(g, str):
                refs.append(GpuRef(index=None, uuid=g))
            else:
                refs.append(GpuRef(index=g))
        return refs, warnings
    try:
        uuids = [g.uuid for g in nvml.inventory()]  # type: ignore[attr-defined]
    except (GpuError, OSError) as e:  # OSError: a simulated state file that is not there
        warnings.append(f"NVML could not list the GPUs ({e}); locking by host index only")
        return [GpuRef(index=g) if isinstance(g, int) else GpuRef(index=None, uuid=g) for g in gpus], warnings
    visible = _visible()
    # A container view: NVML sees exactly the devices Docker passed, renumbered.
    container = visible is not None and len(visible) == len(uuids) and len(visible) > 0
    visible_idx = sorted(int(v) for v in visible) if container and visible and all(ascii_int(v) is not None for v in visible) else None
    refs = []
    for g in gpus:
        if isinstance(g, str):
            if g not in uuids:
                raise UserError(f"--gpus: no GPU with UUID {g} here (NVML sees {len(uuids)} GPU(s))")
            nvml_index = uuids.index(g)
            host_index: int | None = nvml_index
            if container:
                host_index = visible_idx[nvml_index] if visible_idx is not None else None
            refs.append(GpuRef(index=host_index, uuid=g, nvml_index=nvml_index))
            continue
        if container:
            if visible_idx is None:
                warnings.append(f"GPU {g}: {VISIBLE_ENV}={os.environ.get(VISIBLE_ENV)} lists UUIDs, so this "
                                f"container cannot tell which one is host GPU {g}; locking by index only "
                                "(pass --gpus as UUIDs to lock by UUID too)")
                refs.append(GpuRef(index=g))
                continue
            if g not in visible_idx:
                raise UserError(f"--gpus: host GPU {g} is not visible in this container "
                                f"({VISIBLE_ENV}={os.environ.get(VISIBLE_ENV)})",
                                hint="give the container that GPU (compose: device_ids) or lease another")
            nvml_index = visible_idx.index(g)
        else:
            if g >= len(uuids):
                raise UserError(f"--gpus: no GPU {g} here (NVML sees {len(uuids)} GPU(s): "
                                f"{', '.join(map(str, range(len(uuids)))) or 'none'})")
            nvml_index = g
        refs.append(GpuRef(index=g, uuid=uuids[nvml_index], nvml_index=nvml_index))
    return refs, warnings


def lock_order(refs: Sequence[GpuRef]) -> list[str]:
    """Every lock file name of these GPUs, in the one global order all holders use."""
    return sorted({name for r in refs for name in r.lock_names})
