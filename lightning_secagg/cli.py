"""The ``lightning-secagg`` command line.

``main(argv) -> int`` so tests call it in-process; logging is configured here
and nowhere else in the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from lightning_secagg.errors import ConfigurationError
from lightning_secagg.planner import DTYPES, RINGS
from lightning_secagg.protocol.scheduler_state import DEFAULT_MAX_ELEMENTS
from lightning_secagg.scheduler import Scheduler
from lightning_secagg.security import KeyPair, write_key_files


def scheduler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`Scheduler`'s arguments from the ``scheduler`` command's options.

    The one place the CLI's defaults become a scheduler: tests build their
    :class:`~lightning_secagg.protocol.scheduler_state.SchedulerState` through it
    too (``Scheduler(**scheduler_kwargs(args)).state``), so they run what the
    CLI runs.

    Raises:
        ConfigurationError: an unreadable key file or roster.
    """
    return {
        "port": args.port,
        "target_size": args.target_size,
        "group_size": args.group_size,
        "num_actors": args.num_actors,
        "host": args.host,
        "round_timeout": args.round_timeout,
        "min_size": args.min_size,
        "queue_wait": args.queue_wait,
        "liveness_timeout": args.liveness_timeout or None,
        "keys": KeyPair.load(args.key_file) if args.key_file else None,
        "insecure": args.insecure,
        "allow_keys": args.allow_keys,
        "max_ids_per_key": args.max_ids_per_key,
        "max_elements": args.max_elements,
        "schema_fingerprint": args.schema_fingerprint,
    }


def _scheduler(args: argparse.Namespace) -> int:
    try:
        scheduler = Scheduler(**scheduler_kwargs(args)).start()
    except ConfigurationError as exc:
        print(f"lightning-secagg scheduler: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if scheduler.public_key is not None:
        origin = (
            f"from {args.key_file}" if args.key_file else "ephemeral: use --key-file to keep it"
        )
        print(
            f"lightning-secagg scheduler public key: {scheduler.public_key} ({origin})", flush=True
        )
    else:
        print(
            "lightning-secagg scheduler: WARNING: --insecure, links are NOT encrypted", flush=True
        )
    if args.allow_keys:
        print(f"lightning-secagg scheduler admits only the keys in {args.allow_keys}", flush=True)
    else:
        print(
            "lightning-secagg scheduler: WARNING: no --allow-keys roster, anyone with a key can "
            "join a round, and a round's privacy then depends on who does",
            flush=True,
        )
    print(f"lightning-secagg scheduler listening on {scheduler.address}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        scheduler.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("lightning-secagg scheduler stopped", flush=True)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    try:
        public, secret = write_key_files(args.directory, args.name, force=args.force)
    except (ConfigurationError, OSError) as exc:
        print(f"lightning-secagg keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"public key file: {public}")
    print(f"secret key file: {secret} (keep it private)")
    print(f"public key: {KeyPair.load(secret).public}")
    return 0


def _tree(args: argparse.Namespace) -> int:
    from lightning_secagg.planner import plan

    try:
        preview = plan(
            args.target_size,
            args.group_size,
            args.num_actors,
            seed=args.seed,
            params=args.params,
            dtype=args.dtype,
            ring=args.ring,
        )
    except ConfigurationError as exc:
        print(f"lightning-secagg tree: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(preview.to_dict(), indent=2))
    else:
        print(preview.format(show_peers=args.per_peer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs' CLI reference)."""
    parser = argparse.ArgumentParser(
        prog="lightning-secagg",
        description="Secure aggregation for decentralized collaborative learning.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sched = sub.add_parser("scheduler", help="run the peer discovery and round scheduler")
    sched.add_argument("--port", type=int, default=5555, help="TCP port (0: any free port)")
    sched.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    sched.add_argument("--target-size", type=int, default=6, help="peers per round")
    sched.add_argument("--group-size", type=int, default=3, help="participants per tree group")
    sched.add_argument("--num-actors", type=int, default=2, help="aggregation actors per group")
    sched.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="seconds before an unfinished round is aborted (default: derived per round "
        "from the model's size and the tree's depth)",
    )
    sched.add_argument(
        "--min-size",
        type=int,
        default=None,
        help="smallest round: after --queue-wait seconds a round of at least this many live "
        "peers forms (default: --target-size, full rounds only)",
    )
    sched.add_argument(
        "--queue-wait",
        type=float,
        default=10.0,
        help="seconds the oldest queued peer waits for a full round before a round of "
        "--min-size or more forms",
    )
    sched.add_argument(
        "--liveness-timeout",
        type=float,
        default=10.0,
        help="seconds of silence after which a queued peer is dropped and a member's round "
        "aborted (0 disables)",
    )
    sched.add_argument(
        "--key-file",
        default=None,
        help="the scheduler's .key_secret file (from `lightning-secagg keygen`); "
        "a fresh key pair is made when omitted",
    )
    sched.add_argument(
        "--insecure", action="store_true", help="plaintext, unauthenticated links (debugging only)"
    )
    sched.add_argument(
        "--allow-keys",
        metavar="FILE",
        default=None,
        help="admission control: only the public keys listed in FILE (one 'name public-key' "
        "per line, # comments) may sign up; FILE is re-read when it changes. Without it "
        "anyone with a key can join (logged every round)",
    )
    sched.add_argument(
        "--max-ids-per-key",
        type=int,
        default=1,
        help="queued peer ids one key may hold at once (default 1)",
    )
    sched.add_argument(
        "--max-elements",
        type=int,
        default=DEFAULT_MAX_ELEMENTS,
        help="largest model accepted at sign-up, in elements (default 2**34)",
    )
    sched.add_argument(
        "--schema-fingerprint",
        metavar="HEX",
        default=None,
        help="pin the model: accept only sign-ups whose schema has this fingerprint (the 16 "
        "hex digits peers log); without it every schema is queued with its own kind",
    )
    sched.set_defaults(func=_scheduler)
    keygen = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret)")
    keygen.add_argument("name", nargs="?", default="scheduler", help="file name stem")
    keygen.add_argument("--directory", "-d", default=".", help="where to write the files")
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace existing key files (atomically; never through a symlink). Without it "
        "an existing file or symlink is refused",
    )
    keygen.set_defaults(func=_keygen)
    tree = sub.add_parser(
        "tree",
        help="preview the aggregation tree, its privacy threshold and the bytes per peer",
        description="Print the tree the scheduler would build for these parameters (from a "
        "seeded shuffle; the scheduler itself uses a CSPRNG), its depth, the collusion needed "
        "to expose a peer, the ring the round would use, and the bytes each role sends and "
        "receives per round, computed by simulating the round with the real protocol code.",
    )
    tree.add_argument("--target-size", type=int, default=6, help="peers per round")
    tree.add_argument("--group-size", type=int, default=3, help="participants per tree group")
    tree.add_argument("--num-actors", type=int, default=2, help="aggregation actors per group")
    tree.add_argument(
        "--seed", type=int, default=0, help="seed of the preview's shuffle (reproducible output)"
    )
    tree.add_argument("--params", type=int, default=1_200_000, help="model elements (e.g. 1200000)")
    tree.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's dtype")
    tree.add_argument(
        "--ring",
        default="auto",
        choices=list(RINGS),
        help="the peers' ring setting, as Peer(ring=...): auto (default) gives the 32-bit ring "
        "(4-byte shares) when the scheduler would pick it, assuming every peer declares "
        "magnitudes it accepts (no float64 tensors, at most 64 peers); 64 keeps 8-byte shares",
    )
    tree.add_argument("--per-peer", action="store_true", help="also list every peer's bytes")
    tree.add_argument("--json", action="store_true", help="machine-readable output")
    tree.set_defaults(func=_tree)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
