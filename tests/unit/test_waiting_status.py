"""Waiting says what it waits for: leaving for good, the waiting status, "too few peers".

The scheduler's rule (``SchedulerState``'s docstring) and the peer's side
(``PeerSession``) are driven with an injected clock, no sockets.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lightning_secagg import codec
from lightning_secagg.errors import RemoteProtocolError, TooFewPeersError
from lightning_secagg.messages import (
    MAX_LEFT_IDS,
    MESSAGE_TYPES,
    Assignment,
    Farewell,
    HeaderError,
    Heartbeat,
    SignupRejected,
    WaitingStatus,
)
from lightning_secagg.protocol.peer_session import State, describe_waiting, is_retryable
from lightning_secagg.protocol.scheduler_state import DEFAULT_LEAVE_GRACE, SchedulerState
from lightning_secagg.schema import Schema
from tests.unit.test_peer_session import begun, kinds, queued, snapshot
from tests.unit.test_scheduler_state import SCHEMA, Clock, conn, messages, signup

pytestmark = pytest.mark.timeout(60)

OTHER = Schema.of({"w": torch.zeros(4), "n": torch.zeros((), dtype=torch.int64)})


def make(min_size: int = 3, target: int = 3, queue_wait: float = 2.0, **kw):
    clock = Clock()
    counter = itertools.count(1)
    state = SchedulerState(
        target,
        3,
        2,
        round_timeout=60.0,
        min_size=min_size,
        queue_wait=queue_wait,
        clock=clock,
        rng=random.Random(0),
        new_round_id=lambda: f"round-{next(counter)}",
        **kw,
    )
    return state, clock


def leave(state, c: bytes, pid: str, session: str = "s"):
    """A peer that signed up from ``c`` earlier (its round since finished) leaves for good."""
    state._signed_up[(session, pid)] = c
    return state.receive(c, Farewell(session, pid))


def test_nobody_can_say_that_another_peer_left():
    state, clock = make()
    state.receive(conn(1), signup(1))
    state.receive(conn(2), signup(2))
    for c, pid in [(conn(7), "p3"), (conn(7), "p1"), (conn(2), "p1")]:
        with pytest.raises(RemoteProtocolError, match="another connection"):
            state.receive(c, Farewell("s", pid))
    clock.now += 100.0
    assert refused(state.tick()) == {} and state.leavers == {} and state.queued("s") == 2


def refused(out) -> dict[bytes, SignupRejected]:
    return {c: m for c, m in messages(out, SignupRejected)}


def test_a_finished_peer_leaves_the_others_told_too_few_within_the_queue_wait():
    state, clock = make()
    for i in (1, 2):
        state.receive(conn(i), signup(i))
    clock.now += 30.0  # slow to start: no leaver, nobody is refused however long
    assert refused(state.tick()) == {}
    left_at = clock.now
    assert leave(state, conn(3), "p3") == []
    assert state.next_deadline() == pytest.approx(left_at + 2.0)
    clock.now = left_at + 1.99
    assert refused(state.tick()) == {}
    clock.now = left_at + 2.0
    out = refused(state.tick())
    assert set(out) == {conn(1), conn(2)}
    msg = out[conn(1)]
    assert msg.code == "too_few_peers" and msg.peer_id == "p1"
    assert "2 wait with your model" in msg.reason and "at least 3" in msg.reason
    assert "p3 left for good" in msg.reason
    assert state.queued("s") == 0 and state.queued_total == 0 and not state.schemas


def test_a_slow_federation_without_a_leaver_is_never_refused():
    state, clock = make()
    state.receive(conn(1), signup(1))
    for _ in range(5):
        clock.now += 1000.0
        assert refused(state.tick()) == {}
    assert state.queued("s") == 1


def test_peers_that_still_come_within_the_grace_keep_the_session():
    state, clock = make()
    state.receive(conn(1), signup(1))
    leave(state, conn(9), "p9")
    clock.now += 1.0
    state.receive(conn(2), signup(2))
    out = state.receive(conn(3), signup(3))
    assert len(messages(out, Assignment)) == 3


def test_a_leaver_that_signs_up_again_is_no_leaver():
    state, clock = make()
    state.receive(conn(1), signup(1))
    leave(state, conn(3), "p3")
    state.receive(conn(3), signup(3))
    clock.now += 100.0
    assert refused(state.tick()) == {}
    assert "s" not in state.leavers


def test_the_grace_counts_from_the_oldest_sign_up_too():
    # A leave long ago, and a peer that signs up now: it gets its own grace.
    state, clock = make()
    leave(state, conn(9), "p9")
    clock.now += 100.0
    state.receive(conn(1), signup(1))
    clock.now += 1.9
    assert refused(state.tick()) == {}
    clock.now += 0.1
    assert set(refused(state.tick())) == {conn(1)}


def test_a_leave_is_forgotten_after_leaver_memory():
    state, clock = make(leaver_memory=50.0)
    leave(state, conn(9), "p9")
    clock.now += 50.0
    state.tick()
    assert state.leavers == {}
    state.receive(conn(1), signup(1))
    clock.now += 10.0
    assert refused(state.tick()) == {}


def test_without_a_queue_wait_the_grace_is_the_default():
    state, clock = make(min_size=3, queue_wait=0.0)
    state.receive(conn(1), signup(1))
    leave(state, conn(9), "p9")
    assert state.next_deadline() == pytest.approx(clock.now + DEFAULT_LEAVE_GRACE)


def test_a_queued_peer_that_leaves_for_good_is_dropped_at_once():
    state, _ = make()
    state.receive(conn(1), signup(1))
    state.receive(conn(2), signup(2))
    with pytest.raises(RemoteProtocolError):
        state.receive(conn(5), Farewell("s", "p1"))  # not its connection
    assert state.queued("s") == 2
    state.receive(conn(1), Farewell("s", "p1"))
    assert state.queued("s") == 1 and [p for p, _ in state.leavers["s"]] == ["p1"]


def test_the_other_schema_is_counted_and_only_the_short_group_is_refused():
    state, clock = make()
    state.receive(conn(1), signup(1, schema=OTHER))
    leave(state, conn(9), "p9")
    clock.now += 2.0
    out = refused(state.tick())
    assert set(out) == {conn(1)}
    assert "1 wait with your model" in out[conn(1)].reason
    assert "different model schema" not in out[conn(1)].reason
    state.receive(conn(2), signup(2))
    state.receive(conn(3), signup(3))
    state.receive(conn(4), signup(4, schema=OTHER))
    clock.now += 2.0
    out = refused(state.tick())
    assert set(out) == {conn(2), conn(3), conn(4)}
    assert "1 wait with a different model schema" in out[conn(2)].reason
    assert "2 wait with a different model schema" in out[conn(4)].reason


def test_leavers_are_bounded_and_a_heartbeat_answers_the_waiting_status():
    state, _ = make(min_size=3, target=5)
    state.receive(conn(1), signup(1))
    state.receive(conn(2), signup(2, schema=OTHER))
    for i in range(MAX_LEFT_IDS + 5):
        leave(state, conn(100 + i), f"x{i}")
    (out,) = state.receive(conn(1), Heartbeat("s", "p1", None))
    status = out.message
    assert out.conn == conn(1) and isinstance(status, WaitingStatus)
    assert (status.waiting, status.others, status.target_size, status.min_size) == (1, 1, 5, 3)
    assert status.left == [f"x{i}" for i in range(5, MAX_LEFT_IDS + 5)]
    line = describe_waiting(status)
    assert "1 peer(s) with this model" in line and "round of 5" in line
    assert "1 wait with a different model schema" in line and "x5" in line


def test_the_new_messages_round_trip_and_their_bounds_hold():
    for msg in (
        Farewell("s", "p1"),
        WaitingStatus("s", "p1", 2, 1, 3, 3, ["p3"]),
    ):
        assert MESSAGE_TYPES[msg.TYPE] is type(msg)
        assert codec.decode(codec.encode(msg)) == msg
    bad = WaitingStatus("s", "p1", 2, 1, 3, 3, ["p"] * (MAX_LEFT_IDS + 1)).header()
    with pytest.raises(HeaderError, match="left"):
        WaitingStatus.from_header(bad, None)


def test_too_few_peers_fails_the_call_at_once_and_is_not_retried():
    s = begun(retries=3)
    out = s.receive_scheduler(SignupRejected("s", "me", "too_few_peers", "p3 left"), 0.1)
    assert out == [] and s.state is State.FAILED
    assert isinstance(s.error, TooFewPeersError) and not is_retryable(s.error)
    assert "p3 left" in str(s.error)


def test_the_session_keeps_the_status_logs_it_on_change_and_says_it_on_timeout(caplog):
    s = queued()
    status = WaitingStatus("s", "me", 2, 0, 3, 3, ["p3"])
    with caplog.at_level("INFO", logger="lightning_secagg.protocol.peer_session"):
        assert s.receive_scheduler(status, 1.0) == []
        assert s.receive_scheduler(status, 2.0) == []
    assert s.waiting_status == status
    assert sum("left for good: p3" in r.getMessage() for r in caplog.records) == 1
    out = s.tick(1e9)
    assert s.state is State.FAILED and "last status: 2 peer(s)" in str(s.error)
    assert "leave" in kinds(out)


def test_someone_elses_status_changes_nothing():
    s = queued()
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):
        s.receive_scheduler(WaitingStatus("s", "other", 1, 0, 3, 3, []), 0.1)
    assert snapshot(s) == before


def test_farewell_names_the_session_and_the_peer():
    s = queued()
    (out,) = s.farewell()
    assert out.message == Farewell("s", "me")


# -- a wrong-architecture peer is told at once (issue 22, item 2) ---------------------


def test_a_pinned_scheduler_names_the_difference_when_it_holds_the_pinned_schema():
    state, _ = make(schema_fingerprint=SCHEMA.fingerprint())
    (lone,) = refused(state.receive(conn(2), signup(2, schema=OTHER))).values()
    assert lone.code == "schema_mismatch" and "has shape" not in lone.reason  # nothing to compare
    state.receive(conn(1), signup(1))
    (msg,) = refused(state.receive(conn(2), signup(2, schema=OTHER))).values()
    assert msg.code == "schema_mismatch"
    assert SCHEMA.fingerprint() in msg.reason and "'w' has shape [4], expected [3]" in msg.reason


def test_a_first_comer_with_another_model_is_told_when_the_majority_signs_up():
    state, _ = make()
    state.receive(conn(1), signup(1, schema=OTHER))
    assert messages(state.receive(conn(2), signup(2)), WaitingStatus) == []  # 1 against 1
    ((to, status),) = messages(state.receive(conn(3), signup(3)), WaitingStatus)
    assert to == conn(1) and (status.peer_id, status.waiting, status.others) == ("p1", 1, 2)
    out = state.receive(conn(4), signup(4))  # the correct peers' round forms regardless
    assert {c for c, _ in messages(out, Assignment)} == {conn(2), conn(3), conn(4)}
    assert state.queued("s") == 1


def test_a_peer_in_the_minority_warns(caplog):
    s = queued()
    with caplog.at_level("INFO", logger="lightning_secagg.protocol.peer_session"):
        s.receive_scheduler(WaitingStatus("s", "me", 1, 2, 3, 3, []), 1.0)
    (rec,) = [r for r in caplog.records if "different model" in r.getMessage()]
    assert rec.levelname == "WARNING" and "2 wait with a different model schema" in rec.getMessage()
