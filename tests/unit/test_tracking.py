"""Experiment tracking: TensorBoard event files that tensorboard's own reader reads, MLflow to a
local file store from the real train engine, and secrets that reach a step by name only:
never in a recipe, a plan, a run directory, a compose file or a printed docker command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftkit.engines import tbevents
from tests.builders import CPU_DOCKER, plan_json, shipped, shipped_machine, step_config
from tests.conftest import RECIPES, run_cli

SECRET = "s3cr3t-token-value-9f2c"


def test_event_files_read_back_with_tensorboards_reader(tmp_path: Path) -> None:
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert tbevents.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = tbevents.EventWriter(tmp_path)
    for step in range(1, 6):
        w.scalars(step, {"train/loss": 1.0 / step, "train/lr": 3e-3, "train/bad": float("nan"), "train/flag": True})
    w.close()
    ea = ea_mod.EventAccumulator(str(tmp_path))
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == ["train/loss", "train/lr"]  # nan and bools left out
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]


def recipe_with(tmp_path: Path, tracking: str) -> Path:
    return shipped(tmp_path, "quickstart.yaml", file="r.yaml", **{"\nsteps:": "\n" + tracking.rstrip() + "\nsteps:"})


def train_step(plan: dict) -> dict:  # type: ignore[type-arg]
    return next(s for s in plan["steps"] if s["kind"] == "train")


def job_of(plan: dict) -> dict:  # type: ignore[type-arg]
    return step_config(train_step(plan), "configs/train-")


def test_tensorboard_is_on_by_default_and_nothing_else_is(tmp_path: Path) -> None:
    plan = plan_json(RECIPES / "quickstart.yaml", cwd=tmp_path)
    tracking = job_of(plan)["tracking"]
    assert tracking["tensorboard_dir"].endswith("/steps/train/tensorboard")
    assert tracking["mlflow"] is None and tracking["wandb"] is None and train_step(plan)["env_from_host"] == []


@pytest.mark.parametrize("uri,message", [
    ("https://alice:hunter2@mlflow.example:5000", "credentials in the URI"),
    ("mlruns", "is a relative path"),
    ("file:mlruns", "a local store needs an absolute path"),
    ("ftp://host/x", "scheme 'ftp'"),
    ("http://", "names no host"),
    ("http://host:99999", "port"),
    ("http://host/?token=hunter2", "a query or fragment"),
    ("https://host/api#hunter2", "a query or fragment"),
    ("file:///srv/mlruns?x=hunter2", "a query or fragment"),
])
def test_bad_tracking_uris_are_refused_where_they_are(tmp_path: Path, uri: str, message: str) -> None:
    recipe = recipe_with(tmp_path, f"tracking:\n  mlflow: {{tracking_uri: {json.dumps(uri)}}}\n")
    result = run_cli("validate", str(recipe))
    assert result.code == 2 and message in result.err, result.err
    line = next(ln for ln in result.err.splitlines() if message in ln)
    assert line.startswith(f"{recipe}:") and "tracking.mlflow.tracking_uri" in line
    assert "hunter2" not in result.out


def test_secrets_reach_the_step_by_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    from ftkit import prepare

    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"mlflow-skinny": "3.18.0", "wandb": "0.23.0"})
    recipe = recipe_with(tmp_path, "tracking:\n  mlflow: {tracking_uri: 'https://mlflow.example'}\n"
                                   "  wandb: {project: home-lab, mode: offline}\n")
    result = run_cli("plan", str(recipe), "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    assert SECRET not in result.out
    plan = json.loads(result.out)
    assert train_step(plan)["env_from_host"] == ["MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                                                 "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"]
    assert job_of(plan)["tracking"]["mlflow"] == {"tracking_uri": "https://mlflow.example", "experiment": "quickstart"}
    assert job_of(plan)["tracking"]["wandb"] == {"project": "home-lab", "entity": None, "mode": "offline"}
    run = run_cli("up", str(recipe), "--dry-run", cwd=tmp_path)
    assert SECRET not in run.out + run.err


def test_the_docker_paths_take_secrets_from_the_environment_when_they_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the docker executor creates, what a node's `docker run` line says and what a
    compose service holds, for a train step that tracks to W&B (the images carry no client
    yet: the plan refuses it; the path is ready for when they do)."""
    from ftkit.compose.stack import RenderOptions, render
    from ftkit.plan.container import container_spec, host_env
    from ftkit.prepare import make_plan
    from ftkit.run.executors.docker import request
    from ftkit.run.executors.multinode import docker_run_command

    plan = make_plan(str(RECIPES / "quickstart.yaml"), str(CPU_DOCKER), run_dir="/tmp/r")
    step = next(s for s in plan.steps if s.kind == "train")
    step.env_from_host = ["WANDB_API_KEY"]
    cs = container_spec(step, plan)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert "WANDB_API_KEY" not in host_env(cs)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert request(cs).environment["WANDB_API_KEY"] == SECRET
    assert SECRET not in json.dumps(plan.to_dict())
    line = docker_run_command(cs)
    assert "--env WANDB_API_KEY " in line and SECRET not in line
    stack = render(plan, RenderOptions(out_dir="/tmp/stack", recipe_dir=str(RECIPES), uid=1000, gid=1000))
    text = stack.compose_yaml() + stack.env_text() + stack.readme
    assert "WANDB_API_KEY: ${WANDB_API_KEY:-}" in text and SECRET not in text


def test_docker_executor_and_missing_clients_are_refused_before_anything_runs(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ftkit import prepare

    recipe = recipe_with(tmp_path, "tracking:\n  mlflow: {tracking_uri: /srv/mlruns}\n")
    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"mlflow": None, "mlflow-skinny": None})
    result = run_cli("plan", str(recipe), cwd=tmp_path)
    assert result.code == 2 and "mlflow or mlflow-skinny is not installed" in result.err, result.err
    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"mlflow-skinny": "3.18.0"})
    result = run_cli("validate", str(recipe), "--machine", str(CPU_DOCKER))
    assert result.code == 2 and "ftkit's images do not carry it" in result.err, result.err
    off = recipe_with(tmp_path / "off", "tracking:\n  mlflow: false\n")
    machine = shipped_machine(tmp_path, CPU_DOCKER.name, file="m.yaml",
                              tracking={"mlflow": {"tracking_uri": "https://team-mlflow:5000"}})
    assert run_cli("validate", str(recipe), "--machine", str(machine)).code == 2  # the profile's server, in images
    result = run_cli("validate", str(off), "--machine", str(machine))  # the recipe turns it off
    assert result.code == 0, result.err


def test_the_engine_writes_tensorboard_and_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real train engine on a tiny model: TensorBoard's reader sees the loss curve of
    metrics.jsonl; MLflow's client reads the same losses from a local file store; the
    secret in the environment is in none of the files the run wrote."""
    pytest.importorskip("trl")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    mlflow = pytest.importorskip("mlflow")
    from ftkit.engines import tiny, train
    from tests.unit.test_train_engine import DATASET, TINY, config

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    model = tmp_path / "model"
    tiny.generate(TINY, DATASET, model)
    out = tmp_path / "run" / "steps" / "train"
    store = tmp_path / "mlruns"
    cfg = config(model, out)
    cfg["tracking"] = {"tensorboard_dir": str(out / "tensorboard"), "run_name": "quickstart-train", "wandb": None,
                       "mlflow": {"tracking_uri": f"file://{store}", "experiment": "quickstart"}}
    train.run(cfg)
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and "train_runtime" not in r]
    ea = ea_mod.EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(s, pytest.approx(v)) for s, v in losses]
    client = mlflow.tracking.MlflowClient(f"file://{store}")
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "quickstart-train"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in losses]
    for f in [*tmp_path.rglob("*")]:
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f


def test_the_engine_writes_an_offline_wandb_run_in_the_step_directory(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline (no network here): the run's files land in the train step's directory for a
    later `wandb sync`, and the API key from the environment is in none of them."""
    pytest.importorskip("trl")
    pytest.importorskip("wandb")
    from ftkit.engines import tiny, train
    from tests.unit.test_train_engine import DATASET, TINY, config

    monkeypatch.setenv("WANDB_API_KEY", SECRET + "0" * (40 - len(SECRET)))
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    tiny.generate(TINY, DATASET, model)
    out = tmp_path / "run" / "steps" / "train"
    cfg = config(model, out)
    cfg["tracking"] = {"tensorboard_dir": None, "run_name": "quickstart-train", "mlflow": None,
                       "wandb": {"project": "home-lab", "entity": None, "mode": "offline"}}
    train.run(cfg)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert not (tmp_path / "wandb").exists()  # not where the process started
    for f in [*tmp_path.rglob("*")]:
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f
