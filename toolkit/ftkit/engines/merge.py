"""Merge a LoRA adapter into its base model, streaming shard by shard and tensor by tensor.

peft's `merge_and_unload` needs the whole model in memory. Here each base tensor is read,
merged (in fp32, a block of rows at a time) and written straight into the output file, so
peak memory is about the largest tensor, not the model. Handles the LoRA scaling (alpha/r,
rsLoRA alpha/sqrt(r), rank and alpha patterns), fan_in_fan_out (GPT-2 Conv1D) layers,
adapters on embeddings and lm_head, modules_to_save and resized embeddings saved with the
adapter (the output config's vocab_size follows them), tied embeddings, and DoRA (each
output feature's weights scaled to the trained magnitude over the norm of base + update, as
peft's merge does: within each row block for Linear weights, with a first pass over the
columns for embeddings and Conv1D layers).

The output keeps the base's dtype unless `dtype` asks for another: an fp32 base stays fp32.

QLoRA: the adapter was trained against 4-bit weights. Merging into the original 16-bit
weights (the default) gives a model slightly different from what was trained; with
`nf4_dequantized_base` the base is first rounded through NF4 exactly as QLoRA's layers saw
it (engines.nf4: cast to the training precision, bitsandbytes' own quantize/dequantize with
double-quantized scales wherever bitsandbytes runs, CPU included), which matches training
but carries the quantization error into the merged model. The rounding runs inside the same
row blocks as the merge, so it adds tens of MiB (and bitsandbytes' import), not a multiple
of the weight.

Inputs are not trusted: every header, shape, rank and config value is checked before a byte
is written (exit 2, one line), the adapter's values and every output tensor are checked
finite, the output appears only by a rename of a complete directory, and a merge that dies
leaves a locked hidden directory that the next merge to the same place removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.engines import nf4 as nf4_round
from ftkit.engines import safetensors_io as st
from ftkit.engines.safetensors_io import BadModelFile
from ftkit.errors import EngineError, FtkitError, UserError

PREFIX = "base_model.model."
COPY_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")  # without one of these there is no tokenizer
ROW_BLOCK_BYTES = 16 * 2**20  # merge at most this much of a weight (in fp32) at once
CACHE_BLOCK_BYTES = 512 * 2**10  # ... in sub-blocks this big (fp32), which stay in the CPU's cache
OUT_BLOCK_BYTES = 8 * 2**20  # the output blocks handed to the writer thread
BNB_IMPORT_BYTES = 150 * 2**20  # what importing bitsandbytes adds to the process (measured: 150 MiB)
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}
CONFIG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PARTIAL = ".partial-"
STALE_UNLOCKED_S = 60  # a partial directory without its lock file is stale after this long


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
    dora: dict[str, st.TensorInfo] = field(default_factory=dict)  # base tensor name -> DoRA magnitude vector
    replace: dict[str, st.TensorInfo] = field(default_factory=dict)  # base name -> adapter tensor
    fan_in_fan_out: bool = False
    untie: bool = False
    out_dtype: str | None = None  # None: every tensor keeps the base's dtype
    nf4_dequantized_base: bool = False
    nf4_dtype: str = "bf16"  # the precision QLoRA loaded (and quantized) the base in: the train step's
    nf4_bnb: bool | None = None  # round with bitsandbytes (None: wherever it runs here)
    max_shard_bytes: int = 5 * 10**9
    config: dict[str, Any] = field(default_factory=dict)  # the base's config.json
    vocab_size: int | None = None  # set when the adapter resized the embeddings
    mismatches: list[str] = field(default_factory=list)  # the adapter may not be for this base (--force)
    notes: list[str] = field(default_factory=list)  # harmless differences, said as warnings

    def out_bytes(self) -> int:
        return sum(math.prod(t.shape) * st.DTYPE_SIZES[self._out_code(t)] for t in self.tensors)

    def _out_code(self, t: st.TensorInfo) -> str:
        if self.out_dtype is not None and t.dtype in ("F32", "F16", "BF16"):
            return self.out_dtype
        return t.dtype

    def nf4_with_bnb(self) -> bool:
        """Whether the NF4 rounding is bitsandbytes' own (it imports and runs here)."""
        if self.nf4_bnb is None:
            from ftkit.engines import bnb

            self.nf4_bnb = bnb.quiet_functional() is not None
        return self.nf4_bnb

    def dtype_label(self) -> str:
        """What the output's floating-point weights are stored as, for people and config.json."""
        if self.out_dtype is not None:
            return DTYPE_NAMES[self.out_dtype]
        codes = {t.dtype for t in self.tensors if t.dtype in st.FLOAT_DTYPES}
        return DTYPE_NAMES[codes.pop()] if len(codes) == 1 else "mixed"


def resolve_base(base: str, revision: str | None) -> Path:
    p = Path(base)
    if p.is_dir():
        return p
    if os.path.lexists(p):
        raise UserError(f"base model {base!r}: not a directory")
    if re.match(r"^[\w.-]+/[\w.-]+$", base) and ".." not in base and not base.startswith((".", "-")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(base, revision=revision,
                                          allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # noqa: BLE001 - hub errors come in many classes
            raise EngineError(f"cannot get base model {base}@{revision}: {e}") from e
    raise UserError(f"base model {base!r}: no such directory (and not a hub id)")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def base_tensors(base_dir: Path) -> list[st.TensorInfo]:
    index = base_dir / "model.safetensors.index.json"
    if os.path.lexists(index):
        data = st.load_json(index, "the shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadModelFile(f"{index}: needs a non-empty weight_map of tensor name -> shard file")
        files: list[str] = []
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
                raise BadModelFile(f"{index}: shard {st._show(shard)} of {st._show(name)} is not a file name "
                                   "in the base directory")
            if shard not in files:
                files.append(shard)
        for shard in files:
            path = base_dir / shard
            if not os.path.lexists(path):
                raise BadModelFile(f"{index}: shard {shard!r} does not exist")
            if not _inside(path, base_dir):
                raise BadModelFile(f"{index}: shard {shard!r} links outside the base directory")
    elif os.path.lexists(base_dir / "model.safetensors"):
        files, weight_map = ["model.safetensors"], None
    else:
        raise UserError(f"{base_dir}: no model.safetensors or model.safetensors.index.json (only safetensors can stream)")
    out: list[st.TensorInfo] = []
    seen: dict[str, str] = {}
    for name in sorted(files):
        infos, _ = st.read_header(base_dir / name)
        for info in infos.values():
            if info.name in seen:
                raise BadModelFile(f"{base_dir}: tensor {st._show(info.name)} is in both {seen[info.name]} and {name}")
            seen[info.name] = name
            out.append(info)
    if weight_map is not None:
        for tname, shard in weight_map.items():
            if seen.get(tname) != shard:
                raise BadModelFile(f"{index}: the index puts {st._show(tname)} in {shard}, which does not hold it")
    if not out:
        raise BadModelFile(f"{base_dir}: the base model holds no tensors")
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern: a key matches a module name ending in it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, with every value the merge uses checked."""
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir() or not os.path.lexists(cfg_path) or not os.path.lexists(weights):
        raise UserError(f"{adapter_dir}: not a LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    acfg = st.load_json(cfg_path, "the adapter config", limit=16 * 2**20)
    if not isinstance(acfg, dict):
        raise BadModelFile(f"{cfg_path}: not a JSON object")
    where = f"{cfg_path}:"
    if acfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir}: peft_type {st._show(acfg.get('peft_type'))} is not LoRA")
    if acfg.get("lora_bias") or acfg.get("bias", "none") != "none":
        raise UserError("adapters that train biases are not supported by the streaming merge")
    r = acfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise BadModelFile(f"{where} r must be a positive integer, got {st._show(r)}")
    if not _number(acfg.get("lora_alpha")):
        raise BadModelFile(f"{where} lora_alpha must be a finite number, got {st._show(acfg.get('lora_alpha'))}")
    for key in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if acfg.get(key) not in (None, True, False):
            raise BadModelFile(f"{where} {key} must be true or false, got {st._show(acfg.get(key))}")
    for key, check, what in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                              "a positive integer"),
                             ("alpha_pattern", _number, "a finite number")):
        patterns = acfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise BadModelFile(f"{where} {key} must map module patterns to values")
        for pattern, value in patterns.items():
            if not check(value):
                raise BadModelFile(f"{where} {key}[{st._show(pattern)}] must be {what}, got {st._show(value)}")
            from ftkit.recipe.checks import regex_problem

            problem = regex_problem(pattern)
            if problem:
                raise BadModelFile(f"{where} {key} pattern {st._show(pattern)}: {problem}")
    return acfg


def _base_config(base_dir: Path) -> dict[str, Any]:
    src = base_dir / "config.json"
    if not os.path.lexists(src):
        raise UserError(f"{base_dir}: no config.json")
    cfg = st.load_json(src, "the model config", limit=16 * 2**20)
    if not isinstance(cfg, dict):
        raise BadModelFile(f"{src}: not a JSON object")
    if cfg.get("text_config") is not None and not isinstance(cfg["text_config"], dict):
        raise BadModelFile(f"{src}: text_config is not an object")
    return cfg


def _is_embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))


def _is_vocab_rows(name: str) -> bool:
    return _is_embedding(name) or name.endswith("lm_head.weight")


def plan_merge(base_dir: Path, adapter_dir: Path, *, dtype: str | None = None, nf4_dequantized_base: bool = False,
               max_shard_gb: float = 5.0, nf4_dtype: str = "bf16", base_name: str | None = None) -> MergePlan:
    if dtype is not None and dtype not in OUT_DTYPES:
        raise UserError(f"dtype {dtype!r}: choose bf16, fp16 or fp32 (or leave it out to keep the base's)")
    if nf4_dtype not in nf4_round.DTYPES:
        raise UserError(f"--nf4-dtype {nf4_dtype!r}: QLoRA quantizes the base in bf16 or fp16 (the train step's precision)")
    check_shard_size(max_shard_gb)
    acfg = _adapter_config(adapter_dir)
    config = _base_config(base_dir)
    r, alpha = acfg["r"], float(acfg["lora_alpha"])
    base = base_tensors(base_dir)
    by_name = {t.name: t for t in base}
    adapter, _ = st.read_header(adapter_dir / "adapter_model.safetensors")
    plan = MergePlan(base_dir, adapter_dir, list(base), fan_in_fan_out=bool(acfg.get("fan_in_fan_out")),
                     out_dtype=OUT_DTYPES[dtype] if dtype else None, nf4_dequantized_base=nf4_dequantized_base,
                     nf4_dtype=nf4_dtype, max_shard_bytes=max(1, int(max_shard_gb * 10**9)), config=config)
    pending: dict[str, dict[str, st.TensorInfo]] = {}
    for key, info in adapter.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "trainable_tokens" in name:
            raise UserError(f"adapter tensor {st._show(key)}: trainable tokens are not supported by the streaming merge")
        d = re.match(r"^(.*)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$", name)
        if d:
            if not acfg.get("use_dora"):
                raise BadModelFile(f"adapter tensor {st._show(key)}: a DoRA magnitude, but the config says use_dora false")
            if info.dtype not in st.FLOAT_DTYPES or len(info.shape) != 1:
                raise BadModelFile(f"adapter tensor {st._show(key)}: a DoRA magnitude is a 1-D float tensor, "
                                   f"got {info.dtype} {info.shape}")
            if "magnitude" in pending.setdefault(d.group(1), {}):
                raise BadModelFile(f"adapter has two DoRA magnitudes for {st._show(d.group(1))}")
            pending[d.group(1)]["magnitude"] = info
            continue
        m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$", name)
        e = re.match(r"^(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[\w-]+)?$", name)
        if m or e:
            module, part = (m or e).group(1), (m or e).group(2)  # type: ignore[union-attr]
            if part in pending.setdefault(module, {}):
                raise BadModelFile(f"adapter has two {part} tensors for {st._show(module)} (several adapters in one file?)")
            if info.dtype not in st.FLOAT_DTYPES or len(info.shape) != 2:
                raise BadModelFile(f"adapter tensor {st._show(key)}: a LoRA factor is a 2-D float tensor, "
                                   f"got {info.dtype} {info.shape}")
            pending[module][part] = info
            continue
        target = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if target in plan.replace:
            raise BadModelFile(f"adapter carries {st._show(target)} twice")
        plan.replace[target] = info
    embedding = next((t.name for t in base if _is_embedding(t.name)), None)
    tied = _tied(config)
    for module, parts in pending.items():
        target = f"{module}.weight"
        if target not in by_name and target not in plan.replace:
            if target == "lm_head.weight" and tied and embedding:
                # A LoRA on a tied lm_head only ever changed the output projection in
                # training; folding it into the shared tensor (as merge_and_unload does)
                # would change the input embeddings too. Untie instead.
                plan.untie = True
            else:
                raise UserError(f"adapter targets {st._show(module)}, but the base has no tensor {st._show(target)}")
        rank = int(_pattern_value(acfg.get("rank_pattern") or {}, module, r))
        a = float(_pattern_value(acfg.get("alpha_pattern") or {}, module, alpha))
        scale = a / math.sqrt(rank) if acfg.get("use_rslora") else a / rank
        magnitude = parts.pop("magnitude", None)
        if acfg.get("use_dora") and magnitude is None:
            raise BadModelFile(f"adapter module {st._show(module)}: use_dora is set, but it has no lora_magnitude_vector")
        if "lora_A" in parts and "lora_B" in parts and len(parts) == 2:
            pair = LoraPair(parts["lora_A"], parts["lora_B"], "linear", scale)
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts and len(parts) == 2:
            pair = LoraPair(parts["lora_embedding_A"], parts["lora_embedding_B"], "embedding", scale)
        else:
            raise UserError(f"adapter module {st._show(module)}: has only {sorted(parts) or ['a DoRA magnitude']}")
        if magnitude is not None:
            plan.dora[target] = magnitude
        if pair.a.shape[0] != rank or pair.b.shape[1] != rank:
            raise BadModelFile(f"adapter module {st._show(module)}: the config says rank {rank}, but A is {pair.a.shape} "
                               f"and B is {pair.b.shape} (A is (r, in), B is (out, r))")
        plan.loras.setdefault(target, []).append(pair)
    for target in list(plan.replace):
        if target not in by_name:
            if target == "lm_head.weight" and tied and embedding:
                plan.untie = True  # modules_to_save (or a saved base layer) made lm_head its own tensor
            else:
                raise UserError(f"adapter carries {st._show(target)}, which the base model does not have")
    if plan.untie and "lm_head.weight" not in by_name:
        emb = by_name[embedding]  # type: ignore[index]
        plan.tensors.append(st.TensorInfo("lm_head.weight", emb.dtype, list(emb.shape), emb.file, emb.begin, emb.end))
        if embedding in plan.replace and "lm_head.weight" not in plan.replace:
            plan.replace["lm_head.weight"] = plan.replace[embedding]  # tied in training: the head was the new embedding
    _check_replacements(plan)
    _check_shapes(plan)
    if not plan.loras and not plan.replace:
        raise UserError(f"{adapter_dir}: the adapter holds no LoRA weights and no whole tensors: nothing to merge")
    _check_identity(plan, acfg, base_name)
    return plan


# --------------------------------------------------------------------------- is it this base's adapter?

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")
# What tells two models apart when their tensor shapes agree; compared only where both configs
# say it (a config re-saved by a newer transformers gains keys, and that is no other model).
_IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                  "sliding_window", "hidden_act", "rms_norm_eps", "layer_norm_epsilon", "n_embd", "n_layer", "n_head")


def _hub_id(name: str | None) -> str | None:
    """The hub id a base is known by: an `org/name` that is no local path, or the id in an
    HF cache path (`.../models--org--name/snapshots/<hash>`). None when it cannot be told."""
    if not name or not isinstance(name, str):
        return None
    if _HUB_ID.match(name) and not name.startswith((".", "-")) and not os.path.lexists(name):
        return name.lower()
    m = re.search(r"models--([\w.-]+?)--([\w.-]+)(?:/|$)", name)
    return f"{m.group(1)}/{m.group(2)}".lower() if m else None


def _config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The identity keys on which two model configs (and their text_config) disagree."""
    out = [k for k in _IDENTITY_KEYS if k in a and k in b and a[k] != b[k]]
    ta, tb = a.get("text_config"), b.get("text_config")
    if isinstance(ta, dict) and isinstance(tb, dict):
        out += [f"text_config.{k}" for k in _IDENTITY_KEYS if k in ta and k in tb and ta[k] != tb[k]]
    return out


def _check_identity(plan: MergePlan, acfg: dict[str, Any], base_name: str | None) -> None:
    """Whether the adapter was trained on this base, as far as its own config can tell.

    Shapes are checked elsewhere; these catch what shapes cannot: another model of the same
    size (adapter_config names another hub id, or a local base whose config differs), and
    weights for modules or layers the adapter's config says it never adapted (a mixed-up or
    tampered adapter). Each is a mismatch that `--force` turns into a warning. Names in the
    config with no weights (peft allows target_modules the model lacks) are only noted."""
    trained_on = acfg.get("base_model_name_or_path")
    shown = st._show(trained_on)
    want, have = _hub_id(trained_on if isinstance(trained_on, str) else None), \
        _hub_id(base_name) or _hub_id(str(plan.base_dir))
    if want and have and want != have:
        plan.mismatches.append(f"the adapter was trained on {shown}, not on {st._show(base_name or str(plan.base_dir))}")
    elif want and not have:
        plan.notes.append(f"the adapter was trained on {shown}; whether {st._show(str(plan.base_dir))} is that model "
                          "cannot be told from its files (only that the shapes fit)")
    elif isinstance(trained_on, str) and os.path.isdir(trained_on) and not want:
        other = Path(trained_on)
        try:
            theirs = None if other.resolve() == plan.base_dir.resolve() else \
                st.load_json(other / "config.json", "the adapter's base config", limit=16 * 2**20)
        except (OSError, FtkitError):
            theirs = None  # cannot tell; the shapes decide
        differ = _config_differences(theirs, plan.config) if isinstance(theirs, dict) else []
        if differ:
            plan.mismatches.append(f"the adapter was trained on {shown}, another model ({', '.join(differ[:4])} "
                                   f"differ from {st._show(str(plan.base_dir / 'config.json'))})")
    modules = sorted(t.removesuffix(".weight") for t in plan.loras)
    targets = acfg.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        def named(m: str) -> bool:
            return any(m == t or m.endswith("." + t) for t in targets)

        stray = [m for m in modules if not named(m)]
        if stray:
            plan.mismatches.append(f"the adapter has LoRA weights for {st._show(stray[0])}"
                                   f"{f' (and {len(stray) - 1} more)' if len(stray) > 1 else ''}, which its "
                                   f"target_modules {st._show(sorted(targets))} do not name")
        unused = sorted(t for t in targets if not any(m == t or m.endswith("." + t) for m in modules))
        if unused and modules:
            plan.notes.append(f"target_modules {st._show(unused)} have no LoRA weights in the adapter "
                              "(the base has no such modules, or they were left out)")
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            stray = [m for m in modules if not re.fullmatch(targets, m)]
        except re.error:
            stray = []
        if stray:
            plan.mismatches.append(f"the adapter has LoRA weights for {st._show(stray[0])}, which its "
                                   f"target_modules pattern {st._show(targets)} does not match")
    layers = acfg.get("layers_to_transform")
    wanted = {layers} if isinstance(layers, int) and not isinstance(layers, bool) else \
        set(layers) if isinstance(layers, list) and all(isinstance(x, int) for x in layers) else None
    if wanted is not None:
        found = {int(m.group(1)) for mod in modules if (m := _LAYER.search(mod + "."))}
        if found - wanted:
            plan.mismatches.append(f"the adapter has LoRA weights in layer(s) {sorted(found - wanted)[:8]}, outside "
                                   f"its layers_to_transform {sorted(wanted)[:8]}")


def check_identity(plan: MergePlan, *, force: bool) -> None:
    """Refuse an adapter that may not be for this base (plan.mismatches), unless `force`."""
    if plan.mismatches and not force:
        more = f" (and {len(plan.mismatches) - 1} more)" if len(plan.mismatches) > 1 else ""
        raise UserError(f"{plan.adapter_dir}: {plan.mismatches[0]}{more}; merge it into the base it was trained on "
                        "(--force merges anyway)")


def _check_replacements(plan: MergePlan) -> None:
    """Tensors the adapter carries whole (modules_to_save, resized embeddings) must fit where they go;
    a resized vocabulary must be the same on the embedding and the head, and the config follows it."""
    base_shapes = {t.name: list(t.shape) for t in plan.tensors}
    for t in plan.tensors:
        new = plan.replace.get(t.name)
        if new is None:
            continue
        if (new.dtype in st.FLOAT_DTYPES) != (t.dtype in st.FLOAT_DTYPES):
            raise BadModelFile(f"adapter's {st._show(t.name)} is {new.dtype}, the base's is {t.dtype}")
        old = base_shapes[t.name]
        if list(new.shape) != old:
            resized = _is_vocab_rows(t.name) and len(new.shape) == 2 and len(old) == 2 and new.shape[1] == old[1] \
                and new.shape[0] > 0
            if not resized:
                raise BadModelFile(f"adapter's {st._show(t.name)} has shape {new.shape}, the base's is {old}")
        t.shape = list(new.shape)
    rows = {t.name: t.shape[0] for t in plan.tensors if _is_vocab_rows(t.name) and len(t.shape) == 2}
    if len(set(rows.values())) > 1 and any(plan.replace.get(n) is not None for n in rows):
        detail = ", ".join(f"{n}: {v}" for n, v in rows.items())
        raise BadModelFile(f"the adapter resizes the vocabulary inconsistently ({detail}); "
                           "the embedding and lm_head must have the same number of rows")
    resized = [n for n in rows if n in plan.replace and plan.replace[n].shape[0] != base_shapes[n][0]]
    if resized:
        plan.vocab_size = rows[resized[0]]


def _check_shapes(plan: MergePlan) -> None:
    """A (r, in) and B (out, r) must fit the weight exactly: torch would broadcast a (1, in) A."""
    by_name = {t.name: t for t in plan.tensors}
    for target, pairs in plan.loras.items():
        t = by_name[target]
        if t.dtype not in ("F32", "F16", "BF16", "F64"):
            raise BadModelFile(f"cannot merge a LoRA into {st._show(target)}: it is {t.dtype} (quantized or integer); "
                               "merge into the 16-bit original")
        if len(t.shape) != 2:
            raise BadModelFile(f"cannot merge a LoRA into {st._show(target)}: shape {t.shape} is not 2-D")
        for p in pairs:
            transposed = p.kind == "embedding" or plan.fan_in_fan_out
            want_a1, want_b0 = (t.shape[0], t.shape[1]) if transposed else (t.shape[1], t.shape[0])
            if p.a.shape[1] != want_a1 or p.b.shape[0] != want_b0:
                layout = "A (r, rows), B (cols, r)" if transposed else "A (r, in), B (out, r)"
                raise BadModelFile(f"adapter factors for {st._show(target)} do not fit its shape {t.shape}: "
                                   f"A is {p.a.shape}, B is {p.b.shape}; expected {layout}")
        m = plan.dora.get(target)
        if m is not None:
            if len(pairs) != 1:
                raise UserError(f"{st._show(target)}: a DoRA magnitude with {len(pairs)} LoRA updates; DoRA merges one")
            want = t.shape[1] if _dora_by_column(plan, pairs[0]) else t.shape[0]
            if m.shape != [want]:
                raise BadModelFile(f"DoRA magnitude for {st._show(target)} is {m.shape}; its shape {t.shape} "
                                   f"needs [{want}] (one per output feature)")


def _dora_by_column(plan: MergePlan, pair: LoraPair) -> bool:
    """DoRA's norm runs over each output feature's weights: a row of a Linear weight (out, in),
    a column of an embedding (vocab, dim) or a fan_in_fan_out Conv1D weight (in, out)."""
    return pair.kind == "embedding" or plan.fan_in_fan_out


def _tied(cfg: dict[str, Any]) -> bool:
    text = cfg.get("text_config") or {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def check_shard_size(max_shard_gb: float) -> None:
    if isinstance(max_shard_gb, bool) or not isinstance(max_shard_gb, (int, float)) \
            or not math.isfinite(max_shard_gb) or max_shard_gb <= 0 or max_shard_gb > 10_000:
        raise UserError(f"--max-shard-gb {max_shard_gb}: give a positive, finite size in GB (at most 10000)")


# --------------------------------------------------------------------------- arithmetic


def _bnb_functional() -> Any:
    from ftkit.engines import bnb

    return bnb.quiet_functional()


def _is_quantized_linear(name: str, shape: list[int]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and ".layers." in name and "norm" not in name


def _finite(t: Any) -> bool:
    """Whether a float tensor holds only finite values. One read of the tensor, no mask:
    the smallest and the largest value are both finite exactly when every value is (min
    and max propagate nan, and an inf is the min or the max). torch.isfinite().all() writes
    a bool per element and took a third of the merge's time."""
    import torch

    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class NonFinite(BadModelFile):
    """A tensor holds inf or nan."""


def merged_tensor(plan: MergePlan, t: st.TensorInfo, read: Callable[[st.TensorInfo], Any]) -> Any:
    """The whole output tensor for one base tensor (merged_blocks, assembled)."""
    import torch

    out: Any = None
    row = 0
    for part in merged_blocks(plan, t, read):
        if row == 0 and part.shape == tuple(t.shape):
            return part
        if out is None:
            out = torch.empty(t.shape, dtype=part.dtype)
        out[row:row + part.shape[0]].copy_(part)
        row += part.shape[0]
    return out


def merged_blocks(plan: MergePlan, t: st.TensorInfo, read: Callable[[st.TensorInfo], Any]) -> Iterator[Any]:
    """The output tensor for one base tensor, in row blocks in order (the only place weights are
    combined); the merge writes each block as it comes, so a merged weight is never whole in
    memory. Refuses inputs with inf/nan and outputs that overflow the output dtype.

    A merged weight is computed OUT_BLOCK_BYTES of output at a time, each in sub-blocks of
    CACHE_BLOCK_BYTES (as fp32) that stay in the CPU's cache from the cast through the LoRA
    update to the rounding and the finiteness check: one pass over memory per block instead
    of one per operation."""
    import torch

    src = plan.replace.get(t.name, t)
    w = read(src)
    out_dtype = st.torch_dtype(plan._out_code(t))
    if not w.is_floating_point():
        yield w
        return
    label = "adapter" if t.name in plan.replace else "base"
    nf4 = plan.nf4_dequantized_base and t.name not in plan.replace and _is_quantized_linear(t.name, t.shape)
    rounder = None
    if nf4:
        if not _finite(w):  # before bitsandbytes' first pass over the whole weight (its scales)
            raise NonFinite(f"{label} tensor {st._show(t.name)} holds inf or nan values")
        rounder = nf4_round.Rounder(w, plan.nf4_dtype, _bnb_functional() if plan.nf4_with_bnb() else None)
    pairs = plan.loras.get(t.name, [])
    overflow = (f"{st._show(t.name)} overflows {DTYPE_NAMES.get(plan._out_code(t))}: "
                "merge with --dtype bf16 or fp32")
    if not pairs and not nf4:
        # One pass: the output is checked, and only when it is not finite is the input read
        # again to say whose fault it is (a non-finite input shows in the output it gives).
        out = w.to(out_dtype)
        if not _finite(out):
            if not _finite(w):
                raise NonFinite(f"{label} tensor {st._show(t.name)} holds inf or nan values")
            raise NonFinite(overflow)
        yield out
        return
    factors = [(read(p.a).float(), read(p.b).float(), p.scale,
                p.kind == "embedding" or plan.fan_in_fan_out) for p in pairs]
    cols = max(math.prod(w.shape[1:]), 1)
    magnitude = read(plan.dora[t.name]).float() if t.name in plan.dora else None
    by_column = magnitude is not None and _dora_by_column(plan, pairs[0])
    if nf4:  # each row block must start on an NF4 block boundary of the flattened weight
        group = nf4_round.BLOCK // math.gcd(cols, nf4_round.BLOCK)
        rows = max(1, ROW_BLOCK_BYTES // (4 * cols))
        sub = rows = max(group, rows - rows % group)
        scratch = None
    else:
        sub = max(1, min(CACHE_BLOCK_BYTES, ROW_BLOCK_BYTES) // (4 * cols))
        rows = max(sub, OUT_BLOCK_BYTES // (out_dtype.itemsize * cols) // sub * sub)
        scratch = torch.empty((min(sub, w.shape[0]), *w.shape[1:]), dtype=torch.float32)
    def updated(j: int, k: int) -> Any:
        """Rows j..j+k of base + LoRA update, in fp32."""
        if rounder is not None:  # the base as QLoRA's 4-bit layer saw it, in its precision (checked finite)
            block = rounder.rows(j, w[j:j + k])
        else:
            block = scratch[:k]  # type: ignore[index]
            block.copy_(w[j:j + k])  # the cast to fp32 (w stays the input)
        for a, b, scale, transposed in factors:
            # Linear: W (out, in) += B (out, r) @ A (r, in). Embeddings (A: (r, vocab), B: (dim, r))
            # and fan_in_fan_out Conv1D layers store W transposed: W += (B @ A)^T = A^T @ B^T.
            # One fused multiply-add in fp32 (addmm_: no delta temporaries).
            if transposed:
                block.addmm_(a[:, j:j + k].T, b.T, alpha=scale)
            else:
                block.addmm_(b[j:j + k], a, alpha=scale)
        return block

    column_scale = None
    if by_column:
        # DoRA, norms over columns: a first pass sums each column's squares (peft: the norm of the
        # unmerged weight plus the update), the second scales them by magnitude / norm.
        squares = torch.zeros(cols, dtype=torch.float64)
        for j in range(0, w.shape[0], sub):
            block = updated(j, min(sub, w.shape[0] - j))
            squares += block.double().square().sum(dim=0)
        column_scale = (magnitude.double() / squares.sqrt()).float()  # type: ignore[union-attr]
    for i in range(0, w.shape[0], rows):
        part = torch.empty((min(rows, w.shape[0] - i), *w.shape[1:]), dtype=out_dtype)
        for j in range(i, i + part.shape[0], sub):
            k = min(sub, w.shape[0] - j)
            block = updated(j, k)
            if column_scale is not None:
                block.mul_(column_scale)
            elif magnitude is not None:  # DoRA, norms over rows (Linear): each row scaled by magnitude / norm
                block.mul_((magnitude[j:j + k] / torch.linalg.vector_norm(block, dim=1)).unsqueeze(1))
            done = part[j - i:j - i + k]
            done.copy_(block)  # the cast to the output dtype, in place
            # The one finiteness check of this block: a non-finite base weight (or factor, though
            # those were checked before anything was written) shows in the output it produces.
            if not _finite(done):
                if rounder is None and not _finite(w[j:j + k]):
                    raise NonFinite(f"{label} tensor {st._show(t.name)} holds inf or nan values")
                raise NonFinite(f"merged {st._show(t.name)} is not finite in {DTYPE_NAMES.get(plan._out_code(t))} "
                                "(the adapter's update overflows it); check the adapter or merge with --dtype fp32")
        yield part


@contextlib.contextmanager
def _a_core_for_the_writer() -> Iterator[None]:
    """torch computes on one thread fewer than it would (at least one) while the writer thread
    writes: on two cores, two OpenMP threads and the writer fought over them (OpenMP spins
    while it waits), and the merge took 2-5x longer under load than with one. OMP_NUM_THREADS
    (which ftkit sets from a container's CPU allowance) is what torch starts from."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_adapter_values(plan: MergePlan) -> None:
    """Every LoRA factor (and DoRA magnitude) finite, one tensor in memory at a time (before anything is written)."""
    seen: set[str] = set()
    for target, pairs in plan.loras.items():
        magnitude = [plan.dora[target]] if target in plan.dora else []
        for p in pairs:
            for info in (p.a, p.b, *magnitude):
                if info.name in seen:
                    continue
                seen.add(info.name)
                if not _finite(st.read_tensor(info)):
                    raise NonFinite(f"adapter tensor {st._show(info.name)} holds inf or nan values")


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


def tensor_ram(plan: MergePlan, t: st.TensorInfo) -> int:
    """Bytes held while one output tensor is made: its source as read, the output (or its block
    being made), what the writer thread has yet to write, and for a
    merged (or NF4-rounded) weight the fp32 row block with its temporaries, the LoRA factors
    (as read and in fp32), and the NF4 rounding's temporaries (bitsandbytes': the block in
    the training dtype, its codes, the dequantized block, and the whole weight's scales;
    torch's: the chunk's code search)."""
    src = plan.replace.get(t.name, t)
    elems = math.prod(t.shape)
    out_bytes = elems * st.DTYPE_SIZES[plan._out_code(t)]
    pairs = plan.loras.get(t.name, [])
    nf4 = plan.nf4_dequantized_base and t.name not in plan.replace and _is_quantized_linear(t.name, t.shape) \
        and src.dtype in st.FLOAT_DTYPES
    # The source as read, the output (whole, or the block being made: merged_blocks), and the
    # earlier blocks the writer thread still holds (the finiteness checks hold no mask: _finite).
    out_held = min(out_bytes, OUT_BLOCK_BYTES) if (pairs or nf4) and src.dtype in st.FLOAT_DTYPES else out_bytes
    ram = src.nbytes + out_held + st.WRITE_AHEAD_BYTES
    if pairs or nf4:
        block = min(ROW_BLOCK_BYTES, elems * 4) + 64 * 4 * max(math.prod(t.shape[1:]), 1)
        ram += 2 * block  # the fp32 block and its matmul's workspace (addmm_ adds in place)
        for p in pairs:
            ram += p.a.nbytes + p.b.nbytes + 4 * (math.prod(p.a.shape) + math.prod(p.b.shape))
        if t.name in plan.dora:  # the magnitude (as read, fp32), a column pass's sums (fp64) and scales
            m = plan.dora[t.name]
            ram += m.nbytes + 4 * math.prod(m.shape) + 12 * max(math.prod(t.shape[1:]), 1)
        if nf4:  # the fp32 block comes from the rounding (counted above), its chunk's temporaries
            with_bnb = plan.nf4_with_bnb()
            ram += nf4_round.temp_bytes(block // 4, with_bnb) - block
            if with_bnb:
                ram += nf4_round.scale_bytes(elems)
    return ram


def needs(plan: MergePlan, out: Path) -> Needs:
    """RAM: the most any one tensor needs (see tensor_ram), plus bitsandbytes' import when it
    rounds the base. Disk: the whole output."""
    ram = max((tensor_ram(plan, t) for t in plan.tensors), default=0)
    if plan.nf4_dequantized_base and plan.nf4_with_bnb():
        ram += BNB_IMPORT_BYTES
    parent = out.parent if out.parent.exists() else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return Needs(ram, plan.out_bytes(), shutil.disk_usage(parent).free)


# --------------------------------------------------------------------------- output directory


def _partials(out: Path) -> list[Path]:
    prefix = f".{out.name}{PARTIAL}"
    try:
        return [p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def clean_stale_partials(out: Path, log: Callable[[str], None] = lambda s: None, what: str = "merge") -> list[Path]:
    """Remove hidden partial outputs of merges that died (SIGKILL, power loss). A live merge
    holds a flock on its directory's `.lock`; the kernel drops it when the process dies, in
    whatever container or PID namespace it ran."""
    removed: list[Path] = []
    for p in _partials(out):
        lock = p / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            try:
                age = time.time() - p.stat().st_mtime
            except OSError:
                continue
            if age < STALE_UNLOCKED_S:
                continue  # just created or just finished by a live merge
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a merge is writing it
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log(f"{what}: removed {p.name}, left by a {what} that did not finish")
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def check_output(out: Path, base_dir: Path, adapter_dir: Path) -> None:
    if os.path.islink(out):
        raise UserError(f"output {out} is a symbolic link; give a real directory")
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output {out} exists and is not empty; choose another directory")
    for what, d in (("base model", base_dir), ("adapter", adapter_dir)):
        if _inside(out, d):
            raise UserError(f"output {out} is inside the {what} directory {d}; write the merge elsewhere")
    for parent in out.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UserError(f"output {out}: {parent} is not a directory")
            break


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (docker stop, the runner) ends the merge through the cleanup path instead of
    leaving the partial directory to the next run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- merge


def merge(base: str, adapter: str, output: str, *, revision: str | None = None, dtype: str | None = None,
          nf4_dequantized_base: bool = False, max_shard_gb: float = 5.0, nf4_dtype: str = "bf16",
          force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    with torch.no_grad(), _terminate_as_exit():  # no_grad scoped: callers in the same process keep autograd
        return _merge(base, adapter, output, revision=revision, dtype=dtype,
                      nf4_dequantized_base=nf4_dequantized_base, max_shard_gb=max_shard_gb, nf4_dtype=nf4_dtype,
                      force=force, log=log)


def _merge(base: str, adapter: str, output: str, *, revision: str | None, dtype: str | None, nf4_dequantized_base: bool,
           max_shard_gb: float, nf4_dtype: str, force: bool, log: Callable[[str], None]) -> dict[str, Any]:
    check_shard_size(max_shard_gb)
    out = Path(output)
    adapter_dir = Path(adapter)
    clean_stale_partials(out, log)
    base_dir = resolve_base(base, revision)
    check_output(out, base_dir, adapter_dir)
    plan = plan_merge(base_dir, adapter_dir, dtype=dtype, nf4_dequantized_base=nf4_dequantized_base,
                      max_shard_gb=max_shard_gb, nf4_dtype=nf4_dtype, base_name=base)
    check_identity(plan, force=force)
    check_adapter_values(plan)
    nf4_how = None
    if nf4_dequantized_base:
        from ftkit.engines import bnb

        functional = bnb.quiet_functional(lambda s: log(f"merge: {s}"))
        plan.nf4_bnb = functional is not None
        nf4_how = f"bitsandbytes {bnb.version()}" if functional is not None else "torch (no double quantization)"
        log(f"merge: rounding the base's linear weights through NF4 in {nf4_dtype}, as QLoRA loaded them, "
            f"with {nf4_how}")
    warnings = warnings_for(plan)
    need = needs(plan, out)
    gib = 2**30
    log(f"merge: {len(plan.tensors)} tensors, {len(plan.loras)} with LoRA, {len(plan.replace)} replaced by the adapter; "
        f"output dtype {plan.dtype_label()}{' (kept from the base)' if dtype is None else ''}")
    log(f"merge: needs ~{need.ram_bytes / gib:.2f} GiB RAM (largest tensor, streamed) and "
        f"{need.disk_bytes / gib:.2f} GiB disk; {need.disk_free / gib:.1f} GiB free")
    for w in warnings:
        log(f"merge: warning: {w}")
    if need.disk_free < need.disk_bytes * 1.02 + 2**20:
        raise UserError(f"not enough disk for the merged model: needs {need.disk_bytes / gib:.2f} GiB, "
                        f"{need.disk_free / gib:.2f} GiB free under {out.parent}")
    created = [p for p in reversed(out.parents) if not os.path.lexists(p)]
    tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock_fd: int | None = None
    writer: st.StreamWriter | None = None
    try:
        tmp.mkdir(parents=True)
        # Locked before it is visible as .lock: a cleaner never finds the lock free while we live.
        lock_tmp = tmp / f".lock-{uuid.uuid4().hex[:8]}"
        lock_fd = os.open(lock_tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.rename(lock_tmp, tmp / ".lock")
        groups = shards(plan)
        weight_map: dict[str, str] = {}
        with _a_core_for_the_writer():
            for n, group in enumerate(groups, 1):
                fname = "model.safetensors" if len(groups) == 1 else f"model-{n:05d}-of-{len(groups):05d}.safetensors"
                writer = st.StreamWriter(tmp / fname, [(t.name, plan._out_code(t), list(t.shape)) for t in group])
                for t in group:
                    writer.write_parts(t.name, merged_blocks(plan, t, st.read_tensor))
                    weight_map[t.name] = fname
                writer.close()
                writer = None
        if len(groups) > 1:
            index = {"metadata": {"total_size": plan.out_bytes()}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(plan, tmp, dtype)
        for name in COPY_FILES:
            src = (adapter_dir / name) if name in TOKENIZER_FILES and _regular(adapter_dir / name) else base_dir / name
            if _regular(src):
                shutil.copyfile(src, tmp / name)
        (tmp / ".lock").unlink()
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace cannot replace a directory
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):  # parents this merge made, if nothing else went into them
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk filled while we wrote
            free = shutil.disk_usage(out.parent if out.parent.exists() else Path("/")).free / 2**30
            raise EngineError(f"no space left on the device holding {out.parent} while writing the merged model "
                              f"({need.disk_bytes / gib:.2f} GiB needed, {free:.2f} GiB free now; the partial output "
                              "was removed): free space there and run it again") from e
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    summary = {"output": str(out), "tensors": len(plan.tensors), "lora_tensors": len(plan.loras),
               "replaced": len(plan.replace), "shards": len(groups), "bytes": plan.out_bytes(),
               "dtype": plan.dtype_label(), "dtype_from": "base" if dtype is None else "--dtype",
               "nf4_dequantized_base": nf4_dequantized_base, "warnings": warnings}
    if nf4_how is not None:
        summary.update(nf4_dtype=nf4_dtype, nf4_rounding=nf4_how)
    if plan.vocab_size is not None:
        summary["vocab_size"] = plan.vocab_size
    log(f"merge: wrote {out} ({len(groups)} shard(s), {plan.out_bytes() / gib:.2f} GiB)")
    return summary


def _regular(p: Path) -> bool:
    """A regular file (symlinks followed); never a FIFO or device to copy from."""
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def warnings_for(plan: MergePlan) -> list[str]:
    out: list[str] = []
    have = [n for n in TOKENIZER_CORE if _regular(plan.adapter_dir / n) or _regular(plan.base_dir / n)]
    if not have:
        out.append("no tokenizer (tokenizer.json, tokenizer.model or vocab.json) in the base or the adapter: "
                   "the merged model has none; copy one in before serving it")
    if plan.vocab_size is not None:
        out.append(f"the adapter resized the vocabulary: the merged config says vocab_size {plan.vocab_size}")
    out += [f"--force: {m}" for m in plan.mismatches] + plan.notes
    return out


def _write_config(plan: MergePlan, out: Path, dtype: str | None) -> None:
    cfg = json.loads(json.dumps(plan.config))  # a copy
    if dtype is not None:
        cfg["dtype"] = CONFIG_DTYPES[dtype]
        cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    if plan.untie:
        cfg["tie_word_embeddings"] = False
        if text is not None:
            text["tie_word_embeddings"] = False
    if plan.vocab_size is not None:
        if "vocab_size" in cfg or text is None:
            cfg["vocab_size"] = plan.vocab_size
        if text is not None and "vocab_size" in text:
            text["vocab_size"] = plan.vocab_size
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
