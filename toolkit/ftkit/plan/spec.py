"""The plan as plain data: what `ftkit plan` prints, `ftkit up` executes and `ftkit compose`
renders.

A StepSpec says everything needed to run one step - the image or local command, argv, env,
mounts, GPUs, the lease it runs under, ports, power caps and the generated files - so
executors stay thin and a plan can be read, diffed, stored (plan.json) and executed again
(`ftkit up --resume`) without re-reading the recipe.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal, Self

from ftkit.plan.memory import FitEstimate
from ftkit.plan.power import GpuDraw, PsuBudget


class PlanPart:
    """A frozen part of a plan or step that plan.json holds as an object of its fields."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(typing.cast(Any, self))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Self:
        """Built from plan.json's object; a missing field or a non-object is located at `where`."""
        return typing.cast(Self, _build(cls, data, where))


# What a step does (the runner and the renderers branch on it) and who runs it.
StepKind = Literal["power", "power-restore", "handoff-stop", "handoff-start", "tiny-model", "train", "merge",
                   "quantize", "serve", "load-adapter", "eval"]
# local | docker: a process here or a container; nvml: ftkit sets power limits itself; service:
# a command that stops or starts the machine's serving service; http: a request ftkit sends.
StepExecutor = Literal["local", "docker", "nvml", "service", "http"]
ExecutorKind = Literal["local", "docker"]  # what runs a plan's process steps (`ftkit up --executor`)


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


@dataclass(frozen=True)
class Ready(PlanPart):
    """How ftkit knows a server answers and how its clients reach it (a serve step's; a
    load-adapter step's is its server's, with the adapter's name and its own timeout)."""

    health: str = ""
    models: str = ""
    timeout_s: float = 600
    base_url: str = ""  # the OpenAI-compatible API, http://127.0.0.1:<port>/v1
    served_name: str = ""  # the model name the test prompts ask for
    port: int = 0
    host: str = "127.0.0.1"  # the address the port is published (or bound) on
    adapters: list[str] = field(default_factory=list)  # LoRA adapters the server starts with



@dataclass(frozen=True)
class LoadRequest(PlanPart):
    """The request a load-adapter step sends to its server's vLLM (ftkit sends it itself)."""

    server: str | None  # the serve step whose engine gets the adapter
    method: str
    url: str
    body: dict[str, Any]  # vLLM's /v1/load_lora_adapter body: lora_name, lora_path, load_inplace
    adapter_dir: str  # the adapter, relative to the run directory (checked before the request)



@dataclass(frozen=True)
class DockerSettings(PlanPart):
    """The machine's Docker settings a docker plan runs with: the engine, and how a missing
    image is built (the same flags `ftkit build` takes)."""

    host: str | None = None  # None: this machine's engine
    base_image: str | None = None
    wheelhouse: str | None = None
    ca_bundle: str | None = None
    images_lock: str | None = None
    build_missing: bool = True

    def build_flags(self) -> list[tuple[str, str]]:
        """(flag, value) of `ftkit build` for the settings that change how an image is built."""
        return [(f"--{k.replace('_', '-')}", str(v)) for k, v in
                (("base_image", self.base_image), ("wheelhouse", self.wheelhouse), ("ca_bundle", self.ca_bundle)) if v]



@dataclass(frozen=True)
class TelemetrySettings(PlanPart):
    """GPU and host samples beside every GPU step (telemetry.csv)."""

    enabled: bool = True
    interval_s: float = 1.0


@dataclass(frozen=True)
class ClusterNode(PlanPart):
    """A node of the machine's cluster that the plan trains on."""

    name: str
    address: str
    docker_host: str | None
    gpus: list[int]
    manual: bool


@dataclass(frozen=True)
class Allreduce(PlanPart):
    """The cluster's last `ftkit bench --allreduce` (observe.allreduce wrote it)."""

    file: str
    taken: Any  # as the file says (a time, the backend, the processes): shown, never computed with
    backend: Any
    world_size: Any
    results: list[Any]  # one row per message size: bytes, algbw_gbps, busbw_gbps


@dataclass(frozen=True)
class ClusterInfo(PlanPart):
    """What a multi-node plan shows about the cluster: its nodes and rendezvous, the bytes
    each multi-node step all-reduces per optimizer step, and what the last measured
    all-reduce means for them (prepare adds that: it reads a file)."""

    nodes: list[ClusterNode]
    rendezvous: str  # host:port of the c10d store
    network: str
    shared: str | None
    nodes_used: int
    gradient_bytes: dict[str, int] | None = None  # per step; None without the model's figures
    allreduce: Allreduce | None = None  # None: not measured yet
    expected_scaling: dict[str, dict[str, Any]] | None = None  # per step, from the measured all-reduce

    def to_dict(self) -> dict[str, Any]:
        """plan.json's shape: the scaling keys only where there are gradient bytes to scale
        (allreduce then says null when unmeasured), expected_scaling only once measured."""
        d = asdict(self)
        if self.gradient_bytes is None:
            del d["gradient_bytes"], d["allreduce"]
        if self.expected_scaling is None:
            del d["expected_scaling"]
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Self:
        if not isinstance(data, dict):
            raise PlanFormatError(f"{where}: expected an object, got {_kind(data)}")
        d = dict(data)
        d["nodes"] = [ClusterNode.from_dict(n, f"{where}.nodes[{i}]") for i, n in enumerate(_items(d, "nodes", where))]
        if d.get("allreduce") is not None:
            d["allreduce"] = Allreduce.from_dict(d["allreduce"], f"{where}.allreduce")
        return typing.cast(Self, _build(cls, d, where))


def run_label(run_dir: str) -> str:
    """The `dev.ftkit.run` label of a run's containers (and the middle of their names):
    the run directory's name and a digest of its whole path. The name alone is not unique -
    every compose stack's run directory is `run`, tests make many - and `ftkit down` stops the
    containers carrying a run's label, so a label two runs share stops the other's too."""
    import hashlib

    name = PurePosixPath(run_dir).name or "run"
    return f"{name}-{hashlib.sha256(run_dir.encode()).hexdigest()[:8]}"


@dataclass
class StepSpec:
    id: str  # unique within the plan; names the log file, the journal entry and the compose service
    kind: StepKind
    description: str
    executor: StepExecutor
    recipe_step: str | None = None
    image: str | None = None
    argv: list[str] = field(default_factory=list)  # the engine command (the lease wrapper is added from `lease`)
    env: dict[str, str] = field(default_factory=dict)
    # Names whose values the executor copies from ftkit's own environment as the step starts:
    # secrets (a tracking server's token) that must never be written to the plan or the run.
    env_from_host: list[str] = field(default_factory=list)
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
    ready: Ready | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)
    keep_running: bool = False
    always: bool = False  # runs at the end even when an earlier step failed (restores)
    replaced_by: str | None = None  # handoff-start: not needed when this serve step succeeded and runs on
    notes: list[str] = field(default_factory=list)
    nodes: list[NodeSpec] = field(default_factory=list)  # a multi-node train step: one trainer per node
    engine: str | None = None  # serve: vllm | transformers (decided at plan time, see plan.serving)
    platform: str | None = None  # serve: cuda | cpu (where the engine does its work)
    request: LoadRequest | None = None  # load-adapter: what ftkit sends to the server
    # train: the step limit the engine stops at (the recipe's max_steps; None: by epochs), so the
    # progress display knows the total without reading the engine's job back
    max_steps: int | None = None


@dataclass
class Plan:
    recipe: str
    recipe_file: str
    machine: str
    executor: ExecutorKind
    run_dir: str
    steps: list[StepSpec]
    fit: dict[str, list[FitEstimate]]
    psu: PsuBudget | None
    psu_uncapped: PsuBudget | None
    layout: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    python: str = "python"  # the interpreter local steps run with
    lease_dir: str | None = None  # host directory of the GPU lease's lock files
    docker: DockerSettings | None = None  # a docker plan's; plan.json writes None as {}
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    simulated_gpus: list[str] | None = None  # GPU names of a simulated machine (no GPU exists)
    cluster: ClusterInfo | None = None  # a multi-node plan's; plan.json writes None as {}
    local_vllm: bool = False  # vLLM is installed in `python` (what engine auto saw for the local executor)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["docker"] = d["docker"] or {}
        d["cluster"] = self.cluster.to_dict() if self.cluster is not None else {}
        return d

    @property
    def docker_host(self) -> str | None:
        """The Docker engine the plan's containers run on (None: this machine's)."""
        return self.docker.host if self.docker is not None else None

    def step(self, step_id: str) -> StepSpec:
        return next(s for s in self.steps if s.id == step_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from plan.json (what `--resume` executes: never the recipe again).

        plan.json is read back from disk, so its types are checked here, once, against the
        dataclasses' annotations (an `argv` that is a string would otherwise run as a list of
        its characters, or pass a dry run): PlanFormatError names the field, e.g.
        `steps[2].argv`. Step ids and the paths the plan writes to must stay inside the run
        directory."""
        if not isinstance(data, dict):
            raise PlanFormatError(f"<document>: expected an object, got {_kind(data)}")
        d = dict(data)
        steps = d.get("steps")
        if not isinstance(steps, list) or not steps:
            raise PlanFormatError(f"steps: expected a non-empty list, got {_kind(steps)}")
        d["steps"] = [_step(s, f"steps[{i}]") for i, s in enumerate(steps)]
        fit = d.get("fit") or {}
        _expect(fit, dict[str, list[dict[str, Any]]], "fit")
        d["fit"] = {k: [_build(FitEstimate, e, f"fit.{k}[{i}]") for i, e in enumerate(v)] for k, v in fit.items()}
        d["psu"] = _budget(d.get("psu"), "psu")
        d["psu_uncapped"] = _budget(d.get("psu_uncapped"), "psu_uncapped")
        d["docker"] = DockerSettings.from_dict(d["docker"], "docker") if d.get("docker") else None  # {}: local
        d["telemetry"] = TelemetrySettings.from_dict(d.get("telemetry") or {}, "telemetry")
        d["cluster"] = ClusterInfo.from_dict(d["cluster"], "cluster") if d.get("cluster") else None  # {}: one node
        plan = _build(cls, d, "")
        for f in dataclasses.fields(cls):
            if f.name not in ("fit", "psu", "psu_uncapped"):  # informational; built above
                _expect(getattr(plan, f.name), _hints(cls)[f.name], f.name)
        for raw, step in zip(steps, plan.steps, strict=True):
            if isinstance(raw, dict) and "max_steps" not in raw:  # a plan.json written before the field
                step.max_steps = _max_steps_in_config(step)
        ids = [s.id for s in plan.steps]
        for i, step in enumerate(plan.steps):
            where = f"steps[{i}]"
            if step.max_steps is not None and not 0 < step.max_steps <= MAX_STEPS_LIMIT:
                raise PlanFormatError(f"{where}.max_steps: {_short(step.max_steps)} is not a step count")
            if not SAFE_NAME.fullmatch(step.id):
                raise PlanFormatError(f"{where}.id: {step.id!r} is not a step id (it names the step's log file)")
            if ids.count(step.id) > 1:
                raise PlanFormatError(f"{where}.id: {step.id!r} is used by more than one step")
            for j, gen in enumerate(step.files):
                _inside(gen.path, f"{where}.files[{j}].path")
            for key, rel in step.outputs.items():
                _inside(rel, f"{where}.outputs.{key}")
            for j, node in enumerate(step.nodes):
                if not SAFE_NAME.fullmatch(node.name):
                    raise PlanFormatError(f"{where}.nodes[{j}].name: {node.name!r} is not a node name")
        return plan


def _max_steps_in_config(step: StepSpec) -> int | None:
    """A train step's step limit from its generated engine config, for a plan.json older than
    StepSpec.max_steps (its run can still be resumed and shown with its progress)."""
    import json

    for f in step.files:
        if f.path.startswith("configs/train-"):
            try:
                value = json.loads(f.content)["train"].get("max_steps")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                return None
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    return None


MAX_STEPS_LIMIT = 10**9  # far above any recipe's (validate allows 1e8), far below an overflow


def _short(value: Any) -> str:
    """A value from plan.json in a one-line message: cut, never 200 kB of it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class PlanFormatError(ValueError):
    """A plan.json that is not the shape of a Plan; the message starts with the field."""


# A step id or node name: it names a file in the run directory (logs/<id>.log, nodes/<name>.sh).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _inside(rel: str, where: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts or "\0" in rel:
        raise PlanFormatError(f"{where}: {rel!r} is not a path inside the run directory")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _expect(value: Any, hint: Any, where: str) -> None:
    """Raise PlanFormatError unless `value` has the annotated type `hint` (str, int, float,
    bool, None, Any, list[X], dict[K, V], X | None, and the plan's dataclasses). An int is
    not a bool here, and a float field takes an int (JSON writes 300.0 as 300 elsewhere)."""
    if hint is Any:
        return
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise PlanFormatError(f"{where}: expected one of {', '.join(map(repr, args))}, got {_short(value)}")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            _expect(value, others[0], where)
            return
        for arm in others:  # pragma: no cover - the plan has no such field today
            try:
                _expect(value, arm, where)
                return
            except PlanFormatError:
                continue
        raise PlanFormatError(f"{where}: expected {hint}, got {_kind(value)}")  # pragma: no cover
    if origin is list:
        if not isinstance(value, list):
            raise PlanFormatError(f"{where}: expected a list{_of(args[0])}, got {_kind(value)}")
        for i, item in enumerate(value):
            _expect(item, args[0], f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanFormatError(f"{where}: expected an object, got {_kind(value)}")
        for k, v in value.items():
            _expect(k, args[0], f"{where} key {k!r}")
            _expect(v, args[1], f"{where}.{k}")
        return
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise PlanFormatError(f"{where}: expected an object, got {_kind(value)}")
        for f in dataclasses.fields(hint):
            _expect(getattr(value, f.name), _hints(hint)[f.name], f"{where}.{f.name}" if where else f.name)
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float
          else isinstance(value, int) and not isinstance(value, bool) if hint is int
          else isinstance(value, hint))
    if not ok:
        raise PlanFormatError(f"{where}: expected {_name(hint)}, got {_kind(value)}")


def _name(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def _of(hint: Any) -> str:
    return {str: " of strings", int: " of integers"}.get(hint, "")


def _build(cls: Any, data: Any, where: str) -> Any:
    """cls(**data) with the fields cls knows; a missing field or a non-object is located."""
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where or '<document>'}: expected an object, got {_kind(data)}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as e:  # a required field is missing: "X.__init__() missing 1 required ... 'kind'"
        raise PlanFormatError(f"{where or '<document>'}: {str(e).split(') ', 1)[-1]}") from None


def _int_keys(d: Any, where: str) -> dict[int, Any]:
    if not isinstance(d, dict):
        raise PlanFormatError(f"{where}: expected an object, got {_kind(d)}")
    try:
        return {int(k): v for k, v in d.items()}
    except (TypeError, ValueError):
        raise PlanFormatError(f"{where}: keys must be GPU indices (integers)") from None


def _items(d: dict[str, Any], key: str, where: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise PlanFormatError(f"{where}.{key}: expected a list, got {_kind(value)}")
    return value


def _step(s: Any, where: str) -> StepSpec:
    if not isinstance(s, dict):
        raise PlanFormatError(f"{where}: expected an object, got {_kind(s)}")
    d = dict(s)
    for key, cls in (("mounts", Mount), ("files", GeneratedFile), ("ports", Port), ("nodes", NodeSpec)):
        d[key] = [_build(cls, x, f"{where}.{key}[{i}]") for i, x in enumerate(_items(d, key, where))]
    d["power_caps_w"] = _int_keys(d.get("power_caps_w", {}), f"{where}.power_caps_w")
    if d.get("lease"):
        if not isinstance(d["lease"], dict):
            raise PlanFormatError(f"{where}.lease: expected an object, got {_kind(d['lease'])}")
        lease = dict(d["lease"])
        lease["max_power_w"] = _int_keys(lease.get("max_power_w", {}), f"{where}.lease.max_power_w")
        d["lease"] = _build(LeaseSpec, lease, f"{where}.lease")
    if d.get("ready") is not None:
        d["ready"] = Ready.from_dict(d["ready"], f"{where}.ready")
    if d.get("request") is not None:
        d["request"] = LoadRequest.from_dict(d["request"], f"{where}.request")
    return typing.cast(StepSpec, _build(StepSpec, d, where))


def _budget(b: Any, where: str) -> PsuBudget | None:
    if not b:
        return None
    if not isinstance(b, dict):
        raise PlanFormatError(f"{where}: expected an object, got {_kind(b)}")
    d = dict(b)
    d["gpus"] = [_build(GpuDraw, g, f"{where}.gpus[{i}]") for i, g in enumerate(_items(d, "gpus", where))]
    return typing.cast(PsuBudget, _build(PsuBudget, d, where))
