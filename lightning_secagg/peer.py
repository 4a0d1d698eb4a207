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

import functools
import logging
import math
import operator
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from lightning_secagg import codec
from lightning_secagg.encoding import decode_result, decode_total, encode, magnitude_exponents
from lightning_secagg.errors import (
    ConfigurationError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundFailedError,
    SchedulerKeyError,
    SchedulerUnreachableError,
)
from lightning_secagg.messages import FROM_SCHEDULER, Done, Heartbeat, WaitingStatus
from lightning_secagg.peer_options import (  # noqa: F401 - part of this module's API
    DEFAULT_MAX_MESSAGE_BYTES,
    PeerOptions,
    check_peer_options,
)
from lightning_secagg.protocol.peer_session import (
    Contribution,
    Disconnect,
    PeerSession,
    Retrying,
    ToScheduler,
    is_retryable,  # noqa: F401 - part of this module's API since 0.1
)
from lightning_secagg.ring import exponents_to_declare
from lightning_secagg.roster import Roster, RosterFile
from lightning_secagg.schema import (
    DEFAULT_FRAC_BITS,
    Schema,
    result_span,
    round_segments,
)
from lightning_secagg.sealing import CHUNK_BYTES, TAG_BYTES
from lightning_secagg.security import (
    KeyPair,
    key_fingerprint,
    make_curve_client,
)
from lightning_secagg.sharing import RandomBytes, system_random_bytes
from lightning_secagg.transport import (
    close_quietly,
    frames_nbytes,
    receive_message,
    send_frames,
    send_message,
)
from lightning_secagg.wire import Inbound, PlainWire, SealedWire, Transmit

log = logging.getLogger(__name__)

#: Messages read off the inbox per wake-up at most, before deadlines are checked again.
INBOX_BATCH = 64


#: What :meth:`Peer.preflight` watches on its probe connection.
HANDSHAKE_FAILURES = frozenset(
    {
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    }
)
PROBE_EVENTS = zmq.EVENT_CONNECTED | functools.reduce(operator.or_, HANDSHAKE_FAILURES)


def required_message_bytes(schema: Schema, *, sealed: bool = True) -> int:
    """The largest frame a round of this model sends a peer, plus a margin.

    A good ``max_message_bytes`` for a peer that only ever averages this model:
    anything larger on its inbox is cut before it is buffered. Sealed traffic
    (the default) travels in chunks of at most ``sealing.CHUNK_BYTES`` plus a
    tag, so the bound stops growing with the model; plaintext (``insecure``)
    payloads are one frame. The margin covers a header frame.
    """
    bounds = round_segments(schema)
    largest = max(
        max(8 * (1 + b - a) for a, b in bounds),
        max(hi - lo for lo, hi in (result_span(schema, a, b) for a, b in bounds)),
    )
    if sealed:
        largest = min(largest, CHUNK_BYTES) + TAG_BYTES
    return largest + codec.MAX_PEER_HEADER_BYTES


def make_contribution(
    state_dict: Mapping[str, torch.Tensor],
    weight: float,
    *,
    frac_bits: int = DEFAULT_FRAC_BITS,
    ring: str = "auto",
) -> Contribution:
    """The model as a peer's session sees it (torch stays here, at the edge).

    The values are checked now (NaN/Inf, overflow: :class:`EncodingError`),
    before anything is sent, so that encoding a segment later needs no second
    pass over the model. ``ring="64"`` declares no exponents.

    Raises:
        EncodingError: NaN/Inf, values too large for the ring, or an unsupported dtype.
    """
    schema = Schema.of(state_dict, frac_bits)
    exponents = magnitude_exponents(state_dict, frac_bits)
    return Contribution(
        schema,
        weight,
        exponents_to_declare(schema, exponents) if ring == "auto" else None,
        lambda share, plan, seg: encode(
            state_dict, schema, share, checked=True, plan=plan, segment=seg
        ),
        lambda total, plan, seg, out: decode_total(total, schema, plan, segment=seg, out=out),
    )


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
        roster: Admission control: a :class:`~lightning_secagg.roster.Roster`,
            or the path of a roster file (the scheduler's ``--allow-keys``
            format, re-read when it changes). The peer refuses, before sending
            anything, any round with a member key outside it
            (:class:`~lightning_secagg.errors.ForeignMemberError`). None: any
            key may be a member, and the peer says so once per round.

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
        roster: Roster | str | os.PathLike[str] | None = None,
    ) -> None:
        options = check_peer_options(
            address,
            scheduler_address,
            session,
            scheduler_key=scheduler_key,
            keys=keys,
            insecure=insecure,
            peer_id=peer_id,
            advertise=advertise,
            frac_bits=frac_bits,
            ring=ring,
            linger=linger,
            max_message_bytes=max_message_bytes,
            heartbeat_interval=heartbeat_interval,
            roster=roster,
        )
        self._bind = options.bind
        self.scheduler_address = options.scheduler_address
        self.session = options.session
        self.peer_id = options.peer_id
        self._advertise = options.advertise
        self.insecure = options.insecure
        self.scheduler_key: str | None = options.scheduler_key
        self.keys: KeyPair | None = None if insecure else (keys or KeyPair.generate())
        self.frac_bits = options.frac_bits
        self.ring = options.ring
        self.linger = options.linger
        self.max_message_bytes = options.max_message_bytes
        self.heartbeat_interval = options.heartbeat_interval
        self.roster: Roster | None = options.roster
        #: The roster's file, re-read when it changes (the scheduler's RosterFile).
        self._roster_file = (
            RosterFile(options.roster_path, clock=clock) if options.roster_path else None
        )
        self.last_failures: list[RoundFailedError] = []
        self._random_bytes = random_bytes
        self._clock = clock
        self._ctx: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._scheduler: zmq.Socket | None = None
        self._outboxes: dict[str, zmq.Socket] = {}
        self._wire: PlainWire | SealedWire = PlainWire() if insecure else SealedWire()
        #: The protocol itself (created by start(), once the endpoint is known).
        self._session: PeerSession | None = None
        self._on_retry: Callable[[RoundFailedError, int], None] | None = None
        #: Bytes sent and received when the last round ended (before its Done).
        self._round_meter = (0, 0)
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
        if self._session is None:  # kept over stop()/start(): it knows the finished rounds
            self._session = PeerSession(
                self.peer_id,
                self.session,
                self.endpoint,
                self.public_key or "",
                self._wire,
                random_bytes=self._random_bytes,
                heartbeat_interval=self.heartbeat_interval,
                frac_bits=self.frac_bits,
                meter=lambda: (self._bytes_sent, self._bytes_received),
                roster=self.roster,
            )
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

    def close(self) -> None:
        """Leave the session for good, then :meth:`stop`. Idempotent.

        The scheduler is told (a ``Farewell``): it drops this peer from its
        queue and may then tell the session's other peers at once that too few
        remain, instead of letting them time out. Use :meth:`stop` for a pause
        after which the peer signs up again.
        """
        if self._ctx is not None and self._session is not None:
            self._apply(self._session.farewell())
        self.stop()

    @property
    def waiting_status(self) -> WaitingStatus | None:
        """What the scheduler last said the current call waits for (None: nothing yet).

        How many peers with this model, and with another, wait in the session,
        the round's ``target_size`` and ``min_size``, and who left for good.
        """
        return self._session.waiting_status if self._session is not None else None

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.close()  # the user stopped the program: it will not sign up again
        else:
            self.stop()

    def __getstate__(self) -> dict[str, object]:
        raise TypeError("a Peer owns sockets and cannot be pickled; create it in each process")

    # -- the round -------------------------------------------------------

    def preflight(self, timeout: float = 10.0) -> float:
        """Check, before any round, that the scheduler answers and accepts our handshake.

        A separate connection with this peer's keys sends the scheduler a
        heartbeat, which it answers at once (it does not know us yet); ZeroMQ's
        socket monitor tells a refused CURVE handshake (the key given is not
        the scheduler's) from an address where nothing answers. Returns the
        seconds it took.

        Raises:
            SchedulerKeyError: the scheduler refused the handshake.
            SchedulerUnreachableError: nothing answered within ``timeout``.
            LocalProtocolError: the peer is not started.
        """
        if self._ctx is None:
            raise LocalProtocolError("call start() (or use the peer as a context manager) first")
        started = self._clock()
        probe = self._ctx.socket(zmq.DEALER)
        probe.linger = 0
        probe.maxmsgsize = codec.MAX_HEADER_BYTES
        if self.keys is not None and self.scheduler_key is not None:
            make_curve_client(probe, self.keys, self.scheduler_key)
        monitor = probe.get_monitor_socket(PROBE_EVENTS)
        refused = connected = False
        try:
            probe.connect(self.scheduler_address)
            send_message(probe, Heartbeat(self.session, self.peer_id, None))
            poller = zmq.Poller()
            poller.register(probe, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            deadline = started + timeout
            while (now := self._clock()) < deadline:
                events = dict(poller.poll(max(1, math.ceil((deadline - now) * 1000))))
                if probe in events:
                    probe.recv_multipart()  # any answer: reachable, and our handshake passed
                    return self._clock() - started
                while monitor in events and monitor.poll(0):
                    event = recv_monitor_message(monitor)["event"]
                    connected |= event == zmq.EVENT_CONNECTED
                    refused |= event in HANDSHAKE_FAILURES
                if refused:
                    break  # every reconnection will be refused the same way
        finally:
            probe.disable_monitor()
            monitor.close(linger=0)
            probe.close(linger=0)
        where = self.scheduler_address
        if refused:
            raise SchedulerKeyError(
                f"the scheduler at {where} refused the CURVE handshake: scheduler_key is not "
                "its public key; pass the key `lightning-secagg scheduler` printed (or its "
                ".key file)"
            )
        if connected:
            raise SchedulerUnreachableError(
                f"a process at {where} accepted the connection but did not answer in "
                f"{timeout:g} s: is it a lightning-secagg scheduler (and not an insecure one)?"
            )
        raise SchedulerUnreachableError(
            f"nothing answered at {where} within {timeout:g} s: start the scheduler "
            "(`lightning-secagg scheduler`) or fix the address"
        )

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
            bit, on every peer of the round. Each owns its memory.

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
        return self.aggregate_with_retry(state_dict, weight, timeout, max_retries=0)

    def aggregate_with_retry(
        self,
        state_dict: Mapping[str, torch.Tensor],
        weight: float = 1.0,
        timeout: float = 300.0,
        max_retries: int = 2,
        *,
        on_retry: Callable[[RoundFailedError, int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`aggregate`, retried up to ``max_retries`` times after a failed round.

        Each attempt signs up again and gets ``timeout`` seconds; the scheduler
        puts the survivors into a new round with a fresh tree, and fresh shares
        are drawn (re-sharing the same input to a new tree reveals nothing new).
        Errors that would fail again the same way (a refused sign-up, a bad
        model or argument) are raised at once
        (:func:`~lightning_secagg.protocol.peer_session.is_retryable`).
        :attr:`last_failures` lists the errors of the attempts that failed.

        Args:
            on_retry: Called as ``on_retry(error, attempt)`` before each retry
                (``attempt`` counts from 1), e.g. to log metrics.

        Raises:
            RoundFailedError: the last attempt's error once the retries are spent;
                and everything :meth:`aggregate` raises.
        """
        if self._session is None:
            raise LocalProtocolError("call start() (or use the peer as a context manager) first")
        session = self._session
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise ConfigurationError(f"weight must be a finite number > 0, got {weight!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")
        ):
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        contribution = self._contribution(state_dict, float(weight))
        self._check_inbox_limit(contribution.schema)
        self.last_failures = []
        self._on_retry = on_retry
        started = self._clock()
        sent0, recv0 = self._bytes_sent, self._bytes_received
        self._apply(session.begin(contribution, started, timeout=timeout, max_retries=max_retries))
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self._scheduler, zmq.POLLIN)
        while session.active:
            self._poll_roster(session)
            self._apply(session.tick(self._clock()))
            due = session.next_deadline()
            if due is None:
                break
            wait_ms = max(1, math.ceil((due - self._clock()) * 1000))
            events = dict(poller.poll(timeout=wait_ms))
            if self._scheduler in events:
                self._from_scheduler()
            if self._inbox in events:
                self._drain_inbox()
        self.last_failures = session.failures
        if session.error is not None:
            raise session.error
        return self._finish(contribution.schema, started, sent0, recv0)

    # -- the shell: what the session asks for ------------------------------

    def _poll_roster(self, session: PeerSession) -> None:
        """Hand the session a roster file's new version (looked at once a second at most)."""
        if self._roster_file is not None:
            fresh = self._roster_file.poll()
            if fresh is not None:
                self.roster = session.roster = fresh

    def _contribution(self, state_dict: Mapping[str, torch.Tensor], weight: float) -> Contribution:
        return make_contribution(state_dict, weight, frac_bits=self.frac_bits, ring=self.ring)

    def _apply(self, outputs: list[Any]) -> None:
        """Do what the session asks: send, close, report retries."""
        round_failed = False
        for out in outputs:
            if isinstance(out, Transmit):
                if round_failed:
                    continue  # the rest of a batch whose round has just failed
                try:
                    sock = self._outbox(out.endpoint)
                    self._bytes_sent += send_frames(sock, out.frames, out.what)
                except RoundFailedError as exc:
                    # A member we cannot send to has failed (or is hopelessly behind):
                    # the session tells the scheduler, which aborts the round for everyone.
                    round_failed = True
                    self._apply(self._session.transmit_failed(out.to, str(exc), self._clock()))  # type: ignore[union-attr]
            elif isinstance(out, ToScheduler):
                if isinstance(out.message, Done):
                    # The round's figures end here: its report to the scheduler is not
                    # part of the round (as the planner counts it).
                    self._round_meter = (self._bytes_sent, self._bytes_received)
                try:
                    self._bytes_sent += send_message(self._scheduler, out.message)  # type: ignore[arg-type]
                except RoundFailedError as exc:  # a full queue: the scheduler is not reading
                    log.warning(
                        "peer %s could not send %s to the scheduler: %s",
                        self.peer_id,
                        out.message.TYPE,
                        exc,
                    )
            elif isinstance(out, Disconnect):
                for endpoint in out.endpoints:
                    close_quietly(self._outboxes.pop(endpoint, None), 0)
            elif isinstance(out, Retrying):
                self.last_failures.append(out.error)
                if self._on_retry is not None:
                    self._on_retry(out.error, out.attempt)

    def _handle(self, what: str, handler: Callable[[], list[Any]]) -> None:
        """Run one message's handler: a refusal is logged and the message dropped.

        The session's refusals of peer traffic name the message themselves
        ("a share: duplicate ..."); ``what`` prefixes the others. An unexpected
        error is logged too, bounded, and never ends the call: one message must
        not take the peer down.
        """
        try:
            outputs = handler()
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped %s%s", self.peer_id, what, exc)
            return
        except Exception as exc:
            log.error(
                "peer %s dropped %s(a message) after an unexpected %s: %.300s",
                self.peer_id,
                what,
                type(exc).__name__,
                exc,
            )
            return
        self._apply(outputs)

    def _from_scheduler(self) -> None:
        frames = self._scheduler.recv_multipart(copy=False)  # type: ignore[union-attr]
        self._bytes_received += frames_nbytes(frames)
        try:
            msg = receive_message(frames, codec.MAX_HEADER_BYTES, FROM_SCHEDULER)
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a malformed message: %s", self.peer_id, exc)
            return
        session = self._session
        assert session is not None  # noqa: S101 - only inside aggregate()
        self._handle(
            f"a {msg.TYPE} from the scheduler: ",
            lambda: session.receive_scheduler(msg, self._clock()),
        )

    def _drain_inbox(self) -> None:
        """Read what is queued (a bounded batch) before polling again: one poll,
        deadline check and wake-up per batch rather than per message."""
        session = self._session
        assert session is not None  # noqa: S101 - only inside aggregate()
        for _ in range(INBOX_BATCH):
            item = self._recv_peer()
            if item is False:  # the queue is empty
                break
            if item is not None:
                now = self._clock()
                self._handle("", partial(session.receive_peer, item, now))
            if not session.active:  # what follows belongs to later rounds
                break

    def _recv_peer(self) -> Inbound | Literal[False] | None:
        """One message off the inbox, parsed by the wire; None for a malformed one
        (logged), False when nothing is queued."""
        # Asked rather than caught: a raised zmq.Again costs more than the question.
        if not self._inbox.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[union-attr]
            return False
        frames = self._inbox.recv_multipart(copy=False)  # type: ignore[union-attr]
        self._bytes_received += frames_nbytes(frames)
        try:
            return self._wire.parse(frames)
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a malformed message: %s", self.peer_id, exc)
            return None

    def _outbox(self, endpoint: str) -> zmq.Socket:
        sock = self._outboxes.get(endpoint)
        if sock is None:
            if self._ctx is None:  # pragma: no cover - aggregate() checks first
                raise LocalProtocolError("peer is stopped")
            sock = self._ctx.socket(zmq.PUSH)
            sock.linger = int(self.linger * 1000)
            sock.sndhwm = 10_000
            sock.connect(endpoint)
            self._outboxes[endpoint] = sock
        return sock

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

    def _finish(
        self, schema: Schema, started: float, sent0: int, recv0: int
    ) -> dict[str, torch.Tensor]:
        session = self._session
        assert session is not None  # noqa: S101 - only inside aggregate()
        info, result = session.round_info, session.result
        if info is None or result is None:  # pragma: no cover - the loop's invariant
            raise LocalProtocolError("round finished without a result")
        finished = self._clock()
        stats = RoundStats(
            round_id=info.round_id,
            seconds=finished - started,
            round_seconds=finished - info.assigned_at,
            bytes_sent=self._round_meter[0] - sent0,
            bytes_received=self._round_meter[1] - recv0,
            num_peers=info.num_peers,
            depth=info.depth,
            roles=info.roles,
            ring_bits=info.ring_bits,
        )
        self.last_stats = stats
        log.info(
            "peer %s finished round %s in %.3f s (%d B sent, %d B received)",
            self.peer_id,
            info.round_id,
            stats.round_seconds,
            stats.bytes_sent,
            stats.bytes_received,
        )
        session.result = None  # the tensors below own their memory: release the buffer
        return decode_result(result, schema)
