"""The CPU quickstart end to end, as the README runs it: the tiny model must measurably learn
(at least 50 points on held-out prompts) and the run directory must explain the run. The
same recipe run in the images (docker executor) - served there by the real vLLM (its CPU
build), here by `transformers serve` - gives the same eval result, the same answers to the
test prompts and a run directory of the same layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import require

require("trl")

from tests.conftest import RECIPES, run_ftkit, run_label  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    proc = run_ftkit("up", str(RECIPES / "quickstart.yaml"), "--runs-dir", str(runs), "--quiet", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "succeeded"
    return Path(summary["run_dir"])


def test_the_model_learns(run_dir: Path) -> None:
    summary = json.loads((run_dir / "steps/eval/summary.json").read_text())
    models = summary["models"]
    assert summary["prompts"] == 60
    assert models["merged"]["accuracy"] - models["base"]["accuracy"] >= 50
    assert models["adapter"]["accuracy"] == models["merged"]["accuracy"]  # the merge kept what was learned
    results = [json.loads(x) for x in (run_dir / "steps/eval/results.jsonl").read_text().splitlines()]
    assert len(results) == 3 * 60


def test_run_directory_explains_the_run(run_dir: Path) -> None:
    assert run_dir.name.endswith("-quickstart") and run_dir.name[:8].isdigit()
    for name in ("recipe.resolved.yaml", "plan.json", "command.txt", "env.json", "state.json"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert [s["name"] for s in resolved["steps"]] == ["power", "train", "merge", "serve", "eval"]
    assert resolved["steps"][1]["gpus"] == []  # "all" resolved on a CPU machine
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["run_dir"] == str(run_dir)
    assert "ftkit up" in (run_dir / "command.txt").read_text()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["ftkit"] and env["python"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "succeeded"
    assert state["order"] == [s["id"] for s in plan["steps"]]
    for sid, entry in state["steps"].items():
        assert entry["status"] in ("succeeded", "skipped"), (sid, entry)
    assert state["steps"]["power"]["status"] == "skipped"  # nothing to cap on a CPU machine
    for step in ("tiny-model", "train", "merge", "serve", "eval"):
        assert (run_dir / "logs" / f"{step}.log").stat().st_size > 0, step
    assert not list(run_dir.rglob(".state.json.*.tmp"))


def test_training_artifacts(run_dir: Path) -> None:
    metrics = [json.loads(x) for x in (run_dir / "steps/train/metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "loss" in m]
    eval_rows = [m for m in metrics if "eval_loss" in m]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert eval_rows and eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert all("tokens_per_s" in m for m in train_rows[1:])
    ckpts = sorted(p.name for p in (run_dir / "steps/train/checkpoints").glob("checkpoint-*"))
    assert 2 <= len(ckpts) <= 3  # keep the last 2, plus the best
    assert all((run_dir / "steps/train/checkpoints" / c / "ftkit-complete.json").is_file() for c in ckpts)
    merged = run_dir / "steps/merge/model"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()


def test_served_model_answered_the_test_prompts(run_dir: Path) -> None:
    rows = [json.loads(x) for x in (run_dir / "steps/serve/responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["passed"] for r in rows), rows
    assert [r["answer"].strip() for r in rows] == ["fruit", "instrument"]


def test_gguf_export_answers_as_the_merged_model(run_dir: Path, tmp_path: Path) -> None:
    """`ftkit export --to gguf RUN` (q8_0): the GGUF, read back with llama.cpp's reader
    (gguf-py's GGUFReader, through transformers' GGUF loader), answers the serve step's test
    prompts exactly as the merged model does greedily, and as the run's server did; llama.cpp
    itself too where llama-cpp-python is installed (CI does not compile it)."""
    require("gguf")
    torch = require("torch")
    transformers = require("transformers")
    out = tmp_path / "gguf"
    proc = run_ftkit("export", "--to", "gguf", str(run_dir), "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.splitlines()[0])["template"] == "alpaca"
    plan = json.loads((run_dir / "plan.json").read_text())
    prompts = [p for s in plan["steps"] if s["kind"] == "serve" for p in s["prompts"]]
    merged = run_dir / "steps/merge/model"
    tok = transformers.AutoTokenizer.from_pretrained(merged)

    def answers(model) -> list[str]:  # type: ignore[no-untyped-def]
        out_text = []
        for p in prompts:
            ids = tok(p["prompt"], return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=p["max_tokens"], do_sample=False, pad_token_id=tok.pad_token_id)
            out_text.append(tok.decode(gen[0][ids.shape[1]:], skip_special_tokens=True).strip())
        return out_text

    expected = answers(transformers.AutoModelForCausalLM.from_pretrained(merged))
    assert expected == ["fruit", "instrument"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    assert answers(back) == expected
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=256, n_threads=2, verbose=False)
    try:
        got = [llm.create_completion(p["prompt"], max_tokens=p["max_tokens"], temperature=0.0)["choices"][0]["text"]
               for p in prompts]
    finally:
        llm.close()
    assert [g.strip() for g in got] == expected


def _layout(run: Path) -> set[str]:
    """What a run directory holds, without the parts that differ by nature (checkpoint step
    numbers, build logs of images built on first use, temp files, the hub cache directory
    `transformers serve` needs where it serves - vLLM serves in the images - and the time,
    host and pid in a TensorBoard event file's name, as TensorBoard names its own)."""
    out = set()
    for p in run.rglob("*"):
        rel = p.relative_to(run).as_posix()
        if ("/checkpoints/" in rel or rel.startswith("logs/images") or "-cpu-" in rel or "transformers-20" in rel
                or rel.startswith("steps/serve/hub-cache")):
            continue
        rel = re.sub(r"/events\.out\.tfevents\.[^/]+$", "/events.out.tfevents.*", rel)
        out.add(rel + ("/" if p.is_dir() else ""))
    return out


@pytest.fixture(scope="module")
def docker_run_dir(tmp_path_factory: pytest.TempPathFactory, cpu_images) -> Path:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import machine_profile

    work = tmp_path_factory.mktemp("docker-runs")
    machine = machine_profile(work / "machine.yaml", "ci-docker")
    proc = run_ftkit("up", str(RECIPES / "quickstart.yaml"), "--machine", str(machine), "--runs-dir", str(work / "runs"),
                     "--quiet", "--json", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(json.loads(proc.stdout)["run_dir"])


@pytest.mark.docker
def test_docker_executor_gives_the_same_result(run_dir: Path, docker_run_dir: Path) -> None:
    local = json.loads((run_dir / "steps/eval/summary.json").read_text())
    docker = json.loads((docker_run_dir / "steps/eval/summary.json").read_text())
    assert docker["models"] == local["models"]
    assert _layout(docker_run_dir) == _layout(run_dir)
    state = json.loads((docker_run_dir / "state.json").read_text())
    plan = json.loads((docker_run_dir / "plan.json").read_text())
    assert plan["executor"] == "docker" and state["status"] == "succeeded"
    assert all(state["steps"][s]["status"] == "succeeded" for s in ("tiny-model", "train", "merge", "serve", "eval"))
    serve = next(s for s in plan["steps"] if s["id"] == "serve")
    assert serve["engine"] == "vllm" and serve["image"].startswith("ftkit/serve:vllm-cpu-")  # the real vLLM served
    local_serve = next(s for s in json.loads((run_dir / "plan.json").read_text())["steps"] if s["id"] == "serve")
    assert local_serve["engine"] == "transformers"  # vLLM is not installed in the test environment
    rows = [json.loads(x) for x in (docker_run_dir / "steps/serve/responses.jsonl").read_text().splitlines()]
    assert [r["answer"].strip() for r in rows] == ["fruit", "instrument"]  # the same test prompts, answered by vLLM
    assert state["steps"]["train"]["process"]["container"]  # it ran in a container
    from ftkit.gateways import docker as dk

    assert dk.containers_with_label(f"dev.ftkit.run={run_label(docker_run_dir)}") == []  # none left behind
