"""Joint tree randomness: commitments, reveals, the seed and the seeded rebuild."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg.errors import ConfigurationError
from lightning_secagg.tree import (
    NONCE_BYTES,
    SeededShuffle,
    build_seeded_tree,
    check_tree,
    commit_nonce,
    new_tree_nonce,
    reveal_matches,
    tree_seed,
)

pytestmark = pytest.mark.timeout(60)

nonces = st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)


@given(nonces, nonces)
def test_a_reveal_matches_only_its_own_commitment(a, b):
    assert reveal_matches(commit_nonce(a), a)
    assert reveal_matches(commit_nonce(a), b) == (a == b)


def test_a_wrong_or_short_reveal_is_detected():
    nonce = new_tree_nonce()
    assert len(nonce) == NONCE_BYTES
    commitment = commit_nonce(nonce)
    flipped = bytes([nonce[0] ^ 1]) + nonce[1:]
    assert not reveal_matches(commitment, flipped)
    assert not reveal_matches(commitment, nonce[:-1])
    assert not reveal_matches(commitment, nonce + b"\0")


@settings(max_examples=50, deadline=None)
@given(st.integers(6, 40), st.data())
def test_every_member_rebuilds_the_same_valid_tree(n, data):
    ids = [f"p{i}" for i in range(n)]
    reveals = {pid: data.draw(nonces) for pid in ids}
    seed = tree_seed(ids, reveals)
    a = build_seeded_tree(ids, 3, 2, seed)
    b = build_seeded_tree(list(ids), 3, 2, tree_seed(ids, dict(reversed(reveals.items()))))
    check_tree(a)
    assert a == b
    assert sorted(a.members) == sorted(ids)


def test_one_changed_reveal_changes_the_seed_and_the_tree():
    ids = [f"p{i}" for i in range(30)]
    reveals = {pid: bytes([i]) * NONCE_BYTES for i, pid in enumerate(ids)}
    seed = tree_seed(ids, reveals)
    other = dict(reveals, p7=b"\xff" * NONCE_BYTES)
    assert tree_seed(ids, other) != seed
    assert build_seeded_tree(ids, 3, 2, seed) != build_seeded_tree(ids, 3, 2, tree_seed(ids, other))


def test_the_seed_needs_every_members_reveal():
    ids = ["a", "b", "c"]
    with pytest.raises(ConfigurationError, match="'c'"):
        tree_seed(ids, {"a": b"1" * NONCE_BYTES, "b": b"2" * NONCE_BYTES})
    with pytest.raises(ConfigurationError):
        tree_seed(ids, {"a": b"1" * NONCE_BYTES, "b": b"2" * NONCE_BYTES, "c": b"3"})


def test_seeded_draws_are_uniform_enough():
    rng = SeededShuffle(b"seed")
    counts = collections.Counter(rng.below(6) for _ in range(6000))
    assert set(counts) == set(range(6))
    assert all(850 < c < 1150 for c in counts.values()), counts
    first = collections.Counter()
    for i in range(600):
        items = ["a", "b", "c"]
        SeededShuffle(i.to_bytes(4, "big")).shuffle(items)
        first[items[0]] += 1
    assert all(150 < c < 250 for c in first.values()), first


@given(st.binary(max_size=16), st.lists(st.text(max_size=3), unique=True, max_size=12), st.data())
def test_sample_draws_distinct_members(seed, pop, data):
    k = data.draw(st.integers(0, len(pop)))
    got = SeededShuffle(seed).sample(pop, k)
    assert len(got) == k and len(set(got)) == k and set(got) <= set(pop)
    assert got == SeededShuffle(seed).sample(pop, k)
