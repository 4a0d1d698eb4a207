"""Whole rounds of up to 1000 peers in memory: exact results, tree depth and message counts.

The counts checked here are the ones ``docs/`` documents. With ``n_L``
participants in ``G_L`` groups at level ``L`` (from ``tree.level_sizes``) and
``k`` actors per group:

* Share messages: ``sum_L (n_L - G_L * k) * k``, plus ``k * (k - 1)`` when
  ``k >= 3``: every participant that is not an actor of its group sends one
  share to each of the ``k`` actors; actors keep their vector whole, except
  in a root group of three actors or more, where each keeps one share and
  sends the other root actors one each.
* Partial messages: ``k * (k - 1)``: the root actors exchange their sums.
* Result messages: ``sum_L (n_L - G_L * k)``: every participant that is not an
  actor of its group gets exactly one copy from its designated actor.

Since ``n_{L+1} = G_L * k <= n_L * k / (k + 1)``, ``sum_L n_L`` is at most
``(k + 1) * N``, so the traffic grows linearly in ``N`` and the depth like
``log N``.
"""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from lightning_secagg.encoding import decode_result
from lightning_secagg.protocol.scheduler_state import SchedulerState
from lightning_secagg.tree import check_tree, level_sizes
from tests.unit.memnet import (
    MemNet,
    cast_bound,
    fixed_point_bound,
    make_round,
    random_state_dicts,
    result_bytes,
    results,
    run_with_scheduler,
    weighted_mean,
)

pytestmark = pytest.mark.timeout(60)

SIZES = [(3, 3, 2), (6, 3, 2), (7, 3, 2), (12, 3, 2), (30, 3, 2), (100, 3, 2), (1000, 3, 2),
         (12, 4, 3)]  # fmt: skip


def expected_counts(n: int, g: int, k: int) -> dict[str, int]:
    levels = level_sizes(n, g, k)
    participants = [sum(sizes) for sizes in levels]
    groups = [len(sizes) for sizes in levels]
    # Non-actors split (k shares each: one to every actor); so do the root
    # actors when there are three or more, each keeping one share at home.
    every = zip(participants, groups, strict=True)
    return {
        "Share": sum((nl - gl * k) * k for nl, gl in every) + (k * (k - 1) if k >= 3 else 0),
        "Partial": k * (k - 1),
        "Result": sum(nl - gl * k for nl, gl in zip(participants, groups, strict=True)),
    }


def run_round(n: int, g: int, k: int, *, seed: int = 0, wire: bool = False, size: int = 8):
    rng = random.Random(seed)
    weights = [rng.choice([1.0, 2.0, 3.5, 10.0, 60.0]) for _ in range(n)]
    setup = make_round(n, g, k, seed=seed, weights=weights, size=size)
    net = MemNet(setup.peers, "fifo", wire=wire)
    net.start()
    counts = net.run()
    return setup, net, counts


def assert_results(setup) -> None:
    raw = result_bytes(setup)
    assert len(set(raw)) == 1, "all peers hold bitwise identical results"
    out = results(setup)[0]
    n = len(setup.ids)
    ref = weighted_mean(setup.state_dicts, setup.weights, "w")
    peak = max(float(sd["w"].abs().max()) for sd in setup.state_dicts)
    bound = fixed_point_bound(n, setup.schema.frac_bits, peak) + cast_bound(ref, torch.float32)
    err = (out["w"].double() - ref).abs()
    assert bool((err <= bound).all()), (float(err.max()), float(bound.max()))
    assert out["w"].dtype == torch.float32
    # The integer counter is the weighted mean rounded to an integer.
    steps_ref = float(weighted_mean(setup.state_dicts, setup.weights, "steps"))
    assert out["steps"].dtype == torch.int64
    assert abs(int(out["steps"]) - steps_ref) <= 0.5 + 1e-6


@pytest.mark.parametrize(("n", "g", "k"), SIZES, ids=lambda v: str(v))
def test_whole_round(n, g, k):
    setup, _, counts = run_round(n, g, k, seed=n, wire=n <= 100)
    assert all(p.done for p in setup.peers.values())
    assert_results(setup)
    # Depth: exactly the documented shape, and logarithmic.
    check_tree(setup.tree)
    assert setup.tree.depth == len(level_sizes(n, g, k))
    assert setup.tree.depth <= math.ceil(math.log(max(n / 3, 1)) / math.log(g / k)) + 2
    # Message counts: exactly the documented formulas.
    assert dict(counts) == expected_counts(n, g, k)


def test_documented_numbers_for_1000_peers():
    assert len(level_sizes(1000, 3, 2)) == 14
    sizes = level_sizes(1000, 3, 2)
    assert [sum(level) for level in sizes] == [
        1000, 666, 444, 296, 196, 130, 86, 56, 36, 24, 16, 10, 6, 4,
    ]  # fmt: skip
    assert expected_counts(1000, 3, 2) == {"Share": 1996, "Partial": 2, "Result": 998}


def test_expected_counts_by_hand():
    # 3 peers, one group of 3 with 2 actors: the leaf sends 2 shares (the actors keep
    # their vectors whole); the two actors exchange partials; the leaf gets one result.
    assert expected_counts(3, 3, 2) == {"Share": 2, "Partial": 2, "Result": 1}
    # 7 peers: [3, 4] then [4]: the 3 non-actors of level 0 split (2 shares each),
    # then the 2 of the root group: 6 + 4 = 10 shares; results 3 + 2 = 5.
    assert expected_counts(7, 3, 2) == {"Share": 10, "Partial": 2, "Result": 5}
    # 4 peers, one group with 3 actors: the non-actor sends 3 shares, each root
    # actor the two others a seed; 3 * 2 partials; one result.
    assert expected_counts(4, 4, 3) == {"Share": 9, "Partial": 6, "Result": 1}


def test_traffic_grows_linearly_and_depth_logarithmically():
    per_peer = {}
    for n in (30, 100, 300, 1000):
        counts = expected_counts(n, 3, 2)
        per_peer[n] = sum(counts.values()) / n
        depth = len(level_sizes(n, 3, 2))
        assert depth <= math.ceil(math.log(n / 3) / math.log(1.5)) + 2
    # Shares + results <= (k + 1) * sum_L n_L <= (k + 1)**2 * N, whatever N.
    assert all(v <= (2 + 1) ** 2 for v in per_peer.values())
    assert per_peer[1000] / per_peer[100] < 1.1


def test_1000_peers_measured_counts_and_time():
    start = time.perf_counter()
    setup, net, counts = run_round(1000, 3, 2, seed=7, size=4)
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    assert total == sum(expected_counts(1000, 3, 2).values())
    assert total / 1000 < 6
    # Everyone received their result exactly once; no peer sent to itself.
    receivers = [to for kind, _, to in net.log if kind == "Result"]
    assert len(receivers) == len(set(receivers))
    assert all(sender != to for _, sender, to in net.log)
    assert_results(setup)
    assert elapsed < 30


@pytest.mark.parametrize(("n", "g", "k"), [(7, 3, 2), (30, 3, 2), (12, 4, 3)])
def test_through_the_scheduler(n, g, k):
    """Signup -> Assignment -> PeerRounds -> Done, every header through the codec."""
    clock_now = [0.0]
    ids = iter(range(1, 10))
    state = SchedulerState(
        n, g, k, clock=lambda: clock_now[0], rng=random.Random(n),
        new_round_id=lambda: f"r{next(ids)}",
    )  # fmt: skip
    sds = random_state_dicts(n, size=6, seed=n)
    weights = [float(1 + i % 4) for i in range(n)]
    run = run_with_scheduler(state, sds, weights, order=random.Random(n))
    assert len(run.acks) == n
    assert len(run.assignments) == n
    assert {a.round_id for a in run.assignments.values()} == {"r1"}
    assert run.scheduler_out == []
    assert state.completed_rounds == 1
    assert state.rounds == {}
    assert state.queued("s") == 0
    raw = [bytes(p.result) for p in run.peers.values()]
    assert len(set(raw)) == 1
    out = decode_result(run.peers["peer-0"].result, run.schema)
    ref = weighted_mean(sds, weights, "w")
    peak = max(float(sd["w"].abs().max()) for sd in sds)
    bound = fixed_point_bound(n, 32, peak) + cast_bound(ref, torch.float32)
    assert bool(((out["w"].double() - ref).abs() <= bound).all())
    assert dict(run.net.delivered) == expected_counts(n, g, k)


def test_scheduler_round_with_more_peers_than_target():
    """Extra sign-ups wait; a second round forms from them and runs too."""
    state = SchedulerState(6, 3, 2, clock=lambda: 0.0, rng=random.Random(1))
    sds = random_state_dicts(12, size=4, seed=3)
    run = run_with_scheduler(state, sds, [1.0] * 12)
    round_ids = {a.round_id for a in run.assignments.values()}
    assert len(round_ids) == 2
    assert state.completed_rounds == 2
    by_round: dict[str, set[bytes]] = {}
    for pid, p in run.peers.items():
        by_round.setdefault(run.assignments[pid].round_id, set()).add(bytes(p.result))
    assert all(len(v) == 1 for v in by_round.values())
    first, second = (next(iter(v)) for v in by_round.values())
    assert first != second  # different members, different averages
