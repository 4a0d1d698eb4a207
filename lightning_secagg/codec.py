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

import struct
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
#: Decoded bytes allowed per header byte (honest headers decode to 5-8 times their size).
DECODED_PER_BYTE = 16
#: Decoded bytes always allowed (small headers), and never exceeded (large ones).
DECODED_SLACK = 64 * 1024
MAX_DECODED_BYTES = 128 * 1024 * 1024

Frame = bytes | bytearray | memoryview

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from


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


def decoded_budget(size: int) -> int:
    """Bytes a header of ``size`` bytes may decode to: bounded per byte and in total."""
    return min(MAX_DECODED_BYTES, DECODED_SLACK + DECODED_PER_BYTE * size)


def decoded_cost(frame: Frame, budget: int) -> int:
    """An upper estimate of the bytes unpacking ``frame`` builds; -1 once it passes ``budget``.

    msgpack's limits apply per container, so a header of nothing but empty
    containers (one byte each on the wire, 64 or more once built) would cost
    some 72 times its size. This linear pre-scan reads only the type bytes and
    lengths, builds nothing, and stops as soon as the estimate passes the
    budget, so its time is bounded by the budget too. The estimate (CPython,
    64-bit) charges every object its container's 8-byte slot, plus 64 per list
    and 72 or more per map, 50 + length per string of two or more characters,
    34 + length per ``bytes``, 24 per float, 32 per int outside the cached
    ``-5..256``: above what unpacking really allocates, never below by much.
    Malformed input is left for msgpack to refuse: the scan just stops.
    """
    data = frame if isinstance(frame, bytes) else memoryview(frame).cast("B")
    n = len(data)
    p = 0
    cost = 0
    while p < n:
        b = data[p]
        if b <= 0x7F:
            p += 1
            cost += 8
        elif b <= 0x8F:
            k = b & 0x0F
            cost += 80 if k == 0 else 192 + 48 * k
            p += 1
        elif b <= 0x9F:
            cost += 64 + 8 * (b & 0x0F) + 8
            p += 1
        elif b <= 0xBF:
            k = b & 0x1F
            cost += 8 if k < 2 else 58 + k
            p += 1 + k
        elif b >= 0xE0:
            cost += 8 if b >= 0xFB else 40
            p += 1
        elif b in (0xC0, 0xC2, 0xC3):
            cost += 8
            p += 1
        elif b == 0xCC:
            cost += 8
            p += 2
        elif b in (0xCA, 0xCB):
            cost += 32
            p += 5 if b == 0xCA else 9
        elif b in (0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3):
            cost += 40
            p += {0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}[b]
        elif b in (0xD9, 0xC4):
            if p + 2 > n:
                return cost
            k = data[p + 1]
            cost += 42 + k
            p += 2 + k
        elif b in (0xDA, 0xC5):
            if p + 3 > n:
                return cost
            k = _U16(data, p + 1)[0]
            cost += 42 + k
            p += 3 + k
        elif b in (0xDB, 0xC6):
            if p + 5 > n:
                return cost
            k = _U32(data, p + 1)[0]
            cost += 42 + k
            p += 5 + k
        elif b in (0xDC, 0xDE):
            if p + 3 > n:
                return cost
            k = _U16(data, p + 1)[0]
            cost += (72 + 8 * k) if b == 0xDC else (192 + 48 * k)
            p += 3
        elif b in (0xDD, 0xDF):
            if p + 5 > n:
                return cost
            k = _U32(data, p + 1)[0]
            cost += (72 + 8 * k) if b == 0xDD else (232 + 48 * k)
            p += 5
        else:  # 0xC1 (never used) and ext types: msgpack refuses them below
            return cost
        if cost > budget:
            return -1
    return cost


def decode_header(frame: Frame, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Unpack and sanity-check a header frame.

    The frame's size is checked first, then what it would decode to
    (:func:`decoded_cost` against :func:`decoded_budget`), and only then is it
    unpacked: the total a header can cost is bounded, not just each container.

    Raises:
        RemoteProtocolError: too large (on the wire or decoded), not msgpack,
            not a map, wrong version or type.
    """
    size = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
    if size > max_header_bytes:
        raise RemoteProtocolError(f"header of {size} bytes exceeds {max_header_bytes}")
    budget = decoded_budget(size)
    if decoded_cost(frame, budget) < 0:
        raise RemoteProtocolError(
            f"header of {size} bytes would decode to more than {budget} bytes "
            "(too many small objects)"
        )
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
