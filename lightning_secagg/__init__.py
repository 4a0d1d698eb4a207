"""Secure aggregation for decentralized collaborative learning, as a PyTorch Lightning plugin.

Peers average their model weights through additive secret sharing over a
HyperAggregate-style aggregation tree: nobody sees any single peer's weights,
only the average, and every peer ends with the bitwise identical result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_secagg.encoding import Schema
from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    PeerIdInUseError,
    ProtocolError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SchemaMismatchError,
    SecAggError,
    SignupRejectedError,
)
from lightning_secagg.peer import Peer, RoundStats
from lightning_secagg.scheduler import Scheduler
from lightning_secagg.security import KeyPair
from lightning_secagg.tree import AggregationTree, build_tree

if TYPE_CHECKING:
    from lightning_secagg.callback import SecureAggregationCallback

__version__ = "0.1.0"

__all__ = [
    "AggregationTree",
    "ConfigurationError",
    "EncodingError",
    "KeyPair",
    "Peer",
    "PeerIdInUseError",
    "ProtocolError",
    "RoundAbortedError",
    "RoundFailedError",
    "RoundStats",
    "RoundTimeoutError",
    "Scheduler",
    "Schema",
    "SchemaMismatchError",
    "SecAggError",
    "SecureAggregationCallback",
    "SignupRejectedError",
    "__version__",
    "build_tree",
]


def __getattr__(name: str) -> Any:
    # The callback imports Lightning, which is slow; load it only when asked for.
    if name == "SecureAggregationCallback":
        from lightning_secagg.callback import SecureAggregationCallback

        return SecureAggregationCallback
    raise AttributeError(f"module 'lightning_secagg' has no attribute {name!r}")
