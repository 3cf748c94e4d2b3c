"""ftkit's own files, read back from a directory or a snapshot anyone could hand over:
`ftkit report` on a damaged run directory, `ftkit doctor --compare` on hostile snapshots, and
the JSON reader under both. Nothing hangs (FIFOs, /dev/zero), nothing prints a traceback
(deep nesting, 100,000-digit integers, binary, wrong types), values reach the terminal
escaped. Each case runs in a subprocess under a timeout, where a hang would show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit.files import UnreadableJson, UnsafeFile, read_json
from tests.unit.test_report import make_run

PY = sys.executable
TIMEOUT = 60


def ftkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "ftkit", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False,
                          cwd=cwd)


# -- the reader ------------------------------------------------------------------------------

READER_CASES = {
    "deep nesting": (b"[" * 200_000, UnreadableJson, "nested too deep"),
    "huge integer": (b'{"n": ' + b"9" * 100_000 + b"}", UnreadableJson, "not JSON ftkit reads"),
    "binary": (b"\xff\xfe\x00garbage", UnreadableJson, "not UTF-8"),
    "truncated": (b'{"status": "runn', UnreadableJson, "not JSON"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_the_reader_turns_every_bad_file_into_one_error(tmp_path: Path, case: str) -> None:
    content, error, words = READER_CASES[case]
    p = tmp_path / "f.json"
    p.write_bytes(content)
    with pytest.raises(error, match=words):
        read_json(p)


def test_the_reader_never_blocks_or_follows_links(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFile, match="FIFO"):
        read_json(fifo)
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(UnsafeFile, match="symlink"):
        read_json(link)
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(2 << 20)
    with pytest.raises(UnsafeFile, match="more than"):
        read_json(big, max_bytes=1 << 20)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


# -- ftkit report on a damaged run directory ---------------------------------------------------


def _fifo(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.mkfifo(p)


def _link_zero(p: Path) -> None:
    p.unlink(missing_ok=True)
    p.symlink_to("/dev/zero")


def _edit(name: str, change) -> object:  # type: ignore[no-untyped-def]
    def apply(run: Path) -> None:
        p = run / name
        data = json.loads(p.read_text())
        change(data)
        p.write_text(json.dumps(data))
    return apply


def _models_list(d: dict) -> None:  # type: ignore[type-arg]
    d["models"] = [1, 2]


def _status_list(d: dict) -> None:  # type: ignore[type-arg]
    d["status"] = ["succeeded"]


def _steps_list(d: dict) -> None:  # type: ignore[type-arg]
    d["steps"] = ["train"]


def _order_numbers(d: dict) -> None:  # type: ignore[type-arg]
    d["order"] = [1, 2]


def _plan_steps_object(d: dict) -> None:  # type: ignore[type-arg]
    d["steps"] = {"id": "train"}


def _plan_outputs_list(d: dict) -> None:  # type: ignore[type-arg]
    d["steps"][1]["outputs"] = ["steps/train/metrics.jsonl"]


def _metrics_lines(lines: list[bytes]):  # type: ignore[no-untyped-def]
    def apply(run: Path) -> None:
        with open(run / "steps" / "train" / "metrics.jsonl", "ab") as fh:
            fh.write(b"\n".join(lines) + b"\n")
    return apply


REPORT_CASES = {
    "state.json a FIFO": lambda run: _fifo(run / "state.json"),
    "plan.json a link to /dev/zero": lambda run: _link_zero(run / "plan.json"),
    "env.json a FIFO": lambda run: _fifo(run / "env.json"),
    "metrics.jsonl a FIFO": lambda run: _fifo(run / "steps" / "train" / "metrics.jsonl"),
    "eval summary a FIFO": lambda run: _fifo(run / "steps" / "eval" / "summary.json"),
    "recipe a FIFO": lambda run: _fifo(run / "recipe.resolved.yaml"),
    "telemetry a FIFO": lambda run: _fifo(run / "telemetry.csv"),
    "state.json deeply nested": lambda run: (run / "state.json").write_bytes(b"[" * 200_000),
    "state.json a huge integer": lambda run: (run / "state.json").write_bytes(b'{"pid": ' + b"9" * 100_000 + b"}"),
    "state.json binary": lambda run: (run / "state.json").write_bytes(b"\x00\xff\xfe"),
    "status a list": _edit("state.json", _status_list),
    "steps a list": _edit("state.json", _steps_list),
    "order of numbers": _edit("state.json", _order_numbers),
    "plan steps an object": _edit("plan.json", _plan_steps_object),
    "plan outputs a list": _edit("plan.json", _plan_outputs_list),
    "models a list": _edit("steps/eval/summary.json", _models_list),
    "metrics step a string": _metrics_lines([b'{"step": "x", "loss": 1.0}']),
    "metrics binary and deep lines": _metrics_lines([b"\xff\xfe", b"[" * 100_000, b'{"step": ' + b"9" * 100_000 + b"}",
                                                     b"[1, 2]", b'{"step": 3, "loss": 0.5}']),
    "recipe with an alias bomb": lambda run: (run / "recipe.resolved.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nsteps: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"),
    "recipe steps of strings": lambda run: (run / "recipe.resolved.yaml").write_text("steps: [a, b]\n"),
    "telemetry with a huge field": lambda run: (run / "telemetry.csv").write_text("gpu,x\n0," + "y" * 200_000 + "\n"),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_of_a_damaged_run_renders_and_names_what_it_left_out(tmp_path: Path, case: str) -> None:
    run = make_run(tmp_path)
    REPORT_CASES[case](run)
    result = ftkit("report", str(run), "-o", str(tmp_path / "out"))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Problems" in html or "unreadable" in html or "left out" in html or "line" in html, case


# -- ftkit doctor --compare on hostile snapshots ------------------------------------------------

SNAP = {"ftkit_doctor": 1, "host": "a", "python": "3.11.9", "ftkit": "0.1", "packages": {"torch": "2.13.0"},
        "images": {}, "images_lock": {}, "dist_env": {}, "gpus": []}

SNAPSHOT_CASES = {
    "packages a list": ({**SNAP, "packages": ["torch"]}, "packages is list"),
    "images of strings": ({**SNAP, "images": {"train/cuda": "x"}}, "images is dict"),
    "gpus an object": ({**SNAP, "gpus": {"name": "x"}}, "gpus is dict"),
    "python an object": ({**SNAP, "python": {"v": 1}}, "python is dict"),
    "dist_env of lists": ({**SNAP, "dist_env": {"NCCL_DEBUG": [1]}}, "dist_env is dict"),
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_compare_refuses_a_snapshot_of_the_wrong_shape_in_one_line(tmp_path: Path, case: str) -> None:
    data, words = SNAPSHOT_CASES[case]
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(json.dumps(data))
    good.write_text(json.dumps(SNAP))
    result = ftkit("doctor", "--compare", str(bad), str(good))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert str(bad) in lines[0] and words in lines[0], result.stderr


@pytest.mark.parametrize("content", [b"[" * 200_000, b'{"ftkit_doctor": ' + b"1" * 100_000 + b"}", b"\xff\xfe"],
                         ids=["deep", "huge integer", "binary"])
def test_compare_refuses_what_is_not_json_in_one_line(tmp_path: Path, content: bytes) -> None:
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_bytes(content)
    good.write_text(json.dumps(SNAP))
    result = ftkit("doctor", "--compare", str(bad), str(good))
    assert result.returncode == 2 and "Traceback" not in result.stderr and str(bad) in result.stderr, result.stderr


def test_compare_of_a_fifo_and_dev_zero_does_not_hang(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SNAP))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for bad in (fifo, Path("/dev/zero")):
        result = ftkit("doctor", "--compare", str(bad), str(good))
        assert result.returncode == 2 and "Traceback" not in result.stderr and str(bad) in result.stderr, result.stderr


def test_compare_shows_snapshot_values_escaped(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**SNAP, "host": "box\x1b]0;pwned\x07", "packages": {"torch": "2.13.0\x1b[2J"}}))
    b.write_text(json.dumps({**SNAP, "packages": {"torch\nfake line": "1", "torch": "2.0"}}))
    result = ftkit("doctor", "--compare", str(a), str(b))
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b" in result.stdout
    assert "torch\\nfake line" in result.stdout and "\nfake line" not in result.stdout


def test_compare_follows_a_link_the_user_names(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SNAP))
    link = tmp_path / "baseline.json"
    link.symlink_to(good)
    result = ftkit("doctor", "--compare", str(link), str(good))
    assert result.returncode == 0 and "no drift" in result.stdout, result.stderr


def test_a_group_shared_lease_directory_gives_parties_its_group(tmp_path: Path) -> None:
    from ftkit.lease import ensure_lease_dir

    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o2775)
    ensure_lease_dir(d)
    st = (d / "parties").stat()
    assert st.st_gid == d.stat().st_gid and st.st_mode & 0o7777 == 0o3775, oct(st.st_mode)


STATUS_CASES = {
    "status a list": {"status": ["running"]},
    "order of numbers": {"order": [1, 2]},
    "a step entry a string": {"steps": {"train": "done"}},
    "error a list": {"steps": {"train": {"status": "failed", "error": ["x"]}}, "order": ["train"]},
    "left_running an object": {"left_running": {"a": 1}},
    "escapes": {"status": "failed\x1b[2J", "steps": {"t\x1b]0;x\x07": {"status": "ok\u202e", "error": "boom\x1b[31m"}},
                "order": ["t\x1b]0;x\x07"]},
}


@pytest.mark.parametrize("case", sorted(STATUS_CASES))
def test_status_of_a_hostile_journal_is_escaped_and_never_a_traceback(tmp_path: Path, case: str) -> None:
    run = tmp_path / "runs" / "20260101T000000Z-x"
    run.mkdir(parents=True)
    base = {"status": "failed", "started": "2026-01-01T00:00:00Z", "steps": {"train": {"status": "failed"}},
            "order": ["train"]}
    (run / "state.json").write_text(json.dumps({**base, **STATUS_CASES[case]}))
    (run / "plan.json").write_text(json.dumps({"lease_dir": ["not", "a", "path"]}))
    result = ftkit("status", str(run))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 2) and "\x1b" not in result.stdout + result.stderr
    if case == "escapes":
        assert "\\x1b" in result.stdout and "\\u202e" in result.stdout


JOURNALS = {
    "FIFO": None,
    "deep nesting": b"[" * 200_000,
    "huge integer": b'{"status": ' + b"9" * 100_000 + b"}",
    "binary": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("by", ["path", "latest"])
@pytest.mark.parametrize("case", sorted(JOURNALS))
def test_status_of_an_unreadable_journal_is_one_line_naming_it(tmp_path: Path, case: str, by: str) -> None:
    """A FIFO (never opened blocking), deep nesting, a 100,000-digit integer, binary: one line
    naming state.json, exit 2, whether the run is named or found as the newest (a directory
    whose journal is not a regular file is no run to find: "no runs under" it says then)."""
    root = tmp_path / "runs"
    run = root / "20260101T000000Z-x"
    run.mkdir(parents=True)
    (run / "plan.json").write_text("{}")
    content = JOURNALS[case]
    if content is None:
        os.mkfifo(run / "state.json")
    else:
        (run / "state.json").write_bytes(content)
    result = ftkit("status", str(run)) if by == "path" else ftkit("status", "--runs-dir", str(root))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    if content is None and by == "latest":
        assert lines[0] == f"no runs under {root}/", result.stderr
        return
    assert len(lines) == 1 and lines[0].startswith(f"{run / 'state.json'}: "), result.stderr


@pytest.mark.parametrize("content", ["[1, 2]", "42", '"running"', "null"])
def test_down_of_a_journal_that_is_json_but_no_object_is_no_traceback(tmp_path: Path, content: str) -> None:
    """state.json a JSON list, number, string or null: read as no journal (`ftkit down` reads it
    through stale.state_of), never a TypeError."""
    from ftkit.run.stale import state_of

    run = tmp_path / "runs" / "20260101T000000Z-x"
    run.mkdir(parents=True)
    (run / "state.json").write_text(content)
    assert state_of(run) == {}
    result = ftkit("down", str(run))
    assert "Traceback" not in result.stderr and result.returncode in (0, 2), result.stderr
