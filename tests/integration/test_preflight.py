"""Fail fast: a wrong scheduler key, or no scheduler, stops ``fit`` in ``setup``.

A real scheduler process (the CLI) and a Lightning ``Trainer`` with the
callback in this process: the error comes from the callback's preflight,
before any training step, within seconds, and says which mistake it is.
"""

from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from lightning_secagg import (
    KeyPair,
    Peer,
    SchedulerKeyError,
    SchedulerUnreachableError,
    SecureAggregationCallback,
)
from tests.integration._procs import free_port, read_line_matching, start_scheduler, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class CountingModel(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        self.steps += 1
        return super().training_step(batch, batch_idx)


def fit_with(callback: SecureAggregationCallback, tmp_path) -> CountingModel:
    model = CountingModel()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
    )
    try:
        trainer.fit(model)
    finally:
        callback.teardown(trainer, model, "fit")  # idempotent: the peer is released
    return model


@pytest.fixture
def scheduler():
    proc, address, key = start_scheduler("--port", str(free_port()), "--target-size", "3")
    try:
        yield proc, address, key
    finally:
        stop_all([proc])


def test_a_wrong_scheduler_key_fails_in_setup_and_the_scheduler_says_so(scheduler, tmp_path):
    proc, address, _key = scheduler
    model = CountingModel()
    callback = SecureAggregationCallback(
        scheduler=address, scheduler_key=KeyPair.generate().public, address=0
    )
    started = time.monotonic()
    with pytest.raises(SchedulerKeyError, match="refused the CURVE handshake") as info:
        model = fit_with(callback, tmp_path)
    assert time.monotonic() - started < 10
    assert model.steps == 0
    assert "scheduler_key is not its public key" in str(info.value)
    read_line_matching(proc, "refused a connection: CURVE handshake failed", 10)


def test_no_scheduler_fails_in_setup_with_another_error(tmp_path):
    callback = SecureAggregationCallback(
        scheduler=f"tcp://127.0.0.1:{free_port()}",
        scheduler_key=KeyPair.generate().public,
        address=0,
        preflight_timeout=3,
    )
    started = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match="nothing answered") as info:
        fit_with(callback, tmp_path)
    assert time.monotonic() - started < 10
    assert not isinstance(info.value, SchedulerKeyError)


def test_the_right_key_passes_the_preflight(scheduler):
    _proc, address, key = scheduler
    with Peer("tcp://127.0.0.1:0", address, scheduler_key=key) as peer:
        assert peer.preflight(5) < 5
