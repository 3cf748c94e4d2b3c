"""`ftkit compose`: write a recipe's plan as a Docker Compose stack."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click

from ftkit.cli.params import CheckedPath
from ftkit.errors import UserError


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
@click.option("--force", is_flag=True, help="write into a directory that holds other files, or over an edited .env")
@click.option("--dry-run", is_flag=True, help="print compose.yaml and .env, and write nothing")
def compose(recipe: str, machine_path: str | None, out: Path, user_text: str | None, node: str | None, force: bool,
            dry_run: bool) -> None:
    """Write RECIPE's plan as a Docker Compose stack in OUT: compose.yaml, .env (every host
    path, port and image: edit it to move the stack) and a README with the commands.

    Rendered from the plan `ftkit up` runs. `docker compose --profile train up` runs the
    one-shot steps in order; `docker compose --profile serve up -d` starts the server(s).
    Host steps (power caps, stopping a systemd service) are listed in the README. Refuses
    (exit 2, nothing written) a recipe `ftkit up` would refuse on this machine."""
    from ftkit.run.planning import prepare

    uid, gid = _user(user_text)
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
                       force, dry_run)
        return
    _write_one(plan, recipe, machine_path, out, out_dir, uid, gid, user_text, node, force, dry_run)


def _write_one(plan, recipe: str, machine_path: str | None, out: Path, out_dir: Path, uid: int, gid: int,  # type: ignore[no-untyped-def]
               user_text: str | None, node: str | None, force: bool, dry_run: bool) -> None:
    from ftkit.compose.render import RenderOptions, render
    from ftkit.compose.write import check_target, stack_files, write_stack

    argv = ["ftkit", "compose", recipe] + (["--machine", machine_path] if machine_path else []) + ["-o", str(out)]
    if user_text is not None:
        argv += ["--user", f"{uid}:{gid}"]
    if node is not None:
        argv += ["--node", node]
    options = RenderOptions(out_dir=str(out_dir), recipe_dir=os.path.dirname(os.path.realpath(recipe)),
                            uid=uid, gid=gid, command=shlex.join(argv), node=node)
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
    click.echo("  README.md lists the host steps (power caps, service handoff) and how to build the images")


COMMANDS = [compose]
