"""What a person sees while `ftkit up` runs: the steps with status and times, training
progress (step, loss, tokens/s, ETA, read from metrics.jsonl), the serve step's test
prompts with answers and pass/fail, the lease's waiting messages, and where the logs are.

Third-party noise (tqdm bars, library warnings, the trainer's dicts) goes only to the step
logs. On a terminal the display is a live panel (rich); otherwise - CI, a pipe, a log
file - it writes plain lines, a few per step.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ftkit.plan.spec import Plan, StepSpec

MARK = {"pending": " ", "running": ">", "succeeded": "ok", "failed": "FAILED", "skipped": "-",
        "interrupted": "INTERRUPTED"}


@dataclass
class Progress:
    step: int = 0
    total: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    epoch: float | None = None
    eta_s: float | None = None


@dataclass
class Row:
    step: StepSpec
    status: str = "pending"
    seconds: float | None = None
    note: str = ""
    t0: float | None = None
    progress: Progress | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60):02d} s"


class Display:
    """Plain lines; the base of the live display."""

    def __init__(self, plan: Plan, *, stream: TextIO | None = None) -> None:
        self.plan = plan
        self.out = stream or sys.stderr
        self.rows = {s.id: Row(s) for s in plan.steps}
        self.order = [s.id for s in plan.steps]
        self._lock = threading.Lock()
        self._last_progress = 0.0
        self._broken = False

    # -- events from the runner -----------------------------------------------------------

    def start(self, run_dir: str) -> None:
        self.say(f"ftkit: run {self.plan.recipe} on {self.plan.machine} ({self.plan.executor} executor); "
                 f"run directory {run_dir}")

    def step_started(self, step: StepSpec) -> None:
        row = self.rows[step.id]
        row.status, row.t0 = "running", time.monotonic()
        self.say(f"[{self._n(step)}] {step.id}: {step.description}")

    def step_finished(self, step: StepSpec, status: str, message: str = "") -> None:
        row = self.rows[step.id]
        row.status = status
        row.seconds = time.monotonic() - row.t0 if row.t0 else None
        row.note = message
        took = f" in {_fmt_s(row.seconds)}" if row.seconds is not None else ""
        text = f"[{self._n(step)}] {step.id}: {MARK.get(status, status)}{took}"
        if message:
            sep = "\n" if "\n" in message else ": " if status in ("failed", "interrupted") else " ("
            text += f"{sep}{message}" + (")" if sep == " (" else "")
        self.say(text)

    def step_skipped(self, step: StepSpec, reason: str) -> None:
        self.rows[step.id].status = "skipped"
        self.rows[step.id].note = reason

    def line(self, step: StepSpec, text: str) -> None:
        """One line of a step's output: only the lease's messages reach the console (and, for a
        multi-node step, whose lines come as `[node] text`, the nodes started by hand)."""
        body = text.split("] ", 1)[1] if step.nodes and text.startswith("[") and "] " in text else text
        if body.startswith(("ftkit lease", "ftkit: building", "ftkit: start node")):
            self.say(f"    {step.id}: {text}")

    def progress(self, step: StepSpec, p: Progress) -> None:
        last = self.rows[step.id].progress
        self.rows[step.id].progress = p
        now = time.monotonic()
        if (last is None or last.step != p.step) and now - self._last_progress >= 15:  # plain lines: every 15 s at most
            self._last_progress = now
            self.say(f"    {step.id}: {progress_text(p)}")

    def prompts(self, step: StepSpec, results: list[dict[str, Any]]) -> None:
        self.rows[step.id].prompts = results
        for r in results:
            mark = "pass" if r["passed"] else "FAIL"
            answer = (r.get("answer") or r.get("error") or "").strip().replace("\n", " ")
            self.say(f"    {mark}: {r['prompt'].strip()[:50]!r} -> {answer[:70]!r}")

    def note(self, text: str) -> None:
        self.say(f"ftkit: {text}")

    def finish(self, status: str, run_dir: str) -> None:
        self.say(f"ftkit: run {status}; logs in {run_dir}/logs/")

    def close(self) -> None:
        pass

    # -- helpers --------------------------------------------------------------------------

    def _n(self, step: StepSpec) -> str:
        return f"{self.order.index(step.id) + 1}/{len(self.order)}"

    def say(self, text: str) -> None:
        """Print a line; a console that fails (a closed terminal, EIO after SIGHUP) makes
        the display go quiet, never the run fail: everything is in the journal and logs."""
        if self._broken:
            return
        with self._lock:
            try:
                print(text, file=self.out, flush=True)
            except (OSError, ValueError):
                self._broken = True


def progress_text(p: Progress) -> str:
    parts = [f"step {p.step}" + (f"/{p.total}" if p.total else "")]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.tokens_per_s is not None:
        parts.append(f"{p.tokens_per_s:,.0f} tokens/s")
    if p.eta_s is not None:
        parts.append(f"ETA {_fmt_s(p.eta_s)}")
    return ", ".join(parts)


class LiveDisplay(Display):
    """A rich live panel on a terminal: the step table, a progress bar for training, the
    test prompts, the last messages."""

    def __init__(self, plan: Plan, *, stream: TextIO | None = None) -> None:
        super().__init__(plan, stream=stream)
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=self.out)
        self.messages: list[str] = []
        self.live = Live(console=self.console, refresh_per_second=4, transient=False, get_renderable=self._render)
        self.live.start()

    def say(self, text: str) -> None:
        with self._lock:
            self.messages = (self.messages + [text])[-6:]

    def progress(self, step: StepSpec, p: Progress) -> None:
        self.rows[step.id].progress = p

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        table.add_column("", width=3)
        table.add_column("step")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("")
        style = {"succeeded": "green", "failed": "red", "interrupted": "red", "running": "yellow", "skipped": "dim"}
        for sid in self.order:
            row = self.rows[sid]
            secs = row.seconds if row.seconds is not None else (time.monotonic() - row.t0 if row.t0 and
                                                                 row.status == "running" else None)
            note = row.note.splitlines()[0][:60] if row.note else ""
            if row.status == "running" and row.progress:
                note = progress_text(row.progress)
            table.add_row(str(self.order.index(sid) + 1), row.step.id, Text(row.status, style=style.get(row.status, "")),
                          _fmt_s(secs), note)
        parts: list[Any] = [Text(f"ftkit up: {self.plan.recipe} on {self.plan.machine}", style="bold"), table]
        for sid in self.order:
            row = self.rows[sid]
            if row.status == "running" and row.progress and row.progress.total:
                parts.append(ProgressBar(total=row.progress.total, completed=row.progress.step, width=50))
            for r in row.prompts:
                mark = Text("pass" if r["passed"] else "FAIL", style="green" if r["passed"] else "red")
                answer = (r.get("answer") or r.get("error") or "").strip().replace("\n", " ")[:60]
                parts.append(Text.assemble("  ", mark, f"  {r['prompt'].strip()[:40]!r} -> {answer!r}"))
        parts += [Text(m, style="dim") for m in self.messages]
        return Group(*parts)

    def finish(self, status: str, run_dir: str) -> None:
        self.messages.append(f"ftkit: run {status}; logs in {run_dir}/logs/")

    def close(self) -> None:
        self.live.stop()


def make_display(plan: Plan, *, live: bool | None = None, stream: TextIO | None = None) -> Display:
    out = stream or sys.stderr
    if live is None:
        live = out.isatty()
    return LiveDisplay(plan, stream=out) if live else Display(plan, stream=out)
