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
    """lm-eval's YAML: `!function module.name` tags read as plain text (nothing is imported)."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read(path: Path, depth: int = 0) -> dict[str, Any]:
    """One task YAML with what it includes (the included file first, as lm-eval merges them)."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{path.name} is over {MAX_YAML_BYTES >> 20} MiB")
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a YAML mapping")
    inc = data.pop("include", None)
    if inc is None or depth > 8:
        return data
    merged: dict[str, Any] = {}
    for name in inc if isinstance(inc, list) else [inc]:
        if isinstance(name, str) and (path.parent / name).is_file():
            merged.update(_read(path.parent / name, depth + 1))
    merged.update(data)
    return merged


def task_types(path: Path) -> dict[str, str]:
    """{task name: output_type} of the tasks a YAML file or a directory of them defines
    (groups and files that define no task are left out). Raises ValueError with the file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))[:MAX_FILES]
    out: dict[str, str] = {}
    for f in files:
        try:
            cfg = _read(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
            if path.is_file():
                raise ValueError(f"{f.name}: {str(e).splitlines()[0]}") from None
            continue  # a directory may hold YAML that is not a task (lm-eval skips it too)
        name = cfg.get("task")
        if isinstance(name, str):
            kind = cfg.get("output_type", DEFAULT_OUTPUT_TYPE)
            out[name] = kind if isinstance(kind, str) else DEFAULT_OUTPUT_TYPE
    return out


def logprob_tasks(types: dict[str, str]) -> list[str]:
    return [name for name, kind in types.items() if kind in LOGPROB_TYPES]
