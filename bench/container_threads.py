"""One training step of the CPU quickstart three ways - in this Python environment (`ftkit up
--executor local`), in a container started by the docker executor (`ftkit up` with a docker
profile) and in the stack `ftkit compose` writes, run by docker-compose - locally again with
one thread, and the stack again under a CPU quota, with the thread count ftkit.run.incontainer
chooses and with the one the engines would choose without it (OMP_NUM_THREADS = the host's
cores: what accelerate launch sets from psutil, whatever the quota). Issue #21: a compose run's training container took
182 s against 6.9 s locally on a loaded machine.

Each variant runs the recipe's tiny-model and train steps (the train step trimmed to
--steps), alternately, --repeat times. Reported per run: the train step's wall time from the
run's journal (state.json: `ftkit up`'s, or the one the stack's containers keep), the
trainer's own train_runtime (metrics.jsonl: model load and container start excluded) and its
seconds per optimizer step; medians per variant, and the machine's load average before and
after each run (numbers from a loaded machine are not comparable: the script says so).

The images are built first if missing (not timed), from the local base image and wheelhouse
when given.

    python bench/container_threads.py [--steps 60] [--repeat 2] [--quota 1] \
        [--base-image ftkit-test/bookworm-python:latest] [--wheelhouse /opt/wheels] [--ca-bundle FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from _util import ROOT, run_measured, save

FTKIT = str(Path(sys.executable).parent / "ftkit")


def recipe(tmp: Path, steps: int) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for rel in (data["dataset"]["path"], data["dataset"]["eval"]["path"]):  # recipes name their data relatively
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "recipes" / rel, tmp / rel)
    train = next(s for s in data["steps"] if s["type"] == "train")
    train.update(max_steps=steps, checkpoint={"every_steps": steps, "keep_last": 1}, eval_every_steps=steps,
                 logging_steps=max(1, steps // 5))
    data["steps"] = [train]
    data["name"] = "threads"
    path = tmp / "threads.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def machine(tmp: Path, args: argparse.Namespace) -> Path:
    lines = ["ftkit: 1", "kind: machine", "name: bench-threads", "executor: docker", "docker:", "  build_missing: true"]
    if args.base_image:
        lines.append(f"  base_image: {args.base_image}")
    if args.wheelhouse:
        lines.append(f"  wheelhouse: {args.wheelhouse}")
    if args.ca_bundle:
        lines.append(f"ca_bundle: {args.ca_bundle}")
    path = tmp / "machine.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_numbers(run: Path) -> dict[str, Any]:
    state = json.loads((run / "state.json").read_text())
    rows = [json.loads(ln) for ln in (run / "steps" / "train" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    final = next((r for r in reversed(rows) if "train_runtime" in r), {})
    steps = max((int(r.get("step", 0)) for r in rows), default=0)
    runtime = final.get("train_runtime")
    return {"step_wall_s": state["steps"]["train"].get("seconds"), "train_runtime_s": runtime,
            "s_per_step": round(runtime / steps, 4) if runtime and steps else None,
            "status": state["steps"]["train"].get("status")}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def newest_run(runs: Path) -> Path:
    return max((p for p in runs.iterdir() if (p / "state.json").is_file()), key=lambda p: p.stat().st_mtime)


def up(recipe_path: Path, runs: Path, profile: Path | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [FTKIT, "up", str(recipe_path), "--runs-dir", str(runs), "--quiet", "--json"]
    argv += ["--machine", str(profile)] if profile else ["--executor", "local"]
    r = run_measured(argv, env=env)
    if r["rc"] != 0:
        raise SystemExit(f"`{' '.join(argv)}` failed:\n{r['output'][-3000:]}")
    return train_numbers(newest_run(runs))


def stack(recipe_path: Path, profile: Path, out: Path, image: str, quota: float | None,
          threads: str | None) -> dict[str, Any]:
    """The stack written fresh into `out` (its .env pointed at `image`: the sources of a shared
    checkout change under a long benchmark, and with them the content tag), its train chain run
    by docker-compose under a unique project; an override file sets the CPU quota and (to show
    what the engines do without ftkit.run.incontainer) the threads."""
    if out.exists():
        shutil.rmtree(out)
    r = run_measured([FTKIT, "compose", str(recipe_path), "--machine", str(profile), "-o", str(out)])
    if r["rc"] != 0:
        raise SystemExit(f"ftkit compose failed:\n{r['output'][-3000:]}")
    env = out / ".env"
    env.write_text("".join(f"FTKIT_TRAIN_IMAGE={image}\n" if ln.startswith("FTKIT_TRAIN_IMAGE=") else ln + "\n"
                           for ln in env.read_text().splitlines()))
    files = ["-f", "compose.yaml"]
    if quota is not None or threads is not None:
        svc: dict[str, Any] = {}
        if quota is not None:
            svc["cpus"] = quota
        if threads is not None:
            svc["environment"] = {"OMP_NUM_THREADS": threads}
        (out / "override.yaml").write_text(yaml.safe_dump({"services": {"train": svc, "tiny-model": svc}}))
        files += ["-f", "override.yaml"]
    project = f"ftkit-bench-{uuid.uuid4().hex[:8]}"
    base = ["docker-compose", "-p", project, *files, "--profile", "train"]
    try:
        proc = subprocess.run([*base, "up", "--no-color"], cwd=out, capture_output=True,
                              text=True, timeout=3600, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"docker-compose up failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    finally:
        subprocess.run([*base, "down", "-v", "-t", "5"], cwd=out, capture_output=True, timeout=300, check=False)
    result = train_numbers(out / "run")  # the journal the stack's containers kept
    if result["status"] != "succeeded":
        raise SystemExit(f"the stack's train step {result['status']}: {(out / 'run' / 'state.json').read_text()[-3000:]}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quota", type=float, default=1.0, help="the CPU quota of the last two variants (CPUs)")
    ap.add_argument("--base-image")
    ap.add_argument("--wheelhouse")
    ap.add_argument("--ca-bundle")
    args = ap.parse_args()
    host = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-threads-") as d:
        tmp = Path(d)
        rec, prof = recipe(tmp, args.steps), machine(tmp, args)
        up(rec, tmp / "warm", prof)  # builds the image if missing; not timed
        built = next(s["image"] for s in json.loads((newest_run(tmp / "warm") / "plan.json").read_text())["steps"]
                     if s["id"] == "train")
        image = f"ftkit-bench/train:threads-{uuid.uuid4().hex[:8]}"  # a tag nobody else removes meanwhile
        subprocess.run(["docker", "tag", built, image], check=True)
        variants = {
            "local": lambda: up(rec, tmp / "runs-local", None),
            "local, OMP_NUM_THREADS=1": lambda: up(rec, tmp / "runs-local1", None, {"OMP_NUM_THREADS": "1"}),
            "docker executor": lambda: up(rec, tmp / "runs-docker", prof),
            "compose stack": lambda: stack(rec, prof, tmp / "stack", image, None, None),
            f"compose stack, --cpus {args.quota:g}": lambda: stack(rec, prof, tmp / "stack", image, args.quota, None),
            f"compose stack, --cpus {args.quota:g}, OMP_NUM_THREADS={host} (as without incontainer)":
                lambda: stack(rec, prof, tmp / "stack", image, args.quota, str(host)),
        }
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
        try:
            for i in range(args.repeat):
                for name, fn in variants.items():
                    before = load()
                    result = fn()
                    result.update(load_before=before, load_after=load())
                    runs[name].append(result)
                    print(f"[{i + 1}/{args.repeat}] {name}: {json.dumps(result)}", flush=True)
        finally:
            subprocess.run(["docker", "rmi", image], capture_output=True, check=False)
    summary = {}
    for name, rs in runs.items():
        def med(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            return round(statistics.median(vals), 3) if vals else None

        summary[name] = {k: med(k) for k in ("step_wall_s", "train_runtime_s", "s_per_step")}
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load_before", "load_after")]
    quiet = max(r["load_before"] for rs in runs.values() for r in rs) < host  # a run adds ~1-2 itself
    out = {"host_cpus": host, "steps": args.steps, "repeat": args.repeat, "quota": args.quota,
           "max_load": max(loads), "quiet": quiet, "median": summary, "runs": runs}
    path = save("container_threads", out)
    print(json.dumps(summary, indent=2))
    if not quiet:
        print(f"note: the load average reached {max(loads)} on {host} CPUs: other work shared the machine, so these "
              "numbers compare poorly; run again on a quiet machine", file=sys.stderr)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
