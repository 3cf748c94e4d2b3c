"""The lease directory is shared: anyone who may write it may put anything there
(docs/lease-security.md). A hostile corpus of what a local user can leave in `parties/` and
in place of a lock file, and of what ftkit's machine-wide power record can hold. Nothing
hangs (every case runs as a real process under a timeout), nothing prints a traceback,
what is not a record is skipped with a note, and what a record says is shown escaped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

PY = sys.executable
TIMEOUT = 30

# Holds an exclusive flock on PATH (so readers take the file as a live party's record), then
# sleeps until killed.
HOLDER = r'''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
time.sleep(120)
'''


@pytest.fixture
def lease_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FTKIT_SIMULATED", "NVIDIA_", "FTKIT_LEASE", "FTKIT_SERVICE"))}
    env["FTKIT_LEASE_DIR"] = str(tmp_path / "lease")
    (tmp_path / "lease" / "parties").mkdir(parents=True)
    return env


def parties(env: dict[str, str]) -> Path:
    return Path(env["FTKIT_LEASE_DIR"]) / "parties"


def lease(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "ftkit", "lease", *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def held(path: Path, content: bytes) -> subprocess.Popen[str]:
    with open(path, "ab") as fh:
        fh.write(content)
    proc = subprocess.Popen([PY, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def clean(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "\x1b" not in result.stderr + result.stdout


# -- things that are not records at all ----------------------------------------------------


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _link_to_dev_zero(p: Path) -> None:
    os.symlink("/dev/zero", p)


def _link_to_a_file(p: Path) -> None:
    target = p.parent.parent.parent / "elsewhere.json"
    target.write_text(json.dumps({"id": "x", "role": "train", "state": "holding"}) + "\n")
    os.symlink(target, p)


def _directory(p: Path) -> None:
    p.mkdir()


def _socket(p: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))  # left bound: the file stays a socket


NOT_RECORDS = {"fifo": (_fifo, "FIFO"), "symlink to /dev/zero": (_link_to_dev_zero, "symlink"),
               "symlink to a record": (_link_to_a_file, "symlink"), "directory": (_directory, "directory"),
               "unix socket": (_socket, "socket")}


@pytest.mark.parametrize("name", sorted(NOT_RECORDS))
@pytest.mark.parametrize("where", ["evil.json", ".tmp-evil"])
def test_what_is_not_a_record_is_skipped_without_blocking(lease_env: dict[str, str], name: str, where: str) -> None:
    make, kind = NOT_RECORDS[name]
    path = parties(lease_env) / where
    make(path)
    if where.startswith(".tmp-"):  # a creator's temporary file is looked at after a minute
        os.utime(path, (time.time() - 600, time.time() - 600), follow_symlinks=False)
    started = time.monotonic()
    show = lease(lease_env, "--show")
    clean(show)
    assert show.returncode == 0 and "nobody holds or waits for a GPU" in show.stdout, show.stderr
    if where == "evil.json":
        assert f"skipping {path}" in show.stderr and kind in show.stderr, show.stderr
        assert len([ln for ln in show.stderr.splitlines() if "evil" in ln]) == 1  # one note per file
    took = lease(lease_env, "--gpus", "0", "--no-wait", "--", PY, "-c", "print('ran')")
    clean(took)
    assert took.returncode == 0 and "ran" in took.stdout, took.stderr
    assert time.monotonic() - started < TIMEOUT
    assert os.path.lexists(path)  # another user's file: not ours to remove, whatever it is


def test_a_fifo_in_place_of_a_lock_file_is_refused_in_one_line(lease_env: dict[str, str]) -> None:
    os.mkfifo(Path(lease_env["FTKIT_LEASE_DIR"]) / "gpu-0.lock")
    result = lease(lease_env, "--gpus", "0", "--no-wait", "--", PY, "-c", "print('ran')")
    clean(result)
    assert result.returncode == 2 and "ran" not in result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "cannot use lock file gpu-0.lock" in lines[0] and "not a regular file" in lines[0], result.stderr


def test_a_symlinked_lock_file_is_not_followed(lease_env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    os.symlink(target, Path(lease_env["FTKIT_LEASE_DIR"]) / "gpu-0.lock")
    result = lease(lease_env, "--gpus", "0", "--no-wait", "--", PY, "-c", "print('ran')")
    clean(result)
    assert result.returncode == 2 and "gpu-0.lock" in result.stderr
    assert target.read_text() == "keep me\n" and oct(target.stat().st_mode & 0o777) != oct(0o666)


# -- live records someone else wrote ----------------------------------------------------------

GOOD = {"id": "evil-1", "role": "train", "state": "holding", "pid": 1, "host": "box", "since": "2026-12-04T08:00:00Z",
        "started": "2026-12-04T08:00:00Z", "gpus": [{"index": 0}], "locks": ["gpu-0.lock"], "command": ["python"]}

HOSTILE_CONTENT = {
    "binary": b"\x00\xff\xfe garbage \x80\n",
    "deep nesting": b"[" * 200_000 + b"\n",
    "huge integer": b'{"pid": ' + b"9" * 100_000 + b"}\n",
    "60 MB line": None,  # written sparse below
    "a list": b"[1, 2, 3]\n",
    "status a list": (json.dumps({**GOOD, "state": ["holding"]}) + "\n").encode(),
    "pid a string": (json.dumps({**GOOD, "pid": "x"}) + "\n").encode(),
    "gpus a string": (json.dumps({**GOOD, "gpus": "0"}) + "\n").encode(),
    "command of numbers": (json.dumps({**GOOD, "command": [1, 2]}) + "\n").encode(),
    "pid out of range": (json.dumps({**GOOD, "pid": 1 << 80}) + "\n").encode(),
    "no newline yet": json.dumps(GOOD).encode(),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONTENT))
def test_a_live_file_that_is_no_record_is_skipped(lease_env: dict[str, str], case: str) -> None:
    path = parties(lease_env) / "evil.json"
    content = HOSTILE_CONTENT[case]
    if content is None:
        with open(path, "wb") as fh:
            fh.truncate(60 << 20)
        content = b""
    proc = held(path, content)
    try:
        show = lease(lease_env, "--show")
        clean(show)
        assert show.returncode == 0 and "nobody holds or waits for a GPU" in show.stdout
        assert f"skipping {path}" in show.stderr, show.stderr
        js = lease(lease_env, "--show", "--json")
        clean(js)
        assert js.returncode == 0 and json.loads(js.stdout)["parties"] == []
    finally:
        proc.kill()
        proc.wait()


def test_terminal_escapes_in_a_record_are_shown_escaped(lease_env: dict[str, str]) -> None:
    record = {**GOOD, "role": "train\x1b]0;pwned\x07", "state": "holding\x1b[2J", "host": "box\nGPU 1 free",
              "command": ["rm\x1b[8m", "-rf"], "gpus": [{"index": "0\x1b[31m"}], "service": "svc\u202e"}
    proc = held(parties(lease_env) / "evil.json", (json.dumps(record) + "\n").encode())
    try:
        show = lease(lease_env, "--show")
        clean(show)
        assert show.returncode == 0 and "\\x1b" in show.stdout and "\\u202e" in show.stdout, show.stdout
        rows = [ln for ln in show.stdout.splitlines() if "evil" in ln or "box" in ln]
        assert len(rows) == 1 and "\\n" in rows[0]  # the record stays on one line
        assert "user " not in rows[0]  # the file's owner is us
    finally:
        proc.kill()
        proc.wait()


def test_the_owner_shown_is_the_files_not_the_records(lease_env: dict[str, str]) -> None:
    from ftkit.lease import holders

    record = {**GOOD, "uid": 0}
    proc = held(parties(lease_env) / "evil.json", (json.dumps(record) + "\n").encode())
    try:
        (party,) = holders(lease_env["FTKIT_LEASE_DIR"])
        assert party.uid == os.getuid()
    finally:
        proc.kill()
        proc.wait()


# -- who may write the directory -----------------------------------------------------------


def test_parties_is_no_more_open_than_the_lease_directory(tmp_path: Path) -> None:
    from ftkit.lease import ensure_lease_dir

    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    ensure_lease_dir(d)
    mode = (d / "parties").stat().st_mode & 0o7777
    assert mode & 0o077 == 0 and mode & 0o1000, oct(mode)


# -- ftkit's machine-wide power record ---------------------------------------------------------

BAD_ORIGINALS = {
    "not UTF-8": (b'{"gpus": {"GPU-1": {"original_w": 450, "note": "\xff\xfe"}}}', "not UTF-8"),
    "deep nesting": (b"[" * 200_000, "nested too deep"),
    "truncated": (b'{"gpus": {"GPU-1": {"orig', "unreadable"),
    "a list": (b"[]", "not a record of power limits"),
}


@pytest.mark.parametrize("case", sorted(BAD_ORIGINALS))
def test_a_damaged_originals_record_is_one_line_naming_it(sim: Path, case: str) -> None:
    from ftkit.gpu import power

    content, why = BAD_ORIGINALS[case]
    path = power.originals_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    for args in (("power", "restore"), ("power", "show")):
        result = run_cli(*args)
        assert result.code != 0 and "Traceback" not in result.err, (args, result.err)
        lines = [ln for ln in result.err.splitlines() if ln.strip()]
        assert str(path) in lines[0] and why in lines[0], (args, result.err)


@pytest.mark.parametrize("case", sorted(BAD_ORIGINALS))
def test_up_with_a_damaged_originals_record_names_it_and_caps_nothing(sim: Path, tmp_path: Path, case: str) -> None:
    """`ftkit up` (a power step on two simulated GPUs; a model directory, so no tiny-model
    step runs first): the power step fails in one line naming the record and why (it used to
    be "internal error: UnicodeDecodeError" for bytes that are not UTF-8), the closing line
    says the same, no traceback, no GPU capped."""
    from ftkit.gpu import power
    from tests.conftest import RECIPES, limits

    content, why = BAD_ORIGINALS[case]
    path = power.originals_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text((RECIPES / "data" / "quickstart-train.jsonl").read_text())
    (tmp_path / "model").mkdir()
    machine = tmp_path / "machine.yaml"
    machine.write_text("ftkit: 1\nkind: machine\nname: sim\nexecutor: local\npsu: {watts: 1500}\n"
                       "gpus:\n  - {index: 0, model: RTX 4090}\n  - {index: 1, model: RTX 3090 Ti}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ftkit: 1\nname: caps\nmodel: {path: model}\n"
                      "dataset: {path: data/train.jsonl, format: alpaca, template: alpaca}\n"
                      "steps:\n  - {type: power, caps_w: 300}\n")
    result = run_cli("up", str(recipe), "--machine", str(machine), "--runs-dir", str(tmp_path / "runs"), "-q")
    assert result.code == 1 and "Traceback" not in result.err + result.out, result.err
    assert "internal error" not in result.err and "UnicodeDecodeError" not in result.err
    failed = [ln for ln in result.err.splitlines() if "FAILED" in ln or "failed at step" in ln]
    assert failed and all(str(path) in ln and why in ln for ln in failed), result.err
    assert any("failed at step power" in ln for ln in failed), result.err
    assert 300 not in (limits(sim) if sim.exists() else [])  # nothing capped
    assert path.read_bytes() == content  # the record is left for a person to look at


def test_a_fifo_in_place_of_the_originals_record_does_not_hang(sim: Path) -> None:
    from ftkit.gpu import power

    path = power.originals_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    env = {**os.environ}
    result = subprocess.run([PY, "-m", "ftkit", "power", "restore"], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "FIFO" in result.stderr, result.stderr
