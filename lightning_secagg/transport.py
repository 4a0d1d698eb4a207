"""ZeroMQ plumbing shared by the peer and the scheduler.

Kept small on purpose: the protocol lives in :mod:`lightning_secagg.protocol`;
this module only turns endpoints into sockets, frames into messages and
counts bytes. Sockets are owned by one thread each (ZeroMQ sockets are not
thread-safe): a peer drives its own sockets synchronously inside
``aggregate()``, the scheduler from its I/O thread.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import zmq

from lightning_secagg.codec import decode, encode
from lightning_secagg.errors import ConfigurationError, RemoteProtocolError, RoundFailedError
from lightning_secagg.messages import Message

log = logging.getLogger(__name__)

_TCP_RE = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+|\*)$")


def bind_endpoint(address: str) -> str:
    """ZeroMQ's spelling of ``address``: ``tcp://host:0`` becomes ``tcp://host:*`` (any free port).

    Raises:
        ConfigurationError: not a ``tcp://host:port``, ``ipc://`` or ``inproc://`` address.
    """
    if address.startswith(("ipc://", "inproc://")):
        return address
    m = _TCP_RE.fullmatch(address)
    if m is None:
        raise ConfigurationError(
            f"address must look like tcp://HOST:PORT (PORT 0 for any free port), got {address!r}"
        )
    port = m.group("port")
    if port != "*" and not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"port must be in [0, 65535], got {port} in {address!r}")
    return f"tcp://{m.group('host')}:{'*' if port in ('0', '*') else port}"


def is_wildcard_host(endpoint: str) -> bool:
    """True for addresses others cannot connect to as they are (``0.0.0.0``, ``*``, ``::``)."""
    m = _TCP_RE.fullmatch(endpoint)
    return bool(m) and m.group("host") in ("0.0.0.0", "*", "[::]", "[::0]")  # noqa: S104


def frames_nbytes(frames: Sequence[Any]) -> int:
    """Bytes on the wire for a multipart message (payload sizes, headers included)."""
    total = 0
    for f in frames:
        if isinstance(f, zmq.Frame):
            total += len(f.bytes) if f.buffer is None else f.buffer.nbytes
        elif isinstance(f, memoryview):
            total += f.nbytes
        elif hasattr(f, "nbytes"):
            total += int(f.nbytes)
        else:
            total += len(f)
    return total


def send_message(socket: zmq.Socket, message: Message, prefix: Sequence[bytes] = ()) -> int:
    """Send one message without blocking; return its size in bytes.

    Nothing is ever dropped silently: a full queue or an unroutable peer raises.

    Raises:
        RoundFailedError: ZeroMQ could not queue the message.
    """
    frames = [*prefix, *encode(message)]
    try:
        socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.ZMQError as exc:
        raise RoundFailedError(f"could not send {message.TYPE}: {exc.strerror}") from exc
    return frames_nbytes(frames[len(prefix) :])


def send_frames(socket: zmq.Socket, frames: Sequence[Any], what: str) -> int:
    """Send ready frames (e.g. a sealed message) without blocking; return their size.

    Raises:
        RoundFailedError: ZeroMQ could not queue the message.
    """
    try:
        socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.ZMQError as exc:
        raise RoundFailedError(f"could not send {what}: {exc.strerror}") from exc
    return frames_nbytes(frames)


def receive_message(
    frames: Sequence[zmq.Frame],
    max_header_bytes: int,
    allowed: tuple[type[Message], ...],
) -> Message:
    """Decode received frames (zero-copy views of their buffers).

    Raises:
        RemoteProtocolError: anything malformed or not allowed on this socket.
    """
    return decode([f.buffer for f in frames], max_header_bytes, allowed)


def close_quietly(socket: zmq.Socket | None, linger_ms: int) -> None:
    """Close a socket, giving queued messages ``linger_ms`` to leave."""
    if socket is not None and not socket.closed:
        socket.close(linger=linger_ms)


__all__ = [
    "RemoteProtocolError",
    "bind_endpoint",
    "close_quietly",
    "frames_nbytes",
    "is_wildcard_host",
    "receive_message",
    "send_frames",
    "send_message",
]
