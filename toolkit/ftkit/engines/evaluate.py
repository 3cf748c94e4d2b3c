"""Score held-out prompts on several models: the base before training, the adapter and the
merged model after. Greedy decoding, exact match or containment. Writes results.jsonl (one
line per prompt and model) and summary.json (accuracy per model and the improvement; with a
harness, lm-evaluation-harness's scores against a server of the run: engines.harness).

    python -m ftkit.engines.evaluate --config configs/eval-<step>.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit.engines import data, templates
from ftkit.errors import DatasetError, EngineError
from ftkit.files import write_json


def prompts_for(cfg: dict[str, Any], tokenizer: Any) -> list[tuple[str, str]]:
    ev = cfg["eval"]
    if ev.get("prompts"):
        pairs = [(p["prompt"], p["expected"]) for p in ev["prompts"]]
    elif cfg.get("prompts_path"):
        rows = data.read_rows(cfg["prompts_path"])
        bad = [r.get("__row__") for r in rows if not isinstance(r.get("prompt"), str) or not isinstance(r.get("expected"), str)]
        if bad:
            raise DatasetError(f"{cfg['prompts_path']}: rows {bad[:10]} need text fields 'prompt' and 'expected'")
        pairs = [(r["prompt"], r["expected"]) for r in rows]
    else:
        ds = cfg["dataset"]
        template = templates.choose(ds.get("template", "auto"), ds["format"], tokenizer)
        if template != "tokenizer":
            templates.apply_named(tokenizer, template)
        rows = data.load_splits(ds).eval
        if not rows:
            raise DatasetError("the eval step has no prompts and the dataset has no eval split")
        pairs = [(data.to_example(r, ds, template, tokenizer).prompt, data.expected_of(r, ds)) for r in rows]
    if ev.get("limit"):
        pairs = pairs[: ev["limit"]]
    return pairs


def score(answer: str, expected: str, how: str) -> bool:
    a, e = answer.strip(), expected.strip()
    return a == e if how == "exact" else e.lower() in a.lower()


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch: int = 16) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    out: list[str] = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def load(cfg: dict[str, Any], which: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    m = cfg["model"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[m.get("dtype", "bf16")]
    if not torch.cuda.is_available() and dtype == torch.float16:
        dtype = torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_src = m.get("path") or m["id"]
    if which == "merged":
        if not cfg.get("merged"):
            raise EngineError("eval asks for the merged model, but no merge step ran before it")
        src = list(cfg["merged"].values())[-1]
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device).eval()
    if which == "quantized":
        if not cfg.get("quantized"):
            raise EngineError("eval asks for the quantized model, but no quantize step ran before it")
        # transformers reads compressed-tensors (installed beside llm-compressor) and unpacks the
        # 4-bit weights: scored as rounded, in the merged model's dtype
        src = list(cfg["quantized"].values())[-1]
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device).eval()
    if which == "full" or (which == "adapter" and cfg.get("full") and not cfg.get("adapters")):
        return AutoModelForCausalLM.from_pretrained(list(cfg["full"].values())[-1], dtype=dtype).to(device).eval()
    kw: dict[str, Any] = {"revision": m.get("revision"), "trust_remote_code": m.get("trust_remote_code", False)}
    if which == "adapter":
        if not cfg.get("adapters"):
            raise EngineError("eval asks for the adapter, but no lora/qlora train step ran before it")
        train_step, adapter = list(cfg["adapters"].items())[-1]
        precision = (cfg.get("qlora") or {}).get(train_step)
        if precision is not None:
            return _qlora_adapter(base_src, adapter, precision, kw)
    model = AutoModelForCausalLM.from_pretrained(base_src, dtype=dtype, **kw).to(device)
    if which == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _qlora_adapter(base_src: str, adapter: str, precision: str, kw: dict[str, Any]) -> Any:
    """A QLoRA adapter on the base as it trained against: quantized to 4 bits the same way,
    its layers in the same (training) layout, computing in the same precision."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftkit.engines import bnb

    if torch.cuda.is_available():
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(base_src, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                                                 quantization_config=bnb.quantization_config(precision), **kw)
    bnb.keep_training_layout(model)
    return PeftModel.from_pretrained(model, adapter).eval()


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """ftkit's own scores of the step's models, then the harness's against a server (either may
    be alone); one summary.json with both."""
    ev = cfg["eval"]
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = score_models(cfg, out_dir) if ev["models"] else {"models": {}, "order": []}
    if cfg.get("harness"):
        from ftkit.engines import harness

        write_json(out_dir / "summary.json", summary)  # the models' scores stay if the harness fails
        summary["harness"] = harness.run(cfg["harness"], out_dir)
    need = ev.get("min_improvement")
    summary["passed"] = need is None or summary.get("improvement_points", 0) >= need
    write_json(out_dir / "summary.json", summary)
    if not summary["passed"]:
        raise EngineError(f"improvement {summary.get('improvement_points')} points is below the required {need}")
    return summary


def score_models(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    m = cfg["model"]
    tok_src = list(cfg["merged"].values())[-1] if cfg.get("merged") else (m.get("path") or m["id"])
    tokenizer = AutoTokenizer.from_pretrained(tok_src, revision=None if cfg.get("merged") else m.get("revision"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = prompts_for(cfg, tokenizer)
    ev = cfg["eval"]
    results_path = out_dir / "results.jsonl"
    results_path.write_text("")
    # "order": the models as the step lists them (the JSON's keys are sorted): the first is what
    # the improvement is measured against
    summary: dict[str, Any] = {"score": ev["score"], "prompts": len(pairs), "models": {}, "order": list(ev["models"])}
    for which in ev["models"]:
        model = load(cfg, which)
        answers = generate(model, tokenizer, [p for p, _ in pairs], ev["max_new_tokens"])
        correct = 0
        with open(results_path, "a", encoding="utf-8") as fh:
            for (prompt, expected), answer in zip(pairs, answers, strict=True):
                ok = score(answer, expected, ev["score"])
                correct += ok
                fh.write(json.dumps({"model": which, "prompt": prompt, "expected": expected, "answer": answer,
                                     "correct": ok}) + "\n")
        acc = 100.0 * correct / max(len(pairs), 1)
        summary["models"][which] = {"accuracy": round(acc, 2), "correct": correct}
        print(f"eval: {which}: {correct}/{len(pairs)} correct ({acc:.1f}%)", flush=True)
        del model
    names = ev["models"]
    if len(names) >= 2:
        first, last = summary["models"][names[0]]["accuracy"], summary["models"][names[-1]]["accuracy"]
        summary["improvement_points"] = round(last - first, 2)
        print(f"eval: {names[-1]} vs {names[0]}: {last - first:+.1f} points", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    from ftkit.engines.entry import main_with_config

    main_with_config("eval", "ftkit.engines.evaluate", run, argv)


if __name__ == "__main__":
    main()
