"""`ftkit export --to gguf`: the GGUF holds the same model (read back with llama.cpp's own
reader, gguf-py's GGUFReader, and run by transformers' GGUF loader: f32 gives the same
logits, f16/bf16/q8_0 close ones, the same greedy answer), its tokenizer encodes as the
model's, and its metadata says what llama.cpp needs. Where llama-cpp-python is installed,
llama.cpp itself answers as transformers does (FTKIT_REQUIRE_LLAMA_CPP=1 makes its absence a
failure; CI does not compile it). The Modelfile's template renders, with Go's text/template
as Ollama executes it, exactly the prompt the model was trained on. Hostile inputs end in
exit 2 with one line and write nothing; --dry-run writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECIPES, missing, require, require_tool, run_cli

gguf = require("gguf")
torch = require("torch")
transformers = require("transformers")

from ftkit.engines import data, gguf_export, modelfile, templates, tiny  # noqa: E402

DATASET = {
    "path": str(RECIPES / "data" / "quickstart-train.jsonl"), "format": "alpaca", "template": "alpaca",
    "system_prompt": None, "eval": {"path": str(RECIPES / "data" / "quickstart-eval.jsonl")},
    "fields": {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
               "role": "role", "content": "content", "text": "text"},
}
TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "vocab_size": 400,
        "max_position_embeddings": 256, "initializer_range": 0.1, "seed": 0}
PROMPT = "### Instruction:\nName the category of these words.\n\n### Input:\nkiwi mango lemon\n\n### Response:\n"
# max |logit difference| / max |logit| allowed per type, read back by transformers (measured on
# the tiny model: f16 9e-4, bf16 7e-3, q8_0 2.4e-2) and run by llama.cpp (f32 6e-4: its KV cache
# is f16; q8_0 3.6e-2: it also rounds the activations to 8 bits): about twice what was measured
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 5e-2}
LLAMA_CPP_TOLERANCE = {"f32": 2e-3, "q8_0": 7e-2}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny.generate(TINY, DATASET, out)
    return out


def export(model: Path, out: Path, quant: str = "f32", *extra: str):  # type: ignore[no-untyped-def]
    return run_cli("export", "--to", "gguf", "--model", str(model), "--template", "alpaca", "--quant", quant,
                   "-o", str(out), *extra)


def logits(m, ids):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


def greedy(m, ids: list[int], n: int = 8) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0][len(ids):].tolist()


def test_f32_export_reads_back_as_the_same_model(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "gguf"
    result = export(model, out)
    assert result.code == 0, result.err
    summary = json.loads(result.out.splitlines()[0])
    assert summary["quant"] == "f32" and summary["template"] == "alpaca"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left
    reader = gguf.GGUFReader(out / "model.gguf")
    meta = {f.name: f for f in reader.fields.values()}

    def value(key: str):  # type: ignore[no-untyped-def]
        return meta[key].contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("llama.block_count") == 2 and value("llama.attention.head_count") == 2
    assert len(value("tokenizer.ggml.tokens")) == 400
    assert value("tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds none: neither does llama.cpp
    assert value("tokenizer.chat_template") == modelfile.ALPACA_JINJA
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "blk.0.attn_q.weight"}
    # transformers' GGUF loader (gguf-py's reader, Q/K un-permuted) gives the very same logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(model)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(model)
    gtok = transformers.AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ids = tok(PROMPT).input_ids
    assert gtok(PROMPT).input_ids == ids  # the GGUF's tokenizer encodes as the model's
    assert torch.equal(logits(ref, ids), logits(back, ids))
    assert greedy(ref, ids) == greedy(back, ids)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_quantized_exports_stay_close(model: Path, tmp_path: Path, quant: str) -> None:
    out = tmp_path / "gguf"
    result = export(model, out, quant)
    assert result.code == 0, result.err
    types = {t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types == ({quant.upper(), "F32"})  # norms stay F32, as llama.cpp's converter writes them
    ref = transformers.AutoModelForCausalLM.from_pretrained(model)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    a, b = logits(ref, ids), logits(back, ids)
    assert ((a - b).abs().max() / a.abs().max()).item() <= TOLERANCE[quant]
    assert a[-1].argmax() == b[-1].argmax()


def test_sizes_follow_the_type(model: Path, tmp_path: Path) -> None:
    sizes = {}
    for quant in ("f32", "f16", "q8_0"):
        assert export(model, tmp_path / quant, quant).code == 0
        sizes[quant] = (tmp_path / quant / "model.gguf").stat().st_size
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def _variant(model: Path, root: Path, **config) -> Path:  # type: ignore[no-untyped-def]
    """The tiny model's tokenizer with another config: GQA, tied embeddings, llama3 rope, bf16,
    or Qwen2 (biases on Q, K and V, given values: peft and HF start them at zero)."""
    dtype = config.pop("dtype", torch.float32)
    qwen = config.pop("qwen2", False)
    common = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    if qwen:
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, num_key_value_heads=2, **config))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **config)).to(dtype)
    out = root / "variant"
    m.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, out / name)
    return out


VARIANTS = {
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
    "bf16": dict(dtype=torch.bfloat16),
    "qwen2-tied": dict(qwen2=True, tie_word_embeddings=True),
    "qwen2": dict(qwen2=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_variants_read_back(model: Path, tmp_path: Path, kind: str) -> None:
    src = _variant(model, tmp_path, **VARIANTS[kind])
    quant = "bf16" if kind == "bf16" else "f32"
    assert export(src, tmp_path / "gguf", quant).code == 0
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf")
    names = {t.name for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == ("qwen2" if "qwen2" in kind else "llama")
    assert ("output.weight" in names) == ("tied" not in kind)  # tied: llama.cpp uses the embedding
    assert ("rope_freqs.weight" in names) == (kind == "llama3-rope")
    assert ("blk.0.attn_q.bias" in names) == kind.startswith("qwen2")
    if kind == "llama3-rope":
        return  # transformers' GGUF loader does not read rope_freqs back; llama.cpp does (test below)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf",
                                                             dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    assert torch.equal(logits(ref, ids), logits(back, ids))  # bf16 to bf16 is exact too


# --------------------------------------------------------------------------- llama.cpp itself


def _llama_cpp():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError:
        missing("llama-cpp-python is not installed (it compiles llama.cpp: pip install llama-cpp-python)",
                env="FTKIT_REQUIRE_LLAMA_CPP")
    return llama_cpp


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_llama_cpp_answers_as_transformers(model: Path, tmp_path: Path, quant: str) -> None:
    llama_cpp = _llama_cpp()
    out = tmp_path / "gguf"
    assert export(model, out, quant).code == 0
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model)
        ids = tok(PROMPT).input_ids
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids  # llama.cpp's gpt-2 pre-tokenizer
        ref = transformers.AutoModelForCausalLM.from_pretrained(model)
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        ours = logits(ref, ids)
        assert ((theirs - ours).abs().max() / ours.abs().max()).item() <= LLAMA_CPP_TOLERANCE[quant]
        llm.reset()
        answer = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
        expected = greedy(ref, ids)
        if quant == "f32":
            assert answer == tok.decode(expected, skip_special_tokens=True)
        else:  # a random model's near-ties may flip later tokens under 8-bit weights: the first must hold
            assert answer.startswith(tok.decode(expected[:1], skip_special_tokens=True))
    finally:
        llm.close()


def test_k_quant_by_llama_cpps_quantizer(model: Path, tmp_path: Path) -> None:
    """q4_k_m: gguf-py writes the f32 GGUF, llama.cpp's quantizer makes q4_k_m from it (the
    tiny model's rows of 64 are no whole k-quant block of 256: llama.cpp falls back, and says
    so); the metadata and chat template come through, llama.cpp runs it."""
    llama_cpp = _llama_cpp()
    out = tmp_path / "gguf"
    result = export(model, out, "q4_k_m")
    assert result.code == 0, result.err
    assert "required fallback quantization" in result.err and "converting to" not in result.err  # its log: a file
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "llama-quantize.log", "model.gguf"]
    assert "converting to q5_0" in (out / "llama-quantize.log").read_text()
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert reader.fields["tokenizer.chat_template"].contents() == modelfile.ALPACA_JINJA
    assert export(model, tmp_path / "q8", "q8_0").code == 0
    assert (out / "model.gguf").stat().st_size < (tmp_path / "q8" / "model.gguf").stat().st_size
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=256, n_threads=2, verbose=False)
    try:
        assert llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["llama3-rope", "qwen2", "qwen2-tied", "gqa-tied"])
def test_llama_cpp_runs_the_variants(model: Path, tmp_path: Path, kind: str) -> None:
    llama_cpp = _llama_cpp()
    src = _variant(model, tmp_path, **VARIANTS[kind])
    assert export(src, tmp_path / "gguf", "f32").code == 0
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / "model.gguf"), n_ctx=256, n_threads=2, verbose=False,
                          logits_all=True)
    try:
        ids = transformers.AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
        llm.eval(ids)
        ours = logits(transformers.AutoModelForCausalLM.from_pretrained(src), ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        assert ((theirs - ours).abs().max() / ours.abs().max()).item() <= LLAMA_CPP_TOLERANCE["f32"]
    finally:
        llm.close()


TOKENIZER_TEXTS = [
    "Hello world", "I've been 'told he's there, 'RE you sure? 'M not", "3 33 333 3333 12345 3.3 3..3",
    "tabs\tand\nnewlines\n\n  spaces   end  ", "émoji 🚀 done 😶\u200d🌫️", "CamelCaseWords and UPPER lower MiXeD",
    "a/b/c path/to/x\n", "你好世界 нещо на Български", "\n \n\n \t\t \n", "------======= ......!!!!!! ''''",
]


@pytest.mark.parametrize("pre", sorted(name for name, _ in gguf_export.PRE_TOKENIZERS.values()))
def test_llama_cpp_pre_tokenizes_as_the_tokenizer(model: Path, tmp_path: Path, pre: str) -> None:
    """A byte-level BPE tokenizer built with each pre-tokenizer regex ftkit recognises (Llama
    3's, Qwen2's with its NFC, Tekken's, GPT-2's) encodes like llama.cpp under the name written."""
    llama_cpp = _llama_cpp()
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    regex, ignore = next((r, ig) for r, (name, ig) in gguf_export.PRE_TOKENIZERS.items() if name == pre)
    tok = Tokenizer(models.BPE(ignore_merges=ignore))
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    rows = [json.loads(x) for x in Path(DATASET["path"]).read_text().splitlines()]
    tok.train_from_iterator([" ".join(r.values()) for r in rows] + TOKENIZER_TEXTS * 20, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    src = tmp_path / "model"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=256)).save_pretrained(src)
    fast.save_pretrained(src)
    assert export(src, tmp_path / "gguf", "f32").code == 0
    assert gguf.GGUFReader(tmp_path / "gguf" / "model.gguf").fields["tokenizer.ggml.pre"].contents() == pre
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / "model.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    try:
        for text in TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == fast(text).input_ids, text
    finally:
        llm.close()


# --------------------------------------------------------------------------- the Modelfile


GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Messages []Message
}

// Ollama's template.Execute for a template over .Messages: System is the system messages
// joined by a blank line, consecutive messages of one role are joined (template.collate).
func main() {
	var in struct {
		Template string
		Cases    []Case
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Parse(in.Template))
	var out []string
	for _, c := range in.Cases {
		var system []string
		var msgs []*Message
		for i := range c.Messages {
			m := c.Messages[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(msgs) > 0 && msgs[len(msgs)-1].Role == m.Role {
				msgs[len(msgs)-1].Content += "\n\n" + m.Content
			} else {
				msgs = append(msgs, &m)
			}
		}
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs,
			"Prompt": "", "Response": ""}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(template: str, conversations: list[list[dict[str, str]]], tmp: Path) -> list[str]:
    go = require_tool("go", env="FTKIT_REQUIRE_ENGINES")
    src = tmp / "render.go"
    src.write_text(GO_RENDER)
    cases = [{"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conv]} for conv in conversations]
    env = {**os.environ, "GOCACHE": str(tmp / "gocache"), "GOPATH": str(tmp / "gopath"), "GO111MODULE": "off"}
    proc = subprocess.run([go, "run", str(src)], input=json.dumps({"Template": template, "Cases": cases}), text=True,
                          capture_output=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def modelfile_template(text: str) -> str:
    """TEMPLATE \"\"\"...\"\"\" as Ollama's parser reads it: the text between the triple quotes."""
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start:text.index('"""', start)]


CONVERSATIONS = [
    [{"role": "user", "content": "Name the category of these words.\n\nkiwi mango lemon"},
     {"role": "assistant", "content": "fruit"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "cello flute drum?"},
     {"role": "assistant", "content": "instrument"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
     {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}],
]


@pytest.mark.parametrize("name", sorted(templates.CHAT_TEMPLATES))
def test_modelfile_template_renders_the_trained_prompt(model: Path, tmp_path: Path, name: str) -> None:
    """For each conversation, the prompt training built (templates.split_chat on the tokenizer
    with the named template installed) equals the Modelfile's TEMPLATE executed by Go over the
    conversation without its last answer, with BOS as llama.cpp adds it (the tiny tokenizer
    adds none, so the template carries its text)."""
    tok = transformers.AutoTokenizer.from_pretrained(model)
    templates.apply_named(tok, name)
    tok.save_pretrained(tmp_path / "tok")
    src = tmp_path / "model"
    shutil.copytree(model, src)
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, src / f.name)  # as training saves the tokenizer with the adapter, and merge copies it
    assert run_cli("export", "--to", "gguf", "--model", str(src), "--quant", "f32", "-o", str(tmp_path / "g")).code == 0
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text
    conversations = [c for c in CONVERSATIONS if name != "gemma" or c[0]["role"] != "system"]
    trained = [templates.split_chat(tok, conv)[0] for conv in conversations]
    rendered = go_render(modelfile_template(text), [conv[:-1] for conv in conversations], tmp_path)
    assert rendered == trained
    stops = [ln.split(" ", 2)[2].strip('"') for ln in text.splitlines() if ln.startswith("PARAMETER stop ")]
    ends = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}
    assert ends[name] in stops and "</s>" in stops
    meta = {f.name: f for f in gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields.values()}
    assert meta["tokenizer.chat_template"].contents() == templates.CHAT_TEMPLATES[name]


def test_alpaca_modelfile_and_gguf_template_render_alpaca_prompts(model: Path, tmp_path: Path) -> None:
    """alpaca: the user message INSTRUCTION (with "\\n\\n### Input:\\nINPUT" when the row has an
    input) renders as alpaca_prompt does, in Go (Ollama) and in the GGUF's Jinja (llama.cpp)."""
    rows = [{"instruction": "Name the category of these words.", "input": "kiwi mango lemon", "output": "fruit"},
            {"instruction": "Say hello.", "input": "", "output": "hello"}]
    cfg = {**DATASET, "system_prompt": None}
    trained = [data.to_example(r, cfg, "alpaca", None).prompt for r in rows]
    trained.append(templates.alpaca_prompt("Say hello.", "", "Be brief."))
    convs = [[{"role": "user", "content": r["instruction"] + (f"\n\n### Input:\n{r['input']}" if r["input"] else "")}]
             for r in rows]
    convs.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}])
    assert export(model, tmp_path / "g").code == 0
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert go_render(modelfile_template(text), convs, tmp_path) == trained
    tok = transformers.AutoTokenizer.from_pretrained(model)
    tok.chat_template = modelfile.ALPACA_JINJA
    assert [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs] == trained
    # chat data trained with `template: alpaca` (data.to_example joins the turns): the same prompt
    chat = {**DATASET, "format": "chat"}
    row = {"messages": CONVERSATIONS[2]}
    prompt = data.to_example(row, chat, "alpaca", None).prompt
    assert go_render(modelfile_template(text), [CONVERSATIONS[2][:-1]], tmp_path) == [prompt]
    assert tok.apply_chat_template(CONVERSATIONS[2][:-1], tokenize=False, add_generation_prompt=True) == prompt


def test_own_template_is_carried_but_not_translated(model: Path, tmp_path: Path) -> None:
    src = tmp_path / "model"
    shutil.copytree(model, src)
    own = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}<<assistant>>"
    (src / "chat_template.jinja").write_text(own)
    result = run_cli("export", "--to", "gguf", "--model", str(src), "-o", str(tmp_path / "g"))
    assert result.code == 0, result.err
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "no Ollama translation" in result.err
    meta = {f.name: f for f in gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields.values()}
    assert meta["tokenizer.chat_template"].contents() == own


# --------------------------------------------------------------------------- from a run directory


def _fake_run(model: Path, root: Path, system: str | None = None) -> Path:
    """A run directory as `ftkit up` leaves it after the merge: plan.json from `ftkit plan
    --json` of the quickstart, state.json, and the (here untrained) model as the merge's output."""
    result = run_cli("plan", "--json", str(RECIPES / "quickstart.yaml"))
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    run = root / "runs" / "20260101T000000Z-quickstart"
    plan["run_dir"] = str(run)
    if system is not None:
        train = next(s for s in plan["steps"] if s["kind"] == "train")
        for f in train["files"]:
            if f["path"].endswith(".json"):
                job = json.loads(f["content"])
                job["dataset"]["system_prompt"] = system
                f["content"] = json.dumps(job)
    (run / "steps" / "merge").mkdir(parents=True)
    (run / "plan.json").write_text(json.dumps(plan))
    (run / "state.json").write_text(json.dumps({"status": "succeeded", "steps": {}}))
    shutil.copytree(model, run / "steps" / "merge" / "model")
    return run


def test_export_from_a_run_uses_its_plan(model: Path, tmp_path: Path) -> None:
    run = _fake_run(model, tmp_path, system="Answer in one word.")
    result = run_cli("export", "--to", "gguf", str(run), "-o", str(tmp_path / "g"))
    assert result.code == 0, result.err
    summary = json.loads(result.out.splitlines()[0])
    assert summary["quant"] == "q8_0" and summary["template"] == "alpaca" and summary["source"].startswith("run ")
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert 'SYSTEM "Answer in one word."' in text
    meta = {f.name: f for f in gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields.values()}
    assert meta["general.name"].contents() == "quickstart"
    # its name under ./runs and `latest` find it too
    latest = run_cli("export", "--to", "gguf", "latest", "--dry-run", "-o", str(tmp_path / "h"), cwd=tmp_path)
    assert latest.code == 0, latest.err
    assert json.loads(latest.out)["model_dir"].endswith("steps/merge/model")


def test_dry_run_says_what_it_would_write_and_writes_nothing(model: Path, tmp_path: Path) -> None:
    result = export(model, tmp_path / "g", "q8_0", "--dry-run")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["writes"] == [str(tmp_path / "g" / n) for n in ("model.gguf", "Modelfile", "export.json")]
    assert plan["tensor_types"] == {"Q8_0": 16, "F32": 5}  # 2 layers of 7 matrices, embedding, output
    assert plan["modelfile"].startswith("# written by") and "FROM ./model.gguf" in plan["modelfile"]
    assert plan["ram_bytes"] > 0 and plan["disk_bytes"] > 0
    assert list(tmp_path.iterdir()) == []


def test_a_partial_export_left_behind_is_removed(model: Path, tmp_path: Path) -> None:
    """A killed export leaves its hidden directory (no lock held): the next export to the same
    place removes it; one whose lock is held (a live export) is left alone."""
    stale = tmp_path / ".g.partial-1-deadbeef"
    stale.mkdir()
    (stale / "model.gguf").write_bytes(b"half")
    os.utime(stale, (1, 1))
    result = export(model, tmp_path / "g")
    assert result.code == 0, result.err
    assert not stale.exists() and "gguf: removed .g.partial-1-deadbeef" in result.err


def test_the_gguf_extra_needs_no_torch(model: Path, tmp_path: Path) -> None:
    """`pip install ftkit[gguf]` is enough for f32/f16/bf16/q8_0: the export imports no torch."""
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "from ftkit.cli.main import main\n"
            f"main(['export', '--to', 'gguf', '--model', {str(model)!r}, '--template', 'alpaca', '-o', "
            f"{str(tmp_path / 'g')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "g" / "model.gguf").stat().st_size > 0


# --------------------------------------------------------------------------- hostile inputs


def _fifo(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.mkfifo(p)


def _config(p: Path, **change) -> None:  # type: ignore[no-untyped-def]
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(change)
    (p / "config.json").write_text(json.dumps(cfg))


def _tokenizer(p: Path, fn) -> None:  # type: ignore[no-untyped-def]
    tok = json.loads((p / "tokenizer.json").read_text())
    fn(tok)
    (p / "tokenizer.json").write_text(json.dumps(tok))


def _tokenizer_config(p: Path, **change) -> None:  # type: ignore[no-untyped-def]
    cfg = json.loads((p / "tokenizer_config.json").read_text())
    cfg.update(change)
    (p / "tokenizer_config.json").write_text(json.dumps(cfg))


def _rename_token(p: Path, old: str, new: str) -> None:
    """A token of tokenizer.json (vocab or added) with another text, tokenizer_config.json's too."""
    def rename(t) -> None:  # type: ignore[no-untyped-def]
        vocab = t["model"]["vocab"]
        if old in vocab:
            vocab[new] = vocab.pop(old)
        for entry in t["added_tokens"]:
            if entry["content"] == old:
                entry["content"] = new
    _tokenizer(p, rename)
    tcfg = json.loads((p / "tokenizer_config.json").read_text())
    (p / "tokenizer_config.json").write_text(json.dumps({k: new if v == old else v for k, v in tcfg.items()}))


def _set_weight(p: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(p / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    save_file(sd, p / "model.safetensors")


def _nan_weight(p: Path) -> None:
    _set_weight(p, float("nan"))


HOSTILE = {
    # name: (break the copy of the model, extra args, words the one-line error must hold)
    "not-a-directory": (lambda p: (shutil.rmtree(p), p.write_text("x")), [], "not a directory"),
    "no-config": (lambda p: (p / "config.json").unlink(), [], "not a model directory"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{"), [], "not valid JSON"),
    "config-fifo": (lambda p: _fifo(p / "config.json"), [], "FIFO"),
    "architecture": (lambda p: _config(p, architectures=["GPT2LMHeadModel"]), [], "not one ftkit's GGUF export"),
    "heads-string": (lambda p: _config(p, num_attention_heads="2"), [], "num_attention_heads"),
    "heads-not-dividing": (lambda p: _config(p, num_attention_heads=3, head_dim=None), [], "multiple"),
    "eps-nan": (lambda p: (p / "config.json").write_text(
        (p / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')), [], "not valid JSON"),
    "rope-yarn": (lambda p: _config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0}), [], "rope_type"),
    "quantized": (lambda p: _config(p, quantization_config={"quant_method": "gptq"}), [], "quantized"),
    "no-tokenizer": (lambda p: (p / "tokenizer.json").unlink(), [], "no tokenizer"),
    "tokenizer-fifo": (lambda p: _fifo(p / "tokenizer.json"), [], "FIFO"),
    "tokenizer-link-to-fifo": (lambda p: ((p / "tokenizer.json").unlink(), os.mkfifo(p.parent / "fifo"),
                                          (p / "tokenizer.json").symlink_to(p.parent / "fifo")), [], "FIFO"),
    "sentencepiece": (lambda p: _tokenizer(p, lambda t: t["model"].update(byte_fallback=True)), [], "SentencePiece"),
    "unknown-pre-tokenizer": (lambda p: _tokenizer(p, lambda t: t.update(pre_tokenizer={
        "type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated",
                                               "invert": False}, {"type": "ByteLevel", "use_regex": False}]})), [],
        "pre-tokenizer"),
    "token-id-too-big": (lambda p: _tokenizer(p, lambda t: t["model"]["vocab"].update({"zzz": 4000})), [],
                         "vocab_size"),
    "merges-not-list": (lambda p: _tokenizer(p, lambda t: t["model"].update(merges="a b")), [], "merges"),
    "weights-missing": (lambda p: (p / "model.safetensors").unlink(), [], "no model.safetensors"),
    "weights-truncated": (lambda p: os.truncate(p / "model.safetensors", 1000), [], "safetensors"),
    "weights-nan": (_nan_weight, [], "inf or nan"),
    "weight-beyond-f16": (lambda p: _set_weight(p, 7e4), ["--quant", "f16"], "beyond f16's range"),
    "model-link-to-file": (lambda p: (shutil.rmtree(p), (p.parent / "f").write_text(""), p.symlink_to(p.parent / "f")),
                           [], "not a directory"),
    "output-exists": (lambda p: (p.parent / "out").mkdir(), [], "exists"),
    "output-is-file": (lambda p: (p.parent / "out").write_text(""), [], "exists"),
    "output-is-link": (lambda p: (p.parent / "out").symlink_to(p.parent / "elsewhere"), [], "symbolic link"),
    "output-inside-model": (lambda p: None, ["-o", "{model}/gguf"], "inside the model"),
    "unknown-quant": (lambda p: None, ["--quant", "q3_x"], "--quant"),
    "unknown-template": (lambda p: None, ["--template", "vicuna"], "--template"),
    "trainjob-flag": (lambda p: None, ["--pvc", "data"], "--pvc is for --to trainjob"),
    # BOS/EOS go into the templates and stop words: a text that is no token is refused (it used to
    # reach the Modelfile, where a \"\"\" in it was a traceback)
    "eos-not-a-token": (lambda p: _tokenizer_config(p, eos_token='</s>"""\nFROM /etc/passwd'),
                        ["--template", "mistral"], "eos_token"),
    "bos-not-a-token": (lambda p: _tokenizer_config(p, bos_token="<bos>"), ["--template", "llama3"], "bos_token"),
    "eos-not-text": (lambda p: _tokenizer_config(p, eos_token=["</s>"]), [], "eos_token"),
    "token-lone-surrogate": (lambda p: _rename_token(p, "<pad>", "\ud800"), [], "lone surrogate"),
    # config.json against the tensors' shapes
    "intermediate-size": (lambda p: _config(p, intermediate_size=4096), [], "intermediate_size"),
    "vocab-size": (lambda p: _config(p, vocab_size=401), [], "vocab_size"),
    "hidden-size": (lambda p: _config(p, hidden_size=128), [], "hidden_size"),
    "kv-heads": (lambda p: _config(p, num_key_value_heads=1), [], "num_key_value_heads"),
    "head-dim": (lambda p: _config(p, head_dim=16), [], "head_dim"),
    "layers-missing": (lambda p: _config(p, num_hidden_layers=3), [], "num_hidden_layers"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused_in_one_line(model: Path, tmp_path: Path, name: str) -> None:
    src = tmp_path / "model"
    shutil.copytree(model, src)
    breaker, extra, words = HOSTILE[name]
    breaker(src)
    args = [a.replace("{model}", str(src)) for a in extra]
    output = [] if "-o" in args else ["-o", str(tmp_path / "out")]
    template = [] if "--template" in args else ["--template", "alpaca"]
    quant = [] if "--quant" in args else ["--quant", "f32"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("export", "--to", "gguf", "--model", str(src), *template, *quant, *output, *args)
    assert result.code == 2, (result.code, result.err)
    # a weight's inf/nan shows while it is converted, after the progress lines ("gguf: ...")
    lines = [ln for ln in result.err.strip().splitlines() if not ln.startswith("gguf: ")]
    assert len(lines) == 1 and words in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no partial directory


def test_llama_cpp_quant_without_llama_cpp_is_refused(model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_export, "llama_cpp_available", lambda: False)
    result = export(model, tmp_path / "g", "q4_k_m")
    assert result.code == 2 and "llama-cpp-python" in result.err and "q8_0" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "g").exists()


def test_run_without_a_merged_model_is_refused(model: Path, tmp_path: Path) -> None:
    run = _fake_run(model, tmp_path)
    shutil.rmtree(run / "steps" / "merge" / "model")
    result = run_cli("export", "--to", "gguf", str(run), "-o", str(tmp_path / "g"))
    assert result.code == 2 and "has not written its model" in result.err
    (run / "plan.json").write_text('{"steps": "merge"}')
    result = run_cli("export", "--to", "gguf", str(run), "-o", str(tmp_path / "g"))
    assert result.code == 2 and "plan.json" in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--to", "gguf"], "give one of them"),
    (["--to", "gguf", "some-run", "--model", "m"], "give one of them"),
    (["--to", "gguf", "some-run", "--template", "chatml"], "--template is for --model"),
    (["recipes/quickstart.yaml", "--quant", "q8_0"], "--quant is for --to gguf"),
    (["recipes/quickstart.yaml", "--dry-run"], "--dry-run is for --to gguf"),
    (["--to", "gguf", "no-such-run"], "not a run directory"),
])
def test_export_arguments_are_checked_in_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    result = run_cli("export", *args, cwd=tmp_path)
    assert result.code == 2 and words in result.err, result.err
    assert len(result.err.strip().splitlines()) <= 2  # the message, and at most a hint
    assert list(tmp_path.iterdir()) == []


def test_a_modelfile_that_cannot_be_written_is_refused_in_one_line(model: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A TEMPLATE no Modelfile string can hold: exit 2 and one line, not a traceback."""
    monkeypatch.setitem(modelfile._GO, "chatml", 'x"""y')
    result = run_cli("export", "--to", "gguf", "--model", str(model), "--template", "chatml", "--dry-run",
                     "-o", str(tmp_path / "g"))
    assert result.code == 2 and "TEMPLATE" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_token_texts_are_printed_by_the_go_template_never_run(model: Path, tmp_path: Path) -> None:
    """BOS and EOS come from the tokenizer's files: the Modelfile's TEMPLATE prints them as Go
    string literals. Tokens holding template actions, quotes, backslashes, a carriage return
    and an escape render, by Go's text/template, exactly as the plain tokens do."""
    bos, eos = '{{ .Prompt }}"<s>\\', '{{ .System }}{{ template "x" }}\\ "q" }}\r\n\x1b'
    src = tmp_path / "model"
    shutil.copytree(model, src)
    _rename_token(src, "<s>", bos)
    _rename_token(src, "</s>", eos)
    convs = [CONVERSATIONS[1][:-1], CONVERSATIONS[2][:-1], CONVERSATIONS[2]]
    rendered = {}
    for name, source in (("plain", model), ("hostile", src)):
        result = run_cli("export", "--to", "gguf", "--model", str(source), "--template", "mistral", "--quant", "f32",
                         "-o", str(tmp_path / name))
        assert result.code == 0, result.err
        template = modelfile_template((tmp_path / name / "Modelfile").read_text())
        assert "\r" not in template and "\x1b" not in template  # one line per line for Ollama's parser
        rendered[name] = go_render(template, convs, tmp_path)
    assert rendered["plain"][2].count("</s>") == 2 and rendered["plain"][0].startswith("<s>")
    assert rendered["hostile"] == [r.replace("<s>", bos).replace("</s>", eos) for r in rendered["plain"]]


def test_the_source_path_stays_in_its_comment(model: Path, tmp_path: Path) -> None:
    """Ollama's Modelfile parser ends a line at \\r as at \\n: a model path holding either cannot
    start a command of its own; what is printed is escaped too."""
    import re

    src = tmp_path / "m\rFROM evil.gguf\nSYSTEM x\x1b[2J"
    shutil.copytree(model, src)
    result = export(src, tmp_path / "g")
    assert result.code == 0, result.err
    lines = re.split(r"[\r\n]", (tmp_path / "g" / "Modelfile").read_text())
    assert lines[0].startswith("# written by") and lines[1].startswith("# ") and lines[2] == "FROM ./model.gguf"
    assert not any(ln.startswith(("FROM evil", "SYSTEM x")) for ln in lines)
    assert "\r" not in result.err and "\x1b" not in result.err


def test_a_config_value_in_a_warning_is_escaped_and_short(model: Path, tmp_path: Path) -> None:
    src = tmp_path / "model"
    shutil.copytree(model, src)
    _config(src, sliding_window="\x1b[2J\r" + "w" * 500)
    result = export(src, tmp_path / "g")
    assert result.code == 0, result.err
    shown = [ln for ln in result.err.splitlines() if "sliding_window" in ln]
    assert len(shown) == 1 and len(shown[0]) < 300 and "\x1b" not in result.err and "\r" not in result.err
    warnings = json.loads((tmp_path / "g" / "export.json").read_text())["warnings"]
    assert [w for w in warnings if "sliding_window" in w and "\x1b" not in w and len(w) < 300]


def test_the_next_line_is_escaped(model: Path, tmp_path: Path) -> None:
    """The command line printed for people: one line, no terminal control, shell-quoted."""
    import shlex

    out = tmp_path / "g\x1b[2J\rx y"
    result = export(model, out)
    assert result.code == 0, result.err
    assert "\x1b" not in result.err and "\r" not in result.err
    line = next(ln for ln in result.err.splitlines() if ln.startswith("next: "))
    assert shlex.split(line)[3] == str(out / "model.gguf").replace("\x1b", "\\x1b").replace("\r", "\\r")


@pytest.mark.parametrize("recipe", ["../escaped/x", "{abs}/x", "quick\nstart", ".."])
def test_a_runs_recipe_never_chooses_where_the_export_writes(model: Path, tmp_path: Path, recipe: str) -> None:
    """plan.json may have been written by anyone: a `recipe` that is no recipe name (a path,
    absolute or up, a newline) is not used; the default output is named after the run directory."""
    run = _fake_run(model, tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    plan["recipe"] = recipe.replace("{abs}", str(tmp_path / "abs"))
    (run / "plan.json").write_text(json.dumps(plan))
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("export", "--to", "gguf", str(run), "--quant", "f32", cwd=work)
    assert result.code == 0, result.err
    assert [p.name for p in work.iterdir()] == [f"{run.name}-f32-gguf"]
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()
    meta = {f.name: f for f in gguf.GGUFReader(work / f"{run.name}-f32-gguf" / "model.gguf").fields.values()}
    assert meta["general.name"].contents() == run.name


def test_a_train_steps_job_config_nested_too_deep_is_refused(model: Path, tmp_path: Path) -> None:
    run = _fake_run(model, tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    train = next(s for s in plan["steps"] if s["kind"] == "train")
    job = next(f for f in train["files"] if f["path"].endswith(".json"))
    job["content"] = "[" * 200_000
    (run / "plan.json").write_text(json.dumps(plan))
    result = run_cli("export", "--to", "gguf", str(run), "--dry-run", "-o", str(tmp_path / "g"))
    assert result.code == 2 and "nested too deep" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "g").exists()
