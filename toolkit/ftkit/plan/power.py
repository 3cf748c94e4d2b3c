"""PSU budget: will the worst-case transient draw stay inside the power supply's limit?

worst case = sum over GPUs of (limit x that GPU model's transient factor) + system watts,
checked against PSU watts x safety margin. The limit is the cap the recipe sets, else the
GPU's default limit. Consumer PSUs trip their over-current protection on such transients,
which is why the guides cap GPUs before every training run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftkit.plan.catalog import DEFAULT_TRANSIENT_FACTOR, find_gpu
from ftkit.recipe.models import GpuSpec, Machine


@dataclass
class GpuDraw:
    gpu: int
    model: str
    limit_w: int | None
    capped: bool
    transient_factor: float
    worst_w: float | None


@dataclass
class PsuBudget:
    gpus: list[GpuDraw]
    system_w: int
    worst_case_w: float | None
    psu_w: int | None
    safety_margin: float
    budget_w: float | None
    verdict: str  # ok | over | unknown
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_limit(gpu: GpuSpec) -> int | None:
    if gpu.power and gpu.power.default_w:
        return gpu.power.default_w
    model = find_gpu(gpu.model)
    if model:
        return model.tdp_w
    return gpu.power.max_w if gpu.power else None


def transient_factor(gpu: GpuSpec) -> float:
    model = find_gpu(gpu.model)
    if gpu.transient_w:
        base = default_limit(gpu)
        if base:
            return gpu.transient_w / base
    return model.transient_factor if model else DEFAULT_TRANSIENT_FACTOR


def allowed_range(gpu: GpuSpec) -> tuple[int, int] | None:
    if gpu.power:
        return gpu.power.min_w, gpu.power.max_w
    model = find_gpu(gpu.model)
    return (model.min_w, model.max_w) if model else None


def budget(machine: Machine, caps: dict[int, int]) -> PsuBudget:
    """Worst case for all GPUs in the machine (idle ones draw too), with `caps` applied."""
    notes: list[str] = []
    draws = []
    for gpu in machine.gpus:
        cap = caps.get(gpu.index)
        limit = cap if cap is not None else default_limit(gpu)
        factor = transient_factor(gpu)
        if find_gpu(gpu.model) is None and gpu.transient_w is None:
            notes.append(f"GPU {gpu.index} ({gpu.model}): no transient figure known; assumed x{factor:g}")
        worst = limit * factor if limit is not None else None
        draws.append(GpuDraw(gpu.index, gpu.model, limit, cap is not None, round(factor, 3), worst))
    margin = machine.psu.safety_margin if machine.psu else 0.9
    unknown = [d.gpu for d in draws if d.worst_w is None]
    if unknown:
        notes.append(f"GPU(s) {unknown}: no power limit known; give power.default_w in the profile")
    worst_total = None if unknown else sum(d.worst_w or 0 for d in draws) + machine.system_watts
    if machine.psu is None:
        notes.append("no psu in the machine profile: cannot check the budget")
        return PsuBudget(draws, machine.system_watts, worst_total, None, margin, None, "unknown", notes)
    limit_w = machine.psu.watts * margin
    verdict = "unknown" if worst_total is None else ("ok" if worst_total <= limit_w else "over")
    if verdict == "over":
        notes.append(suggest_cap(machine, limit_w))
    return PsuBudget(draws, machine.system_watts, worst_total, machine.psu.watts, margin, limit_w, verdict, notes)


def suggest_cap(machine: Machine, limit_w: float) -> str:
    """The single cap for all GPUs that keeps the worst case inside the budget."""
    factors = sum(transient_factor(g) for g in machine.gpus)
    if factors <= 0:
        return "no GPUs to cap"
    cap = int((limit_w - machine.system_watts) / factors)
    return f"cap every GPU at {cap} W or less (power step: caps_w: {cap}) or use a larger PSU"
