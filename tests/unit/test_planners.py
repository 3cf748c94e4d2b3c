"""The planner's shape: one planner per recipe step type, the plan's typed fields."""

from __future__ import annotations

import json
import typing

import pytest

from ftkit.plan.build import PLANNERS
from ftkit.plan.spec import DockerSettings, Plan, PlanFormatError, Ready, TelemetrySettings
from ftkit.recipe.models import Step


def test_every_recipe_step_type_has_one_planner() -> None:
    """Adding a step type to the recipe without a planner fails here, not in a user's plan."""
    union = typing.get_args(Step)[0]
    types = {typing.get_args(cls.model_fields["type"].annotation)[0] for cls in typing.get_args(union)}
    assert types == set(PLANNERS)


def _plan(machine: str) -> Plan:
    from tests.conftest import RECIPES, run_cli

    result = run_cli("plan", str(RECIPES / "quickstart.yaml"), "--machine", str(RECIPES / "machines" / machine), "--json")
    assert result.code == 0, result.err
    return Plan.from_dict(json.loads(result.out))


@pytest.mark.parametrize("machine", ["cpu.yaml", "cpu-docker.yaml"])
def test_plan_json_reads_back_to_the_same_typed_plan(machine: str) -> None:
    """ready, request, docker and telemetry are dataclasses; plan.json keeps their old shape
    (a local plan's docker is {}), so a run planned before reads back the same."""
    plan = _plan(machine)
    data = plan.to_dict()
    assert Plan.from_dict(json.loads(json.dumps(data))).to_dict() == data
    serve = next(s for s in plan.steps if s.kind == "serve")
    assert isinstance(serve.ready, Ready) and serve.ready.port == 8765 and data["steps"][plan.steps.index(serve)]["ready"]
    assert isinstance(plan.telemetry, TelemetrySettings)
    if machine == "cpu.yaml":
        assert plan.docker is None and data["docker"] == {} and plan.docker_host is None
    else:
        assert isinstance(plan.docker, DockerSettings) and set(data["docker"]) >= {"host", "base_image", "build_missing"}


def test_a_train_step_carries_its_step_limit() -> None:
    """The progress display's total comes from the plan, not from the engine's job read back."""
    plan = _plan("cpu.yaml")
    train = next(s for s in plan.steps if s.kind == "train")
    job = json.loads(next(f.content for f in train.files if f.path.startswith("configs/train-")))
    assert train.max_steps == job["train"]["max_steps"] and train.max_steps


@pytest.mark.parametrize(("field", "value"), [("kind", "bake"), ("executor", "ssh")])
def test_plan_json_with_an_unknown_kind_or_executor_is_refused(field: str, value: str) -> None:
    data = _plan("cpu.yaml").to_dict()
    data["steps"][1][field] = value
    with pytest.raises(PlanFormatError, match=rf"steps\[1\]\.{field}: expected one of .*got '{value}'"):
        Plan.from_dict(data)


def test_every_executor_checks_images() -> None:
    """The runner asks any executor for its images (no attribute check): local has none."""
    from ftkit.run.executors.local import LocalExecutor

    plan = _plan("cpu.yaml")
    assert LocalExecutor(plan, None).ensure_image(plan.steps[0], None) is None  # type: ignore[arg-type]


def test_resolve_gives_steps_with_gpus_their_resolved_types() -> None:
    """After resolve a step's gpus is a list of indices (`all` expanded), so planning never
    checks for "all"; recipe.resolved.yaml dumps the steps as the recipe's own."""
    from ftkit.prepare import prepare
    from ftkit.recipe.models import MergeStep
    from ftkit.recipe.resolve import ResolvedServeStep, ResolvedTrainStep
    from tests.conftest import RECIPES

    res = prepare(str(RECIPES / "llama31-8b-lora-sharded.yaml"), str(RECIPES / "machines" / "dual-4090.yaml"),
                  executor="docker").res
    types = {s.type: type(s) for s in res.recipe.steps}
    assert types["train"] is ResolvedTrainStep and types["serve"] is ResolvedServeStep
    assert all(isinstance(s.gpus, list) for s in res.recipe.steps if not isinstance(s, MergeStep) and hasattr(s, "gpus"))
    dumped = res.to_yaml_data()["steps"]
    assert [d["type"] for d in dumped] == [s.type for s in res.recipe.steps]
    assert all(isinstance(d["gpus"], list) for d in dumped if "gpus" in d)


def test_a_multi_node_plan_reads_back_with_its_cluster() -> None:
    """Plan.cluster is a ClusterInfo (nodes, rendezvous, gradient bytes, the measured
    all-reduce: null until `ftkit bench --allreduce`); a one-node plan's is {} in plan.json."""
    from ftkit.plan.spec import ClusterInfo, ClusterNode
    from tests.conftest import RECIPES, run_cli

    result = run_cli("plan", str(RECIPES / "llama31-8b-lora-2nodes.yaml"), "--machine",
                     str(RECIPES / "machines" / "home-cluster.yaml"), "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    plan = Plan.from_dict(data)
    assert isinstance(plan.cluster, ClusterInfo) and all(isinstance(n, ClusterNode) for n in plan.cluster.nodes)
    assert plan.cluster.gradient_bytes and plan.cluster.allreduce is None and data["cluster"]["allreduce"] is None
    assert "expected_scaling" not in data["cluster"]
    assert json.loads(json.dumps(plan.to_dict())) == data
    assert _plan("cpu.yaml").to_dict()["cluster"] == {}


def test_a_plan_json_written_before_max_steps_takes_it_from_the_train_config() -> None:
    # runs made before StepSpec.max_steps still show their progress and resume with it
    data = _plan("cpu.yaml").to_dict()
    for step in data["steps"]:
        del step["max_steps"]
    old = Plan.from_dict(json.loads(json.dumps(data)))
    train = next(s for s in old.steps if s.kind == "train")
    assert train.max_steps and train.max_steps == _plan("cpu.yaml").step(train.id).max_steps
    assert all(s.max_steps is None for s in old.steps if s.kind != "train")
