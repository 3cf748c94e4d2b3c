"""vLLM sleep mode and runtime LoRA loading, measured on a GPU (NOT RUN in this release:
no GPU was lent to the task that wrote it; see docs/vllm.md for vLLM's own figures).

Needs a CUDA GPU, vLLM (the `serve/vllm` image has it) and a model on local disk. It runs:

1. cold start: `python -m vllm.entrypoints.openai.api_server --model MODEL --enable-sleep-mode` (VLLM_SERVER_DEV_MODE=1) until
   /v1/models answers, then the first and a warm request;
2. sleep level 1: POST /sleep?level=1 - wall time, GPU memory used before/after (NVML),
   what the engine process keeps (CUDA context and the rest), GET /is_sleeping;
3. wake: POST /wake_up - wall time, memory after, first request after waking;
4. restart, for comparison: SIGTERM, wait for exit, start again until ready;
5. with --adapter DIR (a PEFT LoRA of MODEL): a server with VLLM_ALLOW_RUNTIME_LORA_UPDATING
   and --enable-lora; POST /v1/load_lora_adapter - wall time, a request naming the adapter,
   POST /v1/unload_lora_adapter;
6. with --through-lease: the product path - vLLM under `ftkit lease --role serve
   --sleep-url`, then `ftkit lease --role train` on the same GPU: time from the train
   lease starting to its command running (engine put to sleep, GPU handed over), and
   from the train command's exit to the engine answering again (woken up).

    python bench/vllm_sleep.py --model /models/Qwen3-0.6B [--gpu 0] [--adapter DIR]
                               [--through-lease] [--port 8011] [--rounds 3]

Results go to bench/results/vllm_sleep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from _util import save


def http(method: str, url: str, payload: Any = None, timeout: float = 600) -> tuple[int, str]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback)
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def gpu_used_mib(gpu: int) -> dict[str, Any]:
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        return {"used_mib": mem.used // 2**20, "total_mib": mem.total // 2**20,
                "processes": [{"pid": p.pid, "used_mib": (p.usedGpuMemory or 0) // 2**20} for p in procs]}
    finally:
        pynvml.nvmlShutdown()


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 1800) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited with {proc.returncode} before it was ready")
        try:
            if http("GET", f"{base}/v1/models", timeout=5)[0] == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit("vLLM did not become ready")


def complete(base: str, model: str) -> float:
    t0 = time.perf_counter()
    code, body = http("POST", f"{base}/v1/completions",
                      {"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0})
    if code != 200:
        raise SystemExit(f"completion failed: {code} {body[:300]}")
    return time.perf_counter() - t0


def start_vllm(args: argparse.Namespace, extra: list[str], env_extra: dict[str, str],
               log: Path, wrap: list[str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(args.gpu), "VLLM_SERVER_DEV_MODE": "1", **env_extra}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--host", "127.0.0.1", "--port", str(args.port),
            "--served-model-name", "m", "--enable-sleep-mode", *extra]
    with open(log, "ab") as fh:
        return subprocess.Popen([*(wrap or []), *argv], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
    t0 = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def sleep_and_restart(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = f"http://127.0.0.1:{args.port}"
    out: dict[str, Any] = {"rounds": []}
    idle = gpu_used_mib(args.gpu)
    proc = start_vllm(args, [], {}, work / "vllm.log")
    out["cold_start_s"] = round(wait_ready(base, proc), 2)
    out["first_request_s"] = round(complete(base, "m"), 3)
    out["warm_request_s"] = round(complete(base, "m"), 3)
    out["gpu_idle"] = idle
    for _ in range(args.rounds):
        r: dict[str, Any] = {"awake": gpu_used_mib(args.gpu)}
        t0 = time.perf_counter()
        code, body = http("POST", f"{base}/sleep?level=1")
        r["sleep_s"] = round(time.perf_counter() - t0, 3)
        r["sleep_http"] = code
        r["is_sleeping"] = http("GET", f"{base}/is_sleeping")[1]
        time.sleep(1)
        r["asleep"] = gpu_used_mib(args.gpu)
        t0 = time.perf_counter()
        r["wake_http"] = http("POST", f"{base}/wake_up")[0]
        r["wake_s"] = round(time.perf_counter() - t0, 3)
        r["first_request_after_wake_s"] = round(complete(base, "m"), 3)
        r["woken"] = gpu_used_mib(args.gpu)
        r["freed_mib"] = r["awake"]["used_mib"] - r["asleep"]["used_mib"]
        r["kept_mib"] = r["asleep"]["used_mib"] - idle["used_mib"]
        out["rounds"].append(r)
    restarts = []
    for _ in range(args.rounds):
        down = stop(proc)
        proc = start_vllm(args, [], {}, work / "vllm.log")
        up = wait_ready(base, proc)
        first = complete(base, "m")
        restarts.append({"stop_s": round(down, 2), "start_s": round(up, 2), "first_request_s": round(first, 3)})
    stop(proc)
    out["restarts"] = restarts
    out["summary"] = {
        "sleep_s": med([r["sleep_s"] for r in out["rounds"]]),
        "wake_s": med([r["wake_s"] for r in out["rounds"]]),
        "freed_mib": med([r["freed_mib"] for r in out["rounds"]]),
        "kept_while_asleep_mib": med([r["kept_mib"] for r in out["rounds"]]),
        "restart_s": med([x["stop_s"] + x["start_s"] for x in restarts]),
    }
    return out


def runtime_lora(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = f"http://127.0.0.1:{args.port}"
    proc = start_vllm(args, ["--enable-lora", "--max-lora-rank", str(args.max_lora_rank)],
                      {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, work / "vllm-lora.log")
    try:
        wait_ready(base, proc)
        t0 = time.perf_counter()
        code, body = http("POST", f"{base}/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": args.adapter})
        load_s = time.perf_counter() - t0
        first = complete(base, "fresh") if code == 200 else None
        again = http("POST", f"{base}/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": args.adapter})
        unload = http("POST", f"{base}/v1/unload_lora_adapter", {"lora_name": "fresh"})
        return {"load_http": code, "load_body": body[:300], "load_s": round(load_s, 3),
                "first_request_with_adapter_s": round(first, 3) if first else None,
                "load_same_name_again": {"http": again[0], "body": again[1][:300]},
                "unload_http": unload[0]}
    finally:
        stop(proc)


def through_lease(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = f"http://127.0.0.1:{args.port}"
    lease_dir = work / "lease"
    env = {**os.environ, "FTKIT_LEASE_DIR": str(lease_dir)}
    wrap = [sys.executable, "-m", "ftkit", "lease", "--gpus", str(args.gpu), "--role", "serve",
            "--service", "vllm", "--sleep-url", base, "--"]
    os.environ["FTKIT_LEASE_DIR"] = str(lease_dir)
    proc = start_vllm(args, [], {}, work / "vllm-lease.log", wrap=wrap)
    rounds = []
    try:
        wait_ready(base, proc)
        complete(base, "m")
        for _ in range(args.rounds):
            stamp = work / "train-started"
            stamp.unlink(missing_ok=True)
            t0 = time.time()
            train = subprocess.run(
                [sys.executable, "-m", "ftkit", "lease", "--gpus", str(args.gpu), "--service", "train", "--",
                 sys.executable, "-c", f"import time; open({str(stamp)!r}, 'w').write(repr(time.time()))"],
                env=env, capture_output=True, text=True, timeout=900)
            t_end = time.time()
            if train.returncode != 0:
                raise SystemExit(f"train lease failed: {train.stderr[-2000:]}")
            handed = float(stamp.read_text()) - t0
            while True:  # serving again
                try:
                    if http("GET", f"{base}/is_sleeping", timeout=5)[1].find("false") >= 0:
                        complete(base, "m")
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            rounds.append({"train_lease_start_to_command_s": round(handed, 2),
                           "train_exit_to_serving_again_s": round(time.time() - t_end, 2)})
    finally:
        stop(proc)
    return {"rounds": rounds,
            "note": "includes Python start-up of the train lease and vLLM's /sleep and /wake_up"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a model directory on local disk")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapter", help="a PEFT LoRA adapter of --model, for the runtime-loading part")
    ap.add_argument("--max-lora-rank", type=int, default=64)
    ap.add_argument("--through-lease", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftkit-vllm-sleep-"))
    results: dict[str, Any] = {"model": args.model, "gpu": args.gpu, "work": str(work)}
    try:
        results["vllm_version"] = subprocess.run(["vllm", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        raise SystemExit("vllm is not installed here (run this inside the serve/vllm image)") from None
    results["sleep"] = sleep_and_restart(args, work)
    print(json.dumps(results["sleep"]["summary"], indent=2), flush=True)
    if args.adapter:
        results["runtime_lora"] = runtime_lora(args, work)
        print(json.dumps(results["runtime_lora"], indent=2), flush=True)
    if args.through_lease:
        results["through_lease"] = through_lease(args, work)
        print(json.dumps(results["through_lease"], indent=2), flush=True)
    print(f"saved to {save('vllm_sleep', results)}")


if __name__ == "__main__":
    main()
