"""A stand-in engine for generated stacks (not a test module): runs inside the ftkit images
after `ftkit lease ... --`, and records when it holds its GPUs.

    python /probe/standin_engine.py train GPUS         hold for STANDIN_SECONDS (random 0.3-1.2 s), leave a
                                                       stand-in adapter at STANDIN_ADAPTER (where the journal
                                                       looks for it), exit 0
    python /probe/standin_engine.py serve GPUS PORT    answer GET /health until SIGTERM
    python /probe/standin_engine.py witness GPUS -- CMD...
                                                       take the witnesses, then exec CMD (a real engine,
                                                       e.g. vLLM): it holds them until it exits

With STANDIN_SCAN=TOKEN a `train` stand-in also looks for any live process whose environment
holds FTKIT_PROBE=TOKEN (the witness puts it into the engine's environment from
STANDIN_ENGINE_TOKEN: the real engine's server, engine-core and worker processes; the
container needs `pid: host` to see them) when it enters and before it leaves: one found means
the engine, or a process it left behind, still ran while training held the GPU.

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


def scan(token: str) -> list[str]:
    """Live processes of the engine under test (by the marker in their environment)."""
    found = []
    mark = f"FTKIT_PROBE={token}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if mark not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie holds nothing
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                found.append(f"{pid} " + fh.read().replace(b"\0", b" ").decode(errors="replace")[:120])
        except OSError:
            continue
    return found


def on_signal(signum: int, _frame: object) -> None:
    log("leave", signal=signum)
    os._exit(0 if ROLE == "serve" else 128 + signum)


def main() -> None:
    if ROLE == "witness":
        fds = take_witnesses()
        for fd in fds:
            os.set_inheritable(fd, True)  # exec keeps them: the engine holds the witnesses
        log("enter")
        command = sys.argv[sys.argv.index("--") + 1:]
        token = os.environ.pop("STANDIN_ENGINE_TOKEN", "")
        if token:  # marks the engine and every process it starts, not the lease around it
            os.environ["FTKIT_PROBE"] = token
        os.execvp(command[0], command)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    witnesses = take_witnesses()  # noqa: F841 - held until the process ends
    log("enter")
    if ROLE == "train":
        token = os.environ.get("STANDIN_SCAN")
        if token:
            for proc in scan(token):
                log("OVERLAP", process=proc, when="enter")
        time.sleep(float(os.environ.get("STANDIN_SECONDS") or random.uniform(0.3, 1.2)))
        if token:
            for proc in scan(token):
                log("OVERLAP", process=proc, when="leave")
        log("leave")
        adapter = os.environ.get("STANDIN_ADAPTER")
        if adapter:  # a step that exits 0 without its adapter failed (its container exits 1)
            os.makedirs(adapter, exist_ok=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                with open(os.path.join(adapter, name), "w") as fh:
                    fh.write("{}")
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
