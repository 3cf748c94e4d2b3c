"""What a person sees while `ftkit up` runs: a line when each step starts and ends (with its
result: the training loss, the eval's accuracy per model), training progress (step, loss,
tokens/s, ETA, read from metrics.jsonl), each test prompt once with its answer and
pass/fail, the lease's waiting messages, and at the end what to look at next.

Third-party noise (tqdm bars, library warnings, the trainer's dicts) goes only to the step
logs. Every line is a whole line, written once, the same on a terminal and in a pipe: on a
terminal a live panel (rich) below those lines shows the steps and a progress bar, and
disappears when the run ends; in a pipe (CI, a log file) training progress comes as a plain
line every 15 s instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ftkit.plan.spec import Plan, StepSpec
from ftkit.text import printable

MARK = {"pending": " ", "running": ">", "succeeded": "ok", "failed": "FAILED", "skipped": "skipped",
        "interrupted": "INTERRUPTED"}
PROMPT_WIDTH = 60  # characters of a test prompt shown
ANSWER_WIDTH = 60


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
    if s is None or not math.isfinite(s) or s < 0:
        return ""
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60):02d} s"


def _number(v: Any) -> float | None:
    """A number read from a file ftkit's engines wrote (but anyone may have): finite and of a
    size an int() or a format takes (JSON allows NaN, Infinity and 1e999), else None."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:  # a 400-digit integer
        return None
    return f if math.isfinite(f) and abs(f) < 1e15 else None


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
        self.t0 = time.monotonic()

    # -- events from the runner -----------------------------------------------------------

    def start(self, run_dir: str) -> None:
        self.t0 = time.monotonic()
        self.say(f"ftkit: run {printable(self.plan.recipe)} on {printable(self.plan.machine)} "
                 f"({self.plan.executor} executor)")
        self.say(f"       run directory {shown_path(run_dir)}")

    def step_started(self, step: StepSpec) -> None:
        row = self.rows[step.id]
        row.status, row.t0 = "running", time.monotonic()
        self.say(f"[{self._n(step)}] {step.id}: {printable(step.description)}")

    def step_finished(self, step: StepSpec, status: str, message: str = "",
                      detail: dict[str, Any] | None = None) -> None:
        """The step's last line: status, time, why (a failure's reason, a skip's), and what it
        produced that a person decides from (the loss, the eval's accuracies)."""
        row = self.rows[step.id]
        row.status = status
        row.seconds = time.monotonic() - row.t0 if row.t0 else None
        row.note = message
        summary = (detail or {}).get("summary") if isinstance(detail, dict) else None
        if step.kind == "eval" and isinstance(summary, dict):
            self.say(f"    {step.id}: {eval_text(summary)}")
        took = f" in {_fmt_s(row.seconds)}" if row.seconds is not None else ""
        text = f"[{self._n(step)}] {step.id}: {MARK.get(status, status)}{took}"
        extra = (train_text(summary) if step.kind == "train" and isinstance(summary, dict)
                 else quantize_text(summary) if step.kind == "quantize" and isinstance(summary, dict) else "")
        if message:  # a failure's reason ends with the step's last output lines: escaped
            lines = [printable(ln) for ln in message.splitlines()] or [""]
            sep = ": " if status in ("failed", "interrupted") else " ("
            text += f"{sep}{lines[0]}" + (")" if sep == " (" else "")
            rest = lines[1:]
        else:
            rest = []
            if extra:
                text += f" ({extra})"
        self.say(text)
        for ln in rest:
            self.say(f"    {ln}")

    def step_skipped(self, step: StepSpec, reason: str) -> None:
        row = self.rows[step.id]
        row.status, row.note = "skipped", reason
        self.say(f"[{self._n(step)}] {step.id}: skipped" + (f" ({printable(reason)})" if reason else ""))

    def line(self, step: StepSpec, text: str) -> None:
        """One line of a step's output: only the lease's messages reach the console (and, for a
        multi-node step, whose lines come as `[node] text`, the nodes started by hand)."""
        body = text.split("] ", 1)[1] if step.nodes and text.startswith("[") and "] " in text else text
        if body.startswith(("ftkit lease", "ftkit: building", "ftkit: start node")):
            self.say(f"    {step.id}: {printable(text)}")

    def progress(self, step: StepSpec, p: Progress) -> None:
        last = self.rows[step.id].progress
        self.rows[step.id].progress = p
        now = time.monotonic()
        if (last is None or last.step != p.step) and now - self._last_progress >= 15:  # plain lines: every 15 s at most
            self._last_progress = now
            self.say(f"    {step.id}: {progress_text(p)}")

    def prompts(self, step: StepSpec, results: list[dict[str, Any]]) -> None:
        """Each test prompt once: the part that tells it from the others, its answer, pass/fail."""
        self.rows[step.id].prompts = results
        for line in prompt_lines(results):
            self.say(f"    {line}")

    def note(self, text: str) -> None:
        """A runner's note; it may quote a server's or a file's words: every line escaped."""
        for n, line in enumerate(text.splitlines() or [""]):
            self.say(("ftkit: " if n == 0 else "       ") + printable(line))

    def finish(self, status: str, run_dir: str) -> None:
        """The run is over (the runner calls it once, after the machine is put back)."""

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


def train_text(summary: dict[str, Any]) -> str:
    """`400 steps, loss 1.0508, eval loss 0.9035 -> 0.7059` from the engine's train_summary.json."""
    parts = []
    steps, loss = _number(summary.get("global_step")), _number(summary.get("train_loss"))
    first, last = _number(summary.get("eval_loss_first")), _number(summary.get("eval_loss_last"))
    if steps is not None:
        parts.append(f"{int(steps)} steps")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if first is not None and last is not None:  # one evaluation only: its loss, not "a -> a"
        parts.append(f"eval loss {first:.4f} -> {last:.4f}" if first != last else f"eval loss {last:.4f}")
    pref = summary.get("preference")
    if isinstance(pref, dict) and isinstance(pref.get("before"), dict) and isinstance(pref.get("after"), dict):
        a, b = _number(pref["before"].get("accuracy")), _number(pref["after"].get("accuracy"))
        if a is not None and b is not None:  # the preference engine's held-out pairs
            parts.append(f"held-out pair accuracy {a:.0f}% -> {b:.0f}%")
    return ", ".join(parts)


def quantize_text(summary: dict[str, Any]) -> str:
    """`GPTQ W4A16 on 64 rows, 0.86 MB -> 0.38 MB` from the quantize engine's quantize.json."""
    parts = []
    method, scheme, rows = summary.get("method"), summary.get("scheme"), _number(summary.get("rows"))
    if isinstance(method, str) and isinstance(scheme, str):
        parts.append(f"{printable(method.upper())[:10]} {printable(scheme)[:10]}"
                     + (f" on {int(rows)} rows" if rows is not None else ""))
    before, after = _number(summary.get("input_bytes")), _number(summary.get("output_bytes"))
    if before and after:
        parts.append(f"{_bytes(before)} -> {_bytes(after)} on disk")
    return ", ".join(parts)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def eval_text(summary: dict[str, Any]) -> str:
    """`base 0.0% (0/60) -> adapter 100.0% (60/60), merged 100.0% (60/60); +100.0 points,
    at least +50 asked: passed` from the eval engine's summary.json (a file: every value checked)."""
    models = summary.get("models") if isinstance(summary.get("models"), dict) else {}
    n = _number(summary.get("prompts"))
    order = summary.get("order")
    names = [n for n in order if isinstance(n, str) and n in models] if isinstance(order, list) else []
    names += [n for n in models if n not in names]
    shown = []
    for name in names[:8]:
        m = models[name]
        acc = _number(m.get("accuracy")) if isinstance(m, dict) else None
        if acc is None:
            continue
        right = _number(m.get("correct"))
        frac = f" ({int(right)}/{int(n)})" if right is not None and n is not None else ""
        shown.append(f"{printable(str(name))[:20]} {acc:.1f}%{frac}")
    text = (shown[0] + (" -> " + ", ".join(shown[1:]) if len(shown) > 1 else "")) if shown else "no accuracy recorded"
    score = summary.get("score")
    if isinstance(score, str):
        text += f" ({printable(score)[:20]} match)"
    gain = _number(summary.get("improvement_points"))
    if gain is not None:
        text += f"; {gain:+.1f} points"
    if isinstance(summary.get("passed"), bool) and shown:
        text += ": passed" if summary["passed"] else ": NOT ENOUGH"
    harness = harness_text(summary.get("harness"))
    if harness:
        text = harness if not shown else f"{text}; {harness}"
    return text


def harness_text(harness: Any, most: int = 4) -> str:
    """`lm-eval quickstart_category exact_match 0.875 ± 0.125 (8)` from the harness part of the
    eval's summary.json: the first metric of each task, at most `most` tasks."""
    if not isinstance(harness, dict) or not isinstance(harness.get("results"), list):
        return ""
    shown: list[str] = []
    tasks: set[str] = set()
    for r in harness["results"]:
        if not isinstance(r, dict) or not isinstance(r.get("task"), str) or r["task"] in tasks:
            continue
        value, err, n = _number(r.get("value")), _number(r.get("stderr")), _number(r.get("samples"))
        if value is None:
            continue
        tasks.add(r["task"])
        if len(shown) < most:
            shown.append(f"{printable(r['task'])[:40]} {printable(str(r.get('metric')))[:30]} {value:.4g}"
                         + (f" ± {err:.2g}" if err is not None else "") + (f" ({int(n)})" if n is not None else ""))
    more = f", {len(tasks) - most} more task(s)" if len(tasks) > most else ""
    return ("lm-eval " + ", ".join(shown) + more) if shown else "lm-eval: no scores recorded"


def _flat(text: str) -> str:
    """A prompt on one line: runs of whitespace (newlines included) become one space."""
    return printable(" ".join(str(text).split()))


def prompt_labels(prompts: list[str], width: int = PROMPT_WIDTH) -> list[str]:
    """How to show each prompt so that two different prompts never look the same: the words
    every prompt shares at the start and at the end (a template's `### Instruction: ...`)
    become `...`, and what is left is cut to `width`. One prompt alone is shown from its start."""
    words = [_flat(p).split(" ") for p in prompts]
    pre = suf = 0
    if len(words) > 1:
        shortest = min(len(w) for w in words)
        while pre < shortest and all(w[pre] == words[0][pre] for w in words):
            pre += 1
        while suf < shortest - pre and all(w[-1 - suf] == words[0][-1 - suf] for w in words):
            suf += 1
    labels = []
    for w in words:
        middle = " ".join(w[pre:len(w) - suf])
        label = ("... " if pre else "") + middle + (" ..." if suf else "")
        if len(label) > width:
            label = label[: width - 3] + "..."
        labels.append(label)
    return labels


def prompt_lines(results: list[dict[str, Any]]) -> list[str]:
    """`prompt 1/2 pass: "... kiwi mango lemon ..." -> "fruit"`, and for a failure what was
    expected or the error."""
    labels = prompt_labels([str(r.get("prompt", "")) for r in results])
    out = []
    for i, (r, label) in enumerate(zip(results, labels, strict=True), 1):
        passed = bool(r.get("passed"))
        answer = _flat(str(r.get("answer") or ""))
        if len(answer) > ANSWER_WIDTH:
            answer = answer[: ANSWER_WIDTH - 3] + "..."
        mark = ("pass" if r.get("expect") else "answered") if passed else "FAIL"  # nothing expected: no pass to claim
        line = f"prompt {i}/{len(results)} {mark}: \"{label}\" -> \"{answer}\""
        if not passed:
            if r.get("error"):
                line += f" (error: {_flat(str(r['error']))[:120]})"
            elif r.get("expect") is not None:
                line += f" (expected {_flat(json.dumps(r['expect'], sort_keys=True))[:80]})"
        out.append(line)
    return out


def shown_path(path: str | Path) -> str:
    """A path as a person would type it here: relative to the working directory when inside it."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path.cwd().resolve())
        return printable(str(rel)) if str(rel) != "." else "."
    except (ValueError, OSError):
        return printable(str(p))


def closing_lines(*, status: str, run_dir: str | Path, failed_step: str | None, message: str,
                  left_running: list[str], seconds: float | None = None) -> list[str]:
    """The last lines of `ftkit up`: how the run ended and what to look at next - the run
    directory, the report, a failed step's log, how to resume, and what still runs (with
    `ftkit down`)."""
    run = shown_path(run_dir)
    took = f" in {_fmt_s(seconds)}" if seconds is not None else ""
    if status == "succeeded":
        lines = [f"ftkit: run succeeded{took}"]
    elif status == "interrupted":
        lines = [f"ftkit: run interrupted{took}" + (f" ({printable(message)})" if message else "")]
    else:
        where = f" at step {printable(failed_step)}" if failed_step else ""
        lines = [f"ftkit: run failed{where}{took}: {printable(message.splitlines()[0] if message else 'see the logs')}"]
    lines.append(f"  run directory  {run}")
    lines.append(f"  report         ftkit report {run}")
    step_log = Path(run_dir) / "logs" / f"{failed_step}.log" if failed_step else None
    if status != "succeeded" and step_log is not None and step_log.is_file():
        lines.append(f"  step log       ftkit logs {run} {printable(str(failed_step))}")
    else:
        lines.append(f"  logs           ftkit logs {run} [STEP]")
    if status != "succeeded":
        lines.append(f"  resume         ftkit up --resume {run}")
    for item in left_running:
        lines.append(f"  left running   {printable(item)}")
    if left_running:
        lines.append(f"                 stop with: ftkit down {run}")
    return lines


class LiveDisplay(Display):
    """On a terminal: the same lines as the plain display, printed above a live panel (rich)
    that shows the steps, their times and a progress bar for training; the panel goes away
    when the run ends, so nothing is shown twice and every line stays whole."""

    def __init__(self, plan: Plan, *, stream: TextIO | None = None) -> None:
        super().__init__(plan, stream=stream)
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=self.out, highlight=False)
        self.live = Live(console=self.console, refresh_per_second=4, transient=True, get_renderable=self._render,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def say(self, text: str) -> None:
        if self._broken:
            return
        with self._lock:
            try:
                self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
            except (OSError, ValueError):
                self._broken = True

    def progress(self, step: StepSpec, p: Progress) -> None:
        self.rows[step.id].progress = p  # the panel shows it: no progress lines on a terminal

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=False, box=None, padding=(0, 1))
        table.add_column("", width=5)
        table.add_column("step")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("")
        style = {"succeeded": "green", "failed": "red", "interrupted": "red", "running": "yellow", "skipped": "dim"}
        for sid in self.order:
            row = self.rows[sid]
            secs = row.seconds if row.seconds is not None else (time.monotonic() - row.t0 if row.t0 and
                                                                 row.status == "running" else None)
            note = ""
            if row.status == "running" and row.progress:
                note = progress_text(row.progress)
            table.add_row(f"{self.order.index(sid) + 1}/{len(self.order)}", printable(row.step.id),
                          Text(row.status, style=style.get(row.status, "")), _fmt_s(secs), note)
        parts: list[Any] = [Text(f"ftkit up: {printable(self.plan.recipe)} ({_fmt_s(time.monotonic() - self.t0)})",
                                 style="bold"), table]
        for sid in self.order:
            row = self.rows[sid]
            if row.status == "running" and row.progress and row.progress.total:
                parts.append(ProgressBar(total=row.progress.total, completed=row.progress.step, width=50))
        return Group(*parts)

    def close(self) -> None:
        try:
            self.live.stop()
        except (OSError, ValueError):
            self._broken = True


def make_display(plan: Plan, *, live: bool | None = None, stream: TextIO | None = None) -> Display:
    out = stream or sys.stderr
    if live is None:
        live = out.isatty() and os.environ.get("TERM") != "dumb"
    return LiveDisplay(plan, stream=out) if live else Display(plan, stream=out)


def latest_progress(metrics: Path, total: int | None, *, tail_bytes: int = 65536) -> Progress | None:
    """The newest training progress in a metrics.jsonl (its last `tail_bytes`; lines that are
    not a JSON object with a numeric loss are passed over): what `ftkit status` shows for a
    running train step. None when there is none yet."""
    from ftkit.files import read_bounded

    try:
        chunk = read_bounded(metrics, tail_bytes, tail=True).decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return None
    from ftkit.files import parse_json

    for line in reversed(chunk.splitlines()):
        try:
            row = parse_json(line)  # never a RecursionError
        except ValueError:
            continue
        if isinstance(row, dict) and _number(row.get("loss")) is not None:
            return progress_of(row, total)
    return None


def progress_of(row: dict[str, Any], total: int | None) -> Progress:
    """A metrics.jsonl line (the engine's, but read from a file: every value checked) as Progress."""
    step = _number(row.get("step"))
    p = Progress(step=int(step) if step is not None and 0 <= step < 1e12 else 0, total=total,
                 loss=_number(row.get("loss")), tokens_per_s=_number(row.get("tokens_per_s")),
                 epoch=_number(row.get("epoch")))
    t = _number(row.get("time_s"))
    if total and p.step and t is not None and t >= 0:
        p.eta_s = max(total - p.step, 0) * t / p.step
    return p
