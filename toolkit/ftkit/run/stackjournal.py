"""The journal of a run that plain `docker compose` drives (the stacks `ftkit compose` writes):
RUN/state.json in the stack's run directory, kept by the step containers themselves, so
`ftkit status` and `ftkit report` read such a run as they read one `ftkit up` drove.

`ftkit compose` writes RUN/plan.json: the plan as the stack runs it. Every service starts as
`python -m ftkit.run.incontainer --journal STEP -- CMD`, which calls `started` before CMD and
`ended` after it. The journal has the shape `ftkit up` writes (status, started, finished,
steps with their status, times, attempt and error, order, left_running) plus `driver:
compose`, and no owner: no ftkit drives the run, so it is never stale (`ftkit down` and
`--resume` refuse it; docker compose stops and starts it).

- Concurrency: each change is a read-modify-write of state.json under an exclusive flock on
  RUN/.journal.lock - a file on the bind mount, so one lock for every container of the stack
  (the same kernel) - and state.json is replaced atomically: a reader never sees half of it.
- A pass of the train chain: `docker compose --profile train up` runs every one-shot step
  again each time. The first one-shot step of the plan starting begins a new pass in the same
  directory: the one-shot steps go back to pending and the run's start is now (a server keeps
  its entry). A plan.json regenerated since (another sha256) starts a new journal.
- Steps the containers do not run (power caps, a service hand-over, loading an adapter: the
  README's commands around `docker compose`) are journaled skipped, with that reason.
- A one-shot step that exits 0 without what it must leave (a model, an adapter, an eval
  summary) failed, as under `ftkit up`. A server stopped by a signal (compose stop or down)
  ended as it should: succeeded. A step stopped by a signal is interrupted.
- What a container cannot record: killed with SIGKILL (`docker kill`, the OOM killer) its
  step stays running; its next start is a new attempt.
- Journaling never stops or changes the step: whatever goes wrong with the journal (a
  state.json damaged into valid JSON of the wrong shape, a bug) is one line on stderr and
  one more try from a fresh journal; `started` and `ended` never raise.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ftkit.files import open_append, read_json, write_atomic

LOCK = ".journal.lock"
DRIVER = "compose"
HOST_STEP = "a host step: docker compose does not run it (the stack's README.md has its command)"
Say = Callable[[str], None]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _seconds(start: Any, end: str) -> float | None:
    try:
        return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(str(start))).total_seconds(), 3)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _locked(run: Path) -> Iterator[None]:
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _plan(run: Path) -> tuple[Any, str | None]:
    """(Plan, sha256 of plan.json), or (None, None) when the stack has none this ftkit reads."""
    from ftkit.plan.spec import Plan
    from ftkit.run.rundir import RunDir

    digest = RunDir(run).plan_sha256()
    try:
        return Plan.from_dict(read_json(run / "plan.json")), digest
    except (OSError, ValueError):
        return None, digest


def _fresh(plan: Any, digest: str | None) -> dict[str, Any]:
    steps: dict[str, dict[str, Any]] = {}
    for s in plan.steps if plan is not None else []:
        steps[s.id] = {"status": "pending"} if s.executor == "docker" else {"status": "skipped", "reason": HOST_STEP}
    return {"status": "pending", "driver": DRIVER, "started": _now(), "finished": None, "plan_sha256": digest,
            "steps": steps, "order": list(steps)}


def _load(run: Path, plan: Any, digest: str | None) -> dict[str, Any]:
    try:
        st = read_json(run / "state.json")
    except (OSError, ValueError):
        st = None
    ok = (isinstance(st, dict) and st.get("driver") == DRIVER and st.get("plan_sha256") == digest
          and isinstance(st.get("steps"), dict) and isinstance(st.get("order"), list)
          and all(isinstance(v, dict) for v in st["steps"].values()))
    return st if ok else _fresh(plan, digest)  # type: ignore[return-value]


def _kinds(plan: Any, st: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(one-shot step ids in plan order, server step ids)."""
    if plan is None:  # no plan.json: what the containers said of themselves (ids are strings)
        ids = [s for s in st["order"] if isinstance(s, str)]
        return ([s for s in ids if not st["steps"].get(s, {}).get("server")],
                [s for s in ids if st["steps"].get(s, {}).get("server")])
    docker = [s for s in plan.steps if s.executor == "docker"]
    return [s.id for s in docker if not s.background], [s.id for s in docker if s.background]


def settle(st: dict[str, Any], one_shot: list[str], servers: list[str]) -> None:
    """The run's status from its steps': running while a one-shot step runs (or the chain is
    between two of them); failed or interrupted as its first such step; succeeded once every
    one-shot step has; servers still up are `left_running`, as `ftkit up` records them."""
    steps = st["steps"]

    def status(sid: str) -> str:
        return str(steps.get(sid, {}).get("status", "pending"))

    for key in ("failed_step", "message"):
        st.pop(key, None)
    bad = next((s for s in st["order"] if s in one_shot + servers and status(s) in ("failed", "interrupted")), None)
    if any(status(s) == "running" for s in one_shot):
        st["status"] = "running"
    elif bad is not None:
        st["status"] = status(bad)
        st["failed_step"] = bad
        st["message"] = str(steps[bad].get("error") or steps[bad].get("message") or "")
    elif one_shot and all(status(s) == "succeeded" for s in one_shot):
        st["status"] = "succeeded"
    elif any(status(s) == "succeeded" for s in one_shot) or any(status(s) == "running" for s in servers):
        st["status"] = "running"
    else:
        st["status"] = "pending"
    if st["status"] in ("succeeded", "failed", "interrupted"):
        ends = [str(steps[s]["finished"]) for s in one_shot + servers if steps.get(s, {}).get("finished")]
        st["finished"] = max(ends) if ends else _now()
    else:
        st["finished"] = None
    st["left_running"] = [f"{s} (compose service {s}, container {steps[s].get('container', '?')})"
                          for s in servers if status(s) == "running"]


def _update(run: Path, change: Callable[[dict[str, Any], Any, list[str], list[str]], None],
            say: Say) -> dict[str, Any] | None:
    """Apply `change` to the journal under the lock and write it back atomically; the journal
    as written, or None. A journal that cannot be written is a note, never the step's failure;
    one that cannot be read as a journal (valid JSON of another shape) or anything else that
    goes wrong is a note too, and one more try from a fresh journal."""
    for fresh in (False, True):
        try:
            with _locked(run):
                plan, digest = _plan(run)
                st = _fresh(plan, digest) if fresh else _load(run, plan, digest)
                one_shot, servers = _kinds(plan, st)
                change(st, plan, one_shot, servers)
                settle(st, one_shot, servers)
                write_atomic(run / "state.json", json.dumps(st, indent=2, sort_keys=True, default=str) + "\n")
                return st
        except OSError as e:
            say(f"cannot journal into {run / 'state.json'} ({e.strerror or e}); the step runs unjournaled")
            return None
        except Exception as e:  # noqa: BLE001 - journaling never stops or changes the step
            what = (str(e).splitlines() or [""])[0][:200]
            say(f"cannot journal into {run / 'state.json'} ({type(e).__name__}: {what}); "
                + ("the step runs unjournaled" if fresh else "starting a fresh journal"))
    return None


def started(run: Path, step_id: str, cmd: list[str], *, say: Say) -> None:
    """Journal that `step_id` starts (a new attempt; the chain's first step: a new pass)."""
    new_pass: list[bool] = []

    def change(st: dict[str, Any], plan: Any, one_shot: list[str], servers: list[str]) -> None:
        if step_id not in st["order"]:
            st["order"].append(step_id)
        if one_shot and step_id == one_shot[0]:
            for sid in one_shot:
                st["steps"][sid] = {"status": "pending"}
            st["started"] = _now()
            new_pass.append(True)
        entry = st["steps"].setdefault(step_id, {})
        before = entry.get("attempt")
        attempt = (before if isinstance(before, int) and not isinstance(before, bool) and before > 0 else 0) + 1
        entry.clear()
        entry.update(status="running", started=_now(), attempt=attempt, container=socket.gethostname(),
                     log=f"logs/{step_id}.log")
        if step_id in servers:
            entry["server"] = True

    _update(run, change, say)
    if new_pass:
        _environment(run, say)


def ended(run: Path, step_id: str, code: int, signals: list[int], output: str, *, say: Say) -> dict[str, Any] | None:
    """Journal how `step_id` ended: its exit status, the signals that stopped it, its last
    output. Returns the step's entry as journaled (None: it could not be journaled)."""

    def change(st: dict[str, Any], plan: Any, one_shot: list[str], servers: list[str]) -> None:
        entry = st["steps"].setdefault(step_id, {})
        end = _now()
        entry.update(finished=end, exit_code=code)
        secs = _seconds(entry.get("started"), end)
        if secs is not None:
            entry["seconds"] = secs
        for key in ("error", "message"):
            entry.pop(key, None)
        stop = signal.Signals(signals[0]).name if signals else None
        if stop is not None and step_id in servers:
            entry.update(status="succeeded", message=f"stopped ({stop})")
        elif stop is not None:
            entry.update(status="interrupted", message=f"stopped by {stop} (exit status {code})")
        elif code == 0:
            missing = _missing(run, plan, step_id)
            if missing:
                entry.update(status="failed", error=f"the step exited 0 but {missing}")
            else:
                entry["status"] = "succeeded"
                step = _step(plan, step_id)
                if step is not None and step.outputs:
                    entry["outputs"] = dict(step.outputs)
        else:
            entry.update(status="failed", error=_why(code, output, step_id))

    st = _update(run, change, say)
    entry = st["steps"].get(step_id) if st is not None else None
    return dict(entry) if isinstance(entry, dict) else None


def _step(plan: Any, step_id: str) -> Any:
    return next((s for s in plan.steps if s.id == step_id), None) if plan is not None else None


def _missing(run: Path, plan: Any, step_id: str) -> str | None:
    step = _step(plan, step_id)
    if step is None:
        return None
    from ftkit.run.rundir import RunDir
    from ftkit.run.runner import missing_output

    return missing_output(RunDir(run), step)


def _why(code: int, output: str, step_id: str) -> str:
    """One line: the exit status and the engine's own reason from its last output."""
    from ftkit.gateways.serving import engine_reason

    how = f"exited with code {code}"
    if code > 128:
        with contextlib.suppress(ValueError):
            how = f"killed by {signal.Signals(code - 128).name} (exit status {code})"
    reason = engine_reason(output)
    return f"{how}: {reason} (log: logs/{step_id}.log)" if reason else f"{how} (log: logs/{step_id}.log)"


def _environment(run: Path, say: Say) -> None:
    """env.json, as `ftkit up` writes it: what the steps ran on (here: the step's image)."""
    try:
        from ftkit.run.envinfo import snapshot

        env = snapshot(include_docker=False)
        env["recorded_by"] = "the step container (a stack run by docker compose)"
        write_atomic(run / "env.json", json.dumps(env, indent=2, sort_keys=True, default=str) + "\n")
    except Exception as e:  # noqa: BLE001 - a report without the environment beats a failed step
        say(f"cannot record env.json ({e})")


def open_log(run: Path, step_id: str, cmd: list[str], *, say: Say) -> IO[bytes] | None:
    """RUN/logs/STEP.log for appending (never through a link), headed by the command and the
    attempt; None (and a note) when it cannot be opened."""
    import shlex

    try:
        logs = run / "logs"
        logs.mkdir(mode=0o755, exist_ok=True)
        if logs.is_symlink() or not logs.is_dir():
            raise OSError(f"{logs} is not a directory ftkit made")
        log = open_append(logs / f"{step_id}.log", binary=True)
        log.write(f"--- {_now()} in container {socket.gethostname()} (docker compose)\n$ {shlex.join(cmd)}\n".encode())
        log.flush()
        return log  # type: ignore[no-any-return]
    except OSError as e:
        say(f"cannot write logs/{step_id}.log ({getattr(e, 'strerror', None) or e}); the output is in docker's logs")
        return None
