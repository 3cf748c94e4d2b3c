"""`ftkit lease`: run a command while holding GPUs exclusively (and `--show` who does)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ftkit.cli.params import SECONDS, CheckedPath


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--gpus", "gpus_text", metavar="0,1", help="host GPU indices (as the plan and nvidia-smi number "
              "them), or UUIDs; `none` or empty: no GPU, run the command directly")
@click.option("--role", type=click.Choice(["train", "serve"]), default="train", show_default=True,
              help="train (also merge/eval) waits its turn and never yields; serve is preemptible")
@click.option("--lease-dir", type=CheckedPath(file_okay=False, path_type=Path), default=None,
              help="the lease directory (default: $FTKIT_LEASE_DIR, else /run/lock/ftkit where writable, "
              "else ~/.cache/ftkit/lease)")
@click.option("--wait/--no-wait", default=True, help="wait for busy GPUs (default), or fail at once (exit 75)")
@click.option("--timeout", type=SECONDS, default=None, metavar="S", help="give up after S seconds (exit 75)")
@click.option("--service", default=None, help="name in the holder record (default: $FTKIT_SERVICE)")
@click.option("--grace", type=SECONDS, default=30.0, show_default=True, metavar="S",
              help="serve: seconds between SIGTERM and SIGKILL when the engine yields")
@click.option("--max-power-w", "max_power", default=None, metavar="W|0=W,1=W",
              help="refuse to start while a GPU's enforced power limit is above this cap")
@click.option("--sleep-url", default=None, metavar="URL",
              help="serve: put vLLM to sleep (POST URL/sleep?level=1) instead of stopping it; needs "
              "VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode; loopback only: http://127.0.0.1:PORT, "
              "http://[::1]:PORT or http://localhost:PORT")
@click.option("--show", is_flag=True, help="list who holds and who waits for GPUs, and exit")
@click.option("--json", "as_json", is_flag=True, help="with --show: JSON")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def lease(gpus_text: str | None, role: str, lease_dir: Path | None, wait: bool, timeout: float | None,
          service: str | None, grace: float, max_power: str | None, sleep_url: str | None, show: bool,
          as_json: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND holding GPUs exclusively: `ftkit lease --gpus 0,1 --role train -- CMD...`.

    One kernel flock per GPU in the lease directory, taken in one global order; the kernel
    drops them when the holder dies, so nothing goes stale. Waiting says who holds the GPU
    and since when. A `serve` holder stops (or puts to sleep) its engine when a `train`
    waiter appears, and takes the GPUs back afterwards.

    Exit code: COMMAND's (128+N if signal N killed it); 75 GPUs busy (--no-wait) or
    --timeout ran out; 78 refused by a backstop (a process outside the lease holds GPU
    memory, or a power limit is above --max-power-w); 2 bad arguments; 127/126 COMMAND not
    found/not runnable."""
    from ftkit.errors import UserError
    from ftkit.lease.paths import default_lease_dir

    directory = lease_dir or default_lease_dir(None)
    if show:
        if command:
            raise UserError("--show takes no command")
        _show(directory, as_json)
        return
    if as_json:
        raise UserError("--json goes with --show")
    if gpus_text is None:
        raise UserError("--gpus is required (host indices such as 0,1, or `none`)",
                        hint="ftkit lease --gpus 0,1 --role train -- COMMAND...")
    if timeout is not None and not wait:
        raise UserError("--timeout and --no-wait exclude each other")
    if sleep_url is not None:
        from ftkit.strict import loopback_http_url

        loopback_http_url(sleep_url, "--sleep-url")

    from ftkit.lease.backstops import parse_power_caps
    from ftkit.lease.gpus import parse_gpus
    from ftkit.lease.supervise import SERVICE_ENV, Options, run

    gpus = parse_gpus(gpus_text)
    opts = Options(
        gpus=gpus, role=role, lease_dir=directory, command=list(command),
        timeout=0.0 if not wait else timeout, service=service or os.environ.get(SERVICE_ENV) or None,
        grace_s=grace, caps=parse_power_caps(max_power, gpus), sleep_url=sleep_url,
    )
    sys.exit(run(opts))


def _show(directory: Path, as_json: bool) -> None:
    from ftkit.lease import holders

    parties = holders(directory) if directory.is_dir() else []
    if as_json:
        click.echo(json.dumps({"lease_dir": str(directory), "parties": [p.as_dict() for p in parties]}, indent=2))
        return
    click.echo(f"lease directory: {directory}")
    if not parties:
        click.echo("nobody holds or waits for a GPU")
        return
    from ftkit.text import printable

    for p in parties:  # anyone who may write the lease directory wrote these: shown escaped
        cmd = printable(" ".join(p.command))
        cmd = cmd if len(cmd) <= 60 else cmd[:57] + "..."
        state = printable(p.state)[:20]
        click.echo(f"{state:<9} GPU {p.gpu_label:<7} {p.describe()}  {cmd}")


COMMANDS = [lease]
