"""The in-memory network of rounds: sans-IO round objects joined without sockets.

The protocol objects only turn input messages into output messages, so a
caller can deliver the outputs of one to the others itself, in any order it
likes, and count everything (the idea of h11's ``tests/helpers.py``). Used by
the planner (:mod:`lightning_secagg.planner`, which counts every message of a
round to predict its bytes) and by the unit tests (which explore orders and
interleavings); the fault simulator of the tests runs whole peer sessions
(:mod:`lightning_secagg.protocol.peer_session`) over an event queue of its own,
with a fake clock.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lightning_secagg import codec
from lightning_secagg.messages import PEER_TO_PEER, Message
from lightning_secagg.protocol.peer_round import Send


class RoundNode(Protocol):
    """What the network needs of a round object (:class:`PeerRound`, :class:`SegmentedRound`)."""

    def start(self) -> list[Send]: ...

    def receive(self, message: Message, *, payload_owned: bool = False) -> list[Send]: ...


@dataclass
class MemNet:
    """Deliver the messages of one round between in-memory round objects.

    Args:
        peers: Every member's round object, by peer id.
        order: ``"fifo"``, ``"lifo"``, or a ``random.Random`` that picks the
            next pending message uniformly (any interleaving is possible).
        wire: Encode and decode every message with the real codec on the way.
        copying: Behave like the sealed transport: every payload is copied the
            moment a round hands it out (so the round may write to it later),
            and each receiver gets a fresh buffer of its own (``payload_owned``).
        record: Keep every delivered :class:`Send`, in order (:attr:`sends`).
    """

    peers: Mapping[str, Any]
    order: str | random.Random = "fifo"
    wire: bool = False
    copying: bool = False
    record: bool = False
    pending: list[Send] = field(default_factory=list)
    delivered: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)

    def start(self, ids: Sequence[str] | None = None) -> None:
        """Call ``start()`` on the given peers (all by default) and queue their sends."""
        for pid in ids if ids is not None else list(self.peers):
            self._queue(self.peers[pid].start())

    def _queue(self, sends: list[Send]) -> None:
        if self.copying:
            sends = [Send(s.to, _with_copied_payload(s.message)) for s in sends]
        self.pending.extend(sends)

    def step(self) -> Send:
        """Deliver one pending message and queue whatever it causes."""
        if self.order == "fifo":
            send = self.pending.pop(0)
        elif self.order == "lifo":
            send = self.pending.pop()
        elif isinstance(self.order, random.Random):
            send = self.pending.pop(self.order.randrange(len(self.pending)))
        else:
            raise ValueError(f"order must be 'fifo', 'lifo' or a random.Random, got {self.order!r}")
        message = send.message
        if self.wire:
            frames = [bytes(f) for f in codec.encode(message)]
            message = codec.decode(frames, codec.MAX_PEER_HEADER_BYTES, allowed=PEER_TO_PEER)
        if self.record:
            self.sends.append(send)
        self.delivered[type(message).__name__] += 1
        self.log.append((type(message).__name__, getattr(message, "sender", "?"), send.to))
        if self.copying:  # each receiver decrypts into a buffer of its own
            message = _with_copied_payload(message)
        self._queue(self.peers[send.to].receive(message, payload_owned=self.copying))
        return send

    def run(self, max_steps: int = 10_000_000) -> Counter[str]:
        """Deliver until nothing is pending; return the count of messages per type.

        Raises:
            RuntimeError: more than ``max_steps`` deliveries (a round that never settles).
        """
        steps = 0
        while self.pending:
            self.step()
            steps += 1
            if steps > max_steps:
                raise RuntimeError("the round does not converge")
        return self.delivered


def _with_copied_payload(message: Message) -> Message:
    payload = getattr(message, "payload", None)
    if payload is None:
        return message
    return dataclasses.replace(message, payload=payload.copy())


__all__ = ["MemNet", "RoundNode"]
