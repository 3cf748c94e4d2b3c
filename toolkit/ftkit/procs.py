"""Naming a process so that a record of it stays true: a pid with its kernel start time.

Lives below every package that records holders (gpu's power record, run's journal), so
none of them has to import a higher layer to ask "is that process still the one?"."""

from __future__ import annotations


def process_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when it is gone.
    A pid together with its start time names one process: pids are reused, this pair is not."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def is_alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and process_start(pid) == start
