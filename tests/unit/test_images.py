"""Rendering (golden files for every variant), locks, content tags, driver checks.
Nothing here needs Docker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ftkit.errors import ImageError, LockError
from ftkit.gateways import docker as dk
from ftkit.gpu.nvml import GpuInfo
from ftkit.images import builder, compat, dockerfiles, reqlock
from ftkit.images.variants import load
from tests.conftest import GOLDEN, ROOT, run_cli

VARIANTS = load(ROOT).all()
MODES = {
    "buildkit": dict(buildkit=True),
    "classic": dict(buildkit=False),
    "buildkit-wheelhouse-ca": dict(buildkit=True, wheelhouse=True, ca_bundle=True),
    "classic-wheelhouse-ca": dict(buildkit=False, wheelhouse=True, ca_bundle=True),
}


def rendered(image: str, variant: str, **opts) -> str:  # type: ignore[no-untyped-def]
    variants = load(ROOT)
    v = variants.get(image, variant)
    template = variants.images[image].template
    ctx = dockerfiles.context(image, template, v, "0" * 64, dockerfiles.RenderOptions(**opts))
    return dockerfiles.render(ROOT / "images" / "templates", template, ctx)


@pytest.mark.parametrize("image,variant", VARIANTS, ids=[f"{i}-{v}" for i, v in VARIANTS])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_dockerfile_golden(image: str, variant: str, mode: str) -> None:
    from tests.conftest import check_golden

    text = rendered(image, variant, **MODES[mode])
    check_golden(GOLDEN / "dockerfiles" / f"{image}-{variant}-{mode}.Dockerfile", text)


def test_classic_render_has_no_buildkit_syntax() -> None:
    for image, variant in VARIANTS:
        text = rendered(image, variant, buildkit=False, wheelhouse=True, ca_bundle=True)
        assert "--mount=" not in text
        # build-only material is copied into the build stage, never the final one
        final = text.split("\nFROM runtime\n", 1)[1]
        assert "ca-bundle" not in final and "wheelhouse" not in final


def test_buildkit_render_keeps_ca_in_a_secret() -> None:
    text = rendered("train", "cpu", buildkit=True, ca_bundle=True)
    assert "--mount=type=secret,id=ca_bundle" in text and "COPY ca-bundle" not in text


def test_strict_undefined_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("FROM {{ base_ref }}\nRUN {{ not_given }}\n")
    with pytest.raises(ImageError, match="not_given"):
        dockerfiles.render(tmp_path, "t.j2", {"base_ref": "x"})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the checkout's image inputs that a test may damage."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(ROOT / "images", root / "images")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "toolkit").mkdir()
    shutil.copytree(ROOT / "toolkit" / "ftkit", root / "toolkit" / "ftkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_committed_locks_verify() -> None:
    variants = load(ROOT)
    for image, variant in VARIANTS:
        v = variants.get(image, variant)
        if not reqlock.lock_path(ROOT, image, variant).exists():
            continue  # cuda12.8: needs download.pytorch.org to resolve (see README)
        lock = reqlock.verify(ROOT, image, v)
        reqs = lock.requirements()
        for req in v.requirements:
            name, version = req.split("==")
            assert reqs[name.split("[")[0].lower()] == version, (image, variant, req)


def test_tampered_lock_fails_with_a_clear_message(project: Path) -> None:
    path = reqlock.lock_path(project, "train", "cpu")
    path.write_text(path.read_text().replace("accelerate==1.15.0", "accelerate==1.14.0"))
    with pytest.raises(LockError, match="changed after it was generated"):
        builder.plan_build(project, "train", "cpu")


def test_stale_lock_fails_with_a_clear_message(project: Path) -> None:
    vf = project / "images" / "variants.yaml"
    vf.write_text(vf.read_text().replace("- peft==0.21.2", "- peft==0.22.0", 1))
    with pytest.raises(LockError, match="stale"):
        builder.plan_build(project, "train", "cpu")


def test_missing_lock_says_what_to_run(project: Path) -> None:
    with pytest.raises(LockError, match=r"ftkit lock --image train --variant cuda12.8"):
        builder.plan_build(project, "train", "cuda12.8")


def test_build_refuses_a_tampered_lock_before_docker(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = reqlock.lock_path(project, "serve", "transformers")
    path.write_text(path.read_text() + "evil==1.0\n")
    monkeypatch.setenv("FTKIT_PROJECT", str(project))
    result = run_cli("build", "--image", "serve", "--variant", "transformers", "--dry-run")
    assert result.code == 2
    assert "changed after it was generated" in result.err and "Traceback" not in result.err


def test_tag_is_a_content_address(project: Path) -> None:
    a = builder.plan_build(project, "train", "cpu")
    assert builder.plan_build(project, "train", "cpu").tag == a.tag
    assert a.tag.startswith("ftkit/train:cpu-") and len(a.tag.split("-")[-1]) == 12
    # a recipe is not an input
    (project / "recipes").mkdir()
    (project / "recipes" / "x.yaml").write_text("ftkit: 1\n")
    assert builder.plan_build(project, "train", "cpu").tag == a.tag
    # the base image, the CA bundle mode and ftkit's code are
    assert builder.plan_build(project, "train", "cpu", base_image="other:1").tag != a.tag
    src = project / "toolkit" / "ftkit" / "__init__.py"
    src.write_text(src.read_text() + "\n# change\n")
    assert builder.plan_build(project, "train", "cpu").tag != a.tag


def test_tag_does_not_depend_on_the_builder(project: Path) -> None:
    """The tag names the content: BuildKit and the classic fallback (different Dockerfile
    syntax, same packages) give the same tag, so a machine without buildx can use what
    another built. The real classic build: tests/integration/test_images.py."""
    for opts in ({}, {"ca_bundle": Path("/etc/ssl/certs/ca-certificates.crt")}):
        kit = builder.plan_build(project, "serve", "transformers", buildkit=True, **opts)
        classic = builder.plan_build(project, "serve", "transformers", buildkit=False, **opts)
        assert kit.dockerfile != classic.dockerfile and kit.tag == classic.tag


def test_no_cache_needs_force_and_reaches_the_build_command() -> None:
    result = run_cli("build", "--image", "train", "--variant", "cpu", "--no-cache", "--dry-run")
    assert result.code == 2 and "--force" in result.err
    result = run_cli("build", "--image", "train", "--variant", "cpu", "--force", "--no-cache", "--dry-run")
    assert result.code == 0, result.err
    spec = builder.plan_build(ROOT, "train", "cpu")
    for mode in ("buildx", "legacy-buildkit"):
        cli = dk.BuildKitCli("/usr/bin/docker", mode, "test")
        assert "--no-cache" in builder.buildkit_argv(spec, cli, "ctx", no_cache=True)
        assert "--no-cache" not in builder.buildkit_argv(spec, cli, "ctx")


def test_dependencies_are_installed_before_ftkit_itself() -> None:
    """ftkit's wheel changes with every source edit; copied before the locked dependencies
    it would make every rebuild download and install them again."""
    for opts in MODES.values():
        text = rendered("train", "cpu", **opts)
        assert text.index("-r /opt/ftkit/requirements.lock") < text.index("COPY dist/")


def test_dry_run_prints_dockerfile_context_and_tag() -> None:
    result = run_cli("build", "--image", "train", "--variant", "cpu", "--dry-run", "--wheelhouse", str(ROOT / "images"))
    # images/ holds no wheels: a clear error, not a traceback
    assert result.code == 2 and "holds no wheels" in result.err
    result = run_cli("build", "--image", "train", "--variant", "cpu", "--dry-run")
    assert result.code == 0, result.err
    assert "# image train/cpu -> ftkit/train:cpu-" in result.out
    assert "# build context: Dockerfile, requirements.lock, dist/ftkit-" in result.out
    assert "FROM python:3.11-slim-bookworm AS runtime" in result.out


def gpu(idx: int, name: str, cc: str) -> GpuInfo:
    return GpuInfo(idx, name, f"GPU-{idx}", 24576, 0, 350, 450, 150, 600, cc, None)


def test_driver_compatibility() -> None:
    variants = load(ROOT)
    cu13 = variants.get("train", "cuda13.0")
    ok = compat.check(cu13, "580.95", "13.0", [gpu(0, "RTX 4090", "8.9"), gpu(1, "RTX 5090", "12.0")])
    assert ok == []
    old_driver = compat.check(cu13, "550.54", "12.4", [gpu(0, "RTX 4090", "8.9")])
    assert old_driver[0].level == "error" and "580.65" in old_driver[0].message
    pascal = compat.check(cu13, "580.95", "13.0", [gpu(0, "GTX 1080 Ti", "6.1")])
    assert pascal[0].level == "error" and "older" in pascal[0].message
    future = compat.check(cu13, "590.1", "13.1", [gpu(0, "Future", "13.0")])
    assert future[0].level == "warning"
    assert compat.check(variants.get("train", "cpu"), "x", "1.0", [gpu(0, "RTX 4090", "8.9")]) == []


# -- a failed build says why ------------------------------------------------------------------------

# Captured from docker 20.10's BuildKit (`DOCKER_BUILDKIT=1 docker build --progress=plain`) with a base
# image that is not in the engine and no registry in reach.
LEGACY_BASE_FAILURE = """\
#1 [internal] load build definition from Dockerfile
#1 sha256:60401a0a49860287ab8a9113252a7a9a684ca9fc9522d21de8869e9b86bbb397
#1 transferring dockerfile: 1.21kB done
#1 DONE 0.0s

#3 [internal] load metadata for docker.io/library/python:3.11-slim-bookworm
#3 sha256:9b427c8372bfaab8ed8125b262abb59ae3e88571b90466cb2a35c2f47d5d23fb
#3 ERROR: failed to do request: Head "https://registry-1.docker.io/v2/library/python/manifests/3.11-slim-bookworm": \
dial tcp: lookup registry-1.docker.io on 10.255.255.53:53: no such host
------
 > [internal] load metadata for docker.io/library/python:3.11-slim-bookworm:
------
failed to solve with frontend dockerfile.v0: failed to create LLB definition: failed to do request: Head \
"https://registry-1.docker.io/v2/library/python/manifests/3.11-slim-bookworm": dial tcp: lookup registry-1.docker.io \
on 10.255.255.53:53: no such host"""

# buildx's shape of the same failure (a registry that answers: no such image).
BUILDX_BASE_FAILURE = """\
#2 [internal] load metadata for docker.io/library/python:3.11-slim-bookworm
#2 ERROR: docker.io/library/python:3.11-slim-bookworm: not found
------
 > [internal] load metadata for docker.io/library/python:3.11-slim-bookworm:
------
ERROR: failed to solve: python:3.11-slim-bookworm: failed to resolve source metadata for \
docker.io/library/python:3.11-slim-bookworm: docker.io/library/python:3.11-slim-bookworm: not found"""

RUN_FAILURE = """\
#9 [build 4/6] RUN pip install --require-hashes -r /opt/ftkit/requirements.lock
#9 1.203 Looking in indexes: https://pypi.org/simple
#9 3.411 ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu
#9 ERROR: executor failed running [/bin/sh -c pip install --require-hashes -r /opt/ftkit/requirements.lock]: \
exit code: 1
------
 > [build 4/6] RUN pip install --require-hashes -r /opt/ftkit/requirements.lock:
------
executor failed running [/bin/sh -c pip install]: exit code: 1"""


# Captured from `ftkit build --base-image ...` behind a TLS-intercepting proxy (docker 20.10's BuildKit; pip in
# the base image does not know the proxy's CA; download.pytorch.org does not resolve).
SSL_FAILURE = """\
#9 [build 4/6] RUN --mount=type=cache,target=/root/.cache/pip     /opt/ftkit/venv/bin/pip install       \
--require-hashes --no-deps --index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu\
       -r /opt/ftkit/requirements.lock
#9 sha256:dfe3a6ba5d2fec9ee991441d0d0ab925c24080dc0b6b5489ecdd929ede5f4fe1
#9 0.411 Looking in indexes: https://pypi.org/simple, https://download.pytorch.org/whl/cpu
""" + "".join(f"""\
#9 {t} WARNING: Retrying (Retry(total={n}, connect=None, read=None, redirect=None, status=None)) after connection \
broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: \
self-signed certificate in certificate chain (_ssl.c:992)'))': /simple/accelerate/
""" for n, t in ((4, "0.436"), (3, "0.956"), (2, "1.986"), (1, "4.010"), (0, "8.033"))) + """\
#9 8.054 Could not fetch URL https://pypi.org/simple/accelerate/: There was a problem confirming the ssl certificate: \
HTTPSConnectionPool(host='pypi.org', port=443): Max retries exceeded with url: /simple/accelerate/ (Caused by \
SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed \
certificate in certificate chain (_ssl.c:992)'))) - skipping
""" + "".join(f"""\
#9 {t} WARNING: Retrying (Retry(total={n}, connect=None, read=None, redirect=None, status=None)) after connection \
broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7feaf1b0ec50>: Failed to \
establish a new connection: [Errno -2] Name or service not known')': /whl/cpu/accelerate/
""" for n, t in ((4, "8.060"), (3, "8.564"), (2, "9.568"), (1, "11.57"), (0, "15.57"))) + """\
#9 15.58 ERROR: Could not find a version that satisfies the requirement accelerate==1.15.0 (from versions: none)
#9 15.58 ERROR: No matching distribution found for accelerate==1.15.0
#9 ERROR: executor failed running [/bin/sh -c /opt/ftkit/venv/bin/pip install       --require-hashes --no-deps \
--index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu       -r \
/opt/ftkit/requirements.lock]: exit code: 1
------
 > [build 4/6] RUN --mount=type=cache,target=/root/.cache/pip     /opt/ftkit/venv/bin/pip install       \
--require-hashes --no-deps --index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu\
       -r /opt/ftkit/requirements.lock:
------
executor failed running [/bin/sh -c /opt/ftkit/venv/bin/pip install       --require-hashes --no-deps --index-url \
https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu       -r /opt/ftkit/requirements.lock]:\
 exit code: 1"""

# The same build with the proxy's CA bundle (`--ca-bundle`): PyPI answers, download.pytorch.org still does not.
TORCH_NOT_FOUND = """\
#9 [build 4/6] RUN --mount=type=cache,target=/root/.cache/pip     --mount=type=secret,id=ca_bundle     \
PIP_CERT=/run/secrets/ca_bundle /opt/ftkit/venv/bin/pip install       --require-hashes --no-deps --index-url \
https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu       -r /opt/ftkit/requirements.lock
#9 0.402 Looking in indexes: https://pypi.org/simple, https://download.pytorch.org/whl/cpu
#9 351.6 Collecting tokenizers==0.23.3
#9 351.6   Downloading tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl (3.4 MB)
#9 359.2 WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection \
broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7fdf482e3a50>: Failed to \
establish a new connection: [Errno -2] Name or service not known')': /whl/cpu/torch/
#9 359.2 ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu (from versions: 1.13.0, \
1.13.1, 2.0.0, 2.12.1, 2.13.0, 2.14.0, 2.14.1, 2.15.0)
#9 359.2 ERROR: No matching distribution found for torch==2.13.0+cpu
#9 ERROR: executor failed running [/bin/sh -c PIP_CERT=/run/secrets/ca_bundle /opt/ftkit/venv/bin/pip install       \
--require-hashes --no-deps --index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu\
       -r /opt/ftkit/requirements.lock]: exit code: 1
------
 > [build 4/6] RUN --mount=type=cache,target=/root/.cache/pip     --mount=type=secret,id=ca_bundle     \
PIP_CERT=/run/secrets/ca_bundle /opt/ftkit/venv/bin/pip install       --require-hashes --no-deps --index-url \
https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu       -r /opt/ftkit/requirements.lock:
------
executor failed running [/bin/sh -c PIP_CERT=/run/secrets/ca_bundle /opt/ftkit/venv/bin/pip install       \
--require-hashes --no-deps --index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu\
       -r /opt/ftkit/requirements.lock]: exit code: 1"""


def progress_of(text: str, tmp_path: Path) -> builder.Progress:
    with builder.Progress("building x", tmp_path / "build.log", live=False) as progress:
        for line in text.splitlines():
            progress.line(line)
    return progress


@pytest.mark.parametrize("output", [LEGACY_BASE_FAILURE, BUILDX_BASE_FAILURE], ids=["buildkit-20.10", "buildx"])
def test_unpullable_base_names_the_reason_and_the_fix(output: str, tmp_path: Path) -> None:
    failure = progress_of(output, tmp_path).explain()
    assert failure.step == "[internal] load metadata for docker.io/library/python:3.11-slim-bookworm"
    assert failure.base_ref == "docker.io/library/python:3.11-slim-bookworm"
    text = failure.render()
    assert text.splitlines()[0].startswith("failing step: [internal] load metadata for")
    assert ("no such host" in text) if "no such host" in output else ("not found" in text)
    assert text.splitlines()[1].startswith("reason: ")
    hint = builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu"))
    assert hint is not None and "docker.base_image" in hint and "Python 3.11" in hint
    # the base is part of the tag: the hint leads to the profile, built with and the stack generated with it
    assert "part of the image's tag" in hint
    assert "`ftkit build --machine PROFILE`" in hint and "`ftkit compose RECIPE --machine PROFILE -o DIR`" in hint
    assert "`ca_bundle: FILE`" in hint and "`docker.wheelhouse: DIR`" in hint
    assert "`--base-image IMAGE` alone builds a tag that a plan or stack made without that base does not name" in hint


def test_failed_run_step_keeps_its_output_and_gets_no_base_hint(tmp_path: Path) -> None:
    failure = progress_of(RUN_FAILURE, tmp_path).explain()
    assert failure.step and failure.step.startswith("[build 4/6] RUN pip install")
    assert failure.reason and "exit code: 1" in failure.reason
    assert any("Could not find a version" in ln for ln in failure.output)
    assert builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu")) is None


def test_certificate_failure_names_the_ca_bundle_and_the_wheelhouse(tmp_path: Path) -> None:
    """pip behind a TLS-intercepting proxy: the requirement it then finds nowhere is not the
    cause (no wheelhouse hint alone); the CA bundle is, and the index that did not answer at
    all (download.pytorch.org) is named for a wheelhouse."""
    failure = progress_of(SSL_FAILURE, tmp_path).explain()
    assert failure.base_ref is None and failure.pip.tls and failure.pip.unreachable
    assert failure.pip.not_found == ["accelerate==1.15.0"]
    hint = builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu"))
    assert hint is not None and hint.startswith("pip could not verify the package index's TLS certificate")
    assert "`ca_bundle: FILE` in the machine profile" in hint and "`ftkit build --ca-bundle FILE`" in hint
    assert "`ftkit build --machine PROFILE`" in hint and "does not change the image's tag" in hint
    assert "https://download.pytorch.org/whl/cpu" in hint and "`docker.wheelhouse: DIR`" in hint
    # seen in the step's every line, not just the last ones a failure shows
    lines = SSL_FAILURE.splitlines()
    at = next(i for i, ln in enumerate(lines) if "Could not find a version" in ln)
    noisy = "\n".join(lines[:at] + [f"#9 16.{i:02d} WARNING: retrying /simple/accelerate/" for i in range(40)] + lines[at:])
    assert builder.failure_hint(progress_of(noisy, tmp_path).explain(),
                                builder.plan_build(ROOT, "train", "cpu")) == hint
    # a CA bundle that was given and still fails: the bundle is the wrong one; a wheelhouse given: not named again
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    hint = builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu", ca_bundle=ca, wheelhouse=wheels))
    assert hint is not None and f"even with the CA bundle {ca}" in hint and "wheelhouse" not in hint


def test_distribution_not_found_names_the_requirement_and_the_wheelhouse(tmp_path: Path) -> None:
    failure = progress_of(TORCH_NOT_FOUND, tmp_path).explain()
    assert failure.base_ref is None and not failure.pip.tls
    assert failure.pip.not_found == ["torch==2.13.0+cpu"]
    hint = builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu"))
    assert hint is not None and hint.startswith("pip found no distribution for torch==2.13.0+cpu on the indexes it "
                                                "reached (https://pypi.org/simple, https://download.pytorch.org/whl/cpu")
    assert "`docker.wheelhouse: DIR` in the machine profile" in hint and "`ftkit build --wheelhouse DIR`" in hint
    assert "`ftkit build --machine PROFILE`" in hint and "`ftkit compose RECIPE --machine PROFILE -o DIR`" in hint
    assert "the tag does not change" in hint
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "other-1.0-py3-none-any.whl").write_bytes(b"")
    hint = builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu", wheelhouse=wheels))
    assert hint == (f"pip found no distribution for torch==2.13.0+cpu, neither in the wheelhouse {wheels} nor on "
                    "the index: put its wheel there (the lock's hash must match the file)")


def test_classic_builder_pip_failure_is_recognised(tmp_path: Path) -> None:
    with builder.Progress("building x", tmp_path / "build.log", live=False) as progress:
        progress.line("Step 4/12 : RUN /opt/ftkit/venv/bin/pip install --require-hashes -r /opt/ftkit/requirements.lock")
        progress.line(" ---> Running in 0123456789ab")
        for ln in TORCH_NOT_FOUND.splitlines():
            if ln.startswith("#9 359.2 ERROR: "):
                progress.line(ln.split(" ", 2)[2])
        progress.error("The command '/bin/sh -c /opt/ftkit/venv/bin/pip install' returned a non-zero code: 1")
    failure = progress.explain()
    assert failure.step and failure.step.startswith("Step 4/12: RUN")
    assert failure.pip.not_found == ["torch==2.13.0+cpu"]
    assert "torch==2.13.0+cpu" in (builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu")) or "")
    # an earlier step's words are not this step's
    with builder.Progress("building x", tmp_path / "build2.log", live=False) as progress:
        progress.line("Step 3/12 : RUN echo certificate verify failed")
        progress.line("certificate verify failed")
        progress.line("Step 4/12 : RUN false")
        progress.error("The command '/bin/sh -c false' returned a non-zero code: 1")
    assert builder.failure_hint(progress.explain(), builder.plan_build(ROOT, "train", "cpu")) is None


def test_classic_builder_failure_names_the_reason_and_the_fix(tmp_path: Path) -> None:
    with builder.Progress("building x", tmp_path / "build.log", live=False) as progress:
        progress.line("Step 1/12 : FROM python:3.11-slim-bookworm AS runtime")
        progress.error("pull access denied for python, repository does not exist or may require 'docker login'")
    failure = progress.explain()
    assert failure.step == "Step 1/12: FROM python:3.11-slim-bookworm AS runtime"
    assert failure.base_ref == "python:3.11-slim-bookworm"
    assert failure.render().count("pull access denied") == 1  # the reason, not repeated as an output line
    assert builder.failure_hint(failure, builder.plan_build(ROOT, "train", "cpu")) is not None


def test_build_with_a_machine_builds_from_its_base_image(tmp_path: Path) -> None:
    """The fix the hint names: `docker.base_image` in the profile reaches `ftkit build --machine`
    (the tag the machine's plans run depends on it)."""
    machine = tmp_path / "m.yaml"
    machine.write_text("ftkit: 1\nkind: machine\nname: local-base\nexecutor: docker\n"
                       "docker: {base_image: 'ftkit-test/bookworm-python:latest'}\n")
    result = run_cli("build", "--machine", str(machine), "--image", "train", "--dry-run")
    assert result.code == 0, result.err
    want = builder.plan_build(ROOT, "train", "cpu", base_image="ftkit-test/bookworm-python:latest").tag
    assert f"# image train/cpu -> {want}" in result.out
    assert "FROM ftkit-test/bookworm-python:latest AS runtime" in result.out
    result = run_cli("build", "--machine", str(machine), "--image", "train", "--dry-run", "--base-image", "other/base:1")
    assert "FROM other/base:1 AS runtime" in result.out  # the option wins over the profile


def test_a_profile_for_a_machine_behind_a_proxy_builds_the_tag_its_stacks_name(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What the build hints lead to, end to end: base_image, ca_bundle and wheelhouse in one
    profile reach `ftkit build --machine`, and `ftkit compose --machine` with that profile names
    the tag that build makes (a CA bundle or wheelhouse never changes it; the base image does)."""
    monkeypatch.setenv("FTKIT_LEASE_DIR", str(tmp_path / "lease"))
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")  # the engine is not asked
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    machine = tmp_path / "m.yaml"
    machine.write_text(f"ftkit: 1\nkind: machine\nname: behind-proxy\nexecutor: docker\nca_bundle: {ca}\n"
                       f"docker: {{base_image: 'ftkit-test/bookworm-python:latest', wheelhouse: {wheels}}}\n")
    result = run_cli("build", "--machine", str(machine), "--image", "train", "--variant", "cpu", "--dry-run")
    assert result.code == 0, result.err
    tag = result.out.splitlines()[0].split(" -> ")[1]
    assert tag == builder.plan_build(ROOT, "train", "cpu", base_image="ftkit-test/bookworm-python:latest").tag
    assert tag != builder.plan_build(ROOT, "train", "cpu").tag  # the base is part of the tag
    assert "wheelhouse/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl" in result.out
    assert "--find-links /wheelhouse" in result.out
    if dk.find_buildkit_cli() is not None:
        assert f"--secret id=ca_bundle,src={ca}" in result.out
    stack = run_cli("compose", str(ROOT / "recipes" / "quickstart.yaml"), "--machine", str(machine),
                    "-o", str(tmp_path / "stack"), "--dry-run", cwd=ROOT)
    assert stack.code == 0, stack.err
    assert f"FTKIT_TRAIN_IMAGE={tag}\n" in stack.out
