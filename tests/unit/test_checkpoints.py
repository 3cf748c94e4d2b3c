"""Checkpoints never look complete when a save was interrupted; completeness is by required
files (files added later do not break it); incomplete ones are quarantined, never deleted;
retention keeps last K + best."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.engines import checkpoints as ck


def make(root: Path, step: int, eval_loss: float | None = None, complete: bool = True, world: int = 1) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x" * step)
    (d / "optimizer.pt").write_bytes(b"y" * 10)
    (d / "trainer_state.json").write_text("{}")
    for name in (["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]):
        (d / name).write_bytes(b"r")
    if complete:
        assert ck.mark_complete(d, world_size=world, eval_loss=eval_loss) == []
    return d


def test_marker_makes_complete_and_truncation_breaks_it(tmp_path: Path) -> None:
    d = make(tmp_path, 10)
    assert ck.is_complete(d)
    (d / "optimizer.pt").write_bytes(b"y" * 3)  # a save cut short after the marker? sizes disagree
    assert not ck.is_complete(d)


def test_a_file_added_later_does_not_make_it_incomplete(tmp_path: Path) -> None:
    """Completeness is by the files the manifest lists, not equality with the directory:
    a late writer (a README, a rank's late log) must not get a good checkpoint quarantined."""
    d = make(tmp_path, 10)
    (d / "README.md").write_text("written after the manifest")
    (d / "sub").mkdir()
    (d / "sub" / "late.bin").write_bytes(b"z")
    assert ck.is_complete(d)
    (d / "trainer_state.json").unlink()
    assert not ck.is_complete(d)


def test_required_files_are_checked_before_marking(tmp_path: Path) -> None:
    d = make(tmp_path, 10, complete=False, world=2)
    (d / "rng_state_1.pth").unlink()  # rank 1 had not written its RNG state yet
    assert ck.mark_complete(d, world_size=2) == ["rng_state_1.pth"]
    assert not (d / ck.MARKER).exists() and not ck.is_complete(d)
    (d / "rng_state_1.pth").write_bytes(b"r")
    assert ck.mark_complete(d, world_size=2) == []
    manifest = ck.manifest(d)
    assert set(manifest["required"]) >= {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth",
                                          "adapter_model.safetensors", "optimizer.pt"}
    assert ck.is_complete(d)


def test_deepspeed_needs_every_ranks_optimizer_shard(tmp_path: Path) -> None:
    d = make(tmp_path, 4, complete=False, world=2)
    (d / "optimizer.pt").unlink()
    (d / "global_step4").mkdir()
    (d / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o")
    assert ck.mark_complete(d, world_size=2) == ["DeepSpeed optimizer shard of rank 1"]
    (d / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o")
    assert ck.mark_complete(d, world_size=2) == []


def test_missing_weights_or_state(tmp_path: Path) -> None:
    d = tmp_path / "checkpoint-1"
    d.mkdir()
    (d / "rng_state.pth").write_bytes(b"r")
    assert ck.mark_complete(d) == ["trainer_state.json", "model or adapter weights", "optimizer.pt"]


def test_unreadable_manifests_mean_incomplete(tmp_path: Path) -> None:
    d = make(tmp_path, 10)
    for bad in ("{not json", "[1, 2]", json.dumps({"files": {}}), json.dumps({"files": {"x": 1}}),
                json.dumps({"files": {"optimizer.pt": 10}, "required": ["trainer_state.json"]}), "\udcff"):
        (d / ck.MARKER).write_text(bad, errors="surrogateescape")
        assert not ck.is_complete(d), bad


def test_interrupted_save_is_quarantined_not_deleted(tmp_path: Path) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20)
    partial = make(tmp_path, 30, complete=False)  # the crash happened while writing this one
    assert ck.newest_complete(tmp_path) == tmp_path / "checkpoint-20"
    moved = ck.quarantine_incomplete(tmp_path, now=0)
    assert moved == [(partial, tmp_path / "quarantine" / "checkpoint-30-19700101T000000Z")]
    assert not partial.exists()
    kept = tmp_path / "quarantine" / "checkpoint-30-19700101T000000Z"
    assert (kept / "adapter_model.safetensors").read_bytes() == b"x" * 30  # nothing lost
    assert [p.name for p in ck.all_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    # the same step interrupted again in the same second: a second, distinct quarantine entry
    make(tmp_path, 30, complete=False)
    ck.quarantine_incomplete(tmp_path, now=0)
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == [
        "checkpoint-30-19700101T000000Z", "checkpoint-30-19700101T000000Z-2"]
    assert ck.quarantine_incomplete(tmp_path) == []


def test_retention_keeps_last_k_and_the_best(tmp_path: Path) -> None:
    for step, loss in ((10, 2.0), (20, 1.0), (30, 1.5), (40, 1.7), (50, 1.8)):
        make(tmp_path, step, loss)
    removed = ck.retain(tmp_path, keep_last=2, keep_best=True)
    left = sorted(p.name for p in ck.all_checkpoints(tmp_path))
    assert left == ["checkpoint-20", "checkpoint-40", "checkpoint-50"]
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-30"]


def test_retention_without_best_and_leaves_incomplete_ones(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        make(tmp_path, step, 0.5)
    make(tmp_path, 4, complete=False)
    ck.retain(tmp_path, keep_last=1, keep_best=False)
    assert [p.name for p in ck.all_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
