"""The segmented round (:class:`SegmentedRound`): the model moved through the tree in segments.

Tested here, with real encoding and in-memory delivery (:class:`MemNet`):

* exactness: every peer's result buffer is bitwise the decoding of the whole
  model's ring sum (computed without segments), whatever the number of peers,
  the window, the delivery order, the codec on the way or the copying transport,
  and it decodes to the weighted mean within the fixed-point bound;
* flow control: no peer ever has more than ``window`` of its own segments in
  flight, ``start()`` shares exactly the first ``min(window, S)``, a window of
  one still completes, and segments are encoded lazily (never more than a
  window of them encoded and unfinished);
* refusals (out-of-range or negative segments, duplicates, results of the wrong
  size for their segment, scheduler messages) raise ``RemoteProtocolError`` and
  change nothing;
* what the peer asks of it: ``pending()``, ``waiting_for()``, ``done``,
  ``result``, and result slices that tile the buffer, a root actor decoding
  straight into its slice;
* constructor validation.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg.encoding import decode_result, decode_total, encode
from lightning_secagg.errors import LocalProtocolError, RemoteProtocolError
from lightning_secagg.messages import Abort, Done, Partial, Result, Share
from lightning_secagg.protocol.peer_round import Send, dense_actor
from lightning_secagg.protocol.segmented_round import SegmentedRound
from lightning_secagg.schema import Schema, result_span, segment_bounds
from lightning_secagg.tree import AggregationTree, build_tree
from tests.unit.memnet import (
    MemNet,
    StateDict,
    cast_bound,
    fixed_point_bound,
    seeded_bytes,
    weighted_mean,
)

pytestmark = pytest.mark.timeout(60)

#: Data elements per segment in these tests: several segments, the last one short.
SEG = 7
RING = np.dtype(np.uint64)


def mixed_state_dicts(n: int, seed: int) -> list[StateDict]:
    """``n`` state dicts of float32, float16 (odd byte size: padded), int64 and a 0-d tensor.

    30 data elements in all: with ``SEG = 7``, five segments of 7, 7, 7, 7 and 2,
    the second one straddling two tensors.
    """
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(10, generator=g),
            "h": (torch.randn(3, 5, generator=g) * 4).half(),
            "steps": torch.randint(-50, 50, (4,), generator=g),
            "b": torch.randn((), generator=g, dtype=torch.float32),
        }
        for _ in range(n)
    ]


@dataclass
class Setup:
    """One in-memory segmented round and what its callbacks saw."""

    ids: list[str]
    state_dicts: list[StateDict]
    weights: list[float]
    schema: Schema
    tree: AggregationTree
    bounds: list[tuple[int, int]]
    spans: list[tuple[int, int]]
    peers: dict[str, SegmentedRound]
    #: Segments each peer encoded, in call order.
    encoded: dict[str, list[int]] = field(default_factory=dict)
    #: ``(segment, out address, returned address)`` of each finalize call, by peer.
    finalized: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return len(self.bounds)


def make_segmented(
    n: int,
    *,
    window: int,
    seed: int = 0,
    seg: int = SEG,
    copying: bool = False,
    state_dicts: list[StateDict] | None = None,
) -> Setup:
    """Every member's :class:`SegmentedRound`, wired as ``PeerSession`` wires it."""
    ids = [f"p{i:04d}" for i in range(n)]
    sds = state_dicts if state_dicts is not None else mixed_state_dicts(n, seed)
    rng = random.Random(seed)
    weights = [rng.choice([1.0, 2.0, 3.5, 10.0, 60.0]) for _ in ids]
    schema = Schema.of(sds[0])
    tree = build_tree(ids, 3, 2, random.Random(seed))
    bounds = segment_bounds(schema, seg)
    spans = [result_span(schema, a, b) for a, b in bounds]
    setup = Setup(ids, sds, weights, schema, tree, bounds, spans, {})
    total = sum(weights)

    def member(i: int, pid: str) -> SegmentedRound:
        sd, share = sds[i], weights[i] / total
        encoded = setup.encoded.setdefault(pid, [])
        finalized = setup.finalized.setdefault(pid, [])

        def enc(k: int) -> np.ndarray:
            encoded.append(k)
            return encode(sd, schema, share, segment=bounds[k])

        def fin(k: int, ring_total: np.ndarray, out: np.ndarray) -> np.ndarray:
            got = decode_total(ring_total, schema, segment=bounds[k], out=out)
            finalized.append((k, out.ctypes.data, got.ctypes.data))
            return got

        return SegmentedRound(
            pid,
            "r1",
            tree,
            [1 + b - a for a, b in bounds],
            RING,
            spans,
            enc,
            fin,
            seeded_bytes(seed * 100_003 + i),
            window=window,
            sends_are_copied=copying,
        )

    setup.peers = {pid: member(i, pid) for i, pid in enumerate(ids)}
    return setup


def reference_bytes(setup: Setup) -> bytes:
    """The whole model's result, no segments: ``decode_total`` of the ring sum of whole vectors."""
    total = sum(setup.weights)
    ring = np.zeros(setup.schema.vector_size, dtype=RING)
    for sd, w in zip(setup.state_dicts, setup.weights, strict=True):
        np.add(ring, encode(sd, setup.schema, w / total), out=ring)
    return bytes(decode_total(ring, setup.schema))


def check_flow(setup: Setup) -> None:
    """The flow-control and laziness invariants, for every peer."""
    for pid, p in setup.peers.items():
        assert p.in_flight <= p.window, (pid, p.in_flight, p.window)
        unfinished = [k for k in setup.encoded[pid] if not p.segments[k].done]
        assert len(unfinished) <= p.window, (pid, unfinished)
        # Encoded lazily, in order, once each, exactly the segments shared so far.
        assert setup.encoded[pid] == list(range(p.shared))
        assert p.done == all(s.done for s in p.segments)
        assert (p.result is None) == (not p.done)


def run_checked(net: MemNet, setup: Setup, max_steps: int = 1_000_000) -> int:
    """Deliver everything, checking the invariants after every delivery; return the steps."""
    check_flow(setup)
    steps = 0
    while net.pending:
        net.step()
        check_flow(setup)
        steps += 1
        assert steps < max_steps, "the round does not converge"
    return steps


def assert_exact(setup: Setup) -> None:
    """Every peer done with bitwise identical bytes, equal to the unsegmented reference."""
    ref = reference_bytes(setup)
    for pid, p in setup.peers.items():
        assert p.done, f"{pid} waits for {p.waiting_for()}"
        assert p.result is not None
        assert p.result is p.buffer
        assert bytes(p.result) == ref, pid
        assert p.pending() == []
        assert p.waiting_for() == "nothing"


def assert_close_to_mean(setup: Setup) -> None:
    first = setup.peers[setup.ids[0]].result
    assert first is not None
    out = decode_result(first, setup.schema)
    n, f = len(setup.ids), setup.schema.frac_bits
    sds, ws = setup.state_dicts, setup.weights
    for name, dtype in (("w", torch.float32), ("h", torch.float16), ("b", torch.float32)):
        ref = weighted_mean(sds, ws, name)
        peak = max(float(sd[name].double().abs().max()) for sd in sds)
        bound = fixed_point_bound(n, f, peak) + cast_bound(ref, dtype)
        assert out[name].dtype == dtype
        assert out[name].shape == sds[0][name].shape
        err = (out[name].double() - ref).abs()
        assert bool((err <= bound).all()), (name, float(err.max()))
    steps_ref = weighted_mean(sds, ws, "steps")
    assert out["steps"].dtype == torch.int64
    assert bool(((out["steps"].double() - steps_ref).abs() <= 0.5 + 1e-6).all())


# -- 1. end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("n", [3, 6, 12])
def test_segmented_round_is_exact_and_identical_everywhere(n, window):
    setup = make_segmented(n, window=window, seed=n * 10 + window)
    assert setup.num_segments == 5
    assert [b - a for a, b in setup.bounds] == [7, 7, 7, 7, 2]
    net = MemNet(setup.peers, "fifo")
    net.start()
    run_checked(net, setup)
    assert_exact(setup)
    assert_close_to_mean(setup)
    # Every segment is its own round: k * (k - 1) = 2 root partial sums per segment.
    assert net.delivered["Partial"] == 2 * setup.num_segments
    # Only root actors decode, once per segment each, into their own slice.
    for pid, calls in setup.finalized.items():
        if setup.peers[pid].segments[0].is_root_actor:
            assert sorted(k for k, _, _ in calls) == list(range(setup.num_segments))
        else:
            assert calls == []


@pytest.mark.parametrize("n", [3, 7, 12, 30])
def test_members_talk_to_their_tree_neighbours_only(n):
    # The peer derives sealed links with tree.neighbours() only: every message
    # of a round must travel between neighbours, and every neighbour relation
    # must carry one (no link is derived for nothing).
    setup = make_segmented(n, window=2, seed=n)
    net = MemNet(setup.peers, random.Random(n))
    net.start()
    run_checked(net, setup)
    assert_exact(setup)
    talked: dict[str, set[str]] = {pid: set() for pid in setup.ids}
    for _, sender, to in net.log:
        talked[sender].add(to)
        talked[to].add(sender)
    for pid in setup.ids:
        assert talked[pid] == setup.tree.neighbours(pid), pid


def test_one_segment_round_matches_too():
    # A segment larger than the model: one segment, the count slot only once.
    setup = make_segmented(6, window=2, seg=1000, seed=3)
    assert setup.num_segments == 1
    net = MemNet(setup.peers, "lifo")
    net.start()
    run_checked(net, setup)
    assert_exact(setup)


# -- 2. any order, through the codec or the copying transport ---------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([3, 6, 12]),
    window=st.integers(1, 3),
    seg=st.integers(3, 12),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(["plain", "wire", "copying", "wire+copying"]),
)
def test_any_delivery_order_gives_the_same_exact_result(n, window, seg, seed, mode):
    copying = "copying" in mode
    setup = make_segmented(n, window=window, seg=seg, seed=seed % 1000, copying=copying)
    net = MemNet(setup.peers, random.Random(seed), wire="wire" in mode, copying=copying)
    net.start()
    run_checked(net, setup)
    assert_exact(setup)


# -- 3. flow control ---------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
def test_start_shares_exactly_the_first_window(window):
    setup = make_segmented(6, window=window, seed=window)
    s = setup.num_segments
    first = min(window, s)
    for pid, p in setup.peers.items():
        group = setup.tree.group_of(pid, 0)
        assert group is not None
        assert p.shared == 0 and p.pending() == [] and setup.encoded[pid] == []
        sends = p.start()
        assert p.shared == first and p.in_flight == first
        assert setup.encoded[pid] == list(range(first))
        shares = [x.message for x in sends]
        assert all(isinstance(m, Share) and m.level == 0 and m.sender == pid for m in shares)
        # A non-actor sends a seed to every actor of its group, once for all
        # segments (naming segment 0), and a dense share per segment to the
        # actors in turn. A level-0 actor (below the root group) keeps its vector
        # whole and sends nothing.
        seeds = [(x.to, m.segment) for x, m in zip(sends, shares, strict=True) if m.seed]
        dense = [(x.to, m.segment) for x, m in zip(sends, shares, strict=True) if not m.seed]
        assert all(m.seed is None or m.payload is None for m in shares)
        assert setup.tree.depth > 1 and setup.tree.splits_in(group, pid) == (
            pid not in group.actors
        )
        if pid in group.actors:
            assert seeds == []
        else:
            assert sorted(seeds) == sorted((a, 0) for a in group.actors)
        if pid in group.actors:
            assert dense == []
        else:
            assert sorted(dense) == sorted((dense_actor(group, pid, k), k) for k in range(first))
            if first > 1:
                assert len({to for to, _ in dense}) == 2  # turns, not one actor
        # An actor waits for level-0 shares (phase 0); a leaf for the result.
        phase = 0 if pid in group.actors else 2 * setup.tree.depth
        assert p.pending() == [(k, phase) for k in range(first)]
        with pytest.raises(LocalProtocolError, match="already started"):
            p.start()


@pytest.mark.parametrize("order", ["fifo", "lifo", "random"])
@pytest.mark.parametrize("window", [1, 2])
def test_in_flight_never_exceeds_the_window(window, order):
    setup = make_segmented(12, window=window, seed=7)
    net = MemNet(setup.peers, random.Random(1) if order == "random" else order)
    net.start()
    peak = {pid: 0 for pid in setup.ids}
    check_flow(setup)
    while net.pending:
        net.step()
        check_flow(setup)  # in_flight <= window for every peer, after every delivery
        for pid, p in setup.peers.items():
            peak[pid] = max(peak[pid], p.in_flight)
    assert_exact(setup)
    # The window is used, not just respected: everyone had a full window out at once.
    assert set(peak.values()) == {window}


def test_window_of_one_completes_in_lockstep():
    setup = make_segmented(12, window=1, seed=11)
    net = MemNet(setup.peers, "lifo")
    net.start()
    # Before anything is delivered, nobody has shared past segment 0.
    assert all(p.shared == 1 for p in setup.peers.values())
    steps = run_checked(net, setup)
    assert steps > 0
    assert_exact(setup)


# -- 4. refusals leave the state unchanged ----------------------------------------------


def snapshot(p: SegmentedRound) -> tuple:
    """Everything a refused message must leave untouched."""
    segs = []
    for s in p.segments:
        accs = {
            key: (sorted(acc.received), None if acc.total is None else acc.total.tobytes())
            for key, acc in s._accs.items()
        }
        segs.append((accs, None if s.result is None else bytes(s.result), s.started))
    book = p.segments[0]._seeds
    return (
        segs,
        {key: dict(seeds) for key, seeds in book.received.items()},
        dict(book.drawn),
        p.buffer.tobytes(),
        p.shared,
        p.in_flight,
        p.done,
        p.started,
        p.pending(),
        p.waiting_for(),
    )


def refuse(p: SegmentedRound, message, match: str) -> None:
    before = snapshot(p)
    with pytest.raises(RemoteProtocolError, match=match):
        p.receive(message)
    assert snapshot(p) == before


def started_net(setup: Setup) -> MemNet:
    net = MemNet(setup.peers, "fifo")
    net.start()
    return net


def test_out_of_range_and_negative_segments_refused():
    setup = make_segmented(6, window=2, seed=5)
    s = setup.num_segments
    net = started_net(setup)
    send = next(x for x in net.pending if isinstance(x.message, Share) and x.message.seed is None)
    p = setup.peers[send.to]
    for bad in (s, s + 1, -1, -s):
        refused = dataclasses.replace(send.message, segment=bad)
        refuse(p, refused, f"share for segment {bad} of a round of {s} segments")
    # A seed share stands for every segment and must name segment 0.
    seed = next(x for x in net.pending if isinstance(x.message, Share) and x.message.seed)
    for bad in (1, s - 1, s, -1):
        refused = dataclasses.replace(seed.message, segment=bad)
        refuse(setup.peers[seed.to], refused, f"seed share for segment {bad}, not 0")
    # The same message in range is accepted (the refusals were about the segment).
    m = send.message
    p.receive(m)
    assert m.sender in p.segments[m.segment]._accs[(m.level, m.group)].received


def test_duplicate_share_refused():
    setup = make_segmented(6, window=2, seed=6)
    net = started_net(setup)
    send = next(x for x in net.pending if isinstance(x.message, Share) and x.message.seed is None)
    p = setup.peers[send.to]
    p.receive(send.message)
    refuse(p, send.message, "duplicate")
    # Refused in its own segment only: the sender's dense share of the other started
    # segment is not a duplicate. It goes to the group's other actor (the actors
    # take turns), and only there.
    other = next(
        x
        for x in net.pending
        if isinstance(x.message, Share)
        and x.message.seed is None
        and x.message.sender == send.message.sender
        and x.message.segment != send.message.segment
    )
    assert other.to != send.to
    refuse(p, other.message, "belongs to")
    setup.peers[other.to].receive(other.message)


def test_seed_shares_are_kept_for_every_segment_and_refused_twice():
    setup = make_segmented(6, window=1, seed=7)
    net = started_net(setup)
    # A non-actor participant's seed to an actor: the actor gets that
    # participant's dense share in every other segment and its seed's stream in the rest.
    send = next(
        x
        for x in net.pending
        if isinstance(x.message, Share)
        and x.message.seed
        and x.message.sender not in setup.tree.group_of(x.message.sender, 0).actors
    )
    p, m = setup.peers[send.to], send.message
    key = (m.level, m.group)
    group = setup.tree.group_of(m.sender, 0)
    p.receive(m)
    assert p.segments[0]._seeds.received[key] == {m.sender: m.seed}
    # Taken in only by a started sum (window 1: segment 0's at most) that needs it.
    for k, seg in enumerate(p.segments):
        took = m.sender in seg._accs[key].received
        assert took == (k == 0 and dense_actor(group, m.sender, 0) != send.to)
    refuse(p, m, "duplicate")
    # Dense shares from that participant: only for the segments whose dense share is ours.
    for k in range(setup.num_segments):
        dense = Share(m.round_id, m.level, m.group, m.sender, None, np.zeros(8, np.uint8), k)
        if dense_actor(group, m.sender, k) != send.to:
            refuse(p, dense, "belongs to")


def result_setup() -> tuple[Setup, MemNet, str]:
    """A round run until only results are left to deliver; returns a non-actor's id."""
    setup = make_segmented(6, window=5, seed=8)
    net = started_net(setup)
    while any(not isinstance(x.message, Result) for x in net.pending):
        # Hold back results, deliver everything else.
        i = next(i for i, x in enumerate(net.pending) if not isinstance(x.message, Result))
        net.pending.insert(0, net.pending.pop(i))
        net.step()
    leaf = next(x.to for x in net.pending if isinstance(x.message, Result))
    return setup, net, leaf


def test_result_of_the_wrong_size_for_its_segment_refused():
    setup, net, leaf = result_setup()
    p = setup.peers[leaf]
    s = setup.num_segments
    mine = [x.message for x in net.pending if x.to == leaf]
    assert sorted(m.segment for m in mine) == list(range(s))
    full = next(m for m in mine if m.segment == 0)
    last = next(m for m in mine if m.segment == s - 1)
    assert full.payload.nbytes != last.payload.nbytes
    # A full segment's bytes sent as the (short) last segment, and the reverse.
    refuse(p, dataclasses.replace(last, payload=full.payload.copy()), "wrong size")
    refuse(p, dataclasses.replace(full, payload=last.payload.copy()), "wrong size")
    refuse(p, dataclasses.replace(full, payload=full.payload[:-1].copy()), "wrong size")
    # The genuine ones are accepted, and a second copy is then a duplicate.
    for m in mine:
        p.receive(m)
    assert p.done
    refuse(p, full, "duplicate")


def test_result_from_the_wrong_actor_refused():
    setup, net, leaf = result_setup()
    p = setup.peers[leaf]
    m = next(x.message for x in net.pending if x.to == leaf)
    other = next(pid for pid in setup.ids if pid not in (leaf, m.sender))
    refuse(p, dataclasses.replace(m, sender=other), "expected it from")


def test_result_slot_offered_only_for_a_result_the_peer_waits_for():
    """``result_slot`` is the segment's slice of the result buffer exactly while the
    peer waits for that result from that actor at that size; a result opened
    into it is placed without a copy, and then no slot is offered for it."""
    setup, net, leaf = result_setup()
    p = setup.peers[leaf]
    mine = sorted((x.message for x in net.pending if x.to == leaf), key=lambda m: m.segment)
    other = next(pid for pid in setup.ids if pid not in (leaf, mine[0].sender))
    for m in mine:
        k, nbytes = m.segment, m.payload.nbytes
        lo, hi = setup.spans[k]
        assert p.result_slot(k, other, nbytes) is None  # not the actor we expect it from
        assert p.result_slot(k, m.sender, nbytes + 1) is None  # not its size
        assert p.result_slot(k, m.sender, nbytes - 1) is None
        slot = p.result_slot(k, m.sender, nbytes)
        assert slot is not None and slot.nbytes == hi - lo == nbytes
        assert slot.ctypes.data == p.buffer[lo:hi].ctypes.data
        slot[:] = m.payload  # what opening the sealed payload in place does
        before = snapshot(p)
        p.receive(dataclasses.replace(m, payload=slot))
        assert snapshot(p) != before
        assert p.segments[k].result.ctypes.data == slot.ctypes.data
        assert p.result_slot(k, m.sender, nbytes) is None  # held: a copy would be a duplicate
    for k in (-1, len(mine), True):
        assert p.result_slot(k, mine[0].sender, mine[0].payload.nbytes) is None
    assert p.done
    net.pending = [x for x in net.pending if x.to != leaf]  # delivered by hand above
    run_checked(net, setup)
    assert_exact(setup)


def test_no_result_slot_before_the_segment_is_shared():
    setup = make_segmented(6, window=1, seed=8)
    net = started_net(setup)
    p = next(p for p in setup.peers.values() if p.segments[0].result_from)
    sender = p.segments[0].result_from
    nbytes = setup.spans[1][1] - setup.spans[1][0]
    assert p.shared == 1 and p.result_slot(1, sender, nbytes) is None
    assert p.result_slot(0, sender, setup.spans[0][1] - setup.spans[0][0]) is not None
    assert net.pending  # (the round goes on)


def test_scheduler_messages_refused():
    setup = make_segmented(6, window=2, seed=9)
    started_net(setup)
    p = setup.peers[setup.ids[0]]
    refuse(p, Abort("r1", "p0001", "boom"), "unexpected Abort")
    refuse(p, Done("r1", "p0001", 0.1, 10, 10), "unexpected Done")


def test_wrong_round_and_misrouted_partial_refused():
    setup = make_segmented(6, window=2, seed=10)
    net = started_net(setup)
    send = next(x for x in net.pending if isinstance(x.message, Share))
    p = setup.peers[send.to]
    refuse(p, dataclasses.replace(send.message, round_id="r2"), "round")
    leaf = next(pid for pid, q in setup.peers.items() if not q.segments[0].is_root_actor)
    payload = np.zeros(1 + SEG, dtype=RING)
    refuse(setup.peers[leaf], Partial("r1", setup.ids[0], payload, 0), "not a root actor")


def test_result_of_the_right_bytes_but_another_dtype_refused():
    setup, net, leaf = result_setup()
    p = setup.peers[leaf]
    m = next(x.message for x in net.pending if x.to == leaf and x.message.segment == 0)
    bad = m.payload.view(np.uint16)
    assert bad.nbytes == m.payload.nbytes == setup.spans[0][1] - setup.spans[0][0]
    # Refused before the segment takes it, so the genuine result still completes it.
    refuse(p, dataclasses.replace(m, payload=bad), "not a 1-d byte buffer")
    p.receive(m)
    assert p.segments[0].result is not None


# -- 5. what the peer asks: pending, waiting_for, done, result, slices --------------------


def test_pending_lists_only_started_unfinished_segments():
    setup = make_segmented(12, window=2, seed=12)
    s = setup.num_segments
    net = MemNet(setup.peers, random.Random(3))
    assert all(p.pending() == [] for p in setup.peers.values())  # nothing started
    net.start()
    seen_partial = False
    while net.pending:
        net.step()
        for p in setup.peers.values():
            pend = p.pending()
            ks = [k for k, _ in pend]
            assert ks == sorted(ks) and len(set(ks)) == len(ks)
            expected = [k for k in range(p.shared) if not p.segments[k].done]
            assert ks == expected
            for k, phase in pend:
                assert phase == p.segments[k].pending_phase()
                assert 0 <= phase <= 2 * setup.tree.depth
            if 0 < sum(x.done for x in p.segments) < s:
                seen_partial = True
                assert p.result is None and not p.done
    assert seen_partial
    assert_exact(setup)


def test_waiting_for_names_the_segment():
    setup = make_segmented(6, window=2, seed=13)
    s = setup.num_segments
    net = started_net(setup)
    for p in setup.peers.values():
        what = p.waiting_for()
        assert what.startswith(f"segment 0 of {s}: "), what
        assert what.endswith(p.segments[0].waiting_for())
    # Deliver until some peer holds segment 0 but not segment 1: it names segment 1.
    named_later = False
    while net.pending and not named_later:
        net.step()
        for p in setup.peers.values():
            if p.segments[0].done and not p.done:
                first = next(k for k in range(s) if not p.segments[k].done)
                assert p.waiting_for().startswith(f"segment {first} of {s}: ")
                named_later = first > 0
    assert named_later
    # One segment: the message is the segment's own, without the prefix.
    one = make_segmented(6, window=2, seed=13, seg=1000)
    started_net(one)
    for p in one.peers.values():
        assert not p.waiting_for().startswith("segment")
        assert p.waiting_for() == p.segments[0].waiting_for()


def test_result_slices_tile_the_buffer_and_root_actors_decode_in_place():
    setup = make_segmented(6, window=2, seed=14)
    assert setup.spans[0][0] == 0 and setup.spans[-1][1] == setup.schema.result_nbytes
    for (_, hi), (lo, _) in zip(setup.spans, setup.spans[1:], strict=False):
        assert hi == lo
    net = MemNet(setup.peers, "fifo")
    net.start()
    # Every Result a root actor sends is its own slice of its own buffer (no copy).
    root_results: list[tuple[str, Result]] = []
    while net.pending:
        send: Send = net.step()
        assert send is not None
        for x in net.pending:
            m = x.message
            if isinstance(m, Result) and setup.peers[m.sender].segments[0].is_root_actor:
                root_results.append((m.sender, m))
    assert root_results
    for sender, m in root_results:
        lo, hi = setup.spans[m.segment]
        view = setup.peers[sender].buffer[lo:hi]
        assert m.payload.ctypes.data == view.ctypes.data and m.payload.nbytes == hi - lo
    for pid, p in setup.peers.items():
        assert p.buffer.nbytes == setup.schema.result_nbytes
        for k, seg in enumerate(p.segments):
            lo, hi = setup.spans[k]
            assert seg.result is not None
            assert seg.result.ctypes.data == p.buffer[lo:hi].ctypes.data
            assert seg.result.nbytes == hi - lo
        # finalize got the slice as ``out`` and returned it.
        for k, out_addr, got_addr in setup.finalized[pid]:
            assert out_addr == got_addr == p.buffer[setup.spans[k][0] :].ctypes.data
    assert_exact(setup)


def test_messages_before_start_are_kept_and_share_nothing():
    # A peer may be fed shares that raced ahead of its assignment (Peer._keep_early):
    # they are accepted, but nothing of its own is encoded or shared before start().
    setup = make_segmented(6, window=1, seed=16)
    late = next(pid for pid in setup.ids if setup.peers[pid].segments[0].acted)
    p = setup.peers[late]
    net = MemNet(setup.peers, "fifo")
    net.start([pid for pid in setup.ids if pid != late])
    early = [x for x in net.pending if x.to == late]
    assert early
    for x in early:
        net.pending.remove(x)
        assert p.receive(x.message) == []
    assert not p.started and p.shared == 0 and setup.encoded[late] == []
    assert p.pending() == [] and not p.done
    net.start([late])
    assert p.shared == 1
    run_checked(net, setup)
    assert_exact(setup)


# -- 6. memory: segments are encoded lazily ---------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3])
def test_encode_is_lazy_and_bounded_by_the_window(window):
    setup = make_segmented(12, window=window, seed=15)
    s = setup.num_segments
    net = MemNet(setup.peers, random.Random(window))
    net.start()
    assert all(v == list(range(min(window, s))) for v in setup.encoded.values())
    most = 0
    while net.pending:
        net.step()
        for pid, p in setup.peers.items():
            live = [k for k in setup.encoded[pid] if not p.segments[k].done]
            assert len(live) <= window
            most = max(most, len(live))
    assert most == min(window, s)
    assert all(v == list(range(s)) for v in setup.encoded.values())  # each exactly once
    assert_exact(setup)


# -- 7. constructor validation -----------------------------------------------------------


def build(sizes, spans, window=2, me="p0000"):
    tree = build_tree([f"p{i:04d}" for i in range(3)], 3, 2, random.Random(0))
    return SegmentedRound(
        me,
        "r1",
        tree,
        sizes,
        RING,
        spans,
        lambda k: np.zeros(sizes[k], dtype=RING),
        lambda k, total, out: out,
        seeded_bytes(0),
        window=window,
    )


@pytest.mark.parametrize(
    ("sizes", "spans", "match"),
    [
        ([], [], "one size"),
        ([3], [], "one size"),
        ([3, 3], [(0, 8)], "one size"),
        ([3], [(0, 8), (8, 16)], "one size"),
        ([3, 3], [(8, 16), (16, 24)], "tile"),  # does not start at 0
        ([3, 3], [(0, 8), (9, 16)], "tile"),  # a gap
        ([3, 3], [(0, 8), (7, 16)], "tile"),  # an overlap
        ([3, 3], [(0, 8), (16, 8)], "tile"),  # backwards
        ([3, 3], [(0, 8), (8, 8)], "tile"),  # empty
        ([3, 3], [(8, 16), (0, 8)], "tile"),  # out of order
        ([3, 0], [(0, 8), (8, 16)], "size"),  # an empty segment vector
    ],
)
def test_constructor_refuses_bad_layouts(sizes, spans, match):
    with pytest.raises(LocalProtocolError, match=match):
        build(sizes, spans)


@pytest.mark.parametrize("window", [0, -1, True, 1.5, "2", None])
def test_constructor_refuses_bad_windows(window):
    with pytest.raises(LocalProtocolError, match="window"):
        build([3, 3], [(0, 8), (8, 16)], window=window)


def test_constructor_accepts_a_good_layout_and_refuses_strangers():
    p = build([3, 2], [(0, 8), (8, 12)], window=1)
    assert p.buffer.nbytes == 12 and not p.started and p.shared == 0 and p.result is None
    assert [s.segment for s in p.segments] == [0, 1]
    assert [s.size for s in p.segments] == [3, 2]
    assert [s.result_nbytes for s in p.segments] == [8, 4]
    with pytest.raises(LocalProtocolError, match="not a member"):
        build([3], [(0, 8)], me="stranger")
