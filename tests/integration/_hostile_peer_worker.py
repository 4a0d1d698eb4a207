"""An honest peer process for the hostile-input tests, driven line by line.

stdout (one line each, flushed)::

    READY {"peer_id", "endpoint", "key"}           after start()
    ASSIGNED {"round_id", "tree", "group_size", "num_actors", "members", "round_keys"}
                                                     when an assignment arrives
    RESULT {"round", "round_id", "digest", "values"} after each round
    FAILED {"round", "error"}                      a round raised (the test fails on it)

stdin: ``go`` runs one round; ``stall S`` runs one round but waits S seconds
after the assignment before sending its own shares (so a test can race forged
shares against the real ones); ``quit`` (or EOF) ends the process. The model
is the same every round, so every round's result must be bitwise identical.
Warnings (every dropped message) go to stderr, which the test keeps, and so
does the one debug line that says a message of a finished round was ignored
(the replay test counts those).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from typing import Any

import torch

from lightning_secagg import Peer
from lightning_secagg.protocol.peer_session import PeerSession
from tests.integration._peer_worker import make_state

FINISHED_ROUND_LOG = "peer %s ignores a message of finished round"


def emit(tag: str, payload: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--scheduler-key", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--advertise", default=None)
    parser.add_argument("--max-message-bytes", type=int, default=1 << 16)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Round traffic of a finished round is ignored with a debug line: let exactly
    # that line through too, so the test can count it like a drop.
    logging.getLogger("lightning_secagg.protocol.peer_session").setLevel(logging.DEBUG)
    logging.getLogger().handlers[0].addFilter(
        lambda r: r.levelno >= logging.WARNING or str(r.msg).startswith(FINISHED_ROUND_LOG)
    )
    stall = {"seconds": 0.0}
    original = PeerSession._on_assignment

    def accept_assignment(self: PeerSession, msg: Any, *rest: Any) -> Any:
        emit(
            "ASSIGNED",
            {
                "round_id": msg.round_id,
                "tree": msg.tree,
                "group_size": msg.group_size,
                "num_actors": msg.num_actors,
                "members": msg.members,
                "round_keys": msg.round_keys,
            },
        )
        if stall["seconds"]:
            time.sleep(stall["seconds"])  # a slow member: its shares come last
        return original(self, msg, *rest)

    PeerSession._on_assignment = accept_assignment  # type: ignore[method-assign]
    peer = Peer(
        f"tcp://127.0.0.1:{args.port}",
        args.scheduler,
        peer_id=f"peer{args.index}",
        scheduler_key=args.scheduler_key,
        advertise=args.advertise,
        max_message_bytes=args.max_message_bytes,
    )
    with peer:
        emit("READY", {"peer_id": peer.peer_id, "endpoint": peer.endpoint, "key": peer.public_key})
        state = make_state(args.index)
        for n, line in enumerate(sys.stdin):
            words = line.split()
            if not words or words[0] == "quit":
                break
            stall["seconds"] = float(words[1]) if words[0] == "stall" else 0.0
            try:
                result = peer.aggregate(state, args.weight, args.timeout)
            except Exception as exc:  # reported to the test, which fails on it
                emit("FAILED", {"round": n, "error": f"{type(exc).__name__}: {exc}"})
                continue
            raw = hashlib.sha256()
            values = {}
            for name, t in result.items():
                raw.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                values[name] = t.double().numpy().tolist()
            stats = peer.last_stats
            emit(
                "RESULT",
                {
                    "round": n,
                    "round_id": stats.round_id if stats else None,
                    "digest": raw.hexdigest(),
                    "values": values,
                },
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
