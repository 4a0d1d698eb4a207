"""Messages <-> ZeroMQ multipart frames.

Frame 0 is a msgpack header ``{v, t, ...fields}``; a message with a payload
has exactly one more frame, its raw little-endian buffer, sent without a copy
and viewed with ``numpy.frombuffer`` on arrival. msgpack is unpacked with
every size limit set and extension types refused, so no input can make it
allocate without bound or build anything but plain values; nothing here can
run code (no pickle, no eval).

The codec knows only bytes-like frames, not sockets, so it is tested without
a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import (
    MAX_MEMBERS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    HeaderError,
    Message,
)

#: Largest header the scheduler's assignment of a big round may need.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Headers between peers are tiny.
MAX_PEER_HEADER_BYTES = 4096

Frame = bytes | bytearray | memoryview


def encode(message: Message) -> list[Any]:
    """Frames for ``send_multipart(..., copy=False)``: the header, then the payload if any.

    The payload goes out as the array itself (the buffer protocol), never copied here.
    """
    frames: list[Any] = [msgpack.packb(message.header(), use_bin_type=True)]
    payload = getattr(message, "payload", None)
    if payload is not None:
        if payload.dtype.byteorder == ">" or not payload.flags.c_contiguous:
            payload = np.ascontiguousarray(payload, dtype=payload.dtype.newbyteorder("<"))
        frames.append(payload)
    return frames


def decode_header(frame: Frame, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Unpack and sanity-check a header frame.

    Raises:
        RemoteProtocolError: too large, not msgpack, not a map, wrong version or type.
    """
    size = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
    if size > max_header_bytes:
        raise RemoteProtocolError(f"header of {size} bytes exceeds {max_header_bytes}")
    try:
        header = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_header_bytes,
            max_bin_len=64,
            max_array_len=MAX_MEMBERS,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
        raise RemoteProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError("header is not a map")
    version = header.get("v")
    # ``True == 1`` and ``1.0 == 1`` in Python: insist on the int itself.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version!r:.20}")
    # An unhashable type (a list, a map) would make the dict lookup raise TypeError.
    if not isinstance(header.get("t"), str) or header["t"] not in MESSAGE_TYPES:
        raise RemoteProtocolError(f"unknown message type {header.get('t')!r:.40}")
    return header


def decode(
    frames: Sequence[Frame],
    max_header_bytes: int = MAX_HEADER_BYTES,
    allowed: tuple[type[Message], ...] | None = None,
    *,
    header: dict[str, Any] | None = None,
) -> Message:
    """Validate a whole multipart message and build it.

    Args:
        frames: Bytes-like frames as received.
        max_header_bytes: Limit for frame 0.
        allowed: Message classes acceptable on this socket; others are refused
            before their fields are even read.
        header: Frame 0 as :func:`decode_header` returned it, when the caller
            already unpacked it (it is not unpacked twice).

    Raises:
        RemoteProtocolError: anything malformed, with a short reason for the log.
    """
    if not frames:
        raise RemoteProtocolError("empty message")
    if header is None:
        header = decode_header(frames[0], max_header_bytes)
    cls = MESSAGE_TYPES[header["t"]]
    if allowed is not None and cls not in allowed:
        raise RemoteProtocolError(f"message type {cls.TYPE!r} is not accepted here")
    expected_frames = {None: (1,), "optional": (1, 2), "required": (2,)}[cls.PAYLOAD]
    if len(frames) not in expected_frames:
        raise RemoteProtocolError(f"{cls.TYPE}: {len(frames)} frames, expected {expected_frames}")
    # Raw bytes: what they hold (4- or 8-byte ring elements, a result's tensors)
    # depends on the round, whose state machine checks the size and views them.
    payload = np.frombuffer(frames[1], dtype=np.uint8) if len(frames) == 2 else None
    try:
        message = cls.from_header(header, payload)
    except (HeaderError, TypeError) as exc:
        raise RemoteProtocolError(str(exc)) from None
    seed = getattr(message, "seed", None)
    if payload is None:
        if cls.PAYLOAD == "optional" and seed is None:
            raise RemoteProtocolError(f"{cls.TYPE}: neither a seed nor a payload")
        return message
    if seed is not None:
        raise RemoteProtocolError(f"{cls.TYPE}: both a seed and a payload")
    if payload.size == 0:
        raise RemoteProtocolError(f"{cls.TYPE}: payload of 0 bytes")
    return message
