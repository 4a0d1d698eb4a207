"""The scheduler's logic, as a sans-IO state machine.

:class:`SchedulerState` keeps one waiting queue per session, forms a round
when ``target_size`` compatible peers wait, builds its tree, and follows the
round until every member reports :class:`~lightning_secagg.messages.Done` or
one of them gives up. It sees sign-ups, stats and failures, never model data.

Connections are opaque ``bytes`` (ZeroMQ routing ids in production); the
clock, the shuffle randomness and the round ids are injected.

What an outsider can make it hold is bounded: a sign-up's schema is checked
against ``max_elements`` before anything is built from it, and kept only in
its packed wire form, once per distinct schema (``max_schema_bytes`` in all);
a key holds at most ``max_ids_per_key`` queued peer ids and all keys together
at most ``max_queued``; a session whose queue empties is deleted. Queues are
grouped by schema: a round forms from peers of one session *and* one schema,
so a peer with another model cannot keep the others out (it just waits alone).
With a :class:`~lightning_secagg.roster.Roster`, only listed keys may sign up.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from lightning_secagg.deadlines import DEFAULT_POLICY, DeadlinePolicy
from lightning_secagg.errors import ConfigurationError, RemoteProtocolError
from lightning_secagg.messages import (
    MAX_LEFT_IDS,
    MAX_REASON_LEN,
    Abort,
    Assignment,
    Done,
    Farewell,
    Heartbeat,
    Leave,
    Message,
    Rejoin,
    Signup,
    SignupAck,
    SignupRejected,
    WaitingStatus,
    is_z85_key,
    safe_text,
)
from lightning_secagg.ratelimit import LogLimiter
from lightning_secagg.ring import choose_ring
from lightning_secagg.roster import Roster, key_fingerprint
from lightning_secagg.schema import Schema
from lightning_secagg.tree import AggregationTree, ShuffleRandom, build_tree, validate_tree_params

log = logging.getLogger(__name__)

SCHEDULER_ID = "scheduler"
#: Default bound on a model's elements (count slot aside): 2**34, 64 GiB as float32.
DEFAULT_MAX_ELEMENTS = 2**34
#: Default bound on the packed schemas held at once, over all distinct schemas.
DEFAULT_MAX_SCHEMA_BYTES = 256 * 1024 * 1024
#: Default bound on queued peers over all sessions.
DEFAULT_MAX_QUEUED = 10_000
#: Seconds a leave for good counts towards the "too few peers" rule.
DEFAULT_LEAVER_MEMORY = 3600.0
#: The rule's grace, in seconds, where ``queue_wait`` is 0.
DEFAULT_LEAVE_GRACE = 5.0
#: Waiting statuses pushed to smaller schema groups per sign-up.
MAX_MINORITY_PUSHES = 16
#: Sessions whose recent leavers are remembered (the oldest is forgotten first).
MAX_LEAVER_SESSIONS = 1024
#: Sign-ups whose connection is remembered for a later Farewell (oldest dropped first).
MAX_SIGNED_UP = 65536


def schema_elements(entries: Sequence[Any], limit: int) -> int:
    """Elements of a wire schema ``[[name, [dims...], dtype], ...]``, refusing more than ``limit``.

    Runs before anything is built from the schema: dimensions are multiplied
    one at a time and the count is given up as soon as it passes ``limit``, so
    no size, however absurd, is ever multiplied out in full (nor reaches a
    float conversion downstream).

    Raises:
        ValueError: a dimension is not a non-negative int, or the model has
            more than ``limit`` elements (the message says which tensor).
    """
    total = 0
    for entry in entries:
        name, dims = entry[0], entry[1]
        if not all(type(d) is int and d >= 0 for d in dims):
            raise ValueError(f"bad shape for schema entry {safe_text(name, 80)!r}")
        if 0 in dims:
            continue
        numel = 1
        for d in dims:
            numel *= d
            if numel > limit:
                break
        total += numel
        if total > limit:
            raise ValueError(
                f"the model has more than {limit} elements (tensor {safe_text(name, 80)!r} "
                f"alone: shape of {len(dims)} dimensions); raise max_elements if this is meant"
            )
    return total


@dataclass(frozen=True)
class Outgoing:
    """An instruction to the transport: deliver ``message`` on connection ``conn``."""

    conn: bytes
    message: Message


@dataclass
class _Waiting:
    """A queued peer: what a round needs of its sign-up, and nothing bigger.

    ``schema`` is the key of its schema in :attr:`SchedulerState.schemas`;
    ``exponents`` are packed one signed byte per tensor.
    """

    conn: bytes
    peer_id: str
    endpoint: str
    public_key: str
    weight: float
    round_key: str
    schema: str
    exponents: bytes | None
    joined: float = 0.0
    seen: float = 0.0


@dataclass
class HeldSchema:
    """One distinct schema, held once however many peers wait with it.

    Attributes:
        packed: ``msgpack([entries, frac_bits])``, about its size on the wire.
        fingerprint: :meth:`Schema.fingerprint`, for logs and pinning.
        vector_size: Ring elements of an encoded vector.
        holders: Queued peers with this schema (deleted at 0).
    """

    packed: bytes
    fingerprint: str
    vector_size: int
    holders: int = 0

    def schema(self) -> Schema:
        """Rebuild the full schema (only when a round forms)."""
        entries, frac_bits = msgpack.unpackb(self.packed, raw=False)
        return Schema.from_wire(entries, frac_bits)


@dataclass
class _Session:
    """Peers waiting in one session, any schema, in arrival order; and how many per schema."""

    queue: dict[str, _Waiting] = field(default_factory=dict)
    per_schema: dict[str, int] = field(default_factory=dict)


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
        rng: Randomness for the tree and for choosing members when more peers wait
            than a round takes (a CSPRNG in production).
        new_round_id: Round id factory.
        roster: Only these keys may sign up (admission control); None admits
            any key, which is logged once per round. Replace it with
            :meth:`set_roster`. Needs authenticated keys (not ``insecure``).
        max_ids_per_key: Queued peer ids one key may hold at once, all sessions
            together (checked where the connection's key is known).
        max_queued: Queued peers over all sessions.
        max_elements: Largest model accepted, in elements; checked before
            anything is built from a sign-up's schema.
        max_schema_bytes: Packed schemas held at once, over all distinct schemas.
        schema_fingerprint: Pin: only sign-ups whose schema has this
            :meth:`Schema.fingerprint` are accepted (None: any schema, each
            queued with its own kind).
        leaver_memory: Seconds a peer's :class:`Farewell` (it left the session
            for good) counts towards the "too few peers" rule.

    The "too few peers" rule: a queued peer is refused with ``too_few_peers``
    when (1) a peer of its session left for good (:class:`Farewell`) less than
    ``leaver_memory`` seconds ago, (2) fewer than ``min_size`` peers with its
    schema wait in the session, and (3) that has lasted ``grace`` seconds since
    both the last leave and the oldest such peer's sign-up, where ``grace`` is
    ``queue_wait`` (or :data:`DEFAULT_LEAVE_GRACE` where that is 0). A federation
    that is merely slow to start has no leaver and is never refused; peers that
    still come within the grace (or are in a round, and sign up again at once)
    keep the session alive. A leaver that signs up again is no longer a leaver.
    The rule runs in :meth:`tick`; all peers of the short schema are refused at once.
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
        roster: Roster | None = None,
        max_ids_per_key: int = 1,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        max_schema_bytes: int = DEFAULT_MAX_SCHEMA_BYTES,
        schema_fingerprint: str | None = None,
        leaver_memory: float = DEFAULT_LEAVER_MEMORY,
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
        for name, value in (
            ("max_ids_per_key", max_ids_per_key),
            ("max_queued", max_queued),
            ("max_elements", max_elements),
            ("max_schema_bytes", max_schema_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(leaver_memory, (int, float)) and 0 < leaver_memory < float("inf")):
            raise ConfigurationError(f"leaver_memory must be > 0 seconds, got {leaver_memory!r}")
        if roster is not None and insecure:
            raise ConfigurationError(
                "a roster needs authenticated keys: it cannot be used with insecure=True"
            )
        if schema_fingerprint is not None:
            schema_fingerprint = str(schema_fingerprint).lower()
            if len(schema_fingerprint) != 16 or any(
                c not in "0123456789abcdef" for c in schema_fingerprint
            ):
                raise ConfigurationError(
                    "schema_fingerprint must be the 16 hex digits of Schema.fingerprint(), "
                    f"got {schema_fingerprint!r:.40}"
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
        self.roster = roster
        self.max_ids_per_key = max_ids_per_key
        self.max_queued = max_queued
        self.max_elements = max_elements
        self.max_schema_bytes = max_schema_bytes
        self.schema_fingerprint = schema_fingerprint
        self.leaver_memory = float(leaver_memory)
        #: Recent leavers for good per session: (peer id, when), newest last, bounded.
        self.leavers: dict[str, deque[tuple[str, float]]] = {}
        #: The connection of each (session, peer id)'s latest sign-up, oldest first,
        #: at most ``MAX_SIGNED_UP`` entries: a Farewell counts only from the
        #: connection that signed that id up, so nobody can say that another peer left.
        self._signed_up: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.sessions: dict[str, _Session] = {}
        #: Distinct schemas of the queued peers, by SHA-256 of their packed form.
        self.schemas: dict[str, HeldSchema] = {}
        self.schema_bytes = 0
        #: Queued (session, peer id) pairs per authenticated key.
        self.key_ids: dict[str, set[tuple[str, str]]] = {}
        self.queued_total = 0
        self._refusals = LogLimiter(log, clock=clock)
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
            return self._admit(conn, message, key)
        handler = {
            Heartbeat: self._heartbeat,
            Done: self._done,
            Leave: self._leave,
            Farewell: self._farewell,
            Abort: self._peer_abort,
        }.get(type(message))
        if handler is None:
            raise RemoteProtocolError(f"scheduler does not accept {type(message).__name__}")
        return handler(conn, message)  # type: ignore[arg-type]

    def _admit(self, conn: bytes, message: Signup, key: str | None) -> list[Outgoing]:
        """A sign-up from its connection's own key, and from a key on the roster if any."""
        if key is not None and message.public_key != key:
            reason = "the sign-up's public key is not the key of its connection"
            log.warning("refusing %s: %s", message.peer_id, reason)
            return [
                Outgoing(conn, SignupRejected(message.session, message.peer_id, "bad_key", reason))
            ]
        if self.roster is not None and not self.roster.admits(key):
            if self._refusals.allow():
                log.warning(
                    "refusing a sign-up from key %s: not on the roster",
                    key_fingerprint(key or message.public_key),
                )
            reason = (
                f"this scheduler admits only the keys on its roster; yours (fingerprint "
                f"{key_fingerprint(key or message.public_key)}) is not on it"
            )
            return [
                Outgoing(
                    conn,
                    SignupRejected(message.session, message.peer_id, "not_admitted", reason),
                )
            ]
        return self._signup(conn, message, key)

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
                for schema in self._groups_of(session, self.min_size):
                    oldest = min(w.joined for w in session.queue.values() if w.schema == schema)
                    due.append(oldest + self.queue_wait)
        due += [t for _, _, t in self._too_few_due()]
        return min(due, default=None)

    @property
    def leave_grace(self) -> float:
        """Seconds the "too few peers" rule waits (see the class docstring)."""
        return self.queue_wait if self.queue_wait > 0 else DEFAULT_LEAVE_GRACE

    def _too_few_due(self) -> list[tuple[str, str, float]]:
        """(session, schema, when) for each schema group short of ``min_size`` after a leave."""
        now = self._clock()
        out = []
        for name, left in self.leavers.items():
            session = self.sessions.get(name)
            if session is None or not left or now >= left[-1][1] + self.leaver_memory:
                continue
            for schema, n in session.per_schema.items():
                if n >= self.min_size:
                    continue
                oldest = min(w.joined for w in session.queue.values() if w.schema == schema)
                out.append((name, schema, max(left[-1][1], oldest) + self.leave_grace))
        return out

    def _too_few(self, now: float) -> list[Outgoing]:
        """Refuse the peers of every schema group that the rule finds short."""
        out: list[Outgoing] = []
        due = self._too_few_due()
        # Counts as they were before anyone is refused: each group hears of the others.
        counts = {name: dict(self.sessions[name].per_schema) for name, _, _ in due}
        for name, schema, when in due:
            session = self.sessions.get(name)
            if now < when or session is None or schema not in session.per_schema:
                continue
            mine = counts[name][schema]
            others = sum(n for d, n in counts[name].items() if d != schema)
            left = ", ".join(pid for pid, _ in self.leavers[name])
            reason = (
                f"too few peers remain in session {name!r}: {mine} wait with your model "
                f"(schema {self.schemas[schema].fingerprint}), a round needs at least "
                f"{self.min_size}, and {left} left for good"
            )
            if others:
                reason += f"; {others} wait with a different model schema"
            log.warning("session %r: %s", name, reason)
            reason = safe_text(reason, MAX_REASON_LEN)
            for pid in [p for p, w in session.queue.items() if w.schema == schema]:
                w = self._drop(name, session, pid)
                out.append(Outgoing(w.conn, SignupRejected(name, pid, "too_few_peers", reason)))
        return out

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
        for name in [
            n for n, left in self.leavers.items() if now >= left[-1][1] + self.leaver_memory
        ]:
            del self.leavers[name]
        out += self._too_few(now)
        for name, session in list(self.sessions.items()):
            self._expire_queued(name, session, now)
            if self.min_size >= self.target_size:
                continue
            for schema in self._groups_of(session, self.min_size):
                oldest = min(w.joined for w in session.queue.values() if w.schema == schema)
                if now >= oldest + self.queue_wait:
                    out += self._form_round(name, session, schema)
        return out

    def set_roster(self, roster: Roster | None) -> None:
        """Replace the roster; queued peers whose key it no longer lists are dropped.

        Rounds already formed run to their end.

        Raises:
            ConfigurationError: a roster on an insecure scheduler.
        """
        if roster is not None and self.insecure:
            raise ConfigurationError("a roster cannot be used with insecure=True")
        self.roster = roster
        if roster is None:
            return
        for name, session in list(self.sessions.items()):
            for pid in [p for p, w in session.queue.items() if not roster.admits(w.public_key)]:
                log.warning(
                    "dropping peer %s from session %r: its key %s left the roster",
                    pid,
                    name,
                    key_fingerprint(session.queue[pid].public_key),
                )
                self._drop(name, session, pid)

    def unreachable(self, conn: bytes) -> list[Outgoing]:
        """The transport could not deliver to ``conn``: drop it from queues, abort its rounds."""
        out: list[Outgoing] = []
        for name, session in list(self.sessions.items()):
            for pid in [p for p, w in session.queue.items() if w.conn == conn]:
                log.warning("dropping unreachable peer %s from the queue", pid)
                self._drop(name, session, pid)
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
            self._drop(name, session, pid)

    def _drop(self, name: str, session: _Session, pid: str) -> _Waiting:
        """Remove a queued peer and everything held for it; delete its session once empty."""
        w = session.queue.pop(pid)
        self.queued_total -= 1
        left = session.per_schema[w.schema] - 1
        if left:
            session.per_schema[w.schema] = left
        else:
            del session.per_schema[w.schema]
        held = self.schemas[w.schema]
        held.holders -= 1
        if held.holders == 0:
            del self.schemas[w.schema]
            self.schema_bytes -= len(held.packed)
        ids = self.key_ids.get(w.public_key)
        if ids is not None:
            ids.discard((name, pid))
            if not ids:
                del self.key_ids[w.public_key]
        if not session.queue:
            del self.sessions[name]
        return w

    def _groups_of(self, session: _Session, size: int) -> list[str]:
        """The schemas with at least ``size`` peers waiting in ``session``."""
        return [schema for schema, n in session.per_schema.items() if n >= size]

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
            assert session is not None  # noqa: S101 - waiting is in it
            mine = session.per_schema[waiting.schema]
            status = WaitingStatus(
                msg.session,
                msg.peer_id,
                mine,
                len(session.queue) - mine,
                self.target_size,
                self.min_size,
                [pid for pid, _ in self.leavers.get(msg.session, ())],
            )
            return [Outgoing(conn, status)]
        if msg.round_id is not None:
            # A round we no longer follow (finished, aborted, or before a restart): the
            # peer has its Abort or its result, or finishes without us.
            log.debug("heartbeat of %s for round %s we do not follow", msg.peer_id, msg.round_id)
            return []
        log.info("heartbeat from unknown peer %s: asking it to sign up again", msg.peer_id)
        return [Outgoing(conn, Rejoin(msg.session, msg.peer_id))]

    def queued(self, session: str) -> int:
        """How many peers wait in ``session`` (all schemas)."""
        s = self.sessions.get(session)
        return len(s.queue) if s else 0

    # -- internals -------------------------------------------------------

    def _refuse(self, conn: bytes, msg: Signup, code: str, reason: str) -> list[Outgoing]:
        """A rate-limited log line and a :class:`SignupRejected` with an escaped, bounded reason."""
        reason = safe_text(reason, MAX_REASON_LEN)
        if self._refusals.allow():
            log.warning("refusing %s (%s): %s", msg.peer_id, code, safe_text(reason, 300))
        return [Outgoing(conn, SignupRejected(msg.session, msg.peer_id, code, reason))]

    def _signup(self, conn: bytes, msg: Signup, key: str | None = None) -> list[Outgoing]:
        # Sizes first: nothing is built from the schema before its element count
        # is known to be sane (an absurd one used to overflow the deadline).
        try:
            elements = schema_elements(msg.schema, self.max_elements)
        except ValueError as exc:
            code = "schema_too_large" if "elements" in str(exc) else "bad_schema"
            return self._refuse(conn, msg, code, f"bad schema: {exc}")
        packed = msgpack.packb([msg.schema, msg.frac_bits], use_bin_type=True)
        digest = hashlib.sha256(packed).hexdigest()
        held = self.schemas.get(digest)
        if held is None:
            try:
                schema = Schema.from_wire(msg.schema, msg.frac_bits)
            except ValueError as exc:
                return self._refuse(conn, msg, "bad_schema", f"bad schema: {exc}")
            if elements == 0:
                return self._refuse(conn, msg, "bad_schema", "bad schema: no elements")
            fingerprint = schema.fingerprint()
        else:
            fingerprint = held.fingerprint
            schema = None
        if self.schema_fingerprint is not None and fingerprint != self.schema_fingerprint:
            reason = (
                f"this scheduler accepts only models with schema fingerprint "
                f"{self.schema_fingerprint}; yours is {fingerprint}"
                f"{self._pinned_difference(schema)}"
            )
            return self._refuse(conn, msg, "schema_mismatch", reason)
        del schema  # only the packed form is kept
        if msg.round_key and not is_z85_key(msg.round_key):
            return self._refuse(conn, msg, "bad_key", "the round key is not a valid Z85 public key")
        tensors = len(msg.schema)
        if msg.exponents is not None and len(msg.exponents) != tensors:
            reason = f"{len(msg.exponents)} magnitude exponents for {tensors} tensors"
            return self._refuse(conn, msg, "bad_schema", reason)
        holder = self._key_holding(msg.session, msg.peer_id)
        if holder is not None and holder != msg.public_key:
            # An id belongs to the key that holds it (queued or in a round): otherwise
            # anyone who learnt an id could take a victim's place or abort its round.
            reason = (
                f"peer id {msg.peer_id!r} is held by another key (queued or in a round); "
                "it is released when that peer leaves, finishes or is found dead"
            )
            return self._refuse(conn, msg, "id_in_use", reason)
        session_now = self.sessions.get(msg.session)
        requeue = session_now is not None and msg.peer_id in session_now.queue
        if key is not None and not requeue:
            held_ids = self.key_ids.get(key, set())
            if len(held_ids) >= self.max_ids_per_key:
                reason = (
                    f"your key (fingerprint {key_fingerprint(key)}) already holds "
                    f"{len(held_ids)} queued peer id(s), the most one key may hold "
                    f"(max_ids_per_key={self.max_ids_per_key})"
                )
                return self._refuse(conn, msg, "key_quota", reason)
        if not requeue and self.queued_total >= self.max_queued:
            reason = f"the scheduler's queues are full ({self.max_queued} peers); retry later"
            return self._refuse(conn, msg, "busy", reason)
        if held is None and self.schema_bytes + len(packed) > self.max_schema_bytes:
            reason = (
                f"the scheduler holds {self.max_schema_bytes} bytes of distinct schemas "
                "already; retry later"
            )
            return self._refuse(conn, msg, "busy", reason)
        out: list[Outgoing] = []
        # A member signing up again before its Done has left its round: it cannot finish.
        for rnd in [
            r
            for r in self.rounds.values()
            if msg.peer_id in r.members and msg.peer_id not in r.done
        ]:
            out += self._abort(rnd, f"peer {msg.peer_id} left the round and signed up again")
        if requeue and session_now is not None:
            self._drop(msg.session, session_now, msg.peer_id)
        if digest not in self.schemas:  # (a re-queue may just have released it)
            vector_size = 1 + elements
            self.schemas[digest] = HeldSchema(packed, fingerprint, vector_size)
            self.schema_bytes += len(packed)
        self.schemas[digest].holders += 1
        session = self.sessions.setdefault(msg.session, _Session())
        now = self._clock()
        exps = None if msg.exponents is None else array("b", msg.exponents).tobytes()
        session.queue[msg.peer_id] = _Waiting(
            conn,
            msg.peer_id,
            msg.endpoint,
            msg.public_key,
            msg.weight,
            msg.round_key,
            digest,
            exps,
            joined=now,
            seen=now,
        )
        session.per_schema[digest] = session.per_schema.get(digest, 0) + 1
        self.queued_total += 1
        self._signed_up.pop((msg.session, msg.peer_id), None)
        self._signed_up[(msg.session, msg.peer_id)] = conn
        while len(self._signed_up) > MAX_SIGNED_UP:
            self._signed_up.popitem(last=False)
        left = self.leavers.get(msg.session)
        if left is not None and any(pid == msg.peer_id for pid, _ in left):
            kept = [e for e in left if e[0] != msg.peer_id]  # it is back: no longer a leaver
            left.clear()
            left.extend(kept)
            if not left:
                del self.leavers[msg.session]
        if key is not None:
            self.key_ids.setdefault(key, set()).add((msg.session, msg.peer_id))
        mine = session.per_schema[digest]
        note = ""
        biggest = max(session.per_schema.values())
        if biggest > mine:
            others = sum(n for d, n in session.per_schema.items() if d != digest)
            major = next(d for d, n in session.per_schema.items() if n == biggest)
            note = (
                f"{others} other peer(s) wait in session {msg.session!r} with a different model "
                f"schema; yours (fingerprint {fingerprint}) forms rounds only with the "
                f"{mine} that share it{self._difference(major, digest)}"
            )
            if self._refusals.allow():
                log.warning("peer %s: %s", msg.peer_id, safe_text(note, 500))
        log.info(
            "peer %s joined session %r, schema %s (%d/%d waiting)",
            msg.peer_id,
            msg.session,
            fingerprint,
            mine,
            self.target_size,
        )
        ack = SignupAck(msg.session, msg.peer_id, mine, safe_text(note, MAX_REASON_LEN))
        out.append(Outgoing(conn, ack))
        out += self._tell_minorities(msg.session, session, digest)
        self._expire_queued(msg.session, session, now)
        while (
            msg.session in self.sessions
            and self.sessions[msg.session].per_schema.get(digest, 0) >= self.target_size
        ):
            out += self._form_round(msg.session, self.sessions[msg.session], digest)
        return out

    def _tell_minorities(self, name: str, session: _Session, digest: str) -> list[Outgoing]:
        """Tell the peers of smaller schema groups at once that a bigger group waits.

        A peer whose model differs from that of most peers waiting in its session
        learns it when they sign up, not at its next heartbeat. Bounded: only
        groups below ``min_size``, at most :data:`MAX_MINORITY_PUSHES` messages.
        """
        bigger = session.per_schema[digest]
        short = {d for d, n in session.per_schema.items() if n < bigger and n < self.min_size}
        out: list[Outgoing] = []
        if not short:
            return out
        left = [pid for pid, _ in self.leavers.get(name, ())]
        for w in session.queue.values():
            if w.schema in short and len(out) < MAX_MINORITY_PUSHES:
                mine = session.per_schema[w.schema]
                status = WaitingStatus(
                    name,
                    w.peer_id,
                    mine,
                    len(session.queue) - mine,
                    self.target_size,
                    self.min_size,
                    left,
                )
                out.append(Outgoing(w.conn, status))
        return out

    def _pinned_difference(self, schema: Schema | None) -> str:
        """``": <how schema differs from the pinned one>"`` where a queued peer holds the
        pinned schema and both are small (the pin itself is only a fingerprint), else ``""``."""
        if schema is None:
            return ""
        pinned = next(
            (h for h in self.schemas.values() if h.fingerprint == self.schema_fingerprint), None
        )
        if pinned is None or len(pinned.packed) > 64 * 1024 or len(schema.tensors) > 4096:
            return ""
        diff = pinned.schema().difference(schema)
        return "" if diff is None else f" ({diff})"

    def _difference(self, reference: str, other: str) -> str:
        """``": <how other differs from reference>"`` for small schemas, else ``""``.

        Both are rebuilt from their packed form only when small, so a note never
        costs more than a few times 64 KiB.
        """
        ref, oth = self.schemas[reference], self.schemas[other]
        if max(len(ref.packed), len(oth.packed)) > 64 * 1024:
            return ""
        diff = ref.schema().difference(oth.schema())
        return "" if diff is None else f" (most waiting peers' schema is {ref.fingerprint}: {diff})"

    def _key_holding(self, session: str, peer_id: str) -> str | None:
        """The public key that holds ``peer_id`` in ``session`` right now, if any."""
        queued = self.sessions.get(session)
        waiting = queued.queue.get(peer_id) if queued else None
        if waiting is not None:
            return waiting.public_key
        for rnd in self.rounds.values():
            if rnd.session == session and peer_id in rnd.members and peer_id not in rnd.done:
                return rnd.keys.get(peer_id)
        return None

    def _form_round(self, name: str, session: _Session, digest: str) -> list[Outgoing]:
        eligible = [p for p, w in session.queue.items() if w.schema == digest]
        if len(eligible) > self.target_size:
            # Chosen at random, not first-in-first-out: whoever signs up first (or
            # times sign-ups around a victim's) cannot decide who shares its round.
            # Members stay in arrival order, so the member list itself says nothing.
            picked = set(self._rng.sample(eligible, self.target_size))
            eligible = [p for p in eligible if p in picked]
        pids = eligible
        held = self.schemas[digest]
        schema = held.schema()
        chosen = [self._drop(name, session, pid) for pid in pids]
        ids = [w.peer_id for w in chosen]
        tree = build_tree(ids, self.group_size, self.num_actors, self._rng)
        round_id = self._new_round_id()
        now = self._clock()
        choice = choose_ring(
            schema,
            [None if w.exponents is None else array("b", w.exponents).tolist() for w in chosen],
        )
        ring, unsafe = choice.ring_bits, choice.reason
        if self.round_timeout is not None:
            budget = self.round_timeout
        else:
            vector_bytes = ring // 8 * held.vector_size
            budget = self.deadline_policy.round_budget(vector_bytes, tree.depth, self.group_size)
        rnd = ActiveRound(
            round_id=round_id,
            session=name,
            members={w.peer_id: w.conn for w in chosen},
            tree=tree,
            deadline=now + budget,
            started=now,
            seen={w.peer_id: now for w in chosen},
            keys={w.peer_id: w.public_key for w in chosen},
        )
        self.rounds[round_id] = rnd
        if self.insecure:
            log.warning(
                "round %s runs WITHOUT ENCRYPTION (insecure=True): shares travel in plaintext",
                round_id,
            )
        elif self.roster is None:
            log.warning(
                "round %s: no roster (allow_keys), so anyone with a key could join this round; "
                "its privacy then depends on who did (see docs/threat-model.md)",
                round_id,
            )
        log.info(
            "round %s of session %r: %d peers, schema %s, depth %d, deadline %.1f s, "
            "%d-bit ring%s, tree %s",
            round_id,
            name,
            len(ids),
            held.fingerprint,
            tree.depth,
            budget,
            ring,
            f" ({safe_text(unsafe, 200)})" if unsafe else "",
            format_tree(tree),
        )
        assignment = Assignment(
            session=name,
            round_id=round_id,
            members=[[w.peer_id, w.endpoint, w.public_key] for w in chosen],
            tree=tree.to_wire(),
            group_size=self.group_size,
            num_actors=self.num_actors,
            total_weight=sum(w.weight for w in chosen),
            deadline_s=budget,
            ring_bits=ring,
            exponents=list(choice.exponents) if choice.exponents is not None else None,
            round_keys=[w.round_key for w in chosen],
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
        self._drop(msg.session, session, msg.peer_id)
        log.info("peer %s left session %r", msg.peer_id, msg.session)
        return []

    def _farewell(self, conn: bytes, msg: Farewell) -> list[Outgoing]:
        """A peer leaves for good: out of the queue at once, and remembered as a leaver."""
        session = self.sessions.get(msg.session)
        waiting = session.queue.get(msg.peer_id) if session else None
        if self._signed_up.get((msg.session, msg.peer_id)) != conn:
            # Only the connection that signed this id up may say it left: otherwise
            # anyone could drop a waiting peer or make a short group give up early.
            raise RemoteProtocolError(f"Farewell for {msg.peer_id} from another connection")
        del self._signed_up[(msg.session, msg.peer_id)]
        if waiting is not None:
            self._drop(msg.session, session, msg.peer_id)  # type: ignore[arg-type]
        left = self.leavers.pop(msg.session, None)
        if left is None:
            left = deque(maxlen=MAX_LEFT_IDS)
            while len(self.leavers) >= MAX_LEAVER_SESSIONS:
                del self.leavers[next(iter(self.leavers))]
        self.leavers[msg.session] = left  # newest session last
        known = [e for e in left if e[0] != msg.peer_id]
        left.clear()
        left.extend(known)
        left.append((msg.peer_id, self._clock()))
        log.info("peer %s left session %r for good", msg.peer_id, msg.session)
        return []

    def _peer_abort(self, conn: bytes, msg: Abort) -> list[Outgoing]:
        rnd = self.rounds.get(msg.round_id)
        if rnd is None or rnd.members.get(msg.peer_id) != conn:
            raise RemoteProtocolError(
                f"Abort for unknown round {msg.round_id} or from a non-member"
            )
        return self._abort(rnd, f"peer {msg.peer_id} gave up: {safe_text(msg.reason, 1024)}")

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
