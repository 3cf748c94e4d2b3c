"""Cross-field rules for recipes and machine profiles.

Each function returns every finding as (field path, message, point-at-key) so the caller
can locate them in the YAML and report them together. Nothing here touches the machine
(that is `plan.machine_checks`) or raises.
"""

from __future__ import annotations

import re
from pathlib import Path

from ftkit.recipe.models import (
    EvalStep,
    Machine,
    MergeStep,
    PowerStep,
    Recipe,
    ServeStep,
    TrainStep,
)
from ftkit.recipe.yamlpos import Path_

Finding = tuple[Path_, str, bool]

PATH_VARS = ("models", "datasets", "runs", "hf_cache")
_VAR = re.compile(r"\$\{([^}]*)\}")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")


def path_problem(value: str) -> str | None:
    """Why a path may not appear in a portable recipe, or None when it may."""
    if value.startswith(("/", "~", "\\\\")) or _WINDOWS_ABS.match(value):
        return (
            f"absolute path {value!r}: recipes must stay portable; use a path relative to the recipe, "
            "or ${models}/... / ${datasets}/... from the machine profile"
        )
    if "://" in value:
        return f"{value!r} looks like a URL or host; recipes hold no host names (use the machine profile)"
    for var in _VAR.findall(value):
        if var not in PATH_VARS:
            return f"unknown variable ${{{var}}}; known: {', '.join('${' + v + '}' for v in PATH_VARS)}"
    if _VAR.search(value) and not value.startswith("${"):
        return "a ${...} variable may only start a path"
    return None


def uses_variable(value: str) -> bool:
    return bool(_VAR.search(value))


def recipe_findings(recipe: Recipe, base_dir: Path) -> list[Finding]:
    out: list[Finding] = []
    _model(recipe, out)
    _paths(recipe, base_dir, out)
    _steps(recipe, out)
    return out


def _model(recipe: Recipe, out: list[Finding]) -> None:
    m = recipe.model
    sources = [k for k in ("id", "path", "tiny") if getattr(m, k) is not None]
    if len(sources) != 1:
        what = "none" if not sources else " and ".join(sources)
        out.append((("model",), f"give exactly one of id (hub), path (local) or tiny (generated); got {what}", False))
    if m.id is not None:
        if m.revision is None:
            out.append((("model", "id"), "a hub model needs `revision:` pinned to a commit (40 hex characters)", True))
        elif not _SHA.match(m.revision):
            out.append(
                (("model", "revision"), f"{m.revision!r} is not a commit hash; a branch or tag can move, pin the commit", False)
            )
    elif m.revision is not None:
        out.append((("model", "revision"), "revision applies to hub models (`id:`) only", True))
    if recipe.dataset.eval is not None:
        ev = recipe.dataset.eval
        given = [k for k in ("fraction", "size", "path") if getattr(ev, k) is not None]
        if len(given) != 1:
            out.append((("dataset", "eval"), "give exactly one of fraction, size or path", False))


def _paths(recipe: Recipe, base_dir: Path, out: list[Finding]) -> None:
    candidates: list[tuple[Path_, str | None, bool]] = [
        (("model", "path"), recipe.model.path, True),
        (("dataset", "path"), recipe.dataset.path, True),
        (("dataset", "eval", "path"), recipe.dataset.eval.path if recipe.dataset.eval else None, True),
        (("images", "lock"), recipe.images.lock if recipe.images else None, False),
    ]
    tmpl = recipe.dataset.template
    if tmpl.endswith((".jinja", ".j2")):
        candidates.append((("dataset", "template"), tmpl, True))
    for i, step in enumerate(recipe.steps):
        if isinstance(step, MergeStep) and step.output:
            candidates.append((("steps", i, "output"), step.output, False))
            if uses_variable(step.output) or ".." in Path(step.output).parts:
                out.append((("steps", i, "output"), "merge output is a directory inside the run; no variables or ..", False))
        if isinstance(step, EvalStep) and step.path:
            candidates.append((("steps", i, "path"), step.path, True))
    for path, value, must_exist in candidates:
        if value is None:
            continue
        problem = path_problem(value)
        if problem:
            out.append((path, problem, False))
        elif must_exist and not uses_variable(value) and not (base_dir / value).exists():
            out.append((path, f"{value!r} does not exist (relative to {base_dir or '.'})", False))


def _steps(recipe: Recipe, out: list[Finding]) -> None:
    names: dict[str, int] = {}
    seen_train: list[tuple[int, TrainStep]] = []
    seen_merge: list[tuple[int, MergeStep]] = []
    for i, step in enumerate(recipe.steps):
        name = recipe.step_name(i)
        if name in names:
            out.append(
                (("steps", i, "name" if step.name else "type"), f"step name {name!r} is used twice; give each a `name:`", False)
            )
        names.setdefault(name, i)
        here: Path_ = ("steps", i)
        if isinstance(step, PowerStep):
            if (step.caps_w is None) == (not step.restore):
                out.append((here, "a power step either sets `caps_w` or has `restore: true`", False))
            caps = step.caps_w if isinstance(step.caps_w, dict) else {"all": step.caps_w} if step.caps_w else {}
            for gpu, watts in caps.items():
                if not 50 <= watts <= 1500:
                    sub = here + ("caps_w",) + ((gpu,) if gpu != "all" else ())
                    out.append((sub, f"{watts} W is not a plausible GPU power cap (50-1500 W)", False))
        elif isinstance(step, TrainStep):
            _train(step, here, out)
            seen_train.append((i, step))
        elif isinstance(step, MergeStep):
            target = _find(step.adapter, seen_train, recipe)
            if target is None:
                what = f"train step {step.adapter!r}" if step.adapter else "a train step"
                out.append((here + (("adapter",) if step.adapter else ()), f"merge needs {what} before it", bool(step.adapter)))
            elif target.method == "full":
                out.append((here, "full fine-tuning writes whole weights; there is no adapter to merge", False))
            elif step.base == "nf4-dequantized" and target.method != "qlora":
                out.append((here + ("base",), "nf4-dequantized applies to QLoRA adapters only", False))
            seen_merge.append((i, step))
        elif isinstance(step, ServeStep):
            _serve(step, here, recipe, seen_train, seen_merge, out)
        elif isinstance(step, EvalStep):
            _eval(step, here, recipe, seen_train, seen_merge, out)


def _find(name: str | None, seen: list, recipe: Recipe):  # type: ignore[no-untyped-def]
    if not seen:
        return None
    if name is None:
        return seen[-1][1]
    for i, step in seen:
        if recipe.step_name(i) == name:
            return step
    return None


def _train(step: TrainStep, here: Path_, out: list[Finding]) -> None:
    if step.epochs is not None and step.max_steps is not None:
        out.append((here + ("max_steps",), "give epochs or max_steps, not both", True))
    if step.method == "qlora" and step.precision == "fp32":
        out.append((here + ("precision",), "QLoRA computes in 16-bit: use bf16 or fp16", False))
    if isinstance(step.gpus, list):
        if len(set(step.gpus)) != len(step.gpus):
            out.append((here + ("gpus",), "a GPU is listed twice", False))
        if step.distribution == "single" and len(step.gpus) > 1:
            out.append(
                (here + ("distribution",), f"{len(step.gpus)} GPUs listed but distribution is single; use ddp or deepspeed-zero2/3", False)
            )
        if step.distribution != "single" and len(step.gpus) < 2:
            out.append((here + ("gpus",), f"{step.distribution} needs at least 2 GPUs", False))
    if step.cpu_offload and not step.distribution.startswith("deepspeed"):
        out.append((here + ("cpu_offload",), "cpu_offload needs distribution deepspeed-zero2 or deepspeed-zero3", False))
    if step.optimizer in ("paged_adamw_8bit", "adamw_8bit") and step.distribution.startswith("deepspeed"):
        out.append(
            (here + ("optimizer",), "8-bit bitsandbytes optimizers do not shard under DeepSpeed ZeRO; use adamw_torch", False)
        )
    if step.method == "full" and step.lora.model_fields_set:
        out.append((here + ("lora",), "lora settings have no effect with method full", True))


def _serve(step: ServeStep, here: Path_, recipe: Recipe, trains: list, merges: list, out: list[Finding]) -> None:
    if step.model == "merged":
        if _find(step.adapter, merges, recipe) is None:
            out.append((here + ("model",), "serving the merged model needs a merge step before this one", False))
    elif step.model == "adapter":
        target = _find(step.adapter, trains, recipe)
        if target is None or target.method == "full":
            out.append((here + ("model",), "serving an adapter needs a lora/qlora train step before this one", False))
        if step.engine != "vllm":
            out.append((here + ("engine",), "base + adapter serving needs engine vllm (--enable-lora); merge for transformers", False))
    for key in step.args:
        if not re.match(r"^[a-z0-9][a-z0-9_-]*$", key):
            out.append((here + ("args", key), f"engine argument {key!r} should look like max_model_len", True))
    if step.engine == "transformers" and step.gpus != "all" and len(step.gpus) > 1:
        out.append((here + ("gpus",), "transformers serve uses one device", False))


def _eval(step: EvalStep, here: Path_, recipe: Recipe, trains: list, merges: list, out: list[Finding]) -> None:
    if step.prompts is not None and step.path is not None:
        out.append((here, "give prompts or path, not both", False))
    if step.prompts is None and step.path is None and recipe.dataset.eval is None:
        out.append((here, "no prompts: give prompts, path, or an eval split in dataset.eval", False))
    for j, model in enumerate(step.models):
        if model == "merged" and not merges:
            out.append((here + ("models", j), "no merge step before this one", False))
        if model == "adapter" and not [t for _, t in trains if t.method != "full"]:
            out.append((here + ("models", j), "no lora/qlora train step before this one", False))
    if step.min_improvement is not None and len(step.models) < 2:
        out.append((here + ("min_improvement",), "needs two models to compare", True))


def machine_findings(machine: Machine) -> list[Finding]:
    out: list[Finding] = []
    seen: set[int] = set()
    for i, gpu in enumerate(machine.gpus):
        if gpu.index in seen:
            out.append((("gpus", i, "index"), f"GPU index {gpu.index} appears twice", False))
        seen.add(gpu.index)
        if gpu.power is not None:
            p = gpu.power
            if p.min_w > p.max_w:
                out.append((("gpus", i, "power"), "min_w is above max_w", False))
            if p.default_w is not None and not p.min_w <= p.default_w <= p.max_w:
                out.append((("gpus", i, "power", "default_w"), "default_w must lie between min_w and max_w", False))
    if machine.serving is not None:
        for j, idx in enumerate(machine.serving.gpus):
            if idx not in seen:
                out.append((("serving", "gpus", j), f"GPU {idx} is not listed under gpus", False))
    for key in ("models", "datasets", "runs", "hf_cache"):
        value = getattr(machine.paths, key)
        if value is not None and not (value.startswith("/") or value.startswith("~")):
            out.append((("paths", key), "machine paths are absolute (this file describes one machine)", False))
    return out
