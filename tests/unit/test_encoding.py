"""Fixed point in Z_2^64: dtypes, weighted means, refusals, schemas, frac_bits bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_secagg.encoding import (
    TORCH_DTYPES,
    check_values,
    decode_result,
    decode_total,
    encode,
    torch_dtype,
)
from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    InvalidTotalError,
    RoundFailedError,
    SchemaMismatchError,
)
from lightning_secagg.schema import (
    DEFAULT_FRAC_BITS,
    DTYPE_ITEMSIZE,
    FLOAT_DTYPE_NAMES,
    Schema,
    TensorSpec,
    check_frac_bits,
    value_limit,
)
from tests.unit.memnet import cast_bound, fixed_point_bound, weighted_mean

pytestmark = pytest.mark.timeout(60)

ALL_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        np.add(total, v, out=total)  # uint64 wraps modulo 2**64
    return total


def aggregate(
    state_dicts: list[dict[str, torch.Tensor]], weights: list[float], frac_bits: int = 32
) -> dict[str, torch.Tensor]:
    schema = Schema.of(state_dicts[0], frac_bits)
    total_w = sum(weights)
    encoded = [encode(sd, schema, w / total_w) for sd, w in zip(state_dicts, weights, strict=True)]
    return decode_result(decode_total(ring_sum(encoded), schema), schema)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    lo = 0 if dtype == torch.uint8 else -100
    return torch.randint(lo, 100, shape, generator=gen).to(dtype)


# -- dtypes and shapes -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (5,), (2, 3), (2, 0), (0,), (3, 1, 2)], ids=str)
def test_single_peer_round_trip_keeps_dtype_shape_and_value(dtype, shape):
    x = sample(dtype, shape, seed=1)
    sd = {"t": x, "pad": torch.ones(3)}  # an all-empty state dict is refused; see below
    out = aggregate([sd], [1.0])
    assert list(out) == ["t", "pad"]
    assert out["t"].dtype == dtype
    assert out["t"].shape == x.shape
    if dtype.is_floating_point:
        # One peer: the mean is x itself, exact up to the fixed-point step.
        err = (out["t"].double() - x.double()).abs()
        bound = fixed_point_bound(1, 32, 300.0) + cast_bound(x.double(), dtype)
        assert bool((err <= bound).all())
    else:
        assert torch.equal(out["t"], x)
    assert torch.equal(out["pad"], torch.ones(3))


def test_schema_of_describes_every_entry():
    sd = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros((), dtype=torch.int64),
        "c": torch.zeros(0, dtype=torch.bfloat16),
        "d": torch.zeros(4, dtype=torch.bool),
    }
    schema = Schema.of(sd, 20)
    assert schema.tensors == (
        TensorSpec("a", (2, 3), "float32"),
        TensorSpec("b", (), "int64"),
        TensorSpec("c", (0,), "bfloat16"),
        TensorSpec("d", (4,), "bool"),
    )
    assert schema.frac_bits == 20
    assert schema.vector_size == 1 + 6 + 1 + 0 + 4
    # Each tensor 8-byte aligned in the result buffer, in its own dtype.
    assert schema.result_offsets == (0, 24, 32, 32)
    assert schema.result_nbytes == 24 + 8 + 0 + 8
    assert Schema.from_wire(schema.to_wire(), 20) == schema
    assert schema.to_wire() == [
        ["a", [2, 3], "float32"],
        ["b", [], "int64"],
        ["c", [0], "bfloat16"],
        ["d", [4], "bool"],
    ]


def test_all_empty_state_dict_is_refused():
    # A zero-byte result cannot travel (the codec refuses empty payloads).
    with pytest.raises(EncodingError, match="empty"):
        Schema.of({"a": torch.zeros(0), "b": torch.zeros(2, 0)})
    with pytest.raises(EncodingError, match="empty"):
        Schema.of({})


def test_unsupported_values_refused_by_name():
    with pytest.raises(EncodingError, match=r"state_dict\['c'\] has dtype torch.complex64"):
        Schema.of({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(EncodingError, match=r"state_dict\['x'\] is a list"):
        Schema.of({"x": [1.0]})  # type: ignore[dict-item]


def test_non_contiguous_and_strided_inputs_encode_like_their_copy():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd_t = {"w": base.t()}
    sd_c = {"w": base.t().contiguous()}
    schema = Schema.of(sd_c)
    assert np.array_equal(encode(sd_t, schema, 1.0), encode(sd_c, schema, 1.0))


def test_encoded_layout():
    sd = {"a": torch.tensor([1.0, -1.0]), "b": torch.tensor(3, dtype=torch.int32)}
    schema = Schema.of(sd, 8)
    v = encode(sd, schema, 0.5)
    assert v.dtype == np.uint64
    assert v.view(np.int64).tolist() == [128, 128, -128, 384]


def test_encoding_rounds_to_nearest_ties_to_even():
    # With f = 8: 0.3 * 256 = 76.8 -> 77, -76.8 -> -77, 2.5 -> 2, 3.5 -> 4, -2.5 -> -2.
    x = torch.tensor([0.3, -0.3, 2.5 / 256, 3.5 / 256, -2.5 / 256], dtype=torch.float64)
    schema = Schema.of({"x": x}, 8)
    assert encode({"x": x}, schema, 1.0).view(np.int64).tolist() == [256, 77, -77, 2, 4, -2]


# -- weighted means ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("frac_bits", [16, 32, 40])
def test_weighted_mean_within_resolution(dtype, frac_bits):
    n = 7
    sds = [{"w": sample(dtype, (50,), seed=i)} for i in range(n)]
    weights = [1.0, 2.0, 0.5, 10.0, 3.0, 1.0, 7.25]
    out = aggregate(sds, weights, frac_bits)["w"]
    assert out.dtype == dtype
    ref = weighted_mean(sds, weights, "w")
    peak = max(float(sd["w"].double().abs().max()) for sd in sds)
    bound = fixed_point_bound(n, frac_bits, peak) + cast_bound(ref, dtype)
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    if dtype == torch.float64 and frac_bits == 40:
        assert float(err.max()) < 1e-10  # the resolution really is ~n * 2**-f


def test_sample_counts_as_weights():
    sds = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}]
    out = aggregate(sds, [1.0, 3.0])["w"]
    assert abs(float(out) - 0.75) <= 2**-30


def test_integer_mean_rounds_half_to_even():
    # Two equal weights: (1 + 2) / 2 = 1.5 -> 2 and (2 + 3) / 2 = 2.5 -> 2, (-1 + -2) / 2 -> -2.
    a = {"n": torch.tensor([1, 2, -1, -2, 0, 7], dtype=torch.int64)}
    b = {"n": torch.tensor([2, 3, -2, -3, 1, 7], dtype=torch.int64)}
    out = aggregate([a, b], [1.0, 1.0])["n"]
    assert out.dtype == torch.int64
    assert out.tolist() == [2, 2, -2, -2, 0, 7]


def test_integer_mean_non_tie_rounds_to_nearest():
    sds = [
        {"n": torch.tensor([0], dtype=torch.int32)},
        {"n": torch.tensor([10], dtype=torch.int32)},
    ]
    assert aggregate(sds, [2.0, 1.0])["n"].tolist() == [3]  # 10/3 = 3.33
    assert aggregate(sds, [1.0, 2.0])["n"].tolist() == [7]  # 20/3 = 6.67


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [(torch.int8, -128, 127), (torch.uint8, 0, 255), (torch.int16, -32768, 32767)],
)
def test_integer_mean_stays_in_range(dtype, lo, hi):
    sds = [{"n": torch.tensor([lo, hi], dtype=dtype)}, {"n": torch.tensor([lo, hi], dtype=dtype)}]
    out = aggregate(sds, [1.0, 1.0])["n"]
    assert out.tolist() == [lo, hi]
    assert out.dtype == dtype


def test_integer_clipping_of_an_out_of_range_total():
    """A ring total whose mean lies outside the dtype's range is clipped, not wrapped."""
    schema = Schema.of({"n": torch.zeros(2, dtype=torch.int8)}, 8)
    total = np.array([256, 300 * 256, -300 * 256], dtype=np.int64).view(np.uint64)
    out = decode_result(decode_total(total, schema), schema)["n"]
    assert out.tolist() == [127, -128]
    schema_u8 = Schema.of({"n": torch.zeros(2, dtype=torch.uint8)}, 8)
    out_u8 = decode_result(decode_total(total, schema_u8), schema_u8)["n"]
    assert out_u8.tolist() == [255, 0]


def test_bool_is_a_weighted_majority_ties_true():
    t, f = torch.tensor([True]), torch.tensor([False])
    assert aggregate([{"b": t}, {"b": f}], [1.0, 1.0])["b"].tolist() == [True]  # exactly half
    assert aggregate([{"b": t}, {"b": f}], [1.0, 1.01])["b"].tolist() == [False]
    assert aggregate([{"b": t}, {"b": f}, {"b": f}], [1.0, 1.0, 1.0])["b"].tolist() == [False]
    assert aggregate([{"b": t}, {"b": f}, {"b": f}], [3.0, 1.0, 1.0])["b"].tolist() == [True]
    out = aggregate([{"b": t}, {"b": f}], [1.0, 1.0])["b"]
    assert out.dtype == torch.bool


def test_zero_count_slot_refused():
    schema = Schema.of({"w": torch.zeros(2)})
    with pytest.raises(InvalidTotalError, match="count slot"):
        decode_total(np.zeros(3, dtype=np.uint64), schema)
    negative = np.array([-5, 0, 0], dtype=np.int64).view(np.uint64)
    with pytest.raises(InvalidTotalError, match="count slot") as info:
        decode_total(negative, schema)
    assert isinstance(info.value, RoundFailedError)  # retryable, not a local encoding error


def test_decode_result_never_shares_the_buffer():
    schema = Schema.of({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int64)})
    buf = np.zeros(schema.result_nbytes, dtype=np.uint8)
    buf[:4] = np.frombuffer(np.float32(1.5).tobytes(), dtype=np.uint8)
    out = decode_result(buf, schema)
    buf[:4] = 0
    assert out["a"][0].item() == 1.5  # copied: the buffer may be reused
    out["a"][1] = 2.0
    assert buf[4:8].tolist() == [0, 0, 0, 0]  # and writing the tensor leaves the buffer alone
    frozen = np.zeros(schema.result_nbytes, dtype=np.uint8)
    frozen.flags.writeable = False
    safe = decode_result(frozen, schema)
    safe["a"][0] = 2.0  # writable tensors even from a read-only buffer
    assert frozen[:4].tolist() == [0, 0, 0, 0]
    assert decode_result(bytes(schema.result_nbytes), schema)["b"].tolist() == [0, 0]


def test_decode_result_wrong_size_refused():
    schema = Schema.of({"w": torch.zeros(3)})  # 12 bytes, aligned to 16
    assert schema.result_nbytes == 16
    decode_result(np.zeros(16, dtype=np.uint8), schema)
    for n in (0, 12, 15, 17, 24):
        with pytest.raises(EncodingError, match=f"result has {n} bytes, expected 16"):
            decode_result(np.zeros(n, dtype=np.uint8), schema)


def test_decode_result_copies_the_buffer():
    schema = Schema.of({"w": torch.zeros(2, dtype=torch.float64)})
    buf = bytearray(np.array([1.5, 2.5]).tobytes())
    out = decode_result(memoryview(buf), schema)
    buf[:] = bytes(16)
    assert out["w"].tolist() == [1.5, 2.5]


# -- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_refused_naming_the_tensor(bad, dtype):
    sd = {"ok": torch.zeros(2), "layer.weight": torch.tensor([1.0, bad, 2.0]).to(dtype)}
    with pytest.raises(EncodingError, match=r"state_dict\['layer.weight'\] contains .*non-finite"):
        check_values(sd)
    with pytest.raises(EncodingError, match=r"layer\.weight"):
        encode(sd, Schema.of(sd), 1.0)


@pytest.mark.parametrize("frac_bits", [8, 32, 52])
def test_value_limit_boundary_exactly(frac_bits):
    limit = value_limit(frac_bits)
    assert limit == 2.0 ** (62 - frac_bits)
    below = float(np.nextafter(limit, 0.0))
    check_values({"w": torch.tensor([below, -below], dtype=torch.float64)}, frac_bits)
    for at in (limit, -limit, float(np.nextafter(limit, np.inf))):
        with pytest.raises(EncodingError, match=r"state_dict\['w'\] holds a value of magnitude"):
            check_values({"w": torch.tensor([0.0, at], dtype=torch.float64)}, frac_bits)


def test_value_limit_boundary_for_integers():
    # frac_bits=40: integers must stay below 2**22.
    ok = torch.tensor([2**22 - 1, -(2**22 - 1)], dtype=torch.int64)
    check_values({"n": ok}, 40)
    for bad in (2**22, -(2**22)):
        with pytest.raises(EncodingError, match=r"state_dict\['n'\]"):
            check_values({"n": torch.tensor([0, bad], dtype=torch.int64)}, 40)


def test_int64_min_does_not_slip_through():
    lowest = torch.iinfo(torch.int64).min
    with pytest.raises(EncodingError, match="magnitude"):
        check_values({"n": torch.tensor([lowest], dtype=torch.int64)}, 8)
    with pytest.raises(EncodingError, match="magnitude"):
        check_values({"n": torch.tensor([0, torch.iinfo(torch.int64).max])}, 8)


def test_values_at_the_limit_sum_without_overflow():
    """Every peer at just below the limit: the ring sum still decodes to the right sign."""
    f = 20
    big = float(np.nextafter(value_limit(f), 0.0))
    sds = [{"w": torch.tensor([big, -big], dtype=torch.float64)} for _ in range(5)]
    out = aggregate(sds, [1.0, 2.0, 3.0, 4.0, 5.0], f)["w"]
    assert out[0] > 0 > out[1]
    # The count slot's rounding makes the error relative (~n / 2**(f+1)) for large values.
    bound = fixed_point_bound(5, f, big)
    assert abs(float(out[0]) - big) <= bound
    assert abs(float(out[1]) + big) <= bound
    assert bound < big * 1e-5


def test_bool_and_empty_tensors_skip_the_value_check():
    check_values({"b": torch.ones(3, dtype=torch.bool), "e": torch.zeros(0)}, 52)


def test_encode_refuses_bad_weights():
    sd = {"w": torch.zeros(2)}
    schema = Schema.of(sd)
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(EncodingError, match="normalized weight"):
            encode(sd, schema, bad)
    encode(sd, schema, 1.0)


# -- schemas ---------------------------------------------------------------------------


def schema_of(**tensors: torch.Tensor) -> Schema:
    return Schema.of(tensors)


def test_difference_none_when_equal():
    a = schema_of(w=torch.zeros(2), b=torch.zeros(1))
    assert a.difference(schema_of(w=torch.ones(2), b=torch.ones(1))) is None
    assert a.fingerprint() == schema_of(w=torch.ones(2), b=torch.ones(1)).fingerprint()
    assert len(a.fingerprint()) == 16


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (dict(w=torch.zeros(2)), "missing 'b'"),
        (dict(w=torch.zeros(2), b=torch.zeros(1), c=torch.zeros(1)), "unexpected 'c'"),
        (dict(w=torch.zeros(3), b=torch.zeros(1)), "'w' has shape [3], expected [2]"),
        (
            dict(w=torch.zeros(2, dtype=torch.float64), b=torch.zeros(1)),
            "'w' has dtype float64, expected float32",
        ),
        (dict(b=torch.zeros(1), w=torch.zeros(2)), "the entries are in a different order"),
    ],
)
def test_difference_names_the_problem(other, expected):
    mine = schema_of(w=torch.zeros(2), b=torch.zeros(1))
    theirs = Schema.of(other)
    diff = mine.difference(theirs)
    assert diff is not None
    assert expected in diff
    assert mine.fingerprint() != theirs.fingerprint()


def test_difference_frac_bits():
    a = Schema.of({"w": torch.zeros(2)}, 32)
    b = Schema.of({"w": torch.zeros(2)}, 24)
    assert a.difference(b) == "frac_bits 24 != 32"
    assert a.fingerprint() != b.fingerprint()


def test_difference_caps_long_lists():
    mine = Schema.of({f"t{i}": torch.zeros(1) for i in range(20)})
    theirs = Schema.of({f"t{i}": torch.zeros(2) for i in range(20)})
    diff = mine.difference(theirs)
    assert diff is not None
    assert diff.count("has shape") == 8
    assert diff.endswith("; and 12 more")
    many_missing = Schema.of({"x": torch.zeros(1)})
    assert "(+15 more)" in (mine.difference(many_missing) or "")


def test_check_raises_schema_mismatch():
    schema = schema_of(w=torch.zeros(2))
    schema.check({"w": torch.ones(2)})
    with pytest.raises(SchemaMismatchError, match=r"shape \[4\], expected \[2\]"):
        schema.check({"w": torch.ones(4)})


@pytest.mark.parametrize(
    "entries",
    [
        [["w", [2]]],
        [["w", [2], "float128"]],
        [[1, [2], "float32"]],
        [["w", 2, "float32"]],
        [["w", [-1], "float32"]],
        [["w", [True], "float32"]],
        [["w", [2**40], "float32"]],
        ["w"],
    ],
)
def test_schema_from_wire_refuses_malformed(entries):
    with pytest.raises(ValueError):
        Schema.from_wire(entries, 32)


# -- frac_bits -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [7, 53, 0, -1, 64, 32.0, True, "32", None])
def test_frac_bits_out_of_range(bad):
    with pytest.raises(ConfigurationError, match=r"frac_bits must be an int in \[8, 52\]"):
        check_frac_bits(bad)
    with pytest.raises(ConfigurationError, match="frac_bits"):
        Schema.of({"w": torch.zeros(1)}, bad)


@pytest.mark.parametrize("good", [8, 9, DEFAULT_FRAC_BITS, 51, 52])
def test_frac_bits_in_range(good):
    check_frac_bits(good)
    assert Schema.of({"w": torch.zeros(1)}, good).frac_bits == good


# -- the ring sum, as a property -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    size=st.integers(1, 16),
    frac_bits=st.integers(16, 40),
)
def test_ring_sum_of_random_peers_decodes_to_weighted_mean(data, n, size, frac_bits):
    limit = min(value_limit(frac_bits) / 2, 1e6)
    elements = st.floats(-limit, limit, width=32, allow_nan=False, allow_infinity=False)
    xs = [
        data.draw(hnp.arrays(np.float32, (size,), elements=elements), label=f"x{i}")
        for i in range(n)
    ]
    weights = data.draw(st.lists(st.floats(0.01, 1000.0), min_size=n, max_size=n), label="weights")
    sds = [{"w": torch.from_numpy(x.copy())} for x in xs]
    schema = Schema.of(sds[0], frac_bits)
    encoded = [encode(sd, schema, w / sum(weights)) for sd, w in zip(sds, weights, strict=True)]
    total = ring_sum(encoded)
    # Individual encodings use the whole ring (negative values wrap to the top) ...
    signed_sum = sum(e.view(np.int64).astype(object) for e in encoded)
    assert total.view(np.int64).tolist() == [int(v) for v in signed_sum]
    out = decode_result(decode_total(total, schema), schema)["w"]
    ref = weighted_mean(sds, weights, "w")
    peak = max(float(np.abs(x.astype(np.float64)).max()) for x in xs)
    bound = fixed_point_bound(n, frac_bits, peak) + cast_bound(ref, torch.float32)
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), (float(err.max()), bound)


def test_ring_sum_is_order_independent_and_wraps():
    sds = [{"w": torch.tensor([-3.0, 1e5])}, {"w": torch.tensor([2.0, -1e5])}]
    schema = Schema.of(sds[0])
    a, b = (encode(sd, schema, 0.5) for sd in sds)
    assert a.view(np.int64)[1] < 0  # stored as a huge uint64: two's complement
    assert int(a[1]) > 2**63
    assert np.array_equal(ring_sum([a, b]), ring_sum([b, a]))
    out = decode_result(decode_total(ring_sum([a, b]), schema), schema)["w"]
    assert out.tolist() == [-0.5, 0.0]


def test_the_torch_dtypes_are_the_schemas_dtypes():
    """The torch edge knows exactly the dtype names a torch-free schema may hold, at their sizes."""
    assert list(TORCH_DTYPES) == list(DTYPE_ITEMSIZE)
    for name, dtype in TORCH_DTYPES.items():
        assert dtype.itemsize == DTYPE_ITEMSIZE[name]
        assert dtype.is_floating_point == (name in FLOAT_DTYPE_NAMES)
        spec = Schema.of({"t": torch.zeros(2, dtype=dtype)}).tensors[0]
        assert (spec.dtype, spec.itemsize, torch_dtype(spec)) == (name, dtype.itemsize, dtype)
