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
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Party:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def gpu_label(self) -> str:
        idx = [str(g.get("index")) if g.get("index") is not None else str(g.get("uuid")) for g in self.gpus]
        return ",".join(idx) or "-"

    def describe(self) -> str:
        """`train 'train' (container 3f2a1b, pid 42) since 2026-11-23T08:00:01Z (3m12s)`"""
        who = f"{self.role}" + (f" {self.service!r}" if self.service else "")
        where = f"container {self.container}, pid {self.pid}" if self.container else f"pid {self.pid} on {self.host}"
        extra = " (engine asleep)" if self.sleeping else ""
        return f"{who} ({where}) since {self.since} ({ago(self.since)}){extra}"


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
    )


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s) or "host"


def _last_record(data: bytes) -> dict[str, Any] | None:
    """The last complete JSON line (a line still being appended has no newline yet)."""
    lines = data.split(b"\n")
    for line in reversed(lines[:-1]):  # lines[-1] follows the last newline: incomplete or empty
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            return rec if isinstance(rec, dict) else None
    return None


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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
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


def _probe(path: Path) -> tuple[bool, dict[str, Any] | None]:
    """(alive, last record). Reaps the file when its owner is dead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False, None
            size = os.fstat(fd).st_size
            data = os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES))  # the last records are enough
            return True, _last_record(data)
        try:  # dead: the owner's exclusive lock is gone
            os.unlink(path)
        except OSError:
            pass
        return False, None
    finally:
        os.close(fd)


def live_parties(lease_dir: Path) -> list[Party]:
    """Every live participant, oldest first. Dead ones are cleaned up on the way."""
    d = Path(lease_dir) / PARTIES
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for name in names:
        path = d / name
        if name.startswith(".tmp-"):
            _reap_tmp(path)
            continue
        if not name.endswith(".json"):
            continue
        alive, rec = _probe(path)
        if alive and rec is not None:
            try:
                out.append(Party.from_dict(rec))
            except TypeError:
                continue
    out.sort(key=lambda p: (p.started, p.id))
    return out


def _reap_tmp(path: Path) -> None:
    """A presence file whose creator died before naming it (a minute's grace: the creator
    locks it right after creating it)."""
    try:
        if time.time() - path.stat().st_mtime < 60:
            return
    except OSError:
        return
    _probe(path)


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
        data = path.read_bytes()
    except OSError:
        return None
    return _last_record(data)
