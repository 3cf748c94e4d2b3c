"""The preference engine: DPO or ORPO with trl on prompt/chosen/rejected pairs.

Launched like the train engine (`accelerate launch ... -m ftkit.engines.preference --config
configs/preference-<step>.json`) and built from its parts: the same model loading (QLoRA
included), LoRA settings, Trainer arguments (engines.train.sft_config, so tracking and every
Trainer setting stay one place), metrics.jsonl callback (trl's rewards/*, logps/* and the
ORPO terms are kept), crash-safe checkpoints and resume, the final adapter and its
`adapter.complete` marker, train_summary.json. A merge, serve, load-adapter or eval step
takes the adapter like a train step's.

The reference DPO needs is never a second copy of the weights: a new adapter's reference is
the base with the adapter disabled (trl's PEFT rule); an adapter trained further (`adapter:`
in the recipe, an SFT result) is copied once as a frozen "ref" adapter by trl and dropped
before the adapter is saved. ORPO has no reference.

The pairs' prompts are formatted as the recipe's dataset formats its prompts (its template
and system prompt), so a preference step continuing an SFT adapter sees the prompts that
adapter learned on. Held-out pairs are scored before and after training (does the model give
the chosen answer a higher log-probability than the rejected one?): `preference` in
train_summary.json, and one metrics row each (`pair_accuracy`, `pair_margin`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from ftkit.engines import checkpoints, data, templates, tracking, train
from ftkit.files import follow_umask, write_json
from ftkit.plan.jobs import complete_marker
from ftkit.recipe.models import Fields, PreferenceStep

REF_ADAPTER = "ref"  # the name trl gives the frozen copy of an adapter trained further


@dataclasses.dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str


def load_pairs(pairs_cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): checked by validate's own row checker, split as datasets are."""
    splits = data.load_splits({"path": pairs_cfg["path"], "format": "preference", "fields": pairs_cfg["fields"],
                               "eval": pairs_cfg.get("eval")})
    return splits.train, splits.eval


def to_pairs(rows: list[dict[str, Any]], pairs_cfg: dict[str, Any], dataset_cfg: dict[str, Any], template: str,
             tokenizer: Any) -> list[Pair]:
    """Each row's prompt as the recipe's dataset template renders an instruction, and the two
    answers as that template's completions."""
    f = pairs_cfg["fields"]
    shape = {"format": "alpaca", "fields": Fields().model_dump(), "system_prompt": dataset_cfg.get("system_prompt")}
    out = []
    for row in rows:
        good = data.to_example({"instruction": row[f["prompt"]], "output": row[f["chosen"]]}, shape, template, tokenizer)
        bad = data.to_example({"instruction": row[f["prompt"]], "output": row[f["rejected"]]}, shape, template, tokenizer)
        out.append(Pair(good.prompt, good.completion, bad.completion))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pair_scores(model: Any, tokenizer: Any, pairs: list[Pair], max_length: int, batch: int = 32) -> dict[str, float]:
    """How the model ranks each held-out pair: `accuracy` (percent of pairs whose chosen answer
    gets the higher summed log-probability) and `margin` (mean of chosen minus rejected). The
    completion is tokenized as trl's DPO tokenizes it (prompt + answer + EOS, split where the
    two token sequences diverge); no reference model, so it means the same for DPO and ORPO.
    Sequences go through the model in right-padded batches."""
    import torch

    eos = tokenizer.eos_token or ""
    seqs: list[tuple[list[int], int]] = []  # (ids, where the completion starts)
    for p in pairs:
        prompt_ids = tokenizer(p.prompt)["input_ids"]
        chosen = tokenizer(p.prompt + p.chosen + eos)["input_ids"]
        rejected = tokenizer(p.prompt + p.rejected + eos)["input_ids"]
        cut = min(_common_prefix(prompt_ids, chosen), _common_prefix(prompt_ids, rejected))
        seqs += [(chosen[:max_length], cut), (rejected[:max_length], cut)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    sums: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            part = seqs[i:i + batch]
            width = max(len(ids) for ids, _ in part)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in part], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in part], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
            pos = torch.arange(1, width, device=device)[None, :]
            starts = torch.tensor([max(cut, 1) for _, cut in part], device=device)[:, None]
            keep = (pos >= starts) & (mask[:, 1:] == 1)  # the completion's tokens, each scored from what precedes it
            sums += (lp * keep).sum(dim=1).tolist()
    if was_training:
        model.train()
    margins = [sums[k] - sums[k + 1] for k in range(0, len(sums), 2)]
    wins = sum(m > 0 for m in margins)
    return {"pairs": len(pairs), "accuracy": round(100.0 * wins / max(len(pairs), 1), 2),
            "margin": round(sum(margins) / max(len(margins), 1), 4)}


def preference_config(step: PreferenceStep, ckpt_root: Path, has_eval: bool, deepspeed: str | None) -> Any:
    """trl's DPOConfig or ORPOConfig: every Trainer setting as the train engine makes it (the
    TrainingArguments fields of its SFTConfig), then the preference ones."""
    from transformers import TrainingArguments

    sft = train.sft_config(step, ckpt_root, has_eval, deepspeed)
    shared = {f.name: getattr(sft, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    if step.objective == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**shared, beta=step.beta, max_length=step.seq_len, disable_dropout=True,
                          dataset_num_proc=None)
    from trl import DPOConfig

    return DPOConfig(**shared, beta=step.beta, max_length=step.seq_len, truncation_mode="keep_start",
                     loss_type=["sigmoid"], disable_dropout=True)


def _model(cfg: dict[str, Any], step: PreferenceStep) -> tuple[Any, Any | None]:
    """(model, peft_config): the base with a new adapter to come (trl adds it), or the base with
    the starting adapter loaded trainable."""
    model = train.load_model(cfg["model"], step)
    start = cfg.get("init_adapter")
    if not start:
        return model, train.lora_config(step)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, start, is_trainable=True), None


def trainer_class(step: PreferenceStep) -> Any:
    if step.objective == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
    from trl import DPOTrainer

    return DPOTrainer


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    step = PreferenceStep.model_validate(cfg["train"])
    out = Path(cfg["output_dir"])
    ckpt_root = out / "checkpoints"
    metrics_path = Path(cfg["metrics_path"])
    final = train.final_dir(out, step)
    marker = Path(complete_marker(str(final)))
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
    set_seed(step.seed)
    tokenizer = train.load_tokenizer(cfg["model"])
    dataset_cfg = cfg["dataset"]
    template = templates.choose(dataset_cfg.get("template", "auto"), dataset_cfg["format"], tokenizer)
    if template != "tokenizer":
        templates.apply_named(tokenizer, template)
    train_rows, eval_rows = load_pairs(cfg["pairs"])
    train_pairs = to_pairs(train_rows, cfg["pairs"], dataset_cfg, template, tokenizer)
    eval_pairs = to_pairs(eval_rows, cfg["pairs"], dataset_cfg, template, tokenizer)

    def as_dataset(pairs: list[Pair]) -> Any:
        return Dataset.from_list([dataclasses.asdict(p) for p in pairs])

    train_ds = as_dataset(train_pairs)
    eval_ds = as_dataset(eval_pairs) if eval_pairs else None
    model, peft_config = _model(cfg, step)
    args = preference_config(step, ckpt_root, eval_ds is not None, cfg.get("deepspeed_config"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    before = None
    if rank0:
        for src, dest in checkpoints.quarantine_incomplete(ckpt_root):
            print(f"ftkit: {src.name} is incomplete (a save was interrupted): moved to "
                  f"{dest.relative_to(ckpt_root)}", flush=True)
    resume = checkpoints.newest_complete(ckpt_root)
    if eval_pairs and rank0:
        if resume is None:
            before = pair_scores(model, tokenizer, eval_pairs, step.seq_len)  # the starting model (base or SFT adapter)
        else:
            before = _recorded_before(metrics_path)  # what the first attempt scored at step 0
    job_tracking = cfg.get("tracking") or {}  # TensorBoard, MLflow, W&B: as the train engine does
    args.report_to, tracking_callbacks = tracking.setup(job_tracking, out)
    args.run_name = job_tracking.get("run_name") or args.run_name
    trainer = trainer_class(step)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config, callbacks=train.make_callbacks(step, metrics_path, ckpt_root) + tracking_callbacks,
    )
    train.barrier(args)
    resume = checkpoints.newest_complete(ckpt_root)
    if trainer.is_world_process_zero():
        moved = train.supersede_metrics(metrics_path, checkpoints.step_of(resume) if resume else -1)
        note = f"; {moved} metrics row(s) after it moved to {metrics_path.stem}.superseded.jsonl" if moved else ""
        if resume is not None:
            print(f"ftkit: resuming from {resume.name}{note}", flush=True)
        elif moved:
            print(f"ftkit: no complete checkpoint: starting over{note}", flush=True)
        if before is not None and resume is None:
            _metrics_row(metrics_path, 0, before)
    train.barrier(args)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if REF_ADAPTER in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter(REF_ADAPTER)  # trl's frozen reference copy: not part of the result
    trainer.save_model(str(final))
    after = pair_scores(unwrapped, tokenizer, eval_pairs, step.seq_len) if eval_pairs and rank0 else None
    summary: dict[str, Any] = {
        "method": step.method,
        "objective": step.objective,
        "started_from": "adapter" if cfg.get("init_adapter") else "base",
        "global_step": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "seconds": round(seconds, 3),
        "resumed_from": resume.name if resume else None,
        "final": str(final),
        "pairs": len(train_pairs),
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad),
        "world_size": args.world_size,
        "peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if after is not None:
        summary["preference"] = {"before": before, "after": after}  # before: None if no attempt recorded it
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        summary["eval_loss_first"], summary["eval_loss_last"] = evals[0], evals[-1]
    rewards = [h["eval_rewards/accuracies"] for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    if rewards:
        summary["eval_reward_accuracy_last"] = rewards[-1]
    if trainer.is_world_process_zero():
        if after is not None:
            _metrics_row(metrics_path, trainer.state.global_step, after)
        tokenizer.save_pretrained(str(final))
        follow_umask(final)
        write_json(marker, {"final": str(final), "written_at": round(time.time(), 3)})
        write_json(out / "train_summary.json", summary)
    return summary


def _recorded_before(path: Path) -> dict[str, float] | None:
    """The held-out pairs' score at step 0 as a first attempt wrote it to metrics.jsonl."""
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step") == 0 and "pair_accuracy" in row:
            return {"pairs": row.get("pairs"), "accuracy": row["pair_accuracy"], "margin": row.get("pair_margin")}
    return None


def _metrics_row(path: Path, step: int, scores: dict[str, float]) -> None:
    row = {"step": step, "wall_time": round(time.time(), 3), "pair_accuracy": scores["accuracy"],
           "pair_margin": scores["margin"], "pairs": scores["pairs"]}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _run_and_report(cfg: dict[str, Any]) -> dict[str, Any]:
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ftkit preference: done: {json.dumps(summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    from ftkit.engines.entry import main_with_config

    main_with_config("preference", "ftkit.engines.preference", _run_and_report, argv)


if __name__ == "__main__":
    main()
