"""A corpus of corrupted merge inputs, made on the spot (nothing large is committed).

`make_pair(root)` writes a tiny valid base model (Llama tensor names, fp32) and a LoRA
adapter for it, byte by byte, so every part of the files can be broken on purpose. Each
entry of CASES breaks one thing and says which words the one-line error must contain.

    python -m tests.unit.merge_corpus DIR     # write every case under DIR/<case>/{base,adapter}
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

R = 2
SHAPES = {
    "model.embed_tokens.weight": [16, 8],
    "model.layers.0.self_attn.q_proj.weight": [8, 8],
    "model.layers.0.mlp.up_proj.weight": [12, 8],
    "model.layers.0.input_layernorm.weight": [8],
    "model.norm.weight": [8],
    "lm_head.weight": [16, 8],
}
TARGETS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.mlp.up_proj": (12, 8)}  # (out, in)
PREFIX = "base_model.model."
CODES = {"F32": np.float32, "F16": np.float16, "I32": np.int32}


def values(shape: list[int], seed: int, scale: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32) if shape else np.zeros(shape, np.float32)


def header_bytes(header: dict) -> bytes:  # type: ignore[type-arg]
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], *, header_edit: Callable[[dict], None] | None = None,
                      raw_header: bytes | None = None, length: int | None = None) -> None:
    """tensors in order; header_edit changes the header dict after offsets are filled in;
    raw_header replaces the JSON bytes; length replaces the 8-byte length field."""
    header: dict = {"__metadata__": {"format": "pt"}}  # type: ignore[type-arg]
    data = b""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    if header_edit is not None:
        header_edit(header)
    blob = raw_header if raw_header is not None else header_bytes(header)
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def base_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        out[name] = np.ones(shape, np.float32) if "norm" in name else values(shape, seed + i)
    return out


def adapter_tensors(seed: int = 100) -> dict[str, np.ndarray]:
    out = {}
    for i, (module, (o, n)) in enumerate(TARGETS.items()):
        out[f"{PREFIX}{module}.lora_A.weight"] = values([R, n], seed + 2 * i)
        out[f"{PREFIX}{module}.lora_B.weight"] = values([o, R], seed + 2 * i + 1)
    return out


BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
               "num_hidden_layers": 1, "tie_word_embeddings": False, "torch_dtype": "float32"}
ADAPTER_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 4, "lora_dropout": 0.0,
                  "target_modules": ["q_proj", "up_proj"], "bias": "none", "fan_in_fan_out": False,
                  "use_rslora": False, "use_dora": False, "modules_to_save": None}


def make_pair(root: Path) -> tuple[Path, Path]:
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    write_safetensors(base / "model.safetensors", base_tensors())
    (base / "config.json").write_text(json.dumps(BASE_CONFIG))
    (base / "tokenizer.json").write_text("{}")
    write_safetensors(adapter / "adapter_model.safetensors", adapter_tensors())
    (adapter / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    return base, adapter


@dataclass
class Case:
    break_it: Callable[[Path, Path], None]  # (base, adapter) -> None
    words: str  # what the one-line error must say (case-insensitive)
    args: list[str] = field(default_factory=list)  # extra `ftkit merge` arguments
    output: str | None = None  # -o relative to the case root (default: merged)


def _base(base: Path, **kw) -> None:  # type: ignore[no-untyped-def]
    write_safetensors(base / "model.safetensors", kw.pop("tensors", None) or base_tensors(), **kw)


def _adapter(adapter: Path, **kw) -> None:  # type: ignore[no-untyped-def]
    write_safetensors(adapter / "adapter_model.safetensors", kw.pop("tensors", None) or adapter_tensors(), **kw)


def _acfg(adapter: Path, text: str | None = None, **changes) -> None:  # type: ignore[no-untyped-def]
    (adapter / "adapter_config.json").write_text(text if text is not None else json.dumps({**ADAPTER_CONFIG, **changes}))


def _edit(name: str, key: str, value: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        h[name][key] = value
    return edit


Q = "model.layers.0.self_attn.q_proj.weight"
QA = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
QB = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"


def _with(tensors: dict[str, np.ndarray], **changes: np.ndarray) -> dict[str, np.ndarray]:
    out = dict(tensors)
    for k, v in changes.items():
        out[{"q": Q, "qa": QA, "qb": QB}.get(k, k)] = v
    return out


def _nan(shape: list[int]) -> np.ndarray:
    a = values(shape, 7)
    a.flat[3] = np.nan
    return a


def _sharded(base: Path, weight_map: dict[str, str] | None = None, text: str | None = None) -> None:
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    wm = weight_map if weight_map is not None else {n: "model-00001-of-00001.safetensors" for n in SHAPES}
    (base / "model.safetensors.index.json").write_text(text if text is not None else json.dumps({"weight_map": wm}))


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _overlap(h: dict) -> None:  # type: ignore[type-arg]
    names = [n for n in h if n != "__metadata__"]
    a, b = h[names[1]], h[names[2]]  # q_proj (64 floats) and up_proj (96): make up_proj start inside q_proj
    start = a["data_offsets"][0] + 4
    b["data_offsets"] = [start, start + 96 * 4]


def _resized(adapter: Path, embed_rows: int, head_rows: int) -> None:
    t = adapter_tensors()
    t[f"{PREFIX}model.embed_tokens.modules_to_save.default.weight"] = values([embed_rows, 8], 5)
    t[f"{PREFIX}lm_head.modules_to_save.default.weight"] = values([head_rows, 8], 6)
    _adapter(adapter, tensors=t)


def _other_base(base: Path, adapter: Path) -> None:
    """The adapter says it was trained on another local model of the same tensor shapes
    (a different architecture in its config: shapes alone cannot tell them apart)."""
    other = base.parent / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**BASE_CONFIG, "model_type": "mistral",
                                                   "architectures": ["MistralForCausalLM"], "sliding_window": 4}))
    _acfg(adapter, base_model_name_or_path=str(other))


IDENTITY = ("adapter_trained_on_another_local_base", "adapter_weights_for_modules_its_config_does_not_name",
            "adapter_weights_outside_layers_to_transform", "adapter_pattern_does_not_match_its_weights")


CASES: dict[str, Case] = {
    # --- base safetensors headers
    "base_header_length_huge": Case(lambda b, a: _base(b, length=2**62), "header length"),
    "base_header_length_zero": Case(lambda b, a: _base(b, length=0), "header length"),
    "base_too_short": Case(lambda b, a: (b / "model.safetensors").write_bytes(b"\x01\x02\x03"), "too short"),
    "base_header_not_json": Case(lambda b, a: _base(b, raw_header=b"{not json" + b" " * 7), "not valid json"),
    "base_header_not_utf8": Case(lambda b, a: _base(b, raw_header=b'{"\xff\xfe":1}  '), "not utf-8"),
    "base_header_is_a_list": Case(lambda b, a: _base(b, raw_header=b"[]      "), "not a json object"),
    "base_unknown_dtype": Case(lambda b, a: _base(b, header_edit=_edit(Q, "dtype", "F99")), "unsupported dtype"),
    "base_shape_against_bytes": Case(lambda b, a: _base(b, header_edit=_edit(Q, "shape", [9, 8])), "needs 288 bytes"),
    "base_negative_shape": Case(lambda b, a: _base(b, header_edit=_edit(Q, "shape", [-8, -8])), "non-negative"),
    "base_boolean_shape": Case(lambda b, a: _base(b, header_edit=_edit(Q, "shape", [True, 64])), "non-negative integers"),
    "base_offsets_out_of_range": Case(lambda b, a: _base(b, header_edit=_edit(Q, "data_offsets", [10**9, 10**9 + 256])),
                                      "outside"),
    "base_offsets_reversed": Case(lambda b, a: _base(b, header_edit=_edit(Q, "data_offsets", [768, 512])), "reversed"),
    "base_offsets_overlap": Case(lambda b, a: _base(b, header_edit=_overlap), "overlap"),
    "base_duplicate_tensor_name": Case(
        lambda b, a: _base(b, raw_header=b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                         b'"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'), "duplicate key"),
    "base_metadata_not_strings": Case(lambda b, a: _base(b, header_edit=lambda h: h.update(__metadata__={"n": 1})),
                                      "__metadata__"),
    "base_truncated": Case(lambda b, a: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:-100]),
                           "outside"),
    "base_is_a_fifo": Case(lambda b, a: _fifo(b / "model.safetensors"), "fifo"),
    "base_nan_in_merged_weight": Case(lambda b, a: _base(b, tensors=_with(base_tensors(), q=_nan([8, 8]))), "inf or nan"),
    "base_inf_in_plain_weight": Case(
        lambda b, a: _base(b, tensors={**base_tensors(), "model.norm.weight": np.full([8], np.inf, np.float32)}),
        "inf or nan"),
    "base_lora_into_integer_weight": Case(
        lambda b, a: _base(b, tensors=_with(base_tensors(), q=np.zeros([8, 8], np.int32))), "integer"),
    # --- base index and config
    "index_missing_shard": Case(lambda b, a: _sharded(b, {n: "model-00002-of-00002.safetensors" for n in SHAPES}),
                                "does not exist"),
    "index_shard_outside_base": Case(lambda b, a: _sharded(b, {n: "../adapter/adapter_model.safetensors" for n in SHAPES}),
                                     "not a file name"),
    "index_shard_symlink_outside": Case(
        lambda b, a: (_sharded(b, {n: "link.safetensors" for n in SHAPES}),
                      os.symlink(a / "adapter_model.safetensors", b / "link.safetensors")), "outside the base"),
    "index_not_json": Case(lambda b, a: _sharded(b, text="{weight_map: nope"), "not valid json"),
    "index_wrong_shard": Case(
        lambda b, a: (_sharded(b), write_safetensors(b / "other.safetensors", {"extra": np.zeros([1], np.float32)}),
                      (b / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                          **{n: "model-00001-of-00001.safetensors" for n in SHAPES}, Q: "other.safetensors"}}))),
        "does not hold it"),
    "config_not_json": Case(lambda b, a: (b / "config.json").write_text("{'vocab_size': 16,"), "not valid json"),
    "config_not_an_object": Case(lambda b, a: (b / "config.json").write_text("[]"), "not a json object"),
    "config_missing": Case(lambda b, a: (b / "config.json").unlink(), "no config.json"),
    # --- adapter config
    "adapter_r_zero": Case(lambda b, a: _acfg(a, r=0), "positive integer"),
    "adapter_r_boolean": Case(lambda b, a: _acfg(a, r=True), "positive integer"),
    "adapter_r_float": Case(lambda b, a: _acfg(a, r=2.5), "positive integer"),
    "adapter_r_disagrees_with_tensors": Case(lambda b, a: _acfg(a, r=4), "rank 4"),
    "adapter_alpha_nan": Case(lambda b, a: _acfg(a, text=json.dumps(ADAPTER_CONFIG).replace('"lora_alpha": 4', '"lora_alpha": NaN')),
                              "nan is not valid json"),
    "adapter_alpha_string": Case(lambda b, a: _acfg(a, lora_alpha="16"), "finite number"),
    "adapter_config_not_json": Case(lambda b, a: _acfg(a, text='{"r": 2,,}'), "not valid json"),
    "adapter_config_is_a_fifo": Case(lambda b, a: _fifo(a / "adapter_config.json"), "fifo"),
    "adapter_rank_pattern_catastrophic": Case(lambda b, a: _acfg(a, rank_pattern={"(a+)+$": 2}), "backtrack"),
    "adapter_rank_pattern_invalid": Case(lambda b, a: _acfg(a, rank_pattern={"(": 2}), "not a valid regular expression"),
    "adapter_fan_in_fan_out_string": Case(lambda b, a: _acfg(a, fan_in_fan_out="yes"), "true or false"),
    # --- adapter tensors
    "adapter_a_would_broadcast": Case(lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qa=values([R, 1], 1))),
                                      "do not fit"),
    "adapter_b_wrong_out": Case(lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qb=values([7, R], 1))),
                                "do not fit"),
    "adapter_a_transposed": Case(lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qa=values([8, R], 1))), "rank"),
    "adapter_nan_weights": Case(lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qb=_nan([8, R]))), "inf or nan"),
    "adapter_inf_weights": Case(
        lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qa=np.full([R, 8], -np.inf, np.float32))), "inf or nan"),
    "adapter_only_lora_a": Case(lambda b, a: _adapter(a, tensors={k: v for k, v in adapter_tensors().items() if k != QB}),
                                "has only"),
    "adapter_targets_missing_module": Case(
        lambda b, a: _adapter(a, tensors={k.replace("q_proj", "z_proj"): v for k, v in adapter_tensors().items()}),
        "has no tensor"),
    "adapter_header_garbage": Case(lambda b, a: _adapter(a, raw_header=b"\x00" * 16), "not valid json"),
    "adapter_lora_factor_1d": Case(lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qa=values([16], 1))), "2-d"),
    "adapter_resized_vocab_disagrees": Case(lambda b, a: _resized(a, 20, 16), "inconsistently"),
    "adapter_replaced_wrong_shape": Case(
        lambda b, a: _adapter(a, tensors={**adapter_tensors(),
                                          f"{PREFIX}model.norm.modules_to_save.default.weight": values([9], 3)}),
        "has shape"),
    "adapter_update_overflows_fp16": Case(
        lambda b, a: _adapter(a, tensors=_with(adapter_tensors(), qb=np.full([8, R], 1e6, np.float32),
                                               qa=np.full([R, 8], 1e3, np.float32))), "overflows", args=["--dtype", "fp16"]),
    # --- is it this base's adapter? (refused; --force merges with a warning: IDENTITY)
    "adapter_trained_on_another_local_base": Case(lambda b, a: _other_base(b, a), "trained on"),
    "adapter_weights_for_modules_its_config_does_not_name": Case(lambda b, a: _acfg(a, target_modules=["q_proj"]),
                                                                 "do not name"),
    "adapter_weights_outside_layers_to_transform": Case(lambda b, a: _acfg(a, layers_to_transform=[1]), "outside"),
    "adapter_pattern_does_not_match_its_weights": Case(lambda b, a: _acfg(a, target_modules=r".*\.q_proj"),
                                                       "does not match"),
    "adapter_without_any_weights": Case(lambda b, a: write_safetensors(a / "adapter_model.safetensors", {}),
                                        "nothing to merge"),
    # --- options and output
    "max_shard_nan": Case(lambda b, a: None, "max-shard-gb", args=["--max-shard-gb", "nan"]),
    "max_shard_negative": Case(lambda b, a: None, "max-shard-gb", args=["--max-shard-gb", "-1"]),
    "max_shard_infinite": Case(lambda b, a: None, "max-shard-gb", args=["--max-shard-gb", "inf"]),
    "output_inside_base": Case(lambda b, a: None, "inside the base model", output="base/merged"),
    "output_inside_adapter": Case(lambda b, a: None, "inside the adapter", output="adapter/sub/merged"),
    "output_is_a_file": Case(lambda b, a: (b.parent / "merged").write_text("x"), "not a directory"),
}


def make_case(root: Path, name: str) -> tuple[Path, Path, Case]:
    base, adapter = make_pair(root)
    case = CASES[name]
    case.break_it(base, adapter)
    return base, adapter, case


def main() -> None:
    out = Path(sys.argv[1])
    for name in CASES:
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        make_case(d, name)
    print(f"{len(CASES)} cases under {out}")


if __name__ == "__main__":
    main()
