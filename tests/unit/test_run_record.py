"""Issue #22: the run record has one type (run/record.py). A real run's plan.json and state.json
load into a Plan and a RunState and save back byte for byte (old run directories keep loading
and their files keep their format); a malformed state.json is one located line, exit 2, before
anything runs; a view of a damaged journal leaves out what does not fit, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftkit.files import write_json
from ftkit.run.record import RecordFormatError, RunRecord, RunState, StepEntry
from tests.conftest import run_cli
from tests.unit.test_hostile_resume import failed_run  # noqa: F401 - a fixture
from tests.unit.test_runner import execute, plan_of, step


def test_a_real_run_loads_and_saves_byte_for_byte(failed_run: Path, tmp_path: Path) -> None:  # noqa: F811
    record = RunRecord.load(failed_run)
    assert record.state.status == "failed" and record.state.failed_step == "b"
    assert record.state.steps["a"].status == "succeeded" and record.state.steps["b"].error
    assert record.state.steps["b"].extra["log"] == "logs/b.log"  # a fact without a field is kept
    assert "signal" in record.state.extra and record.state.extra["signal"] is None  # a null stays a null
    out = tmp_path / "out"
    out.mkdir()
    record.state.save(out / "state.json")
    write_json(out / "plan.json", record.plan.to_dict())
    for name in ("state.json", "plan.json"):
        assert (out / name).read_bytes() == (failed_run / name).read_bytes(), name


def test_a_resumed_run_round_trips_too(tmp_path: Path) -> None:
    """Attempts, the resumes list and a step's process record: still the same bytes."""
    gate = tmp_path / "gate"
    flaky = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(gate)!r}).exists() else 1)"
    plan = plan_of(tmp_path, step("a", "print('a')"), step("b", flaky))
    execute(tmp_path, plan)
    gate.touch()
    result, _, st = execute(tmp_path, plan, resume=True)
    assert result.status == "succeeded" and st["steps"]["b"]["attempt"] == 2 and st["resumes"]
    data = (tmp_path / "run" / "state.json").read_bytes()
    state = RunState.from_dict(json.loads(data))
    assert state.steps["b"].attempt == 2 and state.resumes and state.steps["b"].process
    state.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == data


def test_a_journal_with_keys_this_ftkit_does_not_know_round_trips(tmp_path: Path) -> None:
    """A compose stack's journal (driver, containers), nulls and unknown keys: kept as they were."""
    raw = {"status": "pending", "driver": "compose", "started": "2026-01-01T00:00:00+00:00", "finished": None,
           "plan_sha256": None, "order": ["train"], "future_key": {"x": [1, 2.5]},
           "steps": {"train": {"status": "running", "container": "abc", "attempt": 1, "error": None}}}
    write_json(tmp_path / "a.json", raw)
    state = RunState.from_dict(json.loads((tmp_path / "a.json").read_bytes()))
    assert state.driver == "compose" and state.steps["train"].extra == {"container": "abc"}
    state.save(tmp_path / "b.json")
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()


@pytest.mark.parametrize(("change", "field"), [
    (lambda st: st["steps"]["b"].update(status="done"), "steps.b.status: expected one of pending"),
    (lambda st: st["steps"]["b"].update(attempt="2"), "steps.b.attempt: expected an integer, got a string"),
    (lambda st: st["steps"].update(b="failed"), "steps.b: expected an object, got a string"),
    (lambda st: st.update(order="a,b"), "order: expected a list of step names, got a string"),
    (lambda st: st.pop("steps"), "steps: missing"),
    (lambda st: st.update(resumes={"at": 1}), "resumes: expected a list of objects, got an object"),
])
def test_a_malformed_journal_is_one_located_line_and_nothing_runs(failed_run: Path, change, field: str) -> None:  # noqa: F811
    state_path = failed_run / "state.json"
    st = json.loads(state_path.read_text())
    change(st)
    state_path.write_text(json.dumps(st))
    before = state_path.read_bytes()
    result = run_cli("up", "--resume", str(failed_run))
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert result.code == 2 and "Traceback" not in result.err, result.err
    assert len(lines) == 1 and lines[0].startswith(f"{state_path}: not a journal this ftkit can resume ({field}"), \
        result.err
    assert state_path.read_bytes() == before  # nothing written


def test_strict_and_view_reads_of_one_bad_entry() -> None:
    raw = {"status": "failed", "order": ["t"], "steps": {"t": {"status": "ok\u202e", "seconds": "12", "error": "x"}}}
    with pytest.raises(RecordFormatError, match=r"^steps\.t\.status: expected one of"):
        RunState.from_dict(json.loads(json.dumps(raw)))
    problems: list[str] = []
    view = RunState.from_dict(json.loads(json.dumps(raw)), problems)
    entry = view.steps["t"]
    assert entry.status == "ok\u202e" and entry.error == "x" and entry.seconds is None  # shown, escaped, by status
    assert problems == ["state.json: step t: seconds is a string, not a number (left out)"]


def test_a_new_journal_has_the_shape_ftkit_always_wrote() -> None:
    state = RunState.new(["a", "b"], started="2026-01-01T00:00:00+00:00", plan_sha256=None)
    assert state.to_dict() == {"status": "running", "started": "2026-01-01T00:00:00+00:00", "finished": None,
                               "plan_sha256": None, "steps": {"a": {"status": "pending"}, "b": {"status": "pending"}},
                               "order": ["a", "b"]}
    entry = StepEntry()
    entry.update(status="failed", error="boom", replaced_by="new")
    assert entry.to_dict() == {"status": "failed", "error": "boom", "replaced_by": "new"}
    assert entry.drop("error") == "boom" and entry.to_dict() == {"status": "failed", "replaced_by": "new"}


def test_status_of_a_running_train_step_shows_its_progress_from_the_typed_plan(tmp_path: Path) -> None:
    """`ftkit status` reads the step's metrics path and max_steps from plan.json as a Plan."""
    import os

    from ftkit.plan.spec import GeneratedFile
    from ftkit.procs import process_start
    from ftkit.run import runner

    train = step("train", "print(1)", kind="train", outputs={"metrics": "steps/train/metrics.jsonl"}, max_steps=40,
                 files=[GeneratedFile("configs/train-train.json", json.dumps({"train": {"max_steps": 40}}))])
    plan = plan_of(tmp_path, train)
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit", "up", "t.yaml"]).path
    state = RunState.new(["train"], started="2026-01-01T00:00:00+00:00", plan_sha256=None)
    state.update(pid=os.getpid(), pid_start=process_start(os.getpid()), host=os.uname().nodename)
    state.steps["train"].update(status="running", started="2026-01-01T00:00:00+00:00")
    state.save(run / "state.json")
    (run / "steps" / "train").mkdir(parents=True)
    (run / "steps" / "train" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.25}) + "\n")
    result = run_cli("status", str(run))
    assert result.code == 0, result.err
    assert "step 10/40, loss 1.2500" in result.out and "running for" in result.out, result.out


def test_a_reservation_is_released_with_the_parents_it_made(tmp_path: Path) -> None:
    """`ftkit up` reserves the run directory while it plans; a refused run leaves nothing,
    also none of the directories above it that the reservation made (those there before stay)."""
    from types import SimpleNamespace

    from ftkit.run.rundir import Reservation

    res = SimpleNamespace(recipe=SimpleNamespace(name="demo"), machine=SimpleNamespace(name="lab"))
    reservation = Reservation(tmp_path / "a" / "runs", dry_run=False)
    path = Path(reservation(res))
    assert path.is_dir() and path.parent == (tmp_path / "a" / "runs").resolve() and path.name.endswith("-demo")
    assert Path(reservation(res)) != path  # a second `ftkit up` in the same second gets another
    reservation.release()
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()
    dry = Reservation(tmp_path / "b", dry_run=True)
    assert Path(dry(res)).parent == (tmp_path / "b").resolve() and not (tmp_path / "b").exists()


# -- from the hostile review of #22: a view keeps what it cannot read, cleanup salvages a plan --

def test_a_view_saved_back_loses_nothing_it_could_not_read() -> None:
    """`ftkit down` and stale cleanup write the journal back from a view: a field of an
    unexpected type, or one step entry that is not an object, is left out of what they read
    but kept in what they write."""
    raw = {"status": "succeeded", "order": "abc", "pid": "1234", "steps": {
        "merge": "x", "serve": {"status": "succeeded", "seconds": "10", "process": {"pid": 1}}}}
    problems: list[str] = []
    state = RunState.from_dict(json.loads(json.dumps(raw)), problems)
    assert state.pid is None and state.order == [] and set(state.steps) == {"serve"}  # the serve entry still read
    assert state.steps["serve"].process == {"pid": 1} and state.steps["serve"].seconds is None
    assert any("step merge" in p for p in problems) and any("pid" in p for p in problems)
    assert state.to_dict() == raw
    state.steps["serve"].update(stopped=True, seconds=3.0)  # a value set replaces the unread one
    assert state.to_dict()["steps"]["serve"]["seconds"] == 3.0


def test_cleanup_reads_the_steps_of_a_plan_with_one_damaged_step(tmp_path: Path) -> None:
    from ftkit.run.record import load_plan

    plan = plan_of(tmp_path, step("a", "print(1)"), step("b", "print(2)"))
    data = plan.to_dict()
    data["steps"][0]["description"] = None
    write_json(tmp_path / "plan.json", data)
    salvaged, why = load_plan(tmp_path)
    assert why is None and salvaged is not None and [s.id for s in salvaged.steps] == ["b"]
    data["executor"] = "ssh"  # the plan's own fields damaged: nothing of it is trusted
    write_json(tmp_path / "plan.json", data)
    assert load_plan(tmp_path)[0] is None


@pytest.mark.parametrize(("key", "value", "expect"), [
    ("max_steps", 10**400, "steps[0].max_steps: "),
    ("max_steps", 0, "steps[0].max_steps: 0 is not a step count"),
    ("kind", "x" * 100_000, "steps[0].kind: expected one of"),
])
def test_a_plan_json_value_out_of_range_is_one_short_line(tmp_path: Path, key: str, value: object,
                                                          expect: str) -> None:
    from ftkit.plan.spec import Plan, PlanFormatError

    data = plan_of(tmp_path, step("a", "print(1)")).to_dict()
    data["steps"][0][key] = value
    with pytest.raises(PlanFormatError) as e:
        Plan.from_dict(data)
    assert str(e.value).startswith(expect) and len(str(e.value)) < 300
