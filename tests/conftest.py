"""Shared fixtures. Tests that need a Docker engine carry the `docker` marker: they skip
with a reason where none is reachable, and fail instead when FTKIT_REQUIRE_DOCKER=1 (CI).
Tests of the real engines import them with `require("trl")` (not pytest.importorskip): a skip
where one is missing, a failure when FTKIT_REQUIRE_ENGINES=1 (CI installs ftkit[train,dev],
so a skip there is a test that silently never ran); `require_tool("docker-compose")` likewise
under FTKIT_REQUIRE_DOCKER=1."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("FTKIT_UPDATE_GOLDEN") == "1"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """Run `ftkit ARGS` in this process (fast) and capture exit code and output."""
    from ftkit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        os.chdir(old)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_ftkit(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ftkit", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def require(module: str, minversion: str | None = None) -> ModuleType:
    """`pytest.importorskip(module)`, except that with FTKIT_REQUIRE_ENGINES=1 a module that
    does not import (or is older than `minversion`) fails: the test, or at module level the
    collection of its file (and so the run)."""
    if os.environ.get("FTKIT_REQUIRE_ENGINES") != "1":
        return pytest.importorskip(module, minversion=minversion)
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        why = f"{e.__class__.__name__}: {e}"
    else:
        why = None
    if why is not None:  # outside the handler: one line, no chained traceback
        missing(f"{module} does not import ({why}): pip install -e '.[train,dev]'")
    if minversion is not None:
        from packaging.version import Version

        have = getattr(mod, "__version__", None)
        if have is None or Version(str(have)) < Version(minversion):
            missing(f"{module} {have} is older than {minversion}")
    return mod


def missing(reason: str, env: str = "FTKIT_REQUIRE_ENGINES") -> NoReturn:
    """Skip for `reason`, or fail when `env` is 1 (CI, where what is missing must be there)."""
    if os.environ.get(env) == "1":
        pytest.fail(f"{env}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, env: str = "FTKIT_REQUIRE_DOCKER") -> str:
    """The path of the command `name`: a skip where it is not installed, a failure when
    `env` is 1 (CI installs it)."""
    exe = shutil.which(name)
    if exe is None:
        missing(f"{name} is not installed", env)
    return exe


def run_label(run: Path) -> str:
    """The `dev.ftkit.run` label of a run's containers, as its plan.json gave them (the label
    is the run directory's name plus a digest of its path: see ftkit.plan.spec.run_label)."""
    import json

    from ftkit.plan.spec import run_label as label_of

    try:
        steps = json.loads((run / "plan.json").read_text())["steps"]
        return next(s["labels"]["dev.ftkit.run"] for s in steps if s.get("labels", {}).get("dev.ftkit.run"))
    except (OSError, ValueError, KeyError, StopIteration):
        return label_of(str(run))


def check_golden(path: Path, actual: str) -> None:
    """Compare with a golden file; FTKIT_UPDATE_GOLDEN=1 rewrites it."""
    if UPDATE_GOLDEN or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        if not UPDATE_GOLDEN:
            pytest.fail(f"golden file {path.name} did not exist; wrote it - review and commit")
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, f"{path.name} differs from the golden file (FTKIT_UPDATE_GOLDEN=1 to accept)"


def _docker_reason() -> str | None:
    try:
        from ftkit.gateways import docker as dk

        if not dk.reachable():
            return "no Docker engine reachable"
        if dk.image_attrs(os.environ.get("FTKIT_TEST_BASE_IMAGE", "ftkit-test/bookworm-python:latest")) is None:
            return "the local base image is missing (bash .ci/run makes it: debootstrap + docker import)"
    except Exception as e:  # noqa: BLE001
        return f"Docker check failed: {e}"
    return None


# -- two workers (pytest-xdist) -----------------------------------------------------------------
# The suite runs in two worker processes (`-n 2 --dist loadfile` in pyproject.toml: a file's
# tests, and so its module fixtures, stay on one worker; `-n 0` runs it in one process). What
# they would otherwise share:
# - the CPU images: built once for the whole run under a file lock in the run's shared
#   directory (FTKIT_TEST_SHARED), removed when the run ends (`pytest_sessionfinish` below);
# - ports: tests pick free ones, and a file's fixed ports (the quickstart's 8765) stay with it;
# - the two cores: every process of the run (and every engine it starts on the host) computes
#   with one OpenMP thread (OMP_NUM_THREADS=1 unless set): the tiny models train as fast on
#   one, and two workers' engines each spinning two threads on two cores ran the quickstart at
#   half speed (85 s for two at once, 50 s with one thread each; one alone: 44 s either way);
# - the lease and the power record: every test that takes a lease or sets a power limit names
#   its own FTKIT_LEASE_DIR / FTKIT_STATE_DIR (the `sim` fixture, tests/e2e/faultkit.py), so a
#   server one test leaves on simulated GPU 0 is never asked to yield by another's training.
SHARED_ENV = "FTKIT_TEST_SHARED"
# The longest files first, so that none of them starts last and ends alone (`--no-loadscope-reorder`
# keeps this order instead of xdist's by-number-of-tests). The first is the first user of the CPU
# images, so one worker builds them (minutes on a clean machine) while the other runs files that
# need no Docker, rather than waiting on the build's lock.
LONGEST_FIRST = (
    "tests/integration/test_compose_stack.py",  # builds the CPU images; the real-vLLM lease test (~9 minutes)
    "tests/e2e/test_distributed_cpu.py",
    "tests/e2e/test_sharding.py",
    "tests/e2e/test_bench_scaling.py",
    "tests/e2e/test_quickstart_dpo.py",
    "tests/e2e/test_quickstart_harness.py",
    "tests/e2e/test_quickstart.py",  # from here on, files that run containers
    "tests/e2e/test_faults.py",
    "tests/e2e/test_vllm_serving.py",
    "tests/e2e/test_quickstart_qlora.py",
    "tests/e2e/test_quickstart_quantize.py",
    "tests/unit/test_runner.py",
    "tests/e2e/test_multinode.py",
    "tests/integration/test_images.py",
)
_owns_shared: Path | None = None  # the directory this process made (and removes at the end)


def pytest_configure(config: pytest.Config) -> None:
    global _owns_shared
    import tempfile

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the run's first process: never an inherited one
        _owns_shared = Path(tempfile.mkdtemp(prefix="ftkit-test-run-"))
        os.environ[SHARED_ENV] = str(_owns_shared)  # the workers, started after this, inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any test imports torch; inherited likewise


def shared_dir() -> Path:
    """The directory every process of this test run shares (for locks and what was built)."""
    return Path(os.environ[SHARED_ENV])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the run's first process (pytest-xdist's controller, or the only one), after every
    test: remove the images the run built (tests/shared_build.py)."""
    if _owns_shared is None:  # a worker
        return
    from tests.shared_build import remove_built

    remove_built(_owns_shared)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _owns_shared is not None:  # also after `pytest --help`, which runs no session
        shutil.rmtree(_owns_shared, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda i: rank.get(i.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep their order
    docker_items = [i for i in items if i.get_closest_marker("docker")]
    if not docker_items:
        return
    reason = _docker_reason()
    if reason is None:
        return
    if os.environ.get("FTKIT_REQUIRE_DOCKER") == "1":
        pytest.exit(f"FTKIT_REQUIRE_DOCKER=1 but {reason}", returncode=3)
    for item in docker_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two simulated GPUs (an RTX 4090 and an RTX 3090 Ti) whose state lives in a file, and a
    private machine-wide state directory (the power originals record)."""
    state = tmp_path / "sim.json"
    monkeypatch.setenv("FTKIT_SIMULATED_GPUS", "RTX 4090,RTX 3090 Ti")
    monkeypatch.setenv("FTKIT_SIMULATED_GPUS_STATE", str(state))
    monkeypatch.setenv("FTKIT_STATE_DIR", str(tmp_path / "state"))
    return state


def limits(sim: Path) -> list[float]:
    """The simulated GPUs' power limits as the backend's state file holds them."""
    import json

    return [g["power_limit_w"] for g in json.loads(sim.read_text())["gpus"]]
