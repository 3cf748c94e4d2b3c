"""Issue #24: `ftkit up --resume` executes what plan.json says and writes into the run
directory, so it trusts only a run directory nobody but its owner can change: no group- or
world-writable directory, plan.json or state.json, no links, plan.json unchanged since the run
started (its sha256 in the journal), a plan whose types are right (an `argv` that is a string
used to pass `--dry-run`), and nothing written through a link planted in the tree. `ftkit
compose` does not write a stack's configs through a symlinked `run/` either.

Every refusal: exit 2, one line naming the file, no traceback, nothing written (neither in the
run directory nor where a link points). Runs are real but tiny (`python -c` steps, as in
test_runner). A run directory or file owned by another user is refused too (as root, as CI
runs: chowned to nobody; elsewhere those cases skip), and a journal that is not JSON ftkit reads
(deeply nested, a 100,000-digit integer, binary) is one line, as a FIFO is."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ftkit.files import open_append
from ftkit.run.rundir import RunDir, plan_digest
from tests.conftest import run_cli
from tests.unit.test_runner import execute, plan_of, step

Mutation = Callable[[Path, Path], None]  # (run directory, a directory outside it)


@pytest.fixture
def failed_run(tmp_path: Path) -> Path:
    """A run whose step b failed: resumable, with logs/a.log, logs/b.log and a journal."""
    gate = tmp_path / "gate"
    flaky = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(gate)!r}).exists() else 1)"
    result, _, st = execute(tmp_path, plan_of(tmp_path, step("a", "print('a ran')"), step("b", flaky)))
    assert result.status == "failed" and st["plan_sha256"]
    return tmp_path / "run"


def snapshot(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under root, links not followed: kind and content."""
    out: dict[str, tuple[str, bytes]] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", p.read_bytes())
            else:
                out[str(p.relative_to(root))] = (f"mode {st.st_mode:o}", b"")
    return out


def edit_plan(run: Path, change: Callable[[dict], None], *, redigest: bool) -> None:  # type: ignore[type-arg]
    """Rewrite plan.json; with `redigest` the journal's digest follows, so only the plan's
    own shape is what a resume can refuse."""
    plan = json.loads((run / "plan.json").read_text())
    change(plan)
    data = json.dumps(plan).encode()
    (run / "plan.json").write_bytes(data)
    if redigest:
        st = json.loads((run / "state.json").read_text())
        st["plan_sha256"] = plan_digest(data)
        (run / "state.json").write_text(json.dumps(st))


def _chmod(rel: str, mode: int) -> Mutation:
    return lambda run, _out: os.chmod(run / rel if rel else run, mode)


def _relink(rel: str) -> Mutation:
    """Move the file or directory `rel` outside and leave a symlink to it in its place."""
    def mutate(run: Path, out: Path) -> None:
        (run / rel).rename(out / "moved")
        (run / rel).symlink_to(out / "moved")
    return mutate


def _link(rel: str, *, directory: bool = False) -> Mutation:
    """A new symlink at `rel` pointing at a file or directory outside."""
    def mutate(run: Path, out: Path) -> None:
        target = out / "target"
        if directory:
            target.mkdir()
            (target / "keep").write_text("outside\n")
        else:
            target.write_text("outside\n")
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        if (run / rel).exists():
            (run / rel).unlink()
        (run / rel).symlink_to(target)
    return mutate


def _fifo(rel: str) -> Mutation:
    def mutate(run: Path, _out: Path) -> None:
        (run / rel).unlink()
        os.mkfifo(run / rel)
    return mutate


def _chown(rel: str) -> Mutation:
    """Give `rel` (the run directory itself when empty) to nobody: only root can."""
    def mutate(run: Path, _out: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root (CI runs these as root)")
        os.chown(run / rel if rel else run, NOBODY, NOBODY)
    return mutate


def _state_bytes(content: bytes) -> Mutation:
    """state.json's content replaced, the file itself (owner, mode) kept."""
    return lambda run, _out: (run / "state.json").write_bytes(content)


NOBODY = 65534


def _argv(value: object, *, index: int = 1) -> Mutation:
    def change(plan: dict) -> None:  # type: ignore[type-arg]
        plan["steps"][index]["argv"] = value
    return lambda run, _out: edit_plan(run, change, redigest=True)


def _step_field(key: str, value: object) -> Mutation:
    def change(plan: dict) -> None:  # type: ignore[type-arg]
        plan["steps"][1][key] = value
    return lambda run, _out: edit_plan(run, change, redigest=True)


def _edited_after_start(run: Path, _out: Path) -> None:
    def change(plan: dict) -> None:  # type: ignore[type-arg]
        plan["steps"][1]["argv"] = ["sh", "-c", "touch /tmp/ftkit-pwned"]
    edit_plan(run, change, redigest=False)


def _no_digest(run: Path, _out: Path) -> None:
    st = json.loads((run / "state.json").read_text())
    del st["plan_sha256"]
    (run / "state.json").write_text(json.dumps(st))


NODE = {"rank": 0, "name": "n0", "address": "n0", "argv": "torchrun train.py"}

# case id -> (mutation, what the one line must say, the file it must name)
CORPUS: dict[str, tuple[Mutation, str, str]] = {
    "run dir group-writable": (_chmod("", 0o775), "writable by its group", "run"),
    "run dir world-writable": (_chmod("", 0o757), "writable by others", "run"),
    "run dir 1777": (_chmod("", 0o1777), "writable by others", "run"),
    "plan.json group-writable": (_chmod("plan.json", 0o660), "writable by its group", "plan.json"),
    "plan.json world-writable": (_chmod("plan.json", 0o606), "writable by others", "plan.json"),
    "state.json world-writable": (_chmod("state.json", 0o666), "writable by others", "state.json"),
    "plan.json a symlink": (_relink("plan.json"), "a symbolic link", "plan.json"),
    "state.json a symlink": (_relink("state.json"), "a symbolic link", "state.json"),
    "state.json a FIFO": (_fifo("state.json"), "not a regular file", "state.json"),
    "state.json deeply nested": (_state_bytes(b"[" * 200_000), "not a journal this ftkit can resume", "state.json"),
    "state.json a huge integer": (_state_bytes(b'{"status": ' + b"9" * 100_000 + b"}"),
                                  "not a journal this ftkit can resume", "state.json"),
    "state.json binary": (_state_bytes(b"\xff\xfe\x00garbage"), "not a journal this ftkit can resume", "state.json"),
    "run dir owned by nobody": (_chown(""), f"owned by uid {NOBODY}, not by you", "run"),
    "plan.json owned by nobody": (_chown("plan.json"), f"owned by uid {NOBODY}, not by you", "plan.json"),
    "state.json owned by nobody": (_chown("state.json"), f"owned by uid {NOBODY}, not by you", "state.json"),
    "plan.json edited after start": (_edited_after_start, "plan.json changed since the run started", "plan.json"),
    "journal without the digest": (_no_digest, "records no digest of plan.json", "state.json"),
    "argv a string": (_argv("python -c 'print(1)'"), "steps[1].argv: expected a list of strings, got str",
                      "plan.json"),
    "argv with an integer": (_argv(["python", "-c", 1]), "steps[1].argv[2]: expected a string, got int", "plan.json"),
    "argv with null": (_argv(["python", None]), "steps[1].argv[1]: expected a string, got null", "plan.json"),
    "argv an object": (_argv({"0": "python"}), "steps[1].argv: expected a list of strings, got dict", "plan.json"),
    "node argv a string": (_step_field("nodes", [NODE]), "steps[1].nodes[0].argv: expected a list of strings",
                           "plan.json"),
    "env value a list": (_step_field("env", {"A": ["x"]}), "steps[1].env.A: expected a string", "plan.json"),
    "gpus with a bool": (_step_field("gpus", [True]), "steps[1].gpus[0]: expected an integer, got bool", "plan.json"),
    "step id with a path": (_step_field("id", "../../evil"), "steps[1].id: '../../evil' is not a step id",
                            "plan.json"),
    "generated file outside": (_step_field("files", [{"path": "../../evil.txt", "content": "x"}]),
                               "is not a path inside the run directory", "plan.json"),
    "output outside": (_step_field("outputs", {"responses": "/tmp/evil.jsonl"}),
                       "is not a path inside the run directory", "plan.json"),
    "steps not a list": (lambda run, _o: edit_plan(run, lambda p: p.update(steps="a"), redigest=True),
                         "steps: expected a non-empty list", "plan.json"),
    "symlinked log file": (_link("logs/b.log"), "a symbolic link in the run directory", "b.log"),
    "symlinked new log file": (_link("logs/ftkit.log"), "a symbolic link in the run directory", "ftkit.log"),
    "symlinked logs dir": (_relink("logs"), "a symbolic link in the run directory", "logs"),
    "symlinked step dir": (_link("steps/b", directory=True), "a symbolic link in the run directory", "steps/b"),
    "symlinked result file": (_link("steps/serve/responses.jsonl"), "a symbolic link in the run directory",
                              "responses.jsonl"),
    "symlinked generated config": (_link("configs", directory=True), "a symbolic link in the run directory",
                                   "configs"),
    "symlinked owner lock": (_link(".owner.lock"), "a symbolic link in the run directory", ".owner.lock"),
    "FIFO as a log": (_fifo("logs/b.log"), "not a regular file or directory", "b.log"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dry_run", [False, True], ids=["resume", "dry-run"])
@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_run_directories_are_refused(failed_run: Path, tmp_path: Path, case: str, dry_run: bool) -> None:
    mutate, says, names = CORPUS[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    mutate(failed_run, outside)
    run_before, outside_before = snapshot(failed_run), snapshot(outside)
    try:
        result = run_cli("up", "--resume", str(failed_run), *(["--dry-run"] if dry_run else []))
    finally:
        os.chmod(failed_run, 0o755)  # pytest must be able to remove it
    assert result.code == 2, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert says in lines[0] and names in lines[0], lines[0]
    assert result.out == ""  # not even the plan is shown
    assert snapshot(failed_run) == run_before, "the refused resume wrote into the run directory"
    assert snapshot(outside) == outside_before, "the refused resume wrote outside the run directory"
    assert not Path("/tmp/ftkit-pwned").exists()


def test_an_untouched_run_still_resumes(failed_run: Path, tmp_path: Path) -> None:
    """The control: the run directory ftkit made passes every check, and the digest stays."""
    digest = json.loads((failed_run / "state.json").read_text())["plan_sha256"]
    assert digest == plan_digest((failed_run / "plan.json").read_bytes())
    assert stat.S_IMODE(os.stat(failed_run).st_mode) & 0o022 == 0  # made 0755 whatever the umask
    assert stat.S_IMODE(os.stat(failed_run / "plan.json").st_mode) & 0o022 == 0
    dry = run_cli("up", "--resume", str(failed_run), "--dry-run")
    assert dry.code == 0, dry.err
    (tmp_path / "gate").write_text("")
    result = run_cli("up", "--resume", str(failed_run), "-q")
    assert result.code == 0, result.err
    st = json.loads((failed_run / "state.json").read_text())
    assert st["status"] == "succeeded" and st["plan_sha256"] == digest and len(st["resumes"]) == 1


def test_run_directories_are_made_owner_writable_only(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a user-private-group umask would make them group-writable
    try:
        execute(tmp_path, plan_of(tmp_path, step("a", "print(1)")))
    finally:
        os.umask(old)
    for rel in ("", "logs"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / rel).st_mode) == 0o755, rel
    # the run's own files are written before the runner narrows the umask: 0644 all the same
    for rel in ("plan.json", "state.json", "env.json", "command.txt", "recipe.resolved.yaml"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / rel).st_mode) == 0o644, rel


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_run_directorys_files_follow_the_umask_but_are_never_writable_by_others(tmp_path: Path,
                                                                                     umask: int) -> None:
    """One rule: a file ftkit writes is 0666 less the umask (mkstemp's 0600 was the odd one
    out); a run's own files (what a resume trusts) are 0644 less the umask."""
    from ftkit.files import write_atomic

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "report.md", "# r\n")
        run = RunDir(tmp_path)
        run.write_inputs({"name": "r"}, {"steps": []}, ["ftkit", "up"], {})
        run.write("configs/a.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "report.md").st_mode) == 0o666 & ~umask
    for rel in ("plan.json", "env.json", "command.txt", "recipe.resolved.yaml", "configs/a.yaml"):
        assert stat.S_IMODE(os.stat(tmp_path / rel).st_mode) == 0o644 & ~umask, rel
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_an_atomic_write_replaces_a_planted_link_and_never_writes_through_it(tmp_path: Path) -> None:
    from ftkit.files import write_atomic

    outside = tmp_path / "outside"
    outside.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.md").symlink_to(outside)
    write_atomic(tmp_path / "run" / "report.md", "new\n")
    assert outside.read_text() == "keep me\n"
    assert not (tmp_path / "run" / "report.md").is_symlink() and (tmp_path / "run" / "report.md").read_text() == "new\n"


def test_logs_are_never_opened_through_a_link_or_a_fifo(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("outside\n")
    (tmp_path / "link.log").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        open_append(tmp_path / "link.log")
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(OSError, match="not a regular file"):  # and no hang waiting for a reader
        open_append(tmp_path / "fifo.log")
    assert target.read_text() == "outside\n"
    with open_append(tmp_path / "new.log") as fh:
        fh.write("ok\n")
    assert (tmp_path / "new.log").read_text() == "ok\n"


def test_the_run_writes_nothing_through_a_linked_directory(tmp_path: Path) -> None:
    """Inside a run (not only at resume): a generated file or result whose directory is a link
    is refused; a path leaving the run directory is refused."""
    from ftkit.errors import FtkitError

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (run.path / "configs").symlink_to(outside)
    with pytest.raises(FtkitError, match="configs"):
        run.write("configs/train.json", "{}")
    with pytest.raises(FtkitError, match="not a path inside"):
        run.file("../escape")
    (run.path / "logs").symlink_to(outside)
    with pytest.raises(FtkitError, match="logs"):
        run.log("train")
    run.write("steps/serve/responses.jsonl", "x\n")
    assert (run.path / "steps/serve/responses.jsonl").read_text() == "x\n"
    assert list(outside.iterdir()) == []


# -- ftkit compose: a stack's run/ that is a link ---------------------------------------------


@pytest.mark.parametrize("linked", ["run", "run/configs"])
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_compose_refuses_a_symlinked_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: str,
                                             force: bool) -> None:
    from tests.unit.test_compose import _recipe, compose

    monkeypatch.delenv("FTKIT_LEASE_DIR", raising=False)
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    recipe, machine = _recipe(tmp_path)
    out = tmp_path / "stack"
    first = compose(str(recipe), str(machine), out)
    assert first.code == 0, first.err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / linked).rename(tmp_path / "old")
    (out / linked).symlink_to(elsewhere)
    before = snapshot(out)
    for dry in ([], ["--dry-run"]):
        result = compose(str(recipe), str(machine), out, *(["--force"] if force else []), *dry)
        assert result.code == 2, (result.out, result.err)
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.err, result.err
        assert f"{linked}: a symbolic link" in lines[0]
    assert list(elsewhere.iterdir()) == []
    assert snapshot(out) == before


def test_a_step_directory_others_may_write_is_refused_on_resume(tmp_path: Path) -> None:
    """A group member could have planted a link inside it after the last check."""
    from ftkit.run.rundir import first_link

    root = tmp_path / "r"
    (root / "steps" / "train").mkdir(parents=True)
    os.chmod(root / "steps" / "train", 0o775)
    assert first_link(root) == root / "steps" / "train"
    os.chmod(root / "steps" / "train", 0o755)
    assert first_link(root) is None
