"""Check a resolved recipe against one machine: caps inside each GPU's allowed range, the PSU
budget, and the memory-fit estimate. Findings carry recipe field paths so the CLI can point
at the line that needs changing."""

from __future__ import annotations

from ftkit.plan import power
from ftkit.plan.spec import Plan
from ftkit.recipe.checks import Finding
from ftkit.recipe.models import PowerStep, TrainStep
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
    if plan.psu is not None and plan.psu.verdict == "over":
        where = ("steps", first_power, "caps_w") if first_power is not None else ("steps",)
        out.append(
            (where, f"PSU budget exceeded: worst case {plan.psu.worst_case_w:.0f} W > {plan.psu.budget_w:.0f} W "
                    f"({plan.psu.psu_w} W x {plan.psu.safety_margin:g}); {plan.psu.notes[-1]}", False)
        )
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
