"""PSU budget: will the worst-case transient draw stay inside the power supply's limit?

worst case = sum over the GPUs at work of (limit x that GPU model's transient factor)
+ an idle draw for the others + system watts, checked against PSU watts x safety margin.
The limit is the cap in force, else the GPU's default limit. Consumer PSUs trip their
over-current protection on such transients, which is why the guides cap GPUs before every
training run.

A run has power phases: caps set by a power step hold until a `restore: true` step brings
the defaults back, after which other caps may follow, and a server the run leaves running
outlives the final restore. Each phase in which the run works on GPUs is checked on its
own (`run_budgets`): the training phase under its caps, and the serving after a restore
at the default limits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftkit.plan.figures import DEFAULT_TRANSIENT_FACTOR, find_gpu
from ftkit.recipe.models import GpuSpec, Machine

# A GPU with no kernels running (a CUDA context at most) draws roughly 10-30 W and does not
# spike; counted at the top of that range.
IDLE_GPU_W = 30
WORK_KINDS = ("tiny-model", "train", "merge", "quantize", "serve", "eval")


@dataclass
class GpuDraw:
    gpu: int
    model: str
    limit_w: int | None
    capped: bool
    transient_factor: float
    worst_w: float | None
    in_use: bool = True  # False: idle in this phase, counted at IDLE_GPU_W


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
    phase: str | None = None  # the part of the run this budget covers
    steps: list[str] = field(default_factory=list)  # the plan steps working in that phase
    opened_by: str | None = None  # the recipe step that set the phase's limits (a power step)
    uncapped_worst_case_w: float | None = None  # the same GPUs at their default limits
    uncapped_verdict: str | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)  # every phase of the run (plain data)

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


def budget(machine: Machine, caps: dict[int, int], loaded: set[int] | None = None) -> PsuBudget:
    """Worst case with `caps` applied. `loaded`: the GPUs at work (the others idle); None
    means every GPU in the machine works."""
    notes: list[str] = []
    draws = []
    for gpu in machine.gpus:
        cap = caps.get(gpu.index)
        limit = cap if cap is not None else default_limit(gpu)
        factor = transient_factor(gpu)
        in_use = loaded is None or gpu.index in loaded
        if in_use and find_gpu(gpu.model) is None and gpu.transient_w is None:
            notes.append(f"GPU {gpu.index} ({gpu.model}): no transient figure known; assumed x{factor:g}")
        if not in_use:
            worst: float | None = float(IDLE_GPU_W)
        else:
            worst = limit * factor if limit is not None else None
        draws.append(GpuDraw(gpu.index, gpu.model, limit, cap is not None, round(factor, 3), worst, in_use))
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
        notes.append(suggest_cap(machine, limit_w, loaded))
    return PsuBudget(draws, machine.system_watts, worst_total, machine.psu.watts, margin, limit_w, verdict, notes)


def suggest_cap(machine: Machine, limit_w: float, loaded: set[int] | None = None) -> str:
    """Caps for the working GPUs that keep the worst case inside the budget: one cap for all
    where every GPU accepts it, else the GPUs whose minimum is higher stay at that minimum
    and the rest share what is left. Says so when even the minimum caps are too much."""
    working = [g for g in machine.gpus if loaded is None or g.index in loaded]
    idle = (len(machine.gpus) - len(working)) * IDLE_GPU_W
    if not working:
        return "no GPUs at work to cap"
    room = limit_w - machine.system_watts - idle
    lows = {g.index: (allowed_range(g) or (1, 10**6))[0] for g in working}
    floor = sum(lows[g.index] * transient_factor(g) for g in working) + machine.system_watts + idle
    if floor > limit_w:
        mins = ", ".join(f"GPU {g} {w} W" for g, w in sorted(lows.items()))
        need = floor / (machine.psu.safety_margin if machine.psu else 0.9)
        return (f"even at the lowest caps ({mins}) the worst case is {floor:.0f} W > {limit_w:.0f} W: this PSU cannot "
                f"carry these GPUs under load; use a PSU of at least {need:.0f} W or fewer GPUs")
    fixed: dict[int, int] = {}
    while True:
        rest = [g for g in working if g.index not in fixed]
        left = room - sum(fixed[g.index] * transient_factor(g) for g in working if g.index in fixed)
        cap = int(left / sum(transient_factor(g) for g in rest))
        raise_to = {g.index: lows[g.index] for g in rest if lows[g.index] > cap}
        if not raise_to:
            break
        fixed.update(raise_to)
    if not fixed:
        return f"cap every GPU at work at {cap} W or less (power step: caps_w: {cap}) or use a larger PSU"
    caps = {**fixed, **{g.index: cap for g in working if g.index not in fixed}}
    text = ", ".join(f"{g}: {w}" for g, w in sorted(caps.items()))
    return f"cap the GPUs at work at (power step: caps_w: {{{text}}}) or less, or use a larger PSU"


@dataclass
class _Phase:
    label: str
    opened_by: str | None
    caps: dict[int, int]
    steps: list[str] = field(default_factory=list)
    loaded: set[int] = field(default_factory=set)


def run_budgets(machine: Machine, steps: list[Any]) -> list[PsuBudget]:
    """One budget per power phase of the run in which the run works on GPUs or has a server
    up. `steps` are the plan's StepSpecs (kind, id, gpus, power_caps_w, background,
    keep_running, always, recipe_step)."""
    out: list[PsuBudget] = []
    caps: dict[int, int] = {}
    servers: dict[str, tuple[set[int], bool]] = {}  # step id -> (its GPUs, left running after the run)
    service = set(machine.serving.gpus) if machine.serving else set()

    def begin(label: str, opened_by: str | None) -> _Phase:
        p = _Phase(label, opened_by, dict(caps), loaded=set(service))
        for sid, (gpus, _) in servers.items():
            p.steps.append(f"{sid} (still serving)")
            p.loaded |= gpus
        return p

    def close(p: _Phase) -> None:
        if not p.steps:
            return  # the run does nothing on GPUs here
        b = budget(machine, p.caps, p.loaded)
        b.phase, b.steps, b.opened_by = p.label, list(p.steps), p.opened_by
        if p.caps and b.worst_case_w is not None:
            u = budget(machine, {}, p.loaded)
            b.uncapped_worst_case_w, b.uncapped_verdict = u.worst_case_w, u.verdict
        out.append(b)

    phase = begin("before any power step (the limits found at the start)", None)
    for s in steps:
        if s.kind == "power":
            close(phase)
            caps = {**caps, **s.power_caps_w}
            desc = ", ".join(f"GPU {g} {w} W" for g, w in sorted(caps.items()))
            phase = begin(f"after {s.id} (caps {desc})", s.recipe_step)
        elif s.kind == "power-restore":
            close(phase)
            caps = {}
            if s.always:  # the final restore: what the run leaves behind
                servers = {sid: v for sid, v in servers.items() if v[1]}
                phase = begin("after the run (default limits)", None)
            else:
                phase = begin(f"after {s.id} (default limits)", s.recipe_step)
        elif s.kind == "handoff-stop":
            service -= set(s.gpus)
            phase.loaded -= set(s.gpus) - {g for gpus, _ in servers.values() for g in gpus}
        elif s.kind == "handoff-start":
            service |= set(s.gpus)
            phase.loaded |= set(s.gpus)
        elif s.kind in WORK_KINDS and s.gpus:
            phase.steps.append(s.id)
            phase.loaded |= set(s.gpus)
            if s.background:
                servers[s.id] = (set(s.gpus), bool(s.keep_running))
    close(phase)
    return out


def plan_budgets(machine: Machine, steps: list[Any]) -> tuple[PsuBudget | None, PsuBudget | None]:
    """For the plan: (the binding phase's budget, listing every phase in `.phases`; that
    phase's GPUs at their default limits when it has caps). The binding phase is the first
    one over the budget, else the one with the highest worst case. A run that works on no
    GPU: the whole machine at the caps its power steps set."""
    if not machine.gpus:
        return None, None
    phases = run_budgets(machine, steps)
    if not phases:
        caps: dict[int, int] = {}
        for s in steps:
            if s.kind == "power":
                caps.update(s.power_caps_w)
        return budget(machine, caps), (budget(machine, {}) if caps else None)
    over = [b for b in phases if b.verdict == "over"]
    binding = over[0] if over else max(
        phases, key=lambda b: b.worst_case_w if b.worst_case_w is not None else float("inf"))
    binding.phases = [b.as_dict() for b in phases]
    uncapped = None
    if binding.uncapped_worst_case_w is not None:
        uncapped = budget(machine, {}, {d.gpu for d in binding.gpus if d.in_use})
        uncapped.phase = binding.phase
    return binding, uncapped


def phase_budgets(psu: PsuBudget | None) -> list[PsuBudget]:
    """The phases of a plan's budget as PsuBudgets (they are stored as plain data)."""
    if psu is None:
        return []
    if not psu.phases:
        return [psu]
    out = []
    names = set(PsuBudget.__dataclass_fields__)
    for d in psu.phases:
        d = {k: v for k, v in d.items() if k in names}
        d["gpus"] = [g if isinstance(g, GpuDraw) else GpuDraw(**g) for g in d.get("gpus", [])]
        d["phases"] = []
        out.append(PsuBudget(**d))
    return out
