"""bitsandbytes on this machine, for the engines that use it (train, evaluate, merge).

bitsandbytes (0.50.2, what the train lock pins) runs NF4 4-bit layers, its 8-bit and paged
optimizers, and its quantize/dequantize functions on the CPU as well as on CUDA. Two things
about its CPU path matter to ftkit:

- Its packed CPU inference layout. A `Linear4bit` that runs in eval mode without gradients
  on a CPU with AVX512-BF16 converts its weight, in place and for good, to a layout for
  bitsandbytes' fused CPU kernel (`gemv_4bit`), with the block scales rounded to bf16. That
  kernel has no backward: once the Trainer's evaluation has run, the training steps after
  it lose the gradient through every 4-bit layer (torch warns "an autograd kernel was not
  registered ... silently incorrect behavior"), and saving a state dict converts the
  weight back with re-quantized scales. `keep_training_layout` turns the conversion off, so
  training, evaluation and the merge all see the weights exactly as quantized at load.
- Its import-time warning "Failed to load CPU gemm_4bit_forward from kernels-community"
  (the optional `kernels` package cannot fetch that kernel here). It concerns only the
  packed inference layout above, which ftkit's engines keep off, so it changes nothing ftkit
  runs: in a run it stays in the step log; `quiet_functional` keeps it off a person's
  console when `ftkit merge` runs by hand.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

KERNEL_FALLBACK = "gemm_4bit_forward"  # the words of bitsandbytes' CPU kernel-fallback warning

_functional: Any = None
_probed = False
_DEPRECATION = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


NOISE_LOGGERS = ("bitsandbytes", "kernels")  # kernels: the optional package that fetches that CPU kernel


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("kernels"):  # only ever about fetching the kernel above
            self.messages.append(record.getMessage())


def quiet_functional(log: Any = None) -> Any:
    """`bitsandbytes.functional` where bitsandbytes imports and quantizes a CPU tensor, else
    None. Its import-time log records and warnings are collected instead of printed; any
    that is not the (irrelevant) kernel-fallback warning goes to `log`."""
    global _functional, _probed
    if _probed:
        return _functional
    _probed = True
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in NOISE_LOGGERS]
    propagates = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                import bitsandbytes.functional as bnbf
                import torch

                probe = torch.linspace(-1, 1, 128)
                q, state = bnbf.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
                bnbf.dequantize_4bit(q, state)
            except Exception as e:  # noqa: BLE001 - not installed, no native library, no CPU backend
                if log is not None:
                    log(f"bitsandbytes is not usable here ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                return None
        _functional = bnbf
    finally:
        for lg, propagate in zip(loggers, propagates, strict=True):
            lg.removeHandler(handler)
            lg.propagate = propagate
    if log is not None:
        said = handler.messages + [str(w.message) for w in caught if not issubclass(w.category, _DEPRECATION)]
        for message in dict.fromkeys(said):  # once each
            if KERNEL_FALLBACK not in message:
                log(f"bitsandbytes: {message.splitlines()[0][:200]}")
    return _functional


def quantization_config(precision: str) -> Any:
    """QLoRA's 4-bit load, the same for training and for scoring its adapter: NF4, blocks of
    64, double-quantized scales, computing in the step's precision. Stored in the compute
    dtype, the 4-bit weights are ordinary tensors ZeRO-3 can shard."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)


def keep_training_layout(model: Any) -> int:
    """Keep every 4-bit layer of `model` in bitsandbytes' training layout (see the module
    docstring: the packed CPU inference layout has no backward and rounds the scales).
    Returns how many layers it turned the conversion off for."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            if module.support_avx512bf16_for_cpu:
                n += 1
            module.support_avx512bf16_for_cpu = False
    return n


def version() -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("bitsandbytes")
    except PackageNotFoundError:
        return None
