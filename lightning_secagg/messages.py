"""The protocol's messages and the validation of their headers.

Every message is a frozen dataclass. Its header fields are plain msgpack
values checked by a per-field validator *before* any buffer is looked at;
only :class:`Share`, :class:`Partial` and :class:`Result` carry a payload,
a raw little-endian buffer that travels as its own ZeroMQ frame.

Who sends what (see ``docs/protocol.md``)::

    peer -> scheduler   Signup, Leave, Heartbeat, Done, Abort
    scheduler -> peer   SignupAck, SignupRejected, Assignment, Rejoin, Abort
    peer -> peer        Share (up the tree), Partial (root exchange), Result (down)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

PROTOCOL_VERSION = 6
MAX_ID_LEN = 128
MAX_ENDPOINT_LEN = 256
MAX_REASON_LEN = 4096
MAX_MEMBERS = 100_000
#: Recent leavers named in a :class:`WaitingStatus`.
MAX_LEFT_IDS = 16
MAX_SCHEMA_ENTRIES = 100_000
MAX_NAME_LEN = 1024
MAX_LEVELS = 64
#: Bound on a round's segment index (2**42 elements in segments of 2**18).
MAX_SEGMENTS = 1 << 24

# Matched with ``fullmatch``: ``$`` alone also matches before a trailing newline.
_Z85_RE = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@+\-]+$")
_ENDPOINT_RE = re.compile(
    r"^(tcp://[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}|ipc://[^\s]+|inproc://[^\s]+)$"
)


#: The Z85 alphabet (ZeroMQ RFC 32), in digit order.
Z85_ALPHABET = (
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_Z85_DIGIT = {c: i for i, c in enumerate(Z85_ALPHABET)}
#: Characters of a Z85 CurveZMQ key (32 bytes).
Z85_KEY_LEN = 40


def is_z85_key(value: object) -> bool:
    """True for a 40-character Z85 text that decodes to a 32-byte key.

    Pure Python, so that ``protocol/`` checks keys without importing ZeroMQ:
    every character is in the alphabet and every group of five encodes a
    value below ``2**32`` (ZeroMQ's decoder refuses the others too).
    """
    if not isinstance(value, str) or len(value) != Z85_KEY_LEN:
        return False
    for start in range(0, Z85_KEY_LEN, 5):
        word = 0
        for char in value[start : start + 5]:
            digit = _Z85_DIGIT.get(char)
            if digit is None:
                return False
            word = word * 85 + digit
        if word >= 1 << 32:
            return False
    return True


class HeaderError(ValueError):
    """A header field is missing, of the wrong type, or out of bounds."""


Validator = Callable[[Any], Any]


def ident(value: Any) -> str:
    """Peer ids, session names, round ids: short, printable, no spaces."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_ID_LEN
        or not _ID_RE.fullmatch(value)
    ):
        raise HeaderError(
            f"expected an identifier of 1-{MAX_ID_LEN} safe characters, got {value!r:.80}"
        )
    return value


def endpoint(value: Any) -> str:
    """A ZeroMQ endpoint another peer can connect to."""
    if (
        not isinstance(value, str)
        or len(value) > MAX_ENDPOINT_LEN
        or not _ENDPOINT_RE.fullmatch(value)
    ):
        raise HeaderError(f"expected a tcp://, ipc:// or inproc:// endpoint, got {value!r:.80}")
    return value


def public_key(value: Any) -> str:
    """A 40-character Z85 CurveZMQ public key, or ``""`` on an explicitly insecure link."""
    if not isinstance(value, str) or not (value == "" or _Z85_RE.fullmatch(value)):
        raise HeaderError("expected a 40-character Z85 public key or an empty string")
    return value


def safe_text(value: object, limit: int = MAX_REASON_LEN) -> str:
    """``value`` as one printable line of at most ``limit`` characters, for logs and errors.

    Text another party chose (an abort reason, a tensor name) ends up in log
    lines and exception messages. Every character that is not printable
    (newlines, carriage returns, escape sequences, other control and format
    characters, line and paragraph separators) is replaced by its ``repr``
    escape, so such text can never start a line of its own nor move a
    terminal's cursor; the result is then cut to ``limit`` characters, the cut
    marked with ``...``. Idempotent on its own output.
    """
    s = value if isinstance(value, str) else str(value)
    out: list[str] = []
    size = 0
    for ch in s:
        piece = ch if ch.isprintable() else repr(ch)[1:-1]
        out.append(piece)
        size += len(piece)
        if size > limit:
            break
    joined = "".join(out)
    if len(joined) > limit:
        joined = joined[: max(0, limit - 3)] + "..."
    return joined


def text(value: Any) -> str:
    """Free text (reasons), bounded on the wire, escaped and bounded again (:func:`safe_text`)."""
    if not isinstance(value, str) or len(value) > MAX_REASON_LEN:
        raise HeaderError(f"expected text of at most {MAX_REASON_LEN} characters")
    return safe_text(value, MAX_REASON_LEN)


def integer(lo: int, hi: int) -> Validator:
    """An int in ``[lo, hi]`` (bools refused)."""

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise HeaderError(f"expected an integer in [{lo}, {hi}], got {value!r:.40}")
        return value

    return check


def real(lo: float, hi: float, *, open_lo: bool = False) -> Validator:
    """A finite float in ``[lo, hi]`` (or ``(lo, hi]``); ints accepted."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HeaderError(f"expected a number, got {value!r:.40}")
        v = float(value)
        if not math.isfinite(v) or v > hi or v < lo or (open_lo and v == lo):
            raise HeaderError(f"expected a number in {'(' if open_lo else '['}{lo}, {hi}], got {v}")
        return v

    return check


def ident_list(value: Any) -> list[str]:
    """At most :data:`MAX_LEFT_IDS` peer ids."""
    if not isinstance(value, list) or len(value) > MAX_LEFT_IDS:
        raise HeaderError(f"expected a list of at most {MAX_LEFT_IDS} peer ids")
    return [ident(pid) for pid in value]


def optional_ident(value: Any) -> str | None:
    """An identifier, or None (e.g. a heartbeat's round while still queued)."""
    return None if value is None else ident(value)


def optional_seed(value: Any) -> bytes | None:
    """A 32-byte seed, or None when the share travels dense."""
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) != 32:
        raise HeaderError("a seed must be exactly 32 bytes")
    return value


def optional_exponents(value: Any) -> list[int] | None:
    """Per-tensor magnitude exponents (``max|x| < 2**e``), or None (no compact ring)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SCHEMA_ENTRIES:
        raise HeaderError("exponents must be a non-empty list or None")
    for e in value:
        if not isinstance(e, int) or isinstance(e, bool) or not -64 <= e <= 64:
            raise HeaderError(f"exponents must be integers in [-64, 64], got {e!r:.20}")
    return value


def optional_round_keys(value: Any) -> list[str] | None:
    """The members' round keys (Z85, ``""`` on insecure links), in member order; or None."""
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_MEMBERS:
        raise HeaderError("round_keys must be a non-empty list or None")
    for key in value:
        public_key(key)
    return value


def ring_width(value: Any) -> int:
    """The round's ring: 32 or 64 bits."""
    if type(value) is not int or value not in (32, 64):
        raise HeaderError(f"ring_bits must be 32 or 64, got {value!r:.20}")
    return value


def schema_entries(value: Any) -> list[list[Any]]:
    """``[[name, [dims...], dtype], ...]``; deeper checks happen in ``Schema.from_wire``."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SCHEMA_ENTRIES:
        raise HeaderError("schema must be a non-empty list")
    for entry in value:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and len(entry[0]) <= MAX_NAME_LEN
            and isinstance(entry[1], list)
            and len(entry[1]) <= 32
            and isinstance(entry[2], str)
        ):
            raise HeaderError("schema entries must be [name, [dims], dtype]")
    return value


def member_list(value: Any) -> list[list[str]]:
    """``[[peer_id, endpoint, public_key], ...]`` with unique ids."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_MEMBERS:
        raise HeaderError("members must be a non-empty list")
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise HeaderError("members entries must be [peer_id, endpoint, public_key]")
        ident(entry[0])
        endpoint(entry[1])
        public_key(entry[2])
    if len({e[0] for e in value}) != len(value):
        raise HeaderError("members lists a peer twice")
    return value


def tree_levels(value: Any) -> list[Any]:
    """``levels[l][g] = [participants, actors]`` of peer ids (invariants checked by ``tree``)."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_LEVELS:
        raise HeaderError("tree must be a non-empty list of levels")
    for level in value:
        if not isinstance(level, list) or not level:
            raise HeaderError("tree levels must be non-empty lists of groups")
        for group in level:
            if not (isinstance(group, list) and len(group) == 2):
                raise HeaderError("tree groups must be [participants, actors]")
            for side in group:
                if not isinstance(side, list):
                    raise HeaderError("tree groups must be [participants, actors]")
                for pid in side:
                    ident(pid)
    return value


@dataclass(frozen=True)
class Message:
    """Base of all messages: ``TYPE`` names it on the wire, ``PAYLOAD`` says if it carries a buffer.

    ``PAYLOAD`` is ``None`` (no buffer), ``"optional"`` or ``"required"``; a
    payload arrives as raw bytes (``uint8``), viewed by the round that checks it.
    """

    TYPE: ClassVar[str] = ""
    PAYLOAD: ClassVar[str | None] = None
    FIELDS: ClassVar[dict[str, Validator]] = {}

    def header(self) -> dict[str, Any]:
        """The msgpack-able header: version, type and every validated field."""
        h: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE}
        for name in self.FIELDS:
            h[name] = getattr(self, name)
        return h

    @classmethod
    def from_header(cls, header: dict[str, Any], payload: np.ndarray | None) -> Message:
        """Validate every field, then build the message.

        Raises:
            HeaderError: naming the field and what was wrong.
        """
        extra = set(header) - set(cls.FIELDS) - {"v", "t"}
        if extra:
            raise HeaderError(f"{cls.TYPE}: unexpected fields {sorted(extra)[:5]}")
        values = {}
        for name, check in cls.FIELDS.items():
            if name not in header:
                raise HeaderError(f"{cls.TYPE}: missing field {name!r}")
            try:
                values[name] = check(header[name])
            except HeaderError as exc:
                raise HeaderError(f"{cls.TYPE}.{name}: {exc}") from None
        if cls.PAYLOAD is not None:
            values["payload"] = payload
        return cls(**values)


@dataclass(frozen=True)
class Signup(Message):
    """A peer joins a session's waiting queue with its model's layout, weight and CURVE key.

    The scheduler accepts ``public_key`` only if it is the key of the
    connection the sign-up arrived on. ``exponents`` (one per tensor, or None
    for a peer that keeps to the 64-bit ring) let the scheduler pick the
    compact ring when it is safe. ``round_key`` is the public half of the
    X25519 key this call seals its round traffic with (see
    :mod:`lightning_secagg.sealing`; ``""`` on insecure links).
    """

    session: str
    peer_id: str
    endpoint: str
    public_key: str
    weight: float
    frac_bits: int
    schema: list[list[Any]]
    exponents: list[int] | None = None
    round_key: str = ""

    TYPE: ClassVar[str] = "signup"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "session": ident,
        "peer_id": ident,
        "endpoint": endpoint,
        "public_key": public_key,
        "weight": real(0.0, 1e15, open_lo=True),
        "frac_bits": integer(8, 52),
        "schema": schema_entries,
        "exponents": optional_exponents,
        "round_key": public_key,
    }


@dataclass(frozen=True)
class SignupAck(Message):
    """The scheduler queued the peer; ``queued`` peers with its schema now wait in its session.

    ``note`` is empty, or says that other peers wait in the session with a
    different model schema (rounds form only among peers of one schema).
    """

    session: str
    peer_id: str
    queued: int
    note: str = ""

    TYPE: ClassVar[str] = "signup_ok"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "session": ident,
        "peer_id": ident,
        "queued": integer(0, MAX_MEMBERS),
        "note": text,
    }


@dataclass(frozen=True)
class SignupRejected(Message):
    """The scheduler refused the sign-up; ``code`` is machine-readable, ``reason`` says why.

    Codes: ``schema_mismatch`` (the model differs from the schema the operator
    pinned), ``bad_schema``, ``schema_too_large`` (more elements than the
    scheduler's ``max_elements``), ``bad_key`` (the sign-up's key is not its
    connection's), ``id_in_use`` (another key holds the peer id),
    ``not_admitted`` (the key is not on the scheduler's roster), ``key_quota``
    (the key already holds ``max_ids_per_key`` queued ids), ``busy`` (the
    scheduler's queues are full), ``too_few_peers`` (peers of the session left
    for good and too few remain to form a round). ``reason`` is escaped and bounded
    (:func:`safe_text`) when it is read.
    """

    session: str
    peer_id: str
    code: str
    reason: str

    TYPE: ClassVar[str] = "signup_rejected"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "session": ident,
        "peer_id": ident,
        "code": ident,
        "reason": text,
    }


@dataclass(frozen=True)
class Assignment(Message):
    """A round formed: who is in it, where they listen, their keys, the tree, and the deadline.

    ``ring_bits`` is the round's ring; with 32, ``exponents`` holds the largest
    magnitude exponent of each tensor over the members (None with 64).
    ``round_keys`` holds each member's round key, in the order of ``members``.
    """

    session: str
    round_id: str
    members: list[list[str]]
    tree: list[Any]
    group_size: int
    num_actors: int
    total_weight: float
    deadline_s: float
    ring_bits: int = 64
    exponents: list[int] | None = None
    round_keys: list[str] | None = None

    TYPE: ClassVar[str] = "assignment"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "session": ident,
        "round_id": ident,
        "members": member_list,
        "tree": tree_levels,
        "group_size": integer(3, MAX_MEMBERS),
        "num_actors": integer(2, MAX_MEMBERS),
        "total_weight": real(0.0, 1e20, open_lo=True),
        "deadline_s": real(0.0, 86400.0, open_lo=True),
        "ring_bits": ring_width,
        "exponents": optional_exponents,
        "round_keys": optional_round_keys,
    }


@dataclass(frozen=True)
class Leave(Message):
    """A queued peer gives up waiting (its deadline passed); the scheduler forgets it."""

    session: str
    peer_id: str

    TYPE: ClassVar[str] = "leave"
    FIELDS: ClassVar[dict[str, Validator]] = {"session": ident, "peer_id": ident}


@dataclass(frozen=True)
class Farewell(Message):
    """A peer leaves the session for good (it finished, or its process ends).

    Sent by ``Peer.close()``, the callback's teardown and a KeyboardInterrupt.
    The scheduler drops it from the queue at once and remembers it among the
    session's recent leavers: the rest of the session may then be told that too
    few peers remain (see :class:`WaitingStatus` and the ``too_few_peers`` refusal).
    """

    session: str
    peer_id: str

    TYPE: ClassVar[str] = "farewell"
    FIELDS: ClassVar[dict[str, Validator]] = {"session": ident, "peer_id": ident}


@dataclass(frozen=True)
class WaitingStatus(Message):
    """What a queued peer waits for: the scheduler's answer to its heartbeat.

    ``waiting`` peers with its schema (itself included) and ``others`` with
    another schema wait in its session; a round needs ``target_size`` (or
    ``min_size`` after the queue wait); ``left`` names the session's recent
    leavers (at most :data:`MAX_LEFT_IDS`, newest last).
    """

    session: str
    peer_id: str
    waiting: int
    others: int
    target_size: int
    min_size: int
    left: list[str]

    TYPE: ClassVar[str] = "waiting"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "session": ident,
        "peer_id": ident,
        "waiting": integer(0, MAX_MEMBERS),
        "others": integer(0, MAX_MEMBERS),
        "target_size": integer(0, MAX_MEMBERS),
        "min_size": integer(0, MAX_MEMBERS),
        "left": ident_list,
    }


@dataclass(frozen=True)
class Heartbeat(Message):
    """A peer inside ``aggregate()`` is alive: sent every ``heartbeat_interval`` seconds.

    ``round_id`` is None while the peer waits in the queue, else the round it
    works on. The scheduler drops a queued peer, and aborts the round of a
    member, that stays silent longer than its liveness timeout; it answers a
    heartbeat from a peer it does not know with :class:`Rejoin`.
    """

    session: str
    peer_id: str
    round_id: str | None

    TYPE: ClassVar[str] = "heartbeat"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "session": ident,
        "peer_id": ident,
        "round_id": optional_ident,
    }


@dataclass(frozen=True)
class Rejoin(Message):
    """The scheduler does not know this peer (e.g. it restarted): sign up again."""

    session: str
    peer_id: str

    TYPE: ClassVar[str] = "rejoin"
    FIELDS: ClassVar[dict[str, Validator]] = {"session": ident, "peer_id": ident}


@dataclass(frozen=True)
class Done(Message):
    """A peer finished a round; its stats are for the scheduler's logs."""

    round_id: str
    peer_id: str
    seconds: float
    bytes_sent: int
    bytes_received: int

    TYPE: ClassVar[str] = "done"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "round_id": ident,
        "peer_id": ident,
        "seconds": real(0.0, 1e9),
        "bytes_sent": integer(0, 2**62),
        "bytes_received": integer(0, 2**62),
    }


@dataclass(frozen=True)
class Abort(Message):
    """A round failed: from a peer to the scheduler, and from the scheduler to every member."""

    round_id: str
    peer_id: str
    reason: str

    TYPE: ClassVar[str] = "abort"
    FIELDS: ClassVar[dict[str, Validator]] = {"round_id": ident, "peer_id": ident, "reason": text}


@dataclass(frozen=True)
class Share(Message):
    """One additive share for an actor: dense in the payload, or a 32-byte seed in the header."""

    round_id: str
    level: int
    group: int
    sender: str
    seed: bytes | None
    payload: np.ndarray | None = field(default=None, compare=False, repr=False)
    segment: int = 0

    TYPE: ClassVar[str] = "share"
    PAYLOAD: ClassVar[str | None] = "optional"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "round_id": ident,
        "segment": integer(0, MAX_SEGMENTS),
        "level": integer(0, MAX_LEVELS),
        "group": integer(0, MAX_MEMBERS),
        "sender": ident,
        "seed": optional_seed,
    }


@dataclass(frozen=True)
class Partial(Message):
    """A root actor's partial sum, sent to the other root actors."""

    round_id: str
    sender: str
    payload: np.ndarray | None = field(default=None, compare=False, repr=False)
    segment: int = 0

    TYPE: ClassVar[str] = "partial"
    PAYLOAD: ClassVar[str | None] = "required"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "round_id": ident,
        "segment": integer(0, MAX_SEGMENTS),
        "sender": ident,
    }


@dataclass(frozen=True)
class Result(Message):
    """The decoded average (every tensor in its own dtype), travelling down the tree."""

    round_id: str
    sender: str
    payload: np.ndarray | None = field(default=None, compare=False, repr=False)
    segment: int = 0

    TYPE: ClassVar[str] = "result"
    PAYLOAD: ClassVar[str | None] = "required"
    FIELDS: ClassVar[dict[str, Validator]] = {
        "round_id": ident,
        "segment": integer(0, MAX_SEGMENTS),
        "sender": ident,
    }


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Signup,
        SignupAck,
        SignupRejected,
        Assignment,
        Leave,
        Heartbeat,
        Rejoin,
        Done,
        Abort,
        Share,
        Partial,
        Result,
        Farewell,
        WaitingStatus,
    )
}
PEER_TO_PEER = (Share, Partial, Result)
FROM_SCHEDULER = (SignupAck, SignupRejected, Assignment, Rejoin, Abort, WaitingStatus)
TO_SCHEDULER = (Signup, Leave, Heartbeat, Done, Abort, Farewell)
