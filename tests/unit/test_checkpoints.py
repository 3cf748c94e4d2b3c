"""Checkpoints never look complete when a save was interrupted; retention keeps last K + best."""

from __future__ import annotations

from pathlib import Path

from ftkit.engines import checkpoints as ck


def make(root: Path, step: int, eval_loss: float | None = None, complete: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x" * step)
    (d / "optimizer.pt").write_bytes(b"y" * 10)
    if complete:
        ck.mark_complete(d, eval_loss=eval_loss)
    return d


def test_marker_makes_complete_and_truncation_breaks_it(tmp_path: Path) -> None:
    d = make(tmp_path, 10)
    assert ck.is_complete(d)
    (d / "optimizer.pt").write_bytes(b"y" * 3)  # a save cut short after the marker? sizes disagree
    assert not ck.is_complete(d)


def test_interrupted_save_is_ignored_and_removed(tmp_path: Path) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)  # the crash happened while writing this one
    assert ck.newest_complete(tmp_path) == tmp_path / "checkpoint-20"
    removed = ck.remove_incomplete(tmp_path)
    assert [p.name for p in removed] == ["checkpoint-30"]
    assert not (tmp_path / "checkpoint-30").exists()


def test_retention_keeps_last_k_and_the_best(tmp_path: Path) -> None:
    for step, loss in ((10, 2.0), (20, 1.0), (30, 1.5), (40, 1.7), (50, 1.8)):
        make(tmp_path, step, loss)
    removed = ck.retain(tmp_path, keep_last=2, keep_best=True)
    left = sorted(p.name for p in ck.all_checkpoints(tmp_path))
    assert left == ["checkpoint-20", "checkpoint-40", "checkpoint-50"]
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-30"]


def test_retention_without_best(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        make(tmp_path, step, 0.5)
    ck.retain(tmp_path, keep_last=1, keep_best=False)
    assert [p.name for p in ck.all_checkpoints(tmp_path)] == ["checkpoint-3"]
