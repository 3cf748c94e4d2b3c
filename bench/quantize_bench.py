"""The quantize step measured here (issue #19), from a finished run of
recipes/quickstart-quantize.yaml (or any run with a merge and a quantize step):

1. size on disk: the merged model's safetensors against the 4-bit directory's;
2. the quantize step: its time and peak RSS (quantize.json, written by the engine), against
   the plan's host-RAM estimate for it;
3. serving: vLLM's CPU build (the serve/vllm-cpu image) on each model in turn, the plan's
   command (`--enforce-eager`, VLLM_CPU_KVCACHE_SPACE=1): cold start to /v1/models, then
   decode throughput: `--requests` completions of `--tokens` tokens (greedy, ignore_eos),
   one at a time and `--concurrency` at once; tokens/s = completion tokens / wall time;
4. the eval delta: the run's eval summary (merged against quantized).

    python bench/quantize_bench.py RUN_DIR [--image ftkit/serve:vllm-cpu-...] [--requests 16] [--tokens 64] [--repeat 3]

The image defaults to the one the run's serve step ran. Results go to bench/results/quantize.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import save  # noqa: E402
from vllm_cpu import free_port, post, wait_models  # noqa: E402

VLLM = ["python", "-m", "vllm.entrypoints.openai.api_server"]
PROMPT = "### Instruction:\nName the category of these words.\n\n### Input:\nkiwi mango lemon\n\n### Response:\n"


def sizes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.suffix == ".safetensors")


def serve(image: str, model: Path, port: int, name: str, dtype: list[str]) -> float:
    cmd = ["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--shm-size", "1g",
           "-u", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp", "-e", "VLLM_CPU_KVCACHE_SPACE=1",
           "-v", f"{model}:/m:ro", image, *VLLM, "--model", "/m", "--host", "0.0.0.0", "--port", "8000",
           "--served-model-name", "m", "--enforce-eager", *dtype]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    wait_models(port, timeout=600)
    return round(time.monotonic() - t0, 2)


def one(port: int, tokens: int) -> int:
    out = json.loads(post(f"http://127.0.0.1:{port}/v1/completions",
                          {"model": "m", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                           "ignore_eos": True}))
    return int(out["usage"]["completion_tokens"])


def throughput(port: int, requests: int, tokens: int, concurrency: int) -> dict[str, Any]:
    one(port, tokens)  # warm-up
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = sum(pool.map(lambda _: one(port, tokens), range(requests)))
    wall = time.monotonic() - t0
    return {"requests": requests, "concurrency": concurrency, "completion_tokens": done, "wall_s": round(wall, 2),
            "tokens_per_s": round(done / wall, 1)}


def measure(image: str, model: Path, label: str, requests: int, tokens: int, dtype: list[str]) -> dict[str, Any]:
    port = free_port()
    name = f"ftkit-bench-quantize-{label}-{os.getpid()}"
    try:
        cold = serve(image, model, port, name, dtype)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout
        kernel = next((ln.split("Using ", 1)[1].split(" for ")[0] for ln in logs.splitlines() if "Using CPUWNA16" in ln
                       or "LinearKernel for" in ln), None)
        return {"cold_start_s": cold, "kernel": kernel,
                "sequential": throughput(port, requests, tokens, 1),
                "concurrent": throughput(port, requests, tokens, 4)}
    finally:
        subprocess.run(["docker", "stop", "-t", "10", name], capture_output=True, check=False)


def serving(image: str, models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Each model served `--repeat` times, alternating (a busy machine slows both alike);
    the median of each figure, and every round. The merged model as the run's serve step
    would run it (vLLM's own dtype choice)."""
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    for _ in range(args.repeat):
        for label, path in models.items():
            rounds[label].append(measure(image, path, label, args.requests, args.tokens, []))
    out: dict[str, Any] = {}
    for label, rs in rounds.items():
        out[label] = {
            "kernel": rs[0]["kernel"],
            "cold_start_s": statistics.median(r["cold_start_s"] for r in rs),
            "tokens_per_s_sequential": statistics.median(r["sequential"]["tokens_per_s"] for r in rs),
            "tokens_per_s_concurrent_4": statistics.median(r["concurrent"]["tokens_per_s"] for r in rs),
            "rounds": rs,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--image")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    run = args.run.resolve()
    plan = json.loads((run / "plan.json").read_text())
    merge = next(s for s in plan["steps"] if s["kind"] == "merge")
    quant = next(s for s in plan["steps"] if s["kind"] == "quantize")
    serve_step = next(s for s in plan["steps"] if s["kind"] == "serve")
    image = args.image or serve_step["image"]
    merged, quantized = run / merge["outputs"]["model"], run / quant["outputs"]["model"]
    os.system(f"chmod -R a+rX {merged} {quantized}")  # noqa: S605 - the container user reads them
    summary = json.loads((run / quant["outputs"]["summary"]).read_text())
    fit = plan.get("fit", {}).get(quant["id"], [{}])[0]
    result: dict[str, Any] = {
        "taken": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "run": run.name, "image": image,
        "size_bytes": {"merged": sizes(merged), "quantized": sizes(quantized)},
        "quantize_step": {k: summary.get(k) for k in ("method", "rows", "seconds", "calibrate_seconds",
                                                      "peak_rss_mib", "input_bytes", "output_bytes")},
        "quantize_estimate_gib": {"total": fit.get("total_gib"), "components": fit.get("components_gib")},
        "serving": serving(image, {"merged": merged, "quantized": quantized}, args),
    }
    ev = next((s for s in plan["steps"] if s["kind"] == "eval"), None)
    if ev is not None:
        result["eval"] = json.loads((run / ev["outputs"]["summary"]).read_text())
    print(json.dumps(result, indent=2))
    print(f"saved {save('quantize', result)}", file=sys.stderr)


if __name__ == "__main__":
    main()
