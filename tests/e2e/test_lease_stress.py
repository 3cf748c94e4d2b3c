"""The GPU lease under load, on the host alone (processes, no Docker, no GPU).

Rounds of random contenders - `train` holders and preemptible `serve` supervisors, on one
and two GPUs - with random SIGKILLs (of waiting and of holding leases), --timeout and
--no-wait. Every command under the lease records (enter, leave) from INSIDE itself, and
also takes a non-blocking flock on a per-GPU "resource" file: if two commands ever used
one GPU at once, the second one's flock would fail and it logs a VIOLATION - an exact
check that also covers commands killed before they could log leaving.

Then: no violation; completed intervals never overlap per GPU; exit codes are the
command's, 75 for busy/timeout (and such a contender never ran), -9 for the killed; after
a holder is SIGKILLed, a waiter runs within a bound (nobody waits on a dead holder);
everyone finishes; nothing is left registered and every GPU is free at the end.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROUNDS = int(os.environ.get("FTKIT_LEASE_STRESS_ROUNDS", "200"))
MAX_ALIVE = 7
AFTER_KILL_BOUND_S = 5.0  # generous on a loaded 2-core machine; a dead holder would block for ever

WORKER = r'''
import fcntl, os, signal, sys, time
gpus, log, res, cid, hold, mode, code = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
def w(line):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\n").encode()); os.close(fd)
stop = []
signal.signal(signal.SIGTERM, (lambda *a: None) if mode == "stubborn" else (lambda *a: stop.append(1)))
fds = []
for g in gpus:
    fd = os.open(os.path.join(res, "res-" + g), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        w("VIOLATION %s %s %r" % (cid, g, time.time()))
    fds.append(fd)
w("enter %s %d %s %r" % (cid, os.getpid(), ",".join(gpus), time.time()))
if mode == "train":
    time.sleep(hold)
else:
    while not stop:
        time.sleep(0.005)
w("leave %s %d %s %r" % (cid, os.getpid(), ",".join(gpus), time.time()))
sys.exit(code)
'''


@dataclass
class Contender:
    cid: str
    role: str
    gpus: list[str]
    flags: list[str]
    code: int
    proc: subprocess.Popen[bytes]
    started: float
    kill_at: float | None = None  # SIGKILL the lease at this time
    kill_holding: bool = False  # SIGKILL the lease right after its command entered
    term_at: float | None = None  # serve: SIGTERM the supervisor at this time
    killed_at: float | None = None
    rc: int | None = None
    notes: list[str] = field(default_factory=list)


def _parse(log: Path) -> tuple[list[dict[str, object]], list[str]]:
    """Holds as {cid, gpus, enter, leave?} (a serve engine enters again after each yield)."""
    holds: list[dict[str, object]] = []
    violations = []
    for line in log.read_text().splitlines() if log.exists() else []:
        parts = line.split()
        if parts[0] == "VIOLATION":
            violations.append(line)
            continue
        kind, cid, _pid, gpus, t = parts
        if kind == "enter":
            holds.append({"cid": cid, "gpus": gpus.split(","), "enter": float(t)})
        else:
            open_ = [h for h in holds if h["cid"] == cid and "leave" not in h]
            open_[-1]["leave"] = float(t)
    return holds, violations


@pytest.mark.slow
def test_random_contenders_never_share_a_gpu(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("FTKIT_LEASE_STRESS_SEED", "20261123")))
    lease_dir, res, log = tmp_path / "lease", tmp_path / "res", tmp_path / "log"
    res.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTKIT_SIMULATED", "NVIDIA_"))}
    env["FTKIT_LEASE_DIR"] = str(lease_dir)
    env.pop("FTKIT_LEASE_HELD", None)
    ftkit = [sys.executable, "-m", "ftkit", "lease"]
    contenders: list[Contender] = []
    alive: list[Contender] = []
    t0 = time.monotonic()
    spawned = 0

    def spawn() -> None:
        nonlocal spawned
        cid = f"c{spawned:03d}"
        spawned += 1
        gpus = rng.choice([["0"], ["1"], ["0", "1"]])
        serving = sum(1 for c in alive if c.role == "serve")
        role = "serve" if serving < 2 and rng.random() < 0.15 else "train"
        flags = ["--gpus", ",".join(gpus), "--role", role, "--service", cid]
        code = rng.choice([0, 0, 1, 3]) if role == "train" else 0
        mode = role if role == "train" else rng.choice(["serve", "serve", "stubborn"])
        r = rng.random()
        if role == "train" and r < 0.15:
            flags.append("--no-wait")
        elif role == "train" and r < 0.35:
            flags += ["--timeout", f"{rng.uniform(0.05, 0.8):.2f}"]
        if role == "serve":
            flags += ["--grace", "0.3"]
        kill_holding = role == "train" and rng.random() < 0.12
        hold = rng.uniform(0.3, 0.6) if kill_holding else rng.uniform(0.01, 0.15)
        argv = [*ftkit, *flags, "--", sys.executable, "-S", str(worker), ",".join(gpus), str(log), str(res), cid,
                f"{hold:.3f}", mode, str(code)]
        now = time.monotonic()
        with open(tmp_path / f"{cid}.err", "wb") as err:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        c = Contender(cid, role, gpus, flags, code, proc, now)
        c.kill_holding = kill_holding
        if role == "train" and not kill_holding and rng.random() < 0.1:
            c.kill_at = now + rng.uniform(0.2, 1.0)  # often while it waits
        if role == "serve":
            lifetime = rng.uniform(1.0, 3.0)
            if rng.random() < 0.4:
                c.kill_at = now + lifetime
            else:
                c.term_at = now + lifetime
        contenders.append(c)
        alive.append(c)

    log_pos = 0
    seen: set[str] = set()

    def _new_enters() -> set[str]:
        nonlocal log_pos
        if log.exists():
            with open(log, "rb") as fh:
                fh.seek(log_pos)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            log_pos += end
            for line in data[:end].decode().splitlines():
                if line.startswith("enter "):
                    seen.add(line.split()[1])
        return seen

    try:
        while spawned < ROUNDS or alive:
            now = time.monotonic()
            assert now - t0 < 400, f"stress test stuck: {[(c.cid, c.role, c.flags) for c in alive]}"
            entered = _new_enters()
            for c in list(alive):
                if c.kill_holding and c.kill_at is None and c.cid in entered:
                    c.kill_at = now + rng.uniform(0.0, 0.1)
                if c.kill_at is not None and c.killed_at is None and now >= c.kill_at:
                    c.proc.send_signal(signal.SIGKILL)
                    c.killed_at = time.time()
                if c.term_at is not None and now >= c.term_at:
                    c.proc.send_signal(signal.SIGTERM)
                    c.term_at = None
                if c.proc.poll() is not None:
                    c.rc = c.proc.returncode
                    c.notes.append((tmp_path / f"{c.cid}.err").read_text(errors="replace"))
                    alive.remove(c)
            if spawned < ROUNDS and len(alive) < MAX_ALIVE:
                spawn()
                time.sleep(rng.uniform(0.0, 0.06))
            else:
                time.sleep(0.01)
    finally:
        for c in alive:  # a failure must leave nothing running (commands die with their lease)
            c.proc.kill()
            c.proc.wait()
    elapsed = time.monotonic() - t0

    holds, violations = _parse(log)
    assert not violations, violations

    # Completed holds never overlap on a GPU.
    by_gpu: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for h in holds:
        if "leave" in h:
            for g in h["gpus"]:  # type: ignore[attr-defined]
                by_gpu[g].append((h["enter"], h["leave"], str(h["cid"])))  # type: ignore[arg-type]
    for g, ivs in by_gpu.items():
        ivs.sort()
        for (a0, a1, ka), (b0, _b1, kb) in zip(ivs, ivs[1:], strict=False):
            assert b0 >= a1, f"GPU {g}: {ka} [{a0}, {a1}] overlaps {kb} from {b0}"

    # Exit codes: the command's; 75 when busy/timed out (and then it never ran); -9 when killed.
    first_enter: dict[str, float] = {}
    for h in holds:
        first_enter.setdefault(str(h["cid"]), float(h["enter"]))  # type: ignore[arg-type]
    busy = 0
    for c in contenders:
        err = c.notes[-1] if c.notes else ""
        if c.killed_at is not None and c.rc == -signal.SIGKILL:
            continue
        if c.role == "train":
            if c.rc == 75:
                busy += 1
                assert c.cid not in first_enter, f"{c.cid} exited 75 but its command ran"
                assert "--no-wait" in c.flags or "--timeout" in c.flags, (c.cid, err)
                assert "held by" in err, err
            else:
                assert c.rc == c.code, f"{c.cid} {c.flags}: rc {c.rc}, command exited {c.code}: {err}"
                assert c.cid in first_enter
        else:
            # 143: stopped while yielded; 137: a stubborn engine killed after the grace;
            # -15: SIGTERM came before Python had even started the lease (nothing ran)
            assert c.rc in (0, 128 + signal.SIGTERM, 128 + signal.SIGKILL) or (
                c.rc == -signal.SIGTERM and c.cid not in first_enter), f"serve {c.cid}: rc {c.rc}: {err}"

    # Nobody waits on a dead holder: after SIGKILLing a lease whose command held a GPU, the
    # first command to enter on that GPU afterwards (when someone was waiting) comes soon.
    checked = 0
    for c in contenders:
        if c.killed_at is None or c.rc != -signal.SIGKILL:
            continue
        holding = [h for h in holds if h["cid"] == c.cid and "leave" not in h and h["enter"] < c.killed_at]
        if not holding:
            continue  # killed while waiting (or between holds)
        for g in c.gpus:
            waiting = [o for o in contenders if o is not c and g in o.gpus and o.started < c.killed_at
                       and first_enter.get(o.cid, 0.0) > c.killed_at]
            if not waiting:
                continue
            nxt = min(float(h["enter"]) for h in holds if g in h["gpus"] and h["enter"] > c.killed_at)  # type: ignore[operator]
            assert nxt - c.killed_at < AFTER_KILL_BOUND_S, \
                f"GPU {g}: next holder {nxt - c.killed_at:.2f} s after SIGKILL of {c.cid}"
            checked += 1

    # Nothing is left: no live party, every GPU free at once.
    from ftkit.lease import holders

    assert holders(lease_dir) == []
    done = subprocess.run([*ftkit, "--gpus", "0,1", "--no-wait", "--", "true"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    kills = sum(1 for c in contenders if c.killed_at is not None)
    print(f"\n{ROUNDS} contenders in {elapsed:.1f} s: {len(holds)} holds, {kills} SIGKILLs, {busy} busy/timeouts, "
          f"{checked} post-kill handoffs checked, {sum(1 for c in contenders if c.role == 'serve')} serve supervisors")
    assert len(holds) > ROUNDS // 3
    assert kills > 10 and busy > 5
