"""The tree planner and the ``lightning-secagg tree`` subcommand."""

from __future__ import annotations

import json

import pytest

from lightning_secagg import ConfigurationError
from lightning_secagg.cli import main
from lightning_secagg.codec import encode
from lightning_secagg.messages import Partial, Result, Share
from lightning_secagg.planner import (
    default_peer_ids,
    model_schema,
    plan,
    wire_size,
)
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


def test_leaf_sends_one_dense_share_and_seeds_and_receives_the_result():
    params = 1_200_000
    p = plan(30, 3, 2, params=params)
    leaf = next(x for x in p.peers if x.kind.startswith("leaf"))
    assert leaf.roles == ("participant@0",)
    header = len(encode(Share("0" * 16, 0, 0, leaf.peer_id, None))[0])
    seed_header = len(encode(Share("0" * 16, 0, 0, leaf.peer_id, bytes(32)))[0])
    assert seed_header == header + 33  # bin8 of 32 bytes instead of nil
    # one dense share and (k - 1) seeds: group index is a 1-byte fixint here
    assert leaf.p2p_sent == header + 8 * (params + 1) + seed_header
    result_header = len(encode(Result("0" * 16, "peer-00000000", None))[0])
    assert leaf.p2p_received == result_header + 4 * params
    assert leaf.messages_sent == 3  # 2 shares + sign-up
    assert leaf.messages_received == 3  # result + ack + assignment


def test_result_size_follows_dtype_and_alignment():
    assert model_schema(3, "float16").result_nbytes == 8  # 6 bytes, aligned to 8
    assert model_schema(3, "float64").result_nbytes == 24
    assert plan(6, 3, 2, params=3, dtype="float16").result_bytes == 8
    assert plan(6, 3, 2, params=3).dense_bytes == 32


def test_wire_size_counts_header_plus_real_payload():
    schema = model_schema(100)
    share = Share("r", 0, 0, "a", None)
    assert wire_size(share, schema) == len(encode(share)[0]) + 8 * 101
    seeded = Share("r", 0, 0, "a", bytes(32))
    assert wire_size(seeded, schema) == len(encode(seeded)[0])
    assert wire_size(Partial("r", "a"), schema) == len(encode(Partial("r", "a"))[0]) + 808
    assert wire_size(Result("r", "a"), schema) == len(encode(Result("r", "a"))[0]) + 400


def test_conservation_every_byte_sent_is_received():
    p = plan(30, 3, 2, params=1000)
    assert sum(x.p2p_sent for x in p.peers) == sum(x.p2p_received for x in p.peers)
    for x in p.peers:
        assert x.p2p_received_min <= x.p2p_received <= x.p2p_received_max


def test_only_actors_received_bytes_vary():
    p = plan(30, 3, 2, params=1000)
    for x in p.peers:
        if x.kind.startswith("leaf"):
            assert x.p2p_received_min == x.p2p_received_max
    rows = p.summary()
    assert rows[0].kind.startswith("leaf") and rows[-1].kind == "root actor"
    assert sum(r.count for r in rows) == 30


def test_traffic_per_peer_grows_slowly_total_linearly():
    small = plan(30, 3, 2, params=10_000)
    big = plan(300, 3, 2, params=10_000)
    per_peer = [sum(x.bytes_sent for x in q.peers) / q.num_peers for q in (small, big)]
    assert per_peer[1] < 1.5 * per_peer[0]


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
    assert "9,600,008 B payload" in out
    assert "root actor" in out


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
    assert len(data["peers"]) == 9
    assert data["collusion_threshold"] == 3


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
