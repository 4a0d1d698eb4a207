"""Issue 19: peers with a roster refuse a round their scheduler filled with an outsider.

Real sockets: a :class:`Scheduler` without ``allow_keys`` (it admits anyone, as a
misconfigured or malicious one would) and four :class:`Peer` instances over TCP,
three with a roster listing only themselves, one outsider.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from lightning_secagg import ForeignMemberError, KeyPair, Peer, Roster, Scheduler
from lightning_secagg.errors import RoundFailedError
from lightning_secagg.roster import key_fingerprint


@pytest.mark.timeout(120)
def test_peers_with_a_roster_refuse_an_outsider_the_scheduler_admitted():
    keys = {f"h{i}": KeyPair.generate() for i in range(3)}
    keys["outsider"] = KeyPair.generate()
    roster = Roster({keys[f"h{i}"].public: f"h{i}" for i in range(3)})
    results: dict[str, Any] = {}
    with Scheduler(port=0, target_size=4, liveness_timeout=10.0) as sched:

        def run(pid: str) -> None:
            try:
                with Peer(
                    "tcp://127.0.0.1:0",
                    sched.address,
                    peer_id=pid,
                    scheduler_key=sched.public_key,
                    keys=keys[pid],
                    roster=None if pid == "outsider" else roster,
                ) as p:
                    results[pid] = p.aggregate({"w": torch.full((8,), 1.0)}, timeout=20)
            except Exception as exc:  # collected for the assertions
                results[pid] = exc

        threads = [threading.Thread(target=run, args=(pid,)) for pid in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    outsider = key_fingerprint(keys["outsider"].public)
    for i in range(3):
        err = results[f"h{i}"]
        assert isinstance(err, ForeignMemberError), err
        assert outsider in str(err)
    # The outsider got no result: the round was aborted (it never saw a share).
    assert isinstance(results["outsider"], RoundFailedError), results["outsider"]
