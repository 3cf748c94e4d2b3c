"""A train step across several hosts: one trainer per node, through torch.distributed.

ftkit adds no distributed layer of its own. Every node runs the same image and the same
generated configs, launched by `accelerate launch` (torchrun underneath) with the c10d
rendezvous: a TCP store in the first node's launcher that the others join, then Gloo (CPU)
or NCCL (GPU) between the processes. DeepSpeed goes through the same launcher
(`deepspeed_multinode_launcher: standard`), never its SSH/pdsh one.

What differs per node is only its rank, its network interface and how ftkit reaches its
Docker engine; everything here is pure data for plan.build.

Two things accelerate's launcher does that the plan works around (accelerate 1.x,
commands/launch.py): `--rdzv_backend` and `--same_network` have CLI defaults
("static", False) that always win over the config file, so the c10d backend must be given
as a flag; and with `same_network` unset the launcher hands torchrun the rendezvous
endpoint (`--rdzv_endpoint ip:port`) rather than a fixed master address.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftkit.plan.spec import ClusterInfo, ClusterNode, NodeSpec
from ftkit.recipe.models import Cluster, TrainStep

if TYPE_CHECKING:
    from ftkit.recipe.resolve import ResolvedTrainStep

ENGINE_TAIL_MARK = "-m"  # the launcher's argv ends with `-m <module> --config <file>`
ALLREDUCE_FILE = "allreduce-{machine}.json"  # under the runs root: the last `ftkit bench --allreduce`
ALLREDUCE_FORMAT = 1


def rendezvous_endpoint(cluster: Cluster) -> tuple[str, int]:
    """(host, port) of the c10d store: the first node, which hosts it."""
    return cluster.rendezvous.host or cluster.nodes[0].address, cluster.rendezvous.port


def procs_per_node(step: ResolvedTrainStep) -> int:
    return max(len(step.gpus), 1)


def accelerate_config(step: ResolvedTrainStep, base: dict[str, Any], cluster: Cluster, *, cpu: bool,
                      deepspeed_file: str | None) -> dict[str, Any]:
    """The step's accelerate config for N machines. `base` is the single-machine config
    (plan.launch); every node reads the same file and gets its rank as a flag.

    `num_processes` is the total over all machines (accelerate runs num_processes //
    num_machines per node). Nodes without GPUs run one process each on the CPU (Gloo)
    through torchrun: distributed_type stays MULTI_GPU (or DEEPSPEED) with use_cpu."""
    host, port = rendezvous_endpoint(cluster)
    cfg = dict(base)
    cfg.update(
        num_machines=step.nodes,
        machine_rank=0,
        num_processes=step.nodes * procs_per_node(step),
        main_process_ip=host,
        main_process_port=port,
        rdzv_backend="c10d",
        same_network=False,
        gpu_ids="all",
        use_cpu=cpu,
    )
    if step.distribution.startswith("deepspeed"):
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_file,
            "zero3_init_flag": step.distribution == "deepspeed-zero3",
            # torchrun on every node, started by ftkit: not DeepSpeed's pdsh/SSH launcher
            "deepspeed_multinode_launcher": "standard",
        }
        cfg.pop("mixed_precision", None)
        cfg.pop("downcast_bf16", None)
    else:
        cfg["distributed_type"] = "MULTI_GPU"
    return cfg


def launcher_flags(rank: int, step: TrainStep, cluster: Cluster) -> list[str]:
    """The per-node flags of `accelerate launch` (they override the shared config file)."""
    host, port = rendezvous_endpoint(cluster)
    # read_timeout: how long a node's launcher keeps trying to reach the store (default 60 s);
    # nodes started by hand or by Compose may come up well before the first node's store
    t = cluster.rendezvous.join_timeout_s
    conf = f"is_host={1 if rank == 0 else 0},join_timeout={t},read_timeout={t}"
    return ["--num_machines", str(step.nodes), "--machine_rank", str(rank), "--main_process_ip", host,
            "--main_process_port", str(port), "--rdzv_backend", "c10d", "--rdzv_conf", conf]


def node_specs(step: ResolvedTrainStep, cluster: Cluster, *, argv: list[str], run_id: str,
               visible: str) -> list[NodeSpec]:
    """One NodeSpec per node the step uses. `argv` is the launcher command of the step
    (`accelerate launch --config_file ... -m ftkit.engines.train --config ...`); each node
    gets its flags inserted before the engine module."""
    try:
        cut = argv.index(ENGINE_TAIL_MARK)
    except ValueError:
        cut = len(argv)
    out: list[NodeSpec] = []
    for rank, node in enumerate(cluster.nodes[:step.nodes]):
        iface = node.interface or cluster.interface or ""
        env = {
            # Gloo and NCCL bind this interface; without it Gloo uses the address the host
            # name resolves to (127.0.1.1 on many distributions) and the start-up fails.
            "GLOO_SOCKET_IFNAME": iface,
            "NCCL_SOCKET_IFNAME": iface,
            # torchrun reads its options from PET_* variables: a run id keeps a stale
            # rendezvous of an earlier run on the same endpoint from being joined.
            "PET_RDZV_ID": run_id,
            "CUDA_VISIBLE_DEVICES": visible,
            **node.env,
        }
        out.append(NodeSpec(
            rank=rank, name=node.name, address=node.address,
            argv=argv[:cut] + launcher_flags(rank, step, cluster) + argv[cut:],
            env=env, gpus=list(step.gpus),
            docker_host=node.docker_host, network=cluster.network, manual=node.manual,
        ))
    return out


def summary(cluster: Cluster, nodes: int) -> ClusterInfo:
    """What the plan shows about the cluster (Plan.cluster), for a step on `nodes` nodes."""
    host, port = rendezvous_endpoint(cluster)
    return ClusterInfo(
        nodes=[ClusterNode(name=n.name, address=n.address, docker_host=n.docker_host, gpus=list(n.gpus),
                           manual=n.manual) for n in cluster.nodes[:nodes]],
        rendezvous=f"{host}:{port}", network=cluster.network, shared=cluster.shared, nodes_used=nodes)


# --------------------------------------------------------------------------- expected scaling


def gradient_bytes(step: TrainStep, trainable_params: float) -> int:
    """Bytes all-reduced per optimizer step: the trainable parameters' gradients (LoRA
    weights train in fp32; full fine-tuning reduces in the training precision)."""
    width = 4 if step.method != "full" or step.precision == "fp32" else 2
    return int(trainable_params * width)


def expected_scaling(grad_bytes: int, measured: dict[str, Any], keep_efficiency: float = 0.70) -> dict[str, Any]:
    """Communication per optimizer step from a measured all-reduce (`ftkit bench
    --allreduce`) and the compute per step a node needs for the scaling efficiency to stay
    at `keep_efficiency`, assuming no overlap of compute and communication (DDP's buckets
    overlap part of it, so this is the pessimistic side).

    Conservative on purpose: bandwidth grows with message size, so the gradients are priced
    at the bandwidth of the largest measured size not above them; gradients smaller than
    every measured size cost at most the smallest size's measured time."""
    rows = sorted((r for r in measured.get("results", []) if r.get("algbw_gbps") and r.get("bytes")),
                  key=lambda r: r["bytes"])
    if not rows or grad_bytes <= 0:
        return {}
    below = [r for r in rows if r["bytes"] <= grad_bytes]
    if below:
        row = below[-1]
        comm_s = grad_bytes / (row["algbw_gbps"] * 1e9)
        basis = "bandwidth"
    else:
        row = rows[0]
        comm_s = float(row["time_s"])
        basis = "upper bound: the smallest measured message's time"
    return {
        "gradient_bytes": grad_bytes,
        "measured_at_bytes": row["bytes"],
        "algbw_gbps": row["algbw_gbps"],
        "busbw_gbps": row.get("busbw_gbps"),
        "basis": basis,
        "backend": measured.get("backend"),
        "world_size": measured.get("world_size"),
        "measured": measured.get("taken"),
        "allreduce_s_per_step": round(comm_s, 6),
        "keep_efficiency": keep_efficiency,
        "min_compute_s_per_step": round(comm_s * keep_efficiency / (1 - keep_efficiency), 6),
    }
