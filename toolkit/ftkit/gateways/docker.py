"""The Docker gateway: the only module that talks to the Docker engine or the docker CLI,
and the one place their failures become ftkit errors (docker-py's errors.py pattern).

Two ways in:
- the Python SDK (docker-py) for queries, containers and the classic builder;
- the docker CLI for BuildKit builds, which the SDK cannot do (docker-py issue 2230):
  `docker buildx build` where buildx exists, else `DOCKER_BUILDKIT=1 docker build` on a
  client older than 23 (newer clients refuse BuildKit without buildx).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ftkit.dockerhost import HINT as HOST_HINT
from ftkit.dockerhost import docker_host_problem
from ftkit.errors import DockerError, DockerUnavailable, UserError

CLI_ENV = "FTKIT_DOCKER_CLI"


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Map docker-py exceptions to ftkit's tree, naming what we were doing."""
    import docker.errors as de
    import requests.exceptions as rex

    try:
        yield
    except de.ImageNotFound as e:
        raise DockerError(f"{action}: image not found: {e.explanation or e}") from e
    except de.NotFound as e:
        raise DockerError(f"{action}: not found: {e.explanation or e}") from e
    except de.APIError as e:
        raise DockerError(f"{action}: {e.explanation or e}") from e
    except rex.Timeout as e:  # an OSError by inheritance: it must not pass for a file problem
        raise DockerError(f"{action}: the Docker engine did not answer in time ({e})") from e
    except (rex.ConnectionError, ConnectionError, FileNotFoundError, PermissionError) as e:
        raise DockerUnavailable(f"{action}: cannot reach the Docker engine ({e.__class__.__name__}: {e})",
                                hint="start dockerd, or set DOCKER_HOST / the machine profile's docker.host") from e
    except de.DockerException as e:
        raise DockerUnavailable(f"{action}: {e}", hint="start dockerd, or set DOCKER_HOST") from e


def checked_host(host: str | None) -> str | None:
    """`host`, or the inherited DOCKER_HOST when `host` is None, through the one strict
    parser (ftkit.dockerhost): the SDK and the docker CLI would turn an `ssh://-o...` value
    into ssh options. Refused as bad input before any connection."""
    value, where = (host, "the Docker host") if host is not None else (os.environ.get("DOCKER_HOST"), "DOCKER_HOST")
    if value is None or (host is None and value == ""):
        return host
    problem = docker_host_problem(value)
    if problem:
        raise UserError(f"{where} {value[:80]!r}: {problem}", hint=HOST_HINT)
    return host


@functools.lru_cache(maxsize=4)
def client(host: str | None = None, timeout: int = 600) -> Any:
    import docker

    checked_host(host)
    with translated("connect to Docker"):
        if host:
            return docker.DockerClient(base_url=host, timeout=timeout)
        return docker.from_env(timeout=timeout)


def reachable(host: str | None = None) -> bool:
    try:
        with translated("ping"):
            return bool(client(host, timeout=5).ping())
    except (DockerUnavailable, DockerError):
        return False


def server_version(host: str | None = None) -> str | None:
    if not reachable(host):
        return None
    with translated("version"):
        return str(client(host).version().get("Version"))


def image_attrs(ref: str, host: str | None = None) -> dict[str, Any] | None:
    """The image's inspect data, or None when there is no such image."""
    import docker.errors as de

    try:
        with translated(f"inspect {ref}"):
            return dict(client(host).images.get(ref).attrs)
    except DockerError as e:
        if isinstance(e.__cause__, (de.ImageNotFound, de.NotFound)):
            return None
        raise


def image_history(ref: str, host: str | None = None) -> list[dict[str, Any]]:
    with translated(f"history {ref}"):
        return list(client(host).api.history(ref))


def images_with_label(label: str, host: str | None = None) -> list[dict[str, Any]]:
    with translated("list images"):
        return [img.attrs for img in client(host).images.list(filters={"label": label})]


def remove_image(ref: str, host: str | None = None, force: bool = True) -> None:
    with translated(f"remove {ref}"):
        client(host).images.remove(ref, force=force)



def prune_dangling(label: str, host: str | None = None) -> int:
    """Remove untagged images carrying `label`; return how many bytes were freed."""
    with translated("prune images"):
        res = client(host).images.prune(filters={"dangling": True, "label": label})
        return int(res.get("SpaceReclaimed") or 0)


def run_container(image: str, command: list[str], *, host: str | None = None, environment: dict[str, str] | None = None,
                  volumes: dict[str, dict[str, str]] | None = None, user: str | None = None,
                  timeout_s: int = 600) -> tuple[int, str]:
    """Run a container to completion; return (exit code, combined output). Removes it."""
    with translated(f"run {image}"):
        c = client(host).containers.run(image, command, environment=environment or {}, volumes=volumes or {},
                                        detach=True, user=user)
        try:
            status = c.wait(timeout=timeout_s)
            logs = c.logs(stdout=True, stderr=True).decode("utf-8", "replace")
            return int(status.get("StatusCode", 1)), logs
        finally:
            c.remove(force=True)


# --------------------------------------------------------------------------- containers


@dataclass
class ContainerRequest:
    """What a container needs, in the engine's own terms (filled in by the docker executor
    from a plan's ContainerSpec; this gateway knows nothing about plans)."""

    image: str
    command: list[str]
    name: str | None = None
    environment: dict[str, str] | None = None
    binds: list[tuple[str, str, bool]] | None = None  # (host, container, read_only)
    gpu_device_ids: list[str] | None = None
    ports: list[tuple[str, int, int]] | None = None  # (host ip, host port, container port)
    shm_size: str | None = None
    labels: dict[str, str] | None = None
    working_dir: str | None = None
    user: str | None = None
    restart: str | None = None  # e.g. unless-stopped for servers left running
    network: str | None = None
    hostname: str | None = None
    stop_timeout: int | None = None
    aliases: list[str] | None = None  # DNS names on `network` (a user-defined network), besides the container name


def container_kwargs(req: ContainerRequest) -> dict[str, Any]:
    """The docker SDK's `containers.create` arguments for a request (pure: no engine)."""
    import docker.types as dt

    kw: dict[str, Any] = {
        "command": req.command, "name": req.name, "environment": req.environment or {}, "labels": req.labels or {},
        "working_dir": req.working_dir, "user": req.user, "detach": True, "stdin_open": False, "tty": False,
        "init": True,  # tini as pid 1: signals reach the command, zombies are reaped
    }
    if req.binds:
        kw["mounts"] = [dt.Mount(target=c, source=h, type="bind", read_only=ro) for h, c, ro in req.binds]
    if req.gpu_device_ids:
        kw["device_requests"] = [dt.DeviceRequest(driver="nvidia", device_ids=list(req.gpu_device_ids),
                                                  capabilities=[["gpu"]])]
    if req.ports:
        kw["ports"] = {f"{c}/tcp": (ip, h) for ip, h, c in req.ports}
    if req.shm_size:
        kw["shm_size"] = req.shm_size
    if req.restart:
        kw["restart_policy"] = {"Name": req.restart}
    if req.network:
        kw["network"] = req.network
        if req.aliases and req.network not in ("host", "bridge", "none"):
            kw["networking_config"] = {req.network: dt.EndpointConfig("1.41", aliases=list(req.aliases))}
    if req.hostname:
        kw["hostname"] = req.hostname
    # stop_timeout is not a docker-py model argument: ftkit passes the grace to every stop itself
    return {k: v for k, v in kw.items() if v is not None}


def create_args(req: ContainerRequest, api_version: str = "1.41") -> dict[str, Any]:
    """What the SDK would send to the engine to create this container - built and checked
    by docker-py itself, without an engine (tests use it to prove a plan is complete)."""
    import docker
    from docker.models.containers import _create_container_args

    kwargs = {"image": req.image, "version": api_version, **container_kwargs(req)}
    kwargs.pop("detach", None)
    args = _create_container_args(kwargs)
    api = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version=api_version)
    name = args.pop("name", None)
    return {"Name": name, **api.create_container_config(**args)}


def create_container(req: ContainerRequest, host: str | None = None) -> str:
    """Create (not start) a container; return its id."""
    with translated(f"create container from {req.image}"):
        return str(client(host).containers.create(req.image, **container_kwargs(req)).id)


def start_container(cid: str, host: str | None = None) -> None:
    with translated(f"start container {cid[:12]}"):
        client(host).api.start(cid)


def container_state(cid: str, host: str | None = None) -> dict[str, Any] | None:
    """The container's State (Status, Running, ExitCode, ...), or None when it is gone."""
    import docker.errors as de

    try:
        with translated(f"inspect container {cid[:12]}"):
            return dict(client(host).api.inspect_container(cid)["State"])
    except DockerError as e:
        if isinstance(e.__cause__, de.NotFound):
            return None
        raise


def follow_logs(cid: str, on_line: Callable[[str], None], host: str | None = None) -> None:
    """Stream the container's output line by line until it stops (blocks; run it in a thread)."""
    with translated(f"logs of {cid[:12]}"):
        buf = b""
        for chunk in client(host).api.logs(cid, stream=True, follow=True, stdout=True, stderr=True):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                on_line(line.decode("utf-8", "replace"))
        if buf:
            on_line(buf.decode("utf-8", "replace"))


def wait_container(cid: str, host: str | None = None, timeout: float | None = None) -> int:
    with translated(f"wait for {cid[:12]}"):
        res = client(host).api.wait(cid, timeout=timeout)
        return int(res.get("StatusCode", 1))


def stop_container(cid: str, grace_s: int = 30, host: str | None = None) -> None:
    """SIGTERM, then SIGKILL after the grace period (docker stop). Gone already is fine."""
    import docker.errors as de

    try:
        with translated(f"stop {cid[:12]}"):
            client(host, timeout=grace_s + 60).api.stop(cid, timeout=grace_s)
    except DockerError as e:
        if not isinstance(e.__cause__, de.NotFound):
            raise


def kill_container(cid: str, signal: str = "SIGKILL", host: str | None = None) -> None:
    import docker.errors as de

    try:
        with translated(f"kill {cid[:12]}"):
            client(host).api.kill(cid, signal=signal)
    except DockerError as e:
        if not isinstance(e.__cause__, (de.NotFound, de.APIError)):
            raise


def remove_container(cid: str, host: str | None = None) -> None:
    import docker.errors as de

    try:
        with translated(f"remove {cid[:12]}"):
            client(host).api.remove_container(cid, force=True, v=True)
    except DockerError as e:
        if not isinstance(e.__cause__, de.NotFound):
            raise


def containers_with_label(label: str, host: str | None = None, *, all: bool = True) -> list[dict[str, Any]]:
    """Summaries (Id, Names, State, Labels) of containers carrying `label` (key or key=value)."""
    with translated("list containers"):
        return list(client(host).api.containers(all=all, filters={"label": label}))


def set_restart_policy(cid: str, policy: str, host: str | None = None) -> None:
    """`docker update --restart`: a server left running comes back after a reboot."""
    with translated(f"update {cid[:12]}"):
        client(host).api.update_container(cid, restart_policy={"Name": policy})


def engine_time(host: str | None = None) -> str | None:
    """The engine's clock (docker info SystemTime), for clock-skew checks."""
    with translated("info"):
        return client(host).info().get("SystemTime")


# --------------------------------------------------------------------------- CLI (BuildKit)


@dataclass(frozen=True)
class BuildKitCli:
    """How to run a BuildKit build with a docker CLI found on this machine."""

    path: str
    mode: str  # "buildx" | "legacy-buildkit"
    version: str

    def build_argv(self) -> list[str]:
        return [self.path, "buildx", "build", "--load"] if self.mode == "buildx" else [self.path, "build"]

    def env(self) -> dict[str, str]:
        checked_host(None)  # the CLI inherits DOCKER_HOST
        return {} if self.mode == "buildx" else {"DOCKER_BUILDKIT": "1"}


def _candidates() -> list[str]:
    seen: list[str] = []
    override = os.environ.get(CLI_ENV)
    if override:
        return [override]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, "docker")
        if os.path.isfile(p) and os.access(p, os.X_OK) and os.path.realpath(p) not in map(os.path.realpath, seen):
            seen.append(p)
    for p in ("/usr/bin/docker", "/usr/local/bin/docker"):
        if os.path.isfile(p) and os.path.realpath(p) not in map(os.path.realpath, seen):
            seen.append(p)
    return seen


def _client_version(path: str, run: Callable[..., str]) -> str | None:
    try:
        out = run([path, "version", "--format", "{{.Client.Version}}"], timeout=10)
    except Exception:  # noqa: BLE001 - a broken CLI is simply not a candidate
        try:
            out = run([path, "--version"], timeout=10)
        except Exception:  # noqa: BLE001
            return None
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return m.group(0) if m else None


@functools.lru_cache(maxsize=1)
def find_buildkit_cli() -> BuildKitCli | None:
    """The first docker CLI on this machine that can run a BuildKit build, else None."""
    from ftkit.gateways.subprocess import output

    def run(argv: list[str], timeout: int) -> str:
        return output(argv, timeout=timeout)

    for path in _candidates():
        version = _client_version(path, run)
        if version is None:
            continue
        try:
            output([path, "buildx", "version"], timeout=10)
            return BuildKitCli(path, "buildx", version)
        except Exception:  # noqa: BLE001 - no buildx plugin on this client
            pass
        if int(version.split(".")[0]) < 23:
            return BuildKitCli(path, "legacy-buildkit", version)
    return None
