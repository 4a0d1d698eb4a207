"""Sealed links between the peers of a round: AES-256-GCM under per-round keys.

Why not CurveZMQ for this traffic (the scheduler link keeps it): CurveZMQ
encrypts with XSalsa20-Poly1305 in libzmq's I/O thread: moving one 4.8 MB
message through a CURVE socket pair on loopback took 12.3 ms on the
development machine against 0.9 ms in plaintext, while sealing and opening it
with AES-256-GCM (AES-NI) takes about 1 ms. Shares and results are nearly all
of a round's bytes, so on a CPU-bound host the link cipher was about a third
of a round's CPU (``docs/benchmarks.md``). The guarantees stay those of
CurveZMQ's:

* **Key agreement with forward secrecy.** Every ``aggregate()`` call draws a
  fresh X25519 key pair (:class:`RoundKey`); its public half travels in the
  sign-up over the peer's CurveZMQ-authenticated link to the scheduler, which
  relays it in the assignment next to the member's CURVE key (the scheduler
  was already the directory of keys, so trust does not move). The secret half
  lives only in memory for one call.
* **One key per direction.** ``A -> B`` traffic is sealed under
  ``HKDF-SHA256(X25519(a, B), salt=round_id, info=A|B|a_pub|b_pub)``; only A
  and B can derive it, so an opened message proves its sender.
* **Unique nonces.** The sender numbers its messages on each link (``seq``);
  frame ``i`` of message ``seq`` uses nonce ``seq || i``.
* **Nothing unauthenticated is parsed.** A sealed message is an *envelope*
  (``[version, round_id, sender, seq, parts]``, msgpack, in the clear and bound
  to every part as associated data), the sealed header, and the payload sealed
  in chunks of at most :data:`CHUNK_BYTES`. The receiver reads the envelope
  (bounded, validated), derives nothing new (the link exists or the message is
  dropped), and opens the header before the codec looks at it.

What an observer still sees: the envelope (round id, sender id, a counter),
frame sizes and timing; CurveZMQ hid the first three. Levels, groups, seeds
and every payload byte are sealed.

Replays: a sealed message replayed within its round is a duplicate the round's
state machine refuses; in any other round no key opens it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq.utils.z85
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import HeaderError, ident

SEAL_VERSION = 1
#: Payload bytes sealed per frame: bounds every frame (and ``ZMQ_MAXMSGSIZE``)
#: whatever the model's size, and stays far below AES-GCM's per-message limit.
CHUNK_BYTES = 1 << 24
TAG_BYTES = 16
MAX_ENVELOPE_BYTES = 512
MAX_PARTS = 1 << 16


def frame_nbytes(frame: Any) -> int:
    """Size of a bytes-like frame."""
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _nonce(seq: int, part: int) -> bytes:
    return seq.to_bytes(8, "little") + part.to_bytes(4, "little")


@dataclass(frozen=True)
class Envelope:
    """The clear part of a sealed message: which link and which message it is."""

    round_id: str
    sender: str
    seq: int
    parts: int

    def pack(self) -> bytes:
        """The envelope frame (also the associated data of every sealed part)."""
        return msgpack.packb([SEAL_VERSION, self.round_id, self.sender, self.seq, self.parts])

    @classmethod
    def unpack(cls, frame: Any) -> Envelope:
        """Validate an envelope frame.

        Raises:
            RemoteProtocolError: too large, not msgpack, or a bad field.
        """
        if frame_nbytes(frame) > MAX_ENVELOPE_BYTES:
            raise RemoteProtocolError("sealed envelope too large")
        try:
            value = msgpack.unpackb(
                frame, raw=False, max_bin_len=0, max_array_len=5, max_map_len=0, max_ext_len=0
            )
        except Exception as exc:  # msgpack raises a zoo of types for garbage input
            raise RemoteProtocolError(f"not a sealed envelope ({type(exc).__name__})") from None
        if not (isinstance(value, list) and len(value) == 5):
            raise RemoteProtocolError("not a sealed envelope")
        version, round_id, sender, seq, parts = value
        if type(version) is not int or version != SEAL_VERSION:
            raise RemoteProtocolError(f"unsupported seal version {version!r:.20}")
        try:
            ident(round_id)
            ident(sender)
        except HeaderError as exc:
            raise RemoteProtocolError(f"sealed envelope: {exc}") from None
        if type(seq) is not int or not 0 <= seq < 2**64:
            raise RemoteProtocolError("sealed envelope: bad sequence number")
        if type(parts) is not int or not 1 <= parts <= MAX_PARTS:
            raise RemoteProtocolError("sealed envelope: bad part count")
        return cls(round_id, sender, seq, parts)


class RoundKey:
    """This peer's X25519 key pair for one ``aggregate()`` call (never written anywhere)."""

    def __init__(self) -> None:
        self._secret = X25519PrivateKey.generate()
        self.public_raw = self._secret.public_key().public_bytes_raw()
        self.public = zmq.utils.z85.encode(self.public_raw).decode()

    def __repr__(self) -> str:
        return "RoundKey(<secret>)"

    def links(
        self, round_id: str, me: str, members: dict[str, str]
    ) -> dict[str, tuple[Link, Link]]:
        """The ``(to them, from them)`` links with every other member.

        Args:
            round_id: The round (salt of the key derivation).
            me: This peer's id.
            members: Every member's id and Z85 round key, as relayed by the scheduler.

        Raises:
            ValueError: a member's key is malformed or a low-order point.
        """
        out = {}
        for other, key in members.items():
            if other == me:
                continue
            try:
                raw = zmq.utils.z85.decode(key.encode())
            except (ValueError, KeyError, struct.error):  # out of the alphabet or the range
                raise ValueError(f"round key of {other} is not valid Z85") from None
            if len(raw) != 32:
                raise ValueError(f"round key of {other} is not 32 bytes")
            shared = self._secret.exchange(X25519PublicKey.from_public_bytes(raw))
            if not any(shared):  # a low-order point: no secret at all
                raise ValueError(f"round key of {other} is a low-order point")
            out[other] = (
                Link(_derive(shared, round_id, me, other, self.public_raw, raw), round_id, me),
                Link(_derive(shared, round_id, other, me, raw, self.public_raw), round_id, other),
            )
        return out


def _derive(
    shared: bytes, round_id: str, sender: str, receiver: str, sender_pub: bytes, receiver_pub: bytes
) -> AESGCM:
    info = b"|".join(
        [b"lightning-secagg link v1", sender.encode(), receiver.encode(), sender_pub, receiver_pub]
    )
    key = HKDF(hashes.SHA256(), 32, salt=round_id.encode(), info=info).derive(shared)
    return AESGCM(key)


@dataclass
class Link:
    """One direction of one pair of members: seals (sender side) or opens (receiver side)."""

    aead: AESGCM
    round_id: str
    sender: str
    next_seq: int = field(default=0)

    def seal(self, frames: Sequence[Any]) -> list[Any]:
        """Seal a codec message (header frame, optional payload frame) for the wire.

        The payload is sealed in chunks of :data:`CHUNK_BYTES`; each sealed part
        is a fresh buffer sent without a further copy.
        """
        header = frames[0]
        payload = memoryview(frames[1]).cast("B") if len(frames) > 1 else None
        chunks = (
            [payload[i : i + CHUNK_BYTES] for i in range(0, payload.nbytes, CHUNK_BYTES)]
            if payload is not None
            else []
        )
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        envelope = Envelope(self.round_id, self.sender, seq, 1 + len(chunks)).pack()
        out: list[Any] = [envelope, self.aead.encrypt(_nonce(seq, 0), bytes(header), envelope)]
        for i, chunk in enumerate(chunks, start=1):
            out.append(self.aead.encrypt(_nonce(seq, i), chunk, envelope))
        return out

    def open(self, envelope: Envelope, frames: Sequence[Any]) -> list[Any]:
        """Open a sealed message into codec frames: the header, and the payload if any.

        ``frames`` are the envelope frame and the sealed parts, as received.
        The payload is decrypted straight into one writable buffer.

        Raises:
            RemoteProtocolError: the part count is wrong or a part fails authentication.
        """
        if len(frames) != 1 + envelope.parts:
            raise RemoteProtocolError(
                f"sealed message has {len(frames) - 1} parts, its envelope says {envelope.parts}"
            )
        aad = bytes(frames[0])
        try:
            header = self.aead.decrypt(_nonce(envelope.seq, 0), frames[1], aad)
            if envelope.parts == 1:
                return [header]
            sizes = [frame_nbytes(f) - TAG_BYTES for f in frames[2:]]
            if min(sizes) <= 0:
                raise RemoteProtocolError("a sealed payload part is empty")
            payload = np.empty(sum(sizes), dtype=np.uint8)
            pos = 0
            for i, (frame, size) in enumerate(zip(frames[2:], sizes, strict=True), start=1):
                self.aead.decrypt_into(
                    _nonce(envelope.seq, i), frame, aad, memoryview(payload[pos : pos + size])
                )
                pos += size
        except InvalidTag:
            raise RemoteProtocolError(
                f"a message claiming to be from {envelope.sender} failed authentication"
            ) from None
        return [header, payload]


__all__ = [
    "CHUNK_BYTES",
    "Envelope",
    "Link",
    "RoundKey",
    "frame_nbytes",
]
