"""`ftkit compose`: write a recipe's plan as a Docker Compose stack."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ftkit.cli.params import CheckedPath
from ftkit.errors import UserError

if TYPE_CHECKING:
    from ftkit.plan.spec import DockerSettings


def _user(text: str | None) -> tuple[int, int]:
    if text is None:
        return os.getuid(), os.getgid()
    m = re.fullmatch(r"(\d{1,10}):(\d{1,10})", text.strip())
    if m is None:
        raise UserError(f"--user {text!r}: expected UID:GID (numbers), e.g. 1000:1000")
    return int(m[1]), int(m[2])


@click.command()
@click.argument("recipe", type=click.Path(path_type=str))
@click.option("--machine", "-m", "machine_path", type=click.Path(path_type=str),
              help="machine profile (default: this host, detected)")
@click.option("-o", "--output", "out", required=True, type=CheckedPath(fills=True, system_ok=False, file_okay=False, path_type=Path),
              help="the stack directory: compose.yaml, .env, README.md and run/ go here")
@click.option("--user", "user_text", metavar="UID:GID", default=None,
              help="the containers' user, written to .env (default: yours, so the run directory stays yours)")
@click.option("--node", default=None, metavar="NAME",
              help="a multi-node recipe: the cluster node this stack is for (one stack per node; default: the first)")
@click.option("--project-name", "-p", "project", default=None, metavar="NAME",
              help="the Compose project (COMPOSE_PROJECT_NAME in .env); default: ftkit-<recipe>-<6 hex of the "
                   "directory beside the recipe>, so stacks of one recipe never share containers. Give two stacks "
                   "one name to share them")
@click.option("--force", is_flag=True, help="write into a directory that holds other files, or over an edited .env")
@click.option("--dry-run", is_flag=True, help="print compose.yaml and .env, and write nothing")
def compose(recipe: str, machine_path: str | None, out: Path, user_text: str | None, node: str | None,
            project: str | None, force: bool, dry_run: bool) -> None:
    """Write RECIPE's plan as a Docker Compose stack in OUT: compose.yaml, .env (every host
    path, port and image: edit it to move the stack) and a README with the commands.

    Rendered from the plan `ftkit up` runs. `docker compose --profile train up` runs the
    one-shot steps in order; `docker compose --profile serve up -d` starts the server(s).
    Host steps (power caps, stopping a systemd service) are listed in the README. Refuses
    (exit 2, nothing written) a recipe `ftkit up` would refuse on this machine."""
    from ftkit.prepare import prepare

    uid, gid = _user(user_text)
    _project(project)
    # real paths: the planner resolves the recipe's inputs, and they are compared with these
    out_dir = Path(os.path.realpath(out))

    def first_node(res) -> str | None:  # type: ignore[no-untyped-def]
        c = res.machine.cluster
        multi = c is not None and any(getattr(s, "nodes", 1) > 1 for s in res.recipe.steps)
        return c.nodes[0].name if multi and node == "all" else None

    prepared = prepare(recipe, machine_path, executor="docker",
                       run_dir=lambda res: str(out_dir / (first_node(res) or "") / "run"))
    prepared.check()
    plan = prepared.plan
    if node == "all":  # one stack per node under OUT/<node>/, all on the first node's run directory
        multi = next((s for s in plan.steps if s.nodes), None)
        if multi is None:
            raise UserError("--node all: the recipe has no multi-node step")
        for n in multi.nodes:
            _write_one(plan, recipe, machine_path, out / n.name, Path(out_dir / n.name), uid, gid, user_text, n.name,
                       _node_project(project, n.name) if project else None, force, dry_run)
        _missing_images(plan, machine_path)
        return
    _write_one(plan, recipe, machine_path, out, out_dir, uid, gid, user_text, node, project, force, dry_run)
    _missing_images(plan, machine_path)


def _write_one(plan, recipe: str, machine_path: str | None, out: Path, out_dir: Path, uid: int, gid: int,  # type: ignore[no-untyped-def]
               user_text: str | None, node: str | None, project: str | None, force: bool, dry_run: bool) -> None:
    from ftkit.compose.stack import RenderOptions, render
    from ftkit.compose.write import check_target, stack_files, write_stack

    argv = ["ftkit", "compose", recipe] + (["--machine", machine_path] if machine_path else []) + ["-o", str(out)]
    if user_text is not None:
        argv += ["--user", f"{uid}:{gid}"]
    if node is not None:
        argv += ["--node", node]
    if project is not None:
        argv += ["--project-name", project]
    options = RenderOptions(out_dir=str(out_dir), recipe_dir=os.path.dirname(os.path.realpath(recipe)),
                            uid=uid, gid=gid, command=shlex.join(argv), node=node, project=project)
    stack = render(plan, options)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        check_target(out_dir, stack, force=force)
        files = stack_files(stack)
        click.echo(f"would write {len(files)} file(s) to {out}/: {', '.join(files)}")
        click.echo(f"\n--- {out}/compose.yaml\n{files['compose.yaml']}\n--- {out}/.env\n{files['.env']}", nl=False)
        return
    written = write_stack(out_dir, stack, force=force)
    click.echo(f"wrote {len(written)} file(s) to {out}/ (compose.yaml, .env, README.md, run/)")
    names = [s.id for s in stack.services]
    if any(s.profile == "train" for s in stack.services):
        click.echo(f"  cd {shlex.quote(str(out))} && docker compose --profile train up")
    if any(s.profile == "serve" for s in stack.services):
        click.echo(f"  cd {shlex.quote(str(out))} && docker compose --profile serve up -d")
    if not names:
        click.echo("  (the plan has no container steps)")
    else:  # the containers journal the run into run/: read like an `ftkit up` run
        click.echo(f"  ftkit status {shlex.quote(str(out))} && ftkit report {shlex.quote(str(out / 'run'))}")
    click.echo("  README.md lists the host steps (power caps, service handoff) and how to build the images")


def _node_project(project: str, node: str) -> str:
    """`--node all -p NAME`: each node's stack its own project, NAME-<node>, in what a Compose
    project name may hold (a node named by its host name has dots and capitals) and within 63
    characters; cut or cleaned, with a digest of the whole name after it (compose.stack.
    project_name's rule), so two nodes' projects never become one."""
    import hashlib

    from ftkit.compose.stack import PROJECT_NAME

    clean = re.sub(r"[^a-z0-9_-]", "-", node.lower())
    name = f"{project}-{clean}"
    if clean == node and PROJECT_NAME.match(name):
        return name
    # cut, or cleaned (Node.A and node-a would be one project): the digest keeps them apart
    return f"{name[:56]}-{hashlib.sha256(f'{project}-{node}'.encode()).hexdigest()[:6]}"


def _project(name: str | None) -> None:
    from ftkit.compose.stack import PROJECT_NAME

    if name is not None and not PROJECT_NAME.match(name):
        raise UserError(f"--project-name {name[:80]!r}: a Compose project name is 1 to 63 lowercase letters, digits, "
                        "'-' and '_', starting with a letter or digit")


def _missing_images(plan, machine_path: str | None) -> None:  # type: ignore[no-untyped-def]
    """Warn about the stack's images that the Docker engine here does not have, with the
    `ftkit build` commands that make exactly those tags; or say that no engine could be asked."""
    from ftkit.errors import DockerError, DockerUnavailable, FtkitError
    from ftkit.gateways import docker as dk
    from ftkit.plan.spec import DockerSettings

    refs = list(dict.fromkeys(s.image for s in plan.steps if s.executor == "docker" and s.image))  # plan order
    if not refs:
        return
    host = plan.docker_host
    docker = plan.docker or DockerSettings()
    where = host or os.environ.get("DOCKER_HOST") or "the local socket"
    unknown = "cannot tell whether the stack's images are built here (README.md says how to build them)"
    try:
        if not dk.reachable(host):
            click.echo(f"note: no Docker engine reachable at {where}: {unknown}", err=True)
            return
        missing = [r for r in refs if dk.image_attrs(r, host) is None]
    except (DockerUnavailable, DockerError) as e:
        click.echo(f"note: the Docker engine at {where} did not answer ({e.message.splitlines()[0][:160]}): {unknown}",
                   err=True)
        return
    except FtkitError as e:  # a DOCKER_HOST ftkit refuses to use
        click.echo(f"note: {e.message.splitlines()[0]}: {unknown}", err=True)
        return
    if not missing:
        return
    click.echo(f"warning: {len(missing)} of the stack's images {'is' if len(missing) == 1 else 'are'} not in the "
               f"Docker engine here: {', '.join(missing)}; build exactly {'it' if len(missing) == 1 else 'those'} "
               "with:", err=True)
    for ref in missing:
        click.echo(f"  {_build_command(ref, docker, machine_path)}", err=True)
    try:
        others = _built_from_another_base(missing, docker, host)
    except FtkitError:  # only a note: the warning above stands on its own
        return
    profile = shlex.quote(machine_path) if machine_path else "PROFILE"
    for ref, (tag, base, wanted) in others.items():
        click.echo(f"note: {tag} here is the same image built FROM {base}; the stack names {ref}, built FROM "
                   f"{wanted} (the base image is part of the tag). To run the one you have, put `docker.base_image: "
                   f"{base}` in the machine profile and generate the stack with it (`ftkit compose RECIPE --machine "
                   f"{profile} -o DIR`)", err=True)


def _built_from_another_base(missing: list[str], docker: DockerSettings,
                             host: str | None) -> dict[str, tuple[str, str, str]]:
    """For each missing content tag, an image here built from the same sources and lock but
    FROM another base (`ftkit build --base-image` without the profile): its tag, its base and
    the base the missing tag is built FROM.
    The base is part of the tag, so the stack, planned with the profile's base, never names it."""
    from ftkit.compose.stack import TAG
    from ftkit.gateways import docker as dk
    from ftkit.images import builder, project

    wanted = [(ref, m) for ref in missing if (m := TAG.match(ref)) is not None]
    if not wanted:
        return {}
    images = dk.images_with_label(f"{builder.LABEL_PREFIX}.image", host)
    root = project.find_root()
    out: dict[str, tuple[str, str, str]] = {}
    for ref, m in wanted:
        spec = builder.plan_build(root, m["image"], m["variant"], base_image=docker.base_image)
        if spec.tag != ref:  # the stack's tag is not this checkout's (an images.lock.json): nothing to compare
            continue
        for attrs in images:
            labels = (attrs.get("Config") or {}).get("Labels") or {}
            base = labels.get("org.opencontainers.image.base.name")
            tags = attrs.get("RepoTags") or []
            if (labels.get(f"{builder.LABEL_PREFIX}.image") == m["image"]
                    and labels.get(f"{builder.LABEL_PREFIX}.variant") == m["variant"]
                    and labels.get(f"{builder.LABEL_PREFIX}.source-sha256") == spec.source_sha256
                    and labels.get(f"{builder.LABEL_PREFIX}.lock-sha256") == spec.lock_sha256
                    and base and base != spec.base_ref and tags):
                out[ref] = (tags[0], base, spec.base_ref)
                break
    return out


def _build_command(ref: str, docker: DockerSettings, machine_path: str | None) -> str:
    """The `ftkit build` that makes `ref` from this checkout (with the machine profile: its
    base image, wheelhouse, CA bundle and engine), or what else gets it."""
    from ftkit.compose.stack import TAG

    m = TAG.match(ref)
    if m is None:  # pinned by the recipe (a digest, another registry): not ftkit's to build
        return f"docker pull {shlex.quote(ref)}    # or docker load it"
    image, variant = m["image"], m["variant"]
    if machine_path:
        command = f"ftkit build --machine {shlex.quote(machine_path)} --image {image} --variant {variant}"
    else:
        flags = "".join(f" {flag} {shlex.quote(value)}" for flag, value in docker.build_flags())
        command = f"ftkit build --image {image} --variant {variant}{flags}"
    try:
        from ftkit.images import builder, project

        tag = builder.plan_build(project.find_root(), image, variant, base_image=docker.base_image).tag
    except Exception:  # noqa: BLE001 - no lock for the variant, no checkout: the command still says what to build
        return command
    if tag != ref:  # the tag came from an images.lock.json (docker.images_lock), not from this checkout
        lock = docker.images_lock
        return (f"ftkit build --from-lock {shlex.quote(str(lock))} --image {image}    # {ref}" if lock else
                f"{command}    # builds {tag} from this checkout, not {ref}: docker load {ref} instead")
    return command


COMMANDS = [compose]
