"""images.lock.json: what `ftkit build` produced, so another machine can rebuild the same
dependency set and check that it got it.

Per image/variant: the tag (content address), image id, lock hash, ftkit source hash, the
base image's identity, and a digest of `pip freeze` inside the image. Image ids differ
between machines (timestamps); the content hash and the package digest must not.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from ftkit.errors import ImageError, UserError
from ftkit.files import write_json
from ftkit.recipe.checks import read_lock_file
from ftkit.recipe.imagerefs import LOCK_VERSION, lock_problems

VERSION = LOCK_VERSION


def read(path: Path) -> dict[str, Any]:
    """The lock's contents, checked: every tag and base reference is an image reference, every
    key is image/variant. A missing file reads as empty (nothing recorded yet); anything else
    that is not a lock - a directory, a FIFO, bad JSON, a tag with a newline in it - is an error."""
    if not os.path.lexists(path):
        return {"version": VERSION, "images": {}}
    data, problem = read_lock_file(path)
    if problem is None:
        problems = lock_problems(data)
        problem = "; ".join(problems[:3]) if problems else None
    if problem is not None:
        raise UserError(f"{path}: not a usable images.lock.json: {problem}")
    return data  # type: ignore[return-value]


def record(path: Path, key: str, entry: dict[str, Any]) -> None:
    data = read(path)
    entry = {**entry, "recorded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    data["images"][key] = entry
    write_json(path, data)


def check_against(entry: dict[str, Any], *, content_hash: str, packages_sha256: str | None = None) -> None:
    """Raise when this machine's build is not the one recorded."""
    if entry.get("content_hash") != content_hash:
        raise ImageError(
            f"{entry.get('tag')}: this checkout renders a different image than the lock records "
            f"(content hash {content_hash[:12]} vs {str(entry.get('content_hash'))[:12]}): the Dockerfile, "
            "the requirement lock, the base image or ftkit's sources differ"
        )
    if packages_sha256 is not None and entry.get("packages_sha256") not in (None, packages_sha256):
        raise ImageError(
            f"{entry.get('tag')}: built, but the installed packages differ from the recorded set "
            f"({packages_sha256[:12]} vs {str(entry['packages_sha256'])[:12]})"
        )
