"""A deterministic fault simulator: sans-IO peers and scheduler, an in-memory network, a fake clock.

Every peer runs the real :class:`PeerRound` behind a small driver that does
what :meth:`lightning_secagg.peer.Peer.aggregate_with_retry` does around it:
sign up, heartbeat every second, honour the round and phase deadlines
(:mod:`lightning_secagg.deadlines`), tell the scheduler when it gives up, ignore
messages of finished rounds, re-sign up on ``Rejoin``, and retry a failed round.
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

from lightning_secagg.deadlines import phase_deadline
from lightning_secagg.encoding import decode_result, decode_total, encode
from lightning_secagg.errors import (
    RemoteProtocolError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SignupRejectedError,
)
from lightning_secagg.messages import (
    Abort,
    Assignment,
    Done,
    Heartbeat,
    Leave,
    Message,
    Rejoin,
    Signup,
    SignupAck,
    SignupRejected,
)
from lightning_secagg.peer import is_retryable
from lightning_secagg.protocol.peer_round import PeerRound, designated_actor
from lightning_secagg.protocol.scheduler_state import SchedulerState
from lightning_secagg.schema import Schema
from lightning_secagg.tree import AggregationTree

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
    """One peer's ``aggregate_with_retry`` as a sans-IO driver around :class:`PeerRound`."""

    def __init__(
        self,
        sim: FaultSim,
        pid: str,
        state: dict[str, torch.Tensor],
        *,
        timeout: float,
        max_retries: int,
        heartbeat: float,
    ) -> None:
        self.sim, self.pid, self.state = sim, pid, state
        self.schema = Schema.of(state, 16)
        self.timeout, self.max_retries, self.heartbeat = timeout, max_retries, heartbeat
        self.crashed = False
        self.active = False
        self.attempt = 0
        self.outcome: Outcome | None = None
        self.finished: set[str] = set()
        self.early: list[Message] = []
        self.rnd: PeerRound | None = None
        self.assignment: Assignment | None = None
        self.assigned_at = 0.0

    # -- the call ---------------------------------------------------------
    def start_attempt(self, now: float) -> None:
        self.active = True
        self.started = now
        self.deadline = now + self.timeout
        self.acked = False
        self.signup_sent = now
        self.next_beat = now + self.heartbeat
        self.rnd, self.assignment = None, None
        self.signup = Signup(
            "s", self.pid, f"inproc://{self.pid}", "", 1.0, 16, self.schema.to_wire()
        )
        self.send(SCHED, self.signup)

    def send(self, to: str, msg: Message) -> None:
        self.sim.send(self.pid, to, msg)

    def next_timer(self) -> float | None:
        if not self.active or self.crashed:
            return None
        times = [self.deadline, self.next_beat]
        due = self._phase_due()
        if due is not None:
            times.append(due)
        return min(times)

    def _phase_due(self) -> float | None:
        if self.rnd is None or self.assignment is None:
            return None
        phase = self.rnd.pending_phase()
        if phase is None:
            return None
        return phase_deadline(
            self.assigned_at, self.assignment.deadline_s, self.rnd.tree.depth, phase
        )

    def on_timer(self, now: float) -> None:
        if not self.active or self.crashed:
            return
        due = self._phase_due()
        if now >= self.deadline or (due is not None and now >= due):
            what = self.rnd.waiting_for() if self.rnd is not None else "an assignment"
            self._give_up()
            self._fail(now, RoundTimeoutError(f"{self.pid} timed out waiting for {what}"))
            return
        if now >= self.next_beat:
            rid = self.assignment.round_id if self.assignment is not None else None
            self.send(SCHED, Heartbeat("s", self.pid, rid))
            self.next_beat = now + self.heartbeat

    def _give_up(self) -> None:
        if self.assignment is not None:
            self.send(SCHED, Abort(self.assignment.round_id, self.pid, "timed out"))
        else:
            self.send(SCHED, Leave("s", self.pid))

    def _fail(self, now: float, exc: BaseException) -> None:
        if self.assignment is not None:
            self.finished.add(self.assignment.round_id)
        self.rnd, self.assignment, self.active = None, None, False
        if is_retryable(exc) and self.attempt < self.max_retries:
            self.attempt += 1
            self.start_attempt(now)
            return
        self.outcome = Outcome(False, now, self.started, error=exc, retries=self.attempt)

    # -- input ------------------------------------------------------------
    def on_message(self, now: float, src: str, msg: Message) -> None:
        if self.crashed or not self.active:
            return  # buffered until a next call in reality, where it is stale
        if src == SCHED:
            self._on_scheduler(now, msg)
            return
        rid = getattr(msg, "round_id", None)
        if rid in self.finished:
            return
        if self.rnd is None:
            self.early.append(msg)
            return
        self._feed(now, msg)

    def _on_scheduler(self, now: float, msg: Message) -> None:
        if isinstance(msg, SignupAck):
            self.acked = True
        elif isinstance(msg, Assignment):
            if self.rnd is not None or not self.acked or msg.round_id in self.finished:
                return
            self._accept(now, msg)
        elif isinstance(msg, Rejoin):
            if self.rnd is None and (self.acked or now - self.signup_sent > 5 * self.heartbeat):
                self.send(SCHED, self.signup)
                self.acked, self.signup_sent = False, now
        elif isinstance(msg, Abort):
            if self.assignment is not None and msg.round_id == self.assignment.round_id:
                self._fail(now, RoundAbortedError(msg.reason))
            else:
                self.finished.add(msg.round_id)
        elif isinstance(msg, SignupRejected):
            self._fail(now, SignupRejectedError(msg.reason))

    def _accept(self, now: float, msg: Assignment) -> None:
        tree = AggregationTree.from_wire(msg.tree, msg.group_size, msg.num_actors)
        schema = self.schema
        self.assignment, self.assigned_at = msg, now
        self.rnd = PeerRound(
            self.pid,
            msg.round_id,
            tree,
            encode(self.state, schema, 1.0 / msg.total_weight),
            lambda total: decode_total(total, schema),
            schema.result_nbytes,
            self.sim.rng.randbytes,
        )
        self.sim.on_assignment(self, tree)
        if self.crashed:
            return
        for send in self.rnd.start():
            self.send(send.to, send.message)
        early, self.early = self.early, []
        for m in early:
            if self.rnd is not None and getattr(m, "round_id", None) == msg.round_id:
                self._feed(now, m)

    def _feed(self, now: float, msg: Message) -> None:
        assert self.rnd is not None and self.assignment is not None
        try:
            sends = self.rnd.receive(msg)
        except RemoteProtocolError:
            return  # a duplicate, or a message of another round: dropped
        for send in sends:
            self.send(send.to, send.message)
        if self.rnd.done and not self.crashed:
            rnd, asg = self.rnd, self.assignment
            result = decode_result(rnd.result, self.schema)  # type: ignore[arg-type]
            self.finished.add(asg.round_id)
            self.send(SCHED, Done(asg.round_id, self.pid, now - self.assigned_at, 0, 0))
            self.active, self.rnd, self.assignment = False, None, None
            members = tuple(sorted(m[0] for m in asg.members))
            self.outcome = Outcome(True, now, self.started, result, members, retries=self.attempt)


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    msg: Any = field(compare=False)


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
                self, pid, state, timeout=timeout, max_retries=max_retries, heartbeat=heartbeat
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
    def send(self, src: str, dst: str, msg: Message) -> None:
        peer = self.peers.get(src)
        if peer is not None and peer.crashed:
            return
        at = self.now + self.rng.uniform(0.001, 0.02)
        copies = 1
        if peer is not None and self._hits("send", msg.TYPE, src):
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
            self._push(at, src, dst, msg)

    def _push(self, at: float, src: str, dst: str, msg: Message) -> None:
        # Peer links are per round: a peer closes its connections of a failed round.
        link = (src, dst, "" if SCHED in (src, dst) else getattr(msg, "round_id", ""))
        at = max(at, self._link_clock.get(link, 0.0))
        self._link_clock[link] = at
        self._seq += 1
        heapq.heappush(self.events, _Event(at, self._seq, src, dst, msg))

    def _deliver(self, ev: _Event) -> None:
        if ev.dst == SCHED:
            try:
                out = self.sched.receive(ev.src.encode(), ev.msg)
            except RemoteProtocolError:
                return
            self._sched_out(out)
            return
        peer = self.peers[ev.dst]
        if (
            ev.msg.TYPE != "assignment"
            and not peer.crashed
            and self._hits("recv", ev.msg.TYPE, ev.dst)
        ):
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
            self._push(self.now + self.rng.uniform(0.001, 0.02), SCHED, dst, item.message)

    # -- the run ------------------------------------------------------------
    def run(self, horizon: float = 10_000.0) -> dict[str, Outcome | None]:
        for i, peer in enumerate(self.peers.values()):
            self.now = i * 0.01
            peer.start_attempt(self.now)
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
