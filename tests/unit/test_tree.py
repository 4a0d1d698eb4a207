"""The aggregation tree: invariants for 1..1000 peers, validation, wire round trip, tampering."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_secagg.errors import ConfigurationError
from lightning_secagg.tree import (
    AggregationTree,
    Group,
    build_tree,
    check_tree,
    group_sizes,
    level_sizes,
    validate_tree_params,
)

pytestmark = pytest.mark.timeout(60)


def ids(n: int) -> list[str]:
    return [f"peer-{i}" for i in range(n)]


@st.composite
def tree_params(draw: st.DrawFn, max_n: int = 1000) -> tuple[int, int, int]:
    """Valid ``(n, group_size, num_actors)`` with ``n`` in ``[max(3, k + 1), max_n]``."""
    k = draw(st.integers(2, 6))
    g = draw(st.integers(k + 1, 12))
    n = draw(st.integers(max(3, k + 1), max_n))
    return n, g, k


def assert_invariants(tree: AggregationTree, members: list[str], g: int, k: int) -> None:
    smallest = max(3, k + 1)
    # Level 0 holds every peer exactly once.
    level0 = [p for grp in tree.levels[0] for p in grp.participants]
    assert sorted(level0) == sorted(members)
    assert len(level0) == len(set(level0))
    assert sorted(tree.members) == sorted(members)
    for li, level in enumerate(tree.levels):
        participants = [p for grp in level for p in grp.participants]
        assert len(participants) == len(set(participants)), f"level {li} repeats a participant"
        actors_here: list[str] = []
        for gi, grp in enumerate(level):
            assert (grp.level, grp.index) == (li, gi)
            n_level = len(participants)
            # A lone group may be smaller than group_size; otherwise a remainder of
            # fewer than ``smallest`` joins the last group, so at most g + smallest - 1.
            upper = g if len(level) == 1 and n_level <= g else g + smallest - 1
            assert smallest <= len(grp.participants) <= upper
            assert len(grp.actors) == k
            assert len(set(grp.actors)) == k
            assert set(grp.actors) <= set(grp.participants)
            actors_here += grp.actors
        # Each peer acts for at most one group per level.
        assert len(actors_here) == len(set(actors_here))
        if li + 1 < tree.depth:
            nxt = [p for grp in tree.levels[li + 1] for p in grp.participants]
            assert nxt == actors_here, "the actors of L are the participants of L + 1, in order"
        # Exactly the last level is a single group: the root.
        assert (len(level) == 1) == (li == tree.depth - 1)
    assert tree.root is tree.levels[-1][0]
    assert [[len(grp.participants) for grp in lvl] for lvl in tree.levels] == level_sizes(
        len(members), g, k
    )


@settings(max_examples=120, deadline=None)
@given(params=tree_params(), seed=st.integers(0, 2**32))
def test_every_invariant_holds(params, seed):
    n, g, k = params
    members = ids(n)
    tree = build_tree(members, g, k, random.Random(seed))
    assert_invariants(tree, members, g, k)
    check_tree(tree)
    again = AggregationTree.from_wire(tree.to_wire(), g, k)
    assert again == tree
    check_tree(again)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 1000), g=st.integers(3, 8), k=st.integers(2, 7))
def test_small_or_invalid_sizes_are_refused_by_name(n, g, k):
    """Over all of 1..1000: valid parameters build a good tree, others name what is wrong."""
    valid = 2 <= k < g and n >= max(3, k + 1)
    if valid:
        tree = build_tree(ids(n), g, k, random.Random(n))
        assert_invariants(tree, ids(n), g, k)
        return
    with pytest.raises(ConfigurationError, match=r"num_actors|target_size"):
        build_tree(ids(n), g, k, random.Random(n))


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_peers_cannot_form_a_round(n):
    with pytest.raises(ConfigurationError, match=rf"target_size must be >= 3 .*got {n}"):
        build_tree(ids(n), 3, 2)


@pytest.mark.parametrize(("g", "k"), [(3, 2), (4, 3), (5, 2), (6, 5), (10, 3)])
def test_depth_grows_like_log_n(g, k):
    for n in range(max(3, k + 1), 1001):
        depth = len(level_sizes(n, g, k))
        bound = math.ceil(math.log(max(n / 3, 1)) / math.log(g / k)) + 2
        assert depth <= bound, (n, g, k, depth, bound)


def test_documented_depths():
    # n=1000, (3, 2): 1000 -> 666 -> 444 -> 296 -> ... shrinks by ~2/3 per level.
    assert [len(level_sizes(n, 3, 2)) for n in (3, 6, 7, 12, 30, 100, 1000)] == [
        1, 2, 2, 3, 5, 8, 14,
    ]  # fmt: skip
    assert len(level_sizes(12, 4, 3)) == 3
    assert level_sizes(12, 4, 3) == [[4, 4, 4], [4, 5], [6]]
    assert level_sizes(7, 3, 2) == [[3, 4], [4]]


def test_tree_depth_matches_level_sizes_exactly():
    for n in (3, 4, 5, 6, 7, 8, 12, 30, 99, 100, 101, 1000):
        tree = build_tree(ids(n), 3, 2, random.Random(n))
        assert tree.depth == len(level_sizes(n, 3, 2))


@pytest.mark.parametrize(
    ("n", "g", "k", "expected"),
    [
        (3, 3, 2, [3]),
        (4, 3, 2, [4]),  # remainder 1 joins the only full group
        (5, 3, 2, [5]),  # remainder 2 < 3 joins it too
        (6, 3, 2, [3, 3]),
        (7, 3, 2, [3, 4]),
        (8, 3, 2, [3, 5]),
        (9, 3, 2, [3, 3, 3]),
        (10, 4, 2, [4, 6]),  # remainder 2 < 3 joins the last group
        (11, 4, 2, [4, 4, 3]),  # remainder 3 forms its own group
        (11, 4, 3, [4, 7]),  # remainder 3 < max(3, k + 1) = 4 joins
        (12, 5, 3, [5, 7]),
        (13, 5, 3, [5, 8]),
        (14, 5, 3, [5, 5, 4]),  # remainder 4 = max(3, k + 1) forms its own group
        (5, 8, 3, [5]),  # fewer than group_size: one group
    ],
)
def test_group_sizes(n, g, k, expected):
    assert group_sizes(n, g, k) == expected


def test_same_seed_same_tree_and_shuffled():
    a = build_tree(ids(30), 3, 2, random.Random(5))
    b = build_tree(ids(30), 3, 2, random.Random(5))
    c = build_tree(ids(30), 3, 2, random.Random(6))
    assert a == b
    assert a != c
    assert list(a.members) != ids(30)  # the order is shuffled


def test_default_rng_is_a_csprng_and_input_is_not_mutated():
    members = ids(12)
    before = list(members)
    tree = build_tree(members, 3, 2)
    assert members == before
    check_tree(tree)


def test_group_of_and_acted_groups():
    tree = build_tree(ids(12), 3, 2, random.Random(0))
    for pid in ids(12):
        g0 = tree.group_of(pid, 0)
        assert g0 is not None and pid in g0.participants
        acted = tree.acted_groups(pid)
        assert [g.level for g in acted] == sorted(g.level for g in acted)
        for grp in acted:
            assert pid in grp.actors
            nxt = grp.level + 1
            if nxt < tree.depth:
                assert tree.group_of(pid, nxt) is not None
        # A peer acts at level L exactly when it participates at level L + 1.
        for li in range(tree.depth - 1):
            acts = any(pid in g.actors for g in tree.levels[li])
            assert acts == (tree.group_of(pid, li + 1) is not None)
    assert tree.group_of("stranger", 0) is None


def test_neighbours_of_a_hand_built_tree():
    # level 0: a b c -> actors b c; d e f -> actors e f; root: b c e f -> actors c e
    tree = AggregationTree.from_wire(
        [
            [[["a", "b", "c"], ["b", "c"]], [["d", "e", "f"], ["e", "f"]]],
            [[["b", "c", "e", "f"], ["c", "e"]]],
        ],
        3,
        2,
    )
    assert tree.neighbours("a") == {"b", "c"}
    assert tree.neighbours("b") == {"a", "c", "e"}
    assert tree.neighbours("c") == {"a", "b", "e", "f"}
    assert tree.neighbours("d") == {"e", "f"}
    assert tree.neighbours("stranger") == frozenset()


def test_actors_below_the_root_group_do_not_split_and_are_not_each_others_neighbours():
    # level 0: g h i -> actors g h (and two more groups); level 1: g and h land in
    # different groups, as non-actors; the root group: a d b e -> actors a b.
    tree = AggregationTree.from_wire(
        [
            [
                [["a", "b", "c"], ["a", "b"]],
                [["d", "e", "f"], ["d", "e"]],
                [["g", "h", "i"], ["g", "h"]],
            ],
            [[["a", "d", "g"], ["a", "d"]], [["b", "e", "h"], ["b", "e"]]],
            [[["a", "d", "b", "e"], ["a", "b"]]],
        ],
        3,
        2,
    )
    g0, root = tree.levels[0][2], tree.root
    assert not tree.splits_in(g0, "g") and not tree.splits_in(g0, "h")
    assert tree.splits_in(g0, "i")
    # In a root group of two actors only the non-actors split: the other root
    # actor would learn the split anyway (it gets the seed and the partial sum).
    assert [p for p in root.participants if tree.splits_in(root, p)] == ["d", "e"]
    assert tree.senders_to(g0, "g") == {"g", "i"}
    assert tree.senders_to(root, "a") == {"a", "d", "e"}
    # g and h share a group only where neither sends the other anything.
    assert tree.neighbours("g") == {"i", "a", "d"}
    assert tree.neighbours("h") == {"i", "b", "e"}
    # a and b act together at the root: they exchange partial sums there.
    assert tree.neighbours("a") == {"b", "c", "d", "e", "g"}
    assert tree.neighbours("b") == {"a", "c", "d", "e", "h"}


def test_root_actors_split_when_there_are_three_or_more():
    # One group of five with three actors: against any one other root actor, an
    # actor's split hides its sum (the third actor's seed is not in it).
    tree = AggregationTree.from_wire([[[["a", "b", "c", "d", "e"], ["a", "b", "c"]]]], 5, 3)
    root = tree.root
    assert all(tree.splits_in(root, p) for p in root.participants)
    assert tree.senders_to(root, "a") == set(root.participants)
    assert tree.neighbours("a") == {"b", "c", "d", "e"}
    # Two actors in a single group: the actors only exchange partial sums.
    two = AggregationTree.from_wire([[[["a", "b", "c", "d"], ["a", "b"]]]], 4, 2)
    assert [p for p in two.root.participants if two.splits_in(two.root, p)] == ["c", "d"]
    assert two.senders_to(two.root, "a") == {"a", "c", "d"}
    assert two.neighbours("a") == {"b", "c", "d"}
    assert two.neighbours("c") == {"a", "b"}


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "g", "k", "match"),
    [
        (10, 3, 1, r"num_actors must be >= 2.*got 1"),
        (10, 3, 0, r"num_actors must be >= 2"),
        (10, 3, -1, r"num_actors must be >= 2"),
        (10, 3, 3, r"num_actors must be < group_size.*num_actors=3, group_size=3"),
        (10, 4, 5, r"num_actors must be < group_size"),
        (10, 2, 2, r"group_size must be >= 3, got 2"),
        (10, 0, 2, r"group_size must be >= 3"),
        (2, 3, 2, r"target_size must be >= 3.*got 2"),
        (3, 5, 3, r"target_size must be >= 4.*num_actors=3.*got 3"),
        (0, 3, 2, r"target_size"),
        (10.0, 3, 2, r"target_size must be an int, got 10.0"),
        (10, "3", 2, r"group_size must be an int, got '3'"),
        (10, 3, 2.0, r"num_actors must be an int, got 2.0"),
        (True, 3, 2, r"target_size must be an int, got True"),
        (10, 3, None, r"num_actors must be an int, got None"),
    ],
)
def test_validation_names_the_parameter(target, g, k, match):
    with pytest.raises(ConfigurationError, match=match):
        validate_tree_params(target, g, k)


def test_validation_boundaries_pass():
    validate_tree_params(3, 3, 2)
    validate_tree_params(4, 4, 3)
    validate_tree_params(1000, 100, 99)


def test_configuration_error_is_a_value_error():
    with pytest.raises(ValueError):
        validate_tree_params(3, 3, 1)


def test_duplicate_ids_refused():
    with pytest.raises(ConfigurationError, match="unique"):
        build_tree(["a", "b", "c", "a"], 3, 2)


def test_level_sizes_validates():
    with pytest.raises(ConfigurationError, match="num_actors"):
        level_sizes(10, 3, 3)


# -- tampered trees --------------------------------------------------------------


def replace_group(tree: AggregationTree, li: int, gi: int, **changes) -> AggregationTree:
    levels = [list(level) for level in tree.levels]
    levels[li][gi] = dataclasses.replace(levels[li][gi], **changes)
    return dataclasses.replace(tree, levels=tuple(tuple(level) for level in levels))


@pytest.fixture
def tree12() -> AggregationTree:
    tree = build_tree(ids(12), 3, 2, random.Random(3))
    assert tree.depth == 3
    return tree


def test_untampered_passes(tree12):
    check_tree(tree12)


def test_actor_from_outside_refused(tree12):
    g = tree12.levels[0][0]
    outsider = tree12.levels[0][1].participants[0]
    bad = replace_group(tree12, 0, 0, actors=(g.actors[0], outsider))
    with pytest.raises(ValueError):
        check_tree(bad)
    # Same at the root, where nothing downstream would notice.
    root = tree12.root
    bad_root = replace_group(tree12, tree12.depth - 1, 0, actors=(root.actors[0], "mallory"))
    with pytest.raises(ValueError, match="actor from outside"):
        check_tree(bad_root)


def test_duplicated_participant_refused(tree12):
    g0, g1 = tree12.levels[0][0], tree12.levels[0][1]
    bad = replace_group(tree12, 0, 1, participants=(*g1.participants[:-1], g0.participants[0]))
    with pytest.raises(ValueError, match="twice"):
        check_tree(bad)


def test_wrong_actor_count_refused(tree12):
    root = tree12.root
    with pytest.raises(ValueError, match="needs 2 actors"):
        check_tree(replace_group(tree12, tree12.depth - 1, 0, actors=root.actors[:1]))
    with pytest.raises(ValueError, match="needs 2 actors"):
        check_tree(
            replace_group(tree12, tree12.depth - 1, 0, actors=(root.actors[0], root.actors[0]))
        )
    three = root.participants[:3]
    with pytest.raises(ValueError, match="needs 2 actors"):
        check_tree(replace_group(tree12, tree12.depth - 1, 0, actors=three))


def test_too_small_group_refused():
    wire = [
        [[["a", "b", "c", "d"], ["a", "b"]], [["e", "f"], ["e", "f"]]],
        [[["a", "b", "e", "f"], ["a", "e"]]],
    ]
    with pytest.raises(ValueError, match="too small"):
        AggregationTree.from_wire(wire, 3, 2)


def test_next_level_not_the_actors_refused(tree12):
    g = tree12.levels[1][0]
    stranger = next(
        p for p in tree12.members if all(p not in grp.participants for grp in tree12.levels[1])
    )
    bad = replace_group(tree12, 1, 0, participants=(*g.participants[:-1], stranger))
    with pytest.raises(ValueError, match="participants are not level 0's actors"):
        check_tree(bad)


def test_single_group_before_the_last_level_refused():
    wire = [
        [[["a", "b", "c"], ["a", "b"]]],
        [[["a", "b"], ["a", "b"]]],
    ]
    with pytest.raises(ValueError):
        AggregationTree.from_wire(wire, 3, 2)


def test_last_level_with_two_groups_refused(tree12):
    truncated = dataclasses.replace(tree12, levels=tree12.levels[:-1])
    with pytest.raises(ValueError, match="last level must hold a single group"):
        check_tree(truncated)


def test_empty_tree_and_empty_level_refused(tree12):
    with pytest.raises(ValueError, match="no levels"):
        check_tree(dataclasses.replace(tree12, levels=()))
    with pytest.raises(ValueError, match="no groups"):
        levels = (tree12.levels[0], (), *tree12.levels[1:])
        check_tree(dataclasses.replace(tree12, levels=levels))


def test_wire_with_bad_params_refused(tree12):
    with pytest.raises(ConfigurationError, match="num_actors"):
        AggregationTree.from_wire(tree12.to_wire(), 3, 1)


def test_duplicate_peer_at_level_zero_refused():
    wire = [[[["a", "b", "a"], ["a", "b"]]]]
    with pytest.raises(ValueError, match="twice"):
        AggregationTree.from_wire(wire, 3, 2)


def test_to_wire_shape(tree12):
    wire = tree12.to_wire()
    assert len(wire) == tree12.depth
    for level, groups in zip(wire, tree12.levels, strict=True):
        for (participants, actors), grp in zip(level, groups, strict=True):
            assert participants == list(grp.participants)
            assert actors == list(grp.actors)
    assert isinstance(tree12.levels[0][0], Group)
