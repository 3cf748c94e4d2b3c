"""Put a rendered stack on disk: the thin side-effecting half of `ftkit compose`.

Refuses (exit 2, nothing written) to write into a directory that holds something other
than an ftkit stack, and to overwrite a `.env` that differs from the one it would write -
that file is where people move a stack to another machine, so silently replacing it would
throw their edits away (`--force` does it anyway; new image tags alone are not edits). Files are written atomically, compose.yaml
last: a stack interrupted halfway has no compose.yaml to start. A symbolic link inside the
stack (`run/` or `run/configs` pointing elsewhere) is refused even with `--force`: the
configs would be written wherever it points.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ftkit.compose.stack import HEADER_MARK, Stack
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
    """Raise UserError when writing the stack into `out_dir` would destroy something, or
    would write through a link."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if not out_dir.is_dir():
        return
    _refuse_links(out_dir, stack_files(stack))
    if force:
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
            hint = "move the edits to the machine profile and pass --force to overwrite it"
            if "COMPOSE_PROJECT_NAME" in changed and old.get("COMPOSE_PROJECT_NAME"):
                hint += (f"; --project-name {old['COMPOSE_PROJECT_NAME']} keeps the project name (containers started "
                         "under the old one are not the new project's)")
            raise UserError(f"{env}: differs from the generated one ({', '.join(changed)}); it may hold your edits",
                            hint=hint)


def write_stack(out_dir: Path, stack: Stack, *, force: bool = False) -> list[Path]:
    check_target(out_dir, stack, force=force)
    written = []
    files = stack_files(stack)
    for rel, content in files.items():
        path = out_dir / rel
        _refuse_links(out_dir, {rel: content})  # again just before: a directory made meanwhile
        write_atomic(path, content)
        written.append(path)
    return written


def _refuse_links(out_dir: Path, files: dict[str, str]) -> None:
    """Every directory between `out_dir` and a file of the stack, and the file itself, is a
    real directory or regular file when it exists: never a link (lstat, not followed)."""
    seen: set[Path] = set()
    for rel in files:
        here = out_dir
        parts = rel.split("/")
        for i, part in enumerate(parts):
            here = here / part
            last = i == len(parts) - 1
            if here in seen:
                continue
            seen.add(here)
            try:
                mode = os.lstat(here).st_mode
            except FileNotFoundError:
                break
            if stat.S_ISLNK(mode):
                raise UserError(f"{here}: a symbolic link in the stack directory; ftkit compose does not write "
                                "through links (remove it, or choose another directory)")
            if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
                raise UserError(f"{here}: not a {'regular file' if last else 'directory'}; ftkit compose writes "
                                "the stack's files only over its own")


def _values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v
    return out
