"""The GPU lease: one owner per GPU at a time, whoever starts the containers.

Kernel flocks on one file per GPU in a shared directory (bind-mounted into every
container at /ftkit/lease). The kernel drops a lock when its holder dies, so nothing goes
stale. `ftkit lease` (run.py) is the entrypoint of every GPU-using service and wraps
`ftkit up`'s GPU steps on the host; this module is the Python view for `ftkit status`,
`ftkit doctor` and the runner:

    holders(lease_dir)              live participants: holders, waiters, yielded servers
    default_lease_dir(paths_lease)  where the lease lives on this machine
    hold(gpus, ...)                 hold GPUs in-process (a `with` block), train role

Only the standard library and ftkit.gpu are imported here: `ftkit --help` stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ftkit.lease.paths import CONTAINER_DIR, ENV, default_lease_dir, ensure_lease_dir
from ftkit.lease.records import Party, live_parties

EXIT_BUSY = 75  # --no-wait found the GPUs busy, or --timeout ran out (sysexits EX_TEMPFAIL)
EXIT_REFUSED = 78  # a backstop refused: foreign GPU process, or power limit above the cap (EX_CONFIG)
EXIT_USAGE = 2  # bad arguments; nothing ran

__all__ = [
    "CONTAINER_DIR", "ENV", "EXIT_BUSY", "EXIT_REFUSED", "EXIT_USAGE", "Party", "default_lease_dir",
    "ensure_lease_dir", "hold", "holders",
]


def holders(lease_dir: str | Path) -> list[Party]:
    """Every live participant of the lease in `lease_dir`, oldest first: `state` is
    `holding`, `waiting`, `yielded` (a serve supervisor whose engine is stopped or asleep)
    or `stopping`. Reading takes no lock anyone could wait on; dead records are removed."""
    return live_parties(Path(lease_dir))


@contextmanager
def hold(
    gpus: Sequence[int | str],
    *,
    lease_dir: str | Path | None = None,
    timeout: float | None = None,
    service: str | None = None,
    max_power_w: dict[int | None, float] | None = None,
    command: Sequence[str] = (),
) -> Iterator[Party]:
    """Hold `gpus` (host indices) as a `train` holder for the `with` block.

    For code that runs the GPU work in its own process. Prefer wrapping a subprocess in
    `ftkit lease` where possible: there the command dies with the lease and keeps the
    locks while it lives; here the locks go when this process ends, whatever its children
    do. Raises LeaseBusy after `timeout` seconds (0: do not wait), LeaseRefused when a
    backstop refuses."""
    from ftkit.errors import LeaseBusy
    from ftkit.gpu.nvml import open_nvml
    from ftkit.lease import backstops
    from ftkit.lease.flocks import GpuLocks
    from ftkit.lease.gpus import lock_order, resolve
    from ftkit.lease.records import Presence, new_party
    from ftkit.lease.supervise import describe_holder

    nvml = open_nvml()
    try:
        refs, _ = resolve(list(gpus), nvml)
        names = lock_order(refs)
        d = ensure_lease_dir(Path(lease_dir) if lease_dir else default_lease_dir())
        locks = GpuLocks(d, names)
        party = new_party("train", gpus=[r.as_dict() for r in refs], locks=names, command=command, service=service)
        if timeout == 0:  # no waiting: do not register as a waiter, a serve holder would yield for nothing
            busy = locks.try_all()
            if busy is not None:
                locks.close()
                raise LeaseBusy(f"ftkit lease: GPU busy: {describe_holder(d, busy, refs)}")
            party.state = "holding"
        presence = Presence(d, party)
        try:
            if timeout != 0:
                deadline = None if timeout is None else time.monotonic() + timeout
                busy = locks.acquire(deadline=deadline, on_busy=lambda _n: None)
                if busy is not None:
                    raise LeaseBusy(f"ftkit lease: gave up after {timeout:g} s: {describe_holder(d, busy, refs)}")
                presence.update(state="holding")
            locks.write_record(party.as_dict())
            if nvml is not None:
                backstops.check_power(nvml, refs, max_power_w or {})
                tolerated = {pid for p in live_parties(d) if p.sleeping for pid in p.gpu_pids}
                backstops.check_processes(nvml, refs, tolerated=tolerated)
            yield party
        finally:
            locks.close()
            presence.close()
    finally:
        if nvml is not None:
            nvml.close()
