"""Small helpers shared by the benchmark scripts (timing, peak memory of a child)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_measured(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run argv; return wall seconds, peak RSS (MiB) of that child, exit code and output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "rc": proc.returncode, "output": out}


def repeat(argv: list[str], n: int, **kw: Any) -> dict[str, float]:
    walls = []
    for _ in range(n):
        r = run_measured(argv, **kw)
        if r["rc"] != 0:
            raise SystemExit(f"{argv} failed:\n{r['output'][-2000:]}")
        walls.append(r["wall_s"])
    return {"median_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3), "runs": n}


def peak_rss(argv: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall time and peak RSS of argv and all its descendants it waited for (via a helper)."""
    helper = [sys.executable, str(ROOT / "bench" / "measure.py"), "--", *argv]
    r = run_measured(helper, env=env)
    lines = r["output"].strip().splitlines()
    try:
        stats = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{argv} failed:\n{r['output'][-3000:]}") from None
    if stats["rc"] != 0:
        raise SystemExit(f"{argv} exited {stats['rc']}:\n" + "\n".join(lines[-40:]))
    stats["output"] = "\n".join(lines[:-1])
    return stats


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
