"""The training engine: LoRA, QLoRA or full fine-tuning with trl's SFTTrainer.

Launched by the plan as
    accelerate launch --config_file configs/accelerate-<step>.yaml -m ftkit.engines.train --config configs/train-<step>.json
so DDP and DeepSpeed ZeRO-2/3 come from generated configs, never hand-written ones. Writes
metrics.jsonl (one row per log event, each with `wall_time` in unix seconds to join
telemetry.csv), crash-safe checkpoints (see engines.checkpoints), the final adapter (or
model for full fine-tuning), then `adapter.complete` beside it (plan.jobs.complete_marker: the
runner may load the adapter into a running server from that moment), and train_summary.json
under the step's directory.

Run again in the same directory (what `ftkit up --resume` does), it quarantines checkpoints
whose save was cut short, continues from the newest complete one, moves the metrics rows
logged after that checkpoint to metrics.superseded.jsonl (those steps are trained again)
and ends with the same final artifacts as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from ftkit.engines import checkpoints, data, templates, tracking
from ftkit.files import follow_umask, write_json
from ftkit.plan.jobs import complete_marker
from ftkit.recipe.models import TrainStep

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# what trl's DPO and ORPO trainers log (train and eval_): rewards/accuracies, rewards/margins, ...
PREFERENCE_LOGS = tuple(p + k for p in ("", "eval_") for k in ("rewards/", "logps/", "nll_loss", "log_odds"))


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name])


def final_dir(output_dir: Path, step: TrainStep) -> Path:
    return output_dir / ("model" if step.method == "full" else "adapter")


def load_tokenizer(model_cfg: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    src = model_cfg.get("path") or model_cfg["id"]
    tok = AutoTokenizer.from_pretrained(src, revision=model_cfg.get("revision"),
                                        trust_remote_code=model_cfg.get("trust_remote_code", False))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg: dict[str, Any], step: TrainStep) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    src = model_cfg.get("path") or model_cfg["id"]
    kwargs: dict[str, Any] = {
        "revision": model_cfg.get("revision"),
        "trust_remote_code": model_cfg.get("trust_remote_code", False),
        # Frozen base weights (and full fine-tuning) in the step's precision; peft keeps the
        # LoRA weights themselves in fp32.
        "dtype": _torch_dtype(step.precision),
    }
    if step.method == "qlora":
        from ftkit.engines import bnb

        kwargs["quantization_config"] = bnb.quantization_config(step.precision)
        if step.distribution != "deepspeed-zero3" and torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    model.config.use_cache = False
    if step.method == "qlora":
        model = prepare_qlora(model, step)
    return model


def prepare_qlora(model: Any, step: TrainStep) -> Any:
    """trl's rule for a 4-bit model (plan.memory estimates the same dtypes):

    - ZeRO-3 ("sharded QLoRA"): no prepare_model_for_kbit_training. It upcasts embeddings,
      lm_head and norms to fp32, and ZeRO-3 cannot shard a model of mixed dtypes; trl skips
      it there too.
    - bf16: trl's preparation upcasts and then casts every fp32 parameter back to bf16 for
      a uniform dtype; the engine goes straight to that end (no fp32 copy of the
      embeddings, even for a moment).
    - fp16: peft's preparation, whose fp32 embeddings, lm_head and norms keep fp16 stable.

    Gradient checkpointing and input gradients come from the Trainer and trl in every case;
    trl casts the LoRA weights of a quantized model to bf16.

    In every case the 4-bit layers stay in bitsandbytes' training layout: on a CPU with
    AVX512-BF16 the first evaluation would otherwise switch them, for good, to a packed
    inference layout without a backward pass (engines.bnb), and every training step after it
    would lose the gradient through the frozen base.
    """
    from ftkit.engines import bnb
    from ftkit.plan.memory import kbit_upcast

    kept = bnb.keep_training_layout(model)
    if kept:
        print(f"ftkit: bitsandbytes {bnb.version()}: {kept} 4-bit layers on the CPU kept in the training layout "
              "(its packed CPU inference layout has no backward pass)", flush=True)
    if not kbit_upcast(step):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=step.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def lora_config(step: TrainStep) -> Any:
    from peft import LoraConfig

    lo = step.lora
    return LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
        use_rslora=lo.use_rslora, use_dora=lo.use_dora, modules_to_save=lo.modules_to_save or None, bias="none", task_type="CAUSAL_LM",
    )


def datasets_for(dataset_cfg: dict[str, Any], tokenizer: Any) -> tuple[Any, Any | None]:
    """Rows -> the datasets trl trains on, shaped by the recipe's template.

    Under a chat template (the tokenizer's own, a named one, a .jinja file) every row is
    tokenized here into `input_ids` and `labels`: the answers `dataset.train_on` names carry
    loss, prompts (system, user, tool turns) are -100, and each trained answer ends with EOS
    (templates.tokenize_answers). trl takes a pre-tokenized dataset's labels as they are and
    truncates to max_length (seq_len). The alpaca template (one prompt, one answer) and text
    stay trl's prompt/completion and text datasets."""
    from datasets import Dataset

    template = templates.choose(dataset_cfg.get("template", "auto"), dataset_cfg["format"], tokenizer)
    if template != "tokenizer":
        templates.apply_named(tokenizer, template)
    splits = data.load_splits(dataset_cfg)
    tokenized = dataset_cfg["format"] != "text" and template != "alpaca"

    def convert(rows: list[dict[str, Any]]) -> Any:
        if tokenized:
            return Dataset.from_list([t for t in (data.to_tokens(r, dataset_cfg, tokenizer) for r in rows) if t])
        exs = [data.to_example(r, dataset_cfg, template, tokenizer) for r in rows]
        if dataset_cfg["format"] == "text":
            return Dataset.from_list([{"text": e.text} for e in exs])
        return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in exs])

    return convert(splits.train), (convert(splits.eval) if splits.eval else None)


def barrier(args: Any) -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    state = getattr(args, "distributed_state", None)
    if state is not None:
        state.wait_for_everyone()
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def make_callbacks(step: TrainStep, metrics_path: Path, ckpt_root: Path) -> list[Any]:
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):  # type: ignore[misc]
        """One JSON line per log event: wall-clock time, loss, eval loss, lr, tokens/s,
        samples/s, step time, peak memory."""

        def __init__(self) -> None:
            self.t_last = time.perf_counter()
            self.step_last = 0
            self.tokens_last = 0.0
            self.t0 = self.t_last
            self.started = False

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # Once, at the first step: by then a resumed run's state is loaded (on_train_begin
            # comes before that), so throughput counts from the restored step and token count.
            if self.started:
                return
            self.started = True
            self.t_last = time.perf_counter()
            self.step_last = state.global_step
            self.tokens_last = float(state.num_input_tokens_seen or 0)
            for h in reversed(state.log_history):
                if "num_tokens" in h:
                    self.tokens_last = float(h["num_tokens"])
                    break

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            import torch

            now = time.perf_counter()
            steps = state.global_step - self.step_last
            row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "wall_time": round(time.time(), 3),
                                   "time_s": round(now - self.t0, 3)}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy",
                        "eval_mean_token_accuracy", "num_tokens"):
                if key in logs:
                    row[key] = float(logs[key])
            row.update({k: float(v) for k, v in logs.items()  # the preference engine's (trl's DPO/ORPO terms)
                        if k.startswith(PREFERENCE_LOGS) and isinstance(v, (int, float))})
            if "train_runtime" in logs:
                row.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
            if steps > 0 and "loss" in logs:
                dt = now - self.t_last
                world = args.world_size
                row["step_time_s"] = round(dt / steps, 4)
                row["samples_per_s"] = round(steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * world / dt, 3)
                tokens = float(logs.get("num_tokens", state.num_input_tokens_seen or 0))
                if tokens:
                    row["tokens_per_s"] = round((tokens - self.tokens_last) / dt, 1)
                    self.tokens_last = tokens
                self.t_last, self.step_last = now, state.global_step
            if torch.cuda.is_available():
                row["peak_gpu_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    class Checkpoints(TrainerCallback):  # type: ignore[misc]
        """After each save returns on every rank: wait for all of them (each writes its own
        RNG state and ZeRO shards), then rank 0 writes the completeness manifest and applies
        retention."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            barrier(args)
            if not state.is_world_process_zero:
                return
            ckpt = ckpt_root / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir():
                return
            evals = [h["eval_loss"] for h in state.log_history if h.get("step") == state.global_step and "eval_loss" in h]
            follow_umask(ckpt)  # safetensors writes its files 0600 whatever the umask
            missing = checkpoints.mark_complete(ckpt, world_size=args.world_size,
                                                eval_loss=evals[-1] if evals else None)
            if missing:
                print(f"ftkit: {ckpt.name} is not complete (missing: {', '.join(missing)}); "
                      "it will not be resumed from", flush=True)
            checkpoints.retain(ckpt_root, step.checkpoint.keep_last, step.checkpoint.keep_best)

    return [Metrics(), Checkpoints()]


def supersede_metrics(metrics_path: Path, after_step: int) -> int:
    """Move the metrics rows logged after `after_step` (the checkpoint a resume starts from)
    to metrics.superseded.jsonl: those steps are trained again. Returns how many moved."""
    if not metrics_path.is_file():
        return 0
    keep, moved = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            later = int(row.get("step", 0)) > after_step
        except (ValueError, TypeError, AttributeError):
            later = False  # a torn last line from a crash: keep it out of the way too
            moved.append(line)
            continue
        (moved if later else keep).append(line)
    if not moved:
        return 0
    superseded = metrics_path.with_name(metrics_path.stem + ".superseded.jsonl")
    with open(superseded, "a", encoding="utf-8") as fh:
        fh.write("".join(m + "\n" for m in moved))
    from ftkit.files import write_atomic

    write_atomic(metrics_path, "".join(k + "\n" for k in keep))
    return len(moved)


def sft_config(step: TrainStep, ckpt_root: Path, has_eval: bool, deepspeed: str | None) -> Any:
    import torch
    from trl import SFTConfig

    evaluating = has_eval and step.eval_every_steps is not None
    kw: dict[str, Any] = dict(
        output_dir=str(ckpt_root),
        learning_rate=step.learning_rate,
        lr_scheduler_type=step.lr_scheduler,
        warmup_steps=step.warmup_ratio,  # < 1 means a ratio of the total steps
        weight_decay=step.weight_decay,
        per_device_train_batch_size=step.batch_size,
        per_device_eval_batch_size=step.batch_size,
        gradient_accumulation_steps=step.grad_accum,
        max_length=step.seq_len,
        packing=step.packing,
        bf16=step.precision == "bf16",
        fp16=step.precision == "fp16",
        gradient_checkpointing=step.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if step.gradient_checkpointing else None,
        optim=step.optimizer,
        seed=step.seed,
        data_seed=step.seed,
        logging_steps=step.logging_steps,
        save_strategy="steps",
        save_steps=step.checkpoint.every_steps,
        save_total_limit=None,  # retention is ftkit's (keeps the best too)
        eval_strategy="steps" if evaluating else "no",
        eval_steps=step.eval_every_steps if evaluating else None,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        deepspeed=deepspeed,
    )
    if step.max_steps is not None:
        kw["max_steps"] = step.max_steps
    else:
        kw["num_train_epochs"] = step.epochs or 1.0
    return SFTConfig(**kw)


def trainer_class(step: TrainStep) -> Any:
    """trl's SFTTrainer; for QLoRA one whose resume keeps the adapter in bf16.

    trl casts a quantized model's LoRA weights to bf16 (the QLoRA paper's recipe, and what
    plan.memory counts). Resuming, the Trainer loads the checkpoint's adapter with peft's
    load_adapter, which ends by upcasting the adapter to fp32 (autocast_adapter_dtype): the
    resumed run would go on in fp32, a different run from the one that was interrupted
    (measured: LoRA weights 1.4e-3 apart after 12 steps, where LoRA resumes exactly). The
    cast is applied again right after the load, before the optimizer and its state are."""
    from trl import SFTTrainer

    if step.method != "qlora":
        return SFTTrainer

    class QLoraTrainer(SFTTrainer):  # type: ignore[misc]
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if self.is_deepspeed_enabled:
                return  # DeepSpeed casts every parameter to its own 16-bit dtype
            import torch

            for name, param in self.model.named_parameters():
                if param.requires_grad and "lora_magnitude_vector" not in name:
                    param.data = param.data.to(torch.bfloat16)

    return QLoraTrainer


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import set_seed

    step = TrainStep.model_validate(cfg["train"])
    out = Path(cfg["output_dir"])
    ckpt_root = out / "checkpoints"
    metrics_path = Path(cfg["metrics_path"])
    marker = Path(complete_marker(str(final_dir(out, step))))
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)  # an earlier attempt's: this attempt's adapter is not written yet
    set_seed(step.seed)
    tokenizer = load_tokenizer(cfg["model"])
    train_ds, eval_ds = datasets_for(cfg["dataset"], tokenizer)
    model = load_model(cfg["model"], step)
    args = sft_config(step, ckpt_root, eval_ds is not None, cfg.get("deepspeed_config"))
    job_tracking = cfg.get("tracking") or {}
    args.report_to, tracking_callbacks = tracking.setup(job_tracking, out)
    args.run_name = job_tracking.get("run_name") or args.run_name
    trainer = trainer_class(step)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(step) if step.method != "full" else None,
        callbacks=make_callbacks(step, metrics_path, ckpt_root) + tracking_callbacks,
    )
    # Rank 0 quarantines interrupted saves while the others wait; then every rank picks the
    # same newest complete checkpoint.
    rank0 = trainer.is_world_process_zero()
    if rank0:
        for src, dest in checkpoints.quarantine_incomplete(ckpt_root):
            print(f"ftkit: {src.name} is incomplete (a save was interrupted): moved to "
                  f"{dest.relative_to(ckpt_root)}", flush=True)
    barrier(args)
    resume = checkpoints.newest_complete(ckpt_root)
    if rank0:
        # rows logged after the checkpoint (or all of them, without one) are trained again
        moved = supersede_metrics(metrics_path, checkpoints.step_of(resume) if resume else -1)
        note = f"; {moved} metrics row(s) after it moved to {metrics_path.stem}.superseded.jsonl" if moved else ""
        if resume is not None:
            print(f"ftkit: resuming from {resume.name}{note}", flush=True)
        elif moved:
            print(f"ftkit: no complete checkpoint: starting over{note}", flush=True)
    barrier(args)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    final = final_dir(out, step)
    trainer.save_model(str(final))
    summary: dict[str, Any] = {
        "method": step.method,
        "global_step": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "seconds": round(seconds, 3),
        "resumed_from": resume.name if resume else None,
        "final": str(final),
        # ZeRO-3 partitions parameters: ds_numel is the whole tensor's size
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad),
        "world_size": args.world_size,
        "peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        summary["eval_loss_first"], summary["eval_loss_last"] = evals[0], evals[-1]
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
        follow_umask(final)  # safetensors writes its files 0600 whatever the umask
        # every file of the final adapter is written: a load-adapter step waiting on it can go
        # now, while this process (and its launcher, and its container) winds down
        write_json(marker, {"final": str(final), "written_at": round(time.time(), 3)})
        write_json(out / "train_summary.json", summary)
    return summary


def _run_and_report(cfg: dict[str, Any]) -> dict[str, Any]:
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ftkit train: done: {json.dumps(summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    from ftkit.engines.entry import main_with_config

    main_with_config("train", "ftkit.engines.train", _run_and_report, argv)


if __name__ == "__main__":
    main()
