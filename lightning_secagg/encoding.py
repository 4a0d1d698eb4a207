"""Fixed-point encoding of state dicts into the ring Z_2^64, and back.

Layout of an encoded vector (``numpy.uint64``, little-endian on the wire)::

    [count slot][tensor 0, flattened][tensor 1, flattened]...

Each peer encodes ``round(p * x * 2**f)`` where ``p = weight / total_weight``
is its *normalized* weight (the scheduler relays ``total_weight``), and
``round(p * 2**f)`` in the count slot. The ring sum ``S`` of all peers is
then the fixed-point weighted sum, and the result is ``S / C`` with ``C`` the
summed count slot (about ``2**f``).

Why normalized weights (the design's count slot alone would also work): since
the ``p`` add up to one, ``|S| <= max|x| * 2**f`` whatever the number of peers
or their sample counts, so every peer can check *its own* values against a
bound that does not depend on the others: ``|x| < 2**(62 - f)`` guarantees the
sum stays below ``2**62``, a factor two away from the ring's signed range.
With the default ``f = 32`` that allows ``|x| < 2**30`` (about 1.07e9) at a
resolution of ``2**-32`` (2.3e-10) per peer.

Every peer decodes the same ring total with the same code, so results are
bitwise identical everywhere; in fact only the root actors decode, and the
decoded bytes travel down the tree.

The compact ring Z_2^32 (:class:`RingPlan`): half the bytes of every share,
partial sum and keystream. It is used only when it is safe, decided per round
from the *magnitude exponents* every peer declares at sign-up (``e`` with
``max|x| < 2**e`` per tensor; the scheduler relays the largest of each).
Tensor ``t`` gets its own fraction bits ``f_t = 30 - e_t``, so its weighted
sum stays below ``2**30`` plus the peers' rounding, far from ``2**31``, and its
resolution is ``2**-30`` of the largest magnitude any peer holds: a finer
step than float32's own at that magnitude while ``N <= 64``. Float64 tensors,
more than 64 peers, or integers too large for an exact mean keep the 64-bit
ring (:func:`compact_ring_allowed`); so does a peer that prefers not to
declare its exponents.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from lightning_secagg import sharing
from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    InvalidTotalError,
    SchemaMismatchError,
)
from lightning_secagg.threads import single_threaded_pass

DEFAULT_FRAC_BITS = 32
#: Elements encoded per step (a 512 KiB float64 temporary).
ENCODE_CHUNK = 1 << 16
#: Headroom kept below the ring's signed range: sums stay below 2**SUM_BITS.
SUM_BITS = 62
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
#: Declared magnitude exponents are clamped to this range (an all-zero tensor declares the minimum).
MIN_EXPONENT, MAX_EXPONENT = -64, 64
RING_DTYPES = {8 * d.itemsize: d for d in sharing.RING_DTYPES}
_SIGNED = {32: np.dtype("<i4"), 64: np.dtype("<i8")}
#: Floating dtypes numpy converts float64 to exactly as torch does (one IEEE
#: rounding to nearest even). Not float16: torch rounds float64 to float32 and
#: then to float16, numpy rounds once, and the two differ in rare ties; not
#: bfloat16, which numpy lacks. Those go through torch.
_NUMPY_FLOATS = {
    torch.float32: np.dtype("<f4"),
    torch.float64: np.dtype("<f8"),
}

_FLOAT_DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_INT_DTYPES = {
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}
_FLOAT_NAMES = frozenset(_FLOAT_DTYPES.values())
_DTYPE_BY_NAME = {name: dt for dt, name in {**_FLOAT_DTYPES, **_INT_DTYPES}.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one entry of a state dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    # Cached: encoding and decoding look these up for every piece of every
    # segment (ResNet-50 has 320 tensors), and the spec never changes.
    @cached_property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a torch object."""
        return _DTYPE_BY_NAME[self.dtype]

    @cached_property
    def nbytes(self) -> int:
        """Size of the tensor in its own dtype."""
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Schema:
    """What peers must agree on before their vectors can be added: the model's layout.

    The fraction bits are part of it, since two encodings with different
    scales cannot be summed.
    """

    tensors: tuple[TensorSpec, ...]
    frac_bits: int = DEFAULT_FRAC_BITS

    @classmethod
    def of(
        cls, state_dict: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS
    ) -> Schema:
        """Describe a state dict, refusing entries that cannot be averaged.

        Raises:
            EncodingError: a value is not a tensor or has an unsupported dtype.
            ConfigurationError: ``frac_bits`` is out of range.
        """
        check_frac_bits(frac_bits)
        specs = []
        for name, t in state_dict.items():
            if not isinstance(t, torch.Tensor):
                raise EncodingError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
            dtype = _FLOAT_DTYPES.get(t.dtype) or _INT_DTYPES.get(t.dtype)
            if dtype is None:
                raise EncodingError(
                    f"state_dict[{name!r}] has dtype {t.dtype}, which cannot be averaged; "
                    f"supported: {sorted(_DTYPE_BY_NAME)}"
                )
            specs.append(TensorSpec(str(name), tuple(int(s) for s in t.shape), dtype))
        if not specs:
            raise EncodingError("the state dict is empty: nothing to aggregate")
        if all(s.numel == 0 for s in specs):
            # The result would be a 0-byte payload, which the codec refuses, so the
            # round could never finish: refuse it here, before anything is sent.
            raise EncodingError("every tensor of the state dict is empty: nothing to aggregate")
        return cls(tuple(specs), frac_bits)

    @cached_property
    def vector_size(self) -> int:
        """Ring elements of an encoded vector, count slot included."""
        return 1 + sum(s.numel for s in self.tensors)

    @cached_property
    def result_offsets(self) -> tuple[int, ...]:
        """Byte offset of each tensor in the result buffer, 8-byte aligned so views are legal."""
        offsets, pos = [], 0
        for spec in self.tensors:
            offsets.append(pos)
            pos += _align8(spec.nbytes)
        return tuple(offsets)

    @cached_property
    def result_nbytes(self) -> int:
        """Bytes of the decoded result buffer (every tensor in its own dtype, 8-byte aligned)."""
        return sum(_align8(s.nbytes) for s in self.tensors)

    @cached_property
    def tensor_starts(self) -> tuple[int, ...]:
        """Position of each tensor's first element among the data elements (count slot aside)."""
        starts, pos = [], 0
        for spec in self.tensors:
            starts.append(pos)
            pos += spec.numel
        return tuple(starts)

    def to_wire(self) -> list[list[object]]:
        """Plain lists for a header: ``[[name, [shape...], dtype], ...]``."""
        return [[s.name, list(s.shape), s.dtype] for s in self.tensors]

    @classmethod
    def from_wire(cls, tensors: list[list[object]], frac_bits: int) -> Schema:
        """Rebuild a schema from a validated header.

        Raises:
            ValueError: an entry is malformed or names an unknown dtype.
        """
        specs = []
        for entry in tensors:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ValueError("schema entries must be [name, shape, dtype]")
            name, shape, dtype = entry
            if (
                not isinstance(name, str)
                or not isinstance(shape, list)
                or dtype not in _DTYPE_BY_NAME
            ):
                raise ValueError(f"bad schema entry {name!r}")
            if not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
            ):
                raise ValueError(f"bad shape for schema entry {name!r}")
            specs.append(TensorSpec(name, tuple(shape), str(dtype)))
        return cls(tuple(specs), frac_bits)

    def fingerprint(self) -> str:
        """A short stable hash of the layout, for logs and quick comparison."""
        blob = json.dumps([self.to_wire(), self.frac_bits], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def difference(self, other: Schema) -> str | None:
        """Say how ``other`` differs from this schema, or None when they match."""
        if self == other:
            return None
        problems = []
        if self.frac_bits != other.frac_bits:
            problems.append(f"frac_bits {other.frac_bits} != {self.frac_bits}")
        mine = {s.name: s for s in self.tensors}
        theirs = {s.name: s for s in other.tensors}
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        if missing:
            problems.append(f"missing {_short_list(missing)}")
        if extra:
            problems.append(f"unexpected {_short_list(extra)}")
        for name, spec in theirs.items():
            ref = mine.get(name)
            if ref is None:
                continue
            if ref.shape != spec.shape:
                problems.append(
                    f"{name!r} has shape {list(spec.shape)}, expected {list(ref.shape)}"
                )
            if ref.dtype != spec.dtype:
                problems.append(f"{name!r} has dtype {spec.dtype}, expected {ref.dtype}")
        if not problems and [s.name for s in self.tensors] != [s.name for s in other.tensors]:
            problems.append("the entries are in a different order")
        return "; ".join(problems[:8]) + (
            f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        )

    def check(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refuse a state dict whose layout is not this schema.

        Raises:
            SchemaMismatchError: naming the difference.
        """
        diff = self.difference(Schema.of(state_dict, self.frac_bits))
        if diff is not None:
            raise SchemaMismatchError(f"state dict does not match the schema: {diff}")


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_frac_bits(frac_bits: int) -> None:
    """Refuse fraction bits that leave no room for values or no precision.

    Raises:
        ConfigurationError: outside ``[8, 52]``.
    """
    if not isinstance(frac_bits, int) or isinstance(frac_bits, bool) or not 8 <= frac_bits <= 52:
        raise ConfigurationError(f"frac_bits must be an int in [8, 52], got {frac_bits!r}")


def value_limit(frac_bits: int) -> float:
    """Largest magnitude a peer may contribute: ``2**(62 - frac_bits)`` (exclusive)."""
    return float(2 ** (SUM_BITS - frac_bits))


@single_threaded_pass
def magnitude_exponents(
    state_dict: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS
) -> list[int]:
    """Check every value and return each tensor's magnitude exponent.

    The exponent ``e`` of a tensor is the smallest integer with ``max|x| < 2**e``
    (clamped to ``[MIN_EXPONENT, MAX_EXPONENT]``; bool tensors declare 1). One
    read of each tensor (``aminmax``), no temporary of the model's size: NaN and
    Inf show up in the extremes, and only then is the tensor scanned again to
    name the culprit. Runs before sign-up so that a bad model never enters a round.

    Raises:
        EncodingError: NaN or Inf, or a value that could overflow the 64-bit ring
            (``|x| >= 2**(62 - frac_bits)``), naming the tensor and the value.
    """
    limit = value_limit(frac_bits)
    exponents = []
    for name, t in state_dict.items():
        if t.numel() == 0:
            exponents.append(MIN_EXPONENT)
            continue
        if t.dtype == torch.bool:
            exponents.append(1)
            continue
        x = t.detach()
        lo, hi = torch.aminmax(x.reshape(-1))
        if x.is_floating_point():
            lo_f, hi_f = float(lo.item()), float(hi.item())
            if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
                finite = torch.isfinite(x)
                bad = x[~finite].flatten()[0].item()
                raise EncodingError(
                    f"state_dict[{name!r}] contains {bad} "
                    f"({int((~finite).sum())} non-finite values); "
                    "refusing to aggregate non-finite weights"
                )
            peak = max(abs(lo_f), abs(hi_f))
        else:
            # abs() of the most negative integer wraps; compare the extremes as Python ints.
            peak_int = max(abs(int(lo.item())), abs(int(hi.item())))
            peak = float(peak_int)
        if peak >= limit:
            raise EncodingError(
                f"state_dict[{name!r}] holds a value of magnitude {peak:g}, which could "
                f"overflow the ring: values must stay below 2**{SUM_BITS - frac_bits} = {limit:g} "
                f"with frac_bits={frac_bits} (lower frac_bits to allow larger values)"
            )
        # frexp: peak = m * 2**e with 0.5 <= m < 1, so peak < 2**e (and 0 for peak == 0).
        exponent = math.frexp(peak)[1] if peak > 0 else MIN_EXPONENT
        exponents.append(min(max(exponent, MIN_EXPONENT), MAX_EXPONENT))
    return exponents


def check_values(
    state_dict: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS
) -> None:
    """Refuse NaN, Inf and values whose fixed-point sum could overflow the ring.

    Raises:
        EncodingError: naming the tensor and the offending value.
    """
    magnitude_exponents(state_dict, frac_bits)


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
        if (
            spec.dtype not in _FLOAT_NAMES
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
            COMPACT_SUM_BITS,
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


def segment_bounds(schema: Schema, segment_elements: int) -> list[tuple[int, int]]:
    """Split the model's data elements (the count slot aside) into segments.

    A round moves each segment through the tree on its own (see
    :mod:`lightning_secagg.protocol.segmented_round`), so that no buffer of a
    peer has to hold the whole model in the ring at once. Each segment's
    encoded vector carries its own copy of the count slot, so a root actor can
    decode a segment as soon as its sum is complete.

    Returns:
        ``[(a, b), ...]``: half-open ranges of data elements that tile
        ``[0, vector_size - 1)``, each at most ``segment_elements`` long.

    Raises:
        ConfigurationError: ``segment_elements`` is not a positive int.
    """
    if (
        isinstance(segment_elements, bool)
        or not isinstance(segment_elements, int)
        or segment_elements < 1
    ):
        raise ConfigurationError(f"segment_elements must be an int >= 1, got {segment_elements!r}")
    data = schema.vector_size - 1
    return [(a, min(a + segment_elements, data)) for a in range(0, data, segment_elements)]


def _pieces(schema: Schema, a: int, b: int) -> list[tuple[int, TensorSpec, int, int]]:
    """The parts of tensors that data elements ``[a, b)`` cover: ``(index, spec, lo, hi)``,
    ``lo:hi`` being element positions inside the flattened tensor."""
    starts = schema.tensor_starts
    out = []
    # The first tensor that may hold element a: the last one starting at or before it.
    for t in range(max(0, bisect.bisect_right(starts, a) - 1), len(starts)):
        start = starts[t]
        if start >= b:
            break
        spec = schema.tensors[t]
        lo, hi = max(a, start), min(b, start + spec.numel)
        if lo < hi:
            out.append((t, spec, lo - start, hi - start))
    return out


def result_span(schema: Schema, a: int, b: int) -> tuple[int, int]:
    """The bytes of the result buffer that data elements ``[a, b)`` decode into.

    Consecutive segments get consecutive spans that tile the whole buffer: a
    span that reaches the end of a tensor also takes the alignment padding
    after it (zero bytes), so a segment's result is one contiguous slice.
    """
    data = schema.vector_size - 1
    if not 0 <= a < b <= data:
        raise EncodingError(f"bad segment [{a}, {b}) of {data} elements")

    def byte_of(e: int) -> int:
        if e == data:
            return schema.result_nbytes
        t, spec, lo, _ = _pieces(schema, e, e + 1)[0]
        return schema.result_offsets[t] + lo * spec.torch_dtype.itemsize

    return byte_of(a), byte_of(b)


@single_threaded_pass
def encode(
    state_dict: Mapping[str, torch.Tensor],
    schema: Schema,
    share_of_total: float,
    *,
    checked: bool = False,
    plan: RingPlan | None = None,
    segment: tuple[int, int] | None = None,
) -> np.ndarray:
    """Encode ``p * x`` for every tensor in the ring, ``p = share_of_total``.

    Args:
        state_dict: Tensors matching ``schema`` (any device; copied to CPU one at a time).
        schema: The agreed layout.
        share_of_total: This peer's normalized weight ``weight / total_weight``, in ``(0, 1]``.
        checked: The caller already ran :func:`check_values` on this very state dict
            (the peer does, before its sign-up), so the values are not scanned twice.
        plan: The round's ring and fraction bits (default: the 64-bit ring,
            :meth:`RingPlan.wide`).
        segment: Encode only data elements ``[a, b)`` (see :func:`segment_bounds`),
            behind their own count slot; default: the whole model.

    Returns:
        A fresh vector of ring elements (``plan.dtype``): the count slot, then the
        segment's elements (``schema.vector_size`` of them for the whole model).

    Raises:
        EncodingError: non-finite or too large values, or a bad weight.
    """
    if not (0.0 < share_of_total <= 1.0) or not math.isfinite(share_of_total):
        raise EncodingError(f"normalized weight must be in (0, 1], got {share_of_total!r}")
    if not checked:
        check_values(state_dict, schema.frac_bits)
    plan = plan or RingPlan.wide(schema)
    if len(plan.frac_bits) != len(schema.tensors):
        raise EncodingError("the ring plan does not match the schema")
    a, b = segment if segment is not None else (0, schema.vector_size - 1)
    if not 0 <= a <= b <= schema.vector_size - 1:
        raise EncodingError(f"bad segment [{a}, {b}) of {schema.vector_size - 1} elements")
    out = np.empty(1 + b - a, dtype=plan.dtype)
    signed = out.view(plan.signed_dtype)
    signed[0] = round(share_of_total * math.ldexp(1.0, plan.count_frac_bits))
    ring = torch.from_numpy(signed)
    # One float64 scratch chunk for the whole segment, reused in place: no
    # temporary of the model's size and no allocation per chunk.
    scratch = torch.empty(max(1, min(ENCODE_CHUNK, b - a)), dtype=torch.float64)
    pos = 1
    for t, spec, lo, hi in _pieces(schema, a, b):
        # A power of two times p: exact, so each tensor's scaling rounds only once.
        scale = share_of_total * math.ldexp(1.0, plan.frac_bits[t])
        x = state_dict[spec.name].detach()
        if x.device.type != "cpu":
            x = x.reshape(-1)[lo:hi].cpu()  # only this segment's part crosses to the host
            lo, hi = 0, hi - lo
        flat = x.reshape(-1)
        for i in range(lo, hi, ENCODE_CHUNK):
            n = min(ENCODE_CHUNK, hi - i)
            chunk = scratch[:n]
            chunk.copy_(flat[i : i + n])  # exact: every supported dtype fits float64
            chunk.mul_(scale)
            chunk.round_()  # half to even, as numpy.rint
            ring[pos : pos + n].copy_(chunk)  # integral and in range: exact
            pos += n
    return out


@single_threaded_pass
def decode_total(
    total: np.ndarray,
    schema: Schema,
    plan: RingPlan | None = None,
    *,
    segment: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Turn the ring total into the averaged tensors' bytes, each in its own dtype.

    Floating tensors get ``S / C`` rounded to their dtype; integer tensors get it
    rounded to the nearest integer (ties to even) and clipped to their range;
    bool tensors become True where at least half the weight said True.

    Args:
        total: The ring sum of every peer's vector (of one segment).
        schema: The agreed layout.
        plan: The round's ring (default: the 64-bit ring).
        segment: The data elements ``[a, b)`` that ``total`` holds behind its
            count slot (default: the whole model).
        out: Where to write: a writable ``uint8`` array of the segment's
            :func:`result_span` (default: a fresh one). Every byte of it is
            written, the alignment padding between tensors with zeros, so it
            need not be zeroed first (that would be a pass over the model).

    Returns:
        ``out``: the result buffer's bytes for the segment (the whole buffer by default).

    Raises:
        InvalidTotalError: the summed count slot is not positive (a wrong share or partial sum).
    """
    plan = plan or RingPlan.wide(schema)
    a, b = segment if segment is not None else (0, schema.vector_size - 1)
    if total.dtype != plan.dtype or total.size != 1 + b - a:
        raise InvalidTotalError(
            f"the ring total has {total.size} {total.dtype} elements, expected "
            f"{1 + b - a} {plan.dtype}"
        )
    signed = total.view(plan.signed_dtype)
    count = float(signed[0])
    if count <= 0:
        raise InvalidTotalError(
            f"the summed count slot is {count}: a member sent a wrong share or partial sum"
        )
    base, end = result_span(schema, a, b)
    if out is None:
        out = np.empty(end - base, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != (end - base,):
        raise EncodingError(f"decode_total needs a uint8 buffer of {end - base} bytes")
    # Tensors numpy cannot convert into (float16, bfloat16, integers, bool) go
    # through one float64 scratch chunk, made at the first of them and reused: no
    # model-sized float64 temporary, and no allocation per chunk.
    scratch: np.ndarray | None = None
    src = 1
    offsets = schema.result_offsets
    written = 0  # out[:written] holds its final bytes
    for t, spec, lo, hi in _pieces(schema, a, b):
        dtype = spec.torch_dtype
        # The tensor's part of the output: converted straight into it, in its own dtype.
        dst = offsets[t] + lo * dtype.itemsize - base
        nbytes = (hi - lo) * dtype.itemsize
        out[written:dst] = 0  # the alignment padding before this tensor
        written = dst + nbytes
        power = math.ldexp(1.0, plan.count_frac_bits - plan.frac_bits[t])  # a power of two
        as_numpy = _NUMPY_FLOATS.get(dtype)
        if as_numpy is not None:
            # S / (C / power) in one pass, computed in float64 and rounded to the
            # dtype as .to(dtype) does: C / power is exact (C is an integer and
            # power a power of two, both far from float64's limits), so this
            # rounds once, exactly as (S / C) * power does.
            np.divide(
                signed[src : src + hi - lo],
                count / power,
                out=out[dst : dst + nbytes].view(as_numpy),
                dtype=np.float64,
                casting="same_kind",
            )
            src += hi - lo
            continue
        dest = torch.from_numpy(out[dst : dst + nbytes]).view(dtype)
        if scratch is None:
            scratch = np.empty(min(ENCODE_CHUNK, b - a), dtype=np.float64)
        for i in range(0, hi - lo, ENCODE_CHUNK):
            n = min(ENCODE_CHUNK, hi - lo - i)
            mean = scratch[:n]
            # S / C in float64 (the integer converted inside the division), then
            # an exact power-of-two scaling.
            np.divide(signed[src + i : src + i + n], count, out=mean)
            if power != 1.0:
                mean *= power
            value_f64 = torch.from_numpy(mean)
            if dtype.is_floating_point:
                dest[i : i + n] = value_f64  # rounds to the dtype, as .to(dtype) does
            elif dtype == torch.bool:
                dest[i : i + n] = value_f64 >= 0.5
            else:
                info = torch.iinfo(dtype)
                dest[i : i + n] = torch.round(value_f64).clamp_(info.min, info.max)
        src += hi - lo
    out[written:] = 0  # the padding after the last tensor
    return out


@single_threaded_pass
def decode_result(
    buffer: np.ndarray | bytes | memoryview, schema: Schema, *, adopt: bool = False
) -> dict[str, torch.Tensor]:
    """Rebuild a state dict from a decoded result buffer (one copy, then views).

    Args:
        buffer: The result's bytes.
        schema: The agreed layout.
        adopt: ``buffer`` is a writable ``uint8`` array that nothing else will
            read or write (a freshly opened sealed payload, or a root actor's
            own decoding once its sealed copies are made): the tensors become
            views of it and the copy is saved. Ignored for anything else.

    Raises:
        EncodingError: the buffer has the wrong size for the schema.
    """
    data = np.frombuffer(buffer, dtype=np.uint8)
    if data.size != schema.result_nbytes:
        raise EncodingError(f"result has {data.size} bytes, expected {schema.result_nbytes}")
    owned = (
        adopt
        and isinstance(buffer, np.ndarray)
        and buffer.dtype == np.uint8
        and buffer.ndim == 1
        and buffer.flags.writeable
        and buffer.flags.c_contiguous
    )
    storage = torch.from_numpy(buffer if owned else data.copy())  # type: ignore[arg-type]
    result: dict[str, torch.Tensor] = {}
    for spec, pos in zip(schema.tensors, schema.result_offsets, strict=True):
        if spec.numel == 0:
            # torch cannot view an empty byte slice as a wider dtype (stride 0).
            result[spec.name] = torch.empty(spec.shape, dtype=spec.torch_dtype)
            continue
        chunk = storage[pos : pos + spec.nbytes]
        result[spec.name] = chunk.view(spec.torch_dtype).reshape(spec.shape)
    return result
