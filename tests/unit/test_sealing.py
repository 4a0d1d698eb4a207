"""Sealed peer links (``lightning_secagg.sealing``): round trips, keys, tampering, nonces,
envelope validation, key checks and frame sizes.

Everything is in memory: A, B (and an outsider C) each draw a :class:`RoundKey`,
exchange public halves as the scheduler would relay them, and pass sealed frames
to each other by hand. Payloads are chunked with ``CHUNK_BYTES`` patched down to
a few bytes, so multi-part messages stay tiny.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import msgpack
import numpy as np
import pytest
import zmq.utils.z85
from cryptography.exceptions import InvalidTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_secagg import codec, sealing
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import MAX_ID_LEN, PEER_TO_PEER, Message, Partial, Result, Share
from lightning_secagg.messages import public_key as check_public_key
from lightning_secagg.sealing import (
    MAX_ENVELOPE_BYTES,
    MAX_PARTS,
    SEAL_VERSION,
    TAG_BYTES,
    Envelope,
    Link,
    RoundKey,
    SealedBlob,
)

pytestmark = pytest.mark.timeout(60)

FAST = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ROUND = "r1"
SEED = bytes(range(32))
#: Small enough that every payload below spans several parts.
SMALL_CHUNK = 64


# -- helpers -------------------------------------------------------------------------


class Pair:
    """A's and B's round keys and links for one round (C is an outsider with its own key)."""

    def __init__(self, round_id: str = ROUND) -> None:
        self.round_id = round_id
        self.ka, self.kb = RoundKey(), RoundKey()
        members = {"A": self.ka.public, "B": self.kb.public}
        self.a = self.ka.links(round_id, "A", members)
        self.b = self.kb.links(round_id, "B", members)

    @property
    def a_to_b(self) -> Link:
        return self.a["B"][0]

    @property
    def b_from_a(self) -> Link:
        return self.b["A"][1]

    @property
    def b_to_a(self) -> Link:
        return self.b["A"][0]

    @property
    def a_from_b(self) -> Link:
        return self.a["B"][1]


@contextmanager
def chunk_bytes(n: int) -> Iterator[None]:
    """Patch the chunk size (usable inside hypothesis tests, unlike monkeypatch)."""
    with mock.patch.object(sealing, "CHUNK_BYTES", n):
        yield


def open_(link: Link, frames: list) -> list:
    """What the peer does: read the envelope, then open with the sender's link."""
    return link.open(Envelope.unpack(frames[0]), frames)


def refused(link: Link, frames: list, match: str | None = None) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        open_(link, frames)
    return info.value


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


def payload_bytes(frame) -> bytes:
    return memoryview(frame).cast("B").tobytes()


def seal_bytes(link: Link, frames: list) -> list[bytes]:
    return as_bytes(link.seal(frames))


U32 = (np.arange(50, dtype=np.uint32) * np.uint32(2**27 + 3)).astype(np.uint32)
U64 = np.arange(40, dtype=np.uint64) * np.uint64(2**61 + 7)
RES = np.arange(200, dtype=np.uint8)

MESSAGES: list[Message] = [
    Share(ROUND, 0, 3, "A", None, U32),
    Share(ROUND, 2, 0, "A", None, U64),
    Share(ROUND, 1, 1, "A", SEED),
    Partial(ROUND, "A", U64),
    Result(ROUND, "A", RES),
]
MESSAGE_IDS = ["share-u32", "share-u64", "share-seed", "partial", "result"]


# -- 1. round trips --------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [SMALL_CHUNK, sealing.CHUNK_BYTES], ids=["small", "default"])
@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_round_trip_codec_messages(message, as_type, chunk):
    pair = Pair()
    frames = codec.encode(message)
    with chunk_bytes(chunk):
        sealed = pair.a_to_b.seal(frames)
    opened = open_(pair.b_from_a, [as_type(bytes(f)) for f in sealed])
    assert len(opened) == len(frames)
    assert bytes(opened[0]) == bytes(frames[0])
    if len(frames) == 2:
        assert payload_bytes(opened[1]) == payload_bytes(frames[1])
        assert isinstance(opened[1], np.ndarray) and opened[1].flags.writeable
    back = codec.decode(opened, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER)
    assert type(back) is type(message) and back == message
    if message.payload is not None:  # payload is not part of the dataclass equality
        assert back.payload.tobytes() == message.payload.tobytes()
    else:
        assert back.payload is None


@pytest.mark.parametrize(
    ("nbytes", "parts"),
    [
        (1, 1),
        (SMALL_CHUNK - 1, 1),
        (SMALL_CHUNK, 1),
        (SMALL_CHUNK + 1, 2),
        (3 * SMALL_CHUNK, 3),
        (3 * SMALL_CHUNK + 17, 4),
    ],
)
def test_payload_is_split_into_chunks_and_reassembled(nbytes, parts):
    pair = Pair()
    payload = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    frames = codec.encode(Result(ROUND, "A", payload))
    with chunk_bytes(SMALL_CHUNK):
        sealed = seal_bytes(pair.a_to_b, frames)
    assert len(sealed) == 2 + parts  # envelope, header, payload parts
    assert Envelope.unpack(sealed[0]).parts == 1 + parts
    chunk_sizes = [len(p) - TAG_BYTES for p in sealed[2:]]
    assert all(size == SMALL_CHUNK for size in chunk_sizes[:-1])
    assert chunk_sizes[-1] == nbytes - SMALL_CHUNK * (parts - 1)
    opened = open_(pair.b_from_a, sealed)
    assert opened[1].tobytes() == payload.tobytes()


@FAST
@given(
    nbytes=st.integers(1, 2000),
    chunk=st.integers(1, 300),
    header=st.binary(min_size=0, max_size=200),
)
def test_round_trip_any_size(nbytes, chunk, header):
    """Any header bytes and any payload size, at any chunk size, come back exactly."""
    pair = Pair()
    payload = np.frombuffer(np.random.default_rng(nbytes).bytes(nbytes), dtype=np.uint8)
    with chunk_bytes(chunk):
        sealed = seal_bytes(pair.a_to_b, [header, payload])
    assert len(sealed) == 2 + -(-nbytes // chunk)
    opened = open_(pair.b_from_a, sealed)
    assert bytes(opened[0]) == header
    assert opened[1].tobytes() == payload.tobytes()


def test_header_only_message_has_one_part():
    pair = Pair()
    frames = codec.encode(Share(ROUND, 0, 0, "A", SEED))
    sealed = seal_bytes(pair.a_to_b, frames)
    assert len(sealed) == 2
    assert Envelope.unpack(sealed[0]).parts == 1
    assert open_(pair.b_from_a, sealed) == [bytes(frames[0])]


def test_empty_payload_frame_is_refused_either_way():
    """A zero-byte payload frame seals as "no payload" (the frame is dropped); the codec
    refuses the message with or without that frame, so the receiver's verdict is the same."""
    pair = Pair()
    header = codec.encode(Partial(ROUND, "A", U64))[0]
    frames = [header, b""]
    with pytest.raises(RemoteProtocolError):
        codec.decode(frames, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER)
    opened = open_(pair.b_from_a, seal_bytes(pair.a_to_b, frames))
    with pytest.raises(RemoteProtocolError):
        codec.decode(opened, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER)


def test_round_key_public_is_a_valid_wire_key():
    key = RoundKey()
    assert len(key.public) == 40
    assert check_public_key(key.public) == key.public
    assert zmq.utils.z85.decode(key.public.encode()) == key.public_raw
    assert len(key.public_raw) == 32
    assert RoundKey().public != key.public


# -- 2. keys ---------------------------------------------------------------------------


def test_links_pair_up_and_directions_differ():
    pair = Pair()
    msg = codec.encode(Partial(ROUND, "A", U64))
    # Each direction opens with its own partner link ...
    assert open_(pair.b_from_a, seal_bytes(pair.a_to_b, msg))[0] == bytes(msg[0])
    assert open_(pair.a_from_b, seal_bytes(pair.b_to_a, msg))[0] == bytes(msg[0])
    # ... and never with the other direction's key.
    a_to_b = seal_bytes(pair.a_to_b, msg)
    reversed_link = Link(pair.b_to_a.aead, ROUND, "A")  # B's "to A" key, A's name
    refused(reversed_link, a_to_b, "failed authentication")
    refused(pair.a_from_b, a_to_b, "failed authentication")  # reflected back to A
    # The sender's own "to B" link cannot open what it sealed for B in the other direction.
    refused(pair.a_to_b, seal_bytes(pair.b_to_a, msg), "failed authentication")


def test_outsider_cannot_open_or_forge():
    pair = Pair()
    kc = RoundKey()
    members = {"A": pair.ka.public, "B": pair.kb.public, "C": kc.public}
    c = kc.links(ROUND, "C", members)
    msg = codec.encode(Partial(ROUND, "A", U64))
    sealed = seal_bytes(pair.a_to_b, msg)

    # C's own links with A and B, and C impersonating B's or A's id with its own secret.
    c_as_b = kc.links(ROUND, "B", {"A": pair.ka.public})["A"]
    c_as_a = kc.links(ROUND, "A", {"B": pair.kb.public})["B"]
    for link in [c["A"][1], c["B"][1], c_as_b[1], Link(c["A"][0].aead, ROUND, "A")]:
        refused(link, sealed, "failed authentication")

    # Forgeries: C seals under every key it can derive, claiming to be A.
    for aead in [c["B"][0].aead, c["A"][0].aead, c_as_a[0].aead, c_as_b[0].aead]:
        forged = seal_bytes(Link(aead, ROUND, "A"), msg)
        assert Envelope.unpack(forged[0]).sender == "A"
        refused(pair.b_from_a, forged, "failed authentication")

    # C is a real member: B opens C's own traffic with its "from C" link, not with "from A".
    b3 = pair.kb.links(ROUND, "B", members)
    from_c = seal_bytes(c["B"][0], msg)
    assert open_(b3["C"][1], from_c)[0] == bytes(msg[0])
    refused(b3["A"][1], from_c, "failed authentication")


def test_other_round_id_gives_other_keys():
    ka, kb = RoundKey(), RoundKey()
    members = {"A": ka.public, "B": kb.public}
    r1a, r1b = ka.links("r1", "A", members), kb.links("r1", "B", members)
    r2b = kb.links("r2", "B", members)
    msg = codec.encode(Partial("r1", "A", U64))
    sealed = seal_bytes(r1a["B"][0], msg)
    assert open_(r1b["A"][1], sealed)[0] == bytes(msg[0])
    refused(r2b["A"][1], sealed, "failed authentication")
    # Rewriting the envelope's round id does not help: it is authenticated data.
    env = Envelope.unpack(sealed[0])
    moved = [Envelope("r2", env.sender, env.seq, env.parts).pack(), *sealed[1:]]
    refused(r2b["A"][1], moved, "failed authentication")
    refused(r1b["A"][1], moved, "failed authentication")


def test_fresh_round_key_per_call_means_old_messages_never_open():
    yesterday = Pair()
    msg = codec.encode(Partial(ROUND, "A", U64))
    old = seal_bytes(yesterday.a_to_b, msg)
    today = Pair()  # same ids, same round id, fresh keys
    refused(today.b_from_a, old, "failed authentication")
    # Only one side fresh is enough.
    members = {"A": yesterday.ka.public, "B": RoundKey().public}
    half = RoundKey().links(ROUND, "B", members)
    refused(half["A"][1], old, "failed authentication")


def test_derived_keys_are_distinct_per_direction_and_pair():
    """Every (sender, receiver) of a 3-member round has its own key: a message sealed on
    one link opens on its partner link only."""
    keys = {m: RoundKey() for m in "ABC"}
    members = {m: k.public for m, k in keys.items()}
    links = {m: k.links(ROUND, m, members) for m, k in keys.items()}
    msg = [b"header", np.arange(10, dtype=np.uint8)]
    senders = [(s, r) for s in "ABC" for r in "ABC" if s != r]
    for s, r in senders:
        sealed = seal_bytes(links[s][r][0], msg)
        for s2, r2 in senders:
            receiver = Link(links[r2][s2][1].aead, ROUND, s)
            if (s2, r2) == (s, r):
                assert open_(receiver, sealed)[0] == b"header"
            else:
                refused(receiver, sealed, "failed authentication")


# -- 3. tampering ----------------------------------------------------------------------


def sealed_sample(pair: Pair, nbytes: int = 3 * SMALL_CHUNK + 5) -> list[bytes]:
    payload = np.arange(nbytes, dtype=np.uint8)
    with chunk_bytes(SMALL_CHUNK):
        return seal_bytes(pair.a_to_b, codec.encode(Result(ROUND, "A", payload)))


def flip(frame: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(frame)
    b[pos] ^= mask
    return bytes(b)


def test_flipping_any_single_byte_is_refused():
    """Exhaustive over every byte of every frame of a 4-part message."""
    pair = Pair()
    sealed = sealed_sample(pair)
    assert open_(pair.b_from_a, sealed)  # the untouched message opens
    count = 0
    for i, frame in enumerate(sealed):
        for pos in range(len(frame)):
            for mask in (0x01, 0x80):
                tampered = list(sealed)
                tampered[i] = flip(frame, pos, mask)
                with pytest.raises(RemoteProtocolError):
                    open_(pair.b_from_a, tampered)
                count += 1
    assert count == 2 * sum(len(f) for f in sealed)


@FAST
@given(data=st.data())
def test_any_byte_change_is_refused(data):
    pair = Pair()
    sealed = sealed_sample(pair, data.draw(st.integers(1, 4 * SMALL_CHUNK)))
    i = data.draw(st.integers(0, len(sealed) - 1))
    pos = data.draw(st.integers(0, len(sealed[i]) - 1))
    mask = data.draw(st.integers(1, 255))
    sealed[i] = flip(sealed[i], pos, mask)
    with pytest.raises(RemoteProtocolError):
        open_(pair.b_from_a, sealed)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_tampered_part_reports_failed_authentication(where):
    pair = Pair()
    sealed = sealed_sample(pair)
    i = 1 if where == "header" else 3
    sealed[i] = flip(sealed[i], len(sealed[i]) // 2)
    refused(pair.b_from_a, sealed, "claiming to be from A failed authentication")


def test_truncated_or_extended_parts_are_refused():
    pair = Pair()
    sealed = sealed_sample(pair)
    for i in range(1, len(sealed)):
        shorter = list(sealed)
        shorter[i] = sealed[i][:-1]
        refused(pair.b_from_a, shorter)
        longer = list(sealed)
        longer[i] = sealed[i] + b"\0"
        refused(pair.b_from_a, longer)
        bare = list(sealed)
        bare[i] = sealed[i][:TAG_BYTES]  # a part holding a tag and nothing else
        refused(pair.b_from_a, bare)
        tiny = list(sealed)
        tiny[i] = sealed[i][:3]  # shorter than a tag
        refused(pair.b_from_a, tiny)


def test_dropped_duplicated_reordered_parts_are_refused():
    pair = Pair()
    sealed = sealed_sample(pair)
    env, header, parts = sealed[0], sealed[1], sealed[2:]
    assert len(parts) == 4
    variants = []
    for i in range(len(parts)):
        variants.append([env, header, *parts[:i], *parts[i + 1 :]])  # dropped
        variants.append([env, header, *parts[: i + 1], *parts[i:]])  # duplicated
    variants.append([env, header])  # all payload dropped
    variants.append([env, *parts])  # header dropped
    variants.append([env, header, header, *parts])  # header twice
    variants.append([env, parts[0], header, *parts[1:]])  # header and first part swapped
    for perm in itertools.permutations(range(len(parts))):
        if list(perm) != sorted(perm):
            variants.append([env, header, *(parts[p] for p in perm)])  # reordered
    for frames in variants:
        with pytest.raises(RemoteProtocolError):
            open_(pair.b_from_a, frames)


def test_part_count_mismatch_is_refused_and_cannot_be_rewritten():
    pair = Pair()
    sealed = sealed_sample(pair)
    env = Envelope.unpack(sealed[0])
    # Frames dropped or added under the original envelope: refused on the count.
    refused(pair.b_from_a, sealed[:-1], "envelope says")
    refused(pair.b_from_a, [*sealed, sealed[-1]], "envelope says")
    # The attacker rewrites the envelope to match: the envelope is authenticated data.
    for parts, frames in [
        (env.parts - 1, sealed[1:-1]),
        (env.parts + 1, [*sealed[1:], sealed[-1]]),
    ]:
        rewritten = Envelope(env.round_id, env.sender, env.seq, parts).pack()
        refused(pair.b_from_a, [rewritten, *frames], "failed authentication")
    # Same for the sequence number and the sender.
    for forged in [
        Envelope(env.round_id, env.sender, env.seq + 1, env.parts),
        Envelope(env.round_id, "B", env.seq, env.parts),
    ]:
        refused(pair.b_from_a, [forged.pack(), *sealed[1:]], "failed authentication")


def test_open_checks_the_envelope_it_is_given_against_the_frames():
    pair = Pair()
    sealed = sealed_sample(pair)
    env = Envelope.unpack(sealed[0])
    wrong = Envelope(env.round_id, env.sender, env.seq, env.parts + 1)
    with pytest.raises(RemoteProtocolError, match="envelope says"):
        pair.b_from_a.open(wrong, sealed)


def test_swapping_parts_between_messages_is_refused():
    pair = Pair()
    first, second = sealed_sample(pair), sealed_sample(pair)  # same sizes, seq 0 and 1
    assert [len(f) for f in first[1:]] == [len(f) for f in second[1:]]
    for i in range(1, len(first)):
        mixed = list(first)
        mixed[i] = second[i]
        refused(pair.b_from_a, mixed, "failed authentication")
    # Whole bodies under the other envelope.
    refused(pair.b_from_a, [first[0], *second[1:]], "failed authentication")
    # A part of another pair's message with the same seq and index.
    other = sealed_sample(Pair())
    mixed = list(first)
    mixed[2] = other[2]
    refused(pair.b_from_a, mixed, "failed authentication")


# -- 4. nonces -------------------------------------------------------------------------


def test_sequence_numbers_count_per_link():
    keys = {m: RoundKey() for m in "ABC"}
    members = {m: k.public for m, k in keys.items()}
    a = keys["A"].links(ROUND, "A", members)
    msg = [b"h"]
    to_b = [Envelope.unpack(a["B"][0].seal(msg)[0]).seq for _ in range(5)]
    to_c = [Envelope.unpack(a["C"][0].seal(msg)[0]).seq for _ in range(3)]
    assert to_b == [0, 1, 2, 3, 4]
    assert to_c == [0, 1, 2]  # each link numbers its own messages
    assert a["B"][0].next_seq == 5 and a["C"][0].next_seq == 3
    assert a["B"][1].next_seq == 0  # opening does not touch the receiving side's counter


def test_each_part_uses_nonce_seq_and_index():
    """Frame i of message seq is sealed under nonce seq || i: no nonce repeats on a link."""
    pair = Pair()
    seen = set()
    for _ in range(4):
        sealed = sealed_sample(pair)
        env = Envelope.unpack(sealed[0])
        for i, part in enumerate(sealed[1:]):
            nonce = env.seq.to_bytes(8, "little") + i.to_bytes(4, "little")
            pair.b_from_a.aead.decrypt(nonce, part, sealed[0])  # raises InvalidTag otherwise
            wrong = (env.seq + 1).to_bytes(8, "little") + i.to_bytes(4, "little")
            with pytest.raises(InvalidTag):
                pair.b_from_a.aead.decrypt(wrong, part, sealed[0])
            assert nonce not in seen
            seen.add(nonce)
    assert len(seen) == 4 * 5


def test_same_frames_seal_differently_each_time():
    pair = Pair()
    msg = codec.encode(Partial(ROUND, "A", U64))
    first, second = seal_bytes(pair.a_to_b, msg), seal_bytes(pair.a_to_b, msg)
    assert first[0] != second[0]  # the envelopes differ in seq
    for x, y in zip(first[1:], second[1:], strict=True):
        assert len(x) == len(y) and x != y
    # Both open to the same message.
    for frames in (first, second):
        header, payload = open_(pair.b_from_a, frames)
        assert header == bytes(msg[0])
        assert payload.tobytes() == payload_bytes(msg[1])


def test_replayed_message_still_opens():
    """The seal does not detect replays: the same sealed message opens twice, and an old
    sequence number opens after a newer one. Refusing a duplicate within the round is the
    round state machine's job (a member's share or partial is accepted once); in another
    round no key opens it (test_other_round_id_gives_other_keys)."""
    pair = Pair()
    msg = codec.encode(Partial(ROUND, "A", U64))
    first = seal_bytes(pair.a_to_b, msg)
    second = seal_bytes(pair.a_to_b, msg)
    for frames in (first, second, first, first):
        assert bytes(open_(pair.b_from_a, frames)[0]) == bytes(msg[0])


# -- 5. Envelope.unpack ----------------------------------------------------------------


def envelope_bytes(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:@+-",
    min_size=1,
    max_size=MAX_ID_LEN,
)


@FAST
@given(round_id=ids, sender=ids, seq=st.integers(0, 2**64 - 1), parts=st.integers(1, MAX_PARTS))
def test_envelope_round_trip(round_id, sender, seq, parts):
    env = Envelope(round_id, sender, seq, parts)
    packed = env.pack()
    assert len(packed) <= MAX_ENVELOPE_BYTES
    assert Envelope.unpack(packed) == env
    assert Envelope.unpack(memoryview(packed)) == env
    assert Envelope.unpack(bytearray(packed)) == env


def test_largest_valid_envelope_fits():
    env = Envelope("r" * MAX_ID_LEN, "s" * MAX_ID_LEN, 2**64 - 1, MAX_PARTS)
    assert len(env.pack()) <= MAX_ENVELOPE_BYTES
    assert Envelope.unpack(env.pack()) == env


@FAST
@given(st.binary(max_size=MAX_ENVELOPE_BYTES + 64))
def test_envelope_garbage_bytes_only_raise_protocol_errors(frame):
    try:
        env = Envelope.unpack(frame)
    except RemoteProtocolError:
        return
    assert isinstance(env, Envelope)
    assert env.pack() == frame  # anything accepted is a canonical envelope


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@FAST
@given(
    st.one_of(
        msgpack_values,
        st.tuples(
            st.sampled_from([SEAL_VERSION, 0, 2, True, 1.0]),
            msgpack_values | ids,
            msgpack_values | ids,
            msgpack_values | st.integers(0, 2**64 - 1),
            msgpack_values | st.integers(0, MAX_PARTS + 1),
        ).map(list),
    )
)
def test_envelope_msgpack_documents_only_raise_protocol_errors(value):
    frame = msgpack.packb(value, use_bin_type=True)
    try:
        env = Envelope.unpack(frame)
    except RemoteProtocolError:
        return
    assert env == Envelope(*value[1:])
    assert type(env.seq) is int and type(env.parts) is int


def test_envelope_oversize_is_refused():
    with pytest.raises(RemoteProtocolError, match="too large"):
        Envelope.unpack(b"\x90" * (MAX_ENVELOPE_BYTES + 1))
    # Even a well-formed envelope (ids too long for ident()) is refused on size alone.
    big = envelope_bytes(SEAL_VERSION, "r" * 300, "s" * 300, 0, 1)
    assert len(big) > MAX_ENVELOPE_BYTES
    with pytest.raises(RemoteProtocolError, match="too large"):
        Envelope.unpack(memoryview(big))


GOOD = [SEAL_VERSION, ROUND, "A", 7, 3]


def with_field(i: int, value) -> bytes:
    fields = list(GOOD)
    fields[i] = value
    return envelope_bytes(*fields)


def test_good_envelope_is_accepted():
    assert Envelope.unpack(envelope_bytes(*GOOD)) == Envelope(ROUND, "A", 7, 3)


@pytest.mark.parametrize("version", [0, 1, 3, True, 2.0, "2", None, [2]])
def test_envelope_wrong_version(version):
    with pytest.raises(RemoteProtocolError, match="seal version"):
        Envelope.unpack(with_field(0, version))


@pytest.mark.parametrize("field", [1, 2], ids=["round_id", "sender"])
@pytest.mark.parametrize(
    "value", ["", "a b", "a/b", "é", "x" * (MAX_ID_LEN + 1), b"r1", 1, None, True, [], {}]
)
def test_envelope_bad_ids(field, value):
    with pytest.raises(RemoteProtocolError, match=r"identifier|not a sealed envelope"):
        Envelope.unpack(with_field(field, value))


@pytest.mark.parametrize("seq", [True, False, 1.0, 0.0, -1, -(2**63), "1", None, b"\x01", [1]])
def test_envelope_bad_seq(seq):
    with pytest.raises(RemoteProtocolError, match=r"sequence number|not a sealed envelope"):
        Envelope.unpack(with_field(3, seq))


@pytest.mark.parametrize("seq", [0, 1, 2**32, 2**64 - 1])
def test_envelope_seq_range(seq):
    assert Envelope.unpack(with_field(3, seq)).seq == seq


@pytest.mark.parametrize("parts", [0, MAX_PARTS + 1, -1, True, 1.0, 2.0, "1", None, 2**64 - 1])
def test_envelope_bad_parts(parts):
    with pytest.raises(RemoteProtocolError, match="part count"):
        Envelope.unpack(with_field(4, parts))


@pytest.mark.parametrize("parts", [1, 2, MAX_PARTS])
def test_envelope_parts_range(parts):
    assert Envelope.unpack(with_field(4, parts)).parts == parts


@pytest.mark.parametrize(
    "frame",
    [
        envelope_bytes(*GOOD[:4]),  # missing field
        envelope_bytes(*GOOD, 0),  # extra field
        envelope_bytes(),
        msgpack.packb(dict(zip("vrspn", GOOD, strict=True))),  # a map, not an array
        msgpack.packb(tuple(GOOD)) + b"\x00",  # trailing bytes
        msgpack.packb(GOOD)[:-1],  # truncated
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(GOOD))),  # ext type around it
        msgpack.packb([*GOOD[:3], msgpack.ExtType(0, b"\x07"), 3]),  # ext type as seq
        msgpack.packb([*GOOD[:4], msgpack.ExtType(5, b"")]),  # empty ext as parts
        b"\xd6\xff\x00\x00\x00\x00",  # a msgpack Timestamp (ext -1)
        msgpack.packb([*GOOD[:3], 7.0, 3]),
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x95",  # array header, no items
    ],
    ids=[
        "missing",
        "extra",
        "empty-array",
        "map",
        "trailing",
        "truncated",
        "ext-outer",
        "ext-seq",
        "ext-parts",
        "timestamp",
        "float-seq",
        "empty",
        "reserved-byte",
        "short-array",
    ],
)
def test_envelope_malformed(frame):
    with pytest.raises(RemoteProtocolError):
        Envelope.unpack(frame)


def test_envelope_does_not_build_big_containers():
    """A tiny frame that claims a huge array or string is refused, not allocated."""
    for frame in [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4G items
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\x91" * 100 + b"\x01",  # nested arrays
    ]:
        with pytest.raises(RemoteProtocolError):
            Envelope.unpack(frame)


# -- 6. RoundKey.links -----------------------------------------------------------------


def test_links_skip_me_and_cover_everyone_else():
    keys = {m: RoundKey() for m in ["a", "b", "c", "d"]}
    members = {m: k.public for m, k in keys.items()}
    links = keys["b"].links(ROUND, "b", members)
    assert set(links) == {"a", "c", "d"}
    for other, (to, frm) in links.items():
        assert (to.sender, frm.sender) == ("b", other)
        assert to.round_id == frm.round_id == ROUND
        assert to.next_seq == 0
    assert keys["b"].links(ROUND, "b", {"b": keys["b"].public}) == {}
    # "me" is skipped by id, even with a key that would otherwise be refused.
    assert keys["b"].links(ROUND, "b", {"b": ""}) == {}


@pytest.mark.parametrize(
    "raw",
    [b"", bytes(28), bytes(36), bytes(64)],
    ids=["empty", "28-bytes", "36-bytes", "64-bytes"],
)
def test_links_refuse_keys_of_the_wrong_length(raw):
    key = zmq.utils.z85.encode(raw).decode()
    with pytest.raises(ValueError, match="not 32 bytes"):
        RoundKey().links(ROUND, "A", {"B": key})


def test_links_refuse_z85_of_the_wrong_length():
    with pytest.raises(ValueError):
        RoundKey().links(ROUND, "A", {"B": RoundKey().public[:-1]})


P = 2**255 - 19
LOW_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]


@pytest.mark.parametrize("u", LOW_ORDER, ids=[f"u{i}" for i in range(len(LOW_ORDER))])
def test_links_refuse_low_order_points(u):
    key = zmq.utils.z85.encode(u.to_bytes(32, "little")).decode()
    assert check_public_key(key) == key  # it passes the wire format check
    with pytest.raises(ValueError):
        RoundKey().links(ROUND, "A", {"B": key, "C": RoundKey().public})


def test_links_refuse_an_all_zero_shared_secret(monkeypatch):
    """The library refuses low-order points itself; the module's own check is the backstop."""
    key = RoundKey()

    class ZeroExchange:
        def exchange(self, peer):
            return bytes(32)

    monkeypatch.setattr(key, "_secret", ZeroExchange())
    with pytest.raises(ValueError, match="low-order point"):
        key.links(ROUND, "A", {"B": RoundKey().public})


def test_links_refuse_z85_overflow_with_value_error():
    """A 40-character key in the Z85 alphabet passes the header validator, but its
    5-character groups exceed 2**32 - 1 (zmq's decoder raises struct.error): the
    peer must get a ValueError, so it ignores the assignment instead of crashing."""
    key = "#" * 40
    assert check_public_key(key) == key
    with pytest.raises(ValueError, match="not valid Z85"):
        RoundKey().links(ROUND, "A", {"B": key})


def test_links_refuse_non_z85_characters_with_value_error():
    with pytest.raises(ValueError, match="not valid Z85"):
        RoundKey().links(ROUND, "A", {"B": "~" * 40})


def test_repr_does_not_leak_the_secret():
    key = RoundKey()
    secret = key._secret.private_bytes_raw()
    texts = [repr(key), str(key), f"{key!r}"]
    members = {"A": key.public, "B": RoundKey().public}
    to_b, from_b = key.links(ROUND, "A", members)["B"]
    texts += [repr(to_b), repr(from_b)]
    for text in texts:
        for leak in (secret.hex(), zmq.utils.z85.encode(secret).decode(), repr(secret)):
            assert leak not in text
    assert repr(key) == "RoundKey(<secret>)"


# -- 7. sizes --------------------------------------------------------------------------


def expected_nbytes(envelope: bytes, header: bytes, payload_nbytes: int, chunk: int) -> int:
    chunks = [min(chunk, payload_nbytes - i) for i in range(0, payload_nbytes, chunk)]
    # The sealed header is the codec header behind a one-byte mode.
    return len(envelope) + 1 + len(header) + TAG_BYTES + sum(c + TAG_BYTES for c in chunks)


@FAST
@given(
    nbytes=st.integers(0, 1500),
    chunk=st.integers(1, 256),
    seq=st.sampled_from([0, 1, 127, 128, 255, 256, 2**16, 2**32, 2**63]),
)
def test_sealed_size_is_exact(nbytes, chunk, seq):
    pair = Pair()
    pair.a_to_b.next_seq = seq  # the envelope grows with the counter
    header = codec.encode(Partial(ROUND, "A", U64))[0]
    frames = [header] if nbytes == 0 else [header, np.zeros(nbytes, dtype=np.uint8)]
    with chunk_bytes(chunk):
        sealed = pair.a_to_b.seal(frames)
    total = sum(sealing.frame_nbytes(f) for f in sealed)
    assert total == expected_nbytes(bytes(sealed[0]), bytes(header), nbytes, chunk)
    assert len(sealed) == 2 + -(-nbytes // chunk)
    assert Envelope.unpack(sealed[0]).seq == seq


@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_sealed_size_of_codec_messages(message):
    pair = Pair()
    frames = codec.encode(message)
    n = sealing.frame_nbytes(memoryview(frames[1]).cast("B")) if len(frames) == 2 else 0
    with chunk_bytes(SMALL_CHUNK):
        sealed = pair.a_to_b.seal(frames)
    total = sum(sealing.frame_nbytes(f) for f in sealed)
    assert total == expected_nbytes(bytes(sealed[0]), bytes(frames[0]), n, SMALL_CHUNK)


def test_frame_nbytes():
    arr = np.arange(10, dtype=np.uint64)
    assert sealing.frame_nbytes(memoryview(arr)) == 80
    assert sealing.frame_nbytes(b"abc") == 3
    assert sealing.frame_nbytes(bytearray(5)) == 5


# -- forwarded blobs (the result, sealed once) -------------------------------------------


class Trio:
    """Root actor R, forwarder F, leaf L, and M: a member who never gets this result."""

    def __init__(self) -> None:
        self.keys = {name: RoundKey() for name in "RFLM"}
        members = {name: k.public for name, k in self.keys.items()}
        self.links = {name: k.links(ROUND, name, members) for name, k in self.keys.items()}

    def to(self, sender: str, receiver: str) -> Link:
        return self.links[sender][receiver][0]

    def from_(self, receiver: str, sender: str) -> Link:
        return self.links[receiver][sender][1]


def forward(link: Link, blob: SealedBlob, sender: str = "R") -> list:
    return link.seal_forward(codec.encode(Result(ROUND, sender, RES))[0], blob)


@pytest.mark.parametrize("chunk", [SMALL_CHUNK, sealing.CHUNK_BYTES], ids=["small", "default"])
def test_blob_sealed_once_is_forwarded_down_unchanged(chunk):
    with chunk_bytes(chunk):
        trio = Trio()
        blob = SealedBlob.seal(RES)
        to_f = forward(trio.to("R", "F"), blob)
        assert len(to_f) == 2 + len(blob.parts)
        frames, got = trio.from_("F", "R").open_message(Envelope.unpack(to_f[0]), to_f)
        assert got is not None and got.key == blob.key
        assert frames[1].tobytes() == RES.tobytes() and frames[1].flags.writeable
        assert codec.decode(frames, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER).sender == "R"
        # F forwards the very ciphertext frames it received: no re-encryption.
        to_l = forward(trio.to("F", "L"), got, sender="F")
        assert [bytes(p) for p in to_l[2:]] == [bytes(p) for p in to_f[2:]]
        frames, again = trio.from_("L", "F").open_message(Envelope.unpack(to_l[0]), to_l)
        assert frames[1].tobytes() == RES.tobytes() and again is not None


def test_blob_key_travels_only_inside_the_sealed_header():
    trio = Trio()
    blob = SealedBlob.seal(RES)
    wire = b"".join(bytes(f) for f in forward(trio.to("R", "F"), blob))
    assert blob.key not in wire
    assert RES.tobytes() not in wire


def test_plain_messages_open_without_a_blob():
    pair = Pair()
    frames = pair.a_to_b.seal(codec.encode(Partial(ROUND, "A", U64)))
    opened, blob = pair.b_from_a.open_message(Envelope.unpack(frames[0]), frames)
    assert blob is None and opened[1].tobytes() == U64.tobytes()


def test_member_with_the_blob_key_cannot_swap_the_ciphertext():
    """M knows the blob key (it is a member below another actor, say) and encrypts a
    forged result under it: the link tags of R -> F do not accept its frames."""
    trio = Trio()
    blob = SealedBlob.seal(RES)
    forged = SealedBlob(blob.key, (encrypt_under(blob.key, np.zeros_like(RES)),))
    genuine = forward(trio.to("R", "F"), blob)
    swapped = [*genuine[:2], *forged.parts]
    refused(trio.from_("F", "R"), swapped, "failed authentication")
    # M's own link to F seals a forwarded message that opens, but as from M, whom
    # the round's state machine does not accept as F's result sender.
    from_m = forward(trio.to("M", "F"), forged, sender="M")
    opened, _ = trio.from_("F", "M").open_message(Envelope.unpack(from_m[0]), from_m)
    assert codec.decode(opened, codec.MAX_PEER_HEADER_BYTES, PEER_TO_PEER).sender == "M"


def encrypt_under(key: bytes, payload: np.ndarray) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).encrypt(bytes(12), payload.tobytes(), None)


def test_tampered_blob_part_or_tag_is_refused():
    trio = Trio()
    blob = SealedBlob.seal(RES)
    frames = as_bytes(forward(trio.to("R", "F"), blob))
    for index in (1, 2):  # the sealed header (holding key and tags), the ciphertext
        bad = list(frames)
        part = bytearray(bad[index])
        part[len(part) // 2] ^= 1
        bad[index] = bytes(part)
        refused(trio.from_("F", "R"), bad, "failed authentication")


def test_blob_frames_are_refused_on_another_link():
    trio = Trio()
    frames = forward(trio.to("R", "F"), SealedBlob.seal(RES))
    refused(trio.from_("L", "R"), frames, "failed authentication")


@pytest.mark.parametrize(
    "plain",
    [b"", b"\x02" + bytes(100), b"\x01" + bytes(10), b"\x01" + bytes(32 + 16)],
    ids=["empty", "unknown-mode", "short", "no-header"],
)
def test_malformed_sealed_header_is_refused(plain):
    trio = Trio()
    link = trio.to("R", "F")
    blob = SealedBlob.seal(RES)
    envelope = Envelope(ROUND, "R", 0, 1 + len(blob.parts)).pack()
    sealed = link.aead.encrypt(bytes(12), plain, envelope)
    refused(trio.from_("F", "R"), [envelope, sealed, *blob.parts], "malformed")


def test_forwarded_header_without_parts_is_refused():
    trio = Trio()
    link = trio.to("R", "F")
    envelope = Envelope(ROUND, "R", 0, 1).pack()
    plain = b"\x01" + bytes(32) + bytes(codec.encode(Result(ROUND, "R", RES))[0])
    sealed = link.aead.encrypt(bytes(12), plain, envelope)
    refused(trio.from_("F", "R"), [envelope, sealed], "malformed")


def test_blob_keys_are_fresh_and_nonces_per_part():
    a, b = SealedBlob.seal(RES), SealedBlob.seal(RES)
    assert a.key != b.key
    assert [bytes(p) for p in a.parts] != [bytes(p) for p in b.parts]
    with chunk_bytes(SMALL_CHUNK):
        blob = SealedBlob.seal(RES)
    assert len(blob.parts) == -(-RES.nbytes // SMALL_CHUNK)
    assert blob.open().tobytes() == RES.tobytes()
    with pytest.raises(RemoteProtocolError, match="forwarded payload"):
        SealedBlob(blob.key, blob.parts[::-1]).open()
    with pytest.raises(ValueError):
        SealedBlob.seal(b"")


@pytest.mark.parametrize("chunk", [SMALL_CHUNK, sealing.CHUNK_BYTES], ids=["small", "default"])
@pytest.mark.parametrize("forwarded", [False, True], ids=["plain", "forwarded"])
def test_payload_is_opened_where_the_receiver_places_it(chunk, forwarded):
    """``place`` sees the authenticated header and the payload's size before any
    payload byte is decrypted, and the payload lands in the buffer it returns."""
    with chunk_bytes(chunk):
        trio = Trio()
        if forwarded:
            frames = forward(trio.to("R", "F"), SealedBlob.seal(RES))
        else:
            frames = trio.to("R", "F").seal(codec.encode(Result(ROUND, "R", RES)))
        slot = np.full(RES.nbytes + 8, 0xAB, dtype=np.uint8)
        asked = []

        def place(header, nbytes):
            asked.append((codec.decode_header(header)["t"], nbytes))
            return slot[4 : 4 + nbytes]

        opened, _ = trio.from_("F", "R").open_message(Envelope.unpack(frames[0]), frames, place)
        assert asked == [("result", RES.nbytes)]
        assert opened[1].ctypes.data == slot[4:].ctypes.data  # no copy
        assert opened[1].tobytes() == RES.tobytes()
        assert slot[:4].tolist() == [0xAB] * 4 and slot[-4:].tolist() == [0xAB] * 4
        # None: a buffer of its own, as without ``place``.
        opened, _ = trio.from_("F", "R").open_message(
            Envelope.unpack(frames[0]), frames, lambda header, nbytes: None
        )
        assert opened[1].tobytes() == RES.tobytes()
        assert not np.shares_memory(opened[1], slot)


def test_a_place_of_the_wrong_size_is_a_local_error():
    pair = Pair()
    frames = pair.a_to_b.seal(codec.encode(Partial(ROUND, "A", U64)))
    with pytest.raises(ValueError, match="cannot decrypt"):
        pair.b_from_a.open_message(
            Envelope.unpack(frames[0]), frames, lambda h, n: np.empty(n - 1, np.uint8)
        )


def test_a_forged_payload_opened_in_place_is_refused():
    """A payload that fails authentication raises, whatever it left in its place."""
    pair = Pair()
    frames = pair.a_to_b.seal(codec.encode(Partial(ROUND, "A", U64)))
    tampered = bytearray(frames[-1])
    tampered[0] ^= 1
    slot = np.zeros(U64.nbytes, dtype=np.uint8)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        pair.b_from_a.open_message(
            Envelope.unpack(frames[0]), [*frames[:-1], bytes(tampered)], lambda h, n: slot
        )
