"""Where the checkout is, and a content hash of the ftkit source that goes into images.

Images contain ftkit itself (a wheel built from the checkout), so the image tag must change
when ftkit's code changes - and only then. Hashing the sources (not the wheel, whose zip
timestamps change on every build) keeps a no-op build instant.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ftkit.errors import UserError

PROJECT_ENV = "FTKIT_PROJECT"


def find_root(start: Path | None = None) -> Path:
    """The checkout root: the nearest directory with images/variants.yaml and pyproject.toml."""
    env = os.environ.get(PROJECT_ENV)
    candidates = [Path(env)] if env else []
    here = (start or Path.cwd()).resolve()
    candidates += [here, *here.parents]
    pkg_root = Path(__file__).resolve().parents[3]  # toolkit/ftkit/images/project.py -> checkout
    candidates.append(pkg_root)
    for c in candidates:
        if (c / "images" / "variants.yaml").is_file() and (c / "pyproject.toml").is_file():
            return c
    raise UserError(
        "cannot find the ftkit checkout (images/variants.yaml and pyproject.toml)",
        hint=f"run inside the checkout, or set {PROJECT_ENV}=/path/to/checkout",
    )


def source_files(root: Path) -> list[Path]:
    pkg = root / "toolkit" / "ftkit"
    files = [p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    files.append(root / "pyproject.toml")
    return sorted(files)


def source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def ftkit_requirements(root: Path) -> list[str]:
    """ftkit's own base dependencies, from pyproject.toml (they go into every lock)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    return list(data["project"]["dependencies"])
