"""The peer's session on its own: every transition, and illegal messages change nothing.

:class:`PeerSession` is driven directly, as the shell drives it, with a fake
clock and no sockets; rounds between several sessions run over the one
in-memory network of the tests (``_faultnet.FaultSim``, which also runs the
fault matrix), with plain and with sealed wires.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lightning_secagg import codec
from lightning_secagg.errors import (
    LocalProtocolError,
    PeerIdInUseError,
    RemoteProtocolError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SchemaMismatchError,
    SignupRejectedError,
)
from lightning_secagg.messages import (
    Abort,
    Assignment,
    Done,
    Heartbeat,
    Leave,
    Rejoin,
    Share,
    SignupAck,
    SignupRejected,
)
from lightning_secagg.peer import make_contribution
from lightning_secagg.protocol.peer_session import (
    Disconnect,
    PeerSession,
    Retrying,
    State,
    ToScheduler,
    is_retryable,
)
from lightning_secagg.schema import DEFAULT_FRAC_BITS
from lightning_secagg.sealing import RoundKey
from lightning_secagg.security import KeyPair
from lightning_secagg.tree import build_tree
from lightning_secagg.wire import PlainWire, SealedWire, Transmit

from ._faultnet import FaultSim, close
from .memnet import seeded_bytes

pytestmark = pytest.mark.timeout(60)

SD = {"w": torch.tensor([0.5, -1.25, 3.0]), "n": torch.tensor([4, -2], dtype=torch.int64)}
IDS = ["me", "q0", "q1", "q2"]
HEARTBEAT = 1.0
TIMEOUT = 30.0


def session(secure: bool = False, pid: str = "me") -> PeerSession:
    return PeerSession(
        pid,
        "s",
        f"tcp://127.0.0.1:{7000 + IDS.index(pid)}",
        KeyPair.generate().public if secure else "",
        SealedWire() if secure else PlainWire(),
        random_bytes=seeded_bytes(1),
        heartbeat_interval=HEARTBEAT,
        frac_bits=DEFAULT_FRAC_BITS,
    )


def begun(secure: bool = False, *, retries: int = 0, ring: str = "64") -> PeerSession:
    s = session(secure)
    s.begin(make_contribution(SD, 2.0, ring=ring), 0.0, timeout=TIMEOUT, max_retries=retries)
    return s


def queued(secure: bool = False, *, retries: int = 0) -> PeerSession:
    s = begun(secure, retries=retries)
    s.receive_scheduler(SignupAck("s", "me", 1), 0.1)
    return s


def assignment(s: PeerSession, round_id: str = "r1", **changes) -> Assignment:
    """A well-formed assignment of ``s`` with three other members (me splits at level 0)."""
    tree = build_tree(IDS, 4, 2, random.Random(0))
    keys = [RoundKey().public for _ in IDS]
    if s.wire.secure and s._attempt is not None:
        keys[0] = s._attempt.round_key.public
    fields = {
        "session": "s",
        "round_id": round_id,
        "members": [
            [p, f"tcp://127.0.0.1:{7000 + i}", KeyPair.generate().public if s.wire.secure else ""]
            for i, p in enumerate(IDS)
        ],
        "tree": tree.to_wire(),
        "group_size": 4,
        "num_actors": 2,
        "total_weight": 8.0,
        "deadline_s": 20.0,
        "ring_bits": 64,
        "exponents": None,
        "round_keys": keys if s.wire.secure else None,
    }
    fields.update(changes)
    return Assignment(**fields)


def in_round(secure: bool = False, *, retries: int = 0) -> tuple[PeerSession, list]:
    s = queued(secure, retries=retries)
    out = s.receive_scheduler(assignment(s), 0.2)
    assert s.state is State.IN_ROUND
    return s, out


def snapshot(s: PeerSession) -> dict:
    """Everything a message could change, compared before and after an illegal one."""
    att = s._attempt
    rnd = att.round if att is not None else None
    return {
        "state": s.state,
        "acked": att.acked if att else None,
        "signup_sent": att.signup_sent if att else None,
        "deadline": att.deadline if att else None,
        "round": rnd.assignment.round_id if rnd else None,
        "shared": rnd.state.shared if rnd else None,
        "finished": list(s._finished),
        "early": [(i.round_id, i.sender) for i in s.early],
        "error": s.error,
        "failures": s.failures,
    }


def kinds(outputs: list) -> list[str]:
    out = []
    for o in outputs:
        if isinstance(o, ToScheduler):
            out.append(o.message.TYPE)
        elif isinstance(o, Transmit):
            out.append(f"->{o.to}:{o.what}")
        elif isinstance(o, Disconnect):
            out.append("disconnect")
        elif isinstance(o, Retrying):
            out.append("retrying")
    return out


# -- IDLE ---------------------------------------------------------------------------


def test_an_idle_session_waits_for_nothing():
    s = session()
    assert s.state is State.IDLE and not s.active
    assert s.next_deadline() is None
    assert s.tick(1e9) == []


def test_begin_signs_up_with_the_model_and_a_fresh_round_key():
    plain = session()
    out = plain.begin(make_contribution(SD, 2.0, ring="64"), 0.0, timeout=TIMEOUT)
    assert kinds(out) == ["signup"] and plain.state is State.SIGNING_UP
    signup = out[0].message
    assert signup.round_key == "" and signup.weight == 2.0
    assert signup.schema == make_contribution(SD, 1.0).schema.to_wire()
    assert plain.next_deadline() == pytest.approx(HEARTBEAT)
    sealed = session(secure=True)
    first = sealed.begin(make_contribution(SD, 1.0), 0.0, timeout=TIMEOUT)[0].message.round_key
    again = session(secure=True)
    second = again.begin(make_contribution(SD, 1.0), 0.0, timeout=TIMEOUT)[0].message.round_key
    assert first != "" and second != "" and first != second


def test_ring_auto_declares_exponents_and_ring_64_does_not():
    assert begun(ring="auto")._attempt.signup.exponents is not None
    assert begun(ring="64")._attempt.signup.exponents is None


def test_begin_twice_is_a_local_error():
    s = begun()
    with pytest.raises(LocalProtocolError, match="already in progress"):
        s.begin(make_contribution(SD, 1.0), 0.0, timeout=TIMEOUT)


# -- SIGNING_UP / QUEUED ------------------------------------------------------------------


def test_ack_queues_and_only_our_own():
    s = begun()
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):
        s.receive_scheduler(SignupAck("s", "someone-else", 1), 0.1)
    assert snapshot(s) == before
    assert s.receive_scheduler(SignupAck("s", "me", 3), 0.1) == []
    assert s.state is State.QUEUED
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):  # a second ack makes no sense
        s.receive_scheduler(SignupAck("s", "me", 3), 0.2)
    assert snapshot(s) == before


def test_an_assignment_before_our_ack_is_stale():
    s = begun()
    before = snapshot(s)
    assert s.receive_scheduler(assignment(s), 0.1) == []
    assert snapshot(s) == before


@pytest.mark.parametrize("secure", [False, True])
def test_an_assignment_starts_the_round_and_its_shares_go_out(secure):
    s, out = in_round(secure)
    assert s.round is not None and s.round.assignment.round_id == "r1"
    tree = s.round.state.tree
    group = tree.group_of("me", 0)
    assert tree.splits_in(group, "me")  # the test's tree: me is no actor, so it splits
    # one share (a dense one or a seed) to each actor of its group
    assert sorted(kinds(out)) == sorted(f"->{a}:share" for a in group.actors)
    assert s.next_deadline() is not None


ILLEGAL_ASSIGNMENTS = {
    "another session": {"session": "t"},
    "does not name us": {
        "members": [[p, f"tcp://127.0.0.1:{7000 + i}", ""] for i, p in enumerate(["x", *IDS[1:]])]
    },
    "tree and members differ": {"tree": build_tree(["me", "q0", "q1", "zz"], 4, 2).to_wire()},
    "total weight below our own": {"total_weight": 1.0},
    "32-bit ring we did not ask for": {"ring_bits": 32, "exponents": [0, 3]},
    "malformed tree": {"tree": [[[["me"], ["me"]]]]},
}


@pytest.mark.parametrize("case", list(ILLEGAL_ASSIGNMENTS))
def test_an_unacceptable_assignment_changes_nothing(case):
    s = queued()
    bad = assignment(s, **ILLEGAL_ASSIGNMENTS[case])
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):
        s.receive_scheduler(bad, 0.2)
    assert snapshot(s) == before and s.state is State.QUEUED


@pytest.mark.parametrize(
    "case", ["keys missing", "our key not relayed", "a member without a CURVE key", "bad key"]
)
def test_a_sealed_session_refuses_an_assignment_with_bad_keys(case):
    s = queued(secure=True)
    good = assignment(s)
    keys = list(good.round_keys)
    if case == "keys missing":
        bad = assignment(s, round_keys=None)
    elif case == "our key not relayed":
        bad = assignment(s, round_keys=[RoundKey().public, *keys[1:]])
    elif case == "a member without a CURVE key":
        members = copy.deepcopy(good.members)
        members[1][2] = ""
        bad = assignment(s, members=members)
    else:
        bad = assignment(s, round_keys=[keys[0], *["0" * 40] * 3])
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):
        s.receive_scheduler(bad, 0.2)
    assert snapshot(s) == before


def test_a_second_assignment_in_a_round_changes_nothing():
    s, _ = in_round()
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError, match="second assignment"):
        s.receive_scheduler(assignment(s, "r2"), 0.3)
    assert snapshot(s) == before


def test_rejoin_signs_up_again_once_per_ack():
    s = queued()
    out = s.receive_scheduler(Rejoin("s", "me"), 0.5)
    assert kinds(out) == ["signup"] and s.state is State.SIGNING_UP
    # Rejoins queued before our new sign-up was seen are stale ...
    assert s.receive_scheduler(Rejoin("s", "me"), 0.6) == []
    # ... unless the scheduler stays silent for five heartbeats.
    assert kinds(s.receive_scheduler(Rejoin("s", "me"), 0.5 + 5 * HEARTBEAT + 0.1)) == ["signup"]


def test_rejoin_in_a_round_changes_nothing():
    s, _ = in_round()
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):
        s.receive_scheduler(Rejoin("s", "me"), 0.3)
    assert snapshot(s) == before


@pytest.mark.parametrize(
    ("code", "error", "retried"),
    [
        ("schema_mismatch", SchemaMismatchError, False),
        ("bad_key", SignupRejectedError, False),
        ("id_in_use", PeerIdInUseError, True),
    ],
)
def test_a_refusal_fails_the_call_and_is_retried_only_if_it_may_pass(code, error, retried):
    s = begun(retries=2)
    out = s.receive_scheduler(SignupRejected("s", "me", code, "because"), 0.1)
    if retried:
        assert kinds(out) == ["retrying", "signup"] and s.state is State.SIGNING_UP
        assert isinstance(s.failures[0], error)
    else:
        assert out == [] and s.state is State.FAILED and isinstance(s.error, error)
        assert not is_retryable(s.error)


def test_someone_elses_refusal_changes_nothing():
    s = begun()
    before = snapshot(s)
    with pytest.raises(RemoteProtocolError):
        s.receive_scheduler(SignupRejected("s", "other", "schema_mismatch", "x"), 0.1)
    assert snapshot(s) == before


def test_messages_a_peer_never_accepts_from_the_scheduler():
    s = queued()
    before = snapshot(s)
    for msg in (Heartbeat("s", "me", None), Leave("s", "me"), Done("r1", "me", 1.0, 1, 1)):
        with pytest.raises(RemoteProtocolError, match="does not accept"):
            s.receive_scheduler(msg, 0.2)
    assert snapshot(s) == before


# -- IN_ROUND: aborts, deadlines, failures ---------------------------------------------------


def test_an_abort_of_our_round_fails_the_call_and_closes_its_links():
    s, _ = in_round()
    out = s.receive_scheduler(Abort("r1", "q0", "gave up"), 0.4)
    assert kinds(out) == ["disconnect"]
    assert s.state is State.FAILED and isinstance(s.error, RoundAbortedError)
    assert "gave up" in str(s.error)
    assert out[0].endpoints == tuple(sorted(f"tcp://127.0.0.1:{7000 + i}" for i in range(4)))


def test_an_abort_with_retries_left_signs_up_again():
    s, _ = in_round(retries=1)
    out = s.receive_scheduler(Abort("r1", "q0", "gave up"), 0.4)
    assert kinds(out) == ["disconnect", "retrying", "signup"]
    assert s.state is State.SIGNING_UP and len(s.failures) == 1
    # the failed round is over for good: its assignment and its messages are stale
    s.receive_scheduler(SignupAck("s", "me", 1), 0.5)
    assert s.receive_scheduler(assignment(s, "r1"), 0.6) == []
    assert s.state is State.QUEUED


def test_an_abort_of_another_round_only_marks_it_finished():
    s = queued()
    assert s.receive_scheduler(Abort("r0", "x", "elsewhere"), 0.2) == []
    assert s.state is State.QUEUED
    assert s.receive_scheduler(assignment(s, "r0"), 0.3) == []  # never joined later
    assert s.state is State.QUEUED


def test_heartbeats_while_queued_and_in_a_round():
    s = queued()
    assert s.next_deadline() == pytest.approx(HEARTBEAT)
    (beat,) = [o.message for o in s.tick(HEARTBEAT)]
    assert beat == Heartbeat("s", "me", None)
    assert s.tick(HEARTBEAT + 0.5) == []  # not due yet
    s.receive_scheduler(assignment(s), 1.2)
    (beat,) = [o.message for o in s.tick(2 * HEARTBEAT + 0.1)]
    assert beat == Heartbeat("s", "me", "r1")


def test_waiting_past_the_deadline_leaves_the_queue_with_a_timeout():
    s = queued()
    out = s.tick(TIMEOUT)
    assert kinds(out) == ["leave"]
    assert s.state is State.FAILED and isinstance(s.error, RoundTimeoutError)
    assert "round assignment" in str(s.error) and s.next_deadline() is None


def test_a_missed_phase_deadline_aborts_the_round():
    s, _ = in_round()
    due = s.next_deadline()
    while due is not None and s.active:
        out = s.tick(due)
        due = s.next_deadline()
    assert kinds(out)[0] == "abort" and "disconnect" in kinds(out)
    assert isinstance(s.error, RoundTimeoutError) and "missed the deadline of phase" in str(s.error)


def test_timeouts_over_retries_say_the_time_waited_over_all_attempts():
    s = queued(retries=1)
    s.tick(TIMEOUT)  # first attempt: timeout, retried
    assert s.state is State.SIGNING_UP
    s.tick(2 * TIMEOUT)
    assert s.state is State.FAILED
    assert "60.0 s over 2 attempts" in str(s.error)


def test_a_member_we_cannot_send_to_fails_the_round():
    s, _ = in_round()
    out = s.transmit_failed("q0", "queue full", 0.3)
    assert kinds(out) == ["abort", "disconnect"]
    assert "cannot send to member q0" in out[0].message.reason
    assert type(s.error) is RoundFailedError


# -- peer traffic ----------------------------------------------------------------------------


def test_messages_of_an_unassigned_round_wait_and_are_fed_once_assigned():
    sim = FaultSim(4, None, seed=5, group_size=4, num_actors=2)
    outcomes = sim.run()
    assert all(o is not None and o.ok for o in outcomes.values())
    # and in isolation: a share that arrives before the assignment is kept
    s = queued()
    share = Share("r1", 0, 0, "q0", b"\x01" * 32, None, 0)
    item = PlainWire.parse([bytes(f) for f in codec.encode(share)])
    assert s.receive_peer(item, 0.1) == []
    assert [i.sender for i in s.early] == ["q0"]
    s.receive_scheduler(assignment(s), 0.2)
    assert s.early == []  # fed to the round (and dropped there if it is not for us)


def test_messages_of_a_finished_round_are_dropped():
    s, _ = in_round()
    s.receive_scheduler(Abort("r1", "q0", "x"), 0.3)
    share = Share("r1", 0, 0, "q0", b"\x01" * 32, None, 0)
    item = PlainWire.parse([bytes(f) for f in codec.encode(share)])
    assert s.receive_peer(item, 0.4) == []
    assert s.early == []


def test_a_message_of_another_round_during_ours_changes_nothing():
    s, _ = in_round()
    before = snapshot(s)
    item = PlainWire.parse([bytes(f) for f in codec.encode(Share("r9", 0, 0, "q0", b"\1" * 32))])
    with pytest.raises(RemoteProtocolError, match="not ours"):
        s.receive_peer(item, 0.3)
    assert snapshot(s) == before


def test_a_sealed_message_from_a_stranger_changes_nothing():
    s, _ = in_round(secure=True)
    before = snapshot(s)
    stranger = RoundKey()
    link = stranger.links("r1", "mallory", {"me": s._attempt.round_key.public})["me"][0]
    frames = link.seal(codec.encode(Share("r1", 0, 0, "mallory", b"\1" * 32)))
    with pytest.raises(RemoteProtocolError, match="from mallory: not a member of round r1"):
        s.receive_peer(SealedWire.parse(frames), 0.3)
    assert snapshot(s) == before


# -- whole rounds over the in-memory network -------------------------------------------------


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize(("n", "g", "k"), [(3, 3, 2), (7, 3, 2), (8, 4, 3)])
def test_sessions_complete_a_round_with_identical_exact_results(secure, n, g, k):
    sim = FaultSim(n, None, seed=n, group_size=g, num_actors=k, secure=secure)
    outcomes = sim.run()
    results = [o.result for o in outcomes.values() if o is not None and o.ok]
    assert len(results) == n
    members = next(iter(outcomes.values())).members
    assert close(results[0], sim.mean_of(members))
    for r in results[1:]:
        assert all(torch.equal(r[name], results[0][name]) for name in r)
    for peer in sim.peers.values():
        assert peer.session.state is State.DONE and peer.session.next_deadline() is None
