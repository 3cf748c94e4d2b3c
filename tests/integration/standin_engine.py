"""A stand-in engine for generated stacks (not a test module): runs inside the ftkit images
after `ftkit lease ... --`, and records when it holds its GPUs.

    python /probe/standin_engine.py train GPUS         hold for STANDIN_SECONDS (random 0.3-1.2 s), exit 0
    python /probe/standin_engine.py serve GPUS PORT    answer GET /health until SIGTERM

Every event is one JSON line appended to /probe/out/events.jsonl (O_APPEND: whole lines
from many containers). Besides the lease it takes a non-blocking flock on a witness file
per GPU: if that is still held by another stand-in, two engines run on one GPU at once and
it records OVERLAP. The kernel drops a dead process's flock, so SIGKILLed holders cannot
leave a false witness behind; a short retry covers the moment between a killed holder's
lease lock and its witness lock going away.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sys
import time

OUT = "/probe/out"
ROLE, GPUS = sys.argv[1], sys.argv[2].split(",")
HOST = os.uname().nodename


def log(event: str, **kw: object) -> None:
    line = json.dumps({"t": time.time(), "role": ROLE, "event": event, "host": HOST, "pid": os.getpid(),
                       "gpus": GPUS, **kw}) + "\n"
    fd = os.open(f"{OUT}/events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def take_witnesses() -> list[int]:
    fds = []
    for gpu in GPUS:
        fd = os.open(f"{OUT}/witness-gpu{gpu}", os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + 1.5
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log("OVERLAP", gpu=gpu)
                    break
                time.sleep(0.02)
        fds.append(fd)
    return fds


def on_signal(signum: int, _frame: object) -> None:
    log("leave", signal=signum)
    os._exit(0 if ROLE == "serve" else 128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    witnesses = take_witnesses()  # noqa: F841 - held until the process ends
    log("enter")
    if ROLE == "train":
        time.sleep(float(os.environ.get("STANDIN_SECONDS") or random.uniform(0.3, 1.2)))
        log("leave")
        sys.exit(0)
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"host": HOST, "pid": os.getpid()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    HTTPServer(("0.0.0.0", int(sys.argv[3])), Health).serve_forever()


if __name__ == "__main__":
    main()
