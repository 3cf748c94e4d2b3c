"""Beyond a home lab: a plan's multi-node train step as a Kubeflow Trainer TrainJob.

Why this engine: a TrainJob (trainer.kubeflow.org/v1alpha1) is Kubernetes' own answer to
"one PyTorch job over N nodes": its `torch-distributed` runtime starts one pod per node
(a JobSet underneath) and hands every pod the torchrun settings as PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT. So the plan carries over unchanged in
everything that matters - the same image (by content tag), the same generated accelerate,
DeepSpeed and engine configs, the same command - and only the rank and the rendezvous
address come from Kubernetes, through `$(VAR)` references the kubelet expands in a
container's command. Its API ships on PyPI as pydantic models generated from the CRD
(kubeflow-trainer-api), so tests validate the manifest against the engine's own schema
offline: every field, type and required key, and nothing unknown (a round trip through
the models must give the manifest back unchanged).

What Kubernetes changes: every pod has a stable DNS name and its node rank, so the job
uses torchrun's static rendezvous at the rank-0 pod (`--same_network`, the runtime's own
way) instead of the home lab's c10d store; interfaces are the pods' eth0; the run
directory and the inputs live on a ReadWriteMany PersistentVolumeClaim (sub-paths run/
and inputs/...), which must hold what the home-lab mounts held, and the image must be in
a registry the cluster pulls from (`docker tag` + `docker push` of the plan's tag).

Pure: Plan in, manifest dict out.
"""

from __future__ import annotations

import re
from typing import Any

from ftkit.plan.spec import Plan, StepSpec

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "torch-distributed"
NODE = "node"  # the torch runtime's replicated job and container
_DROP_ENV = ("CUDA_VISIBLE_DEVICES", "PET_RDZV_ID", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "FTKIT_LEASE_DIR",
             "FTKIT_SERVICE", "FTKIT_SIMULATED_GPUS", "FTKIT_SIMULATED_GPUS_STATE")
# accelerate flags the plan sets per node; Kubernetes gives their values instead
_PER_NODE = {"--num_machines": "$(PET_NNODES)", "--machine_rank": "$(PET_NODE_RANK)",
             "--main_process_ip": "$(PET_MASTER_ADDR)", "--main_process_port": "$(PET_MASTER_PORT)"}


class ExportError(ValueError):
    """The plan has nothing this exporter can express."""


def dns_name(text: str, limit: int = 63) -> str:
    """A Kubernetes object name (RFC 1123 label): lowercase letters, digits and '-'."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (name[:limit].rstrip("-")) or "ftkit"


def train_step(plan: Plan, step_id: str | None = None) -> StepSpec:
    steps = [s for s in plan.steps if s.kind == "train" and (step_id is None or s.id == step_id)]
    if not steps:
        raise ExportError(f"no train step {step_id!r} in the plan" if step_id else "the plan has no train step")
    return steps[0]


def command(step: StepSpec) -> list[str]:
    """Rank 0's launcher command with the per-node values from Kubernetes and the static
    rendezvous at the rank-0 pod."""
    argv = list(step.nodes[0].argv if step.nodes else step.argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _PER_NODE:
            out += [a, _PER_NODE[a]]
            i += 2
            continue
        if a in ("--rdzv_backend", "--rdzv_conf"):
            i += 2
            continue
        out.append(a)
        i += 1
    if not step.nodes:  # a single-node step: one node, rank 0
        cut = out.index("-m") if "-m" in out else len(out)
        out[cut:cut] = [k for pair in _PER_NODE.items() for k in pair]
    cut = out.index("-m") if "-m" in out else len(out)
    out[cut:cut] = ["--same_network", "--rdzv_backend", "static"]
    return out


def manifest(plan: Plan, *, step_id: str | None = None, pvc: str | None = None, namespace: str | None = None,
             image: str | None = None, interface: str = "eth0") -> dict[str, Any]:
    step = train_step(plan, step_id)
    if step.executor != "docker" or not step.image:
        raise ExportError(f"step {step.id} does not run in an image (plan with executor docker)")
    nodes = max(len(step.nodes), 1)
    gpus = len(step.nodes[0].gpus if step.nodes else step.gpus)
    claim = pvc or dns_name(f"ftkit-{plan.recipe}")
    env = {k: v for k, v in step.env.items() if k not in _DROP_ENV}
    if step.nodes:
        env.update({k: v for k, v in step.nodes[0].env.items() if k not in _DROP_ENV})
    env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = interface
    mounts = []
    for m in step.mounts:
        if m.container == "/ftkit/run":
            sub = "run"
        elif m.container.startswith("/ftkit/"):
            sub = m.container[len("/ftkit/"):]
        else:
            raise ExportError(f"mount {m.container} is outside /ftkit: no place for it on the volume")
        mounts.append({"name": "ftkit", "mountPath": m.container, "subPath": sub, "readOnly": bool(m.read_only)})
    trainer: dict[str, Any] = {
        "image": image or step.image,
        "command": command(step),
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "numNodes": nodes,
        "numProcPerNode": max(gpus, 1),
    }
    if gpus:
        trainer["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    pod: dict[str, Any] = {
        "volumes": [{"name": "ftkit", "persistentVolumeClaim": {"claimName": claim}}],
        "containers": [{"name": NODE, "volumeMounts": mounts}],
    }
    metadata: dict[str, Any] = {
        "name": dns_name(f"{plan.recipe}-{step.id}"),
        "labels": {"app.kubernetes.io/managed-by": "ftkit", "ftkit.dev/recipe": dns_name(plan.recipe),
                   "ftkit.dev/step": dns_name(step.id)},
        "annotations": {"ftkit.dev/image": step.image, "ftkit.dev/plan": "ftkit export --to trainjob",
                        "ftkit.dev/volume": f"PVC {claim}: run/ holds the run directory (configs/, model/), "
                                            "inputs/ what the plan mounts under /ftkit/inputs"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "trainer": trainer,
            "runtimePatches": [{"manager": "ftkit.dev/export", "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}}}],
        },
    }
