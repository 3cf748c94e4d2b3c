"""Plans for the guide recipes: ordered steps, exact commands, generated configs, fit
estimates and PSU budgets. Text plans are golden files."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests import builders
from tests.builders import GUIDES, MACHINES
from tests.conftest import GOLDEN, RECIPES, ROOT, check_golden, run_cli

PAIRS = GUIDES


def plan_json(recipe: str, machine: str) -> dict:
    return builders.plan_json(RECIPES / recipe, MACHINES / machine)


def _normalise(text: str) -> str:
    return text.replace(str(ROOT), "<checkout>")


@pytest.mark.parametrize("name", [*sorted(PAIRS), "gemma-configs"])
def test_plan_text_golden(name: str) -> None:
    """The plan as people read it; `-configs`: with every generated config's text (`--configs`,
    what `ftkit up --dry-run` prints), otherwise one summary line per config."""
    recipe, machine = PAIRS[name.removesuffix("-configs")]
    extra = ["--configs"] if name.endswith("-configs") else []
    result = run_cli("plan", str(RECIPES / recipe), "--machine", str(RECIPES / "machines" / machine), *extra)
    assert result.code == 0, result.err
    text = _normalise(result.out)
    # image tags depend on the ftkit sources; the golden file keeps their shape only
    import re

    text = re.sub(r"(ftkit/(train|serve|quantize):[\w.-]+?-)[0-9a-f]{12}", r"\1<hash>", text)
    check_golden(GOLDEN / "plans" / f"{name}.txt", text)


def test_mistral_plan_order_and_handoff() -> None:
    plan = plan_json(*PAIRS["mistral"])
    kinds = [s["kind"] for s in plan["steps"]]
    assert kinds == ["power", "handoff-stop", "train", "merge", "quantize", "power-restore", "serve", "handoff-start",
                     "power-restore"]
    assert plan["steps"][0]["power_caps_w"] == {"0": 350, "1": 350}
    stop = plan["steps"][1]
    assert stop["argv"] == ["systemctl", "stop", "vllm"]
    assert plan["steps"][-1]["always"] is True
    train = plan["steps"][2]
    assert train["argv"][:4] == ["accelerate", "launch", "--config_file", "/ftkit/run/configs/accelerate-train.yaml"]
    assert train["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    acc = yaml.safe_load(next(f["content"] for f in train["files"] if f["path"].startswith("configs/accelerate")))
    assert acc["distributed_type"] == "MULTI_GPU" and acc["num_processes"] == 2
    serve = plan["steps"][6]
    # the merged model quantized to W4A16 (44 GiB in bf16 does not fit the 24 GiB card; plan.servefit)
    assert serve["argv"][:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                                 "/ftkit/run/steps/quantize/model"]
    # in its container GPU 1 is the only device, renumbered 0; the device request names host GPU 1
    assert "--quantization" not in serve["argv"] and serve["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert serve["gpus"] == [1] and serve["lease"]["role"] == "serve" and serve["lease"]["gpus"] == [1]
    assert serve["ports"] == [{"container": 8000, "host": 8000, "host_ip": "127.0.0.1"}]
    assert any("stays stopped after a successful run" in w for w in plan["warnings"])
    # after a failure the service comes back (the previous model); after success the new server replaces it
    start = plan["steps"][7]
    assert start["always"] and start["argv"] == ["systemctl", "start", "vllm"] and start["replaced_by"] == "serve"


def test_gemma_plan_generates_zero3_config() -> None:
    plan = plan_json(*PAIRS["gemma"])
    train = next(s for s in plan["steps"] if s["kind"] == "train")
    files = {f["path"]: f["content"] for f in train["files"]}
    ds = json.loads(files["configs/deepspeed-train.json"])
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    acc = yaml.safe_load(files["configs/accelerate-train.yaml"])
    assert acc["distributed_type"] == "DEEPSPEED"
    assert acc["deepspeed_config"]["deepspeed_config_file"] == "/ftkit/run/configs/deepspeed-train.json"
    assert acc["deepspeed_config"]["zero3_init_flag"] is True
    engine = json.loads(files["configs/train-train.json"])
    assert engine["deepspeed_config"] == "/ftkit/run/configs/deepspeed-train.json"
    assert engine["dataset"]["template"] == "tokenizer"  # the guide recipes use the model's own template


def test_psu_budget_matches_the_guide() -> None:
    plan = plan_json(*PAIRS["mistral"])
    psu, uncapped = plan["psu"], plan["psu_uncapped"]
    # Guide: 3090 Ti ~650 W + 4090 ~600 W + 200 W system = ~1450 W worst case uncapped,
    # over a 1500 W PSU's usable budget; capped at 350 W each it fits.
    assert uncapped["worst_case_w"] == pytest.approx(1450, abs=1)
    assert uncapped["verdict"] == "over"
    assert psu["verdict"] == "ok"
    assert psu["worst_case_w"] == pytest.approx(350 * 650 / 350 + 350 * 600 / 450 + 200, abs=1)


def test_fit_estimates_are_present_for_every_training_gpu() -> None:
    for recipe, machine in PAIRS.values():
        plan = plan_json(recipe, machine)
        train = next(s for s in plan["steps"] if s["kind"] == "train")
        ests = plan["fit"][train["id"]]
        assert [e["gpu"] for e in ests] == train["gpus"]
        for e in ests:
            assert e["verdict"] == "fits", (recipe, e)
            assert set(e["components_gib"]) >= {"weights", "adapters", "gradients", "optimizer", "activations"}


def test_plan_runs_nothing_and_writes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("plan", str(RECIPES / "quickstart.yaml"), cwd=tmp_path)
    assert result.code == 0
    assert list(tmp_path.iterdir()) == []
    assert "tiny-model" in result.out and "transformers.cli.transformers serve" in result.out


def test_plan_against_machine_without_enough_gpus(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("plan", str(RECIPES / "llama31-8b-lora-2gpu.yaml"), "--machine", str(RECIPES / "machines" / "cpu.yaml"))
    assert result.code == 2
    assert "llama31-8b-lora-2gpu.yaml:" in result.err and "GPU 0 is not on machine 'cpu'" in result.err


def test_plan_escapes_control_characters_and_warns_about_open_binds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A recipe string cannot hide a flag from the person reading the plan, and a server
    reachable from the network is said out loud."""
    shutil.copy(RECIPES / "data" / "quickstart-train.jsonl", tmp_path / "train.jsonl")
    (tmp_path / "r.yaml").write_text(
        'ftkit: 1\nname: esc\nmodel: {tiny: {}}\ndataset: {path: train.jsonl, format: alpaca}\nsteps:\n'
        '  - {type: train, max_steps: 1}\n  - {type: merge}\n'
        '  - {type: serve, engine: transformers, prompts: [{prompt: "hi\\u001b[2J\\rrm -rf \\u202eoops"}]}\n')
    machine = builders.machine_file(tmp_path, file="m.yaml", name="open", bind_address="0.0.0.0")
    result = run_cli("plan", str(tmp_path / "r.yaml"), "--machine", str(machine))
    assert result.code == 0, result.err
    assert "\x1b" not in result.out and "\r" not in result.out and "\u202e" not in result.out
    assert "\\x1b[2J\\rrm -rf \\u202eoops" in result.out
    assert "reachable from the network" in result.out


def test_the_plan_says_dora_and_rslora_and_the_engine_gets_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old = "lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}"
    recipe = builders.shipped(tmp_path, "quickstart.yaml", file="dora.yaml",
                              **{old: old[:-1] + ", use_dora: true, use_rslora: true}"})
    result = run_cli("plan", str(recipe), cwd=tmp_path)
    assert result.code == 0, result.err
    assert "lora; r 16, alpha 32.0, DoRA, rsLoRA;" in result.out and "dora_temporaries" in result.out
    plan = json.loads(run_cli("plan", str(recipe), "--json", cwd=tmp_path).out)
    job = next(f["content"] for s in plan["steps"] for f in s["files"] if f["path"].endswith("train-train.json"))
    lora = json.loads(job)["train"]["lora"]
    assert lora["use_dora"] is True and lora["use_rslora"] is True
