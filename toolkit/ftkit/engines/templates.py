"""Prompt templates: how a row becomes the prompt the model sees and the completion it
learns. Named chat templates cover models whose tokenizer has none (and the tiny model);
`tokenizer` uses the model's own. Training and evaluation share these functions, so a
model is always scored on prompts shaped exactly like the ones it learned from."""

from __future__ import annotations

from typing import Any

ALPACA_SYSTEM = "{system}\n\n"

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'] }}[/SYSTEM_PROMPT]"
        "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}
NAMED = ("auto", "tokenizer", "alpaca", *CHAT_TEMPLATES)


def alpaca_prompt(instruction: str, inp: str, system: str | None = None) -> str:
    head = ALPACA_SYSTEM.format(system=system) if system else ""
    if inp:
        return f"{head}### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"{head}### Instruction:\n{instruction}\n\n### Response:\n"


def choose(template: str, fmt: str, tokenizer: Any | None) -> str:
    """The concrete template for `auto`: the tokenizer's own chat template if it has one;
    otherwise alpaca for instruction data and chatml for chat data."""
    if template != "auto":
        return template
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    return "chatml" if fmt == "chat" else "alpaca"


def apply_named(tokenizer: Any, template: str) -> None:
    """Install a named chat template (or a file's content) on the tokenizer."""
    if template in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    elif template.endswith((".jinja", ".j2")):
        with open(template, encoding="utf-8") as fh:
            tokenizer.chat_template = fh.read()


def split_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """Render a conversation; the last assistant turn is the completion, the rest the prompt."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    return prompt, messages[-1]["content"]


TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")


def answer_spans(tokenizer: Any, messages: list[dict[str, str]], train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template renders it, and the character spans of the answers
    that carry loss: each one from the end of the prompt that asks for it (the conversation so
    far with the generation prompt) to the end of the answer's turn (its end-of-turn marker
    included). System, user and tool turns are never in a span.

    Rendering prefix by prefix needs a template that renders a conversation's start the same
    way whatever follows; one that does not (it rewrites earlier turns) is refused with the
    way out, never trained on the wrong tokens."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant_turn":
        turns = turns[-1:]
    spans = []
    for i in turns:
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        before = (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i
                  else _opening(tokenizer, upto, messages[0]["content"]))
        if not (full.startswith(upto) and upto.startswith(before)):
            if i == turns[-1] and len(turns) == 1:  # the last answer alone: what split_chat trains
                prompt, _ = split_chat(tokenizer, messages)
                start = len(prompt) if full.startswith(prompt) else len(full) - len(messages[i]["content"])
                spans.append((start, len(full)))
                continue
            from ftkit.errors import DatasetError

            raise DatasetError(f"the chat template does not render assistant turn {i} of a conversation as a prefix "
                               "of the whole (it rewrites earlier turns): set dataset.train_on: last_assistant_turn")
        spans.append((len(before), len(upto)))
    return full, spans


def _opening(tokenizer: Any, upto: str, content: str) -> str:
    """What a template renders before an answer that opens the conversation (BOS, the
    assistant header, a default system prompt the template adds): never trained on. The
    generation prompt of no messages where the template renders one that starts the answer's
    rendering; else everything before the answer's own text."""
    try:
        prompt = tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates index messages[0], raise their own errors
        prompt = ""
    if prompt and upto.startswith(prompt):
        return str(prompt)
    at = upto.find(content) if content else -1
    return upto[:at] if at > 0 else ""


def tokenize_answers(tokenizer: Any, messages: list[dict[str, str]], train_on: str,
                     max_length: int | None = None) -> dict[str, list[int]] | None:
    """`input_ids` and `labels` (-100 where no loss) for one conversation: the tokens of the
    answers `train_on` names carry loss, nothing else does. Every trained answer ends with the
    tokenizer's EOS token: where the template's end of turn is not EOS, EOS is added after the
    answer's turn (what trl's prompt/completion path does for the last answer). Truncated to
    `max_length` (the start kept); None when truncation leaves no answer token."""
    full, spans = answer_spans(tokenizer, messages, train_on)
    pieces: list[tuple[str, bool]] = []
    at = 0
    for s, e in spans:
        pieces += [(full[at:s], False), (full[s:e], True)]
        at = e
    pieces.append((full[at:], False))
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        bounds, pos = [], 0
        for text, trained in pieces:
            bounds.append((pos, pos + len(text), trained))
            pos += len(text)
        k = 0
        groups: list[tuple[list[int], bool]] = [([], t) for _, _, t in bounds]
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            last = max(a, b - 1)  # a token that crosses into an answer (" Pa" of " Paris") is the answer's
            while k < len(bounds) - 1 and last >= bounds[k][1]:
                k += 1
            groups[k][0].append(tok)
    else:  # a slow tokenizer has no offsets: each piece on its own
        groups = [(tokenizer(text, add_special_tokens=False)["input_ids"] if text else [], t) for text, t in pieces]
    for toks, trained in groups:
        if trained and eos is not None and eos not in toks:
            toks = [*toks, eos]
        ids += toks
        labels += toks if trained else [-100] * len(toks)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(v == -100 for v in labels):
        return None
    return {"input_ids": ids, "labels": labels}
