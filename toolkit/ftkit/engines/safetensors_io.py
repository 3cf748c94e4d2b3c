"""Read and write safetensors one tensor at a time, without mmap.

safetensors' own loader memory-maps whole files, and every page it touches stays in the
process's resident set; reading with pread into a buffer per tensor keeps the merge's peak
memory at about one tensor. The writer knows every output tensor's name, dtype and shape up
front (from the base model's headers), writes the header first and then each tensor's bytes
in order, so nothing has to be held back to build a file.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the data; offsets are relative to the start of the data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from ftkit.errors import EngineError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def torch_dtype(code: str) -> Any:
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    return table[code]



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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise EngineError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise EngineError(f"{path}: safetensors header of {n} bytes is implausible")
        try:
            header = json.loads(fh.read(n))
        except json.JSONDecodeError as e:
            raise EngineError(f"{path}: bad safetensors header: {e}") from e
    meta = header.pop("__metadata__", {}) or {}
    start = 8 + n
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        out[name] = TensorInfo(name, h["dtype"], list(h["shape"]), path, start + b, start + e)
    return out, meta


def read_tensor(info: TensorInfo) -> Any:
    import torch

    buf = bytearray(info.nbytes)
    with open(info.file, "rb") as fh:
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            n = os.preadv(fh.fileno(), [view[got:]], info.begin + got)
            if n <= 0:
                raise EngineError(f"{info.file}: truncated while reading {info.name}")
            got += n
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)


class StreamWriter:
    """Write one safetensors file whose tensors are all declared before the first write."""

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
        self.fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, name: str, tensor: Any) -> None:
        import torch

        expected, size = self.order[self.next]
        if name != expected:
            raise EngineError(f"internal: wrote {name} where {expected} was declared")
        t = tensor.detach().contiguous().cpu()
        # A view of the tensor's own memory: writing it makes no second copy.
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if data.nbytes != size:
            raise EngineError(f"internal: {name} has {data.nbytes} bytes, declared {size}")
        self.fh.write(data)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            self.fh.close()
            raise EngineError(f"internal: {self.path} closed after {self.next} of {len(self.order)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
