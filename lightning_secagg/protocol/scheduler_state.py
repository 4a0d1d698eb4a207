"""The scheduler's logic, as a sans-IO state machine.

:class:`SchedulerState` keeps one waiting queue per session, forms a round
when ``target_size`` compatible peers wait, builds its tree, and follows the
round until every member reports :class:`~lightning_secagg.messages.Done` or
one of them gives up. It sees sign-ups, stats and failures, never model data.

Connections are opaque ``bytes`` (ZeroMQ routing ids in production); the
clock, the shuffle randomness and the round ids are injected.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from lightning_secagg.deadlines import DEFAULT_POLICY, DeadlinePolicy
from lightning_secagg.errors import ConfigurationError, RemoteProtocolError
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
    is_z85_key,
)
from lightning_secagg.ring import choose_ring
from lightning_secagg.schema import Schema
from lightning_secagg.tree import AggregationTree, ShuffleRandom, build_tree, validate_tree_params

log = logging.getLogger(__name__)

SCHEDULER_ID = "scheduler"


@dataclass(frozen=True)
class Outgoing:
    """An instruction to the transport: deliver ``message`` on connection ``conn``."""

    conn: bytes
    message: Message


@dataclass
class _Waiting:
    conn: bytes
    signup: Signup
    schema: Schema
    joined: float = 0.0
    seen: float = 0.0


@dataclass
class _Session:
    queue: dict[str, _Waiting] = field(default_factory=dict)


@dataclass
class ActiveRound:
    """A round in flight: its members' connections, who finished, and its deadline."""

    round_id: str
    session: str
    members: dict[str, bytes]
    tree: AggregationTree
    deadline: float
    started: float
    done: dict[str, Done] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def default_round_id() -> str:
    """A fresh, unguessable round id."""
    return secrets.token_hex(8)


class SchedulerState:
    """Sessions, queues and rounds.

    Args:
        target_size: Peers per round.
        group_size: Participants per group of the tree.
        num_actors: Actors per group.
        round_timeout: Seconds a round may take before it is aborted for everyone;
            None derives it per round from the model's size and the tree's depth
            (see :mod:`lightning_secagg.deadlines`).
        min_size: Smallest round; below ``target_size`` a round of at least
            ``min_size`` live peers forms once the oldest has waited ``queue_wait``
            seconds. Defaults to ``target_size`` (only full rounds).
        queue_wait: Seconds the oldest queued peer waits for a full round before
            a smaller one (>= ``min_size``) forms.
        liveness_timeout: A queued peer, or a round member that has not finished,
            silent for longer (no sign-up, heartbeat or Done) is dead: dropped from
            the queue, or its round aborted. None disables liveness checks.
        deadline_policy: How a derived ``round_timeout`` scales.
        clock: Monotonic seconds.
        insecure: Links are plaintext; said loudly in the log of every round.
        rng: Shuffle randomness for the tree (a CSPRNG in production).
        new_round_id: Round id factory.
    """

    def __init__(
        self,
        target_size: int,
        group_size: int,
        num_actors: int,
        *,
        round_timeout: float | None = 300.0,
        min_size: int | None = None,
        queue_wait: float = 0.0,
        liveness_timeout: float | None = None,
        deadline_policy: DeadlinePolicy = DEFAULT_POLICY,
        clock: Callable[[], float],
        rng: ShuffleRandom | None = None,
        new_round_id: Callable[[], str] = default_round_id,
        insecure: bool = False,
    ) -> None:
        validate_tree_params(target_size, group_size, num_actors)
        min_size = target_size if min_size is None else min_size
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size > target_size:
            raise ConfigurationError(
                f"min_size must be an int <= target_size={target_size}, got {min_size!r}"
            )
        try:
            validate_tree_params(min_size, group_size, num_actors)
        except ConfigurationError as exc:
            raise ConfigurationError(str(exc).replace("target_size", "min_size")) from None
        if not (isinstance(queue_wait, (int, float)) and 0 <= queue_wait < float("inf")):
            raise ConfigurationError(f"queue_wait must be >= 0 seconds, got {queue_wait!r}")
        if liveness_timeout is not None and not (
            isinstance(liveness_timeout, (int, float)) and 0 < liveness_timeout < float("inf")
        ):
            raise ConfigurationError(
                f"liveness_timeout must be None or > 0 seconds, got {liveness_timeout!r}"
            )
        if round_timeout is not None and not (
            isinstance(round_timeout, (int, float)) and 0 < round_timeout <= 86400
        ):
            raise ConfigurationError(
                f"round_timeout must be None or in (0, 86400] seconds, got {round_timeout!r}"
            )
        self.target_size = target_size
        self.group_size = group_size
        self.num_actors = num_actors
        self.round_timeout = round_timeout
        self.min_size = min_size
        self.queue_wait = float(queue_wait)
        self.liveness_timeout = liveness_timeout
        self.deadline_policy = deadline_policy
        self._clock = clock
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._new_round_id = new_round_id
        self.insecure = insecure
        self.sessions: dict[str, _Session] = {}
        self.rounds: dict[str, ActiveRound] = {}
        self.completed_rounds = 0
        self.aborted_rounds = 0

    def receive(self, conn: bytes, message: Message, key: str | None = None) -> list[Outgoing]:
        """Handle one message from a peer.

        Args:
            conn: The connection it arrived on.
            message: The decoded message.
            key: The connection's authenticated CURVE public key; None on an
                insecure scheduler, where keys are not checked.

        Raises:
            RemoteProtocolError: the message makes no sense here (state unchanged).
        """
        if isinstance(message, Signup):
            if key is not None and message.public_key != key:
                reason = "the sign-up's public key is not the key of its connection"
                log.warning("refusing %s: %s", message.peer_id, reason)
                return [
                    Outgoing(
                        conn, SignupRejected(message.session, message.peer_id, "bad_key", reason)
                    )
                ]
            return self._signup(conn, message)
        if isinstance(message, Heartbeat):
            return self._heartbeat(conn, message)
        if isinstance(message, Done):
            return self._done(conn, message)
        if isinstance(message, Leave):
            return self._leave(conn, message)
        if isinstance(message, Abort):
            return self._peer_abort(conn, message)
        raise RemoteProtocolError(f"scheduler does not accept {type(message).__name__}")

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work to do (None: nothing pending)."""
        due = [r.deadline for r in self.rounds.values()]
        live = self.liveness_timeout
        if live is not None:
            for rnd in self.rounds.values():
                due += [t + live for p, t in rnd.seen.items() if p not in rnd.done]
            for session in self.sessions.values():
                due += [w.seen + live for w in session.queue.values()]
        if self.min_size < self.target_size:
            for session in self.sessions.values():
                if len(session.queue) >= self.min_size:
                    due.append(min(w.joined for w in session.queue.values()) + self.queue_wait)
        return min(due, default=None)

    def tick(self) -> list[Outgoing]:
        """Abort overdue rounds and rounds with a silent member, drop silent queued
        peers, and form the smaller rounds whose queue wait is over."""
        now = self._clock()
        out: list[Outgoing] = []
        for rnd in [r for r in self.rounds.values() if r.deadline <= now]:
            waiting = sorted(set(rnd.members) - set(rnd.done))
            out += self._abort(rnd, f"round deadline passed; no Done from {', '.join(waiting)}")
        live = self.liveness_timeout
        if live is not None:
            for rnd in list(self.rounds.values()):
                silent = sorted(
                    p for p, t in rnd.seen.items() if p not in rnd.done and now >= t + live
                )
                if silent:
                    out += self._abort(
                        rnd,
                        f"member {', '.join(silent)} silent for more than {live:g} s "
                        "(dead, stopped or cut off)",
                    )
        for name, session in self.sessions.items():
            self._expire_queued(name, session, now)
            if (
                self.min_size < self.target_size
                and len(session.queue) >= self.min_size
                and now >= min(w.joined for w in session.queue.values()) + self.queue_wait
            ):
                out += self._form_round(name, session)
        return out

    def unreachable(self, conn: bytes) -> list[Outgoing]:
        """The transport could not deliver to ``conn``: drop it from queues, abort its rounds."""
        out: list[Outgoing] = []
        for session in self.sessions.values():
            for pid in [p for p, w in session.queue.items() if w.conn == conn]:
                log.warning("dropping unreachable peer %s from the queue", pid)
                del session.queue[pid]
        for rnd in [r for r in self.rounds.values() if conn in r.members.values()]:
            pid = next(p for p, c in rnd.members.items() if c == conn)
            out += self._abort(rnd, f"peer {pid} became unreachable")
        return out

    def _expire_queued(self, name: str, session: _Session, now: float) -> None:
        live = self.liveness_timeout
        if live is None:
            return
        for pid in [p for p, w in session.queue.items() if now >= w.seen + live]:
            log.warning(
                "dropping peer %s from session %r: silent for more than %g s", pid, name, live
            )
            del session.queue[pid]

    def _heartbeat(self, conn: bytes, msg: Heartbeat) -> list[Outgoing]:
        now = self._clock()
        for rnd in self.rounds.values():
            if rnd.members.get(msg.peer_id) == conn and msg.peer_id not in rnd.done:
                rnd.seen[msg.peer_id] = now
                return []
        session = self.sessions.get(msg.session)
        waiting = session.queue.get(msg.peer_id) if session else None
        if waiting is not None and waiting.conn == conn:
            waiting.seen = now
            return []
        if msg.round_id is not None:
            # A round we no longer follow (finished, aborted, or before a restart): the
            # peer has its Abort or its result, or finishes without us.
            log.debug("heartbeat of %s for round %s we do not follow", msg.peer_id, msg.round_id)
            return []
        log.info("heartbeat from unknown peer %s: asking it to sign up again", msg.peer_id)
        return [Outgoing(conn, Rejoin(msg.session, msg.peer_id))]

    def queued(self, session: str) -> int:
        """How many peers wait in ``session``."""
        s = self.sessions.get(session)
        return len(s.queue) if s else 0

    # -- internals -------------------------------------------------------

    def _signup(self, conn: bytes, msg: Signup) -> list[Outgoing]:
        try:
            schema = Schema.from_wire(msg.schema, msg.frac_bits)
        except ValueError as exc:
            return [
                Outgoing(
                    conn,
                    SignupRejected(msg.session, msg.peer_id, "bad_schema", f"bad schema: {exc}"),
                )
            ]
        if msg.round_key and not is_z85_key(msg.round_key):
            reason = "the round key is not a valid Z85 public key"
            return [Outgoing(conn, SignupRejected(msg.session, msg.peer_id, "bad_key", reason))]
        if msg.exponents is not None and len(msg.exponents) != len(schema.tensors):
            reason = f"{len(msg.exponents)} magnitude exponents for {len(schema.tensors)} tensors"
            return [Outgoing(conn, SignupRejected(msg.session, msg.peer_id, "bad_schema", reason))]
        holder = self._key_holding(msg.session, msg.peer_id)
        if holder is not None and holder != msg.public_key:
            # An id belongs to the key that holds it (queued or in a round): otherwise
            # anyone who learnt an id could take a victim's place or abort its round.
            reason = (
                f"peer id {msg.peer_id!r} is held by another key (queued or in a round); "
                "it is released when that peer leaves, finishes or is found dead"
            )
            log.warning("refusing a sign-up: %s", reason)
            return [Outgoing(conn, SignupRejected(msg.session, msg.peer_id, "id_in_use", reason))]
        out: list[Outgoing] = []
        # A member signing up again before its Done has left its round: it cannot finish.
        for rnd in [
            r
            for r in self.rounds.values()
            if msg.peer_id in r.members and msg.peer_id not in r.done
        ]:
            out += self._abort(rnd, f"peer {msg.peer_id} left the round and signed up again")
        session = self.sessions.setdefault(msg.session, _Session())
        session.queue.pop(msg.peer_id, None)
        reference = next(iter(session.queue.values()), None)
        if reference is not None:
            diff = reference.schema.difference(schema)
            if diff is not None:
                reason = (
                    f"model schema differs from session {msg.session!r} "
                    f"(fingerprint {schema.fingerprint()} vs "
                    f"{reference.schema.fingerprint()}): {diff}"
                )
                log.warning("refusing %s: %s", msg.peer_id, reason)
                return [
                    *out,
                    Outgoing(
                        conn, SignupRejected(msg.session, msg.peer_id, "schema_mismatch", reason)
                    ),
                ]
        now = self._clock()
        session.queue[msg.peer_id] = _Waiting(conn, msg, schema, joined=now, seen=now)
        log.info(
            "peer %s joined session %r (%d/%d waiting)",
            msg.peer_id,
            msg.session,
            len(session.queue),
            self.target_size,
        )
        out.append(Outgoing(conn, SignupAck(msg.session, msg.peer_id, len(session.queue))))
        self._expire_queued(msg.session, session, now)
        while len(session.queue) >= self.target_size:
            out += self._form_round(msg.session, session)
        return out

    def _key_holding(self, session: str, peer_id: str) -> str | None:
        """The public key that holds ``peer_id`` in ``session`` right now, if any."""
        queued = self.sessions.get(session)
        waiting = queued.queue.get(peer_id) if queued else None
        if waiting is not None:
            return waiting.signup.public_key
        for rnd in self.rounds.values():
            if rnd.session == session and peer_id in rnd.members and peer_id not in rnd.done:
                return rnd.keys.get(peer_id)
        return None

    def _form_round(self, name: str, session: _Session) -> list[Outgoing]:
        chosen = [session.queue.pop(pid) for pid in list(session.queue)[: self.target_size]]
        ids = [w.signup.peer_id for w in chosen]
        tree = build_tree(ids, self.group_size, self.num_actors, self._rng)
        round_id = self._new_round_id()
        now = self._clock()
        schema = chosen[0].schema
        choice = choose_ring(schema, [w.signup.exponents for w in chosen])
        ring, unsafe = choice.ring_bits, choice.reason
        if self.round_timeout is not None:
            budget = self.round_timeout
        else:
            vector_bytes = ring // 8 * schema.vector_size
            budget = self.deadline_policy.round_budget(vector_bytes, tree.depth, self.group_size)
        rnd = ActiveRound(
            round_id=round_id,
            session=name,
            members={w.signup.peer_id: w.conn for w in chosen},
            tree=tree,
            deadline=now + budget,
            started=now,
            seen={w.signup.peer_id: now for w in chosen},
            keys={w.signup.peer_id: w.signup.public_key for w in chosen},
        )
        self.rounds[round_id] = rnd
        if self.insecure:
            log.warning(
                "round %s runs WITHOUT ENCRYPTION (insecure=True): shares travel in plaintext",
                round_id,
            )
        log.info(
            "round %s of session %r: %d peers, depth %d, deadline %.1f s, %d-bit ring%s, tree %s",
            round_id,
            name,
            len(ids),
            tree.depth,
            budget,
            ring,
            f" ({unsafe})" if unsafe else "",
            format_tree(tree),
        )
        assignment = Assignment(
            session=name,
            round_id=round_id,
            members=[[w.signup.peer_id, w.signup.endpoint, w.signup.public_key] for w in chosen],
            tree=tree.to_wire(),
            group_size=self.group_size,
            num_actors=self.num_actors,
            total_weight=sum(w.signup.weight for w in chosen),
            deadline_s=budget,
            ring_bits=ring,
            exponents=list(choice.exponents) if choice.exponents is not None else None,
            round_keys=[w.signup.round_key for w in chosen],
        )
        return [Outgoing(w.conn, assignment) for w in chosen]

    def _done(self, conn: bytes, msg: Done) -> list[Outgoing]:
        rnd = self.rounds.get(msg.round_id)
        if rnd is None or rnd.members.get(msg.peer_id) != conn:
            raise RemoteProtocolError(f"Done for unknown round {msg.round_id} or from a non-member")
        rnd.done[msg.peer_id] = msg
        if len(rnd.done) == len(rnd.members):
            del self.rounds[rnd.round_id]
            self.completed_rounds += 1
            slowest = max(d.seconds for d in rnd.done.values())
            sent = sum(d.bytes_sent for d in rnd.done.values())
            log.info(
                "round %s complete: %d peers, slowest %.3f s, %d bytes sent in all",
                rnd.round_id,
                len(rnd.members),
                slowest,
                sent,
            )
        return []

    def _leave(self, conn: bytes, msg: Leave) -> list[Outgoing]:
        session = self.sessions.get(msg.session)
        waiting = session.queue.get(msg.peer_id) if session else None
        if session is None or waiting is None or waiting.conn != conn:
            raise RemoteProtocolError(
                f"Leave from {msg.peer_id}, which is not queued in {msg.session!r}"
            )
        del session.queue[msg.peer_id]
        log.info("peer %s left session %r", msg.peer_id, msg.session)
        return []

    def _peer_abort(self, conn: bytes, msg: Abort) -> list[Outgoing]:
        rnd = self.rounds.get(msg.round_id)
        if rnd is None or rnd.members.get(msg.peer_id) != conn:
            raise RemoteProtocolError(
                f"Abort for unknown round {msg.round_id} or from a non-member"
            )
        return self._abort(rnd, f"peer {msg.peer_id} gave up: {msg.reason}")

    def _abort(self, rnd: ActiveRound, reason: str) -> list[Outgoing]:
        del self.rounds[rnd.round_id]
        self.aborted_rounds += 1
        log.warning("aborting round %s: %s", rnd.round_id, reason)
        return [
            Outgoing(conn, Abort(rnd.round_id, SCHEDULER_ID, reason))
            for pid, conn in rnd.members.items()
            if pid not in rnd.done
        ]


def format_tree(tree: AggregationTree) -> str:
    """One line per level, e.g. ``L0: [a b c -> a,c] [d e f -> e,f]``."""
    return " | ".join(
        f"L{li}: "
        + " ".join(f"[{' '.join(g.participants)} -> {','.join(g.actors)}]" for g in level)
        for li, level in enumerate(tree.levels)
    )
