"""Dataset reading and checking: bad rows by number, empty files, formats, no writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ftkit.engines import data, templates
from ftkit.errors import DatasetError

FIELDS = {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
          "role": "role", "content": "content", "text": "text"}


def cfg(path: Path, fmt: str = "alpaca", **kw) -> dict:  # type: ignore[no-untyped-def]
    return {"path": str(path), "format": fmt, "fields": FIELDS, "template": "alpaca", "system_prompt": None, **kw}


def write(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_bad_rows_are_reported_with_numbers(tmp_path: Path) -> None:
    from ftkit.recipe import datarows

    p = write(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a"}, "{not json",
                         {"instruction": 3, "output": "x"}, {"instruction": "a", "output": ""}])
    lines = datarows.scan(p, "alpaca", FIELDS).lines("d.jsonl")
    assert lines == ["d.jsonl:2: field 'output' is missing", "d.jsonl:3: not valid JSON (Expecting property name "
                     "enclosed in double quotes at column 2)", "d.jsonl:4: field 'instruction' must be text, got a "
                     "number", "d.jsonl:5: field 'output' is empty"]
    with pytest.raises(DatasetError) as e:  # the trainer: one located line, the first, and a count
        data.load_splits(cfg(p))
    assert str(e.value) == (f"{p}:2: field 'output' is missing (and 3 more bad row(s); `ftkit validate` "
                            "lists them)")


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, [])
    with pytest.raises(DatasetError, match="empty"):
        data.load_splits(cfg(p))


def test_chat_rows_are_checked(tmp_path: Path) -> None:
    p = write(tmp_path, [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ])
    with pytest.raises(DatasetError) as e:
        data.load_splits(cfg(p, "chat"))
    assert f"{p}:2: the last message must be the assistant's" in str(e.value)
    assert "\n" not in str(e.value)


def test_reading_never_changes_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    splits = data.load_splits(cfg(p, eval={"fraction": 0.25, "seed": 1}))
    assert len(splits.train) == 15 and len(splits.eval) == 5
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before
    assert sorted(p.parent.iterdir()) == [p]
    again = data.load_splits(cfg(p, eval={"fraction": 0.25, "seed": 1}))
    assert [r["__row__"] for r in again.eval] == [r["__row__"] for r in splits.eval]


def test_alpaca_prompt_and_completion(tmp_path: Path) -> None:
    row = {"instruction": "Name it.", "input": "kiwi", "output": "fruit"}
    ex = data.to_example(row, cfg(tmp_path / "x"), "alpaca", None)
    assert ex.prompt == "### Instruction:\nName it.\n\n### Input:\nkiwi\n\n### Response:\n"
    assert ex.completion == "fruit"


def test_named_chat_template_splits_prompt_and_completion(tmp_path: Path) -> None:
    class Tok:
        chat_template = None
        bos_token = "<s>"
        eos_token = "</s>"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):  # type: ignore[no-untyped-def]
            import jinja2

            return jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                              bos_token=self.bos_token, eos_token=self.eos_token)

    tok = Tok()
    templates.apply_named(tok, "chatml")
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ex = data.to_example(row, cfg(tmp_path / "x", "chat"), "chatml", tok)
    assert ex.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ex.completion == "hello<|im_end|>\n"


def test_parquet_and_json_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "a", "input": "", "output": "b"}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert len(data.load_splits(cfg(tmp_path / "d.parquet")).train) == 3
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(data.load_splits(cfg(tmp_path / "d.json")).train) == 3
    with pytest.raises(DatasetError, match="unknown file type"):
        data.read_rows(write(tmp_path, [], "d.tsv"))
