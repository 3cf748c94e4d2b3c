"""GGUF export: size on disk per quantization type, the export's wall time and peak RSS
against the RAM `--dry-run` states, and llama.cpp's speed on the result (llama-cpp-python,
where installed: prompt and generation tokens/s on this machine's CPU threads).

Two models: the quickstart-sized tiny model (its own tokenizer; random weights, the shape the
quickstart trains) and a synthetic 1.1B-parameter Llama (TinyLlama's shape, random bf16
weights, the same as bench/merge_bench.py; the tiny tokenizer stands in for its 32000-token
vocabulary, the rest of the ids are unused tokens). Random weights change no size, time or
speed figure.

    python bench/gguf_bench.py [--workdir DIR] [--skip-large] [--quants f16,q8_0,...] [--threads N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _util import ROOT, peak_rss, save

sys.path.insert(0, str(ROOT / "toolkit"))

TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "vocab_size": 400,
        "max_position_embeddings": 256, "initializer_range": 0.1, "seed": 0}
DATASET = {
    "path": str(ROOT / "recipes/data/quickstart-train.jsonl"), "format": "alpaca", "template": "alpaca",
    "system_prompt": None, "eval": {"path": str(ROOT / "recipes/data/quickstart-eval.jsonl")},
    "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
               "role": "role", "content": "content", "text": "text"},
}
PROMPT = "### Instruction:\nName the category of these words.\n\n### Input:\nkiwi mango lemon\n\n### Response:\n"
LLAMA_CPP_SPEED = """
import json, sys, time
import llama_cpp
path, threads, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t0
prompt = llm.tokenize(sys.argv[4].encode() * 4, add_bos=False, special=True)
t0 = time.perf_counter()
llm.eval(prompt)
prompt_s = time.perf_counter() - t0
t0, n = time.perf_counter(), 0
for _ in llm.generate([], temp=0.0, reset=False):
    n += 1
    if n == n_gen:
        break
gen_s = time.perf_counter() - t0
llm.close()
print(json.dumps({"load_s": round(load_s, 2), "prompt_tokens": len(prompt),
                  "prompt_tok_s": round(len(prompt) / prompt_s, 1), "gen_tokens": n,
                  "gen_tok_s": round(n / gen_s, 1)}))
"""


def export(model: Path, out: Path, quant: str, template: str) -> dict:
    argv = [sys.executable, "-m", "ftkit", "export", "--to", "gguf", "--model", str(model), "--quant", quant,
            "--template", template, "-o", str(out)]
    dry = peak_rss([*argv, "--dry-run"])
    stated = json.loads(dry["output"][dry["output"].index("{"):])
    stats = peak_rss(argv)
    return {"quant": quant, "bytes": (out / "model.gguf").stat().st_size, "wall_s": stats["wall_s"],
            "peak_rss_mib": stats["peak_rss_mib"], "stated_ram_mib": round(stated["ram_bytes"] / 2**20, 1),
            "stated_disk_mib": round(stated["disk_bytes"] / 2**20, 1)}


def speed(gguf: Path, threads: int, n_gen: int, repeat: int) -> dict | None:
    """llama.cpp's prompt and generation tokens/s, median of `repeat` runs (each its own
    process), with the load average seen (the CI machine is shared: a busy one reads slower)."""
    import os
    import statistics
    import subprocess

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", LLAMA_CPP_SPEED, str(gguf), str(threads), str(n_gen), PROMPT],
                              capture_output=True, text=True, check=False, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"llama.cpp failed on {gguf}:\n{proc.stderr[-3000:]}")
        runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "load_avg_1m": round(os.getloadavg()[0], 2)})
    return {"prompt_tok_s": statistics.median(r["prompt_tok_s"] for r in runs),
            "gen_tok_s": statistics.median(r["gen_tok_s"] for r in runs), "runs": runs}


def make_large(root: Path) -> Path:
    """merge_bench's synthetic 1.1B Llama (bf16), with the tiny tokenizer."""
    sys.path.insert(0, str(ROOT / "bench"))
    from merge_bench import make_model

    base, _, params = make_model(root)
    print(f"synthetic model: {params:,} parameters", flush=True)
    return base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--quants", default="f32,f16,bf16,q8_0,q4_0,q4_k_m,q6_k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="llama.cpp speed runs per file (median)")
    args = ap.parse_args()
    from ftkit.engines import gguf_export, tiny

    quants = args.quants.split(",")
    have_llama_cpp = gguf_export.llama_cpp_available()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ftkit-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"threads": args.threads}, "models": {}}
    tiny_dir = work / "tiny"
    if not tiny_dir.exists():
        tiny.generate(TINY, DATASET, tiny_dir)
    models = {"tiny": (tiny_dir, 64)}
    if not args.skip_large:
        large = work / "base"
        if not large.exists():
            large = make_large(work)
        cfg = json.loads((large / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]  # a bare LlamaConfig names no model class; a saved model does
        (large / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_dir / name, large / name)
        models["llama-1.1b"] = (large, 64)
    for label, (model, n_gen) in models.items():
        rows = []
        src = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for quant in quants:
            if quant in gguf_export.LLAMA_CPP_QUANTS and not have_llama_cpp:
                continue
            out = work / f"{label}-{quant}"
            shutil.rmtree(out, ignore_errors=True)
            row = export(model, out, quant, "alpaca")
            row["speed"] = speed(out / "model.gguf", args.threads, n_gen, args.repeat)
            print(json.dumps({"model": label, **row}), flush=True)
            rows.append(row)
            shutil.rmtree(out)
        results["models"][label] = {"safetensors_bytes": src, "exports": rows}
        time.sleep(1)
    path = save("gguf", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
