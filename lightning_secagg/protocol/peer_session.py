"""One peer's session with the scheduler and its rounds, as a sans-IO state machine.

:class:`PeerSession` is to the peer what
:class:`~lightning_secagg.protocol.scheduler_state.SchedulerState` is to the
scheduler: everything from sign-up to the end of a round, with no socket,
thread, clock, torch or Lightning inside. The shell
(:class:`~lightning_secagg.peer.Peer`) feeds it what arrives
(:meth:`~PeerSession.receive_scheduler`, :meth:`~PeerSession.receive_peer`),
the time (:meth:`~PeerSession.tick`), and sends what it returns; the in-memory
networks of the tests do the same with many sessions and a fake clock, so they
run the production code.

One call (:meth:`~PeerSession.begin`) goes through these states::

    IDLE --begin--> SIGNING_UP --SignupAck--> QUEUED --Assignment--> IN_ROUND --all segments--> DONE
                        |  ^                     |                      |
                        |  +------Rejoin---------+                      |
                        +---- refusal, deadline, abort, bad total ------+--> FAILED
                                       (retryable, attempts left: SIGNING_UP again)

Invariants:

* A message that makes no sense in the current state raises
  :class:`~lightning_secagg.errors.RemoteProtocolError` and leaves the state
  unchanged; the shell logs and drops it.
* Every wait has a deadline: :meth:`~PeerSession.next_deadline` is never None
  while a call is in progress, and :meth:`~PeerSession.tick` ends the call (or
  starts its retry) once it has passed.
* The session only ever accepts an assignment after this attempt's own
  ``SignupAck``, for a round it has not finished or given up, that names it,
  whose tree matches its member list, whose total weight covers its own and
  whose ring its own values fit (:func:`~lightning_secagg.ring.check_relayed_ring`).
* Messages of a round it is not assigned to yet are kept, within a count and a
  byte budget, and fed to the round once it is; messages of a finished round
  are dropped.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lightning_secagg.deadlines import describe_phase, phase_deadline
from lightning_secagg.errors import (
    ForeignMemberError,
    InvalidTotalError,
    LocalProtocolError,
    PeerIdInUseError,
    RemoteProtocolError,
    ResultMismatchError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SchemaMismatchError,
    SignupRejectedError,
    TooFewPeersError,
)
from lightning_secagg.messages import (
    Abort,
    Assignment,
    Done,
    Farewell,
    Heartbeat,
    Leave,
    Message,
    Rejoin,
    Result,
    Signup,
    SignupAck,
    SignupRejected,
    WaitingStatus,
)
from lightning_secagg.protocol.peer_round import Send
from lightning_secagg.protocol.segmented_round import SegmentedRound
from lightning_secagg.ring import RingPlan, check_relayed_ring
from lightning_secagg.roster import Roster, key_fingerprint
from lightning_secagg.schema import Schema, result_span, round_segments
from lightning_secagg.sharing import RandomBytes
from lightning_secagg.tree import AggregationTree

log = logging.getLogger(__name__)

#: Messages of rounds we have not been assigned yet, kept until the assignment arrives.
MAX_EARLY_MESSAGES = 256
#: Bytes of such messages kept at most, beyond what the model's own shares need
#: (see :meth:`PeerSession.begin`): the oldest are dropped first.
EARLY_BYTES_MARGIN = 1 << 20
#: Finished or abandoned rounds remembered, so that their late messages are dropped.
FINISHED_ROUNDS = 64
#: Characters of an abort reason sent to the scheduler at most.
MAX_REASON_CHARS = 4000


class State(enum.Enum):
    """Where one call of a peer stands (see the module docstring)."""

    IDLE = "idle"
    SIGNING_UP = "signing up"
    QUEUED = "queued"
    IN_ROUND = "in round"
    DONE = "done"
    FAILED = "failed"


ACTIVE = frozenset({State.SIGNING_UP, State.QUEUED, State.IN_ROUND})


def is_retryable(exc: BaseException) -> bool:
    """Whether a new round may succeed where this error ended one (timeouts, aborts,
    unreachable members); a refused sign-up would be refused again.

    A :class:`ResultMismatchError` is not retried either: some member changed a
    sum, and a blind retry would hand it (or a scheduler grinding for a round it
    likes) another try; ``on_failure`` decides what happens next.

    The one rule every retry loop uses: the session's own, and through it the
    peer's and the callback's.
    """
    return isinstance(exc, RoundFailedError) and not isinstance(
        exc, SignupRejectedError | ResultMismatchError
    )


def describe_waiting(status: WaitingStatus) -> str:
    """One line for a :class:`WaitingStatus`: who waits, for what, and who left."""
    line = (
        f"{status.waiting} peer(s) with this model wait in session {status.session!r} "
        f"for a round of {status.target_size} (at least {status.min_size} after the queue wait)"
    )
    if status.others:
        line += f"; {status.others} wait with a different model schema"
    if status.left:
        line += f"; left for good: {', '.join(status.left)}"
    return line


def result_slot(
    state: SegmentedRound, sender: str, header: dict[str, Any], nbytes: int
) -> np.ndarray | None:
    """Where a sealed payload may be decrypted, asked before it is: a result
    segment's slice of the round's result buffer, if the (authenticated,
    unpacked) header names one the round waits for from ``sender``
    (:meth:`SegmentedRound.result_slot`); None (a buffer of its own) otherwise."""
    if header.get("t") != Result.TYPE or header.get("sender") != sender:
        return None
    return state.result_slot(header.get("segment"), sender, nbytes)  # type: ignore[arg-type]


# -- what goes in ------------------------------------------------------------


@dataclass(frozen=True)
class Contribution:
    """What one call brings to a round, torch-free: the model as the protocol sees it.

    Attributes:
        schema: The model's layout.
        weight: This peer's weight (> 0).
        exponents: Each tensor's magnitude exponent, declared at sign-up so that
            the scheduler can pick the compact ring; None keeps to the 64-bit ring.
        encode: ``encode(share, plan, (a, b))``: data elements ``[a, b)`` of the
            model times ``share`` (this peer's weight over the round's total),
            encoded into the ring of ``plan``, with the segment's count slot.
        decode: ``decode(total, plan, (a, b), out)``: a segment's ring total
            decoded into ``out``, its slice of the result buffer (every byte written).
    """

    schema: Schema
    weight: float
    exponents: list[int] | None
    encode: Callable[[float, RingPlan, tuple[int, int]], np.ndarray]
    decode: Callable[[np.ndarray, RingPlan, tuple[int, int], np.ndarray], np.ndarray]


class InboundItem(Protocol):
    """A message off the inbox, not opened yet (:class:`lightning_secagg.wire.Inbound`)."""

    round_id: str
    sender: str
    nbytes: int


class Wire(Protocol):
    """How round traffic is sealed and opened (:mod:`lightning_secagg.wire`)."""

    secure: bool

    def round_key(self) -> Any: ...

    def links(self, key: Any, round_id: str, me: str, relayed: dict[str, str]) -> Any: ...

    def open(self, links: Any, item: Any, place: Any) -> tuple[Message, Any]: ...

    def seal(
        self,
        links: Any,
        sends: Sequence[Send],
        endpoints: dict[str, str],
        blobs: dict[int, Any] | None = None,
    ) -> list[Any]: ...


# -- what comes out ------------------------------------------------------------


@dataclass(frozen=True)
class ToScheduler:
    """Send ``message`` to the scheduler."""

    message: Message


@dataclass(frozen=True)
class Disconnect:
    """Close the links to these endpoints: their round failed (drop what waits to go out)."""

    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class Retrying:
    """An attempt failed with ``error``; attempt ``attempt`` (1-based retry count) starts."""

    error: RoundFailedError
    attempt: int


@dataclass(frozen=True)
class RoundInfo:
    """What the session knows of the round that produced its result."""

    round_id: str
    assigned_at: float
    num_peers: int
    depth: int
    roles: tuple[str, ...]
    ring_bits: int
    members: tuple[str, ...]


# -- the session's own records -------------------------------------------------


@dataclass
class _Round:
    """An accepted assignment and the round it runs."""

    assignment: Assignment
    endpoints: dict[str, str]
    state: SegmentedRound
    assigned_at: float
    links: Any
    #: The members this peer exchanges messages with (its tree neighbours).
    neighbours: frozenset[str]
    #: When this peer shared each segment: its phase deadlines count from then.
    shared_at: list[float] = field(default_factory=list)


@dataclass
class _Attempt:
    """One sign-up and what it led to."""

    signup: Signup
    round_key: Any
    deadline: float
    signup_sent: float
    next_beat: float
    acked: bool = False
    round: _Round | None = None


@dataclass
class _Call:
    contribution: Contribution
    timeout: float
    max_retries: int
    started: float
    meter0: tuple[int, int]
    early_budget: int
    failures: list[RoundFailedError] = field(default_factory=list)


class PeerSession:
    """One peer's sign-ups, rounds and retries (see the module docstring).

    Args:
        peer_id: This peer's id in the session.
        session: The session (waiting queue) name.
        endpoint: Where the other members reach this peer.
        public_key: This peer's CURVE public key (``""`` on insecure links).
        wire: How round traffic is sealed and opened.
        random_bytes: Randomness for the shares' seeds.
        heartbeat_interval: Seconds between heartbeats while a call is in progress.
        meter: Bytes sent and received so far by this peer (for ``Done``'s stats).
        max_early_messages: Messages of not-yet-assigned rounds kept at most.
        roster: The keys this peer accepts as members (None: anyone). The shell
            may replace :attr:`roster` between messages (a re-read file).
    """

    def __init__(
        self,
        peer_id: str,
        session: str,
        endpoint: str,
        public_key: str,
        wire: Wire,
        *,
        random_bytes: RandomBytes,
        heartbeat_interval: float = 1.0,
        frac_bits: int,
        meter: Callable[[], tuple[int, int]] = lambda: (0, 0),
        max_early_messages: int = MAX_EARLY_MESSAGES,
        roster: Roster | None = None,
    ) -> None:
        self.peer_id = peer_id
        #: Admission control: an assignment naming a key outside it is refused.
        self.roster = roster
        self.session = session
        self.endpoint = endpoint
        self.public_key = public_key
        self.wire = wire
        self.frac_bits = frac_bits
        self.heartbeat_interval = heartbeat_interval
        self._random_bytes = random_bytes
        self._meter = meter
        self.state = State.IDLE
        self._call: _Call | None = None
        self._attempt: _Attempt | None = None
        self._finished: deque[str] = deque(maxlen=FINISHED_ROUNDS)
        self._early: deque[InboundItem] = deque(maxlen=max_early_messages)
        self._early_bytes = 0
        self._early_budget = EARLY_BYTES_MARGIN
        #: Set when a call ends: its result buffer and round (DONE), or its error (FAILED).
        self.result: np.ndarray | None = None
        self.round_info: RoundInfo | None = None
        self.error: RoundFailedError | None = None
        #: What the scheduler last said this call waits for (None: nothing yet).
        self.waiting_status: WaitingStatus | None = None
        self._scheduler_handlers: dict[type[Message], Callable[[Any, float], list[Any]]] = {
            SignupAck: self._on_ack,
            SignupRejected: self._on_rejected,
            Assignment: self._on_assignment,
            Rejoin: self._on_rejoin,
            Abort: self._on_abort,
            WaitingStatus: self._on_waiting,
        }

    # -- what the shell asks ----------------------------------------------------

    @property
    def active(self) -> bool:
        """True while a call waits for its result."""
        return self.state in ACTIVE

    @property
    def failures(self) -> list[RoundFailedError]:
        """The errors of this call's attempts that failed and were retried."""
        return list(self._call.failures) if self._call is not None else []

    @property
    def round(self) -> _Round | None:
        """The round this attempt runs, once assigned."""
        return self._attempt.round if self._attempt is not None else None

    @property
    def early_bytes(self) -> int:
        """Bytes of messages kept for rounds not assigned yet."""
        return self._early_bytes

    @property
    def early(self) -> list[InboundItem]:
        """Messages kept for rounds not assigned yet, oldest first."""
        return list(self._early)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work to do (None: no call in progress)."""
        if not self.active or self._attempt is None:
            return None
        att = self._attempt
        due = min(att.deadline, att.next_beat)
        phase = self._phase_due()
        return due if phase is None else min(due, phase[0])

    # -- what the shell feeds it --------------------------------------------------

    def begin(
        self,
        contribution: Contribution,
        now: float,
        *,
        timeout: float,
        max_retries: int = 0,
    ) -> list[Any]:
        """Start a call: sign up with ``contribution``; retry up to ``max_retries`` times.

        Raises:
            LocalProtocolError: a call is already in progress.
        """
        if self.active:
            raise LocalProtocolError("a call is already in progress")
        self._call = _Call(
            contribution,
            float(timeout),
            max_retries,
            now,
            self._meter(),
            # Messages racing ahead of our assignment: a few shares of this model at most.
            4 * 8 * contribution.schema.vector_size + EARLY_BYTES_MARGIN,
        )
        self._early_budget = self._call.early_budget
        self.result = self.round_info = self.error = None
        self.waiting_status = None
        return self._sign_up(now)

    def farewell(self) -> list[Any]:
        """Leave the session for good (the peer will not sign up again).

        The shell sends it when it closes; the scheduler drops this peer from
        its queue and counts it among the session's leavers, so that the
        others may be told at once when too few peers remain.
        """
        return [ToScheduler(Farewell(self.session, self.peer_id))]

    def receive_scheduler(self, msg: Message, now: float) -> list[Any]:
        """Handle one message from the scheduler.

        Raises:
            RemoteProtocolError: it makes no sense now (state unchanged).
        """
        handler = self._scheduler_handlers.get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"a peer does not accept {type(msg).__name__}")
        return handler(msg, now)

    def receive_peer(self, item: InboundItem, now: float) -> list[Any]:
        """Handle one message from another peer (not opened yet).

        Raises:
            RemoteProtocolError: it cannot be opened or the round refuses it
                (state unchanged).
        """
        if item.round_id in self._finished:
            log.debug("peer %s ignores a message of finished round %s", self.peer_id, item.round_id)
            return []
        rnd = self.round
        if rnd is None or item.round_id != rnd.assignment.round_id:
            if self.state is State.IN_ROUND:
                raise RemoteProtocolError(f"a message of round {item.round_id}, not ours")
            self._keep_early(item)
            return []
        return self._feed(rnd, item, now)

    def tick(self, now: float) -> list[Any]:
        """Heartbeats and deadlines: what is due at ``now``."""
        att = self._attempt
        if not self.active or att is None or self._call is None:
            return []
        rnd = att.round
        if now >= att.deadline:
            return self._fail(now, RoundTimeoutError(self._timeout_message(now)), give_up=True)
        due = self._phase_due()
        if due is not None and now >= due[0] and rnd is not None:
            message = self._phase_timeout_message(rnd, now, due[1], due[2])
            return self._fail(now, RoundTimeoutError(message), give_up=True)
        out: list[Any] = []
        if now >= att.next_beat:
            round_id = rnd.assignment.round_id if rnd is not None else None
            out.append(ToScheduler(Heartbeat(self.session, self.peer_id, round_id)))
            att.next_beat = now + self.heartbeat_interval
        return out

    def transmit_failed(self, to: str, reason: str, now: float) -> list[Any]:
        """The shell could not queue a message for member ``to``: the round fails.

        The scheduler is told, and aborts the round for everyone.
        """
        rnd = self.round
        if rnd is None or not self.active:
            return []
        why = f"cannot send to member {to}: {reason}"
        error = RoundFailedError(f"peer {self.peer_id} in round {rnd.assignment.round_id}: {why}")
        return self._fail(now, error, give_up=True, reason=why)

    # -- the call's course --------------------------------------------------------

    def _sign_up(self, now: float) -> list[Any]:
        call = self._call
        assert call is not None  # noqa: S101 - callers hold a call
        c = call.contribution
        key = self.wire.round_key()
        signup = Signup(
            self.session,
            self.peer_id,
            self.endpoint,
            self.public_key,
            float(c.weight),
            self.frac_bits,
            c.schema.to_wire(),
            c.exponents,
            key.public if key is not None else "",
        )
        self._attempt = _Attempt(
            signup, key, now + call.timeout, now, now + self.heartbeat_interval
        )
        self.state = State.SIGNING_UP
        return [ToScheduler(signup)]

    def _fail(
        self,
        now: float,
        error: RoundFailedError,
        *,
        give_up: bool = False,
        reason: str | None = None,
    ) -> list[Any]:
        """End the attempt with ``error``; retry it if the rule and the budget allow."""
        att, call = self._attempt, self._call
        assert att is not None and call is not None  # noqa: S101 - only called while active
        out: list[Any] = []
        rnd = att.round
        if give_up:
            if rnd is not None:
                why = (
                    reason
                    if reason is not None
                    else f"timed out waiting for {rnd.state.waiting_for()}"
                )
                out.append(
                    ToScheduler(
                        Abort(rnd.assignment.round_id, self.peer_id, why[:MAX_REASON_CHARS])
                    )
                )
            else:
                out.append(ToScheduler(Leave(self.session, self.peer_id)))
        if rnd is not None:
            self._remember_finished(rnd.assignment.round_id)
            out.append(Disconnect(tuple(sorted(set(rnd.endpoints.values())))))
        self._attempt = None
        if is_retryable(error) and len(call.failures) < call.max_retries:
            call.failures.append(error)
            log.warning(
                "peer %s: round failed (%s: %s); retrying (%d/%d)",
                self.peer_id,
                type(error).__name__,
                error,
                len(call.failures),
                call.max_retries,
            )
            out.append(Retrying(error, len(call.failures)))
            return out + self._sign_up(now)
        self.state = State.FAILED
        self.error = error
        return out

    def _finish(self, rnd: _Round, now: float) -> list[Any]:
        call = self._call
        assert call is not None  # noqa: S101 - a round belongs to a call
        round_id = rnd.assignment.round_id
        self._remember_finished(round_id)
        self.result = rnd.state.result
        self.round_info = RoundInfo(
            round_id,
            rnd.assigned_at,
            len(rnd.endpoints),
            rnd.state.tree.depth,
            rnd.state.roles,
            rnd.assignment.ring_bits,
            tuple(rnd.endpoints),
        )
        self.state = State.DONE
        # The round's state (its segments, links and buffers) is not needed any more:
        # only the result buffer is kept, until the shell has read it.
        self._attempt = None
        sent, received = self._meter()
        return [
            ToScheduler(
                Done(
                    round_id,
                    self.peer_id,
                    now - rnd.assigned_at,
                    sent - call.meter0[0],
                    received - call.meter0[1],
                )
            )
        ]

    # -- scheduler messages (table: self._scheduler_handlers) --------------------

    def _on_ack(self, msg: SignupAck, now: float) -> list[Any]:
        if msg.peer_id != self.peer_id or self.state is not State.SIGNING_UP:
            raise RemoteProtocolError(
                f"unexpected sign-up ack for {msg.peer_id} ({self.state.value})"
            )
        assert self._attempt is not None  # noqa: S101 - SIGNING_UP has an attempt
        self._attempt.acked = True
        self.state = State.QUEUED
        log.debug("peer %s queued (%d waiting)", self.peer_id, msg.queued)
        if msg.note:  # others wait with another model: said once per sign-up (escaped text)
            log.warning("peer %s: the scheduler says: %s", self.peer_id, msg.note)
        return []

    def _on_rejected(self, msg: SignupRejected, now: float) -> list[Any]:
        if msg.peer_id != self.peer_id or self.state not in (State.SIGNING_UP, State.QUEUED):
            raise RemoteProtocolError(f"unexpected sign-up refusal for {msg.peer_id}")
        cls = {
            "schema_mismatch": SchemaMismatchError,
            "id_in_use": PeerIdInUseError,
            "too_few_peers": TooFewPeersError,
        }.get(msg.code, SignupRejectedError)
        return self._fail(now, cls(f"scheduler refused peer {self.peer_id}: {msg.reason}"))

    def _on_waiting(self, msg: WaitingStatus, now: float) -> list[Any]:
        # An answer to a heartbeat; one that crossed our assignment is stale, not wrong.
        if msg.peer_id != self.peer_id or msg.session != self.session:
            raise RemoteProtocolError(f"waiting status for {msg.peer_id}, not us")
        if self.state not in (State.SIGNING_UP, State.QUEUED):
            return []
        old, self.waiting_status = self.waiting_status, msg
        if old != msg:  # logged on change only
            if msg.others > msg.waiting:  # most waiting peers have another model
                log.warning(
                    "peer %s: most peers waiting in session %r have a different model "
                    "(see the scheduler's note at sign-up): %s",
                    self.peer_id,
                    self.session,
                    describe_waiting(msg),
                )
            else:
                log.info("peer %s: %s", self.peer_id, describe_waiting(msg))
        return []

    def _on_rejoin(self, msg: Rejoin, now: float) -> list[Any]:
        # The scheduler does not know us (it restarted, or dropped us as silent):
        # sign up again, unless in a round. Once per ack: Rejoins queued before our
        # new sign-up was seen are stale.
        att = self._attempt
        if att is None or self.state not in (State.SIGNING_UP, State.QUEUED):
            raise RemoteProtocolError(f"unexpected rejoin ({self.state.value})")
        if not (att.acked or now - att.signup_sent > 5 * self.heartbeat_interval):
            return []
        log.warning("peer %s: the scheduler does not know us; signing up again", self.peer_id)
        att.acked, att.signup_sent = False, now
        self.state = State.SIGNING_UP
        return [ToScheduler(att.signup)]

    def _on_abort(self, msg: Abort, now: float) -> list[Any]:
        rnd = self.round
        if rnd is not None and self.active and msg.round_id == rnd.assignment.round_id:
            error = RoundAbortedError(
                f"round {msg.round_id} aborted by the scheduler: {msg.reason}"
            )
            return self._fail(now, error)
        self._remember_finished(msg.round_id)  # its late messages are ignored
        log.info("ignoring abort of round %s we are not in", msg.round_id)
        return []

    def _on_assignment(self, msg: Assignment, now: float) -> list[Any]:
        att = self._attempt
        if self.state is State.IN_ROUND:
            raise RemoteProtocolError(
                f"a second assignment (round {msg.round_id}) while in a round"
            )
        if att is None or self.state is not State.QUEUED or msg.round_id in self._finished:
            log.info("peer %s ignores stale assignment %s", self.peer_id, msg.round_id)
            return []
        foreign = self._foreign_member(msg)
        if foreign is not None:
            return self._refuse_round(msg, foreign, now)
        rnd = self._check_assignment(msg, att, now)  # raises RemoteProtocolError
        att.round = rnd
        self.state = State.IN_ROUND
        if not self.wire.secure:
            log.warning("round %s runs WITHOUT ENCRYPTION (insecure=True)", msg.round_id)
        log.info(
            "peer %s joined round %s of %d peers as %s",
            self.peer_id,
            msg.round_id,
            len(rnd.endpoints),
            ", ".join(rnd.state.roles),
        )
        out = self._step(rnd, rnd.state.start, now)
        early = [item for item in self._early if item.round_id == msg.round_id]
        self._early.clear()
        self._early_bytes = 0
        for item in early:  # shares that raced ahead of our assignment
            if self.state is not State.IN_ROUND:
                break
            try:
                out += self._feed(rnd, item, now)
            except RemoteProtocolError as exc:
                log.warning("peer %s dropped an early message: %s", self.peer_id, exc)
        return out

    def _foreign_member(self, msg: Assignment) -> str | None:
        """Why the roster refuses this assignment's members, or None.

        Without a roster every key is accepted, and the peer says so once per
        round: anyone can join, so privacy depends on who does. With one, every
        member's CURVE key must be listed, and each listed key may hold only one
        member id of the round (a listed party's sybils would otherwise pass).
        Checked before anything is derived from the assignment.
        """
        if self.roster is None:
            log.warning(
                "peer %s: round %s without a roster: anyone can join, and privacy "
                "depends on who does",
                self.peer_id,
                msg.round_id,
            )
            return None
        seen: dict[str, str] = {}
        for pid, _endpoint, key in msg.members:
            if pid == self.peer_id:
                continue
            if not self.roster.admits(key):
                return f"member {pid} has key {key_fingerprint(key)}, which is not in our roster"
            if key in seen:
                return (
                    f"members {seen[key]} and {pid} share the key {key_fingerprint(key)}"
                    f" ({self.roster.name_of(key)})"
                )
            seen[key] = pid
        return None

    def _refuse_round(self, msg: Assignment, why: str, now: float) -> list[Any]:
        """Refuse a round whose members the roster does not admit.

        Nothing of ours has left: the scheduler is told (an honest one aborts the
        round for everyone), and the attempt ends with a
        :class:`~lightning_secagg.errors.ForeignMemberError`, retried within the
        call's ``max_retries`` (an honest scheduler may have admitted a stale key;
        a malicious one gets no more tries than the caller allows).
        """
        self._remember_finished(msg.round_id)
        log.error("peer %s refuses round %s: %s", self.peer_id, msg.round_id, why)
        error = ForeignMemberError(f"peer {self.peer_id} refused round {msg.round_id}: {why}")
        abort = ToScheduler(Abort(msg.round_id, self.peer_id, f"roster: {why}"[:MAX_REASON_CHARS]))
        return [abort, *self._fail(now, error)]

    def _check_assignment(self, msg: Assignment, att: _Attempt, now: float) -> _Round:
        """The round of an assignment this peer may accept (see the module's invariants).

        Raises:
            RemoteProtocolError: the assignment must not be accepted (nothing changed).
        """
        call = self._call
        assert call is not None  # noqa: S101 - QUEUED has a call
        c = call.contribution
        rid = msg.round_id
        endpoints = {pid: ep for pid, ep, _key in msg.members}
        if msg.session != self.session or self.peer_id not in endpoints:
            raise RemoteProtocolError(f"assignment {rid} is for another session or not for us")
        try:
            tree = AggregationTree.from_wire(msg.tree, msg.group_size, msg.num_actors)
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"malformed assignment {rid}: {exc}") from None
        if set(tree.members) != set(endpoints) or len(endpoints) != len(msg.members):
            raise RemoteProtocolError(f"assignment {rid}: tree and member list differ")
        if self.wire.secure and any(key == "" for _, _, key in msg.members):
            raise RemoteProtocolError(f"assignment {rid}: a member has no CURVE key")
        share = c.weight / msg.total_weight
        if not 0 < share <= 1:
            raise RemoteProtocolError(
                f"assignment {rid}: total weight {msg.total_weight:g} below our own"
            )
        problem = check_relayed_ring(
            c.schema,
            msg.ring_bits,
            msg.exponents,
            c.exponents or [],
            len(endpoints),
            compact_wanted=c.exponents is not None,
        )
        if problem is not None:
            raise RemoteProtocolError(f"assignment {rid}: the 32-bit ring is not safe ({problem})")
        plan = (
            RingPlan.wide(c.schema)
            if msg.ring_bits == 64
            else RingPlan.compact(c.schema, msg.exponents)  # type: ignore[arg-type]
        )
        neighbours = tree.neighbours(self.peer_id)
        links = self._links(msg, att, neighbours)
        bounds = round_segments(c.schema)
        encode, decode = c.encode, c.decode
        state = SegmentedRound(
            me=self.peer_id,
            round_id=rid,
            tree=tree,
            sizes=[1 + b - a for a, b in bounds],
            dtype=plan.dtype,
            spans=[result_span(c.schema, a, b) for a, b in bounds],
            # Encoded one segment at a time, as the window lets it go.
            encode=lambda k: encode(share, plan, bounds[k]),
            finalize=lambda k, total, out: decode(total, plan, bounds[k], out),
            random_bytes=self._random_bytes,
            # Sealing copies every payload as it goes out.
            sends_are_copied=self.wire.secure,
        )
        return _Round(msg, endpoints, state, now, links, neighbours)

    def _links(self, msg: Assignment, att: _Attempt, neighbours: frozenset[str]) -> Any:
        """Sealed links with our tree neighbours (nobody else may send us anything).

        Raises:
            RemoteProtocolError: the round keys are missing, ours is not relayed,
                or a neighbour's is unusable.
        """
        if not self.wire.secure:
            return self.wire.links(None, msg.round_id, self.peer_id, {})
        keys = msg.round_keys
        if keys is None or len(keys) != len(msg.members) or "" in keys:
            raise RemoteProtocolError(f"assignment {msg.round_id}: members' round keys are missing")
        relayed = {m[0]: k for m, k in zip(msg.members, keys, strict=True)}
        if relayed[self.peer_id] != att.round_key.public:
            raise RemoteProtocolError(f"assignment {msg.round_id}: it does not relay our round key")
        try:
            return self.wire.links(
                att.round_key, msg.round_id, self.peer_id, {m: relayed[m] for m in neighbours}
            )
        except ValueError as exc:
            raise RemoteProtocolError(f"assignment {msg.round_id}: {exc}") from None

    # -- round traffic ------------------------------------------------------------

    def _feed(self, rnd: _Round, item: InboundItem, now: float) -> list[Any]:
        """Open a message of our round, hand it to the round, and seal what it answers."""

        sender = item.sender
        if sender not in rnd.neighbours:
            # Nobody else may send us anything in this round (a stranger's message
            # would find no link anyway); said precisely, for the logs.
            if sender == self.peer_id:
                why = "itself, in"
            elif sender in rnd.endpoints:
                why = "a member we exchange nothing with (not a tree neighbour) in"
            else:
                why = "not a member of"
            raise RemoteProtocolError(
                f"a message claiming to be from {sender}: {why} round {item.round_id}"
            )

        def place(header: dict[str, Any], nbytes: int) -> np.ndarray | None:
            return result_slot(rnd.state, sender, header, nbytes)

        try:
            msg, blob = self.wire.open(rnd.links, item, place)
        except RemoteProtocolError as exc:
            kind = "sealed message" if self.wire.secure else "message"
            raise RemoteProtocolError(f"a {kind}: {exc}") from None
        try:
            # An opened sealed payload is a buffer of ours; a plain one is a view
            # of the transport's frame.
            sends = self._round_step(
                rnd, lambda: rnd.state.receive(msg, payload_owned=self.wire.secure), now
            )
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"a {msg.TYPE}: {exc}") from None
        except InvalidTotalError as exc:
            # A member sent a wrong partial sum: no result can come out of this round.
            return self._fail(now, exc, give_up=True, reason=str(exc))
        blobs = {msg.segment: blob} if blob is not None else None  # type: ignore[attr-defined]
        out = self._seal(rnd, sends, blobs)
        if rnd.state.done:
            out += self._finish(rnd, now)
        return out

    def _step(self, rnd: _Round, call: Callable[[], list[Send]], now: float) -> list[Any]:
        sends = self._round_step(rnd, call, now)
        out = self._seal(rnd, sends, None)
        if rnd.state.done:
            out += self._finish(rnd, now)
        return out

    @staticmethod
    def _round_step(rnd: _Round, call: Callable[[], list[Send]], now: float) -> list[Send]:
        """Run one step of the round and note when each segment it shared went out."""
        sends = call()
        while len(rnd.shared_at) < rnd.state.shared:
            rnd.shared_at.append(now)
        return sends

    def _seal(self, rnd: _Round, sends: list[Send], blobs: dict[int, Any] | None) -> list[Any]:
        if not sends:
            return []
        return self.wire.seal(rnd.links, sends, rnd.endpoints, blobs)

    def _keep_early(self, item: InboundItem) -> None:
        """Keep a message of a round we are not assigned yet, within count and byte bounds."""
        if len(self._early) == self._early.maxlen:
            self._early_bytes -= self._early[0].nbytes
        self._early.append(item)
        self._early_bytes += item.nbytes
        while self._early_bytes > self._early_budget and len(self._early) > 1:
            dropped = self._early.popleft()
            self._early_bytes -= dropped.nbytes
            log.warning(
                "peer %s dropped an early message from %s: early messages exceed %d bytes",
                self.peer_id,
                dropped.sender,
                self._early_budget,
            )

    def _remember_finished(self, round_id: str) -> None:
        if round_id not in self._finished:
            self._finished.append(round_id)

    # -- deadlines and their messages ---------------------------------------------

    def _phase_due(self) -> tuple[float, int, int] | None:
        """The earliest deadline of a phase this peer waits in, with the phase and its
        segment (None: not in a round, or waiting for nothing)."""
        rnd = self.round
        if rnd is None or self.state is not State.IN_ROUND:
            return None
        depth = rnd.state.tree.depth
        due = [
            (phase_deadline(rnd.shared_at[k], rnd.assignment.deadline_s, depth, phase), phase, k)
            for k, phase in rnd.state.pending()
        ]
        return min(due) if due else None

    def _phase_timeout_message(self, rnd: _Round, now: float, phase: int, segment: int) -> str:
        what = describe_phase(rnd.state.tree.depth, phase)
        if len(rnd.state.segments) > 1:
            what += f" of segment {segment} (of {len(rnd.state.segments)})"
        return (
            f"peer {self.peer_id} missed the deadline of {what}"
            f" in round {rnd.assignment.round_id} "
            f"({now - rnd.assigned_at:.1f} s after the assignment, round budget "
            f"{rnd.assignment.deadline_s:g} s), waiting for {rnd.state.waiting_for()}"
            f"{self._waited(now)}"
        )

    def _timeout_message(self, now: float) -> str:
        call, rnd = self._call, self.round
        assert call is not None  # noqa: S101 - only while active
        if rnd is None:
            what = (
                "a round assignment from the scheduler (fewer peers than the round size have "
                "signed up, the scheduler is unreachable, or its key is not the one given)"
            )
            status = self.waiting_status
            said = "" if status is None else f"; last status: {describe_waiting(status)}"
            return (
                f"peer {self.peer_id} timed out after {call.timeout:g} s waiting for {what}"
                f"{self._waited(now)}{said}"
            )
        return (
            f"peer {self.peer_id} timed out after {call.timeout:g} s in round "
            f"{rnd.assignment.round_id} waiting for {rnd.state.waiting_for()}{self._waited(now)}"
        )

    def _waited(self, now: float) -> str:
        """The time waited over all attempts, when this is not the first."""
        call = self._call
        if call is None or not call.failures:
            return ""
        return f" ({now - call.started:.1f} s over {len(call.failures) + 1} attempts)"


__all__ = [
    "ACTIVE",
    "Contribution",
    "Disconnect",
    "PeerSession",
    "Retrying",
    "RoundInfo",
    "State",
    "ToScheduler",
    "Wire",
    "describe_waiting",
    "is_retryable",
    "result_slot",
]
