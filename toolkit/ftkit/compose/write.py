"""Put a rendered stack on disk: the thin side-effecting half of `ftkit compose`.

Refuses (exit 2, nothing written) to write into a directory that holds something other
than an ftkit stack, and to overwrite a `.env` that differs from the one it would write -
that file is where people move a stack to another machine, so silently replacing it would
throw their edits away (`--force` does it anyway; new image tags alone are not edits). Files are written atomically, compose.yaml
last: a stack interrupted halfway has no compose.yaml to start.
"""

from __future__ import annotations

from pathlib import Path

from ftkit.compose.render import HEADER_MARK, Stack
from ftkit.errors import UserError
from ftkit.files import write_atomic


def stack_files(stack: Stack) -> dict[str, str]:
    """Every file of the stack, relative to its directory, in the order they are written."""
    files = dict(sorted(stack.files.items()))
    files["README.md"] = stack.readme
    files[".env"] = stack.env_text()
    files["compose.yaml"] = stack.compose_yaml()
    return files


def check_target(out_dir: Path, stack: Stack, *, force: bool) -> None:
    """Raise UserError when writing the stack into `out_dir` would destroy something."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if not out_dir.is_dir() or force:
        return
    compose = out_dir / "compose.yaml"
    entries = [p.name for p in out_dir.iterdir()]
    if entries and not (compose.is_file() and compose.read_text(encoding="utf-8", errors="replace").startswith(HEADER_MARK)):
        raise UserError(f"{out_dir}: not empty and not a stack written by ftkit compose",
                        hint="choose an empty directory, or pass --force to write into it anyway")
    env = out_dir / ".env"
    if env.is_file():
        old = _values(env.read_text(encoding="utf-8", errors="replace"))
        new = _values(stack.env_text())
        # image tags follow the checkout (every regeneration after an upgrade changes them): not edits
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.endswith("_IMAGE"))
        if changed:
            raise UserError(f"{env}: differs from the generated one ({', '.join(changed)}); it may hold your edits",
                            hint="move the edits to the machine profile and pass --force to overwrite it")


def write_stack(out_dir: Path, stack: Stack, *, force: bool = False) -> list[Path]:
    check_target(out_dir, stack, force=force)
    written = []
    for rel, content in stack_files(stack).items():
        path = out_dir / rel
        write_atomic(path, content)
        written.append(path)
    return written


def _values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v
    return out
