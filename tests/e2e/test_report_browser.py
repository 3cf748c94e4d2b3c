"""The HTML report opens in a real headless browser with no console errors, no failed
loads and every plot decoded; a screenshot of it is taken (and kept beside the report).

Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages ending in NUL on file descriptors 3 and 4), so no websocket library is needed.
Skips with a reason where Chromium is missing, unless FTKIT_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.unit.test_report import make_run

require("matplotlib")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None and os.environ.get("FTKIT_REQUIRE_BROWSER") == "1":
        pytest.fail("FTKIT_REQUIRE_BROWSER=1 but no Chromium is installed (apt-get install chromium)")
    return found


class Cdp:
    """A DevTools client on Chromium's debugging pipe."""

    def __init__(self, browser: str, profile: Path) -> None:
        argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "--window-size=1200,900", "about:blank"]
        # the pipe is fd 3 (commands in) and fd 4 (answers out): map them onto our stdin/stdout
        self.proc = subprocess.Popen(["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        want = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == want:
                if "error" in m:
                    raise AssertionError(f"{method}: {m['error']}")
                return dict(m.get("result") or {})
            self.events.append(m)

    def wait_event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == name:
                return e
        while True:
            m = self._read(deadline)
            self.events.append(m)
            if m.get("method") == name:
                return m

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the debugging pipe")
                self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return dict(json.loads(raw))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
def test_report_opens_in_headless_chromium_without_errors(tmp_path: Path) -> None:
    from ftkit.observe.report import make_report

    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium; CI sets FTKIT_REQUIRE_BROWSER=1)")
    a = make_run(tmp_path, "20260901T120000Z-one")
    b = make_run(tmp_path, "20260901T130000Z-two", gpus=(0, 1), batch_size=8, grad_accum=1, distribution="ddp")
    report = make_report([a, b])
    profile = Path(tempfile.mkdtemp(prefix="ftkit-chromium-"))
    cdp = Cdp(browser, profile)
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            cdp.send(f"{domain}.enable", session=session)
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        cdp.send("Page.navigate", {"url": report.html.resolve().as_uri()}, session=session)
        cdp.wait_event("Page.loadEventFired", timeout=60)
        state = cdp.send("Runtime.evaluate", {"returnByValue": True, "expression": """
            JSON.stringify({
              title: document.title,
              images: Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]),
              headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
              fairness: document.querySelector('.ok, .warn') ? document.querySelector('.ok, .warn').textContent : null,
              height: document.documentElement.scrollHeight})"""}, session=session)
        page = json.loads(state["result"]["value"])
        shot = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                   "clip": {"x": 0, "y": 0, "width": 1200,
                                                            "height": min(page["height"], 6000), "scale": 1}},
                        session=session, timeout=60)
    finally:
        cdp.close()
        shutil.rmtree(profile, ignore_errors=True)
    problems = [e for e in cdp.events if e.get("method") in ("Runtime.exceptionThrown",)
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    assert problems == [], problems
    assert page["title"] == f"ftkit report: {a.name} vs {b.name}"
    assert len(page["images"]) == len(report.figures) == 7
    for alt, complete, w, h in page["images"]:
        assert complete and w == 900 and h > 300, (alt, w, h)
    assert {"Outcome", "Training", "GPU telemetry", "Fairness check", "Plots"} <= set(page["headings"])
    assert page["fairness"] and "Fairness check" in page["fairness"]
    png = base64.b64decode(shot["data"])
    screenshot = report.out_dir / "screenshot.png"
    screenshot.write_bytes(png)
    import matplotlib.image as mpimg

    img = mpimg.imread(screenshot)
    assert img.shape[1] == 1200 and img.shape[0] > 2000
    assert img[..., :3].std() > 0.05  # not a blank page
