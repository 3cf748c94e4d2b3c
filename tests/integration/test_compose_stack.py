"""Generated stacks run by docker-compose itself, on a real Docker engine.

1. The CPU quickstart's stack: `--profile train up` runs tiny-model -> train -> merge ->
   eval and nothing else; `--profile serve up -d` starts only the server - vLLM's CPU
   build - which answers the recipe's test prompts.
2. The GPU lease across containers: a stack planned for a simulated two-GPU machine
   (train on GPUs 0,1; the server on GPU 1, under the lease as a preemptible holder),
   through an override file that keeps the generated lease wrapper. Rounds with random
   start orders, `docker-compose kill`, `docker-compose restart`, SIGKILL of either
   container and a crash of the server's init process: never two engines on one GPU, and
   the server is back after every training run. Once with both engines stand-ins (12
   quick rounds, every disruption at least once; tests/e2e/test_lease_stress.py runs 200
   rounds of processes), once with the real vLLM serving (20 rounds, a cold start each;
   training a stand-in that checks no process of the engine is alive while it holds the GPU).

Every container, network and volume is removed at the end (unique project names).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import RECIPES, require_tool, run_ftkit
from tests.e2e_inputs import free_port, quickstart_data, tiny
from tests.integration.conftest import machine_profile

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HERE = Path(__file__).parent
ROUNDS = int(os.environ.get("FTKIT_LEASE_ROUNDS", "12"))  # stand-in engines: about 2 s a round
VLLM_ROUNDS = int(os.environ.get("FTKIT_VLLM_LEASE_ROUNDS", "20"))  # the real vLLM: a cold start every round


def read_env(path: Path) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))


def set_env(path: Path, **values: str) -> None:
    lines = []
    for ln in path.read_text().splitlines():
        key = ln.split("=", 1)[0]
        lines.append(f"{key}={values[key]}" if not ln.startswith("#") and key in values else ln)
    path.write_text("\n".join(lines) + "\n")


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback test server
            return r.status, r.read()
    except Exception:  # noqa: BLE001 - not up (yet)
        return 0, b""


def use_images(stack: Path, images) -> int:  # type: ignore[no-untyped-def]
    """Check the stack plans the fixture's images (or point .env at given ones); a free port."""
    env = read_env(stack / ".env")
    if images.exact:
        assert (env["FTKIT_TRAIN_IMAGE"], env["FTKIT_SERVE_IMAGE"]) == (images.train, images.serve), \
            "the test profile's docker settings plan other tags than the fixture built"
    else:
        set_env(stack / ".env", FTKIT_TRAIN_IMAGE=images.train, FTKIT_SERVE_IMAGE=images.serve)
    return free_port()


class Project:
    """docker-compose on one stack under a unique project name; the SDK for quick looks."""

    def __init__(self, stack: Path, files: list[str], log: Path) -> None:
        from ftkit.gateways import docker as dk

        exe = require_tool("docker-compose")  # a failure under FTKIT_REQUIRE_DOCKER=1 (CI)
        self.exe, self.stack, self.files, self.log = exe, stack, files, log
        self.name = f"ftkit-test-{uuid.uuid4().hex[:10]}"
        self.client = dk.client()

    def dc(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [self.exe, "-p", self.name]
        for f in self.files:
            argv += ["-f", f]
        argv += list(args) if "--profile" in args else ["--profile", "train", "--profile", "serve", *args]
        proc = subprocess.run(argv, cwd=self.stack, capture_output=True, text=True, timeout=timeout, check=False)
        with self.log.open("a") as fh:
            fh.write(f"$ {' '.join(argv[3:])}  -> {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
        if check:
            assert proc.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def containers(self, service: str | None = None) -> list:  # type: ignore[type-arg]
        labels = [f"com.docker.compose.project={self.name}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.client.containers.list(all=True, filters={"label": labels})

    def container(self, service: str):  # type: ignore[no-untyped-def]
        found = self.containers(service)
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return found[0]

    def state(self, service: str) -> dict:  # type: ignore[type-arg]
        c = self.container(service)
        c.reload()
        return dict(c.attrs["State"])

    def cleanup(self) -> None:
        try:
            self.dc("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)
        finally:
            for c in self.containers():  # whatever down left behind
                try:
                    c.remove(force=True)
                except Exception:  # noqa: BLE001
                    pass


# -- 1. the CPU quickstart's stack -----------------------------------------------------------------


@pytest.mark.timeout(2400)  # the first user of `cpu_images` may build both images (minutes on two cores)
def test_quickstart_stack_train_then_serve(cpu_images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    machine = machine_profile(tmp_path / "machine.yaml", "test-cpu-docker")
    stack = tmp_path / "stack"
    proc = run_ftkit("compose", str(RECIPES / "quickstart.yaml"), "--machine", str(machine), "-o", str(stack),
                     env={"FTKIT_SIMULATED_GPUS": "", "FTKIT_LEASE_DIR": ""})
    assert proc.returncode == 0, proc.stderr
    port = use_images(stack, cpu_images)
    import yaml

    command = yaml.safe_load((stack / "compose.yaml").read_text())["services"]["serve"]["command"]
    assert "vllm.entrypoints.openai.api_server" in command  # the real vLLM serves the stack
    set_env(stack / ".env", FTKIT_SERVE_PORT=str(port))  # moving the stack: .env alone
    project = Project(stack, ["compose.yaml"], tmp_path / "docker-compose.log")
    try:
        proc = project.dc("--profile", "train", "up", "--no-color", timeout=1500, check=False)
        assert proc.returncode == 0, (tmp_path / "docker-compose.log").read_text()[-6000:]
        one_shot = ["tiny-model", "train", "merge", "eval"]
        for name in one_shot:
            st = project.state(name)
            assert st["Status"] == "exited" and st["ExitCode"] == 0, (name, st)
        assert project.containers("serve") == []  # the train profile starts no server
        summary = json.loads((stack / "run" / "steps" / "eval" / "summary.json").read_text())
        assert summary["passed"] is True and summary["models"]["merged"]["accuracy"] > \
            summary["models"]["base"]["accuracy"], summary
        started = {n: project.state(n)["StartedAt"] for n in one_shot}
        # the containers journaled the run: `ftkit status` and `ftkit report` read it as an `ftkit up` run
        run = stack / "run"
        status = run_ftkit("status", str(run), "--json")
        assert status.returncode == 0, status.stderr
        journal = json.loads(status.stdout)
        assert journal["status"] == "succeeded" and journal["stale"] is False and journal["driver"] == "compose", journal
        assert [journal["steps"][n]["status"] for n in one_shot] == ["succeeded"] * 4, journal["steps"]
        assert journal["steps"]["serve"]["status"] == "pending" and journal["steps"]["power"]["status"] == "skipped"
        assert all((run / "logs" / f"{n}.log").stat().st_size > 0 for n in one_shot)
        shown = run_ftkit("status", str(stack))  # the stack directory names its run too
        assert shown.returncode == 0 and "succeeded" in shown.stdout and "STALE" not in shown.stdout, shown
        report = run_ftkit("report", str(run))
        assert report.returncode == 0, report.stderr
        md = (run / "report" / "report.md").read_text()
        assert "succeeded" in md and "merged" in md, md[:2000]  # the outcome and the eval's models
        assert any(p.suffix == ".png" for p in (run / "report").iterdir())  # the loss curve from metrics.jsonl

        project.dc("--profile", "serve", "up", "-d")
        assert {n: project.state(n)["StartedAt"] for n in one_shot} == started  # nothing trained again
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        health = ""
        while time.monotonic() < deadline:
            health = (project.state("serve").get("Health") or {}).get("Status", "")
            if health == "healthy" and get(f"{base}/health")[0] == 200:
                break
            assert project.state("serve")["Status"] == "running", project.dc("logs", "serve", check=False).stdout
            time.sleep(2)
        assert health == "healthy", project.dc("logs", "serve", check=False).stdout[-4000:]

        from ftkit.gateways.serving import run_prompts
        from ftkit.prepare import prepare

        plan = prepare(str(RECIPES / "quickstart.yaml"), str(machine), run_dir=str(stack / "run"), executor="docker").plan
        step = plan.step("serve")
        assert step.ready is not None
        results = run_prompts(f"{base}/v1", step.ready.served_name, step.prompts)
        answers = [r["answer"].strip() for r in results]
        assert answers == ["fruit", "instrument"], results
        assert all(r["passed"] for r in results)
        journal = json.loads(run_ftkit("status", str(run), "--json").stdout)
        assert journal["steps"]["serve"]["status"] == "running" and journal["status"] == "succeeded", journal
        assert journal["left_running"] and journal["left_running"][0].startswith("serve (compose service serve")
        project.dc("--profile", "serve", "stop", "-t", "60", "serve")  # SIGTERM: the journal records the stop
        journal = json.loads(run_ftkit("status", str(run), "--json").stdout)
        assert journal["steps"]["serve"]["status"] == "succeeded", journal["steps"]["serve"]
        assert journal["steps"]["serve"]["message"] == "stopped (SIGTERM)" and journal["left_running"] == []
    finally:
        project.cleanup()
    assert project.containers() == []


# -- 2. the lease across containers ------------------------------------------------------------------


SIM_RECIPE = f"""\
ftkit: 1
name: lease-sim
model: {{tiny: {tiny(64)}, dtype: fp32}}
dataset: {{path: data/train.jsonl, format: alpaca, template: alpaca}}
steps:
  - {{type: train, method: lora, gpus: [0, 1], distribution: ddp, max_steps: 1}}
  - {{type: merge}}
  - {{type: serve, engine: vllm, model: base, gpus: [1], port: 8765, keep_running: true, ready_timeout_s: 300}}
"""


def _override(stack: Path, probe: Path, *, real_serve: bool, token: str) -> Path:
    """Keep each generated command up to its `--` (the lease wrapper); run a stand-in after it.
    `real_serve`: the server is the generated vLLM command itself, started through the
    witness (which takes the per-GPU witness locks and execs vLLM, so vLLM holds them), and
    the training stand-in sees the host's processes (`pid: host`) to find any process of the
    engine - its API server, engine core or worker - still alive while it holds the GPU."""
    import yaml

    data = yaml.safe_load((stack / "compose.yaml").read_text())
    out: dict = {"services": {}}  # type: ignore[type-arg]
    for name, args in (("train", ["train", "0,1"]), ("serve", ["serve", "1", "8765"])):
        prefix = data["services"][name]["command"]  # ftkit.run.incontainer --journal NAME -- (kept: it journals)
        prefix, command = prefix[:prefix.index("--") + 1], prefix[prefix.index("--") + 1:]
        cut = command.index("--") + 1
        wrapper = prefix + command[:cut]
        assert command[:2] == ["ftkit", "lease"], command
        svc: dict = {"volumes": [f"{probe}:/probe"]}  # type: ignore[type-arg]
        if name == "serve" and real_serve:
            engine = command[cut:]
            assert engine[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], engine
            svc["command"] = [*wrapper, "python", "/probe/standin_engine.py", "witness", "1", "--", *engine]
            svc["environment"] = {"STANDIN_ENGINE_TOKEN": token}
        else:
            svc["command"] = [*wrapper, "python", "/probe/standin_engine.py", *args]
        if name == "train":  # where the journal looks for the adapter (a step without it exits 1)
            plan = json.loads((stack / "run" / "plan.json").read_text())
            rel = next(s["outputs"]["adapter"] for s in plan["steps"] if s["id"] == "train")
            svc["environment"] = {"STANDIN_ADAPTER": f"/ftkit/run/{rel}"}
        if name == "train" and real_serve:
            svc["pid"] = "host"
            svc["environment"]["STANDIN_SCAN"] = token
        out["services"][name] = svc
    path = stack / "compose.test-override.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


def _events(probe: Path) -> list[dict]:  # type: ignore[type-arg]
    path = probe / "out" / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _sim_stack(cpu_images, tmp_path: Path, *, real_serve: bool) -> tuple[Project, Path, int, str]:  # type: ignore[no-untyped-def]
    """The stack of SIM_RECIPE for a simulated two-GPU machine (the server under the lease on
    GPU 1, training on 0,1), its engines replaced by stand-ins through an override file."""
    quickstart_data(tmp_path / "recipe" / "data" / "train.jsonl")
    recipe = tmp_path / "recipe" / "lease-sim.yaml"
    recipe.write_text(SIM_RECIPE)
    lease_dir = tmp_path / "lease"
    lease_dir.mkdir(mode=0o1777)
    machine = machine_profile(tmp_path / "machine.yaml", "sim-two-gpus", extra=(
        "gpus:\n  - {index: 0, model: RTX 4090, vram_gib: 24}\n  - {index: 1, model: RTX 4090, vram_gib: 24}\n"
        "serving: {service: serve, manager: compose, gpus: [1]}\n"))
    stack = tmp_path / "stack"
    proc = run_ftkit("compose", str(recipe), "--machine", str(machine), "-o", str(stack),
                     env={"FTKIT_SIMULATED_GPUS": "RTX 4090,RTX 4090", "FTKIT_LEASE_DIR": str(lease_dir)})
    assert proc.returncode == 0, proc.stderr
    text = (stack / "compose.yaml").read_text()
    assert "# SIMULATED GPUs" in text and "deploy:" not in text
    env = read_env(stack / ".env")
    assert env["FTKIT_LEASE_DIR"] == str(lease_dir)
    port = use_images(stack, cpu_images)
    set_env(stack / ".env", FTKIT_SERVE_PORT=str(port))
    probe = tmp_path / "probe"
    (probe / "out").mkdir(parents=True)
    os.chmod(probe / "out", 0o777)
    shutil.copy(HERE / "standin_engine.py", probe / "standin_engine.py")
    token = uuid.uuid4().hex
    override = _override(stack, probe, real_serve=real_serve, token=token)
    project = Project(stack, ["compose.yaml", override.name], tmp_path / "docker-compose.log")
    return project, probe, port, token


def engine_processes(token: str) -> list[int]:
    """Host pids of the processes the witness marked (the real engine and its children)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"FTKIT_PROBE={token}".encode() in fh.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _lease_rounds(project: Project, probe: Path, port: int, rounds: int, *, serve_back_s: float,
                  check_answers: bool = False, stop_first: float = 0.4, token: str | None = None) -> str:
    """Random start orders, `docker-compose kill`, `restart`, SIGKILL of either container and a
    crash of the server's init process, `rounds` times: never two engines on one GPU, and the
    server is back after every training run. Returns a summary line."""
    seed = int(os.environ.get("FTKIT_LEASE_SEED", "0")) or random.randrange(1, 1 << 30)
    rng = random.Random(seed)
    health = f"http://127.0.0.1:{port}/health"
    history: list[str] = []
    t_start = time.monotonic()
    answered = 0

    def fail(msg: str) -> None:
        tail = "\n".join(history[-12:])
        events = "\n".join(json.dumps(e) for e in _events(probe)[-20:])
        logs = project.dc("logs", "--no-color", "--tail", "40", "serve", "train", check=False).stdout
        pytest.fail(f"{msg} (FTKIT_LEASE_SEED={seed} repeats the rounds)\n--- rounds ---\n{tail}\n--- events ---\n{events}\n--- logs ---\n{logs[-5000:]}")

    def serving_back(timeout: float = serve_back_s) -> None:
        """/health answers (called once the training container has exited); with the real
        engine, a completion too."""
        nonlocal answered
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = get(health)
            if code == 200:
                history.append(f"  served ({body[:60]!r})")
                if check_answers:
                    from ftkit.gateways.serving import model_ids, run_prompts

                    models = model_ids(f"http://127.0.0.1:{port}/v1/models")
                    res = run_prompts(f"http://127.0.0.1:{port}/v1", models[0] if models else "?",
                                      [{"prompt": "kiwi mango", "max_tokens": 2}])
                    if not res[0]["passed"]:
                        fail(f"the server is back but does not answer: {res[0]['error']}")
                    answered += 1
                return
            st = project.state("serve")
            if st["Status"] == "exited" and not st.get("Restarting"):
                fail(f"the server container exited ({st['ExitCode']}) and was not restarted")
            time.sleep(0.2)
        fail(f"serving did not come back within {timeout:g} s after the training run")

    def wait_exited(service: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = project.state(service)
            if st["Status"] in ("exited", "dead", "created"):
                return st
            time.sleep(0.1)
        fail(f"{service} still runs after {timeout:g} s")
        return {}

    project.dc("up", "--no-start", "--no-deps", "train", "serve")
    train, serve = project.container("train"), project.container("serve")
    serve.start()
    serving_back(timeout=max(serve_back_s, 120))
    if token:  # the check the trainer makes can see the engine: the API server and its engine core
        # (vLLM's CPU worker may run inside the engine core, so two processes are the floor, not three)
        seen = engine_processes(token)
        assert len(seen) >= 2, f"only {seen} of the serving engine's processes are visible"
    actions = ["none", "none", "compose-kill-serve", "compose-kill-train", "compose-restart-serve",
               "compose-restart-train", "sigkill-serve", "sigkill-train", "crash-serve"]
    plan = actions + [rng.choice(actions) for _ in range(max(rounds - len(actions), 0))]
    rng.shuffle(plan)  # every disruption at least once, the rest at random
    round_s: list[float] = []
    for n, action in enumerate(plan[:rounds]):
        t_round = time.monotonic()
        serve.reload()
        if rng.random() < stop_first and serve.status == "running":
            serve.stop(timeout=10)  # the next start order starts from a stopped server
        order = rng.choice(["serve-first", "train-first", "together"])
        gap = rng.uniform(0, 0.8)
        history.append(f"round {n}: {order}, gap {gap:.2f} s, {action}")
        t0 = time.time()
        serve.reload()
        start_serve = serve.status != "running"
        if order == "together" and start_serve:
            th = threading.Thread(target=serve.start)
            th.start()
            train.start()
            th.join()
        else:
            first, second = (serve, train) if order == "serve-first" else (train, serve)
            if first is train or start_serve:
                first.start()
            time.sleep(gap)
            if second is train or start_serve:
                second.start()
        time.sleep(rng.uniform(0.1, 1.5))
        if action == "compose-kill-serve":
            project.dc("kill", "serve")
        elif action == "compose-kill-train":
            project.dc("kill", "train")
        elif action == "compose-restart-serve":
            project.dc("restart", "-t", "10", "serve")
        elif action == "compose-restart-train":
            project.dc("restart", "-t", "10", "train")
        elif action == "sigkill-serve":
            subprocess.run(["docker", "kill", "-s", "KILL", serve.id], capture_output=True, check=False)
        elif action == "sigkill-train":
            subprocess.run(["docker", "kill", "-s", "KILL", train.id], capture_output=True, check=False)
        elif action == "crash-serve":
            serve.reload()
            pid = serve.attrs["State"]["Pid"]
            if pid:
                os.kill(pid, signal.SIGKILL)  # not `docker kill`: the restart policy brings it back
        st = wait_exited("train", timeout=max(60, serve_back_s))
        entered = [e for e in _events(probe) if e["role"] == "train" and e["event"] == "enter" and e["t"] >= t0]
        if action == "none" and (st["ExitCode"] != 0 or not entered):
            fail(f"round {n}: an undisturbed training run did not run (exit {st['ExitCode']})")
        serve.reload()
        if serve.status != "running" and action in ("compose-kill-serve", "sigkill-serve"):
            serve.start()  # killed by hand: Docker leaves it down, as it should; bring it back
        t_trained = time.monotonic()
        serving_back()
        round_s.append(time.monotonic() - t_round)
        history.append(f"  round {n}: {round_s[-1]:.1f} s, the server back {time.monotonic() - t_trained:.1f} s "
                       "after training ended")
        overlaps = [e for e in _events(probe) if e["event"] == "OVERLAP"]
        if overlaps:
            fail(f"round {n}: two engines held a GPU at once: {overlaps}")
    events = _events(probe)
    train_runs = sum(1 for e in events if e["role"] == "train" and e["event"] == "enter")
    serve_runs = sum(1 for e in events if e["role"] in ("serve", "witness") and e["event"] == "enter")
    assert train_runs >= rounds // 2 and serve_runs >= rounds, (train_runs, serve_runs)
    # engines that left on their own never overlapped on a GPU either (killed ones: the witness)
    spans: dict[str, list[tuple[float, float, str]]] = {}
    open_: dict[tuple[str, int], dict] = {}  # type: ignore[type-arg]
    for e in sorted(events, key=lambda e: e["t"]):
        key = (e["host"], e["pid"])
        if e["event"] == "enter":
            open_[key] = e
        elif e["event"] == "leave" and key in open_:
            start = open_.pop(key)
            for g in e["gpus"]:
                spans.setdefault(g, []).append((start["t"], e["t"], e["role"]))
    for g, s in spans.items():
        s.sort()
        for a, b in zip(s, s[1:], strict=False):
            assert a[1] <= b[0], f"GPU {g}: {a} overlaps {b}"
    counts = {a: plan[:rounds].count(a) for a in actions}
    return (f"seed {seed}: {rounds} rounds ({counts}), {train_runs} training runs, {serve_runs} server starts"
            + (f", {answered} completions after a hand-over" if check_answers else "")
            + f", {time.monotonic() - t_start:.0f} s (a round {sum(round_s) / max(len(round_s), 1):.1f} s on average, "
            f"{max(round_s, default=0):.1f} s at most)")


@pytest.mark.timeout(2400)
def test_lease_keeps_gpus_exclusive_across_containers(cpu_images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Both engines stand-ins: many quick rounds of every disruption."""
    project, probe, port, _ = _sim_stack(cpu_images, tmp_path, real_serve=False)
    try:
        print(_lease_rounds(project, probe, port, ROUNDS, serve_back_s=45))
    finally:
        project.cleanup()
    assert project.containers() == []


@pytest.mark.timeout(3600)
def test_lease_hands_the_gpu_between_real_vllm_and_training(cpu_images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server is the real engine (vLLM's CPU build on the simulated GPU 1, the stack's own
    command); training is a stand-in that holds the lease. Each round the training container
    waits for GPU 1, the server stops vLLM with grace and lets go only when its whole tree is
    gone - the trainer finds no process of the engine alive (API server, engine core,
    worker) - and afterwards vLLM starts again and answers a completion."""
    project, probe, port, token = _sim_stack(cpu_images, tmp_path, real_serve=True)
    try:
        proc = project.dc("--profile", "train", "up", "--no-color", "tiny-model", timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # fewer rounds that start from a stopped server: each costs a second cold start (~28 s)
        print(_lease_rounds(project, probe, port, VLLM_ROUNDS, serve_back_s=240, check_answers=True, stop_first=0.15,
                            token=token))
        witness = [e for e in _events(probe) if e["role"] == "witness" and e["event"] == "enter"]
        assert len(witness) >= VLLM_ROUNDS  # the engine was started again each round
    finally:
        project.cleanup()
    assert project.containers() == []
