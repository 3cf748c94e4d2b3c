"""Checks a holder makes before it starts its command, where NVML is readable.

The lease only excludes those who take it. These catch what it cannot see: a process that
holds GPU memory without the lease (a notebook, a container started by hand), and a GPU
whose enforced power limit is above the recipe's cap ("cap before you train" must hold
under plain `docker compose` too, where no ftkit runs on the host to set the caps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from ftkit.errors import GpuError, LeaseRefused, UserError
from ftkit.lease.gpus import GpuRef
from ftkit.strict import ascii_int, finite_float

# After the previous holder exits, the driver takes a moment to free its memory.
SETTLE_S = 10.0
POWER_SLACK_W = 0.5  # NVML reports milliwatts; a limit set to the cap reads back exactly
MAX_CAP_W = 5000  # `ftkit power set --watts` takes 1-5000: a cap above it is a typo, not a cap


def parse_power_caps(text: str | None, gpus: Sequence[int | str]) -> dict[int | None, float]:
    """`350` (every GPU) or `0=350,1=300` (per host index) -> {None: 350} / {0: 350, 1: 300}."""
    if text is None or not text.strip():
        return {}
    caps: dict[int | None, float] = {}
    for item in (t.strip() for t in text.split(",")):
        key: int | None = None
        watts = item
        if "=" in item:
            k, watts = (s.strip() for s in item.split("=", 1))
            index = ascii_int(k)
            if index is None:
                raise UserError(f"--max-power-w: {item!r}: expected GPU=WATTS, e.g. 0=350")
            key = index
            if key not in gpus:
                raise UserError(f"--max-power-w: GPU {key} is not among --gpus")
        w = finite_float(watts)  # not float(): it reads 1e999 as inf, and nan passes every bound
        if w is None:
            raise UserError(f"--max-power-w: {item!r}: watts must be a number (finite, in ASCII digits)")
        if not w > 0:
            raise UserError(f"--max-power-w: {item!r}: watts must be positive")
        if w > MAX_CAP_W:
            raise UserError(f"--max-power-w: {item!r}: watts must be at most {MAX_CAP_W} (as for ftkit power set)")
        if key in caps:
            raise UserError(f"--max-power-w: GPU {key if key is not None else '(all)'} is given twice")
        caps[key] = w
    return caps


def _fmt_w(w: float) -> str:
    return f"{w:g}"


def check_power(nvml: object, refs: Sequence[GpuRef], caps: Mapping[int | None, float]) -> list[str]:
    """Refuse (LeaseRefused) when a GPU enforces more than its cap. Returns warnings."""
    if not caps:
        return []
    over: list[tuple[GpuRef, float, float]] = []
    warnings: list[str] = []
    for ref in refs:
        cap = caps.get(ref.index, caps.get(None))
        if cap is None or ref.nvml_index is None:
            continue
        try:
            limit = float(nvml.enforced_power_limit_w(ref.nvml_index))  # type: ignore[attr-defined]
        except (GpuError, OSError) as e:
            warnings.append(f"power backstop: cannot read the enforced limit of {ref.label}: {e}")
            continue
        if limit > cap + POWER_SLACK_W:
            over.append((ref, limit, cap))
    if over:
        what = "; ".join(f"{r.label} enforces {_fmt_w(limit)} W, above the cap of {_fmt_w(cap)} W"
                         for r, limit, cap in over)
        by_cap: dict[float, list[str]] = {}
        for r, _, cap in over:
            by_cap.setdefault(cap, []).append(str(r.index if r.index is not None else r.uuid))
        # `ftkit power set` takes whole watts; rounding down stays within the cap
        fix = " && ".join(f"ftkit power set --gpus {','.join(g)} --watts {int(c)}" for c, g in sorted(by_cap.items()))
        raise LeaseRefused(f"ftkit lease: refusing to start: {what}",
                           hint=f"cap the GPUs first, on the host (containers cannot): {fix}")
    return warnings


def foreign_processes(nvml: object, refs: Sequence[GpuRef], tolerated: Collection[int]) -> list[tuple[GpuRef, int, int]]:
    out = []
    for ref in refs:
        if ref.nvml_index is None:
            continue
        for pid, mib in nvml.compute_processes(ref.nvml_index):  # type: ignore[attr-defined]
            if pid not in tolerated:
                out.append((ref, pid, mib))
    return out


def check_processes(
    nvml: object,
    refs: Sequence[GpuRef],
    *,
    tolerated: Collection[int] = (),
    lenient: Collection[int | None] = (),
    settle_s: float = SETTLE_S,
    on_wait: Callable[[str], None] | None = None,
) -> list[str]:
    """Refuse (LeaseRefused) when a process outside the lease holds memory on our GPUs.

    `tolerated`: NVML pids that belong to the lease (a yielded engine asleep on the GPU).
    `lenient`: host indices where such an engine sleeps but its pids are unknown (its
    supervisor could not read NVML): processes there only warn. We retry for `settle_s`
    first, since a previous holder's memory is freed a moment after it exits."""
    deadline = time.monotonic() + settle_s
    said = False
    while True:
        try:
            found = foreign_processes(nvml, refs, tolerated)
        except (GpuError, OSError) as e:
            return [f"process backstop skipped: NVML cannot list the processes ({e})"]
        strict = [f for f in found if f[0].index not in lenient]
        if not strict:
            return [f"{r.label}: process {pid} holds {mib} MiB; a sleeping engine of the lease is on this GPU "
                    "but its pids are unknown, so it is assumed to be that" for r, pid, mib in found]
        if time.monotonic() >= deadline:
            what = "; ".join(f"{r.label}: pid {pid} holds {mib} MiB" for r, pid, mib in strict)
            raise LeaseRefused(
                f"ftkit lease: refusing to start: a process outside the lease holds GPU memory ({what})",
                hint="pids are host pids (NVML ignores PID namespaces, so inside a container they do not match "
                     "`ps`); stop that process, or start it through `ftkit lease`",
            )
        if on_wait is not None and not said:
            held = "; ".join(f"{r.label}: pid {pid} holds {mib} MiB" for r, pid, mib in strict)
            on_wait(f"waiting up to {settle_s:g} s for GPU memory to be freed: {held}")
            said = True
        time.sleep(0.5)
