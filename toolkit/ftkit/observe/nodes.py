"""`ftkit doctor --cluster`: environment parity across the nodes of a machine's cluster, as
their trainers will see it.

The scaling guide's small-cluster rule: capture Python, torch, CUDA, driver and the
device count on every host before a multi-host run, and compare. Here each node runs
`ftkit doctor --json` in the training image, through its own Docker engine, with the
environment, GPUs, network and shared storage its trainer gets; its engine's facts (Docker
version, the ftkit images it holds with their lock and content hashes) are read from
outside. Every node is then compared with the first (`observe.doctor.compare`), and three
things a multi-node start needs are checked on the way:

- the node's network interface for NCCL/Gloo exists in the container;
- the shared storage: each node writes a marker into cluster.shared, and this machine
  must see every marker (the same storage, not a local directory of the same name);
- the rendezvous port is free on the first node (reachability itself is what
  `ftkit bench --allreduce` proves, through the real c10d rendezvous).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError, UserError
from ftkit.observe import doctor as dr
from ftkit.recipe.models import Machine

BEGIN, END = "@@ftkit-doctor-begin@@", "@@ftkit-doctor-end@@"


@dataclass
class NodeReport:
    name: str
    host: str | None
    snapshot: dict[str, Any] | None = None
    checks: list[dr.Finding] = field(default_factory=list)
    drift: list[dr.Drift] = field(default_factory=list)  # against the first node


@dataclass
class ClusterReport:
    machine: str
    image: str
    nodes: list[NodeReport]

    def errors(self) -> int:
        return sum(f.severity == "error" for n in self.nodes for f in n.checks) + sum(
            d.severity == "error" for n in self.nodes for d in n.drift)

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "image": self.image, "nodes": [
            {"name": n.name, "docker_host": n.host, "checks": [f.as_dict() for f in n.checks],
             "drift": [d.__dict__ for d in n.drift], "snapshot": n.snapshot} for n in self.nodes]}


def node_script(iface: str, shared: str, marker: str, node: str, port: int | None) -> str:
    """The shell each node's container runs: the doctor snapshot between markers, then the
    interface, the shared-storage marker and (first node) the rendezvous port."""
    q = shlex.quote
    lines = [
        f"echo {BEGIN}; ftkit doctor --json --offline 2>/dev/null; echo; echo {END}",
        f"if [ -e /sys/class/net/{q(iface)} ]; then echo \"@@iface ok $(cat /sys/class/net/{q(iface)}/operstate)\"; "
        "else echo \"@@iface missing $(ls /sys/class/net | tr '\\n' ' ')\"; fi",
        f"mkdir -p {q(marker)} && hostname > {q(marker + '/' + node)} && echo '@@shared written' "
        "|| echo '@@shared unwritable'",
    ]
    if port is not None:
        lines.append("python -c 'import socket,sys; s=socket.socket(); "
                     "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                     f"s.bind((\"\", {port})); print(\"@@port free\")' 2>/dev/null || echo '@@port taken'")
    return "; ".join(lines)


def engine_facts(host: str | None) -> dict[str, Any]:
    """What the node's Docker engine says: its version and the ftkit images it holds."""
    from ftkit.gateways import docker as dk
    from ftkit.images.builder import LABEL_PREFIX

    facts: dict[str, Any] = {"docker": {"server": dk.server_version(host)}, "images": {}}
    for attrs in dk.images_with_label(f"{LABEL_PREFIX}.image", host):
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        key = f"{labels.get(f'{LABEL_PREFIX}.image')}/{labels.get(f'{LABEL_PREFIX}.variant')}"
        tags = attrs.get("RepoTags") or []
        facts["images"].setdefault(key, []).append({
            "tag": tags[0] if tags else "<untagged>", "lock_sha256": labels.get(f"{LABEL_PREFIX}.lock-sha256"),
            "content_hash": labels.get(f"{LABEL_PREFIX}.content-hash")})
    return facts


def parse_output(text: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """(the doctor snapshot, {iface|shared|port: what the script said})."""
    snap = None
    if BEGIN in text and END in text:
        body = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
        try:
            snap = json.loads(body) if body else None
        except ValueError:
            snap = None
    said = {}
    for line in text.splitlines():
        if line.startswith("@@") and not line.startswith(("@@ftkit-doctor",)):
            key, _, rest = line[2:].partition(" ")
            said[key] = rest.strip()
    return snap, said


def check_cluster(machine: Machine, image: str, *, say: Any = lambda m: None) -> ClusterReport:
    from ftkit.gateways import docker as dk

    cluster = machine.cluster
    if cluster is None:
        raise UserError(f"machine profile {machine.name!r} has no cluster section: nothing to compare")
    token = secrets.token_hex(4)
    marker = str(Path(cluster.shared) / f".ftkit-doctor-{token}")
    reports: list[NodeReport] = []
    try:
        for rank, node in enumerate(cluster.nodes):
            host = node.docker_host or machine.docker.host
            rep = NodeReport(node.name, host)
            reports.append(rep)
            if node.manual:
                rep.checks.append(dr.Finding("node", "warn", "started by hand: ftkit cannot reach its engine",
                                             f"on that host: ftkit doctor --json > {node.name}.json, then "
                                             "ftkit doctor --compare with this host's"))
                continue
            iface = node.interface or cluster.interface or "eth0"
            script = node_script(iface, cluster.shared, marker, node.name,
                                 cluster.rendezvous.port if rank == 0 else None)
            say(f"doctor on node {node.name} ({host or 'this machine'}) in {image}")
            try:
                text = _run(dk, image, script, node, cluster, host)
                snap, said = parse_output(text)
                if snap is not None:
                    snap.update(engine_facts(host))
            except FtkitError as e:
                rep.checks.append(dr.Finding("node", "error", f"cannot run the doctor there: {e.message}"))
                continue
            rep.snapshot = snap
            if snap is None:
                rep.checks.append(dr.Finding("node", "error", "the doctor printed no snapshot",
                                             f"run `docker run --rm {image} ftkit doctor --json` on {node.name}"))
            _node_checks(rep, said, iface, rank, cluster.rendezvous.port)
        for rep in reports:  # the shared storage: every node's marker is visible here
            written = Path(marker) / rep.name
            if rep.snapshot is not None and not written.is_file():
                rep.checks.append(dr.Finding("shared", "error", f"{rep.name} wrote into {cluster.shared}, but this "
                                             "machine does not see it: not the same storage",
                                             "mount the same share at the same path on every node"))
            elif written.is_file():
                rep.checks.append(dr.Finding("shared", "ok", f"{cluster.shared} is the same storage as here"))
    finally:
        shutil.rmtree(marker, ignore_errors=True)
    first = next((r for r in reports if r.snapshot is not None), None)
    for rep in reports:
        if first is not None and rep is not first and rep.snapshot is not None:
            rep.drift = dr.compare(first.snapshot or {}, rep.snapshot)
    return ClusterReport(machine.name, image, reports)


def _node_checks(rep: NodeReport, said: dict[str, str], iface: str, rank: int, port: int) -> None:
    state = said.get("iface", "")
    if state.startswith("ok"):
        rep.checks.append(dr.Finding("interface", "ok", f"{iface} is there ({state[3:] or 'state unknown'})"))
    else:
        rep.checks.append(dr.Finding("interface", "error", f"no interface {iface} (has: {state[8:] or '?'})",
                                     "set the node's interface (ip -br link on that host) in the cluster profile"))
    if said.get("shared") != "written":
        rep.checks.append(dr.Finding("shared", "error", "cannot write into the shared storage from this node"))
    if rank == 0:
        if said.get("port") == "free":
            rep.checks.append(dr.Finding("rendezvous", "ok", f"port {port} is free for the c10d store"))
        else:
            rep.checks.append(dr.Finding("rendezvous", "error", f"port {port} is taken on the first node",
                                         "stop what holds it, or set cluster.rendezvous.port"))


def _run(dk: Any, image: str, script: str, node: Any, cluster: Any, host: str | None) -> str:
    req = dk.ContainerRequest(
        image=image, command=["sh", "-c", script], name=f"ftkit-doctor-{node.name}-{secrets.token_hex(3)}",
        environment={"GLOO_SOCKET_IFNAME": node.interface or cluster.interface or "",
                     "NCCL_SOCKET_IFNAME": node.interface or cluster.interface or "", "HOME": "/tmp", **node.env},
        binds=[(cluster.shared, cluster.shared, False)], gpu_device_ids=[str(g) for g in node.gpus] or None,
        labels={"dev.ftkit.doctor": node.name}, user=f"{os.getuid()}:{os.getgid()}", network=cluster.network,
        hostname=node.name if cluster.network != "host" else None,
    )
    cid = dk.create_container(req, host)
    try:
        dk.start_container(cid, host)
        dk.wait_container(cid, host, timeout=300)
        lines: list[str] = []
        dk.follow_logs(cid, lines.append, host)
        return "\n".join(lines)
    finally:
        dk.remove_container(cid, host)
