"""One training peer for the callback's multi-process tests (run as a script).

Trains Lightning's ``BoringModel`` with :class:`SecureAggregationCallback` and
writes, into ``--out``, per global rank: the final weights
(``final-rank{R}.pt``), the local weights right before the last round
(``before-rank{R}.pt``), and a JSON report (metrics, counters, endpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import torch


def _exit_when_parent_dies() -> None:
    """The test keeps our stdin open; EOF means it is gone, so we go too."""

    def watch() -> None:
        fd = sys.stdin.fileno()
        while os.read(fd, 4096):  # raw reads: no buffered-reader lock at shutdown
            pass
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--scheduler", required=True)
    parser.add_argument(
        "--address", default="tcp://127.0.0.1:0", help="the peer's listening address"
    )
    parser.add_argument("--advertise", default=None, help="the address the others dial")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--every-n-epochs", type=int, default=1)
    parser.add_argument("--weighting", default="uniform")
    parser.add_argument("--on-failure", default="raise")
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--session", default="default")
    parser.add_argument("--scheduler-key", default=None, help="None: insecure links")
    parser.add_argument("--ddp", action="store_true", help="strategy=ddp on 2 CPU processes")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    parser.add_argument("--lightning", action="store_true", help="use lightning.pytorch")
    parser.add_argument("--train-batches", type=int, default=4)
    args = parser.parse_args()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _exit_when_parent_dies()
    torch.set_num_threads(1)

    if args.lightning:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.demos.boring_classes import BoringModel
    else:
        import pytorch_lightning as pl
        from pytorch_lightning.callbacks import ModelCheckpoint
        from pytorch_lightning.demos.boring_classes import BoringModel

    from lightning_secagg.callback import SecureAggregationCallback

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    class Callback(SecureAggregationCallback):
        def on_before_round(self, trainer, pl_module):
            rank = trainer.global_rank
            state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, out / f"before-rank{rank}.pt")
            if self.endpoint is not None:  # the address the others dial (rank 0's peer)
                (out / "endpoint.txt").write_text(self.endpoint)

    pl.seed_everything(100 + args.index)  # every peer starts from different weights
    model = BoringModel()
    callback = Callback(
        scheduler=args.scheduler,
        address=args.address,
        advertise=args.advertise,
        session=args.session,
        every_n_epochs=args.every_n_epochs,
        weighting=args.weighting,
        on_failure=args.on_failure,
        round_timeout=args.round_timeout,
        peer_id=f"peer{args.index}",
        scheduler_key=args.scheduler_key,
        insecure=args.scheduler_key is None,
    )
    callbacks: list = [callback]
    if args.ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, monitor=None))
    trainer_kwargs: dict = {
        "default_root_dir": str(out),
        "max_epochs": args.max_epochs,
        "limit_train_batches": args.train_batches,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": args.ckpt_dir is not None,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    if args.ddp:
        trainer_kwargs.update(strategy="ddp", devices=2)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, ckpt_path=str(args.resume) if args.resume else None)

    rank = trainer.global_rank
    torch.save(
        {k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"final-rank{rank}.pt"
    )
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "rounds_completed": callback.rounds_completed,
        "rounds_failed": callback.rounds_failed,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "progress_bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items()},
        "peer_stopped": callback.peer is None,
        "last_stats": callback.last_stats,
    }
    (out / f"report-rank{rank}.json").write_text(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
