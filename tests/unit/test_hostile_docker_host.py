"""Issue #24: Docker host addresses are parsed by one strict function (ftkit.dockerhost) wherever
ftkit reads one: an `ssh://-oProxyCommand=...` would be an ssh option, run on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftkit.dockerhost import DockerHostError, parse_docker_host
from ftkit.errors import UserError
from ftkit.gateways import docker as dk
from tests.conftest import run_cli
from tests.unit.test_bad_input_config import refused

HOSTILE = [
    "ssh://-oProxyCommand=touch${IFS}/tmp/pwned",
    "ssh://-oProxyCommand=sh -c id",
    "ssh://me@-oProxyCommand=x",
    "ssh://-l root@host",
    "ssh://user:secret@host",
    "-H unix:///x",
    "ssh://host\n-oX",
    "ssh://ho\x00st",
    "ftp://host",
    "http://host:2375",
    "host:2375",
    "tcp://",
    "tcp://host:0",
    "tcp://host:99999",
    "tcp://host:२३७५",  # Devanagari digits: int() reads them
    "tcp://user@host:2376",
    "tcp://host:2376/path",
    "unix://var/run/docker.sock",
    "unix:///var/run/../../etc/docker.sock",
    "ssh://[::1",
    "ssh://.host",
    "ssh://hóst",
    "",
]
GOOD = ["unix:///var/run/docker.sock", "tcp://10.0.0.2:2376", "tcp://[::1]:2375", "ssh://me@gpu-2",
        "ssh://deploy.user@gpu-2.lab.example:2222", "ssh://10.0.0.2", "npipe:////./pipe/docker_engine"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_docker_hosts_are_refused(value: str) -> None:
    with pytest.raises(DockerHostError):
        parse_docker_host(value)


@pytest.mark.parametrize("value", GOOD)
def test_ordinary_docker_hosts_parse(value: str) -> None:
    parsed = parse_docker_host(value)
    assert parsed.scheme in ("unix", "tcp", "ssh", "npipe")


def test_parts_are_read() -> None:
    h = parse_docker_host("ssh://me@gpu-2:2222")
    assert (h.scheme, h.user, h.host, h.port) == ("ssh", "me", "gpu-2", 2222)


def _machine(tmp_path: Path, host: str) -> Path:
    m = tmp_path / "m.yaml"
    m.write_text(f"ftkit: 1\nkind: machine\nname: m\ndocker:\n  host: {host!r}\n".replace("\\", "\\\\"))
    return m


@pytest.mark.parametrize("value", ["ssh://-oProxyCommand=touch${IFS}/tmp/pwned", "ssh://me@-oX", "ftp://host",
                                   "unix://relative"])
def test_a_machine_profile_with_a_smuggling_host_is_refused(tmp_path: Path, value: str) -> None:
    err = refused(run_cli("validate", str(_machine(tmp_path, value))), "docker.host")
    assert "DOCKER_HOST" in err


def _cluster(tmp_path: Path, host: str) -> Path:
    shared = tmp_path / "shared"
    (shared / "runs").mkdir(parents=True)
    m = tmp_path / "m.yaml"
    m.write_text(f"ftkit: 1\nkind: machine\nname: lab\nexecutor: docker\n"
                 f"gpus:\n  - {{index: 0, model: RTX 4090}}\npaths: {{runs: {shared / 'runs'}}}\n"
                 f"cluster:\n  shared: {shared}\n  interface: enp5s0\n  nodes:\n"
                 f"    - {{name: a, address: 10.0.0.1, gpus: [0]}}\n"
                 f"    - {{name: b, address: 10.0.0.2, docker_host: '{host}', gpus: [0]}}\n")
    return m


def test_a_cluster_node_with_a_smuggling_host_is_refused(tmp_path: Path) -> None:
    err = refused(run_cli("validate", str(_cluster(tmp_path, "ssh://-oProxyCommand=id"))), "docker_host")
    assert "cluster.nodes[1].docker_host" in err


def test_an_inherited_docker_host_is_checked_by_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "ssh://-oProxyCommand=id")
    dk.client.cache_clear()
    with pytest.raises(UserError, match="DOCKER_HOST"):
        dk.client(None)
    with pytest.raises(UserError, match="Docker host"):
        dk.checked_host("ssh://-oProxyCommand=id")
    monkeypatch.setenv("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert dk.checked_host(None) is None


def test_plain_tcp_is_warned_about(tmp_path: Path) -> None:
    from ftkit.plan.build import _plaintext_docker_warnings
    from ftkit.recipe.validate import load_machine

    machine = load_machine(_machine(tmp_path, "tcp://10.0.0.2:2375")).machine
    (w,) = _plaintext_docker_warnings(machine)
    assert "without TLS" in w and "docker.host" in w
    assert not _plaintext_docker_warnings(load_machine(_cluster(tmp_path / "c", "ssh://me@10.0.0.2")).machine)
