"""Ctrl-C and SIGTERM during a run: the first one stops the work, none stops the cleanup.

While steps run, the first SIGINT or SIGTERM raises `Interrupted` in the main thread, so the
step in progress is stopped and marked interrupted. From that moment on (and during the
normal cleanup at the end of a run) signals are only noted: the restores - servers, the
serving service, power limits - always run to the end. A second Ctrl-C during cleanup
prints where things stand instead of leaving a machine capped. SIGKILL cannot be caught;
for that, the power originals are on disk and `ftkit power restore` / `ftkit down` exist.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal stopped the run. BaseException, like KeyboardInterrupt: `except Exception`
    in step code must not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


class SignalGate:
    """Installs the handlers for the span of a run (main thread only).

    The handler takes no lock and touches no Python stream: it may run in the middle of
    any code, including a print that holds the display's lock. It writes with os.write."""

    def __init__(self) -> None:
        self.cleaning = False
        self.deferring = 0
        self.pending: int | None = None
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalGate:
        for sig in HANDLED:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.cleaning:
            _write(f"ftkit: {signal.Signals(signum).name} received while restoring the machine; the restore goes "
                   "on (SIGKILL abandons it: then run `ftkit power restore` and `ftkit down`)")
            return
        if self.deferring:
            self.pending = self.pending or signum  # raised when the deferred section ends
            return
        self.cleaning = True  # before raising: a second signal must not interrupt the unwinding
        raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a signal back across a section that must finish as a whole (a server's
        start and the guard that stops it); it is raised right after the section."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
            if not self.deferring and self.pending is not None and not self.cleaning:
                signum, self.pending = self.pending, None
                self.cleaning = True
                raise Interrupted(signum)

    def first(self) -> Interrupted | None:
        """The first signal received, if any (also one noted while a handler ran)."""
        return Interrupted(self.received[0]) if self.received else None

    def cleanup(self) -> None:
        """From now on signals are noted, never raised."""
        self.cleaning = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _write(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass
