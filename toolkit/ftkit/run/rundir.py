"""The run directory: everything needed to explain a run later.

runs/<UTC timestamp>-<name>/ holds the resolved recipe, the plan, the command line, the
environment, the journal (state.json: each step's status and times, rewritten atomically
on every change; its type is run/record.py's RunState) and one log per step. Engines write
their outputs under steps/<name>/. `ftkit up` reserves the directory while it plans
(`Reservation`).

`ftkit up --resume` executes the stored plan.json, so a run directory is trusted only when
nobody but its owner can write it (`check_resumable`): the directory, plan.json and
state.json are the current user's, not group- or world-writable, no links; plan.json's
bytes still have the sha256 the journal recorded when the run started; and nothing in the
tree is a symbolic link (ftkit never makes one there, so a link is someone else's, and
writing a log, a result or a step's outputs through it would land outside the run).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shlex
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import FtkitError, UserError
from ftkit.files import write_atomic, write_json
from ftkit.procs import is_alive, process_start
from ftkit.run.record import DONE, OWN_FILE_MODE, STATUSES, RunState, StepEntry, state_from_bytes

OWNER_LOCK = ".owner.lock"


class OwnerLock:
    """The exclusive flock an ftkit process holds on RUN/.owner.lock while it drives the run.

    The kernel drops it the moment that process dies, however it dies, so it answers "is
    anyone driving this run?" truthfully across hostname changes, pid reuse and containers
    (the tether in every step watches the same lock through the bind mount)."""

    def __init__(self, run_path: Path) -> None:
        import fcntl

        self.path = run_path / OWNER_LOCK
        try:  # never through a link: the lock file is one ftkit created in the run directory
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"{self.path}: cannot open the run's owner lock ({e.strerror}); "
                            "ftkit does not write through links") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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


PLAN_LIMIT = 64 * 1024 * 1024  # plan.json and state.json are read whole: a bound, not a hang on /dev/zero


def plan_digest(data: bytes) -> str:
    """The sha256 of plan.json's bytes, recorded when the run starts and compared on resume."""
    return hashlib.sha256(data).hexdigest()


def inside(rel: str) -> bool:
    """True when `rel` names a path inside the run directory: relative, no `..`, no NUL."""
    parts = rel.split("/")
    return bool(rel) and "\0" not in rel and not rel.startswith("/") and ".." not in parts


def new_run_path(root: Path, name: str, *, reserve: bool = False) -> Path:
    """runs/<UTC timestamp>-<name>: the plan is built with it first. `reserve` creates the
    (empty) directory at once, atomically, so two `ftkit up` in the same second get two;
    the caller removes it again when the run is refused."""
    base = f"{utc_stamp()}-{name}"
    if reserve:
        root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = (root / (base if n == 0 else f"{base}-{n}")).resolve()
        if not reserve:
            if not path.exists():
                return path
            continue
        try:
            path.mkdir(mode=0o755)  # only its owner writes a run directory (--resume refuses one others may)
        except FileExistsError:
            continue
        return path
    raise FtkitError(f"cannot find a free run directory name under {root}")  # pragma: no cover


class Reservation:
    """The run directory `ftkit up` reserves while it plans (the plan names its path): made at
    once, atomically, so two `ftkit up` in the same second get two; `release()` removes it and
    the parents it made while still empty, so a refused run leaves nothing. Called with the
    resolved recipe, it is the `run_dir` that prepare.prepare takes."""

    def __init__(self, runs_dir: Path | None, *, dry_run: bool) -> None:
        self.runs_dir = runs_dir
        self.dry_run = dry_run
        self.made: list[Path] = []

    def __call__(self, res: Any) -> str:
        from ftkit.prepare import runs_root
        from ftkit.strict import checked_path

        # the profile's paths.runs meets the same checks as --runs-dir (CheckedPath), before anything is made
        checked_path(str(self.runs_dir or runs_root(res.machine)), "--runs-dir" if self.runs_dir else
                     f"{res.machine.name}: paths.runs", fills=True, system_ok=False)
        root = (self.runs_dir or runs_root(res.machine)).resolve()
        if not self.dry_run:
            self.made.extend(p for p in [root, *root.parents] if not p.exists())
        reserved = new_run_path(root, res.recipe.name, reserve=not self.dry_run)
        if not self.dry_run:
            self.made.append(reserved)
        return str(reserved)

    def release(self) -> None:
        for d in sorted(self.made, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()  # the reserved, still empty directories
            except OSError:
                pass


@dataclass
class RunDir:
    path: Path

    def file(self, rel: str) -> Path:
        if not inside(rel):  # the plan names these paths: one that leaves the run directory is refused
            raise FtkitError(f"{rel!r}: not a path inside the run directory {self.path}")
        return self.path / rel

    def log(self, step_id: str) -> Path:
        """A step's log; logs/ checked to be a real directory (the log itself is opened with
        O_NOFOLLOW by whoever writes it)."""
        return self.real_parent(f"logs/{step_id}.log", create=False)

    def real_parent(self, rel: str, *, create: bool = True) -> Path:
        """The path for `rel`, after checking that every directory between the run directory
        and it is a real directory, not a link (missing ones are created 0755 with `create`):
        a link there would carry the write outside the run. The last component is left to
        the writer (write_atomic replaces it, open_append refuses a link)."""
        target = self.file(rel)
        here = self.path
        for part in rel.split("/")[:-1]:
            if part in ("", "."):
                continue
            here = here / part
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                if not create:
                    break
                here.mkdir(mode=0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise FtkitError(f"{here}: not a directory ftkit made in the run directory (a link or a file); "
                                 "ftkit does not write through links")
        return target

    def write(self, rel: str, content: str | bytes) -> None:
        """Write a file ftkit owns in the run directory (a generated config, a result), atomically
        and never through a link."""
        write_atomic(self.real_parent(rel), content, mode=OWN_FILE_MODE)

    def write_inputs(self, resolved_yaml: dict[str, Any], plan: dict[str, Any], argv: list[str], env: dict[str, Any]) -> None:
        write_atomic(self.file("recipe.resolved.yaml"), yaml.safe_dump(resolved_yaml, sort_keys=False),
                     mode=OWN_FILE_MODE)
        write_json(self.file("plan.json"), plan, mode=OWN_FILE_MODE)
        write_atomic(self.file("command.txt"), " ".join(shlex.quote(a) for a in argv) + "\n", mode=OWN_FILE_MODE)
        write_json(self.file("env.json"), env, mode=OWN_FILE_MODE)

    def write_generated(self, files: list[dict[str, str]]) -> None:
        for f in files:
            self.write(f["path"], f["content"])

    def plan_sha256(self) -> str | None:
        """The digest of plan.json as it is now (None: no plan.json, or unreadable)."""
        try:
            return plan_digest(_read_own(self.file("plan.json"), private=False))
        except (OSError, UserError):
            return None


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}; ftkit resumes only a run directory that nobody but you can change")


def _check_own(path: Path, st: os.stat_result, kind: str) -> None:
    """Owned by this user and not writable by the group or others (ls -l: no w there)."""
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "a symbolic link")
    want = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if not want(st.st_mode):
        raise _refuse(path, f"not a {kind}")
    if st.st_uid != os.getuid():
        raise _refuse(path, f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(path, f"writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod go-w it if that is expected)")


def _read_own(path: Path, *, private: bool = True) -> bytes:
    """Read one of the run's own files: no link, no FIFO or device, bounded; with `private`,
    owned by this user and not writable by others (checked on the open file, so it cannot be
    swapped in between)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise _refuse(path, "a symbolic link") from None
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if private:
            _check_own(path, st, "regular file")
        elif not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "not a regular file")
        if st.st_size > PLAN_LIMIT:
            raise UserError(f"{path}: {st.st_size} bytes, more than a run's own file can be ({PLAN_LIMIT})")
        chunks, size = [], 0
        while size <= PLAN_LIMIT:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > PLAN_LIMIT:
            raise UserError(f"{path}: grew past {PLAN_LIMIT} bytes while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def first_link(root: Path, limit: int = 1_000_000) -> Path | None:
    """The first symbolic link, FIFO, socket or device under `root` (links not followed), or
    directory others may write, or None. ftkit makes only directories and regular files in a
    run directory, writable by their owner alone (the runner's umask); anything else is
    someone else's. Bounded: more than `limit` entries is refused as not a run ftkit made."""
    stack, seen = [root], 0
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"{d}: cannot list it ({e.strerror})") from None
        for e in entries:
            seen += 1
            if seen > limit:
                raise UserError(f"{root}: more than {limit} entries; not a run directory ftkit resumes")
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:  # gone while listed
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_mode & 0o022:  # others could have put anything there (ftkit's run makes 0755)
                    return Path(e.path)
                stack.append(Path(e.path))
            elif not stat.S_ISREG(st.st_mode):
                return Path(e.path)
    return None


@dataclass
class ResumeInputs:
    """What `--resume` may trust, read once: plan.json's bytes (their digest checked against
    the journal) and the journal itself."""

    plan_bytes: bytes
    state: RunState


def check_resumable(path: Path) -> ResumeInputs:
    """Refuse (UserError, one line naming the file) a run directory that others could have
    changed: see the module docstring. Nothing is written."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise UserError(f"{path}: not a run directory ({e.strerror})") from None
    _check_own(path, st, "directory")
    for name in ("plan.json", "state.json"):
        if not os.path.lexists(path / name):
            raise UserError(f"{path}: not a run directory (needs plan.json and state.json)")
    plan_bytes = _read_own(path / "plan.json")
    state_path = path / "state.json"
    state = state_from_bytes(_read_own(state_path), state_path)  # every field of its shape, else located
    if state.driver == "compose":  # ftkit.run.stackjournal: host paths in its plan are .env's names
        raise UserError(f"{path}: the run directory of a stack that docker compose drives, not ftkit; run it again "
                        "there (`docker compose --profile train up` in the stack directory)")
    recorded = state.plan_sha256
    if not isinstance(recorded, str):
        raise UserError(f"{state_path}: records no digest of plan.json (a run started by an older ftkit, or an "
                        "edited journal); ftkit resumes only a plan it can tell is unchanged: start the run again")
    if plan_digest(plan_bytes) != recorded:
        raise UserError(f"{path / 'plan.json'}: plan.json changed since the run started (sha256 "
                        f"{plan_digest(plan_bytes)[:12]}, the journal recorded {recorded[:12]}); "
                        "ftkit resumes only the plan it started: start a new run with `ftkit up`")
    link = first_link(path)
    if link is not None:
        kind = "a symbolic link" if link.is_symlink() else \
            "a directory others may write" if link.is_dir() else "not a regular file or directory"
        raise UserError(f"{link}: {kind} in the run directory; ftkit writes there only to files it made, never "
                        "through a link (remove it, or start a new run)")
    return ResumeInputs(plan_bytes, state)


class Journal:
    """state.json as the runner keeps it: a RunState written back atomically on every change."""

    def __init__(self, path: Path, state: RunState) -> None:
        """The journal at `path` as `state`, not claimed: for a run this ftkit does not drive (a
        stale or finished run being cleaned up), so its pid stays the dead ftkit's."""
        self.path = path
        self.state = state

    @classmethod
    def start(cls, run: RunDir, step_ids: list[str]) -> Journal:
        """The journal of the run this ftkit drives now: a new one with every step pending, or
        (a resume) the one there, read strictly; claimed either way."""
        path = run.file("state.json")
        if path.exists():  # a resume: check_resumable read it strictly already
            state = load_journal(path)
        else:  # plan_sha256: a resume refuses a plan.json edited since
            state = RunState.new(step_ids, started=iso_now(), plan_sha256=run.plan_sha256())
        journal = cls(path, state)
        journal.claim()
        return journal

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
        if self.state.host not in (None, socket.gethostname()):
            return True  # another host's run: not ours to judge
        return is_alive(self.state.pid, self.state.pid_start)

    def _flush(self) -> None:
        self.state.save(self.path)

    def entry(self, step_id: str) -> StepEntry | None:
        return self.state.entry(step_id)

    def step(self, step_id: str, status: str, **extra: Any) -> None:
        assert status in STATUSES, status  # programming error, not user input
        entry = self.state.steps.setdefault(step_id, StepEntry())
        if step_id not in self.state.order:
            self.state.order.append(step_id)
        if status == "running":  # a new attempt (resume): nothing of the last one may linger
            entry = self.state.steps[step_id] = StepEntry(started=iso_now(), attempt=int(entry.attempt or 0) + 1)
        entry.update(status=status)
        if status in DONE:
            entry.update(finished=iso_now())
            if entry.started is not None:
                t0 = dt.datetime.fromisoformat(entry.started)
                entry.update(seconds=round((dt.datetime.now(dt.timezone.utc) - t0).total_seconds(), 3))
        entry.update(**extra)
        self._flush()

    def step_detail(self, step_id: str, **extra: Any) -> None:
        """Add facts to a step's entry without changing its status (the pid it started)."""
        self.state.steps.setdefault(step_id, StepEntry()).update(**extra)
        self._flush()

    def status_of(self, step_id: str) -> str:
        return self.state.status_of(step_id)

    def record(self, key: str, value: Any) -> None:
        """Persist a run-level fact at once (e.g. the power limits found before capping)."""
        self.state.update(**{key: value})
        self._flush()

    def finish(self, status: str, **extra: Any) -> None:
        self.state.update(status=status, finished=iso_now(), **extra)
        self._flush()


def load_journal(path: Path) -> RunState:
    """A journal this ftkit continues (a resume), read strictly: UserError names the field."""
    from ftkit.files import read_bounded

    return state_from_bytes(read_bounded(path, PLAN_LIMIT), path)
