"""Training overhead: ftkit's training engine against a plain trl SFTTrainer script with the
same tiny model, data, steps and batch (target: tokens/s ratio >= 0.95), and packing on
against off. CPU here; on a GPU machine:

    python bench/train_overhead.py --device cuda --size 1b --peak-tflops <bf16 dense TFLOP/s>
    python bench/train_overhead.py --device cuda --size 1b --method qlora

gives tokens/s, peak GPU memory and MFU for LoRA (or QLoRA with bitsandbytes) on a ~1B random
Llama in bf16, the device's name and NVML's read-only view of it (inventory, power limit, one
telemetry sample), and ftkit's memory estimate for the same run beside the measured peak.

    python bench/train_overhead.py [--steps 60] [--reps 3] [--device cpu|cuda] [--size small|1b] [--method lora|qlora]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _util import ROOT, run_measured, save

DATA = ROOT / "recipes" / "data" / "quickstart-train.jsonl"
SIZES = {
    "small": dict(hidden_size=256, layers=4, heads=4, intermediate_size=688, vocab_size=400, max_position_embeddings=256),
    "1b": dict(hidden_size=2048, layers=22, heads=32, intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
}
# The plain script: what someone would write from the guides, minus ftkit.
PLAIN = r'''
import json, sys, time, torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
cfg = json.load(open(sys.argv[1]))
rows = [json.loads(l) for l in open(cfg["data"])]
def prompt(r):
    return f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n"
ds = Dataset.from_list([{"prompt": prompt(r), "completion": r["output"]} for r in rows])
tok = AutoTokenizer.from_pretrained(cfg["model"])
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg["precision"]]
kw = {}
if cfg["method"] == "qlora":  # what the guides' scripts do: 4-bit NF4, double quant, bf16 compute
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    kw["device_map"] = {"": 0}
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype, **kw)
args = SFTConfig(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                 learning_rate=3e-3, max_length=cfg["seq_len"], packing=cfg["packing"], logging_steps=cfg["steps"],
                 save_strategy="no", report_to=[], seed=0, use_cpu=cfg["device"] == "cpu", bf16=cfg["precision"] == "bf16",
                 gradient_checkpointing=False, disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
out = trainer.train()
tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print("RESULT " + json.dumps({"train_runtime": out.metrics["train_runtime"], "tokens": tokens, "peak_gpu_mib": peak}))
'''
FTKIT = r'''
import json, sys, torch
from ftkit.engines import train
cfg = json.load(open(sys.argv[1]))
summary = train.run(cfg)
rows = [json.loads(l) for l in open(cfg["metrics_path"])]
final = [r for r in rows if "train_runtime" in r][-1]
tokens = [r["num_tokens"] for r in rows if "num_tokens" in r][-1]
print("RESULT " + json.dumps({"train_runtime": final["train_runtime"], "tokens": tokens,
                              "peak_gpu_mib": summary.get("peak_gpu_mem_mib")}))
'''


def make_model(size: str, out: Path) -> int:
    from ftkit.engines import tiny

    ds = {"path": str(DATA), "format": "alpaca", "template": "alpaca", "system_prompt": None, "eval": None,
          "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
                     "role": "role", "content": "content", "text": "text"}}
    spec = {**SIZES[size], "initializer_range": 0.02, "seed": 0}
    return tiny.generate(spec, ds, out)


def run_one(who: str, model: Path, work: Path, args: argparse.Namespace, packing: bool, rep: int) -> dict:
    out = work / f"{who}-{'pack' if packing else 'nopack'}-{rep}"
    cfg_path = out.with_suffix(".json")
    if who == "plain":
        cfg = {"model": str(model), "data": str(DATA), "out": str(out), "steps": args.steps, "batch": args.batch,
               "seq_len": args.seq_len, "packing": packing, "precision": args.precision, "device": args.device,
               "method": args.method}
        script = PLAIN
    else:
        step = ftkit_step(args, packing)
        cfg = {"model": {"source": "path", "path": str(model), "dtype": args.precision},
               "dataset": {"path": str(DATA), "format": "alpaca", "template": "alpaca", "system_prompt": None, "eval": None,
                           "fields": {"instruction": "instruction", "input": "input", "output": "output",
                                      "messages": "messages", "role": "role", "content": "content", "text": "text"}},
               "train": step.model_dump(mode="json"), "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl"),
               "deepspeed_config": None}
        script = FTKIT
    cfg_path.write_text(json.dumps(cfg))
    r = run_measured([sys.executable, "-c", script, str(cfg_path)], env={"CUDA_VISIBLE_DEVICES": "0" if args.device == "cuda" else ""})
    line = next((ln for ln in r["output"].splitlines() if ln.startswith("RESULT ")), None)
    if r["rc"] != 0 or line is None:
        raise SystemExit(f"{who} failed:\n{r['output'][-3000:]}")
    res = json.loads(line[len("RESULT "):])
    res["tokens_per_s"] = res["tokens"] / res["train_runtime"]
    return res


def ftkit_step(args: argparse.Namespace, packing: bool) -> Any:
    from ftkit.recipe.models import TrainStep

    return TrainStep.model_validate({
        "type": "train", "name": "train", "method": args.method, "max_steps": args.steps, "batch_size": args.batch,
        "seq_len": args.seq_len, "packing": packing, "precision": args.precision, "gradient_checkpointing": False,
        "learning_rate": 0.003, "lr_scheduler": "linear", "warmup_ratio": 0.0, "seed": 0,
        "gpus": [0] if args.device == "cuda" else [], "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "logging_steps": args.steps, "checkpoint": {"every_steps": 10 ** 6, "keep_last": 1},
    })


def estimate_for(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """ftkit's component estimate for the same run (what `ftkit plan` would print)."""
    from types import SimpleNamespace

    from ftkit.plan import memory
    from ftkit.plan.build import arch_for

    no_recipe_figures = SimpleNamespace(model=SimpleNamespace(arch=None, tiny=None, path=None, id=None))
    arch = arch_for(no_recipe_figures, json.loads((model_dir / "config.json").read_text()))  # type: ignore[arg-type]
    parts = memory.estimate(ftkit_step(args, False), arch, n_gpus=1)
    gib = {k: round(v / memory.GIB, 3) for k, v in parts.items()}
    # max_memory_allocated counts tensors only: compare without the CUDA context and slack
    tensors = sum(v for k, v in parts.items() if k != "cuda_context_and_slack") / memory.GIB
    return {"components_gib": gib, "total_gib": round(sum(parts.values()) / memory.GIB, 3),
            "tensors_gib": round(tensors, 3)}


def device_facts() -> dict[str, Any]:
    """The GPU's name from torch and NVML's read-only calls (no limit is changed)."""
    import torch

    from ftkit.gpu.nvml import open_nvml

    out: dict[str, Any] = {"torch_device": torch.cuda.get_device_name(0), "torch_cuda": torch.version.cuda}
    nv = open_nvml()
    if nv is None:
        out["nvml"] = "not available"
        return out
    try:
        out["nvml"] = {
            "simulated": nv.simulated,
            "driver": nv.driver_version(),
            "cuda_driver": nv.cuda_driver_version(),
            "inventory": [g.as_dict() for g in nv.inventory()],
            "power_limit_w": nv.power_limit_w(0),
            "enforced_power_limit_w": nv.enforced_power_limit_w(0),
            "sample": nv.sample(0),
        }
    finally:
        nv.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--method", choices=["lora", "qlora"], default="lora", help="qlora: 4-bit bitsandbytes (CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU on a GPU (bf16 dense)")
    args = ap.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.method == "qlora" and (args.device != "cuda" or args.precision != "bf16"):
        raise SystemExit("--method qlora needs --device cuda (bitsandbytes' 4-bit kernels) and bf16")
    with tempfile.TemporaryDirectory(prefix="ftkit-train-bench-") as tmp:
        work = Path(tmp)
        params = make_model(args.size, work / "model")
        estimate = estimate_for(args, work / "model")
        table: dict[str, list[dict]] = {}
        for rep in range(args.reps):
            order = [("plain", False), ("ftkit", False), ("ftkit", True)]
            if rep % 2:
                order.reverse()
            for who, packing in order:
                key = f"{who}{'+packing' if packing else ''}"
                table.setdefault(key, []).append(run_one(who, work / "model", work, args, packing, rep))
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in table.items()}
    result = {
        "device": args.device, "method": args.method, "size": args.size, "params": params, "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len, "precision": args.precision, "reps": args.reps,
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "runs": table,
        "ftkit_vs_plain_tokens_per_s": round(med["ftkit"] / med["plain"], 3),
        "packing_vs_no_packing_tokens_per_s": round(med["ftkit+packing"] / med["ftkit"], 3),
        "target_ratio_at_least": 0.95,
    }
    if args.device == "cuda":
        result["device_facts"] = device_facts()
        peaks = {k: statistics.median(r["peak_gpu_mib"] for r in v) / 1024 for k, v in table.items()
                 if all(r.get("peak_gpu_mib") for r in v)}
        result["peak_gpu_gib_median"] = {k: round(v, 3) for k, v in peaks.items()}
        if "ftkit" in peaks:
            result["estimate_vs_measured"] = {**estimate, "measured_peak_gib": round(peaks["ftkit"], 3),
                                              "tensors_estimate_over_measured": round(estimate["tensors_gib"] / peaks["ftkit"], 3)}
    else:
        result["estimate"] = estimate
    if args.device == "cuda" and args.peak_tflops:
        # LoRA: forward + activation gradients ~ 4 N FLOPs per token (frozen weights need no
        # weight gradients); the 6 N convention is reported beside it.
        for key in ("plain", "ftkit"):
            result[f"mfu_{key}"] = {"4N": round(4 * params * med[key] / (args.peak_tflops * 1e12), 4),
                                    "6N": round(6 * params * med[key] / (args.peak_tflops * 1e12), 4)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"saved to {save(f'train_overhead_{args.device}_{args.size}' + ('_qlora' if args.method == 'qlora' else ''), result)}")


if __name__ == "__main__":
    main()
