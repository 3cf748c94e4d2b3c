"""Session fixtures for tests that run generated stacks: the CPU images (train/cpu and
serve/vllm-cpu), built once per test run, however many workers it has (tests/shared_build.py).

The build flags are the ones tests/integration/test_images.py uses (local base image, CA
bundle, wheelhouse: tests/e2e_inputs.py), so the tags are the same; a build whose tags exist
is a no-op, and test_images.py checks the build this fixture made rather than repeating it. A
machine profile with the same `docker:` settings plans exactly these tags (see
`test_machine`). Images this fixture built are removed when the whole run ends
(FTKIT_KEEP_TEST_IMAGES=1 keeps them); images that were there before are left alone.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import run_ftkit, shared_dir
from tests.e2e_inputs import BASE, CA, build_args, docker_lines
from tests.shared_build import locked, note_built, read_record, write_record

CANARY = "hf_ftkitCanaryTokenThatMustNeverLand0123"  # HF_TOKEN of every test build: no layer may hold it


@dataclass
class CpuImages:
    train: str
    serve: str
    exact: bool = True  # False: given by FTKIT_TEST_STACK_IMAGES, not this checkout's tags
    # When this session built both (HF_TOKEN=CANARY, the flags test_images.py uses): the build's
    # stdout and its images lock, which test_images.py checks instead of building them again
    built_stdout: str | None = None
    lock: Path | None = None


@lru_cache(maxsize=1)
def hf_cache() -> Path:
    """One Hugging Face cache for every docker machine profile of the session (removed at its
    end). The plan mounts it and points VLLM_CACHE_ROOT into it, so vLLM's model-class
    inspection - a subprocess that imports vLLM and the model, 6-9 s of every cold start on
    two cores - runs once per session, not once per server start."""
    path = Path(tempfile.mkdtemp(prefix="ftkit-test-hf-cache-"))
    path.chmod(0o777)  # containers run as the host user; a root-owned machine is the same
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def machine_profile(path: Path, name: str, extra: str = "", paths: dict[str, Path] | None = None) -> Path:
    """A machine profile whose image tags are the ones `cpu_images` builds, on the session's
    Hugging Face cache (`paths` adds to the profile's paths)."""
    places = {"hf_cache": hf_cache(), **(paths or {})}
    lines = ["ftkit: 1", "kind: machine", f"name: {name}", "executor: docker",
             "paths: {" + ", ".join(f"{k}: {v}" for k, v in places.items()) + "}", *docker_lines()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture(scope="session")
def cpu_images():  # type: ignore[no-untyped-def]
    """The train/cpu and serve/vllm-cpu images of this checkout (what a CPU machine's plans
    run: vLLM's CPU build serves), built if missing.

    FTKIT_TEST_STACK_IMAGES=TRAIN_REF,SERVE_REF uses those images instead (stacks get them
    through .env): for iterating on the stack tests without a rebuild after every source
    change; they must hold a recent enough ftkit."""
    given = [r.strip() for r in os.environ.get("FTKIT_TEST_STACK_IMAGES", "").split(",") if r.strip()]
    if given:
        assert len(given) == 2, "FTKIT_TEST_STACK_IMAGES=TRAIN_REF,SERVE_REF"
        yield CpuImages(train=given[0], serve=given[1], exact=False)
        return
    shared = shared_dir()
    with locked(shared, "cpu-images"):  # one build for every worker of the run
        record = read_record(shared, "cpu-images")
        if record is None:
            record = _build_cpu_images(shared)
    if record.get("error"):
        pytest.fail(f"the session's build of the CPU images failed (in worker {record['worker']}): "
                    f"{record['error']}", pytrace=False)
    lock = Path(record["lock"]) if record.get("lock") else None
    yield CpuImages(train=record["train"], serve=record["serve"], built_stdout=record.get("built_stdout"), lock=lock)


def _build_cpu_images(shared: Path) -> dict:  # type: ignore[type-arg]
    """Build both images (a no-op for tags that exist); the record the other workers read.
    Images this build created are removed when the run ends (tests/shared_build.py)."""
    from ftkit.gateways import docker as dk
    from ftkit.images import builder, project

    root = project.find_root()
    expected = CpuImages(train=builder.plan_build(root, "train", "cpu", base_image=BASE).tag,
                         serve=builder.plan_build(root, "serve", "vllm-cpu", base_image=BASE).tag)
    missing = [t for t in (expected.train, expected.serve) if dk.image_attrs(t) is None]
    lock = shared / "cpu-images.lock.json"
    created = set(missing)
    record: dict = {"train": expected.train, "serve": expected.serve,  # type: ignore[type-arg]
                    "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
    try:
        proc = run_ftkit(*build_args("--image", "all", "--images-lock", str(lock)), env={"HF_TOKEN": CANARY},
                         timeout=2400)
        if lock.is_file():
            recorded = json.loads(lock.read_text())["images"]
            built = tuple(recorded[k]["tag"] for k in ("train/cpu", "serve/vllm-cpu") if k in recorded)
            created |= set(built) - {expected.train, expected.serve}
            if built != (expected.train, expected.serve):
                record["error"] = f"built {built}, planned {expected} (did the sources change during the build?)"
        if proc.returncode != 0:
            record["error"] = proc.stderr[-5000:]
        elif len(missing) == 2 and Path(CA).is_file():  # both built now, as test_images.py builds them
            record.update(built_stdout=proc.stdout, lock=str(lock))
    except BaseException as e:  # a timeout or Ctrl-C: the other worker must not wait for a build that ended
        record["error"] = f"{e.__class__.__name__}: {e}"
        raise
    finally:
        note_built(shared, created)
        write_record(shared, "cpu-images", record)
    return record
