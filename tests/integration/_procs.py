"""Process helpers for integration tests: bounded waits, and every process ended by its PID."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
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
) -> tuple[subprocess.Popen[str], str]:
    """Start the scheduler CLI and wait (bounded) for the line with its address."""
    if console_script:
        exe = Path(sys.executable).with_name("lightning-secagg")
        cmd = [str(exe), "scheduler", *args]
    else:
        cmd = [sys.executable, "-m", "lightning_secagg", "scheduler", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=python_env()
    )
    line = read_line_matching(proc, "listening on", timeout)
    return proc, line.rsplit(" ", 1)[-1].strip()


def read_line_matching(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read ``proc``'s stdout until a line contains ``needle``; fail after ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no line with {needle!r} within {timeout}s; output: {''.join(seen)[-2000:]}")


def stop_all(procs: list[subprocess.Popen[str]], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
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
