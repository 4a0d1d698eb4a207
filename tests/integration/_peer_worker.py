"""One peer process for the integration tests.

Builds a deterministic state dict from its index, aggregates ``--rounds``
times through a real scheduler, and writes what it got to ``--out``: the raw
bytes of every tensor (for bitwise comparison) and their float64 values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys

import torch

from lightning_secagg import Peer


def make_state(index: int, scale: float = 1.0, model: str = "mixed") -> dict[str, torch.Tensor]:
    """Peer ``index``'s model. ``mixed`` holds a float64 tensor, so its rounds use the
    64-bit ring; ``compact`` is the same model with that tensor in float32, so its
    rounds (up to 64 peers) use the 32-bit ring."""
    g = torch.Generator().manual_seed(1000 + index)
    bias_dtype = torch.float64 if model == "mixed" else torch.float32
    return {
        "conv.weight": (torch.randn(8, 4, 3, 3, generator=g) * scale).float(),
        "conv.bias": (torch.randn(8, generator=g) * scale).to(bias_dtype),
        "fc.weight": (torch.randn(33, 7, generator=g) * scale).to(torch.float16),
        "fc.bias": (torch.randn(33, generator=g) * scale).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(100 * index + 7, dtype=torch.int64),
        "bn.running_mean": torch.full((5,), float(index), dtype=torch.float32),
        "mask": torch.tensor([index % 2 == 0, True, False]),
        "scalar": torch.tensor(float(index) * 0.5),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--scheduler-key", default=None)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--model", choices=["mixed", "compact"], default="mixed")
    parser.add_argument("--ring", choices=["auto", "64"], default="auto")
    parser.add_argument("--bind", default="tcp://127.0.0.1:0", help="the peer's listening address")
    parser.add_argument("--advertise", default=None, help="the address the others dial")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    records = []
    peer = Peer(
        args.bind,
        args.scheduler,
        advertise=args.advertise,
        peer_id=f"peer{args.index}",
        scheduler_key=args.scheduler_key,
        insecure=args.insecure,
        ring=args.ring,
    )
    with peer:
        for r in range(args.rounds):
            state = make_state(args.index, 1.0 + r, args.model)
            result = peer.aggregate(state, args.weight, args.timeout)
            raw = hashlib.sha256()
            values = {}
            for name, t in result.items():
                raw.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                values[name] = t.double().numpy().tolist()
            stats = peer.last_stats
            records.append(
                {
                    "digest": raw.hexdigest(),
                    "dtypes": {k: str(v.dtype) for k, v in result.items()},
                    "shapes": {k: list(v.shape) for k, v in result.items()},
                    "values": values,
                    "endpoint": peer.endpoint,
                    "stats": {
                        "round_id": stats.round_id,
                        "bytes_sent": stats.bytes_sent,
                        "bytes_received": stats.bytes_received,
                        "num_peers": stats.num_peers,
                        "roles": list(stats.roles),
                        "round_seconds": stats.round_seconds,
                        "ring_bits": stats.ring_bits,
                    },
                }
            )
    with open(args.out, "w") as f:
        json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
