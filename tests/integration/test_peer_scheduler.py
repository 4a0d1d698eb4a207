"""Scheduler and peers in one process (threads), over real loopback sockets."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable

import pytest
import torch
import zmq

from lightning_secagg import (
    ConfigurationError,
    EncodingError,
    KeyPair,
    Peer,
    RoundTimeoutError,
    Scheduler,
)
from lightning_secagg.cli import main
from lightning_secagg.codec import encode
from lightning_secagg.messages import Share
from tests.integration._procs import read_line_matching, start_scheduler, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def model(i: int, width: int = 16) -> dict[str, torch.Tensor]:
    return {"w": torch.full((width,), float(i)), "b": torch.tensor([float(i), -float(i)])}


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Bounded wait for a condition another thread makes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def run_peers(
    scheduler: Scheduler,
    jobs: list[Callable[[Peer], object]],
    **peer_kwargs: object,
) -> list[object]:
    """Run one job per peer in its own thread; return results or raised exceptions."""
    results: list[object] = [None] * len(jobs)

    def work(i: int) -> None:
        kwargs = {"scheduler_key": scheduler.public_key, **peer_kwargs}
        if scheduler.insecure:
            kwargs = {"insecure": True, **peer_kwargs}
        try:
            with Peer("tcp://127.0.0.1:0", scheduler.address, peer_id=f"p{i}", **kwargs) as p:
                results[i] = jobs[i](p)
        except Exception as exc:  # collected for the test to inspect
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a peer thread hung"
    return results


def test_extra_peers_wait_for_the_next_round():
    with Scheduler(port=0, target_size=3) as sched:
        results = run_peers(
            sched, [lambda p, i=i: p.aggregate(model(i), timeout=30) for i in range(6)]
        )
        # A peer has its average before the scheduler has read its report of the round:
        # wait (bounded) for the scheduler to count both rounds before it stops.
        wait_until(lambda: sched.state.completed_rounds == 2, 10)
    assert all(isinstance(r, dict) for r in results), results
    means = sorted(float(r["w"][0]) for r in results)
    # Two rounds of three: each round's mean is the mean of its own members.
    assert sum(means) == pytest.approx(sum(range(6)))


def test_another_schema_waits_apart_instead_of_being_refused():
    """Queues are keyed by (session, schema): the odd peer neither gets the first one
    refused nor is refused itself; each waits for peers of its own kind (here: none)."""
    with Scheduler(port=0, target_size=3) as sched:

        def good(p: Peer) -> object:
            return p.aggregate(model(0), timeout=3)

        def odd(p: Peer) -> object:
            wait_until(lambda: sched.state.queued("default") == 1, 5)
            return p.aggregate(model(1, width=17), timeout=3)

        results = run_peers(sched, [good, odd])
    assert isinstance(results[1], RoundTimeoutError), results
    assert isinstance(results[0], RoundTimeoutError), results


def test_timeout_names_what_was_missing():
    with Scheduler(port=0, target_size=3) as sched:
        results = run_peers(sched, [lambda p: p.aggregate(model(0), timeout=0.5)])
        # The peer's Leave travels asynchronously: wait (bounded) for the scheduler to see it.
        wait_until(lambda: sched.state.queued("default") == 0, 5)
    assert isinstance(results[0], RoundTimeoutError)
    assert isinstance(results[0], TimeoutError)
    assert "round assignment" in str(results[0])


def test_nan_and_overflow_are_refused_before_anything_is_sent():
    with Scheduler(port=0, target_size=3) as sched:
        bad = {"w": torch.tensor([1.0, float("nan")])}
        huge = {"w": torch.tensor([2.0**31])}
        results = run_peers(sched, [lambda p: p.aggregate(bad), lambda p: p.aggregate(huge)])
        assert sched.state.queued("default") == 0
    assert isinstance(results[0], EncodingError) and "nan" in str(results[0])
    assert isinstance(results[1], EncodingError) and "overflow" in str(results[1])


def test_secure_by_default_and_insecure_is_explicit():
    with pytest.raises(ConfigurationError, match="scheduler_key is required"):
        Peer("tcp://127.0.0.1:0", "tcp://127.0.0.1:5555")
    with Scheduler(port=0, target_size=3, insecure=True) as sched:
        assert sched.public_key is None
        results = run_peers(
            sched, [lambda p, i=i: p.aggregate(model(i), timeout=30) for i in range(3)]
        )
    assert all(isinstance(r, dict) for r in results), results


def test_peer_with_the_wrong_scheduler_key_times_out_clearly():
    with Scheduler(port=0, target_size=3) as sched:
        wrong = KeyPair.generate().public
        results = run_peers(
            sched, [lambda p: p.aggregate(model(0), timeout=1.0)], scheduler_key=wrong
        )
        assert sched.state.queued("default") == 0
    assert isinstance(results[0], RoundTimeoutError)
    assert "key" in str(results[0])


def test_forged_share_from_outsider_is_dropped_and_round_stays_exact(caplog):
    """An attacker who knows a peer's endpoint connects with its own CURVE key and
    sends a share claiming to come from a member: the peer drops it (wrong key)."""
    caplog.set_level(logging.WARNING, logger="lightning_secagg")
    with Scheduler(port=0, target_size=3) as sched:
        endpoints: dict[int, str] = {}
        keys: dict[int, str] = {}
        ready = threading.Barrier(4)

        def job(i: int) -> Callable[[Peer], object]:
            def run(p: Peer) -> object:
                endpoints[i] = p.endpoint
                keys[i] = p.public_key
                ready.wait(10)
                return p.aggregate(model(i), timeout=30)

            return run

        def attack() -> None:
            ready.wait(10)
            ctx = zmq.Context()
            try:
                for i in range(3):
                    s = ctx.socket(zmq.PUSH)
                    s.linger = 0
                    attacker = KeyPair.generate()
                    s.curve_secretkey = attacker.secret.encode()
                    s.curve_publickey = attacker.public.encode()
                    s.curve_serverkey = keys[i].encode()
                    s.connect(endpoints[i])
                    for level in range(3):
                        forged = Share("unknown", level, 0, f"p{(i + 1) % 3}", bytes(32))
                        s.send_multipart(encode(forged))
                    s.close(linger=1000)
            finally:
                ctx.term()

        attacker = threading.Thread(target=attack)
        attacker.start()
        results = run_peers(sched, [job(i) for i in range(3)])
        attacker.join(10)
    assert all(isinstance(r, dict) for r in results), results
    for r in results:
        assert torch.equal(r["w"], torch.full((16,), 1.0))


def test_plaintext_client_cannot_talk_to_a_secure_peer():
    with Scheduler(port=0, target_size=3) as sched:
        endpoint = {}
        started = threading.Event()

        def job(p: Peer) -> object:
            endpoint["e"] = p.endpoint
            started.set()
            return p.aggregate(model(0), timeout=1.5)

        def attack() -> None:
            started.wait(10)
            ctx = zmq.Context()
            s = ctx.socket(zmq.PUSH)
            s.linger = 0
            s.connect(endpoint["e"])
            with contextlib.suppress(zmq.Again):  # the handshake never completes
                s.send_multipart(encode(Share("r", 0, 0, "p1", bytes(32))), flags=zmq.NOBLOCK)
            s.close(linger=0)
            ctx.term()

        t = threading.Thread(target=attack)
        t.start()
        results = run_peers(sched, [job])
        t.join(10)
    assert isinstance(results[0], RoundTimeoutError)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_stops_cleanly_on_signals(sig):
    proc, address, key = start_scheduler("--port", "0", "--target-size", "3")
    try:
        assert address.startswith("tcp://127.0.0.1:")
        assert key is not None and len(key) == 40
        proc.send_signal(sig)
        read_line_matching(proc, "scheduler stopped", 10)
        assert proc.wait(timeout=10) == 0
    finally:
        stop_all([proc])


def test_cli_rejects_bad_tree_parameters(capsys):
    assert main(["scheduler", "--port", "0", "--num-actors", "3", "--group-size", "3"]) == 2
    assert "num_actors must be < group_size" in capsys.readouterr().err


def test_cli_keygen_writes_a_key_pair_the_scheduler_loads(tmp_path, capsys):
    assert main(["keygen", "sched", "--directory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    keys = KeyPair.load(tmp_path / "sched.key_secret")
    assert keys.public in out and keys.secret not in out
    assert (tmp_path / "sched.key_secret").stat().st_mode & 0o077 == 0
    with Scheduler(port=0, target_size=3, keys=keys) as sched:
        assert sched.public_key == keys.public
        results = run_peers(
            sched,
            [lambda p, i=i: p.aggregate(model(i), timeout=30) for i in range(3)],
            scheduler_key=str(tmp_path / "sched.key"),
        )
    assert all(isinstance(r, dict) for r in results), results


def test_port_in_use_is_a_clear_error():
    with Scheduler(port=0, target_size=3) as sched:
        port = int(sched.address.rsplit(":", 1)[1])
        with pytest.raises(ConfigurationError, match="cannot listen"):
            Scheduler(port=port, target_size=3).start()
        with pytest.raises(ConfigurationError, match="cannot listen"):
            Peer(f"tcp://127.0.0.1:{port}", sched.address, scheduler_key=sched.public_key).start()


def batchnorm_model(i: int) -> dict[str, torch.Tensor]:
    """A real BatchNorm model (float32 weights, int64 num_batches_tracked) plus
    float16, bfloat16 and float64 extras: the mixed dtypes users' models have."""
    torch.manual_seed(i)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net(torch.randn(8, 4))  # running statistics and num_batches_tracked move
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sd["half"] = torch.randn(5).half()
    sd["brain"] = torch.randn(2, 3).bfloat16()
    sd["double"] = torch.randn(7, dtype=torch.float64)
    return sd


@pytest.mark.parametrize("secure", [True, False], ids=["sealed", "insecure"])
def test_what_aggregate_returns_can_be_saved_and_each_tensor_owns_its_memory(tmp_path, secure):
    """``torch.save(peer.aggregate(sd))`` works for a mixed-dtype model, and no returned
    tensor shares (or keeps alive) another's storage."""
    with Scheduler(port=0, target_size=3, insecure=not secure) as sched:
        results = run_peers(
            sched, [lambda p, i=i: p.aggregate(batchnorm_model(i), timeout=30) for i in range(3)]
        )
    assert all(isinstance(r, dict) for r in results), results
    for i, result in enumerate(results):
        path = tmp_path / f"avg{i}.pt"
        torch.save(result, path)
        loaded = torch.load(path)
        assert list(loaded) == list(batchnorm_model(0))
        for name, tensor in result.items():
            assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
            storage = tensor.untyped_storage()
            assert storage.nbytes() == tensor.numel() * tensor.element_size(), name
        pointers = [t.untyped_storage().data_ptr() for t in result.values() if t.numel()]
        assert len(set(pointers)) == len(pointers)
    assert all(torch.equal(results[0][k], r[k]) for r in results[1:] for k in r)
