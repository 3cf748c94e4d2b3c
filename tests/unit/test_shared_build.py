"""The test run's one-build-for-every-worker machinery (tests/shared_build.py): of several
processes that want the same build at once, exactly one builds; the others read its record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

WANT = """
import sys, time
from pathlib import Path
from tests.shared_build import locked, note_built, read_record, write_record
shared = Path(sys.argv[1])
with locked(shared, "thing"):
    record = read_record(shared, "thing")
    if record is None:
        time.sleep(0.5)  # a build: long enough for the others to be waiting on the lock
        with open(shared / "builds.txt", "a") as f:
            f.write(sys.argv[2] + "\\n")
        record = {"built_by": sys.argv[2]}
        note_built(shared, {"ftkit/x:" + sys.argv[2]})
        write_record(shared, "thing", record)
print(record["built_by"])
"""


def test_one_of_three_processes_builds_and_all_see_its_record(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WANT, str(tmp_path), f"p{i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    seen = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    builds = (tmp_path / "builds.txt").read_text().split()
    assert len(builds) == 1 and seen == set(builds)
    assert (tmp_path / "built-images.txt").read_text().split() == [f"ftkit/x:{builds[0]}"]
