"""telemetry.csv: what the GPUs and the host did while a step ran, one row per GPU per tick.

The scaling guide's first rule is to measure before deciding; this is the measuring. A
`Sampler` runs beside a step (the runner starts and stops it) and appends rows to the run's
telemetry.csv through the NVML gateway and psutil. It must never take a run down: every
NVML or OS error becomes an empty field and a note, and the thread is a daemon.

Columns (units in the name; GPU fields follow DCGM's field names where one exists):

| column | DCGM field / source |
|---|---|
| wall_time, timestamp | unix seconds (float) and ISO 8601 UTC: joins with metrics.jsonl's wall_time |
| step, gpu, gpu_name, source | the step sampled beside; NVML index; `nvml`, `simulated` or `host` (no GPU) |
| gpu_util, mem_copy_util | DCGM_FI_DEV_GPU_UTIL, DCGM_FI_DEV_MEM_COPY_UTIL (%) |
| fb_used_mib, fb_total_mib | DCGM_FI_DEV_FB_USED, DCGM_FI_DEV_FB_TOTAL |
| gpu_temp_c | DCGM_FI_DEV_GPU_TEMP |
| power_usage_w, enforced_power_limit_w | DCGM_FI_DEV_POWER_USAGE, DCGM_FI_DEV_ENFORCED_POWER_LIMIT |
| total_energy_consumption_mj | DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION (mJ since the driver loaded) |
| sm_clock_mhz, mem_clock_mhz | DCGM_FI_DEV_SM_CLOCK, DCGM_FI_DEV_MEM_CLOCK |
| pcie_link_gen, pcie_link_width, pcie_max_link_gen, pcie_max_link_width | DCGM_FI_DEV_PCIE_(MAX_)LINK_GEN/WIDTH |
| clocks_event_reasons + one 0/1 column per reason (hw_slowdown, hw_power_brake, sw_power_cap, ...) | DCGM_FI_DEV_CLOCKS_EVENT_REASONS |
| xid_errors | DCGM_FI_DEV_XID_ERRORS: XIDs raised since the previous row, `;`-separated |
| cpu_percent, ram_used_mib | host CPU (all cores, since the previous tick) and RAM in use |
| disk_read_mb, disk_write_mb | host disk I/O since the sampler started (MB, 10^6 bytes) |
| run_dir_mib | disk used by the run directory (refreshed every 10 s) |
| notes | why fields are empty, written when that changes (not on every row) |

Host columns repeat on every GPU row of a tick, so each row stands alone. With the
simulated backend `source` says `simulated` on every GPU row, and the report says so on
every plot.

A thread, not a subprocess: the runner process mostly waits on its steps, one sample costs
a few NVML calls and /proc reads, and a thread starts and stops at once and shares the
NVML handle's library. bench/telemetry_cost.py measures its CPU cost.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftkit.files import open_append
from ftkit.gpu.nvml import CLOCK_EVENT_FLAGS, SAMPLE_FIELDS, Nvml, decode_clock_events

WALK_EVERY_S = 10.0  # run_dir_mib is refreshed this often (the walk is the costliest read)
HOST_FIELDS = ("cpu_percent", "ram_used_mib", "disk_read_mb", "disk_write_mb", "run_dir_mib")
COLUMNS = (
    "wall_time", "timestamp", "step", "gpu", "gpu_name", "source",
    *SAMPLE_FIELDS[:-1], *CLOCK_EVENT_FLAGS, SAMPLE_FIELDS[-1],
    *HOST_FIELDS, "notes",
)

# One lock per file: a serving step's sampler and a training step's may append to the same
# telemetry.csv at once, and a row must never interleave with another.
_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(str(path.resolve()), threading.Lock())


def dir_size_mib(path: Path) -> float:
    """Disk used by a directory tree (allocated blocks, like du), symlinks not followed."""
    total = 0
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            st = e.stat(follow_symlinks=False)
                            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                    except OSError:
                        continue  # a file removed mid-walk (checkpoint retention) is fine
        except OSError:
            continue
    return round(total / 2**20, 2)


class _Host:
    """psutil readings; None fields where psutil is missing or a read fails."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.notes: list[str] = []
        try:
            import psutil
        except ImportError:
            self.ps = None
            self.notes.append("psutil not installed: no host CPU, RAM or disk I/O")
        else:
            self.ps = psutil
            psutil.cpu_percent(interval=None)  # primes the counter: the next call is over this tick
        self.io0 = self._io()
        self._walk_next = 0.0
        self._run_dir_mib: float | None = None

    def _io(self) -> tuple[int, int] | None:
        if self.ps is None:
            return None
        try:
            c = self.ps.disk_io_counters()
        except (OSError, RuntimeError, AttributeError):
            return None
        return (c.read_bytes, c.write_bytes) if c else None

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = dict.fromkeys(HOST_FIELDS)
        if self.ps is not None:
            try:
                out["cpu_percent"] = round(self.ps.cpu_percent(interval=None), 1)
                out["ram_used_mib"] = round(self.ps.virtual_memory().used / 2**20, 1)
            except (OSError, RuntimeError):
                pass
            io = self._io()
            if io is not None and self.io0 is not None:
                out["disk_read_mb"] = round((io[0] - self.io0[0]) / 1e6, 3)
                out["disk_write_mb"] = round((io[1] - self.io0[1]) / 1e6, 3)
        if self.run_dir is not None:
            now = time.monotonic()
            if now >= self._walk_next:
                t0 = time.monotonic()
                self._run_dir_mib = dir_size_mib(self.run_dir)
                # disk growth needs no 1 s resolution, and a big run directory must not turn
                # the sampler into a du loop: walk again after 10 s or 100x the walk's time
                self._walk_next = now + max(WALK_EVERY_S, 100 * (time.monotonic() - t0))
            out["run_dir_mib"] = self._run_dir_mib
        return out


class Sampler:
    """Samples `gpus` (NVML indices) and the host every `interval_s` into `csv_path`.

    `nvml_factory` opens the NVML backend (e.g. `ftkit.gpu.nvml.open_nvml`); it may return
    None or raise - the sampler then writes host-only rows and a note. `start()` returns at
    once; `stop()` takes a last sample, joins the thread and returns a summary for the
    journal (rows, ticks, the sampler's own CPU seconds, notes).
    """

    def __init__(self, nvml_factory: Callable[[], Nvml | None] | None, gpus: list[int], csv_path: Path, *,
                 interval_s: float = 1.0, step: str, run_dir: Path | None = None, close_nvml: bool = True) -> None:
        self.nvml_factory = nvml_factory
        self.gpus = list(gpus)
        self.csv_path = Path(csv_path)
        self.interval_s = max(0.05, float(interval_s))
        self.step = step
        self.run_dir = run_dir
        self.close_nvml = close_nvml
        self.notes: list[str] = []
        self.rows = 0
        self.ticks = 0
        self.cpu_s = 0.0
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_note: dict[str, str] = {}
        self._write_failed = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Sampler:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"ftkit-telemetry-{self.step}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # an NVML call hung: leave the daemon thread behind
                self._note("sampler", f"the sampler did not stop within {timeout_s:g} s (a hung NVML call?)")
        return self.summary()

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> dict[str, Any]:
        return {"file": self.csv_path.name, "rows": self.rows, "ticks": self.ticks, "interval_s": self.interval_s,
                "source": self.source, "sampler_cpu_s": round(self.cpu_s, 4), "notes": list(self.notes)}

    # -- the loop ---------------------------------------------------------------------------

    def _note(self, key: str, text: str) -> str:
        """Record a note once per change for `key`; return it for the row's notes column."""
        if self._last_note.get(key) == text:
            return ""
        self._last_note[key] = text
        self.notes.append(text)
        return text

    def _open(self) -> Nvml | None:
        if not self.gpus or self.nvml_factory is None:
            return None
        try:
            nv = self.nvml_factory()
        except Exception as e:  # noqa: BLE001 - whatever NVML does, the run goes on
            self._note("nvml", f"NVML could not start: {e}; GPU fields are empty")
            return None
        if nv is None:
            self._note("nvml", "no NVML on this machine (no NVIDIA driver); GPU fields are empty")
        return nv

    def _run(self) -> None:
        t_cpu = time.thread_time()
        nv: Nvml | None = None
        try:
            nv = self._open()
            names = self._names(nv)
            host = _Host(self.run_dir)
            for n in host.notes:
                self._note("host", n)
            self.cpu_s += time.thread_time() - t_cpu
            t0 = time.monotonic()
            k = 0
            while True:
                c0 = time.thread_time()
                if self._stop.is_set():
                    host._walk_next = 0.0  # the last row has the final disk use
                try:
                    self._tick(nv, names, host)
                except Exception as e:  # noqa: BLE001 - a bad tick is a note, not a crash
                    self._note("tick", f"sampling failed: {e.__class__.__name__}: {e}")
                self.cpu_s += time.thread_time() - c0
                if self._stop.is_set():
                    break
                k += 1
                # a fixed schedule (no drift); after a slow tick, skip to the next slot
                wait = t0 + k * self.interval_s - time.monotonic()
                if wait < 0:
                    k += int(-wait // self.interval_s) + 1
                    wait = t0 + k * self.interval_s - time.monotonic()
                self._stop.wait(max(0.0, wait))  # stop() wakes it: the last tick follows at once
        finally:
            if nv is not None and self.close_nvml:
                try:
                    nv.close()
                except Exception:  # noqa: BLE001
                    pass

    def _names(self, nv: Nvml | None) -> dict[int, str]:
        if nv is None:
            return {}
        try:
            return {g.index: g.name for g in nv.inventory()}
        except Exception as e:  # noqa: BLE001
            self._note("inventory", f"NVML inventory failed: {e}")
            return {}

    def _tick(self, nv: Nvml | None, names: dict[int, str], host: _Host) -> None:
        now = time.time()
        stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds")
        base = {"wall_time": f"{now:.3f}", "timestamp": stamp, "step": self.step, **host.read()}
        rows: list[dict[str, Any]] = []
        if not self.gpus:
            rows.append({**base, "gpu": "", "source": "host"})
            self.source = "host"
        for idx in self.gpus:
            row = {**base, "gpu": idx, "gpu_name": names.get(idx, "")}
            note = ""
            if nv is None:
                row["source"] = ""
            else:
                try:
                    s = nv.sample(idx)
                except Exception as e:  # noqa: BLE001 - e.g. the GPU fell off the bus
                    s = {"source": "simulated" if getattr(nv, "simulated", False) else "nvml",
                         "errors": [f"sample: {e}"]}
                row["source"] = s.get("source", "")
                self.source = self.source or row["source"]
                for f in SAMPLE_FIELDS:
                    row[f] = s.get(f)
                row.update({k: (None if v is None else int(v))
                            for k, v in decode_clock_events(s.get("clocks_event_reasons")).items()})
                errs = s.get("errors") or []
                note = self._note(f"gpu{idx}", f"GPU {idx}: " + "; ".join(errs)) if errs else ""
                if not errs and f"gpu{idx}" in self._last_note:
                    note = self._note(f"gpu{idx}", f"GPU {idx}: all fields readable again")
            row["notes"] = note
            rows.append(row)
        if rows and self._last_note.get("nvml") and self.ticks == 0:
            rows[0]["notes"] = "; ".join(x for x in (self._last_note["nvml"], rows[0].get("notes")) if x)
        self._append(rows)
        self.ticks += 1

    def _append(self, rows: list[dict[str, Any]]) -> None:
        lock = _file_lock(self.csv_path)
        try:
            with lock:
                self.csv_path.parent.mkdir(parents=True, exist_ok=True)
                with open_append(self.csv_path) as fh:  # never through a link planted in the run directory
                    new = os.fstat(fh.fileno()).st_size == 0
                    w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
                    if new:
                        w.writeheader()
                    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
            self.rows += len(rows)
            self._write_failed = False
        except OSError as e:  # disk full, run directory removed: keep trying, note once
            if not self._write_failed:
                self.notes.append(f"could not write {self.csv_path.name}: {e}")
            self._write_failed = True


CSV_MAX_BYTES = 512 << 20  # about a day of samples from 8 GPUs every second


def read_csv(path: Path) -> list[dict[str, str]]:
    """telemetry.csv as rows of strings (empty list when there is none)."""
    if not os.path.lexists(path):
        return []
    from ftkit.files import read_bounded

    data = read_bounded(path, CSV_MAX_BYTES)  # never blocks or follows a link; OSError when refused
    try:
        return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    except csv.Error as e:  # a field past csv's limit, a NUL byte: not the file ftkit wrote
        raise ValueError(f"not CSV ftkit reads: {e}") from None
