"""Power limits with a memory: the limit each GPU had before ftkit first changed it is
written to a machine-wide state file BEFORE the change, so whatever happens next (a crash,
SIGKILL, a power cut) a later run or `ftkit power restore` puts back the true original,
never a crashed run's cap.

The record is per physical GPU (keyed by UUID, since indices move), kept until that GPU is
restored. Restores go GPU by GPU: one that fails never stops the others, and every
failure is reported.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import GpuError
from ftkit.files import write_json
from ftkit.gpu.nvml import Nvml

STATE_ENV = "FTKIT_STATE_DIR"
FILE = "power-originals.json"


def state_dir() -> Path:
    """Machine-wide state: $FTKIT_STATE_DIR, else /var/lib/ftkit for root (who alone can set
    power limits on a real GPU), else $XDG_STATE_HOME/ftkit (~/.local/state/ftkit)."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/ftkit")
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "ftkit"


def originals_path() -> Path:
    return state_dir() / FILE


@contextmanager
def _locked() -> Iterator[dict[str, Any]]:
    """The originals record, read and rewritten under an exclusive lock (several ftkit
    processes may cap GPUs at once)."""
    path = originals_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise GpuError(f"{path}: the record of original power limits is unreadable ({e}); "
                           "fix or remove it after checking the limits with `nvidia-smi -q -d POWER`") from e
        data.setdefault("gpus", {})
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            write_json(path, data)
    finally:
        os.close(lock)


def read_originals() -> dict[str, dict[str, Any]]:
    path = originals_path()
    if not path.exists():
        return {}
    with _locked() as data:
        return dict(data["gpus"])


def _keys(nv: Nvml) -> dict[int, tuple[str, str]]:
    """index -> (key, name); the key is the UUID (stable), the index where there is none."""
    out = {}
    for g in nv.inventory():
        out[g.index] = (g.uuid or f"index-{g.index}", g.name)
    return out


@dataclass
class PowerReport:
    changed: dict[int, float] = field(default_factory=dict)  # index -> watts now set
    originals: dict[int, float] = field(default_factory=dict)  # index -> recorded original
    failed: dict[int, str] = field(default_factory=dict)  # index -> why

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        parts = [f"GPU {i}: {w:g} W" for i, w in sorted(self.changed.items())]
        parts += [f"GPU {i}: FAILED ({why})" for i, why in sorted(self.failed.items())]
        return ", ".join(parts) or "nothing to do"


def set_limits(nv: Nvml, caps: dict[int, float], *, by: str) -> PowerReport:
    """Record each GPU's current limit as its original (unless a record already holds the
    true original), make that durable, then set the cap. Stops at the first failure: a
    half-capped machine must not go on to train; the caller restores what was changed."""
    keys = _keys(nv)
    report = PowerReport()
    for idx, watts in sorted(caps.items()):
        if idx not in keys:
            raise GpuError(f"GPU {idx} is not on this machine (NVML sees {sorted(keys)})")
        key, name = keys[idx]
        with _locked() as data:
            rec = data["gpus"].get(key)
            if rec is None:
                rec = {"index": idx, "name": name, "original_w": nv.power_limit_w(idx),
                       "recorded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "by": by,
                       "simulated": bool(nv.simulated)}
                data["gpus"][key] = rec
        report.originals[idx] = float(rec["original_w"])
        nv.set_power_limit_w(idx, float(watts))
        report.changed[idx] = float(watts)
    return report


def restore(nv: Nvml, indices: list[int] | None = None) -> PowerReport:
    """Put every recorded GPU (or those in `indices`) back at its original limit, each on
    its own: a failure is reported and the others still go back. A GPU's record is dropped
    only once its limit is back."""
    keys = _keys(nv)
    by_key = {key: idx for idx, (key, _) in keys.items()}
    report = PowerReport()
    for key, rec in sorted(read_originals().items()):
        idx = by_key.get(key)
        if idx is None:
            report.failed[int(rec.get("index", -1))] = f"GPU {rec.get('name')} ({key}) is no longer visible to NVML"
            continue
        if indices is not None and idx not in indices:
            continue
        try:
            nv.set_power_limit_w(idx, float(rec["original_w"]))
        except GpuError as e:
            report.failed[idx] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - one GPU's surprise must not stop the others
            report.failed[idx] = f"{e.__class__.__name__}: {e}"
            continue
        report.changed[idx] = float(rec["original_w"])
        report.originals[idx] = float(rec["original_w"])
        with _locked() as data:
            data["gpus"].pop(key, None)
    return report


def show(nv: Nvml) -> list[dict[str, Any]]:
    """Each GPU's current limit, its default and the recorded original (None: not changed by ftkit)."""
    recorded = read_originals()
    rows = []
    for g in nv.inventory():
        rec = recorded.get(g.uuid or f"index-{g.index}")
        rows.append({"index": g.index, "name": g.name, "uuid": g.uuid, "limit_w": nv.power_limit_w(g.index),
                     "default_w": g.power_default_w, "min_w": g.power_min_w, "max_w": g.power_max_w,
                     "original_w": rec["original_w"] if rec else None, "recorded": rec.get("recorded") if rec else None,
                     "by": rec.get("by") if rec else None, "simulated": bool(nv.simulated)})
    return rows
