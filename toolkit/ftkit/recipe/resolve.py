"""Stage 3: fill in every default so the plan and the run directory show the recipe exactly
as it will run (`recipe.resolved.yaml`): step names, epochs, GPU lists, host paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import ConfigError, ConfigIssue
from ftkit.recipe.checks import (
    PATH_VARS,
    dataset_findings,
    kind_problem,
    lock_file_problem,
    pair_findings,
    uses_variable,
)
from ftkit.recipe.models import (
    EvalStep,
    GpuIndex,
    LoadAdapterStep,
    Machine,
    MergeStep,
    PreferenceStep,
    QuantizeStep,
    Recipe,
    ServeStep,
    TrainStep,
)
from ftkit.recipe.validate import LoadedRecipe
from ftkit.recipe.yamlpos import Path_


class ResolvedTrainStep(TrainStep):
    """A train step after resolve: `gpus: all` is the GPU indices (on each node for a
    multi-node step; none: the CPU), so planning never sees "all"."""

    gpus: list[GpuIndex]  # type: ignore[assignment]


class ResolvedPreferenceStep(PreferenceStep, ResolvedTrainStep):
    """A preference step after resolve (its GPUs as a train step's)."""


class ResolvedServeStep(ServeStep):
    """A serve step after resolve: `gpus: all` is the machine's GPU indices."""

    gpus: list[GpuIndex]  # type: ignore[assignment]


class ResolvedQuantizeStep(QuantizeStep):
    """A quantize step after resolve: no `gpus` is the machine's first GPU, or none (the CPU)."""

    gpus: list[GpuIndex]  # type: ignore[assignment]


# The recipe step types whose resolved form has a narrower type (the others resolve in place).
_RESOLVED_TYPES: dict[type, type] = {TrainStep: ResolvedTrainStep, PreferenceStep: ResolvedPreferenceStep,
                                     ServeStep: ResolvedServeStep, QuantizeStep: ResolvedQuantizeStep}


def _resolved_type(step: Any) -> Any:
    """The step as its resolved type: the same values (already filled in), nothing validated
    again; it dumps as the recipe step it was (recipe.resolved.yaml)."""
    cls = _RESOLVED_TYPES.get(type(step))
    if cls is None:
        return step
    values = {k: getattr(step, k) for k in type(step).model_fields}
    return cls.model_construct(_fields_set=set(step.model_fields_set), **values)


@dataclass
class Resolved:
    """A recipe with nothing left implicit, bound to one machine."""

    recipe: Recipe
    machine: Machine
    source: Path  # the recipe file
    host_paths: dict[str, Path] = field(default_factory=dict)  # dataset, eval, model, template, images_lock

    def to_yaml_data(self) -> dict[str, Any]:
        return self.recipe.model_dump(mode="json", exclude_none=True)


_KINDS = {"dataset": "file-or-dir", "pairs": "file-or-dir", "harness": "file-or-dir", "eval": "file", "model": "dir", "images_lock": "file", "template": "file"}


def expand(value: str, base_dir: Path, machine: Machine) -> Path | None:
    """A recipe path on this machine; None when it uses a variable the profile lacks."""
    if uses_variable(value):
        for var in PATH_VARS:
            token = "${" + var + "}"
            if value.startswith(token):
                root = getattr(machine.paths, var)
                if root is None:
                    return None
                return Path(root).expanduser() / value[len(token) :].lstrip("/")
        return None
    return (base_dir / value).resolve()


def resolve(loaded: LoadedRecipe, machine: Machine) -> Resolved:
    recipe = loaded.recipe.model_copy(deep=True)
    issues: list[ConfigIssue] = []

    def problem(path: Path_, message: str) -> None:
        issues.append(loaded.doc.issue(path, message))

    gpu_indices = [g.index for g in machine.gpus]
    for i, step in enumerate(recipe.steps):
        step.name = recipe.step_name(i)
        if isinstance(step, TrainStep):
            if step.epochs is None and step.max_steps is None:
                step.epochs = 1.0
            if step.nodes > 1:  # the GPUs of each cluster node, not of this machine
                _nodes(step, i, machine, problem)
            elif step.gpus == "all":
                wanted = gpu_indices if step.distribution != "single" else gpu_indices[:1]
                step.gpus = list(wanted)
            for j, idx in enumerate(step.gpus if step.nodes == 1 else []):
                if idx not in gpu_indices:
                    problem(("steps", i, "gpus", j), f"GPU {idx} is not on machine {machine.name!r} (has {gpu_indices or 'none'})")
            if not step.gpus and step.method == "qlora" and recipe.model.tiny is not None:
                _cpu_qlora_sizes(recipe, i, problem)
            if step.distribution != "single" and len(step.gpus) < 2 and step.nodes == 1:
                problem(("steps", i, "distribution"), f"{step.distribution} needs 2+ GPUs; machine {machine.name!r} has {len(gpu_indices)}")
        elif isinstance(step, ServeStep):
            if step.gpus == "all":
                step.gpus = list(gpu_indices)
            for j, idx in enumerate(step.gpus):
                if idx not in gpu_indices:
                    problem(("steps", i, "gpus", j), f"GPU {idx} is not on machine {machine.name!r}")
            if step.served_name is None:
                step.served_name = recipe.name
        elif isinstance(step, MergeStep):
            if step.output is None:
                step.output = f"steps/{step.name}/model"
            if step.adapter is None:
                step.adapter = _last(recipe, i, TrainStep)
        elif isinstance(step, QuantizeStep):
            if step.output is None:
                step.output = f"steps/{step.name}/model"
            if step.merge is None:
                step.merge = _last(recipe, i, MergeStep)
            if step.gpus is None:  # the machine's first GPU calibrates; none: the CPU
                step.gpus = list(gpu_indices[:1])
            for j, idx in enumerate(step.gpus):
                if idx not in gpu_indices:
                    problem(("steps", i, "gpus", j), f"GPU {idx} is not on machine {machine.name!r}")
        elif isinstance(step, EvalStep) and step.prompts is None and step.path is None:
            pass  # the dataset's eval split, resolved by the engine
    for i, step in enumerate(recipe.steps):
        if isinstance(step, ServeStep) and step.adapter is None:
            kind = (MergeStep if step.model == "merged" else QuantizeStep if step.model == "quantized"
                    else TrainStep if step.model == "adapter" else None)
            step.adapter = _last(recipe, i, kind) if kind else None
        elif isinstance(step, LoadAdapterStep):
            step.server = step.server or _last(recipe, i, ServeStep)
            step.adapter = step.adapter or _last(recipe, i, TrainStep)
            step.served_name = step.served_name or step.adapter
        elif isinstance(step, EvalStep) and step.harness is not None:
            step.harness.server = step.harness.server or _last(recipe, i, ServeStep)

    host: dict[str, Path] = {}
    candidates: list[tuple[str, Path_, str | None]] = [
        ("dataset", ("dataset", "path"), recipe.dataset.path),
        ("eval", ("dataset", "eval", "path"), recipe.dataset.eval.path if recipe.dataset.eval else None),
        ("model", ("model", "path"), recipe.model.path),
        ("images_lock", ("images", "lock"), recipe.images.lock if recipe.images else None),
    ]
    if recipe.dataset.template.endswith((".jinja", ".j2")):
        candidates.append(("template", ("dataset", "template"), recipe.dataset.template))
    for i, step in enumerate(recipe.steps):
        if isinstance(step, EvalStep) and step.path:
            candidates.append((f"eval:{step.name}", ("steps", i, "path"), step.path))
        if isinstance(step, EvalStep) and step.harness is not None:
            from ftkit.recipe.harness import is_path

            candidates += [(f"harness:{step.name}:{j}", ("steps", i, "harness", "tasks", j), t)
                           for j, t in enumerate(step.harness.tasks) if is_path(t)]
        if isinstance(step, PreferenceStep):
            candidates.append((f"pairs:{step.name}", ("steps", i, "data", "path"), step.data.path))
            if step.data.eval is not None and step.data.eval.path:
                candidates.append((f"pairs-eval:{step.name}", ("steps", i, "data", "eval", "path"), step.data.eval.path))
    variable_datasets: dict[Path_, Path] = {}
    variable_pairs: dict[Path_, Path] = {}
    for key, path, value in candidates:
        if value is None:
            continue
        resolved = expand(value, loaded.base_dir, machine)
        if resolved is None:
            var = value.split("}")[0][2:]
            problem(path, f"${{{var}}} is not set in machine profile {machine.name!r}: add paths.{var} to it")
        else:
            host[key] = resolved
            # Through a ${variable} the path is only known now; it may not exist here (a plan
            # for another machine), but where it does it must be the kind of thing it names.
            kind = _KINDS.get(key.split(":", 1)[0], "file")
            wrong = kind_problem(resolved, kind)
            if wrong:
                problem(path, f"{resolved} {wrong}")
            elif key == "images_lock" and resolved.is_file():
                bad = lock_file_problem(resolved)
                if bad:
                    problem(path, f"{resolved}: {bad}")
            elif key in ("dataset", "eval") and uses_variable(value) and resolved.exists():
                variable_datasets[path] = resolved  # a literal path was read at load time
            elif key.startswith(("pairs:", "pairs-eval:")) and uses_variable(value) and resolved.exists():
                variable_pairs[path] = resolved
    if variable_datasets:
        for path, message, _ in dataset_findings(recipe, variable_datasets):
            problem(path, message)
    for path, message, _ in pair_findings(recipe, variable_pairs):
        problem(path, message)
    if issues:
        raise ConfigError(issues)
    recipe.steps = [_resolved_type(step) for step in recipe.steps]
    return Resolved(recipe, machine, loaded.path, host)


def _cpu_qlora_sizes(recipe: Recipe, i: int, problem: Any) -> None:
    """bitsandbytes' CPU 4-bit matmul (0.50.2) takes a 2-D weight's block scales row by row,
    which is wrong when a row (a layer's input size) is not a whole number of its 64-weight
    blocks: the layer computes with a neighbour's scales (measured: 3% off on a 32-wide
    layer, exact at 128). Real models' sizes are multiples of 64; a tiny one must be too."""
    tiny = recipe.model.tiny
    if tiny is None:
        return
    for key in ("hidden_size", "intermediate_size"):
        size = getattr(tiny, key)
        if size % 64:
            lower = size // 64 * 64
            use = f"{lower} or {lower + 64}" if lower else f"{lower + 64}"
            problem(("model", "tiny", key), f"{size}: QLoRA on the CPU needs layer sizes that are multiples of 64 "
                    f"(bitsandbytes' CPU 4-bit matmul uses the wrong block scales otherwise); use {use}, "
                    f"or method: lora in steps[{i}]")


def _nodes(step: TrainStep, i: int, machine: Machine, problem: Any) -> None:
    """A multi-node step trains on the first `nodes` hosts of the machine's cluster; `gpus:
    all` means the first node's GPUs, and every node must have the GPUs the step names."""
    cluster = machine.cluster
    if cluster is None:
        problem(("steps", i, "nodes"), f"nodes: {step.nodes} needs a cluster: machine profile {machine.name!r} has no "
                "cluster section (nodes, rendezvous, shared)")
        if step.gpus == "all":
            step.gpus = []
        return
    if len(cluster.nodes) < step.nodes:
        problem(("steps", i, "nodes"), f"nodes: {step.nodes}, but machine profile {machine.name!r} lists "
                f"{len(cluster.nodes)} cluster node(s)")
    used = cluster.nodes[:step.nodes]
    if step.gpus == "all":
        step.gpus = list(used[0].gpus) if step.distribution != "single" else list(used[0].gpus[:1])
    for node in used:
        missing = [g for g in step.gpus if g not in node.gpus]
        if missing:
            problem(("steps", i, "gpus"), f"GPU(s) {missing} are not on cluster node {node.name!r} "
                    f"(has {node.gpus or 'none'}); every node trains on the same GPU indices")
            break


def _last(recipe: Recipe, before: int, kind: type) -> str | None:
    for j in range(before - 1, -1, -1):
        if isinstance(recipe.steps[j], kind):
            return recipe.step_name(j)
    return None
