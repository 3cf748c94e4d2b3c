"""Stage 4: Resolved recipe x machine -> Plan. Pure: no files, no processes, no clock.

The same plan drives both executors. `local` runs steps in this Python environment with
host paths; `docker` runs them in the ftkit images with the run directory and inputs
mounted at fixed places under /ftkit, so the argv inside a container never depends on the
host's layout.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ftkit.dockerhost import DockerHostError, parse_docker_host
from ftkit.plan import cluster as cluster_plan
from ftkit.plan import launch, memory, power, servefit, serving
from ftkit.plan.figures import ModelArch, find_arch, find_gpu
from ftkit.plan.jobs import EvalJob, PreferenceJob, QuantizeJob, TinyJob, TrainJob
from ftkit.plan.spec import (
    ClusterInfo,
    DockerSettings,
    ExecutorKind,
    GeneratedFile,
    LeaseSpec,
    Mount,
    Plan,
    Ready,
    StepSpec,
    TelemetrySettings,
    run_label,
)
from ftkit.recipe import tracking
from ftkit.recipe.models import (
    Cluster,
    EvalStep,
    Harness,
    LoadAdapterStep,
    Machine,
    MergeStep,
    PowerStep,
    PreferenceStep,
    QuantizeStep,
    Recipe,
    ServeStep,
    Serving,
    TinyModel,
    TrainStep,
)
from ftkit.recipe.resolve import Resolved, ResolvedQuantizeStep, ResolvedServeStep, ResolvedTrainStep

CONTAINER_ROOT = PurePosixPath("/ftkit")
RUN_LAYOUT = {
    "recipe.resolved.yaml": "the recipe with every default filled in",
    "plan.json": "this plan",
    "command.txt": "the ftkit command line that started the run",
    "env.json": "Python, ftkit and package versions, Docker version, GPU inventory",
    "state.json": "the journal: each step's status, times, process or container; ftkit's pid (written atomically)",
    "configs/": "generated accelerate, DeepSpeed and engine configs",
    "logs/": "one log per step (logs/ftkit.log: ftkit's own errors)",
    "telemetry.csv": "GPU and host samples beside every GPU step (DCGM field names, wall-clock times)",
    "model/": "the generated tiny base model (tiny recipes only)",
    "steps/<train>/": "checkpoints/ (quarantine/ for interrupted saves), adapter/, metrics.jsonl, tensorboard/",
    "steps/<merge>/model/": "the merged model (sharded safetensors)",
    "steps/<quantize>/": "model/ (4-bit W4A16, compressed-tensors), quantize.json (rows, seconds, peak memory, sizes)",
    "steps/<serve>/": "responses.jsonl: test prompts, answers, pass/fail",
    "steps/<eval>/": "results.jsonl and summary.json (with a harness: harness.json, lm-eval's own results)",
}


@dataclass
class Places:
    """Where things are as the step's process sees them (host or container paths)."""

    executor: ExecutorKind
    run_dir: str
    python: str
    hf_home: str | None

    def run(self, rel: str = "") -> str:
        base = str(CONTAINER_ROOT / "run") if self.executor == "docker" else self.run_dir
        return f"{base}/{rel}" if rel else base

    def cmd(self, module: str) -> list[str]:
        return ["python", "-m", module] if self.executor == "docker" else [self.python, "-m", module]


def arch_for(recipe: Recipe, local_config: dict[str, Any] | None = None) -> ModelArch | None:
    """Figures for the memory estimate: the recipe's override, the tiny spec, a local config,
    or the built-in catalog. An override without kv_heads takes the model's own (the
    catalog's for a known hub id, else the local config's); with neither, kv_heads = heads
    is an upper bound the serving fit says it assumed."""
    m = recipe.model
    if m.arch is not None:
        a = m.arch
        known = (find_arch(m.id) if m.id else None) or (config_arch(local_config) if local_config else None)
        heads = a.heads or max(a.hidden_size // 128, 1)
        kv = a.kv_heads or (min(known.kv_heads, heads) if known else None)
        return ModelArch(a.params_b, a.layers, a.hidden_size, a.intermediate_size or 4 * a.hidden_size, heads,
                         kv or heads, a.vocab_size, max_position=a.max_position_embeddings, kv_heads_assumed=kv is None)
    if m.tiny is not None:
        t = m.tiny
        h, i, v, n = t.hidden_size, t.intermediate_size, t.vocab_size, t.layers
        params = n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h
        return ModelArch(params / 1e9, n, h, i, t.heads, t.heads, v, max_position=t.max_position_embeddings)
    if local_config:
        return config_arch(local_config)
    if m.id:
        return find_arch(m.id)
    return None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def config_arch(c: dict[str, Any]) -> ModelArch | None:
    """A model's figures from its config.json (Llama/Mistral names); None when it lacks them.
    An explicit head_dim (Mistral-Small: 128, not hidden/heads) sizes q, k, v and o."""
    try:
        h = int(c["hidden_size"])
        n = int(c["num_hidden_layers"])
        i = int(c.get("intermediate_size", 4 * h))
        heads = int(c.get("num_attention_heads", max(h // 128, 1)))
        kv = int(c.get("num_key_value_heads", heads))
        v = int(c["vocab_size"])
        tied = bool(c.get("tie_word_embeddings", False))
    except (KeyError, TypeError, ValueError):
        return None
    if min(h, n, i, heads, kv, v) < 1:
        return None
    hd_set = _positive_int(c.get("head_dim"))
    hd = hd_set or h // heads
    params = n * (h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h) + v * h * (1 if tied else 2) + h
    return ModelArch(params / 1e9, n, h, i, heads, kv, v, tied, max_position=_positive_int(c.get("max_position_embeddings")),
                     kv_head_dim=hd_set)


def vram_by_gpu(res: Resolved) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for g in res.machine.gpus:
        if g.vram_gib is not None:
            out[g.index] = g.vram_gib
        else:
            cat = find_gpu(g.model)
            out[g.index] = cat.vram_gib if cat else None
    return out


def caps_of(step: PowerStep, gpus: list[int]) -> dict[int, int]:
    if isinstance(step.caps_w, dict):
        return dict(step.caps_w)
    if step.caps_w is None:
        return {}
    return {g: step.caps_w for g in gpus}


@dataclass
class PlanContext:
    """What planning every step shares: the resolved recipe and machine, where things are
    as the steps' processes see them, and what the steps planned so far left for the later
    ones (their outputs, the power caps in force, the handoff of a serving service). One
    planner per step type (PLANNERS) reads and extends it."""

    res: Resolved
    executor: ExecutorKind
    places: Places
    images: dict[str, str]
    lease_dir: str | None
    simulated_gpus: list[str] | None
    simulated_state: str | None
    vllm_local: bool  # vLLM is installed in the Python local steps run (engine auto picks it)
    arch: ModelArch | None
    tracked: dict[str, Any]  # the effective tracking (recipe.tracking over the machine's)
    mounts: list[Mount]  # docker: what every container mounts (the run and the inputs)
    inputs: dict[str, str]  # docker: each input's path inside the containers
    base_env: dict[str, str]
    model_cfg: dict[str, Any]  # the base model as the engines see it (jobs.ModelRef)
    steps: list[StepSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fit: dict[str, list[memory.FitEstimate]] = field(default_factory=dict)
    trains: dict[str, dict[str, str]] = field(default_factory=dict)  # train step -> its outputs and method
    qlora_precision: dict[str, str] = field(default_factory=dict)  # QLoRA train step -> its 4-bit base's precision
    merges: dict[str, str] = field(default_factory=dict)  # merge step -> its model, relative to the run
    quantized: dict[str, str] = field(default_factory=dict)  # quantize step -> its model, relative to the run
    caps_now: dict[int, int] = field(default_factory=dict)  # the power caps the power steps so far set
    serving_replaced: str | None = None  # the recipe's server that takes over the serving service's GPUs
    handoff_stopped: bool = False
    port_offset: int = 0  # the next multi-GPU train step's accelerate main_process_port above 29500
    cluster_info: ClusterInfo | None = None  # the multi-node steps' cluster (Plan.cluster)

    @property
    def recipe(self) -> Recipe:
        return self.res.recipe

    @property
    def machine(self) -> Machine:
        return self.res.machine

    @property
    def all_gpus(self) -> list[int]:
        return [g.index for g in self.machine.gpus]

    @property
    def run_id(self) -> str:
        return run_label(self.places.run_dir)

    @property
    def base_ref(self) -> str:
        return str(self.model_cfg.get("path") or self.model_cfg["id"])

    def input_path(self, key: str) -> str | None:
        """An input (dataset, eval file, model, ...) as the step's process sees it."""
        p = self.res.host_paths.get(key)
        if p is None:
            return None
        return self.inputs[key] if self.executor == "docker" else str(p)

    def visible(self, gpus: list[int]) -> str:
        """CUDA_VISIBLE_DEVICES: a container sees only its own devices, renumbered from 0; a
        host process sees all."""
        return ",".join(str(i) for i in range(len(gpus))) if self.executor == "docker" else ",".join(map(str, gpus))

    def lease(self, role: str, gpus: list[int], *, max_power_w: dict[int, int] | None = None,
              sleep_url: str | None = None) -> LeaseSpec | None:
        if not gpus:
            return None
        return LeaseSpec(role=role, gpus=list(gpus), max_power_w=dict(max_power_w or {}), sleep_url=sleep_url)

    def caps_for(self, gpus: list[int]) -> dict[int, int]:
        """The power caps in force on `gpus`: what the step's lease refuses to run above."""
        return {g: self.caps_now[g] for g in gpus if g in self.caps_now}

    def spec(self, s: StepSpec) -> StepSpec:
        """What every process step gets besides its own fields: the base environment, the
        lease's directory, the simulated GPUs; in a container the mounts, image and labels."""
        if s.executor not in ("local", "docker"):
            return s
        s.env = {**self.base_env, **s.env}
        container_lease = str(CONTAINER_ROOT / "lease")
        if s.lease is not None:
            s.env["FTKIT_LEASE_DIR"] = container_lease if s.executor == "docker" else (self.lease_dir or "")
            s.env["FTKIT_SERVICE"] = s.id
        if self.simulated_gpus and s.gpus:
            s.env["FTKIT_SIMULATED_GPUS"] = ",".join(self.simulated_gpus)
            if self.simulated_state and s.executor == "docker":  # the lease's backstops read the same GPUs
                s.env["FTKIT_SIMULATED_GPUS_STATE"] = str(CONTAINER_ROOT / "simulated-gpus.json")
        if s.executor == "docker":
            s.mounts = list(self.mounts)
            if s.lease is not None and self.lease_dir:
                s.mounts.append(Mount(self.lease_dir, container_lease, read_only=False))
            if self.simulated_gpus and s.gpus and self.simulated_state:
                s.mounts.append(Mount(self.simulated_state, str(CONTAINER_ROOT / "simulated-gpus.json"), read_only=False))
            s.image = s.image or self.images.get("train")
            s.labels = {"dev.ftkit.run": self.run_id, "dev.ftkit.step": s.id, "dev.ftkit.recipe": self.recipe.name}
            s.env.setdefault("HOME", "/tmp")  # containers run as the host user, who has no home there
        return s

    def add(self, s: StepSpec) -> StepSpec:
        """Plan one step (spec) and append it."""
        self.steps.append(self.spec(s))
        return s

    def serve_context(self) -> serving.ServeContext:
        recipe, tiny = self.recipe, self.recipe.model.tiny
        return serving.ServeContext(
            executor=self.executor, bind=self.machine.bind_address, base_ref=self.base_ref,
            model_dtype=recipe.model.dtype, model_head_dim=(tiny.hidden_size // tiny.heads) if tiny else None,
            simulated=bool(self.simulated_gpus), vllm_local=self.vllm_local, hf_home=self.places.hf_home,
            python=self.places.python, run=self.places.run, visible=self.visible, trains=self.trains,
            train_steps={s.name: s for s in recipe.steps if isinstance(s, TrainStep) and s.name},
            merges=self.merges,
            merge_dtypes={s.name: s.dtype for s in recipe.steps if isinstance(s, MergeStep) and s.name},
            quantized=self.quantized, images=self.images, live=serving.live_adapters(recipe), warnings=self.warnings)


def build_plan(
    res: Resolved,
    *,
    run_dir: str,
    python: str = "python",
    images: dict[str, str] | None = None,
    local_model_config: dict[str, Any] | None = None,
    executor: ExecutorKind | None = None,
    lease_dir: str | None = None,
    simulated_gpus: list[str] | None = None,
    simulated_state: str | None = None,
    vllm_local: bool = False,
) -> Plan:
    """`executor` overrides the profile's (`ftkit up --executor`); `lease_dir` is the host
    directory of the GPU lease; `simulated_gpus` names the GPUs of a machine that has none
    (tests, CI): containers then get no device requests and a simulated NVML; `vllm_local`
    says vLLM is installed in the Python the local executor runs (engine auto picks it)."""
    c = _context(res, run_dir=run_dir, python=python, images=images or {}, local_model_config=local_model_config,
                 executor=executor or res.machine.executor, lease_dir=lease_dir, simulated_gpus=simulated_gpus,
                 simulated_state=simulated_state, vllm_local=vllm_local)
    if c.recipe.model.tiny is not None:
        _plan_tiny_model(c, c.recipe.model.tiny)
    for step in c.recipe.steps:
        PLANNERS[step.type](c, step, step.name or step.type)
    _finish(c)
    machine = c.machine
    psu, psu_uncapped = power.plan_budgets(machine, c.steps)  # every power phase of the run
    return Plan(
        recipe=c.recipe.name,
        recipe_file=str(res.source),
        machine=machine.name,
        executor=c.executor,
        run_dir=run_dir,
        steps=c.steps,
        fit=c.fit,
        psu=psu,
        psu_uncapped=psu_uncapped,
        layout=dict(RUN_LAYOUT),
        warnings=c.warnings,
        python=python,
        lease_dir=lease_dir,
        docker=DockerSettings(host=machine.docker.host, base_image=machine.docker.base_image,
                              wheelhouse=machine.docker.wheelhouse, ca_bundle=machine.ca_bundle,
                              images_lock=machine.docker.images_lock, build_missing=machine.docker.build_missing)
        if c.executor == "docker" else None,
        telemetry=TelemetrySettings(enabled=machine.telemetry.enabled, interval_s=machine.telemetry.interval_s),
        simulated_gpus=list(simulated_gpus) if simulated_gpus else None,
        cluster=c.cluster_info,
        local_vllm=vllm_local,
    )


def _context(res: Resolved, *, run_dir: str, python: str, images: dict[str, str],
             local_model_config: dict[str, Any] | None, executor: ExecutorKind, lease_dir: str | None,
             simulated_gpus: list[str] | None, simulated_state: str | None, vllm_local: bool) -> PlanContext:
    """The planning context before the first step: inputs, mounts, the base environment and
    the base model as the engines see them."""
    recipe, machine = res.recipe, res.machine
    # Inputs the engines read. Docker mounts each one (a file or a directory) read-only at
    # /ftkit/inputs/<key>/<name>, so the container sees nothing else of the host.
    mounts: list[Mount] = []
    inputs: dict[str, str] = {}
    if executor == "docker":
        mounts.append(Mount(run_dir, str(CONTAINER_ROOT / "run"), read_only=False))
        for key, host_path in sorted(res.host_paths.items()):
            if key == "images_lock":
                continue  # read by the planner on the host, never by a step
            slot = CONTAINER_ROOT / "inputs" / key.replace(":", "-")
            inside = str(slot) if key == "model" else str(slot / host_path.name)
            inputs[key] = inside
            mounts.append(Mount(str(host_path), inside))
        if machine.paths.hf_cache:
            mounts.append(Mount(machine.paths.hf_cache, str(CONTAINER_ROOT / "hf-cache"), read_only=False))

    base_env: dict[str, str] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "TOKENIZERS_PARALLELISM": "false"}
    if executor == "docker" and machine.paths.hf_cache:
        base_env["HF_HOME"] = str(CONTAINER_ROOT / "hf-cache")
    elif machine.paths.hf_cache:
        base_env["HF_HOME"] = machine.paths.hf_cache
    if recipe.model.id is None and recipe.dataset.hub is None:
        base_env["HF_HUB_OFFLINE"] = "1"  # a local or generated model and local data: nothing to fetch

    places = Places(executor, run_dir, python, machine.paths.hf_cache)
    c = PlanContext(res=res, executor=executor, places=places, images=images, lease_dir=lease_dir,
                    simulated_gpus=simulated_gpus, simulated_state=simulated_state, vllm_local=vllm_local,
                    arch=arch_for(recipe, local_model_config),
                    tracked=tracking.effective(recipe.tracking, machine.tracking, recipe_name=recipe.name),
                    mounts=mounts, inputs=inputs, base_env=base_env,
                    model_cfg={"dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code})
    # Base model description for the engines.
    if recipe.model.tiny is not None:
        c.model_cfg.update(source="path", path=places.run("model"))
    elif recipe.model.path is not None:
        c.model_cfg.update(source="path", path=c.input_path("model"))
    else:
        c.model_cfg.update(source="hub", id=recipe.model.id, revision=recipe.model.revision)
    return c


# --------------------------------------------------------------------------- one planner per step type


def _plan_tiny_model(c: PlanContext, tiny: TinyModel) -> None:
    """A tiny recipe's first step: its base model, generated (no download)."""
    tiny_cfg = {"tiny": tiny.model_dump(), "dataset": _dataset_cfg(c), "output_dir": c.places.run("model")}
    c.add(StepSpec(
        id="tiny-model",
        kind="tiny-model",
        description="make a tiny random Llama and train its tokenizer on the dataset (no download)",
        executor=c.executor,
        argv=c.places.cmd("ftkit.engines.tiny") + ["--config", c.places.run("configs/tiny-model.json")],
        files=[GeneratedFile("configs/tiny-model.json", launch.dump_json(TinyJob.model_validate(tiny_cfg).to_json()))],
        outputs={"model": "model"},
    ))


def _plan_power(c: PlanContext, step: PowerStep, name: str) -> None:
    if step.restore:
        c.add(StepSpec(id=name, kind="power-restore", recipe_step=name, executor="nvml",
                       description="restore the power limits found at the start of the run", gpus=c.all_gpus))
        c.caps_now = {}
        return
    caps = caps_of(step, c.all_gpus)
    c.caps_now.update(caps)
    desc = ", ".join(f"GPU {g}: {w} W" for g, w in sorted(caps.items())) or "no GPUs on this machine"
    c.add(StepSpec(id=name, kind="power", recipe_step=name, executor="nvml", gpus=sorted(caps),
                   power_caps_w=caps, description=f"cap power before the work ({desc})"))


def _plan_train(c: PlanContext, step: ResolvedTrainStep, name: str) -> None:
    """A train step (and a preference step, which is one with its own engine and job): the
    accelerate (and DeepSpeed) configs, the engine's job, the launcher, its memory fit."""
    recipe, machine, places = c.recipe, c.machine, c.places
    gpus = list(step.gpus)
    train_notes = _handoff_before_train(c, step, gpus)
    if gpus and not c.caps_now and len(c.all_gpus) > 1:
        c.warnings.append(
            f"step {name}: trains on {len(gpus)} GPUs with no power caps set; "
            "the guides cap every GPU before multi-GPU training (add a power step)"
        )
    out_dir = f"steps/{name}"
    final = "model" if step.method == "full" else "adapter"
    outputs = {"adapter": f"{out_dir}/{final}", "checkpoints": f"{out_dir}/checkpoints",
               "metrics": f"{out_dir}/metrics.jsonl", "method": step.method}
    c.trains[name] = outputs
    if step.method == "qlora":
        c.qlora_precision[name] = step.precision
    files = []
    ds_rel = None
    ds_cfg = launch.deepspeed_config(step)
    if ds_cfg is not None:
        ds_rel = f"configs/deepspeed-{name}.json"
        files.append(GeneratedFile(ds_rel, launch.dump_json(ds_cfg)))
    acc_rel = f"configs/accelerate-{name}.yaml"
    cpu = bool(c.simulated_gpus)
    acc_cfg = launch.accelerate_config(step, deepspeed_file=places.run(ds_rel) if ds_rel else None, cpu=cpu)
    cluster = machine.cluster if step.nodes > 1 else None
    if cluster is not None:  # one config for every node; each node's rank comes as a flag (plan.cluster)
        acc_cfg = cluster_plan.accelerate_config(step, acc_cfg, cluster, cpu=cpu or not gpus,
                                                 deepspeed_file=places.run(ds_rel) if ds_rel else None)
    files.append(GeneratedFile(acc_rel, launch.dump_yaml(acc_cfg)))
    engine_cfg = {
        "model": c.model_cfg,
        "dataset": _dataset_cfg(c),
        "train": step.model_dump(mode="json"),
        "output_dir": places.run(out_dir),
        "metrics_path": places.run(outputs["metrics"]),
        "deepspeed_config": places.run(ds_rel) if ds_rel else None,
        "tracking": _tracking_job(c.tracked, places.run(f"{out_dir}/tensorboard"), f"{recipe.name}-{name}"),
    }
    cfg_rel = f"configs/train-{name}.json"
    engine = "ftkit.engines.train"
    if isinstance(step, PreferenceStep):  # the train step's launch, its own engine and job
        start = c.trains.get(step.adapter or "", {}).get("adapter")
        engine_cfg.update(pairs=_pairs_cfg(c, step, name), init_adapter=places.run(start) if start else None)
        cfg_rel, engine = f"configs/preference-{name}.json", "ftkit.engines.preference"
        job = PreferenceJob.model_validate(engine_cfg).model_dump(mode="json", exclude={"train": {"nodes"}})
    else:
        # the engine runs one process group either way: how many nodes it spans is the plan's business
        job = TrainJob.model_validate(engine_cfg).model_dump(mode="json", exclude={"train": {"nodes"}})
    files.append(GeneratedFile(cfg_rel, launch.dump_json(job)))
    if c.executor == "docker":
        launcher = ["accelerate", "launch", "--config_file", places.run(acc_rel)]
    else:
        launcher = [places.python, "-m", "accelerate.commands.launch", "--config_file", places.run(acc_rel)]
    if len(gpus) > 1 and cluster is None:
        launcher += ["--main_process_port", str(29500 + c.port_offset)]
        c.port_offset += 1
    argv = launcher + ["-m", engine, "--config", places.run(cfg_rel)]
    env = {"CUDA_VISIBLE_DEVICES": c.visible(gpus)}
    if step.method == "qlora":
        env["BNB_CUDA_VERSION"] = ""  # let bitsandbytes match torch's CUDA
    what = step.method
    if isinstance(step, PreferenceStep):
        src = f"{step.adapter}'s adapter" if step.adapter else "the base"
        what = f"{step.objective.upper()} preference ({step.method}, from {src})"
        train_notes.append(_preference_note(step))
    how = (f"{what} training on {len(gpus)} GPU(s) {gpus} with {step.distribution}" if gpus else
           f"{what} training on the CPU")
    if step.optimizer == "paged_adamw_8bit" and (not gpus or c.simulated_gpus):
        train_notes.append("paged_adamw_8bit on the CPU: bitsandbytes pages optimizer states only on CUDA; "
                           "here it runs as adamw_8bit (the same 8-bit states, nothing to page)")
    s = c.add(StepSpec(id=name, kind="train", recipe_step=name, executor=c.executor, argv=argv, env=env,
                       env_from_host=tracking.secret_names(c.tracked), gpus=gpus, files=files,
                       outputs=dict(outputs), power_caps_w=dict(c.caps_now),
                       lease=c.lease("train", gpus, max_power_w=c.caps_for(gpus)),
                       shm_size="8g" if len(gpus) > 1 else None, notes=train_notes, description=f"{how}",
                       max_steps=None if isinstance(step, PreferenceStep) else step.max_steps))
    if cluster is not None:
        _multinode(c, s, step, cluster)
    if c.arch is None:
        c.warnings.append(f"step {name}: no architecture figures for {recipe.model.id or recipe.model.path}; "
                          "add model.arch to get a memory estimate")
    else:
        c.fit[name] = memory.fit(step, c.arch, vram_by_gpu(c.res))
        split = [e for e in c.fit[name] if e.disagreement]
        if split:  # the component estimate and the guides' rule of thumb disagree about fitting
            also = f" (also GPU(s) {[e.gpu for e in split[1:]]})" if len(split) > 1 else ""
            c.warnings.append(f"step {name}: {split[0].disagreement}{also}")


def _handoff_before_train(c: PlanContext, step: ResolvedTrainStep, gpus: list[int]) -> list[str]:
    """The machine's serving service on this step's GPUs: a compose service yields through the
    lease (a note), another is stopped by a handoff-stop step before the first such step."""
    svc = c.machine.serving
    shared = sorted(set(svc.gpus) & set(gpus)) if svc else []
    notes: list[str] = []
    if svc and shared and step.handoff == "auto":
        if svc.manager == "compose":
            # The service runs under the lease as a preemptible `serve` holder: it yields
            # when this step waits for the GPUs and takes them back afterwards by itself.
            notes.append(f"GPU(s) {shared} come from service {svc.service!r} through the "
                         "lease: it yields while this step waits and comes back after")
        elif not c.handoff_stopped:
            c.steps.append(_handoff(svc, "stop", gpus))
            c.handoff_stopped = True
    return notes


def _plan_merge(c: PlanContext, step: MergeStep, name: str) -> None:
    places = c.places
    src = c.trains.get(step.adapter or "", {})
    out_rel = step.output or f"steps/{name}/model"
    c.merges[name] = out_rel
    argv = places.cmd("ftkit") + ["merge", "--base", c.base_ref, "--adapter", places.run(src.get("adapter", "")),
                                  "-o", places.run(out_rel), "--max-shard-gb", f"{step.max_shard_gb:g}"]
    if step.dtype is not None:  # otherwise the merge keeps the base's dtype
        argv[-2:-2] = ["--dtype", step.dtype]
    if c.model_cfg.get("source") == "hub":
        argv += ["--revision", str(c.recipe.model.revision)]
    if step.base == "nf4-dequantized":
        argv.append("--nf4-dequantized-base")
        # the base is rounded in the precision the train step quantized it in
        argv += ["--nf4-dtype", c.qlora_precision.get(step.adapter or "", "bf16")]
    c.add(StepSpec(id=name, kind="merge", recipe_step=name, executor=c.executor, argv=argv,
                   outputs={"model": out_rel},
                   description=f"merge adapter of {step.adapter} into the base, streaming tensor by tensor",
                   env={"CUDA_VISIBLE_DEVICES": ""}))


def _plan_quantize(c: PlanContext, step: ResolvedQuantizeStep, name: str) -> None:
    """The quantize step: llm-compressor's oneshot in the quantize image (or this Python), on
    its GPU under the lease like training (it holds a layer, the Hessians and the activations),
    on the CPU where the machine has none."""
    places = c.places
    images = c.images if c.executor == "docker" else {}
    out_rel = step.output or f"steps/{name}/model"
    c.quantized[name] = out_rel
    gpus = list(step.gpus)
    summary_rel = f"steps/{name}/quantize.json"
    job = QuantizeJob(model_dir=places.run(c.merges.get(step.merge or "", "")), dataset=_dataset_cfg(c),
                      quantize=step, output_dir=places.run(out_rel), summary_path=places.run(summary_rel))
    cfg_rel = f"configs/quantize-{name}.json"
    where = f"GPU {gpus[0]}" if gpus else "the CPU"
    notes = [f"calibrates on up to {step.calibration_samples} rows of the training data (fewer when it has fewer), "
             f"cut to {step.max_seq_len} tokens; leaves {', '.join(step.ignore) or 'nothing'} in 16-bit"]
    if images:
        notes.append("runs in the quantize image: llm-compressor pins transformers 5.17 and compressed-tensors 0.19, "
                     "which neither the train image (transformers 5.23) nor the serve image (compressed-tensors "
                     "0.17) has")
    image = images.get("quantize") or ("ftkit/quantize:<variant> (run ftkit build --image quantize)" if images else None)
    c.add(StepSpec(id=name, kind="quantize", recipe_step=name, executor=c.executor, image=image,
                   argv=places.cmd("ftkit.engines.quantize") + ["--config", places.run(cfg_rel)],
                   files=[GeneratedFile(cfg_rel, launch.dump_json(job.to_json()))],
                   outputs={"model": out_rel, "summary": summary_rel}, gpus=gpus,
                   env={"CUDA_VISIBLE_DEVICES": c.visible(gpus)}, power_caps_w=dict(c.caps_now), notes=notes,
                   lease=c.lease("train", gpus, max_power_w=c.caps_for(gpus)),
                   description=f"quantize the merged model of {step.merge} to {step.scheme} with llm-compressor "
                               f"({step.method.upper()}) on {where}, one layer at a time"))
    if c.arch is not None:
        c.fit[name] = servefit.quantize_fit(
            c.arch, method=step.method, dtype=_merged_dtype(c.recipe, step.merge), samples=step.calibration_samples,
            seq_len=step.max_seq_len, gpus=gpus, vram=vram_by_gpu(c.res), ram_gib=c.machine.ram_gib)


def _plan_serve(c: PlanContext, step: ResolvedServeStep, name: str) -> None:
    fields = serving.serve_step(step, name, c.serve_context())
    sleep_url = fields.pop("sleep_url")
    s = c.add(StepSpec(**fields, lease=c.lease("serve", fields["gpus"], sleep_url=sleep_url)))
    if c.arch is not None and s.platform == "cuda":  # on the CPU build: host RAM, not a GPU's budget
        c.fit[name] = _serve_fit(step, s, c.arch, c.recipe, vram_by_gpu(c.res))
    if c.machine.serving and step.keep_running and set(c.machine.serving.gpus) & set(step.gpus):
        c.serving_replaced = name


def _plan_load_adapter(c: PlanContext, step: LoadAdapterStep, name: str) -> None:
    server = next((s for s in c.steps if s.id == step.server and s.kind == "serve"), None)
    c.steps.append(serving.load_adapter_step(step, name, server, c.serve_context()))


def _plan_eval(c: PlanContext, step: EvalStep, name: str) -> None:
    places = c.places
    eval_cfg = {
        "model": c.model_cfg,
        "dataset": _dataset_cfg(c),
        "eval": step.model_dump(mode="json"),
        "prompts_path": c.input_path(f"eval:{name}"),
        "adapters": {k: places.run(v["adapter"]) for k, v in c.trains.items() if v["method"] != "full"},
        "merged": {k: places.run(v) for k, v in c.merges.items()},
        "full": {k: places.run(v["adapter"]) for k, v in c.trains.items() if v["method"] == "full"},
        "qlora": dict(c.qlora_precision),
        "quantized": {k: places.run(v) for k, v in c.quantized.items()},
        "output_dir": places.run(f"steps/{name}"),
    }
    cfg_rel = f"configs/eval-{name}.json"
    # compressed-tensors (to read the quantized model) is in the quantize image, not the train image
    eval_image = c.images.get("quantize") if "quantized" in step.models and c.executor == "docker" else None
    what = [f"score held-out prompts ({step.score}) on: {', '.join(step.models)}"] if step.models else []
    eval_notes: list[str] = []
    if step.harness is not None:
        eval_cfg["harness"] = _harness_job(c, step.harness, name)
        h = eval_cfg["harness"]
        what.append(f"run lm-evaluation-harness ({h['lm_eval_model']}) on {', '.join(step.harness.tasks)} "
                    f"against {h['server']}'s endpoint {h['base_url']} (model {h['model']})")
        eval_notes.append("lm-eval's own output goes to the step's log; its scores (metric, value, stderr, "
                          f"samples per task) to steps/{name}/summary.json under harness")
        imports = _harness_imports(step.harness.tasks, name, c.res.host_paths)
        if imports:
            eval_notes.append("lm-eval imports and runs Python named by the task files (`!function`): "
                              + ", ".join(imports))
    # scoring models loads them on the first GPU (under the lease); the harness alone only sends requests
    eval_gpus = c.all_gpus[:1] if step.models else []
    c.add(StepSpec(id=name, kind="eval", recipe_step=name, executor=c.executor, image=eval_image,
                   argv=places.cmd("ftkit.engines.evaluate") + ["--config", places.run(cfg_rel)],
                   files=[GeneratedFile(cfg_rel, launch.dump_json(EvalJob.model_validate(eval_cfg).to_json()))],
                   outputs={**({"results": f"steps/{name}/results.jsonl"} if step.models else {}),
                            "summary": f"steps/{name}/summary.json"},
                   gpus=eval_gpus, env={"CUDA_VISIBLE_DEVICES": c.visible(eval_gpus)},
                   lease=c.lease("train", eval_gpus), notes=eval_notes,
                   description="; then ".join(what)))


# A recipe step's `type` -> its planner: adding a step type adds a function and a line here.
# Each planner takes the step of its own type (validate and resolve made sure of it).
PLANNERS: dict[str, Callable[[PlanContext, Any, str], None]] = {
    "power": _plan_power,
    "train": _plan_train,
    "preference": _plan_train,
    "merge": _plan_merge,
    "quantize": _plan_quantize,
    "serve": _plan_serve,
    "load-adapter": _plan_load_adapter,
    "eval": _plan_eval,
}


def _finish(c: PlanContext) -> None:
    """After the recipe's steps: the serving service back, the notes and warnings that need
    the whole plan, the final power restore."""
    machine = c.machine
    if c.handoff_stopped and machine.serving:
        start = _handoff(machine.serving, "start", machine.serving.gpus)
        if c.serving_replaced:
            start.replaced_by = c.serving_replaced
            start.notes.append(f"skipped when the run succeeds and {c.serving_replaced!r} keeps serving; "
                               "run after a failure, so the previous model is served again")
            c.warnings.append(
                f"the recipe's server takes over GPU(s) {machine.serving.gpus} from service "
                f"{machine.serving.service!r}, which stays stopped after a successful run; start it again after "
                "stopping the recipe's server"
            )
        c.steps.append(start)
    _sharding_notes(c.steps)
    c.warnings.extend(serving.lost_adapter_warnings(c.steps))
    if any(s.ports for s in c.steps) and not ipaddress.ip_address(machine.bind_address).is_loopback:
        c.warnings.append(f"servers publish their port on {machine.bind_address} (machine profile bind_address): the "
                          "OpenAI-compatible API is reachable from the network, without authentication")
    c.warnings.extend(_plaintext_docker_warnings(machine))
    if any(s.kind == "power" for s in c.steps):
        c.steps.append(StepSpec(id="power-restore-final", kind="power-restore", executor="nvml", gpus=c.all_gpus,
                                always=True, description="restore the power limits found at the start (also after "
                                "a failure)"))


def _merged_dtype(recipe: Recipe, merge: str | None) -> str:
    """The dtype of a merge step's output: its own `dtype`, else the base model's."""
    step = next((s for s in recipe.steps if isinstance(s, MergeStep) and s.name == merge), None)
    return (step.dtype if step is not None else None) or recipe.model.dtype


def _serve_fit(step: ServeStep, s: StepSpec, arch: ModelArch, recipe: Recipe,
               vram: dict[int, float | None]) -> list[memory.FitEstimate]:
    """The serve step's memory fit per GPU: its weights as served, the KV cache at
    max_model_len, vLLM's budget. A merged model too big in 16-bit names the quantize step."""
    dtype = _merged_dtype(recipe, step.adapter) if step.model == "merged" else recipe.model.dtype
    form = servefit.served_form(step.model, dtype, step.args)
    hint = None
    if step.model == "merged":
        q = next((x.name for x in recipe.steps if isinstance(x, QuantizeStep) and x.merge == step.adapter), None)
        hint = (f"serve model: quantized (quantize step {q!r})" if q else
                f"add a quantize step after {step.adapter!r} and serve model: quantized (4-bit W4A16)")
    return servefit.serve_fit(arch, form, gpus=list(s.gpus), vram=vram, args=step.args, engine=s.engine or "vllm",
                              platform=s.platform or "cpu", dtype=dtype, quantize_hint=hint)


def _port_handover(old: StepSpec, new: StepSpec) -> str:
    """What a client of a replaced server does: keep its URL when the new server takes over the
    port, else move to the new one's."""
    a, b = (old.ready.base_url if old.ready else ""), (new.ready.base_url if new.ready else "")
    if not a or not b:
        return ""
    if a == b:
        return f"; {new.id} takes over {a}: clients keep the URL (it answers again once the new model is loaded)"
    return (f"; {new.id} answers at {b}, not {a}: clients move there (give both steps the same port to keep one "
            "URL)")


def _multinode(c: PlanContext, s: StepSpec, step: ResolvedTrainStep, cluster: Cluster) -> None:
    """One trainer per node for a train step with `nodes:` (see plan.cluster)."""
    s.nodes = cluster_plan.node_specs(step, cluster, argv=s.argv, run_id=c.run_id, visible=c.visible(s.gpus))
    s.description = s.description.replace(" training on ", f" training on {step.nodes} nodes, each on ", 1)
    first = s.nodes[0]
    s.argv = list(first.argv)  # what rank 0 runs; each node's argv and env (over s.env) are in s.nodes
    remote = [n.name for n in s.nodes if n.docker_host or n.manual]
    if s.lease is not None and s.lease.max_power_w and remote:
        cmds = "; ".join(f"ftkit power set --gpus {g} --watts {w}" for g, w in sorted(s.lease.max_power_w.items()))
        s.notes.append(f"power steps set limits on this machine only: on {', '.join(remote)} run `{cmds}` "
                       "first (each node's lease refuses GPUs above the recipe's caps)")
    if any(n.manual for n in s.nodes):
        s.notes.append("nodes " + ", ".join(n.name for n in s.nodes if n.manual) + " are started by hand: "
                       "`ftkit up` prints their commands and waits for the nodes it starts")
    info = c.cluster_info or cluster_plan.summary(cluster, step.nodes)  # the first multi-node step's nodes
    grads = info.gradient_bytes
    if c.arch is not None:
        trainable = (memory.lora_params(c.arch, step.lora.r, step.lora.target_modules) if step.method != "full"
                     else c.arch.params_b * 1e9)
        grads = {**(grads or {}), s.id: cluster_plan.gradient_bytes(step, trainable)}
    c.cluster_info = dataclasses.replace(info, nodes_used=max(info.nodes_used, step.nodes), gradient_bytes=grads)


def _plaintext_docker_warnings(machine: Machine) -> list[str]:
    """tcp:// engines ftkit talks to without TLS: whoever reaches that port is root on that
    host, and the traffic (environment, tokens in it) crosses the network in clear."""
    hosts = [("docker.host", machine.docker.host)]
    if machine.cluster is not None:
        hosts += [(f"cluster node {n.name}", n.docker_host) for n in machine.cluster.nodes]
    out = []
    for where, host in hosts:
        try:
            plain = host is not None and parse_docker_host(host).plaintext_tcp
        except DockerHostError:  # refused by the profile checks already
            plain = False
        if plain:
            out.append(f"{where} {host} is tcp:// without TLS: the Docker API is unauthenticated and unencrypted "
                       "(anyone who reaches it is root there); prefer ssh://user@host")
    return out


def _sharding_notes(steps: list[StepSpec]) -> None:
    """Say how a server shares the GPUs with the GPU steps after it: on other GPUs they run
    side by side (workload sharding, each GPU with one owner); on its GPUs the lease hands
    them over (the server yields to training and comes back); a later server on its GPUs
    replaces it."""
    for i, server in enumerate(steps):
        if not server.background or not server.gpus:
            continue
        for later in steps[i + 1:]:
            if not later.gpus or later.lease is None:
                continue
            shared = sorted(set(server.gpus) & set(later.gpus))
            if later.background and shared:
                server.notes.append(f"replaced by {later.id} on GPU(s) {shared}: stopped when {later.id} starts"
                                    f"{_port_handover(server, later)}")
                break
            if not shared:
                server.notes.append(f"serves on GPU(s) {server.gpus} while {later.id} uses GPU(s) {later.gpus} "
                                    "(workload sharding: one owner per GPU through the lease)")
            else:
                server.notes.append(f"yields GPU(s) {shared} to {later.id} through the lease and takes them back after")


def _harness_job(c: PlanContext, h: Harness, name: str) -> dict[str, Any]:
    """The harness's job: the server's endpoint and model name as its serve step was planned
    (validate made sure the server is a serve step before this one), the tokenizer of the
    model it serves (the served directory; the base's for an adapter), task files as the
    step's process sees them."""
    from ftkit.recipe.harness import is_path

    recipe, base_ref = c.recipe, c.base_ref
    server = next((s for s in c.steps if s.id == h.server and s.kind == "serve"), None)
    ready = (server.ready if server is not None else None) or Ready()
    rstep = next((s for s in recipe.steps if isinstance(s, ServeStep) and s.name == h.server), None)
    tokenizer, revision = base_ref, recipe.model.revision if recipe.model.id else None
    if rstep is not None and server is not None and rstep.model in ("merged", "quantized"):
        # the served directory: the server's argv names it after --model (vLLM) or serve (transformers)
        argv = server.argv
        at = argv.index("--model") + 1 if "--model" in argv else argv.index("serve") + 1 if "serve" in argv else -1
        tokenizer, revision = (argv[at], None) if 0 < at < len(argv) else (base_ref, revision)
    chat = h.model == "chat"
    base = ready.base_url or "http://127.0.0.1:0/v1"
    tasks = []
    for j, t in enumerate(h.tasks):
        local = c.input_path(f"harness:{name}:{j}") if is_path(t) else None
        tasks.append({"given": t, "spec": local or t, "path": local is not None})
    return {
        "tasks": tasks, "server": h.server or "", "engine": (server.engine if server is not None else None) or "",
        "api": h.model, "lm_eval_model": "local-chat-completions" if chat else "local-completions",
        "base_url": base + ("/chat/completions" if chat else "/completions"),
        "model": ready.served_name, "tokenizer": None if chat else tokenizer,
        "revision": None if chat else revision, "limit": h.limit, "num_fewshot": h.num_fewshot,
        "max_gen_toks": h.max_gen_toks, "num_concurrent": h.num_concurrent,
    }


def _pairs_cfg(c: PlanContext, step: PreferenceStep, name: str) -> dict[str, Any]:
    """The preference engine's pairs: the file as the step's process sees it, fields, eval split."""
    d = step.data
    ev = None
    if d.eval is not None:
        ev = {**d.eval.model_dump(exclude_none=True), **({"path": c.input_path(f"pairs-eval:{name}")} if d.eval.path else {})}
    return {"path": c.input_path(f"pairs:{name}"), "fields": d.fields.model_dump(), "eval": ev}


def _preference_note(step: PreferenceStep) -> str:
    """What the reference is (plan.memory counts the same): never a second copy of the weights."""
    if step.objective == "orpo":
        return "ORPO: no reference model (an odds-ratio term on the chosen answer's loss)"
    if step.adapter:
        return (f"DPO reference: a frozen copy of {step.adapter!r}'s adapter (trl's 'ref' adapter, dropped before "
                "the adapter is saved); no second copy of the weights")
    return "DPO reference: the base with the adapter disabled (trl's PEFT rule); no second copy of the weights"


def _dataset_cfg(c: PlanContext) -> dict[str, Any]:
    """The dataset as the engines' jobs name it (jobs.DatasetJob): files as the step's process sees them."""
    d, input_path = c.recipe.dataset, c.input_path
    return {
        "path": input_path("dataset"),
        "hub": d.hub,
        "revision": d.revision,
        "subset": d.subset,
        "split": d.split,
        "format": d.format,
        "fields": d.fields.model_dump(),
        "template": input_path("template") if d.template.endswith((".jinja", ".j2")) else d.template,
        "train_on": d.train_on,
        "system_prompt": d.system_prompt,
        "eval": (
            {**d.eval.model_dump(exclude_none=True), **({"path": input_path("eval")} if d.eval.path else {})}
            if d.eval else None
        ),
    }


def _handoff(svc: Serving, action: str, gpus: list[int]) -> StepSpec:
    """Stop the machine's serving service before training on its GPUs, or start it again."""
    if svc.manager == "systemd":
        argv = ["systemctl", action, svc.service]
    elif svc.manager == "compose":
        argv = ["docker", "compose", action, svc.service]
    else:
        argv = ["docker", action, svc.service]
    if action == "stop":
        desc = f"hand GPU(s) {sorted(set(svc.gpus) & set(gpus))} over from service {svc.service!r} to training"
    else:
        desc = f"hand GPU(s) {svc.gpus} back to service {svc.service!r}"
    return StepSpec(id=f"handoff-{action}", kind="handoff-stop" if action == "stop" else "handoff-start",
                    executor="service", argv=argv, gpus=list(svc.gpus),
                    always=action == "start", description=desc)


def _tracking_job(tracked: dict[str, Any], tensorboard_dir: str, run_name: str) -> dict[str, Any]:
    """The train engine's tracking section: where its TensorBoard events go, the MLflow and
    W&B settings (no secret: those come from env_from_host), the run's name there."""
    return {"tensorboard_dir": tensorboard_dir if tracked["tensorboard"] else None, "mlflow": tracked["mlflow"],
            "wandb": tracked["wandb"], "run_name": run_name}


def _harness_imports(tasks: list[str], name: str, host_paths: dict[str, Any]) -> list[str]:
    """The Python files the recipe's task files make lm-eval import (recipe.harness), as the
    recipe names their directories."""
    from ftkit.recipe.harness import is_path, python_imports

    out: list[str] = []
    for j, task in enumerate(tasks):
        local = host_paths.get(f"harness:{name}:{j}")
        if not is_path(task) or local is None:
            continue
        root = local if local.is_dir() else local.parent
        base = task.rstrip("/") if local.is_dir() else str(PurePosixPath(task).parent)
        for _, _, module in python_imports(local):
            rel = str(module.relative_to(root)) if module.is_relative_to(root) else str(module)
            shown = f"{base}/{rel}" if base not in ("", ".") else rel
            if shown not in out:
                out.append(shown)
    return out
