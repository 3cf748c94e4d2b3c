"""Figures ftkit knows without asking: GPU power and memory, and model architectures.

GPU transients come from the guides ftkit grew out of (an RTX 4090 at 450 W spikes to
~600 W; an RTX 3090 Ti rated 350 W to ~650 W). Where no transient figure is known, the
default factor 1.5 stands for "brief surges can exceed the rating by 50% or more".
A machine profile overrides any of these per GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRANSIENT_FACTOR = 1.5


@dataclass(frozen=True)
class GpuModel:
    name: str
    tdp_w: int
    transient_w: int | None  # worst transient at the default limit, where measured
    vram_gib: float
    compute_capability: str
    min_w: int
    max_w: int

    @property
    def transient_factor(self) -> float:
        return (self.transient_w / self.tdp_w) if self.transient_w else DEFAULT_TRANSIENT_FACTOR


GPUS: tuple[GpuModel, ...] = (
    GpuModel("RTX 4090", 450, 600, 24, "8.9", 150, 600),
    GpuModel("RTX 3090 Ti", 350, 650, 24, "8.6", 100, 450),
    GpuModel("RTX 3090", 350, None, 24, "8.6", 100, 400),
    GpuModel("RTX 4080", 320, None, 16, "8.9", 150, 400),
    GpuModel("RTX 5090", 575, None, 32, "12.0", 400, 600),
    GpuModel("RTX 5080", 360, None, 16, "12.0", 250, 400),
    GpuModel("RTX A6000", 300, None, 48, "8.6", 100, 300),
    GpuModel("RTX 6000 Ada", 300, None, 48, "8.9", 150, 300),
    GpuModel("L40S", 350, None, 48, "8.9", 100, 350),
    GpuModel("A100 80GB", 400, None, 80, "8.0", 150, 400),
    GpuModel("H100 80GB", 700, None, 80, "9.0", 200, 700),
    GpuModel("H200", 700, None, 141, "9.0", 200, 700),
)


def _norm(name: str) -> str:
    s = name.lower().replace("nvidia", "").replace("geforce", "")
    return re.sub(r"[^a-z0-9]+", "", s)


def find_gpu(name: str) -> GpuModel | None:
    """Match 'NVIDIA GeForce RTX 4090' or 'rtx4090' to the catalog; longest name wins
    so 'RTX 3090 Ti' is not taken for 'RTX 3090'."""
    key = _norm(name)
    hits = [g for g in GPUS if _norm(g.name) in key]
    return max(hits, key=lambda g: len(_norm(g.name))) if hits else None


@dataclass(frozen=True)
class ModelArch:
    params_b: float
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    vocab_size: int
    tied_embeddings: bool = False
    max_position: int | None = None  # the context the model was built for: vLLM's default max-model-len
    kv_head_dim: int | None = None  # the attention head size where the config sets it apart from hidden/heads
    kv_heads_assumed: bool = False  # kv_heads unknown, taken = heads (no grouped-query attention): an upper bound

    @property
    def kv_dim(self) -> int:
        """The head size the KV cache stores (the serving fit; the training estimate still uses
        hidden/heads for its LoRA shapes, as it always has)."""
        return self.kv_head_dim or self.head_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


# Public figures from the models' config.json files.
ARCHS: dict[str, ModelArch] = {
    "mistralai/Mistral-Small-24B-Instruct-2501": ModelArch(23.57, 40, 5120, 32768, 32, 8, 131072, max_position=32768,
                                                                 kv_head_dim=128),
    "mistralai/Mistral-Small-24B-Base-2501": ModelArch(23.57, 40, 5120, 32768, 32, 8, 131072, max_position=32768,
                                                                 kv_head_dim=128),
    "google/gemma-2-27b-it": ModelArch(27.23, 46, 4608, 36864, 32, 16, 256000, tied_embeddings=True, max_position=8192,
                                           kv_head_dim=128),
    "google/gemma-2-27b": ModelArch(27.23, 46, 4608, 36864, 32, 16, 256000, tied_embeddings=True, max_position=8192,
                                           kv_head_dim=128),
    "meta-llama/Llama-3.1-8B-Instruct": ModelArch(8.03, 32, 4096, 14336, 32, 8, 128256, max_position=131072),
    "meta-llama/Llama-3.1-8B": ModelArch(8.03, 32, 4096, 14336, 32, 8, 128256, max_position=131072),
    "NousResearch/Meta-Llama-3.1-8B-Instruct": ModelArch(8.03, 32, 4096, 14336, 32, 8, 128256, max_position=131072),
}


def find_arch(model_id: str) -> ModelArch | None:
    return ARCHS.get(model_id)
