"""Datasets: read, check every row, and shape rows into prompt/completion (or text).

Files are only read, never rewritten: the run must not change its own inputs. Problems
name the row (1-based line in jsonl) and what is wrong, several at once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.engines import templates
from ftkit.errors import DatasetError

MAX_REPORTED = 20
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    prompt: str
    completion: str  # "" for text format
    text: str | None = None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p}: no such file or directory")
    if p.is_dir():
        return _read_saved(p)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
            raise DatasetError(f"dataset {p}: cannot read parquet: {e}") from e
    raise DatasetError(f"dataset {p}: unknown file type {suffix!r} (jsonl, json, parquet, or a saved datasets directory)")


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    rows, errors = [], []
    with open(p, encoding="utf-8", errors="strict") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append(f"row {n}: not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(obj, dict):
                    errors.append(f"row {n}: expected a JSON object, got {type(obj).__name__}")
                    continue
                obj["__row__"] = n
                rows.append(obj)
        except UnicodeDecodeError as e:
            raise DatasetError(f"dataset {p}: not UTF-8 ({e.reason})") from e
    _raise(p, errors)
    return rows


def _read_json(p: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset {p}: not valid JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"dataset {p}: expected a list of objects (or {{'data': [...]}})")
    rows = []
    for n, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise DatasetError(f"dataset {p}: row {n}: expected an object, got {type(obj).__name__}")
        rows.append({**obj, "__row__": n})
    return rows


def _read_saved(p: Path) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"dataset {p}: not a saved datasets directory: {e}") from e
    if hasattr(ds, "keys"):  # a DatasetDict: take train
        if "train" not in ds:
            raise DatasetError(f"dataset {p}: a DatasetDict without a 'train' split")
        ds = ds["train"]
    return [{**row, "__row__": n} for n, row in enumerate(ds, 1)]


def _raise(p: Path | str, errors: list[str]) -> None:
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DatasetError(f"dataset {p}: {len(errors)} bad row(s):\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more)


def check_rows(rows: list[dict[str, Any]], fmt: str, fields: dict[str, str], source: str) -> None:
    """Every row has what the format needs; report all bad rows together."""
    if not rows:
        raise DatasetError(f"dataset {source}: empty (no rows)")
    errors = []
    for row in rows:
        n = row.get("__row__", "?")
        problem = _row_problem(row, fmt, fields)
        if problem:
            errors.append(f"row {n}: {problem}")
    _raise(source, errors)


def _row_problem(row: dict[str, Any], fmt: str, f: dict[str, str]) -> str | None:
    def text_field(key: str, required: bool) -> str | None:
        name = f[key]
        if name not in row or row[name] is None:
            return f"field {name!r} is missing" if required else None
        if not isinstance(row[name], str):
            return f"field {name!r} must be text, got {type(row[name]).__name__}"
        if required and not row[name].strip():
            return f"field {name!r} is empty"
        return None

    if fmt == "alpaca":
        return text_field("instruction", True) or text_field("input", False) or text_field("output", True)
    if fmt == "text":
        return text_field("text", True)
    msgs = row.get(f["messages"])
    if not isinstance(msgs, list) or not msgs:
        return f"field {f['messages']!r} must be a non-empty list of messages"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"message {i}: expected an object"
        role, content = m.get(f["role"]), m.get(f["content"])
        if role not in ROLES:
            return f"message {i}: role {role!r} is not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {i}: content must be text"
    if msgs[-1].get(f["role"]) != "assistant":
        return "the last message must be the assistant's (it is what the model learns)"
    return None


def to_messages(row: dict[str, Any], fmt: str, f: dict[str, str], system: str | None) -> list[dict[str, str]]:
    if fmt == "chat":
        msgs = [{"role": m[f["role"]], "content": m[f["content"]]} for m in row[f["messages"]]]
    else:
        user = row[f["instruction"]]
        if row.get(f["input"]):
            user = f"{user}\n\n{row[f['input']]}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row[f["output"]]}]
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def to_example(row: dict[str, Any], cfg: dict[str, Any], template: str, tokenizer: Any | None) -> Example:
    fmt, f, system = cfg["format"], cfg["fields"], cfg.get("system_prompt")
    if fmt == "text":
        return Example(prompt="", completion="", text=row[f["text"]])
    if template == "alpaca":
        if fmt == "alpaca":
            return Example(alpaca_prompt_of(row, f, system), row[f["output"]])
        msgs = to_messages(row, fmt, f, system)
        turns = "\n\n".join(m["content"] for m in msgs[:-1] if m["role"] != "system")
        sys_msg = next((m["content"] for m in msgs if m["role"] == "system"), None)
        return Example(templates.alpaca_prompt(turns, "", sys_msg), msgs[-1]["content"])
    if tokenizer is None:
        raise DatasetError(f"template {template!r} needs the tokenizer")
    prompt, completion = templates.split_chat(tokenizer, to_messages(row, fmt, f, system))
    return Example(prompt, completion)


def alpaca_prompt_of(row: dict[str, Any], f: dict[str, str], system: str | None) -> str:
    return templates.alpaca_prompt(row[f["instruction"]], row.get(f["input"]) or "", system)


@dataclass
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def load_splits(cfg: dict[str, Any]) -> Splits:
    """Train and held-out rows per the recipe's dataset section (deterministic split)."""
    rows = read_rows(cfg["path"])
    check_rows(rows, cfg["format"], cfg["fields"], cfg["path"])
    ev = cfg.get("eval") or {}
    if ev.get("path"):
        eval_rows = read_rows(ev["path"])
        check_rows(eval_rows, cfg["format"], cfg["fields"], ev["path"])
        return Splits(rows, eval_rows)
    n = 0
    if ev.get("fraction"):
        n = max(1, int(round(len(rows) * ev["fraction"])))
    elif ev.get("size"):
        n = int(ev["size"])
    if n == 0:
        return Splits(rows, [])
    if n >= len(rows):
        raise DatasetError(f"dataset {cfg['path']}: eval split of {n} leaves no training rows ({len(rows)} in all)")
    order = list(range(len(rows)))
    random.Random(ev.get("seed", 0)).shuffle(order)
    held = set(order[:n])
    return Splits([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def expected_of(row: dict[str, Any], cfg: dict[str, Any]) -> str:
    f = cfg["fields"]
    if cfg["format"] == "alpaca":
        return str(row[f["output"]])
    if cfg["format"] == "chat":
        return str(row[f["messages"]][-1][f["content"]])
    raise DatasetError("text datasets have no expected answers; give the eval step prompts or a path")
