"""Merge: peak RSS and wall time of `ftkit merge` against peft's merge_and_unload, on a
synthetic 1.1B-parameter Llama (TinyLlama's shape, random bf16 weights) with a rank-16
all-linear LoRA adapter, beside a plain copy of the same bytes (the floor: read, write,
fsync), all in the same run, alternating, median of --runs (3). Goals: at most 25% of peft's
peak memory, at most 0.3 of peft's wall time and at most 2x the copy's. Also checks that the
two merged outputs agree within bf16 tolerance.

    python bench/merge_bench.py [--workdir DIR] [--keep] [--runs N]
    python bench/merge_bench.py --nf4 [--nf4-full]

--nf4 measures the QLoRA merge path (`--nf4-dequantized-base`), which rounds each base weight
through NF4 on the CPU: first one 32 MiB weight, the former whole-tensor rounding against the
block-wise one (peak RSS growth over the weight itself, and the RAM `needs()` reports for it);
with --nf4-full also the whole synthetic model through `ftkit merge --nf4-dequantized-base`,
its peak RSS against the `ram_bytes` of `ftkit merge --dry-run`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _util import peak_rss, save

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)
PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
merged = model.merge_and_unload()
merged.save_pretrained(out, max_shard_size="5GB")
"""
COPY_SCRIPT = """
import os, shutil, sys
src, out = sys.argv[1:3]
os.mkdir(out)
dst = os.path.join(out, "model.safetensors")
shutil.copyfile(src, dst)
fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def make_model(root: Path) -> tuple[Path, Path, int]:
    """Write base weights and an adapter tensor by tensor (never the whole model in memory)."""
    import torch
    from transformers import LlamaConfig

    from ftkit.engines.safetensors_io import StreamWriter

    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(base)
    h, i, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["hidden_size"] // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [SHAPE["vocab_size"], h])]
    linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    for layer in range(SHAPE["num_hidden_layers"]):
        for name, (o, n) in linear.items():
            shapes.append((f"model.layers.{layer}.{name}.weight", [o, n]))
        shapes += [(f"model.layers.{layer}.input_layernorm.weight", [h]),
                   (f"model.layers.{layer}.post_attention_layernorm.weight", [h])]
    shapes += [("model.norm.weight", [h]), ("lm_head.weight", [SHAPE["vocab_size"], h])]
    g = torch.Generator().manual_seed(0)
    writer = StreamWriter(base / "model.safetensors", [(n, "BF16", s) for n, s in shapes])
    params = 0
    for name, shape in shapes:
        t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.02
        writer.write(name, t.to(torch.bfloat16))
        params += t.numel()
    writer.close()
    r = 16
    entries = []
    for layer in range(SHAPE["num_hidden_layers"]):
        for name, (o, n) in linear.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            entries += [(f"{key}.lora_A.weight", [r, n]), (f"{key}.lora_B.weight", [o, r])]
    aw = StreamWriter(adapter / "adapter_model.safetensors", [(n, "F32", s) for n, s in entries])
    for name, shape in entries:
        aw.write(name, torch.randn(shape, generator=g) * 0.01)
    aw.close()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": [n.split(".")[-1] for n in linear], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(base),
        "inference_mode": True, "init_lora_weights": True,
    }))
    return base, adapter, params


def compare(a: Path, b: Path) -> float:
    """Largest relative difference between the two merged models, tensor by tensor."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                out.update({k: f for k in fh.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    worst = 0.0
    for name in ta:
        with safe_open(ta[name], "pt") as fa, safe_open(tb[name], "pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        worst = max(worst, float((x - y).abs().max() / (x.abs().max() + 1e-12)))
        del x, y
        _ = torch
    return worst


NF4_MICRO = """
import json, resource, sys, time, torch
from pathlib import Path
from ftkit.engines import merge as engine
from ftkit.engines.safetensors_io import TensorInfo
mode, dtype = sys.argv[1], getattr(torch, sys.argv[2])
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.manual_seed(0)
w = (torch.randn(4096, 2048) * 0.02).to(dtype)
engine._nf4_fp32(torch.randn(1 << 14)); torch.isfinite(w[:8]).all()  # warm the kernels
code = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
info = TensorInfo("model.layers.0.mlp.up_proj.weight", code, list(w.shape), Path("w"), 0, w.numel() * w.element_size())
plan = engine.MergePlan(Path("b"), Path("a"), [info], nf4_dequantized_base=True)
before, t0 = peak(), time.perf_counter()
if mode == "whole":  # the former implementation: all 16 code distances of every element at once
    flat = w.float().reshape(-1); blocks = flat.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    cb = torch.tensor(engine.NF4)
    idx = (blocks / absmax).unsqueeze(-1).sub(cb).abs().argmin(dim=-1)
    out = (cb[idx] * absmax).reshape(w.shape).to(w.dtype).to(torch.bfloat16)
else:
    out = engine.merged_tensor(plan, info, lambda i: w)
print(json.dumps({"mode": mode, "dtype": sys.argv[2], "weight_mib": w.numel() * w.element_size() / 2**20,
                  "growth_mib": round((peak() - before) / 2**20, 1), "seconds": round(time.perf_counter() - t0, 2),
                  "needs_mib": round(engine.tensor_ram(plan, info) / 2**20, 1)}))
"""


def nf4_micro() -> list[dict]:
    import subprocess

    rows = []
    for dtype in ("bfloat16", "float32"):
        for mode in ("whole", "blockwise"):
            proc = subprocess.run([sys.executable, "-c", NF4_MICRO, mode, dtype], capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def nf4_full(work: Path) -> dict:
    base, adapter, params = make_model(work)
    exe = str(Path(sys.executable).parent / "ftkit")
    out = work / "out-nf4"
    argv = [exe, "merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out), "--nf4-dequantized-base"]
    import subprocess

    dry = json.loads(subprocess.run(argv + ["--dry-run"], capture_output=True, text=True, check=True).stdout)
    r = peak_rss(argv, env={"HF_HUB_OFFLINE": "1"})
    r.pop("output", None)
    return {"params": params, "run": r, "needs_ram_mib": round(dry["ram_bytes"] / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nf4", action="store_true", help="measure the NF4 (QLoRA) merge path instead")
    ap.add_argument("--nf4-full", action="store_true", help="with --nf4: also merge the whole synthetic model")
    args = ap.parse_args()
    if args.nf4:
        result: dict = {"micro_32mib_weight": nf4_micro()}
        print(json.dumps(result, indent=2), flush=True)
        if args.nf4_full:
            work = args.workdir or Path(tempfile.mkdtemp(prefix="ftkit-nf4-bench-"))
            work.mkdir(parents=True, exist_ok=True)
            try:
                result["full_model"] = nf4_full(work)
            finally:
                if not args.keep and args.workdir is None:
                    shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result, indent=2))
        print(f"saved to {save('merge_nf4', result)}")
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ftkit-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter, params = make_model(work)
        exe = str(Path(sys.executable).parent / "ftkit")
        runs: dict[str, list[dict]] = {"ftkit": [], "peft": [], "copy": []}
        order = ["peft", "ftkit", "copy"]
        for n in range(args.runs):  # rotate, so none always runs on a warm page cache
            for who in order[n % 3:] + order[:n % 3]:
                out = work / f"out-{who}-{n}"
                argv = {"ftkit": [exe, "merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out),
                                  "--dtype", "bf16"],
                        "peft": [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
                        "copy": [sys.executable, "-c", COPY_SCRIPT, str(base / "model.safetensors"), str(out)]}[who]
                r = peak_rss(argv, env={"HF_HUB_OFFLINE": "1"})
                r.pop("output", None)
                runs[who].append(r)
                print(f"run {n} {who}: {r['wall_s']} s, {r['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
                if n > 0:
                    shutil.rmtree(out, ignore_errors=True)  # run 0's outputs are compared below
        diff = compare(work / "out-ftkit-0", work / "out-peft-0")
        median = {k: {"peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in v),
                      "wall_s": round(statistics.median(r["wall_s"] for r in v), 3)} for k, v in runs.items()}
        model_gib = params * 2 / 2**30
        result = {
            "model": {"params": params, "bf16_gib": round(model_gib, 2), "shape": SHAPE, "lora": "r=16, all linear"},
            "runs": runs, "median": median,
            "memory_ratio": round(median["ftkit"]["peak_rss_mib"] / median["peft"]["peak_rss_mib"], 3),
            "time_ratio": round(median["ftkit"]["wall_s"] / median["peft"]["wall_s"], 3),
            "copy_ratio": round(median["ftkit"]["wall_s"] / median["copy"]["wall_s"], 3),
            "max_relative_difference": diff,
            "goals": {"memory_ratio_at_most": 0.25, "time_ratio_at_most": 0.3, "copy_ratio_at_most": 2.0},
        }
        print(json.dumps(result, indent=2))
        print(f"saved to {save('merge', result)}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
