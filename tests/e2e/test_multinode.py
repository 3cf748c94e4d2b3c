"""Multi-node training with two containers standing in for two hosts (issue #13).

A user-defined Docker network holds two nodes, node-a and node-b (their addresses are
their DNS aliases there; interface eth0); a directory bind-mounted into both is the
shared storage. The recipe's train step says `nodes: 2`: `ftkit up` runs the tiny-model
step, then one trainer per node from the train/cpu image, launched by `accelerate launch`
(torchrun) with the c10d rendezvous in node-a's launcher, on Gloo.

What is proven:
- the two-node loss curve matches a one-node run of the same global batch (one process:
  8 per step x 2 accumulation; two nodes: 4 x 2 x 2 ranks), every logged step, within
  TOLERANCE;
- killing node-b's container (SIGKILL, as a host dying) fails the run cleanly: ftkit stops
  node-a, no container of the run is left, the journal names node-b; `ftkit up --resume`
  continues from the newest complete checkpoint on the shared storage and finishes;
- `ftkit bench --allreduce` measures all-reduce bandwidth between the two containers, and
  `ftkit plan` then shows the expected scaling;
- `ftkit doctor --cluster` finds no drift between two identical nodes and flags a planted
  one (a PYTHONPATH on node-b that shadows torch with another version).

Loss tolerance: 1e-3 absolute per logged step. Everything is fp32 on the same data in the
same order (the two ranks split each global batch the way one process accumulates it) and
the loss is normalised by the same global token count, so the runs differ only in the
order floating-point sums are taken (Gloo's all-reduce against one process accumulating):
observed differences are below 1e-6. The resumed part of the run must match as well: the
trainer restores the optimizer, scheduler, every rank's RNG state and skips the batches it
had consumed, so a resume that lost or repeated data would show at once (a wrong global
batch or data split moves the loss by 1e-2 and more).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_ftkit, run_label, shared_dir
from tests.e2e_inputs import build_args, docker_lines, lora_recipe, quickstart_data
from tests.shared_build import note_built

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TOLERANCE = 1e-3
STEPS = 60
CKPT_EVERY = 10

@pytest.fixture(scope="session")
def train_image(tmp_path_factory: pytest.TempPathFactory, cpu_images) -> Any:  # type: ignore[no-untyped-def]
    """train/cpu as tests/integration builds it, and the images.lock.json naming it: the profile
    runs that tag, whatever changes in the checkout during the session. After `cpu_images` (the
    run's one build of that tag, which the other worker's containers may be using) this build is
    a no-op that writes the lock; an image it did build is removed when the run ends."""
    given = os.environ.get("FTKIT_TEST_IMAGES_LOCK")
    if given:  # developing: an images.lock.json naming an image already built
        return Path(given)
    lock = tmp_path_factory.mktemp("mn-images") / "images.lock.json"
    proc = run_ftkit(*build_args("--image", "train", "--variant", "cpu", "--images-lock", str(lock)), timeout=1500)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ftkit/train:")), "")
    if line and "up to date" not in line:
        note_built(shared_dir(), [line.split()[0].rstrip(":")])
    assert proc.returncode == 0, proc.stderr[-5000:]
    return lock


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, train_image: Path) -> Any:
    """A Docker network, the shared directory and a machine profile whose cluster is two
    containers on it."""
    from ftkit.gateways import docker as dk

    net = f"ftkit-test-mn-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "network", "create", net], check=True, capture_output=True)
    work = tmp_path_factory.mktemp("multinode")
    shared = work / "shared"
    (shared / "runs").mkdir(parents=True)
    quickstart_data(work / "data" / "quickstart-train.jsonl")
    profile = work / "cluster.yaml"
    profile.write_text(profile_text(shared, net, train_image))
    try:
        yield {"work": work, "shared": shared, "net": net, "profile": profile, "lock": train_image}
    finally:
        for run in (shared / "runs").glob("*-mn-*"):
            for c in dk.containers_with_label(f"dev.ftkit.run={run_label(run)}"):
                dk.remove_container(c["Id"])
        subprocess.run(["docker", "network", "rm", net], check=False, capture_output=True)


def profile_text(shared: Path, net: str, lock: Path, node_b_env: str = "") -> str:
    lines = ["ftkit: 1", "kind: machine", "name: two-containers", "executor: docker",
             f"paths: {{runs: {shared / 'runs'}}}", *docker_lines(f"images_lock: {lock}")]
    lines += ["cluster:", f"  shared: {shared}", f"  network: {net}", "  interface: eth0",
              "  rendezvous: {port: 29400, join_timeout_s: 120}", "  nodes:",
              "    - {name: node-a, address: node-a, env: {OMP_NUM_THREADS: '1'}}",
              f"    - {{name: node-b, address: node-b, env: {{OMP_NUM_THREADS: '1'{node_b_env}}}}}"]
    return "\n".join(lines) + "\n"


def recipe(work: Path, name: str, *, nodes: int, steps: int = STEPS) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(lora_recipe(name, steps=steps, every=CKPT_EVERY, logging_steps=5, nodes=nodes,
                                batch=4 if nodes == 2 else 8, distribution="ddp" if nodes == 2 else "single"))
    return path


def newest_run(shared: Path, name: str) -> Path | None:
    runs = sorted((shared / "runs").glob(f"*-{name}"))
    return runs[-1] if runs else None


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "steps/train/metrics.jsonl").read_text().splitlines() if x.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


def complete_checkpoint(run: Path) -> Path | None:
    done = sorted((run / "steps/train/checkpoints").glob("checkpoint-*/ftkit-complete.json"))
    return done[0].parent if done else None


def run_containers(run: Path) -> list[dict[str, Any]]:
    from ftkit.gateways import docker as dk

    return dk.containers_with_label(f"dev.ftkit.run={run_label(run)}")


def test_two_nodes_train_like_one_and_resume_after_losing_a_node(cluster: Any) -> None:
    from ftkit.gateways import docker as dk

    work, shared, profile = cluster["work"], cluster["shared"], str(cluster["profile"])
    t0 = time.monotonic()
    two = recipe(work, "mn-two", nodes=2)
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", "up", str(two), "-m", profile, "-q"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            run = newest_run(shared, "mn-two")
            if run is not None and complete_checkpoint(run) is not None:
                node_b = [c for c in run_containers(run) if c["Labels"].get("dev.ftkit.node") == "node-b"]
                assert node_b, "node-b's container is not there"
                dk.kill_container(node_b[0]["Id"])  # SIGKILL: the host is gone
                killed = complete_checkpoint(run)
                break
            time.sleep(0.2)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
    t_kill = time.monotonic() - t0
    run = newest_run(shared, "mn-two")
    assert killed is not None and run is not None, f"no complete checkpoint before the run ended:\n{err[-3000:]}"
    assert proc.returncode == 1, err[-3000:]
    state = json.loads((run / "state.json").read_text())
    train = state["steps"]["train"]
    assert state["status"] == "failed" and train["status"] == "failed"
    assert "node node-b (rank 1) failed first: killed (SIGKILL)" in train["error"], train["error"]
    assert "node-a" in train["error"]  # what became of the other node
    assert set(train["process"]["nodes"]) == {"node-a", "node-b"}
    assert run_containers(run) == [], "a node's container outlived the failed run"
    log = (run / "logs" / "train.log").read_text()
    assert "[node-a] " in log and "[node-b] " in log

    t1 = time.monotonic()
    res = run_ftkit("up", "--resume", str(run), "-q", cwd=work, timeout=900)
    t_resume = time.monotonic() - t1
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((run / "steps/train/train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["world_size"] == 2
    assert summary["resumed_from"] is not None
    assert int(summary["resumed_from"].split("-")[1]) >= int(killed.name.split("-")[1])
    assert run_containers(run) == []

    t2 = time.monotonic()
    one = recipe(work, "mn-one", nodes=1)
    res = run_ftkit("up", str(one), "-m", profile, "-q", cwd=work, timeout=900)
    t_one = time.monotonic() - t2
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = losses(run), losses(newest_run(shared, "mn-one") or run)
    assert sorted(a) == sorted(b) and len(a) == STEPS // 5
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"\nmulti-node: max |loss difference| {diff:.2e} over {len(a)} logged steps; killed after "
          f"{killed.name}, resumed from {summary['resumed_from']}; times: two nodes until killed and failed "
          f"{t_kill:.0f} s, resume {t_resume:.0f} s, one node {t_one:.0f} s")
    assert diff <= TOLERANCE, (a, b)


def test_allreduce_bench_between_the_nodes_feeds_the_plan(cluster: Any) -> None:
    work, profile = cluster["work"], str(cluster["profile"])
    two = recipe(work, "mn-bench", nodes=2)
    res = run_ftkit("bench", str(two), "--allreduce", "-m", profile, "--sizes", "65536,1048576", cwd=work,
                    timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "all-reduce between node-a, node-b (gloo, 2 processes, rendezvous node-a:29400)" in res.stdout
    kept = cluster["shared"] / "runs" / "allreduce-two-containers.json"
    data = json.loads(kept.read_text())
    assert data["backend"] == "gloo" and data["world_size"] == 2 and sorted(data["hosts"]) == ["node-a", "node-b"]
    assert [r["bytes"] for r in data["results"]] == [65536, 1048576]
    for r in data["results"]:
        assert r["algbw_gbps"] > 0 and r["busbw_gbps"] == pytest.approx(r["algbw_gbps"], rel=1e-3)  # 2(n-1)/n = 1
    plan = run_ftkit("plan", str(two), "-m", profile, cwd=work)
    assert plan.returncode == 0, plan.stderr
    assert "expected scaling of train:" in plan.stdout and "all-reduce measured" in plan.stdout


def test_doctor_cluster_flags_a_planted_difference(cluster: Any) -> None:
    work, shared, profile = cluster["work"], cluster["shared"], cluster["profile"]
    res = run_ftkit("doctor", "--cluster", "-m", str(profile), cwd=work, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "drift      none against node-a" in res.stdout
    assert res.stdout.count("is the same storage as here") == 2 and "eth0 is there" in res.stdout
    # node-b gets a PYTHONPATH that shadows torch with another version (a stray path on one host)
    plant = shared / "plant" / "torch-9.9.9.dist-info"
    plant.mkdir(parents=True)
    (plant / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9\n")
    planted = work / "planted.yaml"
    planted.write_text(profile_text(shared, cluster["net"], cluster["lock"],
                                    node_b_env=f", PYTHONPATH: {shared / 'plant'}"))
    res = run_ftkit("doctor", "--cluster", "-m", str(planted), cwd=work, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    drift = [ln for ln in res.stdout.splitlines() if "drift      packages.torch:" in ln]
    assert drift and drift[0].lstrip().startswith("ERROR") and drift[0].endswith(
        "node-b 9.9.9 (ranks must run the same torch)"), res.stdout
    assert "WARN  drift      dist_env.PYTHONPATH" in res.stdout, res.stdout
