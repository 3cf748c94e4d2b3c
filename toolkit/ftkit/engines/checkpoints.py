"""Checkpoints that never look complete when they are not, quarantine, and retention.

The HF Trainer writes checkpoint-N/ in place, each rank its own part (RNG state, ZeRO
shards), so a crash mid-save leaves a directory that looks like a checkpoint. After the
save returns on every rank (the training engine waits at a barrier first), rank 0 checks
that the files a resume needs are there and writes a manifest (`ftkit-complete.json`:
the required files and every file with its size) atomically. A checkpoint counts as
complete when its manifest is readable and every file it lists is still there with its
size; files added later (a README, a late log) do not make it incomplete.

Incomplete checkpoints are never deleted: they are moved to `quarantine/` beside the
checkpoints, with the time they were moved, so a save that was cut short can still be
looked at. Resume takes the newest complete checkpoint; retention keeps the last K
complete ones and the one with the best eval loss.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ftkit.files import write_json

MARKER = "ftkit-complete.json"
QUARANTINE = "quarantine"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "pytorch_model.bin.index.json")


def step_of(path: Path) -> int:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else -1


def all_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)), key=step_of)


def _files(ckpt: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def required_files(ckpt: Path, world_size: int) -> tuple[list[str], list[str]]:
    """What a resume needs, as (present, missing): the trainer state, the weights, the
    optimizer state (DeepSpeed: every rank's shard) and every rank's RNG state."""
    files = set(_files(ckpt))
    present: list[str] = []
    missing: list[str] = []

    def need(name: str, ok: bool, found: list[str]) -> None:
        if ok:
            present.extend(found)
        else:
            missing.append(name)

    need("trainer_state.json", "trainer_state.json" in files, ["trainer_state.json"])
    weights = [w for w in WEIGHTS if w in files]
    need("model or adapter weights", bool(weights), weights[:1])
    if world_size > 1:
        for r in range(world_size):
            need(f"rng_state_{r}.pth", f"rng_state_{r}.pth" in files, [f"rng_state_{r}.pth"])
    else:
        need("rng_state.pth", "rng_state.pth" in files, ["rng_state.pth"])
    zero = sorted(f for f in files if re.match(r"^global_step\d+/", f))
    if zero:  # DeepSpeed writes the optimizer (and ZeRO-3's weights) as one shard per rank
        for r in range(world_size):
            shard = [f for f in zero if re.search(rf"(^|/)(zero_pp_rank_{r}_|bf16_zero_pp_rank_{r}_).*optim_states\.pt$", f)]
            need(f"DeepSpeed optimizer shard of rank {r}", bool(shard), shard)
    else:
        need("optimizer.pt", "optimizer.pt" in files, ["optimizer.pt"])
    return present, missing


def mark_complete(ckpt: Path, *, world_size: int = 1, **info: Any) -> list[str]:
    """Write the manifest when every required file is there; return what is missing (then
    no manifest is written and the checkpoint stays incomplete)."""
    present, missing = required_files(ckpt, world_size)
    if missing:
        return missing
    write_json(ckpt / MARKER, {"step": step_of(ckpt), "world_size": world_size, "required": present,
                               "files": _files(ckpt), **info})
    return []


def is_complete(ckpt: Path) -> bool:
    marker = ckpt / MARKER
    if not marker.is_file():
        return False
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        return False
    required = manifest.get("required", [])
    if not isinstance(required, list) or any(r not in listed for r in required):
        return False
    for rel, size in listed.items():
        p = ckpt / rel
        try:
            if not p.is_file() or p.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MARKER).read_text(encoding="utf-8"))


def newest_complete(root: Path) -> Path | None:
    done = [c for c in all_checkpoints(root) if is_complete(c)]
    return done[-1] if done else None


def quarantine_incomplete(root: Path, *, now: float | None = None) -> list[tuple[Path, Path]]:
    """Move every incomplete checkpoint-N/ to quarantine/checkpoint-N-<UTC time>/; return
    (from, to) pairs. Nothing is deleted."""
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    for c in all_checkpoints(root):
        if is_complete(c):
            continue
        dest_dir = root / QUARANTINE
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{c.name}-{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest_dir / f"{c.name}-{stamp}-{n}"
        c.rename(dest)
        moved.append((c, dest))
    return moved


def retain(root: Path, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete complete checkpoints beyond the last `keep_last` (sparing the best); return them.
    Incomplete ones are left alone (the next start quarantines them)."""
    done = [c for c in all_checkpoints(root) if is_complete(c)]
    keep = set(done[-keep_last:])
    if keep_best:
        scored = [(manifest(c).get("eval_loss"), c) for c in done]
        scored = [(loss, c) for loss, c in scored if isinstance(loss, (int, float))]
        if scored:
            keep.add(min(scored, key=lambda t: (t[0], -step_of(t[1])))[1])
    removed = []
    for c in done:
        if c not in keep:
            shutil.rmtree(c, ignore_errors=True)
            removed.append(c)
    return removed
