"""lm-evaluation-harness tasks as the recipe names them, read without lm-eval.

A task is a name lm-eval registers (`gsm8k`) or a path, relative to the recipe, to a task
YAML file or a directory of them. A path is told from a name by its form (it ends in
.yaml/.yml or holds a `/`), so validate never guesses from what exists on this machine.

What kind of request each task sends decides whether a server can score it: a generate_until
task needs generated text; loglikelihood and multiple_choice tasks need the prompt's own
token log-probabilities (a completion with `echo` and `logprobs`), which vLLM gives and
`transformers serve` and any chat endpoint do not. Validate and plan read that from the
YAML (following its `include:`), here, without importing lm-eval; tasks named only are
checked by the engine once lm-eval has loaded them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

LOGPROB_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
DEFAULT_OUTPUT_TYPE = "generate_until"  # lm-eval's TaskConfig default
MAX_YAML_BYTES = 4 << 20
MAX_FILES = 2000


def is_path(task: str) -> bool:
    """Whether the recipe's task entry is a path (else an lm-eval task name)."""
    return task.endswith((".yaml", ".yml")) or "/" in task


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML: tags read as plain text, nothing imported; each `!function module.name`
    is noted (lm-eval imports `module.py` beside the YAML file and runs it: validate says so)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.functions: list[str] = []


def _tag(loader: _Loader, suffix: str, node: yaml.Node) -> None:
    if suffix == "function" and isinstance(node, yaml.ScalarNode):
        loader.functions.append(str(node.value))


_Loader.add_multi_constructor("!", _tag)


def _text(path: Path) -> str:
    """A task file's text: a regular file (opened without blocking: a FIFO named *.yaml in a
    task directory must not hang validate), at most MAX_YAML_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if st.st_size > MAX_YAML_BYTES:
            raise ValueError(f"{path.name} is over {MAX_YAML_BYTES >> 20} MiB")
        return os.read(fd, MAX_YAML_BYTES + 1).decode("utf-8")
    finally:
        os.close(fd)


def _load(path: Path) -> tuple[Any, list[str]]:
    loader = _Loader(_text(path))
    try:
        return loader.get_single_data(), loader.functions
    finally:
        loader.dispose()


def _includes(path: Path, data: dict[str, Any]) -> list[Path]:
    inc = data.get("include")
    out = []
    for name in inc if isinstance(inc, list) else [] if inc is None else [inc]:
        if not isinstance(name, str):
            continue
        if name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"{path.name}: include {name!r} leaves the task's directory")
        if (path.parent / name).is_file():
            out.append(path.parent / name)
    return out


def _read(path: Path, depth: int = 0, functions: list[tuple[Path, str]] | None = None) -> dict[str, Any]:
    """One task YAML with what it includes (the included file first, as lm-eval merges them);
    the `!function` references of each file read go to `functions` as (file, reference)."""
    data, refs = _load(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a YAML mapping")
    if functions is not None:
        functions += [(path, r) for r in refs]
    included = _includes(path, data)
    data.pop("include", None)
    if not included or depth > 8:
        return data
    merged: dict[str, Any] = {}
    for inc in included:
        merged.update(_read(inc, depth + 1, functions))
    merged.update(data)
    return merged


def _task_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())[:MAX_FILES]


def python_imports(path: Path) -> list[tuple[Path, str, Path]]:
    """(task file, `!function` reference, the Python file lm-eval imports for it) for the task
    files at `path`: lm-eval runs that Python, so validate names it and refuses one missing."""
    out: list[tuple[Path, str, Path]] = []
    for f in _task_files(path):
        refs: list[tuple[Path, str]] = []
        try:
            _read(f, functions=refs)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
            continue  # said by task_types
        for where, ref in refs:
            module = ref.rsplit(".", 1)[0] if "." in ref else ref
            out.append((where, ref, where.parent / f"{module}.py"))
    return out


def task_types(path: Path) -> dict[str, str]:
    """{task name: output_type} of the tasks a YAML file or a directory of them defines
    (groups and files that define no task are left out). Raises ValueError with the file."""
    files = _task_files(path)
    out: dict[str, str] = {}
    for f in files:
        try:
            cfg = _read(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
            if not path.is_dir():
                raise ValueError(f"{f.name}: {str(e).splitlines()[0]}") from None
            continue  # a directory may hold YAML that is not a task (lm-eval skips it too)
        name = cfg.get("task")
        if isinstance(name, str):
            kind = cfg.get("output_type", DEFAULT_OUTPUT_TYPE)
            out[name] = kind if isinstance(kind, str) else DEFAULT_OUTPUT_TYPE
    return out


def logprob_tasks(types: dict[str, str]) -> list[str]:
    return [name for name, kind in types.items() if kind in LOGPROB_TYPES]
