"""Issue #24/#21: datasets are read at validate time, every row, by the trainer's own checker
(recipe.datarows), streaming and bounded; each problem is `FILE:LINE` behind the recipe's
dataset.path location, and `validate` refuses what the trainer would refuse 11 s into `up`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftkit.engines import data
from ftkit.errors import DatasetError
from ftkit.recipe import datarows
from tests.conftest import run_cli
from tests.unit.test_bad_input_config import refused

GOOD = {"instruction": "i", "output": "o"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def recipe(fmt: str = "alpaca", path: str = "data.jsonl", extra: str = "", batch: int = 1) -> str:
    return (f"ftkit: 1\nname: demo\nmodel:\n  tiny: {{}}\ndataset:\n  path: {path}\n  format: {fmt}\n{extra}"
            f"steps:\n  - type: train\n    max_steps: 5\n    batch_size: {batch}\n")


def lines(rows: list, tail: int = 6) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows + [GOOD] * tail)


# name -> (file name, bytes or None for a directory, what the message says, line or None)
HOSTILE = {
    "empty": ("data.jsonl", b"", "empty (no rows)", None),
    "only_blank_lines": ("data.jsonl", b"\n  \n\n", "empty (no rows)", None),
    "invalid_utf8": ("data.jsonl", lines([b'{"instruction": "\xff\xfe", "output": "o"}']), "not UTF-8", 1),
    "csv_ragged_row": ("data.csv", b"instruction,output\ni,o\ni,o,x\n" + b"i,o\n" * 6, "3 values for 2 columns", 3),
    "tsv": ("data.tsv", b"instruction\toutput\ni\to\n", "write TSV as .csv", None),
    "json_array_in_jsonl": ("data.jsonl", b'[{"instruction": "i",\n "output": "o"}]\n', "belongs in a .json", 1),
    "missing_field": ("data.jsonl", lines([GOOD, {"instruction": "i"}]), "field 'output' is missing", 2),
    "nul_bytes": ("data.jsonl", lines([b'{"instruction": "i\x00", "output": "o"}']), "NUL byte", 1),
    "utf16": ("data.jsonl", json.dumps(GOOD).encode("utf-16"), "NUL byte", 1),
    "bare_scalar": ("data.jsonl", lines([b"42", b'"text"', b"null"]), "expected a JSON object, got a number", 1),
    "directory_named_jsonl": ("data.jsonl", None, "neither a saved datasets directory", None),
    "json_not_a_list": ("data.json", b'{"rows": 1}', "expected a list of objects", None),
    "json_scalar_rows": ("data.json", json.dumps([GOOD, 3]).encode(), "row 2: expected a JSON object", None),
    "parquet_that_is_not": ("data.parquet", b"instruction,output\n", "not a parquet file", None),
    "deep_nesting": ("data.jsonl", lines([b"[" * 100000 + b"]" * 100000]), "1:", 1),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_datasets_are_refused_at_validate(tmp_path: Path, name: str) -> None:
    file, content, words, line = HOSTILE[name]
    if content is None:
        (tmp_path / file).mkdir()
    else:
        (tmp_path / file).write_bytes(content)
    (tmp_path / "recipe.yaml").write_text(recipe(path=file))
    err = refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), words)
    assert "dataset.path" in err
    if line is not None:
        assert f" {file}:{line}: " in err, err


def test_chat_shapes_are_refused(tmp_path: Path) -> None:
    bad = [{"messages": "hi"}, {"messages": []}, {"messages": [1]},
           {"messages": [{"role": "user", "content": "hi"}]},
           {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}]
    (tmp_path / "data.jsonl").write_bytes(lines(bad + [CHAT] * 6, tail=0))
    (tmp_path / "recipe.yaml").write_text(recipe("chat"))
    err = refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), "non-empty list")
    for n in range(1, 6):  # each bad row named: at the start of its line, or with the rows that share its problem
        assert f"data.jsonl:{n}:" in err or re.search(rf"also at lines? [^)]*\b{n}\b", err), (n, err)


def test_a_60_mb_line_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datarows, "MAX_LINE_BYTES", 1024 * 1024)  # the same path as 16 MiB, in less memory
    big = b'{"instruction": "' + b"x" * (3 * 1024 * 1024) + b'", "output": "o"}'
    (tmp_path / "data.jsonl").write_bytes(lines([big]))
    (tmp_path / "recipe.yaml").write_text(recipe())
    err = refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), "longer than 1 MiB")
    assert "data.jsonl:1:" in err and "data.jsonl:2:" not in err  # the rest of the line is not a row


def test_many_bad_rows_are_capped_with_a_count(tmp_path: Path) -> None:
    def row(i: int) -> dict:  # type: ignore[type-arg]
        return {"messages": [{"role": f"r{i}", "content": "x"}, {"role": "assistant", "content": "y"}]}

    (tmp_path / "data.jsonl").write_bytes(lines([row(i) for i in range(50)], tail=0))
    (tmp_path / "recipe.yaml").write_text(recipe("chat"))
    err = refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), "and 30 more bad row(s)")
    assert len(err.strip().splitlines()) == datarows.MAX_REPORTED + 1


def test_one_problem_on_every_row_is_said_once(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_bytes(lines([{"instruction": "i"}] * 50))
    (tmp_path / "recipe.yaml").write_text(recipe())
    err = refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), "field 'output' is missing")
    assert err.strip().splitlines()[0].endswith("data.jsonl:1: field 'output' is missing (also at lines 2, 3, 4 and "
                                                "46 more)"), err
    assert len(err.strip().splitlines()) == 1


def test_a_dataset_too_small_for_the_eval_split_or_the_batch(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_bytes(lines([], tail=4))
    (tmp_path / "recipe.yaml").write_text(recipe(extra="  eval: {size: 4}\n"))
    refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), "leaves none to train on")
    (tmp_path / "recipe.yaml").write_text(recipe(extra="  eval: {size: 1}\n", batch=8))
    err = refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), "batch_size 8 is more than the 3 training row(s)")
    assert "steps[0].batch_size" in err


def test_sharegpt_without_a_mapping_names_the_mapping(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    (tmp_path / "data.jsonl").write_bytes(lines([row] * 8, tail=0))
    (tmp_path / "recipe.yaml").write_text(recipe("chat"))
    result = run_cli("validate", "recipe.yaml", cwd=tmp_path)
    err = refused(result, "fields: {messages: conversations, role: from, content: value}")
    assert err.count("ShareGPT") == 1 and "(also at lines 2, 3, 4 and 4 more)" in err  # said once, no traceback
    # ... and with that mapping the same file validates, and the trainer reads it (human/gpt roles)
    (tmp_path / "recipe.yaml").write_text(recipe("chat", extra="  fields: {messages: conversations, role: from, "
                                                 "content: value}\n"))
    assert run_cli("validate", "recipe.yaml", cwd=tmp_path).code == 0
    fields = {**dict.fromkeys(("instruction", "input", "output", "text")), "messages": "conversations",
              "role": "from", "content": "value"}
    rows = data.checked_rows(tmp_path / "data.jsonl", "chat", fields)
    assert data.to_messages(rows[0], "chat", fields, None)[-1] == {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("name", ["missing_field", "nul_bytes", "bare_scalar", "invalid_utf8", "directory_named_jsonl"])
def test_the_trainer_refuses_what_validate_refuses_in_one_line(tmp_path: Path, name: str) -> None:
    file, content, _, _ = HOSTILE[name]
    if content is None:
        (tmp_path / file).mkdir()
    else:
        (tmp_path / file).write_bytes(content)
    fields = {k: k for k in ("instruction", "input", "output", "messages", "role", "content", "text")}
    with pytest.raises(DatasetError) as e:
        data.load_splits({"path": str(tmp_path / file), "format": "alpaca", "fields": fields})
    assert "\n" not in str(e.value) and str(tmp_path / file) in str(e.value)


def test_a_variable_dataset_path_is_read_after_resolve(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "d.jsonl").write_bytes(lines([{"output": "o"}]))
    (tmp_path / "recipe.yaml").write_text(recipe(path="${datasets}/d.jsonl"))
    (tmp_path / "m.yaml").write_text(f"ftkit: 1\nkind: machine\nname: m\nexecutor: local\n"
                                     f"paths: {{datasets: {tmp_path / 'ds'}}}\n")
    err = refused(run_cli("validate", "recipe.yaml", "--machine", "m.yaml", cwd=tmp_path), "'instruction' is missing")
    assert "d.jsonl:1:" in err


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False), ("3", False)])
def test_a_bad_row_is_said_once_across_ranks(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             rank: str, printed: bool) -> None:
    from ftkit.engines.entry import guarded

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e, guarded("train"):
        raise DatasetError("d.jsonl:3: field 'output' is missing")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (err == "ftkit train: d.jsonl:3: field 'output' is missing\n") if printed else err == ""
