"""Unit tests of SecureAggregationCallback with an in-process fake peer (no sockets)."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel, RandomDataset
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_secagg.callback import (
    SecureAggregationCallback,
    SecureAggregationMisconfigurationError,
)
from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    ForeignMemberError,
    RoundAbortedError,
    RoundFailedError,
    RoundTimeoutError,
    SchemaMismatchError,
    SignupRejectedError,
)
from lightning_secagg.protocol.peer_session import is_retryable

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
    "ignore:.*GPU available.*",
)


@dataclass(frozen=True)
class _Stats:
    round_id: str
    seconds: float
    bytes_sent: int
    bytes_received: int
    num_peers: int
    roles: tuple[str, ...]


class FakePeer:
    """Stands in for lightning_secagg.peer.Peer: averages with a fixed 'other peer'."""

    instances: list[FakePeer] = []

    def __init__(self, address: str, scheduler: str, **kwargs: Any) -> None:
        self.address = address
        self.scheduler = scheduler
        self.kwargs = kwargs
        self.started = 0
        self.stopped = 0
        self.calls: list[dict[str, Any]] = []
        self.last_stats: _Stats | None = None
        self.fail_with: list[BaseException] = []  # raised by the next aggregate calls, in order
        self.value = 0.25  # every float entry of the "other peer" holds this value
        FakePeer.instances.append(self)

    @property
    def endpoint(self) -> str:
        return self.address.replace(":0", ":6123")

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def close(self) -> None:  # leaves for good, then stops (as Peer.close)
        self.closed = getattr(self, "closed", 0) + 1
        self.stop()

    @property
    def waiting_status(self) -> None:
        return None

    def preflight(self, timeout: float = 10.0) -> float:
        self.preflights = getattr(self, "preflights", 0) + 1
        return 0.0

    def aggregate(
        self, state_dict: dict[str, torch.Tensor], weight: float = 1.0, timeout: float = 60.0
    ) -> dict[str, torch.Tensor]:
        for tensor in state_dict.values():
            assert tensor.device.type == "cpu"
        self.calls.append(
            {"weight": weight, "timeout": timeout, "state": copy.deepcopy(state_dict)}
        )
        if self.fail_with:
            raise self.fail_with.pop(0)
        out = {}
        for name, tensor in state_dict.items():
            if tensor.is_floating_point():
                out[name] = (tensor + self.value) / 2
            else:
                out[name] = tensor.clone()
        self.last_stats = _Stats(f"r{len(self.calls)}", 0.5, 1000, 2000, 6, ("participant",))
        return out

    def aggregate_with_retry(
        self,
        state_dict: dict[str, torch.Tensor],
        weight: float = 1.0,
        timeout: float = 60.0,
        max_retries: int = 2,
        *,
        on_retry: Any = None,
    ) -> dict[str, torch.Tensor]:
        # The real loop is the session's (tests/unit/test_peer_session.py); this one
        # keeps to its contract: the same rule, the hook before each retry.
        self.max_retries_asked = max_retries
        for attempt in range(max_retries + 1):
            try:
                return self.aggregate(state_dict, weight, timeout)
            except RoundFailedError as exc:
                if not is_retryable(exc) or attempt == max_retries:
                    raise
                if on_retry is not None:
                    on_retry(exc, attempt + 1)
        raise AssertionError("unreachable")


class FakeCallback(SecureAggregationCallback):
    def __init__(self, **kwargs: Any) -> None:
        if "scheduler_key" not in kwargs:
            kwargs.setdefault("insecure", True)
        super().__init__(**kwargs)

    def _create_peer(self) -> FakePeer:  # type: ignore[override]
        return FakePeer(
            self.address, self.scheduler, session=self.session, scheduler_key=self.scheduler_key
        )


@pytest.fixture(autouse=True)
def _reset_fakes():
    FakePeer.instances.clear()
    yield
    FakePeer.instances.clear()


def _train(tmp_path, callbacks, model=None, trainer_cls=pl.Trainer, fit_kwargs=None, **kwargs):
    """Quiet, small training run; returns the trainer."""
    model = model if model is not None else BoringModel()
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "accelerator": "cpu",
    }
    defaults.update(kwargs)
    trainer = trainer_cls(callbacks=callbacks, **defaults)
    trainer.fit(model, **(fit_kwargs or {}))
    return trainer


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": ""}, "`scheduler` must be"),
        ({"scheduler": "udp://127.0.0.1:5555"}, "`scheduler` must look like"),
        ({"scheduler": "tcp://127.0.0.1"}, "`scheduler` must look like"),
        ({"scheduler": "tcp://127.0.0.1:0"}, r"`scheduler` port must be in \[1, 65535\]"),
        ({"scheduler": 5555}, "`scheduler` must be"),
        ({"address": "tcp://127.0.0.1:70000"}, r"`address` port must be in \[0, 65535\]"),
        ({"address": -1}, r"`address` as a port must be in \[0, 65535\], found -1"),
        ({"address": 1.5}, "`address` must be"),
        ({"address": True}, "`address` must be"),
        ({"session": ""}, "session: expected an identifier of 1-.* safe characters, got ''"),
        ({"peer_id": ""}, "peer_id: expected an identifier"),
        ({"peer_id": "a b"}, "peer_id: expected an identifier"),
        ({"every_n_epochs": 0}, "`every_n_epochs` must be an integer >= 1, found 0"),
        ({"every_n_epochs": 1.0}, "`every_n_epochs` must be an integer >= 1, found 1.0"),
        ({"every_n_epochs": True}, "`every_n_epochs` must be an integer >= 1, found True"),
        (
            {"weighting": "mean"},
            r"`weighting` must be one of \('uniform', 'samples'\), found 'mean'",
        ),
        ({"round_timeout": 0}, "`round_timeout` must be a finite number of seconds > 0, found 0"),
        ({"round_timeout": float("inf")}, "`round_timeout` must be a finite number"),
        ({"round_timeout": "60"}, "`round_timeout` must be a finite number"),
        (
            {"on_failure": "forever"},
            r"`on_failure` must be one of \('retry', 'raise', 'keep_local'\), found 'forever'",
        ),
        ({"max_retries": -1}, "`max_retries` must be an integer >= 0, found -1"),
        ({"max_retries": True}, "`max_retries` must be an integer >= 0, found True"),
        ({"ring": 64}, "ring must be 'auto' or '64', got 64"),
        ({"preflight_timeout": 0}, "`preflight_timeout` must be None or a finite number"),
        ({"preflight_timeout": "5"}, "`preflight_timeout` must be None or a finite number"),
        ({"ring": "32"}, "ring must be 'auto' or '64', got '32'"),
        ({"address": "tcp://0.0.0.0:6000"}, r"binds every interface.*advertise="),
        ({"address": "tcp://*:6000"}, r"binds every interface.*advertise="),
        ({"address": "0.0.0.0:6000"}, r"binds every interface.*advertise="),
        ({"address": "tcp://0.0.0.0:6000", "advertise": 6000}, "`advertise` must be"),
        ({"address": "tcp://0.0.0.0:6000", "advertise": "udp://h:1"}, "`advertise` must look"),
        (
            {"address": "tcp://0.0.0.0:6000", "advertise": "tcp://198.18.0.2:0"},
            r"`advertise` port must be in \[1, 65535\]",
        ),
        (
            {"address": "tcp://0.0.0.0:6000", "advertise": "tcp://0.0.0.0:6000"},
            "advertise must be an address other peers can connect to",
        ),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        SecureAggregationCallback(**{"insecure": True, **kwargs})


def test_scheduler_key_or_insecure_required():
    with pytest.raises(MisconfigurationException, match="scheduler_key is required"):
        SecureAggregationCallback()
    with pytest.raises(MisconfigurationException, match="exclude each other"):
        SecureAggregationCallback(scheduler_key="K" * 40, insecure=True)
    with pytest.raises(MisconfigurationException, match="insecure must be a bool"):
        SecureAggregationCallback(insecure="yes")
    SecureAggregationCallback(scheduler_key="K" * 40)
    SecureAggregationCallback(insecure=True)


def test_misconfiguration_error_is_caught_by_every_family():
    with pytest.raises(ConfigurationError):
        SecureAggregationCallback(every_n_epochs=-3, insecure=True)
    with pytest.raises(ValueError):
        SecureAggregationCallback(every_n_epochs=-3, insecure=True)
    lightning_exc = pytest.importorskip("lightning.fabric.utilities.exceptions")
    assert issubclass(
        SecureAggregationMisconfigurationError, lightning_exc.MisconfigurationException
    )


def test_ring_reaches_the_embedded_peer():
    from lightning_secagg.peer import Peer

    default = SecureAggregationCallback(insecure=True)._create_peer()
    assert isinstance(default, Peer) and default.ring == "auto"
    wide = SecureAggregationCallback(insecure=True, ring="64")._create_peer()
    assert wide.ring == "64"


def test_advertise_reaches_the_embedded_peer(monkeypatch):
    """A wildcard bind with ``advertise`` is accepted and handed to the peer, which
    announces it (not the wildcard) to the others; without it nothing is passed."""
    import lightning_secagg.peer as peer_module

    seen = []
    monkeypatch.setattr(
        peer_module, "Peer", lambda address, scheduler, **kw: seen.append((address, kw))
    )
    cb = SecureAggregationCallback(
        insecure=True, address="tcp://0.0.0.0:0", advertise="198.18.0.7:6000"
    )
    assert (cb.address, cb.advertise) == ("tcp://0.0.0.0:0", "tcp://198.18.0.7:6000")
    cb._create_peer()
    SecureAggregationCallback(insecure=True)._create_peer()
    assert seen[0] == ("tcp://0.0.0.0:0", {**seen[0][1], "advertise": "tcp://198.18.0.7:6000"})
    assert "advertise" not in seen[1][1]
    monkeypatch.undo()
    # The real peer accepts the pair (it refuses a wildcard without advertise).
    SecureAggregationCallback(
        insecure=True, address="tcp://0.0.0.0:0", advertise="198.18.0.7:6000"
    )._create_peer()


def test_arguments_are_positional_only_by_keyword():
    with pytest.raises(TypeError):
        SecureAggregationCallback("tcp://127.0.0.1:5555")  # type: ignore[misc]


def test_valid_arguments_are_normalised():
    cb = SecureAggregationCallback(
        scheduler="10.0.0.1:5555", address=6000, round_timeout=5, insecure=True
    )
    assert cb.scheduler == "tcp://10.0.0.1:5555"
    assert cb.address == "tcp://127.0.0.1:6000"
    assert cb.round_timeout == 5.0
    assert cb.peer is None
    assert cb.endpoint is None


# ---------------------------------------------------------------------- lifecycle
def test_picklable_and_no_peer_before_setup(tmp_path):
    cb = FakeCallback()
    clone = pickle.loads(pickle.dumps(cb))  # noqa: S301 - our own bytes
    assert clone.every_n_epochs == cb.every_n_epochs
    assert FakePeer.instances == []

    # still picklable while a peer is running: the peer is dropped
    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            assert cb.peer is not None
            restored = pickle.loads(pickle.dumps(cb))  # noqa: S301 - our own bytes
            assert restored.peer is None
            copy.deepcopy(cb)

    _train(tmp_path, [cb, Probe()], max_epochs=1)


def test_peer_started_in_setup_and_stopped_in_teardown(tmp_path):
    key = "K" * 40
    cb = FakeCallback(address=0, scheduler_key=key)
    _train(tmp_path, [cb], max_epochs=1)
    (peer,) = FakePeer.instances
    assert (peer.started, peer.stopped, peer.closed) == (1, 1, 1)  # it left for good
    assert peer.kwargs["scheduler_key"] == key
    assert cb.peer is None
    cb.teardown(None, None, "fit")  # idempotent
    assert peer.stopped == 1


def test_real_peer_gets_scheduler_key_only_when_given(monkeypatch):
    import lightning_secagg.peer as peer_module

    seen = []

    def fake_peer(address, scheduler, **kwargs):
        seen.append(kwargs)
        return object()

    monkeypatch.setattr(peer_module, "Peer", fake_peer, raising=False)
    SecureAggregationCallback(session="s1", insecure=True)._create_peer()
    SecureAggregationCallback(scheduler_key="K" * 40)._create_peer()
    assert seen[0] == {"session": "s1", "peer_id": None, "insecure": True}
    assert seen[1] == {"session": "default", "peer_id": None, "scheduler_key": "K" * 40}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler_key": "abc"}, "scheduler_key must be a 40-character Z85 public key"),
        ({"scheduler_key": 3}, "scheduler_key must be the scheduler's public key"),
        ({"address": "tcp://0.0.0.0:6000", "insecure": True}, "binds every interface"),
    ],
)
def test_peer_arguments_are_checked_by_the_peer_when_the_callback_is_built(kwargs, match):
    """One home for the peer's argument checks: the callback reports them in __init__."""
    with pytest.raises(MisconfigurationException, match=match):
        SecureAggregationCallback(**kwargs)


def test_real_peer_inbox_is_bounded_by_the_model(monkeypatch):
    """In setup the model is known: the peer's inbox accepts no frame larger than
    this model's rounds need, instead of the 1 GiB default."""
    import lightning_secagg.peer as peer_module
    from lightning_secagg.schema import Schema

    seen = []

    class RecordingPeer:
        def __init__(self, address, scheduler, **kwargs):
            seen.append(kwargs)
            self.endpoint = address

        def start(self):
            return self

        def stop(self):
            pass

    monkeypatch.setattr(peer_module, "Peer", RecordingPeer)
    cb = SecureAggregationCallback(insecure=True, preflight_timeout=None)
    model = BoringModel()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, max_epochs=1)
    cb.setup(trainer, model, "fit")
    cb.teardown(trainer, model, "fit")
    expected = peer_module.required_message_bytes(Schema.of(model.state_dict()), sealed=False)
    assert seen[0]["max_message_bytes"] == expected
    assert expected < peer_module.DEFAULT_MAX_MESSAGE_BYTES


def test_no_peer_outside_fit(tmp_path):
    cb = FakeCallback()
    trainer = pl.Trainer(
        callbacks=[cb], logger=False, enable_progress_bar=False, limit_val_batches=1
    )
    trainer.validate(BoringModel(), verbose=False)
    assert FakePeer.instances == []


class _CrashingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("boom in training_step")
        return super().training_step(batch, batch_idx)


def test_peer_stopped_on_exception(tmp_path):
    cb = FakeCallback()
    with pytest.raises(RuntimeError, match="boom in training_step"):
        _train(tmp_path, [cb], model=_CrashingModel())
    (peer,) = FakePeer.instances
    assert peer.stopped == 1
    assert cb.peer is None
    cb.on_exception(None, None, RuntimeError())  # idempotent
    assert peer.stopped == 1


def test_failing_stop_does_not_hide_the_training_error(tmp_path):
    class BadStopPeer(FakePeer):
        def stop(self):
            super().stop()
            raise OSError("stop failed")

    class Cb(SecureAggregationCallback):
        def _create_peer(self):
            return BadStopPeer(self.address, self.scheduler)

    with pytest.raises(RuntimeError, match="boom"):
        _train(tmp_path, [Cb(insecure=True)], model=_CrashingModel())


# ---------------------------------------------------------------------- the round
class _RecordingModel(BoringModel):
    """Remembers a fingerprint of its weights when validation starts."""

    def __init__(self):
        super().__init__()
        self.val_weights: list[torch.Tensor] = []

    def on_validation_epoch_start(self):
        self.val_weights.append(self.layer.weight.detach().clone())


def test_validation_and_checkpoints_see_averaged_weights(tmp_path):
    cb = FakeCallback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, monitor=None)
    model = _RecordingModel()
    _train(tmp_path, [cb, ckpt], model=model, enable_checkpointing=True)
    (peer,) = FakePeer.instances
    assert len(peer.calls) == 2
    for epoch, call in enumerate(peer.calls):
        expected = (call["state"]["layer.weight"] + 0.25) / 2
        torch.testing.assert_close(model.val_weights[epoch], expected)
        saved = torch.load(
            tmp_path / "ckpt" / f"epoch={epoch}-step={4 * (epoch + 1)}.ckpt", weights_only=True
        )
        torch.testing.assert_close(saved["state_dict"]["layer.weight"], expected)


def test_no_val_loop_averages_before_checkpoint(tmp_path):
    cb = FakeCallback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, monitor=None)
    model = BoringModel()
    _train(tmp_path, [cb, ckpt], model=model, limit_val_batches=0, enable_checkpointing=True)
    (peer,) = FakePeer.instances
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)
    expected = (peer.calls[-1]["state"]["layer.weight"] + 0.25) / 2
    torch.testing.assert_close(saved["state_dict"]["layer.weight"], expected)


def test_weights_loaded_in_place_keep_optimizer_references(tmp_path):
    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.ids = [id(p) for p in pl_module.parameters()]
            self.data_ptrs = [p.data_ptr() for p in pl_module.parameters()]

        def on_train_end(self, trainer, pl_module):
            opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
            assert [id(p) for p in pl_module.parameters()] == self.ids
            assert [id(p) for p in opt_params] == self.ids
            assert [p.data_ptr() for p in pl_module.parameters()] == self.data_ptrs

    probe = Probe()
    cb = FakeCallback()
    model = BoringModel()
    _train(tmp_path, [cb, probe], model=model, max_epochs=3)
    (peer,) = FakePeer.instances
    # training went on after each round: the next round's input differs from the last output
    after_first = (peer.calls[0]["state"]["layer.weight"] + 0.25) / 2
    assert not torch.equal(peer.calls[1]["state"]["layer.weight"], after_first)
    torch.testing.assert_close(
        model.layer.weight.detach(), (peer.calls[-1]["state"]["layer.weight"] + 0.25) / 2
    )


class _BufferModel(BoringModel):
    def __init__(self):
        super().__init__()
        self.register_buffer("counter", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("half_buf", torch.ones(3, dtype=torch.float16))


def test_buffers_and_dtypes_are_aggregated_and_preserved(tmp_path):
    cb = FakeCallback()
    model = _BufferModel()
    _train(tmp_path, [cb], model=model, max_epochs=1)
    (peer,) = FakePeer.instances
    assert {"layer.weight", "layer.bias", "counter", "half_buf"} <= set(peer.calls[0]["state"])
    assert model.counter.dtype == torch.int64 and int(model.counter) == 7
    assert model.half_buf.dtype == torch.float16
    torch.testing.assert_close(model.half_buf, torch.full((3,), 0.625, dtype=torch.float16))


@pytest.mark.parametrize(("every_n", "expected"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2])])
def test_every_n_epochs(tmp_path, every_n, expected):
    epochs = []

    class Cb(FakeCallback):
        def on_before_round(self, trainer, pl_module):
            epochs.append(trainer.current_epoch)

    cb = Cb(every_n_epochs=every_n)
    _train(tmp_path, [cb], max_epochs=4)
    assert epochs == expected
    assert cb.rounds_completed == len(expected)


def test_round_runs_in_epoch_end_when_max_steps_stops_mid_epoch(tmp_path):
    cb = FakeCallback()
    model = _RecordingModel()
    _train(tmp_path, [cb], model=model, max_epochs=5, max_steps=6)  # 4 batches/epoch
    (peer,) = FakePeer.instances
    assert len(peer.calls) == 2  # epoch 0 (last batch) and epoch 1 (stopped at step 6)
    torch.testing.assert_close(
        model.layer.weight.detach(), (peer.calls[-1]["state"]["layer.weight"] + 0.25) / 2
    )


def test_weighting_samples_and_timeout_are_forwarded(tmp_path):
    class Model(BoringModel):
        def train_dataloader(self):
            return DataLoader(RandomDataset(32, 100), batch_size=10)

    cb = FakeCallback(weighting="samples", round_timeout=12.5)
    _train(tmp_path, [cb], model=Model(), max_epochs=1)
    (peer,) = FakePeer.instances
    assert peer.calls[0]["weight"] == 100.0
    assert peer.calls[0]["timeout"] == 12.5

    cb = FakeCallback()
    _train(tmp_path, [cb], model=Model(), max_epochs=1)
    assert FakePeer.instances[-1].calls[0]["weight"] == 1.0


def test_weighting_samples_needs_sized_dataset(tmp_path):
    class Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.randn(8, 32))

    class Model(BoringModel):
        def train_dataloader(self):
            return DataLoader(Iterable(), batch_size=4)

    with pytest.raises(MisconfigurationException, match=r"weighting='samples'.*length"):
        _train(tmp_path, [FakeCallback(weighting="samples")], model=Model(), max_epochs=1)
    assert FakePeer.instances[0].stopped == 1


# ---------------------------------------------------------------------- metrics
def test_metrics_logged(tmp_path):
    cb = FakeCallback()
    trainer = _train(tmp_path, [cb], max_epochs=1)
    metrics = trainer.callback_metrics
    assert metrics["secagg/round_seconds"] == pytest.approx(0.5)
    assert metrics["secagg/bytes_sent"] == 1000
    assert metrics["secagg/bytes_received"] == 2000
    assert metrics["secagg/peers"] == 6
    assert metrics["secagg/rounds"] == 1
    assert metrics["secagg/failed_rounds"] == 0
    assert trainer.progress_bar_metrics["secagg"] == 1
    assert "secagg" not in trainer.logged_metrics
    assert cb.last_stats["round_id"] == "r1"


def test_metrics_reach_the_logger(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run")
    _train(tmp_path, [FakeCallback()], logger=logger, max_epochs=2)
    text = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    for key in ("secagg/round_seconds", "secagg/bytes_sent", "secagg/bytes_received"):
        assert key in text


def test_log_metrics_false(tmp_path):
    trainer = _train(tmp_path, [FakeCallback(log_metrics=False)], max_epochs=1)
    assert not any(k.startswith("secagg") for k in trainer.callback_metrics)


# ---------------------------------------------------------------------- failures
def _failing(errors):
    class Cb(FakeCallback):
        def _create_peer(self):
            peer = super()._create_peer()
            peer.fail_with = list(errors)
            return peer

    return Cb


def test_on_failure_raise(tmp_path):
    cb = _failing([RoundTimeoutError("waited 1s for shares")])(on_failure="raise")
    with pytest.raises(RoundTimeoutError, match="waited 1s"):
        _train(tmp_path, [cb])
    assert FakePeer.instances[0].stopped == 1
    assert isinstance(cb.last_error, TimeoutError)


def test_on_failure_retry_is_the_default_and_counts_retries(tmp_path):
    cb = _failing([RoundAbortedError("member p3 silent"), RoundTimeoutError("shares")])()
    assert cb.on_failure == "retry"
    seen = []
    cb.on_after_round = lambda trainer, module, stats, error: seen.append((stats, error))
    trainer = _train(tmp_path, [cb], max_epochs=2)
    peer = FakePeer.instances[0]
    assert len(peer.calls) == 4  # epoch 0: two failed attempts, then success; epoch 1: one
    assert (cb.rounds_completed, cb.rounds_failed, cb.rounds_retried) == (2, 0, 2)
    assert [s["retries"] for s, _ in seen] == [2, 0]
    assert "RoundAbortedError: member p3 silent" in seen[0][0]["failed_attempts"][0]
    assert trainer.callback_metrics["secagg/retries"] == 2
    assert trainer.callback_metrics["secagg/failed_rounds"] == 0


def test_on_failure_retry_gives_up_after_max_retries(tmp_path):
    errors = [RoundAbortedError(f"attempt {i}") for i in range(3)]
    cb = _failing(errors)(max_retries=2)
    with pytest.raises(RoundAbortedError, match="attempt 2"):
        _train(tmp_path, [cb])
    assert len(FakePeer.instances[0].calls) == 3


@pytest.mark.parametrize(
    "error", [SchemaMismatchError("other model"), EncodingError("NaN in layer.weight")]
)
def test_on_failure_retry_does_not_retry_errors_that_repeat(tmp_path, error):
    cb = _failing([error])()
    with pytest.raises(type(error)):
        _train(tmp_path, [cb])
    assert len(FakePeer.instances[0].calls) == 1


def test_on_failure_keep_local(tmp_path):
    cb = _failing([RoundAbortedError("member gone")])(on_failure="keep_local")
    model = BoringModel()
    with pytest.warns(RuntimeWarning, match="keeping the local weights"):
        trainer = _train(tmp_path, [cb], model=model, max_epochs=2)
    peer = FakePeer.instances[0]
    assert len(peer.calls) == 2
    assert (cb.rounds_completed, cb.rounds_failed) == (1, 1)
    assert trainer.callback_metrics["secagg/failed_rounds"] == 1
    # epoch 0 failed: epoch 1 started from the local weights of epoch 0
    assert cb.last_error is None


def test_keep_local_keeps_local_weights(tmp_path):
    cb = _failing([RoundAbortedError("x")])(on_failure="keep_local")
    model = _RecordingModel()
    with pytest.warns(RuntimeWarning):
        _train(tmp_path, [cb], model=model, max_epochs=1)
    torch.testing.assert_close(
        model.val_weights[0], FakePeer.instances[0].calls[0]["state"]["layer.weight"]
    )


def test_keep_local_still_raises_on_encoding_errors(tmp_path):
    cb = _failing([EncodingError("NaN in layer.weight")])(on_failure="keep_local")
    with pytest.raises(EncodingError):
        _train(tmp_path, [cb])


@pytest.mark.parametrize(
    "error",
    [
        SchemaMismatchError("other model"),
        SignupRejectedError("scheduler refused peer p1: not_admitted"),
        ForeignMemberError("member x has key 0123456789ab, which is not in our roster"),
    ],
)
def test_keep_local_survives_a_refused_signup(tmp_path, error):
    # Issue 19, finding 3: an outsider squatting the session with another schema must
    # not end trainer.fit under keep_local; the local weights are kept, once per round.
    cb = _failing([error])(on_failure="keep_local")
    model = _RecordingModel()
    with pytest.warns(RuntimeWarning, match="keeping the local weights"):
        trainer = _train(tmp_path, [cb], model=model, max_epochs=2)
    assert len(FakePeer.instances[0].calls) == 2  # not retried within the round
    assert (cb.rounds_completed, cb.rounds_failed) == (1, 1)
    assert trainer.callback_metrics["secagg/failed_rounds"] == 1
    torch.testing.assert_close(
        model.val_weights[0], FakePeer.instances[0].calls[0]["state"]["layer.weight"]
    )


def test_unexpected_error_propagates(tmp_path):
    cb = _failing([OSError("socket gone")])(on_failure="keep_local")
    with pytest.raises(OSError, match="socket gone"):
        _train(tmp_path, [cb])


# ---------------------------------------------------------------------- checkpoints
def test_state_dict_roundtrip():
    cb = SecureAggregationCallback(insecure=True)
    cb.rounds_completed, cb.rounds_failed, cb._last_round_epoch = 4, 1, 5
    other = SecureAggregationCallback(insecure=True)
    other.load_state_dict(cb.state_dict())
    assert (other.rounds_completed, other.rounds_failed, other._last_round_epoch) == (4, 1, 5)
    assert "'session': 'default'" in cb.state_key


def test_resume_continues_round_count(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    cb = FakeCallback()
    _train(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    assert cb.rounds_completed == 2

    resumed = FakeCallback()
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    _train(
        tmp_path,
        [resumed, ckpt2],
        max_epochs=3,
        enable_checkpointing=True,
        fit_kwargs={"ckpt_path": str(tmp_path / "ckpt" / "last.ckpt")},
    )
    assert resumed.rounds_completed == 3
    assert len(FakePeer.instances[-1].calls) == 1  # only epoch 2 ran a round


# ---------------------------------------------------------------------- lightning.pytorch
def test_works_with_lightning_pytorch_trainer(tmp_path):
    lpt = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel as LBoringModel

    cb = FakeCallback()
    assert isinstance(cb, lpt.Callback)
    assert isinstance(cb, pl.Callback)
    model = LBoringModel()
    trainer = _train(tmp_path, cb, model=model, trainer_cls=lpt.Trainer, max_epochs=1)
    assert trainer.callback_metrics["secagg/rounds"] == 1
    (peer,) = FakePeer.instances
    torch.testing.assert_close(
        model.layer.weight.detach(), (peer.calls[-1]["state"]["layer.weight"] + 0.25) / 2
    )
    assert peer.stopped == 1


def test_a_second_fit_with_the_same_callback_runs_its_rounds(tmp_path):
    """The epoch guard belongs to one fit: a second ``fit`` (a new Trainer, epochs
    from 0 again) runs its rounds; the round counter goes on."""
    cb = FakeCallback(address=0)
    _train(tmp_path, [cb], max_epochs=1)
    assert cb.rounds_completed == 1
    _train(tmp_path, [cb], max_epochs=1)
    assert cb.rounds_completed == 2
    assert [len(p.calls) for p in FakePeer.instances] == [1, 1]


# ---------------------------------------------------------------------- roster
def test_roster_and_keys_are_checked_when_the_callback_is_built(tmp_path):
    from lightning_secagg.security import KeyPair, write_key_files

    _public_file, secret_file = write_key_files(tmp_path, "me")
    mine = KeyPair.load(secret_file)
    other, sched = KeyPair.generate(), KeyPair.generate()
    roster = tmp_path / "roster.txt"
    roster.write_text(f"me {mine.public}\nother {other.public}\n")
    cb = SecureAggregationCallback(scheduler_key=sched.public, roster=roster, keys=secret_file)
    assert cb.keys.public == mine.public
    peer = cb._create_peer()
    assert peer.public_key == mine.public and peer.roster.admits(other.public)
    roster.write_text("me not-a-key\n")
    with pytest.raises(SecureAggregationMisconfigurationError, match=r"roster .*line 1"):
        SecureAggregationCallback(scheduler_key=sched.public, roster=roster)
    with pytest.raises(SecureAggregationMisconfigurationError, match="keys must be"):
        SecureAggregationCallback(scheduler_key=sched.public, keys=42)


def test_too_few_peers_is_not_retried_and_keep_local_goes_on(tmp_path):
    """Issue 22: the "too few peers" error is handled by on_failure, never retried."""
    from lightning_secagg import TooFewPeersError

    cb = _failing([TooFewPeersError("p2 left for good")])(on_failure="retry", max_retries=3)
    with pytest.raises(TooFewPeersError, match="p2 left"):
        _train(tmp_path, [cb], max_epochs=1)
    assert len(FakePeer.instances[0].calls) == 1  # one attempt, no retry
    FakePeer.instances.clear()
    cb = _failing([TooFewPeersError("p2 left for good")])(on_failure="keep_local")
    with pytest.warns(RuntimeWarning, match="keeping the local weights"):
        _train(tmp_path, [cb], max_epochs=2)
    assert (cb.rounds_completed, cb.rounds_failed) == (1, 1)
