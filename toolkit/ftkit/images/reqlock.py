"""Hash-locked requirement files: made by `ftkit lock`, checked before every build.

A lock is uv's `pip compile --generate-hashes` output for one variant's Python and
platform, under a header ftkit writes:

    # inputs-sha256: what was resolved (requirements, Python, platform, indexes)
    # body-sha256:   the body below the header, as generated

A lock whose body no longer matches its body hash was edited by hand (tampered); one whose
inputs hash no longer matches variants.yaml + pyproject.toml is stale. Either stops the
build with a message saying so - never a silent re-resolve. pip then installs with
--require-hashes --no-deps, so every file is the one that was locked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import LockError
from ftkit.gateways import subprocess as sp
from ftkit.images.project import ftkit_requirements
from ftkit.images.variants import Variant

HEADER_RE = re.compile(r"^# (inputs-sha256|body-sha256|image|variant|python|platform|resolver): (.*)$")


def lock_path(root: Path, image: str, variant: str) -> Path:
    return root / "images" / "locks" / f"{image}-{variant}.txt"


def inputs_of(root: Path, v: Variant) -> dict[str, object]:
    inputs: dict[str, object] = {
        "requirements": sorted(v.requirements + ftkit_requirements(root)),
        "python": v.python,
        "platform": v.platform,
        "extra_index_urls": v.extra_index_urls,
    }
    if v.exclude:  # only where there is one: the other locks' inputs hash stays what it was
        inputs["exclude"] = sorted(v.exclude)
    return inputs


def overrides(v: Variant) -> str:
    """uv overrides that drop the excluded packages from the resolution: a requirement on a
    marker that is never true (uv's documented way to remove a transitive dependency)."""
    return "".join(f"{name} ; sys_platform == 'never'\n" for name in sorted(v.exclude))


def inputs_sha256(root: Path, v: Variant) -> str:
    return hashlib.sha256(json.dumps(inputs_of(root, v), sort_keys=True).encode()).hexdigest()


@dataclass
class Lock:
    path: Path
    body: str
    header: dict[str, str]

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    def requirements(self) -> dict[str, str]:
        """name -> pinned version, as the lock says."""
        out = {}
        for line in self.body.splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s\\;]+)", line)
            if m:
                out[re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
        return out


def read(path: Path) -> Lock:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(f"no lock at {path}") from None
    header: dict[str, str] = {}
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        m = HEADER_RE.match(lines[i].rstrip("\n"))
        if m:
            header[m.group(1)] = m.group(2).strip()
        i += 1
    return Lock(path, "".join(lines[i:]), header)


def verify(root: Path, image: str, v: Variant) -> Lock:
    """The variant's lock, or a LockError that says what is wrong and what to run."""
    path = lock_path(root, image, v.name)
    regen = f"ftkit lock --image {image} --variant {v.name}"
    if not path.is_file():
        hint = ""
        if v.extra_index_urls:
            hint = f" (resolving needs {', '.join(v.extra_index_urls)}, or --find-links with those wheels)"
        raise LockError(f"{image}/{v.name}: no lock file {path.relative_to(root)}; run `{regen}`{hint}")
    lock = read(path)
    if "body-sha256" not in lock.header or "inputs-sha256" not in lock.header:
        raise LockError(f"{path.relative_to(root)}: not an ftkit lock (no ftkit header); run `{regen}`")
    if lock.header["body-sha256"] != lock.body_sha256:
        raise LockError(
            f"{path.relative_to(root)}: the lock was changed after it was generated (body hash mismatch); "
            f"do not edit locks by hand, run `{regen}`"
        )
    want = inputs_sha256(root, v)
    if lock.header["inputs-sha256"] != want:
        raise LockError(
            f"{path.relative_to(root)}: stale: images/variants.yaml or ftkit's dependencies changed since "
            f"this lock was made; run `{regen}`"
        )
    bad = [ln for ln in lock.body.splitlines() if re.match(r"^[A-Za-z0-9_.\-\[\]]+\s*(>=|<=|~=|>|<|!=)", ln)]
    if bad:
        raise LockError(f"{path.relative_to(root)}: unpinned requirement {bad[0]!r}; run `{regen}`")
    return lock


def uv_binary() -> str:
    sibling = Path(sys.executable).parent / "uv"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("uv")
    if found:
        return found
    raise LockError("`ftkit lock` needs uv (pip install uv, or pip install ftkit[dev])")


def compile_argv(root: Path, v: Variant, infile: Path, outfile: Path, *, find_links: list[str],
                 index_url: str, uv: str, overrides_file: Path | None = None) -> list[str]:
    argv = [uv, "pip", "compile", str(infile), "--generate-hashes", "--no-header", "--quiet",
            "--python-version", v.python, "--python-platform", v.platform,
            "--index-url", index_url, "--index-strategy", "unsafe-best-match", "-o", str(outfile)]
    if overrides_file is not None:
        argv += ["--overrides", str(overrides_file)]
    if find_links:
        # Local wheels stand in for the variant's extra indexes (as --wheelhouse does for
        # builds): the index may be out of reach, and the lock records the files' hashes.
        for d in find_links:
            argv += ["--find-links", d]
    else:
        for url in v.extra_index_urls:
            argv += ["--extra-index-url", url]
    return argv


def generate(root: Path, image: str, v: Variant, *, find_links: list[str] | None = None,
             index_url: str = "https://pypi.org/simple", dry_run: bool = False) -> tuple[Path, list[str]]:
    """Resolve the variant with uv and write its lock (header + body). Returns (path, argv)."""
    uv = uv_binary()
    path = lock_path(root, image, v.name)
    with tempfile.TemporaryDirectory(prefix="ftkit-lock-") as tmp:
        infile, outfile = Path(tmp) / "requirements.in", Path(tmp) / "requirements.txt"
        infile.write_text("\n".join(inputs_of(root, v)["requirements"]) + "\n")  # type: ignore[arg-type]
        ov = None
        if v.exclude:
            ov = Path(tmp) / "overrides.txt"
            ov.write_text(overrides(v))
        argv = compile_argv(root, v, infile, outfile, find_links=find_links or [], index_url=index_url, uv=uv,
                            overrides_file=ov)
        if dry_run:
            return path, argv
        sp.run(argv, echo=True)
        body = outfile.read_text(encoding="utf-8")
    version = sp.output([uv, "--version"]).strip()
    header = (
        f"# ftkit lock: generated by `ftkit lock --image {image} --variant {v.name}`; do not edit.\n"
        f"# image: {image}\n# variant: {v.name}\n# python: {v.python}\n# platform: {v.platform}\n"
        f"# resolver: {version}\n"
        f"# inputs-sha256: {inputs_sha256(root, v)}\n"
        f"# body-sha256: {hashlib.sha256(body.encode()).hexdigest()}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body, encoding="utf-8")
    return path, argv
