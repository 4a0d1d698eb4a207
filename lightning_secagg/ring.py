"""Which ring a round computes in: the one home of that rule.

The compact ring Z_2^32 halves the bytes of every share, partial sum and
keystream. It is used only when it is safe, decided per round from the
*magnitude exponents* every member declares at sign-up (``e`` with
``max|x| < 2**e`` per tensor, see
:func:`lightning_secagg.encoding.magnitude_exponents`); the scheduler relays
the largest of each. Tensor ``t`` then gets its own fraction bits
``f_t = 30 - e_t``, so its weighted sum stays below ``2**30`` plus the peers'
rounding, far from ``2**31``, and its resolution is ``2**-30`` of the largest
magnitude any member holds: a finer step than float32's own at that magnitude
while ``N <= 64``. Float64 tensors, more than 64 peers, or integers too large
for an exact mean keep the 64-bit ring (:func:`compact_ring_allowed`); so does
a member that prefers not to declare its exponents.

Who uses what:

- the scheduler chooses (:func:`choose_ring`) and relays its choice in the
  assignment;
- every member checks that choice against its own values before encoding
  anything (:func:`check_relayed_ring`), then encodes with :class:`RingPlan`;
- the planner predicts the choice with the same :func:`choose_ring`.

Torch-free, so the scheduler process never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_secagg.errors import EncodingError
from lightning_secagg.schema import FLOAT_DTYPE_NAMES, Schema

#: The compact ring's sums of normalized values stay below 2**COMPACT_SUM_BITS
#: (plus at most N/2 units of rounding), a factor two inside int32.
COMPACT_SUM_BITS = 30
#: Most peers for which the compact ring's rounding of the peers' values,
#: N * 2**-31 of the largest magnitude, stays within half a float32 ulp there
#: (the count slot's rounding adds at most as much again, relative to the mean).
COMPACT_MAX_PEERS = 64
#: Integer tensors keep INT_GUARD_BITS bits below the unit in the compact ring:
#: with the count slot's rounding, their mean is then within about 2**-9 of a
#: unit, so rounding to the nearest integer is exact away from .5 ties.
INT_GUARD_BITS = 10
#: Fewest fraction bits the compact ring gives a float tensor. Each tensor's
#: fraction bits are ``COMPACT_SUM_BITS - e`` for the largest exponent ``e`` any
#: member declares, so one member declaring a huge exponent (issue 19, finding 7:
#: 30 leaves 0 fraction bits, and the mean decodes to exact zeros) would coarsen
#: everybody's values. Below this floor the round keeps the 64-bit ring, whose
#: resolution does not depend on what others declare; a member refuses a relayed
#: compact ring below it (:func:`check_relayed_ring`). Honest float tensors up to
#: ``2**14`` in magnitude keep the compact ring.
MIN_COMPACT_FRAC_BITS = 16
#: The compact ring's count slot carries the normalized weights with this many
#: fraction bits: members' shares are each at most 1 (a member refuses a total
#: weight below its own), so with at most COMPACT_MAX_PEERS members the summed
#: count stays below ``2**30`` and never wraps in int32, whatever total weight
#: the scheduler relays. An under-reported total (issue 19, finding 8: with 30
#: bits, 5x too small wrapped back to a plausible count) shows as a count far
#: from ``2**COMPACT_COUNT_BITS``, refused by :func:`check_compact_count`.
COMPACT_COUNT_BITS = COMPACT_SUM_BITS - (COMPACT_MAX_PEERS.bit_length() - 1)
#: Largest distance of an honest round's summed count from ``2**COMPACT_COUNT_BITS``:
#: each member rounds its share to an integer (half a unit each), plus float64
#: noise in the shares themselves.
COMPACT_COUNT_SLACK = COMPACT_MAX_PEERS // 2 + 1
#: Declared magnitude exponents are clamped to this range (an all-zero tensor declares the minimum).
MIN_EXPONENT, MAX_EXPONENT = -64, 64
#: The rings' element types (little-endian, as on the wire), by width in bits.
RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SIGNED = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


def compact_ring_allowed(
    schema: Schema, exponents: Sequence[int] | None, num_peers: int
) -> str | None:
    """Why the compact ring Z_2^32 would be unsafe for this round, or None when it is safe.

    Args:
        schema: The model's layout.
        exponents: The largest declared magnitude exponent of each tensor over
            the round's members (None: some member declared none).
        num_peers: Members of the round.
    """
    if exponents is None:
        return (
            "a member declared no magnitudes (it asked for the 64-bit ring, "
            "or its model rules the compact ring out)"
        )
    if len(exponents) != len(schema.tensors):
        return f"{len(exponents)} exponents for {len(schema.tensors)} tensors"
    if num_peers > COMPACT_MAX_PEERS:
        return f"{num_peers} peers: the compact ring is exact enough only up to {COMPACT_MAX_PEERS}"
    peers_bits = max(0, (num_peers - 1).bit_length())
    for spec, e in zip(schema.tensors, exponents, strict=True):
        if spec.dtype == "float64":
            return f"{spec.name!r} is float64, finer than the compact ring"
        if spec.dtype in FLOAT_DTYPE_NAMES and COMPACT_SUM_BITS - e < MIN_COMPACT_FRAC_BITS:
            return (
                f"{spec.name!r} holds values up to 2**{e}: the compact ring would keep "
                f"{COMPACT_SUM_BITS - e} fraction bits, fewer than {MIN_COMPACT_FRAC_BITS}"
            )
        if (
            spec.dtype not in FLOAT_DTYPE_NAMES
            and spec.dtype != "bool"
            and (e + peers_bits + INT_GUARD_BITS > COMPACT_SUM_BITS + 1)
        ):
            return f"integer tensor {spec.name!r} holds values up to 2**{e}, too large"
    return None


def exponents_to_declare(schema: Schema, exponents: list[int]) -> list[int] | None:
    """What a peer willing to use the compact ring declares at sign-up.

    None (nothing disclosed) when its own model already rules the compact ring
    out whatever the others hold: a float64 tensor, or integers too large even
    for a round of one. Otherwise ``exponents``.
    """
    return exponents if compact_ring_allowed(schema, exponents, 1) is None else None


def relayed_exponents(declared: Sequence[Sequence[int] | None]) -> list[int] | None:
    """The exponents a round relays: per tensor, the largest any member declares.

    None when there is no member or when some member declared none (it asked
    for the 64-bit ring): then nothing is relayed.
    """
    if not declared or any(d is None for d in declared):
        return None
    return [max(column) for column in zip(*declared, strict=True)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class RingChoice:
    """The ring of a round, as the scheduler chooses it (:func:`choose_ring`).

    Attributes:
        ring_bits: 32 (the compact ring) or 64.
        exponents: The largest declared exponent of each tensor, relayed in the
            assignment with the 32-bit ring (None with 64).
        reason: Why the round keeps the 64-bit ring (None with 32).
    """

    ring_bits: int
    exponents: tuple[int, ...] | None
    reason: str | None

    @property
    def element_bytes(self) -> int:
        """Bytes of one ring element: 4 or 8."""
        return self.ring_bits // 8


def choose_ring(schema: Schema, declared: Sequence[Sequence[int] | None]) -> RingChoice:
    """The ring of a round whose members declared ``declared`` at sign-up (one entry each).

    The compact ring when every member declared its exponents and
    :func:`compact_ring_allowed` accepts the relayed ones for a round of
    ``len(declared)`` members; the 64-bit ring, with the reason, otherwise.
    """
    exponents = relayed_exponents(declared)
    reason = compact_ring_allowed(schema, exponents, len(declared))
    if reason is not None or exponents is None:
        return RingChoice(64, None, reason)
    return RingChoice(32, tuple(exponents), None)


def check_relayed_ring(
    schema: Schema,
    ring_bits: int,
    relayed: Sequence[int] | None,
    own: Sequence[int],
    num_peers: int,
    *,
    compact_wanted: bool,
) -> str | None:
    """Why a member must not accept an assignment's ring, or None when it may.

    The scheduler's choice is checked, not trusted: the 64-bit ring is always
    safe; the compact ring only if this member declared its exponents (it was
    willing), the relayed ones cover its own values (else its sums could
    overflow), and :func:`compact_ring_allowed` holds for the round.

    Args:
        schema: The round's (and this member's) layout.
        ring_bits: The assignment's ring.
        relayed: The assignment's exponents.
        own: This member's own magnitude exponents, one per tensor.
        num_peers: Members of the round.
        compact_wanted: This member accepts the compact ring (``ring="auto"``).
    """
    if ring_bits == 64:
        return None
    if ring_bits != 32:
        return f"{ring_bits}-bit ring"
    if not compact_wanted:
        return "this peer asked for the 64-bit ring"
    if relayed is None or len(relayed) != len(own):
        return "the exponents do not match the model"
    if any(r < mine for r, mine in zip(relayed, own, strict=True)):
        return "the relayed exponents are below this peer's own magnitudes"
    return compact_ring_allowed(schema, relayed, num_peers)


def check_compact_count(count: int) -> str | None:
    """Why a compact ring's summed count slot must not be decoded, or None.

    Sound because it cannot wrap (see :data:`COMPACT_COUNT_BITS`): the count is
    ``2**COMPACT_COUNT_BITS`` times the sum of the members' shares ``w_i / T``
    (within :data:`COMPACT_COUNT_SLACK`), so a total weight ``T`` the scheduler
    under- or over-reported by more than about ``2**-18`` of itself is refused
    instead of scaling the result. (A scheduler telling members different totals
    that still sum to one share is a weighting, not a scale: see the threat model.)
    """
    nominal = 1 << COMPACT_COUNT_BITS
    if abs(count - nominal) > COMPACT_COUNT_SLACK:
        return (
            f"the summed count slot is {count}, expected {nominal} +- {COMPACT_COUNT_SLACK}: "
            f"the members' weights sum to {count / nominal:.6g} of the total weight relayed "
            "(a wrong total weight, share or partial sum)"
        )
    return None


@dataclass(frozen=True)
class RingPlan:
    """How one round encodes: the ring's width and each tensor's fraction bits.

    Every member derives the same plan from the assignment (ring width and the
    relayed exponents) and its schema, so all vectors of a round add up.

    Attributes:
        ring_bits: 32 or 64.
        frac_bits: Fraction bits of each tensor, in schema order.
        count_frac_bits: Fraction bits of the count slot.
    """

    ring_bits: int
    frac_bits: tuple[int, ...]
    count_frac_bits: int

    @classmethod
    def wide(cls, schema: Schema) -> RingPlan:
        """The 64-bit ring with the schema's fraction bits everywhere (always safe)."""
        f = schema.frac_bits
        return cls(64, (f,) * len(schema.tensors), f)

    @classmethod
    def compact(cls, schema: Schema, exponents: Sequence[int]) -> RingPlan:
        """The 32-bit ring, each tensor scaled to its largest declared magnitude.

        Raises:
            EncodingError: :func:`compact_ring_allowed` would refuse it (checked
                by the caller with the round's size).
        """
        if len(exponents) != len(schema.tensors):
            raise EncodingError(f"{len(exponents)} exponents for {len(schema.tensors)} tensors")
        return cls(
            32,
            tuple(COMPACT_SUM_BITS - int(e) for e in exponents),
            COMPACT_COUNT_BITS,
        )

    @property
    def dtype(self) -> np.dtype:
        """The ring's unsigned element type (little-endian)."""
        return RING_DTYPES[self.ring_bits]

    @property
    def signed_dtype(self) -> np.dtype:
        """The same elements read as two's complement integers."""
        return _SIGNED[self.ring_bits]

    def vector_nbytes(self, schema: Schema) -> int:
        """Bytes of one encoded vector (a dense share, a partial sum)."""
        return schema.vector_size * self.dtype.itemsize
