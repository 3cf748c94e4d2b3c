"""Export a Hugging Face model directory (a merged model) to one GGUF file for llama.cpp and
Ollama, with an Ollama Modelfile beside it.

Why not llama.cpp's convert_hf_to_gguf.py: it is not on PyPI (only inside llama-cpp-python's
source archive), it needs torch and transformers, and it refuses every byte-level BPE
tokenizer whose token ids it has no hash for - the tiny model's among them. This writer uses
llama.cpp's own Python package, `gguf` (gguf-py: its writer, tensor names, quantizers and
special-token reader, the same ones the converter uses), and follows the converter for the
architectures it takes: Llama and Mistral (GGUF `llama`, Q and K rows permuted for
llama.cpp's rotary layout, Llama 3's rope factors) and Qwen2 (`qwen2`). Tokenizers: byte-level
BPE (tokenizer.json; engines.gguf_vocab), whose pre-tokenizer is recognised by its regular
expression among the ones llama.cpp implements (gpt-2, llama-bpe, qwen2, tekken). Anything
else is refused in one line before a byte is written (convert_hf_to_gguf.py takes more models).

Quantization: f32, f16, bf16 and q8_0 are written here (gguf-py's quantizers, as the
converter does). The k-quants and the legacy 4/5-bit types come from llama.cpp's own
quantizer (`llama_model_quantize`, through llama-cpp-python, which compiles llama.cpp when
installed): an f16/bf16/f32 GGUF is written first, then quantized.

Memory: tensors are read from the safetensors a block of rows at a time (at most
ROW_BLOCK_BYTES in fp32), converted, permuted and quantized, and written at once; the peak
is the vocabulary (tokens and merges as Python strings) plus a few row blocks, not the
model. llama.cpp's quantizer holds one whole tensor in fp32 plus its output (needs()).

Inputs are not trusted: config.json, tokenizer.json and tokenizer_config.json are read
bounded and strictly (merge's readers), every tensor header is checked, tensor names must
map to the architecture's GGUF names, and the output appears only by the rename of a
complete directory (a partial one left by a killed export is removed by the next).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.engines import merge as merge_engine
from ftkit.engines import modelfile as mf
from ftkit.engines import safetensors_io as st
from ftkit.engines.gguf_vocab import PRE_TOKENIZERS, Tokenizer, load_gguf, plan_tokenizer
from ftkit.engines.safetensors_io import BadModelFile
from ftkit.errors import EngineError, UserError

__all__ = ["PRE_TOKENIZERS", "Tokenizer", "export", "plan_export"]

GGUF_NAME = "model.gguf"
MODELFILE = "Modelfile"
SUMMARY = "export.json"
ROW_BLOCK_BYTES = 16 * 2**20  # convert and quantize at most this much of a tensor (as fp32) at once
LLAMA_CPP_RAM_BYTES = 400 * 2**20  # llama.cpp's library loaded, its quantizer's work buffers (measured: bench)
IMPORT_BYTES = 48 * 2**20  # Python with numpy and gguf-py imported (measured: 37 MiB, bench)

# --quant: written here with gguf-py (the converter's --outtype), or by llama.cpp's quantizer.
PURE_QUANTS = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                    "q5_k_s", "q5_k_m", "q6_k")
QUANTS = PURE_QUANTS + LLAMA_CPP_QUANTS
# bits per weight of each quantized type (for the disk estimate of llama.cpp's output; its
# mixes keep some tensors at more bits: the estimate takes the larger of the mix)
_BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q2_k": 3.4, "q3_k_s": 3.5, "q3_k_m": 4.0,
        "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.9, "q5_k_s": 5.6, "q5_k_m": 5.7, "q6_k": 6.6}


@dataclass(frozen=True)
class Arch:
    gguf: str  # the GGUF architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp's `llama` rotates interleaved pairs; HF rotates halves


ARCHS = {
    "LlamaForCausalLM": Arch("llama", True),
    "MistralForCausalLM": Arch("llama", True),
    "Qwen2ForCausalLM": Arch("qwen2", False),
}

_SKIP = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (looked up, not imported: importing loads llama.cpp)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# --------------------------------------------------------------------------- the plan


@dataclass
class TensorOut:
    name: str  # GGUF name
    source: st.TensorInfo | None  # None: generated (rope_freqs)
    qtype: str  # GGML type name: F32, F16, BF16, Q8_0
    shape: list[int]  # HF order (rows first)
    nbytes: int
    permute_heads: int = 0  # > 0: permute Q/K rows in groups of this many heads
    data: Any = None  # a generated tensor's values


@dataclass
class ExportPlan:
    model_dir: Path
    arch: Arch
    hf_arch: str
    config: dict[str, Any]
    quant: str
    written_type: str  # the type this writer writes: the quant, or the intermediate for llama.cpp's
    tensors: list[TensorOut]
    tokenizer: Tokenizer
    fmt: mf.ChatFormat
    name: str
    params: int
    source_label: str
    warnings: list[str] = field(default_factory=list)

    @property
    def via_llama_cpp(self) -> bool:
        return self.quant in LLAMA_CPP_QUANTS

    def metadata_bytes(self) -> int:
        """The GGUF's header: tokens, merges and the template as length-prefixed strings, tensor infos."""
        tok = self.tokenizer
        strings = sum(len(t.encode()) + 12 for t in tok.tokens) + sum(len(m.encode()) + 8 for m in tok.special.merges)
        return strings + len((self.fmt.jinja or "").encode()) + 96 * len(self.tensors) + 4096

    def written_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + self.metadata_bytes()

    def output_bytes(self) -> int:
        """The GGUF's size on disk (llama.cpp's output estimated from its bits per weight)."""
        if not self.via_llama_cpp:
            return self.written_bytes()
        quantized = sum(math.prod(t.shape) for t in self.tensors if len(t.shape) > 1)
        rest = sum(t.nbytes for t in self.tensors if len(t.shape) <= 1)
        return int(quantized * _BPW[self.quant] / 8) + rest + self.metadata_bytes()


def _hparam(cfg: dict[str, Any], key: str, path: Path, *, kind: type = int) -> Any:
    """A positive integer (or, kind=float, a positive finite number) from config.json."""
    value = cfg.get(key)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (isinstance(value, int) if kind is int else math.isfinite(value)) and value > 0
    if not ok:
        raise BadModelFile(f"{path}: {key} must be a positive {'integer' if kind is int else 'number'}, "
                           f"got {st._show(value)}")
    return value


def _rope(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """transformers 5 keeps rope settings in rope_parameters; older configs in rope_theta and rope_scaling."""
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = dict(cfg.get("rope_scaling") or {})
        if "rope_theta" in cfg:
            rope.setdefault("rope_theta", cfg["rope_theta"])
    if not isinstance(rope, dict):
        raise BadModelFile(f"{path}: rope_parameters is not an object")
    if "full_attention" in rope:
        raise UserError(f"{path}: per-layer-type rope parameters (sliding and full attention) are not supported "
                        "by ftkit's GGUF export; use llama.cpp's convert_hf_to_gguf.py")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"{path}: rope_type {st._show(rope_type)} is not supported by ftkit's GGUF export "
                        "(default, linear and llama3 are); use llama.cpp's convert_hf_to_gguf.py")
    for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        v = rope.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v > 0):
            raise BadModelFile(f"{path}: rope {key} must be a positive number, got {st._show(v)}")
    if rope_type == "linear" and rope.get("factor") is None:
        raise BadModelFile(f"{path}: linear rope scaling without a factor")
    return {**rope, "rope_type": rope_type}


def _llama3_rope_factors(rope: dict[str, Any], dim: int) -> Any:
    """The rope_freqs tensor llama.cpp applies for Llama 3.1's rope (the converter's formula)."""
    import numpy as np

    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def check_model_dir(model_dir: Path) -> None:
    """A directory with a config.json (a link to one is fine: only the output is never a link)."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory" if os.path.lexists(model_dir) else f"{model_dir}: no such directory")
    if not os.path.lexists(model_dir / "config.json"):
        raise UserError(f"{model_dir}: not a model directory (no config.json)")


def _config(model_dir: Path) -> tuple[dict[str, Any], str, Arch]:
    path = model_dir / "config.json"
    cfg = st.load_json(path, "the model config", limit=16 * 2**20)
    if not isinstance(cfg, dict):
        raise BadModelFile(f"{path}: not a JSON object")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise BadModelFile(f"{path}: architectures must name one model class, got {st._show(archs)}")
    if archs[0] not in ARCHS:
        raise UserError(f"{path}: architecture {st._show(archs[0])} is not one ftkit's GGUF export writes "
                        f"({', '.join(sorted(ARCHS))}); use llama.cpp's convert_hf_to_gguf.py")
    if cfg.get("quantization_config") is not None:
        raise UserError(f"{path}: a quantized model (quantization_config); export the 16-bit merged model")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _hparam(cfg, key, path)
    if cfg.get("num_key_value_heads") is not None:
        _hparam(cfg, "num_key_value_heads", path)
    _hparam(cfg, "rms_norm_eps", path, kind=float)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {st._show(cfg.get('hidden_act'))}: llama.cpp's "
                        f"{ARCHS[archs[0]].gguf} uses silu")
    if cfg["hidden_size"] % cfg["num_attention_heads"] and cfg.get("head_dim") is None:
        raise BadModelFile(f"{path}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads")
    if cfg.get("head_dim") is not None:
        _hparam(cfg, "head_dim", path)
    n_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["num_attention_heads"] % n_kv:
        raise BadModelFile(f"{path}: num_attention_heads {cfg['num_attention_heads']} is not a multiple of "
                           f"num_key_value_heads {n_kv}")
    return cfg, archs[0], ARCHS[archs[0]]


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _qtype_for(gguf: Any, name: str, shape: list[int], written: str) -> str:
    """The converter's choice: 1-D tensors and norms stay F32; a row that is no whole number
    of quant blocks falls back to F16."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return "F32"
    qtype = written.upper()
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if shape[-1] % block:
        return "F16"
    return qtype


def _nbytes(gguf: Any, shape: list[int], qtype: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * size if shape else size


def intermediate_type(tensors: list[st.TensorInfo]) -> str:
    """What llama.cpp's quantizer starts from: the model's own precision (f32 stays exact)."""
    codes = {t.dtype for t in tensors if t.dtype in st.FLOAT_DTYPES}
    if codes <= {"BF16"}:
        return "bf16"
    if codes <= {"F16"}:
        return "f16"
    return "f32"


def plan_export(model_dir: Path, quant: str, *, template: str, fmt_name: str | None = None,
                system: str | None = None, name: str | None = None, source_label: str | None = None) -> ExportPlan:
    """Check everything and decide every tensor's name, type and size; nothing is written.

    `template`: the train step's template (a named one, `tokenizer`, `auto`, or a file's
    path), `fmt_name`: its dataset format (alpaca, chat, text; None when unknown), `system`:
    its system prompt."""
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    gguf = load_gguf()
    check_model_dir(model_dir)
    cfg, hf_arch, arch = _config(model_dir)
    cfg_path = model_dir / "config.json"
    rope = _rope(cfg, cfg_path)
    sources = merge_engine.base_tensors(model_dir)
    tokenizer = plan_tokenizer(model_dir, cfg["vocab_size"])
    fmt = resolve_format(model_dir, template, fmt_name, tokenizer, system)
    written = intermediate_type(sources) if quant in LLAMA_CPP_QUANTS else quant
    n_layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], n_layers)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = _head_dim(cfg)
    out: list[TensorOut] = []
    if rope["rope_type"] == "llama3":
        if arch.gguf != "llama":
            raise UserError(f"{cfg_path}: llama3 rope scaling on {hf_arch}")
        factors = _llama3_rope_factors(rope, head_dim)
        out.append(TensorOut("rope_freqs.weight", None, "F32", [len(factors)], 4 * len(factors), data=factors))
    seen: dict[str, str] = {}
    params = 0
    for t in sources:
        if t.name.endswith(_SKIP):
            continue
        new = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"{model_dir}: tensor {st._show(t.name)} has no place in a GGUF {arch.gguf} model "
                            "(use llama.cpp's convert_hf_to_gguf.py)")
        if new in seen:
            raise BadModelFile(f"{model_dir}: tensors {st._show(seen[new])} and {st._show(t.name)} both map to {new}")
        seen[new] = t.name
        if t.dtype not in ("F32", "F16", "BF16", "F64"):
            raise UserError(f"{model_dir}: tensor {st._show(t.name)} is {t.dtype}: a quantized or integer weight; "
                            "export the 16-bit merged model")
        if not t.shape or len(t.shape) > 2 or 0 in t.shape:
            raise BadModelFile(f"{model_dir}: tensor {st._show(t.name)} has shape {t.shape}; a {arch.gguf} model's "
                               "tensors are 1-D or 2-D")
        _check_shape(t, new, cfg, cfg_path)
        permute = 0
        if arch.permute_qk and new.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            permute = n_head if ".attn_q." in new else n_kv
            if head_dim % 2:
                raise BadModelFile(f"{cfg_path}: head_dim {head_dim} is odd: llama.cpp's rotary layout pairs "
                                   f"the rows of {st._show(t.name)}")
        qtype = _qtype_for(gguf, new, t.shape, written)
        out.append(TensorOut(new, t, qtype, list(t.shape), _nbytes(gguf, list(t.shape), qtype), permute))
        params += math.prod(t.shape)
    for want in ("token_embd.weight", "output_norm.weight"):
        if want not in seen:
            raise BadModelFile(f"{model_dir}: no tensor for {want} (the embedding and the final norm)")
    for i in range(n_layers):
        for part in _LAYER_TENSORS:
            if f"blk.{i}.{part}.weight" not in seen:
                raise BadModelFile(f"{model_dir}: no tensor for blk.{i}.{part}.weight, but {cfg_path.name}'s "
                                   f"num_hidden_layers is {n_layers}")
    warnings: list[str] = []
    if cfg.get("sliding_window") and arch.gguf == "llama":
        warnings.append(f"config sliding_window {st._show(cfg['sliding_window'])}: llama.cpp's llama attends to "
                        "the whole context (as the converter writes it)")
    label = source_label or str(model_dir)
    plan = ExportPlan(model_dir, arch, hf_arch, cfg, quant, written, out, tokenizer, fmt,
                      name or model_dir.resolve().name, params, label, warnings)
    try:
        _, mf_warnings = mf.modelfile(GGUF_NAME, fmt, source=label)
    except ValueError as e:
        raise UserError(f"{model_dir}: the Modelfile's TEMPLATE {e}") from None
    plan.warnings += mf_warnings
    return plan


# The tensors every layer has in the GGUF (biases are optional: Qwen2's Q/K/V, attention_bias, mlp_bias).
_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")


def _expected_shape(gguf_name: str, cfg: dict[str, Any]) -> tuple[list[int], list[str]] | None:
    """The shape config.json implies for a tensor (by its GGUF name, HF order: rows first) and
    the config keys that say it; None for a name it says nothing about."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hd = _head_dim(cfg)
    heads = "num_attention_heads and head_dim" if cfg.get("head_dim") is not None else \
        "num_attention_heads (hidden_size / num_attention_heads per head)"
    kv = "num_key_value_heads and head_dim" if cfg.get("head_dim") is not None else \
        "num_key_value_heads (hidden_size / num_attention_heads per head)"
    part, kind = gguf_name.rsplit(".", 2)[-2:]
    weight = kind == "weight"
    table: dict[str, tuple[list[int], list[str]]] = {
        "token_embd": ([vocab, hidden], ["vocab_size", "hidden_size"]),
        "output": ([vocab, hidden], ["vocab_size", "hidden_size"]),
        "output_norm": ([hidden], ["hidden_size"]),
        "attn_norm": ([hidden], ["hidden_size"]),
        "ffn_norm": ([hidden], ["hidden_size"]),
        "attn_q": ([n_head * hd, hidden] if weight else [n_head * hd], [heads, "hidden_size"]),
        "attn_k": ([n_kv * hd, hidden] if weight else [n_kv * hd], [kv, "hidden_size"]),
        "attn_v": ([n_kv * hd, hidden] if weight else [n_kv * hd], [kv, "hidden_size"]),
        "attn_output": ([hidden, n_head * hd] if weight else [hidden], ["hidden_size", heads]),
        "ffn_gate": ([inter, hidden] if weight else [inter], ["intermediate_size", "hidden_size"]),
        "ffn_up": ([inter, hidden] if weight else [inter], ["intermediate_size", "hidden_size"]),
        "ffn_down": ([hidden, inter] if weight else [hidden], ["hidden_size", "intermediate_size"]),
    }
    return table.get(part)


def _check_shape(t: st.TensorInfo, gguf_name: str, cfg: dict[str, Any], cfg_path: Path) -> None:
    """Each tensor has the shape config.json says (llama.cpp sizes its buffers from the
    metadata written from the config, and refuses or misreads a file where they disagree)."""
    expected = _expected_shape(gguf_name, cfg)
    if expected is None:  # rope_freqs (made here from the config), experts, the router: not a dense model's
        raise UserError(f"{t.file}: tensor {st._show(t.name)} ({gguf_name}) has no place in the dense model "
                        "ftkit's GGUF export writes (use llama.cpp's convert_hf_to_gguf.py)")
    shape, keys = expected[0], expected[1][: len(expected[0])]  # keys[i] says shape[i]
    if list(t.shape) != shape:
        differ = [k for i, k in enumerate(keys) if len(t.shape) != len(shape) or t.shape[i] != shape[i]]
        raise BadModelFile(f"{t.file}: tensor {st._show(t.name)} ({gguf_name}) has shape {list(t.shape)}, but "
                           f"{cfg_path.name}'s {' and '.join(dict.fromkeys(differ))} make it {shape}")


def resolve_format(model_dir: Path, template: str, fmt_name: str | None, tok: Tokenizer,
                   system: str | None) -> mf.ChatFormat:
    """The prompt format the model was trained with, as engines.templates.choose decided it
    in training: `auto` is the tokenizer's own template if it has one, else chatml for chat
    data and alpaca otherwise; a template file was installed on the tokenizer (`tokenizer`)."""
    own = tok.own_template
    if fmt_name == "text":
        return mf.ChatFormat("text", None, "{{ .Prompt }}", [tok.eos] if tok.eos else [], None)
    if template == "auto":
        if own:
            template = "tokenizer"
        elif fmt_name is None:
            raise UserError(f"{model_dir}: the tokenizer has no chat template; name the template the model was "
                            "trained with (--template alpaca, chatml, llama3, gemma, mistral or text)")
        else:
            template = "chatml" if fmt_name == "chat" else "alpaca"
    if template not in ("alpaca", "tokenizer", "text", *mf.templates.CHAT_TEMPLATES):
        template = "tokenizer"  # a template file: training installed its text on the tokenizer
    if template == "text":
        return mf.ChatFormat("text", None, "{{ .Prompt }}", [tok.eos] if tok.eos else [], None)
    if template == "tokenizer" and not own:
        raise UserError(f"{model_dir}: trained with the tokenizer's own chat template, but the tokenizer has none")
    return mf.chat_format(template, own_template=own, bos=tok.bos, eos=tok.eos, adds_bos=tok.adds_bos, system=system)


# --------------------------------------------------------------------------- memory and disk


@dataclass
class Needs:
    ram_bytes: int
    disk_bytes: int
    disk_free: int


def needs(plan: ExportPlan, out: Path) -> Needs:
    """RAM: Python with numpy and gguf-py, the vocabulary as Python strings, a row block in
    fp32 with its conversion and quantization temporaries; with llama.cpp's quantizer, the
    largest tensor in fp32 plus its output and the library. Disk: the GGUF (and, before
    llama.cpp quantizes, the f16/bf16/f32 one it starts from)."""
    vocab = sum(len(t) + 80 for t in plan.tokenizer.tokens) + sum(len(m) + 80 for m in plan.tokenizer.special.merges)
    block = 6 * ROW_BLOCK_BYTES  # read bytes, fp32, permuted copy, quantizer temporaries (bench)
    ram = IMPORT_BYTES + vocab + block
    disk = plan.output_bytes()
    if plan.via_llama_cpp:
        largest = max((math.prod(t.shape) for t in plan.tensors), default=0)
        ram = max(ram, vocab + largest * 5 + LLAMA_CPP_RAM_BYTES)
        disk += plan.written_bytes()
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return Needs(ram, disk, shutil.disk_usage(parent).free)


# --------------------------------------------------------------------------- writing


def check_output(out: Path, model_dir: Path) -> None:
    """A new directory: nothing there yet (no file, no link, no directory), not inside the model."""
    if os.path.lexists(out):
        kind = "a symbolic link" if os.path.islink(out) else "a directory" if out.is_dir() else "a file"
        raise UserError(f"output {out} exists ({kind}); the export writes a new directory")
    if merge_engine._inside(out, model_dir):
        raise UserError(f"output {out} is inside the model directory {model_dir}; write the export elsewhere")
    for parent in out.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UserError(f"output {out}: {parent} is not a directory")
            break


def _read_rows(t: st.TensorInfo, r0: int, r1: int) -> Any:
    """Rows r0..r1 of a tensor as fp32 (or, for BF16, the raw bits), read with pread."""
    import numpy as np

    cols = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1  # a 1-D tensor: rows of one value
    size = st.DTYPE_SIZES[t.dtype]
    begin, n = t.begin + r0 * cols * size, (r1 - r0) * cols * size
    fd = st.open_regular(t.file)
    try:
        if os.fstat(fd).st_size < t.end:
            raise BadModelFile(f"{t.file}: truncated (it changed since its header was read?): {st._show(t.name)}")
        buf = st._pread_exact(fd, n, begin, t.file, st._show(t.name))
    finally:
        os.close(fd)
    if t.dtype == "BF16":
        bits = np.frombuffer(buf, dtype="<u2").reshape(r1 - r0, cols)
        return bits
    return np.frombuffer(buf, dtype=_NUMPY_DTYPES[t.dtype]).reshape(r1 - r0, cols)


def _permute(rows: Any, heads: int) -> Any:
    """llama.cpp's rotary layout for Q and K: within each head, interleave the two halves
    (the converter's LlamaModel.permute), on a block of whole heads."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _encode(gguf: Any, rows: Any, src_dtype: str, qtype: str) -> Any:
    """A block of rows in the output type, as bytes (numpy uint8)."""
    import numpy as np

    if src_dtype == "BF16":
        if qtype == "BF16":
            return np.ascontiguousarray(rows).view(np.uint8)
        rows = (rows.astype(np.uint32) << 16).view(np.float32)
    if qtype == "F32":
        return np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)
    if qtype == "F16":
        with np.errstate(over="ignore"):  # an overflow is refused just below, not warned about
            half = np.ascontiguousarray(rows.astype(np.float16))
        if not np.isfinite(half).all():  # the source was finite (checked): a value beyond f16's 65504
            raise Overflow("a weight is beyond f16's range (65504); export bf16 or f32")
        return half.view(np.uint8)
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), gguf.GGMLQuantizationType[qtype])


def _row_blocks(t: TensorOut) -> Iterator[tuple[int, int]]:
    if len(t.shape) == 1:
        yield 0, t.shape[0]
        return
    rows, cols = t.shape[0], math.prod(t.shape[1:])
    unit = (t.shape[0] // t.permute_heads) if t.permute_heads else 1  # whole heads at a time
    step = max(unit, (ROW_BLOCK_BYTES // max(1, cols * 4)) // unit * unit)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _finite(block: Any, src_dtype: str) -> bool:
    import numpy as np

    if src_dtype == "BF16":
        return not bool(((block & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(block).all())


class NonFinite(BadModelFile):
    """A weight holds inf or nan (exit 2: nothing written)."""


class Overflow(UserError):
    """A weight does not fit the chosen type (exit 2: nothing written)."""


def _write_metadata(gguf: Any, w: Any, plan: ExportPlan) -> None:
    cfg = plan.config
    rope = _rope(cfg, plan.model_dir / "config.json")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(plan.name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(_file_type(gguf, plan.written_type))
    w.add_block_count(cfg["num_hidden_layers"])
    ctx = cfg.get("max_position_embeddings")
    if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0:
        w.add_context_length(ctx)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if plan.arch.gguf == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(_head_dim(cfg))
    tok = plan.tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    tok.special.add_to_gguf(w, quiet=True)
    if "bos" not in tok.special.add_special_token:
        w.add_add_bos_token(False)  # as the HF tokenizer encodes: no BOS unless its post-processor adds one
    if "eos" not in tok.special.add_special_token:
        w.add_add_eos_token(False)
    if plan.fmt.jinja:
        w.add_chat_template(plan.fmt.jinja)


def _file_type(gguf: Any, written: str) -> Any:
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[written]


def write_gguf(plan: ExportPlan, path: Path, log: Callable[[str], None]) -> None:
    """The GGUF of plan.written_type at `path` (a new file), tensor by tensor, a row block at a time."""
    import numpy as np

    gguf = load_gguf()
    w = gguf.GGUFWriter(None, plan.arch.gguf)
    _write_metadata(gguf, w, plan)
    for t in plan.tensors:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.qtype]]
        byte_shape = [*t.shape[:-1], t.shape[-1] // block * size]
        w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    os.close(fd)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    done = 0
    for t in plan.tensors:
        written = 0
        if t.source is None:
            data = np.ascontiguousarray(t.data, dtype=np.float32).view(np.uint8)
            fout.write(data.tobytes())
            written = data.nbytes
        else:
            for r0, r1 in _row_blocks(t):
                rows = _read_rows(t.source, r0, r1)
                if not _finite(rows, t.source.dtype):
                    raise NonFinite(f"{t.source.file}: tensor {st._show(t.source.name)} holds inf or nan values")
                if t.permute_heads:
                    rows = _permute(rows, rows.shape[0] // (t.shape[0] // t.permute_heads))
                if len(t.shape) == 1:
                    rows = rows.reshape(-1)
                try:
                    data = np.ascontiguousarray(_encode(gguf, rows, t.source.dtype, t.qtype)).reshape(-1)
                except Overflow as e:
                    raise Overflow(f"{t.source.file}: tensor {st._show(t.source.name)}: {e}") from None
                fout.write(data.data)
                written += data.nbytes
        if written != t.nbytes:
            raise EngineError(f"internal: {t.name} wrote {written} bytes, planned {t.nbytes}")
        w.write_padding(fout, t.nbytes)
        done += 1
    fout.flush()
    os.fsync(fout.fileno())
    w.close()
    log(f"gguf: wrote {done} tensors as {plan.written_type} ({path.stat().st_size / 2**20:.1f} MiB)")


QUANTIZE_LOG = "llama-quantize.log"


def quantize_with_llama_cpp(src: Path, dst: Path, quant: str, log: Callable[[str], None]) -> str:
    """llama.cpp's own quantizer (llama_model_quantize) from the f16/bf16/f32 GGUF. Its log
    (a line per tensor) is collected, not printed: it is returned for the output directory,
    and its warnings (tensors that needed a fallback type) are said in one line each."""
    try:
        import ctypes

        import llama_cpp
        from llama_cpp import _logger
    except ImportError:
        raise UserError(f"--quant {quant} needs llama.cpp's quantizer: pip install llama-cpp-python "
                        f"(it compiles llama.cpp); without it: {', '.join(PURE_QUANTS)}") from None
    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def collect(level: int, text: bytes, user_data: Any) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = max(1, os.cpu_count() or 1)
    start = time.monotonic()
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    text = "".join(lines)
    if rc != 0:
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no log")
        raise EngineError(f"llama.cpp's quantizer failed ({rc}) making {quant} from {src.name}: {last.strip()}")
    for line in text.splitlines():
        if "WARNING" in line:
            log(f"gguf: llama.cpp: {line.split('WARNING:', 1)[-1].strip()}")
    log(f"gguf: llama.cpp quantized to {quant} in {time.monotonic() - start:.1f}s "
        f"({dst.stat().st_size / 2**20:.1f} MiB; its log: {QUANTIZE_LOG})")
    return text


def export(plan: ExportPlan, out: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write out/model.gguf, out/Modelfile and out/export.json into a hidden directory beside
    `out`, renamed into place when complete. SIGTERM ends it through the same cleanup."""
    with merge_engine._terminate_as_exit():
        return _export(plan, out, log)


def _export(plan: ExportPlan, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    merge_engine.clean_stale_partials(out, log, what="gguf")
    check_output(out, plan.model_dir)
    need = needs(plan, out)
    gib = 2**30
    if need.disk_free < need.disk_bytes * 1.02 + 2**20:
        raise UserError(f"not enough disk for the export: needs {need.disk_bytes / gib:.2f} GiB, "
                        f"{need.disk_free / gib:.2f} GiB free under {out.parent}")
    text, _ = mf.modelfile(GGUF_NAME, plan.fmt, source=plan.source_label)
    created = [p for p in reversed(out.parents) if not os.path.lexists(p)]
    tmp = out.parent / f".{out.name}{merge_engine.PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock_fd: int | None = None
    start = time.monotonic()
    try:
        tmp.mkdir(parents=True)
        lock_tmp = tmp / f".lock-{uuid.uuid4().hex[:8]}"
        lock_fd = os.open(lock_tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.rename(lock_tmp, tmp / ".lock")
        if plan.via_llama_cpp:
            first = tmp / f".model-{plan.written_type}.gguf"
            write_gguf(plan, first, log)
            qlog = quantize_with_llama_cpp(first, tmp / GGUF_NAME, plan.quant, log)
            first.unlink()
            (tmp / QUANTIZE_LOG).write_text(qlog, encoding="utf-8")
        else:
            write_gguf(plan, tmp / GGUF_NAME, log)
        (tmp / MODELFILE).write_text(text, encoding="utf-8")
        summary = _summary(plan, out, (tmp / GGUF_NAME).stat().st_size, time.monotonic() - start)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / ".lock").unlink()
        os.replace(tmp, out)
        merge_engine._fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EngineError(f"no space left on the device holding {out.parent} while writing the GGUF "
                              f"({need.disk_bytes / gib:.2f} GiB needed; the partial output was removed)") from e
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    log(f"gguf: wrote {out}/{GGUF_NAME} and {out}/{MODELFILE}")
    return summary


def _summary(plan: ExportPlan, out: Path, size: int, seconds: float) -> dict[str, Any]:
    return {"output": str(out), "gguf": str(out / GGUF_NAME), "modelfile": str(out / MODELFILE),
            "source": plan.source_label, "model_dir": str(plan.model_dir), "architecture": plan.arch.gguf,
            "quant": plan.quant, "written_by": "llama.cpp quantizer" if plan.via_llama_cpp else "gguf-py",
            "tensors": len(plan.tensors), "params": plan.params, "bytes": size, "seconds": round(seconds, 2),
            "pre_tokenizer": plan.tokenizer.pre, "template": plan.fmt.name, "warnings": plan.warnings}


def describe(plan: ExportPlan, out: Path) -> dict[str, Any]:
    """What --dry-run prints: every file the export would write (the Modelfile in full), the
    tensors' types, and the RAM and disk it needs."""
    need = needs(plan, out)
    text, _ = mf.modelfile(GGUF_NAME, plan.fmt, source=plan.source_label)
    types: dict[str, int] = {}
    for t in plan.tensors:
        types[t.qtype] = types.get(t.qtype, 0) + 1
    return {
        "source": plan.source_label, "model_dir": str(plan.model_dir), "output": str(out),
        "writes": [str(out / GGUF_NAME), str(out / MODELFILE), str(out / SUMMARY)]
        + ([str(out / QUANTIZE_LOG)] if plan.via_llama_cpp else []),
        "architecture": plan.arch.gguf, "hf_architecture": plan.hf_arch, "quant": plan.quant,
        "written_by": (f"gguf-py writes {plan.written_type}, then llama.cpp's quantizer makes {plan.quant}"
                       if plan.via_llama_cpp else "gguf-py"),
        "tensors": len(plan.tensors), "tensor_types": types, "params": plan.params,
        "pre_tokenizer": plan.tokenizer.pre, "vocab": len(plan.tokenizer.tokens),
        "add_bos": plan.tokenizer.adds_bos, "template": plan.fmt.name,
        "gguf_bytes": plan.output_bytes(), "ram_bytes": need.ram_bytes, "disk_bytes": need.disk_bytes,
        "disk_free_bytes": need.disk_free, "modelfile": text, "warnings": plan.warnings,
    }
