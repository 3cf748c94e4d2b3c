"""Telemetry sampler cost: CPU seconds the sampler spends per wall second at 1 Hz (target:
under 1% of one core), with the simulated backend on two GPUs and a run directory holding
a checkpoint-sized tree of files, so the disk-use walk is in the figure.

Two measures: the sampler thread's own CPU time (time.thread_time inside the thread), and
the whole process's CPU time (getrusage) while the main thread sleeps - the second also
catches anything the thread makes the interpreter do elsewhere. A 10 Hz run gives the cost
of one tick with less noise. On a GPU machine pass --real to sample the real GPUs instead.

    python bench/telemetry_cost.py [--seconds 60] [--files 2000] [--real]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _util import save


def measure(seconds: float, interval: float, run_dir: Path, real: bool) -> dict[str, float]:
    from ftkit.gpu.nvml import SimulatedNvml, open_nvml
    from ftkit.gpu.telemetry import Sampler

    if real:
        nv = open_nvml()
        if nv is None or nv.simulated:
            raise SystemExit("--real needs an NVIDIA driver (and no FTKIT_SIMULATED_GPUS)")
        gpus = [g.index for g in nv.inventory()]
        nv.close()
        factory = open_nvml
    else:
        gpus = [0, 1]

        def factory() -> SimulatedNvml:
            return SimulatedNvml(["RTX 4090", "RTX 4090"])
    csv_path = run_dir / f"telemetry-{interval:g}.csv"
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    sampler = Sampler(factory, gpus, csv_path, interval_s=interval, step="bench", run_dir=run_dir).start()
    time.sleep(seconds)
    summary = sampler.stop()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    proc_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "interval_s": interval, "gpus": len(gpus), "wall_s": round(wall, 3), "ticks": summary["ticks"],
        "rows": summary["rows"], "source": summary["source"],
        "thread_cpu_s": summary["sampler_cpu_s"], "process_cpu_s": round(proc_cpu, 4),
        "thread_cpu_pct_of_core": round(100 * summary["sampler_cpu_s"] / wall, 3),
        "process_cpu_pct_of_core": round(100 * proc_cpu / wall, 3),
        "ms_per_tick": round(1000 * summary["sampler_cpu_s"] / max(1, summary["ticks"]), 3),
        "csv_bytes": csv_path.stat().st_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--files", type=int, default=2000, help="files in the fake run directory")
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        for i in range(args.files):  # checkpoint-like tree: many small files in a few directories
            d = run_dir / "steps" / "train" / "checkpoints" / f"checkpoint-{i // 100}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.bin").write_bytes(os.urandom(1024))
        results = {
            "python": sys.version.split()[0], "cpus": os.cpu_count(), "run_dir_files": args.files,
            "at_1hz": measure(args.seconds, 1.0, run_dir, args.real),
            "at_10hz": measure(min(args.seconds, 20), 0.1, run_dir, args.real),
        }
    one = results["at_1hz"]
    print(f"1 Hz over {one['wall_s']} s: sampler thread {one['thread_cpu_s']} s CPU "
          f"({one['thread_cpu_pct_of_core']}% of a core), process {one['process_cpu_s']} s "
          f"({one['process_cpu_pct_of_core']}%); {one['ms_per_tick']} ms per tick")
    ten = results["at_10hz"]
    print(f"10 Hz over {ten['wall_s']} s: {ten['thread_cpu_pct_of_core']}% of a core, {ten['ms_per_tick']} ms per tick")
    print(f"wrote {save('telemetry_cost' + ('_real' if args.real else ''), results)}")


if __name__ == "__main__":
    main()
