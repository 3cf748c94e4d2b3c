"""TensorBoard event files, written without TensorBoard.

`tensorboard --logdir runs/` reads every run's training curves from these files. transformers'
own TensorBoard callback needs the `tensorboard` package (protobuf, grpcio, ...) in the
training image; the format is small enough to write here instead, so every run has its
curves with no new dependency in the locked images.

The format (TensorFlow's TFRecord of `Event` protocol buffers; tensorboard's reader is the
reference, tests/unit/test_tracking.py reads these files with it):

    record = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
    Event  = 1: wall_time (double) | 2: step (int64) | 3: file_version (string, first event)
             | 5: summary (Summary)
    Summary = 1: value (repeated Value);  Value = 1: tag (string) | 2: simple_value (float)

One file per writer, named as TensorBoard names its own (`events.out.tfevents.<time>.<host>`),
appended and flushed after every step's scalars: a run that dies keeps what it logged.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), what TFRecord frames carry; records here are tens of bytes."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields: negatives as two's complement
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _bytes_field(5, values)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


class EventWriter:
    """Scalars for one training run, in one new event file under `logdir`."""

    def __init__(self, logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname() or 'host'}.{os.getpid()}"
        self.path = logdir / name
        self._fh: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed in close(); x: never another's file
        self._fh.write(_record(_event(now, 0, file_version="brain.Event:2")))
        self._fh.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """One event with every finite number of `values` (NaN and infinities are left out:
        TensorBoard plots them as gaps anyway, and a loss that is not finite is in the log)."""
        finite = {k: float(v) for k, v in values.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if finite:
            self._fh.write(_record(_event(time.time() if wall_time is None else wall_time, step, scalars=finite)))
            self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
