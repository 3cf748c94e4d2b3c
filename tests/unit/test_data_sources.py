"""Datasets beyond jsonl: a hub dataset pinned to a commit read from a local HF cache (offline,
no download), CSV/arrow files and data-file directories through `datasets`, ShareGPT with
system/tool turns, and multi-turn loss: exactly which tokens carry loss for
`train_on: all_assistant_turns` and `last_assistant_turn`, with EOS ending every answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

require("datasets")

from ftkit.engines import data, templates, tiny  # noqa: E402
from ftkit.errors import DatasetError  # noqa: E402
from ftkit.recipe import datarows  # noqa: E402
from ftkit.recipe.models import DatasetSpec  # noqa: E402

FIELDS = {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
          "role": "role", "content": "content", "text": "text"}
SHAREGPT = {**FIELDS, **datarows.SHAREGPT_FIELDS}
SHA = "0123456789abcdef0123456789abcdef01234567"
CONVERSATION = [  # three answers, a system prompt, a tool's output between them
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Germany?"},
    {"role": "tool", "content": "lookup: Berlin"},
    {"role": "assistant", "content": "Berlin."},
    {"role": "user", "content": "Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    corpus = [" ".join(m["content"] for m in CONVERSATION)] * 4
    return tiny.make_tokenizer(corpus, 300)


def runs(tokenizer: Any, out: dict[str, list[int]]) -> list[tuple[bool, str]]:
    """The sequence as maximal runs of (carries loss, decoded text)."""
    got: list[list[Any]] = []
    for i, label in zip(out["input_ids"], out["labels"], strict=True):
        trained = label != -100
        assert not trained or label == i  # a trained token's label is the token itself
        if not got or got[-1][0] != trained:
            got.append([trained, []])
        got[-1][1].append(i)
    return [(t, tokenizer.decode(ids)) for t, ids in got]


def test_every_assistant_turn_carries_loss_and_nothing_else(tok: Any) -> None:
    templates.apply_named(tok, "chatml")
    out = templates.tokenize_answers(tok, CONVERSATION, "all_assistant_turns")
    assert out is not None
    assert runs(tok, out) == [
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFrance?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Paris.<|im_end|>\n</s>"),
        (False, "<|im_start|>user\nGermany?<|im_end|>\n<|im_start|>tool\nlookup: Berlin<|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "Berlin.<|im_end|>\n</s>"),
        (False, "<|im_start|>user\nItaly?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Rome.<|im_end|>\n</s>"),
    ]


def test_last_assistant_turn_only(tok: Any) -> None:
    templates.apply_named(tok, "chatml")
    out = templates.tokenize_answers(tok, CONVERSATION, "last_assistant_turn")
    assert out is not None
    got = runs(tok, out)
    assert [t for t, _ in got] == [False, True]
    assert got[1][1] == "Rome.<|im_end|>\n</s>"
    assert got[0][1].endswith("<|im_start|>user\nItaly?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris.<|im_end|>\n<|im_start|>user" in got[0][1]  # earlier answers are context, no EOS added


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral", "tokenizer"])
def test_eos_ends_every_trained_answer_once(tok: Any, name: str) -> None:
    if name == "tokenizer":  # a model's own template that ends answers with EOS itself
        tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                             "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    else:
        templates.apply_named(tok, name)
    out = templates.tokenize_answers(tok, CONVERSATION[1:], "all_assistant_turns")
    assert out is not None
    answers = [text for trained, text in runs(tok, out) if trained]
    assert len(answers) == 3
    for answer, expected in zip(answers, ("Paris.", "Berlin.", "Rome."), strict=True):
        assert answer.strip().startswith(expected) and answer.rstrip("\n").endswith("</s>"), (name, answer)
        assert answer.count("</s>") == 1, (name, answer)


def test_seq_len_truncation_keeps_the_start_and_drops_rows_without_an_answer(tok: Any) -> None:
    templates.apply_named(tok, "chatml")
    whole = templates.tokenize_answers(tok, CONVERSATION, "all_assistant_turns")
    assert whole is not None
    first_answer_end = next(i for i, lab in enumerate(whole["labels"]) if lab == tok.eos_token_id) + 1
    cut = templates.tokenize_answers(tok, CONVERSATION, "all_assistant_turns", max_length=first_answer_end + 3)
    assert cut is not None and cut["input_ids"] == whole["input_ids"][:first_answer_end + 3]
    assert cut["labels"] == whole["labels"][:first_answer_end + 3]
    # the last answer only, cut before it: no loss left, the row is dropped
    assert templates.tokenize_answers(tok, CONVERSATION, "last_assistant_turn", max_length=first_answer_end) is None


def test_train_on_defaults_to_every_turn_and_sharegpt_implies_its_mapping() -> None:
    spec = DatasetSpec.model_validate({"path": "d.jsonl", "format": "sharegpt"})
    assert spec.train_on == "all_assistant_turns"
    assert spec.format == "chat" and spec.fields.model_dump() == SHAREGPT
    spec = DatasetSpec.model_validate({"path": "d.jsonl", "format": "sharegpt", "fields": {"messages": "turns"}})
    assert (spec.fields.messages, spec.fields.role) == ("turns", "from")


def sharegpt_row(answer: str = "Paris.") -> dict[str, Any]:
    return {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "France?"},
                              {"from": "gpt", "value": "Let me look."}, {"from": "tool", "value": "lookup: Paris"},
                              {"from": "observation", "value": "(cached)"}, {"from": "gpt", "value": answer}]}


def test_sharegpt_system_and_tool_turns(tmp_path: Path, tok: Any) -> None:
    p = tmp_path / "sg.jsonl"
    p.write_text("\n".join(json.dumps(sharegpt_row()) for _ in range(3)) + "\n")
    assert datarows.scan(p, "chat", SHAREGPT).ok
    rows = data.checked_rows(p, "chat", SHAREGPT)
    msgs = data.to_messages(rows[0], "chat", SHAREGPT, None)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    templates.apply_named(tok, "chatml")
    cfg = {"format": "chat", "fields": SHAREGPT, "train_on": "all_assistant_turns"}
    out = data.to_tokens(rows[0], cfg, tok)
    assert out is not None
    trained = [text for t, text in runs(tok, out) if t]
    assert trained == ["Let me look.<|im_end|>\n</s>", "Paris.<|im_end|>\n</s>"]  # tool output never trains


def test_train_engine_builds_labels_for_a_multi_turn_chat(tmp_path: Path, tok: Any) -> None:
    require("trl")
    from ftkit.engines import train

    p = tmp_path / "sg.jsonl"
    p.write_text("\n".join(json.dumps(sharegpt_row(f"Paris {i}.")) for i in range(4)) + "\n")
    templates.apply_named(tok, "chatml")
    cfg = {"path": str(p), "format": "chat", "fields": SHAREGPT, "template": "tokenizer", "system_prompt": None,
           "train_on": "last_assistant_turn", "eval": None}
    train_ds, eval_ds = train.datasets_for(cfg, tok)
    assert eval_ds is None and set(train_ds.column_names) == {"input_ids", "labels"} and len(train_ds) == 4
    first = train_ds[0]
    assert tok.decode([i for i, lab in zip(first["input_ids"], first["labels"], strict=True) if lab != -100]) == \
        "Paris 0.<|im_end|>\n</s>"


# --------------------------------------------------------------------------- sources


def write_hub_cache(home: Path, repo: str, rows: list[dict[str, Any]], split: str = "train") -> Path:
    """A dataset repository as huggingface_hub leaves it in the cache after a download."""
    base = home / "hub" / ("datasets--" + repo.replace("/", "--"))
    snap = base / "snapshots" / SHA / "data"
    snap.mkdir(parents=True)
    (snap / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SHA)
    return snap


def hub_cfg(**kw: Any) -> dict[str, Any]:
    return {"path": None, "hub": "acme/tiny-qa", "revision": SHA, "split": "train", "format": "alpaca",
            "fields": FIELDS, "template": "alpaca", "system_prompt": None, **kw}


@pytest.fixture
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import huggingface_hub.constants as c  # read at import: point them at this cache

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_a_hub_dataset_is_read_from_the_cache_at_its_commit(offline_home: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    write_hub_cache(offline_home, "acme/tiny-qa", rows)
    splits = data.load_splits(hub_cfg(eval={"size": 1, "seed": 0}))
    assert len(splits.train) == 4 and len(splits.eval) == 1
    assert datarows.hub_snapshot(datarows.hub_cache_dir(None), "acme/tiny-qa", SHA) is not None
    assert datarows.hub_snapshot(datarows.hub_cache_dir(None), "acme/tiny-qa", "main") is not None


def test_the_eval_rows_from_another_hub_split(offline_home: Path) -> None:
    snap = write_hub_cache(offline_home, "acme/tiny-qa", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)])
    (snap / "test.jsonl").write_text(json.dumps({"instruction": "t", "output": "u"}) + "\n")
    splits = data.load_splits(hub_cfg(eval={"split": "test"}))
    assert len(splits.train) == 4 and [r["output"] for r in splits.eval] == ["u"]


def test_a_hub_dataset_not_in_the_cache_offline_is_one_line(offline_home: Path) -> None:
    write_hub_cache(offline_home, "acme/tiny-qa", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DatasetError) as e:
        data.load_splits(hub_cfg(revision="f" * 40))
    assert str(e.value) == f"dataset acme/tiny-qa@{'f' * 12} (train): not in the HF cache and the hub is not " \
                           "reachable (offline)"
    assert datarows.hub_snapshot(datarows.hub_cache_dir(None), "acme/tiny-qa", "f" * 40) is None


def test_a_bad_hub_row_is_located(offline_home: Path) -> None:
    write_hub_cache(offline_home, "acme/tiny-qa", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}])
    with pytest.raises(DatasetError) as e:
        data.load_splits(hub_cfg())
    assert str(e.value) == f"acme/tiny-qa@{SHA[:12]} (train): row 2: field 'output' is empty"


def test_csv_is_checked_by_line_and_read_as_text(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text('instruction,output\nq1,"multi\nline"\nq2,\nq3,42\n')
    lines = datarows.scan(p, "alpaca", FIELDS).lines("d.csv")
    assert lines == ["d.csv:4: field 'output' is empty"]  # the record after a two-line one starts at line 4
    p.write_text('instruction,output\nq1,"multi\nline"\nq3,42\n')
    rows = data.load_splits({"path": str(p), "format": "alpaca", "fields": FIELDS}).train
    assert [r["output"] for r in rows] == ["multi\nline", "42"] and [r["__row__"] for r in rows] == [2, 4]


def test_arrow_files_and_data_directories_with_splits(tmp_path: Path) -> None:
    import pyarrow as pa

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    assert datarows.file_problem(tmp_path / "d.arrow") is None
    assert len(data.load_splits({"path": str(tmp_path / "d.arrow"), "format": "alpaca", "fields": FIELDS}).train) == 3
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "data" / "test.jsonl").write_text(json.dumps({"instruction": "t", "output": ""}) + "\n")
    assert datarows.file_problem(repo) is None
    cfg = {"path": str(repo), "format": "alpaca", "fields": FIELDS}
    assert len(data.load_splits(cfg).train) == 3
    with pytest.raises(DatasetError) as e:
        data.load_splits({**cfg, "split": "test"})
    assert str(e.value) == f"{repo} (test): row 1: field 'output' is empty"
    with pytest.raises(DatasetError, match="cannot read split 'nope'"):
        data.load_splits({**cfg, "split": "nope"})


# --------------------------------------------------------------------------- validate


def recipe(dataset: str) -> str:
    return (f"ftkit: 1\nname: demo\nmodel:\n  tiny: {{}}\ndataset:\n{dataset}"
            "steps:\n  - type: train\n    max_steps: 5\n")


@pytest.mark.parametrize(("dataset", "words"), [
    ("  hub: acme/tiny-qa\n  format: alpaca\n", "recipe.yaml:6:3: dataset.hub: a hub dataset needs `revision:` pinned"),
    ("  hub: acme/tiny-qa\n  revision: main\n  format: alpaca\n", "recipe.yaml:7:13: dataset.revision: 'main' is not a commit hash"),
    ("  path: d.jsonl\n  hub: acme/x\n  revision: " + SHA + "\n  format: alpaca\n", "give exactly one of path"),
    ("  path: d.jsonl\n  revision: " + SHA + "\n  format: alpaca\n", "revision applies to hub datasets"),
    ("  path: d.jsonl\n  format: text\n  train_on: last_assistant_turn\n", "train_on applies to chat and alpaca"),
    ("  path: d.jsonl\n  format: chat\n  template: alpaca\n  train_on: all_assistant_turns\n",
     "the alpaca template is one prompt and one answer"),
    ("  path: d.jsonl\n  format: alpaca\n  split: test\n", "recipe.yaml:8:3: dataset.split: split applies to hub"),
    ("  path: d.jsonl\n  format: alpaca\n  eval: {split: test}\n", "dataset.eval.split: a file is one split"),
    ("  hub: acme/x\n  revision: " + SHA + "\n  format: alpaca\n  eval: {split: train}\n",
     "'train' is the split trained on"),
    ("  hub: acme/x\n  revision: " + SHA + "\n  format: alpaca\n  eval: {split: test, size: 2}\n",
     "give exactly one of fraction, size, path or split"),
])
def test_dataset_sources_are_checked_at_validate(tmp_path: Path, dataset: str, words: str) -> None:
    from tests.conftest import run_cli
    from tests.unit.test_bad_input_config import refused

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "q", "output": "a", "text": "t"}) + "\n")
    (tmp_path / "recipe.yaml").write_text(recipe(dataset))
    refused(run_cli("validate", "recipe.yaml", cwd=tmp_path), words)


def test_sharegpt_format_validates(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(sharegpt_row()) + "\n" for _ in range(2)))
    (tmp_path / "recipe.yaml").write_text(recipe("  path: d.jsonl\n  format: sharegpt\n"))
    result = run_cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.code == 0, result.err


def test_an_uncached_hub_dataset_on_an_offline_machine_is_refused_at_validate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_cli
    from tests.unit.test_bad_input_config import refused

    home = tmp_path / "hf"
    write_hub_cache(home, "acme/tiny-qa", [{"instruction": "q", "output": "a"}])
    (tmp_path / "m.yaml").write_text(f"ftkit: 1\nkind: machine\nname: cpu\nexecutor: local\npaths:\n  hf_cache: {home}\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for rev, ok in ((SHA, True), ("e" * 40, False)):
        (tmp_path / "recipe.yaml").write_text(recipe(f"  hub: acme/tiny-qa\n  revision: {rev}\n  format: alpaca\n"))
        result = run_cli("validate", "recipe.yaml", "--machine", "m.yaml", cwd=tmp_path)
        if ok:
            assert result.code == 0, result.err
        else:
            refused(result, f"recipe.yaml:6:8: dataset.hub: acme/tiny-qa@{'e' * 12} is not in the HF cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the trainer downloads it into the cache
    assert run_cli("validate", "recipe.yaml", "--machine", "m.yaml", cwd=tmp_path).code == 0


def test_the_trainer_learns_every_answer_of_a_multi_turn_chat(tmp_path: Path) -> None:
    """train.run on a ShareGPT multi-turn dataset under the named chatml template: trl takes the
    pre-tokenized labels, and the loss falls."""
    require("trl")
    from ftkit.engines import train
    from ftkit.recipe.models import TrainStep

    p = tmp_path / "sg.jsonl"
    p.write_text("".join(json.dumps(sharegpt_row(f"Paris {i % 3}.")) + "\n" for i in range(12)))
    dataset = {"path": str(p), "format": "chat", "fields": SHAREGPT, "template": "chatml", "system_prompt": None,
               "train_on": "all_assistant_turns", "eval": {"size": 2, "seed": 0}}
    spec = {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
            "max_position_embeddings": 256, "initializer_range": 0.1, "seed": 0}
    model = tmp_path / "model"
    tiny.generate(spec, dataset, model)
    step = TrainStep.model_validate({
        "type": "train", "name": "train", "max_steps": 8, "learning_rate": 0.01, "batch_size": 4, "seq_len": 128,
        "precision": "fp32", "gradient_checkpointing": False, "seed": 7, "gpus": [], "logging_steps": 1,
        "eval_every_steps": 4,
    })
    out = tmp_path / "out"
    summary = train.run({"model": {"source": "path", "path": str(model), "dtype": "fp32"}, "dataset": dataset,
                         "train": step.model_dump(mode="json"), "output_dir": str(out),
                         "metrics_path": str(out / "metrics.jsonl"), "deepspeed_config": None})
    assert summary["global_step"] == 8
    assert summary["eval_loss_last"] < summary["eval_loss_first"]


def test_the_plan_shows_the_hub_dataset_and_what_trains_and_lets_it_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    (tmp_path / "m.yaml").write_text("ftkit: 1\nkind: machine\nname: cpu\nexecutor: local\n")
    (tmp_path / "recipe.yaml").write_text(recipe(f"  hub: acme/tiny-qa\n  revision: {SHA}\n  format: sharegpt\n"))
    result = run_cli("plan", "recipe.yaml", "--machine", "m.yaml", cwd=tmp_path)
    assert result.code == 0, result.err
    assert (f"data hub acme/tiny-qa@{SHA[:12]} (train), chat, template auto, loss on every assistant turn"
            in result.out)
    assert "HF_HUB_OFFLINE" not in result.out  # the hub dataset is fetched into the HF cache when online


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_an_answer_that_opens_the_conversation_trains_on_its_text_not_the_header(tok: Any, name: str) -> None:
    """From a hostile review: an assistant turn first trained on BOS and the assistant header
    (the span started at character 0)."""
    templates.apply_named(tok, name)
    conversation = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "France?"},
                    {"role": "assistant", "content": "Paris."}]
    out = templates.tokenize_answers(tok, conversation, "all_assistant_turns")
    assert out is not None
    got = runs(tok, out)
    assert got[0][0] is False and "assistant" in got[0][1]  # the header carries no loss
    assert got[1][0] is True and got[1][1].startswith("Hello.")
