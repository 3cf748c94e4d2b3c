"""Merge a LoRA adapter into its base model, streaming shard by shard and tensor by tensor.

peft's `merge_and_unload` needs the whole model in memory. Here each base tensor is read,
merged (in fp32, a block of rows at a time) and written straight into the output file, so
peak memory is about the largest tensor, not the model. Handles the LoRA scaling (alpha/r,
rsLoRA alpha/sqrt(r), rank and alpha patterns), fan_in_fan_out (GPT-2 Conv1D) layers,
adapters on embeddings and lm_head, modules_to_save and resized embeddings saved with the
adapter, and tied embeddings.

QLoRA: the adapter was trained against 4-bit weights. Merging into the original 16-bit
weights (the default) gives a model slightly different from what was trained; with
`nf4_dequantized_base` the base is first rounded through NF4 (as QLoRA saw it), which
matches training more closely but carries the quantization error into the merged model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.engines import safetensors_io as st
from ftkit.errors import EngineError, UserError

PREFIX = "base_model.model."
COPY_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
ROW_BLOCK_BYTES = 16 * 2**20  # merge at most this much of a weight (in fp32) at once
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


@dataclass
class LoraPair:
    a: st.TensorInfo
    b: st.TensorInfo
    kind: str  # linear | embedding
    scale: float


@dataclass
class MergePlan:
    base_dir: Path
    adapter_dir: Path
    tensors: list[st.TensorInfo]  # output order (base order, then new tensors)
    loras: dict[str, list[LoraPair]] = field(default_factory=dict)  # base tensor name -> pairs
    replace: dict[str, st.TensorInfo] = field(default_factory=dict)  # base name -> adapter tensor
    fan_in_fan_out: bool = False
    untie: bool = False
    out_dtype: str = "BF16"
    nf4_dequantized_base: bool = False
    max_shard_bytes: int = 5 * 10**9

    def out_bytes(self) -> int:
        return sum(math.prod(t.shape) * st.DTYPE_SIZES[self._out_code(t)] for t in self.tensors)

    def _out_code(self, t: st.TensorInfo) -> str:
        return self.out_dtype if t.dtype in ("F32", "F16", "BF16") else t.dtype


def resolve_base(base: str, revision: str | None) -> Path:
    p = Path(base)
    if p.is_dir():
        return p
    if re.match(r"^[\w.-]+/[\w.-]+$", base):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(base, revision=revision,
                                          allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # noqa: BLE001 - hub errors come in many classes
            raise EngineError(f"cannot get base model {base}@{revision}: {e}") from e
    raise UserError(f"base model {base!r}: no such directory (and not a hub id)")


def base_tensors(base_dir: Path) -> list[st.TensorInfo]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{base_dir}: no model.safetensors or model.safetensors.index.json (only safetensors can stream)")
    out: list[st.TensorInfo] = []
    for name in files:
        infos, _ = st.read_header(base_dir / name)
        out.extend(infos.values())
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern: a key matches a module name ending in it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def plan_merge(base_dir: Path, adapter_dir: Path, *, dtype: str = "bf16", nf4_dequantized_base: bool = False,
               max_shard_gb: float = 5.0) -> MergePlan:
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    acfg = json.loads(cfg_path.read_text())
    if acfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir}: peft_type {acfg.get('peft_type')} is not LoRA")
    if acfg.get("use_dora"):
        raise UserError("DoRA adapters are not supported by the streaming merge; use peft's merge_and_unload")
    if acfg.get("lora_bias") or acfg.get("bias", "none") != "none":
        raise UserError("adapters that train biases are not supported by the streaming merge")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    base = base_tensors(base_dir)
    by_name = {t.name: t for t in base}
    adapter, _ = st.read_header(weights)
    plan = MergePlan(base_dir, adapter_dir, list(base), fan_in_fan_out=bool(acfg.get("fan_in_fan_out")),
                     out_dtype=OUT_DTYPES[dtype], nf4_dequantized_base=nf4_dequantized_base,
                     max_shard_bytes=int(max_shard_gb * 10**9))
    pending: dict[str, dict[str, st.TensorInfo]] = {}
    for key, info in adapter.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_magnitude_vector" in name or "trainable_tokens" in name:
            raise UserError(f"adapter tensor {key}: DoRA / trainable tokens are not supported by the streaming merge")
        m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$", name)
        e = re.match(r"^(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[\w-]+)?$", name)
        if m or e:
            module, part = (m or e).group(1), (m or e).group(2)  # type: ignore[union-attr]
            pending.setdefault(module, {})[part] = info
            continue
        target = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        plan.replace[target] = info
    tied = _tied(base_dir)
    embedding = next((t.name for t in base if t.name.endswith(("embed_tokens.weight", "wte.weight"))), None)
    for module, parts in pending.items():
        target = f"{module}.weight"
        if target not in by_name and target not in plan.replace:
            if target == "lm_head.weight" and tied and embedding:
                # A LoRA on a tied lm_head only ever changed the output projection in
                # training; folding it into the shared tensor (as merge_and_unload does)
                # would change the input embeddings too. Untie instead.
                plan.untie = True
            else:
                raise UserError(f"adapter targets {module}, but the base has no tensor {target}")
        rank = int(_pattern_value(acfg.get("rank_pattern") or {}, module, r))
        a = float(_pattern_value(acfg.get("alpha_pattern") or {}, module, alpha))
        scale = a / math.sqrt(rank) if acfg.get("use_rslora") else a / rank
        if "lora_A" in parts and "lora_B" in parts:
            pair = LoraPair(parts["lora_A"], parts["lora_B"], "linear", scale)
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            pair = LoraPair(parts["lora_embedding_A"], parts["lora_embedding_B"], "embedding", scale)
        else:
            raise UserError(f"adapter module {module}: has only {sorted(parts)}")
        plan.loras.setdefault(target, []).append(pair)
    for target in list(plan.replace):
        if target not in by_name:
            if target == "lm_head.weight" and tied and embedding:
                plan.untie = True  # modules_to_save (or a saved base layer) made lm_head its own tensor
            else:
                raise UserError(f"adapter carries {target}, which the base model does not have")
    if plan.untie and "lm_head.weight" not in by_name:
        emb = by_name[embedding]  # type: ignore[index]
        plan.tensors.append(st.TensorInfo("lm_head.weight", emb.dtype, list(emb.shape), emb.file, emb.begin, emb.end))
    for t in plan.tensors:  # shapes of replaced tensors (resized vocab) come from the adapter
        if t.name in plan.replace:
            t.shape = list(plan.replace[t.name].shape)
    return plan


def _tied(base_dir: Path) -> bool:
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    text = cfg.get("text_config") or {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def nf4_roundtrip(w: Any, blocksize: int = 64) -> Any:
    """Quantize to NF4 (absmax per block) and back, as QLoRA's frozen base looked in training.
    Uses bitsandbytes on CUDA when present (exact), else the same arithmetic in torch without
    the double quantization of the block scales (a difference far below the NF4 step)."""
    import torch

    try:
        import bitsandbytes.functional as bnbf

        if torch.cuda.is_available():
            q, state = bnbf.quantize_4bit(w.cuda(), blocksize=blocksize, quant_type="nf4", compress_statistics=True)
            return bnbf.dequantize_4bit(q, state).to(w.dtype).cpu()
    except ImportError:
        pass
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    code = torch.tensor(NF4, dtype=torch.float32)
    idx = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    deq = (code[idx] * absmax).reshape(-1)
    if pad:
        deq = deq[:-pad]
    return deq.reshape(w.shape).to(w.dtype)


def _is_quantized_linear(name: str, shape: list[int]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and ".layers." in name and "norm" not in name


def merged_tensor(plan: MergePlan, t: st.TensorInfo, read: Callable[[st.TensorInfo], Any]) -> Any:
    """The output tensor for one base tensor (the only place weights are combined)."""
    import torch

    w = read(plan.replace.get(t.name, t))
    out_dtype = st.torch_dtype(plan._out_code(t))
    if not w.is_floating_point():
        return w
    if plan.nf4_dequantized_base and t.name not in plan.replace and _is_quantized_linear(t.name, t.shape):
        w = nf4_roundtrip(w)
    pairs = plan.loras.get(t.name, [])
    if not pairs:
        return w.to(out_dtype)
    factors = [(read(p.a).float(), read(p.b).float(), p.scale,
                p.kind == "embedding" or plan.fan_in_fan_out) for p in pairs]
    out = torch.empty(w.shape, dtype=out_dtype)
    rows = max(1, ROW_BLOCK_BYTES // (4 * max(w.shape[-1], 1)))
    for i in range(0, w.shape[0], rows):
        block = w[i:i + rows].float()
        for a, b, scale, transposed in factors:
            # Linear: W (out, in) += B (out, r) @ A (r, in). Embeddings (A: (r, vocab), B: (dim, r))
            # and fan_in_fan_out Conv1D layers store W transposed: W += (B @ A)^T = A^T @ B^T.
            delta = (a[:, i:i + rows].T @ b.T) if transposed else (b[i:i + rows] @ a)
            block += delta * scale
        out[i:i + rows] = block.to(out_dtype)
    return out


def shards(plan: MergePlan) -> list[list[st.TensorInfo]]:
    groups: list[list[st.TensorInfo]] = [[]]
    size = 0
    for t in plan.tensors:
        n = math.prod(t.shape) * st.DTYPE_SIZES[plan._out_code(t)]
        if groups[-1] and size + n > plan.max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    return groups


@dataclass
class Needs:
    ram_bytes: int
    disk_bytes: int
    disk_free: int


def needs(plan: MergePlan, out: Path) -> Needs:
    """RAM: the largest tensor read and written, one fp32 block of rows, its LoRA factors.
    Disk: the whole output."""
    largest = max(plan.tensors, key=lambda t: math.prod(t.shape), default=None)
    ram = 0
    if largest is not None:
        elems = math.prod(largest.shape)
        ram = elems * (st.DTYPE_SIZES[largest.dtype] + st.DTYPE_SIZES[plan._out_code(largest)]) + 2 * ROW_BLOCK_BYTES
    factor_bytes = [sum(p.a.nbytes + p.b.nbytes for p in pairs) * 2 for pairs in plan.loras.values()]
    ram += max(factor_bytes, default=0)
    parent = out.parent if out.parent.exists() else Path(".")
    return Needs(ram, plan.out_bytes(), shutil.disk_usage(parent).free)


def merge(base: str, adapter: str, output: str, *, revision: str | None = None, dtype: str = "bf16",
          nf4_dequantized_base: bool = False, max_shard_gb: float = 5.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    with torch.no_grad():  # scoped: callers in the same process keep autograd
        return _merge(base, adapter, output, revision=revision, dtype=dtype,
                      nf4_dequantized_base=nf4_dequantized_base, max_shard_gb=max_shard_gb, log=log)


def _merge(base: str, adapter: str, output: str, *, revision: str | None, dtype: str, nf4_dequantized_base: bool,
           max_shard_gb: float, log: Callable[[str], None]) -> dict[str, Any]:
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output {out} exists and is not empty; choose another directory")
    base_dir = resolve_base(base, revision)
    plan = plan_merge(base_dir, Path(adapter), dtype=dtype, nf4_dequantized_base=nf4_dequantized_base,
                      max_shard_gb=max_shard_gb)
    need = needs(plan, out)
    gib = 2**30
    log(f"merge: {len(plan.tensors)} tensors, {len(plan.loras)} with LoRA, {len(plan.replace)} replaced by the adapter")
    log(f"merge: needs ~{need.ram_bytes / gib:.2f} GiB RAM (largest tensor, streamed) and "
        f"{need.disk_bytes / gib:.2f} GiB disk; {need.disk_free / gib:.1f} GiB free")
    if need.disk_free < need.disk_bytes * 1.02 + 2**20:
        raise UserError(f"not enough disk for the merged model: needs {need.disk_bytes / gib:.2f} GiB, "
                        f"{need.disk_free / gib:.2f} GiB free under {out.parent}")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        groups = shards(plan)
        weight_map: dict[str, str] = {}
        for n, group in enumerate(groups, 1):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{n:05d}-of-{len(groups):05d}.safetensors"
            writer = st.StreamWriter(tmp / fname, [(t.name, plan._out_code(t), list(t.shape)) for t in group])
            for t in group:
                writer.write(t.name, merged_tensor(plan, t, st.read_tensor))
                weight_map[t.name] = fname
            writer.close()
        if len(groups) > 1:
            index = {"metadata": {"total_size": plan.out_bytes()}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(base_dir, tmp, dtype, plan.untie)
        for name in COPY_FILES:
            src = (Path(adapter) / name) if name in TOKENIZER_FILES and (Path(adapter) / name).is_file() else base_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"output": str(out), "tensors": len(plan.tensors), "lora_tensors": len(plan.loras),
               "replaced": len(plan.replace), "shards": len(groups), "bytes": plan.out_bytes(), "dtype": dtype,
               "nf4_dequantized_base": nf4_dequantized_base}
    log(f"merge: wrote {out} ({len(groups)} shard(s), {plan.out_bytes() / gib:.2f} GiB)")
    return summary


def _write_config(base_dir: Path, out: Path, dtype: str, untie: bool) -> None:
    src = base_dir / "config.json"
    if not src.is_file():
        raise UserError(f"{base_dir}: no config.json")
    cfg = json.loads(src.read_text())
    cfg["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    if untie:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
