"""Real rounds: the scheduler through its console entry point, each peer its own process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration._peer_worker import make_state
from tests.integration._procs import REPO, free_port, python_env, start_scheduler, stop_all
from tests.integration._reference import assert_matches_reference

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_peer_worker.py")


def run_round(
    tmp_path: Path,
    n: int,
    group_size: int,
    num_actors: int,
    rounds: int = 1,
    console_script: bool = False,
    model: str = "mixed",
    rings: list[str] | None = None,
) -> list[list[dict]]:
    port = free_port()
    sched, address, key = start_scheduler(
        "--port",
        str(port),
        "--target-size",
        str(n),
        "--group-size",
        str(group_size),
        "--num-actors",
        str(num_actors),
        "--round-timeout",
        "120",
        console_script=console_script,
    )
    procs = [sched]
    try:
        outs = [tmp_path / f"peer{i}.json" for i in range(n)]
        for i in range(n):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER),
                        "--scheduler",
                        address,
                        "--index",
                        str(i),
                        "--out",
                        str(outs[i]),
                        "--rounds",
                        str(rounds),
                        "--weight",
                        str(i + 1),
                        f"--scheduler-key={key}",  # a Z85 key may start with "-"
                        "--model",
                        model,
                        "--ring",
                        rings[i] if rings else "auto",
                    ],
                    cwd=REPO,
                    env={**python_env(), "PYTHONPATH": str(REPO)},
                )
            )
        for p in procs[1:]:
            assert p.wait(timeout=240) == 0, "a peer process failed"
        return [json.loads(o.read_text()) for o in outs]
    finally:
        stop_all(procs)


def check_results(
    results: list[list[dict]], n: int, rounds: int, model: str = "mixed", ring_bits: int = 64
) -> None:
    for r in range(rounds):
        per_peer = [peer[r] for peer in results]
        digests = {rec["digest"] for rec in per_peer}
        assert len(digests) == 1, "peers' results are not bitwise identical"
        assert len({rec["stats"]["round_id"] for rec in per_peer}) == 1
        assert {rec["stats"]["ring_bits"] for rec in per_peer} == {ring_bits}
        rec = per_peer[0]
        state = make_state(0, 1.0, model)
        for name, t in state.items():
            assert rec["dtypes"][name] == str(t.dtype)
            assert rec["shapes"][name] == list(t.shape)
        assert_matches_reference(rec["values"], n, 1.0 + r, model, ring_bits)


@pytest.mark.parametrize(
    ("n", "group_size", "num_actors"),
    [(3, 3, 2), (6, 3, 2), (7, 3, 2), (12, 3, 2), (12, 4, 3)],
)
@pytest.mark.timeout(300)
def test_round_matches_weighted_mean_and_is_identical(tmp_path, n, group_size, num_actors):
    results = run_round(tmp_path, n, group_size, num_actors, rounds=2)
    check_results(results, n, rounds=2)
    depth = max(
        len([x for x in rec[0]["stats"]["roles"] if x.startswith("participant")]) for rec in results
    )
    assert depth <= math.ceil(math.log(n / 3) / math.log(group_size / num_actors)) + 2


@pytest.mark.parametrize(("n", "group_size", "num_actors"), [(7, 3, 2), (12, 4, 3)])
@pytest.mark.timeout(300)
def test_compact_ring_round_is_exact_and_identical(tmp_path, n, group_size, num_actors):
    """A model without float64 tensors: the scheduler picks the 32-bit ring, and the
    result is the weighted mean within the compact ring's per-tensor bound."""
    results = run_round(tmp_path, n, group_size, num_actors, rounds=2, model="compact")
    check_results(results, n, rounds=2, model="compact", ring_bits=32)


@pytest.mark.timeout(300)
def test_one_peer_asking_for_64_bits_keeps_the_round_wide(tmp_path):
    rings = ["auto"] * 5 + ["64"]
    results = run_round(tmp_path, 6, 3, 2, rounds=1, model="compact", rings=rings)
    check_results(results, 6, rounds=1, model="compact", ring_bits=64)


@pytest.mark.timeout(420)
def test_thirty_peers_through_the_console_script(tmp_path):
    results = run_round(tmp_path, 30, 3, 2, rounds=1, console_script=True)
    check_results(results, 30, rounds=1)
    leaf = [p[0]["stats"] for p in results if p[0]["stats"]["roles"] == ["participant@0"]]
    assert leaf, "a 30-peer tree has leaf participants"
