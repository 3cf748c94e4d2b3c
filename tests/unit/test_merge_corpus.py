"""Corrupted merge inputs (tests/unit/merge_corpus.py makes them): every one ends with exit 2
and a one-line error in bounded time, writes no output, leaves no hidden partial directory
and never changes a byte of the base model. Plus the merge's own promises: the base's dtype
is kept, resized vocabularies reach the config, a missing tokenizer is a warning, and a merge
killed midway is cleaned up by the next one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require

require("torch")

from ftkit.engines import merge as engine  # noqa: E402
from ftkit.errors import UserError  # noqa: E402
from tests.conftest import ROOT, run_cli  # noqa: E402
from tests.unit import merge_corpus as corpus  # noqa: E402


def fingerprint(d: Path) -> dict[str, tuple[int, str]]:
    """Every entry of a directory: its mode and, for regular files, a hash and mtime (FIFOs are never opened)."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(p.relative_to(d))] = (st.st_mode, digest, st.st_mtime_ns)
    return out


def test_corpus_is_large_enough() -> None:
    assert len(corpus.CASES) >= 30


def test_the_uncorrupted_pair_merges(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "merged"))
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["lora_tensors"] == 2 and summary["warnings"] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(corpus.CASES))
def test_corrupted_input_is_refused_cleanly(name: str, tmp_path: Path) -> None:
    base, adapter, case = corpus.make_case(tmp_path, name)
    output = tmp_path / (case.output or "merged")
    existed = os.path.lexists(output)
    before_base, before_adapter = fingerprint(base), fingerprint(adapter)
    t0 = time.monotonic()
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(output), *case.args)
    assert time.monotonic() - t0 < 30
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    errors = [ln for ln in result.err.splitlines() if ln.strip() and not ln.startswith("merge: ")]
    assert len(errors) == 1, result.err
    assert case.words.lower() in errors[0].lower(), errors[0]
    assert os.path.lexists(output) == existed
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]
    assert fingerprint(base) == before_base, "the base model was touched"
    assert fingerprint(adapter) == before_adapter


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["base_header_length_huge", "adapter_r_disagrees_with_tensors", "base_is_a_fifo",
                                  "output_inside_base"])
def test_dry_run_refuses_the_same_inputs(name: str, tmp_path: Path) -> None:
    base, adapter, case = corpus.make_case(tmp_path, name)
    output = tmp_path / (case.output or "merged")
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(output), "--dry-run", *case.args)
    assert result.code == 2 and "Traceback" not in result.err
    assert case.words.lower() in result.err.lower()


def _safetensors_dtypes(path: Path) -> set[str]:
    from ftkit.engines.safetensors_io import read_header

    return {t.dtype for t in read_header(path)[0].values()}


def test_the_base_dtype_is_kept_unless_asked(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    kept = tmp_path / "kept"
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(kept))
    assert result.code == 0, result.err
    assert json.loads(result.out)["dtype"] == "fp32"
    assert _safetensors_dtypes(kept / "model.safetensors") == {"F32"}
    assert json.loads((kept / "config.json").read_text())["torch_dtype"] == "float32"
    asked = tmp_path / "bf16"
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(asked), "--dtype", "bf16")
    assert result.code == 0, result.err
    assert _safetensors_dtypes(asked / "model.safetensors") == {"BF16"}
    cfg = json.loads((asked / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg


def test_a_consistently_resized_vocabulary_reaches_the_config(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    corpus._resized(adapter, 20, 20)
    out = tmp_path / "merged"
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out))
    assert result.code == 0, result.err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 20
    from ftkit.engines.safetensors_io import read_header

    shapes = {n: t.shape for n, t in read_header(out / "model.safetensors")[0].items()}
    assert shapes["model.embed_tokens.weight"] == [20, 8] and shapes["lm_head.weight"] == [20, 8]
    assert any("vocab_size 20" in w for w in json.loads(result.out)["warnings"])


def test_a_missing_tokenizer_is_a_warning(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    (base / "tokenizer.json").unlink()
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "m"))
    assert result.code == 0, result.err
    warnings = json.loads(result.out)["warnings"]
    assert warnings and "no tokenizer" in warnings[0]
    assert "warning: no tokenizer" in result.err


def test_the_plan_passes_dtype_only_when_the_recipe_sets_it() -> None:
    from ftkit.recipe.models import MergeStep

    assert MergeStep(type="merge").dtype is None


SLOW_MERGE = """
import sys, time
from ftkit.engines import merge, safetensors_io as st
real = st.read_tensor
def slow(info):
    time.sleep(0.5)
    return real(info)
st.read_tensor = slow
merge.merge(sys.argv[1], sys.argv[2], sys.argv[3], log=lambda s: None)
"""


def _start_slow_merge(tmp_path: Path, base: Path, adapter: Path, out: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "toolkit")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(base), str(adapter), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        if partial and any((p / "model.safetensors").exists() for p in partial):
            return proc
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "merge ended early")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the merge never started writing")


@pytest.mark.timeout(120)
def test_a_killed_merge_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    out = tmp_path / "merged"
    before = fingerprint(base)
    proc = _start_slow_merge(tmp_path, base, adapter, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert left and not out.exists(), "SIGKILL cannot clean up: the partial directory stays until the next run"
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out))
    assert result.code == 0, result.err
    assert "left by a merge that did not finish" in result.err
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert fingerprint(base) == before


@pytest.mark.timeout(120)
def test_a_terminated_merge_removes_its_partial_output(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    out = tmp_path / "merged"
    proc = _start_slow_merge(tmp_path, base, adapter, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_live_merge_partial_is_left_alone(tmp_path: Path) -> None:
    """A partial directory whose lock is held (a merge still writing) is not removed."""
    import fcntl

    out = tmp_path / "merged"
    live = tmp_path / ".merged.partial-1-abc"
    live.mkdir()
    fd = os.open(live / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert engine.clean_stale_partials(out) == []
        assert live.exists()
    finally:
        os.close(fd)
    assert engine.clean_stale_partials(out) == [live]


@pytest.mark.parametrize("name", corpus.IDENTITY)
def test_force_merges_what_may_be_another_bases_adapter_with_a_warning(name: str, tmp_path: Path) -> None:
    base, adapter, case = corpus.make_case(tmp_path, name)
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "merged"), "--force")
    assert result.code == 0, result.err
    warnings = json.loads(result.out)["warnings"]
    assert any(w.startswith("--force: ") and case.words in w for w in warnings), warnings
    assert "merge: warning: --force: " in result.err


def test_an_adapter_for_another_hub_model_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "hub" / "models--acme--small-a" / "snapshots" / "0123abc"
    base, adapter = corpus.make_pair(root)
    (adapter / "adapter_config.json").write_text(json.dumps({**corpus.ADAPTER_CONFIG,
                                                              "base_model_name_or_path": "acme/small-b"}))
    plan = engine.plan_merge(base, adapter)
    assert plan.mismatches and "acme/small-b" in plan.mismatches[0], plan.mismatches
    with pytest.raises(UserError, match="trained on 'acme/small-b'"):
        engine.check_identity(plan, force=False)
    (adapter / "adapter_config.json").write_text(json.dumps({**corpus.ADAPTER_CONFIG,
                                                              "base_model_name_or_path": "ACME/small-a"}))
    assert engine.plan_merge(base, adapter).mismatches == []
    plan = engine.plan_merge(base, adapter, base_name="acme/other")  # as given on the command line
    assert plan.mismatches


def test_names_the_config_has_without_weights_are_only_noted(tmp_path: Path) -> None:
    base, adapter = corpus.make_pair(tmp_path)
    (adapter / "adapter_config.json").write_text(json.dumps({**corpus.ADAPTER_CONFIG,
                                                              "target_modules": ["q_proj", "up_proj", "gate_proj"]}))
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "merged"))
    assert result.code == 0, result.err
    assert any("gate_proj" in w and "no LoRA weights" in w for w in json.loads(result.out)["warnings"])


def test_the_same_base_elsewhere_is_no_mismatch(tmp_path: Path) -> None:
    """Trained on a copy of the base (another path, the same model): merges without a word."""
    import shutil

    base, adapter = corpus.make_pair(tmp_path)
    copy = tmp_path / "copy-of-base"
    shutil.copytree(base, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "transformers_version": "9.9", "use_cache": False}))
    (adapter / "adapter_config.json").write_text(json.dumps({**corpus.ADAPTER_CONFIG, "base_model_name_or_path": str(copy)}))
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "merged"))
    assert result.code == 0 and json.loads(result.out)["warnings"] == [], result.err


def test_a_disk_that_fills_during_the_merge_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from ftkit.engines import safetensors_io as st

    base, adapter = corpus.make_pair(tmp_path)

    def full(self, data):  # type: ignore[no-untyped-def]  # on the writer thread
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.StreamWriter, "_write_bytes", full)
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "out" / "merged"))
    assert result.code != 0 and "Traceback" not in result.err
    errors = [ln for ln in result.err.splitlines() if ln.strip() and not ln.startswith("merge: ")]
    assert len(errors) == 1 and f"no space left on the device holding {tmp_path / 'out'}" in errors[0], result.err
    assert not (tmp_path / "out").exists()  # the partial output and the parent it made are gone


def test_an_engine_out_of_disk_names_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from ftkit.engines.entry import guarded

    with pytest.raises(SystemExit) as exit_info, guarded("train", "/runs/r/steps/train"):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/steps/train/checkpoints/checkpoint-5/x")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device holding /runs/r/steps/train/checkpoints" in err[0]
    assert "ftkit up --resume" in err[0]
