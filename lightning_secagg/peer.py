"""The peer: a listening socket, a link to the scheduler, and a blocking ``aggregate()``.

Why synchronous I/O (no background thread): between rounds a peer has
nothing to answer (ZeroMQ buffers whatever arrives meanwhile), and inside a
round the caller is blocked anyway. Driving the sockets from ``aggregate()``
with a ``zmq.Poller`` and one deadline keeps every socket in one thread, makes
every wait bounded, and leaves nothing running when training runs.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch
import zmq

from lightning_secagg import codec
from lightning_secagg.encoding import (
    DEFAULT_FRAC_BITS,
    Schema,
    check_values,
    decode_result,
    decode_total,
    encode,
)
from lightning_secagg.errors import (
    ConfigurationError,
    LocalProtocolError,
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
    Leave,
    Message,
    Signup,
    SignupAck,
    SignupRejected,
    ident,
)
from lightning_secagg.protocol.peer_round import PeerRound, Send
from lightning_secagg.sharing import RandomBytes, system_random_bytes
from lightning_secagg.transport import (
    bind_endpoint,
    close_quietly,
    frames_nbytes,
    is_wildcard_host,
    receive_message,
    send_message,
)
from lightning_secagg.tree import AggregationTree

log = logging.getLogger(__name__)

#: Messages of rounds we have not been assigned yet, kept until the assignment arrives.
MAX_EARLY_MESSAGES = 256


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
    """

    round_id: str
    seconds: float
    round_seconds: float
    bytes_sent: int
    bytes_received: int
    num_peers: int
    depth: int
    roles: tuple[str, ...]


class Peer:
    """A participant in secure aggregation rounds.

    Args:
        address: Where to listen, e.g. ``tcp://127.0.0.1:6000`` (port 0: any free port).
        scheduler_address: The scheduler's address, e.g. ``tcp://127.0.0.1:5555``.
        session: Name of the waiting queue; peers of one model share one.
        peer_id: Unique name in the session (random by default).
        advertise: The address other peers connect to, when ``address`` binds
            a wildcard host such as ``0.0.0.0``.
        frac_bits: Fixed-point fraction bits; all peers of a session must agree.
        linger: Seconds :meth:`stop` lets queued messages leave.
        random_bytes: Randomness for shares (``os.urandom``; injectable for tests).
        clock: Monotonic clock (injectable for tests).

    A peer is used from one thread at a time.
    """

    def __init__(
        self,
        address: str,
        scheduler_address: str,
        session: str = "default",
        *,
        peer_id: str | None = None,
        advertise: str | None = None,
        frac_bits: int = DEFAULT_FRAC_BITS,
        linger: float = 5.0,
        random_bytes: RandomBytes = system_random_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bind = bind_endpoint(address)
        self.scheduler_address = scheduler_address
        bind_endpoint(scheduler_address)
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
        self.frac_bits = frac_bits
        self.linger = linger
        self._random_bytes = random_bytes
        self._clock = clock
        self._ctx: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._scheduler: zmq.Socket | None = None
        self._outboxes: dict[str, zmq.Socket] = {}
        self._early: deque[Message] = deque(maxlen=MAX_EARLY_MESSAGES)
        self._finished_rounds: deque[str] = deque(maxlen=64)
        self.endpoint: str | None = None
        self.last_stats: RoundStats | None = None
        self._bytes_sent = 0
        self._bytes_received = 0

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
        try:
            inbox.bind(self._bind)
        except zmq.ZMQError as exc:
            inbox.close(linger=0)
            ctx.term()
            raise ConfigurationError(f"cannot listen on {self._bind}: {exc.strerror}") from exc
        bound = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
        sched = ctx.socket(zmq.DEALER)
        sched.linger = int(self.linger * 1000)
        sched.connect(self.scheduler_address)
        self._ctx, self._inbox, self._scheduler = ctx, inbox, sched
        self.endpoint = self._advertise if self._advertise is not None else bound
        log.info("peer %s listening on %s", self.peer_id, self.endpoint)
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
            EncodingError: NaN/Inf or values too large for the fixed-point ring.
            SchemaMismatchError: the scheduler says the model differs from the session's.
            SignupRejectedError: the scheduler refused the sign-up for another reason.
            RoundTimeoutError: the deadline passed; says what was still missing.
            RoundAbortedError: the scheduler aborted the round.
        """
        if self._ctx is None:
            raise LocalProtocolError("call start() (or use the peer as a context manager) first")
        if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
            raise ConfigurationError(f"weight must be a finite number > 0, got {weight!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        schema = Schema.of(state_dict, self.frac_bits)
        check_values(state_dict, self.frac_bits)
        started = self._clock()
        deadline = started + timeout
        sent0, recv0 = self._bytes_sent, self._bytes_received
        self._send_scheduler(
            Signup(
                self.session,
                self.peer_id,
                self.endpoint or "",
                float(weight),
                self.frac_bits,
                schema.to_wire(),
            )
        )
        assignment: Assignment | None = None
        members: dict[str, str] = {}
        state: PeerRound | None = None
        assigned_at = started
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self._scheduler, zmq.POLLIN)
        while state is None or not state.done:
            remaining = deadline - self._clock()
            if remaining <= 0:
                self._give_up(state, assignment)
                what = (
                    f"{state.waiting_for()}"
                    if state is not None
                    else "a round assignment from the scheduler (fewer peers than the round size "
                    "have signed up, or the scheduler is unreachable)"
                )
                rid = f" in round {assignment.round_id}" if assignment else ""
                raise RoundTimeoutError(
                    f"peer {self.peer_id} timed out after {timeout:g} s{rid} waiting for {what}"
                )
            events = dict(poller.poll(timeout=max(1, int(remaining * 1000))))
            if self._scheduler in events:
                msg = self._recv(self._scheduler, codec.MAX_HEADER_BYTES, FROM_SCHEDULER)
                if isinstance(msg, Assignment) and assignment is None:
                    assignment, members, state = self._accept_assignment(
                        msg, state_dict, weight, schema
                    )
                    if state is not None:
                        assigned_at = self._clock()
                        self._deliver(members, state.start())
                        # Shares that raced ahead of our assignment.
                        early = [
                            m for m in self._early if getattr(m, "round_id", None) == msg.round_id
                        ]
                        self._early.clear()
                        for m in early:
                            self._feed(state, members, m)
                        deadline = min(deadline, assigned_at + msg.deadline_s)
                elif msg is not None:
                    self._on_scheduler_message(msg, assignment)
            if self._inbox in events:
                msg = self._recv(self._inbox, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER)
                if msg is None:
                    continue
                if state is not None:
                    self._feed(state, members, msg)
                elif getattr(msg, "round_id", None) not in self._finished_rounds:
                    self._early.append(msg)
        result = state.result
        if assignment is None or result is None:  # pragma: no cover - loop invariant
            raise LocalProtocolError("round finished without a result")
        finished = self._clock()
        self._finished_rounds.append(assignment.round_id)
        self.last_stats = RoundStats(
            round_id=assignment.round_id,
            seconds=finished - started,
            round_seconds=finished - assigned_at,
            bytes_sent=self._bytes_sent - sent0,
            bytes_received=self._bytes_received - recv0,
            num_peers=len(members),
            depth=state.tree.depth,
            roles=state.roles,
        )
        self._send_scheduler(
            Done(
                assignment.round_id,
                self.peer_id,
                self.last_stats.round_seconds,
                self.last_stats.bytes_sent,
                self.last_stats.bytes_received,
            )
        )
        log.info(
            "peer %s finished round %s in %.3f s (%d B sent, %d B received)",
            self.peer_id,
            assignment.round_id,
            self.last_stats.round_seconds,
            self.last_stats.bytes_sent,
            self.last_stats.bytes_received,
        )
        return decode_result(result, schema)

    # -- internals -------------------------------------------------------

    def _accept_assignment(
        self,
        msg: Assignment,
        state_dict: Mapping[str, torch.Tensor],
        weight: float,
        schema: Schema,
    ) -> tuple[Assignment | None, dict[str, str], PeerRound | None]:
        members = {pid: ep for pid, ep in msg.members}
        if msg.session != self.session or self.peer_id not in members:
            log.warning("ignoring an assignment for session %r that does not name us", msg.session)
            return None, {}, None
        try:
            tree = AggregationTree.from_wire(msg.tree, msg.group_size, msg.num_actors)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring a malformed assignment for round %s: %s", msg.round_id, exc)
            return None, {}, None
        if set(tree.members) != set(members):
            log.warning("ignoring assignment %s: tree and member list differ", msg.round_id)
            return None, {}, None
        share = weight / msg.total_weight
        if not 0 < share <= 1:
            log.warning(
                "ignoring assignment %s: total weight %g < own weight",
                msg.round_id,
                msg.total_weight,
            )
            return None, {}, None
        vector = encode(state_dict, schema, share)
        state = PeerRound(
            me=self.peer_id,
            round_id=msg.round_id,
            tree=tree,
            vector=vector,
            finalize=lambda total: decode_total(total, schema),
            result_nbytes=schema.result_nbytes,
            random_bytes=self._random_bytes,
        )
        log.info(
            "peer %s joined round %s of %d peers as %s",
            self.peer_id,
            msg.round_id,
            len(members),
            ", ".join(state.roles),
        )
        return msg, members, state

    def _on_scheduler_message(self, msg: Message, assignment: Assignment | None) -> None:
        if isinstance(msg, SignupAck):
            log.debug("peer %s queued (%d waiting)", self.peer_id, msg.queued)
        elif isinstance(msg, SignupRejected):
            if msg.peer_id != self.peer_id:
                return
            cls = SchemaMismatchError if msg.code == "schema_mismatch" else SignupRejectedError
            raise cls(f"scheduler refused peer {self.peer_id}: {msg.reason}")
        elif isinstance(msg, Abort):
            if assignment is not None and msg.round_id == assignment.round_id:
                self._finished_rounds.append(msg.round_id)
                raise RoundAbortedError(
                    f"round {msg.round_id} aborted by the scheduler: {msg.reason}"
                )
            log.info("ignoring abort of round %s we are not in", msg.round_id)
        elif isinstance(msg, Assignment):
            log.warning("ignoring a second assignment (round %s) while in a round", msg.round_id)

    def _feed(self, state: PeerRound, members: dict[str, str], msg: Message) -> None:
        try:
            sends = state.receive(msg)
        except RemoteProtocolError as exc:
            log.warning("peer %s dropped a %s: %s", self.peer_id, msg.TYPE, exc)
            return
        self._deliver(members, sends)

    def _deliver(self, members: dict[str, str], sends: list[Send]) -> None:
        for send in sends:
            sock = self._outbox(members[send.to])
            self._bytes_sent += send_message(sock, send.message)

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

    def _give_up(self, state: PeerRound | None, assignment: Assignment | None) -> None:
        try:
            if assignment is not None:
                reason = f"timed out waiting for {state.waiting_for() if state else 'the round'}"
                self._send_scheduler(Abort(assignment.round_id, self.peer_id, reason[:4000]))
                self._finished_rounds.append(assignment.round_id)
            else:
                self._send_scheduler(Leave(self.session, self.peer_id))
        except RoundFailedError as exc:
            log.warning("could not tell the scheduler we gave up: %s", exc)
