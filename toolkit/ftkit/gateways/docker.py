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

from ftkit.errors import DockerError, DockerUnavailable

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
    except (rex.ConnectionError, ConnectionError, FileNotFoundError, PermissionError) as e:
        raise DockerUnavailable(f"{action}: cannot reach the Docker engine ({e.__class__.__name__}: {e})",
                                hint="start dockerd, or set DOCKER_HOST / the machine profile's docker.host") from e
    except de.DockerException as e:
        raise DockerUnavailable(f"{action}: {e}", hint="start dockerd, or set DOCKER_HOST") from e


@functools.lru_cache(maxsize=4)
def client(host: str | None = None, timeout: int = 600) -> Any:
    import docker

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
