"""A disk that fills while an engine saves is one line naming the file and what to do (issue
#24), whichever writer met it: torch.save's C++ writer (a RuntimeError "[enforce fail at
inline_container.cc:...] . unexpected pos ..." with no errno and no file), safetensors' Rust
error ("... (os error 28)") or an OSError. Other errors, writer errors that are not a full
disk included, keep their traceback.

A full device without root or a small filesystem: the file being written is made the full
device (a device node 1:7 where this user may make one, as root in CI; else a link to
/dev/full), so the real writer meets a real ENOSPC."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, missing, require

torch = require("torch")

from ftkit.engines.entry import guarded  # noqa: E402


def make_full(path: Path) -> None:
    """Every write to `path` fails with ENOSPC (the kernel's full device, 1:7)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 7))
        return
    except OSError:
        pass
    try:
        full = os.stat("/dev/full")
    except OSError:
        full = None
    if full is None or not stat.S_ISCHR(full.st_mode) or full.st_rdev != os.makedev(1, 7):
        missing("neither a device node can be made here nor is /dev/full the full device")
    path.symlink_to("/dev/full")


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_torch_save_on_a_full_device_is_one_line_naming_the_file(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "train" / "checkpoints" / "checkpoint-40" / "optimizer.pt"
    make_full(target)
    with pytest.raises(SystemExit) as exit_info, guarded("train", str(tmp_path / "train")):
        torch.save({"exp_avg": torch.zeros(4096)}, target)  # the real writer: no errno in its RuntimeError
    assert exit_info.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"ftkit train: no space left on the device holding {target} (No space left on device")
    assert "checkpoint.keep_last" in line and "ftkit up --resume" in line


def test_safetensors_out_of_space_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """safetensors writes beside the file and renames it into place, so a device node cannot
    stand in: its Rust writer is given the error it raises on a full tmpfs."""
    st = require("safetensors.torch")
    from safetensors import SafetensorError

    def full(*_a, **_k):  # type: ignore[no-untyped-def]
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "serialize_file", full)
    target = tmp_path / "adapter" / "adapter_model.safetensors"
    with pytest.raises(SystemExit), guarded("merge", str(tmp_path)):
        st.save_file({"w": torch.zeros(4)}, str(target))
    line = one_line(capsys.readouterr().err)
    assert f"no space left on the device holding {target} (No space left on device" in line
    assert "keep_last" not in line  # a train step's advice only


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # the disk has room
    OSError(13, "Permission denied"),
])
def test_other_errors_keep_their_traceback(tmp_path: Path, error: Exception) -> None:
    with pytest.raises(type(error)) as raised, guarded("train", str(tmp_path)):
        raise error
    assert raised.value is error
    assert os.listdir(tmp_path) == []  # the probe left nothing behind


def test_a_torch_write_that_fails_for_another_reason_is_not_called_a_full_disk(tmp_path: Path) -> None:
    """The same RuntimeError from torch's writer, here for a file-size limit (EFBIG): the
    probe finds room on the device, so the traceback stays, and the file is left as it was."""
    script = f"""
import resource, signal, torch
from ftkit.engines.entry import guarded
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
with guarded("train", {str(tmp_path)!r}):
    torch.save({{"w": torch.zeros(100_000)}}, {str(tmp_path / "x.pt")!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "toolkit")})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "inline_container.cc" in proc.stderr, proc.stderr
    assert "no space left" not in proc.stderr
    assert (tmp_path / "x.pt").stat().st_size <= 65536 and sorted(os.listdir(tmp_path)) == ["x.pt"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("trl")
    from ftkit.engines import tiny
    from tests.unit.test_train_engine import DATASET, TINY

    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny.generate(TINY, DATASET, out)
    return out


def test_the_train_engine_out_of_space_at_a_checkpoint(base_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The real engine, as the plan starts it (`--config`): the first checkpoint's optimizer
    state goes to a full device. One line names that file; no traceback."""
    from ftkit.engines import train
    from tests.unit.test_train_engine import config

    out = tmp_path / "steps" / "train"
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(config(base_model, out, max_steps=4, checkpoint={"every_steps": 2, "keep_last": 1})))
    real_save = torch.save
    filled: list[Path] = []

    def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(f).endswith("optimizer.pt") and not filled:
            filled.append(Path(f))
            make_full(Path(f))  # the disk is full from here on
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(cfg)])
    assert exit_info.value.code == 1
    assert filled and filled[0] == out / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    err = capsys.readouterr().err  # the engine's own progress lines too (the step log)
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"ftkit train: no space left on the device holding {filled[0]} ("), line
    assert "checkpoint.keep_last" in line
