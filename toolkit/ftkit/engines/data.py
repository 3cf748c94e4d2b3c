"""Datasets: read, check every row, and shape rows into prompt/completion (or text).

Files are only read, never rewritten: the run must not change its own inputs. Problems
name the row (1-based line in jsonl) and what is wrong, several at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.engines import templates
from ftkit.errors import DatasetError
from ftkit.recipe import datarows

ROLES = datarows.ROLES


@dataclass
class Example:
    prompt: str
    completion: str  # "" for text format
    text: str | None = None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of any shape the trainer reads (objects; not yet checked against a format)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p}: no such file or directory")
    problem = datarows.file_problem(p)
    if problem:
        raise DatasetError(f"{p}: {problem}")
    if p.is_dir():
        return _read_saved(p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
            raise DatasetError(f"dataset {p}: cannot read parquet: {e}") from e
    sc = datarows.Scan()
    if suffix == ".json":
        sc.unit = "row"
        items = list(enumerate(datarows.read_json(p, sc) or [], 1))
    else:
        items = list(datarows.iter_jsonl(p, sc))
    rows = []
    for n, obj in items:
        if not isinstance(obj, dict):
            sc.add(n, f"expected a JSON object, got {datarows.kind(obj)}")
            continue
        rows.append({**obj, "__row__": n})
    _raise(sc, str(p))
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


def _raise(sc: datarows.Scan, source: str) -> None:
    """One located line, the first problem, with a count of the rest: the trainer's ranks
    each print what they raise, so it must be short (validate lists them all)."""
    if sc.problems:
        lines = sc.lines(source)
        rest = len(sc.problems) - 1 + sc.more
        raise DatasetError(lines[0] + (f" (and {rest} more bad row(s); `ftkit validate` lists them)" if rest else ""))


def checked_rows(path: str | Path, fmt: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    """The rows of `path`, each checked by the same code `ftkit validate` runs."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p}: no such file or directory")
    sc = datarows.scan(p, fmt, fields, keep=True)
    _raise(sc, str(p))
    if p.is_dir() or p.suffix.lower() == ".parquet":  # read by datasets/pyarrow; checked row by row
        rows = read_rows(p)
        check_rows(rows, fmt, fields, str(p))
        return rows
    return sc.rows


def check_rows(rows: list[dict[str, Any]], fmt: str, fields: dict[str, str], source: str) -> None:
    """Every row has what the format needs (datarows.row_problem, validate's checker)."""
    if not rows:
        raise DatasetError(f"{source}: empty (no rows)")
    sc = datarows.Scan(unit="row")
    for row in rows:
        problem = datarows.row_problem(row, fmt, fields)
        if problem:
            sc.add(int(row.get("__row__", 0)), problem)
    _raise(sc, source)


def to_messages(row: dict[str, Any], fmt: str, f: dict[str, str], system: str | None) -> list[dict[str, str]]:
    if fmt == "chat":
        msgs = [{"role": datarows.role_of(m[f["role"]]), "content": m[f["content"]]} for m in row[f["messages"]]]
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
    rows = checked_rows(cfg["path"], cfg["format"], cfg["fields"])
    ev = cfg.get("eval") or {}
    if ev.get("path"):
        return Splits(rows, checked_rows(ev["path"], cfg["format"], cfg["fields"]))
    n = datarows.eval_count(len(rows), ev.get("fraction"), ev.get("size"))
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
