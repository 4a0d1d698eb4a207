"""A peer process that can be told to die (SIGKILL) or freeze (SIGSTOP) at a given moment.

``--die-role leaf|actor|root`` arms the fault: the first worker of the round
that has that role and wins the ``--marker`` file (``O_EXCL``) stops itself

* ``leaf`` (never an actor): on its assignment, before any share leaves;
* ``actor`` (an actor, not at the root): when the first share of its level-0
  group reaches it, before it is summed: it holds its own vector and that
  share and has sent nothing up (below the root group an actor gets a share
  from each non-actor only: one, in a group of three, so it may have no
  "more" to wait for);
* ``root`` (a root actor): right after the first share of the root group
  reached it.

The marker file gets ``pid role time`` first, so the test knows whom to clean
up and when the fault happened. Every worker retries a failed round (like the
callback's ``on_failure="retry"``) and writes each attempt's timing and error,
and the final result, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import torch

from lightning_secagg import Peer
from lightning_secagg.errors import RoundFailedError
from lightning_secagg.messages import Message, Share
from lightning_secagg.peer import is_retryable


def make_state(index: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5000 + index)
    return {
        "w": (torch.randn(64, generator=g) * scale).double(),
        "b": (torch.randn(7, generator=g) * scale).float(),
    }


class FaultyPeer(Peer):
    def __init__(self, *args: Any, die_role: str, die_how: str, marker: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.die_role, self.die_how, self.marker = die_role, die_how, marker

    def _role(self, rnd: Any) -> str:
        first = rnd.state.segments[0]  # roles are the same in every segment
        if first.is_root_actor:
            return "root"
        return "actor" if first.acted else "leaf"

    def _die(self, rnd: Any) -> None:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another worker already played the part
        os.write(fd, f"{os.getpid()} {self._role(rnd)} {time.time()}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL if self.die_how == "kill" else signal.SIGSTOP)

    def start(self) -> FaultyPeer:
        super().start()
        wire = self._session.wire  # type: ignore[union-attr]
        original_open = wire.open

        def open_then_maybe_die(links: Any, item: Any, place: Any) -> Any:
            # The wire opens a message just before the session hands it to the round.
            msg, blob = original_open(links, item, place)
            rnd = self._session.round  # type: ignore[union-attr]
            if rnd is not None:
                self._before_round_takes(rnd, msg)
            return msg, blob

        wire.open = open_then_maybe_die  # type: ignore[method-assign]
        return self

    def _apply(self, outputs: list[Any]) -> None:
        rnd = self._session.round if self._session is not None else None
        if (
            rnd is not None
            and self.die_role == "leaf"
            and self._role(rnd) == "leaf"
            and any(getattr(o, "what", None) == "share" for o in outputs)
        ):
            self._die(rnd)  # about to send its shares
        super()._apply(outputs)

    def _before_round_takes(self, rnd: Any, msg: Message) -> None:
        mine = isinstance(msg, Share) and self._role(rnd) == self.die_role
        if mine and self.die_role == "root" and msg.level == rnd.state.tree.depth - 1:
            # Before the share is summed: a root actor dies holding the root level's
            # shares it got so far, before it can send its partial sum, whatever
            # the order in which its two levels' shares arrived (once its own
            # level-0 group completed late, the root level could complete at once).
            self._die(rnd)
        if mine and self.die_role == "actor" and msg.level == 0:
            self._die(rnd)  # holding its own vector and this share, nothing sent up


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--scheduler-key", default=None)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--die-role", default="none", choices=["none", "leaf", "actor", "root"])
    parser.add_argument("--die-how", default="kill", choices=["kill", "stop"])
    parser.add_argument("--marker", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    peer = FaultyPeer(
        "tcp://127.0.0.1:0",
        args.scheduler,
        peer_id=f"peer{args.index}",
        scheduler_key=args.scheduler_key,
        die_role=args.die_role,
        die_how=args.die_how,
        marker=args.marker,
        linger=0.5,
    )
    attempts: list[dict[str, Any]] = []
    record: dict[str, Any] = {"index": args.index, "attempts": attempts}
    with peer:
        print(f"worker {args.index} ready", flush=True)
        for attempt in range(args.max_retries + 1):
            started = time.monotonic()
            try:
                result = peer.aggregate(make_state(args.index), 1.0, args.timeout)
            except RoundFailedError as exc:
                attempts.append(
                    {
                        "seconds": time.monotonic() - started,
                        "ended": time.time(),
                        "error_type": type(exc).__name__,
                        "error": str(exc),
                    }
                )
                if not is_retryable(exc) or attempt == args.max_retries:
                    break
                continue
            attempts.append({"seconds": time.monotonic() - started, "ended": time.time()})
            stats = peer.last_stats
            record.update(
                result={k: v.double().tolist() for k, v in result.items()},
                digest=[v.contiguous().view(torch.uint8).tolist() for v in result.values()],
                num_peers=stats.num_peers if stats else 0,
                round_id=stats.round_id if stats else "",
            )
            break
    with open(args.out, "w") as f:
        json.dump(record, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
