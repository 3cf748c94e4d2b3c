"""The Docker executor's cost: the CPU quickstart run in this Python environment and in the
images, alternately, in one invocation; wall time per run and per step, and the start
overhead of a container.

The images are built first (not timed: `ftkit build` is a no-op once they exist). Step
times come from each run's state.json; the per-step overhead is docker minus local. The
container start overhead is `docker run --rm IMAGE true` (create + start + wait + remove),
the fixed cost every docker step pays before its engine imports anything.

    python bench/executor_overhead.py [--repeat 2] [--base-image IMG] [--wheelhouse DIR] [--ca-bundle FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _util import ROOT, run_measured, save

STEPS = ("tiny-model", "train", "merge", "serve", "eval")


def machine(path: Path, args: argparse.Namespace) -> Path:
    lines = ["ftkit: 1", "kind: machine", "name: bench-docker", "executor: docker", "docker:",
             "  build_missing: true"]
    if args.base_image:
        lines.append(f"  base_image: {args.base_image}")
    if args.wheelhouse:
        lines.append(f"  wheelhouse: {args.wheelhouse}")
    if args.ca_bundle:
        lines.append(f"ca_bundle: {args.ca_bundle}")
    path.write_text("\n".join(lines) + "\n")
    return path


def one_run(executor: str, profile: Path, runs: Path) -> dict:  # type: ignore[type-arg]
    exe = str(Path(sys.executable).parent / "ftkit")
    argv = [exe, "up", str(ROOT / "recipes" / "quickstart.yaml"), "--runs-dir", str(runs), "--quiet"]
    argv += ["--machine", str(profile)] if executor == "docker" else ["--executor", "local"]
    r = run_measured(argv)
    if r["rc"] != 0:
        raise SystemExit(f"{executor} run failed:\n{r['output'][-3000:]}")
    summary = json.loads(r["output"][r["output"].index("{\n"):])
    state = json.loads((Path(summary["run_dir"]) / "state.json").read_text())
    steps = {s: state["steps"][s]["seconds"] for s in STEPS}
    return {"wall_s": r["wall_s"], "steps": steps, "accuracy": summary["eval"]["models"]["merged"]["accuracy"]}


def container_start(image: str, n: int = 5) -> dict[str, float]:
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = run_measured(["docker", "run", "--rm", "--init", image, "true"])
        if r["rc"] != 0:
            raise SystemExit(f"docker run {image} failed: {r['output'][-500:]}")
        walls.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3), "runs": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--base-image")
    ap.add_argument("--wheelhouse")
    ap.add_argument("--ca-bundle")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-exec-") as tmp:
        profile = machine(Path(tmp) / "machine.yaml", args)
        one_run("docker", profile, Path(tmp) / "warm")  # builds the images if needed; not counted
        results: dict[str, list[dict]] = {"local": [], "docker": []}  # type: ignore[type-arg]
        for i in range(args.repeat):
            for executor in ("local", "docker") if i % 2 == 0 else ("docker", "local"):
                results[executor].append(one_run(executor, profile, Path(tmp) / f"{executor}-{i}"))
        plan = json.loads(next((Path(tmp) / "warm").glob("*/plan.json")).read_text())
        image = next(s["image"] for s in plan["steps"] if s.get("image"))
        start = container_start(image)

    def med(executor: str, key: str | None = None) -> float:
        vals = [r["wall_s"] if key is None else r["steps"][key] for r in results[executor]]
        return round(statistics.median(vals), 2)

    out = {
        "repeat": args.repeat,
        "wall_s": {"local": med("local"), "docker": med("docker")},
        "ratio_docker_over_local": round(med("docker") / med("local"), 3),
        "steps_s": {s: {"local": med("local", s), "docker": med("docker", s),
                        "overhead_s": round(med("docker", s) - med("local", s), 2)} for s in STEPS},
        "container_start": start,
        "accuracy": {e: [r["accuracy"] for r in results[e]] for e in results},
        "runs": results,
    }
    save("executor_overhead", out)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
