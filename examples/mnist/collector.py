"""The benchmark collector: peers report their rounds; it averages, logs, summarises, plots.

Wire format: plain ZeroMQ PUSH -> PULL, one msgpack map per message (never
pickle). Every message carries ``v`` (1), ``type`` and ``peer`` (int); a message
that is too large, not msgpack, or not one of these shapes is counted and
dropped:

* ``{"type": "round", "peer", "epoch", "seconds", "round_seconds", "bytes_sent",
  "bytes_received", "num_peers", "acc_before", "acc_after"}`` (accuracies are
  fractions, or ``None`` when not measured; ``epoch`` counts from 1)
* ``{"type": "milestone", "peer", "milestone", "epoch"}``
* ``{"type": "data", "peer", "description"}``
* ``{"type": "finished", "peer", "ok"}``

Like the original benchmark server it keeps running averages (aggregation time
``time-only`` and the epoch at which each ``achieved-<m>`` milestone was first
reached) and appends them to the log file. At the end it prints a summary
table and saves a PNG plot.

Run standalone: ``python examples/mnist/collector.py --port 5556 --log-file log.txt``.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import statistics
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

log = logging.getLogger("mnist.collector")

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
_NUMBER = (int, float)


def parse_milestones(text: str) -> list[float]:
    """``"0.9, 0.95"`` -> ``[0.9, 0.95]`` (fractions in (0, 1])."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        value = float(part)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"milestones are accuracies in (0, 1], got {value}")
        values.append(value)
    return sorted(set(values))


def _is_number(value: Any, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def validate(message: Any) -> dict[str, Any]:
    """Check a decoded report; returns it or raises ``ValueError`` saying what is wrong."""
    if not isinstance(message, dict):
        raise ValueError(f"a report must be a map, got {type(message).__name__}")
    if message.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"unsupported version {message.get('v')!r}")
    kind, peer = message.get("type"), message.get("peer")
    if not isinstance(peer, int) or isinstance(peer, bool) or peer < 0:
        raise ValueError(f"'peer' must be an int >= 0, got {peer!r}")
    if kind == "round":
        if not isinstance(message.get("epoch"), int) or message["epoch"] < 1:
            raise ValueError("round: 'epoch' must be an int >= 1")
        for key in ("seconds", "round_seconds", "bytes_sent", "bytes_received", "num_peers"):
            if not _is_number(message.get(key)):
                raise ValueError(f"round: {key!r} must be a finite number")
        for key in ("acc_before", "acc_after"):
            if not _is_number(message.get(key), allow_none=True):
                raise ValueError(f"round: {key!r} must be a number or None")
        retries = message.get("retries", 0)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError("round: 'retries' must be an int >= 0")
        if not isinstance(message.get("digest", ""), str):
            raise ValueError("round: 'digest' must be a string")
    elif kind == "milestone":
        if not _is_number(message.get("milestone")) or not isinstance(message.get("epoch"), int):
            raise ValueError("milestone: needs a number 'milestone' and an int 'epoch'")
    elif kind == "data":
        if not isinstance(message.get("description"), str):
            raise ValueError("data: 'description' must be a string")
    elif kind == "finished":
        if not isinstance(message.get("ok"), bool):
            raise ValueError("finished: 'ok' must be a bool")
    else:
        raise ValueError(f"unknown report type {kind!r}")
    return message


class Reporter:
    """What a peer uses to send reports (a ZeroMQ PUSH socket; sends never block training)."""

    def __init__(self, address: str, peer: int) -> None:
        self.peer = peer
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.PUSH)
        self._socket.linger = 2000  # let the last reports leave at close
        self._socket.sndhwm = 10_000
        self._socket.connect(address)

    def send(self, kind: str, **fields: Any) -> None:
        payload = {"v": PROTOCOL_VERSION, "type": kind, "peer": self.peer, **fields}
        validate(payload)
        try:
            self._socket.send(msgpack.packb(payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("benchmark collector unreachable; dropped a %r report", kind)

    def close(self) -> None:
        self._socket.close()
        self._ctx.term()


class Collector:
    """Receives reports on ``tcp://host:port`` in a background thread.

    Args:
        port: TCP port to listen on (0: any free port, see :attr:`address`).
        log_file: File the running averages are appended to (``None``: don't).
        host: Interface to bind.
        echo: Where the running-average lines go (``print`` by default).
    """

    def __init__(
        self,
        port: int = 5556,
        log_file: str | Path | None = "log.txt",
        host: str = "127.0.0.1",
        echo: Callable[[str], None] = print,
    ) -> None:
        self.log_file = Path(log_file) if log_file else None
        self.echo = echo
        self.rounds: list[dict[str, Any]] = []
        self.milestones: list[dict[str, Any]] = []
        self.data: dict[int, str] = {}
        self.finished: dict[int, bool] = {}
        self.dropped = 0
        self.running_values: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.linger = 0
        self._socket.maxmsgsize = MAX_MESSAGE_BYTES
        self._socket.bind(f"tcp://{host}:{port}")
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_addr = f"inproc://collector-wake-{id(self)}"
        self._wake = self._ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        self._thread = threading.Thread(target=self._serve, name="collector", daemon=True)
        self._started = False

    def start(self) -> Collector:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Drain what already arrived, stop the thread and close the sockets (idempotent)."""
        if self._ctx.closed:
            return
        if self._started:
            poke = self._ctx.socket(zmq.PAIR)
            poke.linger = 0
            poke.connect(self._wake_addr)
            poke.send(b"stop")
            self._thread.join(timeout)
            poke.close()
        self._socket.close(linger=0)
        self._wake.close(linger=0)
        self._ctx.term()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._socket in events:
                self._receive_pending()
            if self._wake in events:
                self._receive_pending()  # drain before leaving
                return

    def _receive_pending(self) -> None:
        while True:
            try:
                raw = self._socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = validate(msgpack.unpackb(raw, raw=False, strict_map_key=True))
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
                self.dropped += 1
                log.warning("dropped a malformed report: %s: %s", type(exc).__name__, exc)
                continue
            self.handle(message)

    # -------------------------------------------------------------- bookkeeping
    def _running_average(self, key: str, value: float) -> None:
        values = self.running_values[key]
        values.append(value)
        line = f"Running average for '{key}' after {len(values)} times: {statistics.fmean(values)}"
        self.echo(line)
        if self.log_file is not None:
            with self.log_file.open("a") as handle:
                print(line, file=handle)

    def handle(self, message: dict[str, Any]) -> None:
        """Record one validated report."""
        with self._lock:
            kind = message["type"]
            if kind == "round":
                self.rounds.append(message)
                self._running_average("time-only", float(message["seconds"]))
            elif kind == "milestone":
                self.milestones.append(message)
                self._running_average(f"achieved-{message['milestone']}", float(message["epoch"]))
            elif kind == "data":
                self.data[message["peer"]] = message["description"]
            elif kind == "finished":
                self.finished[message["peer"]] = message["ok"]

    # -------------------------------------------------------------- the end
    def per_epoch(self) -> list[dict[str, Any]]:
        """One row per epoch: accuracies before/after averaging and round times."""
        with self._lock:
            rounds = list(self.rounds)
        by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for report in rounds:
            by_epoch[report["epoch"]].append(report)
        rows = []
        for epoch in sorted(by_epoch):
            reports = by_epoch[epoch]
            seconds = sorted(r["seconds"] for r in reports)
            before = [r["acc_before"] for r in reports if r["acc_before"] is not None]
            after = [r["acc_after"] for r in reports if r["acc_after"] is not None]
            rows.append(
                {
                    "epoch": epoch,
                    "peers": len(reports),
                    "acc_before_mean": statistics.fmean(before) if before else None,
                    "acc_before_min": min(before) if before else None,
                    "acc_before_max": max(before) if before else None,
                    "acc_after_min": min(after) if after else None,
                    "acc_after_max": max(after) if after else None,
                    "seconds_median": statistics.median(seconds),
                    "seconds_min": seconds[0],
                    "seconds_max": seconds[-1],
                    "seconds_iqr": _iqr(seconds),
                    "retries": max(r.get("retries", 0) for r in reports),
                    "digests": sorted({r["digest"] for r in reports if r.get("digest")}),
                }
            )
        return rows

    def summary(self) -> str:
        """The table printed at the end of a run."""
        rows = self.per_epoch()
        lines = []
        if self.data:
            for description in sorted(set(self.data.values())):
                lines.append(f"Data: {description}")
        header = (
            f"{'epoch':>5} {'peers':>5} {'acc before (mean, min-max)':>28}"
            f" {'acc after (min-max)':>21} {'round s median':>14} {'IQR':>7} {'min-max':>15}"
        )
        lines += [header, "-" * len(header)]
        for row in rows:
            if row["acc_before_mean"] is None:
                before = "-"
            else:
                before = (
                    f"{100 * row['acc_before_mean']:.2f}%"
                    f" ({100 * row['acc_before_min']:.2f}-{100 * row['acc_before_max']:.2f})"
                )
            if row["acc_after_min"] is None:
                after = "-"
            elif row["acc_after_min"] == row["acc_after_max"]:
                after = f"{100 * row['acc_after_min']:.2f}% (all)"
            else:
                after = f"{100 * row['acc_after_min']:.2f}-{100 * row['acc_after_max']:.2f}%"
            spread = f"{row['seconds_min']:.3f}-{row['seconds_max']:.3f}"
            lines.append(
                f"{row['epoch']:>5} {row['peers']:>5} {before:>28} {after:>21}"
                f" {row['seconds_median']:>14.3f} {row['seconds_iqr']:>7.3f} {spread:>15}"
            )
        with self._lock:
            milestones = list(self.milestones)
        if milestones:
            lines.append("")
            lines.append("Milestones (epoch at which each peer first reached the accuracy):")
            grouped: dict[float, list[int]] = defaultdict(list)
            for report in milestones:
                grouped[report["milestone"]].append(report["epoch"])
            for milestone in sorted(grouped):
                epochs = grouped[milestone]
                lines.append(
                    f"  {100 * milestone:.1f}%: reached by {len(epochs)} peer(s),"
                    f" mean epoch {statistics.fmean(epochs):.2f}"
                )
        if rows and rows[-1]["acc_after_min"] is not None:
            last = rows[-1]
            same = (
                "identical on all" if last["acc_after_min"] == last["acc_after_max"] else "differs"
            )
            lines.append("")
            lines.append(
                f"Final averaged test accuracy: {100 * last['acc_after_min']:.2f}%"
                f" ({same} {last['peers']} peers, epoch {last['epoch']})"
            )
        if rows:
            retried = [f"epoch {r['epoch']} ({r['retries']} retry)" for r in rows if r["retries"]]
            lines.append("")
            lines.append(
                "Retried rounds: "
                + (", ".join(retried) if retried else "none")
                + " (a failed round is retried with the peers still alive)"
            )
            digests = rows[-1]["digests"]
            if digests:
                verdict = (
                    f"identical on all {rows[-1]['peers']} peers (sha256 {digests[0][:16]})"
                    if len(digests) == 1
                    else f"DIFFER between peers ({len(digests)} distinct)"
                )
                lines.append(f"Weights after the last round: {verdict}")
        if self.dropped:
            lines.append(f"({self.dropped} malformed report(s) dropped)")
        return "\n".join(lines)

    def final_digests(self) -> list[str]:
        """The distinct weight digests the peers reported after the last round."""
        rows = self.per_epoch()
        return rows[-1]["digests"] if rows else []

    def final_accuracies(self) -> list[float]:
        """The post-averaging accuracies the peers reported for the last epoch."""
        rows = self.per_epoch()
        if not rows:
            return []
        last = rows[-1]["epoch"]
        with self._lock:
            return [
                r["acc_after"]
                for r in self.rounds
                if r["epoch"] == last and r["acc_after"] is not None
            ]

    def plot(self, path: str | Path) -> Path | None:
        """Save accuracy and round time per epoch as a PNG; ``None`` without matplotlib/data."""
        rows = self.per_epoch()
        if not rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed; no plot saved")
            return None
        epochs = [row["epoch"] for row in rows]
        fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
        if any(row["acc_after_min"] is not None for row in rows):
            after = [_pct(row["acc_after_min"]) for row in rows]
            acc_ax.plot(epochs, after, marker="o", label="after averaging (all peers)")
        if any(row["acc_before_mean"] is not None for row in rows):
            before = [_pct(row["acc_before_mean"]) for row in rows]
            low = [b - _pct(row["acc_before_min"]) for b, row in zip(before, rows, strict=True)]
            high = [_pct(row["acc_before_max"]) - b for b, row in zip(before, rows, strict=True)]
            acc_ax.errorbar(
                epochs,
                before,
                yerr=[low, high],
                marker="s",
                capsize=3,
                label="before (mean, min-max)",
            )
        acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Accuracy")
        acc_ax.grid(alpha=0.3)
        if acc_ax.lines or acc_ax.containers:
            acc_ax.legend()
        median = [row["seconds_median"] for row in rows]
        time_ax.errorbar(
            epochs,
            median,
            yerr=[
                [m - row["seconds_min"] for m, row in zip(median, rows, strict=True)],
                [row["seconds_max"] - m for m, row in zip(median, rows, strict=True)],
            ],
            marker="o",
            capsize=3,
        )
        time_ax.set(
            xlabel="epoch", ylabel="seconds", title="Aggregation round time (median, min-max)"
        )
        time_ax.grid(alpha=0.3)
        for ax in (acc_ax, time_ax):  # epochs are whole numbers, also for a 1-epoch run
            ax.set_xticks(epochs)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _pct(value: float | None) -> float:
    return float("nan") if value is None else 100 * value


def _iqr(sorted_values: list[float]) -> float:
    if len(sorted_values) < 2:
        return 0.0
    quartiles = statistics.quantiles(sorted_values, n=4, method="inclusive")
    return quartiles[2] - quartiles[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark collector of the MNIST example")
    parser.add_argument("--port", type=int, default=5556, help="port to listen on (default: 5556)")
    parser.add_argument("--log-file", default="log.txt", help="running averages (default: log.txt)")
    parser.add_argument("--plot", default=None, help="PNG written at the end (default: none)")
    args = parser.parse_args(argv)
    collector = Collector(args.port, args.log_file).start()
    print(f"collector listening on {collector.address}; Ctrl-C prints the summary", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    collector.stop()
    print(collector.summary())
    if args.plot:
        print(f"plot saved to {collector.plot(args.plot)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
