"""The serve step's engine arguments that ftkit reads itself, as vLLM reads them.

ftkit passes a serve step's `args` to vLLM as flags (`str(value)`), and the serving memory
fit (plan.servefit) reads four of them: the context, the batch, the sequences and the share
of each GPU vLLM takes. Both must agree on what a value means, or the fit judges one server
while vLLM starts another (an "8k" read as unset, a "nan" that crashes the planner, a 0 the
fit replaces with the default while vLLM gets 0). So the values are parsed here, once, the
way vLLM 0.32 parses them (vllm/utils/argparse_utils.py: human_readable_int and
human_readable_int_or_auto; vllm/config/cache.py: gpu_memory_utilization in (0, 1]), and
`problems` refuses at validate, located, every value vLLM would refuse or ftkit could not
read. Pure: values in, numbers or reasons out.
"""

from __future__ import annotations

import math
import re
from typing import Any

# vLLM's human-readable integers: k/m/g/t decimal (1k = 1000, decimals allowed: 25.6k), K/M/G/T
# binary (1K = 1024, whole numbers only). ASCII digits only (vLLM's \d takes any Unicode digit).
_SUFFIXED = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kKmMgGtT])")
_PLAIN = re.compile(r"-?[0-9]+")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

AUTO = -1  # max_model_len -1 or `auto`: vLLM fits the context to the KV cache it has room for
MAX_TOKENS = 2**31 - 1
# The arguments the fit reads: (vLLM's parser, what the value is). max_num_seqs is a plain int in vLLM.
TOKEN_ARGS = {
    "max_model_len": ("human", "the context length in tokens"),
    "max_num_batched_tokens": ("human", "the tokens of one forward pass"),
    "max_num_seqs": ("int", "the sequences vLLM runs at once"),
}
UTILIZATION = "gpu_memory_utilization"
READ = (*TOKEN_ARGS, UTILIZATION)


def spellings(key: str) -> tuple[str, str]:
    return key, key.replace("_", "-")


def given(args: dict[str, Any], key: str) -> tuple[str, Any] | None:
    """(the spelling used, its value) of `key` in a serve step's args (max_model_len or
    max-model-len, as ftkit accepts both); None when not given. With both spellings vLLM
    takes the flag that comes last; `problems` refuses that."""
    for spelling in spellings(key):
        if spelling in args:
            return spelling, args[spelling]
    return None


def token_count(value: Any, *, human: bool = True, auto: bool = False) -> int:
    """An integer engine argument as vLLM reads `str(value)`: `8192`, `8k` (8000), `8K`
    (8192), `25.6k`; with `auto`, also `-1` and `auto` (AUTO). Raises ValueError saying why."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("is not a whole number")
    text = str(value).strip()
    if auto and (text == "-1" or text.lower() == "auto"):
        return AUTO
    match = _SUFFIXED.fullmatch(text) if human else None
    if match:
        number, suffix = match.groups()
        if suffix in _DECIMAL:
            n = int(float(number) * _DECIMAL[suffix])
        elif "." in number:
            raise ValueError(f"has decimals with the binary suffix {suffix} (vLLM refuses them; "
                             f"{number}{suffix.lower()} is decimal)")
        else:
            n = int(number) * _BINARY[suffix]
    elif _PLAIN.fullmatch(text) and len(text) <= 20:
        n = int(text)
    else:
        forms = "a whole number (8192), or with k/m/g (x1000: 8k) or K/M/G (x1024: 8K)" if human else "a whole number"
        raise ValueError(f"is not {forms}" + (", -1 or auto" if auto else ""))
    if n < 1:
        raise ValueError("must be at least 1" + (" (or -1/auto: vLLM fits it to the memory)" if auto else ""))
    if n > MAX_TOKENS:
        raise ValueError(f"is more than {MAX_TOKENS}")
    return n


def utilization(value: Any) -> float:
    """gpu_memory_utilization as vLLM reads it: a number above 0 and at most 1. Raises
    ValueError saying why."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("is not a number")
    try:
        x = float(str(value).strip())
    except ValueError:
        raise ValueError("is not a number") from None
    if not math.isfinite(x) or not 0 < x <= 1:
        raise ValueError("must be above 0 and at most 1: the share of each GPU's memory vLLM takes (0.9 is 90%)")
    return x


def read(args: dict[str, Any], key: str) -> Any:
    """The value of `key` as a number (int tokens, AUTO, a float share), or None when not
    given or not readable (validate refuses those before any plan is made)."""
    found = given(args, key)
    if found is None:
        return None
    try:
        if key == UTILIZATION:
            return utilization(found[1])
        kind, _ = TOKEN_ARGS[key]
        return token_count(found[1], human=kind == "human", auto=key == "max_model_len")
    except ValueError:
        return None


def problems(args: dict[str, Any]) -> list[tuple[str, str]]:
    """(the key as spelled in args, why) for every value of the arguments the fit reads that
    vLLM would refuse, or that is given in both spellings."""
    out: list[tuple[str, str]] = []
    for key in READ:
        both = [s for s in spellings(key) if s in args]
        if len(both) > 1:
            out.append((both[1], f"also given as {both[0]}: give it once"))
        found = given(args, key)
        if found is None:
            continue
        spelling, value = found
        try:
            if key == UTILIZATION:
                utilization(value)
            else:
                kind, _ = TOKEN_ARGS[key]
                token_count(value, human=kind == "human", auto=key == "max_model_len")
        except ValueError as e:
            what = "" if key == UTILIZATION else f" ({TOKEN_ARGS[key][1]})"
            out.append((spelling, f"{_show(value)} {e}{what}"))
    return out


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
