"""Multi-node plans (issue #13), without an engine: the cluster profile and `nodes:` checked
with FILE:LINE:COL errors; one node entry per host with its launcher flags and interface;
accelerate's own parser for the shared config; the containers docker-py would create;
the all-reduce figures and the expected scaling; drift between node snapshots; and the
Kubeflow TrainJob export validated against Kubeflow Trainer's API models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftkit.plan.spec import run_label
from tests import builders
from tests.builders import machine_file
from tests.conftest import RECIPES, require, run_cli

RECIPE = """\
ftkit: 1
name: mn
model:
  tiny: {{hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, vocab_size: 300}}
  dtype: fp32
dataset: {{path: {data}, format: alpaca, template: alpaca}}
steps:
  - type: train
    method: lora
    max_steps: 4
    precision: fp32
    distribution: {distribution}
    nodes: {nodes}
"""


def profile(shared: Path, *, nodes: str | None = None, extra: str = "", runs: str | None = None) -> str:
    nodes = nodes or ("    - {name: node-a, address: 10.0.0.1, gpus: [0, 1]}\n"
                      "    - {name: node-b, address: 10.0.0.2, docker_host: 'ssh://me@10.0.0.2', gpus: [0, 1],"
                      " interface: enp6s0, env: {NCCL_IB_DISABLE: '1'}}\n")
    return (f"ftkit: 1\nkind: machine\nname: lab\nexecutor: docker\n"
            f"gpus:\n  - {{index: 0, model: RTX 4090}}\n  - {{index: 1, model: RTX 4090}}\n"
            f"paths: {{runs: {runs or shared / 'runs'}}}\n"
            f"cluster:\n  shared: {shared}\n  interface: enp5s0\n{extra}  nodes:\n{nodes}")


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, Path]:
    shared = tmp_path / "shared"
    (shared / "runs").mkdir(parents=True)
    data = shared / "data.jsonl"
    data.write_text((RECIPES / "data" / "quickstart-train.jsonl").read_text())
    machine = tmp_path / "lab.yaml"
    machine.write_text(profile(shared))
    recipe = shared / "recipe.yaml"  # recipes name their inputs relative to themselves
    recipe.write_text(RECIPE.format(data="data.jsonl", distribution="ddp", nodes=2))
    return {"shared": shared, "machine": machine, "recipe": recipe, "tmp": tmp_path}


def plan_of(lab: dict[str, Path], run_dir: str = "/shared/runs/r1") -> Any:
    return builders.plan_of(lab["recipe"], lab["machine"], run_dir=run_dir, check=True)


# --------------------------------------------------------------------------- input


def test_a_bad_cluster_profile_is_reported_line_by_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    nodes = ("    - {name: a, address: 10.0.0.1, env: {GLOO_SOCKET_IFNAME: eth1}}\n"
             "    - {name: a, address: 'bad host!'}\n"
             "    - {name: c, address: 10.0.0.1, interface: 'eth0; rm -rf /'}\n")
    m = tmp_path / "m.yaml"
    m.write_text(profile(shared, nodes=nodes, runs="/elsewhere/runs",
                         extra="  rendezvous: {host: 10.0.0.9}\n").replace("  interface: enp5s0\n", ""))
    res = run_cli("validate", str(m))
    assert res.code == 2
    err = res.err
    assert f"{m}:15:47: cluster.nodes[2].interface: String should match pattern" in err  # before the other checks
    m.write_text(profile(shared, nodes=nodes.replace("; rm -rf /", ""), runs="/elsewhere/runs",
                         extra="  rendezvous: {host: 10.0.0.9}\n").replace("  interface: enp5s0\n", ""))
    err = run_cli("validate", str(m)).err
    for expected in ("cluster.nodes[0].env.GLOO_SOCKET_IFNAME: GLOO_SOCKET_IFNAME is set by the plan",
                     "cluster.nodes[1].name: node name 'a' is used twice",
                     "cluster.nodes[1].address: 'bad host!' is neither an IP address nor a host name",
                     "cluster.nodes[2].address: address '10.0.0.1' is also node 'a''s",
                     "cluster.nodes[0]: node 'a' names no network interface",
                     "cluster.rendezvous.host: the c10d store runs in the first node's launcher",
                     "paths.runs: /elsewhere/runs is not inside cluster.shared"):
        assert expected in err, err
    assert all(line.startswith(f"{m}:") for line in err.strip().splitlines()[:7]), err


def test_nodes_need_a_cluster_with_enough_hosts_and_gpus(lab: dict[str, Path], tmp_path: Path) -> None:
    bare = machine_file(tmp_path, file="bare.yaml", name="bare", executor="docker")
    res = run_cli("validate", str(lab["recipe"]), "--machine", str(bare))
    assert res.code == 2 and f"{lab['recipe']}:13:12: steps[0].nodes: nodes: 2 needs a cluster" in res.err, res.err
    lab["recipe"].write_text(RECIPE.format(data="data.jsonl", distribution="ddp", nodes=3))
    res = run_cli("validate", str(lab["recipe"]), "--machine", str(lab["machine"]))
    assert res.code == 2 and "steps[0].nodes: nodes: 3, but machine profile 'lab' lists 2 cluster node(s)" in res.err
    lab["recipe"].write_text(RECIPE.format(data="data.jsonl", distribution="single", nodes=2))
    res = run_cli("validate", str(lab["recipe"]))
    assert res.code == 2 and "steps[0].distribution: nodes: 2 runs one process per GPU on every node" in res.err
    lab["recipe"].write_text(RECIPE.format(data="data.jsonl", distribution="ddp", nodes=2)
                             + "    gpus: [0, 3]\n")
    res = run_cli("validate", str(lab["recipe"]), "--machine", str(lab["machine"]))
    assert res.code == 2 and "GPU(s) [3] are not on cluster node 'node-a'" in res.err, res.err


def test_multinode_needs_docker_and_inputs_on_the_shared_storage(lab: dict[str, Path], tmp_path: Path) -> None:
    datasets = tmp_path / "datasets"  # this machine's disk, not the shared storage
    datasets.mkdir()
    outside = datasets / "data.jsonl"
    outside.write_text((RECIPES / "data" / "quickstart-train.jsonl").read_text())
    lab["recipe"].write_text(RECIPE.format(data="'${datasets}/data.jsonl'", distribution="ddp", nodes=2))
    lab["machine"].write_text(lab["machine"].read_text().replace("paths: {", f"paths: {{datasets: {datasets}, "))
    res = run_cli("validate", str(lab["recipe"]), "--machine", str(lab["machine"]))
    assert res.code == 2
    assert f"dataset.path: {outside} is not inside cluster.shared" in res.err and "node-b" in res.err, res.err
    res = run_cli("plan", str(lab["recipe"]), "--machine", str(lab["machine"]), "--executor", "local")
    assert res.code == 0  # plan shows it; up refuses it:
    res = run_cli("up", str(lab["recipe"]), "--machine", str(lab["machine"]), "--executor", "local", "--dry-run")
    assert "steps[0].nodes: a multi-node step runs in ftkit's images on every node" in res.out


# --------------------------------------------------------------------------- plan


def test_one_node_entry_per_host_with_its_rank_flags_and_interface(lab: dict[str, Path]) -> None:
    plan = plan_of(lab)
    train = plan.step("train")
    assert [n.name for n in train.nodes] == ["node-a", "node-b"] and [n.rank for n in train.nodes] == [0, 1]
    a, b = train.nodes
    for n in (a, b):
        flags = dict(zip(n.argv[4:16:2], n.argv[5:16:2], strict=True))
        assert flags == {"--num_machines": "2", "--machine_rank": str(n.rank), "--main_process_ip": "10.0.0.1",
                         "--main_process_port": "29400", "--rdzv_backend": "c10d",
                         "--rdzv_conf": f"is_host={1 - n.rank},join_timeout=300,read_timeout=300"}
        assert n.argv[-4:-2] == ["-m", "ftkit.engines.train"] and n.env["PET_RDZV_ID"] == run_label("/shared/runs/r1")
    assert a.env["GLOO_SOCKET_IFNAME"] == a.env["NCCL_SOCKET_IFNAME"] == "enp5s0"
    assert b.env["GLOO_SOCKET_IFNAME"] == "enp6s0" and b.env["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_DISABLE" not in a.env and "NCCL_IB_DISABLE" not in train.env  # per node, not leaked
    assert a.docker_host is None and b.docker_host == "ssh://me@10.0.0.2" and a.network == "host"
    assert train.argv == a.argv and "--main_process_port" not in train.argv[4:5]
    assert plan.cluster is not None and plan.cluster.rendezvous == "10.0.0.1:29400"
    assert (plan.cluster.gradient_bytes or {})["train"] > 0
    # the engine's job is the single-node one
    job = json.loads(next(f.content for f in train.files if f.path == "configs/train-train.json"))
    assert "nodes" not in job["train"]


def test_the_shared_config_is_read_by_accelerate_as_a_two_machine_job(lab: dict[str, Path], tmp_path: Path) -> None:
    require("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig

    plan = plan_of(lab)
    cfg = next(f.content for f in plan.step("train").files if f.path == "configs/accelerate-train.yaml")
    path = tmp_path / "acc.yaml"
    path.write_text(cfg)
    acc = ClusterConfig.from_yaml_file(str(path))
    assert acc.num_machines == 2 and acc.num_processes == 4 and acc.main_process_ip == "10.0.0.1"
    assert acc.rdzv_backend == "c10d" and acc.same_network is False and acc.distributed_type.value == "MULTI_GPU"
    # a DeepSpeed step goes through the same launcher on every node, not DeepSpeed's pdsh/SSH one
    lab["recipe"].write_text(RECIPE.format(data="data.jsonl", distribution="deepspeed-zero2",
                                           nodes=2))
    cfg = yaml.safe_load(next(f.content for f in plan_of(lab).step("train").files
                              if f.path == "configs/accelerate-train.yaml"))
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert cfg["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


def test_plan_json_rebuilds_the_nodes(lab: dict[str, Path]) -> None:
    from ftkit.plan.spec import NodeSpec, Plan

    plan = plan_of(lab)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert all(isinstance(n, NodeSpec) for n in again.step("train").nodes)
    assert again.to_dict() == plan.to_dict()


def test_each_node_gets_its_own_container(lab: dict[str, Path]) -> None:
    from ftkit.gateways import docker as dk
    from ftkit.plan.container import node_container_spec
    from ftkit.plan.spec import run_label
    from ftkit.run.executors.docker import request
    from ftkit.run.executors.multinode import docker_run_command

    plan = plan_of(lab)
    train = plan.step("train")
    a, b = (node_container_spec(train, plan, n) for n in train.nodes)
    assert a.name.endswith("-train-node-a") and b.name.endswith("-train-node-b")
    assert b.labels["dev.ftkit.node"] == "node-b" and b.labels["dev.ftkit.run"] == run_label(plan.run_dir)
    assert b.labels["dev.ftkit.step"] == "train" and b.env["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_DISABLE" not in a.env and a.device_ids == ["0", "1"] and a.ports == []
    engine = a.command[a.command.index("--") + 1:]  # after ftkit.run.incontainer's `--`
    assert engine[:2] == ["ftkit", "lease"] and engine[engine.index("--") + 1:] == train.nodes[0].argv
    args = dk.create_args(request(b))
    assert args["HostConfig"]["NetworkMode"] == "host"
    # containers standing in for hosts: a user-defined network, the address is the node's alias
    train.nodes[1].network = "lab-net"
    cs = node_container_spec(train, plan, train.nodes[1])
    args = dk.create_args(request(cs))
    assert args["HostConfig"]["NetworkMode"] == "lab-net" and args["Hostname"] == "node-b"
    assert args["NetworkingConfig"]["EndpointsConfig"]["lab-net"]["Aliases"] == ["10.0.0.2"]
    line = docker_run_command(cs)
    assert line.startswith("docker run --rm --init --name ") and "--network lab-net" in line
    assert "--env NCCL_IB_DISABLE=1" in line and "--label dev.ftkit.node=node-b" in line


def test_plan_text_shows_the_nodes_and_the_missing_measurement(lab: dict[str, Path]) -> None:
    res = run_cli("plan", str(lab["recipe"]), "--machine", str(lab["machine"]))
    assert res.code == 0, res.err
    assert "node 1: node-b at 10.0.0.2, through ssh://me@10.0.0.2, network host" in res.out
    assert "cluster: 2 node(s), rendezvous 10.0.0.1:29400 (c10d)" in res.out
    assert "not measured yet (`ftkit bench RECIPE --allreduce`)" in res.out


def test_a_measured_allreduce_gives_the_expected_scaling(lab: dict[str, Path]) -> None:
    from ftkit.plan.cluster import expected_scaling

    measured = {"ftkit_allreduce": 1, "taken": "2026-01-01T00:00:00+00:00", "backend": "gloo", "world_size": 2,
                "results": [{"bytes": 1 << 20, "time_s": 0.002, "algbw_gbps": 0.5, "busbw_gbps": 0.5},
                            {"bytes": 16 << 20, "time_s": 0.02, "algbw_gbps": 0.8, "busbw_gbps": 0.8}]}
    big = expected_scaling(32 << 20, measured)
    assert big["measured_at_bytes"] == 16 << 20 and big["allreduce_s_per_step"] == pytest.approx((32 << 20) / 0.8e9)
    assert big["min_compute_s_per_step"] == pytest.approx(big["allreduce_s_per_step"] * 0.7 / 0.3, rel=1e-4)
    small = expected_scaling(1000, measured)
    assert small["allreduce_s_per_step"] == 0.002 and small["basis"].startswith("upper bound")
    assert expected_scaling(0, measured) == {} and expected_scaling(10, {"results": []}) == {}
    (lab["shared"] / "runs" / "allreduce-lab.json").write_text(json.dumps(measured))
    res = run_cli("plan", str(lab["recipe"]), "--machine", str(lab["machine"]))
    assert "all-reduce measured 2026-01-01T00:00:00+00:00 (gloo, 2 processes)" in res.out
    assert "expected scaling of train:" in res.out


def test_allreduce_figures_follow_nccl_tests() -> None:
    from ftkit.observe.allreduce import bus_factor, figures

    assert bus_factor(1) == 0 and bus_factor(2) == 1 and bus_factor(8) == pytest.approx(1.75)
    f = figures(8 << 20, 0.01, 4)
    assert f["algbw_gbps"] == pytest.approx((8 << 20) / 0.01 / 1e9, rel=1e-3)
    assert f["busbw_gbps"] == pytest.approx(f["algbw_gbps"] * 1.5, rel=1e-3)


# --------------------------------------------------------------------------- doctor


def test_node_snapshots_drift_on_communication_settings() -> None:
    from ftkit.observe.doctor import compare
    from ftkit.observe.nodes import parse_output

    a = {"python": "3.11.2", "packages": {"torch": "2.13.0"},
         "dist_env": {"NCCL_SOCKET_IFNAME": "enp5s0", "OMP_NUM_THREADS": "4"}}
    b = {"python": "3.11.2", "packages": {"torch": "2.13.0"},
         "dist_env": {"NCCL_SOCKET_IFNAME": "enp6s0", "OMP_NUM_THREADS": "4", "NCCL_P2P_DISABLE": "1"}}
    drift = compare(a, b)
    assert [d.field for d in drift] == ["dist_env.NCCL_P2P_DISABLE"]  # interface names may differ per host
    snap, said = parse_output("noise\n@@ftkit-doctor-begin@@\n{\"ftkit_doctor\": 1}\n\n@@ftkit-doctor-end@@\n"
                              "@@iface ok up\n@@shared written\n@@port taken\n")
    assert snap == {"ftkit_doctor": 1} and said == {"iface": "ok up", "shared": "written", "port": "taken"}
    assert parse_output("@@ftkit-doctor-begin@@\nnot json\n@@ftkit-doctor-end@@")[0] is None


# --------------------------------------------------------------------------- export


def _validate_trainjob(data: dict[str, Any]) -> Any:
    """Kubeflow Trainer's own models: types and required fields on the way in, and nothing
    unknown or misplaced (their from_dict drops what the CRD does not have, so a round trip
    must give the manifest back unchanged)."""
    models = require("kubeflow_trainer_api.models.trainer_v1alpha1_train_job")
    job = models.TrainerV1alpha1TrainJob.from_dict(data)
    assert job.to_dict() == data
    return job


def test_trainjob_export_validates_against_kubeflow_trainer(lab: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "job.yaml"
    res = run_cli("export", str(lab["recipe"]), "--machine", str(lab["machine"]), "--pvc", "lab-runs", "-o", str(out),
                  "--image", "registry.lab/ftkit/train:cuda12.8-0123456789ab", "--namespace", "ml")
    assert res.code == 0, res.err
    data = yaml.safe_load(out.read_text())
    job = _validate_trainjob(data)
    assert job.kind == "TrainJob" and job.api_version == "trainer.kubeflow.org/v1alpha1"
    t = job.spec.trainer
    assert t.num_nodes == 2 and t.num_proc_per_node == 2 and t.image.startswith("registry.lab/")
    assert t.resources_per_node.to_dict() == {"limits": {"nvidia.com/gpu": "2"}}
    cmd = t.command
    assert cmd[cmd.index("--machine_rank") + 1] == "$(PET_NODE_RANK)"
    assert cmd[cmd.index("--main_process_ip") + 1] == "$(PET_MASTER_ADDR)"
    assert "c10d" not in cmd and cmd[cmd.index("--rdzv_backend") + 1] == "static" and "--same_network" in cmd
    env = {e.name: e.value for e in t.env}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and "PET_RDZV_ID" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert job.spec.runtime_ref.name == "torch-distributed" and job.metadata.namespace == "ml"
    assert "run/configs/accelerate-train.yaml" in res.err and "PVC lab-runs" in res.err
    # the check has teeth: a misspelt or misplaced field does not survive the round trip
    data["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(AssertionError):
        _validate_trainjob(data)
    del data["spec"]["trainer"]["numNode"]
    data["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValueError):
        _validate_trainjob(data)


def test_a_single_node_recipe_exports_as_one_node(tmp_path: Path) -> None:
    machine = machine_file(tmp_path, file="m.yaml", executor="docker")
    out = tmp_path / "job.yaml"
    res = run_cli("export", str(RECIPES / "quickstart.yaml"), "--machine", str(machine), "-o", str(out))
    assert res.code == 0, res.err
    job = _validate_trainjob(yaml.safe_load(out.read_text()))
    cmd = job.spec.trainer.command
    assert job.spec.trainer.num_nodes == 1 and job.spec.trainer.resources_per_node is None
    assert cmd[cmd.index("--num_machines") + 1] == "$(PET_NNODES)"


# --------------------------------------------------------------------------- compose


def test_compose_writes_one_stack_per_node_on_one_run_directory(lab: dict[str, Path], tmp_path: Path) -> None:
    out = lab["shared"] / "stacks"
    res = run_cli("compose", str(lab["recipe"]), "--machine", str(lab["machine"]), "-o", str(out), "--node", "all")
    assert res.code == 0, res.err
    a = yaml.safe_load((out / "node-a" / "compose.yaml").read_text())
    b = yaml.safe_load((out / "node-b" / "compose.yaml").read_text())
    assert list(a["services"]) == ["tiny-model", "train"] and list(b["services"]) == ["train"]  # earlier steps once
    assert b["services"]["train"]["network_mode"] == "host" and "depends_on" not in b["services"]["train"]
    cmd = b["services"]["train"]["command"]
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and b["services"]["train"]["labels"]["dev.ftkit.node"] == "node-b"
    env_b = (out / "node-b" / ".env").read_text()
    assert "FTKIT_RUN_DIR=../node-a/run" in env_b and "COMPOSE_PROJECT_NAME=ftkit-mn-node-b" in env_b
    assert (out / "node-a" / "run" / "configs" / "accelerate-train.yaml").is_file()
    assert not (out / "node-b" / "run").exists()
    res = run_cli("compose", str(lab["recipe"]), "--machine", str(lab["machine"]), "-o", str(tmp_path / "x"),
                  "--node", "node-z")
    assert res.code == 2 and "--node 'node-z': step train runs on nodes node-a, node-b" in res.err


def test_up_refuses_when_a_node_engine_does_not_answer(lab: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit.errors import PlanError
    from ftkit.gateways import docker as dk
    from ftkit.run import preflight

    monkeypatch.setenv("FTKIT_SIMULATED_GPUS", "RTX 4090,RTX 4090")
    plan = plan_of(lab)
    monkeypatch.setattr(dk, "reachable", lambda host=None: host is None)  # this machine's engine only
    with pytest.raises(PlanError, match=r"cluster node node-b: its Docker engine \(ssh://me@10.0.0.2\) does not answer"):
        preflight.machine(plan)
    plan.step("train").nodes[1].manual = True  # started by hand: nothing to reach
    preflight.machine(plan)


def test_a_node_started_by_hand_gets_its_command_written(lab: dict[str, Path], tmp_path: Path) -> None:
    from ftkit.plan.container import node_container_spec
    from ftkit.run.executors.base import StepIO
    from ftkit.run.executors.multinode import MultiNodeExecutor, _Running
    from ftkit.run.rundir import RunDir

    plan = plan_of(lab)
    train = plan.step("train")
    node = train.nodes[1]
    node.manual = True
    run = RunDir(tmp_path)
    lines: list[str] = []
    MultiNodeExecutor(plan, run)._manual([_Running(node, None, node_container_spec(train, plan, node))],
                                         StepIO(log=tmp_path / "x.log", on_line=lines.append))
    script = tmp_path / "nodes" / "node-b.sh"
    assert lines == [f"ftkit: start node node-b (rank 1) on its host: sh {script}"]
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n# node node-b (rank 1)") and "exec docker run --rm --init" in text
    assert "--machine_rank 1" in text and "--env GLOO_SOCKET_IFNAME=enp6s0" in text
