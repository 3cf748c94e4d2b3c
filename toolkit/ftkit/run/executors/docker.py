"""The docker executor: each step runs in its image, as its ContainerSpec says.

Containers carry the run's labels (dev.ftkit.run, dev.ftkit.step) so whatever a run leaves
behind can be found and removed (`ftkit down`, the next `ftkit up`); they run as the host
user so the run directory stays the user's; their output streams into the step's log.
One-shot containers are removed when they end; Ctrl-C and SIGTERM stop them (grace period,
then SIGKILL). Before a CUDA container starts, the driver is checked against the image's
CUDA version. A missing image is built the way `ftkit build` builds it (machine profile:
docker.build_missing), or the run is refused with the command to run.
"""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from pathlib import Path
from typing import Any

from ftkit.errors import CommandFailed, PlanError
from ftkit.files import open_append
from ftkit.gateways import docker as dk
from ftkit.plan.container import ContainerSpec, container_spec, host_env
from ftkit.plan.spec import DockerSettings, Plan, StepSpec
from ftkit.run.executors.base import Outcome, StepIO
from ftkit.run.rundir import OWNER_LOCK, RunDir

TAG = re.compile(r"^ftkit/(?P<image>train|serve|quantize):(?P<variant>[\w.-]+?)-(?P<hash>[0-9a-f]{12})$")
STOP_GRACE_S = 30


TETHER = ["python", "-m", "ftkit.run.tether", f"/ftkit/run/{OWNER_LOCK}", "--"]


def request(cs: ContainerSpec, *, restart: str | None = None, tether: bool = False) -> dk.ContainerRequest:
    """A plan's container in the Docker engine's terms. `tether`: the command dies with the
    ftkit that started it (through the owner lock in the bind-mounted run directory) - a
    container is no child of ftkit, so nothing else would stop it after a SIGKILL."""
    return dk.ContainerRequest(
        image=cs.image, command=(TETHER if tether else []) + cs.command, name=cs.name, environment=host_env(cs),
        binds=[(m.host, m.container, m.read_only) for m in cs.mounts],
        gpu_device_ids=cs.device_ids or None,
        ports=[(p.host_ip, p.host, p.container) for p in cs.ports] or None,
        shm_size=cs.shm_size, labels=cs.labels, working_dir=cs.workdir,
        user=f"{os.getuid()}:{os.getgid()}", restart=restart, stop_timeout=cs.stop_grace_s,
        network=cs.network, hostname=cs.hostname, aliases=cs.aliases or None,
    )


class _Logs:
    """Follows a container's output into the step log (and the display) in a thread."""

    def __init__(self, cid: str, io: StepIO, host: str | None) -> None:
        self.tail: deque[str] = deque(maxlen=400)  # enough to find an engine's reason for failing (gateways.serving)
        self.io = io
        self._fh = open_append(io.log)  # closed in join(); never through a link
        self._thread = threading.Thread(target=self._follow, args=(cid, host), daemon=True, name=f"logs-{cid[:12]}")
        self._thread.start()

    def _follow(self, cid: str, host: str | None) -> None:
        try:
            dk.follow_logs(cid, self._line, host)
        except Exception as e:  # noqa: BLE001 - a log stream that breaks must not fail the step
            self._line(f"ftkit: log stream ended: {e}")

    def _line(self, line: str) -> None:
        self.tail.append(line)
        self._fh.write(line + "\n")
        self._fh.flush()
        if self.io.echo:
            import sys

            sys.stderr.write(line + "\n")
        self.io.on_line(line)

    def join(self, timeout: float = 10.0) -> str:
        self._thread.join(timeout)
        try:
            self._fh.close()
        except OSError:
            pass
        return "\n".join(self.tail)


class DockerHandle:
    def __init__(self, cid: str, logs: _Logs, host: str | None, grace_s: float = STOP_GRACE_S) -> None:
        self.cid, self.logs, self.host, self.grace_s = cid, logs, host, grace_s
        self.ident: dict[str, Any] = {"container": cid}

    def alive(self) -> bool:
        state = dk.container_state(self.cid, self.host)
        return bool(state and state.get("Running"))

    def tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.logs.tail)[-lines:])

    def stop(self, grace_s: float | None = None) -> int | None:
        state = dk.container_state(self.cid, self.host)
        dk.stop_container(self.cid, int(grace_s if grace_s is not None else self.grace_s), self.host)
        state = dk.container_state(self.cid, self.host) or state
        self.logs.join()
        dk.remove_container(self.cid, self.host)
        return int(state.get("ExitCode", 0)) if state else None


class DockerExecutor:
    name = "docker"

    def __init__(self, plan: Plan, run: RunDir) -> None:
        self.plan = plan
        self.run_dir = run
        self.host = plan.docker_host
        self._ready: set[str] = set()

    # -- images ------------------------------------------------------------------------

    def ensure_image(self, step: StepSpec, io: StepIO) -> None:
        ref = step.image or ""
        if ref in self._ready:
            return
        attrs = dk.image_attrs(ref, self.host)
        if attrs is None:
            self._build(ref, io)
            attrs = dk.image_attrs(ref, self.host)
            if attrs is None:
                raise PlanError(f"image {ref} is still missing after the build")
        if step.gpus and not self.plan.simulated_gpus:
            self._check_driver(ref, attrs)
        self._ready.add(ref)

    def _build(self, ref: str, io: StepIO) -> None:
        m = TAG.match(ref)
        if m is None:
            raise PlanError(f"image {ref} is not on this machine", hint=f"docker pull {ref}")
        image, variant = m["image"], m["variant"]
        d = self.plan.docker or DockerSettings()
        flags = "".join(f" {flag} {value}" for flag, value in d.build_flags())
        command = f"ftkit build --image {image} --variant {variant}{flags}"
        if not d.build_missing:
            raise PlanError(f"image {ref} is not built on this machine", hint=f"run `{command}` (or set "
                            "docker.build_missing: true in the machine profile)")
        from ftkit.images import builder, project

        root = project.find_root()
        spec = builder.plan_build(root, image, variant, base_image=d.base_image,
                                  buildkit=dk.find_buildkit_cli() is not None,
                                  wheelhouse=Path(d.wheelhouse) if d.wheelhouse else None,
                                  ca_bundle=Path(d.ca_bundle) if d.ca_bundle else None)
        if spec.tag != ref:
            raise PlanError(f"the plan runs {ref}, but this checkout builds {spec.tag}",
                            hint="plan again from this checkout, or build the image the plan names elsewhere")
        io.on_line(f"ftkit: building {ref} (not on this machine yet; log in logs/)")
        builder.run_build(root, spec, host=self.host, log_dir=self.run_dir.path / "logs", live=False)

    def _check_driver(self, ref: str, attrs: dict[str, Any]) -> None:
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        variant_name = labels.get("dev.ftkit.variant")
        if not variant_name or labels.get("dev.ftkit.cuda", "none") == "none":
            return
        from ftkit.gpu.nvml import open_nvml
        from ftkit.images import compat, project
        from ftkit.images.variants import load

        nv = open_nvml()
        if nv is None:
            raise PlanError(f"{ref} is a CUDA image, but this machine has no NVIDIA driver")
        try:
            image = labels.get("dev.ftkit.image", "train")
            v = load(project.find_root()).get(image, variant_name)
            problems = compat.check(v, nv.driver_version(), nv.cuda_driver_version(), nv.inventory())
        finally:
            nv.close()
        errors = [f.message for f in problems if f.level == "error"]
        if errors:
            raise PlanError(f"{ref} cannot run on this machine: " + "; ".join(errors))

    # -- containers --------------------------------------------------------------------

    def _create(self, step: StepSpec, *, restart: str | None = None) -> str:
        cs = container_spec(step, self.plan)
        dk.remove_container(cs.name, self.host)  # a leftover of an earlier attempt of this run
        tether = not (step.background and step.keep_running)  # a server meant to outlive the run is free
        return dk.create_container(request(cs, restart=restart, tether=tether), self.host)

    def run(self, step: StepSpec, io: StepIO) -> Outcome:
        self.ensure_image(step, io)
        cid = self._create(step)
        logs: _Logs | None = None
        try:
            dk.start_container(cid, self.host)
            io.on_started({"container": cid})
            logs = _Logs(cid, io, self.host)
            code = dk.wait_container(cid, self.host)
            tail = logs.join()
            if code != 0:
                raise CommandFailed(container_spec(step, self.plan).command, code, tail)
            return Outcome("succeeded", {"container": cid[:12]})
        except BaseException:
            # Ctrl-C, SIGTERM (Interrupted) or a failure: the container must not outlive the step.
            # A stop that fails is said in the log, never raised: the first error (or the signal) stands.
            try:
                dk.stop_container(cid, container_spec(step, self.plan).stop_grace_s, self.host)
            except Exception as e:  # noqa: BLE001
                io.on_line(f"ftkit: stopping container {cid[:12]} failed: {e}")
                try:
                    dk.kill_container(cid, host=self.host)
                except Exception:  # noqa: BLE001
                    pass
            finally:
                if logs is not None:
                    logs.join(2)
            raise
        finally:
            try:
                dk.remove_container(cid, self.host)
            except Exception as e:  # noqa: BLE001 - `ftkit down` finds it by its label
                io.on_line(f"ftkit: removing container {cid[:12]} failed: {e}")

    def start(self, step: StepSpec, io: StepIO) -> DockerHandle:
        self.ensure_image(step, io)
        # No restart policy while ftkit watches it: a server that fails must stay down, or
        # Docker would restart it in a loop (its log stream ends, it looks alive again) until
        # the readiness timeout. A server left running gets `unless-stopped` at the end.
        cid = self._create(step)
        try:
            dk.start_container(cid, self.host)
        except BaseException:
            dk.remove_container(cid, self.host)
            raise
        io.on_started({"container": cid})
        return DockerHandle(cid, _Logs(cid, io, self.host), self.host, container_spec(step, self.plan).stop_grace_s)
