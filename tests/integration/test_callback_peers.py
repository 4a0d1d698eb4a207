"""SecureAggregationCallback across real peer processes on loopback."""

from __future__ import annotations

import pytest
import torch

from lightning_secagg.scheduler import Scheduler
from tests.integration._callback_helpers import load_before, load_final, load_report, run_peers

pytestmark = pytest.mark.integration


@pytest.fixture
def scheduler():
    sched = Scheduler(port=0, target_size=3, group_size=3, num_actors=2, host="127.0.0.1")
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()


def _check_identical_and_mean(outs, weights=None):
    finals = [load_final(out) for out in outs]
    befores = [load_before(out) for out in outs]
    weights = weights or [1.0] * len(outs)
    total = sum(weights)
    for name, tensor in finals[0].items():
        for other in finals[1:]:
            assert torch.equal(other[name], tensor), f"{name} differs between peers"
        expected = sum(w * b[name].double() for w, b in zip(weights, befores, strict=True)) / total
        torch.testing.assert_close(tensor.double(), expected, atol=1e-5, rtol=1e-5)
    # the peers really started from different weights
    assert not torch.equal(befores[0]["layer.weight"], befores[1]["layer.weight"])


@pytest.mark.timeout(240)
def test_three_peers_identical_weights_metrics_and_resume(tmp_path, scheduler):
    codes, outs, text = run_peers(
        tmp_path,
        scheduler.address,
        3,
        scheduler_key=scheduler.public_key,
        extra=[["--ckpt-dir", str(tmp_path / f"ckpt{i}")] for i in range(3)],
        common=["--max-epochs", "2"],
        timeout=150,
    )
    assert codes == [0, 0, 0], text
    _check_identical_and_mean(outs)
    for out in outs:
        report = load_report(out)
        assert report["rounds_completed"] == 2
        assert report["peer_stopped"] is True
        metrics = report["metrics"]
        for key in (
            "secagg/round_seconds",
            "secagg/bytes_sent",
            "secagg/bytes_received",
            "secagg/peers",
        ):
            assert key in metrics, (key, metrics)
        assert metrics["secagg/peers"] == 3
        assert metrics["secagg/bytes_sent"] > 0
        assert metrics["secagg/round_seconds"] > 0
        assert report["progress_bar"]["secagg"] == 2

    # resume every peer from its last checkpoint for one more epoch: the count goes on
    codes, outs, text = run_peers(
        tmp_path,
        scheduler.address,
        3,
        scheduler_key=scheduler.public_key,
        extra=[
            [
                "--ckpt-dir",
                str(tmp_path / f"ckpt{i}"),
                "--resume",
                str(tmp_path / f"ckpt{i}/last.ckpt"),
            ]
            for i in range(3)
        ],
        common=["--max-epochs", "3"],
        timeout=150,
        tag="resumed",
    )
    assert codes == [0, 0, 0], text
    for out in outs:
        assert load_report(out)["rounds_completed"] == 3
    finals = [load_final(out) for out in outs]
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name])
        assert torch.equal(finals[0][name], finals[2][name])


@pytest.mark.timeout(200)
def test_weighting_by_samples(tmp_path, scheduler):
    # BoringModel's dataset has 64 samples on every peer, so the weights are equal
    # but they travel through the real protocol; peers differ only in their start.
    codes, outs, text = run_peers(
        tmp_path,
        scheduler.address,
        3,
        scheduler_key=scheduler.public_key,
        common=["--max-epochs", "1", "--weighting", "samples"],
    )
    assert codes == [0, 0, 0], text
    _check_identical_and_mean(outs)


@pytest.mark.timeout(200)
def test_missing_peer_keep_local_and_raise(tmp_path, scheduler):
    # only 2 of the 3 peers a round needs: every round times out
    codes, outs, text = run_peers(
        tmp_path,
        scheduler.address,
        2,
        scheduler_key=scheduler.public_key,
        extra=[["--on-failure", "keep_local"], ["--on-failure", "raise"]],
        common=["--max-epochs", "2", "--round-timeout", "3", "--session", "lonely"],
        timeout=120,
    )
    assert codes[0] == 0, text
    assert codes[1] not in (0, None), text
    report = load_report(outs[0])
    assert report["rounds_completed"] == 0
    assert report["rounds_failed"] == 2
    assert report["metrics"]["secagg/failed_rounds"] == 2
    assert report["peer_stopped"] is True
    assert "RoundTimeoutError" in text
    # keep_local trained on: the local weights are the final ones
    torch.testing.assert_close(load_final(outs[0]), load_before(outs[0]))


@pytest.mark.timeout(200)
def test_lightning_pytorch_trainer_peers(tmp_path, scheduler):
    pytest.importorskip("lightning.pytorch")
    codes, outs, text = run_peers(
        tmp_path,
        scheduler.address,
        3,
        scheduler_key=scheduler.public_key,
        extra=[["--lightning"], [], ["--lightning"]],  # both Trainer families in one round
        common=["--max-epochs", "1"],
    )
    assert codes == [0, 0, 0], text
    _check_identical_and_mean(outs)
