"""Admission control on the peer's side (issue 19): the roster, against the sans-IO state machines.

Every peer is the production :class:`PeerSession` on the in-memory network of
:mod:`tests.unit._faultnet`, with sealed round traffic; the scheduler is the real
:class:`SchedulerState`, which admits any key here (no ``allow_keys``), as an
honest scheduler with a stale roster, or a malicious one, would.
"""

from __future__ import annotations

import logging

import pytest

from lightning_secagg.errors import ConfigurationError, ForeignMemberError
from lightning_secagg.peer_options import check_peer_options
from lightning_secagg.roster import Roster, key_fingerprint
from tests.unit._faultnet import FaultSim, close


def _roster(sim: FaultSim, pids: list[str]) -> Roster:
    return Roster({sim.peers[p].session.public_key: p for p in pids})


def _record(sim: FaultSim) -> list[tuple[str, str, str]]:
    """Every message the network carries, as (source, destination, type)."""
    sent: list[tuple[str, str, str]] = []
    send = sim.send

    def spy(src, dst, msg, what):
        sent.append((src, dst, what))
        send(src, dst, msg, what)

    sim.send = spy  # type: ignore[method-assign]
    return sent


def test_roster_admitting_everyone_changes_nothing():
    # The control: the same round with every key listed completes, exactly.
    sim = FaultSim(4, None, seed=3, secure=True, max_retries=0)
    roster = _roster(sim, list(sim.peers))
    for peer in sim.peers.values():
        peer.session.roster = roster
    outcomes = sim.run()
    assert all(o is not None and o.ok for o in outcomes.values()), outcomes
    for o in outcomes.values():
        assert close(o.result, sim.mean_of(o.members))


@pytest.mark.parametrize("max_retries", [0, 2])
def test_an_outsider_key_is_refused_by_every_honest_member(max_retries):
    sim = FaultSim(4, None, seed=5, secure=True, max_retries=max_retries)
    honest = ["p0", "p1", "p2"]
    roster = _roster(sim, honest)  # p3's key is not listed
    for pid in honest:
        sim.peers[pid].session.roster = roster
    sent = _record(sim)
    outcomes = sim.run()
    outsider = key_fingerprint(sim.peers["p3"].session.public_key)
    for pid in honest:
        o = outcomes[pid]
        assert o is not None and not o.ok
        assert isinstance(o.error, ForeignMemberError)
        assert outsider in str(o.error) and "p3" in str(o.error)
        # retried within the caller's budget only: a scheduler gets no more tries
        assert o.retries == max_retries
    # Nothing of an honest member's ever left for another member: refused before the round.
    assert not [s for s in sent if s[0] in honest and s[1] != "scheduler"]
    # The scheduler was told why (an honest one aborts the round for everyone).
    assert ("p0", "scheduler", "abort") in sent


def test_sybil_ids_of_an_outsider_key_are_refused():
    # p3 and p4 are two ids of one outsider's key (the sybils).
    sim = FaultSim(5, None, seed=7, secure=True, max_retries=0, group_size=5)
    sim.peers["p4"].session.public_key = sim.peers["p3"].session.public_key
    honest = ["p0", "p1", "p2"]
    roster = _roster(sim, honest)
    for pid in honest:
        sim.peers[pid].session.roster = roster
    sent = _record(sim)
    outcomes = sim.run()
    for pid in honest:
        assert isinstance(outcomes[pid].error, ForeignMemberError)
    assert not [s for s in sent if s[0] in honest and s[1] != "scheduler"]


def test_two_ids_of_one_listed_key_are_refused():
    # A listed party may not hold two member ids of one round (its own sybils).
    sim = FaultSim(4, None, seed=9, secure=True, max_retries=0)
    sim.peers["p3"].session.public_key = sim.peers["p2"].session.public_key
    roster = _roster(sim, ["p0", "p1", "p2"])
    for pid in ("p0", "p1"):
        sim.peers[pid].session.roster = roster
    outcomes = sim.run()
    for pid in ("p0", "p1"):
        assert isinstance(outcomes[pid].error, ForeignMemberError)
        assert "share the key" in str(outcomes[pid].error)


def test_without_a_roster_each_peer_says_so_once_per_round(caplog):
    sim = FaultSim(3, None, seed=11, secure=True, max_retries=0)
    with caplog.at_level(logging.WARNING, logger="lightning_secagg.protocol.peer_session"):
        outcomes = sim.run()
    assert all(o is not None and o.ok for o in outcomes.values())
    said = [r for r in caplog.records if "without a roster: anyone can join" in r.getMessage()]
    assert sorted(r.getMessage().split()[1] for r in said) == ["p0:", "p1:", "p2:"]


def test_roster_option_is_checked_where_peer_options_are(tmp_path):
    from lightning_secagg.security import KeyPair

    key = KeyPair.generate().public
    path = tmp_path / "roster.txt"
    path.write_text(f"alice {key}\n")
    base = {"scheduler_key": KeyPair.generate().public}
    opts = check_peer_options("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", roster=path, **base)
    assert opts.roster is not None and opts.roster.admits(key) and opts.roster_path == str(path)
    with pytest.raises(ConfigurationError, match="exclude each other"):
        check_peer_options("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", roster=path, insecure=True)
    path.write_text("alice not-a-key\n")
    with pytest.raises(ConfigurationError, match="line 1"):
        check_peer_options("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", roster=path, **base)
    with pytest.raises(ConfigurationError, match="lists no key"):
        check_peer_options("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", roster=Roster(), **base)
    with pytest.raises(ConfigurationError, match="roster must be"):
        check_peer_options("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", roster=42, **base)
