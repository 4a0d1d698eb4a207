"""Lightning glue: a callback that securely averages the model with other peers.

:class:`SecureAggregationCallback` owns one embedded :class:`~lightning_secagg.peer.Peer`.
It starts the peer in ``setup("fit")``, runs one secure aggregation round at the
end of every ``every_n_epochs``-th training epoch and loads the average back into
the module *in place*, and stops the peer in ``teardown`` and ``on_exception``.

When the round happens
----------------------
In Lightning 2.x the end of a training epoch runs in this order (see
``loops/training_epoch_loop.py`` and ``loops/fit_loop.py``)::

    last batch: training_step -> optimizer step -> on_train_batch_end
    validation loop (on_validation_epoch_start ... on_validation_end)
        ModelCheckpoint / EarlyStopping act here when there is a val loop
    on_train_epoch_end (non-monitoring callbacks, the module, then
        ModelCheckpoint / EarlyStopping when there is no val loop)

The round therefore runs in ``on_train_batch_end`` of the epoch's *last* batch:
after the last optimizer step and before the validation loop, so validation
metrics, checkpoints and early stopping all see the averaged weights. When an
epoch ends without a last batch (``max_steps`` reached mid-epoch, or
``on_train_batch_start`` returning ``-1``), ``on_train_epoch_end`` runs the
round instead; it fires before the monitoring callbacks there, so checkpoints
still hold averaged weights. Each epoch runs at most one round.

Works with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``:
when the unified ``lightning`` package is importable the class derives from both
``Callback`` classes, so either ``Trainer`` accepts it.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_secagg.errors import (
    ConfigurationError,
    EncodingError,
    RoundFailedError,
)
from lightning_secagg.peer_options import check_peer_options
from lightning_secagg.roster import Roster
from lightning_secagg.security import KeyPair

if TYPE_CHECKING:
    from lightning_secagg.messages import WaitingStatus
    from lightning_secagg.peer import Peer

log = logging.getLogger(__name__)

_CALLBACK_BASES: tuple[type, ...] = (pl.Callback,)
_MISCONFIG_BASES: tuple[type[Exception], ...] = (MisconfigurationException,)
try:  # the unified ``lightning`` package ships its own, distinct class hierarchy
    import lightning.pytorch as _lightning_pytorch
    from lightning.fabric.utilities.exceptions import (
        MisconfigurationException as _LightningMisconfigurationException,
    )
except ImportError:  # pragma: no cover - depends on the environment
    _lightning_pytorch = None
else:
    if _lightning_pytorch.Callback is not pl.Callback:
        _CALLBACK_BASES = (pl.Callback, _lightning_pytorch.Callback)
    if _LightningMisconfigurationException is not MisconfigurationException:
        _MISCONFIG_BASES = (MisconfigurationException, _LightningMisconfigurationException)

WEIGHTINGS: tuple[str, ...] = ("uniform", "samples")
FAILURE_POLICIES: tuple[str, ...] = ("retry", "raise", "keep_local")
PROGRESS_BAR_KEY = "secagg"


class SecureAggregationMisconfigurationError(*_MISCONFIG_BASES, ConfigurationError):  # type: ignore[misc]
    """A bad argument or environment for :class:`SecureAggregationCallback`.

    It is a ``MisconfigurationException`` of ``pytorch_lightning`` (and of
    ``lightning.pytorch`` when installed) and a
    :class:`~lightning_secagg.errors.ConfigurationError`, so any of them catches it.
    """


@dataclass(frozen=True)
class _RoundOutcome:
    """What global rank 0 broadcasts to every rank after a round (plain, picklable data)."""

    status: str  # "ok", "failed" (a RoundFailedError) or "error" (anything else)
    state: dict[str, torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error_type: str = ""
    error_message: str = ""


class SecureAggregationCallback(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Securely average the model with other peers at the end of training epochs.

    Each participating training process (a *peer*) adds this callback to its
    ``Trainer``. Every ``every_n_epochs`` epochs, the peers of one ``session``
    run a secure aggregation round through the scheduler: no party sees another
    peer's weights, only the (weighted) average, which every peer loads back.

    .. code-block:: python

        from pytorch_lightning import Trainer
        from lightning_secagg import SecureAggregationCallback

        trainer = Trainer(
            max_epochs=10,
            callbacks=[
                SecureAggregationCallback(
                    scheduler="tcp://10.0.0.1:5555", scheduler_key="scheduler.key"
                )
            ],
        )
        trainer.fit(model)

    The constructor only stores and validates the configuration; the network
    peer is created in ``setup("fit")`` on global rank 0 (under DDP the other
    ranks receive the average through ``trainer.strategy.broadcast``).

    Args:
        scheduler: Address of the scheduler, ``"tcp://host:port"`` (``"host:port"``
            is accepted too).
        address: This peer's own listening address ``"tcp://host:port"``, or just
            a port number (bound on ``127.0.0.1``). Port 0 picks a free port.
            Other peers must be able to reach it. A wildcard host (``0.0.0.0``,
            ``*``, ``[::]``) binds every interface and needs ``advertise``.
        advertise: The address other peers connect to, ``"tcp://host:port"``,
            when ``address`` binds a wildcard host (behind NAT, in a container,
            on a machine with several interfaces). ``None`` (default): the
            others connect to ``address`` itself. Its port is the one other
            peers dial, so it must be a real port (not 0).
        session: Name of the aggregation session; only peers of the same session
            are averaged together.
        peer_id: Stable identifier of this peer; ``None`` lets the peer pick one.
        scheduler_key: The scheduler's CURVE public key (as ``lightning-secagg
            scheduler`` prints it, or ``Scheduler.public_key``) or the path of its
            public key file. Required unless ``insecure=True``.
        insecure: Plaintext, unauthenticated links (debugging only); excludes
            ``scheduler_key``.
        every_n_epochs: Run a round after every ``n``-th training epoch, i.e. when
            ``(epoch + 1) % every_n_epochs == 0`` (``ModelCheckpoint``'s convention).
            All peers of a session must use the same value.
        weighting: ``"uniform"`` gives every peer the same weight (as the original
            HyperAggregate benchmark); ``"samples"`` weights each peer by the number
            of samples in its training dataset(s).
        round_timeout: Seconds one round (one attempt) may take before it fails.
        on_failure: What to do when a round fails (timeout, abort, unreachable
            member): ``"retry"`` (default) signs up again at once, up to
            ``max_retries`` times, so the peers still alive form a new round with a
            fresh tree and fresh shares, and raises the last error when every
            attempt failed; ``"raise"`` stops training with the error;
            ``"keep_local"`` warns, logs ``secagg/failed_rounds`` and keeps training
            with the local weights. A schema mismatch, a refused sign-up and an
            encoding error (NaN/Inf, overflow) are never retried: they would fail
            every following attempt the same way. Under ``"keep_local"`` a refused
            sign-up (a schema mismatch included: an outsider may squat a session)
            keeps the local weights like any failed round; an encoding error
            (a fault of this model) always raises.
        max_retries: Extra attempts per round under ``on_failure="retry"``.
        log_metrics: Log ``secagg/*`` metrics and the progress bar entry.
        ring: ``"auto"`` lets the scheduler pick the compact 32-bit ring when it
            is safe (half the bytes; each peer discloses to the scheduler the
            binary exponent of every tensor's largest magnitude); ``"64"``
            discloses nothing and keeps the 64-bit ring (see ``docs/numerics.md``).
        roster: Admission control (see :class:`~lightning_secagg.peer.Peer`'s
            ``roster``): a roster, or the path of a roster file re-read when it
            changes; the peer refuses any round with a member key outside it.
            None: anyone can join, and privacy depends on who does.
        keys: This peer's CURVE key pair: a ``KeyPair`` or the path of its
            ``.key_secret`` file (``lightning-secagg keygen NAME``); needed for
            the others' rosters to list it. None: a fresh key per run.
        preflight_timeout: Seconds ``setup`` waits for the scheduler to answer
            before the first epoch (:meth:`Peer.preflight`): a wrong key
            (``SchedulerKeyError``) or an unreachable scheduler
            (``SchedulerUnreachableError``) stops ``fit`` before any training
            step; None skips the check.

    Raises:
        SecureAggregationMisconfigurationError: If an argument is invalid (a
            ``MisconfigurationException``).
    """

    def __init__(
        self,
        *,
        scheduler: str = "tcp://127.0.0.1:5555",
        address: str | int = "tcp://127.0.0.1:0",
        advertise: str | None = None,
        session: str = "default",
        peer_id: str | None = None,
        scheduler_key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        every_n_epochs: int = 1,
        weighting: str = "uniform",
        round_timeout: float = 60.0,
        on_failure: str = "retry",
        max_retries: int = 2,
        log_metrics: bool = True,
        ring: str = "auto",
        preflight_timeout: float | None = 10.0,
        roster: Roster | str | os.PathLike[str] | None = None,
        keys: KeyPair | str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.scheduler = _normalize_endpoint("scheduler", scheduler, allow_port_zero=False)
        if isinstance(address, bool) or not isinstance(address, (str, int)):
            raise SecureAggregationMisconfigurationError(
                "`address` must be a 'tcp://host:port' string or a port number (int),"
                f" found {address!r}."
            )
        if isinstance(address, int):
            if not 0 <= address <= 65535:
                raise SecureAggregationMisconfigurationError(
                    f"`address` as a port must be in [0, 65535], found {address!r}."
                )
            address = f"tcp://127.0.0.1:{address}"
        self.address = _normalize_endpoint("address", address, allow_port_zero=True)
        self.advertise: str | None = (
            None
            if advertise is None
            else _normalize_endpoint("advertise", advertise, allow_port_zero=False)
        )
        # The peer's own arguments are checked where the peer checks them (one home),
        # now rather than in setup: a malformed key is reported when the callback is built.
        try:
            if keys is not None and not isinstance(keys, KeyPair):
                if not isinstance(keys, (str, os.PathLike)):
                    raise ConfigurationError(
                        f"keys must be a KeyPair or a .key_secret file's path, got {keys!r:.60}"
                    )
                keys = KeyPair.load(keys)
            check_peer_options(
                self.address,
                self.scheduler,
                session,
                scheduler_key=scheduler_key,
                insecure=insecure,
                peer_id=peer_id,
                ring=ring,
                advertise=self.advertise,
                roster=roster,
                keys=keys,
            )
        except ConfigurationError as exc:
            raise SecureAggregationMisconfigurationError(
                f"SecureAggregationCallback: {exc}"
            ) from None
        self.session = session
        self.peer_id = peer_id
        self.scheduler_key = scheduler_key
        self.insecure = insecure
        self.ring = ring
        self.roster = roster
        self.keys = keys
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise SecureAggregationMisconfigurationError(
                f"`every_n_epochs` must be an integer >= 1, found {every_n_epochs!r}."
            )
        self.every_n_epochs = every_n_epochs
        if weighting not in WEIGHTINGS:
            raise SecureAggregationMisconfigurationError(
                f"`weighting` must be one of {WEIGHTINGS}, found {weighting!r}."
            )
        self.weighting = weighting
        if (
            isinstance(round_timeout, bool)
            or not isinstance(round_timeout, (int, float))
            or not math.isfinite(round_timeout)
            or round_timeout <= 0
        ):
            raise SecureAggregationMisconfigurationError(
                f"`round_timeout` must be a finite number of seconds > 0, found {round_timeout!r}."
            )
        self.round_timeout = float(round_timeout)
        if on_failure not in FAILURE_POLICIES:
            raise SecureAggregationMisconfigurationError(
                f"`on_failure` must be one of {FAILURE_POLICIES}, found {on_failure!r}."
            )
        self.on_failure = on_failure
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise SecureAggregationMisconfigurationError(
                f"`max_retries` must be an integer >= 0, found {max_retries!r}."
            )
        self.max_retries = max_retries
        self.log_metrics = bool(log_metrics)
        if preflight_timeout is not None and (
            isinstance(preflight_timeout, bool)
            or not isinstance(preflight_timeout, (int, float))
            or not math.isfinite(preflight_timeout)
            or preflight_timeout <= 0
        ):
            raise SecureAggregationMisconfigurationError(
                "`preflight_timeout` must be None or a finite number of seconds > 0,"
                f" found {preflight_timeout!r}."
            )
        self.preflight_timeout = preflight_timeout

        self._peer: Peer | None = None
        self._max_message_bytes: int | None = None
        # own state, saved in checkpoints (see `state_dict`)
        self.rounds_completed = 0
        self.rounds_failed = 0
        self.rounds_retried = 0  # retry attempts, over all rounds
        self._last_round_epoch = -1
        # observability of the latest round (not checkpointed)
        self.last_stats: Any = None
        self.last_error: BaseException | None = None

    # ------------------------------------------------------------------ policy hooks
    def should_aggregate(self, trainer: pl.Trainer, epoch: int) -> bool:
        """Decide whether a round runs at the end of training epoch ``epoch`` (0-based).

        Override for another schedule; every peer of a session must decide the same.

        Args:
            trainer: The current trainer.
            epoch: The 0-based index of the training epoch that is ending.

        Returns:
            ``True`` when ``(epoch + 1) % every_n_epochs == 0``.
        """
        return (epoch + 1) % self.every_n_epochs == 0

    def round_weight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """This peer's weight in the average (called on global rank 0 before each round).

        Args:
            trainer: The current trainer.
            pl_module: The module being trained.

        Returns:
            ``1.0`` for ``weighting="uniform"``; the number of training samples for
            ``weighting="samples"``.

        Raises:
            SecureAggregationMisconfigurationError: If ``weighting="samples"`` and the
                training data has no length.
        """
        if self.weighting == "uniform":
            return 1.0
        return float(_count_training_samples(trainer))

    def on_before_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called on every rank right before a round, with the local weights loaded.

        A no-op; override it, e.g. to evaluate the local model before averaging.
        """

    def on_after_round(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: Mapping[str, Any] | None,
        error: BaseException | None,
    ) -> None:
        """Called on every rank after a round, before validation sees the weights.

        A no-op; override it to observe rounds. On success ``stats`` holds the
        round's :class:`~lightning_secagg.peer.RoundStats` fields as a dict
        (``round_id``, ``seconds``, ``round_seconds``, ``bytes_sent``,
        ``bytes_received``, ``num_peers``, ..., plus ``retries``: the failed attempts
        retried before this one succeeded, and ``failed_attempts``: their errors
        as text) and ``error`` is ``None``; after a failed round
        that was tolerated (``on_failure="keep_local"``) ``error`` is the failure.
        """

    # ------------------------------------------------------------------ properties
    @property
    def peer(self) -> Peer | None:
        """The running peer (global rank 0 between ``setup`` and ``teardown``), else ``None``."""
        return self._peer

    @property
    def endpoint(self) -> str | None:
        """The address the peer actually listens on, once started."""
        return None if self._peer is None else self._peer.endpoint

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(session=self.session)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start the peer on global rank 0 when fitting; reset the per-fit state.

        The same callback object may serve several ``fit`` calls: which epoch
        last ran a round belongs to one fit (a new one counts epochs from its
        own start, or from its checkpoint, restored after ``setup``), while the
        round counters go on.
        """
        if stage != "fit":
            return
        self._last_round_epoch = -1
        self.last_stats = None
        self.last_error = None
        if not any(True for _ in pl_module.parameters()) and not any(
            True for _ in pl_module.buffers()
        ):
            raise SecureAggregationMisconfigurationError(
                "SecureAggregationCallback needs a module with parameters or buffers to average,"
                f" found none in {type(pl_module).__name__}."
            )
        if trainer.is_global_zero and self._peer is None:
            from lightning_secagg.peer import required_message_bytes
            from lightning_secagg.schema import Schema

            # The model is known now: bound the inbox's frames to what its rounds
            # need, so a stranger cannot make this process buffer a huge frame.
            self._max_message_bytes = required_message_bytes(
                Schema.of(pl_module.state_dict()), sealed=not self.insecure
            )
            self._peer = self._create_peer()
            try:
                self._peer.start()
                if self.preflight_timeout is not None:
                    # Before the first epoch: a wrong key or an absent scheduler is
                    # told now, not after a whole epoch and three round timeouts.
                    self._peer.preflight(self.preflight_timeout)
            except BaseException:
                self._stop_peer()
                raise
            log.info(
                "secure aggregation peer listening on %s (session %r, scheduler %s)",
                self._peer.endpoint,
                self.session,
                self.scheduler,
            )

    def _create_peer(self) -> Peer:
        """Build (not start) the embedded peer; override to customise it."""
        from lightning_secagg.peer import Peer

        kwargs: dict[str, Any] = {"session": self.session, "peer_id": self.peer_id}
        if self._max_message_bytes is not None:
            kwargs["max_message_bytes"] = self._max_message_bytes
        if self.scheduler_key is not None:
            kwargs["scheduler_key"] = self.scheduler_key
        if self.insecure:
            kwargs["insecure"] = True
        if self.ring != "auto":
            kwargs["ring"] = self.ring
        if self.advertise is not None:
            kwargs["advertise"] = self.advertise
        if self.roster is not None:
            kwargs["roster"] = self.roster
        if self.keys is not None:
            kwargs["keys"] = self.keys
        return Peer(self.address, self.scheduler, **kwargs)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Leave the session for good and stop the peer (idempotent).

        The scheduler is told (``Peer.close``), so peers still waiting for this
        one are told at once when too few remain, instead of timing out.
        """
        self._stop_peer(farewell=True)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Leave for good and stop the peer when training dies (Lightning skips
        ``teardown`` then): this fit will not sign up again."""
        self._stop_peer(farewell=True)

    @property
    def waiting_status(self) -> WaitingStatus | None:
        """What the scheduler last said the running round waits for (None: nothing yet).

        See :attr:`lightning_secagg.peer.Peer.waiting_status`.
        """
        return self._peer.waiting_status if self._peer is not None else None

    def _stop_peer(self, *, farewell: bool = False) -> None:
        peer, self._peer = self._peer, None
        if peer is None:
            return
        try:
            if farewell:
                peer.close()
            else:
                peer.stop()
        except Exception:  # a failing stop must not hide the original error
            log.exception("stopping the secure aggregation peer failed")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_peer"] = None
        state["last_error"] = None
        return state

    # ------------------------------------------------------------------ the round
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Run the round after the epoch's last optimizer step, before validation."""
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._maybe_round(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fallback for epochs that ended without a last batch (e.g. ``max_steps``)."""
        self._maybe_round(trainer, pl_module)

    def _maybe_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self._last_round_epoch or not self.should_aggregate(trainer, epoch):
            return
        self._last_round_epoch = epoch
        self._run_round(trainer, pl_module)

    def _run_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_before_round(trainer, pl_module)
        outcome: _RoundOutcome | None = None
        local_error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                outcome = self._aggregate_on_rank_zero(trainer, pl_module)
            except RoundFailedError as exc:
                local_error = exc
                outcome = _RoundOutcome(
                    status="failed", error_type=type(exc).__name__, error_message=str(exc)
                )
            except Exception as exc:
                local_error = exc
                outcome = _RoundOutcome(
                    status="error", error_type=type(exc).__name__, error_message=str(exc)
                )
        # every rank takes part in the broadcast, also when rank 0 failed: no rank hangs
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome is None:  # pragma: no cover - defensive: a strategy that broadcasts nothing
            raise RuntimeError("SecureAggregationCallback: rank 0 broadcast no round outcome")

        if outcome.status == "ok":
            if outcome.state is None:  # pragma: no cover - defensive
                raise RuntimeError(
                    "SecureAggregationCallback: a successful round carried no weights"
                )
            _load_in_place(pl_module, outcome.state)
            self.rounds_completed += 1
            self.rounds_retried += int(outcome.stats.get("retries", 0))
            self.last_error = None
            self.last_stats = outcome.stats
            self._log_round(trainer, pl_module, outcome.stats)
            self.on_after_round(trainer, pl_module, outcome.stats, None)
            return

        error = local_error
        if error is None:  # a rank other than 0 rebuilds the error from the broadcast
            error = (
                RoundFailedError(f"on global rank 0: {outcome.error_type}: {outcome.error_message}")
                if outcome.status == "failed"
                else RuntimeError(
                    f"secure aggregation failed on global rank 0: "
                    f"{outcome.error_type}: {outcome.error_message}"
                )
            )
        self.last_error = error
        if outcome.status == "error" or not self._tolerate(outcome.error_type):
            raise error
        self.rounds_failed += 1
        message = (
            f"Secure aggregation round at epoch {trainer.current_epoch} failed"
            f" ({outcome.error_type}: {outcome.error_message}); keeping the local weights"
            " (on_failure='keep_local')."
        )
        log.warning("%s", message)
        if trainer.is_global_zero:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        self._log_failure(trainer, pl_module)
        self.on_after_round(trainer, pl_module, None, error)

    def _tolerate(self, error_type: str) -> bool:
        """Whether the failure policy lets training go on after a failed round.

        ``"retry"`` retries inside ``_aggregate_on_rank_zero``; a round that still
        failed after its retries is not tolerated (it raises). Under
        ``"keep_local"`` a refused sign-up (:class:`SchemaMismatchError`
        included) is tolerated: somebody else's sign-up with another schema must
        not be able to end this training. An :class:`EncodingError` is this
        model's own fault and raises.
        """
        if error_type == EncodingError.__name__:
            return False
        return self.on_failure == "keep_local"

    def _aggregate_on_rank_zero(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> _RoundOutcome:
        if self._peer is None:
            raise RuntimeError(
                "SecureAggregationCallback: the peer is not running; it is started in"
                " setup('fit'), was the callback used outside `trainer.fit`?"
            )
        local = {name: t.detach().cpu() for name, t in pl_module.state_dict().items()}
        weight = self.round_weight(trainer, pl_module)
        started = time.perf_counter()
        failures: list[str] = []

        def on_retry(exc: RoundFailedError, attempt: int) -> None:
            failures.append(f"{type(exc).__name__}: {exc}")
            log.warning(
                "secure aggregation round failed (%s: %s); signing up again with the peers"
                " still alive (retry %d/%d)",
                type(exc).__name__,
                exc,
                attempt,
                self.max_retries,
            )

        # The peer's retry loop (one home for the rule of what is retried).
        averaged = self._peer.aggregate_with_retry(
            local,
            weight=weight,
            timeout=self.round_timeout,
            max_retries=self.max_retries if self.on_failure == "retry" else 0,
            on_retry=on_retry,
        )
        attempt = len(failures)
        elapsed = time.perf_counter() - started
        raw_stats = self._peer.last_stats
        stats = _stats_to_dict(raw_stats)
        stats.setdefault("seconds", elapsed)
        stats["retries"] = attempt
        stats["failed_attempts"] = failures
        log.info(
            "secure aggregation round %s done in %.3fs with %s peers",
            stats.get("round_id", "?"),
            stats["seconds"],
            stats.get("num_peers", "?"),
        )
        state = {name: t.detach().cpu() for name, t in averaged.items()}
        return _RoundOutcome(status="ok", state=state, stats=stats)

    # ------------------------------------------------------------------ metrics
    def _log(
        self,
        pl_module: pl.LightningModule,
        trainer: pl.Trainer,
        name: str,
        value: float,
        **kwargs: Any,
    ) -> None:
        pl_module.log(
            name,
            float(value),
            on_step=False,
            on_epoch=True,
            batch_size=1,
            sync_dist=trainer.world_size > 1,
            **kwargs,
        )

    def _log_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: Mapping[str, Any]
    ) -> None:
        if not self.log_metrics:
            return
        seconds = stats.get("seconds", 0.0)
        self._log(pl_module, trainer, "secagg/round_seconds", stats.get("round_seconds", seconds))
        self._log(pl_module, trainer, "secagg/aggregate_seconds", seconds)
        self._log(pl_module, trainer, "secagg/bytes_sent", stats.get("bytes_sent", 0))
        self._log(pl_module, trainer, "secagg/bytes_received", stats.get("bytes_received", 0))
        self._log(pl_module, trainer, "secagg/peers", stats.get("num_peers", 0))
        self._log_counters(trainer, pl_module)

    def _log_failure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_metrics:
            self._log_counters(trainer, pl_module)

    def _log_counters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, trainer, "secagg/rounds", self.rounds_completed)
        self._log(pl_module, trainer, "secagg/failed_rounds", self.rounds_failed)
        self._log(pl_module, trainer, "secagg/retries", self.rounds_retried)
        self._log(
            pl_module, trainer, PROGRESS_BAR_KEY, self.rounds_completed, prog_bar=True, logger=False
        )

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """Round counters, so a resumed run continues the count."""
        return {
            "rounds_completed": self.rounds_completed,
            "rounds_failed": self.rounds_failed,
            "rounds_retried": self.rounds_retried,
            "last_round_epoch": self._last_round_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters saved by :meth:`state_dict`."""
        self.rounds_completed = int(state_dict.get("rounds_completed", 0))
        self.rounds_failed = int(state_dict.get("rounds_failed", 0))
        self.rounds_retried = int(state_dict.get("rounds_retried", 0))
        self._last_round_epoch = int(state_dict.get("last_round_epoch", -1))


# ---------------------------------------------------------------------- helpers
def _normalize_endpoint(name: str, value: Any, *, allow_port_zero: bool) -> str:
    """Check a ``tcp://host:port`` address (``host:port`` accepted) and return it normalised."""
    if not isinstance(value, str) or not value:
        raise SecureAggregationMisconfigurationError(
            f"`{name}` must be a 'tcp://host:port' string, found {value!r}."
        )
    endpoint = value if "://" in value else f"tcp://{value}"
    scheme, _, rest = endpoint.partition("://")
    host, sep, port_text = rest.rpartition(":")
    if scheme != "tcp" or not sep or not host or not port_text.isdigit():
        raise SecureAggregationMisconfigurationError(
            f"`{name}` must look like 'tcp://host:port', found {value!r}."
        )
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise SecureAggregationMisconfigurationError(
            f"`{name}` port must be in [{low}, 65535], found {port} in {value!r}."
        )
    return endpoint


def _count_training_samples(trainer: pl.Trainer) -> int:
    """Total length of the datasets behind ``trainer.train_dataloader`` (all ranks' data)."""
    loaders = trainer.train_dataloader
    found: list[Any] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, torch.utils.data.DataLoader):
            found.append(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                collect(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                collect(value)

    collect(loaders)
    if not found:
        raise SecureAggregationMisconfigurationError(
            "`weighting='samples'` needs training DataLoaders to count samples,"
            f" found {type(loaders).__name__}."
        )
    total = 0
    for loader in found:
        try:
            total += len(loader.dataset)
        except TypeError as exc:
            raise SecureAggregationMisconfigurationError(
                "`weighting='samples'` needs training datasets with a length (`__len__`),"
                f" found {type(loader.dataset).__name__} without one."
            ) from exc
    if total <= 0:
        raise SecureAggregationMisconfigurationError(
            f"`weighting='samples'` needs at least one training sample, found {total}."
        )
    return total


def _stats_to_dict(stats: Any) -> dict[str, Any]:
    """Turn the peer's ``RoundStats`` (a dataclass or named tuple) into a plain dict."""
    if stats is None:
        return {}
    if isinstance(stats, Mapping):
        return dict(stats)
    if hasattr(stats, "__dataclass_fields__"):
        return asdict(stats)
    if hasattr(stats, "_asdict"):
        return dict(stats._asdict())
    names = ("round_id", "seconds", "round_seconds", "bytes_sent", "bytes_received", "num_peers")
    return {name: getattr(stats, name) for name in names if hasattr(stats, name)}


def _load_in_place(pl_module: pl.LightningModule, averaged: Mapping[str, torch.Tensor]) -> None:
    """Copy ``averaged`` into the module's own tensors, keeping every reference valid.

    ``tensor.copy_`` under ``no_grad`` keeps the same Parameter objects (so the
    optimizer still updates them) and moves data onto each tensor's device and dtype.
    """
    targets = pl_module.state_dict(keep_vars=True)
    missing = sorted(set(targets) - set(averaged))
    unexpected = sorted(set(averaged) - set(targets))
    if missing or unexpected:
        raise RuntimeError(
            "secure aggregation returned a state dict that does not match the module:"
            f" missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, target in targets.items():
            source = averaged[name]
            if source.shape != target.shape:
                raise RuntimeError(
                    f"secure aggregation returned shape {tuple(source.shape)} for {name!r},"
                    f" expected {tuple(target.shape)}"
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))
