"""Generated accelerate and DeepSpeed configs, read by their own parsers: accelerate's
config classes and launch-argument validation, transformers' DeepSpeed integration (which
fills the "auto" values from the training arguments) and DeepSpeed's DeepSpeedConfig. For
every guide recipe's own plan, and every distribution (ddp, ZeRO-2, ZeRO-3, each ZeRO with
and without CPU offload) of each recipe's train step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftkit.plan import launch
from ftkit.recipe.models import TrainStep
from tests.builders import GUIDES, guide_plan
from tests.conftest import RECIPES, require

HIDDEN = {"mistral": 5120, "gemma": 4608, "llama-1gpu": 4096, "llama-2gpu": 4096}
DISTRIBUTIONS = [("ddp", False), ("deepspeed-zero2", False), ("deepspeed-zero2", True),
                 ("deepspeed-zero3", False), ("deepspeed-zero3", True)]


def _train_step(name: str) -> TrainStep:
    from ftkit.recipe.validate import load_recipe

    recipe = load_recipe(str(RECIPES / GUIDES[name][0])).recipe
    return next(s for s in recipe.steps if isinstance(s, TrainStep))


def variants() -> list[tuple[str, str, bool]]:
    out = []
    for name in GUIDES:
        if name == "llama-1gpu":
            out.append((name, "single", False))
            continue
        out += [(name, dist, off) for dist, off in DISTRIBUTIONS]
    return out


def variant_step(name: str, dist: str, offload: bool) -> TrainStep:
    step = _train_step(name)
    update: dict[str, Any] = {"distribution": dist, "cpu_offload": offload}
    if dist.startswith("deepspeed") and step.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        update["optimizer"] = "adamw_torch"  # what validation asks for under ZeRO
    return step.model_copy(update=update)


def check_accelerate(path: Path, step: TrainStep, *, cpu: bool) -> None:
    """accelerate's ClusterConfig reads the file (unknown keys raise) and its launcher's own
    validation picks a multi-process launcher with one process per GPU."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    gpus = step.gpus if isinstance(step.gpus, list) else []
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "ftkit.engines.train", "--config", "x"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == max(len(gpus), 1)
    assert args.use_deepspeed == step.distribution.startswith("deepspeed")
    assert args.multi_gpu == (step.distribution == "ddp")
    assert bool(args.use_cpu) == cpu
    # `--cpu` would send accelerate to its single-process launcher: never set
    assert args.cpu is False
    if step.distribution.startswith("deepspeed"):
        assert cfg.mixed_precision is None  # the DeepSpeed file decides
        assert defaults.deepspeed_config["zero3_init_flag"] == (step.distribution == "deepspeed-zero3")
    else:
        assert cfg.mixed_precision == ("no" if step.precision == "fp32" else step.precision)


def check_deepspeed(path: Path, step: TrainStep, hidden: int) -> dict[str, Any]:
    """accelerate's DeepSpeedPlugin and transformers' HfTrainerDeepSpeedConfig read the file
    and fill every "auto" from the engine's own training arguments; DeepSpeed's
    DeepSpeedConfig then validates the result (its models forbid unknown keys)."""
    require("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from ftkit.engines import train

    zero3 = step.distribution == "deepspeed-zero3"
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=zero3)
    assert plugin.zero_stage == (3 if zero3 else 2)
    args = train.sft_config(step, path.parent / "ckpt", True, None)
    hf = HfTrainerDeepSpeedConfig(json.loads(path.read_text()))
    hf.trainer_config_process(args)

    class Model:
        class config:  # noqa: N801 - what transformers reads
            hidden_size = hidden

    hf.trainer_config_finalize(args, Model(), num_training_steps=100)
    filled = hf.config
    assert "auto" not in json.dumps(filled), filled
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == (3 if zero3 else 2)
    assert ds.bfloat16_config.enabled == (step.precision == "bf16")
    assert ds.train_micro_batch_size_per_gpu == step.batch_size
    assert ds.gradient_accumulation_steps == step.grad_accum
    if step.cpu_offload:
        assert ds.zero_config.offload_optimizer.device == "cpu"
        # DeepSpeed's own AdamW on torch (no CPUAdam op to compile) with the recipe's settings
        assert ds.optimizer_name == "adamw" and ds.optimizer_params["torch_adam"] is True
        assert ds.optimizer_params["lr"] == step.learning_rate
        assert ds.optimizer_params["weight_decay"] == step.weight_decay
        assert ds.zero_force_ds_cpu_optimizer is False
    else:
        assert ds.zero_config.offload_optimizer is None
        assert ds.optimizer_name is None  # the Trainer's optimizer
    return filled


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_the_plans_own_files_parse(name: str, tmp_path: Path) -> None:
    plan = guide_plan(name)
    train = next(s for s in plan.steps if s.kind == "train")
    files = {f.path: f.content for f in train.files}
    # the step exactly as the engine will read it
    step = TrainStep.model_validate(json.loads(files[f"configs/train-{train.id}.json"])["train"])
    assert step.distribution == _train_step(name).distribution
    ds_rel = f"configs/deepspeed-{train.id}.json"
    if ds_rel in files:
        (tmp_path / "ds.json").write_text(files[ds_rel])
        check_deepspeed(tmp_path / "ds.json", step, HIDDEN[name])
        acc = yaml.safe_load(files[f"configs/accelerate-{train.id}.yaml"])
        # the accelerate file names the DeepSpeed file where the plan writes it
        assert acc["deepspeed_config"]["deepspeed_config_file"].endswith(ds_rel)
        acc["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
        (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    else:
        (tmp_path / "acc.yaml").write_text(files[f"configs/accelerate-{train.id}.yaml"])
    check_accelerate(tmp_path / "acc.yaml", step, cpu=False)


@pytest.mark.parametrize(("name", "dist", "offload"), variants(),
                         ids=[f"{n}-{d}{'-offload' if o else ''}" for n, d, o in variants()])
@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "simulated"])
def test_every_distribution_parses(name: str, dist: str, offload: bool, cpu: bool, tmp_path: Path) -> None:
    step = variant_step(name, dist, offload)
    ds = launch.deepspeed_config(step)
    ds_path = tmp_path / "ds.json"
    if ds is not None:
        ds_path.write_text(launch.dump_json(ds))
        if not cpu:  # the DeepSpeed file does not depend on where it runs
            check_deepspeed(ds_path, step, HIDDEN[name])
    acc = launch.accelerate_config(step, deepspeed_file=str(ds_path) if ds else None, cpu=cpu)
    (tmp_path / "acc.yaml").write_text(launch.dump_yaml(acc))
    check_accelerate(tmp_path / "acc.yaml", step, cpu=cpu)


def test_deepspeed_rejects_a_mistyped_key(tmp_path: Path) -> None:
    """The parse above means something: DeepSpeed refuses keys it does not know."""
    require("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    step = variant_step("gemma", "deepspeed-zero3", True)
    ds = launch.deepspeed_config(step)
    assert ds is not None
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
              gradient_clipping=1.0, bf16={"enabled": True}, fp16={"enabled": False})
    ds["optimizer"]["params"].update(lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    ds["zero_optimization"] = {**ds["zero_optimization"], "reduce_bucket_size": 1, "stage3_prefetch_bucket_size": 1,
                               "stage3_param_persistence_threshold": 1}
    DeepSpeedConfig(ds)
    ds["zero_optimization"]["offload_optimiser"] = ds["zero_optimization"].pop("offload_optimizer")
    with pytest.raises(Exception, match="offload_optimiser"):
        DeepSpeedConfig(ds)


def test_offload_without_an_optimizer_block_is_what_failed() -> None:
    """Without `optimizer`, accelerate swaps the Trainer's AdamW for DeepSpeedCPUAdam (a C++
    op compiled at run time) and DeepSpeed refuses any other client optimizer; with it,
    DeepSpeed builds torch's AdamW itself and the swap is switched off."""
    step = variant_step("mistral", "deepspeed-zero2", True)
    ds = launch.deepspeed_config(step)
    assert ds is not None
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_force_ds_cpu_optimizer"] is False
    no_offload = launch.deepspeed_config(variant_step("mistral", "deepspeed-zero2", False))
    assert no_offload is not None and "optimizer" not in no_offload


def test_simulated_gpus_keep_a_multi_process_launcher() -> None:
    """On a machine whose GPUs are simulated, DDP must still start one process per GPU:
    MULTI_GPU with use_cpu (torchrun, gloo), never accelerate's MULTI_CPU (mpirun only)."""
    step = variant_step("llama-2gpu", "ddp", False)
    acc = launch.accelerate_config(step, deepspeed_file=None, cpu=True)
    assert acc["distributed_type"] == "MULTI_GPU" and acc["use_cpu"] is True and acc["num_processes"] == 2
    real = launch.accelerate_config(step, deepspeed_file=None)
    assert real["use_cpu"] is False
