"""Rounds never hang: real processes on loopback, one of them killed (or frozen) mid-round.

Each peer is ``_fault_worker.py``; one worker of the chosen role kills itself
with SIGKILL (or freezes with SIGSTOP) at the moment it holds shares. The
scheduler notices the silence (liveness timeout), aborts the round for
everyone, the survivors sign up again, and a round of at least ``--min-size``
forms after ``--queue-wait``. Every survivor's failed attempt must end soon
after the fault (well within its deadline), and the retry must give every
survivor the mean of the survivors' inputs, bit-identical across them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_secagg.cli import main as cli_main
from tests.integration._fault_worker import make_state
from tests.integration._procs import (
    REPO,
    free_port,
    python_env,
    read_line_matching,
    start_scheduler,
    stop_all,
)

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_fault_worker.py")
ATTEMPT_TIMEOUT = 30.0  # each aggregate() call's own deadline
LIVENESS = 2.0
HEARTBEAT = 1.0  # the Peer default
SLACK = 3.0  # scheduling noise on a loaded 2-core CI machine
SCHED_ARGS = ("--min-size", "3", "--queue-wait", "2", "--liveness-timeout", str(LIVENESS))


def _worker(address: str, key: str | None, index: int, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "--scheduler", address, "--index", str(index)]
    cmd += ["--out", str(out), "--timeout", str(ATTEMPT_TIMEOUT)]
    if key is not None:
        cmd += [f"--scheduler-key={key}"]  # a Z85 key may start with "-"
    return subprocess.Popen(
        [*cmd, *extra],
        cwd=REPO,
        env={**python_env(), "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(0.1, deadline - time.monotonic()))


def _mean(indices: list[int]) -> dict[str, np.ndarray]:
    states = [make_state(i) for i in indices]
    return {k: torch.stack([s[k].double() for s in states]).mean(0).numpy() for k in states[0]}


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("n", "role", "how"),
    [
        (6, "leaf", "kill"),
        (6, "actor", "kill"),
        (6, "root", "kill"),
        (12, "leaf", "kill"),
        (12, "actor", "kill"),
        (12, "root", "kill"),
        (6, "actor", "stop"),
    ],
)
def test_survivors_retry_without_the_failed_peer(tmp_path, n, role, how):
    sched, address, key = start_scheduler(
        "--port", str(free_port()), "--target-size", str(n), *SCHED_ARGS
    )
    marker = tmp_path / "fault"
    outs = [tmp_path / f"peer{i}.json" for i in range(n)]
    workers: list[subprocess.Popen] = []
    try:
        for i in range(n):
            extra = ("--die-role", role, "--die-how", how, "--marker", str(marker))
            workers.append(_worker(address, key, i, outs[i], *extra))
        deadline = time.monotonic() + 90
        while not marker.exists() or not marker.read_text().endswith("\n"):
            assert time.monotonic() < deadline, "no worker took the role"
            assert all(w.poll() in (None, 0) for w in workers), "a worker failed early"
            time.sleep(0.05)
        pid_text, died_role, died_at = marker.read_text().split()
        assert died_role == role
        failed = next(w for w in workers if w.pid == int(pid_text))
        survivors = [w for w in workers if w is not failed]
        _wait_all(survivors, 100)
        for w in survivors:  # on failure, say why (the workers' output is piped)
            if w.returncode != 0:
                print(f"survivor {w.pid} exited {w.returncode}:\n{w.stdout.read()[-6000:]}")
        assert all(w.returncode == 0 for w in survivors)
        if how == "kill":
            assert failed.wait(timeout=5) == -signal.SIGKILL
        else:
            assert failed.poll() is None, "the stopped peer should still be frozen"
            failed.kill()  # SIGKILL works on a stopped process; SIGTERM would stay pending
            failed.wait(timeout=5)
    finally:
        stop_all([*workers, sched])
        for w in workers:  # a SIGSTOPped worker ignores SIGTERM; SIGKILL ends it by its PID
            if w.poll() is None:
                os.kill(w.pid, signal.SIGCONT)
                w.kill()
                w.wait(timeout=5)

    alive = [i for i, w in enumerate(workers) if w is not failed]
    records = [json.loads(outs[i].read_text()) for i in alive]
    latencies = []
    for rec in records:
        first, *rest = rec["attempts"]
        # the round with the dead peer failed fast, with a typed error, well within its deadline
        assert first["error_type"] in ("RoundAbortedError", "RoundTimeoutError"), first
        assert first["seconds"] <= ATTEMPT_TIMEOUT + SLACK
        latencies.append(first["ended"] - float(died_at))
        assert rest and "error_type" not in rest[-1], rec["attempts"]
        assert rec["num_peers"] == n - 1
    # survivors learn of the failure from the scheduler's liveness check, not their deadline
    assert max(latencies) <= LIVENESS + HEARTBEAT + SLACK, latencies
    print(
        f"\n{n} peers, {how} {role}: survivor latency after the fault "
        f"min {min(latencies):.2f} s, max {max(latencies):.2f} s"
    )
    expected = _mean(alive)
    for rec in records:
        for name, want in expected.items():
            np.testing.assert_allclose(rec["result"][name], want, atol=1e-4)
        assert rec["digest"] == records[0]["digest"], "survivors disagree bitwise"


@pytest.mark.timeout(120)
def test_scheduler_restart_and_peer_restart_do_not_strand_peers(tmp_path):
    """Peers queued at a scheduler that is killed and restarted (same port and key
    file) sign up again on their own; a peer killed and restarted rejoins."""
    assert cli_main(["keygen", "sched", "--directory", str(tmp_path)]) == 0
    key_file = str(tmp_path / "sched.key_secret")
    port = str(free_port())
    args = ("--port", port, "--target-size", "3", "--key-file", key_file)
    sched, address, key = start_scheduler(*args, *SCHED_ARGS)
    procs = [sched]
    outs = [tmp_path / f"peer{i}.json" for i in range(3)]
    try:
        w0 = _worker(address, key, 0, outs[0])
        w1 = _worker(address, key, 1, outs[1])
        procs += [w0, w1]
        read_line_matching(sched, "peer peer0 joined", 60)
        read_line_matching(sched, "peer peer1 joined", 60)
        sched.kill()  # SIGKILL: no goodbye to anyone
        sched.wait(timeout=10)
        w1.kill()  # and a queued peer dies too; it comes back below
        w1.wait(timeout=10)
        sched, address2, _ = start_scheduler(*args, *SCHED_ARGS)
        procs.append(sched)
        assert address2 == address
        # peer0 is still inside aggregate(): its heartbeat gets "rejoin", it signs up again
        read_line_matching(sched, "peer peer0 joined", 30)
        w1 = _worker(address, key, 1, outs[1])
        w2 = _worker(address, key, 2, outs[2])
        procs += [w1, w2]
        _wait_all([w0, w1, w2], 90)
        assert [w.returncode for w in (w0, w1, w2)] == [0, 0, 0]
    finally:
        stop_all(procs)
    records = [json.loads(o.read_text()) for o in outs]
    expected = _mean([0, 1, 2])
    for rec in records:
        assert rec["num_peers"] == 3
        assert "error_type" not in rec["attempts"][-1]
        for name, want in expected.items():
            np.testing.assert_allclose(rec["result"][name], want, atol=1e-4)
    assert len({r["round_id"] for r in records}) == 1
