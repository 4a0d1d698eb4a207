"""The ring rule's one home (:mod:`lightning_secagg.ring`): the choice and the members' check.

Also the pure-Python Z85 key check that lets ``protocol/`` do without ZeroMQ.

The detailed cases of :func:`compact_ring_allowed` and of the peer's check are
in ``test_compact_ring.py``; here: properties that tie the scheduler's choice,
the planner's and every member's check together.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import zmq.utils.z85
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg import sharing
from lightning_secagg.messages import Z85_ALPHABET, Assignment, Signup, is_z85_key
from lightning_secagg.protocol.scheduler_state import SchedulerState
from lightning_secagg.ring import (
    MAX_EXPONENT,
    MIN_EXPONENT,
    RING_DTYPES,
    RingChoice,
    RingPlan,
    check_relayed_ring,
    choose_ring,
    compact_ring_allowed,
    relayed_exponents,
)
from lightning_secagg.schema import DTYPE_ITEMSIZE, Schema, TensorSpec
from lightning_secagg.security import KeyPair
from lightning_secagg.security import is_z85_key as security_is_z85_key

pytestmark = pytest.mark.timeout(60)

exponent = st.integers(MIN_EXPONENT, MAX_EXPONENT)


@st.composite
def schemas_and_declarations(draw):  # type: ignore[no-untyped-def]
    dtypes = draw(st.lists(st.sampled_from(sorted(DTYPE_ITEMSIZE)), min_size=1, max_size=4))
    schema = Schema(tuple(TensorSpec(f"t{i}", (2,), d) for i, d in enumerate(dtypes)))
    n = draw(st.integers(1, 70))
    row = st.lists(exponent, min_size=len(dtypes), max_size=len(dtypes))
    declared = draw(st.lists(st.one_of(st.none(), row), min_size=n, max_size=n))
    return schema, declared


def test_ring_dtypes_are_the_sharing_rings():
    assert sorted(RING_DTYPES.values(), key=lambda d: d.itemsize) == list(sharing.RING_DTYPES)
    assert all(8 * d.itemsize == bits for bits, d in RING_DTYPES.items())


def test_relayed_exponents():
    assert relayed_exponents([[1, -3], [0, 5], [-64, 2]]) == [1, 5]
    assert relayed_exponents([[1, -3], None]) is None
    assert relayed_exponents([]) is None


@settings(max_examples=300, deadline=None)
@given(schemas_and_declarations())
def test_the_choice_and_every_members_check_agree(case):
    schema, declared = case
    choice = choose_ring(schema, declared)
    assert choice.ring_bits in (32, 64)
    assert (choice.ring_bits == 32) == (choice.reason is None)
    relayed = relayed_exponents(declared)
    assert choice.reason == compact_ring_allowed(schema, relayed, len(declared))
    if choice.ring_bits == 32:
        assert relayed is not None and choice.exponents == tuple(relayed)
        assert all(d is not None for d in declared)
        # Every honest member, which declared its own exponents, accepts the choice ...
        for own in declared:
            assert own is not None
            problem = check_relayed_ring(
                schema, 32, choice.exponents, own, len(declared), compact_wanted=True
            )
            assert problem is None
        # ... and encodes with the same plan.
        assert RingPlan.compact(schema, choice.exponents).ring_bits == 32
    else:
        assert choice.exponents is None
        for own in declared:
            mine = own if own is not None else [0] * len(schema.tensors)
            assert (
                check_relayed_ring(schema, 64, None, mine, len(declared), compact_wanted=True)
                is None
            )


@settings(max_examples=200, deadline=None)
@given(schemas_and_declarations(), st.integers(0, 3), st.integers(1, 40))
def test_a_member_refuses_exponents_below_its_own(case, which, by):
    schema, _ = case
    own = [0] * len(schema.tensors)
    relayed = list(own)
    relayed[which % len(own)] -= by
    problem = check_relayed_ring(schema, 32, relayed, own, 3, compact_wanted=True)
    assert problem is not None and "below this peer's own" in problem


def test_the_scheduler_relays_what_choose_ring_chooses():
    schema = Schema((TensorSpec("w", (3,), "float32"), TensorSpec("n", (), "int64")))

    for declared in ([[1, 2], [3, 0], [-5, 4]], [[1, 2], None, [0, 0]], [[1, 30], [0, 0], [0, 0]]):
        state = SchedulerState(3, 3, 2, clock=lambda: 0.0, rng=random.Random(1))
        out = []
        for i, exps in enumerate(declared):
            signup = Signup(
                "s", f"p{i}", f"tcp://127.0.0.1:{7000 + i}", "", 1.0, schema.frac_bits,
                schema.to_wire(), exps,
            )  # fmt: skip
            out += state.receive(f"c{i}".encode(), signup)
        (assignment, *_) = [o.message for o in out if isinstance(o.message, Assignment)]
        choice = choose_ring(schema, declared)
        assert isinstance(choice, RingChoice)
        assert assignment.ring_bits == choice.ring_bits
        assert assignment.exponents == (list(choice.exponents) if choice.exponents else None)


# -- Z85 keys without ZeroMQ --------------------------------------------------------------


def zmq_says_key(text: str) -> bool:
    try:
        return len(zmq.utils.z85.decode(text.encode())) == 32
    except Exception:  # ValueError, KeyError, struct.error: whatever ZeroMQ's decoder raises
        return False


def test_real_keys_are_z85_keys():
    for _ in range(20):
        keys = KeyPair.generate()
        assert is_z85_key(keys.public) and is_z85_key(keys.secret)
        assert security_is_z85_key(keys.public)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=Z85_ALPHABET, min_size=40, max_size=40),
        st.text(alphabet=Z85_ALPHABET + " \n\"'`~,;_|\\é", min_size=38, max_size=41),
        st.binary(min_size=32, max_size=32).map(lambda b: zmq.utils.z85.encode(b).decode()),
    )
)
def test_the_pure_python_check_agrees_with_zeromq(text):
    assert is_z85_key(text) == zmq_says_key(text) == security_is_z85_key(text)


def test_groups_above_32_bits_are_refused():
    top = "%nSc0"  # 0xFFFFFFFF, the largest value a group may encode
    assert zmq_says_key(top * 8) and is_z85_key(top * 8)
    over = "%nSc1"
    assert not zmq_says_key(over * 8) and not is_z85_key(over * 8)
    assert not is_z85_key("#" * 40)
    for bad in (None, 5, b"0" * 40, "0" * 39, "0" * 41):
        assert not is_z85_key(bad)
    assert np.uint32(0xFFFFFFFF) == int.from_bytes(zmq.utils.z85.decode(top.encode()), "big")
