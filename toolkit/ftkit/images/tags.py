"""Which image each step of a plan runs in: the content tags `ftkit build` would produce
from this checkout (or an images.lock.json's tags)."""

from __future__ import annotations

from pathlib import Path

from ftkit.images import builder, imagelock, project
from ftkit.images.variants import DEFAULT_VARIANT, GPU_VARIANT
from ftkit.recipe.models import Machine


def variant_for(image: str, machine: Machine, simulated: bool = False) -> str:
    """CUDA variants for a machine with GPUs; CPU ones without, or when its GPUs are simulated."""
    return (GPU_VARIANT if machine.gpus and not simulated else DEFAULT_VARIANT)[image]


def expected_refs(machine: Machine, lock_file: Path | None = None, *, simulated: bool = False) -> dict[str, str]:
    refs: dict[str, str] = {}
    if lock_file is not None:
        for key, entry in imagelock.read(lock_file)["images"].items():
            image, variant = key.split("/", 1)
            refs.setdefault(image if image in ("train", "quantize") else f"serve-{variant}", entry["tag"])
        return refs
    root = project.find_root()
    base = machine.docker.base_image
    train_variant = variant_for("train", machine, simulated)
    refs["train"] = builder.plan_build(root, "train", train_variant, base_image=base).tag
    try:
        refs["quantize"] = builder.plan_build(root, "quantize", variant_for("quantize", machine, simulated),
                                              base_image=base).tag
    except Exception:  # noqa: BLE001 - no lock yet: shown as not built
        refs["quantize"] = "ftkit/quantize:<variant> (run ftkit lock + ftkit build --image quantize)"
    for variant in ("vllm", "vllm-cpu", "transformers"):
        try:
            refs[f"serve-{variant}"] = builder.plan_build(root, "serve", variant, base_image=base).tag
        except Exception:  # noqa: BLE001 - a variant without a lock shows as not built
            refs[f"serve-{variant}"] = f"ftkit/serve:{variant} (run ftkit lock + ftkit build)"
    return refs
