"""A deterministic fault simulator: sans-IO peers and scheduler, an in-memory network, a fake clock.

Every peer is the production :class:`PeerSession`, the state machine inside
:meth:`lightning_secagg.peer.Peer.aggregate_with_retry`: it signs up,
heartbeats, honours the round and phase deadlines, tells the scheduler when it
gives up, ignores messages of finished rounds, re-signs up on ``Rejoin`` and
retries a failed round, exactly as a real peer does; round traffic travels as
the real wire frames (:class:`~lightning_secagg.wire.PlainWire`, or the sealed
:class:`~lightning_secagg.wire.SealedWire` with ``secure=True``). Only the
sockets are replaced, by this event queue.
The scheduler is the real :class:`SchedulerState`, ticked whenever its
``next_deadline`` comes due. Time only moves from one event to the next, so a
"hang" is a survivor that has not reached a terminal state when nothing is left
to happen, or that reaches it after its deadline.

A :class:`Fault` hits one message of one peer (the *target*, picked by role
once the first assignment is known): ``crash`` kills the target at that moment
(it sends and answers nothing from then on, heartbeats included), ``drop``
loses the message, ``delay`` delivers it ``delay`` seconds late, ``duplicate``
delivers it twice.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_secagg.encoding import decode_result, decode_total, encode
from lightning_secagg.errors import RemoteProtocolError, RoundFailedError
from lightning_secagg.messages import Assignment
from lightning_secagg.protocol.peer_round import designated_actor
from lightning_secagg.protocol.peer_session import (
    Contribution,
    PeerSession,
    Retrying,
    State,
    ToScheduler,
)
from lightning_secagg.protocol.scheduler_state import SchedulerState
from lightning_secagg.schema import Schema
from lightning_secagg.security import KeyPair
from lightning_secagg.tree import AggregationTree
from lightning_secagg.wire import PlainWire, SealedWire, Transmit

SCHED = "scheduler"
ROLES = ("leaf", "actor", "root")


@dataclass(frozen=True)
class Fault:
    """``kind`` in crash/drop/delay/duplicate, hitting the target's first ``direction`` ``mtype``.

    ``direction`` is ``"send"`` (a message the target sends) or ``"recv"`` (one it receives).
    """

    role: str
    kind: str
    direction: str
    mtype: str
    delay: float = 0.0

    def label(self) -> str:
        extra = f"{self.delay:g}s" if self.kind == "delay" else ""
        return f"{self.role}-{self.kind}{extra}-{self.direction}-{self.mtype}"


@dataclass
class Outcome:
    """How one peer's ``aggregate_with_retry`` ended."""

    ok: bool
    at: float
    attempt_started: float
    result: dict[str, torch.Tensor] | None = None
    members: tuple[str, ...] = ()
    error: BaseException | None = None
    retries: int = 0


class SimPeer:
    """One peer: the production :class:`PeerSession` (its retry loop included) on the
    in-memory network, its round traffic as real wire frames (:class:`PlainWire`)."""

    def __init__(
        self,
        sim: FaultSim,
        pid: str,
        state: dict[str, torch.Tensor],
        *,
        timeout: float,
        max_retries: int,
        heartbeat: float,
        secure: bool = False,
    ) -> None:
        self.sim, self.pid, self.state = sim, pid, state
        self.schema = Schema.of(state, 16)
        self.timeout, self.max_retries = timeout, max_retries
        self.wire: PlainWire | SealedWire = SealedWire() if secure else PlainWire()
        self.session = PeerSession(
            pid,
            "s",
            f"inproc://{pid}",
            KeyPair.generate().public if secure else "",
            self.wire,
            random_bytes=sim.rng.randbytes,
            heartbeat_interval=heartbeat,
            frac_bits=16,
        )
        schema = self.schema
        self.contribution = Contribution(
            schema,
            1.0,
            None,  # the 64-bit ring
            lambda share, plan, seg: encode(state, schema, share, plan=plan, segment=seg),
            lambda total, plan, seg, out: decode_total(total, schema, plan, segment=seg, out=out),
        )
        self.crashed = False
        self.outcome: Outcome | None = None
        self.attempt_started = 0.0

    # -- the call ---------------------------------------------------------
    def start(self, now: float) -> None:
        self.attempt_started = now
        self.apply(
            now,
            self.session.begin(
                self.contribution, now, timeout=self.timeout, max_retries=self.max_retries
            ),
        )

    def apply(self, now: float, outputs: list[Any]) -> None:
        """Send what the session asks for (nothing, once crashed); note how the call ended."""
        for out in outputs:
            if isinstance(out, ToScheduler):
                self.sim.send(self.pid, SCHED, out.message, out.message.TYPE)
            elif isinstance(out, Transmit):
                self.sim.send(self.pid, out.to, out, out.what)
            elif isinstance(out, Retrying):
                self.attempt_started = now
        if self.outcome is None and not self.crashed:
            s = self.session
            if s.state is State.DONE:
                assert s.result is not None and s.round_info is not None
                result = decode_result(s.result, self.schema)
                members = tuple(sorted(s.round_info.members))
                self.outcome = Outcome(
                    True, now, self.attempt_started, result, members, retries=len(s.failures)
                )
            elif s.state is State.FAILED:
                self.outcome = Outcome(
                    False, now, self.attempt_started, error=s.error, retries=len(s.failures)
                )

    def next_timer(self) -> float | None:
        return None if self.crashed else self.session.next_deadline()

    def on_timer(self, now: float) -> None:
        if not self.crashed:
            self.apply(now, self.session.tick(now))

    # -- input ------------------------------------------------------------
    def on_message(self, now: float, src: str, msg: Any) -> None:
        if self.crashed and src == SCHED:
            return
        try:
            if src == SCHED:
                if isinstance(msg, Assignment) and self.session.state is State.QUEUED:
                    tree = AggregationTree.from_wire(msg.tree, msg.group_size, msg.num_actors)
                    self.sim.on_assignment(self, tree)
                    if self.crashed:
                        return
                outputs = self.session.receive_scheduler(msg, now)
            else:
                outputs = self.session.receive_peer(self.wire.parse(msg.frames), now)
        except RemoteProtocolError:
            return  # a duplicate, a stale message, or one of another round: dropped
        if not self.crashed:
            self.apply(now, outputs)


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    msg: Any = field(compare=False)
    what: str = field(compare=False, default="")


class FaultSim:
    """N peers, one scheduler, one fault; :meth:`run` plays it to the end."""

    def __init__(
        self,
        n: int,
        fault: Fault | None,
        seed: int,
        *,
        timeout: float = 60.0,
        group_size: int = 3,
        num_actors: int = 2,
        max_retries: int = 2,
        heartbeat: float = 1.0,
        liveness: float = 3.0,
        queue_wait: float = 2.0,
        secure: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self._seq = 0
        self.events: list[_Event] = []
        self._link_clock: dict[
            tuple[str, str, str], float
        ] = {}  # FIFO per link, as ZeroMQ over TCP
        self.fault = fault
        self.fault_used = False
        self.target: str | None = None
        self.no_target = False
        self.sched = SchedulerState(
            n,
            group_size,
            num_actors,
            round_timeout=None,
            min_size=max(3, num_actors + 1),
            queue_wait=queue_wait,
            liveness_timeout=liveness,
            clock=lambda: self.now,
            rng=random.Random(seed + 1),
            new_round_id=self._round_id,
        )
        self._rounds = 0
        gen = torch.Generator().manual_seed(seed)
        self.inputs = {
            f"p{i}": {
                "w": torch.randn(6, generator=gen, dtype=torch.float64),
                "b": torch.randn(2, generator=gen).float(),
            }
            for i in range(n)
        }
        self.peers = {
            pid: SimPeer(
                self,
                pid,
                state,
                timeout=timeout,
                max_retries=max_retries,
                heartbeat=heartbeat,
                secure=secure,
            )
            for pid, state in self.inputs.items()
        }

    def _round_id(self) -> str:
        self._rounds += 1
        return f"r{self._rounds}"

    # -- the fault ----------------------------------------------------------
    def on_assignment(self, peer: SimPeer, tree: AggregationTree) -> None:
        if self.fault is None:
            return
        if self.target is None and not self.no_target:
            sends = self.fault.mtype if self.fault.direction == "send" else ""
            self.target = pick_target(tree, self.fault.role, sends)
            self.no_target = self.target is None
        if self._hits("recv", "assignment", peer.pid) and self.fault.kind == "crash":
            self.fault_used = True
            peer.crashed = True

    def _hits(self, direction: str, mtype: str, pid: str) -> bool:
        f = self.fault
        return (
            f is not None
            and not self.fault_used
            and pid == self.target
            and f.direction == direction
            and f.mtype == mtype
        )

    # -- the network ----------------------------------------------------------
    def send(self, src: str, dst: str, msg: Any, what: str) -> None:
        peer = self.peers.get(src)
        if peer is not None and peer.crashed:
            return
        at = self.now + self.rng.uniform(0.001, 0.02)
        copies = 1
        if peer is not None and self._hits("send", what, src):
            assert self.fault is not None
            self.fault_used = True
            if self.fault.kind == "crash":
                peer.crashed = True
                return
            if self.fault.kind == "drop":
                return
            if self.fault.kind == "delay":
                at += self.fault.delay
            if self.fault.kind == "duplicate":
                copies = 2
        for _ in range(copies):
            self._push(at, src, dst, msg, what)

    def _push(self, at: float, src: str, dst: str, msg: Any, what: str) -> None:
        # Peer links are per round: a peer closes its connections of a failed round.
        rnd = self.peers[src].session.round if src in self.peers else None
        link = (src, dst, "" if SCHED in (src, dst) or rnd is None else rnd.assignment.round_id)
        at = max(at, self._link_clock.get(link, 0.0))
        self._link_clock[link] = at
        self._seq += 1
        heapq.heappush(self.events, _Event(at, self._seq, src, dst, msg, what))

    def _deliver(self, ev: _Event) -> None:
        if ev.dst == SCHED:
            try:
                out = self.sched.receive(ev.src.encode(), ev.msg)
            except RemoteProtocolError:
                return
            self._sched_out(out)
            return
        peer = self.peers[ev.dst]
        if ev.what != "assignment" and not peer.crashed and self._hits("recv", ev.what, ev.dst):
            assert self.fault is not None
            if self.fault.kind == "crash":
                # e.g. an actor dies while it handles a share: it held shares, and
                # nothing that share would have set off leaves (a level-0 actor's
                # sum may be complete with its first share).
                self.fault_used = True
                peer.crashed = True
                peer.on_message(self.now, ev.src, ev.msg)
                return
        peer.on_message(self.now, ev.src, ev.msg)

    def _sched_out(self, out: list[Any]) -> None:
        for item in out:
            dst = item.conn.decode()
            if self.peers[dst].crashed:
                continue  # ROUTER_MANDATORY would not notice a dead TCP peer at once either
            msg = item.message
            self._push(self.now + self.rng.uniform(0.001, 0.02), SCHED, dst, msg, msg.TYPE)

    # -- the run ------------------------------------------------------------
    def run(self, horizon: float = 10_000.0) -> dict[str, Outcome | None]:
        for i, peer in enumerate(self.peers.values()):
            self.now = i * 0.01
            peer.start(self.now)
        while True:
            candidates: list[tuple[float, str]] = []
            if self.events:
                candidates.append((self.events[0].at, "net"))
            due = self.sched.next_deadline()
            if due is not None:
                candidates.append((max(due, self.now), "sched"))
            for peer in self.peers.values():
                t = peer.next_timer()
                if t is not None:
                    candidates.append((max(t, self.now), peer.pid))
            if not candidates:
                break
            at, what = min(candidates)
            if at > horizon:
                break
            self.now = at
            if what == "net":
                self._deliver(heapq.heappop(self.events))
            elif what == "sched":
                self._sched_out(self.sched.tick())
            else:
                self.peers[what].on_timer(self.now)
        return {pid: p.outcome for pid, p in self.peers.items() if not p.crashed}

    def mean_of(self, members: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {
            name: torch.stack([self.inputs[m][name].double() for m in members]).mean(0)
            for name in self.inputs[members[0]]
        }


def pick_target(tree: AggregationTree, role: str, mtype: str = "") -> str | None:
    """The first peer (by id) with ``role``: leaf (never an actor), actor (not root), root;
    one that sends messages of type ``mtype``, if given."""
    root = set(tree.root.actors)
    actors = {a for level in tree.levels for g in level for a in g.actors}
    if role == "leaf":
        pool = set(tree.members) - actors
    elif role == "actor":
        pool = actors - root
    else:
        pool = root
    if mtype == "share":  # a peer that splits somewhere (two root actors never do)
        pool &= {p for level in tree.levels for g in level for p in g.participants
                 if tree.splits_in(g, p)}  # fmt: skip
    if mtype == "result":  # an actor that does send a result down
        pool &= {
            designated_actor(g, p)
            for level in tree.levels
            for g in level
            for p in g.participants
            if p not in g.actors
        }
    return min(pool, default=None)  # None: no peer has this role in this tree


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(np.allclose(a[k].double().numpy(), b[k].numpy(), atol=1e-3) for k in b)


__all__ = ["ROLES", "Fault", "FaultSim", "Outcome", "RoundFailedError", "close", "pick_target"]
