"""The tree planner and the ``lightning-secagg tree`` subcommand."""

from __future__ import annotations

import json

import pytest

from lightning_secagg import ConfigurationError
from lightning_secagg.cli import main
from lightning_secagg.codec import encode
from lightning_secagg.messages import Assignment, Partial, Result, Share, Signup, SignupAck
from lightning_secagg.planner import (
    Member,
    assumed_exponents,
    default_endpoint,
    default_peer_ids,
    members_from,
    model_schema,
    payload_size,
    plan,
    predict,
    wire_size,
)
from lightning_secagg.ring import COMPACT_MAX_PEERS, choose_ring
from lightning_secagg.schema import (
    MAX_SEGMENT_ELEMENTS,
    SEGMENT_ELEMENTS,
    Schema,
    TensorSpec,
    result_span,
    segment_bounds,
    segment_elements_for,
)
from lightning_secagg.sealing import Envelope
from lightning_secagg.tree import level_sizes


def test_same_seed_same_tree_other_seed_other_tree():
    a = plan(30, 3, 2, seed=1, params=10)
    b = plan(30, 3, 2, seed=1, params=10)
    c = plan(30, 3, 2, seed=2, params=10)
    assert a.tree == b.tree
    assert a.to_dict() == b.to_dict()
    assert a.tree != c.tree
    assert a.depth == c.depth  # same shape, another draw


@pytest.mark.parametrize(
    ("n", "g", "k"), [(3, 3, 2), (7, 3, 2), (30, 3, 2), (31, 5, 3), (100, 4, 3)]
)
def test_shape_matches_level_sizes(n, g, k):
    p = plan(n, g, k, params=5)
    assert [[len(grp.participants) for grp in lvl] for lvl in p.tree.levels] == level_sizes(n, g, k)
    assert p.depth == len(level_sizes(n, g, k))
    assert p.collusion_threshold == k
    assert sorted(p.tree.members) == sorted(default_peer_ids(n))


def test_depth_for_1000_peers_is_the_documented_14():
    assert plan(1000, 3, 2, params=1).depth == 14


@pytest.mark.parametrize(
    ("n", "params", "ring", "element_bytes"),
    [
        (30, 1_200_000, "auto", 4),  # 5 segments
        (30, 1_200_000, "64", 8),
        (6, 10, "auto", 4),  # one segment
        # 131 segments of the longest length: from segment 128 on, the segment index
        # in every header takes two msgpack bytes (the sequence numbers, per link,
        # stay below 128)
        (6, 130 * MAX_SEGMENT_ELEMENTS + 7, "auto", 4),
    ],
)
def test_leaf_sends_a_dense_share_per_segment_one_seed_and_receives_the_result_per_segment(
    n, params, ring, element_bytes
):
    p = plan(n, 3, 2, params=params, ring=ring)
    assert p.ring_bits == 8 * element_bytes
    length = segment_elements_for(params)
    assert p.segment_elements == length
    bounds = segment_bounds(model_schema(params), length)
    assert p.num_segments == len(bounds) == -(-params // length)
    leaf = next(x for x in p.peers if x.kind.startswith("leaf"))
    assert leaf.roles == ("participant@0",)
    sender = "peer-00000000"  # ids have one length: no size depends on which one

    # Sealed round traffic: an envelope ([version, round, sender, seq, parts]), a
    # 16-byte tag per sealed part (the header; each payload chunk) and the sealed
    # header's mode byte on every message; a result, forwarded as one ciphertext,
    # also carries its 32-byte key and a link tag per chunk in the sealed header.
    def envelope(seq: int, parts: int) -> int:
        return len(Envelope("0" * 16, sender, seq, parts).pack())

    # Seeds, for every segment (naming segment 0), the first message on each link:
    # with several segments the leaf's dense shares visit its two actors in turn,
    # so both need its seed; with one, only the actor without the dense share.
    seeds = 2 if len(bounds) > 1 else 1
    seed_header = len(encode(Share("0" * 16, 0, 0, sender, bytes(32), None, 0))[0])
    assert seed_header == len(encode(Share("0" * 16, 0, 0, sender, None, None, 0))[0]) + 33
    sent = seeds * (envelope(0, 1) + 1 + seed_header + 16)
    received = 0
    for k, (a, b) in enumerate(bounds):
        header = len(encode(Share("0" * 16, 0, 0, sender, None, None, k))[0])
        # Segment k's dense share (its elements and its count slot) is the
        # (k // 2 + 1)-th message on its actor's link, after the seed.
        seq = k // 2 + 1 if len(bounds) > 1 else 0
        sent += envelope(seq, 2) + 1 + header + 16 + element_bytes * (1 + b - a) + 16
        lo, hi = result_span(model_schema(params), a, b)
        result_header = len(encode(Result("0" * 16, sender, None, k))[0])
        received += envelope(k, 2) + 1 + 32 + 16 + result_header + 16 + (hi - lo) + 16
    assert leaf.p2p_sent == sent
    assert leaf.p2p_received == received
    assert leaf.messages_sent == len(bounds) + seeds + 1  # dense shares, seeds, sign-up
    assert leaf.messages_received == len(bounds) + 2  # a result a segment + ack + assignment


def test_a_float32_leaf_moves_twice_the_model_in_the_compact_ring_three_times_in_the_wide():
    params = 1_000_000
    model = 4 * params
    compact_plan = plan(30, 3, 2, params=params)
    compact = next(x for x in compact_plan.peers if x.kind.startswith("leaf"))
    wide = next(
        x for x in plan(30, 3, 2, params=params, ring="64").peers if x.kind.startswith("leaf")
    )
    moved = [x.p2p_sent + x.p2p_received for x in (compact, wide)]
    # Besides the payloads, three messages a segment of a few hundred bytes each.
    overhead = 1000 * compact_plan.num_segments
    assert compact_plan.num_segments == 4
    assert 2 * model < moved[0] < 2 * model + overhead
    assert 3 * model < moved[1] < 3 * model + overhead


def test_a_model_of_several_segments_is_that_many_rounds_of_one_segment_with_seeds_sent_once():
    params = 3 * SEGMENT_ELEMENTS + 5
    # float64 (so the 64-bit ring): 8-byte elements keep every result span
    # aligned, as a one-segment model of the same size is.
    multi = plan(6, 3, 2, params=params, dtype="float64")
    assert multi.segments == [
        (0, SEGMENT_ELEMENTS),
        (SEGMENT_ELEMENTS, 2 * SEGMENT_ELEMENTS),
        (2 * SEGMENT_ELEMENTS, 3 * SEGMENT_ELEMENTS),
        (3 * SEGMENT_ELEMENTS, params),
    ]
    assert multi.dense_bytes == 8 * (params + 4)  # a count slot per segment
    assert multi.segment_dense_bytes == 8 * (SEGMENT_ELEMENTS + 1)
    assert multi.result_bytes == 8 * params
    assert multi.segment_result_bytes == 8 * SEGMENT_ELEMENTS
    # Each segment is a round of its own over the same tree: the same messages as
    # a one-segment model of the segment's size (whose bytes differ only by the
    # segment index in the headers and the sequence numbers in the envelopes,
    # one msgpack byte each below 128 either way), except the seeds. A round of one
    # segment sends one seed (num_actors - 1 = 1) at the only level where a peer
    # splits, its top one (below it, it acts, and an actor keeps its vector whole;
    # the root actors, two of them, split nowhere); a round of several sends two
    # once: its dense shares visit both actors, and both need its seed.
    sizes = [SEGMENT_ELEMENTS] * 3 + [5]
    singles = [predict(multi.tree, model_schema(m, "float64")) for m in sizes]
    assert all(q.num_segments == 1 for q in singles)

    def seed_message(sender: str) -> int:  # sealed: envelope, mode byte, header, tag
        header = len(encode(Share("0" * 16, 0, 0, sender, bytes(32), None, 0))[0])
        return len(Envelope("0" * 16, sender, 0, 1).pack()) + 1 + header + 16

    seeds_saved = 0
    for x in multi.peers:
        ones = [q.peer(x.peer_id) for q in singles]
        levels = sum(1 for r in x.roles if r.startswith("participant@"))
        top = multi.tree.group_of(x.peer_id, levels - 1)
        assert top is not None
        splits = [multi.tree.splits_in(multi.tree.group_of(x.peer_id, li), x.peer_id)
                  for li in range(levels)]  # fmt: skip
        root_actor = x.peer_id in top.actors  # a peer's top group is the root if it acts there
        assert root_actor == (x.peer_id in multi.tree.root.actors)
        assert splits == [False] * (levels - 1) + [not root_actor]
        saved = 0 if root_actor else len(sizes) - 2
        assert x.p2p_sent == sum(o.p2p_sent for o in ones) - saved * seed_message(x.peer_id)
        assert x.messages_sent - 1 == sum(o.messages_sent - 1 for o in ones) - saved
        assert x.scheduler_sent == ones[0].scheduler_sent
        seeds_saved += saved * seed_message(x.peer_id)
    assert sum(x.p2p_received for x in multi.peers) == (
        sum(o.p2p_received for q in singles for o in q.peers) - seeds_saved
    )


def test_result_size_follows_dtype_and_alignment():
    assert model_schema(3, "float16").result_nbytes == 8  # 6 bytes, aligned to 8
    assert model_schema(3, "float64").result_nbytes == 24
    assert plan(6, 3, 2, params=3, dtype="float16").result_bytes == 8
    assert plan(6, 3, 2, params=3).dense_bytes == 16  # 4 ring elements of 4 bytes
    assert plan(6, 3, 2, params=3, ring="64").dense_bytes == 32
    assert plan(6, 3, 2, params=3, dtype="float64").dense_bytes == 32  # never compact
    assert plan(6, 3, 2, params=3, dtype="float16").segment_result_bytes == 8


def test_payload_size_is_the_messages_segments():
    params = 2 * SEGMENT_ELEMENTS + 3
    schema = model_schema(params, "float16")
    last = (2 * SEGMENT_ELEMENTS, params)
    for k, (a, b) in enumerate(
        [(0, SEGMENT_ELEMENTS), (SEGMENT_ELEMENTS, 2 * SEGMENT_ELEMENTS), last]
    ):
        assert payload_size(Share("r", 0, 0, "a", None, None, k), schema, 32) == 4 * (1 + b - a)
        assert payload_size(Share("r", 0, 0, "a", bytes(32), None, k), schema, 32) == 0
        assert payload_size(Partial("r", "a", None, k), schema) == 8 * (1 + b - a)
        # float16: the last span ends with the padding to 8-byte alignment
        end = schema.result_nbytes if k == 2 else 2 * b
        assert payload_size(Result("r", "a", None, k), schema) == end - 2 * a
    assert sum(payload_size(Result("r", "a", None, k), schema) for k in range(3)) == (
        schema.result_nbytes
    )
    with pytest.raises(ConfigurationError, match="segment 3 of a model of 3 segments"):
        payload_size(Partial("r", "a", None, 3), schema)
    # the segment index is in the header: a fixint below 128, then uint8, uint16...
    big = model_schema(70_000 * MAX_SEGMENT_ELEMENTS)
    sizes = [wire_size(Share("r", 0, 0, "a", bytes(32), None, k), big) for k in (0, 127, 128, 256)]
    sizes.append(wire_size(Share("r", 0, 0, "a", bytes(32), None, 65_536), big))
    assert [x - sizes[0] for x in sizes] == [0, 0, 1, 2, 4]


def test_wire_size_counts_header_plus_real_payload():
    schema = model_schema(100)
    share = Share("r", 0, 0, "a", None)
    assert wire_size(share, schema) == len(encode(share)[0]) + 8 * 101
    seeded = Share("r", 0, 0, "a", bytes(32))
    assert wire_size(seeded, schema) == len(encode(seeded)[0])
    assert wire_size(Partial("r", "a"), schema) == len(encode(Partial("r", "a"))[0]) + 808
    assert wire_size(Result("r", "a"), schema) == len(encode(Result("r", "a"))[0]) + 400
    # the compact ring: 4-byte elements; the result stays in the model's dtype
    assert wire_size(share, schema, 32) == len(encode(share)[0]) + 4 * 101
    assert wire_size(seeded, schema, 32) == len(encode(seeded)[0])
    assert wire_size(Partial("r", "a"), schema, 32) == len(encode(Partial("r", "a"))[0]) + 404
    assert wire_size(Result("r", "a"), schema, 32) == len(encode(Result("r", "a"))[0]) + 400
    with pytest.raises(ConfigurationError, match="ring_bits must be 32 or 64"):
        wire_size(share, schema, 16)


# -- the ring -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "ring_bits", "reason"),
    [
        ({}, 32, None),
        ({"dtype": "float16"}, 32, None),
        ({"dtype": "bfloat16"}, 32, None),
        ({"dtype": "int64"}, 32, None),
        ({"dtype": "bool"}, 32, None),
        # A model that rules the compact ring out declares nothing (discloses nothing).
        ({"dtype": "float64"}, 64, "declared no magnitudes"),
        ({"ring": "64"}, 64, "asked for the 64-bit ring"),
        # an integer tensor holding values up to 2**20: no exact mean in 32 bits
        # (each peer alone could use it, so each declares; the round of 6 cannot)
        ({"dtype": "int32", "exponents": [20]}, 64, "too large"),
    ],
)
def test_ring_is_chosen_as_the_scheduler_chooses_it(kwargs, ring_bits, reason):
    p = plan(6, 3, 2, params=10, **kwargs)
    assert p.ring_bits == ring_bits
    assert p.dense_bytes == ring_bits // 8 * 11
    if reason is None:
        assert p.ring.reason is None and p.ring.exponents is not None
    else:
        assert reason in p.ring.reason and p.ring.exponents is None


def test_more_than_64_peers_keep_the_wide_ring():
    assert plan(COMPACT_MAX_PEERS, 3, 2, params=1).ring_bits == 32
    p = plan(COMPACT_MAX_PEERS + 1, 3, 2, params=1)
    assert p.ring_bits == 64
    assert f"{COMPACT_MAX_PEERS + 1} peers" in p.ring.reason


def test_assumed_exponents_follow_what_peers_declare_for_each_kind_of_tensor():
    schema = Schema(
        (
            TensorSpec("w", (3,), "float32"),
            TensorSpec("e", (0,), "float32"),
            TensorSpec("n", (), "int64"),
            TensorSpec("m", (2,), "bool"),
        )
    )
    assert assumed_exponents(schema) == [0, -64, 1, 1]
    assert choose_ring(schema, [assumed_exponents(schema)] * 3).ring_bits == 32


def test_relayed_exponents_are_the_per_tensor_maximum():
    schema = Schema((TensorSpec("a", (2,), "float32"), TensorSpec("b", (2,), "float16")))
    choice = choose_ring(schema, [[-3, 2], [1, -64], [0, 0]])
    assert (choice.ring_bits, choice.exponents, choice.reason) == (32, (1, 2), None)
    assert choose_ring(schema, [[-3, 2], None, [0, 0]]).ring_bits == 64


def test_header_bytes_count_the_declared_and_relayed_exponents():
    schema = Schema((TensorSpec("a", (4,), "float32"), TensorSpec("b", (4,), "float32")))
    ids = default_peer_ids(6)
    declared = {ids[0]: [-40, 3], ids[1]: [-2, 5], ids[2]: None}  # the third keeps to 64

    def members(decl):  # type: ignore[no-untyped-def]
        triples = [(pid, default_endpoint(i), "0" * 40) for i, pid in enumerate(ids)]
        return members_from(triples, exponents=decl)

    p = predict(plan(6, 3, 2, peer_ids=ids, schema=schema).tree, schema, members=members({}))
    assert p.ring_bits == 32 and p.ring.exponents == (0, 0)
    first = p.peer(ids[0])
    # Sealed rounds: every sign-up carries a 40-character round key.
    signup = Signup(
        "default", ids[0], default_endpoint(0), "0" * 40, 1.0, 32, schema.to_wire(), None, "0" * 40
    )
    nil = len(encode(signup)[0])
    assert first.scheduler_sent == nil - 1 + 3  # nil -> fixarray of two fixints

    # A real -40 is a two-byte msgpack int; a member with ring="64" sends nil and
    # keeps the whole round in the 64-bit ring, whose assignment relays nil.
    q = predict(p.tree, schema, members=members(declared))
    assert q.ring_bits == 64
    assert q.peer(ids[0]).scheduler_sent == nil - 1 + 1 + 2 + 1
    assert q.peer(ids[1]).scheduler_sent == nil - 1 + 3
    assert q.peer(ids[2]).scheduler_sent == nil
    base = dict(
        session="default",
        round_id="0" * 16,
        members=[[pid, default_endpoint(i), "0" * 40] for i, pid in enumerate(ids)],
        tree=p.tree.to_wire(),
        group_size=3,
        num_actors=2,
        total_weight=6.0,
        deadline_s=300.0,
        round_keys=["0" * 40] * 6,
    )
    wide = len(encode(Assignment(**base))[0])
    compact = len(encode(Assignment(**base, ring_bits=32, exponents=[0, 0]))[0])
    assert compact == wide + 2  # three exponents bytes instead of nil; fixints 32 and 64 alike
    for plan_, assignment in ((p, compact), (q, wide)):
        for position, pid in enumerate(ids):
            ack = len(encode(SignupAck("default", pid, position + 1))[0])
            assert plan_.peer(pid).scheduler_received == ack + assignment


def test_bad_ring_or_exponents_are_refused():
    with pytest.raises(ConfigurationError, match="ring must be one of auto, 64"):
        plan(6, 3, 2, params=1, ring="32")
    with pytest.raises(ConfigurationError, match="1 exponents for 2 tensors"):
        schema = Schema((TensorSpec("a", (1,), "float32"), TensorSpec("b", (1,), "float32")))
        plan(6, 3, 2, schema=schema, exponents=[0])
    with pytest.raises(ConfigurationError, match=r"exponents must be in \[-64, 64\]"):
        plan(6, 3, 2, params=1, exponents=[65])
    tree = plan(6, 3, 2, params=1).tree
    bad = [Member(pid, "tcp://h:1", "0" * 40, ring="32") for pid in tree.members]
    with pytest.raises(ConfigurationError, match="ring must be"):
        predict(tree, model_schema(1), members=bad)


def test_conservation_every_byte_sent_is_received():
    p = plan(30, 3, 2, params=1000)
    assert sum(x.p2p_sent for x in p.peers) == sum(x.p2p_received for x in p.peers)


def test_summary_orders_roles():
    p = plan(30, 3, 2, params=1000)
    rows = p.summary()
    assert rows[0].kind.startswith("leaf") and rows[-1].kind == "root actor"
    assert sum(r.count for r in rows) == 30


def test_traffic_per_peer_grows_slowly_total_linearly():
    # the same ring for both (beyond 64 peers a round keeps the 64-bit ring)
    small = plan(30, 3, 2, params=10_000, ring="64")
    big = plan(300, 3, 2, params=10_000, ring="64")
    per_peer = [sum(x.bytes_sent for x in q.peers) / q.num_peers for q in (small, big)]
    assert per_peer[1] < 1.5 * per_peer[0]


def test_busiest_peer_is_the_most_bytes_one_way_and_the_ratio_is_over_the_mean():
    p = plan(30, 3, 2, params=10_000)
    one_way = [max(x.bytes_sent, x.bytes_received) for x in p.peers]
    assert p.busiest.one_way_bytes == max(one_way)
    assert p.mean_one_way_bytes == pytest.approx(sum(one_way) / 30)
    assert p.load_ratio == pytest.approx(max(one_way) / (sum(one_way) / 30))
    # Today's tree: the busiest peer is an actor at several levels, well above the mean.
    assert p.busiest.kind != "leaf (level 0 only)" and p.load_ratio > 1.5


def test_cli_tree_names_the_busiest_peer_and_its_ratio(capsys):
    assert main(["tree", "--target-size", "12", "--params", "1000"]) == 0
    out = capsys.readouterr().out
    p = plan(12, 3, 2, params=1000)
    assert (
        f"busiest peer: {p.busiest.peer_id} ({p.busiest.kind}), "
        f"{p.busiest.one_way_bytes:,} B one way, {p.load_ratio:.2f}x the mean" in out
    )
    assert main(["tree", "--target-size", "12", "--params", "1000", "--json"]) == 0
    busiest = json.loads(capsys.readouterr().out)["busiest"]
    assert busiest["peer_id"] == p.busiest.peer_id
    assert busiest["ratio_to_mean"] == pytest.approx(p.load_ratio)


def test_privacy_statements_name_the_threshold():
    p = plan(30, 4, 3, params=1)
    text = " ".join(p.privacy())
    assert "all 3 actors" in text
    assert "other 29 peers" in text
    assert any("target_size=3" in w for w in plan(3, 3, 2, params=1).warnings)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": 0}, "params must be an int >= 1"),
        ({"dtype": "complex64"}, "dtype must be one of"),
        ({"peer_ids": ["a", "b"]}, "expected 6 peer ids"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        plan(6, 3, 2, **kwargs)


def test_bad_tree_parameters_are_refused():
    with pytest.raises(ConfigurationError, match="num_actors must be < group_size"):
        plan(6, 3, 3)


# -- the CLI --------------------------------------------------------------


def test_cli_tree_prints_tree_depth_privacy_and_bytes(capsys):
    assert main(["tree", "--target-size", "30", "--group-size", "3", "--num-actors", "2"]) == 0
    out = capsys.readouterr().out
    assert "Aggregation tree: 30 peers, group_size=3, num_actors=2, seed=0" in out
    assert "CSPRNG" in out
    assert "depth: 5 levels" in out
    assert "level 4 (root)" in out
    assert "all 2 actors of its level-0 group" in out
    assert "other 29 peers" in out
    assert "1,200,000 elements" in out
    assert "Ring: Z_2^32 (4 B elements)" in out
    # 1,200,000 elements: 4 segments of 2**18 and one of 151,424, each with a count slot
    assert f"in 5 segments of at most {SEGMENT_ELEMENTS:,} elements" in out
    assert f"{4 * 1_200_005:,} B payload in all (4 B x 1,200,005" in out
    assert f"at most {4 * (SEGMENT_ELEMENTS + 1):,} B a message" in out
    assert "root actor" in out


def test_cli_tree_ring_64_doubles_the_dense_payload(capsys):
    assert main(["tree", "--target-size", "30", "--ring", "64"]) == 0
    out = capsys.readouterr().out
    assert "Ring: Z_2^64 (8 B elements): a member declared no magnitudes" in out
    assert f"{8 * 1_200_005:,} B payload in all (8 B x 1,200,005" in out
    assert f"at most {8 * (SEGMENT_ELEMENTS + 1):,} B a message" in out
    assert main(["tree", "--target-size", "6", "--dtype", "float64", "--params", "5"]) == 0
    assert "declared no magnitudes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tree", "--ring", "32"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_tree_is_reproducible_with_seed(capsys):
    main(["tree", "--target-size", "12", "--seed", "7", "--params", "10"])
    first = capsys.readouterr().out
    main(["tree", "--target-size", "12", "--seed", "7", "--params", "10"])
    assert capsys.readouterr().out == first


def test_cli_tree_json_matches_the_plan(capsys):
    args = ["tree", "--target-size", "9", "--group-size", "4", "--num-actors", "3"]
    assert main([*args, "--params", "500", "--dtype", "float16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = plan(9, 4, 3, params=500, dtype="float16").to_dict()
    assert data == json.loads(json.dumps(expected))
    assert data["model"]["result_bytes"] == 1000
    assert data["model"]["dense_share_bytes"] == 4 * 501
    assert data["model"]["segments"] == 1
    assert data["model"]["segment_elements"] == SEGMENT_ELEMENTS
    assert data["model"]["segment_dense_share_bytes"] == 4 * 501
    assert data["model"]["segment_result_bytes"] == 1000
    assert data["ring"] == {
        "ring_bits": 32,
        "element_bytes": 4,
        "exponents": [0],
        "reason_for_64": None,
    }
    assert len(data["peers"]) == 9
    assert data["collusion_threshold"] == 3
    assert main([*args, "--params", "500", "--ring", "64", "--json"]) == 0
    wide = json.loads(capsys.readouterr().out)
    assert wide["ring"]["ring_bits"] == 64 and wide["ring"]["exponents"] is None
    assert wide["model"]["dense_share_bytes"] == 8 * 501


def test_cli_tree_per_peer_lists_everyone(capsys):
    assert main(["tree", "--target-size", "6", "--params", "10", "--per-peer"]) == 0
    out = capsys.readouterr().out
    for pid in default_peer_ids(6):
        assert pid in out.split("roles", 1)[1]


def test_cli_tree_bad_parameters_exit_2_with_the_reason(capsys):
    assert main(["tree", "--target-size", "6", "--group-size", "3", "--num-actors", "3"]) == 2
    err = capsys.readouterr().err
    assert "lightning-secagg tree: error: num_actors must be < group_size" in err


def test_cli_tree_unknown_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tree", "--dtype", "complex64"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
