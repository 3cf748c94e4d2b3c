"""vLLM's CPU build (the serve/vllm-cpu image) measured here, on the CPU, in one run:

1. cold start: a container running the plan's vLLM command on a tiny model until
   /v1/models answers (and the first completion), `--rounds` times;
2. a new adapter live: with the server up (runtime LoRA loading on), a LoRA adapter is
   written, then loaded with POST /v1/load_lora_adapter; the time from the adapter's last
   byte written to the first completion naming it. Beside it, the same adapter made live the
   other way: a restart with --lora-modules, from the stop to the first completion;
3. the hand-over through the lease: vLLM under `ftkit lease --role serve` on a simulated
   GPU (the lease directory shared with the host); `ftkit lease --role train` on the host
   waits for that GPU: time from the train lease starting to its command running (vLLM
   stopped with grace, every process gone), and from its exit to vLLM answering again;
4. ftkit's own path, in whole `ftkit up` runs: recipes/quickstart-live.yaml in the images
   (docker executor), and its train step alone on the local executor. From the journal and
   the files' times: the adapter's last file written -> its completion marker -> the
   load-adapter step starting -> the first answer naming it (`live_after_written_s`), and
   beside it when the train step ended (its process exited, its container was removed):
   what the load waited for before it went as soon as the adapter was complete.

    python bench/vllm_cpu.py [--image ftkit/serve:vllm-cpu-...] [--rounds 3] [--parts cold,lora,handover,ftkit]
                             [--machine DOCKER_PROFILE]

The image defaults to this checkout's tag (build it first: `ftkit build --image serve
--variant vllm-cpu ...`); part 4 runs the images a docker machine profile plans (--machine;
default: one building FROM --base-image, missing images built). Needs the train extra here
(torch, transformers, peft: it makes the tiny model and the adapters, and runs the local
train step). Results go to bench/results/vllm_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VLLM = ["python", "-m", "vllm.entrypoints.openai.api_server"]
TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "vocab_size": 400,
        "max_position_embeddings": 256, "initializer_range": 0.1, "seed": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
            return 200 <= r.status < 300
    except Exception:  # noqa: BLE001 - not up
        return False


def post(url: str, body: dict[str, Any], timeout: float = 120) -> str:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
        return r.read().decode()


def wait_models(port: int, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if get(f"http://127.0.0.1:{port}/v1/models"):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise SystemExit(f"vLLM did not answer on {port} within {timeout} s")


def complete(port: int, model: str) -> str:
    out = json.loads(post(f"http://127.0.0.1:{port}/v1/completions",
                          {"model": model, "prompt": "kiwi mango lemon", "max_tokens": 2, "temperature": 0}))
    return str(out["choices"][0]["text"])


def make_model(work: Path) -> Path:
    from ftkit.engines.tiny import generate

    data = work / "data.jsonl"
    data.write_text((Path(__file__).resolve().parents[1] / "recipes/data/quickstart-train.jsonl").read_text())
    fields = {k: k for k in ("instruction", "input", "output", "messages", "role", "content", "text")}
    generate(TINY, {"path": str(data), "format": "alpaca", "fields": fields, "template": "alpaca",
                    "system_prompt": None, "eval": None}, work / "model")
    return work / "model"


def write_adapter(base: Path, out: Path, seed: int) -> float:
    """A random rank-16 LoRA of the base; returns when its last byte was written."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    os.system(f"chmod -R a+rX {out}")  # noqa: S605 - the container user reads it
    return max(p.stat().st_mtime for p in out.iterdir())


def docker_run(image: str, name: str, port: int, work: Path, args: list[str], env: dict[str, str],
               wrap: list[str] | None = None, mounts: list[str] | None = None) -> None:
    cmd = ["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--shm-size", "1g",
           "-u", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp", "-v", f"{work}:/w:ro"]
    for k, v in env.items():
        cmd += ["-e", f"{k}={v}"]
    for m in mounts or []:
        cmd += ["-v", m]
    cmd += [image, *(wrap or []), *VLLM, "--model", "/w/model", "--host", "0.0.0.0", "--port", "8000",
            "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", *args]
    subprocess.run(cmd, check=True, capture_output=True)


def stop(name: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True, check=False)
    return time.monotonic() - t0


ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def cold_starts(image: str, work: Path, rounds: int) -> dict[str, Any]:
    ready, first = [], []
    for n in range(rounds):
        port, name = free_port(), f"ftkit-bench-vllm-{n}"
        t0 = time.monotonic()
        docker_run(image, name, port, work, [], ENV)
        try:
            ready.append(wait_models(port))
            complete(port, "tiny")
            first.append(time.monotonic() - t0)
        finally:
            stop(name)
    return {"ready_s": ready, "first_answer_s": first, "median_ready_s": statistics.median(ready),
            "median_first_answer_s": statistics.median(first)}


def adapter_live(image: str, work: Path, rounds: int) -> dict[str, Any]:
    runtime, restart = [], []
    port, name = free_port(), "ftkit-bench-vllm-lora"
    docker_run(image, name, port, work, ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"],
               {**ENV, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        wait_models(port)
        for n in range(rounds):
            written = write_adapter(work / "model", work / f"adapter-{n}", seed=n)
            post(f"http://127.0.0.1:{port}/v1/load_lora_adapter",
                 {"lora_name": f"v{n}", "lora_path": f"/w/adapter-{n}", "load_inplace": True})
            complete(port, f"v{n}")
            runtime.append(time.time() - written)
    finally:
        stopped = stop(name)  # the restart path pays this too: the old server must go first
    for n in range(rounds):
        port, rname = free_port(), f"ftkit-bench-vllm-restart-{n}"
        t0 = time.monotonic()
        docker_run(image, rname, port, work, ["--enable-lora", "--max-lora-rank", "16",
                                              "--lora-modules", f"v{n}=/w/adapter-{n}"], ENV)
        try:
            wait_models(port)
            complete(port, f"v{n}")
            restart.append(stopped + time.monotonic() - t0)
        finally:
            stop(rname)
    return {"runtime_load_written_to_answer_s": runtime, "restart_to_answer_s": restart, "stop_s": stopped,
            "median_runtime_s": statistics.median(runtime), "median_restart_s": statistics.median(restart)}


def handover(image: str, work: Path, rounds: int) -> dict[str, Any]:
    lease = Path(tempfile.mkdtemp(prefix="ftkit-bench-lease-"))
    os.chmod(lease, 0o1777)
    port, name = free_port(), "ftkit-bench-vllm-lease"
    sim = {"FTKIT_SIMULATED_GPUS": "RTX 4090", "FTKIT_LEASE_DIR": "/lease", **ENV}
    docker_run(image, name, port, work, [], sim, mounts=[f"{lease}:/lease"],
               wrap=["ftkit", "lease", "--gpus", "0", "--role", "serve", "--service", "bench", "--grace", "30", "--"])
    take, back = [], []
    try:
        wait_models(port)
        for _ in range(rounds):
            t0 = time.monotonic()
            stamp = work / "acquired"
            subprocess.run([sys.executable, "-m", "ftkit", "lease", "--gpus", "0", "--role", "train", "--",
                            sys.executable, "-c", f"import time; open({str(stamp)!r}, 'w').write(repr(time.monotonic()))"],
                           env={**os.environ, "FTKIT_SIMULATED_GPUS": "RTX 4090", "FTKIT_LEASE_DIR": str(lease)},
                           check=True, capture_output=True, timeout=300)
            released = time.monotonic()
            take.append(float(stamp.read_text()) - t0)
            wait_models(port)
            complete(port, "tiny")
            back.append(time.monotonic() - released)
    finally:
        stop(name)
    return {"train_waits_until_gpu_s": take, "vllm_back_after_training_s": back,
            "median_take_s": statistics.median(take), "median_back_s": statistics.median(back)}


ROOT = HERE.parent


def _seconds(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _up(recipe: Path, machine: Path, runs: Path, env: dict[str, str] | None = None) -> Path:
    proc = subprocess.run([sys.executable, "-m", "ftkit", "up", str(recipe), "--machine", str(machine), "--runs-dir",
                           str(runs), "--quiet", "--json"], env={**os.environ, "FTKIT_SIMULATED_GPUS": "", **(env or {})},
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ftkit up {recipe.name} failed:\n{proc.stderr[-3000:]}")
    return Path(json.loads(proc.stdout)["run_dir"])


def _path_times(run: Path, train: str = "train", load: str | None = "go-live") -> dict[str, Any]:
    """Where the time between the adapter written and it answering went, from one run."""
    from ftkit.plan.jobs import complete_marker

    st = json.loads((run / "state.json").read_text())
    adapter = run / "steps" / train / "adapter"
    written = max(p.stat().st_mtime for p in adapter.iterdir() if p.is_file())
    marker = Path(complete_marker(str(adapter))).stat().st_mtime
    out: dict[str, Any] = {"marker_after_written_s": round(marker - written, 3),
                           "train_step_ended_after_written_s": round(_seconds(st["steps"][train]["finished"]) - written, 3)}
    if load is not None:
        entry = st["steps"][load]
        out.update(live_after_written_s=entry["live_after_written_s"], load_s=entry["load_s"],
                   load_started_after_marker_s=round(_seconds(entry["started"]) - marker, 3),
                   loaded_during_train_step=entry.get("during_step") == train)
    return out


def ftkit_path(work: Path, machine: Path | None, base_image: str) -> dict[str, Any]:
    """Part 4: the adapter written -> answering through `ftkit up`, docker and local executors."""
    for name in ("quickstart-train.jsonl", "quickstart-eval.jsonl"):
        (work / "data").mkdir(exist_ok=True)
        shutil.copy(ROOT / "recipes" / "data" / name, work / "data" / name)
    text = (ROOT / "recipes" / "quickstart-live.yaml").read_text()
    live = work / "quickstart-live.yaml"
    live.write_text(text.replace("port: 8766", f"port: {free_port()}"))
    if machine is None:
        machine = work / "docker-machine.yaml"
        machine.write_text(f"ftkit: 1\nkind: machine\nname: bench-docker\nexecutor: docker\n"
                           f"docker: {{base_image: {base_image}}}\n")
    docker = _path_times(_up(live, machine, work / "runs"))
    # the train step alone on the local executor (its wind-down: no container; fewer steps, same ending)
    head, steps = text.split("steps:\n", 1)
    train = steps[steps.index("  - type: train"):steps.index("  - type: load-adapter")]
    alone = work / "train-alone.yaml"
    alone.write_text(head.replace("name: quickstart-live", "name: train-alone") + "steps:\n"
                     + train.replace("max_steps: 200", "max_steps: 20"))
    local_machine = work / "local-machine.yaml"
    local_machine.write_text("ftkit: 1\nkind: machine\nname: bench-local\nexecutor: local\n")
    local = _path_times(_up(alone, local_machine, work / "runs"), load=None)
    return {"docker": docker, "local": local}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image")
    ap.add_argument("--base-image", default="ftkit-test/bookworm-python:latest")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="cold,lora,handover,ftkit", help="which parts to run (comma-separated)")
    ap.add_argument("--machine", type=Path, help="a docker machine profile for part 4 (ftkit up)")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    image = a.image
    if image is None:
        from ftkit.images import builder, project

        image = builder.plan_build(project.find_root(), "serve", "vllm-cpu", base_image=a.base_image).tag
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-vllm-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        make_model(work)
        os.system(f"chmod -R a+rX {work}")  # noqa: S605
        out: dict[str, Any] = {"image": image, "rounds": a.rounds,
                               "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if "cold" in parts:
            out["cold_start"] = cold_starts(image, work, a.rounds)
        if "lora" in parts:
            out["adapter_live"] = adapter_live(image, work, a.rounds)
        if "handover" in parts:
            out["handover"] = handover(image, work, a.rounds)
        if "ftkit" in parts:
            out["ftkit_path"] = ftkit_path(work, a.machine.resolve() if a.machine else None, a.base_image)
    dest = HERE / "results" / "vllm_cpu.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
