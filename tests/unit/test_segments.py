"""Segments of a model: bounds that tile it, spans that tile the result, and encoding
or decoding a segment giving exactly the whole model's bytes for that segment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg.encoding import decode_total, encode
from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    InvalidTotalError,
    LocalProtocolError,
)
from lightning_secagg.ring import RingPlan
from lightning_secagg.schema import (
    MAX_SEGMENT_ELEMENTS,
    MAX_SEGMENTS,
    SEGMENT_ELEMENTS,
    Schema,
    result_span,
    segment_bounds,
    segment_elements_for,
)
from tests.unit.test_encoding import ALL_DTYPES as DTYPES
from tests.unit.test_encoding import ring_sum

pytestmark = pytest.mark.timeout(60)


def mixed_state(seed: int, sizes: list[int], dtypes: list[torch.dtype]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, dt) in enumerate(zip(sizes, dtypes, strict=True)):
        if dt.is_floating_point:
            out[f"t{i}"] = (torch.randn(n, generator=g) * 3).to(dt)
        elif dt == torch.bool:
            out[f"t{i}"] = torch.randint(0, 2, (n,), generator=g).bool()
        else:
            out[f"t{i}"] = torch.randint(0, 100, (n,), generator=g).to(dt)
    return out


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    dtype_idx=st.lists(st.integers(0, len(DTYPES) - 1), min_size=6, max_size=6),
    seg=st.integers(1, 50),
    wide=st.booleans(),
    seeds=st.lists(st.integers(0, 2**31), min_size=1, max_size=3),
)
def test_segments_encode_and_decode_exactly_as_the_whole_model(sizes, dtype_idx, seg, wide, seeds):
    dtypes = [DTYPES[i] for i in dtype_idx[: len(sizes)]]
    states = [mixed_state(s, sizes, dtypes) for s in seeds]
    schema = Schema.of(states[0])
    plan = RingPlan.wide(schema) if wide else RingPlan.compact(schema, [8] * len(sizes))
    if not wide and any(d == torch.float64 for d in dtypes):
        plan = RingPlan.wide(schema)
    p = 1.0 / len(states)
    whole = [encode(sd, schema, p, plan=plan) for sd in states]
    whole_result = decode_total(ring_sum(whole), schema, plan)
    bounds = segment_bounds(schema, seg)
    assert bounds[0][0] == 0 and bounds[-1][1] == schema.vector_size - 1
    assert all(b1 == a2 for (_, b1), (a2, _) in itertools.pairwise(bounds))
    assert all(0 < b - a <= seg for a, b in bounds)
    pieces = []
    expected_start = 0
    for a, b in bounds:
        parts = [encode(sd, schema, p, plan=plan, segment=(a, b)) for sd in states]
        for part, full in zip(parts, whole, strict=True):
            assert part[0] == full[0]  # every segment has the count slot
            np.testing.assert_array_equal(part[1:], full[1 + a : 1 + b])
        lo, hi = result_span(schema, a, b)
        assert lo == expected_start
        expected_start = hi
        # Whatever the buffer held before: every byte is written, padding zeroed.
        out = np.full(hi - lo, 0xAB, dtype=np.uint8)
        got = decode_total(ring_sum(parts), schema, plan, segment=(a, b), out=out)
        assert got is out
        pieces.append(got)
    assert expected_start == schema.result_nbytes
    assert np.concatenate(pieces).tobytes() == whole_result.tobytes()
    padding = np.ones(schema.result_nbytes, dtype=bool)
    for spec, pos in zip(schema.tensors, schema.result_offsets, strict=True):
        padding[pos : pos + spec.nbytes] = False
    assert not whole_result[padding].any()


def test_a_segment_of_a_cuda_less_tensor_copies_only_its_part():
    sd = {"w": torch.arange(10, dtype=torch.float32), "b": torch.ones(3)}
    schema = Schema.of(sd)
    v = encode(sd, schema, 1.0, segment=(8, 11))
    assert v.size == 4
    np.testing.assert_array_equal(v[1:].view(np.int64), np.array([8, 9, 1]) * 2**32)


def test_segment_bounds_refuse_bad_sizes():
    schema = Schema.of({"w": torch.zeros(5)})
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ConfigurationError):
            segment_bounds(schema, bad)
    assert segment_bounds(schema, 100) == [(0, 5)]
    assert segment_bounds(schema, 2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize(
    ("elements", "length"),
    [
        (0, SEGMENT_ELEMENTS),
        (1_199_882, SEGMENT_ELEMENTS),  # MNISTNet: 5 segments of 1 MiB
        (MAX_SEGMENTS * SEGMENT_ELEMENTS, SEGMENT_ELEMENTS),
        (MAX_SEGMENTS * SEGMENT_ELEMENTS + 1, (1 << 19) - 1),
        (25_610_205, (1 << 21) - 1),  # ResNet-50 (with its buffers): 13 segments of 8 MiB
        (MAX_SEGMENTS * MAX_SEGMENT_ELEMENTS, MAX_SEGMENT_ELEMENTS),
        (10**12, MAX_SEGMENT_ELEMENTS),  # no longer than 16 MiB, however many
    ],
)
def test_segment_length_grows_with_the_model_up_to_a_bound(elements, length):
    assert segment_elements_for(elements) == length


@given(st.integers(min_value=0, max_value=1 << 40))
def test_segment_length_is_the_shortest_that_keeps_the_segments_few(elements):
    length = segment_elements_for(elements)
    assert length + 1 in [1 << s for s in range(18, 23)]
    segments = -(-elements // length)
    assert segments <= MAX_SEGMENTS or length == MAX_SEGMENT_ELEMENTS
    if length > SEGMENT_ELEMENTS:  # the next shorter one would cut too many
        assert -(-elements // (length // 2)) > MAX_SEGMENTS


def test_segment_length_refuses_a_bad_size():
    for bad in (-1, 1.5, True, None):
        with pytest.raises(LocalProtocolError):
            segment_elements_for(bad)  # type: ignore[arg-type]


def test_bad_segments_refused():
    schema = Schema.of({"w": torch.zeros(5)})
    sd = {"w": torch.zeros(5)}
    for bad in ((0, 6), (-1, 2), (3, 2)):
        with pytest.raises(EncodingError):
            encode(sd, schema, 1.0, segment=bad)
    with pytest.raises(EncodingError):
        result_span(schema, 2, 2)
    total = encode(sd, schema, 1.0, segment=(1, 3))
    with pytest.raises(InvalidTotalError):
        decode_total(total, schema, segment=(1, 4))
    with pytest.raises(EncodingError):
        decode_total(total, schema, segment=(1, 3), out=np.zeros(7, dtype=np.uint8))


def test_each_segment_checks_its_own_count_slot():
    sd = {"w": torch.ones(6)}
    schema = Schema.of(sd)
    part = encode(sd, schema, 1.0, segment=(3, 6))
    part[0] = 0
    with pytest.raises(InvalidTotalError, match="count slot"):
        decode_total(part, schema, segment=(3, 6))
