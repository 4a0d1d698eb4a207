"""The planner's byte figures against what real peers report after a real round.

An in-process scheduler and peers in threads, over CURVE on loopback. The tree
the scheduler builds (with its CSPRNG) is recorded by wrapping ``build_tree``;
the planner is then asked about *that* tree, with the members' real ids,
endpoints and keys, and every peer's ``RoundStats`` must equal its prediction.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lightning_secagg import Peer, Scheduler
from lightning_secagg.encoding import Schema
from lightning_secagg.planner import Member, counter_random_bytes, predict
from lightning_secagg.protocol import scheduler_state
from lightning_secagg.sharing import system_random_bytes
from lightning_secagg.tree import AggregationTree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def model(i: int) -> dict[str, torch.Tensor]:
    # Several dtypes and an odd-sized tensor, so the result's 8-byte alignment counts.
    return {
        "w": torch.full((257,), float(i)),
        "h": torch.full((3,), float(i), dtype=torch.float16),
        "b": torch.tensor([float(i), -float(i)], dtype=torch.float64),
        "n": torch.tensor(i, dtype=torch.int64),
    }


def run_round(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    group_size: int,
    num_actors: int,
    deterministic: bool,
) -> tuple[Scheduler, AggregationTree, list[str], dict[str, Peer]]:
    built: list[tuple[AggregationTree, list[str]]] = []
    real_build_tree = scheduler_state.build_tree

    def recording_build_tree(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        tree = real_build_tree(ids, *args, **kwargs)
        built.append((tree, list(ids)))  # ids in queue order = the assignment's member order
        return tree

    monkeypatch.setattr(scheduler_state, "build_tree", recording_build_tree)
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
    tree, order = built[0]
    return sched, tree, order, peers


def plan_for(
    sched: Scheduler, tree: AggregationTree, order: list[str], peers: dict[str, Peer], **kw
):  # type: ignore[no-untyped-def]
    stats = {pid: p.last_stats for pid, p in peers.items()}
    round_ids = {s.round_id for s in stats.values() if s is not None}
    assert len(round_ids) == 1
    members = [Member(pid, peers[pid].endpoint, peers[pid].public_key) for pid in order]
    return predict(
        tree,
        Schema.of(model(0)),
        members=members,
        round_id=round_ids.pop(),
        # derived per round by default (None here); any float packs to 9 bytes
        deadline_s=sched.state.round_timeout or 60.0,
        **kw,
    ), stats


@pytest.mark.parametrize(
    ("n", "group_size", "num_actors"),
    [(7, 3, 2), (9, 4, 3), (30, 3, 2)],
)
def test_reported_bytes_equal_the_planners_exactly(monkeypatch, n, group_size, num_actors):
    sched, tree, order, peers = run_round(monkeypatch, n, group_size, num_actors, True)
    plan, stats = plan_for(
        sched,
        tree,
        order,
        peers,
        random_bytes_for=lambda pid: counter_random_bytes(f"test:{pid}"),
    )
    for pid, s in stats.items():
        predicted = plan.peer(pid)
        assert s.roles == predicted.roles, pid
        assert (s.bytes_sent, s.bytes_received) == (
            predicted.bytes_sent,
            predicted.bytes_received,
        ), pid


def test_with_production_randomness_sent_is_exact_and_received_in_range(monkeypatch):
    sched, tree, order, peers = run_round(monkeypatch, 7, 3, 2, False)
    plan, stats = plan_for(sched, tree, order, peers)
    for pid, s in stats.items():
        predicted = plan.peer(pid)
        assert s.bytes_sent == predicted.bytes_sent, pid
        lo = predicted.p2p_received_min + predicted.scheduler_received
        hi = predicted.p2p_received_max + predicted.scheduler_received
        assert lo <= s.bytes_received <= hi, pid
    # Whoever draws the dense shares, the round as a whole moves the same bytes.
    assert sum(s.bytes_received for s in stats.values()) == sum(
        p.bytes_received for p in plan.peers
    )
