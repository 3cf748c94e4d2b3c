"""Power limits with a memory: the limit each GPU had before ftkit first changed it is
written to a machine-wide state file BEFORE the change, so whatever happens next (a crash,
SIGKILL, a power cut) a later run or `ftkit power restore` puts back the true original,
never a crashed run's cap.

The record is per physical GPU (keyed by UUID, since indices move) and names who holds a
cap on it: each run (its ftkit's pid and start time) and `ftkit power set` (until `ftkit
power restore`). A GPU goes back to its original only when its last live holder lets go;
while another run still trains on it, the lowest cap still asked for stays - one run ending
must never uncap another (a PSU trip). Restores go GPU by GPU, each GPU found by its UUID
alone: one that fails, or has fallen off the bus, never stops the others, and every failure
is reported.
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
from ftkit.files import UnsafeFile, read_bounded, write_json
from ftkit.gpu.nvml import Nvml
from ftkit.text import printable

STATE_ENV = "FTKIT_STATE_DIR"
FILE = "power-originals.json"
RECORD_MAX_BYTES = 4 << 20  # a record of a few GPUs is a few KB; anything larger is not ours
MANUAL = "manual"  # the holder name of `ftkit power set`


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
    """The originals record, read and rewritten (atomically) under an exclusive lock:
    several ftkit processes may cap and restore GPUs at once."""
    path = originals_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(read_bounded(path, RECORD_MAX_BYTES).decode("utf-8")) if os.path.lexists(path) else {}
        except UnsafeFile as e:
            raise GpuError(f"{path}: the record of original power limits is unreadable ({e.reason}); "
                           "fix or remove it after checking the limits with `nvidia-smi -q -d POWER`") from e
        except (OSError, ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
            why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "nested too deep" \
                if isinstance(e, RecursionError) else printable(str(e))[:200]
            raise GpuError(f"{path}: the record of original power limits is unreadable ({why}); "
                           "fix or remove it after checking the limits with `nvidia-smi -q -d POWER`") from e
        if not isinstance(data, dict) or not isinstance(data.setdefault("gpus", {}), dict):
            raise GpuError(f"{path}: not a record of power limits; fix or remove it")
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            write_json(path, data, mode=0o644)  # restores follow it as root: only its owner writes it
    finally:
        os.close(lock)


def read_originals() -> dict[str, dict[str, Any]]:
    if not os.path.lexists(originals_path()):
        return {}
    with _locked() as data:
        return dict(data["gpus"])


@dataclass(frozen=True)
class Holder:
    """Who holds a cap: a run (alive while its ftkit process is) or `ftkit power set`."""

    name: str
    pid: int | None = None
    pid_start: int | None = None

    @classmethod
    def this_process(cls, name: str) -> Holder:
        from ftkit.procs import process_start

        return cls(name, os.getpid(), process_start(os.getpid()))

    def as_dict(self, cap_w: float) -> dict[str, Any]:
        return {"pid": self.pid, "pid_start": self.pid_start, "cap_w": cap_w,
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _alive(entry: dict[str, Any]) -> bool:
    if entry.get("pid") is None:
        return True  # `ftkit power set`: held until `ftkit power restore`
    from ftkit.procs import is_alive

    return is_alive(entry.get("pid"), entry.get("pid_start"))


def _index_of(nv: Nvml, key: str, rec: dict[str, Any]) -> int:
    if key.startswith("index-"):
        return int(key.split("-", 1)[1])
    return nv.index_by_uuid(key)


def recorded_indices() -> set[int]:
    """The GPU indices the machine-wide record holds an original for."""
    return {rec["index"] for rec in read_originals().values()
            if isinstance(rec, dict) and isinstance(rec.get("index"), int)}


def dead_holdings(holder: str) -> list[int]:
    """GPU indices the record says `holder` caps although its process is gone: what a run
    killed with SIGKILL left capped, whatever its own (perhaps damaged) files say."""
    out = []
    for rec in read_originals().values():
        entry = (rec.get("holders") or {}).get(holder) if isinstance(rec, dict) else None
        if isinstance(entry, dict) and entry.get("pid") is not None and not _alive(entry):
            idx = rec.get("index")
            out.append(idx if isinstance(idx, int) and not isinstance(idx, bool) else -1)
    return sorted(out)


@dataclass
class PowerReport:
    changed: dict[int, float] = field(default_factory=dict)  # index -> watts now set
    originals: dict[int, float] = field(default_factory=dict)  # index -> recorded original
    kept: dict[int, str] = field(default_factory=dict)  # index -> why it stays capped (another holder)
    failed: dict[str, str] = field(default_factory=dict)  # "GPU i" or the UUID -> why
    recovered: dict[int, tuple[float, str]] = field(default_factory=dict)  # index -> (original, from where)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        parts = [f"GPU {i}: {w:g} W" for i, w in sorted(self.changed.items())]
        parts += [f"GPU {i}: kept capped ({why})" for i, why in sorted(self.kept.items())]
        parts += [f"{who}: FAILED ({why})" for who, why in sorted(self.failed.items())]
        return ", ".join(parts) or "nothing to do"


def set_limits(nv: Nvml, caps: dict[int, float], *, holder: Holder,
               known_originals: dict[int, tuple[float, str]] | None = None) -> PowerReport:
    """Record each GPU's current limit as its original (unless a record already holds the
    true original), name `holder` on it, make that durable, then set the cap - never above
    a cap another live holder still asks for. Stops at the first failure: a half-capped
    machine must not go on to train; the caller restores what it holds.

    `known_originals` (index -> (watts, where it was found)): a true original another copy
    holds (a dead run's journal) for a GPU this record has lost - its current limit is then
    that run's cap, not the original. Used in place of the current limit, and said."""
    report = PowerReport()
    for idx, watts in sorted(caps.items()):
        key = nv.uuid(idx) or f"index-{idx}"
        with _locked() as data:
            rec = data["gpus"].get(key)
            if rec is None:
                name = next((g.name for g in nv.inventory() if g.index == idx), "?")
                known = (known_originals or {}).get(idx)
                rec = {"index": idx, "name": name, "original_w": known[0] if known else nv.power_limit_w(idx),
                       "recorded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "simulated": bool(nv.simulated), "holders": {}}
                if known:
                    rec["recovered_from"] = known[1]
                    report.recovered[idx] = known
                data["gpus"][key] = rec
            holders = rec.setdefault("holders", {})
            holders[holder.name] = holder.as_dict(float(watts))
            others = [float(h["cap_w"]) for n, h in holders.items() if n != holder.name and _alive(h)]
            target = min([float(watts), *others])
        report.originals[idx] = float(rec["original_w"])
        nv.set_power_limit_w(idx, target)
        report.changed[idx] = target
    return report


def release(nv: Nvml, *, holder: str | None, indices: list[int] | None = None, forget: bool = False,
            force: bool = False) -> PowerReport:
    """`holder` lets go of its caps (None: `ftkit power restore`, which lets go of the
    by-hand caps and of runs whose ftkit is gone). A GPU whose last live holder let go goes
    back to its original limit; one that a live run still caps keeps the lowest cap still
    asked for (`force` overrides that). Each GPU is found by its UUID and restored on its
    own: a failure is reported and the others still go back. A record is dropped only once
    its GPU is back (`forget` drops it anyway: a GPU that is gone)."""
    report = PowerReport()
    for key, rec in sorted(read_originals().items()):
        who = f"GPU {rec.get('index', '?')} ({rec.get('name', '?')}, {key})"
        try:
            holders = rec.get("holders") or {}
            if holder is not None and holder not in holders:
                continue  # not ours: another run's or a by-hand cap
            try:
                idx = _index_of(nv, key, rec)
            except GpuError as e:
                if forget:
                    with _locked() as data:
                        data["gpus"].pop(key, None)
                    report.kept[int(rec.get("index", -1))] = "record forgotten: the GPU is gone"
                    continue
                raise GpuError(f"not found by NVML: {e}") from e
            if indices is not None and idx not in indices:
                continue
            if holder is None:
                remaining = {} if force else {n: h for n, h in holders.items()
                                              if h.get("pid") is not None and _alive(h)}
            else:
                remaining = {n: h for n, h in holders.items() if n != holder and _alive(h)}
            if remaining:
                target = min(float(h["cap_w"]) for h in remaining.values())
                nv.set_power_limit_w(idx, target)
                report.kept[idx] = f"{', '.join(sorted(remaining))} still holds {target:g} W"
                with _locked() as data:
                    cur = data["gpus"].get(key)
                    if cur is not None:
                        cur["holders"] = {n: h for n, h in (cur.get("holders") or {}).items() if n in remaining}
                continue
            nv.set_power_limit_w(idx, float(rec["original_w"]))
            report.changed[idx] = float(rec["original_w"])
            report.originals[idx] = float(rec["original_w"])
            with _locked() as data:
                data["gpus"].pop(key, None)
        except Exception as e:  # noqa: BLE001 - one GPU's failure must never stop the others
            report.failed[who] = str(e) if isinstance(e, GpuError) else f"{e.__class__.__name__}: {e}"
            if holder is not None:  # we let go even so: the record keeps the original for `ftkit power restore`
                try:
                    with _locked() as data:
                        cur = data["gpus"].get(key)
                        if cur is not None:
                            (cur.get("holders") or {}).pop(holder, None)
                except Exception:  # noqa: BLE001
                    pass
    return report


def restore(nv: Nvml, indices: list[int] | None = None, *, force: bool = False, forget: bool = False) -> PowerReport:
    """`ftkit power restore`: every recorded GPU (or those in `indices`) back to its original,
    except where a live run still holds a cap (`force`: those too)."""
    return release(nv, holder=None, indices=indices, force=force, forget=forget)


def show(nv: Nvml) -> list[dict[str, Any]]:
    """Each GPU's current limit, its default, the recorded original (None: not changed by
    ftkit) and who holds a cap on it."""
    recorded = read_originals()
    rows = []
    for g in nv.inventory():
        rec = recorded.get(g.uuid or f"index-{g.index}")
        holders = {n: {**h, "alive": _alive(h)} for n, h in ((rec or {}).get("holders") or {}).items()}
        rows.append({"index": g.index, "name": g.name, "uuid": g.uuid, "limit_w": nv.power_limit_w(g.index),
                     "default_w": g.power_default_w, "min_w": g.power_min_w, "max_w": g.power_max_w,
                     "original_w": rec["original_w"] if rec else None, "recorded": rec.get("recorded") if rec else None,
                     "holders": holders, "simulated": bool(nv.simulated)})
    return rows
