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
