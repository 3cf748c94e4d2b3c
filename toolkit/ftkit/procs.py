"""Naming a process so that a record of it stays true: a pid with its kernel start time.

Lives below every package that records holders (gpu's power record, run's journal), so
none of them has to import a higher layer to ask "is that process still the one?"."""

from __future__ import annotations

import os


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses), so
    index 0 is the state, 1 the parent, 2 the process group, 19 the start time; None when
    the process is gone or the line is not one."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    cut = stat.rfind(")")
    return stat[cut + 2:].split() if cut >= 0 else None


def group_members(pgid: int, not_before: int | None = None) -> list[int]:
    """The processes in process group `pgid` (that started no earlier than `not_before`, the
    group leader's start time, when given: the leader may be dead and its pid reused)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        try:
            pgrp, start = int(fields[2]), int(fields[19])  # type: ignore[index]
        except (TypeError, IndexError, ValueError):
            continue
        if pgrp == pgid and (not_before is None or start >= not_before):
            out.append(int(entry))
    return out


def process_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when it is gone.
    A pid together with its start time names one process: pids are reused, this pair is not."""
    fields = stat_fields(pid)
    try:
        return int(fields[19])  # type: ignore[index]  # field 22 of the whole line
    except (TypeError, IndexError, ValueError):
        return None


def is_alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and process_start(pid) == start
