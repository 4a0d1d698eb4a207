"""The ``lightning-secagg`` command line.

``main(argv) -> int`` so tests call it in-process; logging is configured here
and nowhere else in the library.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from lightning_secagg.errors import ConfigurationError
from lightning_secagg.scheduler import Scheduler


def _scheduler(args: argparse.Namespace) -> int:
    try:
        scheduler = Scheduler(
            port=args.port,
            target_size=args.target_size,
            group_size=args.group_size,
            num_actors=args.num_actors,
            host=args.host,
            round_timeout=args.round_timeout,
        ).start()
    except ConfigurationError as exc:
        print(f"lightning-secagg scheduler: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
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
        default=300.0,
        help="seconds before an unfinished round is aborted",
    )
    sched.set_defaults(func=_scheduler)
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
