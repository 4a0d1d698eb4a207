"""The deterministic fault matrix: every role, every phase, crash / drop / delay / duplicate.

Sans-IO peers and scheduler over an in-memory network with a fake clock
(``_faultnet.py``). For each scenario every survivor must end, before its
attempt's deadline, with either the exact average of the members of the round
it completed (all peers, or the survivors after a retry) — identical on every
peer of that round — or a typed :class:`RoundFailedError`. Nothing may hang.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_secagg.errors import RoundFailedError

from ._faultnet import Fault, FaultSim, close

# (peers, group_size, num_actors): two trees of two actors per group, and one of
# three, whose root actors split their vectors (two root actors do not).
SIZES = ((6, 3, 2), (9, 3, 2), (8, 4, 3))
SEEDS = (0, 1, 2)
TIMEOUT = 60.0
KINDS = ("crash", "drop", "delay", "delay-late", "duplicate")
# (role, message the target sends) — the phases each role takes part in
SEND_POINTS = {
    "leaf": ("share", "done"),
    "actor": ("share", "result", "done"),
    "root": ("share", "partial", "result", "done"),
}
# crash-only points: on receiving the assignment (before any share leaves), or
# right after a share reached it (it holds shares)
RECV_POINTS = {
    "leaf": ("assignment",),
    "actor": ("assignment", "share"),
    "root": ("assignment", "share"),
}


def _faults() -> list[Fault]:
    out = []
    for role, points in SEND_POINTS.items():
        for mtype, kind in itertools.product(points, KINDS):
            if kind == "delay":
                out.append(Fault(role, "delay", "send", mtype, delay=0.5))
            elif kind == "delay-late":
                out.append(Fault(role, "delay", "send", mtype, delay=120.0))
            else:
                out.append(Fault(role, kind, "send", mtype))
    for role, points in RECV_POINTS.items():
        out += [Fault(role, "crash", "recv", mtype) for mtype in points]
    return out


FAULTS = _faults()
SCENARIOS = [None, *FAULTS]


def check(sim: FaultSim, outcomes: dict) -> dict[str, int]:
    """Every survivor ended in time with the exact mean of its round, or a typed error."""
    by_round: dict[tuple[str, ...], list[dict[str, torch.Tensor]]] = {}
    stats = {"ok": 0, "error": 0, "retried": 0}
    for pid, out in outcomes.items():
        assert out is not None, f"{pid} never finished (a hang)"
        assert out.at <= out.attempt_started + TIMEOUT + 1e-6, f"{pid} overran its deadline"
        stats["retried"] += out.retries > 0
        if out.ok:
            stats["ok"] += 1
            assert close(out.result, sim.mean_of(out.members)), f"{pid}: wrong average"
            by_round.setdefault(out.members, []).append(out.result)
        else:
            stats["error"] += 1
            assert isinstance(out.error, RoundFailedError), repr(out.error)
    for results in by_round.values():
        for r in results[1:]:
            assert all(torch.equal(r[k], results[0][k]) for k in r), "peers of a round disagree"
    return stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("fault", SCENARIOS, ids=lambda f: "no-fault" if f is None else f.label())
def test_fault_matrix(fault, size):
    n, g, k = size
    sends = None if fault is None else (fault.role, fault.direction, fault.mtype)
    if sends == ("root", "send", "share") and k < 3:
        pytest.skip("two root actors keep their vectors whole: they send no shares")
    fired = 0
    for seed in SEEDS:
        sim = FaultSim(n, fault, seed, timeout=TIMEOUT, group_size=g, num_actors=k)
        outcomes = sim.run()
        if fault is not None:
            # a tree may lack the role (e.g. every result-sending actor is a root actor)
            assert sim.fault_used or sim.no_target, f"{fault.label()} never fired (seed {seed})"
            fired += sim.fault_used
        stats = check(sim, outcomes)
        survivors = set(outcomes)
        # With a live scheduler every fault is recovered by a retry, except one: a
        # result lost on its way down after every other member finished. The peer
        # that lost it times out alone (a typed error, in time); the others are done.
        # Likewise a partial sum lost between three root actors or more: the root
        # actors that got every partial sum finish, with every peer they serve; the
        # others retry, and in a tree of three actors a group needs four peers, which
        # those left over may lack (8 = 5 + 3 here).
        lost = fault is not None and (fault.kind in ("crash", "drop") or fault.delay > TIMEOUT / 2)
        stranded = lost and fault.mtype in (("result", "partial") if k >= 3 else ("result",))
        if not stranded:
            errors = {p: o.error for p, o in outcomes.items() if not o.ok}
            assert stats["error"] == 0, (seed, errors)
        else:
            assert stats["error"] <= n // 2
        if fault is not None and fault.kind == "crash" and len(survivors) < n:
            # the dead peer's input never counted unless its shares were all out
            for out in outcomes.values():
                assert sim.target not in out.members or fault.mtype in ("done", "result")

    assert fault is None or fired >= 1, "the fault fired for no seed"


def test_matrix_size():
    """The size reported in the closing note: scenarios x sizes x seeds."""
    assert len(SCENARIOS) * len(SIZES) * len(SEEDS) >= 300
