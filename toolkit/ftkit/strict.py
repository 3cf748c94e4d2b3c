"""Strict readers for the values people type on the command line.

Python's own readers are generous in ways a CLI must not be: `int("١")` and `int("１")` are 1
(any Unicode decimal digit counts), `"²".isdigit()` is true, `float("1e999")` is inf and
`float("nan")` compares false with every bound, so `x < 0` lets it through. Each reader
here accepts one spelling only (ASCII digits, finite numbers, a loopback http URL, a
Kubernetes name) and says in one line what it expected; the CLI's click types
(ftkit.cli.params) and the parsers of comma lists (--gpus, --max-power-w) share them.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from urllib.parse import urlsplit

from ftkit.errors import UserError

# ASCII only, spelled out: `\d` would match any Unicode digit. fullmatch: `$` allows a "\n".
_ASCII_INT = re.compile(r"[0-9]+")
_ASCII_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# RFC 1123 label (a namespace) and DNS subdomain (most object names, a PVC), as Kubernetes checks them
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL.pattern}(?:\.{_DNS_LABEL.pattern})*")
MAX_GPU_INDEX = 1023  # far above any machine; keeps lock names and messages short


def ascii_int(text: str) -> int | None:
    """The integer `text` spells in ASCII digits (at most 9 of them), else None."""
    return int(text) if len(text) <= 9 and _ASCII_INT.fullmatch(text) else None


def gpu_index(text: str, flag: str = "--gpus") -> int:
    """A GPU index as nvidia-smi prints it (`0`, `1`, ...), or UserError naming `flag`."""
    token = text.strip()
    value = ascii_int(token)
    if value is None or value > MAX_GPU_INDEX:
        raise UserError(f"{flag}: {token!r} is not a GPU index (0, 1, ... in ASCII digits, at most "
                        f"{MAX_GPU_INDEX}), e.g. {flag} 0,1")
    return value


def finite_float(text: str) -> float | None:
    """The finite number `text` spells in ASCII (`30`, `2.5`, `1e3`), else None: no inf,
    nan, `1_000` or non-ASCII digits, and nothing that overflows to inf (`1e999`)."""
    token = text.strip()
    if len(token) > 64 or not _ASCII_FLOAT.fullmatch(token):
        return None
    value = float(token)
    return value if math.isfinite(value) else None


def loopback_http_url(url: str, flag: str) -> str:
    """`url` when it is http:// to localhost or a loopback address (127.0.0.1, [::1]: loopback
    as the plan decides it for bind_address, ipaddress's is_loopback) with an optional port
    and nothing else (no user, path, query); UserError otherwise. The vLLM dev-mode endpoints
    it is for are unauthenticated and can stop the engine: never called over the network."""
    shape = "http://127.0.0.1:PORT, http://[::1]:PORT or http://localhost:PORT"
    bad = UserError(f"{flag}: {url!r} is not a loopback http URL ({shape})")
    if len(url) > 256 or not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise bad
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError: not a number or out of range
    except ValueError:
        raise bad from None
    if parts.scheme != "http" or parts.username is not None or parts.password is not None \
            or parts.path not in ("", "/") or parts.query or parts.fragment or "?" in url or "#" in url:
        raise bad
    # urlsplit reads the port with int(), which also takes "+80": the port's text must be ASCII digits
    if port is not None and (port == 0 or not _ASCII_INT.fullmatch(parts.netloc.rpartition(":")[2])):
        raise bad
    host = parts.hostname or ""
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise bad
        except ValueError:
            raise bad from None
    return url


def dns_label(name: str, what: str) -> str:
    """A Kubernetes namespace (RFC 1123 label): lowercase ASCII letters, digits and '-',
    starting and ending with a letter or digit, at most 63 characters."""
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise UserError(f"{what}: {name!r} is not a valid Kubernetes name (RFC 1123 label: lowercase letters, "
                        "digits and '-', starting and ending with a letter or digit, at most 63 characters)")
    return name


def dns_subdomain(name: str, what: str) -> str:
    """A Kubernetes object name such as a PVC's (DNS subdomain): dot-separated RFC 1123
    labels, at most 253 characters."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise UserError(f"{what}: {name!r} is not a valid Kubernetes name (DNS subdomain: lowercase letters, "
                        "digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)")
    return name


# --------------------------------------------------------------------------- paths

PSEUDO_FS = ("/proc", "/sys", "/dev")  # kernel and device files: never a place for ftkit's output
ROOM_BELOW = 512  # bytes a directory ftkit fills needs below it (run dir name, steps/<id>/checkpoints/...)


def _show(text: str) -> str:
    """`text` quoted and shortened for a one-line message (a path may be thousands of bytes)."""
    return repr(text if len(text) <= 80 else f"{text[:48]}...{text[-24:]}")


def _limits(path: str) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the file system `path` would be on: asked of its deepest
    existing ancestor, since limits differ between mounts (255 and 4096 on most)."""
    probe = path
    while True:
        try:
            return os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
        except (OSError, ValueError):
            parent = os.path.dirname(probe)
            if parent == probe:
                return 255, 4096
            probe = parent


def checked_path(text: str, flag: str, *, fills: bool = False, system_ok: bool = True) -> str:
    """`text` when the system can hold it, else UserError naming it: no component over
    NAME_MAX bytes, the whole (absolute) path under PATH_MAX - with ROOM_BELOW to spare
    when ftkit `fills` it with files of its own. Without `system_ok`, a path in /proc, /sys
    or /dev (also through a symlink) is refused: output written there would be written to
    the kernel or a device. Checked when the argument is read, so nothing has run yet."""
    if not text or "\0" in text:
        raise UserError(f"{flag}: {_show(text)} is not a path")
    absolute = os.path.abspath(text)
    name_max, path_max = _limits(absolute)
    for part in absolute.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            which = "" if part == text else f" (in {_show(part)})"
            raise UserError(f"{flag}: {_show(text)}: a name{which} is longer than this file system allows "
                            f"({len(os.fsencode(part))} bytes, at most {name_max})")
    room = ROOM_BELOW if fills else 0
    size = len(os.fsencode(absolute))
    if size + room >= path_max:
        also = f" and {room} for what ftkit writes below it" if room else ""
        raise UserError(f"{flag}: {_show(text)} is longer than this system allows ({size} bytes{also}; "
                        f"at most {path_max - 1})")
    if not system_ok:
        for where in (absolute, os.path.realpath(absolute)):
            top = next((d for d in PSEUDO_FS if where == d or where.startswith(d + "/")), None)
            if top is not None:
                raise UserError(f"{flag}: {_show(text)} is in {top}, the kernel's or the devices' files, "
                                "not a place to write to")
    return text


def describe_too_long(error: OSError) -> str:
    """One line for an ENAMETOOLONG that surfaced past the checks, naming the path."""
    name = error.filename if isinstance(error.filename, str) else os.fsdecode(error.filename or b"?")
    return f"{_show(name)}: the path is longer than this system allows ({error.strerror or 'File name too long'})"
