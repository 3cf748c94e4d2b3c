"""The train engine's experiment tracking: TensorBoard event files (ftkit's own writer, no
dependency), and MLflow / W&B through transformers' integrations when the plan asks.

The plan's job config carries no secret: MLflow's and W&B's credentials reach this process
in its environment (the executor copies them from ftkit's own, by name), where the clients
read them. Here only their non-secret settings are put into the environment the clients read
(tracking URI, experiment, project, mode), and model uploads stay off: the run directory
holds the model; a tracker gets curves and parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tensorboard_tag(key: str) -> str:
    """transformers' TensorBoard names: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def tensorboard_callback(logdir: Path) -> Any:
    from transformers import TrainerCallback

    from ftkit.engines.tbevents import EventWriter

    class TensorBoard(TrainerCallback):  # type: ignore[misc]
        """Every logged number as a scalar at the step it was logged (main process only)."""

        def __init__(self) -> None:
            self.writer: EventWriter | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            if self.writer is None:
                self.writer = EventWriter(logdir)
            self.writer.scalars(state.global_step, {tensorboard_tag(k): v for k, v in logs.items()})

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.writer is not None:
                self.writer.close()

    return TensorBoard()


def setup(tracking: dict[str, Any], step_dir: Path) -> tuple[list[str], list[Any]]:
    """(report_to for TrainingArguments, extra callbacks) for the job's tracking section;
    sets the environment MLflow's and W&B's clients read. W&B keeps its local files (an
    offline run: `wandb sync` them later) in the step's directory, not wherever it starts."""
    report_to: list[str] = []
    callbacks: list[Any] = []
    if tracking.get("tensorboard_dir"):
        callbacks.append(tensorboard_callback(Path(tracking["tensorboard_dir"])))
    mlflow = tracking.get("mlflow")
    if mlflow:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow["tracking_uri"]
        os.environ["MLFLOW_EXPERIMENT_NAME"] = mlflow["experiment"]
        os.environ["HF_MLFLOW_LOG_ARTIFACTS"] = "0"  # the model stays in the run directory
        if mlflow["tracking_uri"].startswith(("/", "file:")):
            # MLflow 3 refuses a file store unless told: the recipe asked for one by name
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        report_to.append("mlflow")
    wandb = tracking.get("wandb")
    if wandb:
        os.environ["WANDB_PROJECT"] = wandb["project"]
        if wandb.get("entity"):
            os.environ["WANDB_ENTITY"] = wandb["entity"]
        os.environ["WANDB_MODE"] = wandb.get("mode", "online")
        os.environ["WANDB_LOG_MODEL"] = "false"
        os.environ["WANDB_DIR"] = str(step_dir)
        report_to.append("wandb")
    return report_to, callbacks
