"""Talking to a running model server (OpenAI-compatible): readiness, and the recipe's test prompts.

Light on purpose (HTTP gateway only, no torch): the runner calls it in its own process
while the server runs in a container or a child process.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from ftkit.errors import HttpError, ServerNotReady
from ftkit.gateways import http


def wait_ready(ready: dict[str, Any], *, alive: Callable[[], bool], log_tail: Callable[[], str],
               poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> float:
    """Block until /health and /v1/models answer; return the seconds it took. Fails early if
    the server process dies, and always with its last log lines."""
    t0 = time.monotonic()
    deadline = t0 + float(ready["timeout_s"])
    while time.monotonic() < deadline:
        if not alive():
            raise ServerNotReady(f"the server exited before it was ready\n--- last log lines ---\n{log_tail()}")
        if http.answers(ready["health"]) and http.answers(ready["models"]):
            return time.monotonic() - t0
        sleep(poll_s)
    raise ServerNotReady(f"the server did not become ready within {ready['timeout_s']} s "
                         f"({ready['health']})\n--- last log lines ---\n{log_tail()}")


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
