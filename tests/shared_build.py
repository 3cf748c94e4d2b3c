"""Builds that every worker of a test run shares (pytest-xdist runs two): one process builds
under a file lock in the run's shared directory, writes what it built there, and the others
read that instead of building again. The images are removed once, when the whole run ends
(tests/conftest.py's `pytest_sessionfinish`), not when the first worker is done with them -
the other may still be running containers from them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUILT = "built-images.txt"  # one tag per line: what this run created and must remove


@contextlib.contextmanager
def locked(shared: Path, name: str) -> Iterator[None]:
    """Hold an exclusive flock on SHARED/NAME.lock (the kernel drops it if the holder dies)."""
    with open(shared / f"{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_record(shared: Path, name: str) -> dict[str, Any] | None:
    """What the process that built NAME wrote (call under `locked`), or None: not built yet."""
    path = shared / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(shared: Path, name: str, record: dict[str, Any]) -> None:
    (shared / f"{name}.json").write_text(json.dumps(record))


def note_built(shared: Path, tags: set[str] | list[str]) -> None:
    """Remember images this run created, for `remove_built` at its end."""
    with locked(shared, "built-images"), open(shared / BUILT, "a") as f:
        f.writelines(f"{t}\n" for t in sorted(tags))


def remove_built(shared: Path) -> None:
    """Remove every image `note_built` recorded (FTKIT_KEEP_TEST_IMAGES=1 keeps them)."""
    path = shared / BUILT
    if os.environ.get("FTKIT_KEEP_TEST_IMAGES") == "1" or not path.is_file():
        return
    from ftkit.gateways import docker as dk

    for tag in sorted(set(path.read_text().split())):
        try:
            dk.remove_image(tag)
        except Exception:  # noqa: BLE001 - already gone, or Docker went away: nothing to clean
            pass
