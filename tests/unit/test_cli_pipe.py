"""A reader that leaves early (`ftkit plan ... | head`) is not a failure: no traceback, exit 0.

click turns EPIPE inside a command into a bare `exit 1`; ftkit's entry point must tell that
apart from a real failure (#22: the handler sat behind one that re-raised it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [
    ["plan", "recipes/quickstart.yaml"],
    ["plan", "--help"],
    ["schema", "--kind", "recipe"],
])
def test_a_closed_pipe_exits_quietly(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        proc = subprocess.run([sys.executable, "-m", "ftkit", *args], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr.decode()) == (0, "")


def test_a_pipeline_whose_reader_left_succeeds() -> None:
    # `true` exits at once, long before ftkit has imported click: ftkit's first write hits EPIPE
    proc = subprocess.run(f"set -o pipefail; {sys.executable} -m ftkit plan recipes/quickstart.yaml | true",
                          shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_real_failure_still_fails() -> None:
    proc = subprocess.run([sys.executable, "-m", "ftkit", "plan", "no-such-recipe.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no-such-recipe.yaml" in proc.stderr
