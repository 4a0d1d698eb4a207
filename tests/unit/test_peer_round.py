"""The peer's sans-IO round: every misuse refused with state unchanged; any order, same result."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg.errors import InvalidTotalError, LocalProtocolError, RemoteProtocolError
from lightning_secagg.messages import Abort, Done, Partial, Result, Share, SignupAck
from lightning_secagg.protocol.peer_round import PeerRound, Send, designated_actor
from lightning_secagg.tree import AggregationTree, Group
from tests.unit.memnet import (
    MemNet,
    make_round,
    result_bytes,
    results,
    seeded_bytes,
    weighted_mean,
)

pytestmark = pytest.mark.timeout(60)

SEED = bytes(range(32))


def snapshot(p: PeerRound) -> tuple:
    """Everything a refused message must leave untouched."""
    accs = {
        key: (
            sorted(acc.received),
            None if acc.total is None else acc.total.tobytes(),
        )
        for key, acc in p._accs.items()
    }
    result = None if p.result is None else bytes(p.result)
    seeds = ({k: dict(v) for k, v in p._seeds.received.items()}, dict(p._seeds.drawn))
    return (accs, seeds, result, p.started, p.waiting_for())


def refuse(p: PeerRound, message, match: str) -> None:
    before = snapshot(p)
    with pytest.raises(RemoteProtocolError, match=match):
        p.receive(message)
    assert snapshot(p) == before


def hand_tree() -> AggregationTree:
    """Six peers: two level-0 groups, a root of four. ``a`` acts at both levels."""
    g00 = Group(0, 0, ("a", "b", "c"), ("a", "b"))
    g01 = Group(0, 1, ("d", "e", "f"), ("d", "e"))
    root = Group(1, 0, ("a", "b", "d", "e"), ("a", "d"))
    return AggregationTree(((g00, g01), (root,)), group_size=3, num_actors=2)


def vec(value: int, size: int = 4) -> np.ndarray:
    return np.full(size, value, dtype=np.uint64)


def identity_round(me: str, tree: AggregationTree | None = None, value: int = 1) -> PeerRound:
    """A round whose finalize is the identity on bytes, so sums can be read off directly."""
    return PeerRound(
        me,
        "r1",
        tree or hand_tree(),
        vec(value),
        lambda total: total.view(np.uint8).copy(),
        32,
        seeded_bytes(ord(me[0])),
    )


def run_hand(order: str | random.Random = "fifo") -> dict[str, PeerRound]:
    tree = hand_tree()
    peers = {p: identity_round(p, tree, value=i + 1) for i, p in enumerate("abcdef")}
    net = MemNet(peers, order)
    net.start()
    net.run()
    return peers


# -- the happy path on a hand-written tree --------------------------------------------


def test_hand_tree_sums_exactly():
    peers = run_hand()
    want = vec(sum(range(1, 7))).view(np.uint8)
    for p in peers.values():
        assert p.done
        assert np.array_equal(p.result, want)
        assert p.waiting_for() == "nothing"


def test_roles():
    peers = {p: identity_round(p) for p in "abcdef"}
    assert peers["a"].roles == ("participant@0", "participant@1", "actor@0/g0", "actor@1/g0",
                                "root-actor")  # fmt: skip
    assert peers["b"].roles == ("participant@0", "participant@1", "actor@0/g0")
    assert peers["c"].roles == ("participant@0",)
    assert peers["e"].roles == ("participant@0", "participant@1", "actor@0/g1")
    assert peers["a"].is_root_actor and peers["d"].is_root_actor
    assert not peers["b"].is_root_actor
    assert peers["c"].result_from == "a"  # the only non-actor of g0 -> actor index 0
    assert peers["f"].result_from == "d"
    assert peers["b"].result_from == "a"  # b's top level is the root; a is its 1st root actor
    assert peers["e"].result_from == "d"
    assert peers["a"].result_from is None


def test_designated_actor_spreads_the_work():
    g = Group(0, 0, ("a", "b", "c", "d", "e", "f", "g"), ("b", "e"))
    assert [designated_actor(g, p) for p in g.participants] == [
        "b", None, "e", "b", None, "e", "b",
    ]  # fmt: skip


def test_start_sends_shares_to_the_other_actors_only():
    peers = {p: identity_round(p) for p in "abcdef"}
    out_c = peers["c"].start()
    assert sorted(s.to for s in out_c) == ["a", "b"]
    shares = [s.message for s in out_c]
    assert all(isinstance(m, Share) and (m.level, m.group, m.sender) == (0, 0, "c") for m in shares)
    # One dense share, one 32-byte seed; in a round of one segment the dense share
    # goes to actor (rank among the non-actors) mod num_actors: c is the first.
    assert sorted(m.seed is None for m in shares) == [False, True]
    dense = next(s for s in out_c if s.message.seed is None)
    assert dense.to == "a" and dense.message.payload.size == 4
    # Below the root group an actor does not split: its vector goes whole into its
    # own sum, and the other actor expects nothing from it.
    assert peers["a"].start() == []
    assert peers["a"].waiting_for().startswith("shares for level 0 group 0 from c;")
    assert peers["b"].start() == []
    assert peers["b"].waiting_for().startswith("shares for level 0 group 0 from c;")


def test_root_actors_of_two_keep_their_vector_whole():
    a, sends = a_given_cs_share()
    # a's level-0 sum is complete and goes whole into its root sum: with two root
    # actors a split would hide nothing from d, which would get the seed and the
    # partial sum. a waits for the root group's non-actors only.
    assert sends == []
    assert a.waiting_for().startswith("shares for level 1 group 0 from b, e;")


def test_root_actors_of_three_split():
    root = Group(0, 0, ("a", "b", "c", "d"), ("a", "b", "c"))
    tree = AggregationTree(((root,),), group_size=4, num_actors=3)
    a = identity_round("a", tree)
    # a keeps its dense share and sends the two other root actors a seed each:
    # b alone cannot take c's mask out of a's partial sum.
    sends = a.start()
    assert sorted(s.to for s in sends) == ["b", "c"]
    assert all(s.message.seed is not None and s.message.level == 0 for s in sends)
    assert a.waiting_for().startswith("shares for level 0 group 0 from b, c, d;")


def test_start_twice_raises_local_protocol_error():
    p = identity_round("c")
    p.start()
    with pytest.raises(LocalProtocolError, match="already started"):
        p.start()


def test_constructor_refuses_bad_input():
    with pytest.raises(LocalProtocolError, match="not a member"):
        identity_round("zed")
    with pytest.raises(LocalProtocolError, match="uint64"):
        PeerRound("a", "r1", hand_tree(), np.zeros(4, dtype=np.int64), bytes, 32, seeded_bytes(0))
    with pytest.raises(LocalProtocolError, match="1-d"):
        PeerRound("a", "r1", hand_tree(), np.zeros((2, 2), np.uint64), bytes, 32, seeded_bytes(0))


# -- every misuse -------------------------------------------------------------------


def a_given_cs_share() -> tuple[PeerRound, list[Send]]:
    """``a`` started and given ``c``'s share; what ``a`` sent in consequence."""
    peers = {p: identity_round(p) for p in "abc"}
    a = peers["a"]
    assert a.start() == []
    sent: list[Send] = []
    for s in peers["c"].start():
        if s.to == "a":
            sent += a.receive(s.message)
    return a, sent


@pytest.fixture
def actor_a() -> PeerRound:
    """``a`` started and holding ``c``'s share: its level-0 sum is complete (``b``,
    the other actor, sends it nothing), so it now waits at the root."""
    a, _ = a_given_cs_share()
    assert not a.waiting_for().startswith("shares for level 0")
    return a


def test_wrong_round_refused(actor_a):
    refuse(actor_a, Share("r2", 0, 0, "b", SEED), "round 'r2'")
    refuse(actor_a, Partial("old", "d", vec(1)), "round 'old'")
    refuse(actor_a, Result("r0", "a", np.zeros(32, np.uint8)), "round 'r0'")


def test_share_for_a_group_i_do_not_act_in(actor_a):
    refuse(actor_a, Share("r1", 0, 1, "d", SEED), "level 0 group 1, where a is not an actor")
    refuse(actor_a, Share("r1", 2, 0, "b", SEED), "level 2 group 0")
    c = identity_round("c")
    refuse(c, Share("r1", 0, 0, "a", SEED), "where c is not an actor")


def test_share_from_an_unexpected_sender(actor_a):
    refuse(actor_a, Share("r1", 0, 0, "d", SEED), "d is not expected to send shares")
    refuse(actor_a, Share("r1", 0, 0, "mallory", SEED), "mallory is not expected")
    # b, the group's other actor, keeps its vector whole below the root group.
    refuse(actor_a, Share("r1", 0, 0, "b", SEED), "b is not expected to send shares")
    refuse(actor_a, Share("r1", 0, 0, "b", None, vec(1)), "b is not expected to send shares")


def test_duplicate_share(actor_a):
    # c's only dense share (segment 0 of a round of one) is ours, and in.
    refuse(actor_a, Share("r1", 0, 0, "c", None, vec(1)), "duplicate shares .* from c")
    refuse(actor_a, Share("r1", 0, 0, "c", SEED), "whose only dense share is ours")
    # Nobody else may send my own share.
    refuse(actor_a, Share("r1", 0, 0, "a", None, vec(1)), "claims to come from myself")
    refuse(actor_a, Share("r1", 0, 0, "a", SEED), "claims to come from myself")
    # d, the other root actor, keeps its vector whole: it sends no shares at all.
    refuse(actor_a, Share("r1", 1, 0, "d", SEED), "d is not expected to send shares")
    # e's only dense share at the root (a round of one segment) goes to d.
    refuse(actor_a, Share("r1", 1, 0, "e", None, vec(1)), "from e belongs to d")


def test_duplicate_seed():
    a = identity_round("a")
    a.receive(Share("r1", 1, 0, "e", SEED))  # booked: a's sum has not started
    assert a._seeds.received[(1, 0)] == {"e": SEED}
    assert "shares for level 1 group 0 from a, b;" in a.waiting_for()
    refuse(a, Share("r1", 1, 0, "e", bytes(32)), "duplicate seed .* from e")


def dense_slot() -> PeerRound:
    """``a`` started: c's dense share (ours) still to come."""
    a = identity_round("a")
    a.start()
    return a


def test_wrong_payload_size():
    a = dense_slot()
    refuse(a, Share("r1", 0, 0, "c", None, vec(1, 3)), "has 3 elements, expected 4")
    refuse(a, Share("r1", 0, 0, "c", None, vec(1, 5)), "has 5 elements, expected 4")


def test_empty_share():
    refuse(dense_slot(), Share("r1", 0, 0, "c", None, None), "is empty")


def test_partial_to_a_non_root_actor():
    b = identity_round("b")
    refuse(b, Partial("r1", "a", vec(1)), "partial sum sent to b, not a root actor")
    c = identity_round("c")
    refuse(c, Partial("r1", "a", vec(1)), "not a root actor")


def test_partial_claiming_to_be_from_myself():
    a = identity_round("a")
    refuse(a, Partial("r1", "a", vec(1)), "claims to come from myself")


def test_partial_from_a_non_root_actor_and_duplicates():
    a = identity_round("a")
    refuse(a, Partial("r1", "b", vec(1)), "b is not expected to send root partial sums")
    a.receive(Partial("r1", "d", vec(1)))
    refuse(a, Partial("r1", "d", vec(1)), "duplicate root partial sums from d")
    refuse(identity_round("d"), Partial("r1", "a", vec(1, 2)), "has 2 elements")


def test_result_from_a_non_designated_actor():
    c = identity_round("c")
    c.start()
    refuse(c, Result("r1", "b", np.zeros(32, np.uint8)), "result from b, expected it from a")
    refuse(c, Result("r1", "d", np.zeros(32, np.uint8)), "expected it from a")
    refuse(c, Result("r1", "c", np.zeros(32, np.uint8)), "result from c")


def test_result_to_a_root_actor_refused():
    a = identity_round("a")
    refuse(a, Result("r1", "d", np.zeros(32, np.uint8)), "expected it from None")


def test_result_wrong_size_and_duplicate():
    c = identity_round("c")
    c.start()
    refuse(c, Result("r1", "a", np.zeros(31, np.uint8)), "wrong size")
    refuse(c, Result("r1", "a", np.zeros(33, np.uint8)), "wrong size")
    refuse(c, Result("r1", "a", None), "wrong size")
    good = np.arange(32, dtype=np.uint8)
    assert c.receive(Result("r1", "a", good)) == []  # a leaf forwards nothing
    assert c.done
    assert np.array_equal(c.result, good)
    refuse(c, Result("r1", "a", np.zeros(32, np.uint8)), "duplicate result")
    assert np.array_equal(c.result, good)


@pytest.mark.parametrize(
    "message",
    [
        SignupAck("s", "c", 1),
        Done("r1", "c", 1.0, 1, 1),
        Abort("r1", "scheduler", "x"),
    ],
)
def test_scheduler_messages_between_peers_refused(message):
    c = identity_round("c")
    refuse(c, message, "unexpected|round")


def test_abort_of_this_round_is_not_a_peer_message():
    c = identity_round("c")
    refuse(c, Abort("r1", "a", "give up"), "unexpected Abort between peers")


def test_waiting_for_names_the_missing_peers():
    peers = {p: identity_round(p) for p in "abcdef"}
    assert peers["c"].waiting_for() == "the result from actor a (level 0)"
    peers["c"].start()
    assert peers["c"].waiting_for() == "the result from actor a (level 0)"
    a = peers["a"]
    assert a.waiting_for() == (
        "shares for level 0 group 0 from a, c; shares for level 1 group 0 from a, b, e; "
        "root partial sums from a, d"
    )
    a.start()
    assert a.waiting_for().startswith("shares for level 0 group 0 from c;")
    b = peers["b"]
    assert b.waiting_for().endswith("the result from actor a (level 1)")


def test_out_of_order_share_for_a_later_level_is_accepted():
    # ``a`` gets e's level-1 seed before anything at level 0 happened.
    peers = {p: identity_round(p) for p in "abcdef"}
    a = peers["a"]
    a.receive(Share("r1", 1, 0, "e", SEED))
    assert "shares for level 1 group 0 from a, b;" in a.waiting_for()


# -- random orders -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), order_seed=st.integers(0, 2**32))
def test_hand_tree_any_interleaving(seed, order_seed):
    peers = run_hand(random.Random(order_seed))
    want = vec(21).view(np.uint8)
    assert all(np.array_equal(p.result, want) for p in peers.values())


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([3, 4, 6, 7, 12, 13]),
    gk=st.sampled_from([(3, 2), (4, 2), (4, 3)]),
    seed=st.integers(0, 1000),
    order_seed=st.integers(0, 2**32),
    start_order=st.permutations(range(13)),
)
def test_random_interleavings_give_bitwise_identical_results(n, gk, seed, order_seed, start_order):
    g, k = gk
    if n < max(3, k + 1):
        n = k + 1
    # PeerRound consumes its vector, so the same round is built twice (all seeded).
    reference = make_round(n, g, k, seed=seed, size=6)
    net = MemNet(reference.peers, "fifo")
    net.start()
    net.run()
    want = result_bytes(reference)

    shuffled = make_round(n, g, k, seed=seed, size=6)
    net = MemNet(shuffled.peers, random.Random(order_seed), wire=True)
    # Peers start at random moments, interleaved with deliveries.
    to_start = [shuffled.ids[i] for i in start_order if i < n]
    rng = random.Random(order_seed ^ 1)
    while to_start or net.pending:
        if to_start and (not net.pending or rng.random() < 0.3):
            net.start([to_start.pop()])
        else:
            net.step()
    got = result_bytes(shuffled)
    assert len(set(got)) == 1, "all peers hold the same bytes"
    assert got == want, "delivery order does not change a single bit"
    out = results(shuffled)[0]
    ref = weighted_mean(shuffled.state_dicts, shuffled.weights, "w")
    assert float((out["w"].double() - ref).abs().max()) < 1e-6


@settings(max_examples=20, deadline=None)
@given(
    n=st.sampled_from([3, 6, 7, 12]),
    seed=st.integers(0, 1000),
    order_seed=st.integers(0, 2**32),
)
def test_a_copying_transport_lets_rounds_adopt_buffers_with_the_same_bits(n, seed, order_seed):
    """What the sealed transport enables: a root actor sums into its own sent partial,
    and received payloads become accumulators or results without a copy."""
    reference = make_round(n, seed=seed, size=6)
    net = MemNet(reference.peers, "fifo")
    net.start()
    net.run()
    adopting = make_round(n, seed=seed, size=6, sends_are_copied=True)
    net = MemNet(adopting.peers, random.Random(order_seed), copying=True)
    net.start()
    net.run()
    assert result_bytes(adopting) == result_bytes(reference)


def test_sends_are_copied_really_reuses_the_sent_partial():
    """Without a copying transport the flag is wrong: a root actor sums the other's
    partial into the very buffer it sent, before that buffer is delivered. (So the
    flag is what makes the adoption happen, and the peer sets it only when sealing.)"""
    setup = make_round(6, seed=3, size=6, sends_are_copied=True)
    first, second = setup.tree.root.actors
    net = MemNet(setup.peers, "fifo")  # zero-copy: a queued payload is the live buffer
    net.start()
    # Deliver everything but the partial sum bound for ``second``, which waits.
    while True:
        ready = [
            i
            for i, s in enumerate(net.pending)
            if not (isinstance(s.message, Partial) and s.to == second)
        ]
        if not ready:
            break
        net.pending.insert(0, net.pending.pop(ready[0]))
        net.step()
    (late,) = net.pending
    assert late.message.sender == first
    assert setup.peers[first].done  # it summed into the buffer it had sent ...
    # ... so the other root actor gets the full total instead of a partial sum, and
    # counts ``first``'s share twice: its count slot (and result) come out wrong.
    try:
        net.run()
    except InvalidTotalError:
        return
    assert setup.peers[second].result.tobytes() != setup.peers[first].result.tobytes()


def test_fifo_and_lifo_agree_bitwise():
    a = make_round(30, seed=4)
    b = make_round(30, seed=4)  # the same round: same inputs, tree and randomness
    net_a = MemNet(a.peers, "fifo")
    net_a.start()
    net_a.run()
    net_b = MemNet(b.peers, "lifo")
    net_b.start()
    net_b.run()
    assert result_bytes(a) == result_bytes(b)
    assert len(set(result_bytes(a))) == 1
    assert net_a.delivered == net_b.delivered


def test_results_never_arrive_twice_and_only_from_the_designated_actor():
    setup = make_round(30, seed=2)
    net = MemNet(setup.peers)
    net.start()
    net.run()
    receivers = [to for kind, _, to in net.log if kind == "Result"]
    assert len(receivers) == len(set(receivers))
    for kind, sender, to in net.log:
        if kind == "Result":
            assert setup.peers[to].result_from == sender


def test_send_is_plain_data():
    s = Send("a", Share("r1", 0, 0, "b", SEED))
    assert s.to == "a"
    assert s == Send("a", Share("r1", 0, 0, "b", SEED))
