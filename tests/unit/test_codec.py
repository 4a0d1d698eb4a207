"""Messages <-> frames: every type round-trips; every malformed input is a RemoteProtocolError."""

from __future__ import annotations

import contextlib
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_secagg.codec import MAX_PEER_HEADER_BYTES, decode, decode_header, encode
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import (
    FROM_SCHEDULER,
    MAX_ID_LEN,
    MAX_REASON_LEN,
    MESSAGE_TYPES,
    PEER_TO_PEER,
    PROTOCOL_VERSION,
    TO_SCHEDULER,
    Abort,
    Assignment,
    Done,
    Farewell,
    HeaderError,
    Heartbeat,
    Leave,
    Message,
    Partial,
    Rejoin,
    Result,
    Share,
    Signup,
    SignupAck,
    SignupRejected,
    WaitingStatus,
)

pytestmark = pytest.mark.timeout(60)

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
SEED = bytes(range(32))
VEC = np.arange(5, dtype=np.uint64) * np.uint64(2**61)
RES = np.arange(16, dtype=np.uint8)

SAMPLES: list[Message] = [
    Signup(
        "sess", "peer-1", "tcp://127.0.0.1:6000", KEY, 2.5, 32, [["w", [2, 3], "float32"]], [-3]
    ),
    Signup("sess", "peer-1", "ipc:///tmp/x.sock", "", 1, 8, [["w", [], "int64"]]),
    SignupAck("sess", "peer-1", 3),
    SignupRejected("sess", "peer-1", "schema_mismatch", "'w' has shape [3], expected [2]"),
    Assignment(
        "sess",
        "r1",
        [["a", "tcp://h:1", KEY], ["b", "tcp://h:2", KEY], ["c", "tcp://h:3", ""]],
        [[[["a", "b", "c"], ["a", "c"]]]],
        3,
        2,
        6.0,
        30.0,
    ),
    Assignment(
        "sess",
        "r2",
        [["a", "tcp://h:1", KEY], ["b", "tcp://h:2", KEY], ["c", "tcp://h:3", KEY]],
        [[[["a", "b", "c"], ["a", "c"]]]],
        3,
        2,
        6.0,
        30.0,
        32,
        [1, -64, 64],
    ),
    Leave("sess", "peer-1"),
    Heartbeat("sess", "peer-1", None),
    Heartbeat("sess", "peer-1", "r1"),
    Rejoin("sess", "peer-1"),
    Farewell("sess", "peer-1"),
    WaitingStatus("sess", "peer-1", 2, 1, 3, 3, ["peer-3"]),
    Done("r1", "peer-1", 1.25, 100, 2**40),
    Abort("r1", "scheduler", "round deadline passed"),
    Share("r1", 0, 3, "peer-1", SEED),
    Share("r1", 2, 0, "peer-1", None, VEC),
    Partial("r1", "peer-1", VEC),
    Result("r1", "peer-1", RES),
]


def sample(kind: type[Message]) -> Message:
    return next(m for m in SAMPLES if type(m) is kind)


def frames_of(message: Message) -> list[bytes]:
    return [bytes(f) for f in encode(message)]


def header_frame(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def good_header(message: Message) -> dict:
    return msgpack.unpackb(frames_of(message)[0], raw=False)


def refused(frames, match: str | None = None, **kwargs) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode(frames, **kwargs)
    return info.value


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{m.TYPE}")
@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_round_trip(message, as_type):
    frames = [as_type(f) for f in frames_of(message)]
    back = decode(frames)
    assert type(back) is type(message)
    assert back == message
    payload = getattr(message, "payload", None)
    if payload is None:
        assert len(frames) == 1
        assert getattr(back, "payload", None) is None
    else:
        assert len(frames) == 2
        # Payloads arrive as raw little-endian bytes; the round views them as its ring.
        assert back.payload.dtype == np.uint8
        assert back.payload.tobytes() == payload.astype(payload.dtype.newbyteorder("<")).tobytes()


def test_every_message_type_is_sampled():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


def test_payload_travels_without_copy_and_little_endian():
    frames = encode(Partial("r1", "a", VEC))
    assert frames[1] is VEC  # the array itself goes to send_multipart(copy=False)
    big = VEC.astype(">u8")
    frames = encode(Partial("r1", "a", big))
    assert bytes(frames[1]) == VEC.tobytes()
    strided = np.arange(10, dtype=np.uint64)[::2]
    assert bytes(encode(Partial("r1", "a", strided))[1]) == strided.copy().tobytes()
    back = decode([frames_of(Partial("r1", "a", VEC))[0], VEC.tobytes()]).payload
    assert back.view("<u8").tolist() == VEC.tolist()


def test_header_layout():
    header = good_header(Leave("s", "p"))
    assert header == {"v": PROTOCOL_VERSION, "t": "leave", "session": "s", "peer_id": "p"}


# -- malformed frames -------------------------------------------------------------------


def test_empty_message():
    refused([], "empty message")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # truncated array
        msgpack.packb({"v": PROTOCOL_VERSION, "t": "leave", "session": "s"})[:-3],  # truncated map
        msgpack.packb({"v": 1}) + b"\x00",  # trailing bytes
        pickle.dumps({"v": PROTOCOL_VERSION, "t": "leave", "session": "s", "peer_id": "p"}),
        pickle.dumps(Leave("s", "p")),
    ],
)
def test_not_msgpack(frame):
    refused([frame], r"not valid msgpack|not a map|version|unknown")


@pytest.mark.parametrize("value", [[1, 2], "leave", 5, None, b"xx", 1.5])
def test_header_not_a_map(value):
    refused([msgpack.packb(value, use_bin_type=True)], "not a map")


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 7, None, "6", True, 6.0, [6]])
def test_wrong_version(version):
    frame = header_frame(v=version, t="leave", session="s", peer_id="p")
    refused([frame], "unsupported protocol version")


def test_missing_version():
    refused([header_frame(t="leave", session="s", peer_id="p")], "unsupported protocol version")


@pytest.mark.parametrize("kind", ["nope", "", None, 3, ["leave"], {"a": 1}, b"leave", "LEAVE"])
def test_unknown_type(kind):
    refused(
        [header_frame(v=PROTOCOL_VERSION, t=kind, session="s", peer_id="p")], "unknown message type"
    )


def test_msgpack_ext_types_refused():
    ext = msgpack.ExtType(5, b"abcd")
    refused(
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "leave", "session": ext, "peer_id": "p"})],
        "msgpack",
    )
    ts = msgpack.Timestamp(1, 0)
    refused(
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "leave", "session": ts, "peer_id": "p"})],
        "msgpack",
    )


def test_non_string_map_keys_refused():
    raw = msgpack.packb({1: 1, "v": PROTOCOL_VERSION, "t": "leave", "session": "s", "peer_id": "p"})
    refused([raw], "not valid msgpack")
    raw = msgpack.packb(
        {b"x": 1, "v": PROTOCOL_VERSION, "t": "leave", "session": "s", "peer_id": "p"}
    )
    refused([raw], "unexpected fields")


def test_deeply_nested_header_refused():
    deep = b"\x91" * 5000 + b"\x00"
    refused([deep], "not valid msgpack|would decode to more than")


def test_long_bin_refused_before_validation():
    frame = header_frame(
        v=PROTOCOL_VERSION,
        t="share",
        round_id="r",
        segment=0,
        level=0,
        group=0,
        sender="a",
        seed=b"x" * 65,
    )
    refused([frame], "not valid msgpack")


# -- fields ----------------------------------------------------------------------


def mutate(message: Message, **changes) -> list[bytes]:
    header = good_header(message)
    for name, value in changes.items():
        if value is _DROP:
            del header[name]
        else:
            header[name] = value
    return [msgpack.packb(header, use_bin_type=True), *frames_of(message)[1:]]


_DROP = object()


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_missing_each_field(message):
    for name in message.FIELDS:
        refused(mutate(message, **{name: _DROP}), rf"{message.TYPE}: missing field '{name}'")


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_extra_field(message):
    refused(mutate(message, admin=True), r"unexpected fields \['admin'\]")
    refused(mutate(message, payload=b"x"), "unexpected fields")


def wrong_type_for(value: object, name: str = "") -> list[object]:
    """Values of a type the field never accepts (bools are refused where ints are)."""
    if name == "exponents":  # optional list of small ints
        return ["x", 5, True, {"a": 1}, [1.5], [True], [65], [-65], [], [None]]
    if isinstance(value, str):
        return [5, None, b"abc", ["a"], {"a": 1}]
    if isinstance(value, bool | int | float):
        return ["5", None, True, [1], {"a": 1}, b"\x01"]
    if isinstance(value, list):
        return ["x", 5, None, {"a": 1}]
    return [5, [1] * 32, True, 1.5, {"a": 1}]  # optional seeds and ids


def accepts_none(check) -> bool:
    try:
        check(None)
    except HeaderError:
        return False
    return True


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_wrong_typed_fields(message):
    header = good_header(message)
    for name, check in message.FIELDS.items():
        for bad in wrong_type_for(header[name], name):
            if bad is None and accepts_none(check):
                continue  # optional fields (a heartbeat's round) take None
            refused(mutate(message, **{name: bad}), rf"{message.TYPE}\.{name}: ")


@pytest.mark.parametrize(
    "bad_id",
    ["", "a b", "tab\there", "new\nline", "trailing\n", "x" * (MAX_ID_LEN + 1), "é", "a/b", "a;b"],
)
def test_bad_identifiers_refused(bad_id):
    refused(mutate(Leave("s", "p"), peer_id=bad_id), r"leave\.peer_id")
    refused(mutate(Leave("s", "p"), session=bad_id), r"leave\.session")
    refused(mutate(Share("r1", 0, 0, "a", SEED), round_id=bad_id), r"share\.round_id")


def test_identifier_length_boundary():
    longest = "x" * MAX_ID_LEN
    assert decode(frames_of(Leave(longest, longest))).peer_id == longest
    refused(frames_of(Leave("s", longest + "x")), "peer_id")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint", "http://x:1"),
        ("endpoint", "tcp://host"),
        ("endpoint", "tcp://h:1\n"),
        ("endpoint", "tcp://h:123456"),
        ("endpoint", "ipc://a b"),
        ("public_key", "short"),
        ("public_key", KEY + "\n"),
        ("public_key", KEY[:-1] + " "),
        ("weight", 0),
        ("weight", -1.0),
        ("weight", float("nan")),
        ("weight", float("inf")),
        ("weight", 1e16),
        ("weight", True),
        ("frac_bits", 7),
        ("frac_bits", 53),
        ("frac_bits", 32.0),
        ("schema", []),
        ("schema", [["w", [2]]]),
        ("schema", [["w", 2, "float32"]]),
        ("schema", [[1, [2], "float32"]]),
        ("schema", [["w", [1] * 33, "float32"]]),
        ("schema", [["x" * 1025, [1], "float32"]]),
        ("schema", "w"),
    ],
)
def test_signup_field_bounds(field, value):
    refused(mutate(sample(Signup), **{field: value}), rf"signup\.{field}")


def test_signup_field_bounds_that_pass():
    for field, value in [("weight", 1e15), ("weight", 1e-300), ("frac_bits", 8), ("frac_bits", 52)]:
        assert getattr(decode(mutate(sample(Signup), **{field: value})), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("members", []),
        ("members", [["a", "tcp://h:1"]]),
        ("members", [["a", "tcp://h:1", KEY], ["a", "tcp://h:2", KEY]]),
        ("members", [["a b", "tcp://h:1", KEY]]),
        ("tree", []),
        ("tree", [[]]),
        ("tree", [[["a", "b"]]]),
        ("tree", [[[["a", "b", "c"]]]]),
        ("tree", [[[["a", "b", "c"], "ab"]]]),
        ("tree", [[[["a", "b", 3], ["a", "b"]]]]),
        ("tree", [[[["a"], ["a"]]]] * 65),
        ("group_size", 2),
        ("num_actors", 1),
        ("total_weight", 0.0),
        ("deadline_s", 0),
        ("deadline_s", 86401),
    ],
)
def test_assignment_field_bounds(field, value):
    refused(mutate(sample(Assignment), **{field: value}), rf"assignment\.{field}")


@pytest.mark.parametrize(
    ("field", "value"),
    [("level", -1), ("level", 65), ("group", -1), ("seed", b"x" * 31), ("seed", "s" * 32)],
)
def test_share_field_bounds(field, value):
    refused(mutate(sample(Share), **{field: value}), rf"share\.{field}")


def test_done_field_bounds():
    refused(mutate(sample(Done), seconds=-0.1), r"done\.seconds")
    refused(mutate(sample(Done), bytes_sent=2**62 + 1), r"done\.bytes_sent")
    refused(mutate(sample(Done), bytes_received=-1), r"done\.bytes_received")
    assert decode(mutate(sample(Done), bytes_sent=2**62)).bytes_sent == 2**62


def test_reason_length_boundary():
    ok = Abort("r1", "p", "x" * MAX_REASON_LEN)
    assert decode(frames_of(ok)) == ok
    refused(frames_of(Abort("r1", "p", "x" * (MAX_REASON_LEN + 1))), r"abort\.reason")


# -- frames and payloads ------------------------------------------------------------------


def test_header_size_limit_exactly_at_and_one_past():
    message = Abort("r1", "p", "")
    base = len(frames_of(message)[0])
    # Pad the reason until the header is exactly the limit (str8 / str16 prefix sizes differ).
    limit = 300
    reason = "x" * (limit - base - 2)
    frame = frames_of(Abort("r1", "p", reason))[0]
    assert len(frame) == limit
    assert decode([frame], max_header_bytes=limit).reason == reason
    assert decode([memoryview(frame)], max_header_bytes=limit).reason == reason
    refused([frame], f"header of {limit} bytes exceeds {limit - 1}", max_header_bytes=limit - 1)
    refused(
        [memoryview(frame)], f"header of {limit} bytes exceeds {limit - 1}",
        max_header_bytes=limit - 1,
    )  # fmt: skip


def test_peer_header_limit_fits_real_shares():
    longest = "x" * MAX_ID_LEN
    frame = frames_of(Share(longest, 64, 100_000, longest, SEED))[0]
    assert len(frame) <= MAX_PEER_HEADER_BYTES
    decode([frame], MAX_PEER_HEADER_BYTES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_wrong_frame_counts(message):
    frames = frames_of(message)
    refused([*frames, b"\x00" * 8, b"\x00" * 8], "frames, expected")
    if isinstance(message, (Partial, Result)):
        refused(frames[:1], r"1 frames, expected \(2,\)")
    elif not isinstance(message, Share):
        refused([*frames, b"\x00" * 8], r"2 frames, expected \(1,\)")


def test_share_with_neither_seed_nor_payload():
    frames = frames_of(Share("r1", 0, 0, "a", None, VEC))
    refused(frames[:1], "neither a seed nor a payload")


def test_share_with_both_seed_and_payload():
    header = frames_of(Share("r1", 0, 0, "a", SEED))[0]
    refused([header, VEC.tobytes()], "both a seed and a payload")


@pytest.mark.parametrize("nbytes", [1, 7, 9, 15, 41])
def test_payload_size_is_left_to_the_round(nbytes):
    """The codec cannot know the round's ring (4- or 8-byte elements): PeerRound checks."""
    for message in (Share("r1", 0, 0, "a", None, VEC), Partial("r1", "a", VEC)):
        header = frames_of(message)[0]
        assert decode([header, b"\x01" * nbytes]).payload.nbytes == nbytes
        refused([header, b""], "payload of 0 bytes")


def test_result_payload_is_bytes_but_not_empty():
    header = frames_of(Result("r1", "a", RES))[0]
    assert decode([header, b"\x01\x02\x03"]).payload.tolist() == [1, 2, 3]
    refused([header, b""], "payload of 0 bytes")


def test_payload_is_read_only_view_of_the_frame():
    data = bytearray(VEC.tobytes())
    msg = decode([frames_of(Partial("r1", "a", VEC))[0], memoryview(data)])
    assert msg.payload.dtype == np.uint8
    assert np.shares_memory(msg.payload, np.frombuffer(data, dtype=np.uint8))


# -- allowed -------------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_allowed_filter(message):
    for allowed in (PEER_TO_PEER, FROM_SCHEDULER, TO_SCHEDULER):
        frames = frames_of(message)
        if type(message) in allowed:
            assert decode(frames, allowed=allowed) == message
        else:
            refused(frames, f"message type '{message.TYPE}' is not accepted here", allowed=allowed)


def test_allowed_is_checked_before_fields():
    # A malformed Signup on a peer socket is refused for its type, not its fields.
    frame = header_frame(v=PROTOCOL_VERSION, t="signup")
    refused([frame], "not accepted here", allowed=PEER_TO_PEER)
    refused([frame], "missing field")


def test_decode_header_alone():
    assert decode_header(frames_of(Leave("s", "p"))[0])["t"] == "leave"
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_header(b"\x80" * 10, max_header_bytes=9)


# -- fuzzing -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_only_raise_remote_protocol_error(frames):
    with contextlib.suppress(RemoteProtocolError):
        decode(frames, max_header_bytes=48)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def plausible_frames(draw: st.DrawFn) -> list[bytes]:
    """Headers that look like ours (right version, known type) with random fields."""
    kind = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    base = draw(st.sampled_from([m for m in SAMPLES if kind == m.TYPE]))
    header = good_header(base)
    for name in draw(st.lists(st.sampled_from([*base.FIELDS, "v", "t", "zz"]), max_size=3)):
        if draw(st.booleans()):
            header.pop(name, None)
        else:
            header[name] = draw(msgpack_values)
    frames = [msgpack.packb(header, use_bin_type=True)]
    frames += draw(st.lists(st.binary(max_size=40), max_size=2))
    return frames


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=plausible_frames())
def test_plausible_but_random_headers_only_raise_remote_protocol_error(frames):
    try:
        message = decode(frames)
    except RemoteProtocolError:
        return
    # Whatever passes validation re-encodes to an equivalent message.
    assert decode(frames_of(message)) == message


def test_a_header_unpacked_already_is_taken_as_it_is():
    """``decode(..., header=)`` builds the same message from the caller's unpacked header,
    and the header is not unpacked again (frame 0 may then be anything)."""
    msg = Result("r1", "p1", np.arange(8, dtype=np.uint8), 3)
    frames = encode(msg)
    header = decode_header(frames[0])
    got = decode([b"not msgpack", frames[1]], header=header)
    assert got == msg and got.payload.tobytes() == msg.payload.tobytes()
    with pytest.raises(RemoteProtocolError, match="not accepted here"):
        decode(frames, allowed=(Share,), header=header)
