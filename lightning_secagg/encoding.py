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
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    InvalidTotalError,
    SchemaMismatchError,
)

DEFAULT_FRAC_BITS = 32
#: Elements encoded per step (a 512 KiB float64 temporary).
ENCODE_CHUNK = 1 << 16
#: Headroom kept below the ring's signed range: sums stay below 2**SUM_BITS.
SUM_BITS = 62

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
_DTYPE_BY_NAME = {name: dt for dt, name in {**_FLOAT_DTYPES, **_INT_DTYPES}.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one entry of a state dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a torch object."""
        return _DTYPE_BY_NAME[self.dtype]

    @property
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

    @property
    def vector_size(self) -> int:
        """Ring elements of an encoded vector, count slot included."""
        return 1 + sum(s.numel for s in self.tensors)

    @property
    def result_offsets(self) -> tuple[int, ...]:
        """Byte offset of each tensor in the result buffer, 8-byte aligned so views are legal."""
        offsets, pos = [], 0
        for spec in self.tensors:
            offsets.append(pos)
            pos += _align8(spec.nbytes)
        return tuple(offsets)

    @property
    def result_nbytes(self) -> int:
        """Bytes of the decoded result buffer (every tensor in its own dtype, 8-byte aligned)."""
        return sum(_align8(s.nbytes) for s in self.tensors)

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


def check_values(
    state_dict: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS
) -> None:
    """Refuse NaN, Inf and values whose fixed-point sum could overflow the ring.

    Runs before sign-up so that a bad model never enters a round.

    Raises:
        EncodingError: naming the tensor and the offending value.
    """
    limit = value_limit(frac_bits)
    for name, t in state_dict.items():
        if t.numel() == 0 or t.dtype == torch.bool:
            continue
        x = t.detach()
        if x.is_floating_point():
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                bad = x[~finite].flatten()[0].item()
                raise EncodingError(
                    f"state_dict[{name!r}] contains {bad} "
                    f"({int((~finite).sum())} non-finite values); "
                    "refusing to aggregate non-finite weights"
                )
            peak = float(x.abs().max().item())
        else:
            # abs() of the most negative integer wraps; compare the extremes as Python ints.
            peak = float(max(abs(int(x.min().item())), abs(int(x.max().item()))))
        if peak >= limit:
            raise EncodingError(
                f"state_dict[{name!r}] holds a value of magnitude {peak:g}, which could "
                f"overflow the ring: values must stay below 2**{SUM_BITS - frac_bits} = {limit:g} "
                f"with frac_bits={frac_bits} (lower frac_bits to allow larger values)"
            )


def encode(
    state_dict: Mapping[str, torch.Tensor],
    schema: Schema,
    share_of_total: float,
    *,
    checked: bool = False,
) -> np.ndarray:
    """Encode ``p * x`` for every tensor in the ring, ``p = share_of_total``.

    Args:
        state_dict: Tensors matching ``schema`` (any device; copied to CPU one at a time).
        schema: The agreed layout.
        share_of_total: This peer's normalized weight ``weight / total_weight``, in ``(0, 1]``.
        checked: The caller already ran :func:`check_values` on this very state dict
            (the peer does, before its sign-up), so the values are not scanned twice.

    Returns:
        A fresh ``uint64`` vector of ``schema.vector_size`` elements.

    Raises:
        EncodingError: non-finite or too large values, or a bad weight.
    """
    if not (0.0 < share_of_total <= 1.0) or not math.isfinite(share_of_total):
        raise EncodingError(f"normalized weight must be in (0, 1], got {share_of_total!r}")
    if not checked:
        check_values(state_dict, schema.frac_bits)
    scale = share_of_total * float(2**schema.frac_bits)
    out = np.empty(schema.vector_size, dtype=np.uint64)
    signed = out.view(np.int64)
    signed[0] = round(scale)
    pos = 1
    for spec in schema.tensors:
        x = state_dict[spec.name].detach()
        if x.device.type != "cpu":
            x = x.cpu()
        flat = x.reshape(-1)
        # Chunks keep the float64 temporary small whatever the tensor's size.
        for i in range(0, spec.numel, ENCODE_CHUNK):
            scaled = flat[i : i + ENCODE_CHUNK].to(torch.float64).numpy() * scale
            np.rint(scaled, out=scaled)
            signed[pos + i : pos + i + scaled.size] = scaled
        pos += spec.numel
    return out


def decode_total(total: np.ndarray, schema: Schema) -> np.ndarray:
    """Turn the ring total into the averaged tensors' bytes, each in its own dtype.

    Floating tensors get ``S / C`` rounded to their dtype; integer tensors get it
    rounded to the nearest integer (ties to even) and clipped to their range;
    bool tensors become True where at least half the weight said True.

    Raises:
        InvalidTotalError: the summed count slot is not positive (a wrong share or partial sum).
    """
    signed = total.view(np.int64)
    count = float(signed[0])
    if count <= 0:
        raise InvalidTotalError(
            f"the summed count slot is {count}: a member sent a wrong share or partial sum"
        )
    out = np.zeros(schema.result_nbytes, dtype=np.uint8)
    src = 1
    for spec, dst in zip(schema.tensors, schema.result_offsets, strict=True):
        if spec.numel == 0:
            # Nothing to write, and torch refuses to view an empty tensor as bytes
            # (its last stride is 0), so a zero-element entry is skipped outright.
            continue
        mean = torch.from_numpy(signed[src : src + spec.numel].astype(np.float64) / count)
        dtype = spec.torch_dtype
        if dtype.is_floating_point:
            value = mean.to(dtype)
        elif dtype == torch.bool:
            value = mean >= 0.5
        else:
            info = torch.iinfo(dtype)
            value = torch.round(mean).clamp_(info.min, info.max).to(dtype)
        raw = value.reshape(-1).view(torch.uint8).numpy()
        out[dst : dst + spec.nbytes] = raw
        src += spec.numel
    return out


def decode_result(
    buffer: np.ndarray | bytes | memoryview, schema: Schema
) -> dict[str, torch.Tensor]:
    """Rebuild a state dict from a decoded result buffer (one copy, then views).

    Raises:
        EncodingError: the buffer has the wrong size for the schema.
    """
    data = np.frombuffer(buffer, dtype=np.uint8)
    if data.size != schema.result_nbytes:
        raise EncodingError(f"result has {data.size} bytes, expected {schema.result_nbytes}")
    storage = torch.from_numpy(data.copy())
    result: dict[str, torch.Tensor] = {}
    for spec, pos in zip(schema.tensors, schema.result_offsets, strict=True):
        if spec.numel == 0:
            # torch cannot view an empty byte slice as a wider dtype (stride 0).
            result[spec.name] = torch.empty(spec.shape, dtype=spec.torch_dtype)
            continue
        chunk = storage[pos : pos + spec.nbytes]
        result[spec.name] = chunk.view(spec.torch_dtype).reshape(spec.shape)
    return result
