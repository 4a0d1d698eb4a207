"""Finding 5 of issue 19: msgpack's limits are per container, so a header of empty
containers decoded to ~72 times its size. The codec now bounds the TOTAL a header
decodes to (a pre-scan that builds nothing) before unpacking it."""

from __future__ import annotations

import time
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg.codec import (
    MAX_DECODED_BYTES,
    MAX_HEADER_BYTES,
    decode_header,
    decoded_budget,
    decoded_cost,
)
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(120)


def padded(n: int) -> bytes:
    """A header whose one extra field is a list of ``n`` empty lists."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": "leave", "pad": [[]] * n})


def accepted(frame: bytes) -> bool:
    try:
        decode_header(frame)
    except RemoteProtocolError as exc:
        assert "would decode to more than" in str(exc)
        return False
    return True


def test_the_boundary_is_exact():
    """The largest accepted header of empty lists, and the one past it."""
    lo, hi = 0, 1 << 16  # accepted(lo), refused(hi)
    assert accepted(padded(lo)) and not accepted(padded(hi))
    for _ in range(20):
        mid = (lo + hi) // 2
        if hi - lo <= 1:
            break
        lo, hi = (mid, hi) if accepted(padded(mid)) else (lo, mid)
    assert hi == lo + 1
    at, past = padded(lo), padded(hi)
    assert 0 <= decoded_cost(at, decoded_budget(len(at))) <= decoded_budget(len(at))
    assert decoded_cost(past, decoded_budget(len(past))) == -1
    # The estimate is an upper bound of what unpacking really builds.
    tracemalloc.start()
    try:
        msgpack.unpackb(at)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= decoded_budget(len(at))


def test_a_max_size_hostile_header_costs_nothing_and_is_refused_quickly():
    """16 MiB of empty lists (the scheduler's limit): refused by the pre-scan, with no
    allocation to speak of, where unpacking it would have built about 1.1 GiB."""
    inner = b"\x90" * 65535
    frame = b"\xdd" + (255).to_bytes(4, "big")
    frame += (b"\xdc\xff\xff" + inner) * 255
    frame = frame[: MAX_HEADER_BYTES - 16]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(RemoteProtocolError, match="would decode to more than"):
            decode_header(frame)
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert took < 30  # bounded by the budget: the scan stops once it is spent


@pytest.mark.parametrize(
    "item",
    [b"\x90", b"\x80", b"\xa2ab", b"\xcd\x10\x00", b"\xca\x00\x00\x00\x01", b"\xc4\x02ab"],
)
def test_no_kind_of_small_object_decodes_past_the_budget(item):
    """Whatever the filler (empty lists or maps, short strings, ints, floats, bytes),
    what is accepted decodes within the budget; more of it is refused."""
    for count in (1000, 20_000, 60_000):
        frame = b"\xdc" + count.to_bytes(2, "big") + item * count
        budget = decoded_budget(len(frame))
        if decoded_cost(frame, budget) < 0:
            with pytest.raises(RemoteProtocolError):
                decode_header(frame)
            continue
        tracemalloc.start()
        try:
            msgpack.unpackb(frame, max_bin_len=64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= budget, (item, count, peak, budget)


def containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=4), inner, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.text(max_size=20) | st.binary(max_size=20),
        containers,
        max_leaves=60,
    )
)  # fmt: skip
def test_the_estimate_bounds_what_unpacking_builds(value):
    frame = msgpack.packb(value, use_bin_type=True)
    estimate = decoded_cost(frame, 1 << 40)
    tracemalloc.start()
    try:
        msgpack.unpackb(frame, raw=False, strict_map_key=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= estimate + 4096  # slack: the interpreter's own small allocations


def test_the_total_is_capped():
    assert decoded_budget(MAX_HEADER_BYTES) == MAX_DECODED_BYTES
