"""Property-based fuzzing of ``codec.decode``: any frames give a valid message or a
``RemoteProtocolError``, never another exception, never code execution.

Inputs: raw random frames; random msgpack documents (ext types included); and
mutations of real encoded messages (bytes flipped, cut or spliced, header
fields replaced with arbitrary values, frames added, dropped or swapped).
Run many more with ``SECAGG_FUZZ_EXAMPLES=20000 pytest tests/unit/test_fuzz_codec.py -s``;
the number of inputs tried is printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_secagg.cli import build_parser, scheduler_kwargs
from lightning_secagg.codec import MAX_HEADER_BYTES, MAX_PEER_HEADER_BYTES, decode, encode
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import (
    FROM_SCHEDULER,
    MESSAGE_TYPES,
    PEER_TO_PEER,
    TO_SCHEDULER,
    Abort,
    Assignment,
    Done,
    Leave,
    Message,
    Partial,
    Result,
    Share,
    Signup,
    SignupAck,
    SignupRejected,
)
from lightning_secagg.protocol.scheduler_state import SchedulerState
from lightning_secagg.scheduler import Scheduler

EXAMPLES = int(os.environ.get("SECAGG_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Bounded: about 5 ms per input on a slow core, with ample room.
pytestmark = pytest.mark.timeout(60 + EXAMPLES // 20)
COUNTS: Counter[str] = Counter()
KEY = "rq2Vv(Jh+dK*%5=Z#BKm2.^zR$&!y}5e{hA)vG>b"

VALID: list[Message] = [
    Signup("s", "p1", "tcp://127.0.0.1:5000", KEY, 2.5, 32, [["w", [3, 4], "float32"]]),
    SignupAck("s", "p1", 3),
    SignupRejected("s", "p1", "schema_mismatch", "why"),
    Assignment(
        "s",
        "r1",
        [[f"p{i}", f"tcp://127.0.0.1:{5000 + i}", KEY] for i in range(3)],
        [[[["p0", "p1", "p2"], ["p0", "p2"]]]],
        3,
        2,
        3.0,
        60.0,
    ),
    Leave("s", "p1"),
    Done("r1", "p1", 0.5, 10, 20),
    Abort("r1", "p1", "timeout"),
    Share("r1", 0, 0, "p1", bytes(range(32))),
    Share("r1", 0, 0, "p1", None, np.arange(5, dtype=np.uint64)),
    Partial("r1", "p0", np.arange(5, dtype=np.uint64)),
    Result("r1", "p0", np.arange(16, dtype=np.uint8)),
]
ALLOWED = [None, PEER_TO_PEER, TO_SCHEDULER, FROM_SCHEDULER]


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print(f"\nfuzz_codec inputs tried: {dict(COUNTS)} total={sum(COUNTS.values())}")


def as_bytes(frame: Any) -> bytes:
    return frame.tobytes() if isinstance(frame, np.ndarray) else bytes(frame)


def check(frames: list[Any], max_header: int, allowed: Any, label: str) -> None:
    """The property: a valid message (that survives a round trip) or RemoteProtocolError."""
    COUNTS[label] += 1
    try:
        message = decode(frames, max_header, allowed)
    except RemoteProtocolError as exc:
        assert str(exc)  # a reason for the log
        return
    assert isinstance(message, tuple(MESSAGE_TYPES.values()))
    if allowed is not None:
        assert isinstance(message, allowed)
    if isinstance(message, TO_SCHEDULER):
        feed_scheduler(message, label)
    again = decode([as_bytes(f) for f in encode(message)], max_header, allowed)
    assert again == message
    payload = getattr(message, "payload", None)
    if payload is not None:
        assert payload.tobytes() == as_bytes(frames[1])


def cli_scheduler_state() -> SchedulerState:
    """``SchedulerState`` exactly as ``lightning-secagg scheduler`` builds it (its defaults:
    ``round_timeout=None``, liveness and queue wait on)."""
    args = build_parser().parse_args(["scheduler", "--port", "0"])
    return Scheduler(**scheduler_kwargs(args)).state


SCHEDULER = cli_scheduler_state()


def feed_scheduler(message: Message, label: str) -> None:
    """Whatever decodes must be handled by the scheduler as the CLI runs it: a reply or
    ``RemoteProtocolError``, never another exception; a sign-up under its own key too."""
    COUNTS[f"{label}_to_scheduler"] += 1
    keys = [None] if label == "schemas" else [None, KEY, getattr(message, "public_key", None)]
    for key in keys:
        with contextlib.suppress(RemoteProtocolError):
            SCHEDULER.receive(b"fuzz", message, key)
        SCHEDULER.tick()
    assert SCHEDULER.queued_total <= SCHEDULER.max_queued


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and maps of ``inner`` (a named function: hypothesis misreads a wrapped lambda)."""
    return st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=50)
    | st.binary(max_size=64)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
    containers,
    max_leaves=20,
)
settings_for = st.sampled_from([MAX_PEER_HEADER_BYTES, MAX_HEADER_BYTES, 64])


@FUZZ
@given(
    st.lists(st.binary(max_size=200), max_size=4),
    settings_for,
    st.sampled_from(ALLOWED),
)
def test_random_frames(frames, max_header, allowed):
    check(frames, max_header, allowed, "random_frames")


@FUZZ
@given(msgpack_values, st.lists(st.binary(max_size=64), max_size=2), st.sampled_from(ALLOWED))
def test_random_msgpack_documents(value, extra, allowed):
    check([msgpack.packb(value, use_bin_type=True), *extra], MAX_HEADER_BYTES, allowed, "msgpack")


@FUZZ
@given(
    st.sampled_from(VALID),
    st.sampled_from(
        [
            "v",
            "t",
            "session",
            "round_id",
            "peer_id",
            "sender",
            "level",
            "group",
            "seed",
            "members",
            "tree",
            "schema",
            "weight",
            "frac_bits",
            "queued",
            "deadline_s",
            "total_weight",
            "reason",
            "code",
            "endpoint",
            "public_key",
            "bytes_sent",
            "seconds",
            "extra",
        ]
    ),
    msgpack_values,
    st.sampled_from(ALLOWED),
)
def test_header_fields_replaced(message, name, value, allowed):
    header = message.header()
    header[name] = value
    frames = [msgpack.packb(header, use_bin_type=True), *encode(message)[1:]]
    check(frames, MAX_HEADER_BYTES, allowed, "field_replaced")


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_messages(message, data):
    frames = [as_bytes(f) for f in encode(message)]
    ops = data.draw(
        st.lists(
            st.sampled_from(
                ["flip", "cut", "splice", "add_frame", "drop_frame", "swap", "grow_payload"]
            ),
            min_size=1,
            max_size=4,
        )
    )
    for op in ops:
        i = data.draw(st.integers(0, max(0, len(frames) - 1)))
        if op == "flip" and frames and frames[i]:
            pos = data.draw(st.integers(0, len(frames[i]) - 1))
            b = bytearray(frames[i])
            b[pos] ^= data.draw(st.integers(1, 255))
            frames[i] = bytes(b)
        elif op == "cut" and frames:
            frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
        elif op == "splice" and frames:
            pos = data.draw(st.integers(0, len(frames[i])))
            frames[i] = frames[i][:pos] + data.draw(st.binary(max_size=16)) + frames[i][pos:]
        elif op == "add_frame":
            frames.append(data.draw(st.binary(max_size=64)))
        elif op == "drop_frame" and frames:
            frames.pop(i)
        elif op == "swap" and len(frames) > 1:
            frames.reverse()
        elif op == "grow_payload" and len(frames) > 1:
            frames[1] = frames[1] * data.draw(st.integers(0, 3))
    check(frames, MAX_HEADER_BYTES, data.draw(st.sampled_from(ALLOWED)), "mutated")


def test_valid_messages_round_trip():
    for message in VALID:
        check([as_bytes(f) for f in encode(message)], MAX_HEADER_BYTES, None, "valid")


schema_entry = st.tuples(
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**40 - 1), st.just(2**39)), max_size=32),
    st.sampled_from(["float32", "float64", "int64", "bool", "bfloat16", "nope"]),
).map(list)


SESSIONS = iter(range(10**9))


@FUZZ
@given(
    st.lists(schema_entry, min_size=1, max_size=30),
    st.one_of(st.none(), st.lists(st.integers(-64, 64), min_size=1, max_size=30)),
)
def test_signups_with_arbitrary_schemas_reach_the_cli_scheduler(schema, exponents):
    """Finding 1 of issue 19: a round's worth of sign-ups with one arbitrary schema (27
    dimensions of 2**39, say) through the codec into the scheduler the CLI builds: each
    is refused or queued, and the round that forms has a finite deadline."""
    session = f"f{next(SESSIONS)}"
    rounds_before = set(SCHEDULER.rounds)
    for i in range(SCHEDULER.target_size):
        message = Signup(session, f"p{i}", "tcp://127.0.0.1:1", KEY, 1.0, 32, schema, exponents)
        check([as_bytes(f) for f in encode(message)], MAX_HEADER_BYTES, TO_SCHEDULER, "schemas")
    for rid in set(SCHEDULER.rounds) - rounds_before:
        COUNTS["schemas_round_formed"] += 1
        assert SCHEDULER.rounds[rid].deadline < float("inf")
        del SCHEDULER.rounds[rid]  # it will never finish; keep the state small
