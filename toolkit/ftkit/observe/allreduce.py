"""`ftkit bench --allreduce`: all-reduce bandwidth between the nodes of a multi-node plan,
with the backend, launcher, rendezvous, image and network interface training will use.

The scaling guide tests the network path before blaming the framework (ping, iperf3);
for data parallelism what matters is the collective the gradients go through. This bench
runs it: the recipe's multi-node train step is planned as usual and its launcher command is
kept on every node, with the training engine replaced by this module's worker. So the c10d
rendezvous (the first node's port, reachable or not), Gloo on the CPU or NCCL on GPUs, and
GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME are exactly the run's.

Figures as nccl-tests defines them for all-reduce: algorithm bandwidth algbw = S / t for a
message of S bytes taking t seconds; bus bandwidth busbw = algbw x 2(n-1)/n, the traffic
each link carries in a ring, comparable across world sizes and with the link's speed.

The result (allreduce.json in the bench directory) is also kept as
<runs>/allreduce-<machine>.json, which planning reads: `ftkit plan` then shows, per
multi-node train step, the time to all-reduce its gradients each optimizer step and the
compute per step needed to keep the scaling efficiency at 70%.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The worker runs in the images with nothing of ftkit imported beyond this module; the host
# side shares the file name and format with the planner (plan.cluster), which reads it.
FORMAT = 1
DEFAULT_SIZES = (1 << 20, 4 << 20, 16 << 20)
RESULT = "allreduce.json"


def bus_factor(world: int) -> float:
    """nccl-tests' all-reduce bus bandwidth factor: 2(n-1)/n."""
    return 2 * (world - 1) / world if world > 1 else 0.0


def figures(nbytes: int, seconds: float, world: int) -> dict[str, float]:
    algbw = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    return {"algbw_gbps": round(algbw, 4), "busbw_gbps": round(algbw * bus_factor(world), 4)}


# --------------------------------------------------------------------------- worker (in the image)


def measure(sizes: list[int], iters: int, warmup: int) -> dict[str, Any]:
    """All-reduce each size `warmup` then `iters` times; the median time per operation.
    Runs in every process of the job (torchrun set RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend)
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        rows = []
        for nbytes in sizes:
            x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
            times = []
            for i in range(warmup + iters):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            # the slowest rank's time is the operation's: agree on it
            t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = float(t.item())
            rows.append({"bytes": x.numel() * 4, "iters": iters, "time_s": round(seconds, 6),
                         **figures(x.numel() * 4, seconds, world)})
        return {"backend": backend, "world_size": world, "rank": rank, "results": rows,
                "hosts": _hosts(dist, world)}
    finally:
        dist.destroy_process_group()


def _hosts(dist: Any, world: int) -> list[str]:
    import socket

    names: list[Any] = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    return [str(n) for n in names]


def worker(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ftkit.observe.allreduce")
    ap.add_argument("--out", required=True, help="where rank 0 writes the result (JSON)")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="message sizes in bytes")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    result = measure(sizes, args.iters, args.warmup)
    if result["rank"] == 0:
        result.pop("rank")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        for r in result["results"]:
            print(f"ftkit allreduce: {r['bytes']} bytes: {r['time_s'] * 1e3:.2f} ms, algbw {r['algbw_gbps']:.3f} GB/s, "
                  f"busbw {r['busbw_gbps']:.3f} GB/s ({result['backend']}, {result['world_size']} processes)",
                  flush=True)


# --------------------------------------------------------------------------- host side


def latest_path(runs_root: Path, machine: str) -> Path:
    """Where the planner looks for the cluster's last measurement."""
    from ftkit.plan.cluster import ALLREDUCE_FILE, ALLREDUCE_FORMAT

    if ALLREDUCE_FORMAT != FORMAT:  # pragma: no cover - a programming error caught by the unit tests
        raise RuntimeError("plan.cluster and observe.allreduce disagree about the result format")
    return runs_root / ALLREDUCE_FILE.format(machine=machine)


def read_latest(runs_root: Path, machine: str) -> dict[str, Any] | None:
    p = latest_path(runs_root, machine)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("ftkit_allreduce") == FORMAT else None


@dataclass
class AllreduceResult:
    bench_dir: Path
    result: dict[str, Any]
    latest: Path


def run_bench(recipe_path: str, machine_path: str | None, *, out_dir: Path | None = None,
              sizes: list[int] | None = None, iters: int = 5, echo: bool = False,
              say: Callable[[str], None] = lambda m: None) -> AllreduceResult:
    """Plan the recipe into a bench directory, take its first multi-node train step, and run
    the worker on its nodes in place of the trainer."""
    from ftkit.errors import UserError
    from ftkit.prepare import prepare, runs_root
    from ftkit.run.executors.base import StepIO
    from ftkit.run.executors.multinode import MultiNodeExecutor
    from ftkit.run.rundir import OwnerLock, RunDir, utc_stamp

    def where(res: Any) -> str:
        root = out_dir.parent if out_dir else runs_root(res.machine)
        return str((out_dir or root / f"bench-allreduce-{utc_stamp()}-{res.recipe.name}").resolve())

    prepared = prepare(recipe_path, machine_path, run_dir=where)
    prepared.check()
    plan = prepared.plan
    step = next((s for s in plan.steps if s.nodes), None)
    if step is None:
        raise UserError(f"{recipe_path}: no train step with `nodes:` above 1: nothing to measure between nodes",
                        hint="add nodes: N to the train step and a cluster section to the machine profile")
    bench_dir = Path(plan.run_dir)
    bench_dir.mkdir(parents=True)
    (bench_dir / "logs").mkdir()
    run = RunDir(bench_dir)
    run.write_generated([{"path": f.path, "content": f.content} for f in step.files if "accelerate" in f.path])
    out = "/ftkit/run/" + RESULT
    tail = ["-m", "ftkit.observe.allreduce", "--out", out, "--iters", str(iters)]
    if sizes:
        tail += ["--sizes", ",".join(map(str, sizes))]
    for node in step.nodes:
        cut = node.argv.index("-m") if "-m" in node.argv else len(node.argv)
        node.argv = node.argv[:cut] + tail
    step.id = "allreduce"  # logs/allreduce.log, container names; the GPUs stay under the step's lease
    step.labels = {**step.labels, "dev.ftkit.step": step.id}
    say(f"ftkit bench --allreduce: {len(step.nodes)} nodes, rendezvous {plan.cluster.rendezvous if plan.cluster else None}; "
        f"log: {bench_dir / 'logs' / 'allreduce.log'}")
    io = StepIO(log=run.log(step.id), on_line=lambda line: say(line) if "ftkit allreduce:" in line else None,
                echo=echo)
    owner = OwnerLock(bench_dir)  # the nodes' tether watches it: they die with this process
    try:
        MultiNodeExecutor(plan, run).run(step, io)
    finally:
        owner.release()
    try:
        result = json.loads((bench_dir / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"the bench ran but left no readable {RESULT} in {bench_dir}: {e}") from e
    result = {"ftkit_allreduce": FORMAT, "taken": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": plan.machine, "recipe": plan.recipe,
              "nodes": [n.name for n in step.nodes], "rendezvous": plan.cluster.rendezvous if plan.cluster else None, **result}
    from ftkit.files import write_json

    write_json(bench_dir / RESULT, result)
    latest = latest_path(runs_root(prepared.res.machine), plan.machine)
    latest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bench_dir / RESULT, latest)
    return AllreduceResult(bench_dir, result, latest)


if __name__ == "__main__":
    worker(sys.argv[1:])
