"""Quantize the merged model to 4-bit weights (W4A16) with llm-compressor, for vLLM.

    python -m ftkit.engines.quantize --config configs/quantize-<step>.json

llm-compressor's `oneshot` with GPTQ (or AWQ) on the Linear layers, calibrated on the recipe's
own training rows (shaped by the same template training used), through its sequential
pipeline: the model stays in host RAM and one decoder layer at a time runs the calibration
rows on the GPU (or the CPU), so the GPU holds a layer, not the model. The result is written
with `save_compressed=True` (compressed-tensors, pack-quantized): what vLLM loads with its
Marlin kernels on a GPU and its CPUWNA16 kernel on the CPU, and what transformers reads with
compressed-tensors installed (the eval step).

The output is written into a hidden directory beside it and renamed into place when
complete, so a run that dies leaves no half model where the serve step looks. quantize.json
records the rows used, the time, the peak memory and the sizes on disk.

Runs in the quantize image (or a Python with llmcompressor): llm-compressor pins its own
transformers and compressed-tensors. Imports of torch, transformers and llmcompressor happen
here only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from ftkit.engines import data, templates
from ftkit.errors import DatasetError, UserError
from ftkit.files import write_json

PARTIAL = ".partial"


def calibration_texts(cfg: dict[str, Any], tokenizer: Any) -> tuple[list[str], int]:
    """The calibration rows as the model saw them in training (prompt + answer), drawn with the
    step's seed from the training split (the eval split held out); (texts, rows available)."""
    ds = cfg["dataset"]
    q = cfg["quantize"]
    rows = data.load_splits(ds).train
    if not rows:
        raise DatasetError(f"dataset {ds['path']}: no training rows to calibrate on")
    if ds["format"] != "text":
        template = templates.choose(ds.get("template") or "auto", ds["format"], tokenizer)
        if template != "tokenizer":
            templates.apply_named(tokenizer, template)
    else:
        template = "text"
    order = list(range(len(rows)))
    random.Random(q.get("seed", 0)).shuffle(order)
    picked = [rows[i] for i in order[: q["calibration_samples"]]]
    eos = tokenizer.eos_token or ""
    texts = []
    for row in picked:
        ex = data.to_example(row, ds, template, tokenizer)
        texts.append(ex.text if ex.text is not None else ex.prompt + ex.completion + eos)
    return texts, len(rows)


def modifier(q: dict[str, Any]) -> Any:
    """llm-compressor's recipe for the step: GPTQ or AWQ, W4A16 on every Linear but `ignore`."""
    if q["method"] == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(targets="Linear", scheme=q["scheme"], ignore=list(q["ignore"]))
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(targets="Linear", scheme=q["scheme"], ignore=list(q["ignore"]))


def _cpu_without_pinning() -> None:
    """AWQ in llm-compressor 0.14 pins its cached activations in page-locked memory before each
    grid search (`IntermediatesCache.pin_memory`), a transfer speed-up that needs an
    accelerator: without one torch raises "Cannot access accelerator device when none is
    available". On the CPU there is nothing to transfer; the cache stays as it is."""
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines import cache

    cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix == ".safetensors")


def _peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _umask_modes(d: Path) -> None:
    """Files follow the umask, as everything ftkit writes (safetensors' writer makes its file 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in d.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~mask)


def check_output(out: Path, src: Path) -> None:
    if os.path.islink(out):
        raise UserError(f"output {out} is a symbolic link; give a real directory")
    if os.path.lexists(out) and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} exists and is not an empty directory")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"output {out} is inside the model being quantized ({src})")
    if not (src / "config.json").is_file():
        raise UserError(f"{src} holds no model (no config.json): did the merge step run?")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    q = cfg["quantize"]
    src, out = Path(cfg["model_dir"]), Path(cfg["output_dir"])
    check_output(out, src)
    started = time.monotonic()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(int(q.get("seed", 0)))
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    texts, available = calibration_texts(cfg, tokenizer)
    print(f"quantize: {q['method'].upper()} {q['scheme']} on {len(texts)} calibration row(s) "
          f"(of {available} training rows; asked for {q['calibration_samples']}), up to {q['max_seq_len']} tokens "
          f"each, on {'the GPU' if torch.cuda.is_available() else 'the CPU'}", flush=True)

    from datasets import Dataset
    from llmcompressor import oneshot

    if q["method"] == "awq":
        _cpu_without_pinning()
    enc = tokenizer(texts, truncation=True, max_length=q["max_seq_len"], add_special_tokens=False)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    # on the CPU, in its own dtype: the sequential pipeline moves one layer at a time to the GPU
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    loaded = time.monotonic()
    oneshot(model=model, dataset=ds, recipe=modifier(q), max_seq_length=q["max_seq_len"],
            num_calibration_samples=len(texts), shuffle_calibration_samples=False, pipeline="sequential")
    calibrated = time.monotonic()

    partial = out.parent / f".{out.name}{PARTIAL}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(partial), save_compressed=True)
    tokenizer.save_pretrained(str(partial))
    _umask_modes(partial)
    if out.is_dir():
        out.rmdir()  # empty (check_output): the rename takes its place
    os.replace(partial, out)
    peak_gpu = (round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None)
    summary = {
        "method": q["method"], "scheme": q["scheme"], "rows": len(texts), "rows_available": available,
        "max_seq_len": q["max_seq_len"], "ignore": list(q["ignore"]),
        "seconds": round(time.monotonic() - started, 2), "load_seconds": round(loaded - started, 2),
        "calibrate_seconds": round(calibrated - loaded, 2),
        "input_bytes": _size(src), "output_bytes": _size(out),
        "peak_rss_mib": _peak_rss_mib(), "peak_gpu_mem_mib": peak_gpu, "output": str(out),
    }
    write_json(Path(cfg["summary_path"]), summary)
    print(f"ftkit quantize: done: {json.dumps(summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    from ftkit.engines.entry import main_with_config

    main_with_config("quantize", "ftkit.engines.quantize", run, argv)


if __name__ == "__main__":
    main()
