"""How a step is started, derived from its StepSpec alone: the exact command (the engine
under the GPU lease) and, for docker steps, the container it runs in.

Pure data, shared by the readers of a plan: the docker executor turns a ContainerSpec into
Docker SDK arguments, `ftkit compose` into a compose service, `ftkit plan` prints it. One
function decides, so `ftkit up` and a stack run with plain `docker compose` start the same
thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ftkit.plan.spec import Mount, NodeSpec, Plan, Port, StepSpec

WORKDIR = "/ftkit"


def lease_argv(step: StepSpec, prefix: list[str]) -> list[str]:
    """`ftkit lease ... --` for a step with a lease, else nothing."""
    lease = step.lease
    if lease is None:
        return []
    argv = prefix + ["lease", "--gpus", ",".join(map(str, lease.gpus)), "--role", lease.role, "--service", step.id]
    if lease.max_power_w:
        argv += ["--max-power-w", ",".join(f"{g}={w}" for g, w in sorted(lease.max_power_w.items()))]
    if lease.role == "serve":
        argv += ["--grace", str(lease.grace_s)]
        if lease.sleep_url:
            argv += ["--sleep-url", lease.sleep_url]
    return argv + ["--"]


def step_command(step: StepSpec, plan: Plan) -> list[str]:
    """The exact command the step runs: its engine argv, wrapped in the lease where it has one."""
    prefix = ["ftkit"] if step.executor == "docker" else [plan.python, "-m", "ftkit"]
    return lease_argv(step, prefix) + list(step.argv)


# What every step's container runs first (ftkit.run.incontainer): threads sized to the
# container's CPU allowance where nothing sized them, then the command (exec'd: its signals and
# exit code are the command's own). With --journal (a stack run by plain `docker compose`) it
# records the step's start and end in the run's state.json, which `ftkit up` does itself.
IN_CONTAINER = ["python", "-m", "ftkit.run.incontainer"]


def local_processes(step: StepSpec, argv: list[str]) -> int:
    """How many engine processes `argv` starts in its container, which share its CPUs:
    `accelerate launch`'s processes on this machine (num_processes over num_machines of the
    launch config the plan generated, e.g. one per GPU with DDP or DeepSpeed), else 1."""
    if "--config_file" not in argv[:-1]:
        return 1
    target = argv[argv.index("--config_file") + 1]
    generated = next((f for f in step.files if target.endswith("/" + f.path)), None)
    if generated is None:
        return 1
    import yaml

    try:
        cfg = yaml.safe_load(generated.content) or {}
        return max(1, int(cfg.get("num_processes", 1)) // max(1, int(cfg.get("num_machines", 1))))
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 1


def in_container(step: StepSpec, command: list[str], *, journal: bool = False, processes: int = 1) -> list[str]:
    """`command` behind the container's first process; `processes`: how many share its CPUs."""
    return (IN_CONTAINER + (["--journal", step.id] if journal else [])
            + (["--processes", str(processes)] if processes > 1 else []) + ["--"] + command)


@dataclass
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    device_ids: list[str]  # host GPU indices for the NVIDIA device request; empty: no GPU
    ports: list[Port] = field(default_factory=list)
    shm_size: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    workdir: str = WORKDIR
    simulated_gpus: bool = False
    stop_grace_s: int = 30  # docker stop's timeout: the lease's own grace for the engine, plus time to let go
    network: str | None = None  # a multi-node step's nodes: host, or a user-defined network
    hostname: str | None = None
    aliases: list[str] = field(default_factory=list)  # the node's address on a user-defined network
    env_from_host: list[str] = field(default_factory=list)  # taken from ftkit's environment when it starts (secrets)


NAME_MAX = 128  # what ftkit keeps a container's name within


def fit_name(name: str) -> str:
    """`name` within NAME_MAX: cut, with a digest of the whole name after the cut, so two long
    names that share their beginning stay two names (one container must never replace the
    other: a step's container of that name is removed before the step starts)."""
    if len(name) <= NAME_MAX:
        return name
    import hashlib

    return f"{name[:NAME_MAX - 13].rstrip('-.')}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def container_name(plan: Plan, step: StepSpec) -> str:
    """ftkit-<run>-<step>, in the characters Docker allows in a name; a long one cut and told
    apart by a digest (fit_name)."""
    run = step.labels.get("dev.ftkit.run") or plan.recipe
    return fit_name(re.sub(r"[^a-zA-Z0-9_.-]+", "-", f"ftkit-{run}-{step.id}").strip("-."))


def container_spec(step: StepSpec, plan: Plan, *, journal: bool = False) -> ContainerSpec:
    """The container for one docker step. GPUs are device requests by host index (the
    container sees them renumbered from 0, which the step's CUDA_VISIBLE_DEVICES already
    says); on a simulated machine there is no device to request. `journal`: the container
    journals its step itself (no ftkit drives the run: a stack run by docker compose)."""
    if step.executor != "docker":
        raise ValueError(f"step {step.id} runs with the {step.executor} executor, not in a container")
    if not step.image:
        raise ValueError(f"step {step.id} has no image")
    simulated = bool(plan.simulated_gpus)
    return ContainerSpec(
        name=container_name(plan, step),
        image=step.image,
        command=in_container(step, step_command(step, plan), journal=journal,
                             processes=local_processes(step, step.argv)),
        env=dict(step.env),
        env_from_host=list(step.env_from_host),
        mounts=list(step.mounts),
        device_ids=[] if simulated else [str(g) for g in step.gpus],
        ports=list(step.ports),
        shm_size=step.shm_size,
        labels=dict(step.labels),
        simulated_gpus=simulated and bool(step.gpus),
        stop_grace_s=(step.lease.grace_s + 10) if step.lease else 30,
    )


def node_container_spec(step: StepSpec, plan: Plan, node: NodeSpec, *, journal: bool = False) -> ContainerSpec:
    """The container of one node of a multi-node step: the step's container (image, mounts,
    lease, labels) with the node's command, environment and GPUs, named and labelled for
    the node, on the cluster's network. With `host` networking the trainer binds the
    node's own interfaces; on a user-defined network (containers standing in for hosts)
    the node's address is its DNS alias there."""
    cs = container_spec(step, plan)
    # the same GPU indices on every node; `journal`: the first node's (the run directory is its)
    cs.command = in_container(step, lease_argv(step, ["ftkit"]) + list(node.argv), journal=journal,
                              processes=local_processes(step, node.argv))
    cs.name = fit_name(f"{cs.name}-{node.name}")
    cs.env = {**step.env, **node.env}
    cs.device_ids = [] if plan.simulated_gpus else [str(g) for g in node.gpus]
    cs.labels = {**cs.labels, "dev.ftkit.node": node.name, "dev.ftkit.rank": str(node.rank)}
    cs.network = node.network
    if node.network != "host":
        cs.hostname = node.name
        cs.aliases = [node.address]
    cs.ports = []  # nothing is published: the nodes reach each other directly
    return cs


def host_env(cs: ContainerSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as it starts: the plan's, plus the named variables that are
    set in ftkit's environment (`environ`, default os.environ), read now and written nowhere."""
    import os

    source = os.environ if environ is None else environ
    return {**cs.env, **{n: source[n] for n in cs.env_from_host if n in source}}
