"""Many sans-IO protocol objects joined by an in-memory link (no sockets, no threads).

The idea follows h11's ``tests/helpers.py``: the protocol objects only turn
input messages into output messages, so a test can deliver the outputs of one
to the others itself, in any order it likes, and count everything.

* :class:`MemNet` (the library's :mod:`lightning_secagg.protocol.memnet`, which
  the planner runs too) joins the :class:`PeerRound` objects of one round and
  delivers their :class:`Send` instructions FIFO, LIFO or in an order drawn
  from a seeded ``random.Random`` (so hypothesis can explore interleavings).
  With ``wire=True`` every message goes through the real codec on the way,
  as it would over ZeroMQ.
* :func:`make_round` builds the peers of one round straight from a tree.
* :func:`run_with_scheduler` drives sign-ups through a :class:`SchedulerState`
  and builds each peer's round from the :class:`Assignment` it receives, the
  way the real :class:`~lightning_secagg.peer.Peer` does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_secagg import codec
from lightning_secagg.encoding import decode_result, decode_total, encode
from lightning_secagg.messages import (
    Assignment,
    Done,
    Message,
    Signup,
    SignupAck,
)
from lightning_secagg.protocol.memnet import MemNet
from lightning_secagg.protocol.peer_round import PeerRound
from lightning_secagg.protocol.scheduler_state import Outgoing, SchedulerState
from lightning_secagg.schema import Schema
from lightning_secagg.tree import AggregationTree, build_tree

StateDict = dict[str, torch.Tensor]


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """A reproducible stand-in for ``os.urandom`` (tests only; never for real shares)."""
    return random.Random(seed).randbytes


def random_state_dicts(
    n: int, size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[StateDict]:
    """``n`` small state dicts with a float tensor and an integer counter."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(size, generator=gen).to(dtype),
            "steps": torch.tensor(i, dtype=torch.int64),
        }
        for i in range(n)
    ]


@dataclass
class RoundSetup:
    """Everything about one in-memory round."""

    ids: list[str]
    state_dicts: list[StateDict]
    weights: list[float]
    schema: Schema
    tree: AggregationTree
    peers: dict[str, PeerRound]


def peer_round(
    pid: str,
    round_id: str,
    tree: AggregationTree,
    state_dict: StateDict,
    schema: Schema,
    share_of_total: float,
    random_bytes: Callable[[int], bytes],
    sends_are_copied: bool = False,
) -> PeerRound:
    """One member's :class:`PeerRound`, wired as the real peer wires it."""
    return PeerRound(
        pid,
        round_id,
        tree,
        encode(state_dict, schema, share_of_total),
        lambda total: decode_total(total, schema),
        schema.result_nbytes,
        random_bytes,
        sends_are_copied=sends_are_copied,
    )


def make_round(
    n: int,
    group_size: int = 3,
    num_actors: int = 2,
    *,
    size: int = 8,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    state_dicts: list[StateDict] | None = None,
    round_id: str = "r1",
    frac_bits: int = 32,
    sends_are_copied: bool = False,
) -> RoundSetup:
    """Build the tree and every member's :class:`PeerRound` for one round of ``n`` peers."""
    ids = [f"p{i:04d}" for i in range(n)]
    sds = state_dicts if state_dicts is not None else random_state_dicts(n, size, seed)
    ws = list(weights) if weights is not None else [1.0] * n
    schema = Schema.of(sds[0], frac_bits)
    tree = build_tree(ids, group_size, num_actors, random.Random(seed))
    total = sum(ws)
    peers = {
        pid: peer_round(
            pid,
            round_id,
            tree,
            sd,
            schema,
            w / total,
            seeded_bytes(seed * 100_003 + i),
            sends_are_copied,
        )
        for i, (pid, sd, w) in enumerate(zip(ids, sds, ws, strict=True))
    }
    return RoundSetup(ids, sds, ws, schema, tree, peers)


def results(setup: RoundSetup) -> list[StateDict]:
    """Every member's decoded result (asserts that each one has one)."""
    out = []
    for pid in setup.ids:
        buf = setup.peers[pid].result
        assert buf is not None, f"{pid} has no result; waits for {setup.peers[pid].waiting_for()}"
        out.append(decode_result(buf, setup.schema))
    return out


def result_bytes(setup: RoundSetup) -> list[bytes]:
    """Every member's raw result buffer."""
    return [bytes(np.asarray(setup.peers[pid].result)) for pid in setup.ids]


def weighted_mean(state_dicts: Sequence[StateDict], weights: Sequence[float], name: str):
    """The float64 reference: ``sum(w_i * x_i) / sum(w_i)``."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    xs = torch.stack([sd[name].to(torch.float64) for sd in state_dicts])
    shape = (-1,) + (1,) * (xs.dim() - 1)
    return (xs * w.reshape(shape)).sum(0) / w.sum()


def fixed_point_bound(n: int, frac_bits: int, magnitude: float) -> float:
    """Worst-case error of the fixed-point weighted mean before the cast to the output dtype.

    Every peer rounds ``p_i * x_i * 2**f`` and ``p_i * 2**f`` to integers (error
    <= 1/2 each), so ``S = 2**f * m + e_S`` and ``C = 2**f + e_C`` with
    ``|e_S|, |e_C| <= n / 2``; then ``|S / C - m| <= (|e_S| + |m| |e_C|) / (2**f - n / 2)``.
    A small extra term covers float64 rounding in encode and decode.
    """
    scale = 2.0**frac_bits
    return (n / 2) * (1 + magnitude) / (scale - n / 2) + 4 * magnitude * 2.0**-52


def cast_bound(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise rounding error of casting float64 ``value`` to ``dtype`` (one full ulp)."""
    info = torch.finfo(dtype)
    return value.abs() * info.eps + info.tiny


# -- driving a whole round through the scheduler ---------------------------------


@dataclass
class SchedulerRun:
    """What :func:`run_with_scheduler` saw."""

    assignments: dict[str, Assignment]
    acks: list[Message]
    peers: dict[str, PeerRound]
    schema: Schema
    net: MemNet
    scheduler_out: list[Outgoing]


def run_with_scheduler(
    scheduler: SchedulerState,
    state_dicts: Sequence[StateDict],
    weights: Sequence[float],
    *,
    session: str = "s",
    order: str | random.Random = "fifo",
    wire: bool = True,
) -> SchedulerRun:
    """Sign every peer up, build each one's round from its assignment, run it, report Done.

    Peer ``i`` uses the connection ``b"c<i>"`` and the id ``peer-<i>``. Headers go
    through the codec when ``wire`` is set, as over ZeroMQ.
    """
    schema = Schema.of(state_dicts[0])
    ids = [f"peer-{i}" for i in range(len(state_dicts))]
    conns = {pid: f"c{i}".encode() for i, pid in enumerate(ids)}
    by_conn = {c: pid for pid, c in conns.items()}

    def through_wire(message: Message) -> Message:
        if not wire:
            return message
        return codec.decode([bytes(f) for f in codec.encode(message)])

    outgoing: list[Outgoing] = []
    for i, (pid, weight) in enumerate(zip(ids, weights, strict=True)):
        signup = Signup(
            session, pid, f"tcp://127.0.0.1:{7000 + i}", "", weight,
            schema.frac_bits, schema.to_wire(),
        )  # fmt: skip
        outgoing += scheduler.receive(conns[pid], through_wire(signup))
    acks = [o.message for o in outgoing if isinstance(o.message, SignupAck)]
    assert len(acks) == len(ids), [o.message for o in outgoing]
    assignments: dict[str, Assignment] = {}
    for o in outgoing:
        if isinstance(o.message, Assignment):
            message = through_wire(o.message)
            assert isinstance(message, Assignment)
            assignments[by_conn[o.conn]] = message
    peers: dict[str, PeerRound] = {}
    for i, (pid, sd, weight) in enumerate(zip(ids, state_dicts, weights, strict=True)):
        a = assignments.get(pid)
        if a is None:
            continue
        tree = AggregationTree.from_wire(a.tree, a.group_size, a.num_actors)
        peers[pid] = peer_round(
            pid, a.round_id, tree, sd, schema, weight / a.total_weight, seeded_bytes(i)
        )
    net = MemNet(peers, order=order, wire=wire)
    net.start()
    net.run()
    after: list[Outgoing] = []
    for pid, p in peers.items():
        done = Done(p.round_id, pid, 0.01, 100, 100)
        after += scheduler.receive(conns[pid], through_wire(done))
    return SchedulerRun(assignments, acks, peers, schema, net, after)
