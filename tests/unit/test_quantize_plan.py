"""Issue #19: the quantize step (llm-compressor W4A16) and the memory fit of serving.

Pure planning: the step's command, image, GPU and outputs; `model: quantized` on serve and
eval; located refusals (recipe checks, a local Python without llm-compressor, a served model
too big for its GPU, naming the quantize step); the serving and quantizing estimates against
figures worked by hand; the Mistral guide recipe planning merge -> quantize -> serve within
GPU 1. The engine itself runs in tests/e2e/test_quickstart_quantize.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftkit.plan import servefit
from ftkit.plan.figures import find_arch
from ftkit.plan.memory import NF4_BYTES
from tests import builders as b
from tests.builders import CPU_DOCKER, machine_file, plan_json, recipe_file, step
from tests.conftest import RECIPES, run_cli

MISTRAL = find_arch("mistralai/Mistral-Small-24B-Instruct-2501")
QUICK = RECIPES / "quickstart-quantize.yaml"
ZORAC = RECIPES / "machines" / "zorac.yaml"
MISTRAL_RECIPE = RECIPES / "mistral-small-24b-qlora-2x24gb.yaml"

TRAIN_MERGE = "  - {type: train, method: lora, max_steps: 1}\n  - {type: merge}\n"


def recipe(tmp: Path, steps: str, hidden: int = 128) -> Path:
    return recipe_file(tmp, name="q", model={"tiny": {"hidden_size": hidden, "heads": 4, "intermediate_size": 256}},
                       steps=TRAIN_MERGE + steps)


# --------------------------------------------------------------------------- the step


def test_the_quickstart_quantize_plan_in_the_images() -> None:
    """tiny -> train -> merge -> quantize (the quantize image, on the CPU) -> vLLM's CPU build
    serving the 4-bit directory -> eval of merged against quantized in the quantize image."""
    p = plan_json(QUICK, CPU_DOCKER)
    assert [s["kind"] for s in p["steps"]] == ["tiny-model", "train", "merge", "quantize", "serve", "eval"]
    q = step(p, "quantize")
    assert q["image"].startswith("ftkit/quantize:cpu-")
    assert q["argv"] == ["python", "-m", "ftkit.engines.quantize", "--config", "/ftkit/run/configs/quantize-quantize.json"]
    assert q["outputs"] == {"model": "steps/quantize/model", "summary": "steps/quantize/quantize.json"}
    assert q["gpus"] == [] and q["lease"] is None and q["env"]["CUDA_VISIBLE_DEVICES"] == ""
    job = json.loads(q["files"][0]["content"])
    assert job["model_dir"] == "/ftkit/run/steps/merge/model" and job["output_dir"] == "/ftkit/run/steps/quantize/model"
    assert job["quantize"]["method"] == "gptq" and job["quantize"]["scheme"] == "W4A16"
    assert job["quantize"]["calibration_samples"] == 64 and job["quantize"]["ignore"] == ["lm_head"]
    assert job["dataset"]["path"].startswith("/ftkit/inputs/dataset/")
    from ftkit.plan.jobs import QuantizeJob

    QuantizeJob.model_validate(job)  # what the engine validates at its entry
    serve = step(p, "serve")
    assert serve["image"].startswith("ftkit/serve:vllm-cpu-")
    assert serve["argv"][serve["argv"].index("--model") + 1] == "/ftkit/run/steps/quantize/model"
    assert "--dtype" not in serve["argv"]  # the 4-bit kernels compute in 16-bit: vLLM's own choice
    ev = step(p, "eval")
    assert ev["image"] == q["image"]  # compressed-tensors is there, not in the train image
    cfg = json.loads(ev["files"][0]["content"])
    assert cfg["eval"]["models"] == ["merged", "quantized"]
    assert cfg["quantized"] == {"quantize": "/ftkit/run/steps/quantize/model"}
    assert step(p, "train")["image"].startswith("ftkit/train:cpu-")


def test_the_plan_text_says_what_the_quantize_step_does() -> None:
    result = run_cli("plan", str(QUICK), "--machine", str(CPU_DOCKER))
    assert result.code == 0, result.err
    out = result.out
    assert "quantize the merged model of merge to W4A16 with llm-compressor (GPTQ) on the CPU" in out
    assert "writes configs/quantize-quantize.json: GPTQ W4A16; up to 64 calibration rows of 128 tokens; 16-bit: lm_head" in out
    assert "runs in the quantize image: llm-compressor pins transformers 5.17" in out
    assert "quantize on CPU:" in out and "calibrates on the CPU: every figure is host RAM" in out
    assert "serve the quantized model (W4A16) with vllm (CPU build)" in out


def test_local_quantize_needs_llm_compressor_in_this_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local executor runs the engine with this Python: without llmcompressor (it pins its
    own transformers) the plan is refused, located at the step, naming --executor docker."""
    from ftkit import prepare

    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"llmcompressor": None, "compressed-tensors": None})
    result = run_cli("plan", str(QUICK), "--machine", str(RECIPES / "machines" / "cpu.yaml"))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert any(line.startswith(f"{QUICK}:42:5: steps[2]: llm-compressor is not installed") and "--executor docker" in line
               for line in lines), result.err
    assert any(":60:13: steps[4].models: scoring the quantized model needs compressed-tensors" in line
               for line in lines), result.err
    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"llmcompressor": "0.14.0.1",
                                                               "compressed-tensors": "0.19.0"})
    p = plan_json(QUICK, RECIPES / "machines" / "cpu.yaml")
    q = step(p, "quantize")
    assert q["executor"] == "local" and q["argv"][1:3] == ["-m", "ftkit.engines.quantize"] and q["image"] is None


BAD = {
    "no merge before it": ("  - {type: quantize, merge: nope}\n", "steps[2].merge",
                           "quantize needs merge step 'nope' before it"),
    "a tiny model W4A16 cannot group": ("  - {type: quantize}\n", "model.tiny.hidden_size",
                                        "64: W4A16 quantizes each Linear in groups of 128 inputs"),
    "a bad ignore pattern": ("  - {type: quantize, ignore: ['re:(a+)+$']}\n", "steps[2].ignore[0]",
                             "a quantifier inside a repeated group"),
    "serving quantized without a quantize step": ("  - {type: serve, model: quantized}\n", "steps[2].model",
                                                  "serving the quantized model needs a quantize step"),
    "quantized on transformers serve": ("  - {type: quantize}\n  - {type: serve, model: quantized, engine: transformers}\n",
                                        "steps[3].engine", "is served by vLLM"),
    "quantized with in-flight quantization": (
        "  - {type: quantize}\n  - {type: serve, model: quantized, args: {quantization: bitsandbytes}}\n",
        "steps[3].args.quantization", "carries its own quantization"),
    "eval of quantized without a quantize step": ("  - {type: eval, prompts: [{prompt: a, expected: b}], "
                                                  "models: [merged, quantized]}\n", "steps[2].models[1]",
                                                  "no quantize step before this one"),
    "eval of quantized and the adapter": ("  - {type: quantize}\n  - {type: eval, prompts: [{prompt: a, expected: b}], "
                                          "models: [adapter, quantized]}\n", "steps[3].models[0]",
                                          "score the adapter in an eval step of its own"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_quantize_steps_are_located(tmp_path: Path, case: str) -> None:
    steps, where, says = BAD[case]
    hidden = 64 if case == "a tiny model W4A16 cannot group" else 128
    result = run_cli("validate", str(recipe(tmp_path, steps, hidden)))
    assert result.code == 2, result.out
    assert any(f": {where}: " in line and says in line for line in result.err.splitlines()), result.err


def test_a_good_quantize_recipe_validates(tmp_path: Path) -> None:
    steps = ("  - {type: quantize, method: awq, calibration_samples: 8}\n  - {type: serve, model: quantized}\n"
             "  - {type: eval, prompts: [{prompt: a, expected: b}], models: [base, merged, quantized]}\n")
    result = run_cli("validate", str(recipe(tmp_path, steps)))
    assert result.code == 0, result.err


# --------------------------------------------------------------------------- serving fit


def test_weights_by_form_worked_by_hand() -> None:
    assert MISTRAL is not None
    params = MISTRAL.params_b * 1e9
    emb = 2 * MISTRAL.vocab_size * MISTRAL.hidden_size  # untied: embed_tokens and lm_head
    norms = (2 * MISTRAL.layers + 1) * MISTRAL.hidden_size
    linear = params - emb - norms
    assert servefit.weight_bytes(MISTRAL, "bf16") == pytest.approx(params * 2)
    assert servefit.weight_bytes(MISTRAL, "fp32") == pytest.approx(params * 4)
    # 4 bits and a 16-bit scale per group of 128; embeddings, lm_head and norms stay 16-bit
    assert servefit.weight_bytes(MISTRAL, "w4a16") == pytest.approx(linear * (0.5 + 2 / 128) + (emb + norms) * 2)
    assert servefit.weight_bytes(MISTRAL, "bnb4") == pytest.approx(linear * NF4_BYTES + (emb + norms) * 2)
    assert servefit.weight_bytes(MISTRAL, "fp8") == pytest.approx(linear + (emb + norms) * 2)
    # Mistral-Small's attention heads are 128 wide (not 5120/32): K and V of 8 heads, 40 layers
    assert servefit.kv_bytes_per_token(MISTRAL) == 2 * 40 * 8 * 128 * 2
    assert servefit.kv_bytes_per_token(MISTRAL, "fp8_e4m3") == 2 * 40 * 8 * 128


@pytest.mark.parametrize(("model", "args", "form"), [
    ("quantized", {}, "w4a16"), ("merged", {"quantization": "bitsandbytes"}, "bnb4"),
    ("merged", {"quantization": "fp8"}, "fp8"), ("merged", {"quantization": "awq_marlin"}, "w4a16"),
    ("merged", {}, "bf16"), ("base", {"dtype": "float16"}, "fp16"),
])
def test_the_served_form(model: str, args: dict, form: str) -> None:
    assert servefit.served_form(model, "bf16", args) == form


def test_a_16_bit_24b_does_not_fit_a_24_gib_card_and_names_the_quantize_step() -> None:
    assert MISTRAL is not None
    args = {"max_model_len": 8192, "gpu_memory_utilization": 0.9}
    [bf16] = servefit.serve_fit(MISTRAL, "bf16", gpus=[1], vram={1: 24.0}, args=args, engine="vllm", platform="cuda",
                                dtype="bf16", quantize_hint="add a quantize step")
    assert bf16.verdict == "does not fit" and bf16.components_gib["weights"] == pytest.approx(43.9, abs=0.05)
    assert bf16.suggestions[0].startswith("add a quantize step -> weights ~13.2 GiB per GPU, room for 4 sequence(s)")
    [w4] = servefit.serve_fit(MISTRAL, "w4a16", gpus=[1], vram={1: 24.0}, args=args, engine="vllm", platform="cuda",
                              dtype="bf16", quantize_hint=None)
    assert w4.verdict == "fits" and w4.total_gib == pytest.approx(21.6, abs=0.01)  # the whole budget: the KV cache takes the rest
    assert "4 sequence(s) of max_model_len 8192" in w4.notes[-1]
    # asking for more full-length sequences than the cache holds starts, but tight
    [tight] = servefit.serve_fit(MISTRAL, "w4a16", gpus=[1], vram={1: 24.0}, args={**args, "max_num_seqs": 8},
                                 engine="vllm", platform="cuda", dtype="bf16", quantize_hint=None)
    assert tight.verdict == "tight" and tight.suggestions[0].startswith("max_num_seqs: 5")  # a smaller batch, smaller sampler logits
    # tensor parallel over two cards halves the weights and the KV cache per GPU
    two = servefit.serve_fit(MISTRAL, "bf16", gpus=[0, 1], vram={0: 24.0, 1: 24.0}, args=args, engine="vllm",
                             platform="cuda", dtype="bf16", quantize_hint=None)
    assert [e.components_gib["weights"] for e in two] == [pytest.approx(21.95, abs=0.05)] * 2


def test_the_mistral_guide_plans_merge_quantize_serve_within_gpu_1() -> None:
    p = plan_json(MISTRAL_RECIPE, ZORAC)
    kinds = [s["kind"] for s in p["steps"]]
    assert kinds == ["power", "handoff-stop", "train", "merge", "quantize", "power-restore", "serve",
                     "handoff-start", "power-restore"]
    assert step(p, "quantize")["power_caps_w"] == {"0": 350, "1": 350}  # still under the caps
    q = step(p, "quantize")
    assert q["image"].startswith("ftkit/quantize:cuda13.0-") and q["gpus"] == [0]
    assert q["lease"]["role"] == "train" and q["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    serve = step(p, "serve")
    assert serve["argv"][serve["argv"].index("--model") + 1] == "/ftkit/run/steps/quantize/model"
    assert "--quantization" not in serve["argv"] and serve["gpus"] == [1]
    [fit] = p["fit"]["serve"]
    assert fit["gpu"] == 1 and fit["verdict"] == "fits" and fit["components_gib"]["weights"] < 13.5
    [qfit] = p["fit"]["quantize"]
    assert qfit["gpu"] == 0 and qfit["verdict"] == "fits" and qfit["total_gib"] < 16
    assert "host RAM" in qfit["notes"][0]
    result = run_cli("validate", str(MISTRAL_RECIPE), "--machine", str(ZORAC))
    assert result.code == 0, result.err


def test_a_merged_24b_served_on_one_24_gib_card_is_refused_naming_quantize(tmp_path: Path) -> None:
    doc = yaml.safe_load(MISTRAL_RECIPE.read_text())
    doc["dataset"]["path"] = "data.jsonl"
    doc["steps"] = [s for s in doc["steps"] if s["type"] != "quantize"]
    serve = next(s for s in doc["steps"] if s["type"] == "serve")
    serve["model"] = "merged"
    row = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    (tmp_path / "data.jsonl").write_text((row + "\n") * 40)
    path = tmp_path / "mistral.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_cli("validate", str(path), "--machine", str(ZORAC))
    assert result.code == 2
    line = next(x for x in result.err.splitlines() if "does not fit GPU 1" in x)
    assert ": steps[4].model: the merged model does not fit GPU 1 (24 GiB)" in line
    assert "add a quantize step after 'merge' and serve model: quantized" in line
    text = run_cli("plan", str(path), "--machine", str(ZORAC))
    assert text.code == 0 and "serve on GPU 1 (24 GiB):" in text.out and "-> does not fit" in text.out


def test_quantize_peak_worked_by_hand() -> None:
    """GPTQ on a GPU: one layer in 16-bit, an fp32 Hessian per Linear (in x in) and one more for
    the inversion, one row's activations, the CUDA context; the model itself in host RAM."""
    assert MISTRAL is not None
    device, host = servefit.quantize_parts(MISTRAL, method="gptq", dtype="bf16", samples=128, seq_len=512, on_gpu=True)
    h, i, q_out = 5120, 32768, 32 * 128
    assert device["hessians"] == pytest.approx(4 * (5 * h * h + q_out * q_out + i * i))
    assert device["hessian_inverse"] == pytest.approx(4 * i * i)
    assert host["model"] == pytest.approx(MISTRAL.params_b * 1e9 * 2)
    assert host["activation_cache"] == pytest.approx(128 * 512 * h * 2 * 2)
    [cpu] = servefit.quantize_fit(MISTRAL, method="gptq", dtype="bf16", samples=128, seq_len=512, gpus=[], vram={},
                                  ram_gib=32)
    assert cpu.gpu is None and cpu.verdict == "does not fit"  # 44 GiB of bf16 weights in 32 GiB of RAM


# --------------------------------------------------------------------------- images and stacks


def test_the_quantize_image_is_its_own_with_a_lock_per_variant() -> None:
    from ftkit.images import builder, project, reqlock
    from ftkit.images.variants import DEFAULT_VARIANT, GPU_VARIANT, load

    root = project.find_root()
    assert DEFAULT_VARIANT["quantize"] == "cpu" and GPU_VARIANT["quantize"] == "cuda13.0"
    for variant in ("cpu", "cuda13.0"):
        v = load(root).get("quantize", variant)
        lock = reqlock.verify(root, "quantize", v).requirements()
        assert lock["llmcompressor"] == "0.14.0.1" and lock["compressed-tensors"] == "0.19.0"
        assert lock["transformers"] == "5.17.0"
        assert builder.plan_build(root, "quantize", variant).tag.startswith(f"ftkit/quantize:{variant}-")
    train = reqlock.verify(root, "train", load(root).get("train", "cpu")).requirements()
    serve = reqlock.verify(root, "serve", load(root).get("serve", "vllm-cpu")).requirements()
    # why it is an image of its own: neither lock has what llm-compressor pins
    assert train["transformers"] != "5.17.0" and serve["compressed-tensors"] != "0.19.0"


def test_the_quickstart_quantize_renders_as_a_stack(tmp_path: Path) -> None:
    result = run_cli("compose", str(QUICK), "--machine", str(CPU_DOCKER), "-o", str(tmp_path / "stack"))
    assert result.code == 0, result.err
    compose = yaml.safe_load((tmp_path / "stack" / "compose.yaml").read_text())
    services = compose["services"]
    # its own image variable (a one-shot of the train profile), built by its own command
    assert services["quantize"]["image"] == services["eval"]["image"] == "${FTKIT_QUANTIZE_IMAGE}"
    assert services["train"]["image"] == "${FTKIT_TRAIN_IMAGE}" and services["serve"]["image"] == "${FTKIT_SERVE_IMAGE}"
    env = (tmp_path / "stack" / ".env").read_text()
    assert "\nFTKIT_QUANTIZE_IMAGE=ftkit/quantize:cpu-" in env
    readme = (tmp_path / "stack" / "README.md").read_text()
    assert "ftkit build --image quantize --variant cpu" in readme


# --------------------------------------------------------------------------- running it


@pytest.mark.parametrize(("files", "says"), [
    ({}, "left no model at steps/q/model"),
    ({"steps/q/model/config.json": b"{}", "steps/q/quantize.json": b"{}"},
     "left no model at steps/q/model (no config and safetensors weights in it)"),
    ({"steps/q/model/config.json": b"{}", "steps/q/model/model.safetensors": b"x"},
     "left no summary at steps/q/quantize.json"),
    ({"steps/q/model/config.json": b"{}", "steps/q/model/model.safetensors": b"x",
      "steps/q/quantize.json": b'{"method": "gptq", "scheme": "W4A16", "rows": 64, "input_bytes": 863640, '
                               b'"output_bytes": 380416}'}, None),
])
def test_a_quantize_step_that_exits_0_without_its_model_failed(tmp_path: Path, files: dict, says: str | None) -> None:
    from tests.unit.test_runner import execute, plan_of
    from tests.unit.test_runner import step as runner_step
    from tests.unit.test_step_outputs import writes

    outputs = {"model": "steps/q/model", "summary": "steps/q/quantize.json"}
    plan = plan_of(tmp_path, runner_step("q", writes(tmp_path / "run", files), kind="quantize", outputs=outputs))
    result, console, st = execute(tmp_path, plan)
    if says is None:
        assert result.status == "succeeded", st["steps"]["q"]
        # the step's last line says what it made
        assert "q: ok in" in console and "(GPTQ W4A16 on 64 rows, 863.64 kB -> 380.42 kB on disk)" in console
    else:
        assert result.status == "failed" and f"the step exited 0 but {says}" in st["steps"]["q"]["error"]


def test_resume_refuses_a_local_quantize_without_llm_compressor(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ftkit up --resume` has only the plan: the same refusal, from plan.json."""
    from ftkit import prepare
    from ftkit.errors import PlanError
    from ftkit.run import preflight

    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"llmcompressor": "0.14.0.1",
                                                               "compressed-tensors": "0.19.0"})
    plan = prepare.prepare(str(QUICK), str(RECIPES / "machines" / "cpu.yaml"), run_dir="/runs/r").plan
    preflight.engines_of_plan(plan)  # installed: nothing to say
    monkeypatch.setattr(prepare, "quantize_packages", lambda: {"llmcompressor": None, "compressed-tensors": None})
    with pytest.raises(PlanError, match="step quantize: llm-compressor is not installed"):
        preflight.engines_of_plan(plan)


# --------------------------------------------------------------------------- review: fits that said the wrong thing

LLAMA = find_arch("meta-llama/Llama-3.1-8B-Instruct")
SHARDED = RECIPES / "llama31-8b-lora-sharded.yaml"


def _fit(args: dict, arch=LLAMA, gpus=(1,), vram=24.0, form="bf16"):  # type: ignore[no-untyped-def]
    return servefit.serve_fit(arch, form, gpus=list(gpus), vram={g: vram for g in gpus}, args=args, engine="vllm",
                              platform="cuda", dtype="bf16", quantize_hint=None)


def test_max_model_len_with_vllms_suffixes_is_the_length_vllm_serves() -> None:
    """"8k" is 8000 tokens to vLLM (K: 8192); it used to be read as unset, so the fit took the
    model's 131072 and refused a server that starts."""
    [k] = _fit({"max_model_len": "8k", "gpu_memory_utilization": 0.9})
    assert k.verdict == "fits" and "4 sequence(s) of max_model_len 8000" in k.notes[-1]
    [big_k] = _fit({"max-model-len": "8K"})
    assert "max_model_len 8192" in big_k.notes[-1]


def test_max_model_len_auto_is_lowered_to_what_the_cache_holds() -> None:
    """-1 / auto: vLLM 0.32 fits the context to its KV cache, so no refusal; the plan says
    how far it comes down."""
    for value in ("auto", -1):
        [e] = _fit({"max_model_len": value})
        assert e.verdict == "tight" and "vLLM lowers the context to ~38825 tokens" in e.notes[-1], e.notes
        assert e.total_gib == pytest.approx(21.6, abs=0.01)  # the budget: the cache is what is left


def test_a_budget_the_card_cannot_give_after_the_cuda_context_does_not_fit(tmp_path: Path) -> None:
    """vLLM asks for gpu_memory_utilization x VRAM free at start-up; the CUDA context has taken
    its part by then, so 1 (and 0.97 of 24 GiB) never starts. 0 no longer becomes the default."""
    for util in (1, 0.97):
        [e] = _fit({"max_model_len": 8192, "gpu_memory_utilization": util})
        assert e.verdict == "does not fit", e
        assert any(n.startswith("needs its budget of") and "CUDA context" in n for n in e.notes), e.notes
        assert e.suggestions == ["gpu_memory_utilization: 0.95 or less"]
    [ok] = _fit({"max_model_len": 8192, "gpu_memory_utilization": 0.95})
    assert ok.verdict == "fits"
    doc = yaml.safe_load(SHARDED.read_text())
    doc["steps"][-1]["args"]["gpu_memory_utilization"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_cli("validate", str(tmp_path / "r.yaml"), "--machine", str(RECIPES / "machines" / "dual-4090.yaml"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert ": steps[4].model: the merged model does not fit GPU 1 (24 GiB): it needs its budget of 24.0 GiB" \
        in result.err and "try: gpu_memory_utilization: 0.95 or less" in result.err.lower(), result.err


def test_kv_heads_split_over_tensor_parallel_gpus_at_least_one_each() -> None:
    """vLLM replicates a KV head over the GPUs that share it: with 2 KV heads on 4 GPUs each
    holds one, not half of one."""
    import dataclasses

    assert LLAMA is not None and MISTRAL is not None
    two = dataclasses.replace(LLAMA, kv_heads=2)
    per_head = 2 * 32 * 128 * 2  # K and V of 32 layers, 128 wide, bf16
    assert [servefit.kv_bytes_per_token(two, tp=tp) for tp in (1, 2, 4)] == [2 * per_head, per_head, per_head]
    assert servefit.kv_bytes_per_token(MISTRAL, tp=2) == 2 * 40 * 4 * 128 * 2
    fits = servefit.serve_fit(two, "bf16", gpus=[0, 1, 2, 3], vram={g: None for g in range(4)},
                              args={"max_model_len": 8192}, engine="vllm", platform="cuda", dtype="bf16",
                              quantize_hint=None)
    assert {e.components_gib["kv_cache_one_sequence"] for e in fits} == {round(per_head * 8192 / 2**30, 2)}


def _quantize_8b(tmp_path: Path, gpu: str, ram: int) -> tuple[Path, Path]:
    doc = yaml.safe_load(SHARDED.read_text())
    doc["steps"] = [s for s in doc["steps"] if s["type"] in ("train", "merge")] + [{"type": "quantize", "gpus": [0]}]
    (tmp_path / "baseline-slice.jsonl").write_text((json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n") * 200)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    machine = tmp_path / "m.yaml"
    machine.write_text(f"ftkit: 1\nkind: machine\nname: m\nexecutor: docker\nram_gib: {ram}\n"
                       f"paths: {{datasets: {tmp_path}}}\ngpus:\n  - {{index: 0, {gpu}}}\n")
    return path, machine


@pytest.mark.parametrize(("gpu", "ram", "field", "says", "not_said"), [
    # VRAM unknown, 8 GiB of RAM: the plan used to crash formatting the GPU's VRAM
    ("model: Mystery GPU", 8, "type", "it needs host RAM 16.5 GiB of 8 GiB", "on GPU"),
    # a 24 GiB card with room: only host RAM is short (it used to say "on GPU 0 (24 GiB): does not fit")
    ("model: RTX 4090", 8, "type", "it needs host RAM 16.5 GiB of 8 GiB", "GPU 0"),
    # both short: both said
    ("model: Small GPU, vram_gib: 2", 8, "gpus", "on GPU 0 (2 GiB) and host RAM 16.5 GiB of 8 GiB", "Traceback"),
    ("model: Small GPU, vram_gib: 2", 64, "gpus", "it needs an estimated", "host RAM 16.5"),
])
def test_a_quantize_step_that_does_not_fit_says_what_is_short(tmp_path: Path, gpu: str, ram: int, field: str,
                                                               says: str, not_said: str) -> None:
    recipe_path, machine = _quantize_8b(tmp_path, gpu, ram)
    result = run_cli("validate", str(recipe_path), "--machine", str(machine))
    assert result.code == 2 and "Traceback" not in result.err, result.out + result.err
    [line] = [ln for ln in result.err.splitlines() if ": steps[2]." in ln]  # (a 2 GiB card refuses the train step too)
    assert line.startswith(f"{recipe_path}:") and f": steps[2].{field}: quantizing does not fit: " in line, line
    assert says in line and not_said not in line, line
    dry = run_cli("up", str(recipe_path), "--machine", str(machine), "--dry-run")  # it used to crash too
    assert dry.code == 0 and "`ftkit up` would refuse this plan" in dry.out and line in dry.out, dry.out + dry.err


def test_w4a16_groups_in_model_arch_are_checked_at_validate(tmp_path: Path) -> None:
    path = recipe(tmp_path, "  - {type: quantize}\n")
    text = path.read_text().replace(
        "model: {tiny: {hidden_size: 128, layers: 1, heads: 4, intermediate_size: 256, vocab_size: 300}, dtype: fp32}",
        "model: {tiny: {hidden_size: 128, layers: 1, heads: 4, intermediate_size: 256, vocab_size: 300}, dtype: fp32,\n"
        "        arch: {params_b: 1, layers: 2, hidden_size: 4000, intermediate_size: 11000, vocab_size: 300}}")
    path.write_text(text)
    result = run_cli("validate", str(path))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert any(": model.arch.hidden_size: 4000: W4A16 quantizes each Linear in groups of 128" in ln for ln in lines)
    assert any(": model.arch.intermediate_size: 11000: W4A16" in ln and "(use 11008)" in ln for ln in lines), lines


def _local_model(tmp_path: Path, **config: int) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    cfg = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 256, "vocab_size": 300, "max_position_embeddings": 256, **config}
    (model / "config.json").write_text(json.dumps(cfg))
    path = recipe(tmp_path, "  - {type: quantize}\n")
    path.write_text(path.read_text().replace(
        "model: {tiny: {hidden_size: 128, layers: 1, heads: 4, intermediate_size: 256, vocab_size: 300}, dtype: fp32}",
        "model: {path: model, dtype: fp32}"))
    return path


def test_w4a16_groups_of_a_local_models_config_are_checked_with_the_machine(tmp_path: Path) -> None:
    path = _local_model(tmp_path, intermediate_size=300)
    assert run_cli("validate", str(path)).code == 0  # the recipe alone does not know the layer sizes
    result = run_cli("validate", str(path), "--machine", str(CPU_DOCKER))
    assert result.code == 2, result.err
    assert ": model.path: config.json: intermediate_size (the input of down_proj) 300 is not a multiple of 128" \
        in result.err and "quantize step 'quantize'" in result.err, result.err
    (tmp_path / "ok").mkdir()
    ok = _local_model(tmp_path / "ok")  # 128 and 256: whole groups
    assert run_cli("validate", str(ok), "--machine", str(CPU_DOCKER)).code == 0


def test_a_4_bit_model_served_over_gpus_needs_whole_groups_per_gpu(tmp_path: Path) -> None:
    """Row-parallel layers (o_proj, down_proj) split their inputs over the GPUs: 128 inputs
    over 2 GPUs are 64 each, less than one group (vLLM's Marlin refuses)."""
    steps = "  - {type: quantize, gpus: [0]}\n  - {type: serve, model: quantized, engine: vllm, gpus: GPUS}\n"
    machine = machine_file(tmp_path, file="two.yaml", name="two", executor="docker",
                           gpus=b.gpus("RTX 4090", "RTX 4090"))
    result = run_cli("validate", str(recipe(tmp_path, steps.replace("GPUS", "[0, 1]"))), "--machine", str(machine))
    assert result.code == 2, result.err
    line = next(ln for ln in result.err.splitlines() if "o_proj" in ln)
    assert ": steps[3].gpus: num_attention_heads x head_dim (the input of o_proj) 128 is 64 per GPU over 2 GPUs" in line
    assert "down_proj" not in result.err  # 256 over 2 is 128: whole groups
    assert run_cli("validate", str(recipe(tmp_path, steps.replace("GPUS", "[1]"))), "--machine", str(machine)).code == 0
