"""Will the training step fit in each GPU's memory? A component estimate, per GPU.

It counts what the training engine (engines/train.py) really allocates, in the dtypes that
transformers, peft, trl and DeepSpeed give each tensor:

| tensor | single / DDP (HF Trainer, autocast) | DeepSpeed ZeRO-2/3 (16-bit) |
|---|---|---|
| frozen linear weights | step precision; QLoRA: NF4 (~4.13 bits) | same |
| embeddings, lm_head, norms | step precision; QLoRA fp16 off ZeRO: fp32 (peft's upcast) | step precision (DeepSpeed casts) |
| LoRA adapters | LoRA: fp32 (peft); QLoRA: bf16 (trl casts them) | step precision (DeepSpeed casts) |
| gradients | adapter dtype; DDP adds its bucket copy | adapter dtype, sharded over the ranks |
| optimizer | AdamW: 2 states in the adapter dtype; 8-bit: 2 bytes | fp32 master copy + 2 fp32 states, sharded; 0 on the GPU with cpu_offload |

ZeRO-3 also shards the weights and adapters, but gathers whole modules to use them: the
largest one (usually the embedding, which the lm_head uses again for the logits) is counted
once in full. QLoRA follows trl's rule: under ZeRO-3 ("sharded QLoRA") the model is not
passed through peft's prepare_model_for_kbit_training (its fp32 upcast would mix dtypes,
which ZeRO-3 cannot shard); elsewhere in bf16 everything stays bf16 (what trl's own
preparation ends with); only fp16 off ZeRO keeps peft's fp32 embeddings, lm_head and norms.
Then activations (with gradient checkpointing: one checkpoint per layer plus one layer's
working set), the logits (large for big vocabularies), the CUDA context and allocator slack.

A preference step (DPO, ORPO) runs each pair's chosen and rejected answers as one batch of
twice the rows: twice the activations and logits. DPO also needs the reference's log-probs:
with PEFT, trl takes them from the same weights (adapter disabled, or the frozen "ref" copy of
an adapter trained further: one more adapter-sized tensor), in a no-grad forward of that
double batch while the policy's activations are held (its logits, one layer's working set).
ORPO has no reference.

The guides' rule of thumb (full fine-tuning ~4x the fp16 model bytes, LoRA ~1.2x, QLoRA about
half of LoRA; per GPU, divided by the GPU count under ZeRO-3) is reported beside it; where
the two disagree about fitting, the estimate carries a warning. When it does not fit, the
suggestions follow the guides' order: QLoRA, gradient checkpointing, shorter sequences,
ZeRO-3, then more GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ftkit.plan.figures import ModelArch
from ftkit.recipe.models import PreferenceStep, TrainStep

if TYPE_CHECKING:
    from ftkit.recipe.resolve import ResolvedTrainStep

GIB = 1024**3
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BYTES = 4.127 / 8  # nf4 with blocksize 64 and double-quantized absmax
CUDA_CONTEXT_GIB = 1.0
ALLOCATOR_SLACK = 0.08
FITS_BELOW = 0.92  # fraction of VRAM the estimate may use and still say "fits"
TIGHT_BELOW = 1.0
ADAM_STATES = {"adamw_torch": 2, "adamw_torch_fused": 2, "sgd": 0}  # states per parameter (momentum, variance)
EIGHT_BIT = ("paged_adamw_8bit", "adamw_8bit")


def _target_shapes(arch: ModelArch, targets: str | list[str]) -> list[tuple[int, int]]:
    """(in, out) of each LoRA-targeted linear layer in one decoder layer."""
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
    return [shapes[n] for n in names]


def lora_params(arch: ModelArch, r: int, targets: str | list[str]) -> int:
    return sum(r * (n_in + n_out) for n_in, n_out in _target_shapes(arch, targets)) * arch.layers


def dora_params(arch: ModelArch, targets: str | list[str]) -> int:
    """DoRA's magnitude vectors: one value per output feature of each targeted layer."""
    return sum(n_out for _, n_out in _target_shapes(arch, targets)) * arch.layers


def dora_temporaries(arch: ModelArch, targets: str | list[str], adapter_bytes: int) -> float:
    """peft's DoRA forward materialises a targeted layer's LoRA update (B @ A, out x in) and the
    updated weight whose norm it takes, in the adapter's dtype: two weight-sized temporaries of
    the largest targeted layer, one layer at a time."""
    largest = max((n_in * n_out for n_in, n_out in _target_shapes(arch, targets)), default=0)
    return 2.0 * largest * adapter_bytes


def embedding_params(arch: ModelArch) -> int:
    return arch.vocab_size * arch.hidden_size * (1 if arch.tied_embeddings else 2)


def norm_params(arch: ModelArch) -> int:
    return (2 * arch.layers + 1) * arch.hidden_size


def zero_stage(step: TrainStep) -> int:
    return {"deepspeed-zero2": 2, "deepspeed-zero3": 3}.get(step.distribution, 0)


def sharded_qlora(step: TrainStep) -> bool:
    """trl's "sharded QLoRA": the 4-bit model is sharded by ZeRO-3, so it must not be
    prepared with peft's fp32 upcast. engines/train.py follows the same rule."""
    return step.method == "qlora" and step.distribution == "deepspeed-zero3"


def kbit_upcast(step: TrainStep) -> bool:
    """Does the engine run peft's prepare_model_for_kbit_training (embeddings, lm_head and
    norms upcast to fp32)? Only for QLoRA in fp16 outside ZeRO-3: in bf16 trl's preparation
    casts everything back to bf16, so the engine leaves it out altogether."""
    return step.method == "qlora" and not sharded_qlora(step) and step.precision != "bf16"


def dtype_bytes(step: TrainStep) -> dict[str, int]:
    """Bytes per element, as allocated: the non-quantized frozen weights (embeddings, lm_head,
    norms) and the trainable ones (adapters, or all weights for full fine-tuning)."""
    dt = BYTES[step.precision]
    deepspeed = zero_stage(step) > 0
    if deepspeed and dt == 2:
        # DeepSpeed's engine casts every parameter to the 16-bit dtype
        return {"embeddings": 2, "trainable": 2}
    embeddings = 4 if kbit_upcast(step) else dt
    if step.method == "full":
        trainable = dt
    elif step.method == "qlora":
        trainable = 2  # trl casts a quantized model's trainable parameters to bf16
    else:
        trainable = 4  # peft keeps LoRA weights in fp32 (autocast_adapter_dtype)
        if step.distribution == "deepspeed-zero3":
            trainable = dt  # trl keeps them in the base dtype for ZeRO-3
    return {"embeddings": embeddings, "trainable": trainable}


@dataclass
class FitEstimate:
    gpu: int | None  # None: CPU
    vram_gib: float | None
    components_gib: dict[str, float]  # per GPU
    total_gib: float  # per GPU
    verdict: str  # fits | tight | does not fit | unknown
    rule_of_thumb_gib: float  # per GPU
    rule_of_thumb: str
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rule_of_thumb_verdict: str = "unknown"  # the same verdict from the rule of thumb
    disagreement: str | None = None  # set when the estimate and the rule of thumb disagree about fitting

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(step: TrainStep, arch: ModelArch, *, n_gpus: int, seq_len: int | None = None) -> dict[str, float]:
    """Bytes per GPU by component, for one training process."""
    params = arch.params_b * 1e9
    emb = embedding_params(arch)
    norms = norm_params(arch)
    linear = max(params - emb - norms, 0)
    dt = BYTES[step.precision]
    ranks = max(n_gpus, 1)
    zero = zero_stage(step)
    seq = seq_len or step.seq_len
    size = dtype_bytes(step)

    if step.method == "qlora":
        weights = linear * NF4_BYTES + (emb + norms) * size["embeddings"]
    elif step.method == "lora":
        weights = linear * dt + (emb + norms) * size["embeddings"]
    else:
        weights = 0.0  # full fine-tuning: every weight is trainable
    if step.method == "full":
        trainable = params
    else:
        trainable = lora_params(arch, step.lora.r, step.lora.target_modules)
        if step.lora.use_dora:
            trainable += dora_params(arch, step.lora.target_modules)
        for name in step.lora.modules_to_save:
            if name in ("lm_head", "embed_tokens"):
                trainable += arch.vocab_size * arch.hidden_size
    adapters = trainable * size["trainable"]
    grads = trainable * size["trainable"]
    if zero:
        # fp32 master copy (16-bit training) and AdamW's two fp32 states, partitioned
        master = 4 if dt == 2 else 0
        optimizer = trainable * (master + 4 * ADAM_STATES.get(step.optimizer, 2)) / ranks
        grads /= ranks
    elif step.optimizer in EIGHT_BIT:
        optimizer = trainable * 2.0
    else:
        optimizer = trainable * size["trainable"] * ADAM_STATES[step.optimizer]
    if step.distribution == "ddp":
        grads *= 2  # DDP's gradient buckets hold a second copy
    if step.cpu_offload:
        optimizer = 0.0
    gathered = 0.0
    if zero == 3:
        weights /= ranks
        adapters /= ranks
        layer = (params if step.method == "full" else linear) / max(arch.layers, 1)
        layer_bytes = layer * (NF4_BYTES if step.method == "qlora" else dt)
        emb_matrix = arch.vocab_size * arch.hidden_size * size["embeddings"]
        gathered = max(emb_matrix, 2 * layer_bytes)  # the embedding/lm_head, or a layer and its prefetch
    if step.method == "full":
        weights, adapters = adapters, 0.0  # report full fine-tuning's weights as weights

    autocast = 0.0
    if zero == 0 and dt == 2:
        # autocast makes 16-bit copies of fp32 weights for each matmul and keeps them for backward
        if size["trainable"] == 4:
            autocast += trainable * 2
        if size["embeddings"] == 4:
            autocast += arch.vocab_size * arch.hidden_size * 2  # the fp32 lm_head

    preference = isinstance(step, PreferenceStep)
    tokens = seq * step.batch_size * (2 if preference else 1)  # chosen + rejected in one forward
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
    if gathered:
        parts["zero3_gathered"] = gathered
    if autocast:
        parts["autocast_copies"] = autocast
    if preference and step.objective == "dpo":
        # the reference's no-grad forward: its logits (16-bit, fp32 log-softmax) and one layer at a time
        parts["reference_forward"] = tokens * arch.vocab_size * 6 + per_layer
        if step.adapter:  # trl's frozen copy of the adapter trained further
            parts["reference_adapter"] = adapters
    if step.method != "full" and step.lora.use_dora:
        parts["dora_temporaries"] = dora_temporaries(arch, step.lora.target_modules, size["trainable"])
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


def verdict_for(total_gib: float, vram_gib: float) -> str:
    ratio = total_gib / vram_gib
    return "fits" if ratio <= FITS_BELOW else "tight" if ratio <= TIGHT_BELOW else "does not fit"


def fit(step: ResolvedTrainStep, arch: ModelArch, vram: dict[int, float | None]) -> list[FitEstimate]:
    """One estimate per GPU of the step (one for the CPU when the step has no GPUs)."""
    gpus: list[int | None] = list(step.gpus) if step.gpus else [None]
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
        rot_verdict = "unknown"
        disagreement = None
        if g is None:
            verdict = "unknown"
            notes = ["CPU training: bounded by system RAM, not VRAM"]
        elif cap is None:
            verdict = "unknown"
            notes = [f"GPU {g}: VRAM unknown (name the GPU model or vram_gib in the machine profile)"]
        else:
            verdict = verdict_for(total / GIB, cap)
            rot_verdict = verdict_for(rot, cap)
            notes = []
            if (verdict == "fits") != (rot_verdict == "fits"):
                disagreement = (
                    f"GPU {g} ({cap:g} GiB): the component estimate says {verdict} ({total / GIB:.1f} GiB per GPU) but "
                    f"the rule of thumb says {rot_verdict} ({rot:.1f} GiB per GPU); check peak_gpu_mem_mib in "
                    "metrics.jsonl over the first steps before a long run"
                )
        est = FitEstimate(
            gpu=g,
            vram_gib=cap,
            components_gib={k: round(v / GIB, 2) for k, v in parts.items()},
            total_gib=round(total / GIB, 2),
            verdict=verdict,
            rule_of_thumb_gib=round(rot, 1),
            rule_of_thumb=rot_text,
            notes=notes,
            rule_of_thumb_verdict=rot_verdict,
            disagreement=disagreement,
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
        out.append(f"gradient_checkpointing: true -> ~{total_with(gradient_checkpointing=True):.1f} GiB per GPU")
    if step.seq_len > 512:
        shorter = max(step.seq_len // 2, 256)
        out.append(f"seq_len: {shorter} -> ~{total_with(seq_len=shorter):.1f} GiB per GPU")
    if step.distribution != "deepspeed-zero3" and n_gpus > 1:
        out.append(f"distribution: deepspeed-zero3 -> ~{total_with(distribution='deepspeed-zero3'):.1f} GiB per GPU")
    more = max(n_gpus, 1) * 2
    trial = step.model_copy(update={"distribution": "deepspeed-zero3"})
    with_more = sum(estimate(trial, arch, n_gpus=more).values()) / GIB
    out.append(f"more GPUs: {more} x {vram_gib:g} GiB with deepspeed-zero3 -> ~{with_more:.1f} GiB per GPU")
    return out
