"""Training against the peers (issue #23): ftkit's train engine, Axolotl and LLaMA-Factory
train the same tiny random Llama on the same rows with the same LoRA (r 16, alpha 32, all
linear layers, no dropout), sequence length, batch, learning rate, schedule, seed and steps;
a plain trl script rides along as the floor. Each tool runs in its own virtual environment
(`--envs DIR`, default /work/bench-envs; `--setup` creates the missing ones with the commands
`--dry-run` prints), in a child whose peak RSS comes from wait4(), in an order that alternates
between repetitions. Tokens/s counts real tokens (padding excluded) over the Trainer's own
train_runtime; the final loss is the mean of the last 10 per-step training losses.

    python bench/peers.py [--steps 100] [--reps 3] [--tools ftkit,plain,axolotl,llamafactory]
    python bench/peers.py --padding-free-only        # the padding-free table only
    python bench/peers.py --device cuda --size 1b    # the same table on a GPU (bf16)
    python bench/peers.py --dry-run                  # the env commands and the tools' configs

The padding-free table: the same engine and the plain trl script on variable-length chat
rows (1 to 3 turns), padded batches against trl's `padding_free=True` (position IDs, no
padding) and against ftkit's `packing: true` (trl's BFD packing, padding-free too).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _util import peak_rss, save
from train_overhead import DATA, SIZES, make_model

VERSIONS = {"axolotl": "0.19.0", "llamafactory": "0.9.5"}
TORCH = "2.13.0"
LR = 3e-3
TORCHAUDIO_STUB = ('"""Stub (ftkit bench/peers.py): PyPI torchaudio does not load against the local CPU torch; '
                   'LLaMA-Factory imports it in data/mm_plugin.py, text SFT never calls it."""',
                   "def __getattr__(name):", '    raise AttributeError(f"torchaudio stub: no {name}")')
STUB = " ".join(shlex.quote(line) for line in TORCHAUDIO_STUB)
TAIL = 10  # final loss: the mean of the last TAIL per-step losses


def env_commands(envs: Path) -> dict[str, list[str]]:
    """The commands that build each peer's environment (torch first: the local CPU wheel; then
    the tool with torch held where it is). PyPI's torchvision/torchaudio builds do not import
    against this torch, and LLaMA-Factory's text SFT does not need them: they are removed."""
    pin = envs / "torch-pin.txt"
    out: dict[str, list[str]] = {}
    for tool, version in VERSIONS.items():
        env = envs / tool
        cmds = [f"echo torch=={TORCH} > {pin}", f"python3.11 -m venv {env}", f"{env}/bin/pip install torch=={TORCH}",
                f"{env}/bin/pip install --constraint {pin} {tool}=={version}"]
        if tool == "llamafactory":
            # it imports torchaudio at the top of llamafactory/data/mm_plugin.py (audio only): a stub
            sp = f"{env}/lib/python3.11/site-packages/torchaudio"
            cmds += [f"{env}/bin/pip uninstall -y torchvision torchaudio torchcodec", f"mkdir -p {sp}",
                     f"printf '%s\\n' {STUB} > {sp}/__init__.py"]
        out[tool] = cmds
    return out


def setup_envs(envs: Path, tools: list[str]) -> None:
    envs.mkdir(parents=True, exist_ok=True)
    for tool, cmds in env_commands(envs).items():
        if tool not in tools or (envs / tool / "bin" / "python").exists():
            continue
        for cmd in cmds:
            print(f"$ {cmd}", flush=True)
            subprocess.run(cmd, shell=True, check=True)


def tool_version(envs: Path, tool: str) -> str:
    py = sys.executable if tool in ("ftkit", "plain") else str(envs / tool / "bin" / "python")
    mod = {"ftkit": "trl", "plain": "trl"}.get(tool, tool)
    code = (f"import importlib.metadata as m; print(m.version('{'axolotl' if tool == 'axolotl' else mod}'), "
            "m.version('transformers'), m.version('peft'), m.version('torch'))")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return f"not importable: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    v, tf, peft, torch = r.stdout.split()
    name = "trl" if tool in ("ftkit", "plain") else tool
    return f"{name} {v}, transformers {tf}, peft {peft}, torch {torch}"


# ---- data -----------------------------------------------------------------------------------------

def alpaca_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def chat_rows(n: int = 600, seed: int = 0) -> list[dict[str, Any]]:
    """Variable-length conversations: 1 to 3 user/assistant turns drawn from the quickstart rows
    (33 to 117 tokens with chatml and the tiny tokenizer), so padded batches carry a lot of padding."""
    rng = random.Random(seed)
    base = alpaca_rows()
    out = []
    for _ in range(n):
        msgs = []
        for r in rng.sample(base, rng.randint(1, 3)):
            msgs += [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                     {"role": "assistant", "content": r["output"]}]
        out.append({"messages": msgs})
    return out


def ftkit_dataset(path: Path, fmt: str) -> dict[str, Any]:
    return {"path": str(path), "format": fmt, "template": "alpaca" if fmt == "alpaca" else "chatml",
            "system_prompt": None, "eval": None,
            "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
                       "role": "role", "content": "content", "text": "text"}}


def prompt_completion(rows_path: Path, fmt: str, model: Path, out: Path) -> Path:
    """The rows as ftkit renders them (prompt, completion): what the plain script trains on, and
    (alpaca) the pre-rendered prompts the peers get, so every tool sees the same text."""
    from transformers import AutoTokenizer

    from ftkit.engines import data, templates

    cfg = ftkit_dataset(rows_path, fmt)
    tok = AutoTokenizer.from_pretrained(model)
    template = templates.choose(cfg["template"], fmt, tok)
    if template != "tokenizer":
        templates.apply_named(tok, template)
    rows = data.load_splits(cfg).train
    exs = [data.to_example(r, cfg, template, tok) for r in rows]
    out.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in exs))
    return out


# ---- the tools' configs ---------------------------------------------------------------------------

def axolotl_config(a: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    """The prompt is pre-rendered (ftkit's alpaca text) into `instruction`; a user-defined format
    of just `{instruction}` keeps Axolotl from adding its own preamble. Loss on the response only."""
    cuda = a.device == "cuda"
    return {
        "base_model": str(model), "tokenizer_type": "AutoTokenizer", "trust_remote_code": False,
        "datasets": [{"path": str(data), "ds_type": "json", "type": {
            "field_instruction": "instruction", "field_input": "input", "field_output": "output",
            "format": "{instruction}", "no_input_format": "{instruction}"}}],
        "dataset_prepared_path": str(out / "prepared"), "val_set_size": 0.0, "output_dir": str(out),
        "train_on_inputs": False, "sequence_len": a.seq_len, "sample_packing": False, "pad_to_sequence_len": False,
        "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True,
        "micro_batch_size": a.batch, "gradient_accumulation_steps": 1, "max_steps": a.steps, "num_epochs": 1000,
        "optimizer": "adamw_torch", "lr_scheduler": "linear", "learning_rate": LR,
        "warmup_steps": 0, "weight_decay": 0.0, "seed": 0,
        "bf16": a.precision == "bf16", "fp16": False, "tf32": False, "flash_attention": False, "sdp_attention": True,
        "gradient_checkpointing": False, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        "include_tokens_per_second": True, "dataloader_num_workers": 0, "dataloader_pin_memory": False,
        # Axolotl turns its Triton LoRA kernels on by default; on CPU they fail (kernels/swiglu.py
        # allocates on "cuda"): off on CPU, Axolotl's default on a GPU
        **({} if cuda else {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}),
        "special_tokens": {"pad_token": "<pad>"}, "use_wandb": False, "save_safetensors": True,
    }


def llamafactory_config(a: argparse.Namespace, model: Path, data_dir: Path, out: Path) -> dict[str, Any]:
    """Template `empty` with the prompt pre-rendered in `instruction`: the same text as ftkit;
    `empty` adds no EOS, so the response text ends with the EOS token (trl and Axolotl append
    it). Loss on the response only."""
    return {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all",
        "dataset": "peers", "dataset_dir": str(data_dir), "template": "empty", "cutoff_len": a.seq_len,
        "train_on_prompt": False, "overwrite_cache": True, "preprocessing_num_workers": None,
        "output_dir": str(out), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "per_device_train_batch_size": a.batch,
        "gradient_accumulation_steps": 1, "learning_rate": LR, "max_steps": a.steps, "lr_scheduler_type": "linear",
        "warmup_steps": 0, "weight_decay": 0.0, "seed": 0, "data_seed": 0, "bf16": a.precision == "bf16",
        "fp16": False, "use_cpu": a.device == "cpu", "flash_attn": "sdpa", "disable_gradient_checkpointing": True,
        "include_num_input_tokens_seen": "non_padding", "dataloader_num_workers": 0, "disable_tqdm": True,
        "ddp_timeout": 180000000, "packing": False, "neat_packing": False,
    }


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    # JSON is YAML: no PyYAML needed in ftkit's venv
    path.write_text(json.dumps(cfg, indent=1))
    return path


def peer_model(model: Path, out: Path) -> Path:
    """The same weights and tokenizer.json; the tokenizer_config names PreTrainedTokenizerFast
    (transformers 5 writes `TokenizersBackend`, which older transformers cannot load)."""
    if out.exists():
        return out
    shutil.copytree(model, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return out


# ---- runners --------------------------------------------------------------------------------------

FTKIT = r'''
import json, sys
from ftkit.engines import train
cfg = json.load(open(sys.argv[1]))
if cfg.pop("padding_free", False):  # bench-only: trl's padding_free on the engine's own SFTConfig
    make = train.sft_config
    def sft_config(*a, **k):
        c = make(*a, **k)
        c.padding_free, c.max_length = True, None  # rows are shorter than seq_len: nothing to truncate
        return c
    train.sft_config = sft_config
summary = train.run(cfg)
rows = [json.loads(l) for l in open(cfg["metrics_path"])]
final = [r for r in rows if "train_runtime" in r][-1]
print("RESULT " + json.dumps({"train_runtime": final["train_runtime"],
                              "tokens": [r["num_tokens"] for r in rows if "num_tokens" in r][-1],
                              "losses": [r["loss"] for r in rows if "loss" in r], "train_loss": summary["train_loss"],
                              "peak_gpu_mib": summary.get("peak_gpu_mem_mib")}))
'''
PLAIN = r'''
import json, sys, torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
cfg = json.load(open(sys.argv[1]))
ds = Dataset.from_list([json.loads(l) for l in open(cfg["data"])])
tok = AutoTokenizer.from_pretrained(cfg["model"])
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg["precision"]]
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype)
args = SFTConfig(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                 learning_rate=cfg["lr"], max_length=None if cfg["padding_free"] else cfg["seq_len"],
                 padding_free=cfg["padding_free"], packing=cfg["packing"], logging_steps=1, save_strategy="no",
                 report_to=[], seed=0, data_seed=0, use_cpu=cfg["device"] == "cpu", bf16=cfg["precision"] == "bf16",
                 gradient_checkpointing=False, disable_tqdm=True, warmup_steps=0, lr_scheduler_type="linear")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
out = trainer.train()
h = trainer.state.log_history
print("RESULT " + json.dumps({"train_runtime": out.metrics["train_runtime"],
                              "tokens": [x["num_tokens"] for x in h if "num_tokens" in x][-1],
                              "losses": [x["loss"] for x in h if "loss" in x], "train_loss": out.training_loss,
                              "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))
'''


def ftkit_train(a: argparse.Namespace, packing: bool) -> dict[str, Any]:
    from ftkit.recipe.models import TrainStep

    return TrainStep.model_validate({
        "type": "train", "name": "train", "method": "lora", "max_steps": a.steps, "batch_size": a.batch,
        "seq_len": a.seq_len, "packing": packing, "precision": a.precision, "gradient_checkpointing": False,
        "learning_rate": LR, "lr_scheduler": "linear", "warmup_ratio": 0.0, "seed": 0,
        "gpus": [0] if a.device == "cuda" else [], "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "logging_steps": 1, "checkpoint": {"every_steps": 10 ** 6, "keep_last": 1},
    }).model_dump(mode="json")


def parse_logs(text: str) -> list[dict[str, float]]:
    """The Trainer's printed log dicts ({'loss': ..., ...}; transformers 5 prints the values as
    strings), as floats."""
    out = []
    for m in re.finditer(r"\{'[^{}]*\}", text):
        try:
            d = ast.literal_eval(m.group(0))
        except (ValueError, SyntaxError):
            continue
        row = {}
        for k, v in d.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                pass
        if row:
            out.append(row)
    return out


def count_tokens(path: Path, key: str) -> list[int]:
    """Real (unpadded) lengths of a tool's own tokenized rows (an `input_ids` column)."""
    from datasets import load_from_disk

    for p in sorted(path.rglob("dataset_info.json")):
        ds = load_from_disk(str(p.parent))
        return [len(x) for x in ds[key]]
    return []


def run_tool(tool: str, a: argparse.Namespace, w: dict[str, Path], tag: str, *, padding_free: bool = False,
             packing: bool = False, chat: bool = False) -> dict[str, Any]:
    out = w["work"] / tag
    out.mkdir(parents=True, exist_ok=True)
    env = {"CUDA_VISIBLE_DEVICES": "0" if a.device == "cuda" else "", "WANDB_DISABLED": "true", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}), "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "LLAMAFACTORY_VERBOSITY": "INFO", "PYTHONUNBUFFERED": "1"}
    rows = w["chat"] if chat else DATA
    if tool == "ftkit":
        cfg = {"model": {"source": "path", "path": str(w["model"]), "dtype": a.precision},
               "dataset": ftkit_dataset(rows, "chat" if chat else "alpaca"), "train": ftkit_train(a, packing),
               "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl"), "deepspeed_config": None,
               "padding_free": padding_free}
        argv = [sys.executable, "-c", FTKIT, str(write_yaml(out / "cfg.json", cfg))]
    elif tool == "plain":
        cfg = {"model": str(w["model"]), "data": str(w["chat_pc"] if chat else w["pc"]), "out": str(out),
               "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "precision": a.precision, "device": a.device,
               "lr": LR, "padding_free": padding_free, "packing": packing}
        argv = [sys.executable, "-c", PLAIN, str(write_yaml(out / "cfg.json", cfg))]
    elif tool == "axolotl":
        cfg_path = write_yaml(out / "axolotl.yml", axolotl_config(a, w["peer_model"], w["peer_rows"], out))
        argv = [str(a.envs / "axolotl" / "bin" / "python"), "-m", "axolotl.cli.train", str(cfg_path)]
    else:
        cfg_path = write_yaml(out / "llamafactory.yaml", llamafactory_config(a, w["peer_model"], w["lf_dir"], out))
        argv = [str(a.envs / "llamafactory" / "bin" / "llamafactory-cli"), "train", str(cfg_path)]
    if a.dry_run:
        print(f"# {tag}\n{' '.join(argv[:2]) if tool in ('ftkit', 'plain') else ' '.join(argv)}")
        if tool in ("axolotl", "llamafactory"):
            print(cfg_path.read_text())
        return {}
    try:
        r = peak_rss(argv, env=env)
    except SystemExit as e:  # the tool failed: keep its last error line for the table
        text = str(e)
        errs = [ln for ln in text.splitlines() if re.search(r"(Error|Exception|error:)", ln)]
        (out / "failed.log").write_text(text)
        return {"failed": True, "error": (errs[-1] if errs else text.splitlines()[-1]).strip()[:400]}
    (out / "output.log").write_text(r["output"])
    return collect(tool, a, out, r["output"], {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]})


def collect(tool: str, a: argparse.Namespace, out: Path, output: str, res: dict[str, Any]) -> dict[str, Any]:
    """Tokens, runtime and per-step losses from one run's output (and, for Axolotl, its
    prepared dataset)."""
    line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), None)
    if line is not None:
        res.update(json.loads(line[len("RESULT "):]))
        res["tokens_source"] = "trl num_tokens (attention-mask sum)"
    else:
        logs = parse_logs(output)
        final = [x for x in logs if "train_loss" in x]
        res["losses"] = [x["loss"] for x in logs if "loss" in x]
        if not final or not res["losses"]:
            return {"failed": True, "error": "no train_loss/loss in the output", "tail": output[-2000:]}
        res["train_runtime"], res["train_loss"] = final[-1]["train_runtime"], final[-1]["train_loss"]
        if tool == "llamafactory":  # include_num_input_tokens_seen: non_padding (attention-mask sum)
            res["tokens"] = final[-1]["num_input_tokens_seen"]
            res["tokens_source"] = "Trainer num_input_tokens_seen (non_padding)"
        else:  # Axolotl's tokens/total and num_input_tokens_seen count padded slots
            lens = count_tokens(out / "prepared", "input_ids")
            if not lens:
                return {"failed": True, "error": "no tokenized dataset to count", "tail": output[-2000:]}
            res["tokens"] = statistics.mean(lens) * a.batch * len(res["losses"])
            res["tokens_source"] = "mean tokenized row length (its prepared dataset) x batch x steps"
            res["padded_tokens_reported"] = final[-1].get("num_input_tokens_seen")
    res["tokens_per_s"] = res["tokens"] / res["train_runtime"]
    res["final_loss"] = statistics.mean(res["losses"][-TAIL:])
    return res


# ---- the two tables -------------------------------------------------------------------------------

def summarize(runs: dict[str, list[dict[str, Any]]], ref: str) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, rs in runs.items():
        ok = [r for r in rs if not r.get("failed")]
        if not ok:
            table[key] = {"failed": True, "error": rs[0].get("error") if rs else None}
            continue
        tps = [r["tokens_per_s"] for r in ok]
        table[key] = {"runs": len(ok), "tokens_per_s_median": round(statistics.median(tps), 1),
                      "tokens_per_s_min": round(min(tps), 1), "tokens_per_s_max": round(max(tps), 1),
                      "peak_rss_mib_median": round(statistics.median(r["peak_rss_mib"] for r in ok), 1),
                      "wall_s_median": round(statistics.median(r["wall_s"] for r in ok), 1),
                      "final_loss_median": round(statistics.median(r["final_loss"] for r in ok), 4),
                      "tokens_per_step": round(statistics.median(r["tokens"] for r in ok) / len(ok[0]["losses"]), 1),
                      "tokens_source": ok[0].get("tokens_source")}
        if all(r.get("peak_gpu_mib") for r in ok):
            table[key]["peak_gpu_mib_median"] = round(statistics.median(r["peak_gpu_mib"] for r in ok), 1)
    if ref in table and not table[ref].get("failed"):
        for t in table.values():
            if not t.get("failed"):
                t["ftkit_over_this"] = round(table[ref]["tokens_per_s_median"] / t["tokens_per_s_median"], 3)
    return table


def mean_curve(rs: list[dict[str, Any]]) -> list[float]:
    ok = [r["losses"] for r in rs if not r.get("failed")]
    return [round(statistics.mean(c[i] for c in ok), 4) for i in range(min(map(len, ok)))] if ok else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="small (CPU default) or 1b (CUDA default)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--tools", default="ftkit,plain,axolotl,llamafactory")
    ap.add_argument("--envs", type=Path, default=Path("/work/bench-envs"))
    ap.add_argument("--setup", action="store_true", help="create the missing peer environments first")
    ap.add_argument("--dry-run", action="store_true", help="print the env commands and each tool's command/config")
    ap.add_argument("--no-padding-free", action="store_true", help="skip the padding-free table")
    ap.add_argument("--padding-free-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every tool (default: torch's)")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs' files here (default: a temp dir)")
    ap.add_argument("--out", default=None, help="results name (default peers, or peers_cuda_1b)")
    a = ap.parse_args()
    a.size = a.size or ("1b" if a.device == "cuda" else "small")
    a.precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    tools = [t for t in a.tools.split(",") if t]
    a.reps = 1 if a.dry_run else a.reps
    if a.dry_run:
        for tool, cmds in env_commands(a.envs).items():
            print(f"# {tool} environment\n" + "\n".join(cmds))
    elif a.setup:
        setup_envs(a.envs, tools)
    for tool in tools:
        if tool in VERSIONS and not a.dry_run and not (a.envs / tool / "bin" / "python").exists():
            raise SystemExit(f"{a.envs / tool}: no environment (run with --setup, or the commands --dry-run prints)")
    versions = {t: tool_version(a.envs, t) for t in tools} if not a.dry_run else {}
    with tempfile.TemporaryDirectory(prefix="ftkit-peers-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # a dry run prints the commands and configs: the small model stands in for the 1b one
        params = make_model("small" if a.dry_run else a.size, work / "model")
        w = {"work": work, "model": work / "model", "peer_model": peer_model(work / "model", work / "peer-model"),
             "chat": work / "chat.jsonl", "lf_dir": work / "lf-data"}
        w["pc"] = prompt_completion(DATA, "alpaca", w["model"], work / "pc.jsonl")
        w["chat"].write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
        w["chat_pc"] = prompt_completion(w["chat"], "chat", w["model"], work / "chat-pc.jsonl")
        pcs = [json.loads(line) for line in w["pc"].read_text().splitlines()]
        w["peer_rows"] = work / "peer-rows.jsonl"  # ftkit's rendered prompt in `instruction`
        w["peer_rows"].write_text("".join(json.dumps({"instruction": p["prompt"], "input": "", "output": p["completion"]})
                                          + "\n" for p in pcs))
        w["lf_dir"].mkdir(exist_ok=True)
        # template `empty` adds no EOS after the response (trl and Axolotl do): it goes in the text
        eos = json.loads((w["model"] / "tokenizer_config.json").read_text())["eos_token"]
        (w["lf_dir"] / "peers.jsonl").write_text("".join(json.dumps({"instruction": p["prompt"], "input": "",
                                                                     "output": p["completion"] + eos}) + "\n"
                                                         for p in pcs))
        (w["lf_dir"] / "dataset_info.json").write_text(json.dumps({"peers": {
            "file_name": "peers.jsonl", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}))
        result: dict[str, Any] = {"device": a.device, "size": a.size, "params": params, "precision": a.precision,
                                  "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "reps": a.reps,
                                  "learning_rate": LR, "versions": versions, "nproc": os.cpu_count(),
                                  "loadavg_start": os.getloadavg()}
        if not a.padding_free_only:
            runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
            for rep in range(a.reps):
                order = tools if rep % 2 == 0 else tools[::-1]
                for tool in order:
                    res = run_tool(tool, a, w, f"{tool}-{rep}")
                    print(f"rep {rep} {tool}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                              for k, v in res.items() if k != "losses"}), flush=True)
                    runs[tool].append(res)
                    if res.get("failed") and tool in VERSIONS:
                        tools = [t for t in tools if t != tool]  # the same error each time: once is enough
            result["peers"] = summarize(runs, "ftkit")
            result["peers_loss_curves"] = {t: mean_curve(rs) for t, rs in runs.items()}
            result["peers_runs"] = runs
        if not a.no_padding_free and not a.dry_run:
            variants = [("ftkit", False, False), ("ftkit+padding_free", True, False), ("ftkit+packing", False, True),
                        ("plain", False, False), ("plain+padding_free", True, False)]
            pruns: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in variants}
            for rep in range(a.reps):
                for key, pf, pk in (variants if rep % 2 == 0 else variants[::-1]):
                    res = run_tool(key.split("+")[0], a, w, f"chat-{key}-{rep}", padding_free=pf, packing=pk, chat=True)
                    print(f"rep {rep} chat {key}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                                  for k, v in res.items() if k != "losses"}), flush=True)
                    pruns[key].append(res)
            result["padding_free"] = summarize(pruns, "ftkit")
            result["padding_free_loss_curves"] = {k: mean_curve(rs) for k, rs in pruns.items()}
            result["padding_free_runs"] = pruns
        result["loadavg_end"] = os.getloadavg()
    if a.dry_run:
        return
    for key in ("peers", "padding_free"):
        if key in result:
            print(json.dumps({key: result[key]}, indent=1))
    name = a.out or ("peers" if a.device == "cpu" else f"peers_{a.device}_{a.size}")
    print(f"saved to {save(name, result)}")


if __name__ == "__main__":
    main()
