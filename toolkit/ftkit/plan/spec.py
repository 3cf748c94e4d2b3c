"""The plan as plain data: what `ftkit plan` prints and `ftkit up` executes.

A StepSpec says everything needed to run one step - the image or local command, argv, env,
mounts, GPUs, power caps and the generated files - so executors stay thin and a plan can
be read, diffed and stored (plan.json) without re-reading the recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftkit.plan.memory import FitEstimate
from ftkit.plan.power import PsuBudget


@dataclass
class Mount:
    host: str
    container: str
    read_only: bool = True


@dataclass
class GeneratedFile:
    path: str  # relative to the run directory
    content: str


@dataclass
class StepSpec:
    id: str  # unique within the plan; names the log file and the journal entry
    kind: str  # power | power-restore | handoff-stop | handoff-start | tiny-model | train | merge | serve | eval
    description: str
    executor: str  # local | docker | nvml | service
    recipe_step: str | None = None
    image: str | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    power_caps_w: dict[int, int] = field(default_factory=dict)
    files: list[GeneratedFile] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    background: bool = False  # a server: started, checked ready, left running or stopped at the end
    ready: dict[str, Any] | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)
    keep_running: bool = False
    always: bool = False  # runs at the end even when an earlier step failed (restores)
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    recipe: str
    recipe_file: str
    machine: str
    executor: str
    run_dir: str
    steps: list[StepSpec]
    fit: dict[str, list[FitEstimate]]
    psu: PsuBudget | None
    psu_uncapped: PsuBudget | None
    layout: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def step(self, step_id: str) -> StepSpec:
        return next(s for s in self.steps if s.id == step_id)
