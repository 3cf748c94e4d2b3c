"""The one parser of Docker engine addresses (DOCKER_HOST values), used by every place ftkit
reads one: the machine profile's docker.host, a cluster node's docker_host, the DOCKER_HOST
environment the Docker gateway and the docker CLI inherit, and plan.json on --resume/down.

Why strict: an `ssh://` address becomes arguments of an `ssh` command (the docker CLI runs
`ssh ... HOST docker system dial-stdio`), so `ssh://-oProxyCommand=...` is a command run on
this machine. A host or user that starts with `-`, whitespace or control characters, an
unknown scheme, a user or path where the scheme has none: all refused here, in one place,
so the profile checks and the gateway can never disagree. Stdlib only, below every layer.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

SCHEMES = ("unix", "tcp", "ssh", "npipe")
MAX_LEN = 1024
HINT = "a DOCKER_HOST address: unix:///var/run/docker.sock, tcp://host:2376, ssh://user@host[:port]"

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")


class DockerHostError(ValueError):
    """Not a DOCKER_HOST address ftkit accepts; the message says what is wrong."""


@dataclass(frozen=True)
class DockerHost:
    scheme: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    path: str | None = None

    @property
    def plaintext_tcp(self) -> bool:
        """tcp:// talks to the engine unencrypted and unauthenticated unless TLS is set up
        (DOCKER_TLS_VERIFY); ftkit's own client sets up none."""
        return self.scheme == "tcp"


def parse_docker_host(value: str) -> DockerHost:
    """Parse `value` or raise DockerHostError with a one-line reason (no value echoed raw:
    the caller escapes it if it shows it)."""
    if not isinstance(value, str) or not value:
        raise DockerHostError(f"empty; expected {HINT}")
    if len(value) > MAX_LEN:
        raise DockerHostError(f"longer than {MAX_LEN} characters")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in value):
        raise DockerHostError("contains whitespace, control or non-ASCII characters")
    if value.startswith("-"):
        raise DockerHostError("starts with '-' (it would be read as a command-line option)")
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise DockerHostError(f"no scheme; expected {HINT}")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise DockerHostError(f"unknown scheme {scheme[:16]!r}: ftkit reads {', '.join(s + '://' for s in SCHEMES)}")
    if scheme in ("unix", "npipe"):
        return _socket(scheme, rest)
    return _network(scheme, rest)


def docker_host_problem(value: str) -> str | None:
    """The reason `value` is refused, or None."""
    try:
        parse_docker_host(value)
    except DockerHostError as e:
        return f"not a DOCKER_HOST address ftkit accepts: {e}"
    return None


def _socket(scheme: str, rest: str) -> DockerHost:
    if scheme == "npipe":  # npipe:////./pipe/docker_engine
        rest = rest.replace("\\", "/")
        if not re.fullmatch(r"/*\.?/pipe/[A-Za-z0-9._-]{1,200}", rest):
            raise DockerHostError("an npipe address is npipe:////./pipe/NAME")
        return DockerHost(scheme, path=rest)
    if not rest.startswith("/"):
        raise DockerHostError("a unix address is unix:///absolute/path/to/docker.sock (three slashes)")
    if not _PATH.match(rest) or "/../" in rest + "/":
        raise DockerHostError("the socket path has characters a socket path here does not")
    return DockerHost(scheme, path=rest)


def _network(scheme: str, rest: str) -> DockerHost:
    authority, slash, path = rest.partition("/")
    if slash and path:
        raise DockerHostError(f"a {scheme}:// address takes no path")
    if "?" in authority or "#" in authority:
        raise DockerHostError(f"a {scheme}:// address takes no query or fragment")
    user: str | None = None
    if "@" in authority:
        user, _, authority = authority.rpartition("@")
        if scheme != "ssh":
            raise DockerHostError("only ssh:// addresses name a user")
        if ":" in user:
            raise DockerHostError("no password in the address: use an SSH key or agent")
        if not _USER.match(user):
            raise DockerHostError("the user name must be letters, digits, . _ - and not start with '-' or '.'")
    host, port = _host_port(authority)
    if host.startswith("-") or host.startswith("."):
        raise DockerHostError("the host starts with '-' or '.'")
    return DockerHost(scheme, host=host, port=port, user=user)


def _host_port(authority: str) -> tuple[str, int | None]:
    port_text: str | None = None
    if authority.startswith("["):
        host, sep, after = authority[1:].partition("]")
        if not sep:
            raise DockerHostError("an IPv6 address opened with '[' is not closed")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DockerHostError("not an IPv6 address between [ ]") from None
        if after:
            if not after.startswith(":"):
                raise DockerHostError("unexpected text after the IPv6 address")
            port_text = after[1:]
    else:
        host, sep, port_text_ = authority.partition(":")
        port_text = port_text_ if sep else None
        if not host:
            raise DockerHostError("no host")
        if not host.startswith("-") and not _HOSTNAME.match(host):
            raise DockerHostError("the host is neither a host name nor an IP address")
    port: int | None = None
    if port_text is not None:
        # str.isdigit() also takes other scripts' digits; int() would read them
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise DockerHostError("the port is not a number from 1 to 65535")
        port = int(port_text)
    return host, port
