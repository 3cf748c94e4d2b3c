"""Check a resolved recipe against one machine: caps inside each GPU's allowed range, the PSU
budget, and the memory-fit estimate. Findings carry recipe field paths so the CLI can point
at the line that needs changing."""

from __future__ import annotations

from pathlib import PurePosixPath

from ftkit.plan import power
from ftkit.plan.spec import Plan
from ftkit.recipe.checks import Finding
from ftkit.recipe.models import LoadAdapterStep, PowerStep, ServeStep, TrainStep
from ftkit.recipe.resolve import Resolved


def findings(res: Resolved, plan: Plan) -> list[Finding]:
    out: list[Finding] = []
    machine = res.machine
    first_power: int | None = None
    for i, step in enumerate(res.recipe.steps):
        if isinstance(step, PowerStep) and step.caps_w is not None:
            first_power = i if first_power is None else first_power
            caps = step.caps_w if isinstance(step.caps_w, dict) else {g.index: step.caps_w for g in machine.gpus}
            for idx, watts in caps.items():
                sub = ("steps", i, "caps_w") + ((idx,) if isinstance(step.caps_w, dict) else ())
                gpu = machine.gpu(idx)
                if gpu is None:
                    out.append((sub, f"GPU {idx} is not on machine {machine.name!r}", isinstance(step.caps_w, dict)))
                    continue
                rng = power.allowed_range(gpu)
                if rng and not rng[0] <= watts <= rng[1]:
                    out.append((sub, f"{watts} W is outside GPU {idx}'s allowed range {rng[0]}-{rng[1]} W ({gpu.model})", False))
    out.extend(_multinode(res, plan))
    out.extend(_psu_phases(res, plan, first_power))
    out.extend(_serving_port(res, plan))
    out.extend(_live_adapters(res, plan))
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, TrainStep):
            continue
        for est in plan.fit.get(step.name or "train", []):
            if est.verdict == "does not fit":
                tries = "; ".join(est.suggestions[:3])
                out.append(
                    (("steps", i, "method"), f"estimated {est.total_gib:.1f} GiB on GPU {est.gpu} "
                     f"({est.vram_gib:g} GiB): does not fit. Try: {tries}", False)
                )
    return out


def _psu_phases(res: Resolved, plan: Plan, first_power: int | None) -> list[Finding]:
    """Every power phase of the run over the PSU budget, located at the power step that set
    its limits (a cap to lower, or a restore that brought the defaults back too early)."""
    index = {res.recipe.step_name(i): i for i in range(len(res.recipe.steps))}
    out: list[Finding] = []
    seen: set[tuple] = set()
    for b in power.phase_budgets(plan.psu):
        if b.verdict != "over" or b.worst_case_w is None or b.budget_w is None:
            continue
        draws = tuple((d.gpu, d.limit_w, d.in_use) for d in b.gpus)
        if draws in seen:
            continue  # the same GPUs at the same limits: one finding says it
        seen.add(draws)
        i = index.get(b.opened_by) if b.opened_by else None
        if i is None and b.steps:  # after the run: a server left running at the default limits
            kept = b.steps[0].split(" ")[0]
            i = index.get(next((s.recipe_step for s in plan.steps if s.id == kept), None) or "")
        if i is not None:
            step = res.recipe.steps[i]
            where: tuple = ("steps", i, "caps_w") if isinstance(step, PowerStep) and step.caps_w is not None else ("steps", i)
        else:
            where = ("steps", first_power, "caps_w") if first_power is not None else ("steps",)
        phase = f" {b.phase}" if b.phase else ""
        during = f" while {', '.join(b.steps)} run(s)" if b.steps else ""
        out.append((where, f"PSU budget exceeded{phase}: worst case {b.worst_case_w:.0f} W > {b.budget_w:.0f} W "
                           f"({b.psu_w} W x {b.safety_margin:g}){during}; {b.notes[-1]}", False))
    return out


def _serving_port(res: Resolved, plan: Plan) -> list[Finding]:
    """A recipe server on the port the machine's serving service holds could only start once
    that service is stopped: allowed where the plan hands the GPUs over first (the service is
    down then), refused otherwise, naming the service."""
    svc = res.machine.serving
    if svc is None or svc.port is None:
        return []
    order = [s.id for s in plan.steps]
    stopped_at = order.index("handoff-stop") if "handoff-stop" in order else None
    out: list[Finding] = []
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, ServeStep) or step.port != svc.port:
            continue
        here = order.index(step.name) if step.name in order else None
        if stopped_at is not None and here is not None and stopped_at < here:
            continue
        out.append((("steps", i, "port"), f"port {step.port} is held by the machine's serving service {svc.service!r} "
                    f"({svc.manager}), which this plan does not stop first; choose another port", False))
    return out


def _live_adapters(res: Resolved, plan: Plan) -> list[Finding]:
    """A load-adapter step needs its server to be vLLM as planned here (engine auto may have
    chosen transformers serve, which cannot load adapters at run time), still running when
    the step comes (not replaced by a later server on its GPUs)."""
    out: list[Finding] = []
    by_id = {s.id: s for s in plan.steps}
    order = [s.id for s in plan.steps]
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, LoadAdapterStep) or step.server not in by_id:
            continue
        server = by_id[step.server]
        if server.engine != "vllm":
            out.append((("steps", i, "server"), f"server {step.server!r} runs {server.engine} here, which cannot load "
                        "adapters at run time: vLLM can (run in ftkit's images with --executor docker, or install "
                        "vLLM in this environment)", False))
            continue
        between = plan.steps[order.index(server.id) + 1:order.index(step.name or "")] if step.name in order else []
        for later in between:
            if later.background and set(later.gpus) & set(server.gpus):  # the runner stops the earlier one
                out.append((("steps", i, "server"), f"server {step.server!r} is replaced by {later.id} before this "
                            "step: load the adapter into that one", False))
                break
    return out


_INPUT_FIELDS = {"dataset": ("dataset", "path"), "model": ("model", "path"), "template": ("dataset", "template"),
                 "eval": ("dataset", "eval", "path")}


def _multinode(res: Resolved, plan: Plan) -> list[Finding]:
    """A multi-node step runs in the images, and nodes on other hosts bind-mount the run
    directory and the inputs from the same paths: those must be on the shared storage."""
    out: list[Finding] = []
    cluster = res.machine.cluster
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, TrainStep) or step.nodes == 1:
            continue
        if plan.executor != "docker":
            out.append((("steps", i, "nodes"), "a multi-node step runs in ftkit's images on every node: "
                        "use executor docker", False))
        if cluster is None:
            continue
        remote = [n.name for n in cluster.nodes[:step.nodes] if n.docker_host or n.manual]
        if not remote:
            continue
        shared = PurePosixPath(cluster.shared)
        for key, where in _INPUT_FIELDS.items():
            path = res.host_paths.get(key)
            if path is not None and shared not in PurePosixPath(path).parents:
                out.append((where, f"{path} is not inside cluster.shared ({cluster.shared}): node(s) "
                            f"{', '.join(remote)} mount it from the same path", False))
    return out

