"""The chat template a GGUF export carries, and the Ollama Modelfile beside it.

A model answers well only when it is prompted exactly as it was trained. llama.cpp renders
the Jinja template stored in the GGUF (`tokenizer.chat_template`); Ollama renders the Go
template in the Modelfile's TEMPLATE. Both come from the template the train step used
(engines.templates): the named chat templates (chatml, llama3, gemma, mistral) and alpaca
have a Go translation here, rendered string for string like their Jinja (tests hold that
with Go's own text/template); a model's own template (`template: tokenizer`) is carried in
the GGUF as it is, and gets a TEMPLATE only when it is one of the named ones.

Ollama executes a template that uses `.Messages` once for the whole conversation, with
`.System` (its system messages) and the messages; it has no `trim`, so the llama3 and gemma
templates, which trim each message in Jinja, agree for messages without surrounding
whitespace. The beginning-of-sequence token: llama.cpp adds it itself when the GGUF says
`add_bos_token`, so a template that starts with `bos_token` renders it only where the
tokenizer does not add it.

Pure strings: no heavy imports (the CLI imports this for --dry-run).
"""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.engines import templates
from ftkit.text import printable

# alpaca as a chat template: what data.to_example builds with `template: alpaca` from a
# conversation (the first system message as the head, the other turns joined by a blank
# line as the instruction). For instruction data whose rows have an input, the user message
# is "INSTRUCTION\n\n### Input:\nINPUT": it renders exactly as alpaca_prompt(instruction, input).
ALPACA_JINJA = (
    "{%- set ns = namespace(seen=false, system='', turns=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if not ns.seen -%}{%- set ns.seen = true -%}{%- set ns.system = m['content'] -%}{%- endif -%}"
    "{%- else -%}{%- set ns.turns = ns.turns + [m['content']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system -%}{{ ns.system ~ '\\n\\n' }}{%- endif -%}"
    "{{ '### Instruction:\\n' ~ (ns.turns | join('\\n\\n')) ~ '\\n\\n### Response:\\n' }}"
)

# Go templates (Ollama), one per named template; BOS and EOS are filled in per tokenizer.
_GO = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
    ),
    "mistral": (
        "{{- range .Messages }}{{ if eq .Role \"system\" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]"
        "{{ else if eq .Role \"user\" }}[INST]{{ .Content }}[/INST]{{ else }}{{ .Content }}{EOS}{{ end }}{{ end }}"
    ),
    "alpaca": (
        "{{- if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n"
        "{{ $first := true }}{{ range .Messages }}{{ if ne .Role \"system\" }}{{ if not $first }}\n\n{{ end }}"
        "{{ .Content }}{{ $first = false }}{{ end }}{{ end }}\n\n### Response:\n"
    ),
}
# The text that ends a turn in each template (PARAMETER stop), besides the tokenizer's EOS.
_STOPS = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>"],
    "gemma": ["<end_of_turn>", "<start_of_turn>"],
    "mistral": ["[INST]"],
    "alpaca": ["### Instruction:"],
}
_STARTS_WITH_BOS = ("llama3", "gemma", "mistral")


def jinja_for(name: str) -> str:
    """The Jinja chat template of a named template (alpaca included)."""
    return ALPACA_JINJA if name == "alpaca" else templates.CHAT_TEMPLATES[name]


def named_of(chat_template: str | None) -> str | None:
    """Which named template a tokenizer's own template is, when ftkit installed it (training
    with a named template saves it verbatim with the adapter); None for any other."""
    if not chat_template:
        return None
    text = chat_template.strip()
    for name in (*templates.CHAT_TEMPLATES, "alpaca"):
        if jinja_for(name).strip() == text:
            return name
    return None


@dataclass
class ChatFormat:
    """What the export writes about prompting: `jinja` goes into the GGUF, `go` into the
    Modelfile's TEMPLATE (None: not one ftkit can translate), `stops` into PARAMETER stop."""

    name: str  # alpaca, chatml, llama3, gemma, mistral, or "tokenizer" (the model's own)
    jinja: str | None
    go: str | None
    stops: list[str]
    system: str | None = None  # the train step's system prompt (SYSTEM in the Modelfile)


def chat_format(name: str, *, own_template: str | None, bos: str | None, eos: str | None, adds_bos: bool,
                system: str | None = None) -> ChatFormat:
    """The prompt format of a model trained with template `name` (already resolved from
    `auto`: templates.choose). `own_template`: the tokenizer's chat template, used for
    `tokenizer`. `bos`/`eos`: the tokenizer's token texts; `adds_bos`: whether its encoding
    (and so llama.cpp, from the GGUF) puts BOS in front by itself."""
    if name == "tokenizer":
        named = named_of(own_template)
        if named is None:
            return ChatFormat("tokenizer", own_template, None, [eos] if eos else [], system)
        name = named
    if name not in _GO:
        raise ValueError(f"template {name!r} has no chat format")  # callers pass resolved names only
    go = _GO[name].replace("{EOS}", go_string(eos) if eos else "")
    if name in _STARTS_WITH_BOS and bos and not adds_bos:
        go = go_string(bos) + go  # renders the token's text: llama.cpp and Ollama parse it as the token
    stops = list(_STOPS[name]) + ([eos] if eos and eos not in _STOPS[name] else [])
    return ChatFormat(name, jinja_for(name), go, stops, system)


def go_string(text: str) -> str:
    """`text` as a Go template action that prints it: {{ "..." }}, a Go string literal.

    BOS and EOS are token texts from the model's tokenizer files: pasted into the template as
    they are, a `{{ .System }}` or `{{ template "x" }}` in one would be executed by Ollama. In a
    literal they are only printed: backslash and quote escaped, and every character that is
    not printable (newlines, carriage returns, which also end a line for Ollama's Modelfile
    parser, and the ones it drops) written as an escape, so the literal is one line of
    printable text."""
    out: list[str] = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
    return '{{ "' + "".join(out) + '" }}'


def _quoted(text: str) -> str:
    """A Modelfile string: one line in double quotes (escaped), else triple quotes."""
    if "\n" not in text and '"' not in text and "\\" not in text:
        return f'"{text}"'
    if '"""' in text or text.endswith('"'):
        raise ValueError("cannot be written in a Modelfile (it holds or ends with a quote)")
    return f'"""{text}"""'


def modelfile(gguf_name: str, fmt: ChatFormat, *, source: str) -> tuple[str, list[str]]:
    """The Modelfile text and the warnings about it. `source` names where the model came from
    (a comment)."""
    warnings: list[str] = []
    lines = [f"# written by `ftkit export --to gguf` from {printable(source)}",
             f"# ollama create NAME -f Modelfile (in this directory); the prompt format: {fmt.name}",
             f"FROM ./{gguf_name}"]
    if fmt.go is not None:
        lines.append(f"TEMPLATE {_quoted(fmt.go)}")
    else:
        lines.append("# no TEMPLATE: the model's own chat template is not one ftkit translates to Ollama's Go "
                     "templates; Ollama picks one from the template in the GGUF (check `ollama show --template`)")
        warnings.append("the model's own chat template has no Ollama translation: the Modelfile has no TEMPLATE "
                        "(llama.cpp uses the one in the GGUF as it is)")
    if fmt.system:
        try:
            lines.append(f"SYSTEM {_quoted(fmt.system)}")
        except ValueError as e:
            warnings.append(f"the system prompt {e}: left out of the Modelfile")
    for stop in fmt.stops:
        try:
            lines.append(f"PARAMETER stop {_quoted(stop)}")
        except ValueError as e:
            warnings.append(f"stop {stop!r} {e}: left out")
    return "\n".join(lines) + "\n", warnings
