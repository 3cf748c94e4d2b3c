"""Broken recipes: every one gives exit 2 with FILE:LINE:COL: field: message, no traceback,
nothing written, and the python tag is never executed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, run_cli, run_ftkit

BROKEN = FIXTURES / "broken"
CASES = sorted(p.stem for p in BROKEN.glob("*.yaml"))
LINE_RE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")


def expectation(name: str) -> tuple[int, int | None, str, str]:
    where, message = (BROKEN / f"{name}.expect").read_text().splitlines()[:2]
    pos, path = where.split(" ", 1)
    line, col = pos.split(":")
    return int(line), int(col) if col else None, path, message


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("name", CASES)
def test_broken_recipe(name: str, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(BROKEN / f"{name}.yaml", work / "recipe.yaml")
    shutil.copy(BROKEN / "data.jsonl", work / "data.jsonl")
    before = sorted(p.name for p in work.iterdir())
    result = run_cli("validate", "recipe.yaml", cwd=work)
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert lines, "no error printed"
    parsed = [LINE_RE.match(ln) for ln in lines]
    assert all(parsed), f"not FILE:LINE:COL: field: message -> {lines}"
    line, col, path, message = expectation(name)
    hits = [m for m in parsed if m and m["path"] == path and int(m["line"]) == line]
    assert hits, f"expected {line}:{col} {path} in {lines}"
    if col is not None:
        assert any(int(m["col"]) == col for m in hits), lines
    assert any(message.lower() in m["msg"].lower() for m in hits), lines
    assert all(m["file"] == "recipe.yaml" for m in parsed if m)
    assert sorted(p.name for p in work.iterdir()) == before, "validate wrote something"


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = Path("/tmp/ftkit-pwned")
    marker.unlink(missing_ok=True)
    result = run_cli("validate", str(BROKEN / "python_tag.yaml"))
    assert result.code == 2
    assert not marker.exists()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


GENERATED = {
    "non_utf8": (b"ftkit: 1\nname: caf\xe9\n", "2:10", "not UTF-8"),
    "nul_byte": (b"ftkit: 1\nname: a\x00b\n", "2:", "NUL"),
    "alias_bomb": (
        b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + b"".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n".encode() for i in range(8)),
        "", "alias bomb",
    ),
    "recursive_alias": (b"a: &a\n  b: *a\n", "", "recursive"),
    "deep_nesting": (b"a: " + b"[" * 200 + b"]" * 200 + b"\n", "", "deeper"),
}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_malformed_files(name: str, tmp_path: Path) -> None:
    data, pos, message = GENERATED[name]
    path = _write(tmp_path, f"{name}.yaml", data)
    result = run_cli("validate", str(path))
    assert result.code == 2
    assert "Traceback" not in result.err
    line = result.err.strip().splitlines()[0]
    assert LINE_RE.match(line), line
    assert message.lower() in result.err.lower(), result.err
    if pos:
        assert f":{pos}" in line


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as fh:
        fh.write(b"ftkit: 1\n# " + b"x" * (2 << 20) + b"\n")
    result = run_cli("validate", str(path))
    assert result.code == 2
    assert "limit" in result.err and "Traceback" not in result.err


def test_directory_and_missing_path(tmp_path: Path) -> None:
    result = run_cli("validate", str(tmp_path), str(tmp_path / "nope.yaml"))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 2
    assert any("is a directory" in ln for ln in lines)
    assert any("no such file" in ln for ln in lines)


def test_all_errors_are_reported_together() -> None:
    """One invocation over the whole corpus reports every file, in the real CLI process."""
    files = [str(BROKEN / f"{n}.yaml") for n in CASES]
    proc = run_ftkit("validate", *files, cwd=BROKEN)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    reported = {Path(ln.split(":", 1)[0]).stem for ln in proc.stderr.splitlines() if ln.strip()}
    assert reported == set(CASES)


def test_machine_profile_errors_are_located(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("ftkit: 1\nkind: machine\nname: m\ngpus:\n  - {index: 0, model: RTX 4090}\n  - {index: 0, model: RTX 4090}\n"
                 "psu: {watts: 1500, safty_margin: 0.9}\n")
    result = run_cli("validate", str(p))
    assert result.code == 2
    assert "m.yaml:7:" in result.err and "did you mean 'safety_margin'" in result.err
