"""Peers on distinct hosts: every process in a network namespace of its own.

The hosts come from :mod:`benchmarks.netns` (one namespace per host on one
bridge, addresses in 198.18.0.0/15, each link capped both ways; the
scheduler's host uncapped). Every peer binds the wildcard address and
advertises its host's address, as a peer behind NAT or in a container must: a
round can only complete if the others dial the advertised addresses.

Skipped, with the reason, where namespaces cannot be made (not root, no
iproute2, no ``CAP_NET_ADMIN``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
import torch

from benchmarks.netns import BENCH_NET, PREFIX, Network, remove_stale, unavailable_reason
from tests.integration._callback_helpers import PEER_SCRIPT as CALLBACK_PEER
from tests.integration._callback_helpers import child_env, load_before, load_final
from tests.integration._peer_worker import make_state
from tests.integration._procs import read_line_matching

pytestmark = pytest.mark.integration

PEER_WORKER = Path(__file__).with_name("_peer_worker.py")
SCHED_PORT, PEER_PORT = 5555, 6000
RATE = "100mbit"


@pytest.fixture(scope="module")
def netns_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")


@pytest.fixture
def net(netns_available: None) -> Iterator[Network]:
    """A scheduler host (uncapped) and three peer hosts capped at 100 Mbit/s both ways."""
    with Network(["sched", "h0", "h1", "h2"], RATE, uncapped=["sched"]) as network:
        yield network


def start_scheduler(net: Network) -> tuple[str, str]:
    """The scheduler CLI on the ``sched`` host; its address and public key."""
    host = net.hosts["sched"]
    proc = net.popen(
        "sched",
        [
            sys.executable, "-m", "lightning_secagg", "scheduler",
            "--host", host.address, "--port", str(SCHED_PORT),
            "--target-size", "3", "--group-size", "3", "--num-actors", "2",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
    )  # fmt: skip
    key_line = read_line_matching(proc, "public key:", 60)  # type: ignore[arg-type]
    read_line_matching(proc, "listening on", 60)  # type: ignore[arg-type]
    return host.endpoint(SCHED_PORT), key_line.split("public key: ")[1].split()[0]


def wait_peers(net: Network, procs: list, logs: list[Path], timeout: float) -> None:
    """Wait for every process (one shared deadline); fail with their logs."""

    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc in procs:
        net.stop(proc)
    text = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    assert codes == [0] * len(procs), text


@pytest.mark.timeout(180)
def test_peers_on_distinct_hosts_bind_wildcard_and_advertise(net: Network, tmp_path: Path) -> None:
    scheduler, key = start_scheduler(net)
    procs, logs, outs = [], [], []
    for i in range(3):
        host = net.hosts[f"h{i}"]
        out, log = tmp_path / f"peer{i}.json", tmp_path / f"peer{i}.log"
        procs.append(
            net.popen(
                f"h{i}",
                [
                    sys.executable,
                    str(PEER_WORKER),
                    "--index",
                    str(i),
                    "--rounds",
                    "2",
                    "--scheduler",
                    scheduler,
                    f"--scheduler-key={key}",
                    "--bind",
                    f"tcp://0.0.0.0:{PEER_PORT}",
                    "--advertise",
                    host.endpoint(PEER_PORT),
                    "--out",
                    str(out),
                ],
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        )
        logs.append(log)
        outs.append(out)
    wait_peers(net, procs, logs, timeout=150)
    records = [json.loads(out.read_text()) for out in outs]
    # Every peer announced its own host's address, not the wildcard it bound.
    assert [r[0]["endpoint"] for r in records] == [
        net.hosts[f"h{i}"].endpoint(PEER_PORT) for i in range(3)
    ]
    for r in range(2):
        assert len({rec[r]["digest"] for rec in records}) == 1  # bitwise the same result
        assert all(rec[r]["stats"]["num_peers"] == 3 for rec in records)
        states = [make_state(i, 1.0 + r) for i in range(3)]
        for name in ("conv.weight", "bn.running_mean", "scalar"):
            expected = sum(s[name].double() for s in states) / 3
            got = torch.tensor(records[0][r]["values"][name], dtype=torch.float64)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(300)
def test_two_machine_recipe_trainers_on_separate_hosts(net: Network, tmp_path: Path) -> None:
    """docs/quickstart.md's recipe: Lightning Trainers with the callback, each on its
    own host, binding ``0.0.0.0`` and advertising their host's address."""
    scheduler, key = start_scheduler(net)
    procs, logs, outs = [], [], []
    for i in range(3):
        host = net.hosts[f"h{i}"]
        out, log = tmp_path / f"trainer{i}", tmp_path / f"trainer{i}.log"
        out.mkdir()
        procs.append(
            net.popen(
                f"h{i}",
                [
                    sys.executable,
                    str(CALLBACK_PEER),
                    "--index",
                    str(i),
                    "--max-epochs",
                    "2",
                    "--scheduler",
                    scheduler,
                    f"--scheduler-key={key}",
                    "--address",
                    f"tcp://0.0.0.0:{PEER_PORT}",
                    "--advertise",
                    host.endpoint(PEER_PORT),
                    "--out",
                    str(out),
                ],
                stdin=subprocess.PIPE,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        )
        logs.append(log)
        outs.append(out)
    wait_peers(net, procs, logs, timeout=270)
    assert [(o / "endpoint.txt").read_text() for o in outs] == [
        net.hosts[f"h{i}"].endpoint(PEER_PORT) for i in range(3)
    ]
    finals = [load_final(o) for o in outs]
    befores = [load_before(o) for o in outs]
    for name, tensor in finals[0].items():
        assert all(torch.equal(f[name], tensor) for f in finals[1:]), name
        expected = sum(b[name].double() for b in befores) / 3
        torch.testing.assert_close(tensor.double(), expected, atol=1e-5, rtol=1e-5)


# -- the harness itself -----------------------------------------------------------------


def _ours() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith(PREFIX)}


@pytest.mark.timeout(60)
def test_network_is_removed_on_an_exception_and_its_processes_ended(netns_available) -> None:
    before = _ours()
    with pytest.raises(KeyboardInterrupt), Network(2, RATE) as network:
        created = {h.netns for h in network.hosts.values()} | {f"{network.run_id}-br"}
        assert created <= _ours()
        assert all(ip_address(h.address) in BENCH_NET for h in network.hosts.values())
        sleeper = network.popen("h0", [sys.executable, "-c", "import time; time.sleep(60)"])
        raise KeyboardInterrupt
    assert sleeper.poll() is not None  # ended by its PID
    assert _ours() == before


@pytest.mark.timeout(60)
def test_stale_namespaces_of_dead_runs_are_removed(netns_available) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-abcdef-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Network(1) as network:
            assert stale not in _ours()
            # A live run's namespaces are never touched by another's cleanup.
            assert remove_stale() == []
            assert f"{network.run_id}-h0" in _ours()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)


@pytest.mark.timeout(60)
def test_caps_hold_both_ways(netns_available) -> None:
    """25 MB each way through a 100 Mbit/s cap take about 2 s; uncapped, far less."""
    server = (
        "import socket,time\n"
        "s=socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen(); c,_=s.accept(); n=0\n"
        "t=time.monotonic()\n"
        "while (b := c.recv(1 << 20)): n += len(b)\n"
        "print(n * 8 / (time.monotonic() - t) / 1e6)\n"
    )
    client = (
        "import socket,sys,time\n"
        "for _ in range(200):\n"
        "    try: c = socket.create_connection((sys.argv[1], 7000)); break\n"
        "    except OSError: time.sleep(0.05)\n"
        "c.sendall(b'x' * 25_000_000); c.close()\n"
    )
    with Network(["a", "b", "free"], RATE, uncapped=["free"]) as network:
        for src, dst in (("a", "free"), ("free", "b")):  # a's upload, then b's download
            srv = network.popen(dst, [sys.executable, "-c", server], stdout=subprocess.PIPE)
            cli = network.popen(src, [sys.executable, "-c", client, network.hosts[dst].address])
            out, _ = srv.communicate(timeout=30)
            assert cli.wait(timeout=30) == 0
            mbit = float(out)
            assert 60 < mbit < 110, f"{src} -> {dst}: {mbit:.0f} Mbit/s"
