"""Will the training step fit in each GPU's memory? A component estimate.

Components per GPU: weights, LoRA adapters, gradients, optimizer states, activations (incl.
the logits, large for big vocabularies), plus the CUDA context and allocator slack. ZeRO-2
shards gradients and optimizer states across ranks, ZeRO-3 the weights too; DDP shards
nothing. The guides' rule of thumb (full fine-tuning ~4x the fp16 model bytes, LoRA ~1.2x,
QLoRA about half of LoRA) is reported beside the estimate as a sanity check. When it does
not fit, the suggestions follow the guides' order: QLoRA, gradient checkpointing, shorter
sequences, ZeRO-3, then more GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftkit.plan.catalog import ModelArch
from ftkit.recipe.models import TrainStep

GIB = 1024**3
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BYTES = 4.127 / 8  # nf4 with blocksize 64 and double-quantized absmax
CUDA_CONTEXT_GIB = 1.0
ALLOCATOR_SLACK = 0.08
FITS_BELOW = 0.92  # fraction of VRAM the estimate may use and still say "fits"
TIGHT_BELOW = 1.0


def lora_params(arch: ModelArch, r: int, targets: str | list[str]) -> int:
    h, i, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.heads * hd, arch.kv_heads * hd
    shapes = {
        "q_proj": (h, q_out),
        "k_proj": (h, kv_out),
        "v_proj": (h, kv_out),
        "o_proj": (q_out, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
    if targets != "all-linear" and not names:  # unknown module names: assume attention projections
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    per_layer = sum(r * (shapes[n][0] + shapes[n][1]) for n in names)
    return per_layer * arch.layers


def embedding_params(arch: ModelArch) -> int:
    return arch.vocab_size * arch.hidden_size * (1 if arch.tied_embeddings else 2)


@dataclass
class FitEstimate:
    gpu: int | None  # None: CPU
    vram_gib: float | None
    components_gib: dict[str, float]
    total_gib: float
    verdict: str  # fits | tight | does not fit | unknown
    rule_of_thumb_gib: float
    rule_of_thumb: str
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(step: TrainStep, arch: ModelArch, *, n_gpus: int, seq_len: int | None = None) -> dict[str, float]:
    """Bytes per GPU by component, for one training process."""
    params = arch.params_b * 1e9
    emb = embedding_params(arch)
    linear = max(params - emb, 0)
    dt = BYTES[step.precision]
    ranks = max(n_gpus, 1)
    zero = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}.get(step.distribution, 0)
    seq = seq_len or step.seq_len

    if step.method == "qlora":
        weights = linear * NF4_BYTES + emb * 2
    else:
        weights = params * dt
    if step.method == "full":
        trainable = params
        grads = params * dt
        opt_per = {"adamw_torch": 2 * dt, "adamw_torch_fused": 2 * dt, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}
        optimizer = params * opt_per[step.optimizer]
        adapters = 0.0
    else:
        trainable = lora_params(arch, step.lora.r, step.lora.target_modules)
        for name in step.lora.modules_to_save:
            if name in ("lm_head", "embed_tokens"):
                trainable += arch.vocab_size * arch.hidden_size
        adapters = trainable * 4  # peft keeps adapter weights in fp32
        grads = trainable * 4
        opt_per = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}
        optimizer = trainable * opt_per[step.optimizer]
    if zero >= 2:
        grads /= ranks
        optimizer /= ranks
    if zero == 3:
        weights /= ranks
        adapters /= ranks
    if step.cpu_offload:
        optimizer = 0.0

    tokens = seq * step.batch_size
    h, i = arch.hidden_size, arch.intermediate_size
    per_layer = tokens * (15 * h + 4.75 * i)  # 16-bit activations, SDPA/flash attention (no s^2 term)
    if step.gradient_checkpointing:
        activations = tokens * h * 2 * arch.layers + per_layer
    else:
        activations = per_layer * arch.layers
    logits = tokens * arch.vocab_size * 8  # bf16 logits, fp32 upcast for the loss, and its gradient
    parts = {
        "weights": weights,
        "adapters": adapters,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
    }
    subtotal = sum(parts.values())
    parts["cuda_context_and_slack"] = CUDA_CONTEXT_GIB * GIB + subtotal * ALLOCATOR_SLACK
    return parts


def rule_of_thumb(step: TrainStep, arch: ModelArch) -> tuple[float, str]:
    fp16_bytes = arch.params_b * 1e9 * 2
    if step.method == "full":
        return fp16_bytes * 4 / GIB, "full fine-tuning ~4x the fp16 model"
    if step.method == "lora":
        return fp16_bytes * 1.2 / GIB, "LoRA ~1.2x the fp16 model"
    return fp16_bytes * 0.6 / GIB, "QLoRA ~half of LoRA's 1.2x"


def fit(step: TrainStep, arch: ModelArch, vram: dict[int, float | None]) -> list[FitEstimate]:
    """One estimate per GPU of the step (one for the CPU when the step has no GPUs)."""
    gpus: list[int | None] = list(step.gpus) if isinstance(step.gpus, list) and step.gpus else [None]
    n = len([g for g in gpus if g is not None])
    parts = estimate(step, arch, n_gpus=n)
    total = sum(parts.values())
    rot, rot_text = rule_of_thumb(step, arch)
    if step.distribution in ("deepspeed-zero3",) and n > 1:
        rot /= n
        rot_text += f", sharded over {n} GPUs"
    out = []
    for g in gpus:
        cap = vram.get(g) if g is not None else None
        if g is None:
            verdict = "unknown"
            notes = ["CPU training: bounded by system RAM, not VRAM"]
        elif cap is None:
            verdict = "unknown"
            notes = [f"GPU {g}: VRAM unknown (name the GPU model or vram_gib in the machine profile)"]
        else:
            ratio = total / (cap * GIB)
            verdict = "fits" if ratio <= FITS_BELOW else "tight" if ratio <= TIGHT_BELOW else "does not fit"
            notes = []
        est = FitEstimate(
            gpu=g,
            vram_gib=cap,
            components_gib={k: round(v / GIB, 2) for k, v in parts.items()},
            total_gib=round(total / GIB, 2),
            verdict=verdict,
            rule_of_thumb_gib=round(rot, 1),
            rule_of_thumb=rot_text,
            notes=notes,
        )
        if verdict in ("tight", "does not fit"):
            est.suggestions = suggestions(step, arch, cap or 0.0, n)
        out.append(est)
    return out


def suggestions(step: TrainStep, arch: ModelArch, vram_gib: float, n_gpus: int) -> list[str]:
    """What to try, in the guides' order, each with the estimate it would give."""

    def total_with(**changes: Any) -> float:
        trial = step.model_copy(update=changes)
        return sum(estimate(trial, arch, n_gpus=n_gpus).values()) / GIB

    out = []
    if step.method != "qlora":
        out.append(f"method: qlora (4-bit base weights) -> ~{total_with(method='qlora'):.1f} GiB per GPU")
    if not step.gradient_checkpointing:
        out.append(f"gradient_checkpointing: true -> ~{total_with(gradient_checkpointing=True):.1f} GiB")
    if step.seq_len > 512:
        shorter = max(step.seq_len // 2, 256)
        out.append(f"seq_len: {shorter} -> ~{total_with(seq_len=shorter):.1f} GiB")
    if step.distribution != "deepspeed-zero3" and n_gpus > 1:
        out.append(f"distribution: deepspeed-zero3 -> ~{total_with(distribution='deepspeed-zero3'):.1f} GiB per GPU")
    more = max(n_gpus, 1) * 2
    trial = step.model_copy(update={"distribution": "deepspeed-zero3"})
    with_more = sum(estimate(trial, arch, n_gpus=more).values()) / GIB
    out.append(f"more GPUs: {more} x {vram_gib:g} GiB with deepspeed-zero3 -> ~{with_more:.1f} GiB per GPU")
    return out
