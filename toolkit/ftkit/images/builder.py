"""`ftkit build`: plan a build as data (Dockerfile, context, tag, labels, command), then
run it through the Docker gateway.

The tag is a content address, ftkit/<image>:<variant>-<12 hex>, over the rendered
Dockerfile, the lock, the build arguments and the ftkit sources. If that tag exists the
build is a no-op. Recipes are not an input: changing a recipe never changes an image.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit import __version__
from ftkit.errors import BuildError, ImageError, UserError
from ftkit.gateways import docker as dk
from ftkit.gateways import subprocess as sp
from ftkit.images import dockerfiles, project, reqlock
from ftkit.images.variants import Variant, load
from ftkit.recipe.imagerefs import reference_problem

LABEL_PREFIX = "dev.ftkit"
SOURCE_URL = "https://github.com/ftkit/ftkit"


@dataclass
class BuildSpec:
    """Everything about one image build, decided before anything runs."""

    image: str
    variant: str
    tag: str
    content_hash: str
    dockerfile: str
    lock_path: Path
    lock_sha256: str
    source_sha256: str
    base_ref: str
    labels: dict[str, str]
    buildkit: bool
    wheelhouse: Path | None = None
    wheelhouse_files: list[Path] = field(default_factory=list)
    ca_bundle: Path | None = None
    context_files: list[str] = field(default_factory=list)
    index_url: str = dockerfiles.PYPI
    extra_index_urls: list[str] = field(default_factory=list)  # the variant's (a wheelhouse stands in for them)

    @property
    def key(self) -> str:
        return f"{self.image}/{self.variant}"


def content_hash(dockerfile: str, lock_sha256: str, source_sha256: str, build_args: dict[str, str]) -> str:
    h = hashlib.sha256()
    for part in (dockerfile, lock_sha256, source_sha256, json.dumps(build_args, sort_keys=True)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def wheelhouse_files(d: Path) -> list[Path]:
    if not d.is_dir():
        raise UserError(f"--wheelhouse {d}: not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix in (".whl",) or p.name.endswith((".tar.gz", ".zip")))
    if not files:
        raise UserError(f"--wheelhouse {d}: holds no wheels")
    return files


def plan_build(root: Path, image: str, variant: str, *, base_image: str | None = None, buildkit: bool = True,
               wheelhouse: Path | None = None, ca_bundle: Path | None = None, index_url: str = dockerfiles.PYPI) -> BuildSpec:
    if base_image is not None:  # it lands in the Dockerfile's FROM line: a reference, nothing else
        problem = reference_problem(base_image)
        if problem:
            raise UserError(f"--base-image: {problem}")
    variants = load(root)
    v: Variant = variants.get(image, variant)
    lock = reqlock.verify(root, image, v)
    if ca_bundle is not None and not ca_bundle.is_file():
        raise UserError(f"--ca-bundle {ca_bundle}: no such file")
    opts = dockerfiles.RenderOptions(base_image=base_image, buildkit=buildkit, wheelhouse=wheelhouse is not None,
                                ca_bundle=ca_bundle is not None, index_url=index_url)
    template = variants.images[image].template
    ctx = dockerfiles.context(image, template, v, lock.body_sha256, opts)
    dockerfile = dockerfiles.render(root / "images" / "templates", template, ctx)
    # The tag names the image's content, not how it was fetched or built: hash the Dockerfile
    # as rendered for BuildKit from the index, whichever builder, wheelhouse or CA bundle
    # this machine uses (they install the same hash-locked files).
    canonical_opts = dockerfiles.RenderOptions(base_image=base_image)
    canonical = dockerfiles.render(root / "images" / "templates", template,
                              dockerfiles.context(image, template, v, lock.body_sha256, canonical_opts))
    source = project.source_hash(root)
    chash = content_hash(canonical, lock.body_sha256, source, {"base": ctx["base_ref"]})
    tag = f"ftkit/{image}:{variant}-{chash[:12]}"
    labels = {
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.title": f"ftkit {image} ({variant})",
        "org.opencontainers.image.base.name": ctx["base_ref"],
        f"{LABEL_PREFIX}.image": image,
        f"{LABEL_PREFIX}.variant": variant,
        f"{LABEL_PREFIX}.torch": v.torch,
        f"{LABEL_PREFIX}.cuda": v.cuda or "none",
        f"{LABEL_PREFIX}.python": v.python,
        f"{LABEL_PREFIX}.lock-sha256": lock.body_sha256,
        f"{LABEL_PREFIX}.content-hash": chash,
        f"{LABEL_PREFIX}.source-sha256": source,
    }
    wh = wheelhouse_files(wheelhouse) if wheelhouse is not None else []
    files = ["Dockerfile", "requirements.lock", f"dist/{dockerfiles.wheel_name()}"]
    files += [f"wheelhouse/{p.name}" for p in wh]
    if ca_bundle is not None and not buildkit:
        files.append("ca-bundle.crt")
    return BuildSpec(image, variant, tag, chash, dockerfile, lock.path, lock.body_sha256, source, ctx["base_ref"],
                     labels, buildkit, wheelhouse, wh, ca_bundle, files, index_url, list(v.extra_index_urls))


def buildkit_argv(spec: BuildSpec, cli: dk.BuildKitCli, context_dir: str, *, no_cache: bool = False) -> list[str]:
    argv = cli.build_argv() + ["--progress=plain", "-t", spec.tag, "-f", f"{context_dir}/Dockerfile"]
    if no_cache:
        argv.append("--no-cache")
    for k, v in sorted(spec.labels.items()):
        argv += ["--label", f"{k}={v}"]
    if spec.ca_bundle is not None:
        argv += ["--secret", f"id=ca_bundle,src={spec.ca_bundle}"]
    return argv + [context_dir]


def build_wheel(root: Path, out_dir: Path) -> Path:
    """ftkit's wheel from the checkout (the in-image entry points come from it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out_dir), str(root)]
    try:
        sp.run(base + ["--no-build-isolation"], capture=True)
    except Exception:  # noqa: BLE001 - no setuptools here: let pip fetch the backend
        sp.run(base, capture=True)
    wheel = out_dir / dockerfiles.wheel_name()
    if not wheel.is_file():
        raise ImageError(f"building ftkit's wheel did not produce {wheel.name} in {out_dir}")
    return wheel


def assemble_context(root: Path, spec: BuildSpec, ctx_dir: Path) -> None:
    (ctx_dir / "Dockerfile").write_text(spec.dockerfile, encoding="utf-8")
    shutil.copy2(spec.lock_path, ctx_dir / "requirements.lock")
    build_wheel(root, ctx_dir / "dist")
    if spec.wheelhouse_files:
        (ctx_dir / "wheelhouse").mkdir()
        for f in spec.wheelhouse_files:
            target = ctx_dir / "wheelhouse" / f.name
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    if spec.ca_bundle is not None and not spec.buildkit:
        shutil.copy2(spec.ca_bundle, ctx_dir / "ca-bundle.crt")


class Progress:
    """Live build progress: the current step and latest line on a terminal, step headers
    otherwise; everything goes to the log file too. Keeps each step's title, last lines and
    BuildKit's error for it, so a failure can be explained without re-reading the log."""

    STEP = re.compile(r"^#(?P<v>\d+) \[(?P<stage>[^\]]+)\] (?P<what>.*)$|^Step (?P<n>\d+/\d+) : (?P<cmd>.*)$")
    OUTPUT = re.compile(r"^#(?P<v>\d+) \d+\.\d+ (?P<text>.*)$")
    ERROR = re.compile(r"^#(?P<v>\d+) ERROR: (?P<text>.*)$")

    def __init__(self, title: str, log_path: Path, *, live: bool | None = None) -> None:
        self.title = title
        self.log_path = log_path
        self.live = sys.stderr.isatty() if live is None else live
        self.step = ""
        self.tail: deque[str] = deque(maxlen=60)
        self.titles: dict[str, str] = {}
        self.outputs: dict[str, deque[str]] = {}
        self.errors: dict[str, str] = {}  # BuildKit's `#N ERROR: ...` line of each failed step
        self.failed: str | None = None
        self.error_text: str | None = None  # the classic builder's error message
        # what pip said in each step that ftkit knows the fix for, kept from every line (the
        # SSL retries can be far above the last lines a failure shows)
        self.pip: dict[str, PipTrouble] = {}
        self._classic_step = ""
        self._status: Any = None

    def __enter__(self) -> Progress:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115
        if self.live:
            from rich.console import Console

            self._status = Console(stderr=True).status(self.title)
            self._status.__enter__()
        else:
            print(f"{self.title} (log: {self.log_path})", file=sys.stderr, flush=True)
        return self

    def line(self, text: str) -> None:
        self._log.write(text + "\n")
        self._log.flush()
        self.tail.append(text)
        m = self.STEP.match(text)
        if m:
            if m.group("stage"):
                self.step = f"[{m.group('stage')}] {m.group('what')}"
                self.titles.setdefault(m.group("v"), self.step)
            else:
                self.step = f"Step {m.group('n')}: {m.group('cmd')}"
                self.titles.setdefault(m.group("n"), self.step)
                self._classic_step = m.group("n")
            if not self.live:
                print(f"  {self.step[:160]}", file=sys.stderr, flush=True)
        elif (o := self.OUTPUT.match(text)) is not None:
            self.outputs.setdefault(o.group("v"), deque(maxlen=15)).append(o.group("text"))
            self.pip.setdefault(o.group("v"), PipTrouble()).scan(o.group("text"))
        elif (e := self.ERROR.match(text)) is not None:
            self.failed = e.group("v")
            self.errors.setdefault(e.group("v"), e.group("text"))
        elif not text.startswith("#"):  # the classic builder's output, under its current step
            self.pip.setdefault(self._classic_step, PipTrouble()).scan(text)
        if self._status is not None:
            last = text.split(" ", 2)[-1][:80] if text.startswith("#") else text[:80]
            self._status.update(f"{self.title}  {self.step[:70]}  | {last}")

    def error(self, text: str) -> None:
        """The classic builder's error message (its stream has no `#N ERROR:` lines)."""
        self.line(text)
        self.error_text = text.strip()

    def explain(self) -> BuildFailure:
        """What failed, and why, from what the builder printed."""
        if self.failed is not None:
            return BuildFailure(self.titles.get(self.failed, f"step #{self.failed}"), self.errors.get(self.failed),
                                list(self.outputs.get(self.failed, [])), self.pip.get(self.failed, PipTrouble()))
        return explain_lines(list(self.tail), self.error_text, self.pip.get(self._classic_step))

    def failure(self) -> str:
        """The failing step, the builder's reason and the step's last output lines."""
        return self.explain().render()

    def __exit__(self, *exc: Any) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)
        self._log.close()


# A base image the engine cannot get: BuildKit fails resolving it (`[internal] load metadata
# for REF`) or its FROM step; the classic builder fails at its FROM step.
_BASE_STEP = re.compile(r"^(?:\[internal\] load metadata for (?P<meta>\S+)|\[[^\]]*\] FROM (?P<from>\S+)"
                        r"|Step 1/\d+: FROM (?P<classic>\S+))")
_TRAILER = re.compile(r"^(?:ERROR: |error: )?(?:failed to solve|failed to build|executor failed)", re.IGNORECASE)
REASON_MAX = 400

# pip's words for what a TLS-intercepting proxy (or a missing CA certificate) does to it:
# `SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify
# failed: self-signed certificate in certificate chain (_ssl.c:992)'))`
_TLS = re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|problem confirming the ssl certificate",
                  re.IGNORECASE)
# `ERROR: No matching distribution found for torch==2.13.0+cpu`
_NOT_FOUND = re.compile(r"No matching distribution found for (?P<req>[^\s;,]+)")
# an index that did not answer at all: `NewConnectionError(... Failed to establish a new connection: [Errno -2]
# Name or service not known')': /whl/cpu/torch/`
_UNREACHABLE = re.compile(r"Failed to establish a new connection|Name or service not known|"
                          r"Temporary failure in name resolution|Network is unreachable|Connection refused")


@dataclass
class PipTrouble:
    """What pip printed in one build step that ftkit knows the fix for: a certificate it could
    not verify, an index it could not reach at all, the requirements no index it reached had."""

    tls: bool = False
    unreachable: bool = False
    not_found: list[str] = field(default_factory=list)

    def scan(self, text: str) -> None:
        if _TLS.search(text):
            self.tls = True
        if _UNREACHABLE.search(text):
            self.unreachable = True
        m = _NOT_FOUND.search(text)
        if m is not None and m["req"][:200] not in self.not_found:
            self.not_found.append(m["req"][:200])


@dataclass
class BuildFailure:
    """One failed build, explained: the step, BuildKit's (or the classic builder's) reason,
    the step's last output lines, and the base image when it is the base that failed."""

    step: str | None
    reason: str | None
    output: list[str] = field(default_factory=list)
    pip: PipTrouble = field(default_factory=PipTrouble)

    @property
    def base_ref(self) -> str | None:
        """The image reference of a failed FROM (or its metadata lookup): the base cannot be had."""
        m = _BASE_STEP.match(self.step or "")
        if m is None:
            return None
        ref = m.group("meta") or m.group("from") or m.group("classic")
        return ref.split(" AS ")[0] if ref else None

    def render(self) -> str:
        out = [f"failing step: {self.step}"] if self.step else []
        if self.reason:
            reason = " ".join(self.reason.split())
            out.append("reason: " + (reason if len(reason) <= REASON_MAX else reason[:REASON_MAX] + "..."))
        out += [f"  {ln}" for ln in self.output]
        return "\n".join(out)


def explain_lines(lines: list[str], error_text: str | None = None, pip: PipTrouble | None = None) -> BuildFailure:
    """The failure in classic-builder output (or an unknown format): its last step, the
    builder's error message (or BuildKit's closing `failed to solve` line), the last lines,
    and what pip said in them (`pip`: what it said in the whole step, when that was kept)."""
    if pip is None:
        pip = PipTrouble()
        for ln in lines[max((i for i, ln in enumerate(lines) if ln.startswith("Step ")), default=0):]:
            pip.scan(ln)
    steps = [ln for ln in lines if ln.startswith("Step ")]
    step = None
    if steps:
        m = re.match(r"^Step (\d+/\d+) : (.*)$", steps[-1])
        step = f"Step {m.group(1)}: {m.group(2)}" if m else steps[-1]
    reason = error_text or next((ln.strip() for ln in reversed(lines) if _TRAILER.match(ln.strip())), None)
    shown = [ln for ln in lines[-15:] if ln.strip() != (reason or "")]
    return BuildFailure(step, reason, shown, pip)


# The one way to give a build what this machine needs that also reaches the plans: the profile.
_PROFILE_BUILD = ("then `ftkit build --machine PROFILE` and generate the stack with the same profile (`ftkit compose "
                  "RECIPE --machine PROFILE -o DIR`, again for a stack made before: its tags follow the profile's "
                  "build settings; `ftkit up --machine PROFILE` builds a missing image the same way)")


def failure_hint(failure: BuildFailure, spec: BuildSpec) -> str | None:
    """What to do about a failure ftkit recognises: a base image that cannot be pulled here,
    a certificate pip cannot verify (a TLS-intercepting proxy), a requirement no index pip
    reached has. Each fix goes in the machine profile, which `ftkit build --machine`, `ftkit
    up` and `ftkit compose` all read: the base image is part of an image's tag, so a base given
    only on the command line builds a tag that no plan names."""
    ref = failure.base_ref
    if ref is not None:
        return base_image_hint(ref, spec)
    if failure.pip.tls:
        return ca_bundle_hint(failure.pip, spec)
    if failure.pip.not_found:
        return wheelhouse_hint(failure.pip.not_found, spec)
    return None


def base_image_hint(ref: str, spec: BuildSpec) -> str:
    python = spec.labels.get(f"{LABEL_PREFIX}.python", "")
    return (f"the base image {ref} cannot be pulled here (no registry in reach, or no such image): build FROM an "
            f"image this engine already has (one with Python {python}; `docker images` lists them). The base image "
            "is part of the image's tag, so name it in the machine profile, where the plans see it too: "
            "`docker.base_image: IMAGE` (and, where PyPI or the torch index is out of reach, `ca_bundle: FILE` and "
            f"`docker.wheelhouse: DIR`), {_PROFILE_BUILD}. `--base-image IMAGE` alone builds a tag that a plan or "
            "stack made without that base does not name")


def ca_bundle_hint(pip: PipTrouble, spec: BuildSpec) -> str:
    if spec.ca_bundle is not None:
        text = (f"pip could not verify the package index's TLS certificate even with the CA bundle {spec.ca_bundle}: "
                "it must hold the certificate of the CA that signs the proxy's certificates (PEM)")
    else:
        text = ("pip could not verify the package index's TLS certificate (`certificate verify failed`: a "
                "TLS-intercepting proxy, or a CA the base image does not know): give the build that CA's bundle - "
                f"`ca_bundle: FILE` in the machine profile, {_PROFILE_BUILD}; or `ftkit build --ca-bundle FILE`. "
                "It is used during the build only and does not change the image's tag")
    if pip.unreachable and spec.wheelhouse is None and spec.extra_index_urls:
        text += (f". Some index did not answer at all either: if that is {', '.join(spec.extra_index_urls)}, a "
                 "wheelhouse stands in for it (`docker.wheelhouse: DIR` in the profile, or `--wheelhouse DIR`)")
    return text


def wheelhouse_hint(reqs: list[str], spec: BuildSpec) -> str:
    named = ", ".join(reqs)
    if spec.wheelhouse is not None:
        return (f"pip found no distribution for {named}, neither in the wheelhouse {spec.wheelhouse} nor on the "
                "index: put its wheel there (the lock's hash must match the file)")
    indexes = ", ".join([spec.index_url, *spec.extra_index_urls])
    return (f"pip found no distribution for {named} on the indexes it reached ({indexes}; one out of reach, or "
            "without that file): put the wheel(s) in a directory and give it as a wheelhouse, which stands in for "
            f"the unreachable index - `docker.wheelhouse: DIR` in the machine profile, {_PROFILE_BUILD}; or "
            "`ftkit build --wheelhouse DIR`. The lock's hashes still decide what installs, and the tag does not change")


@dataclass
class BuildResult:
    spec: BuildSpec
    built: bool  # False: the tag existed (no-op)
    image_id: str
    seconds: float
    log_path: Path | None
    size_bytes: int = 0


def run_build(root: Path, spec: BuildSpec, *, force: bool = False, no_cache: bool = False, host: str | None = None,
              log_dir: Path | None = None, live: bool | None = None,
              clock: Callable[[], float] | None = None) -> BuildResult:
    import time

    now = clock or time.perf_counter
    t0 = now()
    attrs = dk.image_attrs(spec.tag, host)
    if attrs is not None and not force:
        return BuildResult(spec, False, attrs["Id"], now() - t0, None, int(attrs.get("Size", 0)))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_path = (log_dir or root / ".ftkit" / "build-logs") / f"{spec.image}-{spec.variant}-{stamp}.log"
    cli = dk.find_buildkit_cli() if spec.buildkit else None
    if spec.buildkit and cli is None:
        raise ImageError("internal: a BuildKit plan without a BuildKit-capable docker CLI")
    with tempfile.TemporaryDirectory(prefix="ftkit-build-") as tmp:
        ctx_dir = Path(tmp)
        assemble_context(root, spec, ctx_dir)
        with Progress(f"building {spec.tag}", log_path, live=live) as progress:
            if cli is not None:
                env = dict(cli.env())
                if host:
                    env["DOCKER_HOST"] = dk.checked_host(host) or host
                argv = buildkit_argv(spec, cli, str(ctx_dir), no_cache=no_cache)
                progress.line("$ " + sp.quote(argv))
                result = sp.run(argv, env=env, on_line=progress.line, check=False, die_with_parent=True)
                if result.returncode != 0:
                    raise _failed(spec, log_path, progress)
            else:
                _classic_build(spec, ctx_dir, progress, host, log_path, no_cache=no_cache)
    attrs = dk.image_attrs(spec.tag, host)
    if attrs is None:
        raise BuildError(f"the build reported success but {spec.tag} is not in the engine")
    return BuildResult(spec, True, attrs["Id"], now() - t0, log_path, int(attrs.get("Size", 0)))


def _failed(spec: BuildSpec, log_path: Path, progress: Progress) -> BuildError:
    failure = progress.explain()
    return BuildError(f"building {spec.tag} failed (log: {log_path})\n{failure.render()}",
                      hint=failure_hint(failure, spec))


def _classic_build(spec: BuildSpec, ctx_dir: Path, progress: Progress, host: str | None, log_path: Path, *,
                   no_cache: bool = False) -> None:
    """The docker SDK's classic builder, for engines without a BuildKit-capable CLI. The
    template was rendered without BuildKit-only syntax. The classic builder keeps the build
    stage (which held the CA bundle and wheelhouse) as an untagged image: remove it."""
    try:
        with dk.translated(f"build {spec.tag}"):
            api = dk.client(host).api
            for chunk in api.build(path=str(ctx_dir), tag=spec.tag, labels=spec.labels, rm=True, forcerm=True,
                                   nocache=no_cache, decode=True, pull=False):
                if "stream" in chunk:
                    for ln in chunk["stream"].splitlines():
                        if ln.strip():
                            progress.line(ln)
                if "error" in chunk:
                    progress.error(str(chunk["error"]))
                    raise _failed(spec, log_path, progress)
    finally:
        dk.prune_dangling(dockerfiles.BUILD_STAGE_LABEL, host)


def packages_digest(tag: str, host: str | None = None) -> tuple[str, int]:
    """sha256 of `pip freeze --all` inside the image: what was actually installed."""
    code, out = dk.run_container(tag, ["python", "-m", "pip", "freeze", "--all"], host=host, timeout_s=120)
    if code != 0:
        raise BuildError(f"{tag}: pip freeze failed inside the image:\n{out[-2000:]}")
    lines = sorted(ln.strip() for ln in out.splitlines() if ln.strip() and not ln.startswith("ftkit"))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), len(lines)


def base_identity(ref: str, host: str | None = None) -> dict[str, Any]:
    attrs = dk.image_attrs(ref, host) or {}
    digests = attrs.get("RepoDigests") or []
    return {"ref": ref, "id": attrs.get("Id"), "digest": digests[0].split("@", 1)[1] if digests else None}
