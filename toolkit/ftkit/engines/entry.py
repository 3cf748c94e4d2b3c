"""Shared start-up for `python -m ftkit.engines.*`: read the engine config the plan wrote,
and turn ftkit errors into a one-line message and a non-zero exit, not a traceback, so the
runner's log tail says what went wrong."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError, UserError


@contextmanager
def guarded(what: str, where: str | None = None) -> Iterator[None]:
    """Every rank of a multi-GPU launch meets the same bad input (a dataset row, a config):
    rank 0 says it, once; the others exit with the same code in silence. A full disk is one
    line naming the file (or `where`, the engine's output) and what to do, not a traceback,
    whichever writer met it (see disk_full)."""
    try:
        yield
    except FtkitError as e:
        if not isinstance(e, UserError) or os.environ.get("RANK", "0") in ("0", ""):
            print(f"ftkit {what}: {e.render()}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:
        full = disk_full(e, where)
        if full is None:
            raise
        target, cause = full
        try:
            free = f"; {shutil.disk_usage(os.path.dirname(target) or '.').free / 2**30:.2f} GiB free there now"
        except OSError:
            free = ""
        fewer = " (or keep fewer checkpoints: checkpoint.keep_last in the recipe)" if what == "train" else ""
        print(f"ftkit {what}: no space left on the device holding {target} ({cause}{free}); free space{fewer} and "
              "resume the run (`ftkit up --resume RUN`: training goes on from its last complete checkpoint)",
              file=sys.stderr, flush=True)
        sys.exit(1)


FULL = (errno.ENOSPC, errno.EDQUOT)
# torch.save's C++ writer on a failed write: `[enforce fail at inline_container.cc:672] . unexpected pos
# 576 vs 534` (or `PytorchStreamWriter failed writing file data/0: file write failed`); no errno, no file
TORCH_WRITE = re.compile(r"inline_container\.cc:\d+\].*(unexpected pos|failed writing|file write failed)", re.DOTALL)
# Rust's io::Error (safetensors: `Error while serializing: I/O error: No space left on device (os error 28)`)
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# the savers' frames and the local that holds the file they write: torch.save(obj, f), save_file(tensors, filename)
SAVERS = {("save", "serialization.py"): "f", ("save_file", "torch.py"): "filename", ("save_file", "numpy.py"): "filename"}
FULL_DEVICE = os.makedev(1, 7)  # /dev/full: every write is ENOSPC


def disk_full(e: BaseException, where: str | None) -> tuple[str, str] | None:
    """(the file being written, the cause) when `e` is a write that failed because its device
    (or the user's quota) is full; None for anything else, which keeps its traceback.

    An OSError carries its errno; safetensors' Rust error names it in its message; torch.save's
    C++ writer loses it. For that one the file comes from the save's own frame in the
    traceback, and one block written at its end (then cut off again) asks the kernel: a
    full device answers ENOSPC, a writer that failed for another reason is not misreported."""
    for link in _chain(e):
        if isinstance(link, OSError) and link.errno in FULL:
            return str(link.filename or _saving(link) or where or "its output"), link.strerror or os.strerror(link.errno)
    text = str(e)
    m = RUST_OS_ERROR.search(text)
    if m and int(m.group(1)) in FULL:
        return _saving(e) or where or "its output", os.strerror(int(m.group(1)))
    if isinstance(e, RuntimeError) and TORCH_WRITE.search(text):
        target = _saving(e)
        probe = target or (os.path.join(where, ".ftkit-space-probe") if where else None)
        code = _probe(probe) if probe else None
        if code in FULL:
            return target or where or "its output", f"{os.strerror(code)}; torch's writer said: {text.splitlines()[0][:120]}"
    return None


def _chain(e: BaseException, depth: int = 5) -> Iterator[BaseException]:
    seen: BaseException | None = e
    for _ in range(depth):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _saving(e: BaseException) -> str | None:
    """The file the innermost save in `e`'s traceback was writing (torch.save's `f`,
    safetensors' `filename`), or None."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        local = SAVERS.get((code.co_name, os.path.basename(code.co_filename)))
        if local is not None:
            value = tb.tb_frame.f_locals.get(local)
            if isinstance(value, (str, os.PathLike)):
                found = os.fspath(value)
            elif isinstance(getattr(value, "name", None), str):  # an open file
                found = value.name
        tb = tb.tb_next
    return str(found) if found is not None else None


def _probe(path: str, size: int = 64 * 1024) -> int | None:
    """The errno of writing `size` bytes at the end of `path` (a new file when it is not
    there), which is then cut back to what it was; None when the write goes through."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return e.errno
    if st is not None and stat.S_ISCHR(st.st_mode):
        return errno.ENOSPC if st.st_rdev == FULL_DEVICE else None  # other devices are not written to
    if st is not None and not stat.S_ISREG(st.st_mode):
        return None
    created = st is None
    try:
        fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if created else 0) | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return e.errno
    try:
        end = 0 if created else st.st_size  # type: ignore[union-attr]
        os.pwrite(fd, b"\0" * size, end)
        os.fsync(fd)  # a network filesystem may say it only here
        return None
    except OSError as e:
        return e.errno
    finally:
        try:
            if created:
                os.unlink(path)
            else:
                os.ftruncate(fd, st.st_size)  # type: ignore[union-attr]
        except OSError:
            pass
        os.close(fd)


def main_with_config(what: str, module: str, run: Callable[[dict[str, Any]], Any], argv: list[str] | None = None) -> Any:
    """`python -m MODULE --config FILE`: load the JSON config, validate it against the
    plan's job model for this engine (plan.jobs), and call run(config)."""
    from pydantic import ValidationError

    from ftkit.plan.jobs import JOBS

    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=f"ftkit's {what} engine")
    ap.add_argument("--config", required=True, help="the engine config written by the plan")
    args = ap.parse_args(argv)
    try:
        cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"ftkit {what}: cannot read config {args.config}: {e}", file=sys.stderr)
        sys.exit(2)
    job = JOBS.get(what)
    if job is not None:
        try:
            cfg = job.model_validate(cfg).to_json()
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
            print(f"ftkit {what}: {args.config} is not a {job.__name__} ({problems}); re-plan the run with this ftkit",
                  file=sys.stderr)
            sys.exit(2)
    where = cfg.get("output_dir") if isinstance(cfg.get("output_dir"), str) else None
    with guarded(what, where):
        return run(cfg)
