"""The model's layout and its segment geometry: what every member must agree on.

A :class:`Schema` names each tensor of a state dict (name, shape, dtype) and
the fixed point's fraction bits; the scheduler compares the schemas of a
round's members, and every member derives the same vector layout, the same
segments and the same result buffer from it.

Why a module of its own, without torch: the scheduler and the planner need the
layout but never a tensor, so they must not pay for importing torch (seconds,
and hundreds of MiB); nor should ``protocol/``. Dtype names stay strings, as
on the wire. The torch side (describing a state dict, its dtype objects,
encoding and decoding) lives in :mod:`lightning_secagg.encoding`, which
:meth:`Schema.of` and :meth:`Schema.check` import only when called.

Layout of an encoded vector: ``[count slot][tensor 0, flattened][tensor 1, flattened]...``;
the *data elements* are the vector without its count slot. The decoded result
buffer holds every tensor in its own dtype, each at an 8-byte aligned offset.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from lightning_secagg.errors import ConfigurationError, EncodingError, LocalProtocolError

if TYPE_CHECKING:
    import torch

DEFAULT_FRAC_BITS = 32
#: Headroom kept below the ring's signed range: sums stay below 2**SUM_BITS.
SUM_BITS = 62

#: Bytes per element of every dtype a schema may name (the names travel on the wire).
DTYPE_ITEMSIZE = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
#: The floating dtypes among them (the others are integers and bool).
FLOAT_DTYPE_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})

#: The shortest segment, in data elements: with its count slot, a segment's vector
#: is then exactly 1 MiB in the compact ring (2 MiB in the 64-bit one), a whole
#: chunk of the share keystream (``sharing.CHUNK_BYTES``). Every model of up to
#: :data:`MAX_SEGMENTS` of them (MNISTNet: 5) travels in segments of this length.
SEGMENT_ELEMENTS = (1 << 18) - 1
#: The longest segment: 16 MiB with its count slot in the compact ring.
MAX_SEGMENT_ELEMENTS = (1 << 22) - 1
#: Segments a model is cut into at most, as long as :data:`MAX_SEGMENT_ELEMENTS`
#: allows (see :func:`segment_elements_for`).
MAX_SEGMENTS = 16


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype (its name, e.g. ``"float32"``) of one entry of a state dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    # Cached: encoding and decoding look these up for every piece of every
    # segment (ResNet-50 has 320 tensors), and the spec never changes.
    @cached_property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @cached_property
    def itemsize(self) -> int:
        """Bytes of one element in the tensor's own dtype."""
        return DTYPE_ITEMSIZE[self.dtype]

    @cached_property
    def nbytes(self) -> int:
        """Size of the tensor in its own dtype."""
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Schema:
    """What peers must agree on before their vectors can be added: the model's layout.

    The fraction bits are part of it, since two encodings with different
    scales cannot be summed. Invariant: every dtype is a key of
    :data:`DTYPE_ITEMSIZE` (:meth:`of` and :meth:`from_wire` refuse others).
    """

    tensors: tuple[TensorSpec, ...]
    frac_bits: int = DEFAULT_FRAC_BITS

    @classmethod
    def of(
        cls, state_dict: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS
    ) -> Schema:
        """Describe a state dict, refusing entries that cannot be averaged.

        Imports torch (through :func:`lightning_secagg.encoding.schema_of`,
        which does the work); the rest of this class does not.

        Raises:
            EncodingError: a value is not a tensor or has an unsupported dtype.
            ConfigurationError: ``frac_bits`` is out of range.
        """
        from lightning_secagg.encoding import schema_of

        return schema_of(state_dict, frac_bits)

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
                or not isinstance(dtype, str)
                or dtype not in DTYPE_ITEMSIZE
            ):
                raise ValueError(f"bad schema entry {name!r}")
            if not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
            ):
                raise ValueError(f"bad shape for schema entry {name!r}")
            specs.append(TensorSpec(name, tuple(shape), dtype))
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
        """Refuse a state dict whose layout is not this schema (imports torch, as :meth:`of`).

        Raises:
            SchemaMismatchError: naming the difference.
        """
        from lightning_secagg.encoding import check_state_dict

        check_state_dict(self, state_dict)


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


# -- segment geometry ------------------------------------------------------------------


def segment_elements_for(data_elements: int) -> int:
    """The segment length of a round for a model of ``data_elements`` elements.

    Part of the protocol (it decides what every message carries): every member
    derives it from the agreed schema, so all of them cut the model alike. The
    shortest length ``2**s - 1`` (``s`` from 18 to 22) that cuts the model into
    at most :data:`MAX_SEGMENTS` segments, else the longest.

    Why it grows with the model: every segment is a pass through the tree with
    messages of its own, and each message costs a fixed amount of CPU whatever
    it carries (sealed header, codec, Python, ZeroMQ wake-ups on both ends), so
    a large model in short segments spends more CPU than in long ones. A small
    model keeps short segments: they bound its peers' buffers. Measured in
    ``docs/benchmarks.md``.

    Raises:
        LocalProtocolError: ``data_elements`` is not an int >= 0.
    """
    if isinstance(data_elements, bool) or not isinstance(data_elements, int) or data_elements < 0:
        raise LocalProtocolError(f"data_elements must be an int >= 0, got {data_elements!r}")
    length = SEGMENT_ELEMENTS
    while length < MAX_SEGMENT_ELEMENTS and -(-data_elements // length) > MAX_SEGMENTS:
        length = 2 * length + 1  # 2**(s + 1) - 1
    return length


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


def round_segments(schema: Schema) -> list[tuple[int, int]]:
    """The segments every member of a round cuts ``schema`` into.

    :func:`segment_bounds` at :func:`segment_elements_for` the model's size:
    the one geometry the peer, the planner and the tests share.
    """
    return segment_bounds(schema, segment_elements_for(schema.vector_size - 1))


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

    Raises:
        EncodingError: ``[a, b)`` is empty or outside the model's data elements.
    """
    data = schema.vector_size - 1
    if not 0 <= a < b <= data:
        raise EncodingError(f"bad segment [{a}, {b}) of {data} elements")

    def byte_of(e: int) -> int:
        if e == data:
            return schema.result_nbytes
        t, spec, lo, _ = _pieces(schema, e, e + 1)[0]
        return schema.result_offsets[t] + lo * spec.itemsize

    return byte_of(a), byte_of(b)
