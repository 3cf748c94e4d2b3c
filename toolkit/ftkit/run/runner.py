"""`ftkit up`: execute a plan, journaling each step before and after it runs.

The plan is the only input: nothing here reads the recipe (a resumed run executes the
plan.json it stored). Steps run in order with one executor (local or docker); whatever a
step changes on the machine - power caps, the serving service, servers - is a guard on a
stack that unwinds in reverse order at the end, whatever happens: success, a failed step,
an exception, Ctrl-C or SIGTERM (a second signal during the unwinding cannot stop it).

The journal (state.json) tells the truth: a step that was running when a signal came is
`interrupted` and the run exits 130 (SIGINT) or 143 (SIGTERM); a failure anywhere marks
the run failed; `finished` is always written; the journal names ftkit's pid and its start
time, so a later ftkit can tell a live run from one whose ftkit died.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import EngineError, FtkitError, GpuError, HttpError, ServerNotReady
from ftkit.files import parse_json
from ftkit.gateways import http, serving
from ftkit.gateways import subprocess as sp
from ftkit.plan.jobs import complete_marker
from ftkit.plan.spec import Plan, Ready, StepSpec
from ftkit.run import envinfo
from ftkit.run.display import Display, progress_of
from ftkit.run.executors import Executor, Outcome, StepIO, executor_for
from ftkit.run.guards import GuardStack, HandoffGuard, PowerGuard, ServerGuard, describe_failure
from ftkit.run.rundir import Journal, OwnerLock, RunDir, iso_now, utc_stamp
from ftkit.run.signals import Interrupted, SignalGate

# Steps that establish machine state rather than produce artifacts: a resumed run does them
# again (caps are gone after `ftkit power restore`, a server is not running any more).
STATE_KINDS = ("power", "handoff-stop", "serve", "load-adapter")  # load-adapter: into the server started again

# What each kind of step must leave for the steps after it (key in step.outputs -> what it is).
# Checked before a step is journaled succeeded - an engine that exits 0 without its output
# failed - and again on resume: a step whose outputs are gone runs again, and so does every
# step after it (their inputs may change).
REQUIRED_OUTPUTS: dict[str, dict[str, str]] = {
    "tiny-model": {"model": "model"},
    "train": {"adapter": "model"},  # an adapter (LoRA, QLoRA) or a model (full)
    "merge": {"model": "model"},
    "quantize": {"model": "model", "summary": "file"},
    "eval": {"summary": "file"},
}


@dataclass
class RunResult:
    run_dir: Path
    status: str  # succeeded | failed | interrupted
    failed_step: str | None
    message: str
    left_running: list[str]
    exit_code: int = 0


def create_run(path: Path, plan: Plan, resolved_yaml: dict[str, Any], argv: list[str]) -> RunDir:
    """Make the run directory (or fill the one reserved) and write what explains the run
    before anything runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o755, exist_ok=True)  # only its owner writes it: --resume refuses one others may
    if any(path.iterdir()):
        raise FtkitError(f"run directory {path} is not empty")
    (path / "logs").mkdir(mode=0o755)
    run = RunDir(path)
    run.write_inputs(resolved_yaml, plan.to_dict(), argv, envinfo.snapshot(include_docker=plan.executor == "docker"))
    return run


@dataclass
class Context:
    run: RunDir
    plan: Plan
    journal: Journal
    display: Display
    executor: Executor
    echo: bool = False
    guards: GuardStack = field(default_factory=GuardStack)
    left_running: list[str] = field(default_factory=list)
    servers: dict[str, Any] = field(default_factory=dict)  # serve step id -> handle
    gate: Any = None  # the run's SignalGate (defers signals across a server's start and its guard)
    unwind_failures: list[str] = field(default_factory=list)  # guards without a journal step of their own
    early: dict[str, Outcome] = field(default_factory=dict)  # load-adapter steps done while their train step ended
    _nvml: Any = None

    def nvml(self) -> Any:
        if self._nvml is None:
            from ftkit.gpu.nvml import open_nvml

            self._nvml = open_nvml()
            if self._nvml is None:
                raise GpuError("the plan sets power limits, but NVML is not available on this machine")
        return self._nvml

    def io(self, step: StepSpec) -> StepIO:
        def started(ident: dict[str, Any]) -> None:
            self.journal.step_detail(step.id, process=ident)

        return StepIO(log=self.run.log(step.id), on_line=lambda line: self.display.line(step, line),
                      on_started=started, echo=self.echo)


def execute_plan(run: RunDir, plan: Plan, *, display: Display | None = None, echo: bool = False,
                 resume: bool = False, owner: OwnerLock | None = None) -> RunResult:
    owner = owner or OwnerLock(run.path)  # refuses (exit 2) when another ftkit drives this run
    display = display or Display(plan)
    # Everything the steps create in the run directory is writable by its owner alone (the
    # engines and their children inherit this): a resume trusts only what the owner could write.
    os.umask(os.umask(0o022) | 0o022)
    try:
        return _drive(run, plan, display, echo=echo, resume=resume)
    finally:
        owner.release()


def _drive(run: RunDir, plan: Plan, display: Display, *, echo: bool, resume: bool) -> RunResult:
    journal = Journal.start(run, [s.id for s in plan.steps])
    if resume:
        journal.record("resumes", [*(journal.state.resumes or []), {"at": iso_now()}])
    ctx = Context(run, plan, journal, display, executor_for(plan.executor, plan, run), echo=echo)
    failed: str | None = None
    message = ""
    stop: Interrupted | None = None
    current: StepSpec | None = None
    display.start(str(run.path))
    status = "failed"
    with SignalGate() as gate:
        ctx.gate = gate
        try:
            try:
                if plan.executor == "docker":
                    try:
                        _prepare_images(ctx)
                    except FtkitError as e:  # refused before any step changed the machine
                        failed, message = "images", describe_failure(e)
                        display.note(f"cannot start: {message}")
                rerun_from: str | None = None  # resume: the first succeeded step whose outputs were gone
                for step in plan.steps:
                    if step.always:
                        continue
                    done = ctx.early.pop(step.id, None)
                    if done is not None:  # done as soon as the adapter was written: journaled and shown then
                        if done.status != "succeeded" and not failed and not stop:  # failed, or never finished
                            failed, message = step.id, done.message or "the early load did not finish"
                        elif done.status == "succeeded" and failed:
                            note = f"the adapter went live before {failed} failed; the server keeps it loaded"
                            _quietly(ctx, "journal", lambda sid=step.id, n=note: journal.step_detail(sid, note=n))
                            display.note(f"{step.id}: {note}")
                        continue
                    if failed or stop:
                        why = (("images could not be prepared" if failed == "images" else f"step {failed} failed")
                               if failed else f"the run was stopped by {stop.name}" if stop else "")
                        journal.step(step.id, "skipped", reason=why)
                        display.step_skipped(step, why)
                        continue
                    if resume and journal.status_of(step.id) == "succeeded" and step.kind not in STATE_KINDS:
                        gone = None if rerun_from else missing_output(run, step)
                        if gone is None and rerun_from is None:
                            display.step_skipped(step, "done before the resume")
                            continue
                        if gone is not None:
                            rerun_from = step.id
                            display.note(f"{step.id}: done before the resume, but {gone}: running it again "
                                         "(and every step after it)")
                    current = step
                    outcome = _attempt(ctx, step)
                    current = None
                    if outcome.status == "failed":
                        failed, message = step.id, outcome.message
            except Interrupted as e:
                gate.cleanup()
                stop = e
                message = f"stopped by {e.name}"
                _close_steps(ctx, current, "interrupted", message)
                display.note(f"{message}; restoring the machine before exit")
            except BaseException as e:  # noqa: BLE001 - a bug must still leave a true journal and a restored machine
                gate.cleanup()
                failed = failed or (current.id if current else "ftkit")
                message = f"internal error: {describe_failure(e)}"
                _internal_error(ctx, e)
                _close_steps(ctx, current, "failed", message)
        except BaseException as e:  # noqa: BLE001 - a signal or error while handling the first one
            gate.cleanup()
            if isinstance(e, Interrupted):
                stop = stop or e
            else:
                failed = failed or "ftkit"
                message = message or f"internal error: {describe_failure(e)}"
        finally:
            gate.cleanup()
            stop = stop or gate.first()  # a signal noted while a handler ran still counts
            if stop is not None and not message:
                message = f"stopped by {stop.name}"
            succeeded = failed is None and stop is None
            _quietly(ctx, "unwinding", lambda: _unwind(ctx, succeeded))
            for step in plan.steps:  # always-steps whose guard was never pushed: nothing to undo
                if step.always and journal.status_of(step.id) == "pending":
                    _quietly(ctx, "journal", lambda sid=step.id: journal.step(sid, "skipped", reason="nothing to undo"))
                    _quietly(ctx, "display", lambda s=step: display.step_skipped(s, "nothing to undo"))
            if failed is None and stop is None:
                bad = [s.id for s in plan.steps if journal.status_of(s.id) == "failed"]
                if bad:
                    failed, message = bad[0], journal.state.steps[bad[0]].error or "restore failed"
                elif ctx.unwind_failures:
                    failed, message = "cleanup", "; ".join(ctx.unwind_failures)
            status = "interrupted" if stop else "failed" if failed else "succeeded"
            _quietly(ctx, "journal", lambda: journal.finish(
                status, failed_step=failed, message=message or None, left_running=ctx.left_running,
                signal=stop.name if stop else None))
            if ctx._nvml is not None:
                _quietly(ctx, "nvml", ctx._nvml.close)
            _quietly(ctx, "display", lambda: display.finish(status, str(run.path)))
            _quietly(ctx, "display", display.close)
    code = stop.exit_code if stop else (1 if failed else 0)
    return RunResult(run.path, status, failed, message, ctx.left_running, code)


def _close_steps(ctx: Context, current: StepSpec | None, status: str, message: str) -> None:
    """The step that was running ends as `status`; every step still to come is skipped."""
    if current is not None:
        _quietly(ctx, "journal", lambda: ctx.journal.step(current.id, status, **_log_ref(ctx, current),
                                                          **({"error": message} if status == "failed" else
                                                             {"reason": message})))
        ctx.display.step_finished(current, status, message)
    for step in ctx.plan.steps:
        if not step.always and ctx.journal.status_of(step.id) in ("pending", "running"):
            _quietly(ctx, "journal", lambda sid=step.id: ctx.journal.step(sid, "skipped", reason=message))
            _quietly(ctx, "display", lambda s=step: ctx.display.step_skipped(s, message))


def _quietly(ctx: Context, what: str, action: Any) -> None:
    """Cleanup must go on: a full disk or a dead terminal cannot stop the rest of it."""
    try:
        action()
    except Exception as e:  # noqa: BLE001
        try:
            os.write(2, f"ftkit: {what} failed during cleanup: {e}\n".encode())
        except OSError:
            pass


# --------------------------------------------------------------------------- one step


def _log_ref(ctx: Context, step: StepSpec) -> dict[str, str]:
    """The journal points at a step's log only when there is one."""
    log = ctx.run.log(step.id)
    return {"log": str(log.relative_to(ctx.run.path))} if log.exists() else {}


def _set_aside_partial(ctx: Context, step: StepSpec) -> None:
    """A merge killed between writing its output and the journal saying so leaves a
    complete-looking directory the engine refuses to overwrite: move it aside, keep it."""
    if step.kind != "merge" or "model" not in step.outputs:
        return
    out = ctx.run.file(step.outputs["model"])
    if out.exists():
        aside = out.with_name(f"{out.name}.set-aside-{utc_stamp()}")
        out.rename(aside)
        ctx.display.note(f"{step.id}: an earlier attempt left {out.name}; moved it to {aside.name}")


def _attempt(ctx: Context, step: StepSpec) -> Outcome:
    if (entry := ctx.journal.entry(step.id)) is not None and entry.attempt:
        _set_aside_partial(ctx, step)
    ctx.journal.step(step.id, "running")
    ctx.display.step_started(step)
    ctx.run.write_generated([{"path": f.path, "content": f.content} for f in step.files])
    try:
        outcome = _execute(ctx, step)
    except (FtkitError, OSError) as e:
        outcome = Outcome("failed", message=describe_failure(e))
    _finished(ctx, step, outcome)
    return outcome


def _finished(ctx: Context, step: StepSpec, outcome: Outcome) -> None:
    """A step's outcome into the journal and onto the console."""
    extra = {**outcome.detail, **_log_ref(ctx, step)}
    if outcome.status == "failed":
        extra["error"] = outcome.message
    elif outcome.message:
        extra["message"] = outcome.message
    ctx.journal.step(step.id, outcome.status, **extra)
    shown = outcome.detail
    if step.kind == "eval" and outcome.status == "failed" and "summary" not in shown:
        shown = _outputs(ctx, step)  # an eval below its bar still wrote the accuracies: show them
    ctx.display.step_finished(step, outcome.status, outcome.message, shown)


def _execute(ctx: Context, step: StepSpec) -> Outcome:
    if step.kind == "power":
        return _cap(ctx, step)
    if step.kind == "power-restore":
        guard = ctx.guards.find(PowerGuard)
        return guard.restore(step.gpus) if guard else Outcome("skipped", message="no limit was changed")
    if step.kind == "handoff-stop":
        start = next((s for s in ctx.plan.steps if s.kind == "handoff-start"), None)
        ctx.guards.push(HandoffGuard(start, ctx.run.log("handoff-start"), lambda: _replaced(ctx, start)))
        sp.run(step.argv, log_file=ctx.run.log(step.id))
        return Outcome("succeeded")
    if step.background:
        return _serve(ctx, step)
    if step.kind == "load-adapter":
        return _load_adapter(ctx, step)
    with _telemetry(ctx, step), _progress(ctx, step), _early_loads(ctx, step):
        if step.nodes:  # a multi-node train step: one container per node, each on its node's engine
            from ftkit.run.executors.multinode import MultiNodeExecutor

            MultiNodeExecutor(ctx.plan, ctx.run).run(step, ctx.io(step))
        else:
            ctx.executor.run(step, ctx.io(step))
    gone = missing_output(ctx.run, step)
    for _ in range(3 if gone is not None and step.nodes else 0):  # shared storage: another node's writes land late
        time.sleep(1.0)
        gone = missing_output(ctx.run, step)
    if gone is not None:
        return Outcome("failed", message=f"the step exited 0 but {gone}")
    return Outcome("succeeded", _outputs(ctx, step))


def missing_output(run: RunDir, step: StepSpec) -> str | None:
    """What `step` should have left (REQUIRED_OUTPUTS) and did not, in words; None when all
    is there. A model is a real directory with its config and safetensors weights (an
    adapter: adapter_config.json and adapter_model.safetensors); a file is a non-empty
    regular file. Links do not count: ftkit made none."""
    for key, what in REQUIRED_OUTPUTS.get(step.kind, {}).items():
        rel = step.outputs.get(key)
        if rel is None:
            continue
        try:
            path = run.file(rel)
            st = os.lstat(path)
        except (OSError, FtkitError):
            return f"left no {key} at {rel}"
        if what == "file":
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return f"left no {key} at {rel} (not a non-empty file)"
        elif not stat.S_ISDIR(st.st_mode) or not _holds_weights(path):
            return f"left no {key} at {rel} (no config and safetensors weights in it)"
    return None


def _holds_weights(d: Path) -> bool:
    def regular(name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(d / name).st_mode)
        except OSError:
            return False

    if regular("adapter_config.json"):
        return regular("adapter_model.safetensors")
    try:
        names = os.listdir(d)
    except OSError:
        return False
    return regular("config.json") and any(n.endswith(".safetensors") and regular(n) for n in names)


def _cap(ctx: Context, step: StepSpec) -> Outcome:
    if not step.gpus:
        return Outcome("skipped", message="no GPUs on this machine: nothing to cap")
    from ftkit.gpu import power

    guard = ctx.guards.find(PowerGuard) or ctx.guards.push(PowerGuard(ctx.nvml, ctx.run.path.name))
    guard.indices |= set(step.power_caps_w)  # before the change: a half-done cap is undone too
    known = _originals_elsewhere(ctx, step)
    report = power.set_limits(ctx.nvml(), step.power_caps_w, holder=power.Holder.this_process(ctx.run.path.name),
                              known_originals=known)
    for idx, (watts, where) in sorted(report.recovered.items()):
        ctx.display.note(f"GPU {idx}: the machine-wide record had no original limit, and the GPU is still at "
                         f"another run's cap: the original {watts:g} W comes from {where}")
    ctx.journal.record("power", {"original_w": {str(k): v for k, v in report.originals.items()},
                                 "originals_file": str(power.originals_path())})
    return Outcome("succeeded", {"caps_w": step.power_caps_w, "original_w": report.originals,
                                 "simulated": bool(ctx.nvml().simulated)})


def _originals_elsewhere(ctx: Context, step: StepSpec) -> dict[int, tuple[float, str]]:
    """True originals for GPUs the machine-wide record has lost (removed when it was torn),
    from the other copy ftkit wrote: the journal of an earlier run in this runs directory
    that capped the GPU and never put it back - its current limit is still that run's cap.
    Newest run first; only a GPU whose limit now equals that run's recorded cap."""
    from ftkit.gpu import power
    from ftkit.run.stale import state_of

    try:
        need = [i for i in step.power_caps_w if i not in power.recorded_indices()]
        if not need:
            return {}
        now = {i: ctx.nvml().power_limit_w(i) for i in need}
        runs = sorted((p for p in ctx.run.path.parent.iterdir() if p != ctx.run.path and p.is_dir()),
                      key=lambda p: p.name, reverse=True)[:200]
    except (OSError, FtkitError):
        return {}
    found: dict[int, tuple[float, str]] = {}
    for run in runs:
        st = state_of(run)
        originals = (st.get("power") or {}).get("original_w") if isinstance(st.get("power"), dict) else None
        steps = st.get("steps") if isinstance(st.get("steps"), dict) else {}
        caps: dict[str, Any] = {}
        for entry in steps.values():
            if isinstance(entry, dict) and isinstance(entry.get("caps_w"), dict):
                caps.update(entry["caps_w"])
        if not isinstance(originals, dict):
            continue
        for i in need:
            orig, cap = originals.get(str(i)), caps.get(str(i), caps.get(i))
            if i in found or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (orig, cap)):
                continue
            if abs(now[i] - float(cap)) < 0.5 and abs(float(orig) - float(cap)) >= 0.5:
                found[i] = (float(orig), f"{run / 'state.json'} (that run capped it to {float(cap):g} W and never "
                                         "put it back)")
    return found


def _replaced(ctx: Context, start: StepSpec | None) -> bool:
    if start is None or not start.replaced_by:
        return False
    handle = ctx.servers.get(start.replaced_by)
    return handle is not None and handle.alive()


def _outputs(ctx: Context, step: StepSpec) -> dict[str, Any]:
    detail: dict[str, Any] = {"outputs": step.outputs}
    summary = None
    if step.kind == "eval" and "summary" in step.outputs:
        summary = ctx.run.file(step.outputs["summary"])
    elif step.kind == "train":
        summary = ctx.run.file(f"steps/{step.id}/train_summary.json")
    elif step.kind == "quantize" and "summary" in step.outputs:
        summary = ctx.run.file(step.outputs["summary"])
    if summary is not None:
        from ftkit.files import read_json

        try:
            found = read_json(summary)  # bounded; never a FIFO or a link
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict):
            detail["summary"] = found
    return detail


def _replace_servers(ctx: Context, step: StepSpec) -> list[StepSpec]:
    """A later serve step on GPUs an earlier server of this run holds replaces it: two
    `serve` holders never preempt each other, so the new one would wait forever. Returns
    the servers it stopped (started again if the new one fails)."""
    stopped = []
    for sid, handle in list(ctx.servers.items()):
        earlier = ctx.plan.step(sid)
        shared = sorted(set(earlier.gpus) & set(step.gpus))
        if shared and handle.alive():
            ctx.display.note(f"{step.id} replaces {sid} on GPU(s) {shared}: stopping {sid}")
            handle.stop()
            ctx.journal.step_detail(sid, stopped=True, replaced_by=step.id)
            del ctx.servers[sid]
            stopped.append(earlier)
    return stopped


def _start_server(ctx: Context, step: StepSpec, *, restored: bool = False) -> tuple[Any, float]:
    """Start a server under its guard and wait until it answers; (handle, seconds)."""
    ready = step.ready or Ready()
    port = ready.port
    if port:
        holder = serving.port_taken(ready.host, port)
        if holder:
            raise EngineError(f"port {port} is already taken ({holder}); a stale server from an earlier run? "
                              "stop it (`ftkit down`) or choose another port")
    log = ctx.run.log(step.id)
    offset = log.stat().st_size if log.exists() else 0  # an earlier attempt's lines are not this server's
    with ctx.gate.deferred() if ctx.gate else nullcontext():  # a server is never started without its guard
        handle = ctx.executor.start(step, ctx.io(step))
        ctx.servers[step.id] = handle
        ctx.guards.push(ServerGuard(step, handle, on_left=lambda s, h: _left(ctx, s, h), restored=restored))
    try:
        seconds = serving.wait_ready(ready.health, ready.models, ready.timeout_s, alive=handle.alive, log_tail=lambda: _log_since(log, offset),
                                     log_name=str(log))
    except ServerNotReady:
        # Nothing to save: a server whose engine failed can hang on SIGTERM (vLLM's API
        # server after its engine core died), so do not give it the full grace period.
        handle.stop(5)
        raise
    if not handle.alive():  # something answered, but not the server we started
        raise EngineError(f"port {port} answers, but the server this step started is not running "
                          f"(see {ctx.run.log(step.id)})")
    return handle, seconds


def _log_since(log: Path, offset: int, limit: int = 256 * 1024) -> str:
    """What a step's log got since `offset` (its last `limit` bytes)."""
    try:
        with open(log, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(offset, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _restore_servers(ctx: Context, failed: StepSpec, previous: list[StepSpec]) -> None:
    """A server that replaced earlier ones failed (to start, or its test prompts): stop it
    (it may hold the GPUs while it hangs) and serve again what the recipe keeps serving, with
    the adapters loaded into it before, as a failed hand-over of the serving service does.
    A server the recipe stops at the end anyway is not started again only to be stopped."""
    handle = ctx.servers.pop(failed.id, None)
    if handle is not None and handle.alive():
        handle.stop()
    for earlier in previous:
        if not earlier.keep_running:
            continue
        # its first server is gone: the guard of the one started now speaks for the step
        ctx.guards.guards = [g for g in ctx.guards.guards if not (isinstance(g, ServerGuard) and g.step.id == earlier.id)]
        try:
            _, seconds = _start_server(ctx, earlier, restored=True)
        except (FtkitError, OSError) as e:
            ctx.display.note(f"{earlier.id} could not be started again: {describe_failure(e)}")
            ctx.journal.step_detail(earlier.id, restore_failed=describe_failure(e))
            continue
        ctx.display.note(f"{failed.id} failed: {earlier.id} serves again (ready after {seconds:.1f} s)")
        ctx.journal.step_detail(earlier.id, stopped=False, restored_after=failed.id)
        for load in ctx.plan.steps:
            if (load.kind == "load-adapter" and load.request is not None and load.request.server == earlier.id
                    and ctx.journal.status_of(load.id) == "succeeded"):
                try:
                    http.request_json("POST", load.request.url, load.request.body, timeout=300, text_answer=True)
                    ctx.display.note(f"{earlier.id}: adapter of {load.id} loaded again")
                except HttpError as e:
                    ctx.display.note(f"{earlier.id}: loading the adapter of {load.id} again failed: "
                                     f"{serving.http_reason(e)}")


def _serve(ctx: Context, step: StepSpec) -> Outcome:
    replaced = _replace_servers(ctx, step)
    ready = step.ready or Ready()
    try:
        handle, seconds = _start_server(ctx, step)
    except (FtkitError, OSError) as e:
        if replaced:
            _restore_servers(ctx, step, replaced)
        gpu = _gpu_trouble(ctx, step.gpus) if isinstance(e, ServerNotReady) else None
        if gpu is not None:  # the server's own words rarely say its GPU is gone
            raise ServerNotReady(f"{e.message}; {gpu}") from e
        raise
    listed, unlisted = _models_listed(step)
    if unlisted:
        if replaced:
            _restore_servers(ctx, step, replaced)
        return Outcome("failed", {"ready_after_s": round(seconds, 2), "models": listed, "outputs": step.outputs,
                                  **handle.ident}, unlisted)
    results = serving.run_prompts(ready.base_url, ready.served_name, step.prompts)
    if replaced and not all(r["passed"] for r in results):
        _restore_servers(ctx, step, replaced)
    ctx.display.prompts(step, results)
    ctx.run.write(step.outputs["responses"], "".join(json.dumps(r) + "\n" for r in results))
    failed = [r for r in results if not r["passed"]]
    detail = {"ready_after_s": round(seconds, 2), "prompts": len(results), "passed": len(results) - len(failed),
              "outputs": step.outputs, **handle.ident, **({"models": listed} if listed is not None else {})}
    if failed:
        first = failed[0]
        why = first["error"] or f"answer {first['answer']!r} does not meet {first['expect']}"
        return Outcome("failed", detail, f"{len(failed)} of {len(results)} test prompt(s) failed; first: {why}")
    return Outcome("succeeded", detail)


def _models_listed(step: StepSpec) -> tuple[list[str] | None, str]:
    """What a ready vLLM lists in /v1/models, and, when it lacks the served model or one of
    the adapters the plan gave it (`adapters:`, model: adapter), one line naming what is
    missing ("" when all is there). Other engines are not asked: transformers serve lists its
    hub cache, not what it serves."""
    if step.engine != "vllm":
        return None, ""
    ready = step.ready or Ready()
    try:
        listed = serving.model_ids(ready.models)
    except HttpError as e:
        return None, f"the server is ready, but /v1/models did not answer: {serving.http_reason(e)}"
    adapters = list(ready.adapters)
    names = [n for n in (_flag(step.argv, "--served-model-name"), ready.served_name) if n and n not in adapters]
    missing_models = [n for n in dict.fromkeys(names) if n not in listed]
    missing = [a for a in adapters if a not in listed]
    said = ([f"the served model {', '.join(map(repr, missing_models))}"] if missing_models else []) + \
        ([f"the adapter{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"] if missing else [])
    if not said:
        return listed, ""
    shown = ", ".join(map(repr, listed[:10])) + (f" and {len(listed) - 10} more" if len(listed) > 10 else "")
    return listed, f"vLLM is ready, but /v1/models does not list {' or '.join(said)} (it lists {shown or 'nothing'})"


def _flag(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in a command line (`--flag VALUE` or `--flag=VALUE`)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _gpu_trouble(ctx: Context, gpus: list[int]) -> str | None:
    """Why a server on `gpus` may have failed that its log would not say: NVML no longer
    lists one of them (fallen off the bus: Xid 79), or cannot be read at all. None when the
    GPUs look fine, or there is no NVML to ask (a CPU machine)."""
    if not gpus:
        return None
    try:
        from ftkit.gpu.nvml import open_nvml

        nv = ctx._nvml or open_nvml()
        if nv is None:
            return None
        if ctx._nvml is None:
            ctx._nvml = nv
        seen = {g.index for g in nv.inventory()}
    except GpuError as e:
        return f"NVML cannot read the GPUs ({e}): one may have fallen off the bus (`nvidia-smi`, dmesg for Xid 79)"
    except Exception:  # noqa: BLE001 - a diagnosis must never hide the real failure
        return None
    gone = [i for i in gpus if i not in seen]
    if gone:
        return (f"GPU {', '.join(map(str, gone))} is no longer visible to NVML (fallen off the bus? "
                "`nvidia-smi`, dmesg for Xid 79)")
    return None


def _load_adapter(ctx: Context, step: StepSpec, cancelled: Any = lambda: False) -> Outcome:
    """Put a trained adapter live in a running vLLM (POST /v1/load_lora_adapter): wait until
    the server answers (it may be coming back from yielding its GPUs to training), load,
    check that /v1/models lists the new name and that it answers, and journal how long the
    adapter took from being written to answering. `cancelled`: an early load (while its
    train step ends) the runner has given up on stops before its next request or display."""

    def check() -> None:
        if cancelled():
            raise EngineError("the early load was given up (its train step ended or the run was stopped)")

    req = step.request
    sid = str(req.server if req is not None else None)
    handle = ctx.servers.get(sid)
    if req is None or handle is None or not handle.alive():
        raise EngineError(f"server {sid} is not running: there is nothing to load the adapter into")
    ready = step.ready or Ready()
    log = ctx.run.log(sid)
    serving.wait_ready(ready.health, ready.models, ready.timeout_s, alive=handle.alive,
                       log_tail=lambda: handle.tail(200), log_name=str(log))
    written = _written_at(ctx.run.file(req.adapter_dir)) if req.adapter_dir else None
    name = str(req.body["lora_name"])
    check()
    t0 = time.monotonic()
    try:
        http.request_json(req.method, req.url, req.body, timeout=300, text_answer=True)
    except HttpError as e:
        check()  # given up: the unwinding owns the server's guard now
        if handle.alive():
            _serves_on(ctx, sid)
        raise EngineError(f"vLLM did not load the adapter {name!r}: {serving.http_reason(e)}") from None
    load_s = time.monotonic() - t0
    try:
        listed = serving.model_ids(ready.models)
    except HttpError as e:
        raise EngineError(f"vLLM loaded {name!r}, but /v1/models did not answer: {serving.http_reason(e)}") from None
    if name not in listed:
        raise EngineError(f"vLLM said it loaded {name!r}, but /v1/models lists only {listed}")
    prompts = step.prompts or [{"prompt": "Hello", "max_tokens": 1}]  # at least: the new name answers
    check()
    first = serving.run_prompts(ready.base_url, name, prompts[:1])
    live_after = time.time() - written if written else None  # written -> its first answer
    results = first + serving.run_prompts(ready.base_url, name, prompts[1:])
    check()
    if step.prompts:
        ctx.display.prompts(step, results)
    ctx.run.write(step.outputs["responses"], "".join(json.dumps(r) + "\n" for r in results))
    failed = [r for r in results if not r["passed"]]
    detail = {"loaded_as": name, "server": sid, "load_s": round(load_s, 3), "models": listed,
              "live_after_written_s": round(live_after, 3) if live_after is not None else None,
              "prompts": len(results), "passed": len(results) - len(failed), "outputs": step.outputs}
    if failed:
        first = failed[0]
        why = first["error"] or f"answer {first['answer']!r} does not meet {first['expect']}"
        return Outcome("failed", detail, f"{len(failed)} of {len(results)} test prompt(s) to {name!r} failed; first: {why}")
    return Outcome("succeeded", detail, f"{name!r} live in {load_s:.2f} s, no restart")


def _serves_on(ctx: Context, sid: str) -> None:
    """vLLM refused an adapter (a rank above --max-lora-rank, a directory it cannot read):
    the server serves exactly what it served before the step, so the failed run does not
    take it down - a server the recipe keeps running stays up, as one started again after a
    failed replacement does; one it does not keep is stopped at the end as always."""
    for guard in ctx.guards.guards:
        if isinstance(guard, ServerGuard) and guard.step.id == sid:
            guard.restored = True


def _written_at(adapter_dir: Path) -> float | None:
    """When the trainer finished writing the adapter (its newest file)."""
    try:
        return max(p.stat().st_mtime for p in adapter_dir.iterdir() if p.is_file())
    except (OSError, ValueError):
        return None


def _left(ctx: Context, step: StepSpec, handle: Any) -> None:
    where = step.ready.base_url if step.ready else ""
    ident = handle.ident
    what = f"container {ident['container'][:12]}" if "container" in ident else f"pid {ident.get('pid')}"
    ctx.left_running.append(f"{step.id} ({what}, {where})")
    if "container" in ident:
        from ftkit.gateways import docker as dk

        dk.set_restart_policy(ident["container"], "unless-stopped", ctx.plan.docker_host)


def _unwind(ctx: Context, succeeded: bool) -> None:
    def journaled(guard: Any) -> bool:
        return bool(guard.journal_id) and any(s.id == guard.journal_id for s in ctx.plan.steps)

    def starting(guard: Any) -> None:
        if journaled(guard):
            ctx.journal.step(guard.journal_id, "running")
            ctx.display.step_started(ctx.plan.step(guard.journal_id))

    def report(guard: Any, outcome: Outcome) -> None:
        if journaled(guard):
            sid = guard.journal_id
            extra = {**outcome.detail, **_log_ref(ctx, ctx.plan.step(sid))}
            if outcome.status == "failed":
                extra["error"] = outcome.message
            elif outcome.message:
                extra["message"] = outcome.message
            ctx.journal.step(sid, outcome.status, **extra)
            ctx.display.step_finished(ctx.plan.step(sid), outcome.status, outcome.message)
        elif isinstance(guard, ServerGuard):
            if outcome.status == "failed":  # the journal must not claim a server stopped that was not
                ident = guard.handle.ident
                what = f"container {str(ident.get('container'))[:12]}" if "container" in ident else f"pid {ident.get('pid')}"
                if outcome.detail.get("exited"):
                    ctx.journal.step_detail(guard.step.id, exited=outcome.message)
                else:
                    ctx.left_running.append(f"{guard.step.id} ({what}): {outcome.message}")
                    ctx.journal.step_detail(guard.step.id, stop_failed=outcome.message)
                ctx.display.note(f"{guard.step.id}: {outcome.message}")
                failures.append(f"{guard.step.id}: {outcome.message}")
            else:
                ctx.journal.step_detail(guard.step.id, **({"left_running": True} if guard.left else {"stopped": True}))
        elif outcome.status == "failed":
            ctx.display.note(f"{guard.label}: {outcome.message}")

    failures: list[str] = []
    ctx.guards.unwind(succeeded, report, starting)
    if failures:
        ctx.unwind_failures.extend(failures)


# --------------------------------------------------------------------------- around steps


def _prepare_images(ctx: Context) -> None:
    """Every image the plan runs is here (or built) before any step changes the machine."""
    seen: set[str] = set()
    for step in ctx.plan.steps:
        if step.executor == "docker" and step.image and step.image not in seen:
            seen.add(step.image)
            ctx.executor.ensure_image(step, StepIO(log=ctx.run.log("images"), on_line=ctx.display.say))


@contextmanager
def _telemetry(ctx: Context, step: StepSpec) -> Iterator[None]:
    """GPU and host telemetry beside every step that uses a GPU (telemetry.csv)."""
    if not step.gpus or not ctx.plan.telemetry.enabled:
        yield
        return
    try:
        from ftkit.gpu.nvml import open_nvml
        from ftkit.gpu.telemetry import Sampler
    except ImportError:
        yield
        return
    sampler = Sampler(open_nvml, step.gpus, ctx.run.file("telemetry.csv"), step=step.id,
                      interval_s=float(ctx.plan.telemetry.interval_s), run_dir=ctx.run.path)
    sampler.start()
    try:
        yield
    finally:
        summary = sampler.stop()
        if isinstance(summary, dict):
            ctx.journal.step_detail(step.id, telemetry=summary)


def _progress(ctx: Context, step: StepSpec) -> Any:
    """Training progress for the display, read from the step's metrics.jsonl as it grows."""
    if step.kind != "train" or "metrics" not in step.outputs:
        return nullcontext()
    return _MetricsWatcher(ctx, step)


class _MetricsWatcher:
    def __init__(self, ctx: Context, step: StepSpec) -> None:
        self.ctx, self.step = ctx, step
        self.path = ctx.run.file(step.outputs["metrics"])
        self.total = step.max_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"progress-{step.id}")

    def __enter__(self) -> _MetricsWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)

    def _watch(self) -> None:
        offset, last = 0, None
        while not self._stop.wait(1.0):
            try:
                with open(self.path, encoding="utf-8") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                    offset = fh.tell()
            except OSError:
                continue
            for line in chunk.splitlines():
                try:
                    row = parse_json(line)  # a file anyone may write: never a RecursionError
                except ValueError:
                    continue
                if isinstance(row, dict) and "loss" in row:
                    last = row
            if last is not None:
                self.ctx.display.progress(self.step, progress_of(last, self.total))


def _early_loads(ctx: Context, step: StepSpec) -> Any:
    """A train step followed at once by load-adapter steps of its adapter: load it the moment
    the engine marks it complete, while the trainer process (its launcher, its container)
    winds down - seconds the adapter would otherwise wait. Only into a server whose GPUs the
    trainer does not hold (it is not yielding them to this step); the loads are journaled
    under their own steps. Anything else, and a server found gone or busy at that moment,
    leaves them to run after the train step, as before."""
    if step.kind != "train" or "adapter" not in step.outputs:
        return nullcontext()
    loads = []
    for later in ctx.plan.steps[ctx.plan.steps.index(step) + 1:]:
        if later.always:
            continue
        req = later.request
        server = next((s for s in ctx.plan.steps if req is not None and s.id == req.server), None)
        if (later.kind != "load-adapter" or req is None or req.adapter_dir != step.outputs["adapter"] or server is None
                or set(server.gpus) & set(step.gpus)):
            break
        loads.append(later)
    return _EarlyLoads(ctx, step, loads) if loads else nullcontext()


class _EarlyLoads:
    """Watches a train step for its adapter's completion marker and runs the load-adapter
    steps after it from this thread, one by one, while the step's process ends. The journal
    entry of a load is written by whoever owns it: this thread until the train step ends,
    then the runner (a load still going when a signal stops the run is marked interrupted)."""

    POLL_S = 0.05  # a stat() each time: nothing next to training, a small part of the 1 s target

    def __init__(self, ctx: Context, step: StepSpec, loads: list[StepSpec]) -> None:
        self.ctx, self.step, self.loads = ctx, step, loads
        self.marker = ctx.run.file(complete_marker(step.outputs["adapter"]))
        self.adapter = ctx.run.file(step.outputs["adapter"])
        self.since = time.time()  # a marker older than this attempt is an earlier attempt's
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._running: StepSpec | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"early-load-{step.id}")

    def __enter__(self) -> _EarlyLoads:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        try:
            # a load under way finishes (its requests have their own timeouts); after a
            # failure or a signal it gets a few seconds, then it is left behind
            self._thread.join(None if exc_type is None else 5.0)
        except BaseException as e:  # a signal while waiting for it: that is why the load stops
            exc = e
            raise
        finally:
            with self._lock:
                self._closed = True
                running, self._running = self._running, None
            if running is not None:
                why = (f"stopped by {exc.name}" if isinstance(exc, Interrupted)
                       else f"{self.step.id} ended while the adapter was being loaded")
                _quietly(self.ctx, "journal", lambda: self.ctx.journal.step(running.id, "interrupted", reason=why))
                _quietly(self.ctx, "display", lambda: self.ctx.display.step_finished(running, "interrupted", why))
                self.ctx.early[running.id] = Outcome("interrupted", message=why)

    def _complete(self) -> bool:
        try:
            st = os.lstat(self.marker)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_mtime >= self.since and _holds_weights(self.adapter)

    def _watch(self) -> None:
        try:
            self._loads()
        except Exception as e:  # noqa: BLE001 - a thread's traceback must not reach the console: ftkit's log has it
            _quietly(self.ctx, "early load", lambda err=e: _internal_error(self.ctx, err))

    def _loads(self) -> None:
        while not self._complete():
            if self._stop.wait(self.POLL_S):
                return  # the step ended first: its loads run after it
        for load in self.loads:
            handle = self.ctx.servers.get(str(load.request.server if load.request else None))
            with self._lock:
                if self._closed or handle is None or not handle.alive():
                    return
                self._running = load
                self.ctx.journal.step(load.id, "running", during_step=self.step.id)
                self.ctx.display.step_started(load)
            try:
                outcome = _load_adapter(self.ctx, load, cancelled=lambda: self._closed)
            except (FtkitError, OSError) as e:
                outcome = Outcome("failed", message=describe_failure(e))
            except Exception as e:  # noqa: BLE001 - a bug here must not pass for a load that never ran
                outcome = Outcome("failed", message=f"internal error: {describe_failure(e)}")
            if outcome.status == "succeeded":
                outcome.message = f"{outcome.message}, as soon as {self.step.id} wrote it"
            with self._lock:
                if self._closed:
                    return
                self._running = None
                outcome.detail["during_step"] = self.step.id
                _finished(self.ctx, load, outcome)
                self.ctx.early[load.id] = outcome
            if outcome.status != "succeeded":
                return


def _internal_error(ctx: Context, err: BaseException) -> None:
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    from ftkit.files import open_append

    with open_append(ctx.run.log("ftkit")) as fh:
        fh.write(f"{iso_now()} internal error\n{text}\n")
    ctx.display.note(f"internal error (traceback in {ctx.run.log('ftkit')}): {describe_failure(err)}")
