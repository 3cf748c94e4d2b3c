"""Issue #24: a step that exits 0 without its declared outputs is not `succeeded`, for every
kind the runner checks (run.runner.REQUIRED_OUTPUTS); test_runner holds the merge, with resume.
Here the train step (its adapter, or a full fine-tune's model) and the eval step (its summary):
each shape of "not there" fails the step with the path named and skips what comes after; the
same step writing its output succeeds. Real but tiny runs (`python -c` steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_runner import execute, plan_of, step

ADAPTER = "steps/train/adapter"
MODEL = "steps/train/model"
SUMMARY = "steps/eval/summary.json"


def writes(run: Path, files: dict[str, bytes | None]) -> str:
    """A step's code that writes `files` (relative to the run; None: a directory) and exits 0."""
    lines = ["import pathlib", f"run = pathlib.Path({str(run)!r})"]
    for rel, content in files.items():
        if content is None:
            lines.append(f"(run / {rel!r}).mkdir(parents=True, exist_ok=True)")
        else:
            lines.append(f"(run / {rel!r}).parent.mkdir(parents=True, exist_ok=True)")
            lines.append(f"(run / {rel!r}).write_bytes({content!r})")
    return "\n".join(lines)


ADAPTER_FILES = {f"{ADAPTER}/adapter_config.json": b"{}", f"{ADAPTER}/adapter_model.safetensors": b"x"}
# case -> (kind, outputs, what the step writes, what the journal must say; None: it succeeds)
CASES: dict[str, tuple[str, dict[str, str], dict[str, bytes | None], str | None]] = {
    "train: no adapter": ("train", {"adapter": ADAPTER}, {}, f"left no adapter at {ADAPTER}"),
    "train: an empty adapter directory": ("train", {"adapter": ADAPTER}, {ADAPTER: None},
                                          f"left no adapter at {ADAPTER} (no config and safetensors weights in it)"),
    "train: an adapter config without weights": ("train", {"adapter": ADAPTER},
                                                 {f"{ADAPTER}/adapter_config.json": b"{}"},
                                                 f"left no adapter at {ADAPTER} (no config and safetensors"),
    "train: an adapter that is a file": ("train", {"adapter": ADAPTER}, {ADAPTER: b"x"},
                                         f"left no adapter at {ADAPTER} (no config and safetensors"),
    "train: a full model without weights": ("train", {"adapter": MODEL}, {f"{MODEL}/config.json": b"{}"},
                                            f"left no adapter at {MODEL} (no config and safetensors"),
    "train: the adapter": ("train", {"adapter": ADAPTER}, ADAPTER_FILES, None),
    "train: a full model": ("train", {"adapter": MODEL},
                            {f"{MODEL}/config.json": b"{}", f"{MODEL}/model-00001-of-00001.safetensors": b"x"}, None),
    "eval: no summary": ("eval", {"summary": SUMMARY}, {}, f"left no summary at {SUMMARY}"),
    "eval: an empty summary": ("eval", {"summary": SUMMARY}, {SUMMARY: b""},
                               f"left no summary at {SUMMARY} (not a non-empty file)"),
    "eval: a summary that is a directory": ("eval", {"summary": SUMMARY}, {SUMMARY: None},
                                            f"left no summary at {SUMMARY} (not a non-empty file)"),
    "eval: the summary": ("eval", {"summary": SUMMARY}, {SUMMARY: b'{"models": {}}'}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_and_eval_steps_that_exit_0_without_their_outputs_failed(tmp_path: Path, case: str) -> None:
    kind, outputs, files, says = CASES[case]
    sid = "train" if kind == "train" else "eval"
    after = tmp_path / "after-ran"
    plan = plan_of(tmp_path, step(sid, writes(tmp_path / "run", files), kind=kind, outputs=outputs),
                   step("after", f"import pathlib; pathlib.Path({str(after)!r}).write_text('x')"))
    result, console, st = execute(tmp_path, plan)
    if says is None:
        assert result.status == "succeeded", (result.message, st["steps"][sid])
        assert after.exists()
        return
    assert result.status == "failed" and result.failed_step == sid
    assert st["steps"][sid]["status"] == "failed"
    assert f"the step exited 0 but {says}" in st["steps"][sid]["error"], st["steps"][sid]["error"]
    assert st["steps"]["after"]["status"] == "skipped" and not after.exists()
    assert "Traceback" not in console
