"""Fixed-point encoding of state dicts into the ring, and back: the only module that needs torch.

Layout of an encoded vector (see :mod:`lightning_secagg.schema`; ring elements,
little-endian on the wire)::

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

Which ring and which fraction bits a round uses (the 64-bit ring above, or the
compact Z_2^32 with per-tensor fraction bits) is :class:`~lightning_secagg.ring.RingPlan`,
chosen by the rule of :mod:`lightning_secagg.ring`. The layout itself, its
segments and the result buffer's geometry are in :mod:`lightning_secagg.schema`,
which does not import torch: this module is the torch edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from lightning_secagg.errors import EncodingError, InvalidTotalError, SchemaMismatchError
from lightning_secagg.ring import MAX_EXPONENT, MIN_EXPONENT, RingPlan, check_compact_count
from lightning_secagg.schema import (
    DEFAULT_FRAC_BITS,
    SUM_BITS,
    Schema,
    TensorSpec,
    _pieces,
    check_frac_bits,
    result_span,
    value_limit,
)
from lightning_secagg.threads import single_threaded_pass

#: Elements encoded per step (a 512 KiB float64 temporary).
ENCODE_CHUNK = 1 << 16
#: Floating dtypes numpy converts float64 to exactly as torch does (one IEEE
#: rounding to nearest even). Not float16: torch rounds float64 to float32 and
#: then to float16, numpy rounds once, and the two differ in rare ties; not
#: bfloat16, which numpy lacks. Those go through torch.
_NUMPY_FLOATS = {
    torch.float32: np.dtype("<f4"),
    torch.float64: np.dtype("<f8"),
}

#: The torch dtype of every dtype name a schema may hold
#: (:data:`lightning_secagg.schema.DTYPE_ITEMSIZE`'s keys, in the same order).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAME_OF = {dt: name for name, dt in TORCH_DTYPES.items()}


def torch_dtype(spec: TensorSpec) -> torch.dtype:
    """The dtype of a schema entry as a torch object."""
    return TORCH_DTYPES[spec.dtype]


def schema_of(state_dict: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS) -> Schema:
    """Describe a state dict, refusing entries that cannot be averaged (:meth:`Schema.of`).

    Raises:
        EncodingError: a value is not a tensor or has an unsupported dtype, or
            the state dict holds no element at all.
        ConfigurationError: ``frac_bits`` is out of range.
    """
    check_frac_bits(frac_bits)
    specs = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise EncodingError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        dtype = _NAME_OF.get(t.dtype)
        if dtype is None:
            raise EncodingError(
                f"state_dict[{name!r}] has dtype {t.dtype}, which cannot be averaged; "
                f"supported: {sorted(TORCH_DTYPES)}"
            )
        specs.append(TensorSpec(str(name), tuple(int(s) for s in t.shape), dtype))
    if not specs:
        raise EncodingError("the state dict is empty: nothing to aggregate")
    if all(s.numel == 0 for s in specs):
        # The result would be a 0-byte payload, which the codec refuses, so the
        # round could never finish: refuse it here, before anything is sent.
        raise EncodingError("every tensor of the state dict is empty: nothing to aggregate")
    return Schema(tuple(specs), frac_bits)


def check_state_dict(schema: Schema, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse a state dict whose layout is not ``schema`` (:meth:`Schema.check`).

    Raises:
        SchemaMismatchError: naming the difference.
    """
    diff = schema.difference(schema_of(state_dict, schema.frac_bits))
    if diff is not None:
        raise SchemaMismatchError(f"state dict does not match the schema: {diff}")


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
        InvalidTotalError: the summed count slot is not positive (a wrong share or
            partial sum), or, in the compact ring, not the sum of shares of one
            (:func:`~lightning_secagg.ring.check_compact_count`: e.g. a total
            weight the scheduler under-reported).
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
    if plan.ring_bits == 32:
        # The compact count cannot wrap (ring.COMPACT_COUNT_BITS): checked against
        # its nominal value, which then divides (exact: the shares sum to one).
        problem = check_compact_count(int(signed[0]))
        if problem is not None:
            raise InvalidTotalError(problem)
        count = math.ldexp(1.0, plan.count_frac_bits)
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
        dtype = torch_dtype(spec)
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
    buffer: np.ndarray | bytes | memoryview, schema: Schema
) -> dict[str, torch.Tensor]:
    """Rebuild a state dict from a decoded result buffer: one copy per tensor.

    Invariant: every returned tensor owns its storage, of exactly its own
    size. Why not views of the buffer (which would save the copy): tensors of
    different dtypes viewing one storage cannot be saved together
    (``torch.save`` refuses "multiple tensors or storages that view the same
    data as different types", so a model with BatchNorm's int64 counter next
    to float weights could not be saved), and any one of them would keep the
    whole buffer alive. The copy is one ``memcpy`` per tensor.

    Args:
        buffer: The result's bytes (:attr:`Schema.result_nbytes` of them);
            not kept, nor modified.
        schema: The agreed layout.

    Raises:
        EncodingError: the buffer has the wrong size for the schema.
    """
    data = np.frombuffer(buffer, dtype=np.uint8)
    if data.size != schema.result_nbytes:
        raise EncodingError(f"result has {data.size} bytes, expected {schema.result_nbytes}")
    result: dict[str, torch.Tensor] = {}
    for spec, pos in zip(schema.tensors, schema.result_offsets, strict=True):
        tensor = torch.empty(spec.numel, dtype=torch_dtype(spec))
        if spec.nbytes:
            # The tensor's bytes, seen as uint8 (a view of its own new storage).
            tensor.view(torch.uint8).numpy()[:] = data[pos : pos + spec.nbytes]
        result[spec.name] = tensor.reshape(spec.shape)
    return result
