"""HyperAggregate's aggregation tree, as pure functions.

The tree decides who sends shares to whom. Level 0's participants are all
peers of a round, shuffled and cut into groups; every group picks
``num_actors`` of its own members as *actors*; the actors of level ``L`` are
the participants of level ``L + 1``; the first level that is a single group is
the root, whose actors exchange their partial sums.

Why actors are drawn from inside their group (the design leaves this open):
an actor that is also a participant sends itself nothing, and "each peer acts
for at most one group per level" then holds by construction. Below the root
group an actor does not even split its vector, nor in a root group of two
actors (:meth:`AggregationTree.splits_in`). Why a short remainder joins the last
group: a group of fewer than ``max(3, num_actors + 1)`` members could not
pick ``num_actors`` actors and still keep a non-actor, whose input is split
among two or more parties and whose share masks every actor's sum.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lightning_secagg.errors import ConfigurationError

MIN_GROUP_SIZE = 3

#: Bytes of a member's tree nonce (drawn with :mod:`secrets`) and of its commitment.
NONCE_BYTES = 32
_COMMIT_DOMAIN = b"lightning_secagg/tree-commit/v1"
_SEED_DOMAIN = b"lightning_secagg/tree-seed/v1"
_STREAM_DOMAIN = b"lightning_secagg/tree-stream/v1"


class ShuffleRandom(Protocol):
    """The randomness the tree needs; ``secrets.SystemRandom()`` in production."""

    def shuffle(self, x: list[str]) -> None: ...

    def sample(self, population: Sequence[str], k: int) -> list[str]: ...


@dataclass(frozen=True)
class Group:
    """One group of one level: its participants and the actors they send shares to."""

    level: int
    index: int
    participants: tuple[str, ...]
    actors: tuple[str, ...]


@dataclass(frozen=True)
class AggregationTree:
    """A whole tree; ``levels[-1]`` holds exactly one group, the root."""

    levels: tuple[tuple[Group, ...], ...]
    group_size: int
    num_actors: int

    @property
    def depth(self) -> int:
        """Number of levels, root included."""
        return len(self.levels)

    @property
    def root(self) -> Group:
        """The single group of the last level."""
        return self.levels[-1][0]

    @property
    def members(self) -> tuple[str, ...]:
        """Level 0's participants, in the shuffled order."""
        return tuple(p for g in self.levels[0] for p in g.participants)

    def group_of(self, peer_id: str, level: int) -> Group | None:
        """The group in which ``peer_id`` participates at ``level`` (None when it does not)."""
        for group in self.levels[level]:
            if peer_id in group.participants:
                return group
        return None

    def acted_groups(self, peer_id: str) -> list[Group]:
        """Every group (any level) for which ``peer_id`` is an actor, bottom-up."""
        return [g for level in self.levels for g in level if peer_id in g.actors]

    def splits_in(self, group: Group, peer_id: str) -> bool:
        """Whether participant ``peer_id`` of ``group`` splits its vector into shares there.

        Every non-actor does. An actor of a group below the root does not: its
        vector would only go into its own sum for that group, and that sum is shared
        in turn at the next level up, where the actor participates again. So
        it keeps the vector whole, which saves a seed and both ends' keystream
        of it (two keystreams per actor, level and segment: three fifths of
        a 30-peer round's). Its privacy then rests on the next level's shares
        and on the masks that the group's non-actors (every group has one)
        add to the same sum: see ``docs/threat-model.md``. In the root group
        the actors send each other their sums, so there an actor splits when
        the group has three actors or more: then no single other root actor
        holds every seed of its split, and the sum it receives stays masked.
        With two root actors
        the split would hide nothing from the only other one (it gets the
        seed, and the dense share inside the sum), so it is skipped there too.
        """
        if peer_id not in group.actors:
            return True
        return group.level == self.depth - 1 and len(group.actors) >= 3

    def senders_to(self, group: Group, actor: str) -> frozenset[str]:
        """Who contributes to ``actor``'s sum for ``group``: itself, and every
        participant that splits there (:meth:`splits_in`)."""
        return frozenset(p for p in group.participants if p == actor or self.splits_in(group, p))

    def neighbours(self, peer_id: str) -> frozenset[str]:
        """Every member ``peer_id`` exchanges messages with in a round.

        The actors of each group it splits its vector in (its shares up, the
        result down), the participants that split in each group it acts for
        (their shares up, the result down: only non-actors get it, and they
        all split) and, for a root actor, the other root actors (their partial
        sums, whether or not the root actors split their vectors). A peer
        needs sealed links with these only: at N = 30, 2-10 key agreements
        per round instead of 29.
        """
        out: set[str] = set()
        for level in self.levels:
            for g in level:
                if peer_id in g.participants and self.splits_in(g, peer_id):
                    out.update(g.actors)
                if peer_id in g.actors:
                    out.update(p for p in g.participants if self.splits_in(g, p))
        if peer_id in self.root.actors:  # the root exchange, split or not
            out.update(self.root.actors)
        out.discard(peer_id)
        return frozenset(out)

    def to_wire(self) -> list[list[list[list[str]]]]:
        """Plain lists for the assignment header: ``levels[l][g] = [participants, actors]``."""
        return [[[list(g.participants), list(g.actors)] for g in level] for level in self.levels]

    @classmethod
    def from_wire(
        cls, levels: list[list[list[list[str]]]], group_size: int, num_actors: int
    ) -> AggregationTree:
        """Rebuild a tree received from the scheduler and check it is well formed.

        Raises:
            ValueError: the structure breaks an invariant of :func:`build_tree`.
        """
        built = tuple(
            tuple(
                Group(level=li, index=gi, participants=tuple(g[0]), actors=tuple(g[1]))
                for gi, g in enumerate(level)
            )
            for li, level in enumerate(levels)
        )
        tree = cls(levels=built, group_size=group_size, num_actors=num_actors)
        check_tree(tree)
        return tree


def validate_tree_params(target_size: int, group_size: int, num_actors: int) -> None:
    """Refuse parameters that cannot give a private tree.

    Raises:
        ConfigurationError: naming the parameter, the allowed values and what was given.
    """
    for name, value in (
        ("target_size", target_size),
        ("group_size", group_size),
        ("num_actors", num_actors),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigurationError(f"{name} must be an int, got {value!r}")
    if num_actors < 2:
        raise ConfigurationError(
            f"num_actors must be >= 2 (with one actor the actor sees every input in the clear), "
            f"got {num_actors}"
        )
    if group_size < MIN_GROUP_SIZE:
        raise ConfigurationError(f"group_size must be >= {MIN_GROUP_SIZE}, got {group_size}")
    if num_actors >= group_size:
        raise ConfigurationError(
            f"num_actors must be < group_size (2 <= num_actors < group_size), "
            f"got num_actors={num_actors}, group_size={group_size}"
        )
    if target_size < max(MIN_GROUP_SIZE, num_actors + 1):
        raise ConfigurationError(
            f"target_size must be >= {max(MIN_GROUP_SIZE, num_actors + 1)} "
            f"(at least 3 and more than num_actors={num_actors}), got {target_size}"
        )


def privacy_warnings(target_size: int, group_size: int, num_actors: int) -> list[str]:
    """Configurations that are valid but make a peer's input easy to expose.

    A participant's input is exposed when *all* ``num_actors`` actors of its
    group collude; and in any round, the other ``N - 1`` peers learn the last
    one's input from the average itself, whatever the tree.
    """
    warnings = []
    if target_size <= 4:
        warnings.append(
            f"target_size={target_size}: in a round of {target_size} peers, the other "
            f"{target_size - 1} learn any peer's weights from the average alone"
        )
    if num_actors == 2:
        warnings.append(
            "num_actors=2: two colluding actors of a group learn its participants' weights; "
            "raise num_actors (and group_size) for a higher collusion threshold"
        )
    return warnings


def group_sizes(n: int, group_size: int, num_actors: int) -> list[int]:
    """How ``n`` participants are cut into groups at one level.

    Full groups of ``group_size``; a remainder too small to be a private group
    on its own (fewer than ``max(3, num_actors + 1)``) joins the last group.
    """
    smallest = max(MIN_GROUP_SIZE, num_actors + 1)
    if n <= group_size:
        return [n]
    full, rest = divmod(n, group_size)
    sizes = [group_size] * full
    if rest >= smallest:
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def level_sizes(n: int, group_size: int, num_actors: int) -> list[list[int]]:
    """Group sizes of every level of a tree over ``n`` peers, without building it.

    Used by the planner and the simulation tests: depth, message and byte
    counts follow from these numbers alone.
    """
    validate_tree_params(n, group_size, num_actors)
    levels = []
    while True:
        sizes = group_sizes(n, group_size, num_actors)
        levels.append(sizes)
        if len(sizes) == 1:
            return levels
        n = len(sizes) * num_actors


def build_tree(
    peer_ids: Sequence[str],
    group_size: int,
    num_actors: int,
    rng: ShuffleRandom | None = None,
) -> AggregationTree:
    """Build the aggregation tree for one round.

    Args:
        peer_ids: The round's members (unique).
        group_size: Participants per group (a remainder may make the last one larger).
        num_actors: Actors per group; a participant's input stays hidden unless
            all actors of its group collude.
        rng: Source of the shuffles; a CSPRNG (``secrets.SystemRandom``) by default,
            injectable so tests are reproducible.

    Raises:
        ConfigurationError: bad parameters or duplicate peer ids.
    """
    validate_tree_params(len(peer_ids), group_size, num_actors)
    if len(set(peer_ids)) != len(peer_ids):
        raise ConfigurationError("peer_ids must be unique")
    rng = rng if rng is not None else secrets.SystemRandom()
    participants = list(peer_ids)
    rng.shuffle(participants)
    levels: list[tuple[Group, ...]] = []
    while True:
        level = len(levels)
        groups = []
        start = 0
        for index, size in enumerate(group_sizes(len(participants), group_size, num_actors)):
            members = tuple(participants[start : start + size])
            start += size
            actors = tuple(rng.sample(members, num_actors))
            groups.append(Group(level=level, index=index, participants=members, actors=actors))
        levels.append(tuple(groups))
        if len(groups) == 1:
            return AggregationTree(tuple(levels), group_size=group_size, num_actors=num_actors)
        participants = [a for g in groups for a in g.actors]


def check_tree(tree: AggregationTree) -> None:
    """Check the invariants every tree must hold; used on trees that arrive over the wire.

    Raises:
        ValueError: which invariant is broken, and where.
    """
    if not tree.levels:
        raise ValueError("tree has no levels")
    validate_tree_params(len(tree.members), tree.group_size, tree.num_actors)
    if len(set(tree.members)) != len(tree.members):
        raise ValueError("level 0 lists a peer twice")
    expected: list[str] | None = None
    for li, level in enumerate(tree.levels):
        if not level:
            raise ValueError(f"level {li} has no groups")
        if (len(level) == 1) != (li == len(tree.levels) - 1):
            raise ValueError("exactly the last level must hold a single group")
        participants = [p for g in level for p in g.participants]
        if expected is not None and sorted(participants) != sorted(expected):
            raise ValueError(f"level {li}'s participants are not level {li - 1}'s actors")
        if len(set(participants)) != len(participants):
            raise ValueError(f"level {li} lists a participant twice")
        for g in level:
            if len(g.participants) < max(MIN_GROUP_SIZE, tree.num_actors + 1):
                raise ValueError(f"level {li} group {g.index} is too small to be private")
            if len(g.actors) != tree.num_actors or len(set(g.actors)) != tree.num_actors:
                raise ValueError(f"level {li} group {g.index} needs {tree.num_actors} actors")
            if not set(g.actors) <= set(g.participants):
                raise ValueError(f"level {li} group {g.index} has an actor from outside")
        expected = [a for g in level for a in g.actors]


# -- joint randomness: a tree nobody chooses ------------------------------------------


def new_tree_nonce() -> bytes:
    """A fresh member nonce for one sign-up (``NONCE_BYTES`` from :mod:`secrets`)."""
    return secrets.token_bytes(NONCE_BYTES)


def commit_nonce(nonce: bytes) -> bytes:
    """The commitment a member sends at sign-up: a domain-separated SHA-256 of its nonce.

    Why a hash: it binds the member to its nonce (collision resistance) and hides
    it (the nonce has 256 random bits), so nobody can choose a nonce after seeing
    the others' commitments.
    """
    return hashlib.sha256(_COMMIT_DOMAIN + nonce).digest()


def reveal_matches(commitment: bytes, nonce: bytes) -> bool:
    """Whether ``nonce`` is the value ``commitment`` was made to (constant-time compare)."""
    return len(nonce) == NONCE_BYTES and hmac.compare_digest(commit_nonce(nonce), commitment)


def tree_seed(member_ids: Sequence[str], reveals: Mapping[str, bytes]) -> bytes:
    """The round's tree seed: a hash of every member's revealed nonce, in member order.

    Invariant: as long as one member's nonce is secret and random until every
    commitment is fixed, nobody (no member, not the scheduler) can choose the
    seed. Each entry is length-prefixed, so no two member lists and reveal sets
    encode to the same hash input.

    Raises:
        ConfigurationError: a member has no reveal, or a reveal has the wrong length.
    """
    h = hashlib.sha256(_SEED_DOMAIN)
    for pid in member_ids:
        nonce = reveals.get(pid)
        if nonce is None or len(nonce) != NONCE_BYTES:
            raise ConfigurationError(f"no valid tree nonce revealed by member {pid!r}")
        raw = pid.encode()
        h.update(len(raw).to_bytes(4, "big") + raw + nonce)
    return h.digest()


class SeededShuffle:
    """A deterministic :class:`ShuffleRandom` drawn from a seed (SHA-256 in counter mode).

    Why not :class:`random.Random`: its shuffle and sample algorithms are not
    promised across Python versions, and every member must rebuild the very same
    tree. Integers below ``n`` are drawn by rejection sampling, so they are exactly
    uniform; the stream is fixed by this code alone.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._buf = b""

    def _bytes(self, n: int) -> bytes:
        while len(self._buf) < n:
            block = self._counter.to_bytes(8, "big")
            self._buf += hashlib.sha256(_STREAM_DOMAIN + self._seed + block).digest()
            self._counter += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def below(self, n: int) -> int:
        """A uniform integer in ``[0, n)``; ``n`` must be positive."""
        if n <= 0:
            raise ConfigurationError(f"below() needs n > 0, got {n}")
        bits = (n - 1).bit_length()
        nbytes = max(1, (bits + 7) // 8)
        mask = (1 << bits) - 1
        while True:
            r = int.from_bytes(self._bytes(nbytes), "big") & mask
            if r < n:
                return r

    def shuffle(self, x: list[str]) -> None:
        """Fisher-Yates, in place."""
        for i in range(len(x) - 1, 0, -1):
            j = self.below(i + 1)
            x[i], x[j] = x[j], x[i]

    def sample(self, population: Sequence[str], k: int) -> list[str]:
        """``k`` distinct items, in draw order (a partial Fisher-Yates on a copy)."""
        pool = list(population)
        if not 0 <= k <= len(pool):
            raise ConfigurationError(f"cannot sample {k} of {len(pool)}")
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def build_seeded_tree(
    peer_ids: Sequence[str], group_size: int, num_actors: int, seed: bytes
) -> AggregationTree:
    """The tree every member rebuilds from the member list and the joint seed.

    The one construction used by the scheduler-less rebuild: members compare the
    assignment's tree with this one and refuse the round if they differ.
    """
    return build_tree(peer_ids, group_size, num_actors, SeededShuffle(seed))
