"""Executors: run one StepSpec. `local` runs it in this Python environment through the
subprocess gateway; `nvml` and `service` steps are small actions on the machine itself.
The Docker executor joins when the compose stack and GPU lease land; until then a plan
for a docker machine can be printed but not run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ftkit.gateways import serving
from ftkit.errors import FtkitError, GpuError, PlanError
from ftkit.gateways import subprocess as sp
from ftkit.plan.spec import StepSpec
from ftkit.files import write_atomic
from ftkit.run.rundir import Journal, RunDir


@dataclass
class Outcome:
    status: str  # succeeded | failed | skipped
    detail: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass
class Context:
    run: RunDir
    journal: Journal
    echo: bool = True
    servers: list[tuple[StepSpec, sp.Background]] = field(default_factory=list)
    nvml: Any = None
    original_limits: dict[int, float] = field(default_factory=dict)


def execute(step: StepSpec, ctx: Context) -> Outcome:
    if step.kind in ("power", "power-restore"):
        return _power(step, ctx)
    if step.executor == "service":
        sp.run(step.argv, log_file=ctx.run.log(step.id), echo=ctx.echo)
        return Outcome("succeeded")
    if step.executor == "docker":  # preflight refuses such plans before anything runs
        raise PlanError(f"step {step.id}: the docker executor is not available in this ftkit")
    if step.background:
        return _serve(step, ctx)
    sp.run(step.argv, env=step.env, log_file=ctx.run.log(step.id), echo=ctx.echo)
    return Outcome("succeeded", _outputs(step, ctx))


def _outputs(step: StepSpec, ctx: Context) -> dict[str, Any]:
    detail: dict[str, Any] = {"outputs": step.outputs}
    if step.kind == "eval":
        summary = ctx.run.file(step.outputs["summary"])
        if summary.is_file():
            detail["summary"] = json.loads(summary.read_text())
    if step.kind == "train":
        summary = ctx.run.file(f"steps/{step.id}/train_summary.json")
        if summary.is_file():
            detail["summary"] = json.loads(summary.read_text())
    return detail


def _serve(step: StepSpec, ctx: Context) -> Outcome:
    assert step.ready is not None  # the planner sets it for every background step
    proc = sp.start(step.argv, log_file=ctx.run.log(step.id), env=step.env)
    ctx.servers.append((step, proc))
    seconds = serving.wait_ready(step.ready, alive=proc.alive, log_tail=proc.tail)
    results = serving.run_prompts(step.ready["base_url"], step.ready["served_name"], step.prompts)
    lines = "".join(json.dumps(r) + "\n" for r in results)
    write_atomic(ctx.run.file(step.outputs["responses"]), lines)
    failed = [r for r in results if not r["passed"]]
    detail = {"ready_after_s": round(seconds, 2), "prompts": len(results), "passed": len(results) - len(failed),
              "pid": proc.proc.pid, "outputs": step.outputs}
    if failed:
        first = failed[0]
        why = first["error"] or f"answer {first['answer']!r} does not meet {first['expect']}"
        return Outcome("failed", detail, f"{len(failed)} of {len(results)} test prompt(s) failed; first: {why}")
    return Outcome("succeeded", detail)


def _power(step: StepSpec, ctx: Context) -> Outcome:
    if not step.gpus:
        return Outcome("skipped", message="no GPUs on this machine: nothing to cap")
    if ctx.nvml is None:
        from ftkit.gpu.nvml import open_nvml

        ctx.nvml = open_nvml()
        if ctx.nvml is None:
            raise GpuError("the plan sets power limits, but NVML is not available on this machine")
    nv = ctx.nvml
    if step.kind == "power":
        for idx, watts in sorted(step.power_caps_w.items()):
            if idx not in ctx.original_limits:
                ctx.original_limits[idx] = nv.power_limit_w(idx)
                # on disk before the first change, so a crash still says what to restore
                ctx.journal.record("power", {"original_w": dict(ctx.original_limits)})
            nv.set_power_limit_w(idx, watts)
        return Outcome("succeeded", {"caps_w": step.power_caps_w, "simulated": nv.simulated})
    restored = {}
    for idx, watts in sorted(ctx.original_limits.items()):
        nv.set_power_limit_w(idx, watts)
        restored[idx] = watts
    ctx.original_limits.clear()
    return Outcome("succeeded", {"restored_w": restored})


def stop_servers(ctx: Context, *, keep: bool) -> list[str]:
    """Stop the servers this run started, except those the recipe keeps running."""
    left = []
    for step, proc in ctx.servers:
        if keep and step.keep_running and proc.alive():
            left.append(f"{step.id} (pid {proc.proc.pid}, {step.ready['base_url'] if step.ready else ''})")
            continue
        proc.stop()
    return left


def describe_failure(err: BaseException) -> str:
    if isinstance(err, FtkitError):
        return err.render()
    return f"{err.__class__.__name__}: {err}"
