"""The run record: a run directory's plan.json and state.json, each read as one type, here.

plan.json is a `Plan` (`Plan.from_dict` checks every field), state.json a `RunState` of
`StepEntry`s. Every reader goes through this module - `--resume` (strictly: `RunRecord.load`),
stale cleanup, `ftkit status`/`logs`/`down` and `report` (as a view: what does not have its
shape is left out with a note, so a damaged run still shows) - so the journal's shape is
written down once. The files keep their JSON exactly: a known key the file had as null stays
null, keys this ftkit does not know are kept in `extra`, and `to_dict()` of what was read is
the object that was read (write_json sorts the keys), so old run directories load and save
unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from ftkit.errors import UserError
from ftkit.files import read_json, write_json

if TYPE_CHECKING:
    from ftkit.plan.spec import Plan

StepStatus = Literal["pending", "running", "succeeded", "failed", "skipped", "interrupted"]
RunStatus = Literal["pending", "running", "succeeded", "failed", "interrupted"]
STATUSES: tuple[str, ...] = get_args(StepStatus)
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
DONE = ("succeeded", "failed", "skipped", "interrupted")
# The run's own files (plan, journal, inputs, generated configs): the umask decides who may
# read them, like every file ftkit writes, but never group- or world-writable whatever the
# umask (a user-private-group umask 002 included): a resume trusts only what its owner wrote.
OWN_FILE_MODE = 0o644


class RecordFormatError(ValueError):
    """A state.json that is not the shape of a journal; the message starts with the field."""


def kind(v: Any) -> str:
    """A JSON value's kind in words, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


# A field's check: (accepts the value, what it should be in words).
Check = tuple[Callable[[Any], bool], str]
_TEXT: Check = (lambda v: isinstance(v, str), "a string")
_INT: Check = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_NUM: Check = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_BOOL: Check = (lambda v: isinstance(v, bool), "a boolean")
_OBJ: Check = (lambda v: isinstance(v, dict), "an object")
_STRS: Check = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of step names")
_OBJS: Check = (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of objects")
_STEPS: Check = (lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
                 "an object of step records")


def _one_of(values: tuple[str, ...]) -> Check:
    return (lambda v: v in values, "one of " + ", ".join(values))


class _Record:
    """A JSON object read into typed fields: FIELDS' keys are attributes, the rest `extra`.

    `strict` (None problems): the first value of the wrong type raises RecordFormatError naming
    it. As a view (a problems list): it is left out with a note (null is as good as missing),
    and a status this ftkit does not know is kept as text (it is shown, escaped)."""

    FIELDS: ClassVar[dict[str, Check]]
    STRICT: ClassVar[dict[str, Check]] = {}  # checks only a resume makes
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    ALWAYS: ClassVar[tuple[str, ...]] = ()  # written even when None
    extra: dict[str, Any]
    nulls: set[str]

    @classmethod
    def _parse(cls, data: Any, problems: list[str] | None, where: str, path: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise RecordFormatError(f"{path.rstrip('.') or '<document>'}: expected an object, got {kind(data)}")
        values: dict[str, Any] = {"extra": {}, "nulls": set()}
        strict = problems is None
        for key in cls.REQUIRED:
            if strict and key not in data:
                raise RecordFormatError(f"{path}{key}: missing")
        for key, value in data.items():
            check = (cls.STRICT.get(key) if strict else None) or cls.FIELDS.get(key)
            if check is None or key in ("extra", "nulls"):
                values["extra"][key] = value
            elif value is None:
                if strict and key in cls.REQUIRED:
                    raise RecordFormatError(f"{path}{key}: expected {check[1]}, got null")
                values["nulls"].add(key)
            elif check[0](value):
                values[key] = value
            elif problems is None:
                raise RecordFormatError(f"{path}{key}: expected {check[1]}, got {kind(value)}")
            else:  # kept as it was (in `extra`), so a journal saved back loses nothing
                problems.append(f"{where}: {key} is {kind(value)}, not {check[1]} (left out)")
                values["extra"][key] = value
        return values

    def to_dict(self) -> dict[str, Any]:
        """The JSON object again: typed fields that are set (or were null), then `extra`."""
        out: dict[str, Any] = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is not None or name in self.nulls or name in self.ALWAYS:
                out[name] = _plain(value)
        out.update(self.extra)
        return out

    def update(self, **values: Any) -> None:
        """Set fields by their JSON names (a name this type does not know goes to `extra`)."""
        for key, value in values.items():
            if key in self.FIELDS and key not in ("extra", "nulls"):
                self.extra.pop(key, None)  # a value a view could not read is replaced
                setattr(self, key, value)
                if value is None:
                    self.nulls.add(key)
                else:
                    self.nulls.discard(key)
            else:
                self.extra[key] = value

    def drop(self, key: str) -> Any:
        """Remove a key (as dict.pop): the value it had, or None."""
        if key in self.FIELDS:
            value = getattr(self, key)
            setattr(self, key, None)
            self.nulls.discard(key)
            unread = self.extra.pop(key, None)
            return value if value is not None else unread
        return self.extra.pop(key, None)


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class StepEntry(_Record):
    """One step in state.json: its status, times and what the runner noted (its process, why it
    ended). Facts without a field here (the log, a server's `replaced_by`, telemetry) are `extra`."""

    status: StepStatus = "pending"
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    attempt: int | None = None
    error: str | None = None
    reason: str | None = None
    message: str | None = None
    process: dict[str, Any] | None = None
    left_running: bool | None = None
    stopped: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    nulls: set[str] = field(default_factory=set, repr=False, compare=False)  # known keys the file had as null

    FIELDS: ClassVar[dict[str, Check]] = {
        "status": _TEXT, "started": _TEXT, "finished": _TEXT, "seconds": _NUM, "attempt": _INT, "error": _TEXT,
        "reason": _TEXT, "message": _TEXT, "process": _OBJ, "left_running": _BOOL, "stopped": _BOOL}
    STRICT: ClassVar[dict[str, Check]] = {"status": _one_of(STATUSES)}
    REQUIRED: ClassVar[tuple[str, ...]] = ("status",)
    ALWAYS: ClassVar[tuple[str, ...]] = ("status",)

    @classmethod
    def from_dict(cls, data: Any, problems: list[str] | None = None, *, where: str = "state.json",
                  path: str = "") -> StepEntry:
        return cls(**cls._parse(data, problems, where, path))


@dataclass
class RunState(_Record):
    """state.json: the run's outcome and each step's entry, in plan order (`order`).

    Written by the runner's Journal (run/rundir.py) and, for a stack, by run.stackjournal
    (`driver: compose`); read by resume, stale cleanup, `ftkit status` and `report`."""

    status: RunStatus | None = None
    started: str | None = None
    finished: str | None = None
    plan_sha256: str | None = None  # sha256 of plan.json when the run started: a resume refuses an edited plan
    steps: dict[str, StepEntry] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    driver: str | None = None  # "compose": docker compose drives the run (run.stackjournal)
    pid: int | None = None  # the ftkit that drives the run, with its start time and host
    pid_start: int | None = None
    host: str | None = None
    message: str | None = None
    failed_step: str | None = None
    left_running: list[str] | None = None
    resumes: list[dict[str, Any]] | None = None
    power: dict[str, Any] | None = None  # the original limits found before capping
    cleaned: bool | None = None
    stopped_by_down: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    nulls: set[str] = field(default_factory=set, repr=False, compare=False)
    unread_steps: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # a view's left-out entries

    FIELDS: ClassVar[dict[str, Check]] = {
        "status": _TEXT, "started": _TEXT, "finished": _TEXT, "plan_sha256": _TEXT, "steps": _STEPS,
        "order": _STRS, "driver": _TEXT, "pid": _INT, "pid_start": _INT, "host": _TEXT, "message": _TEXT,
        "failed_step": _TEXT, "left_running": (_STRS[0], "a list of strings"), "resumes": _OBJS, "power": _OBJ,
        "cleaned": _BOOL, "stopped_by_down": _OBJ}
    STRICT: ClassVar[dict[str, Check]] = {"status": _one_of(RUN_STATUSES), "steps": _OBJ}  # entries: StepEntry's
    REQUIRED: ClassVar[tuple[str, ...]] = ("steps", "order")
    ALWAYS: ClassVar[tuple[str, ...]] = ("steps", "order")

    @classmethod
    def new(cls, step_ids: list[str], *, started: str, plan_sha256: str | None) -> RunState:
        """The journal of a run about to start: every step pending."""
        state = cls(status="running", started=started, plan_sha256=plan_sha256,
                    steps={sid: StepEntry() for sid in step_ids}, order=list(step_ids))
        state.nulls.add("finished")
        if plan_sha256 is None:
            state.nulls.add("plan_sha256")
        return state

    @classmethod
    def from_dict(cls, data: Any, problems: list[str] | None = None, *, where: str = "state.json") -> RunState:
        """Strict (no `problems`): RecordFormatError names the first field of the wrong shape,
        e.g. `steps.train.status`. As a view: see _Record."""
        values = cls._parse(data, problems, where, "")
        raw_steps = values.get("steps")
        if problems is not None and raw_steps is None and isinstance(data.get("steps"), dict):
            raw_steps = values["extra"].pop("steps")  # a view: only the entries that are not objects are left out
        steps: dict[str, StepEntry] = {}
        unread: dict[str, Any] = {}
        for sid, e in (raw_steps or {}).items():
            if problems is not None and not isinstance(e, dict):
                problems.append(f"{where}: step {sid} is {kind(e)}, not a step record (left out)")
                unread[sid] = e
                continue
            steps[sid] = StepEntry.from_dict(e, problems, where=f"{where}: step {sid}", path=f"steps.{sid}.")
        values["steps"] = steps
        state = cls(**values)
        state.unread_steps = unread
        return state

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.unread_steps:  # entries a view could not read go back as they were
            out["steps"] = {**self.unread_steps, **out["steps"]}
        return out

    def entry(self, step_id: str) -> StepEntry | None:
        return self.steps.get(step_id)

    def status_of(self, step_id: str) -> str:
        entry = self.steps.get(step_id)
        return entry.status if entry is not None else "pending"

    def step_ids(self) -> list[str]:
        """The steps in run order (a journal without `order`: as listed)."""
        return self.order or list(self.steps)

    def save(self, path: Path) -> None:
        """Write state.json atomically, never through a link, its owner's alone."""
        write_json(path, self.to_dict(), mode=OWN_FILE_MODE)


def read_state(run: Path) -> dict[str, Any]:
    """state.json as JSON, for a view; {} when there is none, or it is damaged (not JSON, or
    JSON but not an object: a list or a number would stop `ftkit down` with a TypeError).
    Bounded, never blocks on a FIFO, never follows a link (files.read_json)."""
    try:
        st = read_json(run / "state.json")
    except (OSError, ValueError):
        return {}
    return dict(st) if isinstance(st, dict) else {}


def view_state(run: Path, problems: list[str] | None = None) -> RunState | None:
    """state.json as a RunState view (what does not have its shape left out, noted in
    `problems` when given); None when there is none or it is damaged."""
    raw = read_state(run)
    return RunState.from_dict(raw, problems if problems is not None else []) if raw else None


def _plan(data: Any) -> Plan:
    """JSON (bytes, or already parsed) as a Plan; PlanFormatError or another ValueError says why not."""
    from ftkit.files import parse_json
    from ftkit.plan.spec import Plan

    return Plan.from_dict(parse_json(data) if isinstance(data, bytes) else data)


def _why(e: Exception) -> str:
    from ftkit.plan.spec import PlanFormatError

    if isinstance(e, PlanFormatError):
        return str(e)
    text = getattr(e, "reason", None) or (str(e).splitlines()[0][:200] if str(e) else "")
    return f"{e.__class__.__name__}: {text}"


def plan_from_bytes(data: bytes, path: Path) -> Plan:
    """plan.json's bytes as a Plan, or UserError naming the file and the field (exit 2)."""
    try:
        return _plan(data)
    except Exception as e:  # noqa: BLE001 - a truncated, binary or edited plan.json: refuse, never trace back
        raise UserError(f"{path}: not a plan this ftkit can resume ({_why(e)})") from None


def state_from_bytes(data: bytes, path: Path) -> RunState:
    """state.json's bytes as a RunState, strictly, or UserError naming the file and the field."""
    try:
        raw = json.loads(data)
    except Exception:  # noqa: BLE001 - truncated, binary, deeply nested: refused, never a traceback
        raise UserError(f"{path}: not a journal this ftkit can resume (unreadable or edited)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a journal this ftkit can resume (not a JSON object)")
    try:
        return RunState.from_dict(raw)
    except RecordFormatError as e:
        raise UserError(f"{path}: not a journal this ftkit can resume ({e})") from None


def load_plan(run: Path) -> tuple[Plan | None, str | None]:
    """plan.json as a Plan for cleaning up after a run: (the plan, None), or (None, why not) when
    it is missing or damaged (bounded, never a FIFO or a link: files.read_json)."""
    try:
        data = read_json(run / "plan.json")
    except (OSError, ValueError) as e:
        return None, f"plan.json: {getattr(e, 'reason', None) or getattr(e, 'strerror', None) or e}"
    if not isinstance(data, dict):
        return None, "plan.json is not a plan"
    try:
        return _plan(data), None
    except Exception as e:  # noqa: BLE001 - an edited plan: cleaned up with what can be read of it
        why = f"plan.json is not a plan ({_why(e)})"
    salvaged = _salvage(data)
    if salvaged is None:
        return None, why
    return salvaged, None


def _salvage(data: dict[str, Any]) -> Plan | None:
    """The plan with only its steps that read as steps, for cleaning up after a damaged plan.json:
    one edited step must not keep the others' power caps and hand-over from being put back.
    None when the plan's own fields are damaged too (then nothing of it is trusted)."""
    steps = data.get("steps")
    if not isinstance(steps, list):
        return None
    good = []
    for s in steps:
        try:
            _plan({**data, "steps": [s]})
        except Exception:  # noqa: BLE001 - this step is left out
            continue
        good.append(s)
    if not good:
        return None
    try:
        return _plan({**data, "steps": good})
    except Exception:  # noqa: BLE001 - e.g. two steps of one id
        return None


@dataclass
class PlanStepView:
    """A step of plan.json as `report` and `bench` read it (see PlanView)."""

    id: str | None = None
    kind: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class PlanView:
    """plan.json as `report` and `bench` read it: the few fields they need, from any run
    directory someone hands them - a damaged one, or one an older ftkit wrote - with what
    does not have its shape left out and noted. A run is executed only from a `Plan`."""

    recipe: str | None = None
    machine: str | None = None
    simulated_gpus: bool = False
    steps: list[PlanStepView] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any], problems: list[str]) -> PlanView:
        def text(d: dict[str, Any], key: str, where: str) -> str | None:
            v = d.get(key)
            if v is not None and not isinstance(v, str):
                problems.append(f"{where}: {key} is {kind(v)}, not a string (left out)")
                return None
            return v

        steps = data.get("steps")
        if steps is not None and not _OBJS[0](steps):
            problems.append(f"plan.json: steps is {kind(steps)}, not a list of steps (left out)")
            steps = None
        view = cls(text(data, "recipe", "plan.json"), text(data, "machine", "plan.json"),
                   bool(data.get("simulated_gpus")))
        for n, s in enumerate(steps or []):
            where = f"plan.json: steps[{n}]"
            outputs = s.get("outputs")
            if outputs is not None and not (isinstance(outputs, dict) and all(isinstance(x, str) for x in outputs.values())):
                problems.append(f"{where}: outputs is {kind(outputs)}, not an object of paths (left out)")
                outputs = None
            view.steps.append(PlanStepView(text(s, "id", where), text(s, "kind", where), dict(outputs or {})))
        return view


@dataclass
class RunRecord:
    """A run directory's plan and journal, both checked: what `--resume` executes."""

    path: Path
    plan: Plan
    state: RunState

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """Read a run directory to resume it: refused (UserError, one line naming the file and
        the field, exit 2) when others could have changed it (rundir.check_resumable), or
        plan.json or state.json is not of its shape. Nothing is written."""
        from ftkit.run.rundir import check_resumable

        inputs = check_resumable(path)
        plan = plan_from_bytes(inputs.plan_bytes, path / "plan.json")
        return cls(path, plan, inputs.state)
