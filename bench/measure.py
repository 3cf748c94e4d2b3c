"""Run a command and print, as the last line, JSON with its wall time and peak RSS.

    python bench/measure.py -- CMD ARGS...

Peak RSS comes from wait4() on the child: the largest resident set of the child or of any
descendant it waited for, the same figure /usr/bin/time -v reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> None:
    argv = sys.argv[sys.argv.index("--") + 1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": rc, "wall_s": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}), flush=True)


if __name__ == "__main__":
    main()
