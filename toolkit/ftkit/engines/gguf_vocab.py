"""The tokenizer half of the GGUF export: a byte-level BPE tokenizer.json as llama.cpp's
`gpt2` tokenizer model (tokens, their types, merges, special tokens, whether BOS is added),
following llama.cpp's converter (get_vocab_base, _set_vocab_gpt2).

The pre-tokenizer is recognised by its regular expression, compared with the ones llama.cpp
implements (its src/llama-vocab.cpp keeps each original beside its adaptation), not by the
converter's hash of token ids: a tokenizer trained here (the tiny model's) has no hash in
its table, but its pre-tokenizer is GPT-2's. Files are read bounded and strictly, and
gguf-py's special-token reader gets private copies of the bytes that were checked.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.engines import safetensors_io as st
from ftkit.engines.safetensors_io import BadModelFile
from ftkit.errors import UserError

TOKENIZER_JSON_LIMIT = 64 * 2**20  # Tekken's is 17 MB, Llama 3's 9 MB


def load_gguf() -> Any:
    """gguf-py, or a one-line refusal naming the extra that brings it."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs llama.cpp's `gguf` package: pip install 'ftkit[gguf]'") from None
    return gguf


# The pre-tokenizer regular expressions llama.cpp implements, as tokenizer.json writes them
# (llama.cpp's src/llama-vocab.cpp keeps each original beside its adaptation), with whether
# llama.cpp ignores the merges for whole-word tokens under that name (tokenizer.json's
# model.ignore_merges must agree).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    _GPT2_REGEX: ("gpt-2", False),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("llama-bpe", True),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("qwen2", False),
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": ("tekken", True),
}

@dataclass
class Tokenizer:
    pre: str
    tokens: list[str]
    types: list[int]
    bos: str | None
    eos: str | None
    adds_bos: bool
    special: Any  # gguf.SpecialVocab (merges, special ids, add_bos/add_eos)
    own_template: str | None  # the tokenizer's chat template, as transformers loads it


def _load_tokenizer_files(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes], str | None]:
    """tokenizer.json and tokenizer_config.json, read bounded and strictly, their bytes too
    (gguf-py's special-token reader gets these checked copies, never the directory), and
    chat_template.jinja's text."""
    tj = model_dir / "tokenizer.json"
    if not os.path.lexists(tj):
        other = [n for n in ("tokenizer.model", "vocab.json") if os.path.lexists(model_dir / n)]
        if other:
            raise UserError(f"{model_dir}: has {other[0]} but no tokenizer.json; ftkit's GGUF export reads byte-level "
                            "BPE tokenizers from tokenizer.json (use llama.cpp's convert_hf_to_gguf.py)")
        raise UserError(f"{model_dir}: no tokenizer (tokenizer.json); copy the base model's tokenizer in")
    raw: dict[str, bytes] = {}
    parsed: dict[str, Any] = {}
    for name, limit in (("tokenizer.json", TOKENIZER_JSON_LIMIT), ("tokenizer_config.json", 16 * 2**20),
                        ("config.json", 16 * 2**20)):
        path = model_dir / name
        if not os.path.lexists(path):
            parsed[name] = {}
            continue
        value = st.load_json(path, f"the {name}", limit=limit)
        if not isinstance(value, dict):
            raise BadModelFile(f"{path}: not a JSON object")
        parsed[name] = value
        raw[name] = st.read_small(path, limit)
    jinja, text = model_dir / "chat_template.jinja", None
    if os.path.lexists(jinja):
        try:
            text = st.read_small(jinja, 4 * 2**20).decode("utf-8")
        except UnicodeDecodeError:
            raise BadModelFile(f"{jinja}: not UTF-8 text") from None
    return parsed["tokenizer.json"], parsed["tokenizer_config.json"], raw, text


def own_chat_template(tokenizer_config: dict[str, Any], jinja_file: str | None) -> str | None:
    """The tokenizer's chat template as transformers loads it: tokenizer_config.json's, else chat_template.jinja."""
    value = tokenizer_config.get("chat_template")
    if isinstance(value, str) and value:
        return value
    return jinja_file or None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_token(tcfg: dict[str, Any], key: str, texts: set[str], model_dir: Path) -> str | None:
    """tokenizer_config.json's bos_token or eos_token: a token of the vocabulary, or a refusal.
    Its text goes into the GGUF's template, the Modelfile's TEMPLATE and its stop words: text
    that is no token would be matched as plain text (or, pasted there, run as template code)."""
    value = tcfg.get(key)
    if value is None:
        return None
    text = _token_text(value)
    where = model_dir / "tokenizer_config.json"
    if text is None:
        raise BadModelFile(f"{where}: {key} must be a token's text, got {st._show(value)}")
    if text not in texts:
        raise BadModelFile(f"{where}: {key} {st._show(text)} is not a token of tokenizer.json's vocabulary")
    return text


def _pre_tokenizer(tok: dict[str, Any], path: Path) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE tokenizer.json, or a refusal."""
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UserError(f"{path}: a {st._show(kind)} tokenizer; ftkit's GGUF export writes byte-level BPE tokenizers "
                        "(use llama.cpp's convert_hf_to_gguf.py)")
    if model.get("byte_fallback"):
        raise UserError(f"{path}: a SentencePiece-style BPE tokenizer (byte_fallback); ftkit's GGUF export writes "
                        "byte-level BPE tokenizers (use llama.cpp's convert_hf_to_gguf.py)")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise BadModelFile(f"{path}: model.vocab must be an object and model.merges a list")
    pre = tok.get("pre_tokenizer")
    regex: str | None = None
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
            and not pre.get("add_prefix_space"):
        regex = _GPT2_REGEX
    elif isinstance(pre, dict) and pre.get("type") == "Sequence" and isinstance(pre.get("pretokenizers"), list):
        parts = pre["pretokenizers"]
        if len(parts) == 2 and isinstance(parts[0], dict) and isinstance(parts[1], dict) \
                and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated" \
                and not parts[0].get("invert") and isinstance(parts[0].get("pattern"), dict) \
                and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True) \
                and not parts[1].get("add_prefix_space"):
            regex = parts[0]["pattern"].get("Regex")
    decoder = tok.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise UserError(f"{path}: the decoder is not ByteLevel: not a byte-level BPE tokenizer ftkit's GGUF export "
                        "writes (use llama.cpp's convert_hf_to_gguf.py)")
    found = PRE_TOKENIZERS.get(regex) if isinstance(regex, str) else None
    if found is None:
        raise UserError(f"{path}: the pre-tokenizer is not one llama.cpp implements by its regular expression "
                        "(gpt-2, llama-bpe, qwen2, tekken); use llama.cpp's convert_hf_to_gguf.py")
    name, ignore_merges = found
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise UserError(f"{path}: model.ignore_merges is {bool(model.get('ignore_merges'))}, but llama.cpp's "
                        f"{name} pre-tokenizer {'ignores' if ignore_merges else 'applies'} the merges for whole words")
    normalizer = tok.get("normalizer")
    if normalizer is not None and not (name == "qwen2" and isinstance(normalizer, dict)
                                       and normalizer.get("type") == "NFC"):
        raise UserError(f"{path}: a normalizer ({st._show(normalizer.get('type') if isinstance(normalizer, dict) else normalizer)}) "
                        f"that llama.cpp's {name} tokenizer does not apply")
    return name


def _looks_special(text: str) -> bool:
    """The converter's does_token_look_special: added tokens some models leave unmarked."""
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>")) \
        or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">"))


def plan_tokenizer(model_dir: Path, vocab_size: int) -> Tokenizer:
    gguf = load_gguf()
    tok, tcfg, raw, parsed_jinja = _load_tokenizer_files(model_dir)
    path = model_dir / "tokenizer.json"
    pre = _pre_tokenizer(tok, path)
    vocab: dict[str, Any] = tok["model"]["vocab"]
    by_id: dict[int, str] = {}
    for text, tid in vocab.items():
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise BadModelFile(f"{path}: token {st._show(text)} has id {st._show(tid)}")
        if tid in by_id:
            raise BadModelFile(f"{path}: tokens {st._show(by_id[tid])} and {st._show(text)} share id {tid}")
        by_id[tid] = text
    added = tok.get("added_tokens") or []
    if not isinstance(added, list):
        raise BadModelFile(f"{path}: added_tokens is not a list")
    added_type: dict[int, int] = {}
    for entry in added:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"] \
                or not isinstance(entry.get("id"), int) or isinstance(entry.get("id"), bool) or entry["id"] < 0:
            raise BadModelFile(f"{path}: an added token is not {{id, content}}: {st._show(entry)}")
        tid, text = entry["id"], entry["content"]
        if tid in by_id and by_id[tid] != text:
            raise BadModelFile(f"{path}: added token {st._show(text)} has the id {tid} of {st._show(by_id[tid])}")
        by_id[tid] = text
        special = bool(entry.get("special")) or _looks_special(text)
        added_type[tid] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise BadModelFile(f"{path}: token id {max(by_id)} is outside the model's vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        text = by_id[i]
        if i in added_type and added_type[i] == int(gguf.TokenType.USER_DEFINED):
            text = text.replace("\u2581", " ")  # the converter pre-normalizes user-defined spaces
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadModelFile(f"{path}: token {i} is not text ({st._show(text)} holds a lone surrogate)") from None
        tokens.append(text)
        types.append(added_type.get(i, int(gguf.TokenType.NORMAL)))
    special = _special_vocab(raw, vocab_size, path)
    texts = set(by_id.values())
    bos, eos = (_special_token(tcfg, key, texts, model_dir) for key in ("bos_token", "eos_token"))
    if eos is None and "eos" in special.special_token_ids:
        eos = by_id.get(special.special_token_ids["eos"])
    return Tokenizer(pre, tokens, types, bos, eos, bool(special.add_special_token.get("bos", False)), special,
                     own_chat_template(tcfg, parsed_jinja))


def _special_vocab(raw: dict[str, bytes], vocab_size: int, path: Path) -> Any:
    """gguf-py's SpecialVocab (merges, special token ids, add_bos/add_eos from the
    post-processor), run on private copies of the files already checked: it reads with plain
    open() and indexes what it finds without checking."""
    gguf = load_gguf()
    with tempfile.TemporaryDirectory(prefix="ftkit-gguf-tok-") as tmp:
        for name, data in raw.items():
            Path(tmp, name).write_bytes(data)
        try:
            special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise BadModelFile(f"{path}: the tokenizer's merges or special tokens cannot be read "
                               f"({e.__class__.__name__}: {str(e)[:120]})") from None
    if not special.merges:
        raise BadModelFile(f"{path}: a BPE tokenizer without merges")
    special.chat_template = None  # the export sets the one the model was trained with
    return special
