"""The contract between the plan and the engines: what each engine's --config file holds.

The planner builds these models and writes them as JSON (configs/<kind>-<step>.json); the
engine validates the file against the same model at its entry before it loads anything.
So a plan and an engine cannot silently disagree about a field, and tests and benchmarks
build jobs through these models instead of retyping JSON by hand.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ftkit.recipe.models import EvalStep, PreferenceStep, QuantizeStep, TinyModel, TrainStep


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ModelRef(Job):
    """The base model as the engine sees it: a directory (local or generated) or a hub id
    pinned to a commit."""

    source: Literal["path", "hub"]
    path: str | None = None
    id: str | None = None
    revision: str | None = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    trust_remote_code: bool = False


class DatasetJob(Job):
    path: str | None
    hub: str | None = None  # a hub dataset (org/name) at `revision`, read through the HF cache
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    format: Literal["alpaca", "chat", "text"]
    fields: dict[str, str]
    template: str | None
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns"
    system_prompt: str | None = None
    eval: dict[str, Any] | None = None


class TinyJob(Job):
    tiny: TinyModel
    dataset: DatasetJob
    output_dir: str


class TrackingJob(Job):
    """Where the train engine logs besides metrics.jsonl (recipe.tracking.effective): never a secret."""

    tensorboard_dir: str | None = None
    mlflow: dict[str, Any] | None = None  # tracking_uri, experiment
    wandb: dict[str, Any] | None = None  # project, entity, mode
    run_name: str = "train"


class TrainJob(Job):
    model: ModelRef
    dataset: DatasetJob
    train: TrainStep
    output_dir: str
    metrics_path: str
    deepspeed_config: str | None = None
    tracking: TrackingJob = TrackingJob()


class PairsJob(Job):
    """A preference step's pairs as the engine reads them: the file, its field names, the eval
    split (a fraction, a size or a file)."""

    path: str
    fields: dict[str, str]
    eval: dict[str, Any] | None = None


class PreferenceJob(Job):
    """The preference engine's job: a train job's fields (the recipe's dataset only for its
    template and system prompt: pairs are formatted as that dataset's prompts are), the pairs,
    and the adapter it starts from (none: a new one on the base)."""

    model: ModelRef
    dataset: DatasetJob
    pairs: PairsJob
    train: PreferenceStep
    init_adapter: str | None = None
    output_dir: str
    metrics_path: str
    deepspeed_config: str | None = None
    tracking: TrackingJob = TrackingJob()


def complete_marker(final: str) -> str:
    """The file the train engine writes beside its final adapter (or model) once every file
    of it is written, before the engine's process winds down: the runner loads the adapter
    into a running server the moment it appears, instead of after the trainer has exited
    (and its container is gone). Outside the directory, so it never changes the adapter."""
    return final.rstrip("/") + ".complete"


class HarnessTask(Job):
    """One lm-eval task: `spec` is what lm-eval loads (a registered name, or the task YAML or
    directory as the step's process sees it); `given` is the recipe's entry."""

    given: str
    spec: str
    path: bool = False


class HarnessJob(Job):
    """lm-evaluation-harness against a serve step's endpoint (plan.build: the server's URL and
    model name as the plan started it; the tokenizer of the model it serves)."""

    tasks: list[HarnessTask]
    server: str
    engine: str  # the server's engine: vllm or transformers
    api: Literal["completions", "chat"]
    lm_eval_model: Literal["local-completions", "local-chat-completions"]
    base_url: str  # the endpoint itself: .../v1/completions or .../v1/chat/completions
    model: str  # the served model name requests carry
    tokenizer: str | None = None
    revision: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    max_gen_toks: int | None = None
    num_concurrent: int = 1


class EvalJob(Job):
    model: ModelRef
    dataset: DatasetJob
    eval: EvalStep
    prompts_path: str | None = None
    adapters: dict[str, str] = {}
    merged: dict[str, str] = {}
    full: dict[str, str] = {}
    # QLoRA train steps (-> the precision of their 4-bit base): their adapter is scored on the
    # base quantized as in training, not on the 16-bit original
    qlora: dict[str, Literal["bf16", "fp16"]] = {}
    quantized: dict[str, str] = {}  # quantize step -> its model (compressed-tensors, W4A16)
    output_dir: str
    harness: HarnessJob | None = None


class QuantizeJob(Job):
    """The quantize engine's job: the merged model, the data it calibrates on (the training rows
    after the eval split, shaped by the recipe's template) and where the 4-bit model goes."""

    model_dir: str
    dataset: DatasetJob
    quantize: QuantizeStep
    output_dir: str
    summary_path: str


JOBS: dict[str, type[Job]] = {"tiny-model": TinyJob, "train": TrainJob, "preference": PreferenceJob, "eval": EvalJob,
                              "quantize": QuantizeJob}
