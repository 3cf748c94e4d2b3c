"""`ftkit power show|set|restore`: GPU power limits by hand, with the same memory of the
originals that `ftkit up` keeps (a machine-wide record written before any change)."""

from __future__ import annotations

import json

import click

from ftkit.errors import GpuError, UserError

NO_GPUS = "no GPUs here: no NVIDIA driver answers (NVML), so there are no power limits"


def _nvml():  # type: ignore[no-untyped-def]
    """NVML, or GpuError (exit 1): for `restore`, which has recorded originals to put back
    and needs the driver to do it. `show` and `set` handle a machine without GPUs themselves
    (nothing wrong there; a request to cap GPUs that are not there)."""
    from ftkit.gpu.nvml import open_nvml

    nv = open_nvml()
    if nv is None:
        raise GpuError("NVML is not available (no NVIDIA driver on this machine)")
    return nv


def _gpus(text: str | None) -> list[int] | None:
    """`all` -> None; `0,1` -> [0, 1], in ASCII digits only (the same reader as `ftkit lease`)."""
    from ftkit.strict import gpu_index

    if text is None or text == "all":
        return None
    out = sorted({gpu_index(x) for x in text.split(",") if x.strip()})
    if not out:
        raise UserError(f"--gpus {text!r}: give GPU indices like 0,1 (or all)")
    return out


@click.group()
def power() -> None:
    """GPU power limits: show them, cap them, restore the originals."""


@power.command()
@click.option("--json", "as_json", is_flag=True)
def show(as_json: bool) -> None:
    """Each GPU's current limit and the original ftkit recorded before changing it. On a
    machine without GPUs: says so (exit 0); with originals recorded but no driver to
    restore them: exit 1."""
    from ftkit.gpu import power as pw
    from ftkit.gpu.nvml import open_nvml

    nv = open_nvml()
    if nv is None:
        recorded = pw.read_originals()
        if recorded:  # caps were set here and the driver that must undo them is gone: not fine
            gpus = ", ".join(f"GPU {r.get('index', '?')} ({r.get('name', '?')})" for r in recorded.values())
            raise GpuError(f"no NVIDIA driver answers, but {pw.originals_path()} holds the original power limits of "
                           f"{gpus}", hint="check the driver (nvidia-smi), then `ftkit power restore`")
        if as_json:
            click.echo(json.dumps({"originals_file": str(pw.originals_path()), "gpus": [], "nvml": None}, indent=2))
        else:
            click.echo(NO_GPUS)
        return
    try:
        rows = pw.show(nv)
    finally:
        nv.close()
    if as_json:
        click.echo(json.dumps({"originals_file": str(pw.originals_path()), "gpus": rows,
                               "nvml": "simulated" if nv.simulated else "real"}, indent=2))
        return
    if not rows:
        click.echo("no GPUs here: NVML answers but lists none, so there are no power limits")
        return
    sim = " (SIMULATED GPUs)" if rows[0]["simulated"] else ""
    click.echo(f"power limits{sim}; originals recorded in {pw.originals_path()}")
    for r in rows:
        holders = ", ".join(f"{n} ({h['cap_w']:g} W{'' if h['alive'] else ', gone'})" for n, h in r["holders"].items())
        orig = f"original {r['original_w']:g} W (recorded {r['recorded']}; capped by {holders or 'nobody now'})" \
            if r["original_w"] is not None else "not changed by ftkit"
        rng = f", allowed {r['min_w']:g}-{r['max_w']:g} W" if r["min_w"] and r["max_w"] else ""
        click.echo(f"  GPU {r['index']} {r['name']}: {r['limit_w']:g} W now; {orig}; default {r['default_w']}{rng}")


@power.command(name="set")
@click.option("--gpus", default="all", show_default=True, help="GPU indices, e.g. 0,1")
@click.option("--watts", type=click.IntRange(1, 5000), required=True)
@click.option("--dry-run", is_flag=True)
def set_cmd(gpus: str, watts: int, dry_run: bool) -> None:
    """Cap GPUs at WATTS (recording each GPU's original limit first). Needs root on a real GPU."""
    from ftkit.gpu import power as pw
    from ftkit.gpu.nvml import open_nvml

    wanted = _gpus(gpus)  # refused before NVML is opened
    nv = open_nvml()
    if nv is None:  # asking to cap GPUs that are not here is a mistake in the request
        raise UserError(f"cannot set power limits: {NO_GPUS}")
    try:
        inventory = nv.inventory()
        present = [g.index for g in inventory]
        if not present:
            raise UserError("cannot set power limits: NVML lists no GPUs on this machine")
        missing = [i for i in (wanted or []) if i not in present]
        if missing:
            raise UserError(f"--gpus {gpus}: GPU {missing[0]} is not on this machine (NVML lists {present})")
        indices = wanted or present
        for g in inventory:
            if g.index in indices and g.power_min_w and g.power_max_w and not g.power_min_w <= watts <= g.power_max_w:
                raise UserError(f"{watts} W is outside GPU {g.index}'s allowed range {g.power_min_w:g}-{g.power_max_w:g} W")
        if dry_run:
            click.echo(f"would record the current limits of GPU(s) {indices} in {pw.originals_path()} and set "
                       f"{watts} W")
            return
        report = pw.set_limits(nv, {i: watts for i in indices}, holder=pw.Holder(pw.MANUAL))
    finally:
        nv.close()
    click.echo(f"set {report.summary()}; originals recorded in {pw.originals_path()}")


@power.command()
@click.option("--gpus", default="all", show_default=True, help="GPU indices, e.g. 0,1")
@click.option("--force", is_flag=True, help="also GPUs a running ftkit run still caps (it may trip the PSU)")
@click.option("--forget", is_flag=True, help="drop the records of GPUs NVML no longer finds (a card taken out)")
@click.option("--dry-run", is_flag=True)
def restore(gpus: str, force: bool, forget: bool, dry_run: bool) -> None:
    """Put GPUs back at the limits recorded before ftkit first changed them, each on its
    own (one failure does not stop the others; exit 1 when any failed). A GPU a running
    ftkit run still caps keeps that cap unless --force."""
    from ftkit.gpu import power as pw

    wanted = _gpus(gpus)  # refused before anything is read or changed
    recorded = pw.read_originals()
    if not recorded:
        click.echo("nothing to restore: no GPU limit was changed by ftkit")
        return
    if dry_run:
        for key, rec in sorted(recorded.items()):
            click.echo(f"would restore GPU {rec.get('index')} {rec.get('name')} ({key}) to {rec['original_w']:g} W")
        return
    nv = _nvml()
    try:
        report = pw.restore(nv, wanted, force=force, forget=forget)
    finally:
        nv.close()
    for idx, watts in sorted(report.changed.items()):
        click.echo(f"GPU {idx}: restored to {watts:g} W")
    for idx, why in sorted(report.kept.items()):
        click.echo(f"GPU {idx}: {why}")
    for who, why in sorted(report.failed.items()):
        click.echo(f"{who}: FAILED: {why}", err=True)
    if report.failed:
        raise GpuError(f"{len(report.failed)} GPU(s) could not be restored; the record keeps their originals, "
                       "run `ftkit power restore` again")


COMMANDS = [power]
