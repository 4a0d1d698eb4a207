"""How round traffic between peers goes on and comes off the wire: the sealing adapter.

A peer's session (:class:`~lightning_secagg.protocol.peer_session.PeerSession`)
speaks in :class:`~lightning_secagg.messages.Message` objects; the wire turns
them into frames and back. Two implementations, chosen once per peer:

* :class:`SealedWire` (the default): every message is sealed with AES-256-GCM
  on a link keyed by a fresh X25519 exchange per ``aggregate()`` call
  (:mod:`lightning_secagg.sealing`); a message is opened, and so accepted,
  only if the member it names sealed it. A segment's result is sealed once by
  the root actor that decoded it and forwarded as the same ciphertext
  (:class:`~lightning_secagg.sealing.SealedBlob`) to every participant.
* :class:`PlainWire` (``insecure=True``): codec frames as they are, readable
  and forgeable by anyone on the network.

Neither touches a socket: the shell (:class:`~lightning_secagg.peer.Peer`)
reads frames, :meth:`parse` checks what can be checked before the round is
known (sizes, part counts), and the session opens what it accepts. The
in-memory networks of the tests pass the same frames between sessions, so
they run this code too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_secagg import codec
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import PEER_TO_PEER, Message, Result
from lightning_secagg.protocol.peer_round import Send
from lightning_secagg.sealing import Envelope, Link, RoundKey, SealedBlob, frame_nbytes

#: Where an opened payload may be decrypted: ``place(header, nbytes)`` returns a
#: buffer of ``nbytes`` or None (a buffer of its own). See ``Link.open_message``.
Placer = Callable[[dict[str, Any], int], "np.ndarray | None"]


@dataclass(frozen=True)
class Inbound:
    """A message off the inbox before it is accepted.

    Sealed traffic waits as its envelope and raw frames (opened only once the
    round, and with it the claimed sender's key, is known); plain traffic is
    the decoded message.

    Attributes:
        round_id: The round it claims to belong to.
        sender: The member it claims to come from.
        nbytes: Its size on the wire (what keeping it costs).
        envelope: The sealed envelope (sealed wire only).
        frames: The envelope frame and the sealed parts (sealed wire only).
        message: The decoded message (plain wire only).
    """

    round_id: str
    sender: str
    nbytes: int
    envelope: Envelope | None = None
    frames: Sequence[Any] | None = None
    message: Message | None = None


@dataclass(frozen=True)
class Transmit:
    """Frames ready for one member's socket.

    Attributes:
        to: The member's peer id.
        endpoint: Where it listens.
        frames: What to send, in order (zero-copy buffers).
        what: The message type, for errors and fault injection.
    """

    to: str
    endpoint: str
    frames: list[Any]
    what: str


class PlainWire:
    """Codec frames as they are: no encryption, no authentication (``insecure=True``)."""

    secure = False

    def round_key(self) -> None:
        """No key exchange on plain links."""
        return None

    def links(self, key: Any, round_id: str, me: str, relayed: dict[str, str]) -> dict[str, Any]:
        """Plain links need nothing per member."""
        return {}

    @staticmethod
    def parse(frames: Sequence[Any]) -> Inbound:
        """Decode a message off the inbox.

        Raises:
            RemoteProtocolError: malformed, or not a peer-to-peer message.
        """
        buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames]
        msg = codec.decode(buffers, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER)
        size = sum(frame_nbytes(b) for b in buffers)
        return Inbound(msg.round_id, msg.sender, size, message=msg)  # type: ignore[attr-defined]

    def open(self, links: Any, item: Inbound, place: Placer) -> tuple[Message, None]:
        """The decoded message (plain links prove nothing about its sender).

        Raises:
            RemoteProtocolError: the item carries no message.
        """
        if item.message is None:
            raise RemoteProtocolError("a sealed message on a plain link")
        return item.message, None

    def seal(
        self,
        links: Any,
        sends: Sequence[Send],
        endpoints: Mapping[str, str],
        blobs: dict[int, Any] | None = None,
    ) -> list[Transmit]:
        """Encode each message; payloads travel zero-copy."""
        return [
            Transmit(s.to, endpoints[s.to], codec.encode(s.message), s.message.TYPE) for s in sends
        ]


class SealedWire:
    """AES-256-GCM on per-round links (see the module docstring)."""

    secure = True

    def round_key(self) -> RoundKey:
        """A fresh X25519 key pair for one ``aggregate()`` call."""
        return RoundKey()

    def links(
        self, key: RoundKey, round_id: str, me: str, relayed: dict[str, str]
    ) -> dict[str, tuple[Link, Link]]:
        """The ``(to them, from them)`` links with each member of ``relayed``.

        Raises:
            ValueError: a relayed key is malformed or a low-order point.
        """
        return key.links(round_id, me, relayed)

    @staticmethod
    def parse(frames: Sequence[Any]) -> Inbound:
        """Read a sealed message's envelope; its parts are checked against it.

        Raises:
            RemoteProtocolError: a malformed envelope, or a part count it does not state.
        """
        buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames]
        envelope = Envelope.unpack(buffers[0])
        if len(buffers) != 1 + envelope.parts:  # checked before anything is kept
            raise RemoteProtocolError(
                f"sealed message has {len(buffers) - 1} parts, its envelope says {envelope.parts}"
            )
        size = sum(frame_nbytes(b) for b in buffers)
        return Inbound(envelope.round_id, envelope.sender, size, envelope, buffers)

    def open(
        self, links: dict[str, tuple[Link, Link]], item: Inbound, place: Placer
    ) -> tuple[Message, SealedBlob | None]:
        """The message inside ``item`` once it proves to come from the member it names,
        and the blob its payload came in if it was forwarded.

        ``links`` holds only this peer's tree neighbours: anyone else's message
        finds no link and is refused, as a stranger's is.

        Raises:
            RemoteProtocolError: no link with the claimed sender, a failed
                authentication, a malformed header, a header naming another
                sender or round than its seal, or a forwarded non-result.
        """
        if item.envelope is None or item.frames is None:
            raise RemoteProtocolError("a plain message on a sealed link")
        pair = links.get(item.sender)
        if pair is None:
            raise RemoteProtocolError(
                f"no link with {item.sender} in round {item.round_id} (not a tree neighbour)"
            )
        header: dict[str, Any] | None = None

        def placer(frame: Any, nbytes: int) -> np.ndarray | None:
            # The header is unpacked here once, and codec.decode takes it as it is.
            nonlocal header
            try:
                header = codec.decode_header(frame, codec.MAX_PEER_HEADER_BYTES)
            except RemoteProtocolError:
                return None  # codec.decode says what is wrong with it
            return place(header, nbytes)

        frames, blob = pair[1].open_message(item.envelope, item.frames, placer)
        msg = codec.decode(frames, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER, header=header)
        if (getattr(msg, "sender", None), getattr(msg, "round_id", None)) != (
            item.sender,
            item.round_id,
        ):
            raise RemoteProtocolError(
                f"a {msg.TYPE} whose header names another sender or round than its seal"
            )
        if blob is not None and not isinstance(msg, Result):
            raise RemoteProtocolError(f"a {msg.TYPE} forwarded as a blob")
        return msg, blob

    def seal(
        self,
        links: dict[str, tuple[Link, Link]],
        sends: Sequence[Send],
        endpoints: Mapping[str, str],
        blobs: dict[int, SealedBlob] | None = None,
    ) -> list[Transmit]:
        """Seal each message for its recipient.

        A segment's result goes as one ciphertext to every recipient: the blob
        it arrived in (``blobs``, by segment), or one sealed here once, by the
        root actor that holds it in the clear.
        """
        blobs = {} if blobs is None else blobs
        out = []
        for send in sends:
            msg = send.message
            link = links[send.to][0]
            frames = codec.encode(msg)
            if isinstance(msg, Result) and msg.payload is not None:
                blob = blobs.get(msg.segment)
                if blob is None:
                    blob = blobs[msg.segment] = SealedBlob.seal(msg.payload)
                sealed = link.seal_forward(frames[0], blob)
            else:
                sealed = link.seal(frames)
            out.append(Transmit(send.to, endpoints[send.to], sealed, msg.TYPE))
        return out


Wire = PlainWire | SealedWire

__all__ = ["Inbound", "Placer", "PlainWire", "SealedWire", "Transmit", "Wire"]
