"""The expected result of a round of ``_peer_worker`` models, and the exactness check.

Peer ``i`` contributes ``make_state(i, scale, model)`` with weight ``i + 1``; the
result must be the float64 weighted mean up to the fixed-point resolution plus
rounding to each tensor's dtype. In the 64-bit ring that resolution is at most n
half-units of 2**-32 (values here stay below 1 in magnitude after weighting).
In the 32-bit ring, tensor t is encoded with 30 - e_t fraction bits, e_t the
largest magnitude exponent of any peer (max|x| < 2**e_t): the peers' rounding
adds at most n half-units of 2**(e_t - 30), and the count slot's (30 fraction
bits) at most n * 2**-31 relative, i.e. below n * 2**(e_t - 31) again.
"""

from __future__ import annotations

import torch

from lightning_secagg.encoding import magnitude_exponents
from lightning_secagg.ring import relayed_exponents
from tests.integration._peer_worker import make_state

FRAC_BITS = 32
EPS = {
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float32: 2.0**-23,
    torch.float64: 2.0**-52,
}


def weighted_reference(n: int, scale: float = 1.0, model: str = "mixed") -> dict[str, torch.Tensor]:
    """The float64 weighted mean of the ``n`` peers' models."""
    states = [make_state(i, scale, model) for i in range(n)]
    weights = torch.tensor([float(i + 1) for i in range(n)], dtype=torch.float64)
    weights /= weights.sum()
    return {
        name: sum(w * s[name].double() for w, s in zip(weights, states, strict=True))
        for name in states[0]
    }


def compact_exponents(n: int, scale: float, model: str) -> list[int]:
    """The exponents the scheduler relays: per tensor, the largest any peer declares."""
    declared = [magnitude_exponents(make_state(i, scale, model)) for i in range(n)]
    relayed = relayed_exponents(declared)
    assert relayed is not None
    return relayed


def assert_matches_reference(
    values: dict[str, list],
    n: int,
    scale: float = 1.0,
    model: str = "mixed",
    ring_bits: int = 64,
) -> None:
    """Every decoded tensor equals the weighted mean within the bound, per dtype."""
    state = make_state(0, scale, model)
    exponents = dict(zip(state, compact_exponents(n, scale, model), strict=True))
    for name, expected in weighted_reference(n, scale, model).items():
        dtype = state[name].dtype
        got = torch.tensor(values[name], dtype=torch.float64).reshape(expected.shape)
        if dtype.is_floating_point:
            if ring_bits == 64:
                fixed = n * 2.0**-FRAC_BITS
            else:
                fixed = 2 * n * 2.0 ** (exponents[name] - 31)
            tol = fixed + expected.abs() * EPS[dtype] + 1e-300
            assert torch.all((got - expected).abs() <= tol), name
        elif dtype == torch.bool:
            assert torch.equal(got.bool(), expected >= 0.5), name
        else:
            assert torch.equal(got, torch.round(expected)), name
