"""Process helpers for integration tests: bounded waits, and every process ended by its PID."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_scheduler(
    *args: str, console_script: bool = False, timeout: float = 30.0
) -> tuple[subprocess.Popen[str], str, str | None]:
    """Start the scheduler CLI; wait (bounded) for its address and public key lines."""
    if console_script:
        exe = Path(sys.executable).with_name("lightning-secagg")
        cmd = [str(exe), "scheduler", *args]
    else:
        cmd = [sys.executable, "-m", "lightning_secagg", "scheduler", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=python_env()
    )
    try:
        key = None
        if "--insecure" not in args:
            line = read_line_matching(proc, "public key:", timeout)
            key = line.split("public key: ")[1].split()[0]
        line = read_line_matching(proc, "listening on", timeout)
    except BaseException:
        stop_all([proc])  # never leave an orphan behind a failed start
        raise
    return proc, line.rsplit(" ", 1)[-1].strip(), key


_readers: dict[int, queue.Queue[str | None]] = {}


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A queue fed by a daemon thread with ``proc``'s stdout lines (None at EOF)."""
    q = _readers.get(proc.pid)
    if q is None:
        q = _readers[proc.pid] = queue.Queue()
        stdout = proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
    return q


def read_line_matching(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read ``proc``'s stdout until a line contains ``needle``; fail after ``timeout`` seconds."""
    q = _lines(proc)
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(
        f"no line with {needle!r} within {timeout}s; output: {''.join(seen)[-2000:]}"
    )


def stop_all(
    procs: list[subprocess.Popen[str]], sig: int = signal.SIGTERM, grace: float = 5.0
) -> None:
    """End every process by its PID: ``sig`` first, SIGKILL after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
