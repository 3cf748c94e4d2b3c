"""images.lock.json: what `ftkit build` produced, so another machine can rebuild the same
dependency set and check that it got it.

Per image/variant: the tag (content address), image id, lock hash, ftkit source hash, the
base image's identity, and a digest of `pip freeze` inside the image. Image ids differ
between machines (timestamps); the content hash and the package digest must not.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from ftkit.errors import ImageError, UserError
from ftkit.run.files import write_json

VERSION = 1


def read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"version": VERSION, "images": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable images.lock.json: {e}") from e
    if data.get("version") != VERSION or not isinstance(data.get("images"), dict):
        raise UserError(f"{path}: unsupported images.lock.json (version {data.get('version')!r})")
    return data


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
