"""Read and write safetensors one tensor at a time, without mmap.

safetensors' own loader memory-maps whole files, and every page it touches stays in the
process's resident set; reading with pread into a buffer per tensor keeps the merge's peak
memory at about one tensor. The writer knows every output tensor's name, dtype and shape up
front (from the base model's headers), writes the header first and then each tensor's bytes
in order, so nothing has to be held back to build a file.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the data; offsets are relative to the start of the data.

Model files come from outside (a download, a colleague's adapter), so a header is checked
completely before any offset in it is used: its length against the file, its JSON, every
dtype, every shape against its byte length, every offset inside the data and no two tensors
sharing bytes. Files are opened without blocking and must be regular files, so a FIFO or a
device named as a model cannot hang the merge or feed it endless bytes.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from ftkit import files
from ftkit.errors import EngineError, UserError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # the ones a LoRA can be merged into and checked for inf/nan
MAX_HEADER = 100 * 2**20
MAX_JSON = 64 * 2**20
WRITE_AHEAD_BYTES = 32 * 2**20  # written on the writer thread while the caller goes on (StreamWriter)


class BadModelFile(UserError):
    """A model or adapter file that cannot be what it claims (exit 2: bad input, nothing written)."""


def torch_dtype(code: str) -> Any:
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    return table[code]


def _show(value: object) -> str:
    """A name from a file, safe to put in a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def open_regular(path: Path) -> int:
    """A read-only descriptor for a regular file, through ftkit's one reader of outside files
    (ftkit.files.open_regular: never blocks on a FIFO, the type checked on the descriptor);
    links are followed, as the HF cache's snapshots are links into its blobs."""
    try:
        return files.open_regular(path, follow=True)
    except files.UnsafeFile as e:
        cause = e.__cause__
        if isinstance(cause, FileNotFoundError):
            raise BadModelFile(f"{path}: no such file") from None
        if isinstance(cause, OSError):
            raise BadModelFile(f"{path}: cannot open: {e.reason}") from None
        raise BadModelFile(f"{path}: is {e.reason}") from None


def _pread_exact(fd: int, n: int, offset: int, path: Path, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise BadModelFile(f"{path}: truncated while reading {what}")
        got += k
    return bytes(buf)


def read_small(path: Path, limit: int = MAX_JSON) -> bytes:
    """A whole small file (a JSON config), refusing special files and anything over `limit`."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise BadModelFile(f"{path}: {size} bytes is too large for this file (limit {limit})")
        return _pread_exact(fd, size, 0, path, "the file")
    finally:
        os.close(fd)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(path: Path, what: str, limit: int = MAX_JSON) -> Any:
    """Parse a JSON file strictly (no duplicate keys, no NaN/Infinity), one-line errors."""
    raw = read_small(path, limit)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise BadModelFile(f"{path}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadModelFile(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise BadModelFile(f"{path}: {what} is not valid JSON ({str(e).splitlines()[0] if str(e) else 'nested too deeply'})") from None


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    file: Path
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's place in the file, after checking the header describes this file."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise BadModelFile(f"{path}: not a safetensors file ({size} bytes, too short)")
        (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path, "the header length"))
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise BadModelFile(f"{path}: safetensors header length {n} does not fit a file of {size} bytes")
        raw = _pread_exact(fd, n, 8, path, "the header")
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise BadModelFile(f"{path}: safetensors header is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadModelFile(f"{path}: safetensors header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError) as e:
        raise BadModelFile(f"{path}: safetensors header is not valid JSON ({str(e).splitlines()[0] if str(e) else 'nested too deeply'})") from None
    if not isinstance(header, dict):
        raise BadModelFile(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadModelFile(f"{path}: safetensors __metadata__ must map strings to strings")
    start = 8 + n
    data_len = size - start
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        where = f"{path}: tensor {_show(name)}"
        if not name:
            raise BadModelFile(f"{path}: a tensor has an empty name")
        if not isinstance(h, dict):
            raise BadModelFile(f"{where}: header entry is not an object")
        dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise BadModelFile(f"{where}: unsupported dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise BadModelFile(f"{where}: shape {_show(shape)} is not a list of non-negative integers")
        if len(shape) > 8:
            raise BadModelFile(f"{where}: {len(shape)} dimensions is implausible")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise BadModelFile(f"{where}: data_offsets {_show(offsets)} are not two integers")
        b, e = offsets
        if b > e:
            raise BadModelFile(f"{where}: data_offsets {b}..{e} are reversed")
        if b < 0 or e > data_len:
            raise BadModelFile(f"{where}: data_offsets {b}..{e} lie outside the {data_len} data bytes of the file")
        expected = prod(shape) * DTYPE_SIZES[dtype]
        if e - b != expected:
            raise BadModelFile(f"{where}: shape {shape} of {dtype} needs {expected} bytes, its offsets give {e - b}")
        out[name] = TensorInfo(name, dtype, list(shape), path, start + b, start + e)
    last_end, last_name = start, None
    for info in sorted(out.values(), key=lambda t: (t.begin, t.end)):
        if info.nbytes and info.begin < last_end:
            raise BadModelFile(f"{path}: tensors {_show(last_name)} and {_show(info.name)} overlap in the file")
        if info.nbytes:
            last_end, last_name = info.end, info.name
    return out, meta


def read_tensor(info: TensorInfo) -> Any:
    """One tensor, read with pread into memory of its own (torch.empty: not zero-filled first,
    which would be one more pass over every byte)."""
    import torch

    fd = open_regular(info.file)
    try:
        if os.fstat(fd).st_size < info.end:
            raise BadModelFile(f"{info.file}: truncated (it changed since its header was read?): {_show(info.name)}")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if info.nbytes else memoryview(bytearray())
        got = 0
        while got < info.nbytes:
            n = os.preadv(fd, [view[got:]], info.begin + got)
            if n <= 0:
                raise BadModelFile(f"{info.file}: truncated while reading {_show(info.name)}")
            got += n
    finally:
        os.close(fd)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return buf.view(torch_dtype(info.dtype)).reshape(info.shape)


class StreamWriter:
    """Write one safetensors file whose tensors are all declared before the first write.

    The bytes go out on a writer thread: writing (the kernel copying into the page cache,
    with the GIL released) overlaps the computing of the next block, which on the merge's
    two-core machines was most of the difference from a plain copy. What waits for the
    thread stays within WRITE_AHEAD_BYTES: after each part is handed over, the caller waits
    until no more than that is left unwritten, so a part bigger than the budget is written
    before the caller reads anything else. A failed write (a full disk) is raised, as
    it was, in the caller at its next write or at close.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None):
        self.path = path
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.order: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            size = prod(shape) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            self.order.append((name, size))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        self.total = offset
        self.fh: BinaryIO = open(path, "xb")  # noqa: SIM115 - closed in close(); x: never reuse a file
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0
        self._cond = threading.Condition()
        self._items: deque[tuple[memoryview, Any]] = deque()
        self._pending = 0  # bytes handed over and not yet written
        self._error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def write(self, name: str, tensor: Any) -> None:
        """Write one declared tensor whole."""
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: Iterable[Any]) -> None:
        """Write one declared tensor from its parts in order (row blocks of it, or itself):
        each is written as it comes, so the whole tensor never has to exist at once."""
        expected, size = self.order[self.next]
        if name != expected:
            raise EngineError(f"internal: wrote {name} where {expected} was declared")
        total = 0
        for part in parts:
            data, keep = _bytes_of(part)
            total += data.nbytes
            if total > size:
                raise EngineError(f"internal: {name} has more than the {size} bytes declared")
            self._hand_over(data, keep)
        if total != size:
            raise EngineError(f"internal: {name} has {total} bytes, declared {size}")
        self.next += 1

    def _hand_over(self, data: memoryview, keep: Any) -> None:
        if not data.nbytes:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ftkit-writer", daemon=True)
            self._thread.start()
        with self._cond:
            self._raise_failure()
            self._items.append((data, keep))
            self._pending += data.nbytes
            self._cond.notify_all()
            while self._pending > WRITE_AHEAD_BYTES and self._error is None:
                self._cond.wait()
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if not self._items:
                    return
                data, keep = self._items.popleft()  # still counted in _pending until written
            size = data.nbytes
            try:
                self._write_bytes(data)
            except BaseException as e:  # handed to the caller, raised there
                with self._cond:
                    self._error = e
                    self._items.clear()
                    self._pending = 0
                    self._cond.notify_all()
                return
            del data, keep  # the written part is freed now, not when the next one comes
            with self._cond:
                self._pending -= size
                self._cond.notify_all()

    def _write_bytes(self, data: memoryview) -> None:
        self.fh.write(data)

    def _stop(self, *, discard: bool) -> None:
        """Let the thread finish what it has (or drop it) and end it."""
        if self._thread is None:
            return
        with self._cond:
            if discard:  # the part being written (if any) ends, and is subtracted, on the thread
                self._pending -= sum(d.nbytes for d, _ in self._items)
                self._items.clear()
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        self._stop(discard=False)
        if self._error is not None:
            self.fh.close()
            raise self._error
        if self.next != len(self.order):
            self.fh.close()
            raise EngineError(f"internal: {self.path} closed after {self.next} of {len(self.order)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self._stop(discard=True)
        if not self.fh.closed:
            self.fh.close()


def _bytes_of(tensor: Any) -> tuple[memoryview, Any]:
    """A view of a tensor's own memory (writing it makes no second copy), and what keeps it alive."""
    import torch

    t = tensor.detach().contiguous().cpu()
    if not t.numel():
        return memoryview(b""), None
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()), t
