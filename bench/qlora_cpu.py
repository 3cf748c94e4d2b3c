"""QLoRA against LoRA on the CPU (issue #18), through ftkit's training engine and merge, with
bitsandbytes itself (NF4 layers, 8-bit AdamW), and plan.memory's estimate against the
measured peak.

    python bench/qlora_cpu.py tiny [--reps 3] [--threads 1]
        The QLoRA quickstart's model and train step (recipes/quickstart-qlora.yaml: hidden 64,
        2 layers, 120 steps of 16 rows): QLoRA against LoRA with only the method changed, and
        LoRA in fp32 as the LoRA quickstart trains. Peak RSS, median step time, CPU seconds
        per step (user + system, steadier than wall time on a shared machine), final loss,
        eval loss; repetitions alternate. -> results/qlora_cpu_tiny[_1thread].json

    python bench/qlora_cpu.py estimate
        A 168M-parameter random Llama (hidden 1024, 8 layers, vocab ~16k; text rows that fill
        seq_len 256), 6 steps of 4 rows with gradient checkpointing, LoRA and QLoRA in bf16.
        RSS is sampled every 20 ms: the floor before the model loads (Python, torch,
        transformers, trl, peft, bitsandbytes, tokenizer, data), the peak while it loads, the
        peak while it trains. plan.memory.estimate's components for the same step and shapes
        stand beside (on the CPU there is no CUDA context or caching allocator: the
        `cuda_context_and_slack` component does not apply). Each method runs twice: with
        glibc's malloc as it is, and with MALLOC_MMAP_THRESHOLD_=131072 (freed tensors go back
        to the system at once). Then the merge of each adapter (plain, and
        --nf4-dequantized-base for QLoRA): peak RSS over the same command's --dry-run (its
        floor) against the ram_bytes --dry-run reports. -> results/qlora_cpu_estimate.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _util import ROOT, peak_rss, run_measured, save

RECIPE = ROOT / "recipes" / "quickstart-qlora.yaml"
MIB = 2**20

# The child: one training run in its own process, RSS sampled in a thread, phases marked.
CHILD = r'''
import json, resource, statistics, sys, threading, time
import psutil
cfg = json.load(open(sys.argv[1]))
proc, samples, done = psutil.Process(), [], threading.Event()
def sample():
    while not done.is_set():
        samples.append((time.perf_counter(), proc.memory_info().rss))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
import torch, transformers, trl, peft  # noqa: E401 - the floor includes the training stack
if cfg["train"]["method"] == "qlora" or cfg["train"]["optimizer"] in ("adamw_8bit", "paged_adamw_8bit"):
    import bitsandbytes  # noqa: F401
from transformers import TrainerCallback
from ftkit.engines import train
marks = {}
real_load, real_callbacks = train.load_model, train.make_callbacks
def load_model(*a, **k):
    marks["load"] = time.perf_counter()
    return real_load(*a, **k)
def cpu(): return sum(proc.cpu_times()[:2])
class Phase(TrainerCallback):
    def on_train_begin(self, *a, **k): marks["train"], marks["cpu0"] = time.perf_counter(), cpu()
    def on_train_end(self, *a, **k): marks["end"], marks["cpu1"] = time.perf_counter(), cpu()
train.load_model = load_model
train.make_callbacks = lambda *a: [*real_callbacks(*a), Phase()]
summary = train.run(cfg)
done.set()
def peak(a, b): return max(r for t, r in samples if a <= t <= b)
floor = max(r for t, r in samples if t <= marks["load"])
rows = [json.loads(l) for l in open(cfg["metrics_path"])]
print(json.dumps({"floor_mib": floor / 2**20, "load_peak_mib": peak(marks["load"], marks["train"]) / 2**20,
                  "train_peak_mib": peak(marks["train"], marks["end"]) / 2**20,
                  "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_time_s": statistics.median(r["step_time_s"] for r in rows if "step_time_s" in r),
                  "final_loss": [r["loss"] for r in rows if "loss" in r][-1],
                  "eval_loss_last": summary.get("eval_loss_last"), "train_seconds": summary["seconds"],
                  "train_cpu_s_per_step": (marks["cpu1"] - marks["cpu0"]) / summary["global_step"],
                  "steps": summary["global_step"]}))
'''


def recipe_train_step() -> dict[str, Any]:
    import yaml

    return next(s for s in yaml.safe_load(RECIPE.read_text())["steps"] if s["type"] == "train")


def dataset_cfg(path: Path, fmt: str) -> dict[str, Any]:
    fields = {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
              "role": "role", "content": "content", "text": "text"}
    cfg: dict[str, Any] = {"path": str(path), "format": fmt, "template": "alpaca" if fmt == "alpaca" else "auto",
                           "system_prompt": None, "fields": fields, "eval": None}
    if fmt == "alpaca":
        cfg["eval"] = {"path": str(ROOT / "recipes" / "data" / "quickstart-eval.jsonl")}
    return cfg


def run_child(work: Path, name: str, base: Path, dataset: dict[str, Any], step: dict[str, Any],
              env: dict[str, str] | None = None) -> dict[str, Any]:
    from ftkit.plan.jobs import TrainJob

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    job = TrainJob.model_validate({
        "model": {"source": "path", "path": str(base), "dtype": step.get("precision", "bf16")}, "dataset": dataset,
        "train": {"type": "train", "name": "train", "gpus": [], **step}, "output_dir": str(out),
        "metrics_path": str(out / "metrics.jsonl"), "deepspeed_config": None}).to_json()
    cfg = work / f"{name}.json"
    cfg.write_text(json.dumps(job))
    r = run_measured([sys.executable, "-c", CHILD, str(cfg)], env={"PYTHONPATH": str(ROOT / "toolkit"), **(env or {})})
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{r['output'][-3000:]}")
    result = json.loads(r["output"].strip().splitlines()[-1])
    result["wall_s"] = r["wall_s"]
    return result


def tiny(reps: int, threads: int | None) -> dict[str, Any]:
    import yaml

    from ftkit.engines import tiny as tiny_engine

    spec = {**yaml.safe_load(RECIPE.read_text())["model"]["tiny"], "max_position_embeddings": 256, "seed": 0}
    step = recipe_train_step()
    runs = {
        "qlora bf16 adamw_8bit (the QLoRA quickstart)": step,
        "lora bf16 adamw_8bit (only the method changed)": {**step, "method": "lora"},
        "lora fp32 adamw_torch (as the LoRA quickstart)": {**step, "method": "lora", "precision": "fp32",
                                                          "optimizer": "adamw_torch", "gradient_checkpointing": False},
    }
    work = Path(tempfile.mkdtemp(prefix="ftkit-qlora-bench-"))
    try:
        data = dataset_cfg(ROOT / "recipes" / "data" / "quickstart-train.jsonl", "alpaca")
        base = work / "base"
        tiny_engine.generate(spec, data, base)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
        for n in range(reps):  # alternate, so no configuration always runs first
            for i, (name, s) in enumerate(runs.items() if n % 2 == 0 else reversed(list(runs.items()))):
                env = {"OMP_NUM_THREADS": str(threads)} if threads else None
                results[name].append(run_child(work, f"r{n}-{i}", base, data, s, env=env))
                print(name, json.dumps(results[name][-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": spec, "step": step, "reps": reps, "threads": threads, "runs": results,
            "median": {k: {m: round(statistics.median(r[m] for r in v), 4) for m in v[0] if v[0][m] is not None}
                       for k, v in results.items()}}


SMALL = dict(hidden_size=1024, layers=8, heads=16, intermediate_size=2816, vocab_size=16000,
             max_position_embeddings=512, initializer_range=0.02, seed=0)


def text_rows(path: Path, n: int = 64, words: int = 400) -> None:
    """Rows long enough to fill seq_len (the estimate counts seq_len tokens per row)."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(20000)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n"
                            for _ in range(n)))


def arch_of(base: Path) -> Any:
    """plan.build.arch_for's figures from the generated model's config.json (as `ftkit plan`
    computes them for a local model)."""
    from types import SimpleNamespace

    from ftkit.plan.build import arch_for

    return arch_for(SimpleNamespace(model=SimpleNamespace(arch=None, tiny=None, id=None)),  # type: ignore[arg-type]
                    json.loads((base / "config.json").read_text()))


def estimate_for(step: dict[str, Any], arch: Any) -> dict[str, float]:
    from ftkit.plan import memory
    from ftkit.recipe.models import TrainStep

    parts = memory.estimate(TrainStep.model_validate({"type": "train", "gpus": [], **step}), arch, n_gpus=0)
    return {k: round(v / MIB, 1) for k, v in parts.items()}


def merge_peaks(base: Path, adapter: Path, work: Path, nf4: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The merge's peak RSS over its own floor: the same command with --dry-run (the same
    imports, bitsandbytes' included for --nf4-dequantized-base, and the headers read), against
    the ram_bytes that --dry-run reports (less bitsandbytes' import, which the floor holds)."""
    from ftkit.engines.merge import BNB_IMPORT_BYTES

    exe = str(Path(sys.executable).parent / "ftkit")
    out = work / ("merged-nf4" if nf4 else "merged")
    shutil.rmtree(out, ignore_errors=True)
    argv = [exe, "merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out)]
    if nf4:
        argv += ["--nf4-dequantized-base", "--nf4-dtype", "bf16"]
    dry = json.loads(subprocess.run(argv + ["--dry-run"], capture_output=True, text=True, check=True).stdout)
    floor = peak_rss(argv + ["--dry-run"], env=env)
    run = peak_rss(argv, env={"HF_HUB_OFFLINE": "1", **(env or {})})
    own = dry["ram_bytes"] - (BNB_IMPORT_BYTES if nf4 else 0)
    return {"needs_ram_mib": round(dry["ram_bytes"] / MIB, 1), "needs_own_buffers_mib": round(own / MIB, 1),
            "peak_rss_mib": run["peak_rss_mib"], "dry_run_floor_mib": floor["peak_rss_mib"],
            "over_floor_mib": round(run["peak_rss_mib"] - floor["peak_rss_mib"], 1), "wall_s": run["wall_s"]}


def estimate() -> dict[str, Any]:
    from ftkit.engines import tiny as tiny_engine

    work = Path(tempfile.mkdtemp(prefix="ftkit-qlora-estimate-"))
    try:
        rows = work / "text.jsonl"
        text_rows(rows)
        data = dataset_cfg(rows, "text")
        base = work / "base"
        tiny_engine.generate(SMALL, data, base)
        arch = arch_of(base)
        common = dict(max_steps=6, learning_rate=1e-4, batch_size=4, seq_len=256, gradient_checkpointing=True,
                      seed=0, logging_steps=1, precision="bf16", optimizer="adamw_torch",
                      lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                      checkpoint={"every_steps": 6, "keep_last": 1, "keep_best": False})
        result: dict[str, Any] = {"model": SMALL, "arch": vars(arch) | {"params_b": arch.params_b}, "step": common,
                                  "runs": {}}
        # glibc raises its mmap threshold (up to 32 MiB) after freeing a large block, so freed
        # tensors below it stay in the heap: the second run of each method pins the threshold
        # to show how much of the peak that is.
        for malloc in ("default", "mmap_threshold_128k"):
            env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if malloc != "default" else None
            for method in ("lora", "qlora"):
                step = {**common, "method": method}
                measured = run_child(work, method, base, data, step, env=env)
                parts = estimate_for(step, arch)
                applies = {k: v for k, v in parts.items() if k != "cuda_context_and_slack"}
                result["runs"][f"{method} {malloc}"] = {
                    "measured": measured, "estimate_mib": parts,
                    "estimate_on_cpu_mib": round(sum(applies.values()), 1),
                    "train_over_floor_mib": round(measured["train_peak_mib"] - measured["floor_mib"], 1),
                    "load_over_floor_mib": round(measured["load_peak_mib"] - measured["floor_mib"], 1),
                }
                print(method, malloc, json.dumps(result["runs"][f"{method} {malloc}"]), flush=True)
        adapter_lora, adapter_qlora = work / "lora" / "adapter", work / "qlora" / "adapter"
        pinned = {"MALLOC_MMAP_THRESHOLD_": "131072"}
        result["merge"] = {
            "lora default": merge_peaks(base, adapter_lora, work, nf4=False),
            "qlora nf4-dequantized-base default": merge_peaks(base, adapter_qlora, work, nf4=True),
            "lora mmap_threshold_128k": merge_peaks(base, adapter_lora, work, nf4=False, env=pinned),
            "qlora nf4-dequantized-base mmap_threshold_128k": merge_peaks(base, adapter_qlora, work, nf4=True, env=pinned),
        }
        print(json.dumps(result["merge"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["tiny", "estimate"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="tiny: OMP_NUM_THREADS for each run (1: CPU time per step barely moves with the machine's load)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "toolkit"))
    result = tiny(args.reps, args.threads) if args.what == "tiny" else estimate()
    print(json.dumps(result.get("median", result.get("runs")), indent=2))
    name = f"qlora_cpu_{args.what}" + (f"_{args.threads}thread" if args.what == "tiny" and args.threads else "")
    print(f"saved to {save(name, result)}")


if __name__ == "__main__":
    main()
