"""Additive secret shares in Z_2^64 or Z_2^32, with seed-compressed random shares.

A vector ``x`` is split into ``k`` shares that add up to ``x`` modulo 2**64
(or 2**32: the ring is the vector's unsigned dtype):
``k - 1`` of them are pure randomness, the last one is ``x`` minus their sum.
Any ``k - 1`` shares together are uniformly random and say nothing about
``x``. The random shares need not travel as vectors: each is an AES-256
keystream under a fresh 32-byte key drawn from ``os.urandom``, so it travels
as that 32-byte seed and the receiver expands it. This cuts a participant's
upload from ``k`` vectors to one (and to zero when it is itself an actor of
its group and keeps the dense share).

One seed names many independent vectors, one per *stream* index: a round cut
into segments masks segment ``s`` with stream ``s`` of the same seed, so the
seed travels once per round and level, not once per segment. Stream ``s``,
chunk ``i`` is encrypted under the nonce ``i || s`` (8 + 4 bytes, little-endian),
so no (key, nonce) pair is ever used twice.

Randomness is injected (``random_bytes``) so the protocol core is testable;
production always uses :func:`os.urandom`. Numpy's, torch's and ``random``'s
generators are never used for shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEED_BYTES = 32
_TAG_BYTES = 16

RandomBytes = Callable[[int], bytes]


def system_random_bytes(n: int) -> bytes:
    """The production randomness source: the operating system's CSPRNG."""
    return os.urandom(n)


#: Keystream is produced in chunks of this many bytes, so expanding a seed for a
#: model of any size needs 1 MiB of scratch, not a second copy of the model.
CHUNK_BYTES = 1 << 20
#: The rings' element types (little-endian, as on the wire): Z_2^32 and Z_2^64.
RING_DTYPES = (np.dtype("<u4"), np.dtype("<u8"))


#: Streams one seed names (the nonce's last four bytes).
MAX_STREAMS = 1 << 32

_ZEROS = bytes(CHUNK_BYTES)


def _zeros(n: int) -> memoryview:
    """``n`` read-only zero bytes (``n <= CHUNK_BYTES``), shared, never reallocated."""
    return memoryview(_ZEROS)[:n]


def _keystream(
    seed: bytes, size: int, dtype: np.dtype, stream: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(offset, words)`` chunks of stream ``stream`` of ``seed``; ``words`` is reused.

    The stream is a byte string; ring elements are its consecutive little-endian
    words of ``dtype``'s width, so one seed names one vector per ring.

    Chunk ``i`` of the stream is AES-256-GCM's encryption of zeros under the key
    ``seed`` and the nonce ``i || stream``: that ciphertext *is* the AES-256 counter-mode
    keystream (GCM encrypts in counter mode; its tag is discarded). GCM rather
    than plain CTR because OpenSSL's stitched GCM code is the faster path to the
    same keystream (measured in ``docs/benchmarks.md``, "Link encryption"). Each key names one
    stream and each nonce one chunk of it, so no (key, nonce) pair repeats.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a share seed has {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= stream < MAX_STREAMS:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    if dtype not in RING_DTYPES:
        raise ValueError(f"shares live in uint32 or uint64 rings, not {dtype}")
    chunk_words = CHUNK_BYTES // dtype.itemsize
    aead = AESGCM(seed)
    words_per_chunk = min(size, chunk_words)
    # The ciphertext of a chunk, then its (discarded) tag: one reused buffer.
    raw = np.empty(words_per_chunk * dtype.itemsize + _TAG_BYTES, dtype=np.uint8)
    buf = raw[: words_per_chunk * dtype.itemsize].view(dtype)
    zeros = _zeros(buf.nbytes)
    suffix = stream.to_bytes(4, "little")
    for index, start in enumerate(range(0, size, chunk_words)):
        words = buf[: min(chunk_words, size - start)]
        nbytes = words.nbytes
        out = memoryview(raw[: nbytes + _TAG_BYTES])
        aead.encrypt_into(index.to_bytes(8, "little") + suffix, zeros[:nbytes], None, out)
        if not np.little_endian:  # keystream bytes are little-endian words everywhere
            words.byteswap(inplace=True)
        yield start, words


def add_expanded_seed(seed: bytes, acc: np.ndarray, stream: int = 0) -> None:
    """Add the pseudo-random vector ``seed`` names (in ``stream``) into ``acc``, in place.

    Raises:
        ValueError: the seed is not 32 bytes, or the stream is out of range.
    """
    _apply_keystream(seed, acc, np.add, stream)


def subtract_expanded_seed(seed: bytes, acc: np.ndarray, stream: int = 0) -> None:
    """Subtract the pseudo-random vector ``seed`` names (in ``stream``) from ``acc``, in place.

    Raises:
        ValueError: the seed is not 32 bytes, or the stream is out of range.
    """
    _apply_keystream(seed, acc, np.subtract, stream)


def _apply_keystream(seed: bytes, acc: np.ndarray, op: np.ufunc, stream: int) -> None:
    for start, words in _keystream(seed, acc.size, acc.dtype, stream):
        chunk = acc[start : start + words.size]
        op(chunk, words, out=chunk)


def draw_seeds(count: int, random_bytes: RandomBytes) -> tuple[bytes, ...]:
    """``count`` fresh seeds: the random shares of a split into ``count + 1`` shares.

    Raises:
        ValueError: ``count < 1`` (a single share is the input itself: no secret).
    """
    if count < 1:
        raise ValueError(f"a split needs at least one seed (two shares), got {count}")
    return tuple(random_bytes(SEED_BYTES) for _ in range(count))


def mask(vector: np.ndarray, seeds: Sequence[bytes], stream: int = 0) -> np.ndarray:
    """The dense share: ``vector`` minus every seed's ``stream``, computed in place.

    With the seeds, the ``len(seeds) + 1`` additive shares of ``vector``. The
    caller hands over a fresh encoding it no longer needs, so splitting costs
    no copy of the model; the returned array *is* ``vector``.

    Raises:
        ValueError: a seed is not 32 bytes, or the stream is out of range.
    """
    for seed in seeds:
        subtract_expanded_seed(seed, vector, stream)
    return vector
