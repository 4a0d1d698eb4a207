"""Preview a round before running it: the tree, its depth, the collusion it resists, its bytes.

``lightning-secagg tree`` prints what :func:`plan` returns. The tree is built by
the same :func:`~lightning_secagg.tree.build_tree` the scheduler uses, but with a
seeded :class:`random.Random` so the preview is reproducible; the scheduler
itself shuffles with a CSPRNG (``secrets.SystemRandom``), so a real round's tree
is a different draw with the same shape (same depth, same group sizes).

Rounds move the model through the tree in *segments*
(:class:`~lightning_secagg.protocol.segmented_round.SegmentedRound`): the data
elements are cut into runs of
:func:`~lightning_secagg.schema.segment_elements_for` the model
(:func:`~lightning_secagg.schema.segment_bounds`), and each segment is an
independent pass through the same tree, with its own shares, partial sums and
result, every message naming its segment in its header.

The byte figures are not a formula: the round is *simulated* with the real
sans-IO protocol objects (one
:class:`~lightning_secagg.protocol.peer_round.PeerRound` per segment, driven by
a ``SegmentedRound`` per peer) over an in-memory queue, on one-element
vectors, and every message is then sized as the wire sizes it:
``len(msgpack header)`` (the real header, segment index included, encoded by
:mod:`lightning_secagg.codec`) plus the payload the real segment would carry
(``ring_bits / 8 * (1 + b - a)`` for a dense share or a partial sum of segment
``[a, b)``, its own count slot included; the segment's
:func:`~lightning_secagg.schema.result_span` for its result). Sealed, each
message's payload is sealed in chunks of its own, and every message on a link
has the next sequence number in its envelope. That is what
:func:`lightning_secagg.transport.frames_nbytes` counts and what a peer reports in
:class:`~lightning_secagg.peer.RoundStats`; ZeroMQ's framing and CurveZMQ's
per-frame overhead (a few dozen bytes a frame) are not included in either.

Which actor gets each of a participant's dense shares is fixed by the tree
and the segment (:func:`~lightning_secagg.protocol.peer_round.dense_actor`),
and randomness only draws the seeds, whose size is fixed: every figure is
exact, received bytes included, in every round over the same tree.

The ring is chosen by the scheduler's own rule,
:func:`~lightning_secagg.ring.choose_ring`: the compact ring Z_2^32 (4-byte
elements) when every member declares its magnitude exponents
(``Peer(ring="auto")``, the default) and
:func:`~lightning_secagg.ring.compact_ring_allowed` accepts the schema, the
round's size and the largest exponent of each tensor; Z_2^64 (8-byte elements)
otherwise. A preview has no model values, so unless told the real exponents it
assumes magnitudes the compact ring accepts (:func:`assumed_exponents`); the
dtype and round-size rules still apply. The exponents are in the sign-up and
the assignment headers, so they count in the header bytes too.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_secagg import codec
from lightning_secagg.errors import ConfigurationError
from lightning_secagg.messages import (
    Assignment,
    Done,
    Message,
    Partial,
    Result,
    Share,
    Signup,
    SignupAck,
)
from lightning_secagg.protocol.memnet import MemNet
from lightning_secagg.protocol.peer_round import Send
from lightning_secagg.protocol.segmented_round import SegmentedRound
from lightning_secagg.ring import (
    MAX_EXPONENT,
    MIN_EXPONENT,
    RING_DTYPES,
    RingChoice,
    choose_ring,
    exponents_to_declare,
)
from lightning_secagg.schema import (
    DEFAULT_FRAC_BITS,
    Schema,
    TensorSpec,
    result_span,
    segment_bounds,
    segment_elements_for,
)
from lightning_secagg.sealing import CHUNK_BYTES, Envelope, sealed_extra_bytes
from lightning_secagg.sharing import SEED_BYTES, RandomBytes
from lightning_secagg.tree import AggregationTree, build_tree, privacy_warnings

#: dtypes ``--dtype`` accepts (those the encoding supports).
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)

#: What the preview assumes for the fields of scheduler messages it cannot know.
DEFAULT_SESSION = "default"
DEFAULT_ROUND_ID = "0" * 16  # the scheduler's ids are 16 hex digits
DEFAULT_DEADLINE_S = 300.0
_PLACEHOLDER_KEY = "0" * 40  # Z85 keys are 40 characters
#: ``ring`` values a member (like ``Peer(ring=...)``) and ``--ring`` accept.
RINGS = ("auto", "64")
#: Magnitude exponents a preview assumes when it is not told the real ones
#: (``max|x| < 2**e``): floating tensors below 1, integers below 2 (bool
#: tensors always declare 1, empty ones the minimum, as real peers do).
ASSUMED_FLOAT_EXPONENT = 0
ASSUMED_INT_EXPONENT = 1


def default_peer_ids(n: int) -> list[str]:
    """Ids shaped like ``Peer``'s defaults (``peer-`` and 8 hex digits), so header sizes match."""
    return [f"peer-{i:08x}" for i in range(n)]


def default_endpoint(index: int) -> str:
    """A placeholder endpoint of a typical length, ``tcp://10.0.X.Y:6000``."""
    return f"tcp://10.0.{index // 256}.{index % 256}:6000"


def model_schema(params: int, dtype: str = "float32", frac_bits: int = DEFAULT_FRAC_BITS) -> Schema:
    """The schema of a model of ``params`` elements: one tensor named ``weight``.

    Raises:
        ConfigurationError: ``params`` is not a positive int or ``dtype`` is unsupported.
    """
    if isinstance(params, bool) or not isinstance(params, int) or params < 1:
        raise ConfigurationError(f"params must be an int >= 1, got {params!r}")
    if dtype not in DTYPES:
        raise ConfigurationError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return Schema((TensorSpec("weight", (params,), dtype),), frac_bits)


def assumed_exponents(schema: Schema) -> list[int]:
    """The magnitude exponents a preview assumes for every member of a round.

    A preview has no values; these are small enough for the compact ring
    (floating tensors ``|x| < 1``, integers ``|x| < 2``), so whether a round
    gets it is decided by the rules that depend only on the schema and the
    round's size (float64 tensors, more than 64 peers). Every one of them packs
    into one msgpack byte, like every real exponent from -32 to 64; an empty
    tensor declares -64 (two bytes), as a real peer does.
    """
    out = []
    for spec in schema.tensors:
        if spec.numel == 0:
            out.append(MIN_EXPONENT)
        elif spec.dtype.startswith(("float", "bfloat")):
            out.append(ASSUMED_FLOAT_EXPONENT)
        else:
            out.append(ASSUMED_INT_EXPONENT)  # integers and bool (which declares 1)
    return out


def counter_random_bytes(label: str) -> RandomBytes:
    """A deterministic byte stream (SHA-256 in counter mode) named by ``label``.

    For the simulation's seeds (no size depends on them) and for tests only.
    Real peers use ``os.urandom``.
    """
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}:{counter}".encode()).digest()
            counter += 1
        return out[:n]

    return draw


@dataclass(frozen=True)
class Member:
    """One member of a round: what the scheduler relays about it and what it declares.

    Attributes:
        peer_id: Its id.
        endpoint: Where it listens.
        public_key: Its CURVE public key (Z85).
        weight: Its weight (sample count), a float in its sign-up; the assignment
            carries the total.
        ring: Its ``Peer(ring=...)``: ``"auto"`` declares magnitude exponents at
            sign-up, ``"64"`` declares none and keeps its rounds in Z_2^64.
        exponents: What it declares with ``ring="auto"``: its model's
            :func:`~lightning_secagg.encoding.magnitude_exponents`, one per
            tensor; None: :func:`assumed_exponents`.
    """

    peer_id: str
    endpoint: str
    public_key: str
    weight: float = 1.0
    ring: str = "auto"
    exponents: tuple[int, ...] | None = None

    def declared(self, schema: Schema) -> list[int] | None:
        """The ``exponents`` field of its sign-up (None with ``ring="64"``, or when the
        model alone rules the compact ring out: see :func:`exponents_to_declare`).

        Raises:
            ConfigurationError: ``ring`` is unknown, or the exponents do not fit the schema.
        """
        if self.ring not in RINGS:
            raise ConfigurationError(f"ring must be one of {', '.join(RINGS)}, got {self.ring!r}")
        if self.ring == "64":
            return None
        if self.exponents is None:
            return exponents_to_declare(schema, assumed_exponents(schema))
        exponents = [int(e) for e in self.exponents]
        if len(exponents) != len(schema.tensors):
            raise ConfigurationError(
                f"{self.peer_id}: {len(exponents)} exponents for {len(schema.tensors)} tensors"
            )
        if not all(MIN_EXPONENT <= e <= MAX_EXPONENT for e in exponents):
            raise ConfigurationError(
                f"{self.peer_id}: exponents must be in [{MIN_EXPONENT}, {MAX_EXPONENT}]"
            )
        return exponents_to_declare(schema, exponents)


@dataclass(frozen=True)
class PeerPlan:
    """What one peer sends and receives in one round, in bytes on the wire.

    ``p2p_*`` is traffic between peers (shares, partial sums, results, of
    every segment);
    ``scheduler_*`` is the sign-up it sends and the acknowledgement and
    assignment it receives. The ``done`` report goes out after a peer's stats
    are taken, so it is not in ``bytes_sent`` (its size is :attr:`Plan.done_bytes`).
    """

    peer_id: str
    roles: tuple[str, ...]
    kind: str
    p2p_sent: int
    p2p_received: int
    scheduler_sent: int
    scheduler_received: int
    messages_sent: int
    messages_received: int

    @property
    def bytes_sent(self) -> int:
        """What :attr:`RoundStats.bytes_sent` reports for this peer."""
        return self.p2p_sent + self.scheduler_sent

    @property
    def bytes_received(self) -> int:
        """What :attr:`RoundStats.bytes_received` reports for this peer."""
        return self.p2p_received + self.scheduler_received

    @property
    def one_way_bytes(self) -> int:
        """The larger of what this peer sends and receives.

        Each direction of a host's link is capped on its own, so a round lasts at
        least the busiest host's one-way bytes over its link's rate.
        """
        return max(self.bytes_sent, self.bytes_received)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {
            "peer_id": self.peer_id,
            "roles": list(self.roles),
            "kind": self.kind,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "p2p_sent": self.p2p_sent,
            "p2p_received": self.p2p_received,
            "scheduler_sent": self.scheduler_sent,
            "scheduler_received": self.scheduler_received,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
        }


@dataclass(frozen=True)
class RoleSummary:
    """Peers that play the same part in the tree, with the spread of their bytes."""

    kind: str
    count: int
    sent: tuple[int, int]
    received: tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """A previewed round: its tree, its privacy threshold and every peer's bytes.

    ``segment_elements`` is the segment length the round was simulated with
    (None: the protocol's for this model,
    :func:`~lightning_secagg.schema.segment_elements_for`).
    """

    tree: AggregationTree
    schema: Schema
    seed: int | None
    peers: tuple[PeerPlan, ...]
    done_bytes: int
    warnings: tuple[str, ...] = field(default=())
    ring: RingChoice = field(default=RingChoice(64, None, None))
    segment_elements: int | None = None  # resolved in __post_init__

    def __post_init__(self) -> None:
        if self.segment_elements is None:
            length = segment_elements_for(self.schema.vector_size - 1)
            object.__setattr__(self, "segment_elements", length)

    @property
    def num_peers(self) -> int:
        """Members of the round."""
        return len(self.tree.members)

    @property
    def depth(self) -> int:
        """Levels of the tree, root included."""
        return self.tree.depth

    @property
    def collusion_threshold(self) -> int:
        """How many colluders expose a participant: all ``num_actors`` actors of its group."""
        return self.tree.num_actors

    @property
    def params(self) -> int:
        """Model elements (the count slot excluded)."""
        return self.schema.vector_size - 1

    @property
    def ring_bits(self) -> int:
        """The round's ring: 32 (compact) or 64."""
        return self.ring.ring_bits

    @property
    def segments(self) -> list[tuple[int, int]]:
        """The segments' ``[a, b)`` ranges of data elements (see
        :func:`~lightning_secagg.schema.segment_bounds`)."""
        return segment_bounds(self.schema, self.segment_elements)

    @property
    def num_segments(self) -> int:
        """Segments the model travels in: each a pass through the tree of its own."""
        return len(self.segments)

    @property
    def dense_bytes(self) -> int:
        """Payload of a dense share or a partial sum, all segments together:
        ``ring_bits / 8`` per data element and per segment's count slot."""
        return self.ring.element_bytes * (self.params + self.num_segments)

    @property
    def segment_dense_bytes(self) -> int:
        """The largest payload of one dense share or partial sum (of one segment)."""
        return self.ring.element_bytes * max(1 + b - a for a, b in self.segments)

    @property
    def result_bytes(self) -> int:
        """Payload of the result, all segments together: every tensor in its own
        dtype, 8-byte aligned."""
        return self.schema.result_nbytes

    @property
    def segment_result_bytes(self) -> int:
        """The largest payload of one result message (one segment's span)."""
        spans = (result_span(self.schema, a, b) for a, b in self.segments)
        return max(hi - lo for lo, hi in spans)

    def peer(self, peer_id: str) -> PeerPlan:
        """The plan of one peer.

        Raises:
            KeyError: ``peer_id`` is not a member.
        """
        for p in self.peers:
            if p.peer_id == peer_id:
                return p
        raise KeyError(peer_id)

    @property
    def busiest(self) -> PeerPlan:
        """The peer with the most bytes one way (:attr:`PeerPlan.one_way_bytes`)."""
        return max(self.peers, key=lambda p: p.one_way_bytes)

    @property
    def mean_one_way_bytes(self) -> float:
        """The mean over peers of :attr:`PeerPlan.one_way_bytes`."""
        return sum(p.one_way_bytes for p in self.peers) / len(self.peers)

    @property
    def load_ratio(self) -> float:
        """The busiest peer's one-way bytes over the mean: 1.0 when the load is even.

        On links of equal rate, a bandwidth-bound round waits for the busiest
        peer, so this is how much longer the round lasts than an even spread of
        the same bytes would.
        """
        return self.busiest.one_way_bytes / self.mean_one_way_bytes

    def summary(self) -> list[RoleSummary]:
        """Peers grouped by their part in the tree, leaves first, root actors last."""
        by_kind: dict[str, list[PeerPlan]] = {}
        for p in self.peers:
            by_kind.setdefault(p.kind, []).append(p)
        rows = []
        for kind in sorted(by_kind, key=_kind_order):
            ps = by_kind[kind]
            rows.append(
                RoleSummary(
                    kind=kind,
                    count=len(ps),
                    sent=(min(p.bytes_sent for p in ps), max(p.bytes_sent for p in ps)),
                    received=(
                        min(p.bytes_received for p in ps),
                        max(p.bytes_received for p in ps),
                    ),
                )
            )
        return rows

    def privacy(self) -> list[str]:
        """Plain-language statements of what it takes to expose a peer."""
        k, n = self.tree.num_actors, self.num_peers
        return [
            f"A peer's weights are exposed only if all {k} actors of its level-0 group "
            f"pool their shares: any {k - 1} of them together see only uniformly random "
            "values. "
            "A peer that is itself one of those actors does not split its weights "
            "there: they go whole into its own partial sum, masked by the other "
            "participants' shares, and that sum is split one level up; exposing them "
            "takes the actors of that group together with the non-actors whose shares "
            "mask it. A root actor's partial sum goes to the other root actors"
            + (
                ", and it keeps one share of its weights at home."
                if k >= 3
                else " (with two, a split would hide nothing from the other one)."
            ),
            f"Smallest coalition that exposes anybody: {k} peers (the actors of one group).",
            f"Inherent to averaging: the other {n - 1} peers together learn the last "
            "one's weights from the average, whatever the tree.",
            "The scheduler picks the tree: a malicious scheduler could make colluders "
            "the actors of a group (see the threat model).",
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``--json``."""
        return {
            "num_peers": self.num_peers,
            "group_size": self.tree.group_size,
            "num_actors": self.tree.num_actors,
            "seed": self.seed,
            "depth": self.depth,
            "levels": [
                [
                    {
                        "index": g.index,
                        "participants": list(g.participants),
                        "actors": list(g.actors),
                    }
                    for g in level
                ]
                for level in self.tree.levels
            ],
            "collusion_threshold": self.collusion_threshold,
            "privacy": self.privacy(),
            "warnings": list(self.warnings),
            "ring": {
                "ring_bits": self.ring_bits,
                "element_bytes": self.ring.element_bytes,
                "exponents": list(self.ring.exponents) if self.ring.exponents else None,
                "reason_for_64": self.ring.reason,
            },
            "model": {
                "params": self.params,
                "schema": self.schema.to_wire(),
                "dense_share_bytes": self.dense_bytes,
                "result_bytes": self.result_bytes,
                "segments": self.num_segments,
                "segment_elements": self.segment_elements,
                "segment_dense_share_bytes": self.segment_dense_bytes,
                "segment_result_bytes": self.segment_result_bytes,
            },
            "summary": [
                {
                    "kind": r.kind,
                    "peers": r.count,
                    "bytes_sent": list(r.sent),
                    "bytes_received": list(r.received),
                }
                for r in self.summary()
            ],
            "total_bytes_sent": sum(p.bytes_sent for p in self.peers),
            "busiest": {
                "peer_id": self.busiest.peer_id,
                "one_way_bytes": self.busiest.one_way_bytes,
                "mean_one_way_bytes": self.mean_one_way_bytes,
                "ratio_to_mean": self.load_ratio,
            },
            "done_bytes": self.done_bytes,
            "peers": [p.to_dict() for p in self.peers],
        }

    def format(self, *, show_peers: bool = False) -> str:
        """The human-readable report ``lightning-secagg tree`` prints."""
        t = self.tree
        lines = [
            f"Aggregation tree: {self.num_peers} peers, group_size={t.group_size}, "
            f"num_actors={t.num_actors}" + (f", seed={self.seed}" if self.seed is not None else ""),
            "(a preview: the scheduler shuffles with a CSPRNG, so a real round is another "
            "draw of the same shape)",
            f"depth: {self.depth} level{'s' if self.depth != 1 else ''} "
            f"(level {self.depth - 1} is the root)",
            "",
        ]
        for li, level in enumerate(t.levels):
            root = " (root)" if li == t.depth - 1 else ""
            n = sum(len(g.participants) for g in level)
            lines.append(
                f"level {li}{root}: {n} participants in {len(level)} "
                f"group{'s' if len(level) != 1 else ''}"
            )
            for g in level:
                lines.append(
                    f"  g{g.index}: {' '.join(g.participants)}  -> actors {' '.join(g.actors)}"
                )
        lines += ["", "Privacy:"]
        lines += [f"  - {s}" for s in self.privacy()]
        lines += [f"  ! {w}" for w in self.warnings]
        lines += ["", f"Ring: {self._describe_ring()}"]
        lines += [
            "",
            f"Bytes per round for a model of {self.params:,} elements "
            f"({_describe_schema(self.schema)}):",
            f"  in {self._describe_segments()}, each a pass through the tree of its own",
            f"  dense share or partial sum: {self.dense_bytes:,} B payload in all "
            f"({self.ring.element_bytes} B x {self.params + self.num_segments:,}: the elements "
            f"+ a count slot per segment), at most {self.segment_dense_bytes:,} B a message; "
            f"seed share: {SEED_BYTES} B seed in the header, once a round and level; "
            f"result: {self.result_bytes:,} B payload in all, "
            f"at most {self.segment_result_bytes:,} B a message",
            "  headers (msgpack) included; ZeroMQ/CurveZMQ framing not included",
            "",
        ]
        rows = [("role", "peers", "sends (B)", "receives (B)")]
        for r in self.summary():
            rows.append((r.kind, str(r.count), _span(r.sent), _span(r.received)))
        lines += _table(rows)
        total = sum(p.bytes_sent for p in self.peers)
        lines += [
            "",
            f"all peers together send {total:,} B "
            f"({total / max(1, self.num_peers):,.0f} B per peer on average)",
            f"busiest peer: {self.busiest.peer_id} ({self.busiest.kind}), "
            f"{self.busiest.one_way_bytes:,} B one way, {self.load_ratio:.2f}x the mean "
            f"over peers ({self.mean_one_way_bytes:,.0f} B); on links of one rate a round "
            "waits for it",
        ]
        if show_peers:
            lines.append("")
            rows = [("peer", "roles", "sends (B)", "receives (B)")]
            for p in self.peers:
                rows.append(
                    (p.peer_id, ", ".join(p.roles), f"{p.bytes_sent:,}", f"{p.bytes_received:,}")
                )
            lines += _table(rows)
        return "\n".join(lines)

    def _describe_segments(self) -> str:
        n = self.num_segments
        if n == 1:
            return f"1 segment (at most {self.segment_elements:,} elements a segment)"
        return f"{n:,} segments of at most {self.segment_elements:,} elements"

    def _describe_ring(self) -> str:
        if self.ring_bits == 32:
            return (
                "Z_2^32 (4 B elements): every peer declares each tensor's magnitude "
                "exponent at sign-up (values assumed here); --ring 64 keeps Z_2^64"
            )
        return f"Z_2^64 (8 B elements): {self.ring.reason or 'forced'}"


def _kind_order(kind: str) -> int:
    if kind.startswith("root"):
        return 1 << 20
    if kind.startswith("leaf"):
        return -1
    return int(re.split(r"[ -]", kind)[-1])  # "actor at level 0", "actor at levels 0-3"


def _kind(state: SegmentedRound) -> str:
    first = state.segments[0]  # every segment has the same roles
    if first.is_root_actor:
        return "root actor"
    if not first.acted:
        return "leaf (level 0 only)"
    top = max(g.level for g in first.acted)
    return "actor at level 0" if top == 0 else f"actor at levels 0-{top}"


def _span(pair: tuple[int, int]) -> str:
    lo, hi = pair
    return f"{lo:,}" if lo == hi else f"{lo:,} - {hi:,}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        out.append("  " + "  ".join(cells).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def _describe_schema(schema: Schema) -> str:
    if len(schema.tensors) == 1:
        return f"one {schema.tensors[0].dtype} tensor"
    dtypes = sorted({s.dtype for s in schema.tensors})
    return f"{len(schema.tensors)} tensors, {'/'.join(dtypes)}"


@functools.lru_cache(maxsize=8)
def _bounds(schema: Schema, segment_elements: int) -> list[tuple[int, int]]:
    # Sizing a plan looks up a segment per message: cut the model once per plan.
    return segment_bounds(schema, segment_elements)


def _segment_of(
    schema: Schema, segment: int, segment_elements: int | None = None
) -> tuple[int, int]:
    """The ``[a, b)`` data elements of segment ``segment`` (see
    :func:`~lightning_secagg.schema.segment_bounds`).

    Raises:
        ConfigurationError: ``segment_elements`` is not a positive int, or the
            model has no such segment.
    """
    if segment_elements is None:
        segment_elements = segment_elements_for(schema.vector_size - 1)
    bounds = _bounds(schema, segment_elements)
    if isinstance(segment, bool) or not isinstance(segment, int) or not 0 <= segment < len(bounds):
        raise ConfigurationError(f"segment {segment!r} of a model of {len(bounds)} segments")
    return bounds[segment]


def payload_size(
    message: Message,
    schema: Schema,
    ring_bits: int = 64,
    *,
    segment_elements: int | None = None,
) -> int:
    """Bytes of ``message``'s payload for a model of ``schema`` (0 without one).

    Every share, partial sum and result belongs to one segment of the model,
    ``message.segment``, whose data elements are ``[a, b)`` (see
    :func:`~lightning_secagg.schema.segment_bounds`): a dense share or a
    partial sum holds ``ring_bits / 8`` bytes per element of the segment and of
    its own count slot, ``ring_bits / 8 * (1 + b - a)``; a result holds the
    segment's bytes of the result buffer, every tensor in its own dtype
    (:func:`~lightning_secagg.schema.result_span`).

    Raises:
        ConfigurationError: ``ring_bits`` is not 32 or 64, or the message's
            segment is not one of the model's.
    """
    if ring_bits not in RING_DTYPES:
        raise ConfigurationError(f"ring_bits must be 32 or 64, got {ring_bits!r}")
    if not isinstance(message, (Share, Partial, Result)):
        return 0
    a, b = _segment_of(schema, message.segment, segment_elements)
    if isinstance(message, Result):
        lo, hi = result_span(schema, a, b)
        return hi - lo
    if isinstance(message, Share) and message.seed is not None:
        return 0
    return ring_bits // 8 * (1 + b - a)


def wire_size(
    message: Message,
    schema: Schema,
    ring_bits: int = 64,
    *,
    seal: Envelope | None = None,
    segment_elements: int | None = None,
) -> int:
    """Bytes ``message`` takes on the wire for a model of ``schema``.

    The header is encoded by the real codec (segment index included); the
    payload is sized for the message's segment of the real model (the
    simulation runs on one-element vectors), see :func:`payload_size`. With
    ``seal`` (the envelope of sealed round traffic between peers, see
    :mod:`lightning_secagg.sealing`), the envelope frame and what sealing adds
    are counted: a 16-byte tag per sealed part (the header, then each chunk of
    the payload), and for a result, forwarded as one ciphertext, the blob key
    and a link tag per chunk (:func:`~lightning_secagg.sealing.sealed_extra_bytes`).

    Raises:
        ConfigurationError: ``ring_bits`` is not 32 or 64, or the message's
            segment is not one of the model's.
    """
    payload = payload_size(message, schema, ring_bits, segment_elements=segment_elements)
    size = len(codec.encode(message)[0]) + payload
    if seal is not None:
        size += len(seal.pack()) + sealed_extra_bytes(
            payload, forwarded=isinstance(message, Result)
        )
    return size


def sealed_parts(payload_bytes: int) -> int:
    """Sealed parts of a message with this payload: its header and each chunk."""
    return 1 + -(-payload_bytes // CHUNK_BYTES)


def _simulate(
    tree: AggregationTree,
    round_id: str,
    ring_bits: int,
    num_segments: int,
) -> tuple[dict[str, SegmentedRound], list[Send]]:
    """Run the round with a real SegmentedRound per peer (a real PeerRound per
    segment), every segment a one-element vector; return every delivered send."""
    dtype = RING_DTYPES[ring_bits]
    # One byte of the result buffer per segment: the spans only have to tile it.
    spans = [(k, k + 1) for k in range(num_segments)]
    states = {
        pid: SegmentedRound(
            me=pid,
            round_id=round_id,
            tree=tree,
            sizes=[1] * num_segments,
            dtype=dtype,
            spans=spans,
            encode=lambda _k: np.zeros(1, dtype=dtype),
            finalize=lambda _k, _total, out: out,
            random_bytes=counter_random_bytes(pid),  # seeds: their bytes size nothing
        )
        for pid in tree.members
    }
    net = MemNet(states, "fifo", record=True)
    net.start()
    net.run()
    delivered = net.sends
    unfinished = [pid for pid, s in states.items() if not s.done]
    if unfinished:  # pragma: no cover - would be a protocol bug
        raise RuntimeError(f"simulated round did not finish for {unfinished}")
    return states, delivered


def predict(
    tree: AggregationTree,
    schema: Schema,
    *,
    members: Sequence[Member] | None = None,
    round_id: str = DEFAULT_ROUND_ID,
    session: str = DEFAULT_SESSION,
    deadline_s: float = DEFAULT_DEADLINE_S,
    seed: int | None = None,
    warnings: Sequence[str] = (),
    segment_elements: int | None = None,
) -> Plan:
    """Every member's bytes for one round over ``tree``.

    The round moves the model in segments (``segment_bounds(schema,
    segment_elements)``), each a pass through the tree with messages of its
    own; the simulation runs them all, as a real round does, with at most
    :data:`~lightning_secagg.protocol.segmented_round.DEFAULT_WINDOW` of each
    peer's own segments in flight.

    The round's ring is what the scheduler would pick from the members'
    declarations (:func:`~lightning_secagg.ring.choose_ring`); it sizes every
    dense share and partial sum, and the exponents count in the sign-up and
    assignment headers.

    Args:
        tree: The round's tree.
        schema: The model's layout (see :func:`model_schema` or ``Schema.of(state_dict)``).
        members: Members in the scheduler's queue order (which is the order of the
            assignment's member list and sets each ``signup_ok``'s ``queued``),
            each with its ``ring`` and, for exact header bytes, its real
            exponents; placeholders of realistic length (``ring="auto"``,
            assumed exponents) when omitted.
        round_id: The round's id (16 hex digits in production).
        session: The session name.
        deadline_s: The scheduler's round timeout (a float on the wire either way).
        seed: Recorded in the plan, for display.
        warnings: Privacy warnings to show.
        segment_elements: Data elements per segment; None (the default): the
            protocol's for this model,
            :func:`~lightning_secagg.schema.segment_elements_for`,
            which every real peer uses (another value predicts no real round).

    Returns:
        The plan; ``plan.peer(id).bytes_sent`` is what that peer's
        ``RoundStats.bytes_sent`` reports after the same round.

    Raises:
        ConfigurationError: the members are not the tree's, a member's
            ``ring`` or exponents are invalid, or ``segment_elements`` is not a
            positive int.
    """
    if members is None:
        members = [
            Member(pid, default_endpoint(i), _PLACEHOLDER_KEY)
            for i, pid in enumerate(sorted(tree.members))
        ]
    if sorted(m.peer_id for m in members) != sorted(tree.members):
        raise ConfigurationError("members must be exactly the tree's members")
    declared = [m.declared(schema) for m in members]
    ring = choose_ring(schema, declared)
    ring_bits = ring.ring_bits
    if segment_elements is None:
        segment_elements = segment_elements_for(schema.vector_size - 1)
    bounds = segment_bounds(schema, segment_elements)
    states, delivered = _simulate(tree, round_id, ring_bits, len(bounds))
    sealed = all(m.public_key for m in members)  # an insecure round sends plaintext
    next_seq: dict[tuple[str, str], int] = {}
    p2p_sent = dict.fromkeys(states, 0)
    p2p_recv = dict.fromkeys(states, 0)
    n_sent = dict.fromkeys(states, 0)
    n_recv = dict.fromkeys(states, 0)
    for send in delivered:
        msg = send.message
        sender = getattr(msg, "sender", None)
        if not isinstance(sender, str):  # pragma: no cover - every peer message names its sender
            raise RuntimeError(f"message without a sender: {msg!r}")
        envelope = None
        if sealed:
            # Sequence numbers run per link across the whole round, every segment's
            # messages included; a link's envelopes add up to the same bytes
            # whatever order its messages leave in.
            seq = next_seq.get((sender, send.to), 0)
            next_seq[(sender, send.to)] = seq + 1
            payload = payload_size(msg, schema, ring_bits, segment_elements=segment_elements)
            envelope = Envelope(round_id, sender, seq, sealed_parts(payload))
        size = wire_size(msg, schema, ring_bits, seal=envelope, segment_elements=segment_elements)
        p2p_sent[sender] += size
        n_sent[sender] += 1
        p2p_recv[send.to] += size
        n_recv[send.to] += 1

    assignment = Assignment(
        session=session,
        round_id=round_id,
        members=[[m.peer_id, m.endpoint, m.public_key] for m in members],
        tree=tree.to_wire(),
        group_size=tree.group_size,
        num_actors=tree.num_actors,
        total_weight=float(sum(m.weight for m in members)),
        deadline_s=float(deadline_s),
        ring_bits=ring_bits,
        exponents=list(ring.exponents) if ring.exponents is not None else None,
        round_keys=[_PLACEHOLDER_KEY if sealed else "" for _ in members],
    )
    assignment_bytes = wire_size(assignment, schema, ring_bits)
    plans = []
    for position, (m, exponents) in enumerate(zip(members, declared, strict=True)):
        signup = Signup(
            session,
            m.peer_id,
            m.endpoint,
            m.public_key,
            float(m.weight),
            schema.frac_bits,
            schema.to_wire(),
            exponents,
            _PLACEHOLDER_KEY if sealed else "",
        )
        ack = SignupAck(session, m.peer_id, position + 1)
        state = states[m.peer_id]
        plans.append(
            PeerPlan(
                peer_id=m.peer_id,
                roles=state.roles,
                kind=_kind(state),
                p2p_sent=p2p_sent[m.peer_id],
                p2p_received=p2p_recv[m.peer_id],
                scheduler_sent=wire_size(signup, schema, ring_bits),
                scheduler_received=wire_size(ack, schema, ring_bits) + assignment_bytes,
                messages_sent=n_sent[m.peer_id] + 1,
                messages_received=n_recv[m.peer_id] + 2,
            )
        )
    done = Done(round_id, members[0].peer_id, 0.0, 2**40, 2**40)
    return Plan(
        tree=tree,
        schema=schema,
        seed=seed,
        peers=tuple(plans),
        done_bytes=wire_size(done, schema, ring_bits),
        warnings=tuple(warnings),
        ring=ring,
        segment_elements=segment_elements,
    )


def plan(
    target_size: int,
    group_size: int,
    num_actors: int,
    *,
    seed: int = 0,
    params: int = 1_200_000,
    dtype: str = "float32",
    schema: Schema | None = None,
    peer_ids: Sequence[str] | None = None,
    ring: str = "auto",
    exponents: Sequence[int] | None = None,
) -> Plan:
    """Build the tree the scheduler would build and predict every peer's bytes.

    The round is simulated as :func:`predict` does, every segment of the model
    (:func:`~lightning_secagg.schema.segment_elements_for`
    elements each) a pass through the tree of its own.

    Args:
        target_size: Peers per round.
        group_size: Participants per group.
        num_actors: Actors per group.
        seed: Seeds the preview's shuffle (a :class:`random.Random`); the
            scheduler uses a CSPRNG.
        params: Model elements, when ``schema`` is not given.
        dtype: The model's dtype, when ``schema`` is not given.
        schema: A real model's layout (``Schema.of(model.state_dict())``).
        peer_ids: Member ids (default: ``peer-00000000``... like ``Peer``'s own).
        ring: Every member's ``Peer(ring=...)``: ``"auto"`` (the default: the
            32-bit ring when the scheduler would pick it) or ``"64"``.
        exponents: The magnitude exponents every member declares with
            ``ring="auto"`` (:func:`~lightning_secagg.encoding.magnitude_exponents`
            of a real model); :func:`assumed_exponents` when omitted.

    Raises:
        ConfigurationError: invalid tree parameters, ``params``, ``dtype``,
            ``ring`` or ``exponents``.
    """
    if schema is None:
        schema = model_schema(params, dtype)
    ids = list(peer_ids) if peer_ids is not None else default_peer_ids(target_size)
    if len(ids) != target_size:
        raise ConfigurationError(f"expected {target_size} peer ids, got {len(ids)}")
    tree = build_tree(ids, group_size, num_actors, random.Random(seed))  # noqa: S311 - a preview
    declared = tuple(exponents) if exponents is not None else None
    members = [
        Member(pid, default_endpoint(i), _PLACEHOLDER_KEY, ring=ring, exponents=declared)
        for i, pid in enumerate(ids)
    ]

    return predict(
        tree,
        schema,
        members=members,
        seed=seed,
        warnings=privacy_warnings(target_size, group_size, num_actors),
    )


def members_from(
    ids_endpoints_keys: Sequence[tuple[str, str, str]],
    weights: Mapping[str, float] | None = None,
    exponents: Mapping[str, Sequence[int] | None] | None = None,
) -> list[Member]:
    """Members from ``(peer_id, endpoint, public_key)`` triples, in queue order.

    ``exponents`` maps a peer id to what it declares at sign-up: its model's
    magnitude exponents, or None for a peer with ``ring="64"``; peers it does
    not name declare :func:`assumed_exponents`.
    """
    weights = weights or {}
    exponents = exponents or {}
    members = []
    for pid, ep, key in ids_endpoints_keys:
        if pid in exponents and exponents[pid] is None:
            ring, declared = "64", None
        else:
            found = exponents.get(pid)
            ring, declared = "auto", (tuple(found) if found is not None else None)
        members.append(Member(pid, ep, key, float(weights.get(pid, 1.0)), ring, declared))
    return members


__all__ = [
    "DTYPES",
    "RINGS",
    "Member",
    "PeerPlan",
    "Plan",
    "RoleSummary",
    "assumed_exponents",
    "counter_random_bytes",
    "default_peer_ids",
    "members_from",
    "model_schema",
    "plan",
    "predict",
    "wire_size",
]
