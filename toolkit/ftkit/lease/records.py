"""Who is in the lease: one presence file per participant, alive exactly as long as it is.

Every `ftkit lease` (waiting, holding, or a serve supervisor that yielded) writes
`parties/<id>.json` and holds an exclusive flock on it for its whole life. A reader tells a
live participant from a dead one by trying a *shared* non-blocking flock: it fails while
the owner lives; it succeeds once the kernel has dropped the owner's lock (exit, SIGKILL,
container gone). Nothing can go stale and nobody has to clean up after a crash - a reader
that finds a dead file removes it. Readers only ever take shared locks, so they never get
in each other's way, and never touch the GPU lock files at all.

Updates are appended as whole JSON lines (`O_APPEND`); readers use the last complete line,
so they never see half a record.

Anyone who may write the lease directory may put anything in `parties/` (docs/lease-security.md):
readers open without blocking and never through a link, read a bounded tail, take only
records of the right shape, and skip everything else with a note (once per file). What a
record says is shown escaped, with the file's owner as the kernel reports it.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftkit.files import UnsafeFile, open_regular, read_fd_bounded
from ftkit.text import printable

PARTIES = "parties"
TAIL_BYTES = 1 << 16
VERSION = 1


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def in_container() -> bool:
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def pid_namespace() -> str | None:
    """`pid:[4026531836]`: pids in two records compare only when this matches."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass
class Party:
    """One participant. `state`: waiting | holding | yielded (a serve supervisor whose
    engine is stopped or asleep) | stopping."""

    id: str
    role: str
    state: str
    pid: int
    host: str
    since: str  # when it entered `state`
    started: str
    gpus: list[dict[str, Any]] = field(default_factory=list)  # GpuRef.as_dict()
    locks: list[str] = field(default_factory=list)
    service: str | None = None
    container: str | None = None
    pidns: str | None = None
    command: list[str] = field(default_factory=list)
    engine_pid: int | None = None
    sleeping: bool = False
    gpu_pids: list[int] = field(default_factory=list)  # NVML (host) pids of a sleeping engine
    version: int = VERSION
    uid: int | None = None  # who wrote it: the file's owner, as the kernel says (not the record)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Party:
        """Raises TypeError when a field has the wrong type (a record someone else wrote)."""
        if not isinstance(d, dict):
            raise TypeError("a record is a JSON object")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for name, value in known.items():
            _check_field(name, value)
        return cls(**known)

    @property
    def gpu_label(self) -> str:
        idx = [str(g.get("index")) if g.get("index") is not None else str(g.get("uuid")) for g in self.gpus]
        return printable(",".join(idx)[:80]) or "-"

    def describe(self) -> str:
        """`train 'train' (container 3f2a1b, pid 42) since 2026-11-23T08:00:01Z (3m12s)`;
        every value escaped and cut short, since anyone who may write the directory wrote it."""
        who = _shown(self.role) + (f" '{_shown(self.service)}'" if self.service else "")
        where = (f"container {_shown(self.container)}, pid {self.pid}" if self.container
                 else f"pid {self.pid} on {_shown(self.host)}")
        if self.uid is not None and self.uid != os.getuid():
            where += f", user {_user(self.uid)}"
        extra = " (engine asleep)" if self.sleeping else ""
        return f"{who} ({where}) since {_shown(self.since)} ({ago(self.since)}){extra}"


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "role": str, "state": str, "pid": int, "host": str, "since": str, "started": str, "gpus": list,
    "locks": list, "service": (str, type(None)), "container": (str, type(None)), "pidns": (str, type(None)),
    "command": list, "engine_pid": (int, type(None)), "sleeping": bool, "gpu_pids": list, "version": int,
    "uid": (int, type(None)),
}
_ITEM_TYPES: dict[str, type] = {"gpus": dict, "locks": str, "command": str, "gpu_pids": int}


def _check_field(name: str, value: Any) -> None:
    want = _FIELD_TYPES[name]
    wanted = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool) and bool not in wanted:
        raise TypeError(f"{name}: a boolean")
    if not isinstance(value, wanted):
        raise TypeError(f"{name}: {type(value).__name__}")
    item = _ITEM_TYPES.get(name)
    if item is not None and not all(isinstance(v, item) and not (isinstance(v, bool) and item is int)
                                    for v in value):
        raise TypeError(f"{name}: an item is not a {item.__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) < value < (1 << 63):
        raise TypeError(f"{name}: out of range")


def _shown(value: object, limit: int = 80) -> str:
    text = printable(str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{printable(pwd.getpwuid(uid).pw_name)} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def ago(iso: str) -> str:
    try:
        then = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    s = max(0, int((dt.datetime.now(dt.timezone.utc) - then).total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def new_party(role: str, *, gpus: Sequence[dict[str, Any]], locks: Sequence[str], command: Sequence[str],
              service: str | None, state: str = "waiting") -> Party:
    host = socket.gethostname()
    stamp = now_iso()
    return Party(
        id=f"{_safe(host)[:40]}-{os.getpid()}-{os.urandom(4).hex()}", role=role, state=state, pid=os.getpid(),
        host=host, since=stamp, started=stamp, gpus=list(gpus), locks=list(locks), service=service,
        container=host if in_container() else None, pidns=pid_namespace(), command=list(command)[:64],
        uid=os.getuid(),
    )


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s) or "host"


def _last_record(data: bytes) -> dict[str, Any] | None:
    """The last complete JSON line (a line still being appended has no newline yet). A line
    that is not JSON (binary, too deeply nested, a number too long to convert) is passed over."""
    lines = data.split(b"\n")
    for line in reversed(lines[:-1]):  # lines[-1] follows the last newline: incomplete or empty
        if line.strip():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            return rec if isinstance(rec, dict) else None
    return None


_NOTED: set[str] = set()


def note_once(path: Path, reason: str) -> None:
    """Say on stderr, once per file and process, why a file in the lease directory is not
    taken as a record (a lease waits for minutes; one line per file is enough)."""
    key = f"{path}\0{reason}"
    if key in _NOTED:
        return
    _NOTED.add(key)
    import sys

    print(f"ftkit lease: skipping {printable(str(path))}: {printable(reason)} (not a lease record)",
          file=sys.stderr, flush=True)


class Presence:
    """This process's presence file, flocked for as long as we live.

    Its descriptor is inheritable on purpose: the lease passes it to the command it runs,
    so the record stays alive as long as anything in that process tree does."""

    def __init__(self, lease_dir: Path, party: Party) -> None:
        self.party = party
        d = lease_dir / PARTIES
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{party.id}.json"
        tmp = d / f".tmp-{party.id}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except PermissionError as e:
            from ftkit.errors import UserError

            raise UserError(f"lease directory {d}: this user (uid {os.getuid()}) may not write its record there "
                            f"({e.strerror})", hint="every user and container that takes GPU leases must be able to "
                            "write the lease directory and its parties/ (docs/lease-security.md)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # before the file has its visible name
            self._fd = fd
            self._write()
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @property
    def fd(self) -> int:
        return self._fd

    def _write(self) -> None:
        os.write(self._fd, (json.dumps(self.party.as_dict(), sort_keys=True) + "\n").encode())

    def update(self, **changes: Any) -> None:
        if "state" in changes and changes["state"] != self.party.state:
            changes.setdefault("since", now_iso())
        for k, v in changes.items():
            setattr(self.party, k, v)
        self._write()

    def close(self) -> None:
        """Remove the file, then drop the lock (the order keeps readers from ever seeing a
        live file removed by someone else)."""
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1


Skip = Callable[[Path, str], None]


def _probe(path: Path, on_skip: Skip = note_once) -> tuple[bool, dict[str, Any] | None]:
    """(alive, last record, with `uid` set to the file's owner). Reaps the file when its
    owner is dead. Never blocks: not a regular file, a link, or unreadable is skipped."""
    try:
        fd = open_regular(path)
    except UnsafeFile as e:
        if os.path.lexists(path):
            on_skip(path, e.reason)
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False, None
            try:
                data = read_fd_bounded(fd, path, TAIL_BYTES, tail=True)  # the last records are enough
                owner = os.fstat(fd).st_uid
            except OSError as err:
                on_skip(path, getattr(err, "reason", None) or str(err))
                return True, None
            rec = _last_record(data)
            if rec is None:
                on_skip(path, "no complete JSON record in it")
                return True, None
            rec["uid"] = owner
            return True, rec
        try:  # dead: the owner's exclusive lock is gone
            os.unlink(path)
        except OSError:
            pass
        return False, None
    finally:
        os.close(fd)


def live_parties(lease_dir: Path, on_skip: Skip = note_once) -> list[Party]:
    """Every live participant, oldest first. Dead ones are cleaned up on the way; what is
    not a record is skipped with `on_skip(path, reason)`."""
    d = Path(lease_dir) / PARTIES
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for name in names:
        path = d / name
        if name.startswith(".tmp-"):
            _reap_tmp(path, on_skip)
            continue
        if not name.endswith(".json"):
            continue
        alive, rec = _probe(path, on_skip)
        if alive and rec is not None:
            try:
                out.append(Party.from_dict(rec))
            except TypeError as e:
                on_skip(path, f"a record of the wrong shape ({e})")
                continue
    out.sort(key=lambda p: (p.started, p.id))
    return out


def _reap_tmp(path: Path, on_skip: Skip = note_once) -> None:
    """A presence file whose creator died before naming it (a minute's grace: the creator
    locks it right after creating it)."""
    try:
        if time.time() - path.lstat().st_mtime < 60:
            return
    except OSError:
        return
    _probe(path, on_skip)


def holder_of(parties: Iterable[Party], lock_name: str) -> Party | None:
    for p in parties:
        if p.state in ("holding", "stopping") and lock_name in p.locks:
            return p
    return None


def train_waiters(parties: Iterable[Party], locks: Iterable[str], *, exclude: str | None = None) -> list[Party]:
    """Live `train` participants waiting for any of these lock files."""
    mine = set(locks)
    return [p for p in parties if p.role == "train" and p.state == "waiting" and p.id != exclude
            and mine.intersection(p.locks)]


def lock_file_record(path: Path) -> dict[str, Any] | None:
    """The holder record a holder wrote into its lock file (a copy, for people and for a
    holder whose presence file is unreadable)."""
    try:
        data = read_bounded_tail(path)
    except UnsafeFile as e:
        if not isinstance(e.__cause__, (FileNotFoundError, PermissionError)):  # gone, or another user's: no news
            note_once(path, e.reason)
        return None
    return _last_record(data)


def read_bounded_tail(path: Path) -> bytes:
    fd = open_regular(path)
    try:
        return read_fd_bounded(fd, path, TAIL_BYTES, tail=True)
    finally:
        os.close(fd)
