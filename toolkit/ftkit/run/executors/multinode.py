"""A multi-node step: one container per node, each through its node's Docker engine.

The plan says everything (plan.cluster, StepSpec.nodes): the same image, mounts and configs
on every node; each node's rank, command and network interface. This executor only starts,
watches and stops:

- the image must be on every node's engine with the same content hash and lock hash (a
  missing one is built there the way the docker executor builds it);
- containers are created on every node first, then started rank 0 first (its launcher
  hosts the c10d store the others join);
- every node's output streams into the step's one log, each line prefixed `[node]`;
- when a node fails or is killed, the others get a short grace to fail on their own (Gloo
  and NCCL notice the lost peer), then are stopped (SIGTERM, then SIGKILL after the grace),
  and the step fails naming the node that failed first;
- Ctrl-C or SIGTERM stops every node before the signal goes on; no container outlives the
  step (they carry dev.ftkit.run/step/node labels for `ftkit down` all the same);
- nodes ftkit cannot reach (`manual: true`) get their `docker run` command printed and
  written to nodes/<node>.sh in the run directory; ftkit watches the nodes it started.
"""

from __future__ import annotations

import os
import queue
import shlex
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ftkit.errors import CommandFailed, DockerError, DockerUnavailable, FtkitError, PlanError
from ftkit.files import open_append
from ftkit.gateways import docker as dk
from ftkit.plan.container import ContainerSpec, node_container_spec
from ftkit.plan.spec import NodeSpec, Plan, StepSpec
from ftkit.run.executors.base import Outcome, StepIO
from ftkit.run.executors.docker import DockerExecutor, request
from ftkit.run.rundir import RunDir

FAIL_GRACE_S = 10.0  # after a node fails: time for the others to notice the lost peer and exit by themselves
STOP_GRACE_S = 10  # then docker stop: SIGTERM, SIGKILL after this
_SIGNALS = {137: "killed (SIGKILL)", 143: "terminated (SIGTERM)", 130: "interrupted (SIGINT)", 139: "segfault"}


class NodeFailed(CommandFailed):
    """A node of a multi-node step failed; the message names it (and what became of the others)."""

    def __init__(self, node: NodeSpec, argv: list[str], code: int, tail: str, others: list[str]) -> None:
        super().__init__(argv, code, tail)
        self.node = node.name
        why = _SIGNALS.get(code, f"exit code {code}")
        msg = f"node {node.name} (rank {node.rank}) failed first: {why}"
        if others:
            msg += "; " + "; ".join(others)
        if tail:
            msg += f"\n--- last lines of {node.name} ---\n" + tail.rstrip()
        FtkitError.__init__(self, msg)


@dataclass
class _Running:
    node: NodeSpec
    host: str | None
    cs: ContainerSpec
    cid: str | None = None
    code: int | None = None
    stopped: bool = False
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    thread: threading.Thread | None = None


@contextmanager
def _on(r: _Running) -> Iterator[None]:
    """A Docker error names the node (a bind source missing on that host, its engine down)."""
    try:
        yield
    except (DockerError, DockerUnavailable) as e:
        raise type(e)(f"node {r.node.name} ({r.host or 'this machine'}): {e.message}", hint=e.hint) from e


def docker_run_command(cs: ContainerSpec) -> str:
    """The `docker run` line for a node ftkit cannot reach (the same container it would create)."""
    argv = ["docker", "run", "--rm", "--init", "--name", cs.name, "--workdir", cs.workdir,
            "--user", f"{os.getuid()}:{os.getgid()}"]
    if cs.network:
        argv += ["--network", cs.network]
    if cs.hostname:
        argv += ["--hostname", cs.hostname]
    for alias in cs.aliases:
        argv += ["--network-alias", alias]
    if cs.shm_size:
        argv += ["--shm-size", cs.shm_size]
    if cs.device_ids:
        argv += ["--gpus", f'"device={",".join(cs.device_ids)}"']
    for key, value in sorted(cs.labels.items()):
        argv += ["--label", f"{key}={value}"]
    for key, value in sorted(cs.env.items()):
        argv += ["--env", f"{key}={value}"]
    for key in cs.env_from_host:  # docker takes the value from the environment it runs in: never printed
        argv += ["--env", key]
    for m in cs.mounts:
        argv += ["--mount", f"type=bind,source={m.host},target={m.container}" + (",readonly" if m.read_only else "")]
    return shlex.join(argv + [cs.image, *cs.command])


class MultiNodeExecutor:
    name = "multinode"

    def __init__(self, plan: Plan, run: RunDir) -> None:
        self.plan = plan
        self.run_dir = run
        self._lock = threading.Lock()

    def _host(self, node: NodeSpec) -> str | None:
        return node.docker_host or self.plan.docker_host

    # -- before anything starts --------------------------------------------------------

    def _images(self, step: StepSpec, nodes: list[NodeSpec], io: StepIO) -> None:
        """The step's image on every engine, built where missing, and the same build everywhere:
        the same content hash (the tag's) and lock hash (the dependency set)."""
        seen: dict[str | None, tuple[str | None, str | None]] = {}
        for node in nodes:
            host = self._host(node)
            if host in seen:
                continue
            docker = DockerExecutor(self.plan, self.run_dir)
            docker.host = host
            try:
                docker.ensure_image(step, io)
                attrs = dk.image_attrs(step.image or "", host) or {}
            except FtkitError as e:
                raise PlanError(f"node {node.name} ({host or 'this machine'}): {e.message}") from e
            labels = (attrs.get("Config") or {}).get("Labels") or {}
            seen[host] = (labels.get("dev.ftkit.content-hash"), labels.get("dev.ftkit.lock-sha256"))
        builds = set(seen.values())
        if len(builds) > 1:
            detail = "; ".join(f"{h or 'this machine'}: content {c and c[:12]}, lock {lk and lk[:12]}"
                               for h, (c, lk) in seen.items())
            raise PlanError(f"image {step.image} differs between the nodes' engines ({detail})",
                            hint="build it from the same checkout on every node (`ftkit build`), then run again")

    def _manual(self, running: list[_Running], io: StepIO) -> None:
        for r in running:
            line = docker_run_command(r.cs)
            rel = f"nodes/{r.node.name}.sh"
            self.run_dir.write(rel, f"#!/bin/sh\n# node {r.node.name} (rank {r.node.rank}): run this on that host\n"
                                    f"exec {line}\n")  # never through a link
            script = self.run_dir.file(rel)
            script.chmod(0o755)
            io.on_line(f"ftkit: start node {r.node.name} (rank {r.node.rank}) on its host: sh {script}")

    # -- running -------------------------------------------------------------------------

    def run(self, step: StepSpec, io: StepIO) -> Outcome:
        if not step.nodes:
            raise PlanError(f"step {step.id} has no nodes")
        specs = [(n, node_container_spec(step, self.plan, n)) for n in step.nodes]
        running = [_Running(n, self._host(n), cs) for n, cs in specs if not n.manual]
        manual = [_Running(n, None, cs) for n, cs in specs if n.manual]
        if not running:
            self._manual(manual, io)
            raise PlanError(f"every node of step {step.id} is started by hand; ftkit has nothing to watch",
                            hint="start them with the scripts under nodes/ in the run directory")
        self._images(step, [r.node for r in running], io)
        log = open_append(io.log)  # closed in finally; never through a link
        exits: queue.Queue[_Running] = queue.Queue()
        try:
            for r in running:
                with _on(r):
                    dk.remove_container(r.cs.name, r.host)  # a leftover of an earlier attempt of this run
                    # tethered to ftkit's owner lock where that lock is this machine's own file; a
                    # node on another host is stopped by this executor, or by label (ftkit down)
                    r.cid = dk.create_container(request(r.cs, tether=r.node.docker_host is None), r.host)
            self._manual(manual, io)
            for r in sorted(running, key=lambda r: r.node.rank):  # rank 0 hosts the rendezvous
                with _on(r):
                    dk.start_container(r.cid or "", r.host)
                r.thread = threading.Thread(target=self._follow, args=(r, log, io, exits), daemon=True,
                                            name=f"node-{r.node.name}")
                r.thread.start()
            io.on_started({"nodes": {r.node.name: (r.cid or "")[:12] for r in running}})
            failed = self._wait(running, exits)
            if failed is not None:
                others = self._stop_others(running, failed, exits)
                raise NodeFailed(failed.node, failed.cs.command, failed.code or 1, "\n".join(failed.tail), others)
            return Outcome("succeeded", {"nodes": {r.node.name: (r.cid or "")[:12] for r in running}})
        except BaseException:
            # Ctrl-C, SIGTERM (Interrupted), a Docker error: no node may outlive the step
            for r in running:
                if r.cid and r.code is None:
                    try:
                        dk.stop_container(r.cid, STOP_GRACE_S, r.host)
                    except FtkitError:
                        pass
            raise
        finally:
            for r in running:
                if r.thread is not None:
                    r.thread.join(5)
                if r.cid:
                    try:
                        dk.remove_container(r.cid, r.host)
                    except FtkitError:
                        pass
            log.close()

    def _follow(self, r: _Running, log: Any, io: StepIO, exits: queue.Queue[_Running]) -> None:
        """Stream one node's output into the step log, then report its exit."""
        prefix = f"[{r.node.name}] "

        def line(text: str) -> None:
            r.tail.append(text)
            with self._lock:
                log.write(prefix + text + "\n")
                log.flush()
                if io.echo:
                    sys.stderr.write(prefix + text + "\n")
            io.on_line(prefix + text)

        try:
            dk.follow_logs(r.cid or "", line, r.host)
        except Exception as e:  # noqa: BLE001 - a broken log stream must not hide the exit code
            line(f"ftkit: log stream ended: {e}")
        try:
            r.code = dk.wait_container(r.cid or "", r.host)
        except (DockerError, FtkitError) as e:
            line(f"ftkit: cannot read the exit code: {e}")
            state = None
            try:
                state = dk.container_state(r.cid or "", r.host)
            except FtkitError:
                pass
            r.code = int(state.get("ExitCode", 1)) if state else 1
        exits.put(r)

    @staticmethod
    def _wait(running: list[_Running], exits: queue.Queue[_Running]) -> _Running | None:
        """Until every node succeeded (None) or one failed (that node)."""
        left = len(running)
        while left:
            try:
                r = exits.get(timeout=0.5)  # a timeout keeps the main thread responsive to signals
            except queue.Empty:
                continue
            left -= 1
            if r.code != 0:
                return r
        return None

    def _stop_others(self, running: list[_Running], failed: _Running, exits: queue.Queue[_Running]) -> list[str]:
        """Give the other nodes FAIL_GRACE_S to exit by themselves, then stop them; say what
        became of each."""
        import time

        deadline = time.monotonic() + FAIL_GRACE_S
        pending = [r for r in running if r is not failed and r.code is None]
        while pending and time.monotonic() < deadline:
            try:
                exits.get(timeout=0.5)
            except queue.Empty:
                pass
            pending = [r for r in pending if r.code is None]
        for r in pending:
            r.stopped = True
            try:
                dk.stop_container(r.cid or "", STOP_GRACE_S, r.host)
            except FtkitError:
                pass
        for r in pending:
            if r.thread is not None:
                r.thread.join(STOP_GRACE_S + 10)
        out = []
        for r in running:
            if r is failed:
                continue
            if r.stopped:
                out.append(f"{r.node.name} stopped by ftkit")
            elif r.code == 0:
                out.append(f"{r.node.name} had finished")
            else:
                out.append(f"{r.node.name} then exited with {_SIGNALS.get(r.code or 1, f'code {r.code}')}")
        return out
