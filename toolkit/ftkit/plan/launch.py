"""Generated launcher configs: accelerate's config file and DeepSpeed's JSON, from the
recipe's train step. Users never hand-write these (the guides' `accelerate config`
wizard answers, made reproducible). Tests load every generated file with accelerate's,
transformers' and DeepSpeed's own config classes, and run them on two CPU processes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import yaml

from ftkit.recipe.models import TrainStep

if TYPE_CHECKING:
    from ftkit.recipe.resolve import ResolvedTrainStep


def accelerate_config(step: ResolvedTrainStep, *, deepspeed_file: str | None, cpu: bool = False) -> dict[str, Any]:
    """accelerate's config for the step. `cpu`: the GPUs are simulated (no device exists),
    so the processes train on the CPU over gloo.

    Multi-process runs keep distributed_type MULTI_GPU (or DEEPSPEED) on a CPU too: those
    go through torchrun, one process per GPU. accelerate's own MULTI_CPU type needs mpirun
    on a single machine and otherwise starts ONE process without a word, so it is never
    used; `use_cpu: true` tells each process to use the CPU and gloo instead.
    """
    gpus = list(step.gpus)
    mixed = "no" if step.precision == "fp32" else step.precision
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,
        "num_machines": 1,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": mixed,
        "downcast_bf16": "no",
    }
    if not gpus:
        cfg.update(distributed_type="NO", num_processes=1, use_cpu=True)
        return cfg
    # CUDA_VISIBLE_DEVICES selects the GPUs, so inside the process they are 0..n-1.
    cfg["gpu_ids"] = "all"
    cfg["use_cpu"] = cpu
    if step.distribution == "single":
        cfg.update(distributed_type="NO", num_processes=1)
    elif step.distribution == "ddp":
        cfg.update(distributed_type="MULTI_GPU", num_processes=len(gpus))
    else:
        cfg.update(
            distributed_type="DEEPSPEED",
            num_processes=len(gpus),
            deepspeed_config={
                "deepspeed_config_file": deepspeed_file,
                "zero3_init_flag": step.distribution == "deepspeed-zero3",
            },
        )
        cfg.pop("mixed_precision")  # DeepSpeed's file decides (bf16/fp16 "auto" follows the trainer)
        cfg.pop("downcast_bf16")
    return cfg


def deepspeed_config(step: TrainStep) -> dict[str, Any] | None:
    if not step.distribution.startswith("deepspeed"):
        return None
    stage = 3 if step.distribution == "deepspeed-zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            # Saving the adapter/model needs whole tensors, not shards.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    # "auto" values are filled in by the HF Trainer from the recipe's settings, so the two
    # can never disagree (batch size, accumulation, clipping, precision, learning rate).
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
    }
    if step.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # Without an optimizer here, the Trainer hands DeepSpeed its own AdamW: DeepSpeed then
        # refuses it ("ZeRO-Offload with a client provided optimizer"), or accelerate swaps
        # it for DeepSpeedCPUAdam, a C++ op compiled at run time - and the CUDA images carry
        # no prebuilt ops (DS_BUILD_OPS=0) and no compiler. DeepSpeed's own AdamW with
        # torch_adam runs torch.optim.AdamW on the offloaded fp32 states: nothing to compile.
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        }
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
