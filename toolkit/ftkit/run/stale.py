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
from typing import Any

from ftkit.files import read_json
from ftkit.procs import group_members, is_alive
from ftkit.run.rundir import DONE, Journal, RunDir, iso_now, owner_state


def runs_in(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / "state.json").is_file()), key=lambda p: p.name)


def state_of(run: Path) -> dict[str, Any]:
    """The run's journal; {} when there is none, or it is damaged (not JSON, or JSON but not an
    object: a list or a number would stop `ftkit down` with a TypeError)."""
    try:
        st = read_json(run / "state.json")
    except (OSError, ValueError):
        return {}
    return dict(st) if isinstance(st, dict) else {}


def is_stale(run: Path) -> bool:
    """The journal says running, but no ftkit drives the run: its owner lock is free (the
    kernel dropped it when that ftkit died), or - for a run without one - its pid is gone."""
    st = state_of(run)
    if not st:  # no journal, or a damaged one: the owner lock and the machine-wide record decide
        held = owner_state(run)
        return held is False or (held is None and bool(_capped_by_dead(run)))
    if st.get("status") != "running" or compose_driven(st):  # docker compose drives it: no ftkit to die
        return False
    held = owner_state(run)
    if held is not None:
        return not held
    import socket

    if st.get("host") not in (None, socket.gethostname()):
        return False
    return not is_alive(st.get("pid"), st.get("pid_start"))


def compose_driven(state: dict[str, Any]) -> bool:
    """A run plain `docker compose` drives (ftkit.run.stackjournal): its containers journal it."""
    from ftkit.run.stackjournal import DRIVER

    return state.get("driver") == DRIVER


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


def _run_containers(run: Path, plan: dict[str, Any] | None, host: str | None) -> list[dict[str, Any]]:
    """The containers of this run: by the labels its plan gave its steps (the plan is the one
    source; runs planned before labels were unique carry their directory's name), else by
    the label its path gives (plan.json gone)."""
    from ftkit.gateways import docker as dk
    from ftkit.plan.spec import run_label

    labels = {str(s["labels"]["dev.ftkit.run"]) for s in (plan or {}).get("steps") or []
              if isinstance(s, dict) and isinstance(s.get("labels"), dict) and s["labels"].get("dev.ftkit.run")}
    if not labels:
        labels = {run_label(str(run.resolve()))}
    seen: dict[str, dict[str, Any]] = {}
    for label in sorted(labels):
        for c in dk.containers_with_label(f"dev.ftkit.run={label}", host):
            seen.setdefault(c["Id"], c)
    return list(seen.values())


def stop_leftovers(run: Path, plan: dict[str, Any] | None = None, *, docker_host: str | None = None,
                   report: CleanReport | None = None) -> CleanReport:
    """Containers labelled with this run and recorded processes that are still alive."""
    report = report or CleanReport()
    st = state_of(run)
    for entry in (st.get("steps") or {}).values():
        proc = entry.get("process") or {}
        if "pid" in proc and _kill_group(int(proc["pid"]), proc.get("pid_start")):
            report.processes.append(int(proc["pid"]))
    if plan is not None and plan.get("executor") != "docker" and not any(
            s.get("executor") == "docker" for s in plan.get("steps", [])):
        return report
    # a multi-node step's containers run on each node's engine too (plan.cluster)
    hosts = [docker_host] + sorted({n["docker_host"] for s in (plan or {}).get("steps", [])
                                    for n in s.get("nodes") or [] if n.get("docker_host")} - {docker_host})
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
    if compose_driven(state_of(run)):  # its containers are a compose project's, not this run's to stop
        report = CleanReport(problems=["docker compose drives this run, not ftkit: stop it in its stack directory "
                                       "(`docker compose --profile train --profile serve down`)"])
        for line in report.lines():
            say(line)
        return report
    plan = None
    damaged: list[str] = []
    try:
        plan = read_json(run / "plan.json")
        if not isinstance(plan, dict):
            damaged.append("plan.json is not a plan")
            plan = None
    except (OSError, ValueError) as e:
        damaged.append(f"plan.json: {getattr(e, 'reason', None) or getattr(e, 'strerror', None) or e}")
    docker_host = ((plan or {}).get("docker") or {}).get("host") if isinstance((plan or {}).get("docker"), dict) else None
    report = stop_leftovers(run, plan, docker_host=docker_host)
    stale = is_stale(run)
    if stale and restore_machine:
        if plan is not None:
            _restore_machine(run, plan, report)
        if _capped_by_dead(run) or (plan is None and not report.power):
            _restore_recorded_power(run, report)
        if plan is None:
            report.problems.append(f"{damaged[0] if damaged else 'plan.json is missing'}: power was restored from "
                                   "the machine-wide record; a serving service this run stopped was not started "
                                   "again (start it by hand)")
    if stale:
        journal = Journal.__new__(Journal)  # load without claiming: this ftkit does not drive the run
        journal.path = run / "state.json"
        journal.state = state_of(run)
        unreadable = not journal.state
        steps = journal.state.get("steps")
        for entry in (steps.values() if isinstance(steps, dict) else []):
            if isinstance(entry, dict) and entry.get("status") == "running":
                entry["status"] = "interrupted"
                entry["reason"] = "ftkit died while this step ran"
        message = journal.state.get("message") if isinstance(journal.state.get("message"), str) else None
        journal.finish("failed", message=message or ("ftkit died (the run went stale); state.json was missing or "
                                                     "unreadable" if unreadable else "ftkit died (the run went stale)"),
                       cleaned=True)
    elif (report.processes or report.containers) and isinstance(state_of(run).get("left_running"), list):
        _record_stopped(run, report)
    for line in report.lines():
        say(line)
    return report


def _record_stopped(run: Path, report: CleanReport) -> None:
    """A finished run whose servers `ftkit down` stopped: its journal says so (the servers are
    no longer `left_running`; `ftkit status` reads that), and when."""
    journal = Journal.__new__(Journal)  # load without claiming: the run is over
    journal.path = run / "state.json"
    journal.state = state_of(run)
    stopped = [*map(str, report.processes), *report.containers]
    journal.state["stopped_by_down"] = {"at": iso_now(), "stopped": stopped,
                                        "were_left_running": journal.state.get("left_running") or []}
    journal.state["left_running"] = []
    steps = journal.state.get("steps")
    for entry in (steps.values() if isinstance(steps, dict) else []):
        if isinstance(entry, dict) and entry.pop("left_running", None):
            entry["stopped"] = True
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
    st = state_of(run)
    originals = (st.get("power") or {}).get("original_w") if isinstance(st.get("power"), dict) else None
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


def _restore_machine(run: Path, plan: dict[str, Any], report: CleanReport) -> None:
    steps = plan.get("steps", [])
    capped = sorted({int(g) for s in steps if s.get("kind") == "power" for g in (s.get("power_caps_w") or {})})
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
    st = state_of(run)
    stopped = (st.get("steps", {}).get("handoff-stop") or {}).get("status") == "succeeded"
    restarted = (st.get("steps", {}).get("handoff-start") or {}).get("status") in DONE
    start = next((s for s in steps if s.get("kind") == "handoff-start"), None)
    if stopped and not restarted and start:
        from ftkit.gateways import subprocess as sp

        try:
            sp.run(start["argv"], log_file=RunDir(run).log("handoff-start"))
            report.service = "started again: " + " ".join(start["argv"])
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"serving service: {e}")
