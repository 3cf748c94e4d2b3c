"""What every step's container runs first: `python -m ftkit.run.incontainer [--journal STEP] [--processes N] -- CMD...`
(plan.container puts it in front of every container command, so `ftkit up` and a stack run by
plain `docker compose` start the same thing).

Threads. torch's and OpenMP's thread pools, and `accelerate launch` (OMP_NUM_THREADS from
psutil's count of physical cores), are sized from the CPUs the process can see: the host's
cores, whatever the container's CPU quota (`--cpus`, `deploy.resources.limits.cpus`) and, for
accelerate, whatever its cpuset. A container allowed 2 CPUs on a 32-core host then runs 32
threads that the kernel throttles in turns, and OpenMP's spinning barriers make that many
times slower than 2 threads. Where nothing set OMP_NUM_THREADS (the recipe's or the machine
profile's env, `docker run -e`, a compose override), it is set here from the container's
allowance: the physical cores of its affinity mask, no more than its CPU quota (cgroup v2
cpu.max, v1 cfs quota; the tightest of its cgroup and their parents), at least 1. torch's
intra-op pool and accelerate's launcher both follow OMP_NUM_THREADS. A command that starts
several engine processes (`--processes N`: accelerate launch with one per GPU) gives each its
share of the allowance.

Then CMD replaces this process (exec: its signals and exit code are its own; SIGPIPE and
SIGXFSZ back to their defaults first, which Python ignores and exec would keep ignored). With
`--journal STEP` (the stacks `ftkit compose` writes: no ftkit drives the run) CMD runs as a
child instead, its output copied to the container's output and to RUN/logs/STEP.log, and
its start and end go into RUN/state.json (ftkit.run.stackjournal). Journaling never stops
the step nor changes its exit status: whatever goes wrong with the journal is a note on
stderr. One exception, on purpose: a one-shot step that exits 0 without what it must leave
exits 1, so compose's service_completed_successfully does not start the next step on it (as
`ftkit up` stops the chain there).

Light on purpose (no torch, no click): it starts before every step.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

THREAD_VARS = ("OMP_NUM_THREADS",)
RUN_DIR = Path("/ftkit/run")  # plan.container's run mount: the same in every step's container
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_SYS = Path("/sys/devices/system/cpu")


def _say(msg: str) -> None:
    try:
        os.write(2, f"ftkit: {msg}\n".encode())
    except OSError:
        pass


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, rel: str) -> list[Path]:
    """The cgroup directory `rel` under the mount `root` and its parents up to the mount; in a
    container whose cgroup is mounted as the root (docker's namespace), the root alone."""
    here = root / rel.lstrip("/")
    if not here.is_dir() or root not in (here, *here.parents):
        here = root
    out = [here]
    while out[-1] != root:
        out.append(out[-1].parent)
    return out


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs this process's cgroup (or a parent's) may use per period, e.g. 1.5; None when
    nothing limits it. cgroup v2's cpu.max (`max 100000`, `150000 100000`) or v1's
    cpu.cfs_quota_us / cpu.cfs_period_us (-1: unlimited)."""
    lines = (_read(proc_cgroup) or "").splitlines()
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2: 0::/path
            for d in _cgroup_dirs(root, rel):
                fields = (_read(d / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        quotas.append(int(fields[0]) / int(fields[1]))
                    except (ValueError, ZeroDivisionError):
                        pass
        elif "cpu" in controllers.split(","):  # v1: N:cpu,cpuacct:/path
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                if not mount.is_dir():
                    continue
                for d in _cgroup_dirs(mount, rel):
                    try:
                        q, p = int(_read(d / "cpu.cfs_quota_us") or "-1"), int(_read(d / "cpu.cfs_period_us") or "0")
                    except ValueError:
                        continue
                    if q > 0 and p > 0:
                        quotas.append(q / p)
                break
    return min(quotas) if quotas else None


def physical_cores(cpus: set[int], sysfs: Path = CPU_SYS) -> int:
    """Distinct cores (package, core id) among `cpus`: hyper-threads of one core count once.
    The number of CPUs where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        package, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
        if package is None or core is None:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def cpu_allowance(affinity: set[int] | None = None, quota: float | None = None, *, sysfs: Path = CPU_SYS) -> int:
    """Threads worth running here: the physical cores this process may run on, no more than
    its CPU quota (rounded down: a thread over the quota is throttled, and with OpenMP's
    barriers every thread waits for it), at least 1."""
    cpus = affinity if affinity is not None else set(os.sched_getaffinity(0))
    n = physical_cores(cpus, sysfs) if cpus else 1
    if quota is not None:
        n = min(n, max(1, math.floor(quota + 1e-9)))
    return max(1, n)


def thread_env(environ: dict[str, str], allowance: int) -> dict[str, str]:
    """The variables to set: each of THREAD_VARS nobody set (an empty value counts as unset)."""
    return {k: str(allowance) for k in THREAD_VARS if not environ.get(k, "").strip()}


def apply_threads(processes: int = 1) -> None:
    """OMP_NUM_THREADS from the allowance, shared by the `processes` the command starts (one
    per GPU under accelerate launch: torchrun would otherwise give each the whole allowance
    from the variable, or 1 without it)."""
    try:
        quota = cpu_quota()
        allowance = cpu_allowance(quota=quota)
    except Exception as e:  # noqa: BLE001 - never stop a step over a thread count
        _say(f"could not read the container's CPU allowance ({e}); threads left to the engine")
        return
    each = max(1, allowance // max(1, processes))
    chosen = thread_env(dict(os.environ), each)
    os.environ.update(chosen)
    seen = os.cpu_count() or 0
    if chosen and allowance < seen:  # only worth a line where it changes what the engine would do
        why = f"CPU quota {quota:g}" if quota is not None and quota < seen else "CPUs it may run on"
        per = f" over {processes} processes" if processes > 1 else ""
        _say(f"{', '.join(f'{k}={v}' for k, v in chosen.items())}: this container's {why}{per}, of {seen} it sees")


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what compose stop, Ctrl-C and a hang-up mean: stop the step


def _journal(what: str, call: Callable[[], T], default: T) -> T:
    """A journal call that never stops or changes the step: anything it raises is one line."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - the step runs whatever the journal does
        _say(f"journal ({what}) failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}; "
             "the step runs on")
        return default


def run_journaled(run: Path, step_id: str, cmd: list[str]) -> int:
    """CMD as a child, journaled and logged; returns its exit status (128+N after signal N), or
    1 where it exited 0 but the journal has it failed (it left not what it must). Signals to
    this process go to CMD (as tini would send them to CMD without this process between); a
    stop (STOPS) that comes before CMD has started stops the step before it starts."""
    import threading

    from ftkit.run import stackjournal

    got: list[tuple[int, bool]] = []  # (signal, whether CMD has had it)
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: object) -> None:
        for proc in child:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass
        got.append((signum, bool(child)))

    def stops() -> list[int]:
        return [sig for sig, _ in got if sig in STOPS]

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        _journal("start", lambda: stackjournal.started(run, step_id, cmd, say=_say), None)
        log = _journal("log", lambda: stackjournal.open_log(run, step_id, cmd, say=_say), None)
        early = stops()
        if early:  # stopped while it was being journaled: CMD never starts
            if log is not None:
                log.close()
            _journal("end", lambda: stackjournal.ended(run, step_id, 128 + early[0], early, "", say=_say), None)
            return 128 + early[0]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # noqa: S603 - the plan's
        except OSError as e:
            why = f"cannot start {cmd[0]}: {e.strerror or e}"
            _say(why)
            if log is not None:
                log.close()
            _journal("end", lambda: stackjournal.ended(run, step_id, 127, [], why, say=_say), None)
            return 127
        child.append(proc)
        for sig, sent in list(got):  # came between the check above and now: CMD gets them too
            if not sent:
                proc.send_signal(sig)
        tail: deque[bytes] = deque(maxlen=200)

        def copy() -> None:  # CMD's output to the container's (docker logs) and to the step's log
            out = log
            assert proc.stdout is not None  # noqa: S101 - Popen(stdout=PIPE) made it
            while chunk := proc.stdout.read1(65536):
                tail.extend(chunk.splitlines(keepends=True))
                try:
                    os.write(1, chunk)
                except OSError:
                    pass
                if out is not None:
                    try:
                        out.write(chunk)
                        out.flush()
                    except (OSError, ValueError):  # ValueError: closed after the wait below gave up on the pipe
                        out = None

        reader = threading.Thread(target=copy, name="output", daemon=True)
        reader.start()
        code = proc.wait()
        stopped = stops()  # what stopped it: not a signal that comes after it exited, nor SIGUSR1 and the like
        reader.join(timeout=5)  # a process CMD left behind may hold the pipe open: not for long
        status = 128 - code if code < 0 else code
        if log is not None:
            try:
                log.close()
            except OSError:
                pass
        try:
            output = b"".join(list(tail)).decode("utf-8", "replace")
        except RuntimeError:  # still being copied (the pipe held open): no reason from it
            output = ""
        entry = _journal("end", lambda: stackjournal.ended(run, step_id, status, stopped, output, say=_say), None)
        if status == 0 and isinstance(entry, dict) and entry.get("status") == "failed":
            _say(f"{step_id}: {entry.get('error') or 'failed'}: exit status 1, so the steps after it do not start")
            return 1
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    journal: str | None = None
    processes = 1
    while args[:1] in (["--journal"], ["--processes"]) and len(args) >= 2:
        if args[0] == "--journal":
            journal = args[1]
        elif args[1].isdigit() and 0 < int(args[1]) < 100_000:
            processes = int(args[1])
        args = args[2:]
    if len(args) < 2 or args[0] != "--":
        _say("usage: python -m ftkit.run.incontainer [--journal STEP] [--processes N] -- CMD...")
        return 2
    cmd = args[1:]
    apply_threads(processes)
    if journal is not None:
        return run_journaled(RUN_DIR, journal, cmd)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; exec would keep them ignored
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed stderr is no reason to die by a signal
        _say(f"cannot start {cmd[0]}: {e.strerror or e}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
