"""`ftkit lease`: hold GPUs and run a command under them.

`train` (also merge and eval on a GPU): wait for the GPUs, run the command, let go when
its whole process tree is gone. It never yields.

`serve`: a supervisor around a model server. It holds the GPUs while the engine serves;
when a `train` waiter appears on any of its GPUs it stops the engine (SIGTERM, grace,
SIGKILL) or puts vLLM to sleep (--sleep-url), lets go, waits until no `train` waiter is
left, takes the GPUs back and starts or wakes the engine. It takes them back only when no
train waiter is registered, so training cannot starve behind it.

Exit codes: the command's own (128+N when it died of signal N); 75 when the GPUs stay busy
(--no-wait, --timeout); 78 when a backstop refuses; 2 for bad arguments; 127/126 when the
command cannot be found/run; 128+N when signal N ends a wait.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import GpuError, HttpError, LeaseBusy, UserError
from ftkit.lease import backstops
from ftkit.lease.child import Tree, become_subreaper, wait_for_signal_or_timeout
from ftkit.lease.flocks import GpuLocks, WaitInterrupted, Waker
from ftkit.lease.gpus import GpuRef, lock_order, resolve
from ftkit.lease.paths import ensure_lease_dir
from ftkit.lease.records import (
    Party,
    Presence,
    holder_of,
    live_parties,
    lock_file_record,
    new_party,
    train_waiters,
)

HELD_ENV = "FTKIT_LEASE_HELD"
SERVICE_ENV = "FTKIT_SERVICE"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
SERVE_POLL_S = 0.1  # how often a serve supervisor looks for train waiters
TRAIN_LEFTOVER_GRACE_S = 10.0


SETTLE_ENV = "FTKIT_LEASE_SETTLE_S"  # how long a GPU's memory may take to be freed (default 10 s)


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected seconds") from None
    if value < 0:
        raise UserError(f"{name}={raw!r}: expected seconds >= 0")
    return value


@dataclass
class Options:
    gpus: list[int | str]
    role: str  # train | serve
    lease_dir: Path
    command: list[str]
    timeout: float | None = None  # None: wait for ever; 0: --no-wait
    service: str | None = None
    grace_s: float = 30.0
    caps: dict[int | None, float] = field(default_factory=dict)
    sleep_url: str | None = None
    settle_s: float = field(default_factory=lambda: _env_seconds(SETTLE_ENV, backstops.SETTLE_S))


def say(msg: str) -> None:
    print(f"ftkit lease: {msg}", file=sys.stderr, flush=True)


# -- who holds what ---------------------------------------------------------------------------

def describe_holder(lease_dir: Path, name: str, refs: Sequence[GpuRef]) -> str:
    """`GPU 0 (GPU-…): held by serve 'vllm' (container 3f2a, pid 7) since … (2m03s)`"""
    label = next((r.label for r in refs if name in r.lock_names), name)
    holder = holder_of(live_parties(lease_dir), name)
    if holder is not None:
        return f"{label}: held by {holder.describe()}"
    rec = lock_file_record(lease_dir / name)
    if rec:
        try:
            return f"{label}: held by {Party.from_dict(rec).describe()} (its record; the lease process is gone, " \
                   "its command still runs)"
        except TypeError:
            pass
    return f"{label}: held by a process that left no record (an older ftkit, or one just taking it)"


class _Reporter:
    """Says once who we wait for, and again whenever that changes."""

    def __init__(self, lease_dir: Path, refs: Sequence[GpuRef]) -> None:
        self.lease_dir, self.refs = lease_dir, refs
        self.last: str | None = None

    def busy(self, name: str) -> None:
        self._say(name)

    def tick(self, name: str) -> None:
        self._say(name)

    def _say(self, name: str) -> None:
        text = describe_holder(self.lease_dir, name, self.refs)
        key = text.split(" since ")[0]
        if key != self.last:
            say(f"waiting for {text}")
            self.last = key


# -- nested leases ---------------------------------------------------------------------------

def _covered_by_parent(lease_dir: Path, names: Sequence[str]) -> bool:
    """True when an ancestor `ftkit lease` (still alive) already holds every lock we need:
    taking them again would wait for ourselves for ever."""
    raw = os.environ.get(HELD_ENV)
    if not raw:
        return False
    try:
        held = json.loads(raw)
        same_dir = os.path.realpath(held["dir"]) == os.path.realpath(lease_dir)
        party = held["party"]
        locks = set(held["locks"])
    except (ValueError, KeyError, TypeError):
        return False
    if not same_dir or not set(names) <= locks:
        return False
    return any(p.id == party and p.state == "holding" for p in live_parties(lease_dir))


def _exec(command: Sequence[str]) -> int:
    try:
        os.execvp(command[0], list(command))
    except FileNotFoundError:
        say(f"cannot run {command[0]!r}: not found")
        return 127
    except PermissionError:
        say(f"cannot run {command[0]!r}: permission denied")
        return 126
    return 127  # not reached


# -- the lease ----------------------------------------------------------------------------------

class CannotRun(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Lease:
    def __init__(self, opts: Options, nvml: Any) -> None:
        self.o = opts
        self.nvml = nvml
        refs, warnings = resolve(opts.gpus, nvml)
        for w in warnings:
            say(w)
        self.refs = refs
        self.names = lock_order(refs)
        self.dir = ensure_lease_dir(opts.lease_dir)
        self.locks = GpuLocks(self.dir, self.names)
        self.party = new_party(opts.role, gpus=[r.as_dict() for r in refs], locks=self.names, command=opts.command,
                               service=opts.service)
        self.presence: Presence | None = None
        self.waker = Waker()
        self.report = _Reporter(self.dir, refs)
        self.tree: Tree | None = None
        self._rfd = self._wfd = -1

    # signals: recorded by the handler; they break a blocked flock, and wake the select()
    def install_signals(self) -> None:
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        for s in FORWARDED:
            signal.signal(s, self.waker.handler)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def register(self, state: str) -> None:
        if self.presence is None:
            self.party.state = state
            self.presence = Presence(self.dir, self.party)
        else:
            self.presence.update(state=state)

    def close(self) -> None:
        self.locks.close()
        if self.presence is not None:
            self.presence.close()
            self.presence = None

    # -- acquiring ----------------------------------------------------------------------------

    def busy_error(self, name: str, why: str) -> LeaseBusy:
        return LeaseBusy(f"ftkit lease: {why}: {describe_holder(self.dir, name, self.refs)}")

    def acquire_blocking(self) -> None:
        """train: register as a waiter (so serve holders yield), then wait in order."""
        o = self.o
        if o.timeout == 0:
            busy = self.locks.try_all()
            if busy is not None:
                raise self.busy_error(busy, "GPU busy (--no-wait)")
            self.register("holding")
            return
        self.register("waiting")
        deadline = None if o.timeout is None else time.monotonic() + o.timeout
        busy = self.locks.acquire(deadline=deadline, on_busy=self.report.busy, on_tick=self.report.tick,
                                  waker=self.waker)
        if busy is not None:
            raise self.busy_error(busy, f"gave up after {o.timeout:g} s (--timeout)")
        self.register("holding")

    def wait_for_no_train_waiters_and_acquire(self, deadline: float | None, first: bool) -> int | None:
        """serve: take the GPUs only while no train waiter wants any of them. Returns a
        terminating signal if one ended the wait, else None once all locks are held."""
        o = self.o
        while True:
            sig = self.waker.take_terminating()
            if sig is not None:
                return sig
            if self.tree is not None and self.tree.reap():
                return None  # a sleeping engine died: the caller sees tree.returncode
            waiters = train_waiters(live_parties(self.dir), self.names)
            busy: str | None = None
            if not waiters:
                busy = self.locks.try_all()
                if busy is None:
                    return None
                self.report.busy(busy)
            if first and (o.timeout == 0 or (deadline is not None and time.monotonic() >= deadline)):
                why = "GPU busy (--no-wait)" if o.timeout == 0 else f"gave up after {o.timeout:g} s (--timeout)"
                if busy is not None:
                    raise self.busy_error(busy, why)
                raise LeaseBusy(f"ftkit lease: {why}: training waits for the GPU first: {waiters[0].describe()}")
            wait_for_signal_or_timeout(self._rfd, SERVE_POLL_S)

    # -- after acquiring ----------------------------------------------------------------------

    def hold_record(self) -> None:
        self.locks.write_record(self.party.as_dict())

    def run_backstops(self, own_gpu_pids: Sequence[int] = ()) -> None:
        if self.nvml is None:
            if self.o.caps:
                say("power backstop skipped: NVML is not readable here (no NVIDIA driver or no GPU visible)")
            return
        for w in backstops.check_power(self.nvml, self.refs, self.o.caps):
            say(w)
        tolerated: set[int] = set(own_gpu_pids)
        lenient: set[int | None] = set()
        for p in live_parties(self.dir):
            if p.sleeping and p.id != self.party.id and set(p.locks) & set(self.names):
                if p.gpu_pids:
                    tolerated.update(p.gpu_pids)
                else:
                    lenient.update(g.get("index") for g in p.gpus)
        for w in backstops.check_processes(self.nvml, self.refs, tolerated=tolerated, lenient=lenient,
                                           settle_s=self.o.settle_s, on_wait=say):
            say(w)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[HELD_ENV] = json.dumps({"party": self.party.id, "dir": str(self.dir), "locks": self.names})
        return env

    def start(self) -> Tree:
        """Start the command; it inherits the lock and presence descriptors (see child.py)."""
        fds = list(self.locks.held_fds)
        if self.presence is not None:
            fds.append(self.presence.fd)
        try:
            return Tree(self.o.command, env=self.child_env(), pass_fds=fds)
        except FileNotFoundError:
            raise CannotRun(127, f"cannot run {self.o.command[0]!r}: not found") from None
        except OSError as e:
            raise CannotRun(126, f"cannot run {self.o.command[0]!r}: {e.strerror or e}") from None

    def release(self) -> None:
        self.locks.release()

    # -- train -------------------------------------------------------------------------------

    def run_train(self) -> int:
        self.acquire_blocking()
        self.hold_record()
        self.run_backstops()
        sig = self.waker.take_terminating()
        if sig is not None:
            raise WaitInterrupted(sig)
        self.waker.pending.clear()  # nothing to forward from before the command existed
        self.tree = tree = self.start()
        self.presence.update(engine_pid=tree.pid)  # type: ignore[union-attr]
        while not tree.reap():
            for sig in self._take_signals():
                tree.signal(sig)
            wait_for_signal_or_timeout(self._rfd, 1.0)
        leftovers = tree.leftovers()
        if leftovers:
            say(f"the command exited ({tree.returncode}) but left processes behind; stopping them before "
                "letting go of the GPUs")
            tree.stop(TRAIN_LEFTOVER_GRACE_S)
        self.release()  # at once: a waiter may be blocked on these locks right now
        return tree.returncode if tree.returncode is not None else 1

    def _take_signals(self) -> list[int]:
        sigs, self.waker.pending[:] = list(self.waker.pending), []
        return sigs

    # -- serve -------------------------------------------------------------------------------

    def run_serve(self) -> int:
        o = self.o
        self.register("waiting")
        first = True
        deadline = None if o.timeout in (None, 0) else time.monotonic() + o.timeout  # type: ignore[operator]
        sleeping = False
        gpu_pids: list[int] = []
        while True:
            sig = self.wait_for_no_train_waiters_and_acquire(deadline, first)
            if sig is not None:
                return self._end_on_signal(sig)
            if self.tree is not None and self.tree.returncode is not None:
                say(f"the engine exited ({self.tree.returncode}) while yielded")
                self.tree.stop(o.grace_s)
                return self.tree.returncode if self.tree.returncode is not None else 1
            if train_waiters(live_parties(self.dir), self.names):
                # A train waiter registered while we were taking the locks: it goes first,
                # before we spend minutes starting an engine only to stop it again.
                self.release()
                continue
            self.presence.update(state="holding", sleeping=False, gpu_pids=[])  # type: ignore[union-attr]
            self.hold_record()
            self.run_backstops(own_gpu_pids=gpu_pids if sleeping else ())
            if sleeping and self.tree is not None:
                if self._wake():
                    say("engine woken up")
                else:
                    say("waking the engine failed: restarting it")
                    self.tree.stop(o.grace_s)
                    self.tree = None
                sleeping = False
            if self.tree is None:
                self.tree = self.start()
                if not first:
                    say("GPUs back: engine restarted")
            self.presence.update(engine_pid=self.tree.pid)  # type: ignore[union-attr]
            first = False
            outcome = self._serve_until_preempted()
            if outcome is not None:
                return outcome
            # a train waiter appeared: yield
            waiter = train_waiters(live_parties(self.dir), self.names)
            who = waiter[0].describe() if waiter else "a train waiter"
            sleeping, gpu_pids = False, []
            if o.sleep_url:
                sleeping, gpu_pids = self._sleep()
            if sleeping:
                say(f"engine asleep; yielding the GPUs to {who}")
            else:
                say(f"stopping the engine (grace {o.grace_s:g} s) to yield the GPUs to {who}")
                assert self.tree is not None
                self.tree.stop(o.grace_s)
                self.tree = None
            self.presence.update(state="yielded", sleeping=sleeping, gpu_pids=gpu_pids,  # type: ignore[union-attr]
                                 engine_pid=self.tree.pid if self.tree else None)
            self.release()

    def _serve_until_preempted(self) -> int | None:
        """Serve until a train waiter appears (None) or the engine ends (its exit code)."""
        tree = self.tree
        assert tree is not None
        kill_at: float | None = None  # asked to stop: SIGKILL after the grace period
        while True:
            if tree.reap():
                if kill_at is None:
                    say(f"the engine exited on its own ({tree.returncode})")
                leftovers = tree.leftovers()
                if leftovers:
                    tree.stop(self.o.grace_s)
                return tree.returncode if tree.returncode is not None else 1
            for sig in self._take_signals():
                tree.signal(sig)
                if sig in Waker.TERMINATING and kill_at is None:
                    # A stopping server must not sit on the GPUs for ever: the same grace
                    # as a yield, then SIGKILL (docker stop would escalate too).
                    kill_at = time.monotonic() + self.o.grace_s
                    self.presence.update(state="stopping")  # type: ignore[union-attr]
            if kill_at is not None and time.monotonic() >= kill_at:
                say(f"the engine did not stop within {self.o.grace_s:g} s: killing it")
                tree.stop(0)
                continue
            if kill_at is None and train_waiters(live_parties(self.dir), self.names):
                return None
            wait_for_signal_or_timeout(self._rfd, SERVE_POLL_S)

    def _end_on_signal(self, sig: int) -> int:
        """A terminating signal while yielded: pass it to a sleeping engine and wait for it."""
        if self.tree is not None and self.tree.returncode is None:
            self.tree.signal(sig)
            self.tree.wait_done(self.o.grace_s)
            if not self.tree.done():
                self.tree.stop(0)
            return self.tree.returncode if self.tree.returncode is not None else 128 + sig
        return 128 + sig

    def _sleep(self) -> tuple[bool, list[int]]:
        from ftkit.gateways.http import request_json

        url = self.o.sleep_url.rstrip("/")  # type: ignore[union-attr]
        try:
            request_json("POST", f"{url}/sleep?level=1", timeout=max(60.0, self.o.grace_s))
        except HttpError as e:
            say(f"putting the engine to sleep failed ({e}); stopping it instead")
            return False, []
        pids: list[int] = []
        if self.nvml is not None:
            try:  # we still hold the GPUs: every compute process on them is our engine's
                pids = sorted({pid for r in self.refs if r.nvml_index is not None
                               for pid, _ in self.nvml.compute_processes(r.nvml_index)})
            except (GpuError, OSError) as e:
                say(f"cannot list the sleeping engine's GPU processes ({e})")
        return True, pids

    def _wake(self) -> bool:
        from ftkit.gateways.http import request_json

        url = self.o.sleep_url.rstrip("/")  # type: ignore[union-attr]
        try:
            request_json("POST", f"{url}/wake_up", timeout=max(120.0, self.o.grace_s))
        except HttpError as e:
            say(f"wake_up failed: {e}")
            return False
        return True


def _open_nvml() -> Any:
    """NVML where a driver is present. Without any NVIDIA device node there is no driver to
    talk to, and loading the library to find that out costs a tenth of a second per lease."""
    from ftkit.gpu.nvml import SIMULATED_ENV, open_nvml

    if not os.environ.get(SIMULATED_ENV) and not any(
            os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")):
        return None
    return open_nvml()


def run(opts: Options) -> int:
    """Run `opts.command` under the lease; the exit code to leave with."""
    if opts.role not in ("train", "serve"):
        raise UserError(f"--role must be train or serve, not {opts.role!r}")
    if not opts.command:
        raise UserError("no command: ftkit lease --gpus 0 -- COMMAND...")
    if opts.sleep_url and opts.role != "serve":
        raise UserError("--sleep-url is for --role serve (a vLLM engine to put to sleep)")
    if not opts.gpus:
        return _exec(opts.command)  # no GPU: nothing to lease
    nvml = _open_nvml()
    lease = Lease(opts, nvml)
    if _covered_by_parent(lease.dir, lease.names):
        lease.close()
        return _exec(opts.command)
    lease.install_signals()
    become_subreaper()
    try:
        if opts.role == "train":
            return lease.run_train()
        return lease.run_serve()
    except WaitInterrupted as e:
        say(f"interrupted by {signal.Signals(e.signum).name} before the command started; nothing ran")
        return 128 + e.signum
    except CannotRun as e:
        say(e.message)
        return e.code
    finally:
        if lease.tree is not None and not lease.tree.done():
            lease.tree.stop(opts.grace_s)
        lease.close()
        if nvml is not None:
            nvml.close()
