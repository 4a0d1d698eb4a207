"""Issue 19, finding 8: a scheduler that under-reports the round's total weight.

Each member encodes ``w_i / T`` for the relayed total ``T`` and only checks
that its own share is at most 1. In the compact ring the count slot used to
carry ``2**30`` times the sum of the shares, which wrapped in int32: ``T`` five
times too small summed to ``5 * 2**30 = 2**30 (mod 2**32)``, a plausible count,
and the mean came out 5x too large. The count slot now has
``COMPACT_COUNT_BITS`` (24) fraction bits: 64 shares of at most 1 each stay below
``2**30``, so the count cannot wrap and shows the scale, and
``ring.check_compact_count`` refuses it. Played on the production state machines
(:mod:`tests.unit._faultnet`) with a lying scheduler.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_secagg.errors import InvalidTotalError, RoundAbortedError
from lightning_secagg.messages import Assignment
from lightning_secagg.peer import make_contribution
from lightning_secagg.ring import COMPACT_COUNT_BITS, COMPACT_COUNT_SLACK, check_compact_count
from tests.unit._faultnet import FaultSim, close


def _sim(n: int, seed: int, scale: float | None, *, compact: bool = True) -> FaultSim:
    """Float32 models declaring their exponents; the scheduler divides total_weight by ``scale``."""
    sim = FaultSim(n, None, seed=seed, max_retries=0)
    gen = torch.Generator().manual_seed(seed)
    for pid, peer in sim.peers.items():
        state = {"w": torch.randn(6, generator=gen) * 0.5, "b": torch.randn(2, generator=gen)}
        c = make_contribution(state, 1.0, frac_bits=16, ring="auto" if compact else "64")
        sim.inputs[pid] = state
        peer.state, peer.schema, peer.contribution = state, c.schema, c
    if scale is not None:
        sched_out = sim._sched_out

        def lying(out):
            for item in out:
                if isinstance(item.message, Assignment):
                    total = item.message.total_weight / scale
                    item = dataclasses.replace(
                        item, message=dataclasses.replace(item.message, total_weight=total)
                    )
                sched_out([item])

        sim._sched_out = lying  # type: ignore[method-assign]
    return sim


def test_control_an_honest_total_gives_the_mean():
    sim = _sim(5, seed=1, scale=None)
    outcomes = sim.run()
    for o in outcomes.values():
        assert o is not None and o.ok
        assert close(o.result, sim.mean_of(o.members))
    assert sim.peers["p0"].session.round_info.ring_bits == 32


@pytest.mark.parametrize("scale", [5.0, 4.5, 4.0, 2.0, 1.5, 1.001, 1 / 1.001, 1 / 3])
def test_a_wrong_total_weight_is_refused_never_a_scaled_result(scale):
    # 5: the factor that wrapped to a plausible count with 30 count bits (with 5 members,
    # anything above 5 makes a share exceed 1, refused at the assignment as before).
    sim = _sim(5, seed=2, scale=scale)
    outcomes = sim.run()
    assert all(o is not None and not o.ok and o.result is None for o in outcomes.values())
    errors = [o.error for o in outcomes.values()]
    # The members that decode first refuse the total; the scheduler aborts the others with why.
    assert any(isinstance(e, InvalidTotalError) for e in errors), errors
    assert all(isinstance(e, (InvalidTotalError, RoundAbortedError)) for e in errors), errors
    assert all("sum to" in str(e) for e in errors)


def test_in_the_64_bit_ring_the_count_slot_corrects_the_scale():
    # No wrap there: the count slot carries the true sum of shares and divides it out.
    sim = _sim(5, seed=3, scale=5.0, compact=False)
    outcomes = sim.run()
    assert sim.peers["p0"].session.round_info.ring_bits == 64
    for o in outcomes.values():
        assert o is not None and o.ok
        assert close(o.result, sim.mean_of(o.members))


def test_the_count_check():
    nominal = 1 << COMPACT_COUNT_BITS
    assert check_compact_count(nominal) is None
    assert check_compact_count(nominal + COMPACT_COUNT_SLACK) is None
    assert check_compact_count(nominal - COMPACT_COUNT_SLACK) is None
    assert check_compact_count(nominal + COMPACT_COUNT_SLACK + 1) is not None
    assert check_compact_count(5 * nominal) is not None
    # 64 shares of at most one each never leave int32's positive range.
    assert 64 * nominal + COMPACT_COUNT_SLACK < 2**31
