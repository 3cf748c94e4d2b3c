"""Shared start-up for `python -m ftkit.engines.*`: read the engine config the plan wrote,
and turn ftkit errors into a one-line message and a non-zero exit, not a traceback, so the
runner's log tail says what went wrong."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError, UserError


@contextmanager
def guarded(what: str, where: str | None = None) -> Iterator[None]:
    """Every rank of a multi-GPU launch meets the same bad input (a dataset row, a config):
    rank 0 says it, once; the others exit with the same code in silence. A full disk is one
    line naming the file (or `where`, the engine's output) and what to do, not a traceback."""
    try:
        yield
    except FtkitError as e:
        if not isinstance(e, UserError) or os.environ.get("RANK", "0") in ("0", ""):
            print(f"ftkit {what}: {e.render()}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        target = e.filename or where or "its output"
        try:
            free = f"; {shutil.disk_usage(os.path.dirname(str(target)) or '.').free / 2**30:.2f} GiB free there now"
        except OSError:
            free = ""
        print(f"ftkit {what}: no space left on the device holding {target} ({e.strerror}{free}); free space and "
              "resume the run (`ftkit up --resume RUN`: training goes on from its last complete checkpoint)",
              file=sys.stderr, flush=True)
        sys.exit(1)


def main_with_config(what: str, module: str, run: Callable[[dict[str, Any]], Any], argv: list[str] | None = None) -> Any:
    """`python -m MODULE --config FILE`: load the JSON config, validate it against the
    plan's job model for this engine (plan.jobs), and call run(config)."""
    from pydantic import ValidationError

    from ftkit.plan.jobs import JOBS

    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=f"ftkit's {what} engine")
    ap.add_argument("--config", required=True, help="the engine config written by the plan")
    args = ap.parse_args(argv)
    try:
        cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"ftkit {what}: cannot read config {args.config}: {e}", file=sys.stderr)
        sys.exit(2)
    job = JOBS.get(what)
    if job is not None:
        try:
            cfg = job.model_validate(cfg).to_json()
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
            print(f"ftkit {what}: {args.config} is not a {job.__name__} ({problems}); re-plan the run with this ftkit",
                  file=sys.stderr)
            sys.exit(2)
    where = cfg.get("output_dir") if isinstance(cfg.get("output_dir"), str) else None
    with guarded(what, where):
        return run(cfg)
