"""SecureAggregationCallback under DDP on CPU: only global rank 0 runs a peer."""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_secagg.scheduler import Scheduler
from tests.integration._callback_helpers import load_final, load_report, run_peers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        sys.platform == "win32", reason="DDP with gloo over fork is POSIX-only here"
    ),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing"),
]


@pytest.mark.timeout(300)
def test_ddp_peer_with_two_plain_peers(tmp_path):
    with Scheduler(port=0, target_size=3, group_size=3, num_actors=2, host="127.0.0.1") as sched:
        codes, outs, text = run_peers(
            tmp_path,
            sched.address,
            3,
            scheduler_key=sched.public_key,
            extra=[["--ddp"], [], []],
            common=["--max-epochs", "2"],
            timeout=240,
        )
    assert codes == [0, 0, 0], text
    ddp_out = outs[0]
    rank0, rank1 = load_report(ddp_out, 0), load_report(ddp_out, 1)
    assert (rank0["world_size"], rank1["world_size"]) == (2, 2)
    # both ranks counted both rounds and logged the round's metrics (broadcast from rank 0)
    for report in (rank0, rank1):
        assert report["rounds_completed"] == 2
        assert report["metrics"]["secagg/peers"] == 3
        assert report["peer_stopped"] is True
    assert rank0["last_stats"]["round_id"] == rank1["last_stats"]["round_id"]
    # every rank of the DDP peer ends with exactly the weights of the other peers
    reference = load_final(outs[1])
    for final in (load_final(ddp_out, 0), load_final(ddp_out, 1), load_final(outs[2])):
        for name, tensor in reference.items():
            assert torch.equal(final[name], tensor), name
    # only rank 0 joined: a second member from the DDP peer would have made the
    # round's queue hold 4 sign-ups for 3 places and one rank would have timed out
