"""One peer's part in one round, as a sans-IO state machine.

:class:`PeerRound` takes messages from other peers and returns the messages
to send; it never touches a socket, a clock or a thread. The same object runs
inside a real :class:`~lightning_secagg.peer.Peer` and inside the in-memory
simulations of the tests.

The round, from one peer's view:

1. Level 0: split the encoded vector into ``num_actors`` additive shares and
   send one to each actor of my group (the others get 32-byte seeds) -- unless
   I am one of those actors: then the vector goes whole into my own sum for
   the group (:meth:`~lightning_secagg.tree.AggregationTree.splits_in`),
   except in a root group of three actors or more, where an actor keeps its
   dense share and sends the others seeds. The
   seeds are drawn once per level for the whole round (:class:`LevelSeeds`):
   in a round cut into segments, every segment is masked with the same seeds
   (the segment's own keystream of each), and a seed travels once. Which
   actor gets a non-actor's dense share rotates with the segment
   (:func:`dense_actor`), so every actor gets an even part of the dense shares.
2. For every group I act for, wait for exactly one share from each of its
   participants that splits there (:meth:`~lightning_secagg.tree.AggregationTree.senders_to`);
   their sum is my vector for the next level, where I participate again
   (step 1 at that level).
3. At the root, the actors send each other their partial sums; each adds
   them all, decodes the ring total (``finalize``) and holds the result.
4. Down: every actor forwards the result to the participants of the groups
   it acted for that are not actors themselves, each participant being served
   by exactly one actor (``index mod num_actors``), so nobody receives it twice.

Invalid input raises :class:`~lightning_secagg.errors.RemoteProtocolError`
and leaves the state unchanged; the caller logs and drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lightning_secagg.errors import LocalProtocolError, RemoteProtocolError
from lightning_secagg.messages import Message, Partial, Result, Share
from lightning_secagg.sharing import (
    RING_DTYPES,
    RandomBytes,
    add_expanded_seed,
    draw_seeds,
    mask,
)
from lightning_secagg.tree import AggregationTree, Group

ROOT = -1  # accumulator key level for the root exchange


@dataclass(frozen=True)
class Send:
    """An instruction to the transport: deliver ``message`` to peer ``to``."""

    to: str
    message: Message


@dataclass
class _Accumulator:
    """Sum of the contributions one actor is waiting for."""

    label: str
    expected: frozenset[str]
    received: set[str] = field(default_factory=set)
    total: np.ndarray | None = None

    @property
    def complete(self) -> bool:
        return len(self.received) == len(self.expected)

    def missing(self) -> list[str]:
        return sorted(self.expected - self.received)


@dataclass
class LevelSeeds:
    """The seeds of one peer in one round, shared by every segment of the round.

    Why once per level and not per segment: a seed stands for a whole stream
    family (``sharing``: stream ``s`` for segment ``s``), so sending it with
    every segment only multiplied the messages (half of a segmented round's).

    Attributes:
        segments: Segments in the round (1 for a lone :class:`PeerRound`).
        drawn: As a participant, per level it splits at: a seed for every
            actor of its group that needs one (drawn with the first segment
            shared at that level, sent with it): every actor but itself, and in
            a round of one segment, but the one that gets its dense share. A
            segment is masked with the seeds of every actor but the one that
            gets its dense share (:func:`dense_actor`).
        received: As an actor, per ``(level, group)``: the seed of each
            participant that sent one. Each segment's sum takes in those of the
            participants whose dense share of that segment goes elsewhere, when
            it starts (an actor always contributes its own vector, or its own
            dense share, to its own group's sum, so every segment's sum does start).
    """

    segments: int = 1
    drawn: dict[int, dict[str, bytes]] = field(default_factory=dict)
    received: dict[tuple[int, int], dict[str, bytes]] = field(default_factory=dict)


def dense_actor(group: Group, participant: str, segment: int) -> str:
    """The actor of ``group`` that gets ``participant``'s dense share of ``segment``.

    An actor keeps its own. A non-actor's goes to the actors in turn, segment by
    segment, starting from its rank among the group's non-actors: every actor
    gets an even part of the dense shares (bytes, memory and work) in every
    round. Who gets a dense share matters to nobody's privacy (it is as random
    as a seed's stream to its holder), so no randomness is spent on it.
    """
    if participant in group.actors:
        return participant
    others = [p for p in group.participants if p not in group.actors]
    return group.actors[(others.index(participant) + segment) % len(group.actors)]


def designated_actor(group: Group, participant: str) -> str | None:
    """The actor of ``group`` that sends the result down to ``participant`` (None for actors)."""
    if participant in group.actors:
        return None
    others = [p for p in group.participants if p not in group.actors]
    return group.actors[others.index(participant) % len(group.actors)]


class PeerRound:
    """The state of one peer in one round.

    Args:
        me: This peer's id.
        round_id: The round's id; messages of other rounds are refused.
        tree: The round's tree, as assigned by the scheduler.
        vector: This peer's encoded vector (``uint64`` or ``uint32``: the round's
            ring); consumed (shares are made in place). None: it is handed to
            :meth:`start` instead (encoded only when needed), and ``size`` and
            ``dtype`` say what it will be.
        finalize: Turns the ring total into the result buffer; only root actors call it.
        result_nbytes: Size every result buffer must have.
        random_bytes: Randomness for the seeds.
        sends_are_copied: The transport serializes (seals) every payload it is
            handed before the next call into this object, so a buffer that was
            sent may be written to afterwards. A root actor then sums the partial
            sums into its own partial instead of a copy of it. Leave False for a
            zero-copy transport, which may still be reading sent buffers.
        segment: The segment of the model this round moves (see
            :class:`~lightning_secagg.protocol.segmented_round.SegmentedRound`);
            every message it sends names it, and messages naming another are
            refused, except seed shares, which name segment 0 and stand for all.
        seeds: The round's seeds, shared with the other segments' rounds (a
            fresh set when omitted: a round of one segment).
        size: Ring elements of the vector, when ``vector`` is None.
        dtype: The ring's dtype, when ``vector`` is None.
    """

    def __init__(
        self,
        me: str,
        round_id: str,
        tree: AggregationTree,
        vector: np.ndarray | None,
        finalize: Callable[[np.ndarray], np.ndarray],
        result_nbytes: int,
        random_bytes: RandomBytes,
        *,
        sends_are_copied: bool = False,
        segment: int = 0,
        size: int | None = None,
        dtype: np.dtype | None = None,
        seeds: LevelSeeds | None = None,
    ) -> None:
        if tree.group_of(me, 0) is None:
            raise LocalProtocolError(f"{me} is not a member of round {round_id}")
        if vector is not None:
            size, dtype = vector.size, vector.dtype
            self._check_vector(vector, size, dtype)
        elif size is None or dtype is None or dtype not in RING_DTYPES or size < 1:
            raise LocalProtocolError("without a vector, give its size and ring dtype")
        self.me = me
        self.round_id = round_id
        self.segment = segment
        self.tree = tree
        self.size = size
        self.dtype = np.dtype(dtype)
        self.result_nbytes = result_nbytes
        self._vector: np.ndarray | None = vector
        self._finalize = finalize
        self._random_bytes = random_bytes
        self._sends_are_copied = sends_are_copied
        self._seeds = seeds if seeds is not None else LevelSeeds()
        self.result: np.ndarray | None = None
        self.started = False
        self.acted = tree.acted_groups(me)
        self._accs: dict[tuple[int, int], _Accumulator] = {
            (g.level, g.index): _Accumulator(
                f"shares for level {g.level} group {g.index}", tree.senders_to(g, me)
            )
            for g in self.acted
        }
        self._groups = {(g.level, g.index): g for g in self.acted}
        root = tree.root
        self.is_root_actor = me in root.actors
        if self.is_root_actor:
            self._accs[(ROOT, 0)] = _Accumulator("root partial sums", frozenset(root.actors))
        self.top_level = max(li for li in range(tree.depth) if tree.group_of(me, li) is not None)
        top_group = tree.group_of(me, self.top_level)
        self.result_from = designated_actor(top_group, me) if top_group is not None else None

    @property
    def done(self) -> bool:
        """True once the result is held and forwarded."""
        return self.result is not None

    @property
    def roles(self) -> tuple[str, ...]:
        """Human-readable roles, e.g. ``("participant@0", "actor@0/g1", "root-actor")``."""
        roles = [f"participant@{li}" for li in range(self.top_level + 1)]
        roles += [f"actor@{g.level}/g{g.index}" for g in self.acted]
        if self.is_root_actor:
            roles.append("root-actor")
        return tuple(roles)

    def start(self, vector: np.ndarray | None = None) -> list[Send]:
        """Send this peer's level-0 shares.

        Args:
            vector: The encoded vector, if it was not given to the constructor.

        Raises:
            LocalProtocolError: called twice, or without the vector, or with one
                of the wrong size or dtype.
        """
        if self.started:
            raise LocalProtocolError("round already started")
        if (vector is None) == (self._vector is None):
            raise LocalProtocolError("give the vector to the constructor or to start(), once")
        if vector is not None:
            self._check_vector(vector, self.size, self.dtype)
        else:
            vector, self._vector = self._vector, None
        self.started = True
        return self._participate(0, vector)  # type: ignore[arg-type]

    @staticmethod
    def _check_vector(vector: np.ndarray, size: int, dtype: np.dtype) -> None:
        if vector.dtype not in RING_DTYPES or vector.ndim != 1:
            raise LocalProtocolError("the encoded vector must be a 1-d uint64 or uint32 array")
        if vector.size != size or vector.dtype != dtype:
            raise LocalProtocolError(
                f"the encoded vector has {vector.size} {vector.dtype} elements, "
                f"expected {size} {dtype}"
            )

    def receive(self, message: Message, *, payload_owned: bool = False) -> list[Send]:
        """Feed one message from another peer; return what to send in consequence.

        Args:
            message: The message, as decoded.
            payload_owned: The payload is a fresh buffer nothing else reads or
                writes (e.g. just decrypted): the round may sum into it or keep
                it as the result instead of copying it.

        Raises:
            RemoteProtocolError: the message does not belong here (wrong round,
                sender, level or group, duplicate, wrong size). State unchanged.
        """
        if getattr(message, "round_id", None) != self.round_id:
            raise RemoteProtocolError(f"message for round {getattr(message, 'round_id', None)!r}")
        is_seed = isinstance(message, Share) and message.seed is not None
        if isinstance(message, (Share, Partial, Result)) and message.segment != (
            0 if is_seed else self.segment
        ):
            raise RemoteProtocolError(
                f"{'seed share' if is_seed else 'message'} for segment {message.segment}, "
                f"not {0 if is_seed else self.segment}"
            )
        if isinstance(message, Share):
            key = (message.level, message.group)
            acc = self._accs.get(key)
            if acc is None:
                raise RemoteProtocolError(
                    f"share for level {message.level} group {message.group}, "
                    f"where {self.me} is not an actor"
                )
            if message.sender == self.me:
                raise RemoteProtocolError("share claims to come from myself")
            if message.sender not in acc.expected:
                raise RemoteProtocolError(f"{message.sender} is not expected to send {acc.label}")
            if message.seed is None:
                owner = dense_actor(self._groups[key], message.sender, self.segment)
                if owner != self.me:
                    raise RemoteProtocolError(
                        f"dense share of segment {self.segment} from {message.sender} "
                        f"belongs to {owner}"
                    )
                return self._contribute(
                    acc, key, message.sender, message.payload, None, owned=payload_owned
                )
            booked = self._seeds.received.get(key, {})
            if message.sender in booked:
                raise RemoteProtocolError(f"duplicate seed for {acc.label} from {message.sender}")
            if self._seeds.segments == 1 and self._dense_is_mine(key, message.sender):
                raise RemoteProtocolError(
                    f"seed for {acc.label} from {message.sender}, whose only dense share is ours"
                )
            self._seeds.received.setdefault(key, {})[message.sender] = message.seed
            return self.apply_seed(key, message.sender)
        if isinstance(message, Partial):
            acc = self._accs.get((ROOT, 0))
            if acc is None:
                raise RemoteProtocolError(f"partial sum sent to {self.me}, not a root actor")
            if message.sender == self.me:
                raise RemoteProtocolError("partial sum claims to come from myself")
            return self._contribute(
                acc, (ROOT, 0), message.sender, message.payload, None, owned=payload_owned
            )
        if isinstance(message, Result):
            if self.result_from is None or message.sender != self.result_from:
                raise RemoteProtocolError(
                    f"result from {message.sender}, expected it from {self.result_from}"
                )
            if self.result is not None:
                raise RemoteProtocolError("duplicate result")
            payload = message.payload
            if (
                payload is None
                or payload.dtype != np.uint8
                or payload.ndim != 1
                or payload.nbytes != self.result_nbytes
            ):
                raise RemoteProtocolError("result has the wrong size, or is not a 1-d byte buffer")
            return self._distribute(payload)
        raise RemoteProtocolError(f"unexpected {type(message).__name__} between peers")

    def apply_seed(self, key: tuple[int, int], sender: str) -> list[Send]:
        """Take ``sender``'s booked seed into the sum for ``key`` if this segment needs it.

        Not in a segment whose dense share from ``sender`` is ours; a sum that
        has not started takes it in when it does; one that is complete already
        has it. Called by the segmented round for every segment when a seed arrives.
        """
        acc = self._accs[key]
        if acc.total is None or sender in acc.received or self._dense_is_mine(key, sender):
            return []
        return self._contribute(acc, key, sender, None, self._seeds.received[key][sender])

    def _dense_is_mine(self, key: tuple[int, int], sender: str) -> bool:
        return dense_actor(self._groups[key], sender, self.segment) == self.me

    def pending_phase(self) -> int | None:
        """The earliest phase (see :mod:`lightning_secagg.deadlines`) this peer still waits in.

        Phase ``L < depth``: shares of level ``L``; ``depth``: the root exchange;
        ``2 * depth - t``: the result, for a peer whose top level is ``t``.
        None once the result is held.
        """
        if self.result is not None:
            return None
        pending = [
            self.tree.depth if key[0] == ROOT else key[0]
            for key, acc in self._accs.items()
            if not acc.complete
        ]
        if pending:
            return min(pending)
        return 2 * self.tree.depth - self.top_level

    def waiting_for(self) -> str:
        """What this peer still waits for, for timeout errors."""
        parts = []
        for key, acc in self._accs.items():
            # A booked seed is not missing, even before the sum has taken it in.
            booked = self._seeds.received.get(key, {})
            missing = [p for p in acc.missing() if p not in booked or self._dense_is_mine(key, p)]
            if missing:
                parts.append(f"{acc.label} from {', '.join(missing)}")
        if self.result is None and self.result_from is not None:
            parts.append(f"the result from actor {self.result_from} (level {self.top_level})")
        if self.result is None and not parts:
            parts.append("its own vector to complete")
        return "; ".join(parts) if parts else "nothing"

    # -- internals -------------------------------------------------------

    def _participate(self, level: int, vector: np.ndarray) -> list[Send]:
        group = self.tree.group_of(self.me, level)
        if group is None:  # pragma: no cover - guarded by the tree's invariants
            raise LocalProtocolError(f"{self.me} does not participate at level {level}")
        key = (level, group.index)
        if not self.tree.splits_in(group, self.me):
            # An actor keeps its vector whole (below the root group, or in a root
            # group of two): it goes into its own sum for the group, nobody else's
            # (AggregationTree.splits_in).
            return self._contribute(self._accs[key], key, self.me, vector, None, owned=True)
        seeds = self._seeds.drawn.get(level)
        first = seeds is None
        if seeds is None:
            # With two segments or more, a non-actor's dense shares visit every
            # actor in turn, so every actor needs its seed for the other segments.
            only = dense_actor(group, self.me, 0) if self._seeds.segments == 1 else self.me
            others = [a for a in group.actors if a not in (self.me, only)]
            seeds = dict(zip(others, draw_seeds(len(others), self._random_bytes), strict=True))
            self._seeds.drawn[level] = seeds
        # An actor keeps its dense share: its group's sum then starts with its own
        # share in every segment (see LevelSeeds).
        dense_to = dense_actor(group, self.me, self.segment)
        masks = [seed for actor, seed in seeds.items() if actor != dense_to]
        vector = mask(vector, masks, self.segment)  # in place: the vector is ours to consume
        out: list[Send] = []
        if first:  # each seed travels once, with the first segment shared at this level
            out += [
                Send(actor, Share(self.round_id, level, group.index, self.me, seed, None, 0))
                for actor, seed in seeds.items()
            ]
        if dense_to != self.me:
            share = Share(self.round_id, level, group.index, self.me, None, vector, self.segment)
            return [*out, Send(dense_to, share)]
        # Our own dense share is sent to nobody else: the sum may take it over.
        return out + self._contribute(self._accs[key], key, self.me, vector, None, owned=True)

    def _contribute(
        self,
        acc: _Accumulator,
        key: tuple[int, int],
        sender: str,
        payload: np.ndarray | None,
        seed: bytes | None,
        *,
        owned: bool = False,
    ) -> list[Send]:
        if sender not in acc.expected:
            raise RemoteProtocolError(f"{sender} is not expected to send {acc.label}")
        if sender in acc.received:
            raise RemoteProtocolError(f"duplicate {acc.label} from {sender}")
        if seed is not None:
            # Only a started sum takes a seed in (apply_seed): no zero-filled start.
            add_expanded_seed(seed, acc.total, self.segment)  # type: ignore[arg-type]
        elif payload is None:
            raise RemoteProtocolError(f"{acc.label} from {sender} is empty")
        else:
            payload = self._ring_elements(payload, f"{acc.label} from {sender}")
            if acc.total is not None:
                np.add(acc.total, payload, out=acc.total)
            else:
                # The first dense share becomes the sum: adopted when it is ours to
                # mutate (our own dense share, a freshly opened payload), else copied.
                acc.total = payload if owned else payload.copy()
                # Then every seed booked before this sum started that it needs.
                for other, booked in self._seeds.received.get(key, {}).items():
                    if not self._dense_is_mine(key, other):
                        add_expanded_seed(booked, acc.total, self.segment)
                        acc.received.add(other)
        acc.received.add(sender)
        if not acc.complete:
            return []
        total, acc.total = acc.total, None
        if key[0] == ROOT:
            return self._distribute(self._finalize(total))
        if key[0] == self.tree.depth - 1:
            return self._root_exchange(total)
        return self._participate(key[0] + 1, total)

    def _ring_elements(self, payload: np.ndarray, what: str) -> np.ndarray:
        """View a payload (raw bytes off the wire, or a vector in memory) as ring elements."""
        if payload.dtype != self.dtype:
            if payload.dtype != np.uint8 or payload.ndim != 1:
                raise RemoteProtocolError(f"{what} has dtype {payload.dtype}")
            if payload.nbytes != self.size * self.dtype.itemsize:
                raise RemoteProtocolError(
                    f"{what} has {payload.nbytes} bytes, expected "
                    f"{self.size} elements of {self.dtype.itemsize} bytes"
                )
            return payload.view(self.dtype)
        if payload.size != self.size:
            raise RemoteProtocolError(f"{what} has {payload.size} elements, expected {self.size}")
        return payload

    def _root_exchange(self, partial: np.ndarray) -> list[Send]:
        out = [
            Send(actor, Partial(self.round_id, self.me, partial, self.segment))
            for actor in self.tree.root.actors
            if actor != self.me
        ]
        # ``partial`` now backs queued sends: unless the transport copies them
        # first, it is added into an array of the accumulator's own rather than
        # becoming the accumulator.
        out += self._contribute(
            self._accs[(ROOT, 0)],
            (ROOT, 0),
            self.me,
            partial,
            None,
            owned=self._sends_are_copied,
        )
        return out

    def _distribute(self, result: np.ndarray) -> list[Send]:
        self.result = result
        out = []
        for group in self.acted:
            for participant in group.participants:
                if designated_actor(group, participant) == self.me:
                    out.append(
                        Send(participant, Result(self.round_id, self.me, result, self.segment))
                    )
        return out
