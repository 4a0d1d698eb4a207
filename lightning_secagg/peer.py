"""The peer: a listening socket, a link to the scheduler, and a blocking ``aggregate()``.

Why synchronous I/O (no background thread): between rounds a peer has
nothing to answer (ZeroMQ buffers whatever arrives meanwhile), and inside a
round the caller is blocked anyway. Driving the sockets from ``aggregate()``
with a ``zmq.Poller`` and one deadline keeps every socket in one thread, makes
every wait bounded, and leaves nothing running while training runs.

Security: the link to the scheduler is a CurveZMQ client with the peer's own
key pair (see :mod:`lightning_secagg.security`). Round traffic between peers is
sealed with AES-256-GCM under keys derived from a fresh X25519 key per
``aggregate()`` call, relayed by the scheduler (see :mod:`lightning_secagg.sealing`):
a message is opened, and so accepted, only if it was sealed by the member it
claims to come from.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
import zmq

from lightning_secagg import codec
from lightning_secagg.deadlines import describe_phase, phase_deadline
from lightning_secagg.encoding import decode_result, decode_total, encode, magnitude_exponents
from lightning_secagg.errors import (
    ConfigurationError,
    InvalidTotalError,
    LocalProtocolError,
    PeerIdInUseError,
    RemoteProtocolError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SchemaMismatchError,
    SignupRejectedError,
)
from lightning_secagg.messages import (
    FROM_SCHEDULER,
    PEER_TO_PEER,
    Abort,
    Assignment,
    Done,
    Heartbeat,
    Leave,
    Message,
    Rejoin,
    Result,
    Signup,
    SignupAck,
    SignupRejected,
    ident,
)
from lightning_secagg.protocol.peer_round import Send
from lightning_secagg.protocol.segmented_round import SegmentedRound
from lightning_secagg.ring import RingPlan, compact_ring_allowed, exponents_to_declare
from lightning_secagg.schema import (
    DEFAULT_FRAC_BITS,
    Schema,
    result_span,
    segment_bounds,
    segment_elements_for,
)
from lightning_secagg.sealing import CHUNK_BYTES, TAG_BYTES, Envelope, Link, RoundKey, SealedBlob
from lightning_secagg.security import (
    KeyPair,
    key_fingerprint,
    make_curve_client,
    read_public_key,
)
from lightning_secagg.sharing import RandomBytes, system_random_bytes
from lightning_secagg.transport import (
    bind_endpoint,
    close_quietly,
    frames_nbytes,
    is_wildcard_host,
    receive_message,
    send_frames,
    send_message,
)
from lightning_secagg.tree import AggregationTree

log = logging.getLogger(__name__)

#: Messages of rounds we have not been assigned yet, kept until the assignment arrives.
MAX_EARLY_MESSAGES = 256
#: Bytes of such messages kept at most, beyond what the model's own shares need
#: (see ``Peer._early_budget``): the oldest are dropped first.
EARLY_BYTES_MARGIN = 1 << 20
#: Default cap on one frame arriving at the inbox (``ZMQ_MAXMSGSIZE``): 1 GiB,
#: enough for the dense share of a ~130M-parameter model.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
#: Messages read off the inbox per wake-up at most, before deadlines are checked again.
INBOX_BATCH = 64


def required_message_bytes(schema: Schema, *, sealed: bool = True) -> int:
    """The largest frame a round of this model sends a peer, plus a margin.

    A good ``max_message_bytes`` for a peer that only ever averages this model:
    anything larger on its inbox is cut before it is buffered. Sealed traffic
    (the default) travels in chunks of at most ``sealing.CHUNK_BYTES`` plus a
    tag, so the bound stops growing with the model; plaintext (``insecure``)
    payloads are one frame. The margin covers a header frame.
    """
    bounds = segment_bounds(schema, segment_elements_for(schema.vector_size - 1))
    largest = max(
        max(8 * (1 + b - a) for a, b in bounds),
        max(hi - lo for lo, hi in (result_span(schema, a, b) for a, b in bounds)),
    )
    if sealed:
        largest = min(largest, CHUNK_BYTES) + TAG_BYTES
    return largest + codec.MAX_PEER_HEADER_BYTES


@dataclass(frozen=True)
class RoundStats:
    """What one round cost this peer.

    Attributes:
        round_id: The scheduler's id for the round.
        seconds: Wall time of the whole ``aggregate()`` call, queue wait included.
        round_seconds: From the assignment to the result (the protocol itself).
        bytes_sent: Bytes this peer sent (headers and payloads, scheduler included).
        bytes_received: Bytes this peer received.
        num_peers: Members of the round.
        depth: Levels of the round's tree.
        roles: This peer's roles, e.g. ``("participant@0", "actor@0/g1")``.
        ring_bits: The round's ring: 32 (compact) or 64.
    """

    round_id: str
    seconds: float
    round_seconds: float
    bytes_sent: int
    bytes_received: int
    num_peers: int
    depth: int
    roles: tuple[str, ...]
    ring_bits: int = 64


def is_retryable(exc: BaseException) -> bool:
    """Whether a new round may succeed where this error ended one (timeouts, aborts,
    unreachable members); a refused sign-up would be refused again."""
    return isinstance(exc, RoundFailedError) and not isinstance(exc, SignupRejectedError)


@dataclass(frozen=True)
class _Member:
    endpoint: str
    public_key: str


@dataclass
class _Round:
    """What ``aggregate()`` knows once the scheduler has assigned it a round."""

    assignment: Assignment
    members: dict[str, _Member]
    state: SegmentedRound
    assigned_at: float
    #: ``(to them, from them)`` sealed links per member (empty on insecure links).
    links: dict[str, tuple[Link, Link]]
    #: A segment's result as one ciphertext, forwarded unchanged to every
    #: participant we serve (sealed links only): as received, or sealed once by
    #: a root actor; kept only during the step that forwards it.
    result_blobs: dict[int, SealedBlob] = field(default_factory=dict)
    #: When this peer shared each segment: its phase deadlines count from then.
    shared_at: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Inbound:
    """A message off the inbox before it is accepted.

    Sealed traffic waits as its envelope and raw frames (opened only once the
    round, and with it the claimed sender's key, is known); on insecure links
    it is the decoded message.
    """

    round_id: str
    sender: str
    envelope: Envelope | None = None
    frames: list[memoryview] | None = None
    message: Message | None = None


class Peer:
    """A participant in secure aggregation rounds.

    Args:
        address: Where to listen, e.g. ``tcp://127.0.0.1:6000`` (port 0: any free port).
        scheduler_address: The scheduler's address, e.g. ``tcp://127.0.0.1:5555``.
        session: Name of the waiting queue; peers of one model share one.
        scheduler_key: The scheduler's CURVE public key (Z85 text or a key file's
            path); required unless ``insecure``.
        keys: This peer's CURVE key pair; a fresh one per peer when omitted.
        insecure: Plaintext links, no authentication. Only for debugging: anyone
            on the network can read the shares. Logged loudly every round.
        peer_id: Unique name in the session (random by default).
        advertise: The address other peers connect to, when ``address`` binds
            a wildcard host such as ``0.0.0.0``.
        frac_bits: Fixed-point fraction bits of the 64-bit ring; all peers of a
            session must agree.
        ring: ``"auto"`` (default): declare each tensor's magnitude exponent
            (``max|x| < 2**e``) at sign-up, so that the scheduler can pick the
            compact 32-bit ring when it is safe (half the bytes; see
            ``docs/numerics.md``). ``"64"``: declare nothing and always use the
            64-bit ring, whose precision does not depend on the others' values.
        linger: Seconds :meth:`stop` lets queued messages leave.
        max_message_bytes: Largest frame the inbox accepts; ZeroMQ cuts the
            connection of anyone who sends more, before allocating it. Must hold
            the largest frame of a round, :func:`required_message_bytes`: a
            sealed payload chunk (at most 16 MiB) or, on insecure links, a whole
            dense share or result; :meth:`aggregate` refuses a model that does not fit.
        random_bytes: Randomness for shares (``os.urandom``; injectable for tests).
        clock: Monotonic clock (injectable for tests).
        heartbeat_interval: Seconds between heartbeats to the scheduler while
            inside :meth:`aggregate` (queued or in a round); keep it well below
            the scheduler's ``liveness_timeout``.

    Raises:
        ConfigurationError: a bad address, id, key, or a missing ``scheduler_key``.

    A peer is used from one thread at a time.
    """

    def __init__(
        self,
        address: str,
        scheduler_address: str,
        session: str = "default",
        *,
        scheduler_key: str | os.PathLike[str] | None = None,
        keys: KeyPair | None = None,
        insecure: bool = False,
        peer_id: str | None = None,
        advertise: str | None = None,
        frac_bits: int = DEFAULT_FRAC_BITS,
        ring: str = "auto",
        linger: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        random_bytes: RandomBytes = system_random_bytes,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_interval: float = 1.0,
    ) -> None:
        self._bind = bind_endpoint(address)
        if (
            isinstance(heartbeat_interval, bool)
            or not isinstance(heartbeat_interval, (int, float))
            or not 0 < heartbeat_interval < float("inf")
        ):
            raise ConfigurationError(
                f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}"
            )
        self.heartbeat_interval = float(heartbeat_interval)
        self.last_failures: list[RoundFailedError] = []
        bind_endpoint(scheduler_address)
        self.scheduler_address = scheduler_address
        self.peer_id = peer_id if peer_id is not None else f"peer-{secrets.token_hex(4)}"
        self.session = session
        try:
            ident(self.peer_id)
            ident(session)
        except ValueError as exc:
            raise ConfigurationError(f"peer_id and session: {exc}") from None
        if advertise is not None:
            bind_endpoint(advertise)
        elif is_wildcard_host(address):
            raise ConfigurationError(
                f"address {address!r} binds every interface; pass advertise='tcp://HOST:PORT' "
                "with the address other peers should connect to"
            )
        self._advertise = advertise
        self.insecure = insecure
        if insecure:
            if scheduler_key is not None or keys is not None:
                raise ConfigurationError("scheduler_key/keys and insecure=True exclude each other")
            self.scheduler_key: str | None = None
            self.keys: KeyPair | None = None
        else:
            if scheduler_key is None:
                raise ConfigurationError(
                    "scheduler_key is required: pass the scheduler's public key (printed by "
                    "`lightning-secagg scheduler`, or Scheduler.public_key) or its .key file; "
                    "insecure=True turns encryption off (debugging only)"
                )
            self.scheduler_key = read_public_key(scheduler_key)
            self.keys = keys or KeyPair.generate()
        self.frac_bits = frac_bits
        if ring not in ("auto", "64"):
            raise ConfigurationError(f"ring must be 'auto' or '64', got {ring!r}")
        self.ring = ring
        self.linger = linger
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < codec.MAX_PEER_HEADER_BYTES
        ):
            raise ConfigurationError(
                f"max_message_bytes must be an int >= {codec.MAX_PEER_HEADER_BYTES}, "
                f"got {max_message_bytes!r}"
            )
        self.max_message_bytes = max_message_bytes
        self._random_bytes = random_bytes
        self._clock = clock
        self._ctx: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._scheduler: zmq.Socket | None = None
        self._outboxes: dict[str, zmq.Socket] = {}
        # Round traffic that raced ahead of our assignment, by round id: opened
        # once the assignment (and with it the sender's key) is known.
        self._early: deque[tuple[str, _Inbound, int]] = deque(maxlen=MAX_EARLY_MESSAGES)
        self._early_bytes = 0
        self._early_budget = EARLY_BYTES_MARGIN
        self._finished_rounds: deque[str] = deque(maxlen=64)
        #: The last model whose frames were found to fit the inbox (see _check_inbox_limit).
        self._inbox_fits: Schema | None = None
        self.endpoint: str | None = None
        self.last_stats: RoundStats | None = None
        self._bytes_sent = 0
        self._bytes_received = 0

    @property
    def public_key(self) -> str | None:
        """This peer's CURVE public key (None when insecure)."""
        return self.keys.public if self.keys else None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Peer:
        """Bind the listening socket and connect to the scheduler; returns ``self``.

        Raises:
            ConfigurationError: the address cannot be bound (e.g. the port is in use).
        """
        if self._ctx is not None:
            return self
        ctx = zmq.Context()
        inbox = ctx.socket(zmq.PULL)
        inbox.linger = 0
        # Before bind: a listener copies its options when it binds, so a limit set
        # later never reaches the connections it accepts (checked in the tests).
        inbox.maxmsgsize = self.max_message_bytes
        # A plain ZeroMQ socket: round traffic is sealed message by message
        # (lightning_secagg.sealing), so the link itself needs no CurveZMQ.
        try:
            inbox.bind(self._bind)
        except zmq.ZMQError as exc:
            inbox.close(linger=0)
            ctx.term()
            raise ConfigurationError(f"cannot listen on {self._bind}: {exc.strerror}") from exc
        sched = ctx.socket(zmq.DEALER)
        sched.linger = int(self.linger * 1000)
        sched.maxmsgsize = codec.MAX_HEADER_BYTES
        if self.keys is not None and self.scheduler_key is not None:
            make_curve_client(sched, self.keys, self.scheduler_key)
        sched.connect(self.scheduler_address)
        self._ctx, self._inbox, self._scheduler = ctx, inbox, sched
        self.endpoint = self._advertise or inbox.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.keys is not None:
            log.info(
                "peer %s listening on %s (sealed round traffic, key fingerprint %s)",
                self.peer_id,
                self.endpoint,
                key_fingerprint(self.keys.public),
            )
        else:
            log.warning(
                "peer %s listening on %s WITHOUT ENCRYPTION (insecure=True)",
                self.peer_id,
                self.endpoint,
            )
        return self

    def stop(self) -> None:
        """Close every socket (queued messages get ``linger`` seconds). Idempotent."""
        if self._ctx is None:
            return
        linger_ms = int(self.linger * 1000)
        for sock in self._outboxes.values():
            close_quietly(sock, linger_ms)
        self._outboxes.clear()
        close_quietly(self._scheduler, linger_ms)
        close_quietly(self._inbox, 0)
        self._ctx.term()
        self._ctx = self._inbox = self._scheduler = None
        log.info("peer %s stopped", self.peer_id)

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __getstate__(self) -> dict[str, object]:
        raise TypeError("a Peer owns sockets and cannot be pickled; create it in each process")

    # -- the round -------------------------------------------------------

    def aggregate(
        self,
        state_dict: Mapping[str, torch.Tensor],
        weight: float = 1.0,
        timeout: float = 300.0,
    ) -> dict[str, torch.Tensor]:
        """Average ``state_dict`` with the other peers of the next round.

        Blocks until the round completes. Nothing leaves this process before the
        values are checked (NaN/Inf, overflow), and only secret shares leave it.

        Args:
            state_dict: Tensors to average (CPU or CUDA).
            weight: This peer's weight (e.g. its number of samples); the result
                is the weighted mean.
            timeout: Seconds to wait for the whole round, queueing included.

        Returns:
            CPU tensors with the same keys, shapes and dtypes; identical, bit for
            bit, on every peer of the round.

        Raises:
            ConfigurationError: a bad weight or timeout, or a model whose shares
                would exceed ``max_message_bytes``.
            EncodingError: NaN/Inf or values too large for the fixed-point ring.
            SchemaMismatchError: the scheduler says the model differs from the session's.
            SignupRejectedError: the scheduler refused the sign-up for another reason.
            RoundTimeoutError: the deadline passed; says what was still missing.
            RoundAbortedError: the scheduler aborted the round (a member gave up,
                went silent, or could not be reached).
            RoundFailedError: a member could not be sent to (the scheduler is told).
        """
        if self._ctx is None:
            raise LocalProtocolError("call start() (or use the peer as a context manager) first")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise ConfigurationError(f"weight must be a finite number > 0, got {weight!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        schema = Schema.of(state_dict, self.frac_bits)
        exponents = magnitude_exponents(state_dict, self.frac_bits)
        self._check_inbox_limit(schema)
        # Messages racing ahead of our assignment: a few shares of this model at most.
        self._early_budget = 4 * 8 * schema.vector_size + EARLY_BYTES_MARGIN
        started = self._clock()
        deadline = started + timeout
        sent0, recv0 = self._bytes_sent, self._bytes_received
        round_key = None if self.insecure else RoundKey()
        signup = Signup(
            self.session,
            self.peer_id,
            self.endpoint or "",
            self.public_key or "",
            float(weight),
            self.frac_bits,
            schema.to_wire(),
            exponents_to_declare(schema, exponents) if self.ring == "auto" else None,
            round_key.public if round_key is not None else "",
        )
        self._send_scheduler(signup)
        # Sign-up bookkeeping: an assignment counts only after this call's SignupAck
        # (anything before it is left over from an earlier call), and a Rejoin re-sends
        # the sign-up once per ack (Rejoins queued before our re-sign-up was seen are stale).
        acked = False
        signup_sent = started
        next_beat = started + self.heartbeat_interval
        rnd: _Round | None = None
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self._scheduler, zmq.POLLIN)
        try:
            while rnd is None or not rnd.state.done:
                now = self._clock()
                if now >= deadline:
                    self._give_up(rnd)
                    raise RoundTimeoutError(self._timeout_message(rnd, timeout))
                phase_due = self._phase_due(rnd)
                if phase_due is not None and now >= phase_due[0]:
                    self._give_up(rnd)
                    raise RoundTimeoutError(self._phase_timeout_message(rnd, *phase_due[1:]))
                if now >= next_beat:
                    self._heartbeat(rnd)
                    next_beat = now + self.heartbeat_interval
                wake = min(deadline, next_beat, phase_due[0] if phase_due else deadline)
                events = dict(poller.poll(timeout=max(1, math.ceil((wake - now) * 1000))))
                if self._scheduler in events:
                    msg = self._recv(self._scheduler, codec.MAX_HEADER_BYTES, FROM_SCHEDULER)
                    if isinstance(msg, SignupAck) and msg.peer_id == self.peer_id:
                        acked = True
                    if isinstance(msg, Assignment) and rnd is None:
                        if not acked or msg.round_id in self._finished_rounds:
                            log.info(
                                "peer %s ignores stale assignment %s", self.peer_id, msg.round_id
                            )
                            continue
                        rnd = self._accept_assignment(
                            msg, state_dict, weight, schema, exponents, round_key
                        )
                        if rnd is not None:
                            deadline = min(deadline, rnd.assigned_at + msg.deadline_s)
                    elif isinstance(msg, Rejoin):
                        # The scheduler does not know us (it restarted, or dropped us as
                        # silent): sign up again, unless already in a round.
                        now = self._clock()
                        if rnd is None and (
                            acked or now - signup_sent > 5 * self.heartbeat_interval
                        ):
                            log.warning(
                                "peer %s: the scheduler does not know us; signing up again",
                                self.peer_id,
                            )
                            self._send_scheduler(signup)
                            acked, signup_sent = False, now
                    elif msg is not None:
                        self._on_scheduler_message(msg, rnd)
                if self._inbox in events:
                    # Drain what is queued (a bounded batch) before polling again: one
                    # poll, deadline check and wake-up per batch rather than per message.
                    for _ in range(INBOX_BATCH):
                        item = self._recv_peer()
                        if item is False:  # the queue is empty
                            break
                        if item is None:
                            continue
                        if item.round_id in self._finished_rounds:
                            log.debug(
                                "peer %s ignores a message of finished round %s",
                                self.peer_id,
                                item.round_id,
                            )
                        elif rnd is not None:
                            self._feed(rnd, item)
                            if rnd.state.done:  # what follows belongs to later rounds
                                break
                        else:
                            self._keep_early(item)
        except RoundFailedError:
            if rnd is not None:
                self._forget(rnd)
            raise
        return self._finish(rnd, schema, started, sent0, recv0)

    def aggregate_with_retry(
        self,
        state_dict: Mapping[str, torch.Tensor],
        weight: float = 1.0,
        timeout: float = 300.0,
        max_retries: int = 2,
    ) -> dict[str, torch.Tensor]:
        """:meth:`aggregate`, retried up to ``max_retries`` times after a failed round.

        Each attempt signs up again and gets ``timeout`` seconds; the scheduler
        puts the survivors into a new round with a fresh tree, and fresh shares
        are drawn (re-sharing the same input to a new tree reveals nothing new).
        Errors that would fail again the same way (a refused sign-up, a bad
        model or argument) are raised at once. :attr:`last_failures` lists the
        errors of the attempts that failed.

        Raises:
            RoundFailedError: the last attempt's error once the retries are spent.
        """
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.last_failures = []
        for attempt in range(max_retries + 1):
            try:
                return self.aggregate(state_dict, weight, timeout)
            except RoundFailedError as exc:
                if not is_retryable(exc) or attempt == max_retries:
                    raise
                self.last_failures.append(exc)
                log.warning(
                    "peer %s: round failed (%s: %s); retrying (%d/%d)",
                    self.peer_id,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    max_retries,
                )
        raise LocalProtocolError("unreachable")  # pragma: no cover

    # -- internals -------------------------------------------------------

    def _check_inbox_limit(self, schema: Schema) -> None:
        # The inbox's limit is fixed at bind time (see start()); a model whose shares
        # would be cut by it is refused here, before sign-up, rather than timing out.
        # Once per model: a training run averages the same one every epoch.
        if schema == self._inbox_fits:
            return
        need = required_message_bytes(schema, sealed=not self.insecure)
        if need > self.max_message_bytes:
            raise ConfigurationError(
                f"this model's shares need frames of {need} bytes, above "
                f"max_message_bytes={self.max_message_bytes}; pass a larger max_message_bytes "
                "to Peer"
            )
        self._inbox_fits = schema

    def _accept_assignment(
        self,
        msg: Assignment,
        state_dict: Mapping[str, torch.Tensor],
        weight: float,
        schema: Schema,
        exponents: list[int],
        round_key: RoundKey | None,
    ) -> _Round | None:
        members = {pid: _Member(ep, key) for pid, ep, key in msg.members}
        if msg.session != self.session or self.peer_id not in members:
            log.warning("ignoring an assignment for session %r that does not name us", msg.session)
            return None
        try:
            tree = AggregationTree.from_wire(msg.tree, msg.group_size, msg.num_actors)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring a malformed assignment for round %s: %s", msg.round_id, exc)
            return None
        if set(tree.members) != set(members):
            log.warning("ignoring assignment %s: tree and member list differ", msg.round_id)
            return None
        if not self.insecure and any(m.public_key == "" for m in members.values()):
            log.warning("ignoring assignment %s: a member has no CURVE key", msg.round_id)
            return None
        share = weight / msg.total_weight
        if not 0 < share <= 1:
            log.warning(
                "ignoring assignment %s: total weight %g below our own",
                msg.round_id,
                msg.total_weight,
            )
            return None
        plan = self._ring_plan(msg, schema, exponents, len(members))
        if plan is None:
            return None
        links = self._links(msg, round_key, tree.neighbours(self.peer_id))
        if links is None:
            return None
        bounds = segment_bounds(schema, segment_elements_for(schema.vector_size - 1))
        state = SegmentedRound(
            me=self.peer_id,
            round_id=msg.round_id,
            tree=tree,
            sizes=[1 + b - a for a, b in bounds],
            dtype=plan.dtype,
            spans=[result_span(schema, a, b) for a, b in bounds],
            # Encoded one segment at a time, as the window lets it go; the values
            # were checked before the sign-up, so no second pass over the model.
            encode=lambda k: encode(
                state_dict, schema, share, checked=True, plan=plan, segment=bounds[k]
            ),
            finalize=lambda k, total, out: decode_total(
                total, schema, plan, segment=bounds[k], out=out
            ),
            random_bytes=self._random_bytes,
            # Sealing copies every payload as _deliver hands it out.
            sends_are_copied=links != {},
        )
        rnd = _Round(msg, members, state, self._clock(), links)
        if self.insecure:
            log.warning("round %s runs WITHOUT ENCRYPTION (insecure=True)", msg.round_id)
        log.info(
            "peer %s joined round %s of %d peers as %s",
            self.peer_id,
            msg.round_id,
            len(members),
            ", ".join(state.roles),
        )
        self._deliver(rnd, self._step(rnd, state.start))
        early = [item for rid, item, _ in self._early if rid == msg.round_id]
        self._early.clear()
        self._early_bytes = 0
        for item in early:  # shares that raced ahead of our assignment
            self._feed(rnd, item)
        return rnd

    def _links(
        self, msg: Assignment, round_key: RoundKey | None, neighbours: frozenset[str]
    ) -> dict[str, tuple[Link, Link]] | None:
        """Sealed links with our tree neighbours, or None (logged) for a bad assignment.

        Nobody else may send us anything in this round: their messages find no
        link and are dropped, as a stranger's are.
        """
        if round_key is None:
            return {}
        keys = msg.round_keys
        if keys is None or len(keys) != len(msg.members) or "" in keys:
            log.warning("ignoring assignment %s: members' round keys are missing", msg.round_id)
            return None
        relayed = {m[0]: k for m, k in zip(msg.members, keys, strict=True)}
        if relayed[self.peer_id] != round_key.public:
            log.warning("ignoring assignment %s: it does not relay our round key", msg.round_id)
            return None
        try:
            return round_key.links(msg.round_id, self.peer_id, {m: relayed[m] for m in neighbours})
        except ValueError as exc:
            log.warning("ignoring assignment %s: %s", msg.round_id, exc)
            return None

    def _ring_plan(
        self, msg: Assignment, schema: Schema, exponents: list[int], num_peers: int
    ) -> RingPlan | None:
        """The assignment's ring, or None (logged) when this peer must not accept it.

        The scheduler's choice is checked, not trusted: the compact ring only if
        this peer declared its exponents, the relayed ones cover its own values,
        and the rule of :func:`compact_ring_allowed` holds for this round.
        """
        if msg.ring_bits == 64:
            return RingPlan.wide(schema)
        if self.ring != "auto":
            problem = "this peer asked for the 64-bit ring"
        elif msg.exponents is None or len(msg.exponents) != len(exponents):
            problem = "the exponents do not match the model"
        elif any(r < mine for r, mine in zip(msg.exponents, exponents, strict=True)):
            problem = "the relayed exponents are below this peer's own magnitudes"
        else:
            problem = compact_ring_allowed(schema, msg.exponents, num_peers)
        if problem is not None:
            log.warning(
                "ignoring assignment %s: the 32-bit ring is not safe (%s)", msg.round_id, problem
            )
            return None
        return RingPlan.compact(schema, msg.exponents)  # type: ignore[arg-type]

    def _finish(
        self, rnd: _Round, schema: Schema, started: float, sent0: int, recv0: int
    ) -> dict[str, torch.Tensor]:
        result = rnd.state.result
        if result is None:  # pragma: no cover - loop invariant
            raise LocalProtocolError("round finished without a result")
        finished = self._clock()
        round_id = rnd.assignment.round_id
        self._finished_rounds.append(round_id)
        stats = RoundStats(
            round_id=round_id,
            seconds=finished - started,
            round_seconds=finished - rnd.assigned_at,
            bytes_sent=self._bytes_sent - sent0,
            bytes_received=self._bytes_received - recv0,
            num_peers=len(rnd.members),
            depth=rnd.state.tree.depth,
            roles=rnd.state.roles,
            ring_bits=rnd.assignment.ring_bits,
        )
        self.last_stats = stats
        self._send_scheduler(
            Done(
                round_id, self.peer_id, stats.round_seconds, stats.bytes_sent, stats.bytes_received
            )
        )
        log.info(
            "peer %s finished round %s in %.3f s (%d B sent, %d B received)",
            self.peer_id,
            round_id,
            stats.round_seconds,
            stats.bytes_sent,
            stats.bytes_received,
        )
        # Every tensor is copied out of the round's buffer into a storage of its own.
        return decode_result(result, schema)

    def _step(self, rnd: _Round, call: Callable[[], list[Send]]) -> list[Send]:
        """Run one step of the round and note when each segment it shared went out."""
        sends = call()
        now = self._clock()
        while len(rnd.shared_at) < rnd.state.shared:
            rnd.shared_at.append(now)
        return sends

    def _phase_due(self, rnd: _Round | None) -> tuple[float, int, int] | None:
        """The earliest deadline of a phase this peer waits in, with the phase and its
        segment (None: not in a round, or waiting for nothing)."""
        if rnd is None:
            return None
        depth = rnd.state.tree.depth
        due = [
            (phase_deadline(rnd.shared_at[k], rnd.assignment.deadline_s, depth, phase), phase, k)
            for k, phase in rnd.state.pending()
        ]
        return min(due) if due else None

    def _phase_timeout_message(self, rnd: _Round, phase: int, segment: int) -> str:
        what = describe_phase(rnd.state.tree.depth, phase)
        if len(rnd.state.segments) > 1:
            what += f" of segment {segment} (of {len(rnd.state.segments)})"
        return (
            f"peer {self.peer_id} missed the deadline of {what}"
            f" in round {rnd.assignment.round_id} "
            f"({self._clock() - rnd.assigned_at:.1f} s after the assignment, round budget "
            f"{rnd.assignment.deadline_s:g} s), waiting for {rnd.state.waiting_for()}"
        )

    def _heartbeat(self, rnd: _Round | None) -> None:
        round_id = rnd.assignment.round_id if rnd is not None else None
        try:
            self._send_scheduler(Heartbeat(self.session, self.peer_id, round_id))
        except RoundFailedError as exc:  # a full queue to the scheduler: it is not reading
            log.warning("peer %s could not send a heartbeat: %s", self.peer_id, exc)

    def _forget(self, rnd: _Round) -> None:
        """After a failed round: ignore its messages from now on, drop what waits to go out."""
        round_id = rnd.assignment.round_id
        if round_id not in self._finished_rounds:
            self._finished_rounds.append(round_id)
        for member in rnd.members.values():
            sock = self._outboxes.pop(member.endpoint, None)
            close_quietly(sock, 0)

    def _timeout_message(self, rnd: _Round | None, timeout: float) -> str:
        if rnd is None:
            what = (
                "a round assignment from the scheduler (fewer peers than the round size have "
                "signed up, the scheduler is unreachable, or its key is not the one given)"
            )
            return f"peer {self.peer_id} timed out after {timeout:g} s waiting for {what}"
        return (
            f"peer {self.peer_id} timed out after {timeout:g} s in round "
            f"{rnd.assignment.round_id} waiting for {rnd.state.waiting_for()}"
        )

    def _on_scheduler_message(self, msg: Message, rnd: _Round | None) -> None:
        if isinstance(msg, SignupAck):
            log.debug("peer %s queued (%d waiting)", self.peer_id, msg.queued)
        elif isinstance(msg, SignupRejected):
            if msg.peer_id != self.peer_id:
                return
            cls = {
                "schema_mismatch": SchemaMismatchError,
                "id_in_use": PeerIdInUseError,
            }.get(msg.code, SignupRejectedError)
            raise cls(f"scheduler refused peer {self.peer_id}: {msg.reason}")
        elif isinstance(msg, Abort):
            if rnd is not None and msg.round_id == rnd.assignment.round_id:
                self._finished_rounds.append(msg.round_id)
                raise RoundAbortedError(
                    f"round {msg.round_id} aborted by the scheduler: {msg.reason}"
                )
            if msg.round_id not in self._finished_rounds:
                self._finished_rounds.append(msg.round_id)  # its late messages are ignored
            log.info("ignoring abort of round %s we are not in", msg.round_id)
        elif isinstance(msg, Assignment):
            log.warning("ignoring a second assignment (round %s) while in a round", msg.round_id)

    def _feed(self, rnd: _Round, item: _Inbound) -> None:
        opened = self._open(rnd, item)
        if opened is not None:
            self._feed_message(rnd, *opened)

    def _open(self, rnd: _Round, item: _Inbound) -> tuple[Message, SealedBlob | None] | None:
        """The message inside ``item`` once it proves to come from the member it names,
        and the blob its payload came in if it was forwarded; None (logged) otherwise.
        Insecure links carry the message decoded and unproven."""
        if item.envelope is None or item.frames is None:
            return (item.message, None) if item.message is not None else None
        if item.round_id != rnd.assignment.round_id:
            log.warning(
                "peer %s dropped a message of round %s (not ours)", self.peer_id, item.round_id
            )
            return None
        pair = rnd.links.get(item.sender)
        if pair is None:
            if item.sender == self.peer_id:
                why = "itself, in"
            elif item.sender in rnd.members:
                why = "a member we exchange nothing with (not a tree neighbour) in"
            else:
                why = "not a member of"
            log.warning(
                "peer %s dropped a message claiming to be from %s: %s round %s",
                self.peer_id,
                item.sender,
                why,
                item.round_id,
            )
            return None
        header: dict[str, Any] | None = None

        def place(frame: Any, nbytes: int) -> np.ndarray | None:
            # Where the payload goes, asked before it is decrypted; the header is
            # unpacked here once, and codec.decode takes it as it is.
            nonlocal header
            try:
                header = codec.decode_header(frame, codec.MAX_PEER_HEADER_BYTES)
            except RemoteProtocolError:
                return None  # codec.decode says what is wrong with it
            return self._result_slot(rnd, item.sender, header, nbytes)

        try:
            frames, blob = pair[1].open_message(item.envelope, item.frames, place)
            msg = codec.decode(frames, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER, header=header)
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a sealed message: %s", self.peer_id, exc)
            return None
        if (getattr(msg, "sender", None), getattr(msg, "round_id", None)) != (
            item.sender,
            item.round_id,
        ):
            log.warning(
                "peer %s dropped a %s whose header names another sender or round than its seal",
                self.peer_id,
                msg.TYPE,
            )
            return None
        if blob is not None and not isinstance(msg, Result):
            log.warning("peer %s dropped a %s forwarded as a blob", self.peer_id, msg.TYPE)
            return None
        return msg, blob

    @staticmethod
    def _result_slot(
        rnd: _Round, sender: str, header: dict[str, Any], nbytes: int
    ) -> np.ndarray | None:
        """Where a sealed payload may be decrypted: a result segment's slice of the
        round's result buffer, if the (unpacked) header names one the round waits
        for (:meth:`SegmentedRound.result_slot`); None (a buffer of its own) otherwise."""
        if header["t"] != Result.TYPE or header.get("sender") != sender:
            return None
        return rnd.state.result_slot(header.get("segment"), sender, nbytes)  # type: ignore[arg-type]

    def _feed_message(self, rnd: _Round, msg: Message, blob: SealedBlob | None = None) -> None:
        """Hand an accepted message to the round and send what it answers."""
        try:
            # An opened sealed payload is a buffer of ours (a fresh one, or a
            # result's slice of the round's own buffer); on insecure links it is
            # a view of ZeroMQ's frame.
            sends = self._step(rnd, lambda: rnd.state.receive(msg, payload_owned=bool(rnd.links)))
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a %s: %s", self.peer_id, msg.TYPE, exc)
            return
        except InvalidTotalError as exc:
            # A member sent a wrong partial sum: no result can come out of this round.
            self._give_up(rnd, str(exc))
            raise
        if blob is not None:  # _open lets blobs through on results only
            # The round accepted it: it is this segment's result's ciphertext.
            rnd.result_blobs[msg.segment] = blob  # type: ignore[attr-defined]
        try:
            self._deliver(rnd, sends)
        finally:
            # Every forward of a segment's result comes out of the one step that
            # produced it, so its ciphertext is needed no longer (ZeroMQ keeps
            # its own references to frames still queued).
            rnd.result_blobs.clear()

    def _deliver(self, rnd: _Round, sends: list[Send]) -> None:
        for send in sends:
            sock = self._outbox(rnd.members[send.to])
            frames = codec.encode(send.message)
            if rnd.links:
                frames = self._seal(rnd, send, frames)
            try:
                self._bytes_sent += send_frames(sock, frames, send.message.TYPE)
            except RoundFailedError as exc:
                # A member we cannot send to has failed (or is hopelessly behind):
                # tell the scheduler, which aborts the round for everyone.
                reason = f"cannot send {send.message.TYPE} to member {send.to}: {exc}"
                self._give_up(rnd, reason)
                raise RoundFailedError(
                    f"peer {self.peer_id} in round {rnd.assignment.round_id}: {reason}"
                ) from exc

    def _seal(self, rnd: _Round, send: Send, frames: list) -> list:
        """Seal one message for its recipient; a segment's result goes as its one blob."""
        link = rnd.links[send.to][0]
        msg = send.message
        if isinstance(msg, Result) and msg.payload is not None:
            blob = rnd.result_blobs.get(msg.segment)
            if blob is None:  # a root actor: the first to hold it in the clear
                blob = rnd.result_blobs[msg.segment] = SealedBlob.seal(msg.payload)
            return link.seal_forward(frames[0], blob)
        return link.seal(frames)

    def _outbox(self, member: _Member) -> zmq.Socket:
        sock = self._outboxes.get(member.endpoint)
        if sock is None:
            if self._ctx is None:  # pragma: no cover - aggregate() checks first
                raise LocalProtocolError("peer is stopped")
            sock = self._ctx.socket(zmq.PUSH)
            sock.linger = int(self.linger * 1000)
            sock.sndhwm = 10_000
            sock.connect(member.endpoint)
            self._outboxes[member.endpoint] = sock
        return sock

    def _send_scheduler(self, msg: Message) -> None:
        self._bytes_sent += send_message(self._scheduler, msg)

    def _recv(
        self, sock: zmq.Socket, max_header: int, allowed: tuple[type[Message], ...]
    ) -> Message | None:
        frames = sock.recv_multipart(copy=False)
        self._bytes_received += frames_nbytes(frames)
        try:
            return receive_message(frames, max_header, allowed)
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a malformed message: %s", self.peer_id, exc)
            return None

    def _keep_early(self, item: _Inbound) -> None:
        """Keep a message of a round we are not assigned yet, within count and byte bounds."""
        size = sum(b.nbytes for b in item.frames) if item.frames is not None else 0
        if len(self._early) == self._early.maxlen:
            self._early_bytes -= self._early[0][2]
        self._early.append((item.round_id, item, size))
        self._early_bytes += size
        while self._early_bytes > self._early_budget and len(self._early) > 1:
            _, dropped, dropped_size = self._early.popleft()
            self._early_bytes -= dropped_size
            log.warning(
                "peer %s dropped an early message from %s: early messages exceed %d bytes",
                self.peer_id,
                dropped.sender,
                self._early_budget,
            )

    def _recv_peer(self) -> _Inbound | Literal[False] | None:
        """One message off the inbox: its envelope read (sealed) or decoded (insecure);
        None for a malformed one (logged), False when nothing is queued."""
        # Asked rather than caught: a raised zmq.Again costs more than the question.
        if not self._inbox.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[union-attr]
            return False
        frames = self._inbox.recv_multipart(copy=False)  # type: ignore[union-attr]
        self._bytes_received += frames_nbytes(frames)
        try:
            if self.insecure:
                msg = receive_message(frames, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER)
                return _Inbound(msg.round_id, msg.sender, message=msg)  # type: ignore[attr-defined]
            buffers = [f.buffer for f in frames]
            envelope = Envelope.unpack(buffers[0])
            if len(buffers) != 1 + envelope.parts:  # checked before anything is kept
                raise RemoteProtocolError(
                    f"sealed message has {len(buffers) - 1} parts, its envelope says "
                    f"{envelope.parts}"
                )
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a malformed message: %s", self.peer_id, exc)
            return None
        return _Inbound(envelope.round_id, envelope.sender, envelope, buffers)

    def _give_up(self, rnd: _Round | None, reason: str | None = None) -> None:
        try:
            if rnd is not None:
                if reason is None:
                    reason = f"timed out waiting for {rnd.state.waiting_for()}"
                self._send_scheduler(Abort(rnd.assignment.round_id, self.peer_id, reason[:4000]))
                self._finished_rounds.append(rnd.assignment.round_id)
            else:
                self._send_scheduler(Leave(self.session, self.peer_id))
        except RoundFailedError as exc:
            log.warning("could not tell the scheduler we gave up: %s", exc)
