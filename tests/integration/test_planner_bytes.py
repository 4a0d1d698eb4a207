"""The planner's byte figures against what real peers report after a real round.

An in-process scheduler and peers in threads, over CURVE on loopback. The tree
the scheduler builds (with its CSPRNG) is recorded by wrapping ``build_tree``,
and its ring choice by wrapping its ``choose_ring``; the planner is then
asked about *that* tree, with the members' real ids, endpoints, keys, ring
settings and magnitude exponents, and every peer's ``RoundStats`` must equal
its prediction. Both rings are run: the compact one (a model without float64
tensors, every peer ``ring="auto"``) and the 64-bit one (a float64 tensor, or
peers with ``ring="64"``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from lightning_secagg import Peer, Scheduler
from lightning_secagg.encoding import magnitude_exponents
from lightning_secagg.planner import Member, Plan, counter_random_bytes, predict
from lightning_secagg.protocol import scheduler_state
from lightning_secagg.ring import RingChoice
from lightning_secagg.schema import SEGMENT_ELEMENTS, Schema, segment_elements_for
from lightning_secagg.sharing import system_random_bytes
from lightning_secagg.tree import AggregationTree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def mixed_model(i: int) -> dict[str, torch.Tensor]:
    # Several dtypes and an odd-sized tensor, so the result's 8-byte alignment counts;
    # the float64 tensor keeps the round in the 64-bit ring.
    return {
        "w": torch.full((257,), float(i)),
        "h": torch.full((3,), float(i), dtype=torch.float16),
        "b": torch.tensor([float(i), -float(i)], dtype=torch.float64),
        "n": torch.tensor(i, dtype=torch.int64),
    }


def compact_model(i: int) -> dict[str, torch.Tensor]:
    # No float64: the compact ring is allowed. Magnitudes differ per peer (peer 0
    # is all zeros and declares -64, a two-byte msgpack int), so the sign-ups differ
    # in size and the assignment relays the per-tensor maximum.
    return {
        "w": torch.linspace(-1.0, 1.0, 257) * 0.01 * i,
        "h": torch.full((3,), 0.5 * i, dtype=torch.float16),
        "z": torch.full((5,), -3.0 * i, dtype=torch.bfloat16),
        "n": torch.tensor(i, dtype=torch.int64),
        "m": torch.tensor([i % 2 == 0, True, False]),
    }


def segmented_model(i: int) -> dict[str, torch.Tensor]:
    # Three segments (the last one short), the second straddling two tensors:
    # every peer's seeds stand for all three, dense shares go per segment.
    return {
        "w": torch.linspace(-1.0, 1.0, SEGMENT_ELEMENTS + 100) * 0.01 * i,
        "v": torch.full((SEGMENT_ELEMENTS + 50,), 0.25 * i),
    }


def long_model(i: int) -> dict[str, torch.Tensor]:
    # More than MAX_SEGMENTS segments of the shortest length: the round cuts it
    # into longer ones, as the planner must too.
    return {"w": torch.linspace(-1.0, 1.0, 16 * SEGMENT_ELEMENTS + 100) * 0.01 * i}


MODELS = {
    "mixed": mixed_model,
    "compact": compact_model,
    "segmented": segmented_model,
    "long": long_model,
}


def all_auto(_i: int) -> str:
    return "auto"


def all_64(_i: int) -> str:
    return "64"


def third_is_64(i: int) -> str:
    return "64" if i == 3 else "auto"


RINGS: dict[str, Callable[[int], str]] = {
    "auto": all_auto,
    "64": all_64,
    "one-64": third_is_64,
}


def run_round(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    group_size: int,
    num_actors: int,
    deterministic: bool,
    model: Callable[[int], dict[str, torch.Tensor]],
    ring_of: Callable[[int], str],
) -> tuple[Scheduler, AggregationTree, list[str], dict[str, Peer], list[RingChoice]]:
    built: list[tuple[AggregationTree, list[str]]] = []
    verdicts: list[RingChoice] = []
    real_build_tree = scheduler_state.build_tree
    real_choose_ring = scheduler_state.choose_ring

    def recording_build_tree(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        tree = real_build_tree(ids, *args, **kwargs)
        built.append((tree, list(ids)))  # ids in queue order = the assignment's member order
        return tree

    def recording_choose_ring(schema, declared):  # type: ignore[no-untyped-def]
        choice = real_choose_ring(schema, declared)
        verdicts.append(choice)
        return choice

    monkeypatch.setattr(scheduler_state, "build_tree", recording_build_tree)
    # The scheduler's name for the one rule (lightning_secagg.ring.choose_ring):
    # only its choice is recorded, not the planner's.
    monkeypatch.setattr(scheduler_state, "choose_ring", recording_choose_ring)
    peers: dict[str, Peer] = {}
    errors: list[BaseException] = []
    with Scheduler(port=0, target_size=n, group_size=group_size, num_actors=num_actors) as sched:

        def work(i: int) -> None:
            pid = f"p{i}"
            rb = counter_random_bytes(f"test:{pid}") if deterministic else system_random_bytes
            try:
                with Peer(
                    "tcp://127.0.0.1:0",
                    sched.address,
                    peer_id=pid,
                    scheduler_key=sched.public_key,
                    random_bytes=rb,
                    ring=ring_of(i),
                ) as peer:
                    peers[pid] = peer
                    peer.aggregate(model(i), timeout=30)
            except BaseException as exc:  # collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a peer thread hung"
    assert not errors, errors
    assert len(built) == 1
    assert len(verdicts) == 1
    tree, order = built[0]
    return sched, tree, order, peers, verdicts


def plan_for(
    sched: Scheduler,
    tree: AggregationTree,
    order: list[str],
    peers: dict[str, Peer],
    model: Callable[[int], dict[str, torch.Tensor]],
    ring_of: Callable[[int], str],
    **kw,
) -> tuple[Plan, dict]:  # type: ignore[no-untyped-def]
    stats = {pid: p.last_stats for pid, p in peers.items()}
    round_ids = {s.round_id for s in stats.values() if s is not None}
    assert len(round_ids) == 1
    members = []
    for pid in order:
        i = int(pid[1:])
        members.append(
            Member(
                pid,
                peers[pid].endpoint,
                peers[pid].public_key,
                ring=ring_of(i),
                exponents=tuple(magnitude_exponents(model(i))),
            )
        )
    plan = predict(
        tree,
        Schema.of(model(0)),
        members=members,
        round_id=round_ids.pop(),
        # derived per round by default (None here); any float packs to 9 bytes
        deadline_s=sched.state.round_timeout or 60.0,
        **kw,
    )
    return plan, stats


def assert_same_ring(plan: Plan, verdicts: list[RingChoice], ring_bits: int) -> None:
    """The planner picked the ring the scheduler picked, with the same relayed exponents."""
    (choice,) = verdicts
    assert plan.ring_bits == choice.ring_bits == ring_bits
    assert plan.ring.reason == choice.reason
    assert (choice.reason is None) == (ring_bits == 32)
    assert plan.ring.exponents == choice.exponents
    if ring_bits == 32:
        assert choice.exponents is not None
    else:
        assert choice.exponents is None
    # The elements and a count slot per segment.
    elements = plan.schema.vector_size - 1 + plan.num_segments
    assert plan.dense_bytes == ring_bits // 8 * elements


@pytest.mark.parametrize(
    ("n", "group_size", "num_actors", "model", "rings", "ring_bits"),
    [
        (7, 3, 2, "mixed", "auto", 64),  # float64 tensor: 64-bit ring, exponents still declared
        (9, 4, 3, "compact", "auto", 32),
        (30, 3, 2, "compact", "auto", 32),
        (7, 3, 2, "compact", "64", 64),  # nobody declares: 64-bit ring, nil in every sign-up
        (7, 3, 2, "compact", "one-64", 64),  # one peer with ring="64" keeps the round at 64
        (30, 3, 2, "mixed", "auto", 64),
        # Three segments: seeds once for all, dense shares visiting the actors in turn.
        (7, 3, 2, "segmented", "auto", 32),
        # 17 segments of 2**18 - 1 would be too many: 9 of 2**19 - 1.
        (6, 3, 2, "long", "auto", 32),
    ],
)
def test_reported_bytes_equal_the_planners_exactly(
    monkeypatch, n, group_size, num_actors, model, rings, ring_bits
):
    model_fn, ring_of = MODELS[model], RINGS[rings]
    sched, tree, order, peers, verdicts = run_round(
        monkeypatch, n, group_size, num_actors, True, model_fn, ring_of
    )
    plan, stats = plan_for(sched, tree, order, peers, model_fn, ring_of)
    assert_same_ring(plan, verdicts, ring_bits)
    if model == "long":
        assert plan.segment_elements == segment_elements_for(16 * SEGMENT_ELEMENTS + 100)
        assert (plan.segment_elements, plan.num_segments) == ((1 << 19) - 1, 9)
    for pid, s in stats.items():
        predicted = plan.peer(pid)
        assert s.roles == predicted.roles, pid
        assert (s.bytes_sent, s.bytes_received) == (
            predicted.bytes_sent,
            predicted.bytes_received,
        ), pid


@pytest.mark.parametrize(
    ("model", "rings", "ring_bits"),
    [("compact", "auto", 32), ("compact", "64", 64), ("segmented", "auto", 32)],
)
def test_with_production_randomness_every_figure_is_exact(monkeypatch, model, rings, ring_bits):
    # Randomness draws the seeds only; who gets which dense share follows the tree.
    model_fn, ring_of = MODELS[model], RINGS[rings]
    sched, tree, order, peers, verdicts = run_round(monkeypatch, 7, 3, 2, False, model_fn, ring_of)
    plan, stats = plan_for(sched, tree, order, peers, model_fn, ring_of)
    assert_same_ring(plan, verdicts, ring_bits)
    for pid, s in stats.items():
        predicted = plan.peer(pid)
        assert (s.bytes_sent, s.bytes_received) == (
            predicted.bytes_sent,
            predicted.bytes_received,
        ), pid
