"""NF4 round trips for the QLoRA merge: a base weight as QLoRA's 4-bit layers saw it in training.

The train engine loads the base in the step's precision (bf16 or fp16) and bitsandbytes
quantizes every linear weight of the decoder layers to NF4: blocks of 64 weights, each with
its absmax scale, and those scales double-quantized (8 bits, in blocks of 256, around their
mean). Every matmul then uses the dequantized weight, in that precision. A merge "into the
NF4-dequantized base" must fold the adapter into exactly those values, so:

- The weight is cast to the training precision first: quantizing the fp32 original instead
  moves codes that sit near a rounding boundary (by up to 0.077 on a weight of a tiny Llama
  of the CPU quickstart's shape).
- Where bitsandbytes runs (CUDA or CPU), the rounding is bitsandbytes' own, double
  quantization included, yet in bounded chunks: a code and its block's absmax depend only
  on the block of 64; only the double quantization's offset, the mean of every block's
  absmax, needs the whole weight. A first pass collects the absmax (one fp32 per 64 weights)
  and double-quantizes them exactly as `quantize_4bit` does; the second pass quantizes each
  chunk and dequantizes it with its slice of those scales. The result is bit-identical to
  bitsandbytes' whole-tensor quantize/dequantize (tests/unit/test_nf4_bnb.py checks it).
- Without bitsandbytes: the same arithmetic in torch, without the double quantization of
  the scales: within 1.04% of a block's absmax of bitsandbytes' result on a 2048 x 2048
  weight (the test allows 1.5%), except a weight exactly on a rounding boundary, which may
  round the other way (seen once in 2 million weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
BLOCK = 64  # weights per absmax scale (bitsandbytes' and transformers' default)
SCALE_BLOCK = 256  # scales per block of the double quantization (fixed in bitsandbytes)
CHUNK = 1 << 19  # elements rounded at once (a multiple of BLOCK): ~40 MiB of temporaries in torch
TORCH_TEMP_BYTES_PER_ELEMENT = 80  # what one chunk element costs in the torch code search (see nf4_fp32)
BNB_TEMP_BYTES_PER_ELEMENT = 12  # the chunk in the training dtype, its codes, the dequantized chunk, fp32
DTYPES = ("bf16", "fp16")


def torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def nf4_fp32(x: Any, blocksize: int = BLOCK) -> Any:
    """The torch NF4 round trip of a flat fp32 tensor whose blocks start at element 0, CHUNK
    elements at a time, without double quantization. The nearest code is found among three
    candidates around the midpoint bucket instead of all 16 codes (a whole-tensor search
    held 16 floats per element, ~30-60x a weight's size): the same fp32 distances and the
    same lowest-index tie rule as argmin over all 16, so the result is bit-identical to it."""
    import torch

    code = torch.tensor(NF4, dtype=torch.float32)
    mid = (code[1:] + code[:-1]) / 2
    out = torch.empty_like(x)
    n = x.numel()
    for i in range(0, n, CHUNK):
        flat = x[i:i + CHUNK]
        pad = (-flat.numel()) % blocksize
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        blocks = flat.reshape(-1, blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        scaled = blocks / absmax
        k = torch.bucketize(scaled, mid)  # nearest code up to rounding at a midpoint: k-1, k or k+1
        cand = torch.stack([(k - 1).clamp_min(0), k, (k + 1).clamp_max(len(NF4) - 1)], dim=-1)
        del k
        pick = (scaled.unsqueeze(-1) - code[cand]).abs().argmin(dim=-1, keepdim=True)
        idx = cand.gather(-1, pick).squeeze(-1)
        del cand, pick, scaled
        deq = (code[idx] * absmax).reshape(-1)
        out[i:i + CHUNK] = deq[:deq.numel() - pad] if pad else deq
    return out


class Rounder:
    """Rounds one 2-D weight through NF4 row block by row block, as training saw it.

    `rows(i, block)` takes rows i.. of the weight (any float dtype; they must start on a
    block of 64 of the flattened weight) and returns them rounded, in fp32. With
    bitsandbytes the constructor makes the first pass over the whole weight (its scales)."""

    def __init__(self, w: Any, dtype: str = "bf16", bnbf: Any = None, blocksize: int = BLOCK) -> None:
        self.dtype = torch_dtype(dtype)
        self.cols = max(math.prod(w.shape[1:]), 1)
        self.blocksize = blocksize
        self.bnbf = bnbf
        self.scales: Any = None
        if bnbf is not None:
            self.scales = self._double_quantized_scales(w)

    def _chunks(self, w: Any) -> list[tuple[int, int]]:
        rows = max(1, CHUNK // self.cols)
        group = self.blocksize // math.gcd(self.cols, self.blocksize)
        rows = max(group, rows - rows % group)
        return [(i, min(i + rows, w.shape[0])) for i in range(0, w.shape[0], rows)]

    def _double_quantized_scales(self, w: Any) -> Any:
        """Every block's absmax as bitsandbytes' quantize_4bit(compress_statistics=True) keeps
        it (8-bit codes around the mean) and dequantize_4bit restores it, in fp32."""
        import torch

        f = self.bnbf
        parts = []
        for a, b in self._chunks(w):
            chunk = w[a:b].to(self.dtype).reshape(-1)
            _, state = f.quantize_4bit(chunk, blocksize=self.blocksize, quant_type="nf4", compress_statistics=False)
            parts.append(state.absmax.reshape(-1))
        absmax = torch.cat(parts)
        offset = absmax.mean()
        qabsmax, state2 = f.quantize_blockwise(absmax - offset, blocksize=SCALE_BLOCK)
        scales = f.dequantize_blockwise(qabsmax, state2)
        scales += offset
        return scales.float()

    def rows(self, i: int, block: Any) -> Any:
        import torch

        start = i * self.cols
        if start % self.blocksize:
            raise ValueError(f"row {i} does not start an NF4 block of {self.blocksize}")
        flat = block.reshape(-1)
        out = torch.empty(flat.numel(), dtype=torch.float32)
        for a in range(0, flat.numel(), CHUNK):  # CHUNK is a multiple of the block: pieces stay aligned
            out[a:a + CHUNK] = self._round(start + a, flat[a:a + CHUNK].to(self.dtype))
        return out.reshape(block.shape)

    def _round(self, start: int, src: Any) -> Any:
        """A flat piece of the weight (in the training dtype) starting at element `start`,
        rounded and dequantized as bitsandbytes does, in fp32. Flat on purpose: bitsandbytes'
        CPU dequantize kernel indexes a 2-D weight's scales by row, which is wrong when a row
        is not a whole number of blocks; flat (as on CUDA) it is right."""
        if self.bnbf is None:
            return nf4_fp32(src.float(), self.blocksize).to(self.dtype).float()
        f = self.bnbf
        q, state = f.quantize_4bit(src, blocksize=self.blocksize, quant_type="nf4", compress_statistics=False)
        first = start // self.blocksize
        state.absmax = self.scales[first:first + state.absmax.numel()]
        return f.dequantize_4bit(q, state).reshape(-1).float()

    def whole(self, w: Any) -> Any:
        """The whole weight rounded, in the training dtype (tests and benchmarks)."""
        import torch

        out = torch.empty(w.shape, dtype=self.dtype)
        for a, b in self._chunks(w):
            out[a:b] = self.rows(a, w[a:b]).to(self.dtype)
        return out


def rounder(w: Any, dtype: str = "bf16", log: Callable[[str], None] | None = None) -> Rounder:
    """bitsandbytes' rounding where it runs here, else the torch one."""
    from ftkit.engines import bnb

    return Rounder(w, dtype, bnb.quiet_functional(log))


def temp_bytes(elements: int, with_bnb: bool) -> int:
    """What rounding a row block of `elements` weights holds at once (for the merge's
    needs()): the fp32 result of the whole block, and one chunk's temporaries."""
    per_element = BNB_TEMP_BYTES_PER_ELEMENT if with_bnb else TORCH_TEMP_BYTES_PER_ELEMENT
    return elements * 4 + min(elements, CHUNK) * per_element


def scale_bytes(elements: int) -> int:
    """The first pass's scales with bitsandbytes: absmax, their codes and the restored fp32."""
    return (elements // BLOCK + 1) * 9
