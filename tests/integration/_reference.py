"""The expected result of a round of ``_peer_worker`` models, and the exactness check.

Peer ``i`` contributes ``make_state(i, scale)`` with weight ``i + 1``; the result
must be the float64 weighted mean up to the fixed-point resolution (at most n
half-units of 2**-f) plus rounding to each tensor's dtype.
"""

from __future__ import annotations

import torch

from tests.integration._peer_worker import make_state

FRAC_BITS = 32
EPS = {
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float32: 2.0**-23,
    torch.float64: 2.0**-52,
}


def weighted_reference(n: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The float64 weighted mean of the ``n`` peers' models."""
    states = [make_state(i, scale) for i in range(n)]
    weights = torch.tensor([float(i + 1) for i in range(n)], dtype=torch.float64)
    weights /= weights.sum()
    return {
        name: sum(w * s[name].double() for w, s in zip(weights, states, strict=True))
        for name in states[0]
    }


def assert_matches_reference(values: dict[str, list], n: int, scale: float = 1.0) -> None:
    """Every decoded tensor equals the weighted mean within the bound, per dtype."""
    state = make_state(0)
    for name, expected in weighted_reference(n, scale).items():
        dtype = state[name].dtype
        got = torch.tensor(values[name], dtype=torch.float64).reshape(expected.shape)
        if dtype.is_floating_point:
            tol = n * 2.0**-FRAC_BITS + expected.abs() * EPS[dtype] + 1e-300
            assert torch.all((got - expected).abs() <= tol), name
        elif dtype == torch.bool:
            assert torch.equal(got.bool(), expected >= 0.5), name
        else:
            assert torch.equal(got, torch.round(expected)), name
