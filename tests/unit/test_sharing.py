"""Additive shares mod 2**64, seed expansion, the injected randomness."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_secagg import sharing
from lightning_secagg.sharing import (
    CHUNK_BYTES,
    SEED_BYTES,
    RandomBytes,
    add_expanded_seed,
    draw_seeds,
    mask,
    subtract_expanded_seed,
    system_random_bytes,
)

pytestmark = pytest.mark.timeout(60)

EXTREMES = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**32, 2**64 - 2], dtype=np.uint64)


class CountingBytes:
    """A reproducible byte source that counts how it is used."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self.calls: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        return self._rng.randbytes(n)


def expand_seed(
    seed: bytes, size: int, dtype: np.dtype | type = np.uint64, stream: int = 0
) -> np.ndarray:
    """The vector ``seed`` names in ``stream``: its keystream added to zeros."""
    out = np.zeros(size, dtype=dtype)
    add_expanded_seed(seed, out, stream)
    return out


@dataclass(frozen=True)
class Shares:
    dense: np.ndarray
    seeds: tuple[bytes, ...]


def split(vector: np.ndarray, num_shares: int, random_bytes: RandomBytes) -> Shares:
    """``num_shares`` additive shares of ``vector``, as a participant makes them."""
    seeds = draw_seeds(num_shares - 1, random_bytes)
    return Shares(mask(vector, seeds), seeds)


def reassemble(shares: Shares, size: int) -> np.ndarray:
    total = shares.dense.copy()
    for seed in shares.seeds:
        add_expanded_seed(seed, total)
    assert total.size == size
    return total


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 6),
    vector=hnp.arrays(np.uint64, st.integers(1, 40), elements=st.integers(0, 2**64 - 1)),
    seed=st.integers(0, 2**32),
)
def test_shares_sum_back_exactly(k, vector, seed):
    original = vector.copy()
    source = CountingBytes(seed)
    shares = split(vector, k, source)
    assert len(shares.seeds) == k - 1
    assert all(len(s) == SEED_BYTES for s in shares.seeds)
    assert source.calls == [SEED_BYTES] * (k - 1)
    assert np.array_equal(reassemble(shares, original.size), original)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_extremes_wrap_modulo_2_64(k):
    vector = EXTREMES.copy()
    shares = split(vector, k, CountingBytes(k))
    assert shares.dense is vector  # computed in place: no copy of the model
    assert np.array_equal(reassemble(shares, EXTREMES.size), EXTREMES)
    # Python-int check of the modular identity, independent of numpy's wrap-around.
    expanded = [expand_seed(s, EXTREMES.size) for s in shares.seeds]
    for i, want in enumerate(EXTREMES.tolist()):
        got = (int(shares.dense[i]) + sum(int(e[i]) for e in expanded)) % 2**64
        assert got == want


def test_shares_look_random_and_the_dense_share_hides_the_input():
    zeros = np.zeros(4096, dtype=np.uint64)
    shares = split(zeros, 2, os.urandom)
    # A share of an all-zero vector is (minus) a uniform keystream: about half the bits set.
    bits = np.unpackbits(shares.dense.view(np.uint8))
    assert 0.48 < bits.mean() < 0.52
    assert len(np.unique(shares.dense)) > 4000


def test_same_seed_expands_identically_and_different_seeds_differ():
    seed = bytes(range(32))
    a = expand_seed(seed, 1000)
    b = expand_seed(seed, 1000)
    assert a.dtype == np.uint64
    assert np.array_equal(a, b)
    c = expand_seed(bytes(range(1, 33)), 1000)
    assert not np.array_equal(a, c)
    assert np.count_nonzero(a == c) < 5
    # A prefix of a longer stream is the shorter stream.
    assert np.array_equal(expand_seed(seed, 10), a[:10])


def _ctr_stream(seed: bytes, chunk_index: int, nbytes: int) -> bytes:
    """AES-256-CTR keystream with GCM's first data counter block: nonce ``i`` || 2."""
    return _ctr_stream_of(seed, 0, chunk_index, nbytes)


def _ctr_stream_of(seed: bytes, stream: int, chunk_index: int, nbytes: int) -> bytes:
    """Chunk ``i`` of stream ``s``: nonce ``i`` (8 bytes) || ``s`` (4 bytes), little-endian."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    nonce = chunk_index.to_bytes(8, "little") + stream.to_bytes(4, "little")
    counter = nonce + (2).to_bytes(4, "big")
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor().update(bytes(nbytes))


def test_expansion_is_aes_ctr_little_endian_words():
    # Pinned against plain AES-256-CTR (not the GCM call the code makes), so the
    # stream is the counter-mode keystream the module's docstring promises.
    seed = bytes(range(100, 132))
    stream = _ctr_stream(seed, 0, 8 * 5)
    assert expand_seed(seed, 5).tolist() == [
        int.from_bytes(stream[i : i + 8], "little") for i in range(0, 40, 8)
    ]


def test_each_chunk_of_the_stream_has_its_own_nonce():
    seed = bytes(range(7, 39))
    words = CHUNK_BYTES // 4
    long = expand_seed(seed, 2 * words + 2, np.uint32)
    for index in range(3):
        got = long[index * words : (index + 1) * words].tobytes()
        assert got == _ctr_stream(seed, index, len(got))
    assert not np.array_equal(long[:2], long[words : words + 2])


@pytest.mark.parametrize("stream", [1, 4, 255, 2**32 - 1])
def test_each_stream_of_a_seed_has_its_own_nonces(stream):
    # A round's segments share a seed: segment s is stream s, chunk i under the
    # nonce i || s, so no segment repeats another's keystream.
    seed = bytes(range(9, 41))
    words = CHUNK_BYTES // 4
    got = expand_seed(seed, words + 3, np.uint32, stream)
    assert got[:words].tobytes() == _ctr_stream_of(seed, stream, 0, CHUNK_BYTES)
    assert got[words:].tobytes() == _ctr_stream_of(seed, stream, 1, 12)
    assert not np.array_equal(got[:8], expand_seed(seed, 8, np.uint32, 0))
    v = np.arange(10, dtype=np.uint64)
    subtract_expanded_seed(seed, v, stream)
    add_expanded_seed(seed, v, stream)
    assert v.tolist() == list(range(10))


@pytest.mark.parametrize("stream", [-1, 2**32])
def test_stream_out_of_range_refused(stream):
    with pytest.raises(ValueError, match="stream must be in"):
        expand_seed(bytes(32), 4, np.uint32, stream)


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32])
def test_expansion_across_chunk_boundaries(dtype):
    seed = bytes(32)
    chunk = CHUNK_BYTES // np.dtype(dtype).itemsize
    size = chunk + 3
    long = expand_seed(seed, size, dtype)
    assert long.size == size and long.dtype == dtype
    assert np.array_equal(long[:chunk], expand_seed(seed, chunk, dtype))
    acc = np.zeros(size, dtype=dtype)
    add_expanded_seed(seed, acc)
    subtract_expanded_seed(seed, acc)
    assert not acc.any()


def test_one_seed_names_the_same_bytes_in_both_rings():
    """A 32-bit expansion is the same keystream read as narrower little-endian words."""
    seed = bytes(range(32))
    wide = expand_seed(seed, 10)
    narrow = expand_seed(seed, 20, np.uint32)
    assert wide.tobytes() == narrow.tobytes()


def test_split_in_the_compact_ring_wraps_modulo_2_32():
    vector = np.array([0, 1, 2**32 - 1, 2**31], dtype=np.uint32)
    original = vector.copy()
    shares = split(vector, 3, os.urandom)
    assert shares.dense.dtype == np.uint32
    total = shares.dense.copy()
    for seed in shares.seeds:
        add_expanded_seed(seed, total)
    assert np.array_equal(total, original)


def test_refuses_a_non_ring_dtype():
    with pytest.raises(ValueError, match="uint32 or uint64"):
        add_expanded_seed(bytes(32), np.zeros(4, dtype=np.int64))


def test_add_and_subtract_are_inverse_and_wrap():
    seed = b"\xff" * 32
    acc = EXTREMES.copy()
    add_expanded_seed(seed, acc)
    assert not np.array_equal(acc, EXTREMES)
    subtract_expanded_seed(seed, acc)
    assert np.array_equal(acc, EXTREMES)


def test_expand_size_zero():
    assert expand_seed(bytes(32), 0).size == 0


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_seed_length_checked(length):
    bad = bytes(length)
    with pytest.raises(ValueError, match=f"32 bytes, got {length}"):
        expand_seed(bad, 4)
    acc = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="32 bytes"):
        add_expanded_seed(bad, acc)
    with pytest.raises(ValueError, match="32 bytes"):
        subtract_expanded_seed(bad, acc)
    assert not acc.any()


@pytest.mark.parametrize("k", [1, 0, -1])
def test_split_needs_two_shares(k):
    source = CountingBytes(0)
    vector = np.arange(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="needs at least one seed"):
        split(vector, k, source)
    assert source.calls == []
    assert vector.tolist() == [0, 1, 2, 3]


def test_split_depends_only_on_random_bytes():
    """numpy's, torch's and ``random``'s generators play no part in the shares."""
    outputs = []
    for other_seed in (1, 2, 3):
        np.random.seed(other_seed)
        torch.manual_seed(other_seed)
        random.seed(other_seed)
        source = CountingBytes(42)
        shares = split(np.arange(64, dtype=np.uint64), 3, source)
        outputs.append((shares.dense.tobytes(), shares.seeds, tuple(source.calls)))
    assert outputs[0] == outputs[1] == outputs[2]
    # ... and a different byte source gives different shares.
    other = split(np.arange(64, dtype=np.uint64), 3, CountingBytes(43))
    assert other.dense.tobytes() != outputs[0][0]
    assert other.seeds != outputs[0][1]


def test_split_does_not_touch_global_generators():
    np.random.seed(7)
    torch.manual_seed(7)
    random.seed(7)
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()
    py_state = random.getstate()
    split(np.arange(8, dtype=np.uint64), 4, system_random_bytes)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_system_random_bytes_is_the_os_csprng(monkeypatch):
    calls = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return b"\x01" * n

    monkeypatch.setattr(sharing.os, "urandom", fake_urandom)
    assert system_random_bytes(32) == b"\x01" * 32
    assert calls == [32]
