"""The scheduler's sans-IO state: queues, rounds, schema checks, failures, injected clock."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lightning_secagg.errors import ConfigurationError, RemoteProtocolError
from lightning_secagg.messages import (
    Abort,
    Assignment,
    Done,
    Leave,
    Partial,
    Share,
    Signup,
    SignupAck,
    SignupRejected,
)
from lightning_secagg.protocol.scheduler_state import (
    SCHEDULER_ID,
    Outgoing,
    SchedulerState,
    format_tree,
)
from lightning_secagg.schema import Schema
from lightning_secagg.tree import AggregationTree, build_tree, check_tree

pytestmark = pytest.mark.timeout(60)

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
SCHEMA = Schema.of({"w": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_state(target: int = 3, g: int = 3, k: int = 2, timeout: float = 60.0):
    clock = Clock()
    counter = itertools.count(1)
    state = SchedulerState(
        target,
        g,
        k,
        round_timeout=timeout,
        clock=clock,
        rng=random.Random(0),
        new_round_id=lambda: f"round-{next(counter)}",
    )
    return state, clock


def conn(i: int) -> bytes:
    return f"conn-{i}".encode()


def signup(
    i: int,
    session: str = "s",
    weight: float = 1.0,
    schema: Schema = SCHEMA,
    key: str = "",
) -> Signup:
    return Signup(
        session, f"p{i}", f"tcp://127.0.0.1:{6000 + i}", key, weight, schema.frac_bits,
        schema.to_wire(),
    )  # fmt: skip


def messages(out: list[Outgoing], kind: type) -> list[tuple[bytes, object]]:
    return [(o.conn, o.message) for o in out if isinstance(o.message, kind)]


def sign_up_many(state: SchedulerState, ids, **kwargs) -> list[Outgoing]:
    out: list[Outgoing] = []
    for i in ids:
        out += state.receive(conn(i), signup(i, **kwargs))
    return out


# -- sign-up and round formation ----------------------------------------------------


def test_signup_is_acknowledged_with_the_queue_length():
    state, _ = make_state(target=4)
    out = state.receive(conn(0), signup(0))
    assert out == [Outgoing(conn(0), SignupAck("s", "p0", 1))]
    out = state.receive(conn(1), signup(1))
    assert out == [Outgoing(conn(1), SignupAck("s", "p1", 2))]
    assert state.queued("s") == 2
    assert state.queued("other") == 0
    assert state.rounds == {}


def test_round_forms_at_exactly_target_size():
    state, clock = make_state(target=4)
    out = sign_up_many(state, range(3))
    assert messages(out, Assignment) == []
    out = state.receive(conn(3), signup(3))
    acks = messages(out, SignupAck)
    assert acks == [(conn(3), SignupAck("s", "p3", 4))]
    assignments = messages(out, Assignment)
    assert sorted(c for c, _ in assignments) == [conn(i) for i in range(4)]
    a = assignments[0][1]
    assert all(m == a for _, m in assignments)  # everyone gets the same assignment
    assert a.round_id == "round-1"
    assert a.session == "s"
    assert sorted(m[0] for m in a.members) == ["p0", "p1", "p2", "p3"]
    assert {m[0]: m[1] for m in a.members}["p2"] == "tcp://127.0.0.1:6002"
    assert (a.group_size, a.num_actors, a.deadline_s) == (3, 2, 60.0)
    assert state.queued("s") == 0
    rnd = state.rounds["round-1"]
    assert rnd.deadline == clock.now + 60.0
    assert state.next_deadline() == clock.now + 60.0


def test_the_assigned_tree_passes_check_tree():
    state, _ = make_state(target=12, g=4, k=3)
    out = sign_up_many(state, range(12))
    a = messages(out, Assignment)[0][1]
    tree = AggregationTree.from_wire(a.tree, a.group_size, a.num_actors)
    check_tree(tree)
    assert sorted(tree.members) == sorted(m[0] for m in a.members)
    assert tree == state.rounds[a.round_id].tree
    assert tree.depth == 3


def test_total_weight_is_the_sum_of_weights():
    state, _ = make_state(target=3)
    weights = [1.0, 250.0, 0.125]
    out: list[Outgoing] = []
    for i, w in enumerate(weights):
        out += state.receive(conn(i), signup(i, weight=w))
    a = messages(out, Assignment)[0][1]
    assert a.total_weight == sum(weights)


def test_extra_peers_wait_for_the_next_round_fifo():
    state, _ = make_state(target=3)
    out = sign_up_many(state, range(5))
    first = messages(out, Assignment)
    assert sorted(m[0] for m in first[0][1].members) == ["p0", "p1", "p2"]
    assert state.queued("s") == 2
    # p3 and p4 (in sign-up order) are next; p5 completes the second round.
    out = state.receive(conn(5), signup(5))
    second = messages(out, Assignment)
    assert sorted(m[0] for m in second[0][1].members) == ["p3", "p4", "p5"]
    assert second[0][1].round_id == "round-2"
    assert set(state.rounds) == {"round-1", "round-2"}


def test_fifo_order_takes_the_oldest_first():
    state, _ = make_state(target=3)
    state.receive(conn(9), signup(9))
    state.receive(conn(8), signup(8))
    state.receive(conn(7), signup(7))  # a round of 9, 8, 7
    sign_up_many(state, [1, 2])
    state.receive(conn(3), signup(3))
    assert state.queued("s") == 0
    members = [sorted(r.members) for r in state.rounds.values()]
    assert members == [["p7", "p8", "p9"], ["p1", "p2", "p3"]]


def test_sessions_are_separate():
    state, _ = make_state(target=3)
    out = sign_up_many(state, [0, 1], session="a") + sign_up_many(state, [2, 3], session="b")
    assert messages(out, Assignment) == []
    assert (state.queued("a"), state.queued("b")) == (2, 2)
    out = state.receive(conn(4), signup(4, session="b"))
    a = messages(out, Assignment)[0][1]
    assert a.session == "b"
    assert sorted(m[0] for m in a.members) == ["p2", "p3", "p4"]
    assert state.queued("a") == 2


def test_sessions_may_use_different_models():
    state, _ = make_state(target=3)
    other = Schema.of({"x": torch.zeros(7)})
    out = sign_up_many(state, [0, 1], session="a")
    out += sign_up_many(state, [2, 3], session="b", schema=other)
    assert messages(out, SignupRejected) == []


# -- schema and key checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        (Schema.of({"w": torch.zeros(4), "n": torch.zeros((), dtype=torch.int64)}),
         "'w' has shape [4], expected [3]"),
        (Schema.of({"w": torch.zeros(3)}), "missing 'n'"),
        (Schema.of({"w": torch.zeros(3, dtype=torch.float64),
                    "n": torch.zeros((), dtype=torch.int64)}),
         "'w' has dtype float64, expected float32"),
        (Schema.of({"w": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)}, 20),
         "frac_bits 20 != 32"),
    ],
)  # fmt: skip
def test_another_schema_waits_apart_and_is_told_the_difference(other, fragment):
    """Queues are keyed by (session, schema): a peer with another model is queued on
    its own (it cannot get the others refused), and its ack says how it differs
    from the schema most peers wait with."""
    state, _ = make_state(target=3)
    state.receive(conn(0), signup(0))
    state.receive(conn(2), signup(2))
    out = state.receive(conn(1), signup(1, schema=other))
    assert len(out) == 1
    assert out[0].conn == conn(1)
    ack = out[0].message
    assert isinstance(ack, SignupAck)
    assert (ack.session, ack.peer_id, ack.queued) == ("s", "p1", 1)
    assert fragment in ack.note
    assert other.fingerprint() in ack.note
    assert SCHEMA.fingerprint() in ack.note
    assert state.queued("s") == 3 and state.rounds == {}
    out = state.receive(conn(3), signup(3))  # the third of the majority's schema
    a = messages(out, Assignment)[0][1]
    assert {m[0] for m in a.members} == {"p0", "p2", "p3"}
    assert state.queued("s") == 1


def test_a_pinned_schema_refuses_every_other(caplog):
    clock = Clock()
    state = SchedulerState(3, 3, 2, clock=clock, schema_fingerprint=SCHEMA.fingerprint())
    other = Schema.of({"w": torch.zeros(4)})
    out = state.receive(conn(1), signup(1, schema=other))
    (rej,) = [m for _, m in messages(out, SignupRejected)]
    assert rej.code == "schema_mismatch"
    assert SCHEMA.fingerprint() in rej.reason and other.fingerprint() in rej.reason
    assert state.queued("s") == 0
    assert messages(state.receive(conn(0), signup(0)), SignupAck)
    with pytest.raises(ConfigurationError, match="16 hex digits"):
        SchedulerState(3, 3, 2, clock=clock, schema_fingerprint="xyz")


def test_malformed_schema_is_rejected_as_bad_schema():
    state, _ = make_state()
    bad = Signup("s", "p0", "tcp://h:1", "", 1.0, 32, [["w", [2], "float128"]])
    out = state.receive(conn(0), bad)
    assert len(out) == 1
    assert isinstance(out[0].message, SignupRejected)
    assert out[0].message.code == "bad_schema"
    assert state.queued("s") == 0


def test_signup_key_must_be_the_connection_key():
    state, _ = make_state()
    out = state.receive(conn(0), signup(0, key=KEY), key="x" * 40)
    assert len(out) == 1
    assert isinstance(out[0].message, SignupRejected)
    assert out[0].message.code == "bad_key"
    assert state.queued("s") == 0
    out = state.receive(conn(0), signup(0, key=KEY), key=KEY)
    assert messages(out, SignupAck)


def test_a_round_key_that_is_not_z85_is_refused_and_good_ones_are_relayed():
    """A key in the Z85 alphabet whose groups overflow 32 bits would crash the
    members' key derivation: the scheduler refuses it at sign-up (``bad_key``)."""
    from lightning_secagg.sealing import RoundKey

    state, _ = make_state(target=3)
    bad = Signup("s", "p0", "tcp://h:1", "", 1.0, 32, SCHEMA.to_wire(), None, "#" * 40)
    out = state.receive(conn(0), bad)
    assert [o.message.code for o in out] == ["bad_key"]
    keys = [RoundKey().public for _ in range(3)]
    out = []
    for i, key in enumerate(keys):
        ok = Signup(
            "s", f"p{i}", f"tcp://h:{i + 1}", "", 1.0, 32, SCHEMA.to_wire(), None, key
        )  # fmt: skip
        out += state.receive(conn(i), ok)
    assignments = [m for _, m in messages(out, Assignment)]
    assert len(assignments) == 3 and all(a == assignments[0] for a in assignments)
    assignment = assignments[0]
    relayed = dict(zip([m[0] for m in assignment.members], assignment.round_keys, strict=True))
    assert relayed == {f"p{i}": key for i, key in enumerate(keys)}


def test_resignup_replaces_the_queued_entry():
    state, _ = make_state(target=3)
    state.receive(conn(0), signup(0))
    state.receive(conn(1), signup(1))
    out = state.receive(conn(10), signup(0, weight=5.0))  # p0 again, new connection
    assert out == [Outgoing(conn(10), SignupAck("s", "p0", 2))]
    assert state.queued("s") == 2
    out = state.receive(conn(2), signup(2))
    a = messages(out, Assignment)[0][1]
    assert {c for c, _ in messages(out, Assignment)} == {conn(1), conn(2), conn(10)}
    assert a.total_weight == 7.0
    assert {m[0]: m[1] for m in a.members}["p0"] == "tcp://127.0.0.1:6000"


def test_resignup_with_a_new_model_is_judged_against_the_others_not_itself():
    state, _ = make_state(target=3)
    state.receive(conn(0), signup(0))
    other = Schema.of({"x": torch.zeros(7)})
    out = state.receive(conn(0), signup(0, schema=other))
    assert out == [Outgoing(conn(0), SignupAck("s", "p0", 1))]
    out = state.receive(conn(1), signup(1))  # the old model: queued with its own kind
    assert out == [Outgoing(conn(1), SignupAck("s", "p1", 1))]
    assert state.queued("s") == 2


def test_signup_of_a_round_member_aborts_that_round():
    state, _ = make_state(target=3)
    sign_up_many(state, range(3))
    out = state.receive(conn(0), signup(0))
    aborts = messages(out, Abort)
    assert sorted(c for c, _ in aborts) == [conn(0), conn(1), conn(2)]
    assert all("p0 left the round and signed up again" in m.reason for _, m in aborts)
    assert state.rounds == {}
    assert state.aborted_rounds == 1
    assert state.queued("s") == 1


OTHER_KEY = "Y" * 40
THIRD_KEY = "Z" * 40


@pytest.mark.parametrize("where", ["queued", "in_round"])
def test_a_peer_id_belongs_to_the_key_that_holds_it(where):
    """Knowing a peer's id is not enough to take its place or abort its round."""
    state, _ = make_state(target=3)
    state.receive(conn(0), signup(0, key=KEY), key=KEY)
    if where == "in_round":
        state.receive(conn(1), signup(1, key=OTHER_KEY), key=OTHER_KEY)
        state.receive(conn(2), signup(2, key=THIRD_KEY), key=THIRD_KEY)
        assert len(state.rounds) == 1
    before_rounds, before_queue = dict(state.rounds), state.queued("s")
    out = state.receive(conn(9), signup(0, key=OTHER_KEY), key=OTHER_KEY)
    assert [(o.conn, o.message.code) for o in out] == [(conn(9), "id_in_use")]
    assert state.rounds == before_rounds and state.queued("s") == before_queue
    # The holder itself may sign up again, as before.
    out = state.receive(conn(0), signup(0, key=KEY), key=KEY)
    assert not messages(out, SignupRejected)


def test_a_released_peer_id_can_be_taken_by_a_new_key():
    state, _ = make_state(target=3)
    state.receive(conn(0), signup(0, key=KEY), key=KEY)
    state.receive(conn(0), Leave("s", "p0"), key=KEY)
    out = state.receive(conn(9), signup(0, key=OTHER_KEY), key=OTHER_KEY)
    assert messages(out, SignupAck)


# -- Done, Abort, Leave -------------------------------------------------------------------------


def formed(state: SchedulerState, ids=range(3)) -> str:
    out = sign_up_many(state, ids)
    return messages(out, Assignment)[0][1].round_id


def test_done_from_all_completes_the_round():
    state, _ = make_state()
    rid = formed(state)
    for i in range(2):
        assert state.receive(conn(i), Done(rid, f"p{i}", 1.0, 10, 10)) == []
        assert rid in state.rounds
    assert state.receive(conn(2), Done(rid, "p2", 1.0, 10, 10)) == []
    assert rid not in state.rounds
    assert state.completed_rounds == 1
    assert state.aborted_rounds == 0
    assert state.next_deadline() is None


def test_abort_from_a_member_aborts_for_all_others():
    state, _ = make_state(target=4)
    rid = formed(state, range(4))
    state.receive(conn(3), Done(rid, "p3", 1.0, 1, 1))  # p3 finished already
    out = state.receive(conn(1), Abort(rid, "p1", "timed out waiting for p2"))
    targets = sorted(c for c, _ in messages(out, Abort))
    assert conn(0) in targets and conn(2) in targets
    assert conn(3) not in targets  # it is done and no longer listening
    for _, m in messages(out, Abort):
        assert m.round_id == rid
        assert m.peer_id == SCHEDULER_ID
        assert "peer p1 gave up: timed out waiting for p2" in m.reason
    assert rid not in state.rounds
    assert state.aborted_rounds == 1
    # Late messages of the aborted round are refused.
    with pytest.raises(RemoteProtocolError, match="unknown round"):
        state.receive(conn(0), Done(rid, "p0", 1.0, 1, 1))


@pytest.mark.parametrize(
    "make_message",
    [
        lambda rid: (conn(0), Done("nope", "p0", 1.0, 1, 1)),
        lambda rid: (conn(0), Done(rid, "p1", 1.0, 1, 1)),  # someone else's id
        lambda rid: (conn(99), Done(rid, "p99", 1.0, 1, 1)),  # not a member
        lambda rid: (conn(0), Abort("nope", "p0", "x")),
        lambda rid: (conn(1), Abort(rid, "p0", "x")),  # p0's id from p1's connection
        lambda rid: (conn(99), Abort(rid, "p99", "x")),
        lambda rid: (conn(5), Leave("s", "p5")),  # not queued
        lambda rid: (conn(0), Leave("s", "p0")),  # in a round, not queued
        lambda rid: (conn(4), Leave("s", "p3")),  # queued, but another connection
        lambda rid: (conn(3), Leave("other", "p3")),  # wrong session
    ],
)
def test_bad_done_abort_leave_raise_and_change_nothing(make_message):
    state, _ = make_state()
    rid = formed(state)
    state.receive(conn(3), signup(3))
    before = (dict(state.rounds), state.queued("s"), state.completed_rounds, state.aborted_rounds)
    snapshot = {r: (dict(v.done), v.deadline) for r, v in state.rounds.items()}
    c, message = make_message(rid)
    with pytest.raises(RemoteProtocolError):
        state.receive(c, message)
    after = (dict(state.rounds), state.queued("s"), state.completed_rounds, state.aborted_rounds)
    assert after == before
    assert {r: (dict(v.done), v.deadline) for r, v in state.rounds.items()} == snapshot


@pytest.mark.parametrize(
    "message",
    [
        SignupAck("s", "p0", 1),
        SignupRejected("s", "p0", "x", "y"),
        Share("r", 0, 0, "p0", bytes(32)),
        Partial("r", "p0", None),
    ],
)
def test_scheduler_refuses_messages_not_meant_for_it(message):
    state, _ = make_state()
    with pytest.raises(RemoteProtocolError, match="scheduler does not accept"):
        state.receive(conn(0), message)


def test_leave_removes_from_the_queue():
    state, _ = make_state(target=3)
    sign_up_many(state, [0, 1])
    assert state.receive(conn(0), Leave("s", "p0")) == []
    assert state.queued("s") == 1
    out = sign_up_many(state, [2])
    assert messages(out, Assignment) == []  # p0 is gone: only two wait
    out = sign_up_many(state, [3])
    assert sorted(m[0] for m in messages(out, Assignment)[0][1].members) == ["p1", "p2", "p3"]


# -- deadlines and unreachable peers -------------------------------------------------------------


def test_tick_aborts_overdue_rounds_only():
    state, clock = make_state(target=3, timeout=30.0)
    rid1 = formed(state, range(3))
    clock.now += 10
    rid2 = formed(state, range(3, 6))
    state.receive(conn(0), Done(rid1, "p0", 1.0, 1, 1))
    assert state.next_deadline() == 1030.0
    clock.now = 1029.999
    assert state.tick() == []
    clock.now = 1030.0  # exactly at the deadline
    out = state.tick()
    assert sorted(c for c, _ in messages(out, Abort)) == [conn(1), conn(2)]
    assert all("no Done from p1, p2" in m.reason for _, m in messages(out, Abort))
    assert set(state.rounds) == {rid2}
    assert state.next_deadline() == 1040.0
    clock.now = 2000.0
    assert len(messages(state.tick(), Abort)) == 3
    assert state.rounds == {}
    assert state.next_deadline() is None
    assert state.aborted_rounds == 2


def test_unreachable_drops_queued_peers():
    state, _ = make_state(target=3)
    sign_up_many(state, [0, 1])
    sign_up_many(state, [2], session="other")
    assert state.unreachable(conn(1)) == []
    assert state.queued("s") == 1
    assert state.queued("other") == 1
    out = sign_up_many(state, [3])
    assert messages(out, Assignment) == []


def test_unreachable_aborts_the_rounds_of_that_peer():
    state, _ = make_state(target=3)
    rid = formed(state)
    out = state.unreachable(conn(2))
    aborts = messages(out, Abort)
    assert sorted(c for c, _ in aborts) == [conn(0), conn(1), conn(2)]
    assert all("peer p2 became unreachable" in m.reason for _, m in aborts)
    assert rid not in state.rounds
    assert state.unreachable(conn(2)) == []  # nothing left to do


def test_unknown_connection_unreachable_is_a_no_op():
    state, _ = make_state()
    formed(state)
    assert state.unreachable(b"nobody") == []
    assert len(state.rounds) == 1


# -- construction ------------------------------------------------------------------------------


def test_bad_parameters_refused():
    with pytest.raises(ConfigurationError, match="num_actors"):
        SchedulerState(3, 3, 3, clock=Clock())
    with pytest.raises(ConfigurationError, match="target_size"):
        SchedulerState(2, 3, 2, clock=Clock())


def test_default_round_ids_are_fresh():
    state = SchedulerState(3, 3, 2, clock=Clock())
    sign_up_many(state, range(6))
    ids = list(state.rounds)
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(len(r) == 16 for r in ids)


def test_format_tree():
    tree = build_tree(["a", "b", "c", "d", "e", "f"], 3, 2, random.Random(0))
    text = format_tree(tree)
    assert text.count("L0:") == 1 and text.count("L1:") == 1
    for pid in "abcdef":
        assert pid in text


def test_members_are_drawn_at_random_not_first_in_first_out():
    """With more compatible peers waiting than a round takes, the first comers do not
    decide the round: over seeds, the first round is not always the earliest three."""
    firsts = set()
    for seed in range(12):
        state, _ = make_state(target=6)
        state._rng = random.Random(seed)
        sign_up_many(state, range(5))
        state.target_size = 3  # now more wait than a round takes
        out = state.receive(conn(5), signup(5))
        rounds = [m for _, m in messages(out, Assignment)]
        assert len({r.round_id for r in rounds}) == 2
        first = min(rounds, key=lambda r: r.round_id)
        members = tuple(m[0] for m in first.members)
        assert len(members) == 3
        assert list(members) == sorted(members, key=lambda p: int(p[1:]))  # arrival order
        firsts.add(members)
    assert len(firsts) > 3
