"""The run directory: everything needed to explain a run later.

runs/<UTC timestamp>-<name>/ holds the resolved recipe, the plan, the command line, the
environment, the journal (state.json: each step's status and times, rewritten atomically
on every change) and one log per step. Engines write their outputs under steps/<name>/.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftkit.files import read_json, write_atomic, write_json
from ftkit.procs import is_alive, process_start

STATUSES = ("pending", "running", "succeeded", "failed", "skipped", "interrupted")
DONE = ("succeeded", "failed", "skipped", "interrupted")


OWNER_LOCK = ".owner.lock"


class OwnerLock:
    """The exclusive flock an ftkit process holds on RUN/.owner.lock while it drives the run.

    The kernel drops it the moment that process dies, however it dies, so it answers "is
    anyone driving this run?" truthfully across hostname changes, pid reuse and containers
    (the tether in every step watches the same lock through the bind mount)."""

    def __init__(self, run_path: Path) -> None:
        import fcntl

        self.path = run_path / OWNER_LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            from ftkit.errors import UserError

            raise UserError(f"{run_path.name} is being driven by another ftkit right now",
                            hint="wait for it, or stop it (Ctrl-C there)") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def owner_state(run_path: Path) -> bool | None:
    """True: an ftkit holds the run's owner lock; False: nobody does; None: the run has no
    owner lock (made by an older ftkit, or not started)."""
    import fcntl

    path = run_path / OWNER_LOCK
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def utc_stamp(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class RunDir:
    path: Path

    def file(self, rel: str) -> Path:
        return self.path / rel

    def log(self, step_id: str) -> Path:
        return self.path / "logs" / f"{step_id}.log"

    def write_inputs(self, resolved_yaml: dict[str, Any], plan: dict[str, Any], argv: list[str], env: dict[str, Any]) -> None:
        write_atomic(self.file("recipe.resolved.yaml"), yaml.safe_dump(resolved_yaml, sort_keys=False))
        write_json(self.file("plan.json"), plan)
        write_atomic(self.file("command.txt"), " ".join(shlex.quote(a) for a in argv) + "\n")
        write_json(self.file("env.json"), env)

    def write_generated(self, files: list[dict[str, str]]) -> None:
        for f in files:
            write_atomic(self.file(f["path"]), f["content"])


class Journal:
    """state.json: the run's outcome and each step's status, times and notes."""

    def __init__(self, run: RunDir, step_ids: list[str] | None = None) -> None:
        self.path = run.file("state.json")
        if self.path.exists():
            self.state = read_json(self.path)
        else:
            self.state = {
                "status": "running",
                "started": iso_now(),
                "finished": None,
                "steps": {sid: {"status": "pending"} for sid in (step_ids or [])},
                "order": list(step_ids or []),
            }
        self.claim()

    def claim(self) -> None:
        """Record that this ftkit process drives the run now, so a later ftkit can tell a
        live run from a stale one whose ftkit died (pid plus start time, and the host)."""
        self.state.update(status="running", finished=None, pid=os.getpid(), pid_start=process_start(os.getpid()),
                          host=socket.gethostname())
        self._flush()

    def owner_alive(self) -> bool:
        held = owner_state(self.path.parent)
        if held is not None:
            return held
        if self.state.get("host") not in (None, socket.gethostname()):
            return True  # another host's run: not ours to judge
        return is_alive(self.state.get("pid"), self.state.get("pid_start"))

    def _flush(self) -> None:
        write_json(self.path, self.state)

    def step(self, step_id: str, status: str, **extra: Any) -> None:
        assert status in STATUSES, status  # programming error, not user input
        entry = self.state["steps"].setdefault(step_id, {})
        if step_id not in self.state["order"]:
            self.state["order"].append(step_id)
        if status == "running":  # a new attempt (resume): nothing of the last one may linger
            attempt = int(entry.get("attempt", 0)) + 1
            entry.clear()
            entry.update(started=iso_now(), attempt=attempt)
        entry["status"] = status
        if status in DONE:
            entry["finished"] = iso_now()
            if "started" in entry:
                t0 = dt.datetime.fromisoformat(entry["started"])
                entry["seconds"] = round((dt.datetime.now(dt.timezone.utc) - t0).total_seconds(), 3)
        entry.update(extra)
        self._flush()

    def step_detail(self, step_id: str, **extra: Any) -> None:
        """Add facts to a step's entry without changing its status (the pid it started)."""
        self.state["steps"].setdefault(step_id, {"status": "pending"}).update(extra)
        self._flush()

    def status_of(self, step_id: str) -> str:
        return str(self.state["steps"].get(step_id, {}).get("status", "pending"))

    def record(self, key: str, value: Any) -> None:
        """Persist a run-level fact at once (e.g. the power limits found before capping)."""
        self.state[key] = value
        self._flush()

    def finish(self, status: str, **extra: Any) -> None:
        self.state["status"] = status
        self.state["finished"] = iso_now()
        self.state.update(extra)
        self._flush()
