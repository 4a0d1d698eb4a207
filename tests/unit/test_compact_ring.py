"""The compact ring Z_2^32: magnitude exponents, when it is allowed, its error bound, whole rounds.

The error bound checked here, derived from ``encode``/``decode_total``: with
``N`` peers, normalized weights ``p_i`` and a tensor whose relayed exponent is
``e`` (every ``|x| < 2**e``), the tensor has ``f = 30 - e`` fraction bits and
the count slot 30. Each peer rounds ``p_i * x_i * 2**f`` and ``p_i * 2**30`` to
integers (error <= 1/2 each), so the ring sums are ``S = 2**f * m + e_S`` and
``C = 2**30 + e_C`` with ``|e_S|, |e_C| <= N / 2``, and the decoded mean
``S / C * 2**(30 - f)`` differs from the weighted mean ``m`` by at most::

    (N / 2) * (2**(e - 30) + |m| * 2**-30) / (1 - N * 2**-31)

plus float64 noise (far below ``2**(e - 40)``), plus half an ulp of the output
dtype for the final cast. The ``|m|`` term (count-slot rounding) is at most
``|m| * 2**-25`` for ``N <= 64``, i.e. below half a float32 ulp of the result,
so the simpler ``N * 2**(e - 31) + ulp(result)`` holds as well; both are
asserted. :func:`test_the_value_rounding_term_is_attained` shows the first term
is reached exactly, so the bound cannot be tightened by a constant factor.

Since issue 19 (finding 8) the count slot has 24 fraction bits, so that it never
wraps whatever total weight the scheduler relays; it is checked against its
nominal ``2**24`` and that nominal value divides, so the count-slot term above is
now zero (the bounds asserted still hold, with room to spare).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_secagg import codec
from lightning_secagg.deadlines import DEFAULT_POLICY
from lightning_secagg.encoding import (
    ENCODE_CHUNK,
    check_values,
    decode_result,
    decode_total,
    encode,
    magnitude_exponents,
    torch_dtype,
)
from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    InvalidTotalError,
    RemoteProtocolError,
)
from lightning_secagg.messages import Assignment, Done, Share, Signup, SignupAck
from lightning_secagg.peer import Peer, make_contribution
from lightning_secagg.protocol.peer_round import PeerRound
from lightning_secagg.protocol.peer_session import PeerSession, State
from lightning_secagg.protocol.scheduler_state import Outgoing, SchedulerState
from lightning_secagg.ring import (
    COMPACT_COUNT_BITS,
    COMPACT_MAX_PEERS,
    MAX_EXPONENT,
    MIN_EXPONENT,
    RingPlan,
    check_compact_count,
    check_relayed_ring,
    compact_ring_allowed,
    relayed_exponents,
)
from lightning_secagg.schema import DEFAULT_FRAC_BITS, Schema
from lightning_secagg.sharing import add_expanded_seed, draw_seeds, mask
from lightning_secagg.tree import AggregationTree, build_tree
from lightning_secagg.wire import PlainWire
from tests.unit.memnet import MemNet, seeded_bytes, weighted_mean
from tests.unit.test_encoding import sample  # one sampler for both suites

pytestmark = pytest.mark.timeout(60)

U32 = np.dtype("<u4")
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def exponents_of(state_dicts) -> list[int]:
    """The exponents the scheduler relays when every peer declares its own."""
    relayed = relayed_exponents([magnitude_exponents(sd) for sd in state_dicts])
    assert relayed is not None
    return relayed


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        np.add(total, v, out=total)  # wraps modulo 2**32 (or 2**64)
    return total


def encode_all(state_dicts, weights, schema: Schema, plan: RingPlan) -> list[np.ndarray]:
    total_w = sum(weights)
    return [
        encode(sd, schema, w / total_w, plan=plan)
        for sd, w in zip(state_dicts, weights, strict=True)
    ]


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at each (float64) value, subnormals included."""
    mag = values.abs().clamp_min(torch.finfo(dtype).tiny)
    _, exp = torch.frexp(mag)  # mag = m * 2**exp with 0.5 <= m < 1
    return torch.ldexp(torch.ones_like(mag), exp - 1 - MANTISSA_BITS[dtype])


def fixed_point_bound(n: int, e: int, mean_abs: torch.Tensor) -> torch.Tensor:
    """Error of the compact ring's float64 mean ``S / C * 2**(30 - f)`` (see the module doc)."""
    unit = 2.0 ** (e - 30)  # one step of the tensor's fixed point
    rounding = (n / 2) * (unit * (1 + 2.0**-22) + mean_abs * 2.0**-30) / (1 - n * 2.0**-31)
    return rounding + 2.0 ** (e - 40)


def plain_mean(total: np.ndarray, plan: RingPlan, start: int, stop: int, f: int) -> np.ndarray:
    """The decoded mean of elements ``[start, stop)`` before any cast or rounding.

    The compact count slot is checked, then its nominal value divides
    (``ring.check_compact_count``): the mean is ``S * 2**-f``.
    """
    signed = total.view(plan.signed_dtype)
    assert check_compact_count(int(signed[0])) is None
    return signed[start:stop].astype(np.float64) * 2.0**-f


# -- magnitude_exponents ----------------------------------------------------------------


@pytest.mark.parametrize("k", [-60, -24, -1, 0, 1, 7, 15, 23, 29])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_exponent_of_an_exact_power_of_two_is_one_more(k, sign):
    x = torch.tensor([0.25 * 2.0**k, sign * 2.0**k, 0.0], dtype=torch.float32)
    assert magnitude_exponents({"w": x}) == [k + 1]
    # Just below 2**k: k (the smallest e with max|x| < 2**e).
    below = torch.nextafter(torch.tensor(2.0**k), torch.tensor(0.0)).item()
    x = torch.tensor([0.0, sign * below], dtype=torch.float32)
    assert magnitude_exponents({"w": x}) == [k]


@pytest.mark.parametrize(
    ("dtype", "value", "expected"),
    [
        (torch.float16, 65504.0, 16),
        (torch.float16, -(2.0**15), 16),
        (torch.float16, 2.0**-24, -23),  # the smallest float16 subnormal
        (torch.bfloat16, -(2.0**29), 30),
        (torch.bfloat16, 1.5 * 2.0**28, 29),
        (torch.float64, 2.0**30 - 2.0**-22, 30),
        (torch.float64, -(2.0**-64), -63),
        (torch.float64, 2.0**-65, -64),  # exactly the minimum, not clamped
    ],
)
def test_exponents_of_float_dtypes(dtype, value, expected):
    x = torch.tensor([0.5, value, -0.5], dtype=dtype)
    assert x[1].item() == value  # exactly representable
    assert magnitude_exponents({"t": x}) == [max(expected, 0)]  # |0.5| < 2**0
    x = torch.tensor([value], dtype=dtype)
    assert magnitude_exponents({"t": x}) == [expected]


@pytest.mark.parametrize(
    ("dtype", "values", "expected"),
    [
        (torch.int64, [0, 1], 1),
        (torch.int64, [-1, 0], 1),
        (torch.int64, [2, -1], 2),
        (torch.int64, [3], 2),
        (torch.int64, [4], 3),
        (torch.int64, [-(2**20)], 21),
        (torch.int64, [2**20 - 1, -(2**20) + 1], 20),
        (torch.int64, [2**29, 5], 30),
        (torch.int8, [-128, 0], 8),
        (torch.int8, [127, -127], 7),
        (torch.uint8, [255, 0], 8),
        (torch.uint8, [128], 8),
        (torch.uint8, [127], 7),
        (torch.int16, [-32768], 16),
        (torch.int16, [32767], 15),
        (torch.int32, [-(2**29) - 1], 30),
    ],
)
def test_exponents_of_integer_dtypes(dtype, values, expected):
    assert magnitude_exponents({"n": torch.tensor(values, dtype=dtype)}) == [expected]


def test_integer_minimums_do_not_wrap():
    # abs(int64 min) wraps in torch; the exponent must see 2**63, not a negative number.
    lowest = torch.tensor([torch.iinfo(torch.int64).min, 3], dtype=torch.int64)
    with pytest.raises(EncodingError, match=r"state_dict\['big'\].*magnitude 9\.22337e\+18"):
        magnitude_exponents({"big": lowest})
    with pytest.raises(EncodingError, match=r"'big'"):
        check_values({"big": lowest})
    # Allowed once the value limit 2**(62 - frac_bits) is above 2**63 (out of the usual range).
    assert magnitude_exponents({"big": lowest}, frac_bits=-2) == [64]
    int32_min = torch.tensor([torch.iinfo(torch.int32).min], dtype=torch.int32)
    with pytest.raises(EncodingError, match=r"'int32_min'.*magnitude 2\.14748e\+09"):
        magnitude_exponents({"int32_min": int32_min})  # 2**31 >= 2**30 with frac_bits=32
    assert magnitude_exponents({"x": int32_min}, frac_bits=16) == [32]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(0),
        torch.zeros(2, 0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.bool),
        torch.zeros(5),
        torch.tensor([-0.0, 0.0]),
        torch.zeros(3, dtype=torch.int16),
        torch.zeros((), dtype=torch.uint8),
        torch.zeros(2, dtype=torch.float16),
    ],
    ids=lambda t: f"{t.dtype}{list(t.shape)}",
)
def test_empty_and_all_zero_tensors_declare_the_minimum(tensor):
    assert magnitude_exponents({"z": tensor}) == [MIN_EXPONENT] == [-64]


@pytest.mark.parametrize(
    "tensor", [torch.tensor([True, False]), torch.zeros(3, dtype=torch.bool), torch.tensor(True)]
)
def test_bool_tensors_declare_one(tensor):
    assert magnitude_exponents({"mask": tensor}) == [1]


def test_exponents_are_clamped_to_the_declared_range():
    # Tiny values: their true exponent is far below -64.
    tiny = [
        torch.tensor([1e-30]),
        torch.tensor([2.0**-149]),  # float32's smallest subnormal
        torch.tensor([2.0**-66], dtype=torch.float64),
        torch.tensor([-1e-300], dtype=torch.float64),
    ]
    for t in tiny:
        assert magnitude_exponents({"t": t}) == [MIN_EXPONENT]
    # The top of the range is out of reach with frac_bits >= 8 (values stay below 2**54);
    # a value limit above 2**64 shows the clamp.
    assert MAX_EXPONENT == 64
    assert magnitude_exponents({"t": torch.tensor([2.0**62], dtype=torch.float64)}, -10) == [63]
    assert magnitude_exponents({"t": torch.tensor([2.0**63], dtype=torch.float64)}, -10) == [64]
    assert magnitude_exponents({"t": torch.tensor([2.0**70], dtype=torch.float64)}, -10) == [64]


def test_one_exponent_per_tensor_in_order_for_any_layout():
    sd = {
        "a": torch.tensor([[1.0, -3.0], [0.5, 2.0]]).t(),  # not contiguous
        "b": torch.nn.Parameter(torch.tensor([100.0, -0.001])),
        "c": torch.tensor(7, dtype=torch.int64),
        "d": torch.zeros(0),
        "e": torch.tensor([False]),
        "f": torch.full((2, 2, 2), -0.75, dtype=torch.float16),
    }
    assert magnitude_exponents(sd) == [2, 7, 3, -64, 1, 0]
    assert check_values(sd) is None


def test_value_limit_depends_on_frac_bits():
    x = {"w": torch.tensor([2.0**30], dtype=torch.float64)}
    with pytest.raises(EncodingError, match=r"'w'.*below 2\*\*30"):
        magnitude_exponents(x)  # frac_bits=32: |x| < 2**30
    assert magnitude_exponents(x, frac_bits=31) == [31]
    below = {"w": torch.tensor([2.0**30 - 2.0**-22], dtype=torch.float64)}
    assert magnitude_exponents(below) == [30]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("position", [0, 5, 199])
def test_non_finite_values_are_refused_naming_the_tensor(dtype, bad, position):
    t = torch.zeros(200, dtype=dtype)
    t[position] = bad
    t[7] = 3.0
    sd = {"fine": torch.ones(3), "layer.7.bias": t, "later": torch.tensor([float("nan")])}
    with pytest.raises(EncodingError, match=r"state_dict\['layer\.7\.bias'\] contains") as info:
        magnitude_exponents(sd)
    assert str(bad) in str(info.value)
    assert "1 non-finite values" in str(info.value)
    with pytest.raises(EncodingError, match=r"layer\.7\.bias"):
        check_values(sd)


# -- compact_ring_allowed ---------------------------------------------------------------


def one_tensor(dtype: torch.dtype, name: str = "t") -> Schema:
    return Schema.of({name: torch.zeros(3, dtype=dtype)})


MIXED = Schema.of(
    {
        "w": torch.zeros(4),
        "h": torch.zeros(2, dtype=torch.float16),
        "b": torch.zeros(2, dtype=torch.bfloat16),
        "mask": torch.zeros(2, dtype=torch.bool),
        "n": torch.zeros((), dtype=torch.int64),
    }
)


def test_allowed_for_floats_bools_and_small_ints():
    assert compact_ring_allowed(MIXED, [14, 14, -64, 1, 3], 3) is None
    assert compact_ring_allowed(MIXED, [14, 14, 14, 1, 3], 64) is None
    # Floats: at most exponent 14, i.e. at least 16 fraction bits (issue 19, finding 7).
    for exponents in ([29, 14, -64, 1, 3], [14, 15, 0, 1, 3], [64, 64, 64, 1, 3]):
        reason = compact_ring_allowed(MIXED, exponents, 3)
        assert reason is not None and "fewer than 16" in reason
    assert compact_ring_allowed(MIXED, [-64, -64, -64, 1, -64], 2) is None


def test_refused_without_exponents():
    reason = compact_ring_allowed(MIXED, None, 3)
    assert reason is not None and "64-bit ring" in reason


@pytest.mark.parametrize("exponents", [[], [1, 2, 3, 1], [1, 2, 3, 1, 3, 0]])
def test_refused_with_the_wrong_number_of_exponents(exponents):
    assert compact_ring_allowed(MIXED, exponents, 3) == f"{len(exponents)} exponents for 5 tensors"


def test_refused_above_64_peers():
    exps = [1, 1, 1, 1, 1]
    assert COMPACT_MAX_PEERS == 64
    assert compact_ring_allowed(MIXED, exps, 64) is None
    for n in (65, 100, 10_000):
        reason = compact_ring_allowed(MIXED, exps, n)
        assert reason is not None and f"{n} peers" in reason and "64" in reason


@pytest.mark.parametrize("e", [-64, 0, 10])
def test_refused_with_a_float64_tensor(e):
    schema = Schema.of({"w": torch.zeros(2), "acc": torch.zeros(2, dtype=torch.float64)})
    reason = compact_ring_allowed(schema, [1, e], 3)
    assert reason is not None and "'acc' is float64" in reason
    assert compact_ring_allowed(one_tensor(torch.float64), [e], 2) is not None


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize(
    ("n", "peer_bits"),
    [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (16, 4), (17, 5), (33, 6), (64, 6)],
)
def test_integer_boundary_is_exponent_plus_peer_bits_plus_guard_at_most_31(dtype, n, peer_bits):
    schema = one_tensor(dtype, "steps")
    largest = 31 - 10 - peer_bits  # e + ceil(log2 N) + 10 <= 31
    assert compact_ring_allowed(schema, [largest], n) is None
    assert compact_ring_allowed(schema, [-64], n) is None
    reason = compact_ring_allowed(schema, [largest + 1], n)
    assert reason is not None and "integer tensor 'steps'" in reason
    assert f"2**{largest + 1}" in reason


def test_bool_tensors_are_not_subject_to_the_integer_rule():
    assert compact_ring_allowed(one_tensor(torch.bool), [1], 64) is None
    assert compact_ring_allowed(one_tensor(torch.bool), [30], 64) is None


def test_the_first_problem_is_reported_for_a_mixed_schema():
    schema = Schema.of(
        {"n": torch.zeros(1, dtype=torch.int32), "acc": torch.zeros(1, dtype=torch.float64)}
    )
    assert "integer tensor 'n'" in compact_ring_allowed(schema, [25, 0], 3)
    assert "'acc' is float64" in compact_ring_allowed(schema, [5, 0], 3)


# -- RingPlan -------------------------------------------------------------------------


def test_ring_plans():
    schema = Schema.of({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int16)}, 40)
    wide = RingPlan.wide(schema)
    assert wide == RingPlan(64, (40, 40), 40)
    assert (wide.dtype, wide.signed_dtype) == (np.dtype("<u8"), np.dtype("<i8"))
    assert wide.vector_nbytes(schema) == 8 * 6
    compact = RingPlan.compact(schema, [3, -64])
    assert compact == RingPlan(32, (27, 94), COMPACT_COUNT_BITS)
    assert COMPACT_COUNT_BITS == 24  # 64 shares of at most 1 each stay below 2**30
    assert (compact.dtype, compact.signed_dtype) == (U32, np.dtype("<i4"))
    assert compact.vector_nbytes(schema) == 4 * 6
    with pytest.raises(EncodingError, match="1 exponents for 2 tensors"):
        RingPlan.compact(schema, [3])
    with pytest.raises(EncodingError, match="does not match the schema"):
        encode({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int16)}, schema, 1.0,
               plan=RingPlan(32, (27,), 30))  # fmt: skip


def test_decode_total_refuses_a_total_of_the_other_ring_or_size():
    schema = Schema.of({"w": torch.zeros(3)})
    compact = RingPlan.compact(schema, [0])
    total = encode({"w": torch.zeros(3)}, schema, 1.0, plan=compact)
    with pytest.raises(InvalidTotalError, match="expected 4 uint32"):
        decode_total(total.astype(np.uint64), schema, compact)
    with pytest.raises(InvalidTotalError, match="expected 4 uint64"):
        decode_total(total, schema)  # the default plan is the 64-bit ring
    with pytest.raises(InvalidTotalError):
        decode_total(total[:3], schema, compact)


@pytest.mark.parametrize("count", [0, 2**31, 2**32 - 1])
def test_a_non_positive_count_slot_is_refused_in_the_compact_ring(count):
    schema = Schema.of({"w": torch.zeros(3)})
    total = np.array([count, 1, 2, 3], dtype=U32)  # 2**31 and up read as negative int32
    with pytest.raises(InvalidTotalError, match="count slot"):
        decode_total(total, schema, RingPlan.compact(schema, [0]))


ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
              torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]  # fmt: skip


@pytest.mark.parametrize("frac_bits", [8, 20, 32, 44])
def test_the_wide_plan_is_the_unchanged_64_bit_encoding(frac_bits):
    sds = [
        {f"t{j}": sample(dt, (2, 3) if j % 2 else (5,), seed=10 * i + j)
         for j, dt in enumerate(ALL_DTYPES)}
        for i in range(3)
    ]  # fmt: skip
    schema = Schema.of(sds[0], frac_bits)
    plan = RingPlan.wide(schema)
    weights = [1.0, 2.5, 7.0]
    for sd, w in zip(sds, weights, strict=True):
        default = encode(sd, schema, w / sum(weights))
        planned = encode(sd, schema, w / sum(weights), plan=plan)
        assert default.dtype == planned.dtype == np.dtype("<u8")
        assert default.tobytes() == planned.tobytes()
    total = ring_sum(encode_all(sds, weights, schema, plan))
    assert decode_total(total, schema).tobytes() == decode_total(total, schema, plan).tobytes()


def test_single_peer_round_trip_in_the_compact_ring_is_exact_where_the_grid_allows():
    gen = torch.Generator().manual_seed(5)
    sd = {
        # float16 values within 2**10 of the maximum sit on the 2**(e-30) grid.
        "h": (torch.rand(20, generator=gen) * 1000 + 24).to(torch.float16),
        "n": torch.randint(-(2**20), 2**20, (7,), generator=gen),
        "u": torch.randint(0, 256, (4,), generator=gen).to(torch.uint8),
        "m": torch.rand(6, generator=gen) > 0.5,
        "w": torch.tensor([1.5, -0.25, 2.0**-20, 0.0]),
    }
    schema = Schema.of(sd)
    exps = magnitude_exponents(sd)
    assert compact_ring_allowed(schema, exps, 1) is None
    plan = RingPlan.compact(schema, exps)
    vector = encode(sd, schema, 1.0, plan=plan)
    assert vector.dtype == U32 and int(vector[0]) == 2**COMPACT_COUNT_BITS
    out = decode_result(decode_total(vector, schema, plan), schema)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype
        assert torch.equal(out[name], t), name


def test_tensors_larger_than_one_chunk_decode_like_the_elementwise_formula():
    """Encode and decode work in chunks of ENCODE_CHUNK elements; the chunk borders must not
    show in the compact ring (every element decoded as ``S / C * 2**(30 - f)``, then cast)."""
    n, size = 3, ENCODE_CHUNK + 4_465
    gen = torch.Generator().manual_seed(11)
    sds = [
        {
            "h": (torch.randn(size, generator=gen) * 50).to(torch.float16),
            "n": torch.randint(-1000, 1000, (size,), generator=gen, dtype=torch.int32),
            "w": torch.randn(size, generator=gen),
            "b": (torch.randn(size, generator=gen) * 1e-3).to(torch.bfloat16),
        }
        for _ in range(n)
    ]
    weights = [1.0, 3.0, 7.5]
    schema = Schema.of(sds[0])
    exps = exponents_of(sds)
    plan = RingPlan.compact(schema, exps)
    total = ring_sum(encode_all(sds, weights, schema, plan))
    out = decode_result(decode_total(total, schema, plan), schema)
    pos = 1
    for spec, f, e in zip(schema.tensors, plan.frac_bits, exps, strict=True):
        mean = torch.from_numpy(plain_mean(total, plan, pos, pos + spec.numel, f))
        if spec.dtype == "int32":
            expected = torch.round(mean).to(torch.int32)
        else:
            expected = mean.to(torch_dtype(spec))
        assert torch.equal(out[spec.name], expected), spec.name
        ref = weighted_mean(sds, weights, spec.name)
        assert bool(((mean - ref).abs() <= fixed_point_bound(n, e, ref.abs())).all())
        pos += spec.numel


# -- the error bound, property-based ----------------------------------------------------

FLOAT_KINDS = [torch.float32, torch.float32, torch.float16, torch.bfloat16]
# Float exponents up to 14: above, the compact ring is refused (MIN_COMPACT_FRAC_BITS).
SCALES = {torch.float32: (-90, 14), torch.bfloat16: (-90, 14), torch.float16: (-20, 14)}
SHAPES = [(), (1,), (4,), (2, 3), (17,), (0,)]
MODES = ["uniform", "spread", "extreme", "sparse", "powers"]


@st.composite
def float_rounds(draw):
    n = draw(st.integers(2, 64))
    weights = draw(
        st.lists(
            st.floats(0.01, 1000.0, allow_nan=False, allow_infinity=False),
            min_size=n,
            max_size=n,
        )
    )
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(FLOAT_KINDS))
        lo, hi = SCALES[dtype]
        specs.append(
            (
                dtype,
                draw(st.sampled_from(SHAPES)),
                draw(st.integers(lo, hi)),
                draw(st.sampled_from(MODES)),
            )
        )
    seed = draw(st.integers(0, 2**32 - 1))
    return n, weights, specs, seed


def build_float_state_dicts(n: int, specs, seed: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    if all(shape == (0,) for _, shape, _, _ in specs):
        specs = [(specs[0][0], (3,), *specs[0][2:]), *specs[1:]]
    per_tensor = {}
    for j, (dtype, shape, k, mode) in enumerate(specs):
        arr = rng.uniform(-1.0, 1.0, (n, *shape)) * 2.0**k
        top = 2.0**k * (1 - 2.0 ** -(MANTISSA_BITS[dtype] + 1))  # largest |x| < 2**k
        if arr.size:
            if mode == "spread":  # peers of very different magnitudes
                arr *= 2.0 ** -rng.integers(0, 24, size=(n,) + (1,) * len(shape)).astype(float)
            elif mode == "extreme":
                flat = arr.reshape(-1)
                flat[rng.integers(flat.size)] = top
                flat[rng.integers(flat.size)] = -top
            elif mode == "sparse":
                arr[rng.random(arr.shape) < 0.7] = 0.0
            elif mode == "powers":  # exponent boundaries: exactly +-2**(k-1)
                arr = np.sign(arr) * 2.0 ** (k - 1)
        per_tensor[f"t{j}"] = torch.from_numpy(arr).to(dtype)
    return [{name: t[i].clone() for name, t in per_tensor.items()} for i in range(n)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_rounds())
def test_compact_ring_error_bound_and_exact_shares(case):
    n, weights, specs, seed = case
    sds = build_float_state_dicts(n, specs, seed)
    schema = Schema.of(sds[0])
    exps = exponents_of(sds)
    # The relayed exponent really bounds every peer's values (checked independently).
    for spec, e in zip(schema.tensors, exps, strict=True):
        peak = max((float(sd[spec.name].double().abs().max()) if spec.numel else 0.0)
                   for sd in sds)  # fmt: skip
        assert peak < 2.0**e
        assert peak >= 2.0 ** (e - 1) or e == MIN_EXPONENT
    assert compact_ring_allowed(schema, exps, n) is None
    plan = RingPlan.compact(schema, exps)
    assert plan.frac_bits == tuple(30 - e for e in exps)
    vectors = encode_all(sds, weights, schema, plan)
    assert all(v.dtype == U32 and v.size == schema.vector_size for v in vectors)

    # The integer sum never leaves int32; the wrapping uint32 sum is that sum.
    exact = np.stack([v.view(np.int32).astype(np.int64) for v in vectors]).sum(axis=0)
    assert abs(int(exact[0]) - 2**COMPACT_COUNT_BITS) <= n // 2 + 1
    assert int(np.abs(exact[1:]).max(initial=0)) <= 2**30 + n // 2
    assert exact.min() >= -(2**31) and exact.max() < 2**31
    total = ring_sum(vectors)
    assert np.array_equal(total.view(np.int32).astype(np.int64), exact)

    # Additive shares in Z_2^32 (a dense share and seeds per peer) reconstruct exactly.
    from_shares = np.zeros(schema.vector_size, dtype=U32)
    for i, v in enumerate(vectors):
        seeds = draw_seeds(1 + i % 3, seeded_bytes(seed + i))
        dense = mask(v.copy(), seeds)
        assert dense.dtype == U32
        np.add(from_shares, dense, out=from_shares)
        for s in seeds:
            add_expanded_seed(s, from_shares)
    assert from_shares.tobytes() == total.tobytes()

    # Decoding is deterministic and leaves the total alone.
    before = total.copy()
    raw = decode_total(total, schema, plan)
    assert np.array_equal(total, before)
    assert decode_total(from_shares, schema, plan).tobytes() == raw.tobytes()
    assert decode_total(before.copy(), schema, plan).tobytes() == raw.tobytes()

    out = decode_result(raw, schema)
    for spec, e in zip(schema.tensors, exps, strict=True):
        dtype = torch_dtype(spec)
        result = out[spec.name]
        assert result.dtype == dtype and tuple(result.shape) == spec.shape
        if spec.numel == 0:
            continue
        ref = weighted_mean(sds, weights, spec.name)
        r = result.double()
        err = (r - ref).abs()
        half_ulp = ulp(r, dtype) / 2
        tight = fixed_point_bound(n, e, ref.abs()) + half_ulp
        simple = n * 2.0 ** (e - 31) * (1 + 2.0**-20) + 2.0 ** (e - 40) + 2 * half_ulp
        worst = int((err - tight).argmax())
        assert bool((err <= tight).all()), (spec, e, float(err.flatten()[worst]), worst)
        assert bool((err <= simple).all()), (spec, e)


def test_the_value_rounding_term_is_attained():
    """64 equal peers, 1.5 units each: every peer rounds up by half a unit (ties to even).

    The error is exactly ``N * 2**(e - 31)``, the bound's first term.
    """
    n, e = 64, 1
    x = 1.5 * 2.0**-23  # with f = 29 and p = 1/64: p * x * 2**f = 1.5 units
    sds = [{"w": torch.tensor([1.5, x])} for _ in range(n)]
    schema = Schema.of(sds[0])
    assert exponents_of(sds) == [e]
    plan = RingPlan.compact(schema, [e])
    total = ring_sum(encode_all(sds, [1.0] * n, schema, plan))
    assert total.tolist() == [2**COMPACT_COUNT_BITS, int(1.5 * 2**23) * n, 2 * n]
    out = decode_result(decode_total(total, schema, plan), schema)
    assert out["w"][0].item() == 1.5
    assert out["w"][1].item() - x == n * 2.0 ** (e - 31)


def test_count_slot_rounding_adds_no_error():
    """Three equal peers: ``C = 2**24 - 1``; the count is only checked, its nominal value
    divides, so the mean is within the value-rounding term (issue 19, finding 8)."""
    n, e = 3, 1
    x = float(np.float32(2.0) - np.float32(2.0**-22))
    sds = [{"w": torch.tensor([x])} for _ in range(n)]
    schema = Schema.of(sds[0])
    plan = RingPlan.compact(schema, exponents_of(sds))
    total = ring_sum(encode_all(sds, [1.0] * n, schema, plan))
    assert int(total[0]) == 2**COMPACT_COUNT_BITS - 1
    mean = plain_mean(total, plan, 1, 2, 29)
    err = abs(float(mean[0]) - x)
    assert err <= n * 2.0 ** (e - 31)
    assert err <= float(fixed_point_bound(n, e, torch.tensor(x)))
    out = decode_result(decode_total(total, schema, plan), schema)
    assert out["w"].item() == x


# -- integer and bool tensors in the compact ring ----------------------------------------

INT_KINDS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]


@st.composite
def int_rounds(draw):
    n = draw(st.integers(2, 64))
    dtype = draw(st.sampled_from(INT_KINDS))
    values = draw(st.sampled_from(["full", "small"]))
    weighting = draw(st.sampled_from(["equal", "ints", "floats"]))
    if weighting == "equal":
        weights = [1.0] * n
    elif weighting == "ints":
        weights = [float(w) for w in draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))]
    else:
        weights = draw(st.lists(st.floats(0.1, 100.0), min_size=n, max_size=n))
    return n, dtype, values, weights, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(int_rounds())
# Two peers at the largest exponent the rule allows (20): there the bound's float64
# slack, 2**(e - 40), is 2**-11 of 2**-9 (found by hypothesis on 2026-11-27).
@example((2, torch.int32, "full", [29.0, 1.0], 2))
def test_integer_and_bool_means_round_correctly_in_the_compact_ring(case):
    n, dtype, values, weights, seed = case
    rng = np.random.default_rng(seed)
    info = torch.iinfo(dtype)
    cap = 31 - 10 - (n - 1).bit_length()  # the largest exponent the rule allows
    if values == "full":
        lo, hi = max(info.min, -(2**cap) + 1), min(info.max, 2**cap - 1)
    else:
        lo, hi = max(info.min, -3), 3 if info.min < 0 else 6
    ints = rng.integers(lo, hi, size=(n, 11), endpoint=True)
    if values == "full":  # the extremes, so the exponent sits at the boundary
        ints[rng.integers(n), 0], ints[rng.integers(n), 1] = lo, hi
    masks = rng.random((n, 9)) < rng.random()
    sds = [
        {
            "n": torch.from_numpy(ints[i]).to(dtype),
            "mask": torch.from_numpy(masks[i]),
            "w": torch.from_numpy(rng.standard_normal(2)).float(),
        }
        for i in range(n)
    ]
    schema = Schema.of(sds[0])
    exps = exponents_of(sds)
    assert exps[0] <= cap and exps[1] == 1
    assert compact_ring_allowed(schema, exps, n) is None
    plan = RingPlan.compact(schema, exps)
    total = ring_sum(encode_all(sds, weights, schema, plan))
    out = decode_result(decode_total(total, schema, plan), schema)

    ref = weighted_mean(sds, weights, "n")
    # The mean before rounding is within about 2**-9: N/2 steps of 2**(e - 30) plus the
    # count slot's relative N/2 * 2**-30 of |mean| < 2**e, with the rule's e (and the
    # bound's own float64 slack on top).
    mean = torch.from_numpy(plain_mean(total, plan, 1, 12, plan.frac_bits[0]))
    bound = fixed_point_bound(n, exps[0], ref.abs())
    assert bool(((mean - ref).abs() <= bound).all())
    assert float(bound.max()) <= 2.0**-9 * (1 + 2.0**-12) + 2.0 ** (exps[0] - 40)

    got = out["n"].double()
    assert out["n"].dtype == dtype
    tie_distance = (ref - ref.floor() - 0.5).abs()
    far = tie_distance > 2.0**-8
    assert torch.equal(got[far], torch.round(ref)[far])  # round half to even, same as torch
    near = ~far
    assert bool(((got[near] == ref[near].floor()) | (got[near] == ref[near].ceil())).all())

    # Bools: True where at least half the weight said True (away from the 0.5 tie).
    share = weighted_mean(sds, weights, "mask")
    clear = (share - 0.5).abs() > 2.0**-8
    assert torch.equal(out["mask"][clear], (share >= 0.5)[clear])


def test_exact_ties_round_half_to_even():
    # Two equal peers: p = 1/2 and every quantity is exact, so the ties are exact too.
    sds = [{"n": torch.tensor([1, 2, -1, -2, 0, 7], dtype=torch.int32)},
           {"n": torch.tensor([2, 3, -2, -3, 1, 8], dtype=torch.int32)}]  # fmt: skip
    schema = Schema.of(sds[0])
    plan = RingPlan.compact(schema, exponents_of(sds))
    total = ring_sum(encode_all(sds, [1.0, 1.0], schema, plan))
    out = decode_result(decode_total(total, schema, plan), schema)
    assert out["n"].tolist() == [2, 2, -2, -2, 0, 8]
    # Bools: a 50/50 vote is True (at least half the weight), also exactly.
    sds = [{"m": torch.tensor([True, False, True, False])},
           {"m": torch.tensor([False, True, True, False])}]  # fmt: skip
    schema = Schema.of(sds[0])
    plan = RingPlan.compact(schema, exponents_of(sds))
    total = ring_sum(encode_all(sds, [1.0, 1.0], schema, plan))
    assert plain_mean(total, plan, 1, 5, plan.frac_bits[0]).tolist() == [0.5, 0.5, 1.0, 0.0]
    out = decode_result(decode_total(total, schema, plan), schema)
    assert out["m"].tolist() == [True, True, True, False]


def test_integers_at_the_largest_allowed_exponent_for_64_peers():
    n = 64
    rng = np.random.default_rng(3)
    sds = [{"n": torch.from_numpy(rng.choice([-(2**15) + 1, 2**15 - 1, 12345], 40))
            .to(torch.int16)} for _ in range(n)]  # fmt: skip
    weights = list(rng.uniform(0.1, 10.0, n))
    schema = Schema.of(sds[0])
    exps = exponents_of(sds)
    assert exps == [15]
    assert compact_ring_allowed(schema, exps, n) is None
    assert compact_ring_allowed(schema, [16], n) is not None
    plan = RingPlan.compact(schema, exps)
    total = ring_sum(encode_all(sds, weights, schema, plan))
    ref = weighted_mean(sds, weights, "n")
    mean = torch.from_numpy(plain_mean(total, plan, 1, 41, plan.frac_bits[0]))
    assert float((mean - ref).abs().max()) <= 2.0**-9
    out = decode_result(decode_total(total, schema, plan), schema)
    far = (ref - ref.floor() - 0.5).abs() > 2.0**-8
    assert torch.equal(out["n"].double()[far], torch.round(ref)[far])


# -- the scheduler's choice ---------------------------------------------------------------

SCHEMA = Schema.of(
    {
        "w": torch.zeros(3),
        "h": torch.zeros(2, dtype=torch.float16),
        "n": torch.zeros((), dtype=torch.int64),
        "m": torch.zeros(2, dtype=torch.bool),
    }
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_state(target: int = 3, g: int = 3, k: int = 2, **kwargs):
    clock = Clock()
    ids = iter(range(1, 1000))
    kwargs.setdefault("round_timeout", 60.0)
    state = SchedulerState(
        target, g, k, clock=clock, rng=random.Random(0),
        new_round_id=lambda: f"round-{next(ids)}", **kwargs,
    )  # fmt: skip
    return state, clock


def conn(i: int) -> bytes:
    return f"conn-{i}".encode()


def signup(i: int, exponents, schema: Schema = SCHEMA, weight: float = 1.0) -> Signup:
    return Signup(
        "s", f"p{i}", f"tcp://127.0.0.1:{6000 + i}", "", weight, schema.frac_bits,
        schema.to_wire(), exponents,
    )  # fmt: skip


def assignments(out: list[Outgoing]) -> list[Assignment]:
    found = [o.message for o in out if isinstance(o.message, Assignment)]
    assert found, [o.message for o in out]
    assert all(a == found[0] for a in found)  # everyone gets the same assignment
    return found


def form(declared, schema: Schema = SCHEMA, **kwargs) -> Assignment:
    state, _ = make_state(target=len(declared), **kwargs)
    out: list[Outgoing] = []
    for i, exps in enumerate(declared):
        out += state.receive(conn(i), signup(i, exps, schema))
    found = assignments(out)
    assert len(found) == len(declared)
    return found[0]


def test_all_members_declare_exponents_so_the_round_is_compact():
    declared = [[3, -2, 5, 1], [7, -64, 2, 1], [-64, 0, 10, 1]]
    a = form(declared)
    assert a.ring_bits == 32
    assert a.exponents == [7, 0, 10, 1]
    # The assignment survives the codec unchanged.
    assert codec.decode([bytes(f) for f in codec.encode(a)]) == a


@pytest.mark.parametrize("silent", [0, 1, 3])
def test_one_member_without_exponents_keeps_the_64_bit_ring(silent):
    declared: list[list[int] | None] = [[1, 1, 1, 1]] * 4
    declared = [None if i == silent else d for i, d in enumerate(declared)]
    a = form(declared)
    assert a.ring_bits == 64
    assert a.exponents is None


def test_a_float64_tensor_keeps_the_64_bit_ring():
    schema = Schema.of({"w": torch.zeros(3), "acc": torch.zeros(2, dtype=torch.float64)})
    a = form([[1, 1], [2, -5], [0, 0]], schema)
    assert (a.ring_bits, a.exponents) == (64, None)


@pytest.mark.parametrize(
    ("n", "int_exponent", "ring"),
    [(3, 19, 32), (3, 20, 64), (4, 19, 32), (4, 20, 64), (5, 18, 32), (5, 19, 64)],
)
def test_the_integer_rule_uses_the_round_size(n, int_exponent, ring):
    declared = [[1, 1, 1 if i else int_exponent, 1] for i in range(n)]
    a = form(declared)
    assert a.ring_bits == ring
    assert a.exponents == ([1, 1, int_exponent, 1] if ring == 32 else None)


@pytest.mark.parametrize(("n", "ring"), [(64, 32), (65, 64)])
def test_more_than_64_peers_keep_the_64_bit_ring(n, ring):
    a = form([[0, 0, 0, 1]] * n)
    assert len(a.members) == n
    assert a.ring_bits == ring


def test_a_smaller_round_formed_after_the_queue_wait_is_judged_by_its_own_size():
    # 4 members allow an integer exponent of 19 (2 peer bits); the target of 6 would not.
    for e, ring in ((19, 32), (20, 64)):
        state, clock = make_state(target=6, min_size=3, queue_wait=5.0)
        for i in range(4):
            out = state.receive(conn(i), signup(i, [0, 0, e, 1]))
            assert not any(isinstance(o.message, Assignment) for o in out)
        clock.now += 5.0
        found = assignments(state.tick())
        assert len(found) == 4 and len(found[0].members) == 4
        assert found[0].ring_bits == ring


@pytest.mark.parametrize("exponents", [[1, 1, 1], [1, 1, 1, 1, 1], [0]])
def test_a_signup_with_the_wrong_number_of_exponents_is_refused(exponents):
    state, _ = make_state(target=3)
    out = state.receive(conn(0), signup(0, [1, 1, 1, 1]))
    assert [type(o.message) for o in out] == [SignupAck]
    out = state.receive(conn(1), signup(1, exponents))
    assert len(out) == 1 and out[0].conn == conn(1)
    rejected = out[0].message
    assert (type(rejected).__name__, rejected.code) == ("SignupRejected", "bad_schema")
    assert f"{len(exponents)} magnitude exponents for 4 tensors" in rejected.reason
    assert state.queued("s") == 1  # p1 was not queued; p0 still waits


def test_signing_up_again_without_exponents_replaces_the_declaration():
    state, _ = make_state(target=3)
    state.receive(conn(0), signup(0, [1, 1, 1, 1]))
    state.receive(conn(0), signup(0, None))
    out = state.receive(conn(1), signup(1, [1, 1, 1, 1]))
    out += state.receive(conn(2), signup(2, [1, 1, 1, 1]))
    assert assignments(out)[0].ring_bits == 64


def test_the_derived_round_budget_counts_4_bytes_per_element_in_the_compact_ring():
    schema = Schema.from_wire([["w", [10_000_000], "float32"]], 32)
    budgets = {}
    for ring, declared in ((32, [[3]] * 3), (64, [[3], [3], None])):
        state, _ = make_state(target=3, round_timeout=None)
        out: list[Outgoing] = []
        for i, exps in enumerate(declared):
            out += state.receive(conn(i), signup(i, exps, schema))
        a = assignments(out)[0]
        assert a.ring_bits == ring
        expected = DEFAULT_POLICY.round_budget(ring // 8 * schema.vector_size, 1, 3)
        assert a.deadline_s == pytest.approx(expected)
        budgets[ring] = a.deadline_s
    assert budgets[32] < budgets[64]


# -- whole rounds in the compact ring -------------------------------------------------------


def compact_state_dicts(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(5, 3, generator=gen) * 4,
            "h": (torch.randn(4, generator=gen) * 100).to(torch.float16),
            "steps": torch.tensor(100 * i + 7, dtype=torch.int64),
            "mask": torch.rand(6, generator=gen) > 0.5,
            "tiny": torch.randn(3, generator=gen) * 1e-25,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize(("n", "g", "k"), [(7, 3, 2), (12, 3, 2), (12, 4, 3), (7, 4, 2)])
@pytest.mark.parametrize("wire", [False, True], ids=["memory", "codec"])
def test_whole_round_in_the_compact_ring(n, g, k, wire):
    sds = compact_state_dicts(n, seed=n + g)
    rng = random.Random(n * g)
    weights = [rng.choice([1.0, 2.0, 3.5, 10.0, 60.0]) for _ in range(n)]
    schema = Schema.of(sds[0])
    exps = exponents_of(sds)
    assert compact_ring_allowed(schema, exps, n) is None
    plan = RingPlan.compact(schema, exps)
    vectors = encode_all(sds, weights, schema, plan)
    truth = ring_sum(vectors)  # before the round consumes the vectors
    expected = decode_total(truth, schema, plan)
    ids = [f"p{i:02d}" for i in range(n)]
    tree = build_tree(ids, g, k, random.Random(n))
    peers = {
        pid: PeerRound(pid, "r1", tree, v, lambda total: decode_total(total, schema, plan),
                       schema.result_nbytes, seeded_bytes(1000 + i))
        for i, (pid, v) in enumerate(zip(ids, vectors, strict=True))
    }  # fmt: skip
    assert all(p.dtype == U32 for p in peers.values())
    net = MemNet(peers, order=random.Random(n), wire=wire)
    net.start()
    dense = [s.message for s in net.pending if isinstance(s.message, Share) and s.message.payload
             is not None]  # fmt: skip
    assert dense, "some participant sends a dense share"
    for share in dense:  # half the bytes of the 64-bit ring
        assert share.payload.dtype == U32
        assert codec.encode(share)[1].nbytes == 4 * schema.vector_size
    net.run()
    raw = {bytes(p.result) for p in peers.values()}
    assert raw == {expected.tobytes()}
    out = decode_result(expected, schema)
    ref = weighted_mean(sds, weights, "w")
    bound = fixed_point_bound(n, exps[0], ref.abs()) + ulp(ref, torch.float32)
    assert bool(((out["w"].double() - ref).abs() <= bound).all())
    assert int(out["steps"]) == round(float(weighted_mean(sds, weights, "steps")))
    tiny_ref = weighted_mean(sds, weights, "tiny")
    assert bool(((out["tiny"].double() - tiny_ref).abs() <= 2.0**-80).all())  # e clamped to -64


def test_a_compact_round_refuses_payloads_of_the_other_ring():
    ids = ["a", "b", "c"]
    tree = build_tree(ids, 3, 2, random.Random(0))
    group = tree.group_of("a", 0)
    actor = group.actors[0]
    sender = next(p for p in ids if p != actor)
    size = 5
    p = PeerRound(actor, "r1", tree, np.zeros(size, dtype=U32), lambda t: t.view(np.uint8),
                  4 * size, seeded_bytes(1))  # fmt: skip
    p.start()

    def share(payload):
        return Share("r1", 0, group.index, sender, None, payload)

    with pytest.raises(RemoteProtocolError, match="dtype uint64"):
        p.receive(share(np.zeros(size, dtype=np.uint64)))
    with pytest.raises(RemoteProtocolError, match="40 bytes, expected 5 elements of 4 bytes"):
        p.receive(share(np.zeros(8 * size, dtype=np.uint8)))
    with pytest.raises(RemoteProtocolError, match="6 elements, expected 5"):
        p.receive(share(np.zeros(size + 1, dtype=U32)))
    p.receive(share(np.zeros(4 * size, dtype=np.uint8)))  # raw bytes off the wire: accepted


def make_peer(pid: str = "me", ring: str = "auto") -> Peer:
    return Peer("tcp://127.0.0.1:0", "tcp://127.0.0.1:5555", insecure=True, peer_id=pid, ring=ring)


def test_through_the_scheduler_with_peers_checking_the_ring():
    """Signup (with exponents) -> Assignment (32 bits) -> each Peer's own check -> round -> Done."""
    n, g, k = 12, 4, 3
    state, _ = make_state(target=n, g=g, k=k)
    sds = compact_state_dicts(n, seed=4)
    weights = [float(1 + i % 5) for i in range(n)]
    schema = Schema.of(sds[0])
    own = [magnitude_exponents(sd) for sd in sds]
    out: list[Outgoing] = []
    for i in range(n):
        s = Signup("s", f"p{i}", f"tcp://127.0.0.1:{7000 + i}", "", weights[i], 32,
                   schema.to_wire(), own[i])  # fmt: skip
        out += state.receive(conn(i), codec.decode([bytes(f) for f in codec.encode(s)]))
    by_conn = {conn(i): f"p{i}" for i in range(n)}
    wired = {
        by_conn[o.conn]: codec.decode([bytes(f) for f in codec.encode(o.message)])
        for o in out
        if isinstance(o.message, Assignment)
    }
    assert len(wired) == n
    a = wired["p0"]
    assert a.ring_bits == 32 and a.exponents == exponents_of(sds)
    peers, vectors = {}, []
    for i in range(n):
        pid = f"p{i}"
        w = wired[pid]
        args = (schema, w.ring_bits, w.exponents, own[i], len(w.members))
        assert check_relayed_ring(*args, compact_wanted=True) is None
        plan = RingPlan.compact(schema, a.exponents)
        tree = AggregationTree.from_wire(a.tree, a.group_size, a.num_actors)
        vector = encode(sds[i], schema, weights[i] / a.total_weight, plan=plan)
        vectors.append(vector.copy())
        peers[pid] = PeerRound(pid, a.round_id, tree, vector,
                               lambda t, plan=plan: decode_total(t, schema, plan),
                               schema.result_nbytes, seeded_bytes(i))  # fmt: skip
    net = MemNet(peers, order=random.Random(1), wire=True)
    net.start()
    net.run()
    expected = decode_total(ring_sum(vectors), schema, RingPlan.compact(schema, a.exponents))
    assert {bytes(p.result) for p in peers.values()} == {expected.tobytes()}
    for i in range(n):
        assert state.receive(conn(i), Done(a.round_id, f"p{i}", 0.1, 10, 10)) == []
    assert state.completed_rounds == 1


# -- check_relayed_ring: the peer checks the scheduler's choice ---------------------------------

PEER_SD = {
    "w": torch.tensor([3.0, -1.0]),
    "n": torch.tensor([5, -9], dtype=torch.int64),
    "m": torch.tensor([True, False]),
}
PEER_SCHEMA = Schema.of(PEER_SD)
PEER_EXPS = magnitude_exponents(PEER_SD)  # [2, 4, 1]


def assignment(ring_bits: int, exponents, n: int = 3, ids=None) -> Assignment:
    ids = ids or ["me", *(f"q{i}" for i in range(n - 1))]
    tree = build_tree(ids, 3, 2, random.Random(0))
    return Assignment(
        "default", "round-9", [[p, f"tcp://127.0.0.1:{7100 + i}", ""] for i, p in enumerate(ids)],
        tree.to_wire(), 3, 2, float(n), 30.0, ring_bits, exponents,
    )  # fmt: skip


def test_peer_ring_option():
    assert make_peer().ring == "auto"
    assert make_peer(ring="64").ring == "64"
    with pytest.raises(ConfigurationError, match="ring must be 'auto' or '64'"):
        make_peer(ring="32")


def session_for(ring: str = "auto") -> PeerSession:
    """A queued :class:`PeerSession` of "me" with PEER_SD, as ``Peer`` would drive it."""
    session = PeerSession(
        "me", "default", "tcp://127.0.0.1:7100", "", PlainWire(),
        random_bytes=seeded_bytes(0), frac_bits=DEFAULT_FRAC_BITS,
    )  # fmt: skip
    session.begin(make_contribution(PEER_SD, 1.0, ring=ring), 0.0, timeout=60.0)
    session.receive_scheduler(SignupAck("default", "me", 1), 0.0)
    return session


REFUSALS = [
    ("64", [2, 4, 1], 3, PEER_SCHEMA, "this peer asked for the 64-bit ring"),
    ("auto", None, 3, PEER_SCHEMA, "the exponents do not match the model"),
    ("auto", [2, 4], 3, PEER_SCHEMA, "the exponents do not match the model"),
    ("auto", [2, 4, 1, 0], 3, PEER_SCHEMA, "the exponents do not match the model"),
    ("auto", [1, 4, 1], 3, PEER_SCHEMA, "below this peer's own magnitudes"),
    ("auto", [2, 3, 1], 3, PEER_SCHEMA, "below this peer's own magnitudes"),
    ("auto", [2, 4, -64], 3, PEER_SCHEMA, "below this peer's own magnitudes"),
    ("auto", [2, 4, 1], 65, PEER_SCHEMA, "65 peers"),
    ("auto", [2, 20, 1], 3, PEER_SCHEMA, "integer tensor 'n'"),  # 20 + 2 + 10 > 31
    ("auto", [2, 16, 1], 64, PEER_SCHEMA, "integer tensor 'n'"),  # 16 + 6 + 10 > 31
    (
        "auto",
        [2, 4, 1],
        3,
        Schema.of({**PEER_SD, "w": PEER_SD["w"].double()}),
        "'w' is float64",
    ),
]


@pytest.mark.parametrize(("ring", "relayed", "n", "schema", "problem"), REFUSALS)
def test_check_relayed_ring_names_the_problem(ring, relayed, n, schema, problem):
    """The rule the peer's check applies, in its one home (the same table as the peer's)."""
    found = check_relayed_ring(schema, 32, relayed, PEER_EXPS, n, compact_wanted=ring == "auto")
    assert found is not None and problem in found


@pytest.mark.parametrize("ring", ["auto", "64"])
def test_check_relayed_ring_accepts_the_64_bit_ring_always(ring):
    wanted = ring == "auto"
    for relayed in (None, [2, 4, 1], [0, 0, 0]):
        found = check_relayed_ring(PEER_SCHEMA, 64, relayed, PEER_EXPS, 3, compact_wanted=wanted)
        assert found is None
    assert check_relayed_ring(PEER_SCHEMA, 16, None, PEER_EXPS, 3, compact_wanted=True) is not None


@pytest.mark.parametrize("relayed", [[2, 4, 1], [10, 4, 1], [2, 7, 1], [14, 18, 1]])
def test_check_relayed_ring_accepts_a_safe_compact_ring(relayed):
    assert check_relayed_ring(PEER_SCHEMA, 32, relayed, PEER_EXPS, 3, compact_wanted=True) is None


def test_a_refused_ring_means_the_assignment_is_not_joined():
    # Four peers: "me" is no actor of the (root) group, so it splits and sends.
    four = assignment(32, [2, 4, 1], n=4)
    assert "me" not in four.tree[0][0][1]
    session = session_for()
    sent = session.receive_scheduler(four, 1.0)
    assert session.state is State.IN_ROUND
    rnd = session.round
    assert rnd is not None and rnd.state.dtype == U32
    assert 1 + sum(seg.size - 1 for seg in rnd.state.segments) == PEER_SCHEMA.vector_size
    assert [t.what for t in sent] == ["share", "share"]  # its level-0 shares went out
    wide = session_for()
    wide.receive_scheduler(assignment(64, None), 1.0)
    assert wide.round is not None and wide.round.state.dtype == np.dtype("<u8")
    for ring, low in (("auto", assignment(32, [2, 3, 1])), ("64", assignment(32, [2, 4, 1]))):
        refused = session_for(ring)
        with pytest.raises(RemoteProtocolError, match="the 32-bit ring is not safe"):
            refused.receive_scheduler(low, 1.0)
        assert refused.state is State.QUEUED and refused.round is None  # nothing sent, unchanged
