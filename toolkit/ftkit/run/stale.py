"""Runs whose ftkit died, and what they left behind.

A run is stale when its journal says running but the ftkit process it names (pid plus the
kernel's start time, on this host) is gone - killed with SIGKILL, the machine rebooted.
Local children died with it (parent-death signal); containers and servers meant to keep
running did not. `clean()` stops them by the run's label and recorded pids, puts the
machine back (power limits from the machine-wide record, the serving service started
again when the run had stopped it) and closes the journal truthfully.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.procs import group_members, is_alive
from ftkit.run.record import DONE, RunState, load_plan, view_state
from ftkit.run.record import read_state as state_of  # the journal as JSON ({}: none), for `status --json`
from ftkit.run.rundir import Journal, RunDir, iso_now, owner_state

if TYPE_CHECKING:
    from ftkit.plan.spec import Plan

__all__ = ["CleanReport", "clean", "compose_driven", "is_stale", "runs_in", "state_of", "stop_leftovers"]


def runs_in(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / "state.json").is_file()), key=lambda p: p.name)


def is_stale(run: Path) -> bool:
    """The journal says running, but no ftkit drives the run: its owner lock is free (the
    kernel dropped it when that ftkit died), or - for a run without one - its pid is gone."""
    st = view_state(run)
    if st is None:  # no journal, or a damaged one: the owner lock and the machine-wide record decide
        held = owner_state(run)
        return held is False or (held is None and bool(_capped_by_dead(run)))
    if st.status != "running" or compose_driven(st):  # docker compose drives it: no ftkit to die
        return False
    held = owner_state(run)
    if held is not None:
        return not held
    import socket

    if st.host not in (None, socket.gethostname()):
        return False
    return not is_alive(st.pid, st.pid_start)


def compose_driven(state: RunState | None) -> bool:
    """A run plain `docker compose` drives (ftkit.run.stackjournal): its containers journal it."""
    from ftkit.run.stackjournal import DRIVER

    return state is not None and state.driver == DRIVER


@dataclass
class CleanReport:
    containers: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    power: str = ""
    service: str = ""
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"removed container {c}" for c in self.containers]
        out += [f"stopped process {p}" for p in self.processes]
        if self.power:
            out.append(f"power: {self.power}")
        if self.service:
            out.append(f"serving service: {self.service}")
        out += [f"problem: {p}" for p in self.problems]
        return out or ["nothing was left running"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kill_group(pid: int, start: int | None, grace_s: float = 10.0) -> bool:
    """SIGTERM what is left of the process group the recorded pid led (it may be dead
    while its workers live on), SIGKILL after the grace period."""
    if start is None:
        return False
    members = group_members(pid, start)
    if not members:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in group_members(pid, start):
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        t_end = time.monotonic() + grace_s
        while time.monotonic() < t_end and group_members(pid, start):
            time.sleep(0.1)
        if not group_members(pid, start):
            break
    return True


def _run_containers(run: Path, plan: Plan | None, host: str | None) -> list[dict[str, Any]]:
    """The containers of this run: by the labels its plan gave its steps (the plan is the one
    source; runs planned before labels were unique carry their directory's name), else by
    the label its path gives (plan.json gone)."""
    from ftkit.gateways import docker as dk
    from ftkit.plan.spec import run_label

    labels = {s.labels["dev.ftkit.run"] for s in (plan.steps if plan else []) if s.labels.get("dev.ftkit.run")}
    if not labels:
        labels = {run_label(str(run.resolve()))}
    seen: dict[str, dict[str, Any]] = {}
    for label in sorted(labels):
        for c in dk.containers_with_label(f"dev.ftkit.run={label}", host):
            seen.setdefault(c["Id"], c)
    return list(seen.values())


def stop_leftovers(run: Path, plan: Plan | None = None, *, docker_host: str | None = None,
                   report: CleanReport | None = None) -> CleanReport:
    """Containers labelled with this run and recorded processes that are still alive."""
    report = report or CleanReport()
    st = view_state(run)
    for entry in (st.steps if st else {}).values():
        proc = entry.process or {}
        if _is_int(proc.get("pid")) and _kill_group(proc["pid"], proc.get("pid_start")):
            report.processes.append(proc["pid"])
    if plan is not None and plan.executor != "docker" and not any(s.executor == "docker" for s in plan.steps):
        return report
    # a multi-node step's containers run on each node's engine too (plan.cluster)
    hosts = [docker_host] + sorted({n.docker_host for s in (plan.steps if plan else [])
                                    for n in s.nodes if n.docker_host} - {docker_host})
    for host in hosts:
        try:
            from ftkit.gateways import docker as dk

            if not dk.reachable(host):
                if host != docker_host:
                    report.problems.append(f"containers on {host}: its Docker engine does not answer")
                continue
            for c in _run_containers(run, plan, host):
                dk.stop_container(c["Id"], 10, host)
                dk.remove_container(c["Id"], host)
                report.containers.append(c["Id"][:12])
        except Exception as e:  # noqa: BLE001 - report, go on with the rest of the clean-up
            report.problems.append(f"containers: {e}")
    return report


def _capped_by_dead(run: Path) -> list[int]:
    """GPUs the machine-wide power record says this run caps, its ftkit gone."""
    try:
        from ftkit.gpu import power

        return power.dead_holdings(run.name)
    except Exception:  # noqa: BLE001 - an unreadable record is reported where it is restored
        return []


def clean(run: Path, *, say: Callable[[str], None] = lambda m: None, restore_machine: bool = True) -> CleanReport:
    """Stop what a stale (or finished) run left running; for a stale run also put the machine
    back and close its journal. The power limits go back by what the machine-wide record
    says this run holds, also when plan.json or state.json is gone or damaged."""
    if compose_driven(view_state(run)):  # its containers are a compose project's, not this run's to stop
        report = CleanReport(problems=["docker compose drives this run, not ftkit: stop it in its stack directory "
                                       "(`docker compose --profile train --profile serve down`)"])
        for line in report.lines():
            say(line)
        return report
    plan, damaged = load_plan(run)
    report = stop_leftovers(run, plan, docker_host=plan.docker_host if plan else None)
    stale = is_stale(run)
    if stale and restore_machine:
        if plan is not None:
            _restore_machine(run, plan, report)
        if _capped_by_dead(run) or (plan is None and not report.power):
            _restore_recorded_power(run, report)
        if plan is None:
            report.problems.append(f"{damaged or 'plan.json is missing'}: power was restored from "
                                   "the machine-wide record; a serving service this run stopped was not started "
                                   "again (start it by hand)")
    if stale:
        state = view_state(run)
        journal = Journal(run / "state.json", state or RunState())  # not claimed: this ftkit does not drive it
        for entry in journal.state.steps.values():
            if entry.status == "running":
                entry.update(status="interrupted", reason="ftkit died while this step ran")
        journal.finish("failed", message=journal.state.message or (
            "ftkit died (the run went stale); state.json was missing or unreadable" if state is None
            else "ftkit died (the run went stale)"), cleaned=True)
    elif (report.processes or report.containers) and (st := view_state(run)) is not None and st.left_running is not None:
        _record_stopped(run, st, report)
    for line in report.lines():
        say(line)
    return report


def _record_stopped(run: Path, state: RunState, report: CleanReport) -> None:
    """A finished run whose servers `ftkit down` stopped: its journal says so (the servers are
    no longer `left_running`; `ftkit status` reads that), and when."""
    journal = Journal(run / "state.json", state)  # not claimed: the run is over
    stopped = [*map(str, report.processes), *report.containers]
    state.update(stopped_by_down={"at": iso_now(), "stopped": stopped, "were_left_running": state.left_running or []},
                 left_running=[])
    for entry in state.steps.values():
        if entry.drop("left_running"):
            entry.update(stopped=True)
    try:
        journal._flush()
    except OSError as e:
        report.problems.append(f"state.json: the stop could not be recorded ({e.strerror or e})")


def _restore_recorded_power(run: Path, report: CleanReport) -> None:
    """Every cap the machine-wide record says this run holds goes back (another live holder's
    lower cap stays), whatever the run's own files say."""
    try:
        from ftkit.gpu import power
        from ftkit.gpu.nvml import open_nvml

        nv = open_nvml()
        if nv is None:
            report.problems.append("power: NVML is not available to restore the limits")
            return
        try:
            r = power.release(nv, holder=run.name)
            if r.changed or r.kept:
                report.power = "; ".join(x for x in (report.power, r.summary() + " (from the machine-wide record)") if x)
            if r.failed:
                report.problems.append("power: " + "; ".join(f"{who}: {w}" for who, w in r.failed.items()))
        finally:
            nv.close()
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"power: {e}")


def _restore_from_journal(run: Path, nv: Any, indices: list[int], report: CleanReport) -> None:
    """GPUs this run capped that the machine-wide record no longer knows (it was torn and
    removed): back to the originals the run's own journal recorded, and say so."""
    st = view_state(run)
    originals = (st.power or {}).get("original_w") if st is not None else None
    done = []
    for i in indices:
        orig = originals.get(str(i)) if isinstance(originals, dict) else None
        if not isinstance(orig, (int, float)) or isinstance(orig, bool):
            report.problems.append(f"power: GPU {i}: no original limit in the machine-wide record or in "
                                   f"{run / 'state.json'}; set it by hand (`nvidia-smi -q -d POWER` shows the default)")
            continue
        try:
            if abs(nv.power_limit_w(i) - float(orig)) >= 0.5:
                nv.set_power_limit_w(i, float(orig))
                done.append(f"GPU {i}: {float(orig):g} W")
        except Exception as e:  # noqa: BLE001 - one GPU's failure never stops the others
            report.problems.append(f"power: GPU {i}: {e}")
    if done:
        report.power = "; ".join(x for x in (report.power if report.power != "nothing to do" else "",
                                             ", ".join(done) + f" (from {run / 'state.json'}: the machine-wide "
                                             "record had lost them)") if x)


def _restore_machine(run: Path, plan: Plan, report: CleanReport) -> None:
    capped = sorted({int(g) for s in plan.steps if s.kind == "power" for g in s.power_caps_w})
    if capped:
        try:
            from ftkit.gpu import power
            from ftkit.gpu.nvml import open_nvml

            nv = open_nvml()
            if nv is None:
                report.problems.append("power: NVML is not available to restore the limits")
            else:
                try:
                    recorded = power.recorded_indices()
                    r = power.release(nv, holder=run.name, indices=capped)
                    report.power = r.summary()
                    if r.failed:
                        report.problems.append("power: " + "; ".join(f"{who}: {w}" for who, w in r.failed.items()))
                    lost = [i for i in capped if i not in recorded]
                    if lost:
                        _restore_from_journal(run, nv, lost, report)
                finally:
                    nv.close()
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"power: {e}")
    st = view_state(run) or RunState()
    stopped = st.status_of("handoff-stop") == "succeeded"
    restarted = st.status_of("handoff-start") in DONE
    start = next((s for s in plan.steps if s.kind == "handoff-start"), None)
    if stopped and not restarted and start:
        from ftkit.gateways import subprocess as sp

        try:
            sp.run(start.argv, log_file=RunDir(run).log("handoff-start"))
            report.service = "started again: " + " ".join(start.argv)
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"serving service: {e}")
