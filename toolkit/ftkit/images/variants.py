"""images/variants.yaml as typed data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftkit.errors import UserError

ImageName = Literal["train", "serve", "quantize"]


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")

    @property
    def ref(self) -> str:
        return f"{self.image}@{self.digest}" if self.digest else self.image


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    description: str = ""
    base: Base
    python: str = Field(..., pattern=r"^3\.\d+$")
    platform: str = "x86_64-manylinux_2_28"
    apt: list[str] = Field(default_factory=list)
    torch: str
    cuda: str | None = None
    min_driver: str | None = None
    arch_list: list[str] = Field(default_factory=list)
    extra_index_urls: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    command: list[str] = Field(default_factory=lambda: ["ftkit", "--help"])
    requirements: list[str]
    # Dependencies a requirement declares that must not be installed (they break the image);
    # left out of the lock, and tolerated as missing by the build's `pip check`.
    exclude: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]] = Field(default_factory=list)


class ImageDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str
    variants: dict[str, Variant]


class Variants(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: dict[str, ImageDef]

    def get(self, image: str, variant: str) -> Variant:
        if image not in self.images:
            raise UserError(f"unknown image {image!r}; known: {', '.join(self.images)}")
        variants = self.images[image].variants
        if variant not in variants:
            raise UserError(f"image {image} has no variant {variant!r}; known: {', '.join(variants)}")
        v = variants[variant].model_copy()
        v.name = variant
        return v

    def all(self) -> list[tuple[str, str]]:
        return [(img, var) for img, d in self.images.items() for var in d.variants]


def load(root: Path) -> Variants:
    path = root / "images" / "variants.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Variants.model_validate(data)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: {e}") from e
    except ValidationError as e:
        raise UserError(f"{path}: invalid variants:\n{e}") from e


DEFAULT_VARIANT = {"train": "cpu", "serve": "vllm-cpu", "quantize": "cpu"}
GPU_VARIANT = {"train": "cuda13.0", "serve": "vllm", "quantize": "cuda13.0"}
