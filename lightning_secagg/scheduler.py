"""The scheduler process: a ROUTER socket and an I/O thread around :class:`SchedulerState`.

The I/O thread owns the socket. It sleeps in ``zmq.Poller.poll`` until a
message arrives, a round's deadline is due, the roster file is to be looked
at (once a second, when there is one), or :meth:`Scheduler.stop` pokes it
through an inproc pipe: no busy loop, no sleep. ``ROUTER_MANDATORY`` makes an
undeliverable reply an error that aborts the round instead of vanishing.

Nothing a client sends can end the I/O thread: an exception while handling
one message is logged (one bounded, rate-limited line) and that message is
dropped; the thread goes on with the next.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from lightning_secagg import codec
from lightning_secagg.errors import ConfigurationError, RemoteProtocolError, RoundFailedError
from lightning_secagg.messages import TO_SCHEDULER, safe_text
from lightning_secagg.protocol.scheduler_state import (
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_QUEUED,
    Outgoing,
    SchedulerState,
)
from lightning_secagg.ratelimit import LogLimiter
from lightning_secagg.roster import Roster, RosterFile
from lightning_secagg.security import (
    KeyPair,
    ZapHandler,
    key_fingerprint,
    make_curve_server,
    sender_key,
)
from lightning_secagg.transport import bind_endpoint, receive_message, send_message
from lightning_secagg.tree import privacy_warnings, validate_tree_params

log = logging.getLogger(__name__)

#: What :meth:`Scheduler._guarded` returns for a step that raised.
_FAILED: Any = object()


#: The monitor events of a refused handshake (logged, see ``Scheduler._log_handshakes``).
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Scheduler:
    """Peer discovery and aggregation waiting queue.

    Args:
        port: TCP port to listen on (0: any free port; see :attr:`address`).
        target_size: Peers per round; extra peers wait for the next round.
        group_size: Participants per group of the aggregation tree.
        num_actors: Actors per group (``2 <= num_actors < group_size``).
        host: Interface to bind, e.g. ``127.0.0.1`` or ``0.0.0.0``.
        keys: The scheduler's long-term CURVE key pair (see ``lightning-secagg keygen``
            and :meth:`KeyPair.load`); a fresh one when omitted. Peers need
            :attr:`public_key`.
        insecure: Plaintext, unauthenticated links. Only for debugging: anyone on
            the network can then read every share. Logged loudly every round.
        round_timeout: Seconds after which an unfinished round is aborted for all
            members; None (the default) derives it per round from the model's size
            and the tree's depth (:mod:`lightning_secagg.deadlines`).
        min_size: Smallest round (default ``target_size``): when fewer than
            ``target_size`` live peers wait, a round of at least ``min_size`` forms
            once the oldest has waited ``queue_wait`` seconds.
        queue_wait: See ``min_size``.
        liveness_timeout: Seconds of silence (peers heartbeat every second from
            inside ``aggregate()``) after which a queued peer is dropped and the
            round of a member is aborted for everyone. None disables it.
        allow_keys: Admission control: a roster file (``name public-key`` per
            line, re-read when it changes, see :mod:`lightning_secagg.roster`)
            or a :class:`~lightning_secagg.roster.Roster`. Only its keys may
            sign up. None admits any key, and every round says so in the log.
        max_ids_per_key: Queued peer ids one key may hold at once.
        max_queued: Queued peers over all sessions.
        max_elements: Largest model accepted at sign-up, in elements.
        schema_fingerprint: Pin the model: only sign-ups whose schema has this
            fingerprint are accepted (otherwise each schema queues apart).
        clock: Monotonic clock (injectable for tests).

    Raises:
        ConfigurationError: invalid tree parameters, an unreadable or malformed
            roster, or a roster with ``insecure=True``.
    """

    def __init__(
        self,
        port: int = 5555,
        target_size: int = 6,
        group_size: int = 3,
        num_actors: int = 2,
        host: str = "127.0.0.1",
        *,
        keys: KeyPair | None = None,
        insecure: bool = False,
        round_timeout: float | None = None,
        min_size: int | None = None,
        queue_wait: float = 10.0,
        liveness_timeout: float | None = 10.0,
        allow_keys: str | os.PathLike[str] | Roster | None = None,
        max_ids_per_key: int = 1,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        schema_fingerprint: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        validate_tree_params(target_size, group_size, num_actors)
        for warning in privacy_warnings(target_size, group_size, num_actors):
            log.warning("privacy: %s", warning)
        if insecure and keys is not None:
            raise ConfigurationError("keys and insecure=True exclude each other")
        self.insecure = insecure
        self.keys = None if insecure else (keys or KeyPair.generate())
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be an int in [0, 65535], got {port!r}")
        self._bind = bind_endpoint(f"tcp://{host}:{port}")
        self._clock = clock
        self._roster_file: RosterFile | None = None
        roster: Roster | None = None
        if isinstance(allow_keys, Roster):
            roster = allow_keys
        elif allow_keys is not None:
            self._roster_file = RosterFile(allow_keys, clock=clock)
            roster = self._roster_file.roster
        if roster is not None and insecure:
            raise ConfigurationError("allow_keys needs authenticated keys: not with insecure=True")
        self._errors = LogLimiter(log, clock=clock)
        self._handshakes = LogLimiter(log, clock=clock)
        self.state = SchedulerState(
            target_size,
            group_size,
            num_actors,
            round_timeout=round_timeout,
            min_size=min_size,
            queue_wait=queue_wait,
            liveness_timeout=liveness_timeout,
            clock=clock,
            insecure=insecure,
            roster=roster,
            max_ids_per_key=max_ids_per_key,
            max_queued=max_queued,
            max_elements=max_elements,
            schema_fingerprint=schema_fingerprint,
        )
        if roster is not None:
            log.info("admission control: %d keys on the roster %s", len(roster), roster.source)
        self._ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._wake_addr = f"inproc://scheduler-wake-{id(self)}"
        self.address: str | None = None

    @property
    def public_key(self) -> str | None:
        """The CURVE public key peers must be given (None when insecure)."""
        return self.keys.public if self.keys else None

    def start(self) -> Scheduler:
        """Bind and start serving; returns once the socket listens.

        Raises:
            ConfigurationError: the address cannot be bound (e.g. the port is in use).
        """
        if self._thread is not None:
            return self
        self._ctx = zmq.Context()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._serve, name="secagg-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            self._ctx.term()
            self._ctx = None
            raise ConfigurationError(f"scheduler cannot listen on {self._bind}: {self._error}")
        if self.keys is not None:
            log.info(
                "scheduler listening on %s (CURVE, key fingerprint %s)",
                self.address,
                key_fingerprint(self.keys.public),
            )
        else:
            log.warning(
                "scheduler listening on %s WITHOUT ENCRYPTION (insecure=True): anyone on the "
                "network can read and forge every message",
                self.address,
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the port. Idempotent; returns within ``timeout`` seconds."""
        if self._thread is None or self._ctx is None:
            return
        wake = self._ctx.socket(zmq.PAIR)
        wake.linger = 0
        wake.connect(self._wake_addr)
        wake.send(b"stop")
        self._thread.join(timeout)
        wake.close(linger=0)
        if self._thread.is_alive():  # pragma: no cover - would be a bug in _serve
            log.error("scheduler thread did not stop within %.1f s", timeout)
        else:
            self._ctx.term()
        self._thread = None
        self._ctx = None
        log.info("scheduler stopped")

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the I/O thread ends (after :meth:`stop`); True when it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- the I/O thread --------------------------------------------------

    def _serve(self) -> None:
        ctx = self._ctx
        if ctx is None:  # pragma: no cover
            return
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.router_mandatory = True
        router.maxmsgsize = codec.MAX_HEADER_BYTES
        wake = ctx.socket(zmq.PAIR)
        wake.linger = 0
        zap: ZapHandler | None = None
        monitor: zmq.Socket | None = None
        try:
            wake.bind(self._wake_addr)
            if self.keys is not None:
                zap = ZapHandler(ctx)
                make_curve_server(router, self.keys)
                # Refused handshakes (a client with another key for us) are logged.
                monitor = router.get_monitor_socket(HANDSHAKE_FAILURES)
            router.bind(self._bind)
            self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, ConfigurationError) as exc:
            self._error = exc
            if monitor is not None:
                router.disable_monitor()
                monitor.close(linger=0)
            router.close(linger=0)
            wake.close(linger=0)
            if zap is not None:
                zap.close()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if zap is not None:
            poller.register(zap.socket, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        try:
            held_until = 0.0  # after a failed step, timers wait a little: no busy loop
            while True:
                due = self._guarded(self.state.next_deadline)
                if due is _FAILED:  # try the timers again in a second
                    due = self._clock() + 1.0
                wake_at = due
                if self._roster_file is not None:
                    check = self._roster_file.next_check()
                    wake_at = check if wake_at is None else min(wake_at, check)
                if wake_at is not None:
                    wake_at = max(wake_at, held_until)
                timeout_ms = (
                    None if wake_at is None else max(0, int((wake_at - self._clock()) * 1000) + 1)
                )
                events = dict(poller.poll(timeout_ms))
                if wake in events:
                    return
                if monitor is not None and monitor in events:
                    self._guarded(self._log_handshakes, monitor)
                if self._guarded(self._step, router, zap, events, due) is _FAILED:
                    held_until = self._clock() + 0.1
        finally:
            if monitor is not None:
                router.disable_monitor()
                monitor.close(linger=0)
            router.close(linger=0)
            wake.close(linger=0)
            if zap is not None:
                zap.close()

    def _log_handshakes(self, monitor: zmq.Socket) -> None:
        """Log refused CURVE handshakes (a bounded batch a turn), rate-limited.

        A client that was given another public key for this scheduler fails the
        handshake before it can send anything: without this line the operator
        would see nothing at all.
        """
        for _ in range(64):
            if not monitor.poll(0):
                return
            event = recv_monitor_message(monitor)
            self._handshakes.log(
                logging.WARNING,
                "scheduler at %s refused a connection: CURVE handshake failed (the client "
                "uses another public key for this scheduler, or does not speak CURVE)",
                safe_text(event.get("endpoint", b"?"), 80),
            )

    def _guarded(self, step: Callable[..., Any], *args: object) -> Any:
        """Run one step of the loop and return its value; an exception ends that step
        (the value is then :data:`_FAILED`), never the thread.

        The exception is logged as one bounded line (its type and escaped text),
        rate-limited, with its traceback only on the lines that get through; the
        message being handled is dropped. Only ``BaseException``s that are not
        ``Exception``s (interpreter exit) pass.
        """
        try:
            return step(*args)
        except Exception as exc:
            self._errors.log(
                logging.ERROR,
                "scheduler dropped a message it failed to handle (%s: %s)",
                type(exc).__name__,
                safe_text(exc, 200),
                exc_info=True,
            )
            return _FAILED

    def _step(
        self,
        router: zmq.Socket,
        zap: ZapHandler | None,
        events: dict[zmq.Socket, int],
        due: float | None,
    ) -> None:
        """One turn of the loop: authentication, at most one message, timers, replies."""
        if zap is not None and zap.socket in events:
            zap.handle()
        if self._roster_file is not None:
            changed = self._roster_file.poll()
            if changed is not None:
                self.state.set_roster(changed)
        out: list[Outgoing] = []
        if router in events:
            out += self._handle(router)
        if due is not None and self._clock() >= due:
            out += self.state.tick()
        self._send_all(router, out)

    def _handle(self, router: zmq.Socket) -> list[Outgoing]:
        frames = router.recv_multipart(copy=False)
        conn = frames[0].bytes
        if len(frames) < 2:
            log.warning("scheduler dropped an empty message")
            return []
        key = None if self.insecure else sender_key(frames[1])
        if not self.insecure and key is None:
            log.warning("scheduler dropped a message from an unauthenticated connection")
            return []
        try:
            msg = receive_message(frames[1:], codec.MAX_HEADER_BYTES, TO_SCHEDULER)
            return self.state.receive(conn, msg, key)
        except RemoteProtocolError as exc:
            self._errors.log(
                logging.WARNING, "scheduler dropped a message: %s", safe_text(exc, 300)
            )
            return []

    def _send_all(self, router: zmq.Socket, out: list[Outgoing]) -> None:
        while out:
            item = out.pop(0)
            try:
                send_message(router, item.message, prefix=(item.conn,))
            except RoundFailedError as exc:
                log.warning("cannot deliver %s: %s", item.message.TYPE, exc)
                out += self.state.unreachable(item.conn)
