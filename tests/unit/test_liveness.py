"""Liveness, smaller rounds, rejoin and derived deadlines in the sans-IO scheduler (fake clock)."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_secagg import codec
from lightning_secagg.cli import build_parser
from lightning_secagg.deadlines import (
    DEFAULT_POLICY,
    DeadlinePolicy,
    describe_phase,
    num_phases,
    phase_deadline,
)
from lightning_secagg.errors import ConfigurationError, RemoteProtocolError
from lightning_secagg.messages import (
    FROM_SCHEDULER,
    TO_SCHEDULER,
    Abort,
    Assignment,
    Done,
    Heartbeat,
    Rejoin,
    Share,
    Signup,
)
from lightning_secagg.protocol.scheduler_state import SchedulerState
from lightning_secagg.schema import Schema
from lightning_secagg.wire import PlainWire

from ._faultnet import Fault, FaultSim

SCHEMA = Schema.of({"w": torch.zeros(4)}, 16).to_wire()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_state(clock: Clock, **kw) -> SchedulerState:
    kw.setdefault("liveness_timeout", 3.0)
    return SchedulerState(6, 3, 2, clock=clock, rng=random.Random(0), **kw)


def signup(state: SchedulerState, pid: str) -> list:
    msg = Signup("s", pid, f"tcp://127.0.0.1:{7000 + int(pid[1:])}", "", 1.0, 16, SCHEMA)
    return state.receive(pid.encode(), msg)


def assignments(out: list) -> list[Assignment]:
    return [o.message for o in out if isinstance(o.message, Assignment)]


def test_heartbeat_keeps_a_queued_peer_and_silence_drops_it():
    clock = Clock()
    state = make_state(clock)
    signup(state, "p0")
    signup(state, "p1")
    clock.now = 2.0
    (answer,) = state.receive(b"p0", Heartbeat("s", "p0", None))  # its waiting status
    assert answer.conn == b"p0" and answer.message.waiting == 2
    assert state.next_deadline() == pytest.approx(3.0)  # p1's silence runs out first
    clock.now = 3.0
    state.tick()
    assert state.queued("s") == 1  # p1 dropped, p0 still alive
    clock.now = 5.0
    state.tick()
    assert state.queued("s") == 0


def test_a_dead_peer_is_never_put_into_a_round():
    clock = Clock()
    state = make_state(clock)
    for i in range(5):
        signup(state, f"p{i}")
    clock.now = 3.5  # all five silent for longer than the liveness timeout
    out = signup(state, "p5")
    assert assignments(out) == []
    assert state.queued("s") == 1


def test_smaller_round_forms_after_the_queue_wait():
    clock = Clock()
    state = make_state(clock, min_size=3, queue_wait=2.0)
    for i in range(4):
        clock.now = 0.1 * i
        signup(state, f"p{i}")
    assert state.next_deadline() == pytest.approx(2.0)
    clock.now = 1.9
    assert assignments(state.tick()) == []
    clock.now = 2.0
    out = state.tick()
    asg = assignments(out)[0]
    assert sorted(m[0] for m in asg.members) == ["p0", "p1", "p2", "p3"]
    assert state.queued("s") == 0


def test_below_min_size_nothing_forms():
    clock = Clock()
    state = make_state(clock, min_size=3, queue_wait=1.0, liveness_timeout=None)
    signup(state, "p0")
    signup(state, "p1")
    clock.now = 100.0
    assert assignments(state.tick()) == []


def test_a_silent_member_aborts_its_round_for_everyone():
    clock = Clock()
    state = make_state(clock)
    for i in range(6):
        out = signup(state, f"p{i}")
    asg = assignments(out)[0]
    clock.now = 2.0
    for i in range(5):  # p5 stays silent
        state.receive(f"p{i}".encode(), Heartbeat("s", f"p{i}", asg.round_id))
    clock.now = 3.0
    out = state.tick()
    aborts = [o for o in out if isinstance(o.message, Abort)]
    assert len(aborts) == 6
    assert "p5 silent" in aborts[0].message.reason
    assert state.rounds == {}


def test_finished_members_need_no_heartbeat():
    clock = Clock()
    state = make_state(clock)
    for i in range(6):
        out = signup(state, f"p{i}")
    asg = assignments(out)[0]
    for i in range(6):
        state.receive(f"p{i}".encode(), Done(asg.round_id, f"p{i}", 0.1, 1, 1))
    clock.now = 100.0
    assert state.tick() == []
    assert state.completed_rounds == 1


def test_unknown_peer_is_asked_to_rejoin_but_not_in_a_round():
    clock = Clock()
    state = make_state(clock)
    (out,) = state.receive(b"x", Heartbeat("s", "p9", None))
    assert out.message == Rejoin("s", "p9")
    assert state.receive(b"x", Heartbeat("s", "p9", "gone-round")) == []


def test_derived_deadline_scales_with_model_size_and_depth():
    small = DEFAULT_POLICY.round_budget(8 * 10, depth=2, group_size=3)
    big = DEFAULT_POLICY.round_budget(8 * 10_000_000, depth=2, group_size=3)
    deep = DEFAULT_POLICY.round_budget(8 * 10, depth=14, group_size=3)
    assert small == pytest.approx(20.0, abs=0.1)
    assert big > small + 30 and deep > small + 40
    assert DeadlinePolicy(max_s=30).round_budget(8 * 10**9, 3, 3) == 30
    clock = Clock()
    state = make_state(clock, round_timeout=None)
    for i in range(6):
        out = signup(state, f"p{i}")
    asg = assignments(out)[0]
    assert asg.deadline_s == pytest.approx(DEFAULT_POLICY.round_budget(8 * 5, 2, 3))


def test_phase_deadlines_split_the_round():
    depth = 2
    ends = [phase_deadline(10.0, 60.0, depth, p) for p in range(num_phases(depth))]
    assert ends == sorted(ends) and ends[-1] == pytest.approx(70.0)
    assert ends[0] == pytest.approx(10.0 + 60.0 * 2 / 6)
    assert describe_phase(2, 1) == "phase 1 (shares of level 1)"
    assert describe_phase(2, 2) == "phase 2 (root exchange)"
    assert describe_phase(2, 4) == "phase 4 (result down to level 0)"


@pytest.mark.parametrize(
    "kw",
    [{"min_size": 7}, {"min_size": 2}, {"queue_wait": -1}, {"liveness_timeout": 0}],
)
def test_bad_liveness_arguments(kw):
    with pytest.raises(ConfigurationError):
        SchedulerState(6, 3, 2, clock=Clock(), **kw)


def test_heartbeat_and_rejoin_on_the_wire():
    for msg, allowed in (
        (Heartbeat("s", "p1", None), TO_SCHEDULER),
        (Rejoin("s", "p1"), FROM_SCHEDULER),
    ):
        assert codec.decode([bytes(f) for f in codec.encode(msg)], allowed=allowed) == msg
    assert Heartbeat in TO_SCHEDULER and Rejoin in FROM_SCHEDULER
    hb = Heartbeat("s", "p1", "r1")
    assert codec.decode([bytes(f) for f in codec.encode(hb)]) == hb
    bad = Heartbeat("s", "p1", "no spaces allowed")
    with pytest.raises(RemoteProtocolError, match="round_id"):
        codec.decode([bytes(f) for f in codec.encode(bad)])
    with pytest.raises(RemoteProtocolError, match="not accepted"):
        codec.decode([bytes(f) for f in codec.encode(Rejoin("s", "p"))], allowed=TO_SCHEDULER)


def test_cli_flags():
    args = build_parser().parse_args(
        ["scheduler", "--min-size", "4", "--queue-wait", "3", "--liveness-timeout", "5"]
    )
    assert (args.min_size, args.queue_wait, args.liveness_timeout) == (4, 3.0, 5.0)
    assert args.round_timeout is None


def test_a_retry_uses_a_fresh_round_tree_and_fresh_shares():
    sim = FaultSim(6, Fault("leaf", "crash", "recv", "assignment"), seed=3)
    seeds: dict[str, list[bytes]] = {}
    rounds: dict[str, set[str]] = {}
    send = sim.send

    def spy(src, dst, msg, what):
        if what == "share":  # round traffic travels as wire frames: read them as a peer does
            share = PlainWire.parse(msg.frames).message
            if isinstance(share, Share) and share.seed is not None:
                seeds.setdefault(src, []).append(share.seed)
                rounds.setdefault(src, set()).add(share.round_id)
        send(src, dst, msg, what)

    sim.send = spy
    outcomes = sim.run()
    assert all(o is not None and o.ok and o.retries == 1 for o in outcomes.values())
    assert all(len(r) == 2 for r in rounds.values() if len(r) > 1)
    every = [s for ss in seeds.values() for s in ss]
    assert len(every) == len(set(every))  # no seed of the failed round is ever reused
