"""Image references and images.lock.json contents, checked before anything uses them.

An image reference ends up in a Dockerfile's FROM line, in `docker run` argv and in a
compose file. Text that is not a reference (whitespace, a newline followed by `RUN ...`, a
leading `-` that docker would read as a flag) must never get that far, so every place that
takes a reference from outside - `--base-image`, a machine profile's `docker.base_image`,
a recipe's digest pins, the tags in an images.lock.json - asks `reference_problem` first.

Pure functions: no Docker, no files (the caller reads the lock), so recipe validation can
use them without importing the image builder.
"""

from __future__ import annotations

import re
from typing import Any

LOCK_VERSION = 1

# distribution/reference's grammar (the one `docker` itself parses with).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(rf"^{_TAG}$")
_DIGEST_RE = re.compile(rf"^{_DIGEST}$")
_LOCK_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
MAX_REFERENCE = 512


def reference_problem(ref: object, *, require_digest: bool = False) -> str | None:
    """Why `ref` is not a usable image reference (`[registry[:port]/]name[:tag][@digest]`),
    or None when it is."""
    if not isinstance(ref, str):
        return f"an image reference is a string, got {type(ref).__name__}"
    if not ref:
        return "empty image reference"
    if len(ref) > MAX_REFERENCE:
        return f"image reference of {len(ref)} characters is too long"
    if any(c.isspace() or not c.isprintable() for c in ref):
        return f"image reference {ref!r} contains whitespace or control characters"
    rest, at, digest_text = ref.partition("@")
    digest = digest_text if at else None
    if digest is not None and not _DIGEST_RE.match(digest):
        return f"image reference {ref!r}: {digest!r} is not a digest (algorithm:hex)"
    if require_digest and digest is None:
        return f"image reference {ref!r} is not pinned by digest (name@sha256:...)"
    name, tag = rest, None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            return f"image reference {ref!r}: {tag!r} is not a valid tag"
    parts = name.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN_RE.match(first):
            return f"image reference {ref!r}: {first!r} is not a registry host"
        path = "/".join(parts[1:])
    else:
        path = name
    if not _PATH_RE.match(path):
        return (f"image reference {ref!r} is not a valid image name (lowercase letters, digits and . _ - "
                "separated by /)")
    if len(name) > 255:
        return f"image reference {ref!r}: the name is longer than 255 characters"
    return None


def lock_problems(data: Any) -> list[str]:
    """Every way a parsed images.lock.json is unusable (empty when it is fine)."""
    if not isinstance(data, dict):
        return ["not a JSON object"]
    if data.get("version") != LOCK_VERSION or isinstance(data.get("version"), bool):
        return [f"unsupported images.lock.json (version {data.get('version')!r}; this ftkit reads {LOCK_VERSION})"]
    images = data.get("images")
    if not isinstance(images, dict):
        return ["`images` must be an object of image/variant -> entry"]
    out: list[str] = []
    for key, entry in images.items():
        if not _LOCK_KEY.match(str(key)):
            out.append(f"images[{key!r}]: keys are image/variant, e.g. train/cpu")
            continue
        if not isinstance(entry, dict):
            out.append(f"images[{key!r}]: not an object")
            continue
        problem = reference_problem(entry.get("tag"))
        if problem:
            out.append(f"images[{key!r}].tag: {problem}")
        base = entry.get("base")
        if base is not None:
            ref = base.get("ref") if isinstance(base, dict) else None
            problem = reference_problem(ref) if ref is not None or not isinstance(base, dict) else None
            if problem:
                out.append(f"images[{key!r}].base.ref: {problem}")
    return out
