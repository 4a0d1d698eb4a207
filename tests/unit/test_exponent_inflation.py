"""Issue 19, finding 7: a member (or the scheduler) inflating the relayed magnitude exponents.

Each tensor of the compact ring gets ``30 - e`` fraction bits for the largest
exponent ``e`` any member declares, so a member declaring 30 used to push every
tensor to 0 fraction bits: the mean decoded to exact zeros, silently. Now the
compact ring is never chosen nor accepted below ``MIN_COMPACT_FRAC_BITS`` for a
float tensor: the round keeps the 64-bit ring (the scheduler logs why), or a
member refuses a relayed compact ring (a typed error) -- never silent zeros.
The rounds run the production state machines on :mod:`tests.unit._faultnet`.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from lightning_secagg.errors import RoundTimeoutError
from lightning_secagg.messages import Assignment
from lightning_secagg.peer import make_contribution
from lightning_secagg.ring import (
    COMPACT_SUM_BITS,
    MIN_COMPACT_FRAC_BITS,
    check_relayed_ring,
    choose_ring,
    compact_ring_allowed,
)
from lightning_secagg.schema import Schema
from tests.unit._faultnet import FaultSim, close


def _compact_sim(n: int, seed: int, inflate: dict[str, int] | None = None, **kwargs) -> FaultSim:
    """A FaultSim whose peers hold float32 models and declare their exponents (ring="auto");
    the peers named in ``inflate`` declare that exponent for every tensor instead."""
    sim = FaultSim(n, None, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for pid, peer in sim.peers.items():
        state = {"w": torch.randn(6, generator=gen) * 0.1, "b": torch.randn(2, generator=gen)}
        c = make_contribution(state, 1.0, frac_bits=16)
        if inflate and pid in inflate:
            c = dataclasses.replace(c, exponents=[inflate[pid]] * len(c.schema.tensors))
        sim.inputs[pid] = state
        peer.state, peer.schema, peer.contribution = state, c.schema, c
    return sim


def test_control_honest_members_get_the_compact_ring():
    sim = _compact_sim(4, seed=1)
    outcomes = sim.run()
    assert all(o is not None and o.ok for o in outcomes.values())
    for o in outcomes.values():
        assert close(o.result, sim.mean_of(o.members))
    assert sim.peers["p0"].session.round_info is not None
    assert sim.peers["p0"].session.round_info.ring_bits == 32


@pytest.mark.parametrize("inflated", [30, 40, 64, COMPACT_SUM_BITS - MIN_COMPACT_FRAC_BITS + 1])
def test_a_member_declaring_a_huge_exponent_gets_the_64_bit_ring_not_zeros(inflated, caplog):
    sim = _compact_sim(4, seed=2, inflate={"p3": inflated})
    with caplog.at_level(logging.INFO):
        outcomes = sim.run()
    for pid in ("p0", "p1", "p2"):
        o = outcomes[pid]
        assert o is not None and o.ok, o
        assert sim.peers[pid].session.round_info.ring_bits == 64
        assert close(o.result, sim.mean_of(o.members))
        assert any(bool((t != 0).any()) for t in o.result.values())
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"values up to 2**{inflated}" in said  # the scheduler says why it kept 64 bits


def test_the_largest_exponent_the_floor_allows_keeps_the_compact_ring():
    e = COMPACT_SUM_BITS - MIN_COMPACT_FRAC_BITS
    sim = _compact_sim(4, seed=3, inflate={"p3": e})
    outcomes = sim.run()
    assert sim.peers["p0"].session.round_info.ring_bits == 32
    for pid in ("p0", "p1", "p2"):
        # 16 fraction bits: exact to 2**-16 per member, nowhere near zeros
        got, want = outcomes[pid].result, sim.mean_of(outcomes[pid].members)
        for name in want:
            assert torch.allclose(got[name].double(), want[name], atol=4 * 2.0**-16)


def test_a_scheduler_relaying_inflated_exponents_is_refused_with_a_typed_error():
    sim = _compact_sim(4, seed=4, max_retries=0, timeout=20.0)
    sched_out = sim._sched_out

    def lying(out):
        for item in out:
            if isinstance(item.message, Assignment) and item.message.ring_bits == 32:
                bad = dataclasses.replace(item.message, exponents=[30] * 2)
                item = dataclasses.replace(item, message=bad)
            sched_out([item])

    sim._sched_out = lying  # type: ignore[method-assign]
    outcomes = sim.run()
    for o in outcomes.values():
        assert o is not None and not o.ok and o.result is None
        assert isinstance(o.error, RoundTimeoutError)  # the assignment was refused, never used


def test_the_ring_rules():
    schema = Schema.of({"w": torch.zeros(3), "n": torch.zeros(2, dtype=torch.int32)})
    e = COMPACT_SUM_BITS - MIN_COMPACT_FRAC_BITS
    assert compact_ring_allowed(schema, [e, 3], 4) is None
    assert "fewer than" in compact_ring_allowed(schema, [e + 1, 3], 4)
    assert choose_ring(schema, [[1, 3], [30, 3], [2, 3]]).ring_bits == 64
    assert check_relayed_ring(schema, 32, [30, 3], [1, 3], 3, compact_wanted=True) is not None
    assert check_relayed_ring(schema, 64, None, [1, 3], 3, compact_wanted=True) is None
