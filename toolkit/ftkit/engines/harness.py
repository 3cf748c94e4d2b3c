"""lm-evaluation-harness against a running server of the run: its `local-completions` (or
`local-chat-completions`) model sends each task's requests to the serve step's
OpenAI-compatible endpoint, in this process (`lm_eval.simple_evaluate`). lm-eval's own
output (logging, progress bars) goes to the step's log; the scores come back as rows:

    {"task", "metric", "filter", "value", "stderr", "samples"}

The job (plan.jobs.HarnessJob) names the endpoint and model as the plan started the server.
Task files are registered with their directories (so a task YAML's `include:` and sibling
tasks resolve) and loaded by path, in their directory (relative `data_files` are read from
there); tasks that need the prompt's log-probabilities are refused
before any request when the server cannot give them (transformers serve, a chat endpoint).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ftkit.errors import EngineError

LOGPROB_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")


def model_args(h: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's model arguments: the endpoint, the served name, requests as text (the server
    tokenizes), the served model's tokenizer where lm-eval counts tokens (completions)."""
    args: dict[str, Any] = {"base_url": h["base_url"], "model": h["model"], "tokenized_requests": False,
                            "num_concurrent": h.get("num_concurrent") or 1, "max_retries": 2, "timeout": 300}
    if h.get("max_gen_toks"):
        args["max_gen_toks"] = h["max_gen_toks"]
    if h.get("tokenizer"):
        args.update(tokenizer_backend="huggingface", tokenizer=h["tokenizer"])
        if h.get("revision"):
            args["revision"] = h["revision"]
    else:
        args["tokenizer_backend"] = "none"
    return args


def task_manager(h: dict[str, Any]) -> Any:
    """lm-eval's task index: its built-in tasks when a task is named, and the directories of
    the recipe's task files (a file alone is loaded by its path)."""
    from lm_eval.tasks import TaskManager

    include = sorted({str(Path(t["spec"]) if Path(t["spec"]).is_dir() else Path(t["spec"]).parent)
                      for t in h["tasks"] if t["path"]})
    named = any(not t["path"] for t in h["tasks"])
    return TaskManager(include_path=include or None, include_defaults=named)


def task_specs(h: dict[str, Any]) -> list[str]:
    """What simple_evaluate gets: names, YAML paths, and for a directory every task it defines."""
    from lm_eval.tasks import TaskManager

    out: list[str] = []
    for t in h["tasks"]:
        if t["path"] and Path(t["spec"]).is_dir():
            names = TaskManager(include_path=t["spec"], include_defaults=False).all_subtasks
            if not names:
                raise EngineError(f"{t['given']}: defines no lm-eval task")
            out += [n for n in names if n not in out]
        elif t["spec"] not in out:
            out.append(t["spec"])
    return out


def absolute(h: dict[str, Any]) -> dict[str, Any]:
    """Task paths and a tokenizer directory made absolute: lm-eval runs in the tasks' directory."""
    tasks = [{**t, "spec": os.path.abspath(t["spec"])} if t["path"] else t for t in h["tasks"]]
    tok = h.get("tokenizer")
    return {**h, "tasks": tasks, "tokenizer": os.path.abspath(tok) if tok and os.path.isdir(tok) else tok}


def task_dir(h: dict[str, Any]) -> Path | None:
    """The one directory the recipe's task files are in (a directory entry: itself), where
    lm-eval runs so that a YAML's relative `data_files` mean the same wherever ftkit was
    started; None when the tasks are named only or live in several directories."""
    dirs = {Path(t["spec"]) if Path(t["spec"]).is_dir() else Path(t["spec"]).parent for t in h["tasks"] if t["path"]}
    return next(iter(dirs)) if len(dirs) == 1 else None


def refuse_logprobs(h: dict[str, Any], types: dict[str, str]) -> None:
    bad = {name: kind for name, kind in types.items() if kind in LOGPROB_TYPES}
    if not bad:
        return
    kinds = ", ".join(f"{n} ({k})" for n, k in sorted(bad.items())[:6])
    if h["api"] == "chat":
        raise EngineError(f"{kinds}: a chat endpoint gives no prompt log-probabilities; use model: completions")
    if h["engine"] != "vllm":
        raise EngineError(f"{kinds}: needs the prompt's log-probabilities (echo + logprobs), which "
                          f"{h['engine'] or 'this server'} does not give; serve with vLLM or use generate_until tasks")


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """simple_evaluate's results as one row per task and metric (`exact_match,none` ->
    metric exact_match, filter none); a stderr lm-eval could not compute ("N/A") is null."""
    out: list[dict[str, Any]] = []
    samples = results.get("n-samples") or {}
    for task, metrics in (results.get("results") or {}).items():
        n = samples.get(task) or {}
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if _number(value) is None:
                continue
            out.append({"task": task, "metric": metric, "filter": filt, "value": _number(value),
                        "stderr": _number(metrics.get(f"{metric}_stderr,{filt}")),
                        "samples": n.get("effective") if isinstance(n, dict) else None})
    return out


def run(h: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run the tasks; write lm-eval's own results to harness.json; return the summary part."""
    try:
        import lm_eval
    except ImportError as e:
        raise EngineError(f"lm-evaluation-harness is not installed in this Python ({e}): pip install 'lm-eval[api]'") \
            from None
    from lm_eval.evaluator import simple_evaluate

    h = absolute(h)
    here = task_dir(h)
    before = os.getcwd()
    try:
        if here is not None:  # a task's relative data_files are read from its YAML's directory
            os.chdir(here)
        tm = task_manager(h)
        specs = task_specs(h)
        loaded = tm.load(specs)
        types = {name: getattr(task, "OUTPUT_TYPE", "") for name, task in (loaded.get("tasks") or {}).items()}
        refuse_logprobs(h, types)
        print(f"harness: {h['lm_eval_model']} at {h['base_url']} (model {h['model']}), tasks: {', '.join(specs)}",
              flush=True)
        results = simple_evaluate(model=h["lm_eval_model"], model_args=model_args(h), tasks=specs, task_manager=tm,
                                  limit=h.get("limit"), num_fewshot=h.get("num_fewshot"), log_samples=False,
                                  apply_chat_template=h["api"] == "chat")
    except EngineError:
        raise
    except Exception as e:  # lm-eval raises whatever its model or task raised: one line, the rest in the log
        import traceback

        traceback.print_exc()
        raise EngineError(f"lm-evaluation-harness failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from None
    finally:
        os.chdir(before)
    if not results:
        raise EngineError("lm-evaluation-harness returned no results")
    from ftkit.files import write_json

    write_json(out_dir / "harness.json", {k: results.get(k) for k in ("results", "n-samples", "configs", "versions",
                                                                       "n-shot", "higher_is_better", "lm_eval_version")
                                          if k in results})
    rows = rows_of(results)
    for r in rows:
        err = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
        print(f"harness: {r['task']}: {r['metric']} ({r['filter']}) {r['value']:.4f}{err} on {r['samples']} samples",
              flush=True)
    return {"server": h["server"], "endpoint": h["base_url"], "model": h["model"], "lm_eval_model": h["lm_eval_model"],
            "lm_eval_version": str(getattr(lm_eval, "__version__", results.get("lm_eval_version", ""))),
            "tasks": [t["given"] for t in h["tasks"]], "results": rows}
