"""The recipe and machine-profile formats as pydantic models.

These models are the single source of truth for both formats: validation, defaults and the
published JSON Schema (`ftkit schema`, `recipes/recipe.schema.json`) all come from here.
Shape rules live on the fields; rules that relate fields to each other live in
`recipe.checks`, which collects every problem instead of stopping at the first.

A recipe is portable: it holds no absolute paths and no host names. A machine profile holds
what is specific to one machine: GPUs, PSU, paths, the Docker host, the serving service.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

FORMAT_VERSION = 1


def _no_bool(value: Any) -> Any:
    """YAML reads `yes`/`true` as booleans and pydantic would take them as 1: a number field
    given a boolean is almost always a slip (`r: true`), so say so instead of training with r=1."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


# Numbers that refuse booleans. Non-finite values (.inf, .nan) are refused model-wide
# (allow_inf_nan=False) and, with a clearer message, by recipe.validate before pydantic runs.
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Seed = Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=2**32 - 1)]
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"  # also what a run's plan.json may call its recipe (export)
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lowercase letters, digits, . _ -")]
Dtype = Literal["bf16", "fp16", "fp32"]
Scalar = str | int | float | bool
GpuIndex = Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=1023)]


class Strict(BaseModel):
    """Unknown keys are errors (with a did-you-mean, see recipe.validate)."""

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=False, allow_inf_nan=False)


# --------------------------------------------------------------------------- model


class TinyModel(Strict):
    """A small random Llama made on the spot, with a tokenizer trained on the recipe's data.
    For the CPU quickstart and tests: nothing is downloaded."""

    hidden_size: Int = Field(64, ge=8, le=4096)
    layers: Int = Field(2, ge=1, le=64)
    heads: Int = Field(4, ge=1, le=64, description="must divide hidden_size into an even head size")
    intermediate_size: Int = Field(128, ge=8, le=16384)
    vocab_size: Int = Field(400, ge=64, le=65536, description="BPE vocabulary trained on the dataset")
    max_position_embeddings: Int = Field(256, ge=16, le=32768)
    initializer_range: Float = Field(0.1, gt=0, le=1.0)
    seed: Seed = 0


class Arch(Strict):
    """Architecture figures for memory estimates, where ftkit cannot read the model's config."""

    params_b: Float = Field(..., gt=0, le=100_000, description="parameters, in billions")
    layers: Int = Field(..., ge=1, le=100_000)
    hidden_size: Int = Field(..., ge=1, le=10_000_000)
    intermediate_size: Int | None = Field(None, ge=1, le=10_000_000)
    heads: Int | None = Field(None, ge=1, le=100_000)
    kv_heads: Int | None = Field(None, ge=1, le=100_000)
    vocab_size: Int = Field(..., ge=1, le=100_000_000)
    max_position_embeddings: Int | None = Field(
        None, ge=16, le=100_000_000, description="the context length (what vLLM serves without max_model_len)"
    )


class ModelSpec(Strict):
    """The base model: a hub id pinned to a commit, a local path, or a tiny generated model."""

    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="hub id, org/name")
    revision: str | None = Field(None, description="the hub commit (40 hex characters): pins the weights")
    path: str | None = Field(None, description="relative to the recipe, or ${models}/... from the machine profile")
    tiny: TinyModel | None = None
    dtype: Dtype = "bf16"
    arch: Arch | None = Field(None, description="override the built-in figures used for memory estimates")
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- dataset


class Fields(Strict):
    """Column names in the data, where they differ from the defaults."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    text: str = "text"


class EvalSplit(Strict):
    """Held-out data: a fraction or count of the dataset (split deterministically), or a file."""

    fraction: Float | None = Field(None, gt=0, lt=1)
    size: Int | None = Field(None, ge=1, le=100_000_000)
    path: str | None = None
    seed: Seed = 0


class DatasetEval(EvalSplit):
    """The training dataset's held-out rows: also another split of the same hub dataset or
    directory (`split: test`)."""

    split: str | None = Field(
        None, min_length=1, max_length=200,
        description="another split of the dataset (a hub dataset, a saved DatasetDict or a directory), e.g. test",
    )


class DatasetSpec(Strict):
    path: str | None = Field(
        None, description="a local dataset: a .jsonl, .json, .csv, .parquet or .arrow file, a saved datasets "
        "directory (save_to_disk), or a directory of such files (read by the `datasets` library's folder loader)",
    )
    hub: str | None = Field(
        None, description="a dataset on the Hugging Face Hub (org/name), read through the machine's HF cache "
        "(paths.hf_cache, else HF_HOME); needs `revision`",
    )
    revision: str | None = Field(None, description="the hub dataset's commit (40 hex characters): pinned data")
    subset: str | None = Field(None, description="the hub dataset's configuration (subset), where it has several")
    split: str = Field(
        "train", min_length=1, max_length=200,
        description="the split to train on: of a hub dataset, a saved DatasetDict or a directory of data files",
    )
    format: Literal["alpaca", "chat", "sharegpt", "text"] = Field(
        ..., description="alpaca (instruction/input/output), chat (messages of role/content), sharegpt (chat "
        "with conversations of from/value: the fields mapping implied), or text",
    )
    fields: Fields = Field(default_factory=Fields)
    template: str = Field(
        "auto",
        description="prompt template: auto (tokenizer's chat template if it has one, else alpaca), "
        "tokenizer, alpaca, chatml, llama3, gemma, mistral, or a relative path to a .jinja file",
    )
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        "all_assistant_turns",
        description="chat data: the answers that carry loss. Every assistant turn (as Axolotl and "
        "LLaMA-Factory train multi-turn chat) or only the last; system, user and tool turns never do",
    )
    system_prompt: str | None = None
    eval: DatasetEval | None = None

    @model_validator(mode="before")
    @classmethod
    def _sharegpt(cls, value: Any) -> Any:
        """`format: sharegpt` is chat with ShareGPT's names (conversations of from/value, roles
        human/gpt/system/tool): the mapping is filled in (fields given win) and the dataset is
        chat from here on, so the plan and the engines see one chat format."""
        if isinstance(value, dict) and value.get("format") == "sharegpt" and isinstance(value.get("fields", {}), dict):
            given = value.get("fields") or {}
            value = {**value, "format": "chat",
                     "fields": {"messages": "conversations", "role": "from", "content": "value", **given}}
        return value


# --------------------------------------------------------------------------- steps


GpuSel = Literal["all"] | list[GpuIndex]


class PowerStep(Strict):
    """Set NVML power limits before the work that follows. The runner restores the limits it
    found when the run ends, also when it fails."""

    type: Literal["power"]
    name: Name | None = None
    caps_w: Int | dict[GpuIndex, Int] | None = Field(
        None, description="watts for every GPU the recipe uses, or {gpu index: watts}"
    )
    restore: bool = Field(False, description="restore the limits found at the start, instead of setting caps")


class Lora(Strict):
    r: Int = Field(16, ge=1, le=1024)
    alpha: Float = Field(32, gt=0, le=1_000_000)
    dropout: Float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = Field(False, description="rank-stabilized LoRA: scale updates by alpha/sqrt(r), not alpha/r")
    use_dora: bool = Field(
        False, description="DoRA: learn each output feature's magnitude apart from the LoRA direction "
        "(peft; costs a weight-sized temporary per layer and slower steps; the merge folds it in)",
    )
    modules_to_save: list[str] = Field(default_factory=list)


class Checkpoint(Strict):
    every_steps: Int = Field(200, ge=1, le=100_000_000)
    keep_last: Int = Field(2, ge=1, le=1000)
    keep_best: bool = Field(True, description="also keep the checkpoint with the lowest eval loss")


class TrainStep(Strict):
    type: Literal["train"]
    name: Name | None = None
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: Lora = Field(default_factory=Lora)
    epochs: Float | None = Field(None, gt=0, le=1000)
    max_steps: Int | None = Field(None, ge=1, le=100_000_000)
    learning_rate: Float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Float = Field(0.03, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0, le=10)
    batch_size: Int = Field(1, ge=1, le=65536, description="per device")
    grad_accum: Int = Field(1, ge=1, le=65536)
    seq_len: Int = Field(1024, ge=16, le=1_048_576)
    packing: bool = False
    precision: Dtype = "bf16"
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd"] = "adamw_torch"
    seed: Seed = 42
    distribution: Literal["single", "ddp", "deepspeed-zero2", "deepspeed-zero3"] = "single"
    gpus: GpuSel = Field("all", description="GPU indices on the machine, or all")
    cpu_offload: bool = Field(False, description="DeepSpeed: offload optimizer states to CPU RAM")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    eval_every_steps: Int | None = Field(None, ge=1, le=100_000_000)
    logging_steps: Int = Field(10, ge=1, le=100_000_000)
    handoff: Literal["auto", "never"] = Field(
        "auto", description="auto: stop the machine's serving service if it holds these GPUs, restart it after"
    )
    nodes: Int = Field(
        1, ge=1, le=1024,
        description="hosts to train on: more than 1 runs one trainer per node of the machine profile's cluster "
        "(torch.distributed, c10d rendezvous); gpus then names the GPUs on each node",
    )


class PairFields(Strict):
    """Column names of a preference dataset, where they differ from the defaults."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class PreferenceData(Strict):
    """Preference pairs: a prompt, the answer to prefer and the one to avoid (one row each)."""

    path: str = Field(..., description="jsonl, json or parquet rows of {prompt, chosen, rejected}")
    fields: PairFields = Field(default_factory=PairFields)
    eval: EvalSplit | None = Field(
        None, description="held-out pairs: their preference accuracy is measured before and after training"
    )


class PreferenceStep(TrainStep):
    """Preference tuning with trl (DPO or ORPO) on prompt/chosen/rejected pairs: a new LoRA/QLoRA
    adapter on the base, or the adapter of an earlier train step trained further. Everything a
    train step has (launch, checkpoints and resume, metrics.jsonl, the adapter and its marker)
    is the same, so merge, serve, load-adapter and eval steps take its adapter like any other."""

    type: Literal["preference"]  # type: ignore[assignment]
    method: Literal["lora", "qlora"] = Field(  # type: ignore[assignment]
        "lora", description="the adapter trained; with `adapter:` the same method as that step's"
    )
    objective: Literal["dpo", "orpo"] = Field(
        "dpo", description="dpo: against a reference (the base, or the starting adapter, never a second copy of "
        "the weights); orpo: no reference (an odds-ratio term on top of the chosen answer's loss)",
    )
    adapter: Name | None = Field(
        None, description="the lora/qlora train step whose adapter to train further (its SFT result; DPO's "
        "reference too); none: a new adapter on the base",
    )
    data: PreferenceData
    beta: Float = Field(
        0.1, gt=0, le=100, description="DPO: how far from the reference the policy may go (lower: further); "
        "ORPO: the odds-ratio term's weight (lambda)",
    )
    learning_rate: Float = Field(5e-5, gt=0, lt=1)


class MergeStep(Strict):
    """Fold a LoRA adapter into the base weights, streaming tensor by tensor."""

    type: Literal["merge"]
    name: Name | None = None
    adapter: str | None = Field(None, description="the train step whose adapter to merge (default: the last one)")
    dtype: Dtype | None = Field(
        None, description="output dtype of the floating-point weights (default: keep the base model's dtype)"
    )
    output: str | None = Field(None, description="relative directory in the run (default: steps/<name>/model)")
    base: Literal["original", "nf4-dequantized"] = Field(
        "original",
        description="QLoRA: merge into the 16-bit original (default) or into the quantize-dequantized base it trained on",
    )
    max_shard_gb: Float = Field(5.0, gt=0, le=10_000)


class QuantizeStep(Strict):
    """4-bit weight-only quantization (W4A16) of the merged model with llm-compressor, the vLLM
    project's library: compressed-tensors that vLLM serves with its Marlin kernels on a GPU (and
    its CPU kernels here). Calibrated on the recipe's own training data. Runs in ftkit's
    `quantize` image: llm-compressor pins a transformers and compressed-tensors that neither the
    train nor the serve image has."""

    type: Literal["quantize"]
    name: Name | None = None
    merge: Name | None = Field(None, description="the merge step whose model to quantize (default: the last one)")
    method: Literal["gptq", "awq"] = Field(
        "gptq", description="gptq: GPTQ's second-order rounding (llm-compressor's GPTQModifier); awq: activation-aware "
        "scaling, then the same 4-bit rounding (AWQModifier)"
    )
    scheme: Literal["W4A16"] = Field(
        "W4A16", description="4-bit integer weights in groups of 128 with a 16-bit scale each; activations stay 16-bit"
    )
    calibration_samples: Int = Field(
        128, ge=1, le=100_000,
        description="rows of the recipe's training data (after the eval split) run through the model to calibrate; "
        "fewer when the data has fewer",
    )
    max_seq_len: Int = Field(512, ge=16, le=1_048_576, description="calibration rows are cut to this many tokens")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="modules left in 16-bit (llm-compressor names or re: patterns); the output head by default",
    )
    gpus: list[GpuIndex] | None = Field(
        None, max_length=1,
        description="the GPU that calibrates, one layer at a time (default: the machine's first GPU, or the CPU "
        "on a machine without one)",
    )
    seed: Seed = Field(0, description="which calibration rows are drawn")
    output: str | None = Field(None, description="relative directory in the run (default: steps/<name>/model)")


class Expect(Strict):
    contains: str | None = None
    equals: str | None = None
    regex: str | None = None


class ServePrompt(Strict):
    prompt: str
    expect: Expect | None = None
    max_tokens: Int = Field(64, ge=1, le=131_072)
    chat: bool = Field(False, description="send as a chat message instead of a raw completion prompt")


class ServeStep(Strict):
    type: Literal["serve"]
    name: Name | None = None
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM where it runs (a GPU, ftkit's images, or vLLM installed here), "
        "else transformers serve"
    )
    model: Literal["merged", "quantized", "base", "adapter"] = Field(
        "merged", description="merged: the merge step's output; quantized: the quantize step's (4-bit, vLLM); "
        "adapter: base + the LoRA adapter (vLLM --enable-lora)"
    )
    adapter: str | None = Field(
        None, description="the train (adapter), merge (merged) or quantize (quantized) step to serve"
    )
    adapters: list[Name] = Field(
        default_factory=list, max_length=64,
        description="vLLM: more LoRA adapters served beside the model (multi-LoRA), by train step name; each is a "
        "model name clients can ask for",
    )
    preempt: Literal["stop", "sleep"] = Field(
        "stop", description="how the server gives its GPUs to a training step that waits for them: stop the engine, "
        "or vLLM's sleep mode level 1 (CUDA only; weights kept in host RAM)"
    )
    served_name: Name | None = None
    port: Int = Field(8000, ge=1, le=65535)
    gpus: GpuSel = "all"
    args: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict, description="engine arguments, e.g. {max_model_len: 8192, gpu_memory_utilization: 0.9}"
    )
    ready_timeout_s: Int = Field(600, ge=1, le=86_400)
    prompts: list[ServePrompt] = Field(default_factory=list)
    keep_running: bool = Field(True, description="leave the server running after the run ends (the default: serving the "
                               "result is what the step is for; the run's last lines say where, and `ftkit down RUN` "
                               "stops it); false: stopped at the end of the run, like every other step")


class LoadAdapterStep(Strict):
    """Put a trained LoRA adapter live in a running vLLM server without restarting it
    (vLLM's runtime LoRA loading), check that it answers, and record it."""

    type: Literal["load-adapter"]
    name: Name | None = None
    server: Name | None = Field(None, description="the serve step whose server gets the adapter (default: the last one)")
    adapter: Name | None = Field(None, description="the lora/qlora train step whose adapter to load (default: the last one)")
    served_name: Name | None = Field(None, description="the model name clients ask for (default: the train step's name)")
    prompts: list[ServePrompt] = Field(default_factory=list, description="test prompts sent to the adapter once live")
    ready_timeout_s: Int = Field(600, ge=1, le=86_400, description="how long to wait for the server to answer first")


class EvalPrompt(Strict):
    prompt: str
    expected: str


class Harness(Strict):
    """lm-evaluation-harness against a serve step's OpenAI-compatible endpoint (its local-completions or
    local-chat-completions model): standard tasks, scored as every framework scores them."""

    tasks: list[str] = Field(
        ..., min_length=1, max_length=64,
        description="lm-eval task or group names, or relative paths to a task YAML file or a directory of them "
        "(a path ends in .yaml/.yml or holds a `/`: ./tasks for a directory here); a directory runs every task "
        "it defines",
    )
    server: Name | None = Field(None, description="the serve step whose endpoint is scored (default: the last "
                                "serve step before this one)")
    model: Literal["completions", "chat"] = Field(
        "completions", description="completions: /v1/completions, the prompt as the task writes it; chat: "
        "/v1/chat/completions, the server applies the model's chat template (generate_until tasks only)",
    )
    limit: Int | None = Field(None, ge=1, le=100_000_000, description="score the first N documents of each task")
    num_fewshot: Int | None = Field(None, ge=0, le=1000, description="default: each task's own")
    max_gen_toks: Int | None = Field(None, ge=1, le=131_072, description="default: each task's own (256)")
    num_concurrent: Int = Field(1, ge=1, le=256, description="requests in flight at once")


class EvalStep(Strict):
    """Score held-out prompts on several models (base before, merged after) by exact match or
    containment, with greedy decoding; and/or run lm-evaluation-harness tasks against a server."""

    type: Literal["eval"]
    name: Name | None = None
    prompts: list[EvalPrompt] | None = Field(None, description="inline prompts (default: the dataset's eval split)")
    path: str | None = Field(None, description="a jsonl file of {prompt, expected}")
    score: Literal["exact", "contains"] = "exact"
    models: list[Literal["base", "adapter", "merged", "quantized"]] = Field(
        default_factory=lambda: ["base", "merged"], max_length=4,
        description="quantized: the quantize step's model (scored in the quantize image, which reads "
        "compressed-tensors); [merged, quantized] measures what quantization costs; [] with harness: the "
        "harness only",
    )
    max_new_tokens: Int = Field(32, ge=1, le=131_072)
    limit: Int | None = Field(None, ge=1, le=100_000_000)
    min_improvement: Float | None = Field(
        None, ge=-100, le=100, description="fail the step unless the last model beats the first by this many points"
    )
    harness: Harness | None = Field(None, description="lm-evaluation-harness tasks against a serve step's endpoint")


Step = Annotated[PowerStep | TrainStep | PreferenceStep | MergeStep | QuantizeStep | ServeStep | LoadAdapterStep | EvalStep,
                 Field(discriminator="type")]


class ImagePins(Strict):
    """Pin images by digest, or point at an images.lock.json written by `ftkit build`."""

    train: str | None = Field(None, pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$")
    serve: str | None = Field(None, pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$")
    quantize: str | None = Field(None, pattern=r"^[^\s@]+@sha256:[0-9a-f]{64}$")
    lock: str | None = Field(None, description="relative path to an images.lock.json")


# --------------------------------------------------------------------------- experiment tracking


class MlflowTracking(Strict):
    """Log each train step's metrics and parameters to MLflow (transformers' MLflow callback)."""

    tracking_uri: str = Field(
        ..., description="http(s)://host[:port] of an MLflow server, or a local file store (file:///abs/path or an "
        "absolute path); credentials never go here: ftkit passes MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD from its own environment to the step, and nowhere else",
    )
    experiment: str | None = Field(None, max_length=256, description="default: the recipe's name")


class WandbTracking(Strict):
    """Log each train step to Weights & Biases (transformers' W&B callback); WANDB_API_KEY comes from ftkit's
    environment and is never written to the plan or the run directory."""

    project: str = Field(..., min_length=1, max_length=128)
    entity: str | None = Field(None, min_length=1, max_length=128)
    mode: Literal["online", "offline"] = "online"


class Tracking(Strict):
    """Where training curves go besides metrics.jsonl and the HTML report."""

    tensorboard: bool = Field(True, description="TensorBoard event files in each train step's directory "
                              "(`tensorboard --logdir runs/`)")
    mlflow: MlflowTracking | Literal[False] | None = Field(
        None, description="MLflow, off unless asked; false turns off what the machine profile sets")
    wandb: WandbTracking | Literal[False] | None = Field(
        None, description="Weights & Biases, off unless asked; false turns off what the machine profile sets")


class MachineTracking(Strict):
    """A machine's tracking servers (a team's MLflow or W&B), for every recipe run on it that does not turn them off."""

    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None


class Recipe(Strict):
    """A fine-tuning recipe: what to train, on what data, and what to do with the result."""

    ftkit: Literal[1] = Field(..., description="format version")
    kind: Literal["recipe"] = "recipe"
    name: Name
    description: str | None = None
    model: ModelSpec
    dataset: DatasetSpec
    images: ImagePins | None = None
    tracking: Tracking = Field(default_factory=Tracking)
    steps: list[Step] = Field(..., min_length=1)

    def step_name(self, index: int) -> str:
        step = self.steps[index]
        return step.name or step.type


# --------------------------------------------------------------------------- machine


class PowerRange(Strict):
    min_w: Int = Field(..., ge=1, le=100_000)
    max_w: Int = Field(..., ge=1, le=100_000)
    default_w: Int | None = Field(None, ge=1, le=100_000, description="the board's default limit (what restore falls back to)")


class GpuSpec(Strict):
    index: GpuIndex = Field(...)
    model: str = Field(..., description="e.g. 'RTX 4090' (matched against ftkit's catalog)")
    vram_gib: Float | None = Field(None, gt=0, le=100_000)
    power: PowerRange | None = None
    transient_w: Int | None = Field(None, ge=1, le=100_000, description="worst transient draw at the default limit")
    compute_capability: str | None = Field(None, pattern=r"^\d+\.\d+$")


class Psu(Strict):
    watts: Int = Field(..., ge=100, le=1_000_000)
    safety_margin: Float = Field(0.9, gt=0, le=1, description="use at most this fraction of the PSU rating")


class Paths(Strict):
    models: str | None = None
    datasets: str | None = None
    runs: str | None = None
    hf_cache: str | None = None
    lease: str | None = Field(
        None,
        description="GPU lease directory (one lock file per GPU), shared by `ftkit up`, `ftkit lease` and every "
        "container of the machine's stacks; default: /run/lock/ftkit where writable, else ~/.cache/ftkit/lease",
    )


class Docker(Strict):
    host: str | None = Field(None, description="DOCKER_HOST for this machine; default: the local engine")
    base_image: str | None = Field(
        None, description="build ftkit's images FROM this local image instead of the variant's base (no registry)"
    )
    wheelhouse: str | None = Field(None, description="directory of wheels standing in for extra package indexes")
    images_lock: str | None = Field(None, description="an images.lock.json whose tags this machine runs")
    build_missing: bool = Field(
        True, description="build a missing image (as `ftkit build` would) instead of refusing the run"
    )


class Telemetry(Strict):
    """GPU and host sampling beside every step that uses a GPU (telemetry.csv in the run directory)."""

    enabled: bool = True
    interval_s: Float = Field(1.0, ge=0.1, le=60)


class Serving(Strict):
    """The inference service that owns the GPUs when no training runs."""

    service: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9@_.:-]{0,254}$",
        description="systemd unit, compose service or container name (letters, digits, @ _ . : -)",
    )
    manager: Literal["systemd", "compose", "docker"] = "systemd"
    gpus: list[GpuIndex] = Field(default_factory=list)
    port: Int | None = Field(None, ge=1, le=65535)


IfName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,15}$", description="a network interface, e.g. eth0, enp5s0")]


class ClusterNode(Strict):
    """One host of a small cluster (the scaling guide's second shape). The first node hosts the
    rendezvous; every node runs the same image, recipe and plan."""

    name: Name
    address: str = Field(..., description="host name or IP address the other nodes reach this node at")
    docker_host: str | None = Field(
        None, description="DOCKER_HOST of this node's engine (ssh://user@host, tcp://...); none: this machine's engine"
    )
    manual: bool = Field(
        False, description="ftkit cannot reach this node's engine: `ftkit up` prints the command to run there"
    )
    gpus: list[GpuIndex] = Field(default_factory=list, description="GPU indices on this node; none: one CPU process")
    interface: IfName | None = Field(
        None, description="interface for NCCL and Gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME); default: cluster.interface"
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="extra environment for this node's containers (e.g. NCCL_IB_DISABLE: '1')"
    )


class Rendezvous(Strict):
    """torch.distributed's c10d rendezvous: a TCP store in the first node's launcher."""

    host: str | None = Field(None, description="the store's address; default (and the only valid one): the first node's address")
    port: Int = Field(29400, ge=1, le=65535)
    join_timeout_s: Int = Field(300, ge=10, le=86_400, description="how long the nodes wait for each other at start")


class Cluster(Strict):
    """Several hosts, one training job (a train step with `nodes:`)."""

    nodes: list[ClusterNode] = Field(..., min_length=2, max_length=1024)
    rendezvous: Rendezvous = Field(default_factory=Rendezvous)
    interface: IfName | None = Field(None, description="default network interface of every node for NCCL and Gloo")
    network: str = Field(
        "host", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="Docker network of the trainer containers: host (real hosts), or a user-defined network where "
        "containers stand in for hosts (each node's address is its alias there)",
    )
    shared: str = Field(
        ..., description="a directory every node mounts at this same path (NFS, ...): paths.runs and the inputs "
        "of multi-node steps must be inside it, so checkpoints and the run directory are the same on every node",
    )


class Machine(Strict):
    """What is specific to one machine. Recipes stay portable; this file does not travel."""

    ftkit: Literal[1]
    kind: Literal["machine"]
    name: Name
    gpus: list[GpuSpec] = Field(default_factory=list)
    psu: Psu | None = None
    system_watts: Int = Field(200, ge=0, le=1_000_000, description="CPU, board, drives and fans under load")
    ram_gib: Float | None = Field(None, gt=0, le=1_000_000)
    paths: Paths = Field(default_factory=Paths)
    docker: Docker = Field(default_factory=Docker)
    serving: Serving | None = None
    executor: Literal["docker", "local"] = Field(
        "docker", description="run steps in the ftkit images (docker) or in this Python environment (local)"
    )
    ca_bundle: str | None = Field(None, description="CA bundle for TLS-intercepting proxies (builds and containers)")
    bind_address: str = Field(
        "127.0.0.1",
        description="host address recipe servers publish their port on; anything but loopback exposes the API "
        "to the network (plan warns)",
    )
    telemetry: Telemetry = Field(default_factory=Telemetry)
    tracking: MachineTracking = Field(default_factory=MachineTracking)
    cluster: Cluster | None = Field(None, description="the hosts a multi-node train step (`nodes:`) runs on")

    def gpu(self, index: int) -> GpuSpec | None:
        return next((g for g in self.gpus if g.index == index), None)


def json_schema(kind: Literal["recipe", "machine"] = "recipe") -> dict[str, Any]:
    """The JSON Schema of recipes (default) or machine profiles, for editors and CI."""
    model: type[BaseModel] = Recipe if kind == "recipe" else Machine
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://ftkit.dev/schema/{kind}-v{FORMAT_VERSION}.json",
        "$comment": "Generated by `ftkit schema` from ftkit.recipe.models. Do not edit by hand.",
    }
    out.update(schema)
    return out
