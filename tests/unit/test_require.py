"""The tests of the real engines never skip silently in CI: `require` (tests/conftest.py) is
pytest.importorskip on a laptop and a failure under FTKIT_REQUIRE_ENGINES=1 (.ci/run sets it),
and `require_tool` fails for a missing docker-compose under FTKIT_REQUIRE_DOCKER=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, require, require_tool

MISSING = "ftkit_no_such_engine"


def test_a_missing_engine_skips_where_engines_are_not_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTKIT_REQUIRE_ENGINES", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(MISSING)
    assert require("json").__name__ == "json"


def test_a_missing_or_old_engine_fails_where_engines_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_REQUIRE_ENGINES", "1")
    with pytest.raises(pytest.fail.Exception, match=f"FTKIT_REQUIRE_ENGINES=1 but {MISSING} does not import"):
        require(MISSING)
    with pytest.raises(pytest.fail.Exception, match="older than 99"):
        require("pytest", minversion="99")
    assert require("pytest", minversion="1").__name__ == "pytest"


def test_a_missing_tool_fails_where_docker_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("FTKIT_REQUIRE_DOCKER", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool("docker-compose")
    monkeypatch.setenv("FTKIT_REQUIRE_DOCKER", "1")
    with pytest.raises(pytest.fail.Exception, match="FTKIT_REQUIRE_DOCKER=1 but docker-compose is not installed"):
        require_tool("docker-compose")


@pytest.mark.parametrize("required,code,says", [("0", 5, "1 skipped"), ("1", 2, "1 error")])
def test_a_module_level_require_fails_the_run_in_ci(tmp_path: Path, required: str, code: int, says: str) -> None:
    """As the engine test files use it (at import): the run fails, it does not pass green
    (5: pytest's "no tests ran", the file skipped; 2: a collection error)."""
    test = tmp_path / "test_needs_engine.py"
    test.write_text(f"from tests.conftest import require\n\nrequire({MISSING!r})\n\n\ndef test_x() -> None:\n    pass\n")
    env = {**os.environ, "FTKIT_REQUIRE_ENGINES": required, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == code and says in proc.stdout, proc.stdout + proc.stderr
