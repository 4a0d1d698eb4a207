"""Process helpers for the callback and MNIST integration tests.

Every process is started in its own session (so DDP's extra rank is in the
same process group) and ended by its PID / process-group id, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).with_name("_callback_peer.py")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("NODE_RANK", None)
    return env


def spawn(args: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``python args...`` in a new session with stdout/stderr to ``log_path``."""
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.PIPE,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=str(cwd or REPO),
        env=child_env(),
        start_new_session=True,
    )
    proc._log_file = log_file  # type: ignore[attr-defined]
    return proc


def kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """End ``proc`` and its process group (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # children (e.g. a DDP rank) may outlive the leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(grace)
    if proc.stdin is not None:
        proc.stdin.close()
    log_file = getattr(proc, "_log_file", None)
    if log_file is not None:
        log_file.close()


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for all up to one shared deadline; returns exit codes (None: still running)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            codes.append(proc.wait(remaining))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def logs(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else "<no log>"
        parts.append(f"----- {path.name} -----\n{text[-4000:]}")
    return "\n".join(parts)


def run_peers(
    tmp_path: Path,
    scheduler: str,
    count: int,
    extra: list[list[str]] | None = None,
    common: list[str] | None = None,
    timeout: float = 90.0,
    tag: str = "peer",
    scheduler_key: str | None = None,
) -> tuple[list[int | None], list[Path], str]:
    """Run ``count`` BoringModel peers to completion; returns codes, out dirs and logs."""
    procs, outs, log_paths = [], [], []
    try:
        for i in range(count):
            out = tmp_path / f"{tag}{i}"
            out.mkdir(parents=True, exist_ok=True)
            args = [
                str(PEER_SCRIPT),
                "--index",
                str(i),
                "--scheduler",
                scheduler,
                "--out",
                str(out),
            ]
            args += common or []
            if scheduler_key is not None:
                args += [f"--scheduler-key={scheduler_key}"]  # a Z85 key may start with "-"
            if extra is not None:
                args += extra[i]
            log_path = tmp_path / f"{tag}{i}.log"
            procs.append(spawn(args, log_path))
            outs.append(out)
            log_paths.append(log_path)
        codes = wait_all(procs, timeout)
    finally:
        for proc in procs:
            kill_group(proc)
    return codes, outs, logs(log_paths)


def load_final(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"final-rank{rank}.pt", weights_only=True)


def load_before(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"before-rank{rank}.pt", weights_only=True)


def load_report(out: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((out / f"report-rank{rank}.json").read_text())
