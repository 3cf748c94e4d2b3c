"""Datasets: read, check every row, and shape rows into prompt/completion (or text), or, for
chat templates, into tokens whose labels say which answers train (`dataset.train_on`).

Local files (jsonl, json, csv: read here, line by line; parquet, arrow, a saved or a data-file
directory: through `datasets`/pyarrow) and hub datasets (a pinned commit through the machine's
HF cache: huggingface_hub fetches or finds the snapshot, `datasets` reads it). Files are only
read, never rewritten: the run must not change its own inputs. Problems name the source and
the row (1-based line in jsonl and csv) and what is wrong.
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


def read_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of any shape the trainer reads (objects; not yet checked against a format)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p}: no such file or directory")
    problem = datarows.file_problem(p)
    if problem:
        raise DatasetError(f"{p}: {problem}")
    if datarows.is_saved_dir(p):
        return _read_saved(p, split)
    if p.is_dir():
        return _read_folder(str(p), str(p), split)
    suffix = p.suffix.lower()
    if suffix == ".arrow":
        from datasets import Dataset

        try:
            return [{**row, "__row__": n} for n, row in enumerate(Dataset.from_file(str(p)), 1)]
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
            raise DatasetError(f"dataset {p}: cannot read arrow: {_one_line(e)}") from e
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
    elif suffix == ".csv":
        items = list(datarows.iter_csv(p, sc))
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


def _read_saved(p: Path, split: str = "train") -> list[dict[str, Any]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"dataset {p}: not a saved datasets directory: {_one_line(e)}") from e
    if hasattr(ds, "keys"):  # a DatasetDict: take the recipe's split
        if split not in ds:
            raise DatasetError(f"dataset {p}: a DatasetDict without a {split!r} split (it has {', '.join(ds)})")
        ds = ds[split]
    return [{**row, "__row__": n} for n, row in enumerate(ds, 1)]


def _read_folder(where: str, source: str, split: str, subset: str | None = None) -> list[dict[str, Any]]:
    """A directory of data files (a dataset repository's layout) through the `datasets` folder
    loader: it finds the splits (data/train-*.jsonl, test.csv, ...) and reads every format."""
    from datasets import load_dataset

    try:
        ds = load_dataset(where, name=subset, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (unknown split, bad file)
        raise DatasetError(f"dataset {source}: cannot read split {split!r}: {_one_line(e)}") from e
    return [{**row, "__row__": n} for n, row in enumerate(ds, 1)]


def hub_source(cfg: dict[str, Any]) -> str:
    """How problems name a hub dataset: `org/name@<commit 12> (split)`."""
    sub = f" {cfg['subset']}" if cfg.get("subset") else ""
    return f"{cfg['hub']}@{(cfg.get('revision') or '?')[:12]}{sub} ({cfg.get('split') or 'train'})"


def hub_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """A hub dataset at its pinned commit: huggingface_hub finds the snapshot in the machine's
    HF cache (HF_HOME) or, online, downloads it there; `datasets` reads the files. Offline
    with the commit not cached: one line that says so."""
    from huggingface_hub import snapshot_download

    source = hub_source(cfg)
    try:
        where = snapshot_download(cfg["hub"], repo_type="dataset", revision=cfg.get("revision"))
    except Exception as e:  # noqa: BLE001 - offline, not found, gated, network
        offline = "offline" in str(e).lower() or type(e).__name__ == "LocalEntryNotFoundError"
        why = ("not in the HF cache and the hub is not reachable (offline)" if offline else _one_line(e))
        raise DatasetError(f"dataset {source}: {why}") from e
    return _read_folder(where, source, cfg.get("split") or "train", cfg.get("subset"))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _raise(sc: datarows.Scan, source: str) -> None:
    """One located line, the first problem, with a count of the rest: the trainer's ranks
    each print what they raise, so it must be short (validate lists them all)."""
    if sc.problems:
        lines = sc.lines(source)
        rest = len(sc.problems) - 1 + sc.more
        raise DatasetError(lines[0] + (f" (and {rest} more bad row(s); `ftkit validate` lists them)" if rest else ""))


def checked_rows(path: str | Path, fmt: str, fields: dict[str, str], split: str = "train") -> list[dict[str, Any]]:
    """The rows of `path`, each checked by the same code `ftkit validate` runs."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p}: no such file or directory")
    sc = datarows.scan(p, fmt, fields, keep=True)
    _raise(sc, str(p))
    if p.is_dir() or p.suffix.lower() in (".parquet", ".arrow"):  # read by datasets/pyarrow; checked row by row
        rows = read_rows(p, split)
        check_rows(rows, fmt, fields, f"{p} ({split})" if p.is_dir() else str(p))
        return rows
    return sc.rows


def dataset_rows(cfg: dict[str, Any], split: str | None = None) -> list[dict[str, Any]]:
    """The rows of the recipe's dataset (a hub dataset or a local path), its training split
    unless `split` names another, every row checked."""
    if split:
        cfg = {**cfg, "split": split}
    if cfg.get("hub"):
        rows = hub_rows(cfg)
        check_rows(rows, cfg["format"], cfg["fields"], hub_source(cfg))
        return rows
    return checked_rows(cfg["path"], cfg["format"], cfg["fields"], cfg.get("split") or "train")


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


def to_tokens(row: dict[str, Any], cfg: dict[str, Any], tokenizer: Any,
              max_length: int | None = None) -> dict[str, list[int]] | None:
    """A chat or alpaca row under a chat template as `input_ids` and `labels`: the answers
    `dataset.train_on` names carry loss (templates.tokenize_answers); None when truncation to
    `max_length` leaves no answer token."""
    msgs = to_messages(row, cfg["format"], cfg["fields"], cfg.get("system_prompt"))
    return templates.tokenize_answers(tokenizer, msgs, cfg.get("train_on") or "all_assistant_turns", max_length)


def alpaca_prompt_of(row: dict[str, Any], f: dict[str, str], system: str | None) -> str:
    return templates.alpaca_prompt(row[f["instruction"]], row.get(f["input"]) or "", system)


@dataclass
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def load_splits(cfg: dict[str, Any]) -> Splits:
    """Train and held-out rows per the recipe's dataset section (deterministic split)."""
    rows = dataset_rows(cfg)
    ev = cfg.get("eval") or {}
    if ev.get("path"):
        return Splits(rows, checked_rows(ev["path"], cfg["format"], cfg["fields"]))
    if ev.get("split"):
        return Splits(rows, dataset_rows(cfg, ev["split"]))
    n = datarows.eval_count(len(rows), ev.get("fraction"), ev.get("size"))
    if n == 0:
        return Splits(rows, [])
    if n >= len(rows):
        where = cfg.get("path") or hub_source(cfg)
        raise DatasetError(f"dataset {where}: eval split of {n} leaves no training rows ({len(rows)} in all)")
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
