"""Sealed links between the peers of a round: AES-256-GCM under per-round keys.

Why not CurveZMQ for this traffic (the scheduler link keeps it): CurveZMQ
encrypts with XSalsa20-Poly1305 in libzmq's single I/O thread, an order of
magnitude slower per byte than AES-256-GCM with AES-NI, and shares and results
are nearly all of a round's bytes: on a CPU-bound host the link cipher was a
large part of a round's CPU (measured in ``docs/benchmarks.md``, "Link
encryption"). The guarantees stay those of CurveZMQ's:

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

**The result is sealed once, then forwarded.** It is the same buffer for
every member, so a root actor encrypts it once under a fresh one-off key
(:class:`SealedBlob`), and every actor below forwards those ciphertext frames
unchanged: sealing a 4.8 MB result for each recipient cost a copy of the
model and an encryption per recipient. The blob's key travels inside the
sealed header of each link, so only members ever hold it; and the header
also carries, for every ciphertext frame, a tag computed under the *link's*
key over that frame (GMAC: AES-GCM with the frame as associated data). A
member who knows the blob key could craft another ciphertext that opens
under it, but not one that the link's tags accept: the result a peer accepts
is the one its designated actor sent.

Replays: a sealed message replayed within its round is a duplicate the round's
state machine refuses; in any other round no key opens it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
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

SEAL_VERSION = 2
#: Payload bytes sealed per frame: bounds every frame (and ``ZMQ_MAXMSGSIZE``)
#: whatever the model's size, and stays far below AES-GCM's per-message limit.
CHUNK_BYTES = 1 << 24
TAG_BYTES = 16
MAX_ENVELOPE_BYTES = 512
MAX_PARTS = 1 << 16
KEY_BYTES = 32
#: First byte of a sealed header's plaintext: what follows it.
_PLAIN = b"\x00"  # the codec header; payload parts sealed under the link's key
_FORWARDED = b"\x01"  # blob key, one link tag per part, the codec header


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


def sealed_extra_bytes(payload_nbytes: int, *, forwarded: bool = False) -> int:
    """Bytes sealing adds to a message of this payload size, besides the envelope frame.

    A tag per sealed part (the header and each payload chunk) and the header's
    mode byte; a forwarded payload (:meth:`Link.seal_forward`) also carries the
    blob key and a link tag per chunk in its header.
    """
    chunks = -(-payload_nbytes // CHUNK_BYTES)
    extra = 1 + TAG_BYTES * (1 + chunks)
    if forwarded:
        extra += KEY_BYTES + TAG_BYTES * chunks
    return extra


def _split_chunks(payload: Any) -> list[memoryview]:
    view = memoryview(payload).cast("B")
    return [view[i : i + CHUNK_BYTES] for i in range(0, view.nbytes, CHUNK_BYTES)]


def _encrypt_chunk(aead: AESGCM, nonce: bytes, chunk: memoryview, aad: bytes | None) -> np.ndarray:
    """Encrypt a payload chunk into a fresh ``uint8`` array: ciphertext, then tag.

    Why not ``aead.encrypt``: the bytes object it returns costs a pass more
    than encrypting into an array, and numpy asks the kernel for huge pages
    for large arrays, so far fewer page faults (measured in
    ``docs/benchmarks.md``, "Link encryption").
    """
    out = np.empty(chunk.nbytes + TAG_BYTES, dtype=np.uint8)
    aead.encrypt_into(nonce, chunk, aad, out)
    return out


#: ``place(header, nbytes)``: where to decrypt a payload of ``nbytes`` whose sealed
#: header is ``header`` (authenticated already): a writable 1-d ``uint8`` array of
#: exactly ``nbytes``, or None for a fresh buffer. See :meth:`Link.open_message`.
Placer = Callable[[Any, int], np.ndarray | None]


def payload_nbytes(parts: Sequence[Any]) -> int:
    """The plaintext size of a payload sealed in ``parts``.

    Raises:
        RemoteProtocolError: a part is too short to hold any plaintext.
    """
    sizes = [frame_nbytes(f) - TAG_BYTES for f in parts]
    if not sizes or min(sizes) <= 0:
        raise RemoteProtocolError("a sealed payload part is empty")
    return sum(sizes)


def _decrypt_parts(
    aead: AESGCM,
    nonces: Sequence[bytes],
    parts: Sequence[Any],
    aad: Any,
    out: np.ndarray | None = None,
) -> Any:
    """Decrypt ciphertext parts into ``out``, or one fresh writable ``uint8`` buffer.

    Raises InvalidTag; ``out`` may then hold part of the plaintext, never
    anything the caller may use.
    """
    total = payload_nbytes(parts)
    if out is None:
        payload = np.empty(total, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.nbytes != total:
        raise ValueError(f"cannot decrypt a {total}-byte payload into {out.nbytes} bytes")
    else:
        payload = out
    pos = 0
    for nonce, frame in zip(nonces, parts, strict=True):
        size = frame_nbytes(frame) - TAG_BYTES
        aead.decrypt_into(nonce, frame, aad, memoryview(payload[pos : pos + size]))
        pos += size
    return payload


@dataclass(frozen=True)
class SealedBlob:
    """A payload encrypted once under a one-off key, to be forwarded unchanged.

    Attributes:
        key: The one-off AES-256-GCM key (never reused: part ``i`` uses nonce ``i``).
        parts: The ciphertext frames, each at most ``CHUNK_BYTES`` plus a tag.
    """

    key: bytes = field(repr=False)
    parts: tuple[Any, ...]

    @classmethod
    def seal(cls, payload: Any) -> SealedBlob:
        """Encrypt ``payload`` (bytes-like, non-empty) under a fresh random key."""
        key = AESGCM.generate_key(bit_length=256)
        aead = AESGCM(key)
        chunks = _split_chunks(payload)
        if not chunks:
            raise ValueError("nothing to seal")
        return cls(
            key, tuple(_encrypt_chunk(aead, _nonce(0, i), c, None) for i, c in enumerate(chunks))
        )

    def open(self, out: np.ndarray | None = None) -> Any:
        """The payload, decrypted into ``out`` or one fresh writable ``uint8`` array.

        Args:
            out: A writable 1-d ``uint8`` array of exactly the payload's size
                (:func:`payload_nbytes` of :attr:`parts`), e.g. the slice of a
                result buffer the payload belongs in: no second copy.

        Raises:
            RemoteProtocolError: a part fails authentication under the blob key
                (``out`` may then hold garbage).
            ValueError: ``out`` has the wrong size or type.
        """
        nonces = [_nonce(0, i) for i in range(len(self.parts))]
        try:
            return _decrypt_parts(AESGCM(self.key), nonces, self.parts, None, out)
        except InvalidTag:
            raise RemoteProtocolError("a forwarded payload failed authentication") from None


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
        """The ``(to them, from them)`` links with each of ``members`` but ourselves.

        Args:
            round_id: The round (salt of the key derivation).
            me: This peer's id.
            members: The members to link with (the peer passes its tree
                neighbours) and their Z85 round keys, as relayed by the scheduler.

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
        is a fresh ``uint8`` array sent without a further copy.
        """
        chunks = _split_chunks(frames[1]) if len(frames) > 1 else []
        seq, envelope = self._next_envelope(len(chunks))
        plain = _PLAIN + bytes(frames[0])
        out: list[Any] = [envelope, self.aead.encrypt(_nonce(seq, 0), plain, envelope)]
        for i, chunk in enumerate(chunks, start=1):
            out.append(_encrypt_chunk(self.aead, _nonce(seq, i), chunk, envelope))
        return out

    def _next_envelope(self, payload_parts: int) -> tuple[int, bytes]:
        """Number the next message on this link; its envelope frame (header + payload parts)."""
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq, Envelope(self.round_id, self.sender, seq, 1 + payload_parts).pack()

    def seal_forward(self, header: Any, blob: SealedBlob) -> list[Any]:
        """Seal a codec header whose payload travels as ``blob``'s ciphertext, unchanged.

        Costs a tag per part (GHASH over the ciphertext) instead of an
        encryption and a copy of the payload per recipient.
        """
        seq, envelope = self._next_envelope(len(blob.parts))
        tags = b"".join(
            self.aead.encrypt(_nonce(seq, i), b"", part)
            for i, part in enumerate(blob.parts, start=1)
        )
        plain = _FORWARDED + blob.key + tags + bytes(header)
        return [envelope, self.aead.encrypt(_nonce(seq, 0), plain, envelope), *blob.parts]

    def open(self, envelope: Envelope, frames: Sequence[Any]) -> list[Any]:
        """Open a sealed message into codec frames: the header, and the payload if any.

        ``frames`` are the envelope frame and the sealed parts, as received.
        The payload is decrypted straight into one writable buffer.

        Raises:
            RemoteProtocolError: the part count is wrong or a part fails authentication.
        """
        return self.open_message(envelope, frames)[0]

    def open_message(
        self, envelope: Envelope, frames: Sequence[Any], place: Placer | None = None
    ) -> tuple[list[Any], SealedBlob | None]:
        """:meth:`open`, and the forwarded blob the payload came in, if it came in one.

        Args:
            envelope: The message's envelope, unpacked.
            frames: The envelope frame and the sealed parts, as received.
            place: Asked, once the header is authenticated and before any
                payload byte is decrypted, where the payload goes
                (:data:`Placer`): a receiver that knows where a payload belongs
                (a result segment's slice of the result buffer) saves a copy.

        Raises:
            RemoteProtocolError: the part count is wrong, a part fails
                authentication (a placed payload's buffer may then hold
                garbage), or the sealed header is malformed.
            ValueError: ``place`` returned a buffer of the wrong size or type.
        """
        if len(frames) != 1 + envelope.parts:
            raise RemoteProtocolError(
                f"sealed message has {len(frames) - 1} parts, its envelope says {envelope.parts}"
            )
        aad = bytes(frames[0])
        parts = frames[2:]
        who = f"a message claiming to be from {envelope.sender}"
        try:
            plain = self.aead.decrypt(_nonce(envelope.seq, 0), frames[1], aad)
        except InvalidTag:
            raise RemoteProtocolError(f"{who} failed authentication") from None
        mode, rest = plain[:1], plain[1:]
        if mode == _PLAIN:
            if not parts:
                return [rest], None
            nonces = [_nonce(envelope.seq, i) for i in range(1, len(parts) + 1)]
            out = place(rest, payload_nbytes(parts)) if place is not None else None
            try:
                return [rest, _decrypt_parts(self.aead, nonces, parts, aad, out)], None
            except InvalidTag:
                raise RemoteProtocolError(f"{who} failed authentication") from None
        if mode != _FORWARDED or not parts:
            raise RemoteProtocolError(f"{who} has a malformed sealed header")
        tags_end = KEY_BYTES + TAG_BYTES * len(parts)
        if len(rest) <= tags_end:
            raise RemoteProtocolError(f"{who} has a malformed sealed header")
        key, header = rest[:KEY_BYTES], rest[tags_end:]
        try:
            for i, part in enumerate(parts, start=1):
                tag = rest[KEY_BYTES + TAG_BYTES * (i - 1) : KEY_BYTES + TAG_BYTES * i]
                self.aead.decrypt(_nonce(envelope.seq, i), tag, part)
        except InvalidTag:
            raise RemoteProtocolError(f"{who} failed authentication") from None
        blob = SealedBlob(key, tuple(parts))
        out = place(header, payload_nbytes(parts)) if place is not None else None
        return [header, blob.open(out)], blob


__all__ = [
    "CHUNK_BYTES",
    "Envelope",
    "Link",
    "Placer",
    "RoundKey",
    "SealedBlob",
    "frame_nbytes",
    "payload_nbytes",
    "sealed_extra_bytes",
]
