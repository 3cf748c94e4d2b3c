"""`ftkit compose`: stacks rendered from the plan, valid for the Compose spec and for
docker-compose itself, committed stacks kept identical to fresh output, and refusals that
write nothing.

Golden files normalise the image content hash (it follows the ftkit sources); the committed
stacks under compose/ are compared exactly - regenerate them with `bash compose/regenerate.sh`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import GOLDEN, RECIPES, ROOT, check_golden, run_cli

SPEC = Path(os.environ.get("FTKIT_COMPOSE_SPEC", "/work/shared/reference/compose-spec.json"))
COMPOSE_DIR = ROOT / "compose"
GOLDEN_STACKS = {
    "cpu-quickstart": ("quickstart.yaml", "cpu-docker.yaml"),
    "one-gpu-llama": ("llama31-8b-lora-1gpu.yaml", "dual-4090.yaml"),
    "two-gpu-handoff-mistral": ("mistral-small-24b-qlora-2x24gb.yaml", "zorac.yaml"),
}
REGENERATE = "bash compose/regenerate.sh (then commit compose/)"


@pytest.fixture(autouse=True)
def _host_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacks must not depend on who generates them: no lease dir or simulated GPUs from the env."""
    monkeypatch.delenv("FTKIT_LEASE_DIR", raising=False)
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)


def compose(recipe: str, machine: str | None, out: Path, *extra: str, cwd: Path = ROOT):  # type: ignore[no-untyped-def]
    args = ["compose", recipe] + (["--machine", machine] if machine else []) + ["-o", str(out), *extra]
    return run_cli(*args, cwd=cwd)


def stack(out: Path) -> tuple[dict, dict[str, str]]:  # type: ignore[type-arg]
    data = yaml.safe_load((out / "compose.yaml").read_text())
    env = {}
    for line in (out / ".env").read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v
    return data, env


def schema_errors(data: dict) -> list[str]:  # type: ignore[type-arg]
    import jsonschema

    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is missing")
    validator = jsonschema.Draft202012Validator(json.loads(SPEC.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def docker_compose_config(out: Path, *files: str, env: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    """`docker-compose config` of the stack: what docker-compose itself makes of it."""
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("FTKIT_REQUIRE_DOCKER") == "1":
            pytest.fail("FTKIT_REQUIRE_DOCKER=1 but docker-compose is not installed")
        pytest.skip("docker-compose is not installed")
    args = [exe]
    for f in files or ("compose.yaml",):
        args += ["-f", f]
    proc = subprocess.run([*args, "--profile", "train", "--profile", "serve", "config"], cwd=out, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def engine(command: list[str]) -> list[str]:
    """A service's command after the in-container prefix (ftkit.run.incontainer ... --)."""
    assert command[:3] == ["python", "-m", "ftkit.run.incontainer"], command
    return command[command.index("--") + 1:]


def normalise(text: str, out: Path) -> str:
    # a checkout that shares a tree with the output (both under /tmp, say) is written relative
    rel = os.path.relpath(ROOT, out)
    project = stack(out)[1]["COMPOSE_PROJECT_NAME"]  # its digest names where the stack lies (tmp_path)
    text = text.replace(project, project[:-6] + "<where>")
    text = text.replace(rel + "/", "<checkout>/").replace(str(out), "<stack>").replace(str(ROOT), "<checkout>")
    return re.sub(r"(ftkit/(train|serve|quantize):[\w.-]+?-)[0-9a-f]{12}", r"\1<hash>", text)


# -- golden stacks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_STACKS))
def test_golden_stacks(name: str, tmp_path: Path) -> None:
    recipe, machine = GOLDEN_STACKS[name]
    out = tmp_path / name
    result = compose(f"recipes/{recipe}", f"recipes/machines/{machine}", out, "--user", "1000:1000")
    assert result.code == 0, result.err
    for fname, golden in (("compose.yaml", "compose.yaml"), (".env", "env"), ("README.md", "README.md")):
        check_golden(GOLDEN / "compose" / name / golden, normalise((out / fname).read_text(), out))
    data, env = stack(out)
    assert schema_errors(data) == []
    docker_compose_config(out)


def test_committed_stacks_equal_fresh_output(tmp_path: Path) -> None:
    """Generate every committed stack as regenerate.sh does, in a copy of the checkout's
    recipes (so relative paths come out the same), and compare file by file."""
    rows = [ln.split() for ln in (COMPOSE_DIR / "stacks.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert {r[2] for r in rows} >= {"quickstart", "mistral-small-24b-qlora-2x24gb"}
    root = tmp_path / "checkout"
    shutil.copytree(RECIPES, root / "recipes")
    stale: list[str] = []
    for recipe, machine, directory in rows:
        result = run_cli("compose", f"recipes/{recipe}", "--machine", f"recipes/machines/{machine}", "-o",
                         f"compose/{directory}", "--user", "1000:1000", cwd=root)
        assert result.code == 0, result.err
        fresh, committed = root / "compose" / directory, COMPOSE_DIR / directory
        generated = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
        for rel in sorted(generated):
            if not (committed / rel).is_file() or (committed / rel).read_bytes() != (fresh / rel).read_bytes():
                stale.append(f"compose/{directory}/{rel}")
        configs = committed / "run" / "configs"
        extra = {p.relative_to(committed) for p in configs.rglob("*") if p.is_file()} - generated if configs.is_dir() else set()
        stale += [f"compose/{directory}/{rel} (no longer generated)" for rel in sorted(extra)]
    assert not stale, f"committed stacks differ from `ftkit compose` output: {stale}; run {REGENERATE}"


def _committed() -> list[str]:
    rows = [ln.split() for ln in (COMPOSE_DIR / "stacks.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [r[2] for r in rows]


@pytest.mark.parametrize("directory", _committed())
def test_committed_stacks_are_valid(directory: str) -> None:
    out = COMPOSE_DIR / directory
    data, env = stack(out)
    assert schema_errors(data) == []
    cfg = docker_compose_config(out)
    assert set(cfg["services"]) == set(data["services"])
    assert env["FTKIT_UID"] == env["FTKIT_GID"] == "1000"


def test_committed_stacks_run_from_the_checkout() -> None:
    """Inputs from the recipe's tree are relative to the stack; docker-compose resolves them."""
    out = COMPOSE_DIR / "quickstart"
    _, env = stack(out)
    assert env["FTKIT_RUN_DIR"] == "./run"
    assert env["FTKIT_INPUT_DATASET"] == "../../recipes/data/quickstart-train.jsonl"
    assert (out / env["FTKIT_INPUT_DATASET"]).resolve() == (RECIPES / "data" / "quickstart-train.jsonl").resolve()
    cfg = docker_compose_config(out)
    vols = cfg["services"]["train"]["volumes"]
    flat = json.dumps(vols)
    assert str((RECIPES / "data" / "quickstart-train.jsonl").resolve()) in flat
    assert str((out / "run").resolve()) in flat


# -- what the stacks say --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stack") / "mistral"
    os.environ.pop("FTKIT_LEASE_DIR", None)
    os.environ.pop("FTKIT_SIMULATED_GPUS", None)
    result = compose("recipes/mistral-small-24b-qlora-2x24gb.yaml", "recipes/machines/zorac.yaml", out)
    assert result.code == 0, result.err
    return out


def test_services_come_from_the_plans_container_specs(mistral: Path) -> None:
    from ftkit.plan.container import container_spec
    from ftkit.prepare import prepare

    plan = prepare(str(RECIPES / "mistral-small-24b-qlora-2x24gb.yaml"), str(RECIPES / "machines" / "zorac.yaml"),
                   run_dir=str(mistral / "run"), executor="docker").plan
    cfg = docker_compose_config(mistral)
    docker_steps = [s for s in plan.steps if s.executor == "docker"]
    assert sorted(cfg["services"]) == sorted(s.id for s in docker_steps) == ["merge", "quantize", "serve", "train"]
    for step in docker_steps:
        cs = container_spec(step, plan, journal=True)
        svc = cfg["services"][step.id]
        assert svc["command"] == cs.command
        env = {k: v for k, v in svc["environment"].items() if k != "VLLM_API_KEY"}
        assert env == cs.env
        binds = sorted((v.split(":")[0], v.split(":")[1], v.endswith(":ro")) for v in svc["volumes"])
        assert binds == sorted((m.host, m.container, m.read_only) for m in cs.mounts)
        assert svc["image"] == cs.image and svc["working_dir"] == cs.workdir
        # the run label is the stack's project (as unique as the project, the same in every clone)
        project = next(ln.split("=", 1)[1] for ln in (mistral / ".env").read_text().splitlines()
                       if ln.startswith("COMPOSE_PROJECT_NAME="))
        assert svc.get("labels", {}) == {**cs.labels, "dev.ftkit.run": project}
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert [d["device_ids"] for d in devices] == ([cs.device_ids] if cs.device_ids else [])
        assert all(d["capabilities"] == ["gpu"] for d in devices)
    # the lease wraps the GPU steps: the command the docker executor would run
    assert engine(cfg["services"]["train"]["command"])[:9] == ["ftkit", "lease", "--gpus", "0,1", "--role", "train",
                                                               "--service", "train", "--max-power-w"]
    assert engine(cfg["services"]["serve"]["command"])[:6] == ["ftkit", "lease", "--gpus", "1", "--role", "serve"]
    # each service journals its own step (no ftkit drives a compose run)
    assert cfg["services"]["train"]["command"][3:8] == ["--journal", "train", "--processes", "2", "--"]


def test_profiles_chain_and_server(mistral: Path) -> None:
    data, env = stack(mistral)
    svcs = data["services"]
    assert svcs["train"]["profiles"] == ["train"] and svcs["merge"]["profiles"] == ["train"]
    assert svcs["serve"]["profiles"] == ["serve"]
    assert "depends_on" not in svcs["train"]
    assert svcs["merge"]["depends_on"] == {"train": {"condition": "service_completed_successfully"}}
    assert svcs["train"]["restart"] == "no" and svcs["serve"]["restart"] == "unless-stopped"
    # no service depends on one in another profile (docker-compose 1.29 refuses; `--profile serve` must not train)
    for name, svc in svcs.items():
        for dep in svc.get("depends_on", {}):
            assert svcs[dep]["profiles"] == svc["profiles"], (name, dep)
    serve = svcs["serve"]
    assert serve["ports"] == ["${FTKIT_BIND}:${FTKIT_SERVE_PORT}:8000"]
    assert env["FTKIT_BIND"] == "127.0.0.1" and env["FTKIT_SERVE_PORT"] == "8000"
    hc = serve["healthcheck"]
    assert hc["test"][:3] == ["CMD", "python", "-c"] and "http://127.0.0.1:8000/health" in hc["test"][3]
    assert hc["start_period"] == "600s"
    assert serve["shm_size"] == "8g"
    assert serve["environment"]["VLLM_API_KEY"] == "${FTKIT_API_KEY:-}" and env["FTKIT_API_KEY"] == ""
    assert serve["stop_grace_period"] == "40s"  # the lease's 30 s grace for the engine, then some
    assert env["FTKIT_HF_CACHE"] == "/srv/hf-cache" and env["FTKIT_LEASE_DIR"] == "/run/lock/ftkit"
    assert env["FTKIT_INPUT_DATASET"] == "/srv/datasets/my-writing.jsonl"  # profile paths stay absolute
    for svc in svcs.values():
        assert svc["user"] == "${FTKIT_UID}:${FTKIT_GID}" and svc["init"] is True
        assert not {"privileged", "cap_add", "devices", "pid", "network_mode", "ipc"} & set(svc)
        for vol in svc["volumes"]:
            assert vol.startswith("${FTKIT_"), vol  # every host path comes from .env
        assert svc["image"].startswith("${FTKIT_")


def test_readme_lists_host_steps_in_plan_order(mistral: Path) -> None:
    text = (mistral / "README.md").read_text()
    order = ["ftkit power set --gpus 0,1 --watts 350", "systemctl stop vllm", "docker compose --profile train up",
             "ftkit power restore --gpus 0,1", "docker compose --profile serve up -d", "systemctl start vllm"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert text.count("ftkit power restore") == 1
    assert "install -d -m 1777 /run/lock/ftkit" in text
    assert "ftkit build --image train --variant cuda13.0" in text and "ftkit build --image serve --variant vllm" in text
    assert "/v1/chat/completions" in text and "Authorization: Bearer" in text


def test_moving_the_stack_means_editing_env(mistral: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(mistral, moved)
    env_file = moved / ".env"
    text = env_file.read_text()
    for old, new in (("FTKIT_HF_CACHE=/srv/hf-cache", "FTKIT_HF_CACHE=/data/hf"),
                     ("FTKIT_SERVE_PORT=8000", "FTKIT_SERVE_PORT=9001"),
                     ("FTKIT_LEASE_DIR=/run/lock/ftkit", "FTKIT_LEASE_DIR=/var/lock/ftkit")):
        text = text.replace(old, new)
    env_file.write_text(text)
    cfg = docker_compose_config(moved)
    serve = cfg["services"]["serve"]
    flat = json.dumps(serve)
    assert "/data/hf:/ftkit/hf-cache" in flat and "/var/lock/ftkit:/ftkit/lease" in flat
    assert "/srv/hf-cache" not in flat
    ports = json.dumps(serve["ports"])
    assert "9001" in ports and "127.0.0.1" in ports


def test_cpu_stack_has_no_gpu_lease_or_devices(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    assert compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", out).code == 0
    data, env = stack(out)
    assert list(data["services"]) == ["tiny-model", "train", "merge", "serve", "eval"]
    chain = [(n, list(s.get("depends_on", {}))) for n, s in data["services"].items() if n != "serve"]
    assert chain == [("tiny-model", []), ("train", ["tiny-model"]), ("merge", ["train"]), ("eval", ["merge"])]
    for svc in data["services"].values():
        assert "deploy" not in svc and engine(svc["command"])[:2] != ["ftkit", "lease"]
    assert "FTKIT_LEASE_DIR" not in env  # no GPU, no lease
    assert "FTKIT_API_KEY" in env  # vLLM's CPU build serves, and takes an optional key
    # the plan's generated configs are in the stack's run directory
    for name in ("tiny-model.json", "train-train.json", "accelerate-train.yaml", "eval-eval.json"):
        assert (out / "run" / "configs" / name).is_file()
    assert env["FTKIT_UID"] == str(os.getuid()) and env["FTKIT_GID"] == str(os.getgid())


def test_simulated_gpus_request_no_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_SIMULATED_GPUS", "RTX 3090 Ti,RTX 4090")
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(tmp_path / "lease"))
    out = tmp_path / "sim"
    result = compose("recipes/mistral-small-24b-qlora-2x24gb.yaml", "recipes/machines/zorac.yaml", out)
    assert result.code == 0, result.err
    text = (out / "compose.yaml").read_text()
    assert "# SIMULATED GPUs (RTX 3090 Ti, RTX 4090)" in text
    data, env = stack(out)
    for name in ("train", "serve"):
        svc = data["services"][name]
        assert "deploy" not in svc
        assert svc["environment"]["FTKIT_SIMULATED_GPUS"] == "RTX 3090 Ti,RTX 4090"
    assert "FTKIT_SIMULATED_GPUS" not in data["services"]["merge"]["environment"]  # no GPU there
    assert env["FTKIT_LEASE_DIR"] == str(tmp_path / "lease")
    assert "Simulated GPUs" in (out / "README.md").read_text()
    assert schema_errors(data) == []


def _recipe(tmp_path: Path, serve_extra: str = "", machine_extra: str = "") -> tuple[Path, Path]:
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(RECIPES / "data" / "quickstart-train.jsonl", tmp_path / "data" / "train.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "ftkit: 1\nname: tricky\nmodel: {tiny: {hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, "
        "vocab_size: 300}}\ndataset: {path: data/train.jsonl, format: alpaca, template: alpaca}\nsteps:\n"
        "  - {type: train, method: lora, max_steps: 1}\n  - {type: merge}\n"
        f"  - {{type: serve, engine: transformers, port: 8123{serve_extra}}}\n"
    )
    machine = tmp_path / "m.yaml"
    machine.write_text(f"ftkit: 1\nkind: machine\nname: m\nexecutor: docker\n{machine_extra}")
    return recipe, machine


def test_dollars_in_recipe_strings_are_literal(tmp_path: Path) -> None:
    recipe, machine = _recipe(tmp_path, serve_extra=", args: {chat_template: 'x${HOME}$y'}")
    out = tmp_path / "out"
    result = compose(str(recipe), str(machine), out)
    assert result.code == 0, result.err
    data, _ = stack(out)
    assert "x$${HOME}$$y" in data["services"]["serve"]["command"]
    cfg = docker_compose_config(out, env={"HOME": "/interpolated"})
    # `config` prints a compose file again, so the escape stays: nothing was interpolated
    assert "x$${HOME}$$y" in cfg["services"]["serve"]["command"]
    assert "/interpolated" not in json.dumps(cfg)


def test_images_pinned_by_digest_are_used_as_pinned(tmp_path: Path) -> None:
    recipe, machine = _recipe(tmp_path)
    digest = "sha256:" + "ab" * 32
    recipe.write_text(recipe.read_text() + f"images: {{train: 'reg.example/ftkit/train@{digest}', "
                      f"serve: 'reg.example/ftkit/serve@{digest}'}}\n")
    out = tmp_path / "out"
    result = compose(str(recipe), str(machine), out)
    assert result.code == 0, result.err
    _, env = stack(out)
    assert env["FTKIT_TRAIN_IMAGE"] == f"reg.example/ftkit/train@{digest}"
    assert env["FTKIT_SERVE_IMAGE"] == f"reg.example/ftkit/serve@{digest}"
    assert f"docker pull reg.example/ftkit/train@{digest}" in (out / "README.md").read_text()


def test_bind_address_and_recipe_relative_paths(tmp_path: Path) -> None:
    recipe, machine = _recipe(tmp_path, machine_extra="bind_address: 0.0.0.0\n")
    out = tmp_path / "stacks" / "s"
    assert compose(str(recipe), str(machine), out).code == 0
    _, env = stack(out)
    assert env["FTKIT_BIND"] == "0.0.0.0"
    assert env["FTKIT_INPUT_DATASET"] == "../../data/train.jsonl"  # beside the recipe: relative to the stack
    assert env["FTKIT_RUN_DIR"] == "./run"


# -- refusals: exit 2, nothing written ---------------------------------------------------------------


def test_refuses_what_up_refuses(tmp_path: Path) -> None:
    machine = tmp_path / "tiny-psu.yaml"
    text = (RECIPES / "machines" / "zorac.yaml").read_text().replace("psu: {watts: 1500", "psu: {watts: 700")
    machine.write_text(text)
    out = tmp_path / "out"
    result = compose(str(RECIPES / "mistral-small-24b-qlora-2x24gb.yaml"), str(machine), out)
    assert result.code == 2 and "PSU budget exceeded" in result.err
    assert "Traceback" not in result.err
    assert not out.exists()


def test_refuses_foreign_directory_and_edited_env(tmp_path: Path) -> None:
    recipe, machine = _recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = compose(str(recipe), str(machine), out)
    assert result.code == 2 and "not a stack written by ftkit compose" in result.err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert compose(str(recipe), str(machine), out).code == 0
    assert compose(str(recipe), str(machine), out).code == 0  # regenerating an untouched stack is fine
    env_file = out / ".env"
    env_file.write_text(env_file.read_text().replace("FTKIT_SERVE_PORT=8123", "FTKIT_SERVE_PORT=9999"))
    before = (out / "compose.yaml").stat().st_mtime_ns
    result = compose(str(recipe), str(machine), out)
    assert result.code == 2 and "FTKIT_SERVE_PORT" in result.err
    assert "9999" in env_file.read_text() and (out / "compose.yaml").stat().st_mtime_ns == before
    assert compose(str(recipe), str(machine), out, "--force").code == 0
    assert "FTKIT_SERVE_PORT=8123" in env_file.read_text()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    recipe, machine = _recipe(tmp_path)
    out = tmp_path / "out"
    result = compose(str(recipe), str(machine), out, "--dry-run")
    assert result.code == 0, result.err
    assert "services:" in result.out and "FTKIT_RUN_DIR=./run" in result.out
    assert not out.exists()


@pytest.mark.parametrize("bad", ["1000", "a:b", "-1:0", "1000:1000:1"])
def test_bad_user_is_refused(tmp_path: Path, bad: str) -> None:
    recipe, machine = _recipe(tmp_path)
    result = compose(str(recipe), str(machine), tmp_path / "out", "--user", bad)
    assert result.code == 2 and "--user" in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["/srv/my data", "/srv/$HOME", "/srv/a#b", "/srv/a:b"])
def test_host_paths_env_cannot_hold_are_refused(tmp_path: Path, path: str) -> None:
    recipe, machine = _recipe(tmp_path, machine_extra=f"paths: {{hf_cache: '{path}'}}\n")
    out = tmp_path / "out"
    result = compose(str(recipe), str(machine), out)
    assert result.code == 2, result.err
    assert "FTKIT_HF_CACHE" in result.err and "Traceback" not in result.err
    assert not out.exists()


def test_local_executor_profile_still_renders_docker_services(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = compose("recipes/quickstart.yaml", "recipes/machines/cpu.yaml", out)
    assert result.code == 0, result.err
    data, _ = stack(out)
    assert engine(data["services"]["train"]["command"])[:2] == ["accelerate", "launch"]


# -- project names ------------------------------------------------------------------------------------


def test_two_stacks_of_one_recipe_never_share_a_project(tmp_path: Path) -> None:
    from ftkit.compose.stack import project_name

    a, b = tmp_path / "a" / "qs", tmp_path / "b" / "qs"  # the same directory name, elsewhere
    for out in (a, b):
        assert compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", out).code == 0
    pa, pb = (stack(out)[1]["COMPOSE_PROJECT_NAME"] for out in (a, b))
    committed = project_name("quickstart", str(COMPOSE_DIR / "quickstart"), str(RECIPES))
    assert len({pa, pb, committed}) == 3 and all(p.startswith("ftkit-quickstart-") for p in (pa, pb, committed))
    assert f"# {pa}: recipe quickstart" in (a / "README.md").read_text()
    # regenerated in place: the same project (its containers stay its own)
    assert compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", a).code == 0
    assert stack(a)[1]["COMPOSE_PROJECT_NAME"] == pa
    # where the committed stacks are, relative to the recipes, every clone names them the same
    assert committed == project_name("quickstart", "/elsewhere/clone/compose/quickstart", "/elsewhere/clone/recipes")
    # sharing is said out loud
    result = compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", b, "--project-name", pa)
    assert result.code == 2 and "COMPOSE_PROJECT_NAME" in result.err  # an .env with another name: refused
    result = compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", b, "--project-name", pa, "--force")
    assert result.code == 0, result.err
    assert stack(b)[1]["COMPOSE_PROJECT_NAME"] == pa and f"--project-name {pa}" in (b / "README.md").read_text()
    docker_compose_config(b)


@pytest.mark.parametrize("bad", ["Upper", "-dash", "a b", "x" * 64, "a.b"])
def test_bad_project_name_is_refused(tmp_path: Path, bad: str) -> None:
    result = compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", tmp_path / "s", "--project-name", bad)
    assert result.code == 2 and "--project-name" in result.err and not (tmp_path / "s").exists()


def test_stack_readme_says_what_the_stack_does_and_what_its_builds_need(tmp_path: Path) -> None:
    """A stack serves and sends no test prompts (`ftkit up` does): neither compose.yaml nor
    the README says it sends them, and the README points at its curl commands. It also says
    what a machine without a registry or direct PyPI needs in its profile, and that the stack
    is generated with that profile (the base image is part of each tag)."""
    out = tmp_path / "s"
    assert compose("recipes/quickstart.yaml", "recipes/machines/cpu-docker.yaml", out).code == 0
    readme, compose_yaml = (out / "README.md").read_text(), (out / "compose.yaml").read_text()
    assert "test prompt(s)" not in readme and "test prompt(s)" not in compose_yaml
    assert "- `serve`: serve the merged model with vllm (CPU build) on port 8765 (server, profile serve)" in readme
    assert ("The stack only serves: it sends none of the recipe's test prompts (`ftkit up` does); the curl commands "
            "under \"Ask `serve`\" below send them.") in readme
    assert readme.count("/v1/completions") == 2  # the recipe's two prompts, as curl commands
    before = readme[readme.index("## Before the first start"):readme.index("## Run it")]
    for setting in ("`docker.base_image`", "`ca_bundle`", "`docker.wheelhouse`", "`ftkit build --machine PROFILE`",
                    "`ftkit compose RECIPE --machine PROFILE -o DIR`", "the base image is part of each tag"):
        assert setting in before, setting
    # the plan itself is unchanged: `ftkit up` does send them
    plan = run_cli("plan", "recipes/quickstart.yaml", "--machine", "recipes/machines/cpu-docker.yaml", cwd=ROOT)
    assert "then send 2 test prompt(s)" in plan.out


def test_stack_description_leaves_other_steps_as_planned() -> None:
    from ftkit.compose.stack import _stack_description
    from ftkit.plan.spec import StepSpec

    serve = StepSpec(id="s", kind="serve", description="serve x on port 1, then send 2 test prompt(s)", executor="docker",
                     prompts=[{"prompt": "a"}, {"prompt": "b"}])
    assert _stack_description(serve) == "serve x on port 1"
    loads = StepSpec(id="l", kind="load-adapter", description="load a into s, then send 1 test prompt(s)", executor="http",
                     prompts=[{"prompt": "a"}])
    assert _stack_description(loads) == loads.description  # a host step: the README says what to run
    other = StepSpec(id="s", kind="serve", description="serve x, then send 3 test prompt(s)", executor="docker")
    assert _stack_description(other) == other.description  # not the plan's wording: left as it is


# -- images that are not built here -------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("with_machine", [True, False], ids=["machine", "detected"])
def test_missing_images_are_named_with_the_builds_that_make_exactly_them(tmp_path: Path, with_machine: bool) -> None:
    from ftkit.gateways import docker as dk
    from tests.conftest import _docker_reason, run_ftkit

    reason = _docker_reason()
    if reason:
        pytest.skip(reason)
    machine = ["--machine", "recipes/machines/cpu-docker.yaml"] if with_machine else []
    proc = run_ftkit("compose", "recipes/quickstart.yaml", *machine, "-o", str(tmp_path / "s"), cwd=ROOT,
                     env={"FTKIT_LEASE_DIR": "", "FTKIT_SIMULATED_GPUS": ""})
    assert proc.returncode == 0, proc.stderr
    env = stack(tmp_path / "s")[1]
    refs = [env["FTKIT_TRAIN_IMAGE"], env["FTKIT_SERVE_IMAGE"]]
    missing = [r for r in refs if dk.image_attrs(r) is None]
    if not missing:
        pytest.skip("this checkout's images are built here")
    lines = proc.stderr.splitlines()
    head = next(ln for ln in lines if ln.startswith("warning: "))
    assert all(r in head for r in missing) and not any(r in head for r in refs if r not in missing)
    commands = [ln.strip() for ln in lines[lines.index(head) + 1:] if ln.startswith("  ftkit build ")]
    assert len(commands) == len(missing)
    for command, ref in zip(commands, [r for r in refs if r in missing], strict=True):
        assert command.startswith("ftkit build --machine recipes/machines/cpu-docker.yaml" if with_machine
                                  else "ftkit build --image")
        # the command, run as --dry-run, plans exactly the tag the stack names
        dry = run_ftkit(*command.split()[1:], "--dry-run", cwd=ROOT)
        assert dry.returncode == 0, dry.stderr
        assert f"-> {ref}" in dry.stdout


@pytest.mark.docker
def test_an_image_built_from_another_base_is_named_with_the_profile_that_names_it(tmp_path: Path) -> None:
    """`ftkit build --base-image B` without the profile makes a tag no stack made with the
    profile names (the base is part of the tag): compose says that image is here, FROM B,
    and how a stack comes to name it, instead of only repeating the build command."""
    import uuid

    from ftkit.gateways import docker as dk
    from ftkit.images import builder
    from tests.conftest import _docker_reason, run_ftkit

    reason = _docker_reason()
    if reason:
        pytest.skip(reason)
    base = os.environ.get("FTKIT_TEST_BASE_IMAGE", "ftkit-test/bookworm-python:latest")
    planned = builder.plan_build(ROOT, "train", "cpu")  # what cpu-docker.yaml (no base_image) plans
    if dk.image_attrs(planned.tag) is not None:
        pytest.skip("this checkout's train image is built here")
    # the labels `ftkit build --base-image BASE` gives its image, on an image made in a second (no pip)
    labels = builder.plan_build(ROOT, "train", "cpu", base_image=base).labels
    tag = f"ftkit-test/compose-other-base:{uuid.uuid4().hex[:12]}"
    argv = ["docker", "build", "-q", "-t", tag, *(f"--label={k}={v}" for k, v in sorted(labels.items())), "-"]
    made = subprocess.run(argv, input=f"FROM {base}\n", capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    try:
        proc = run_ftkit("compose", "recipes/quickstart.yaml", "--machine", "recipes/machines/cpu-docker.yaml", "-o",
                         str(tmp_path / "s"), cwd=ROOT, env={"FTKIT_LEASE_DIR": "", "FTKIT_SIMULATED_GPUS": ""})
    finally:
        dk.remove_image(tag)
    assert proc.returncode == 0, proc.stderr
    assert (f"note: {tag} here is the same image built FROM {base}; the stack names {planned.tag}, built FROM "
            f"{planned.base_ref} (the base image is part of the tag). To run the one you have, put "
            f"`docker.base_image: {base}` in the machine profile and generate the stack with it (`ftkit compose "
            "RECIPE --machine recipes/machines/cpu-docker.yaml -o DIR`)") in proc.stderr


def test_no_engine_to_ask_is_said(tmp_path: Path) -> None:
    from tests.conftest import run_ftkit

    proc = run_ftkit("compose", "recipes/quickstart.yaml", "--machine", "recipes/machines/cpu-docker.yaml", "-o",
                     str(tmp_path / "s"), cwd=ROOT,
                     env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock", "FTKIT_LEASE_DIR": "", "FTKIT_SIMULATED_GPUS": ""})
    assert proc.returncode == 0, proc.stderr
    assert f"note: no Docker engine reachable at unix://{tmp_path}/no.sock: cannot tell whether the stack's images " \
           "are built here" in proc.stderr
    assert "warning:" not in proc.stderr


def test_node_all_projects_are_valid_compose_project_names() -> None:
    """`--node all -p NAME`: NAME-<node> for each node, as Compose v2 takes a project name
    (lowercase, no dots, 63 characters at most), two nodes never one project."""
    from ftkit.cli.compose_cmds import _node_project
    from ftkit.compose.stack import PROJECT_NAME

    assert _node_project("lab", "node-a") == "lab-node-a"  # a name that fits stays as it was
    long = "p" * 60
    names = [_node_project("lab", "GPU1.lab.example"), _node_project("lab", "gpu1-lab-example"),
             _node_project(long, "node-a"), _node_project(long, "node-b")]
    assert all(PROJECT_NAME.match(n) for n in names), names
    assert len(set(names)) == 4, names
    assert names[0].startswith("lab-gpu1-lab-example-") and names[2].startswith(long[:50])
