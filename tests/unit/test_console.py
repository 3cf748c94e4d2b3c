"""What a person sees while `ftkit up` runs, in a pipe and on a terminal (a real
pseudo-terminal, its output rendered by a terminal emulator): every line whole and shown
once, every step's end (the always-steps too), each test prompt told apart from the others
with its answer, the eval's accuracies, and what to look at next. Fast: no model is loaded."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from ftkit.plan.spec import Plan, StepSpec
from ftkit.run import runner
from ftkit.run.display import Display, closing_lines, eval_text, latest_progress, prompt_labels, prompt_lines
from tests.conftest import ROOT, require

PY = sys.executable
PROMPTS = ["### Instruction:\nName the category of these words.\n\n### Input:\nkiwi mango lemon\n\n### Response:\n",
           "### Instruction:\nName the category of these words.\n\n### Input:\ncello flute drum\n\n### Response:\n"]
SUMMARY = {"score": "exact", "prompts": 60, "passed": True, "improvement_points": 100.0, "order": ["base", "adapter", "merged"],
           "models": {"base": {"accuracy": 0.0, "correct": 0}, "adapter": {"accuracy": 100.0, "correct": 60},
                      "merged": {"accuracy": 100.0, "correct": 60}}}


def _writes(tmp: Path, summary: dict, code: int = 0) -> list[str]:  # type: ignore[type-arg]
    out = tmp / "run" / "steps" / "e"
    return [PY, "-c", f"import json, os, sys; os.makedirs({str(out)!r}, exist_ok=True); "
            f"json.dump({summary!r}, open({str(out / 'summary.json')!r}, 'w')); sys.exit({code})"]


def _plan(tmp: Path, *, power: bool) -> Plan:
    steps = [StepSpec(id="a", kind="merge", description="first step", executor="local", argv=[PY, "-c", "print(1)"]),
             StepSpec(id="e", kind="eval", description="score", executor="local", argv=_writes(tmp, SUMMARY),
                      outputs={"summary": "steps/e/summary.json"})]
    if power:
        steps.insert(0, StepSpec(id="power", kind="power", executor="nvml", gpus=[0], power_caps_w={0: 300},
                                 description="cap power"))
    steps.append(StepSpec(id="power-restore-final", kind="power-restore", executor="nvml", gpus=[0], always=True,
                          description="restore the power limits"))
    return Plan(recipe="t", recipe_file="t.yaml", machine="m", executor="local", run_dir=str(tmp / "run"),
                steps=steps, fit={}, psu=None, psu_uncapped=None, layout={}, python=PY,
                simulated_gpus=["RTX 4090", "RTX 3090 Ti"] if power else None)


@pytest.mark.parametrize("power", [False, True], ids=["nothing-to-undo", "restored"])
def test_every_step_ends_on_the_console_the_always_steps_too(tmp_path: Path, power: bool, sim: Path) -> None:
    plan = _plan(tmp_path, power=power)
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit", "up", "t.yaml"])
    out = io.StringIO()
    result = runner.execute_plan(run, plan, display=Display(plan, stream=out))
    assert result.status == "succeeded", out.getvalue()
    lines = out.getvalue().splitlines()
    n = len(plan.steps)
    last = [ln for ln in lines if ln.startswith(f"[{n}/{n}] power-restore-final: ")]
    assert len(last) == (2 if power else 1), lines  # started and ended, or skipped with its reason
    assert last[-1].endswith(("ok", "(nothing to undo)")) or " ok in " in last[-1], last
    assert any("e: base 0.0% (0/60) -> adapter 100.0% (60/60), merged 100.0% (60/60)" in ln for ln in lines), lines
    assert any(ln.startswith(f"[{n - 1}/{n}] e: ok in ") for ln in lines)


def test_an_eval_below_its_bar_still_shows_its_accuracies(tmp_path: Path) -> None:
    low = {**SUMMARY, "passed": False, "improvement_points": 10.0}
    plan = _plan(tmp_path, power=False)
    plan.steps[1].argv = _writes(tmp_path, low, code=1)
    run = runner.create_run(tmp_path / "run", plan, {"name": "t"}, ["ftkit", "up", "t.yaml"])
    out = io.StringIO()
    result = runner.execute_plan(run, plan, display=Display(plan, stream=out))
    assert result.status == "failed"
    assert "+10.0 points: NOT ENOUGH" in out.getvalue()


def test_prompts_that_share_a_template_are_told_apart() -> None:
    labels = prompt_labels(PROMPTS)
    assert labels == ["... kiwi mango lemon ...", "... cello flute drum ..."]
    assert prompt_labels([PROMPTS[0]])[0].startswith("### Instruction: Name the category")  # alone: from its start
    long = ["x " * 80 + "one", "x " * 80 + "two"]
    assert prompt_labels(long) == ["... one", "... two"]
    assert len(prompt_labels(["a" * 500])[0]) == 60
    lines = prompt_lines([{"prompt": PROMPTS[0], "answer": "fruit", "passed": True, "expect": {"equals": "fruit"}},
                          {"prompt": PROMPTS[1], "answer": "fruit\n\x1b[31m", "passed": False,
                           "expect": {"equals": "instrument"}, "error": None}])
    assert lines[0] == 'prompt 1/2 pass: "... kiwi mango lemon ..." -> "fruit"'
    assert lines[1] == ('prompt 2/2 FAIL: "... cello flute drum ..." -> "fruit \\x1b[31m" '
                        '(expected {"equals": "instrument"})')


def test_eval_text_takes_a_hostile_summary_without_a_traceback() -> None:
    assert eval_text({"models": [1, 2], "prompts": "x"}) == "no accuracy recorded"
    assert eval_text({"models": {"a": {"accuracy": 1}, "b": {"accuracy": 2}}, "order": ["b", 3, "zz"]}) == "b 2.0% -> a 1.0%"
    assert eval_text({"models": {"\x1b[2J": {"accuracy": True}, "b": {"accuracy": 1e309}}}) == "no accuracy recorded"
    assert "\x1b" not in eval_text({"models": {"\x1b[2Jbase": {"accuracy": 3}}, "score": "\x1b"})


def test_closing_lines_say_what_to_look_at_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "20260101T000000Z-q"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "train.log").write_text("boom\n")
    ok = closing_lines(status="succeeded", run_dir=run, failed_step=None, message="", seconds=61.0,
                       left_running=["serve (pid 12, http://127.0.0.1:8765/v1)"])
    assert ok[0] == "ftkit: run succeeded in 61.0 s"
    assert "  report         ftkit report runs/20260101T000000Z-q" in ok
    assert "  left running   serve (pid 12, http://127.0.0.1:8765/v1)" in ok
    assert ok[-1].strip() == "stop with: ftkit down runs/20260101T000000Z-q"
    bad = closing_lines(status="failed", run_dir=run, failed_step="train", message="loss is nan\nmore", left_running=[])
    assert bad[0] == "ftkit: run failed at step train: loss is nan"
    assert "  step log       ftkit logs runs/20260101T000000Z-q train" in bad
    assert "  resume         ftkit up --resume runs/20260101T000000Z-q" in bad
    assert not any("left running" in ln for ln in bad)


def test_status_progress_reads_only_the_tail_and_skips_junk(tmp_path: Path) -> None:
    m = tmp_path / "metrics.jsonl"
    m.write_text("x" * 200_000 + "\n" + json.dumps({"step": 10, "loss": 2.0, "time_s": 5.0}) + "\n"
                 + json.dumps({"step": "x", "loss": "y"}) + "\n[1]\n{bad\n")
    p = latest_progress(m, 40)
    assert p is not None and p.step == 10 and p.loss == 2.0 and p.eta_s == 15.0
    assert latest_progress(tmp_path / "missing.jsonl", 40) is None
    os.mkfifo(tmp_path / "fifo")
    assert latest_progress(tmp_path / "fifo", 40) is None  # never blocks


# -------------------------------------------------------------------------- on a terminal

LIVE_SCRIPT = r"""
import sys, time
from ftkit.plan.spec import Plan, StepSpec
from ftkit.run.display import make_display, Progress, closing_lines
steps = [StepSpec(id="train", kind="train", description="lora training on the CPU", executor="local", argv=["x"]),
         StepSpec(id="serve", kind="serve", description="serve the merged model", executor="local", argv=["x"]),
         StepSpec(id="power-restore-final", kind="power-restore", description="restore", executor="nvml", argv=[],
                  always=True)]
plan = Plan(recipe="q", recipe_file="q.yaml", machine="m", executor="local", run_dir="/tmp/r", steps=steps, fit={},
            psu=None, psu_uncapped=None, layout={}, python=sys.executable)
d = make_display(plan)
assert type(d).__name__ == "LiveDisplay"
d.start("/tmp/r")
d.step_started(steps[0])
for i in range(1, 6):
    d.progress(steps[0], Progress(step=i * 20, total=100, loss=1.0 / i, tokens_per_s=1000.0, eta_s=5.0 - i))
    time.sleep(0.3)
d.step_finished(steps[0], "succeeded", "", {"summary": {"global_step": 100, "train_loss": 0.5}})
d.step_started(steps[1])
time.sleep(0.3)
d.prompts(steps[1], [{"prompt": "### Input:\nkiwi mango lemon\n### Response:\n", "answer": "fruit", "passed": True,
                      "expect": {"equals": "fruit"}},
                     {"prompt": "### Input:\ncello flute drum\n### Response:\n", "answer": "instrument",
                      "passed": True}])
d.step_finished(steps[1], "succeeded")
d.step_skipped(steps[2], "nothing to undo")
d.finish("succeeded", "/tmp/r")
d.close()
for line in closing_lines(status="succeeded", run_dir="/tmp/r", failed_step=None, message="", left_running=[]):
    print(line, file=sys.stderr)
"""


def _run_in_pty(script: str, cols: int = 100, rows: int = 60) -> bytes:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([PY, "-c", script], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                            close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out


def test_the_live_console_on_a_terminal_leaves_whole_lines_shown_once() -> None:
    pyte = require("pyte")
    raw = _run_in_pty(LIVE_SCRIPT)
    assert b"ftkit up: q" in raw and b"step 60/100" in raw  # the live panel was drawn while it ran...
    screen = pyte.Screen(100, 60)
    stream = pyte.ByteStream(screen)
    stream.feed(raw.replace(b"\n", b"\r\n") if b"\r\n" not in raw else raw)
    shown = [ln.rstrip() for ln in screen.display if ln.strip()]
    expected = [
        "ftkit: run q on m (local executor)",
        "       run directory /tmp/r",
        "[1/3] train: lora training on the CPU",
        "[1/3] train: ok in ",
        "[2/3] serve: serve the merged model",
        '    prompt 1/2 pass: "... kiwi mango lemon ..." -> "fruit"',
        '    prompt 2/2 answered: "... cello flute drum ..." -> "instrument"',  # nothing expected: no pass claimed
        "[2/3] serve: ok in ",
        "[3/3] power-restore-final: skipped (nothing to undo)",
        "ftkit: run succeeded",
        "  run directory  /tmp/r",
        "  report         ftkit report /tmp/r",
        "  logs           ftkit logs /tmp/r [STEP]",
    ]
    assert len(shown) == len(expected), "\n".join(shown)  # ... and is gone at the end: nothing is shown twice
    for got, want in zip(shown, expected, strict=True):
        assert got.startswith(want), "\n".join(shown)
    assert shown[3].endswith("(100 steps, loss 0.5000)")


def test_what_came_from_files_or_steps_reaches_the_console_escaped_and_never_breaks_it(tmp_path: Path) -> None:
    """A step's last lines, a skip reason, a note and a lease line may carry a model's or a
    file's text: escaped, one line each. Numbers from files that JSON allows but no format
    takes (NaN, Infinity, 1e308, a 400-digit integer) are left out, never a crash."""
    plan = _plan(tmp_path, power=False)
    out = io.StringIO()
    d = Display(plan, stream=out)
    evil = "row \x1b]0;owned\x07\x1b[2J"
    d.step_started(plan.steps[0])
    d.step_finished(plan.steps[0], "failed", f"exit 1\n--- last lines ---\nValueError: {evil}")
    d.step_skipped(plan.steps[1], f"because {evil}")
    d.note(f"server said {evil}\nsecond line")
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and text.count("\\x1b") == 6, text
    for bad in (float("nan"), float("inf"), 1e308, 10**400, -5.0):
        summary = {"global_step": bad, "train_loss": bad, "rows": bad, "input_bytes": bad, "prompts": bad,
                   "models": {"base": {"accuracy": bad, "correct": bad}}, "improvement_points": bad}
        d.step_finished(plan.steps[0], "succeeded", "", {"summary": summary})
        d.step_finished(plan.steps[1], "succeeded", "", {"summary": summary})
        assert eval_text(summary) in ("no accuracy recorded", "base -5.0% (-5/-5); -5.0 points")
    m = tmp_path / "m.jsonl"
    for t in ("1e308", "Infinity", "NaN", "-1"):
        m.write_text('{"step": 5, "loss": 1.0, "time_s": ' + t + "}\n")
        p = latest_progress(m, 10)
        assert p is not None and p.step == 5 and (p.eta_s is None or p.eta_s >= 0)
        from ftkit.run.display import progress_text

        progress_text(p)
    m.write_text("[" * 200_000 + "\n")
    assert latest_progress(m, 10) is None


def test_one_evaluation_is_one_loss_not_a_to_a() -> None:
    from ftkit.run.display import train_text

    assert train_text({"global_step": 4, "eval_loss_first": 2.584, "eval_loss_last": 2.584}) == "4 steps, eval loss 2.5840"
    assert train_text({"eval_loss_first": 3.0, "eval_loss_last": 2.0}) == "eval loss 3.0000 -> 2.0000"
