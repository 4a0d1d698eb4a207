"""Secure aggregation for decentralized collaborative learning, as a PyTorch Lightning plugin.

Peers average their model weights through additive secret sharing over a
HyperAggregate-style aggregation tree: nobody sees any single peer's weights,
only the average, and every peer ends with the bitwise identical result.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    ForeignMemberError,
    PeerIdInUseError,
    PreflightError,
    ProtocolError,
    ResultMismatchError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SchedulerKeyError,
    SchedulerUnreachableError,
    SchemaMismatchError,
    SecAggError,
    SignupRejectedError,
    TooFewPeersError,
)
from lightning_secagg.roster import Roster
from lightning_secagg.schema import Schema
from lightning_secagg.tree import AggregationTree, build_tree

if TYPE_CHECKING:
    from lightning_secagg.callback import SecureAggregationCallback
    from lightning_secagg.peer import Peer, RoundStats
    from lightning_secagg.scheduler import Scheduler
    from lightning_secagg.security import KeyPair

#: Public names loaded on first use, and their modules. Why lazily: the peer
#: imports torch and the callback Lightning (seconds each), which a scheduler
#: process (``import lightning_secagg.scheduler`` runs this file first) or the
#: CLI never needs; ZeroMQ likewise for code that only describes a model.
_LAZY = {
    "Peer": "lightning_secagg.peer",
    "RoundStats": "lightning_secagg.peer",
    "Scheduler": "lightning_secagg.scheduler",
    "KeyPair": "lightning_secagg.security",
    "SecureAggregationCallback": "lightning_secagg.callback",
}

__version__ = "0.1.0"

__all__ = [
    "AggregationTree",
    "ConfigurationError",
    "EncodingError",
    "ForeignMemberError",
    "KeyPair",
    "Peer",
    "PeerIdInUseError",
    "PreflightError",
    "ProtocolError",
    "ResultMismatchError",
    "Roster",
    "RoundAbortedError",
    "RoundFailedError",
    "RoundStats",
    "RoundTimeoutError",
    "Scheduler",
    "SchedulerKeyError",
    "SchedulerUnreachableError",
    "Schema",
    "SchemaMismatchError",
    "SecAggError",
    "SecureAggregationCallback",
    "SignupRejectedError",
    "TooFewPeersError",
    "__version__",
    "build_tree",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_secagg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
