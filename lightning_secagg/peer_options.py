"""A peer's configuration, checked in one place.

:func:`check_peer_options` is the one home of the checks of a
:class:`~lightning_secagg.peer.Peer`'s arguments: the peer runs it when it is
built, and so does :class:`~lightning_secagg.callback.SecureAggregationCallback`
in its own ``__init__`` (wrapping the error as Lightning's
``MisconfigurationException``), so that a bad address, id or key is reported
before training starts. No torch here.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from typing import Any

from lightning_secagg import codec
from lightning_secagg.errors import ConfigurationError
from lightning_secagg.messages import ident
from lightning_secagg.roster import Roster
from lightning_secagg.schema import DEFAULT_FRAC_BITS, check_frac_bits
from lightning_secagg.security import KeyPair, read_public_key
from lightning_secagg.transport import bind_endpoint, is_wildcard_host

#: Default cap on one frame arriving at the inbox (``ZMQ_MAXMSGSIZE``): 1 GiB,
#: enough for the dense share of a ~130M-parameter model.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


@dataclass(frozen=True)
class PeerOptions:
    """A peer's configuration, checked: what :func:`check_peer_options` returns."""

    bind: str
    scheduler_address: str
    session: str
    peer_id: str
    advertise: str | None
    insecure: bool
    scheduler_key: str | None
    frac_bits: int
    ring: str
    linger: float
    max_message_bytes: int
    heartbeat_interval: float
    #: The roster as read now (None: any key may be a member).
    roster: Roster | None = None
    #: Its file, re-read on change by the peer (None: given parsed, or no roster).
    roster_path: str | None = None


def check_peer_options(
    address: str,
    scheduler_address: str,
    session: str = "default",
    *,
    scheduler_key: str | os.PathLike[str] | None = None,
    keys: KeyPair | None = None,
    insecure: bool = False,
    peer_id: str | None = None,
    advertise: str | None = None,
    frac_bits: int = DEFAULT_FRAC_BITS,
    ring: str = "auto",
    linger: float = 5.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    heartbeat_interval: float = 1.0,
    roster: Roster | str | os.PathLike[str] | None = None,
) -> PeerOptions:
    """Check every argument of a :class:`Peer` (the one home of these checks).

    The callback calls it in its ``__init__`` too, so that a bad address, id or
    key (a malformed ``scheduler_key`` included) is reported when it is built,
    not when training starts. A missing ``peer_id`` becomes a random one.
    ``roster`` (a :class:`~lightning_secagg.roster.Roster` or the path of a
    roster file, the format of the scheduler's ``--allow-keys``) is read here,
    so a malformed file is reported before training; it needs sealed links
    (members are told apart by their CURVE keys).

    Raises:
        ConfigurationError: the argument, what is allowed, and what was given.
    """

    def endpoint(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigurationError(f"{name} must be a 'tcp://HOST:PORT' string, got {value!r}")
        return bind_endpoint(value)

    def seconds(name: str, value: Any, *, zero_ok: bool) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (value >= 0 if zero_ok else value > 0)
            or not math.isfinite(value)
        ):
            bound = ">= 0" if zero_ok else "> 0"
            raise ConfigurationError(f"{name} must be a number of seconds {bound}, got {value!r}")
        return float(value)

    bind = endpoint("address", address)
    endpoint("scheduler_address", scheduler_address)
    peer_id = peer_id if peer_id is not None else f"peer-{secrets.token_hex(4)}"
    for name, value in (("peer_id", peer_id), ("session", session)):
        try:
            ident(value)
        except ValueError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None
    if advertise is not None:
        endpoint("advertise", advertise)
        if is_wildcard_host(advertise):
            raise ConfigurationError(
                f"advertise must be an address other peers can connect to, got {advertise!r}"
            )
    elif is_wildcard_host(address):
        raise ConfigurationError(
            f"address {address!r} binds every interface; pass advertise='tcp://HOST:PORT' "
            "with the address other peers should connect to"
        )
    if not isinstance(insecure, bool):
        raise ConfigurationError(f"insecure must be a bool, got {insecure!r}")
    if insecure:
        if scheduler_key is not None or keys is not None:
            raise ConfigurationError("scheduler_key/keys and insecure=True exclude each other")
        key = None
    elif scheduler_key is None:
        raise ConfigurationError(
            "scheduler_key is required: pass the scheduler's public key (printed by "
            "`lightning-secagg scheduler`, or Scheduler.public_key) or its .key file; "
            "insecure=True turns encryption off (debugging only)"
        )
    elif not isinstance(scheduler_key, (str, os.PathLike)):
        raise ConfigurationError(
            "scheduler_key must be the scheduler's public key (str) or the path of its key "
            f"file, got {scheduler_key!r:.60}"
        )
    else:
        key = read_public_key(scheduler_key)
    check_frac_bits(frac_bits)
    if ring not in ("auto", "64"):
        raise ConfigurationError(f"ring must be 'auto' or '64', got {ring!r}")
    if (
        isinstance(max_message_bytes, bool)
        or not isinstance(max_message_bytes, int)
        or max_message_bytes < codec.MAX_PEER_HEADER_BYTES
    ):
        raise ConfigurationError(
            f"max_message_bytes must be an int >= {codec.MAX_PEER_HEADER_BYTES}, "
            f"got {max_message_bytes!r}"
        )
    roster_path: str | None = None
    if roster is None or isinstance(roster, Roster):
        parsed = roster
    elif isinstance(roster, (str, os.PathLike)):
        roster_path = os.fspath(roster)
        parsed = Roster.load(roster_path)
    else:
        raise ConfigurationError(
            f"roster must be a Roster or the path of a roster file, got {roster!r:.60}"
        )
    if parsed is not None and insecure:
        raise ConfigurationError(
            "roster and insecure=True exclude each other: members are admitted by CURVE key"
        )
    if parsed is not None and len(parsed) == 0:
        raise ConfigurationError(f"roster {parsed.source} lists no key: no round could be joined")
    return PeerOptions(
        bind,
        scheduler_address,
        session,
        peer_id,
        advertise,
        insecure,
        key,
        frac_bits,
        ring,
        seconds("linger", linger, zero_ok=True),
        max_message_bytes,
        seconds("heartbeat_interval", heartbeat_interval, zero_ok=False),
        parsed,
        roster_path,
    )


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "PeerOptions", "check_peer_options"]
