"""Where the lease directory is. Every participant on a machine - `ftkit up` on the host,
`ftkit lease` in each container (bind-mounted at /ftkit/lease) - must agree on it, since
the lease is nothing but flocks on the files in it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ftkit.errors import UserError

ENV = "FTKIT_LEASE_DIR"
SYSTEM_DIR = Path("/run/lock/ftkit")
CONTAINER_DIR = Path("/ftkit/lease")


def _user_dir() -> Path:
    return Path.home() / ".cache" / "ftkit" / "lease"


def _system_dir_usable(path: Path = SYSTEM_DIR) -> bool:
    if path.is_dir():
        return os.access(path, os.W_OK | os.X_OK)
    parent = path.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def default_lease_dir(machine_paths_lease: str | None = None) -> Path:
    """FTKIT_LEASE_DIR, else the machine profile's `paths.lease`, else /run/lock/ftkit where
    it exists writable or can be created, else ~/.cache/ftkit/lease. Creates nothing."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return Path(env).expanduser()
    if machine_paths_lease:
        return Path(machine_paths_lease).expanduser()
    if _system_dir_usable():
        return SYSTEM_DIR
    return _user_dir()


def ensure_lease_dir(path: Path) -> Path:
    """Create the directory (and `parties/`) if needed and check we can write there.

    Who may write the lease directory is the machine owner's choice (docs/lease-security.md):
    the system directory ftkit creates is shared like /run/lock (1777: everyone, with the
    sticky bit so nobody removes another's files); a directory that exists keeps its mode.
    `parties/` is opened to exactly whoever may write the lease directory, with the sticky
    bit, never more. Readers never trust what is in either (records.py)."""
    try:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if created and path == SYSTEM_DIR:
            with contextlib.suppress(PermissionError):
                os.chmod(path, 0o1777)
        parties = path / "parties"
        if not parties.exists():
            parties.mkdir(exist_ok=True)
            top = path.stat()
            mode = (top.st_mode & 0o2777) | 0o1000
            if top.st_mode & 0o020:  # shared by a group: parties/ is that group's too, and stays so
                with contextlib.suppress(OSError):
                    os.chown(parties, -1, top.st_gid)
                mode |= 0o2000
            with contextlib.suppress(PermissionError):
                os.chmod(parties, mode)
    except OSError as e:
        raise UserError(f"lease directory {path}: cannot create it: {e.strerror or e}",
                        hint=f"set {ENV} or the machine profile's paths.lease to a writable directory") from e
    if not path.is_dir():
        raise UserError(f"lease directory {path}: not a directory")
    for d in (path, path / "parties"):
        if not os.access(d, os.W_OK | os.X_OK):
            raise UserError(f"lease directory {d}: not writable by this user (uid {os.getuid()})",
                            hint="every user and container that takes GPU leases must be able to write there")
    return path
