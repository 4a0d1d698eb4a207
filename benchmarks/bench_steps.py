"""Each step of a round alone, on MNISTNet in the compact ring: where a peer's CPU goes.

Prints a Markdown table of milliseconds per step (best of ``--repeat``, one
torch thread). The steps are those a peer runs in a round; which of them a
peer runs, and how often, depends on its roles (see ``docs/protocol.md``).

Usage::

    python benchmarks/bench_steps.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best_ms(step: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs, in milliseconds."""
    fastest = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()

    import numpy as np
    import torch

    from examples.mnist.model import MNISTNet
    from lightning_secagg.codec import encode as to_frames
    from lightning_secagg.encoding import decode_result, decode_total, encode, magnitude_exponents
    from lightning_secagg.messages import Result, Share
    from lightning_secagg.ring import COMPACT_COUNT_BITS, RingPlan
    from lightning_secagg.schema import Schema
    from lightning_secagg.sealing import Envelope, RoundKey, SealedBlob
    from lightning_secagg.sharing import add_expanded_seed, draw_seeds, mask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    state = MNISTNet().state_dict()
    schema = Schema.of(state)
    plan = RingPlan.compact(schema, magnitude_exponents(state))
    vector = encode(state, schema, 1 / 6, checked=True, plan=plan)
    alice, bob = RoundKey(), RoundKey()
    keys = {"A": alice.public, "B": bob.public}
    to_bob = alice.links("r", "A", keys)["B"][0]
    from_alice = bob.links("r", "B", keys)["A"][1]
    frames = to_frames(Share("r", 0, 0, "A", None, vector))
    sealed = to_bob.seal(frames)
    envelope = Envelope.unpack(sealed[0])
    total = vector.copy()  # the add-steps below sum into it, over and over
    masked = vector.copy()  # a leaf masks its fresh encoding in place, over and over here
    ring_total = vector.copy()
    ring_total.view(np.int32)[0] = 2**COMPACT_COUNT_BITS  # a plausible count slot
    result = decode_total(ring_total, schema, plan)
    blob = SealedBlob.seal(result)
    result_header = to_frames(Result("r", "A", result))[0]
    mb = vector.nbytes / 1e6
    steps: dict[str, Callable[[], object]] = {
        "check values + exponents (aminmax)": lambda: magnitude_exponents(state),
        "encode": lambda: encode(state, schema, 1 / 6, checked=True, plan=plan),
        "split into 2 shares (draw 1 seed, subtract its keystream)": lambda: mask(
            masked, draw_seeds(1, os.urandom)
        ),
        "add one seed's share (AES-256 keystream)": lambda: add_expanded_seed(
            os.urandom(32), total
        ),
        "add one dense share": lambda: np.add(total, vector, out=total),
        f"seal {mb:.1f} MB (AES-256-GCM)": lambda: to_bob.seal(frames),
        f"open {mb:.1f} MB": lambda: from_alice.open(envelope, sealed),
        "decode the ring total (root actors)": lambda: decode_total(ring_total, schema, plan),
        "seal the result once (root actors)": lambda: SealedBlob.seal(result),
        "forward it to one participant (link tags)": lambda: to_bob.seal_forward(
            result_header, blob
        ),
        "rebuild the state dict (one copy)": lambda: decode_result(result, schema),
    }
    print(f"MNISTNet, {schema.vector_size - 1:,} parameters, compact ring, best of {args.repeat}")
    print("| step | ms |")
    print("| --- | --- |")
    for name, step in steps.items():
        print(f"| {name} | {best_ms(step, args.repeat):.2f} |")


if __name__ == "__main__":
    main()
