"""Session fixtures for tests that run generated stacks: the CPU images (train/cpu and
serve/vllm-cpu), built once.

The build flags are the ones tests/integration/test_images.py uses (local base image, CA
bundle, wheelhouse), so the tags are the same; a build whose tags exist is a no-op. A
machine profile with the same `docker:` settings plans exactly these tags (see
`test_machine`). Images this fixture built are removed at the end of the session
(FTKIT_KEEP_TEST_IMAGES=1 keeps them); images that were there before are left alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_ftkit

BASE = os.environ.get("FTKIT_TEST_BASE_IMAGE", "ftkit-test/bookworm-python:latest")
WHEELHOUSE = os.environ.get("FTKIT_TEST_WHEELHOUSE", "/opt/wheels")
CA = os.environ.get("FTKIT_TEST_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")


@dataclass
class CpuImages:
    train: str
    serve: str
    exact: bool = True  # False: given by FTKIT_TEST_STACK_IMAGES, not this checkout's tags


def machine_profile(path: Path, name: str, extra: str = "") -> Path:
    """A machine profile whose image tags are the ones `cpu_images` builds."""
    lines = ["ftkit: 1", "kind: machine", f"name: {name}", "executor: docker",
             "docker:", f"  base_image: {BASE}", "  build_missing: false"]
    if Path(WHEELHOUSE).is_dir():
        lines.append(f"  wheelhouse: {WHEELHOUSE}")
    if Path(CA).is_file():
        lines.append(f"ca_bundle: {CA}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture(scope="session")
def cpu_images(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The train/cpu and serve/vllm-cpu images of this checkout (what a CPU machine's plans
    run: vLLM's CPU build serves), built if missing.

    FTKIT_TEST_STACK_IMAGES=TRAIN_REF,SERVE_REF uses those images instead (stacks get them
    through .env): for iterating on the stack tests without a rebuild after every source
    change; they must hold a recent enough ftkit."""
    from ftkit.gateways import docker as dk
    from ftkit.images import builder, project

    given = [r.strip() for r in os.environ.get("FTKIT_TEST_STACK_IMAGES", "").split(",") if r.strip()]
    if given:
        assert len(given) == 2, "FTKIT_TEST_STACK_IMAGES=TRAIN_REF,SERVE_REF"
        yield CpuImages(train=given[0], serve=given[1], exact=False)
        return
    root = project.find_root()
    expected = CpuImages(train=builder.plan_build(root, "train", "cpu", base_image=BASE).tag,
                         serve=builder.plan_build(root, "serve", "vllm-cpu", base_image=BASE).tag)
    missing = [t for t in (expected.train, expected.serve) if dk.image_attrs(t) is None]
    lock = tmp_path_factory.mktemp("images-lock") / "images.lock.json"
    args = ["build", "--image", "all", "--base-image", BASE, "--images-lock", str(lock)]
    if Path(CA).is_file():
        args += ["--ca-bundle", CA]
    if Path(WHEELHOUSE).is_dir():
        args += ["--wheelhouse", WHEELHOUSE]
    created = set(missing)
    try:
        proc = run_ftkit(*args, timeout=2400)
        if lock.is_file():
            recorded = json.loads(lock.read_text())["images"]
            built = tuple(recorded[k]["tag"] for k in ("train/cpu", "serve/vllm-cpu") if k in recorded)
            created |= set(built) - {expected.train, expected.serve}
            assert built == (expected.train, expected.serve), \
                f"built {built}, planned {expected} (did the sources change during the build?)"
        assert proc.returncode == 0, proc.stderr[-5000:]
        yield expected
    finally:
        if os.environ.get("FTKIT_KEEP_TEST_IMAGES") != "1":
            for tag in sorted(created):
                try:
                    dk.remove_image(tag)
                except Exception:  # noqa: BLE001 - already gone (test_images.py removes what it builds too)
                    pass
