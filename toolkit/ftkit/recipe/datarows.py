"""Dataset rows: the one reader of jsonl lines and the one checker of a row's shape, shared by
`ftkit validate` (through the recipe checks, so `plan`/`up` refuse before anything runs) and
the trainer's loader (engines/data.py). Sharing them is the point: validate accepts exactly
what the trainer accepts, and a row the trainer would refuse 11 s into `up` is refused here
with its line.

Streaming and bounded: a jsonl file is read line by line in binary with a cap per line
(`MAX_LINE_BYTES`), decoded strictly as UTF-8, and at most `MAX_REPORTED` problems are kept
(the rest are counted). Stdlib only: no datasets/pyarrow import at validate time.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REPORTED = 20
MAX_LINE_BYTES = 16 * 1024 * 1024  # one example; a longer line is a broken or hostile file
MAX_JSON_BYTES = 512 * 1024 * 1024  # a .json file is parsed whole
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's role names: mapped by `fields` (messages: conversations, role: from, content: value;
# `format: sharegpt` implies that mapping) the rows read as chat; the trainer takes these names
# for its roles. A tool's output (`tool`, ShareGPT's `observation`) is context: never trained on.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "observation": "tool"}
SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value"}
SHAREGPT_MAPPING = "`format: sharegpt` (or dataset.fields: {messages: conversations, role: from, content: value})"
SAVED_DIR_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
# what the trainer reads: these files, a saved datasets directory, or a directory of these files
# (the `datasets` library's folder loader: data/train-*.jsonl, train.csv, ...)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
MAX_CSV_FIELD = 16 * 1024 * 1024


@dataclass
class Scan:
    """What a pass over a dataset found: the rows (when kept), their count, and the first
    problems as `LINE: message` (the rest only counted)."""

    count: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line or row, message); 0: the file
    more: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    unit: str = "line"  # jsonl problems are at lines, a .json file's at list indices ("row")
    # a message said once: the other lines with the same problem (the first few) and their count
    repeats: dict[str, list[int]] = field(default_factory=dict)
    repeat_count: dict[str, int] = field(default_factory=dict)

    def add(self, where: int, problem: str) -> None:
        if problem in self.repeats:  # the same problem again (every row of a ShareGPT file): said once
            self.repeat_count[problem] += 1
            if len(self.repeats[problem]) < 3:
                self.repeats[problem].append(where)
        elif len(self.problems) < MAX_REPORTED:
            self.problems.append((where, problem))
            self.repeats[problem], self.repeat_count[problem] = [], 0
        else:
            self.more += 1

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, source: str) -> list[str]:
        """One line per problem, `SOURCE:LINE: message` (a .json file: `SOURCE: row N: ...`),
        a problem that recurs said once with where else (`also at lines 2, 3, 4 and 57 more`),
        then `... and N more`."""
        out = []
        for n, m in self.problems:
            text = (f"{source}:{n}: {m}" if n and self.unit == "line" else
                    f"{source}: row {n}: {m}" if n else f"{source}: {m}")
            again, count = self.repeats.get(m, []), self.repeat_count.get(m, 0)
            if again:
                listed = ", ".join(map(str, again))
                rest = f" and {count - len(again)} more" if count > len(again) else ""
                plural = "s" if count > 1 else ""
                text += f" (also at {self.unit}{plural} {listed}{rest})"
            out.append(text)
        if self.more:
            out.append(f"{source}: ... and {self.more} more bad row(s)")
        return out


def eval_count(total: int, fraction: float | None, size: int | None) -> int:
    """How many rows the deterministic eval split holds out of `total` (0: none)."""
    if fraction:
        return max(1, int(round(total * fraction)))
    return int(size or 0)


def role_of(value: Any) -> Any:
    return ROLE_ALIASES.get(value, value) if isinstance(value, str) else value


def row_problem(row: Any, fmt: str, f: dict[str, str]) -> str | None:
    """Why the trainer could not use `row` under format `fmt` and field mapping `f`, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {kind(row)}"

    def text_field(key: str, required: bool) -> str | None:
        name = f[key]
        if name not in row or row[name] is None:
            return f"field {name!r} is missing" if required else None
        if not isinstance(row[name], str):
            return f"field {name!r} must be text, got {kind(row[name])}"
        if "\x00" in row[name]:
            return f"field {name!r} contains a NUL character"
        if required and not row[name].strip():
            return f"field {name!r} is empty"
        return None

    if fmt == "alpaca":
        return text_field("instruction", True) or text_field("input", False) or text_field("output", True)
    if fmt == "text":
        return text_field("text", True)
    if fmt == "preference":  # a preference step's pairs (fields: prompt, chosen, rejected)
        bad = text_field("prompt", True) or text_field("chosen", True) or text_field("rejected", True)
        if bad is None and row[f["chosen"]].strip() == row[f["rejected"]].strip():
            return f"fields {f['chosen']!r} and {f['rejected']!r} are the same answer: nothing to prefer"
        return bad
    msgs = row.get(f["messages"])
    if msgs is None and f["messages"] == "messages" and isinstance(row.get("conversations"), list):
        return f"this is ShareGPT (conversations with from/value): map it with {SHAREGPT_MAPPING}"
    if not isinstance(msgs, list) or not msgs:
        return f"field {f['messages']!r} must be a non-empty list of messages"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"message {i}: expected an object, got {kind(m)}"
        role, content = role_of(m.get(f["role"])), m.get(f["content"])
        if role not in ROLES:
            if f["role"] == "role" and "from" in m and "value" in m:
                return f"message {i}: ShareGPT-style from/value: map it with {SHAREGPT_MAPPING}"
            return f"message {i}: role {_short(role)} is not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {i}: content must be text, got {kind(content)}"
        if "\x00" in content:
            return f"message {i}: content contains a NUL character"
    if role_of(msgs[-1].get(f["role"])) != "assistant":
        return "the last message must be the assistant's (it is what the model learns)"
    return None


def scan(path: Path, fmt: str, fields: dict[str, str], *, keep: bool = False) -> Scan:
    """Check every row of the dataset at `path`; keep the rows (each with `__row__`, its line
    or index) only when `keep` (the trainer). Problems are `LINE: message`; a problem with
    the whole file is `0: message`."""
    out = Scan()
    problem = file_problem(path)
    if problem:
        out.add(0, problem)
        return out
    if path.is_dir():  # a saved datasets directory or one of data files: the trainer reads it with `datasets`
        return out
    suffix = path.suffix.lower()
    if suffix == ".csv":
        for n, obj in iter_csv(path, out):
            _take(out, n, obj, fmt, fields, keep)
    elif suffix == ".jsonl":
        for n, obj in iter_jsonl(path, out):
            _take(out, n, obj, fmt, fields, keep)
    elif suffix == ".json":
        out.unit = "row"
        data = read_json(path, out)
        for n, obj in enumerate(data or [], 1):
            _take(out, n, obj, fmt, fields, keep)
    else:
        return out  # parquet, arrow: read by pyarrow/datasets in the trainer, checked there row by row
    if out.ok and out.count == 0:
        out.add(0, "empty (no rows)")
    return out


def file_problem(path: Path) -> str | None:
    """What makes `path` not a dataset file the trainer reads at all (before any row)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if not any((path / m).is_file() for m in SAVED_DIR_MARKERS) and not data_files(path):
            return ("a directory that is neither a saved datasets directory (no dataset_info.json or "
                    f"dataset_dict.json) nor one of data files ({', '.join(FILE_SUFFIXES)})"
                    + (f"; a {suffix} dataset is a file" if suffix in FILE_SUFFIXES else ""))
        return None
    if not path.is_file():
        return "not a regular file"
    if suffix not in FILE_SUFFIXES:
        return (f"unknown file type {suffix or '(none)'!r}: the trainer reads {', '.join(FILE_SUFFIXES)}, a saved "
                "datasets directory or a directory of such files" + ("; write TSV as .csv" if suffix == ".tsv" else ""))
    if suffix == ".parquet":
        with open(path, "rb") as fh:
            if fh.read(4) != b"PAR1":
                return "not a parquet file (no PAR1 header)"
    return None


def is_saved_dir(path: Path) -> bool:
    """A `save_to_disk` directory (read with load_from_disk), not a folder of data files."""
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DIR_MARKERS)


def data_files(path: Path, limit: int = 1) -> list[Path]:
    """Up to `limit` data files under directory `path` (hidden ones skipped, as `datasets` does)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in sorted(files):
            if not name.startswith((".", "_")) and Path(name).suffix.lower() in FILE_SUFFIXES:
                found.append(Path(root) / name)
                if len(found) >= limit:
                    return found
    return found


def iter_csv(path: Path, out: Scan) -> Iterator[tuple[int, Any]]:
    """CSV rows as objects of text keyed by the header, each with the line it starts on (the
    header is line 1). Every value is text, as the trainer reads it (no type guessing)."""
    csv.field_size_limit(MAX_CSV_FIELD)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header: list[str] | None = None
            start = 1
            for record in reader:
                if header is None:
                    header = record
                    start = reader.line_num + 1
                    continue
                n, start = start, reader.line_num + 1
                if not any(v.strip() for v in record):
                    continue
                if len(record) != len(header):
                    out.add(n, f"{len(record)} values for {len(header)} columns")
                    continue
                yield n, dict(zip(header, record, strict=True))
    except UnicodeDecodeError as e:
        out.add(0, f"not UTF-8 (byte {e.start + 1}: {e.reason})")
    except csv.Error as e:
        out.add(0, f"not valid CSV: {e}")


HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the Hugging Face libraries will not reach the hub here (their own switches)."""
    return any(env.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in HUB_OFFLINE_VARS)


def hub_cache_dir(hf_home: str | None, env: Mapping[str, str] = os.environ) -> Path:
    """Where huggingface_hub keeps repositories: the profile's hf_cache (HF_HOME) wins, then
    HF_HUB_CACHE, HF_HOME, ~/.cache/huggingface (as huggingface_hub resolves it)."""
    if hf_home:
        return Path(hf_home) / "hub"
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def hub_snapshot(cache: Path, repo: str, revision: str) -> Path | None:
    """The cached snapshot of dataset `repo` at `revision` (a commit, or a ref the cache
    recorded), or None when it is not there. Paths only: no hub library at validate time."""
    base = cache / ("datasets--" + repo.replace("/", "--"))
    commit = revision
    ref = base / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snap = base / "snapshots" / commit
    return snap if snap.is_dir() else None


def _take(out: Scan, n: int, obj: Any, fmt: str, fields: dict[str, str], keep: bool) -> None:
    problem = row_problem(obj, fmt, fields)
    if problem:
        out.add(n, problem)
        return
    out.count += 1
    if keep:
        out.rows.append({**obj, "__row__": n})


def iter_jsonl(path: Path, out: Scan) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        n = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                out.add(n, f"longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB (one row per line)")
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line, bounded reads
                    raw = fh.readline(MAX_LINE_BYTES)
                continue
            if b"\x00" in raw:
                out.add(n, "contains a NUL byte (a binary file, or UTF-16?)")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.add(n, f"not UTF-8 (byte {e.start + 1}: {e.reason})")
                continue
            if not line.strip():
                continue  # a blank line (often the last) is no row
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "; a JSON array belongs in a .json file" if n == 1 and line.lstrip().startswith("[") else ""
                out.add(n, f"not valid JSON ({e.msg} at column {e.colno}){hint}")
                continue
            except RecursionError:
                out.add(n, "nested too deeply")
                continue
            yield n, obj


def read_json(path: Path, out: Scan) -> list[Any] | None:
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        out.add(0, f"{size // (1024 * 1024)} MiB is too large for one .json document; write it as .jsonl")
        return None
    raw = path.read_bytes()
    if b"\x00" in raw:
        out.add(0, "contains a NUL byte (a binary file, or UTF-16?)")
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        out.add(0, f"not UTF-8 (byte {e.start + 1}: {e.reason})")
        return None
    except json.JSONDecodeError as e:
        out.add(0, f"not valid JSON (line {e.lineno}: {e.msg} at column {e.colno})")
        return None
    except RecursionError:
        out.add(0, "nested too deeply")
        return None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        out.add(0, f"expected a list of objects (or {{'data': [...]}}), got {kind(data)}")
        return None
    return data


def kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
