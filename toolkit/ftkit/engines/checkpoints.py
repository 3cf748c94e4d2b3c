"""Checkpoints that never look complete when they are not, and retention.

The HF Trainer writes checkpoint-N/ in place, so a crash mid-save leaves a directory that
looks like a checkpoint. ftkit writes a manifest (`ftkit-complete.json`: every file and its
size) atomically after the save returns; only a checkpoint whose manifest matches its
files counts. Resume takes the newest complete one; retention keeps the last K complete
ones and the one with the best eval loss, and removes incomplete leftovers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ftkit.run.files import write_json

MARKER = "ftkit-complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


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


def mark_complete(ckpt: Path, **info: Any) -> None:
    write_json(ckpt / MARKER, {"step": step_of(ckpt), "files": _files(ckpt), **info})


def is_complete(ckpt: Path) -> bool:
    marker = ckpt / MARKER
    if not marker.is_file():
        return False
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(manifest.get("files")) and manifest["files"] == _files(ckpt)


def manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MARKER).read_text(encoding="utf-8"))


def newest_complete(root: Path) -> Path | None:
    done = [c for c in all_checkpoints(root) if is_complete(c)]
    return done[-1] if done else None


def remove_incomplete(root: Path) -> list[Path]:
    removed = []
    for c in all_checkpoints(root):
        if not is_complete(c):
            shutil.rmtree(c, ignore_errors=True)
            removed.append(c)
    return removed


def retain(root: Path, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete complete checkpoints beyond the last `keep_last` (sparing the best); return them."""
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
