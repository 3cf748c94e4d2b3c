"""The guide recipes' plans carry everything a container needs: for every docker step the
container's create arguments are built by docker-py itself (no engine, nothing started),
and every path the step will touch inside the container - in its command, its env and the
config files the plan writes for it - lies under one of its mounts."""

from __future__ import annotations

import re

import pytest

from ftkit.gateways.docker import create_args
from ftkit.plan.container import container_spec, step_command
from ftkit.plan.spec import run_label
from ftkit.run.executors.docker import request
from tests.builders import CPU_DOCKER, GUIDES, MACHINES, guide_plan, plan_of, recipe_data, write_recipe
from tests.conftest import RECIPES

PAIRS = [*GUIDES.values(), ("quickstart.yaml", "cpu-docker.yaml")]
INSIDE = re.compile(r"/ftkit/[\w./@:+-]+")


def _covered(path: str, targets: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


@pytest.mark.parametrize("recipe,machine", PAIRS, ids=[p[0].split(".")[0] for p in PAIRS])
def test_every_container_is_complete(recipe: str, machine: str) -> None:
    plan = plan_of(RECIPES / recipe, MACHINES / machine, run_dir="/runs/20261123T000000Z-x")
    docker_steps = [s for s in plan.steps if s.executor == "docker"]
    assert docker_steps
    for step in docker_steps:
        cs = container_spec(step, plan)
        args = create_args(request(cs))
        host = args["HostConfig"]
        # first the container's own start: threads sized to its CPU allowance (shared by the processes
        # accelerate starts, one per GPU with DDP or DeepSpeed), then the step's command
        cmd = args["Cmd"]
        processes = ["--processes", str(len(step.gpus))] if len(step.gpus) > 1 and step.kind == "train" else []
        assert cmd[:3 + len(processes) + 1] == ["python", "-m", "ftkit.run.incontainer", *processes, "--"], cmd
        assert cmd[cmd.index("--") + 1:] == step_command(step, plan)
        assert re.match(r"^ftkit/(train|serve|quantize):[\w.-]+?-[0-9a-f]{12}$", args["Image"]), args["Image"]
        label = run_label("/runs/20261123T000000Z-x")  # the run directory's name and a digest of its path
        assert re.fullmatch(r"20261123T000000Z-x-[0-9a-f]{8}", label)
        assert args["Name"] == f"ftkit-{label}-{step.id}"
        assert args["Labels"]["dev.ftkit.run"] == label and args["Labels"]["dev.ftkit.step"] == step.id
        assert args["User"] and host["Init"] is True and not host.get("Privileged")
        targets = [m["Target"] for m in host["Mounts"]]
        assert all(m["Source"].startswith("/") for m in host["Mounts"])
        assert "/ftkit/run" in targets
        # everything the step names inside the container is mounted
        texts = [*args["Cmd"], *args["Env"], *(f.content for f in step.files)]
        named = {p.rstrip(".,\"'") for t in texts for p in INSIDE.findall(t)}
        missing = sorted(p for p in named if not _covered(p, targets))
        assert not missing, f"{step.id}: not mounted: {missing}"
        if step.gpus:
            [req] = host["DeviceRequests"]
            assert req["DeviceIDs"] == [str(g) for g in step.gpus] and req["Capabilities"] == [["gpu"]]
            env = dict(e.split("=", 1) for e in args["Env"])
            assert env["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(len(step.gpus)))
            assert "/ftkit/lease" in targets and cmd[cmd.index("--") + 1:][:2] == ["ftkit", "lease"]
            assert args["Cmd"][args["Cmd"].index("--gpus") + 1] == ",".join(map(str, step.gpus))
        else:
            assert not host.get("DeviceRequests")
        if step.kind == "serve":
            port = str(step.ports[0].container)
            assert host["PortBindings"] == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": port}]}
            assert "--host" in args["Cmd"] and args["Cmd"][args["Cmd"].index("--host") + 1] == "0.0.0.0"
        if len(step.gpus) > 1 or (step.kind == "serve" and "vllm" in args["Cmd"]):
            assert host["ShmSize"] >= 8 * 2**30  # NCCL and vLLM's workers talk through /dev/shm


def test_simulated_gpus_request_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_SIMULATED_GPUS", "RTX 4090,RTX 4090")
    plan = guide_plan("llama-2gpu", run_dir=None)
    train = next(s for s in plan.steps if s.kind == "train")
    args = create_args(request(container_spec(train, plan)))
    assert not args["HostConfig"].get("DeviceRequests")
    assert "FTKIT_SIMULATED_GPUS=RTX 4090,RTX 4090" in args["Env"]
    assert ":cpu-" in args["Image"]  # a simulated machine runs the CPU images


def test_template_and_eval_files_are_mounted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The inputs a recipe names beside the dataset - a prompt template, an eval step's prompt
    file - are mounted too (they were missing once)."""
    import shutil

    shutil.copy(RECIPES / "data" / "quickstart-train.jsonl", tmp_path / "train.jsonl")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a", "expected": "b"}\n')
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = recipe_data(name="inputs", dataset={"path": "train.jsonl", "template": "chat.jinja"},
                       steps=[{"type": "train", "max_steps": 1}, {"type": "merge"},
                              {"type": "eval", "path": "prompts.jsonl", "models": ["base", "merged"]}])
    plan = plan_of(write_recipe(tmp_path, {**data, "model": {"tiny": {}}}), CPU_DOCKER)
    for step in plan.steps:
        if step.executor != "docker":
            continue
        args = create_args(request(container_spec(step, plan)))
        targets = [m["Target"] for m in args["HostConfig"]["Mounts"]]
        named = {p.rstrip(".,\"'") for f in step.files for p in INSIDE.findall(f.content)}
        assert all(_covered(p, targets) for p in named), (step.id, named, targets)
    ev = next(s for s in plan.steps if s.kind == "eval")
    assert "/ftkit/inputs/eval-eval/prompts.jsonl" in {m.container for m in ev.mounts}
    assert "/ftkit/inputs/template/chat.jinja" in {m.container for m in ev.mounts}


def test_long_step_ids_never_share_a_container_name() -> None:
    """Names cut to 128 characters: two steps whose ids share their beginning must not get one
    name (each step's start removes a container of its name, force: the running sibling)."""
    import dataclasses

    from ftkit.plan.container import container_name

    plan = plan_of(RECIPES / "quickstart.yaml", CPU_DOCKER, run_dir="/runs/20261123T000000Z-x")
    train = plan.step("train")
    a, b = (dataclasses.replace(train, id="eval-" + "x" * 140 + tail) for tail in ("-a", "-b"))
    na, nb = container_name(plan, a), container_name(plan, b)
    assert na != nb and len(na) <= 128 and len(nb) <= 128, (na, nb)
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", na) and na.startswith(f"ftkit-{run_label(plan.run_dir)}-eval-xxx")
    assert container_name(plan, train) == f"ftkit-{run_label(plan.run_dir)}-train"  # a short name stays as it was
