"""Will the served model fit its GPU, and what does the quantize step hold at its peak?

Serving (vLLM). vLLM takes `gpu_memory_utilization` of each GPU's memory (0.9 by default) as
its budget; in it go the weights, the peak of a profiling forward pass (the activations of
`max_num_batched_tokens` tokens and the sampler's fp32 logits for `max_num_seqs` sequences),
memory outside torch's allocator (the CUDA context, cuBLAS workspaces), CUDA graphs unless
`enforce_eager`, and whatever is left becomes the KV cache. vLLM refuses to start when that
rest cannot hold one sequence of `max_model_len` tokens. Under tensor parallelism the weights
and the KV cache are split over the GPUs.

Weights by form, as the kernels hold them:
| form | linear layers | embeddings, lm_head, norms |
|---|---|---|
| bf16 / fp16 / fp32 | 2 / 2 / 4 bytes | the same |
| W4A16 (compressed-tensors, the quantize step) | 4 bits + a 16-bit scale per 128 weights | 16-bit (lm_head is ignored by default) |
| bitsandbytes 4-bit (vLLM's in-flight --quantization bitsandbytes) | NF4 ~4.13 bits | 16-bit |
| fp8 (vLLM's in-flight --quantization fp8) | 1 byte | 16-bit |

Quantizing (llm-compressor's oneshot, sequential pipeline). The model is loaded into host RAM
in its dtype; one decoder layer at a time is moved to the GPU, the calibration rows run
through it (their activations between layers are cached on the CPU), and each of its Linear
modules is rounded. GPTQ keeps one fp32 Hessian (in_features x in_features) per Linear of
the layer and inverts each in turn (a second in_features^2 block for the largest); AWQ keeps
the layer's inputs and outputs for all rows for its grid search instead. On a machine
without a GPU everything happens in host RAM.

Pure: figures in, estimates out. The measured peak on the tiny model is in bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ftkit.plan.figures import ModelArch
from ftkit.plan.memory import (
    BYTES,
    CUDA_CONTEXT_GIB,
    GIB,
    NF4_BYTES,
    FitEstimate,
    embedding_params,
    norm_params,
    verdict_for,
)
from ftkit.recipe import serveargs

W4A16_GROUP = 128
W4A16_BYTES = 0.5 + 2 / W4A16_GROUP  # 4-bit weights and one 16-bit scale per group of 128
VLLM_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
CUDA_GRAPHS_GIB = 0.5  # what vLLM's CUDA graph capture takes (it logs it), unless enforce_eager
# vLLM's defaults for the OpenAI server: max_num_batched_tokens and max_num_seqs, larger on
# cards of 70 GiB and more (vllm/engine/arg_utils.py, _set_default_max_num_seqs_and_batched_tokens_args)
VLLM_DEFAULT_TOKENS = (2048, 8192)
VLLM_DEFAULT_SEQS = (256, 1024)
BIG_CARD_GIB = 70
PYTHON_RUNTIME_GIB = 0.5  # torch, transformers and llm-compressor imported: measured ~0.48 GiB RSS here

FORMS = {
    "bf16": "bf16", "fp16": "fp16", "fp32": "fp32",
    "w4a16": "W4A16 (compressed-tensors, 4-bit weights, group 128)",
    "bnb4": "bitsandbytes 4-bit (NF4, quantized while loading)",
    "fp8": "fp8 (quantized while loading)",
}
# --quantization values that name a model already stored in 4 bits
PREQUANTIZED = ("awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "marlin")


def served_form(model: str, dtype: str, args: dict[str, Any]) -> str:
    """How the served weights are held: the quantize step's output is W4A16; otherwise vLLM's
    --quantization (bitsandbytes, fp8, or a 4-bit format of a model stored so), else the dtype."""
    if model == "quantized":
        return "w4a16"
    q = str(args.get("quantization", args.get("q", "")) or "").lower()
    if q == "bitsandbytes":
        return "bnb4"
    if q in ("fp8", "ptpc_fp8", "fbgemm_fp8"):
        return "fp8"
    if q in PREQUANTIZED:
        return "w4a16"
    wanted = str(args.get("dtype", "") or "").lower()
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(wanted, dtype)


def weight_bytes(arch: ModelArch, form: str) -> float:
    """The whole model's weights in `form` (see the table above)."""
    params = arch.params_b * 1e9
    emb, norms = embedding_params(arch), norm_params(arch)
    linear = max(params - emb - norms, 0.0)
    if form in BYTES:
        return params * BYTES[form]
    per = {"w4a16": W4A16_BYTES, "bnb4": NF4_BYTES, "fp8": 1.0}[form]
    return linear * per + (emb + norms) * 2


def kv_bytes_per_token(arch: ModelArch, kv_dtype: str = "auto", dtype: str = "bf16", tp: int = 1) -> float:
    """Keys and values of every layer for one token on one GPU: in the model's compute dtype
    (`auto`), or one byte each with an fp8 KV cache. Under tensor parallelism each GPU holds
    kv_heads / tp of the KV heads, and at least one: with fewer KV heads than GPUs vLLM
    replicates each over the GPUs that share it."""
    size = 1 if kv_dtype.startswith("fp8") else BYTES.get(dtype, 2)
    return 2 * arch.layers * max(arch.kv_heads // max(tp, 1), 1) * arch.kv_dim * size


def _arg(args: dict[str, Any], key: str) -> Any:
    return args.get(key, args.get(key.replace("_", "-")))


@dataclass
class ServeNeeds:
    """One serve GPU's figures, in bytes (per GPU)."""

    weights: float
    activations: float
    overhead: float
    kv_per_seq: float  # one sequence of max_model_len tokens
    budget: float | None  # gpu_memory_utilization x VRAM; None: unknown VRAM
    max_model_len: int
    seqs: int  # sequences the recipe asks to hold at full length (max_num_seqs, else 1)
    util: float = VLLM_UTILIZATION
    auto: bool = False  # max_model_len -1/auto: vLLM lowers the context to what the KV cache holds

    @property
    def floor(self) -> float:
        return self.weights + self.activations + self.overhead + self.kv_per_seq

    @property
    def before_kv(self) -> float:
        return self.weights + self.activations + self.overhead

    def full_length_seqs(self) -> int:
        if self.budget is None:
            return 0
        return max(int((self.budget - self.before_kv) // max(self.kv_per_seq, 1)), 0)


def serve_needs(arch: ModelArch, form: str, *, n_gpus: int, vram_gib: float | None, args: dict[str, Any],
                engine: str, dtype: str) -> ServeNeeds:
    """The figures of one serve GPU. The engine arguments are read as vLLM reads them
    (recipe.serveargs; validate has refused any it cannot read): unset, or unreadable, is
    vLLM's default."""
    tp = max(n_gpus, 1)
    big = vram_gib is not None and vram_gib >= BIG_CARD_GIB
    wanted = serveargs.read(args, "max_model_len")
    auto = wanted == serveargs.AUTO
    length = arch.max_position or 4096 if wanted is None or auto else int(wanted)
    seqs_arg = serveargs.read(args, "max_num_seqs")
    tokens = serveargs.read(args, "max_num_batched_tokens") or VLLM_DEFAULT_TOKENS[big]
    sampler_seqs = seqs_arg or VLLM_DEFAULT_SEQS[big]
    act_dtype = 4 if form == "fp32" else 2
    if engine != "vllm":  # transformers serve: one request at a time, no preallocated cache
        tokens, sampler_seqs = min(length, tokens), 1
    activations = tokens * (4 * arch.hidden_size + 4 * arch.intermediate_size) * act_dtype / tp
    activations += sampler_seqs * arch.vocab_size * 4  # the sampler's fp32 logits
    overhead = CUDA_CONTEXT_GIB * GIB
    if engine == "vllm" and not _arg(args, "enforce_eager"):
        overhead += CUDA_GRAPHS_GIB * GIB
    kv_dtype = str(_arg(args, "kv_cache_dtype") or "auto")
    per_seq = kv_bytes_per_token(arch, kv_dtype, form if form in BYTES else "bf16", tp) * length
    util = serveargs.read(args, serveargs.UTILIZATION)
    if util is None:  # not `or`: a 0 is vLLM's to refuse (validate does), never the default
        util = VLLM_UTILIZATION if engine == "vllm" else 1.0
    budget = vram_gib * GIB * util if vram_gib is not None else None
    return ServeNeeds(weight_bytes(arch, form) / tp, activations, overhead, per_seq, budget, length,
                      int(seqs_arg or 1), util, auto)


AUTO_MIN_TOKENS = 16  # one KV cache block: less and vLLM's auto-fit has no context to give


def serve_fit(arch: ModelArch, form: str, *, gpus: list[int], vram: dict[int, float | None], args: dict[str, Any],
              engine: str, platform: str, dtype: str, quantize_hint: str | None) -> list[FitEstimate]:
    """One estimate per serve GPU (one for the CPU build). `quantize_hint`: what to say to
    serve 4-bit instead (a quantize step to add, or the one there is), when 16-bit does not fit."""
    if platform == "cpu" or not gpus:
        w = weight_bytes(arch, form)
        return [FitEstimate(
            gpu=None, vram_gib=None, components_gib={"weights": round(w / GIB, 2)}, total_gib=round(w / GIB, 2),
            verdict="unknown", rule_of_thumb_gib=0.0, rule_of_thumb="",
            notes=[f"served on the CPU: {FORMS[form]} weights in host RAM"
                   + (", the KV cache beside them (VLLM_CPU_KVCACHE_SPACE)" if engine == "vllm" else "")])]
    out = []
    for g in gpus:
        cap = vram.get(g)
        n = serve_needs(arch, form, n_gpus=len(gpus), vram_gib=cap, args=args, engine=engine, dtype=dtype)
        parts = {"weights": n.weights, "activations": n.activations, "cuda_context_and_graphs": n.overhead}
        notes = [f"{FORMS[form]} weights" + (f", split over {len(gpus)} GPUs (tensor parallel)" if len(gpus) > 1 else "")]
        if arch.kv_heads_assumed:
            notes.append(f"the KV cache assumes {arch.kv_heads} KV heads, one per attention head (no grouped-query "
                         "attention): model.arch gives no kv_heads; most models have fewer, and a cache that many "
                         "times smaller")
        suggestions: list[str] = []
        if cap is None or n.budget is None:
            parts["kv_cache_one_sequence"] = n.kv_per_seq
            verdict = "unknown"
            notes.append(f"GPU {g}: VRAM unknown (name the GPU model or vram_gib in the machine profile)")
        else:
            verdict, more, suggestions = _serve_verdict(arch, form, n, n.budget, gpus, cap, args, engine, dtype,
                                                        quantize_hint)
            notes += more
            # what vLLM gives the KV cache: the rest of its budget, at least one sequence (auto: the rest)
            parts["kv_cache"] = max(n.budget - n.before_kv, 0.0 if n.auto else n.kv_per_seq)
        total = sum(parts.values())
        out.append(FitEstimate(gpu=g, vram_gib=cap, components_gib={k: round(v / GIB, 2) for k, v in parts.items()},
                               total_gib=round(total / GIB, 2), verdict=verdict, rule_of_thumb_gib=0.0, rule_of_thumb="",
                               suggestions=suggestions, notes=notes))
    return out


def _serve_verdict(arch: ModelArch, form: str, n: ServeNeeds, budget: float, gpus: list[int], cap: float,
                   args: dict[str, Any], engine: str, dtype: str,
                   quantize_hint: str | None) -> tuple[str, list[str], list[str]]:
    """(verdict, notes, suggestions) of one serve GPU whose VRAM (`cap`) and so `budget` are
    known. A note that starts with "needs " says why it does not fit (plan.machine_checks
    quotes it)."""
    held = n.full_length_seqs()
    left = budget - n.before_kv
    per_token = n.kv_per_seq / max(n.max_model_len, 1)
    of_budget = f"({cap:g} GiB x gpu_memory_utilization {n.util:g})"
    free = (cap - CUDA_CONTEXT_GIB) * GIB
    if engine == "vllm" and budget > free:
        # vLLM asks for its whole budget at start-up, and the card has the CUDA context less
        most = math.floor(max(cap - CUDA_CONTEXT_GIB, 0.0) / cap * 100) / 100
        out = [f"gpu_memory_utilization: {most:g} or less"] if most > 0 else []
        if n.floor > free and most > 0:  # what else it takes, with a budget vLLM can have
            lower = {k: v for k, v in args.items() if k not in serveargs.spellings(serveargs.UTILIZATION)}
            lower[serveargs.UTILIZATION] = most
            m = serve_needs(arch, form, n_gpus=len(gpus), vram_gib=cap, args=lower, engine=engine, dtype=dtype)
            if m.floor > (m.budget or 0):
                out += _serve_suggestions(arch, form, m, gpus, cap, lower, engine, dtype, quantize_hint)
        return "does not fit", [f"needs its budget of {budget / GIB:.1f} GiB {of_budget} free when vLLM starts, and "
                                f"the CUDA context takes ~{CUDA_CONTEXT_GIB:g} GiB of the card first: vLLM refuses to "
                                "start (free memory less than the desired GPU memory utilization)"], out
    if n.floor > budget and n.auto and left >= per_token * AUTO_MIN_TOKENS:
        fits_len = int(left // max(per_token, 1))
        return "tight", [f"max_model_len auto: vLLM lowers the context to ~{fits_len} tokens, what the "
                         f"{left / GIB:.1f} GiB left of the {budget / GIB:.1f} GiB budget {of_budget} holds, below "
                         f"the model's {n.max_model_len}"], [f"max_model_len: {fits_len // 256 * 256 or fits_len} "
                                                             "(what the KV cache has room for), or a larger budget"]
    if n.floor > budget:
        need = (f"{n.floor / GIB:.1f} GiB with one {n.max_model_len}-token sequence in the KV cache; "
                f"the budget is {budget / GIB:.1f} GiB {of_budget}")
        if arch.kv_heads_assumed:
            fewest = serve_needs(dataclasses.replace(arch, kv_heads=1, kv_heads_assumed=False), form,
                                 n_gpus=len(gpus), vram_gib=cap, args=args, engine=engine, dtype=dtype)
            if fewest.floor <= budget:  # fits with grouped-query attention: the estimate cannot tell
                return "tight", [f"may not fit: {need}, counting one KV head per attention head; with the model's "
                                 "grouped-query attention the KV cache is smaller"], [
                                     "model.arch.kv_heads: the model's num_key_value_heads (config.json), for the "
                                     "KV cache's real size"]
        return "does not fit", [f"needs {need}"], _serve_suggestions(arch, form, n, gpus, cap, args, engine, dtype, quantize_hint)
    verdict = "fits" if held >= n.seqs else "tight"
    note = (f"the KV cache gets {max(left, 0) / GIB:.1f} GiB of the {budget / GIB:.1f} GiB budget {of_budget}: "
            f"{held} sequence(s) of max_model_len {n.max_model_len} at once"
            + (f", max_num_seqs asks for {n.seqs}" if n.seqs > 1 else ""))
    suggestions = ([f"max_num_seqs: {max(held, 1)} (what the KV cache holds at full length), or a shorter "
                    "max_model_len"] if verdict == "tight" else [])
    return verdict, [note], suggestions


def _serve_suggestions(arch: ModelArch, form: str, n: ServeNeeds, gpus: list[int], cap: float, args: dict[str, Any],
                       engine: str, dtype: str, quantize_hint: str | None) -> list[str]:
    out = []
    if form in ("bf16", "fp16", "fp32") and quantize_hint:
        q = serve_needs(arch, "w4a16", n_gpus=len(gpus), vram_gib=cap, args=args, engine=engine, dtype=dtype)
        room = (f"room for {q.full_length_seqs()} sequence(s) of {q.max_model_len} tokens" if q.floor <= (q.budget or 0)
                else "still over: also shorten max_model_len")
        out.append(f"{quantize_hint} -> weights ~{q.weights / GIB:.1f} GiB per GPU, {room}")
    weights_etc = n.weights + n.activations + n.overhead
    if n.budget is not None and weights_etc < n.budget:
        fits_len = int((n.budget - weights_etc) / max(n.kv_per_seq / n.max_model_len, 1))
        if fits_len >= 256:
            out.append(f"max_model_len: {fits_len // 256 * 256} (what the KV cache has room for)")
    out.append(f"more GPUs: {len(gpus) * 2} (tensor parallel) -> weights ~{n.weights * len(gpus) / (len(gpus) * 2) / GIB:.1f} "
               "GiB per GPU")
    return out


# --------------------------------------------------------------------------- quantize


def w4a16_inputs(arch: ModelArch) -> list[tuple[str, int, bool]]:
    """(what, in_features, row parallel) of each kind of Linear in a decoder layer (Llama and
    Mistral shapes): row parallel ones split their inputs over tensor-parallel GPUs."""
    return [("hidden_size (the input of q, k, v, gate and up)", arch.hidden_size, False),
            ("num_attention_heads x head_dim (the input of o_proj)", arch.heads * arch.kv_dim, True),
            ("intermediate_size (the input of down_proj)", arch.intermediate_size, True)]


def w4a16_problems(arch: ModelArch, *, tp: int = 1, row_parallel_only: bool = False) -> list[str]:
    """Why W4A16 (groups of 128 inputs) cannot quantize, or with `tp` GPUs cannot serve, this
    model's Linear layers: one line per input size that is not whole groups. With
    `row_parallel_only`, only the per-GPU shares of sizes that are whole groups themselves
    (the others are said once, where the model is quantized)."""
    out = []
    for what, size, row in w4a16_inputs(arch):
        if row_parallel_only and (not row or size % W4A16_GROUP):
            continue
        parts = tp if row else 1
        if size % parts:
            out.append(f"{what} {size} does not split evenly over {parts} GPUs")
        elif (size // parts) % W4A16_GROUP:
            share = f" is {size // parts} per GPU over {parts} GPUs, which" if parts > 1 else ""
            out.append(f"{what} {size}{share} is not a multiple of {W4A16_GROUP}: W4A16 quantizes each Linear's "
                       f"inputs in groups of {W4A16_GROUP}")
    return out


def _layer_linears(arch: ModelArch) -> list[int]:
    """in_features of each Linear module of one decoder layer (Llama/Mistral shapes)."""
    q_out = arch.heads * arch.kv_dim
    h, i = arch.hidden_size, arch.intermediate_size
    return [h, h, h, q_out, h, h, i]  # q, k, v, o, gate, up, down


def quantize_parts(arch: ModelArch, *, method: str, dtype: str, samples: int, seq_len: int,
                   on_gpu: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(device bytes by component, host RAM bytes by component) at the quantize step's peak."""
    params = arch.params_b * 1e9
    size = BYTES.get(dtype, 2)
    layer_params = max(params - embedding_params(arch) - norm_params(arch), 0.0) / max(arch.layers, 1)
    layer = layer_params * size
    ins = _layer_linears(arch)
    act = seq_len * (6 * arch.hidden_size + 3 * arch.intermediate_size) * size  # one row through one layer
    cache = samples * seq_len * arch.hidden_size * size * 2  # the cached inputs and outputs of the layer, every row
    if method == "gptq":
        work = {"hessians": sum(4.0 * n * n for n in ins), "hessian_inverse": 4.0 * max(ins) ** 2}
    else:  # awq: the layer's outputs for every row, twice (the reference and one grid point), and a weight copy
        work = {"awq_grid_search": cache + layer}
    model = params * size
    host = {"model": model, "activation_cache": cache, "python_runtime": PYTHON_RUNTIME_GIB * GIB}
    if on_gpu:
        device = {"layer_weights": layer, **work, "calibration_activations": act,
                  "cuda_context": CUDA_CONTEXT_GIB * GIB}
        return device, host
    host.update(work)
    host["calibration_activations"] = act
    return {}, host


def quantize_fit(arch: ModelArch, *, method: str, dtype: str, samples: int, seq_len: int, gpus: list[int],
                 vram: dict[int, float | None], ram_gib: float | None) -> list[FitEstimate]:
    """The quantize step's peak: on its GPU (one layer at a time), and in host RAM."""
    device, host = quantize_parts(arch, method=method, dtype=dtype, samples=samples, seq_len=seq_len,
                                  on_gpu=bool(gpus))
    host_total = sum(host.values())
    ram_note = (f"host RAM: {host_total / GIB:.1f} GiB at the peak (the whole model in {dtype}, "
                f"{host['model'] / GIB:.1f} GiB, stays on the CPU; llm-compressor's sequential pipeline moves one "
                "layer at a time to the GPU)" if gpus else "")
    ram_verdict = "unknown"
    ram_short = ""
    if ram_gib is not None:
        ram_verdict = "fits" if host_total / GIB <= ram_gib * 0.9 else "does not fit"
        # a note that starts with "needs " says why it does not fit (plan.machine_checks quotes it)
        ram_short = (f"needs host RAM {host_total / GIB:.1f} GiB of {ram_gib:g} GiB, more than the 90% a step may "
                     f"take (the whole model stays in host RAM in {dtype} while one layer at a time calibrates)")
    if not gpus:
        notes = ["calibrates on the CPU: every figure is host RAM"]
        if ram_gib is not None:
            notes.append(f"machine RAM {ram_gib:g} GiB")
        if ram_verdict == "does not fit":
            notes.append(ram_short)
        return [FitEstimate(gpu=None, vram_gib=None, components_gib={k: round(v / GIB, 2) for k, v in host.items()},
                            total_gib=round(host_total / GIB, 2), verdict=ram_verdict, rule_of_thumb_gib=0.0,
                            rule_of_thumb="", notes=notes,
                            suggestions=["a machine with a GPU, or more RAM"] if ram_verdict == "does not fit" else [])]
    out = []
    total = sum(device.values())
    for g in gpus:
        cap = vram.get(g)
        verdict = verdict_for(total / GIB, cap) if cap else "unknown"
        notes = [ram_note]
        suggestions = []
        if cap is None:
            notes.append(f"GPU {g}: VRAM unknown (name the GPU model or vram_gib in the machine profile)")
        elif verdict == "does not fit":
            notes.append(f"needs an estimated {total / GIB:.1f} GiB on GPU {g} ({cap:g} GiB)")
            suggestions.append("fewer calibration_samples or a shorter max_seq_len (the activations), or a GPU "
                               "with more memory")
        if ram_verdict == "does not fit":
            verdict = "does not fit"
            notes.append(ram_short)
            suggestions.append("a machine with more RAM (the model is held in host RAM while one layer at a time "
                               "calibrates)")
        out.append(FitEstimate(gpu=g, vram_gib=cap, components_gib={k: round(v / GIB, 2) for k, v in device.items()},
                               total_gib=round(total / GIB, 2), verdict=verdict, rule_of_thumb_gib=0.0,
                               rule_of_thumb="", notes=notes, suggestions=suggestions))
    return out
