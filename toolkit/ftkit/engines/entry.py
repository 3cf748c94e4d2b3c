"""Shared start-up for `python -m ftkit.engines.*`: ftkit errors become a one-line message
and a non-zero exit, not a traceback, so the runner's log tail says what went wrong."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ftkit.errors import FtkitError


@contextmanager
def guarded(what: str) -> Iterator[None]:
    try:
        yield
    except FtkitError as e:
        print(f"ftkit {what}: {e.render()}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
