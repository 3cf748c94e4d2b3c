"""The plan as plain data: what `ftkit plan` prints, `ftkit up` executes and `ftkit compose`
renders.

A StepSpec says everything needed to run one step - the image or local command, argv, env,
mounts, GPUs, the lease it runs under, ports, power caps and the generated files - so
executors stay thin and a plan can be read, diffed, stored (plan.json) and executed again
(`ftkit up --resume`) without re-reading the recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from ftkit.plan.memory import FitEstimate
from ftkit.plan.power import GpuDraw, PsuBudget


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
class Port:
    """A server's port: published on host_ip:host (docker) or bound directly (local)."""

    container: int
    host: int
    host_ip: str = "127.0.0.1"


@dataclass
class LeaseSpec:
    """The GPU lease a step runs under (`ftkit lease`): one owner per GPU at a time.

    `train` holders wait their turn and never yield; `serve` holders are preemptible: a
    waiting `train` makes them stop (or sleep) the engine and take the GPUs back after."""

    role: str  # train | serve
    gpus: list[int]  # host indices
    grace_s: int = 30
    max_power_w: dict[int, int] = field(default_factory=dict)  # train: refuse above these enforced limits
    sleep_url: str | None = None  # serve: vLLM sleep mode instead of stopping the engine


@dataclass
class NodeSpec:
    """One node of a multi-node step: where its trainer runs and how it differs from the
    others (its rank, its launcher flags, its network interface). The image, the recipe's
    configs and the mounts are the step's, the same on every node."""

    rank: int  # the machine rank (accelerate --machine_rank); rank 0 hosts the c10d store
    name: str
    address: str  # how the other nodes reach this one (its alias on a user-defined Docker network)
    argv: list[str]  # the engine command on this node (the step's argv plus its rank)
    env: dict[str, str] = field(default_factory=dict)  # over the step's env on this node
    gpus: list[int] = field(default_factory=list)  # host indices on this node
    docker_host: str | None = None  # None: this machine's engine (the plan's docker.host)
    network: str = "host"  # Docker network of the container
    manual: bool = False  # ftkit cannot reach this node's engine: it prints the command instead


@dataclass
class StepSpec:
    id: str  # unique within the plan; names the log file, the journal entry and the compose service
    kind: str  # power | power-restore | handoff-stop | handoff-start | tiny-model | train | merge | serve | load-adapter | eval
    description: str
    executor: str  # local | docker | nvml | service | http (a request ftkit itself sends: load-adapter)
    recipe_step: str | None = None
    image: str | None = None
    argv: list[str] = field(default_factory=list)  # the engine command (the lease wrapper is added from `lease`)
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    lease: LeaseSpec | None = None
    ports: list[Port] = field(default_factory=list)
    shm_size: str | None = None  # docker: /dev/shm for NCCL and vLLM's workers
    labels: dict[str, str] = field(default_factory=dict)
    power_caps_w: dict[int, int] = field(default_factory=dict)
    files: list[GeneratedFile] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    background: bool = False  # a server: started, checked ready, left running or stopped at the end
    ready: dict[str, Any] | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)
    keep_running: bool = False
    always: bool = False  # runs at the end even when an earlier step failed (restores)
    replaced_by: str | None = None  # handoff-start: not needed when this serve step succeeded and runs on
    notes: list[str] = field(default_factory=list)
    nodes: list[NodeSpec] = field(default_factory=list)  # a multi-node train step: one trainer per node
    engine: str | None = None  # serve: vllm | transformers (decided at plan time, see plan.serving)
    platform: str | None = None  # serve: cuda | cpu (where the engine does its work)
    request: dict[str, Any] | None = None  # load-adapter: the server step, method, url and JSON body ftkit sends


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
    python: str = "python"  # the interpreter local steps run with
    lease_dir: str | None = None  # host directory of the GPU lease's lock files
    docker: dict[str, Any] = field(default_factory=dict)  # host, base_image, wheelhouse, ca_bundle, build_missing
    telemetry: dict[str, Any] = field(default_factory=dict)  # enabled, interval_s
    simulated_gpus: list[str] | None = None  # GPU names of a simulated machine (no GPU exists)
    cluster: dict[str, Any] = field(default_factory=dict)  # nodes, rendezvous, shared path, measured all-reduce
    local_vllm: bool = False  # vLLM is installed in `python` (what engine auto saw for the local executor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def step(self, step_id: str) -> StepSpec:
        return next(s for s in self.steps if s.id == step_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from plan.json (what `--resume` executes: never the recipe again)."""
        d = dict(data)
        d["steps"] = [_step(s) for s in d["steps"]]
        d["fit"] = {k: [FitEstimate(**e) for e in v] for k, v in (d.get("fit") or {}).items()}
        d["psu"] = _budget(d.get("psu"))
        d["psu_uncapped"] = _budget(d.get("psu_uncapped"))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _int_keys(d: dict[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


def _step(s: dict[str, Any]) -> StepSpec:
    d = dict(s)
    d["mounts"] = [Mount(**m) for m in d.get("mounts", [])]
    d["files"] = [GeneratedFile(**f) for f in d.get("files", [])]
    d["ports"] = [Port(**p) for p in d.get("ports", [])]
    d["power_caps_w"] = _int_keys(d.get("power_caps_w", {}))
    d["nodes"] = [NodeSpec(**n) for n in d.get("nodes", [])]
    if d.get("lease"):
        lease = dict(d["lease"])
        lease["max_power_w"] = _int_keys(lease.get("max_power_w", {}))
        d["lease"] = LeaseSpec(**lease)
    names = {f.name for f in dataclasses.fields(StepSpec)}
    return StepSpec(**{k: v for k, v in d.items() if k in names})


def _budget(b: dict[str, Any] | None) -> PsuBudget | None:
    if not b:
        return None
    d = dict(b)
    d["gpus"] = [GpuDraw(**g) for g in d.get("gpus", [])]
    names = {f.name for f in dataclasses.fields(PsuBudget)}
    return PsuBudget(**{k: v for k, v in d.items() if k in names})
