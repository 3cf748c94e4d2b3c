"""HTTP to model servers (OpenAI-compatible APIs). Standard library only, so the CLI
stays light; every failure becomes ftkit.errors.HttpError here and nowhere else."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from ftkit.errors import HttpError


def request_json(
    method: str, url: str, payload: Any | None = None, *, timeout: float = 30.0, api_key: str | None = None,
    text_answer: bool = False,
) -> Any:
    """Send JSON, read JSON back (`text_answer`: the answer as text; vLLM's LoRA endpoints
    answer plain text on success)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http(s) URLs we build)
            body = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:4000].decode("utf-8", "replace")
        raise HttpError(f"{method} {url}: HTTP {e.code}: {detail}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise HttpError(f"{method} {url}: {reason}") from e
    if text_answer:
        return body.decode("utf-8", "replace")
    if not body:
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise HttpError(f"{method} {url}: answer is not JSON: {body[:200]!r}") from e



def post_json(url: str, payload: Any, *, timeout: float = 120.0, api_key: str | None = None) -> Any:
    return request_json("POST", url, payload, timeout=timeout, api_key=api_key)


def answers(url: str, *, timeout: float = 3.0) -> bool:
    """True when GET url returns 2xx. Used for readiness polling."""
    req = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return 200 <= resp.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
