"""Render Dockerfiles from the Jinja2 templates in images/templates.

The environment is strict (an undefined variable is an error, not an empty string) and
everything the template shows is computed here: the templates only place values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from ftkit import __version__
from ftkit.errors import ImageError
from ftkit.images.variants import Variant

PYPI = "https://pypi.org/simple"
BUILD_STAGE_LABEL = "dev.ftkit.build-stage"


@dataclass
class RenderOptions:
    base_image: str | None = None  # replaces the variant's base (tests use a local image)
    buildkit: bool = True
    wheelhouse: bool = False
    ca_bundle: bool = False
    index_url: str = PYPI
    extra: dict[str, Any] = field(default_factory=dict)


def environment(templates: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


def wheel_name() -> str:
    return f"ftkit-{__version__}-py3-none-any.whl"


def index_args(v: Variant, opts: RenderOptions) -> list[str]:
    args = ["--index-url", opts.index_url]
    if opts.wheelhouse:
        # The wheelhouse stands in for the variant's extra indexes (air-gapped, or CI where
        # the torch CPU index is out of reach); the lock's hashes still decide what installs.
        args += ["--find-links", "/wheelhouse"]
    else:
        for url in v.extra_index_urls:
            args += ["--extra-index-url", url]
    return args


def context(image: str, template_name: str, v: Variant, lock_sha256: str, opts: RenderOptions) -> dict[str, Any]:
    return {
        "image": image,
        "variant": v.name,
        "template": template_name,
        "base_ref": opts.base_image or v.base.ref,
        "python": v.python,
        "apt": list(v.apt),
        "torch": v.torch,
        "cuda": v.cuda,
        "env": dict(v.env),
        "command": list(v.command),
        "exclude": sorted(v.exclude),
        "exclude_pattern": "|".join(re.escape(n) for n in sorted(v.exclude)),
        "buildkit": opts.buildkit,
        "wheelhouse": opts.wheelhouse,
        "ca_bundle": opts.ca_bundle,
        "index_args": index_args(v, opts),
        "wheel_name": wheel_name(),
        "lock_sha256": lock_sha256,
        "build_stage_label": BUILD_STAGE_LABEL,
        **opts.extra,
    }


def render(templates: Path, template_name: str, ctx: dict[str, Any]) -> str:
    try:
        text = environment(templates).get_template(template_name).render(**ctx)
    except jinja2.UndefinedError as e:
        raise ImageError(f"template {template_name}: {e.message} (a value the template needs was not given)") from e
    except jinja2.TemplateError as e:
        raise ImageError(f"template {template_name}: {e}") from e
    # Collapse runs of blank lines the conditional blocks leave behind.
    out: list[str] = []
    for line in text.splitlines():
        if line.strip() == "" and out and out[-1].strip() == "":
            continue
        out.append(line.rstrip())
    return "\n".join(out).strip() + "\n"
