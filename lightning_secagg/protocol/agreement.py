"""Checked agreement on a round's result, as a sans-IO piece (not wired in yet).

After a round's result is known, every member sends every other member, over
the round's sealed pairwise links, a digest of what it holds: the round id,
the member list, the total weight and the result's bytes. Each member then
waits, up to the phase deadline, for all the others' digests. Any digest that
differs from ours, or that never comes, makes the round fail with
:class:`~lightning_secagg.errors.ResultMismatchError` on this member.

Invariant: if two honest members hold different results, each of them
receives the other's digest directly (authenticated by their sealed link), so
both see the mismatch; no third party, member or scheduler, can hide it
without breaking SHA-256's collision resistance or the link's keys.
A member that lies about its own digest can only make the check fail.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

from lightning_secagg.errors import RemoteProtocolError, ResultMismatchError

#: Bytes of an agreement digest.
DIGEST_BYTES = 32
_DOMAIN = b"lightning_secagg/agreement/v1"


class ResultDigest:
    """An incremental digest of one member's view of a round's result.

    Segments are fed as they complete (in segment order), so hashing overlaps
    the round instead of adding a pass over the whole vector at its end.
    SHA-256, not BLAKE2b: CPUs with SHA extensions hash it faster, and the
    hash is one pass over the whole result on every member
    (docs/benchmarks.md has the cost).
    """

    def __init__(self, round_id: str, members: Sequence[str]) -> None:
        self._h = hashlib.sha256(_DOMAIN)
        self._next = 0
        self._field(round_id.encode())
        self._h.update(struct.pack(">I", len(members)))
        for pid in members:
            self._field(pid.encode())

    def _field(self, raw: bytes) -> None:
        self._h.update(struct.pack(">I", len(raw)) + raw)

    def segment(self, index: int, data: bytes | memoryview) -> None:
        """Hash segment ``index`` of the result; segments must come in order 0, 1, ...

        Raises:
            ValueError: out of order (a bug on our side, never remote input).
        """
        if index != self._next:
            raise ValueError(f"segment {index} hashed out of order (expected {self._next})")
        self._next += 1
        view = memoryview(data).cast("B")
        self._h.update(struct.pack(">IQ", index, view.nbytes))
        self._h.update(view)

    def finish(self, total_weight: float) -> bytes:
        """The digest, binding the total weight and the number of segments hashed."""
        self._h.update(struct.pack(">dI", float(total_weight), self._next))
        return self._h.digest()


def result_digest(
    round_id: str,
    members: Sequence[str],
    total_weight: float,
    segments: Iterable[bytes | memoryview],
) -> bytes:
    """The digest of a whole result at once (see :class:`ResultDigest`)."""
    d = ResultDigest(round_id, members)
    for i, seg in enumerate(segments):
        d.segment(i, seg)
    return d.finish(total_weight)


class AgreementCheck:
    """Collects the other members' digests and decides, once, whether all agree.

    Sans-IO: the caller feeds digests from opened sealed messages and asks for
    the outcome when all have come or when the phase deadline passes.
    """

    def __init__(self, me: str, members: Sequence[str], mine: bytes) -> None:
        self.me = me
        self.mine = mine
        self.expected = frozenset(members) - {me}
        self.got: dict[str, bytes] = {}

    def receive(self, sender: str, digest: bytes) -> None:
        """Record ``sender``'s digest.

        Raises:
            RemoteProtocolError: not a member, a second digest, or a wrong length
                (dropped by the caller; a missing digest is caught by the deadline).
        """
        if sender not in self.expected:
            raise RemoteProtocolError(f"agreement digest from non-member {sender}")
        if sender in self.got:
            raise RemoteProtocolError(f"second agreement digest from {sender}")
        if len(digest) != DIGEST_BYTES:
            raise RemoteProtocolError(f"agreement digest of {len(digest)} bytes from {sender}")
        self.got[sender] = bytes(digest)

    @property
    def complete(self) -> bool:
        """Every other member's digest has come."""
        return len(self.got) == len(self.expected)

    def verdict(self, *, deadline_passed: bool = False) -> bool:
        """True when all agree; False while still waiting.

        Raises:
            ResultMismatchError: a digest differs from ours (as soon as it is
                known), or some never came and the deadline passed.
        """
        differ = sorted(p for p, d in self.got.items() if d != self.mine)
        missing = sorted(self.expected - self.got.keys()) if deadline_passed else []
        if differ or missing:
            parts = []
            if differ:
                parts.append(f"result differs at {', '.join(differ)}")
            if missing:
                parts.append(f"no agreement digest from {', '.join(missing)}")
            raise ResultMismatchError(
                f"members do not agree on the result: {'; '.join(parts)}",
                tuple(differ + missing),
            )
        return self.complete
