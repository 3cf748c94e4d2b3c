"""Shared start-up for `python -m ftkit.engines.*`: read the engine config the plan wrote,
and turn ftkit errors into a one-line message and a non-zero exit, not a traceback, so the
runner's log tail says what went wrong."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError


@contextmanager
def guarded(what: str) -> Iterator[None]:
    try:
        yield
    except FtkitError as e:
        print(f"ftkit {what}: {e.render()}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def main_with_config(what: str, module: str, run: Callable[[dict[str, Any]], Any], argv: list[str] | None = None) -> Any:
    """`python -m MODULE --config FILE`: load the JSON config and call run(config)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=f"ftkit's {what} engine")
    ap.add_argument("--config", required=True, help="the engine config written by the plan")
    args = ap.parse_args(argv)
    try:
        cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"ftkit {what}: cannot read config {args.config}: {e}", file=sys.stderr)
        sys.exit(2)
    with guarded(what):
        return run(cfg)
