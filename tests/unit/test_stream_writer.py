"""The safetensors writer's thread: what it writes equals safetensors' own file, what waits for
it stays within the write-ahead budget, and a failed write reaches the caller with nothing left
running."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ftkit.engines import safetensors_io as st  # noqa: E402


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16), "b.bias": torch.randn(7, generator=g),
            "c.weight": torch.randn(100, 48, generator=g), "empty": torch.empty(0, 4)}


def writer(path: Path, ts: dict[str, torch.Tensor]) -> st.StreamWriter:
    codes = {torch.bfloat16: "BF16", torch.float32: "F32"}
    return st.StreamWriter(path, [(n, codes[t.dtype], list(t.shape)) for n, t in ts.items()])


def test_parts_written_on_the_thread_read_back_equal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "WRITE_AHEAD_BYTES", 1000)
    ts = tensors()
    w = writer(tmp_path / "m.safetensors", ts)
    for name, t in ts.items():
        w.write_parts(name, [t[i:i + 9] for i in range(0, max(t.shape[0], 1), 9)] if t.dim() > 1 else [t])
    w.close()
    back = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    assert back.keys() == ts.keys() and all(torch.equal(back[n], t) for n, t in ts.items())
    assert not any(t.name == "ftkit-writer" for t in threading.enumerate())


def test_what_waits_for_the_thread_stays_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget, part = 4096, 48 * 4 * 4  # 768-byte parts
    monkeypatch.setattr(st, "WRITE_AHEAD_BYTES", budget)
    seen: list[int] = []
    real = st.StreamWriter._write_bytes

    def slow(self: st.StreamWriter, data: memoryview) -> None:
        seen.append(self._pending)
        time.sleep(0.002)  # a slow disk: the caller gets ahead and must wait
        real(self, data)

    monkeypatch.setattr(st.StreamWriter, "_write_bytes", slow)
    t = torch.randn(400, 48)
    w = st.StreamWriter(tmp_path / "m.safetensors", [("w", "F32", [400, 48])])
    w.write_parts("w", [t[i:i + 4] for i in range(0, 400, 4)])
    w.close()
    assert max(seen) <= budget + part and max(seen) > budget // 2, seen  # it did get ahead, and no further
    assert torch.equal(safetensors_torch.load_file(str(tmp_path / "m.safetensors"))["w"], t)


def test_a_failed_write_on_the_thread_is_raised_in_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: st.StreamWriter, data: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.StreamWriter, "_write_bytes", full)
    monkeypatch.setattr(st, "WRITE_AHEAD_BYTES", 10)  # each part waits: the failure shows at once
    ts = tensors()
    w = writer(tmp_path / "m.safetensors", ts)
    with pytest.raises(OSError) as e:
        w.write_parts("a.weight", [ts["a.weight"][:32], ts["a.weight"][32:]])
    assert e.value.errno == errno.ENOSPC
    w.abort()
    assert w.fh.closed and not any(t.name == "ftkit-writer" for t in threading.enumerate())


def test_a_failure_seen_only_at_close_is_raised_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: st.StreamWriter, data: memoryview) -> None:
        time.sleep(0.05)  # the caller is done handing over before the write fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.StreamWriter, "_write_bytes", full)
    t = torch.randn(10)
    w = st.StreamWriter(tmp_path / "m.safetensors", [("t", "F32", [10])])
    w.write("t", t)
    with pytest.raises(OSError):
        w.close()
    assert w.fh.closed


def test_abort_with_parts_waiting_ends_the_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = st.StreamWriter._write_bytes

    def stuck(self: st.StreamWriter, data: memoryview) -> None:
        gate.wait(5)
        real(self, data)

    monkeypatch.setattr(st.StreamWriter, "_write_bytes", stuck)
    t = torch.randn(64, 8)
    w = st.StreamWriter(tmp_path / "m.safetensors", [("t", "F32", [64, 8])])
    w.write_parts("t", [t[i:i + 8] for i in range(0, 64, 8)])  # all within the budget: nothing waits
    threading.Timer(0.05, gate.set).start()
    w.abort()  # drops what waits, lets the write in progress end
    assert w.fh.closed and not any(th.name == "ftkit-writer" for th in threading.enumerate())


def test_parts_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    t = torch.randn(10, 4)
    w = st.StreamWriter(tmp_path / "m.safetensors", [("t", "F32", [10, 4])])
    with pytest.raises(st.EngineError, match="has 80 bytes, declared 160"):
        w.write_parts("t", [t[:5]])
    w.abort()
    w = st.StreamWriter(tmp_path / "n.safetensors", [("t", "F32", [10, 4])])
    with pytest.raises(st.EngineError, match="more than the 160 bytes"):
        w.write_parts("t", [t, t[:1]])
    w.abort()
