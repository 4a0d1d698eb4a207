"""Issue 19, scheduler side, against live processes: the CLI scheduler survives the
overflow attack, admits only its roster's keys (re-read live) with one queued id per
key, and a squatter with another schema cannot keep honest peers out of a round."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq

from lightning_secagg import KeyPair, Peer, Scheduler, SchemaMismatchError
from lightning_secagg.codec import encode
from lightning_secagg.encoding import Schema
from lightning_secagg.messages import Heartbeat, Leave, Signup
from lightning_secagg.security import make_curve_client, write_key_files
from tests.integration._procs import free_port, read_line_matching, start_scheduler, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SMALL = [["w", [4], "float32"]]
#: Finding 1 of issue 19: 27 dimensions of 2**39 overflowed the deadline computation.
HUGE = [["w", [2**39] * 27, "float32"]]


class Client:
    """One CURVE client of the scheduler with its own key, as any outsider can make."""

    def __init__(self, ctx: zmq.Context, address: str, server_key: str) -> None:
        self.keys = KeyPair.generate()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        make_curve_client(self.sock, self.keys, server_key)
        self.sock.connect(address)

    def signup(self, pid: str, schema: list[Any] = SMALL, session: str = "s") -> None:
        msg = Signup(session, pid, "tcp://127.0.0.1:1", self.keys.public, 1.0, 32, schema)
        self.sock.send_multipart(encode(msg))

    def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.sock.poll(int(timeout * 1000)), "the scheduler did not answer"
        return msgpack.unpackb(self.sock.recv_multipart()[0])

    def ask(self, pid: str, schema: list[Any] = SMALL, session: str = "s") -> dict[str, Any]:
        self.signup(pid, schema, session)
        return self.reply()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_overflow_attack_is_refused_and_the_cli_scheduler_keeps_serving(ctx):
    """Six sign-ups whose schema has 27 dimensions of 2**39 elements used to end the
    CLI scheduler's I/O thread (OverflowError in the deadline). Now each is refused at
    sign-up, naming the problem, and a normal sign-up is answered at once."""
    proc, address, key = start_scheduler("--port", str(free_port()))  # CLI defaults
    try:
        assert key is not None
        attackers = [Client(ctx, address, key) for _ in range(6)]
        for i, a in enumerate(attackers):
            a.signup(f"a{i}", HUGE)
        replies = [a.reply() for a in attackers]
        assert [r["code"] for r in replies] == ["schema_too_large"] * 6, replies
        assert all("more than 17179869184 elements" in r["reason"] for r in replies)
        probe = Client(ctx, address, key)
        assert probe.ask("probe")["t"] == "signup_ok"
        probe.sock.send_multipart(encode(Leave("s", "probe")))
        assert proc.poll() is None
    finally:
        stop_all([proc])


def test_a_handler_exception_drops_one_message_and_the_thread_goes_on(ctx, monkeypatch, caplog):
    """Whatever a handler raises, the I/O thread logs one bounded line and serves on."""
    with Scheduler(port=0, target_size=6) as sched:
        real = sched.state.receive

        def explode(conn, message, key=None):
            if getattr(message, "peer_id", "") == "boom":
                raise OverflowError("int too large\nCRITICAL forged line")
            return real(conn, message, key)

        monkeypatch.setattr(sched.state, "receive", explode)
        client = Client(ctx, sched.address, sched.public_key)
        with caplog.at_level(logging.ERROR, logger="lightning_secagg.scheduler"):
            for _ in range(3):
                client.signup("boom")
            assert client.ask("fine")["t"] == "signup_ok"
        assert sched._thread is not None and sched._thread.is_alive()
        lines = [r.getMessage() for r in caplog.records if "failed to handle" in r.getMessage()]
        assert len(lines) == 3 and all("\n" not in line for line in lines)
        assert "OverflowError" in lines[0] and "int too large\\nCRITICAL" in lines[0]


def write_roster(path: Path, entries: dict[str, str], comment: str = "") -> None:
    lines = [f"# roster {comment}", ""] + [f"{n} {k}  # party {n}" for n, k in entries.items()]
    path.write_text("\n".join(lines) + "\n")


def test_roster_admits_only_its_keys_one_id_each_and_is_reread_live(ctx, tmp_path):
    """Admission control on the CLI scheduler: a foreign key is refused (its fingerprint
    logged, never the key), five sybil ids of one admitted key get one place, and a key
    added to the file is admitted without a restart."""
    roster = tmp_path / "roster.txt"
    port = free_port()
    admitted: list[Client] = []
    proc = None
    try:
        # The clients' keys go into the roster before the scheduler starts.
        _, key_file = write_key_files(tmp_path, "sched")
        server = KeyPair.load(key_file)
        address = f"tcp://127.0.0.1:{port}"
        admitted = [Client(ctx, address, server.public) for _ in range(2)]
        foreign = Client(ctx, address, server.public)
        write_roster(roster, {"alice": admitted[0].keys.public, "bob": admitted[1].keys.public})
        proc, _, _ = start_scheduler(
            "--port", str(port), "--key-file", str(key_file), "--allow-keys", str(roster)
        )
        refused = foreign.ask("mallory")
        assert refused["code"] == "not_admitted"
        assert foreign.keys.public not in refused["reason"]
        line = read_line_matching(proc, "not on the roster", 10)
        assert foreign.keys.public not in line
        # Sybils: five ids under alice's key; one is queued, four refused.
        replies = [admitted[0].ask(f"sybil{i}") for i in range(5)]
        assert [r["t"] for r in replies] == ["signup_ok"] + ["signup_rejected"] * 4
        assert [r["code"] for r in replies[1:]] == ["key_quota"] * 4
        assert admitted[1].ask("bob")["t"] == "signup_ok"
        # The roster grows: mallory's key is admitted within a few seconds, no restart.
        write_roster(
            roster,
            {
                "alice": admitted[0].keys.public,
                "bob": admitted[1].keys.public,
                "mallory": foreign.keys.public,
            },
            "v2",
        )
        read_line_matching(proc, "re-read: 3 keys", 10)
        assert foreign.ask("mallory")["t"] == "signup_ok"
        assert proc.poll() is None
    finally:
        if proc is not None:
            stop_all([proc])


def model(width: int = 16, value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((width,), value)}


def test_a_squatter_with_another_schema_cannot_keep_honest_peers_out(ctx):
    """Finding 3: a squatter signs up first with another schema and keeps heartbeating;
    three honest peers still form their round and get their average."""
    with Scheduler(port=0, target_size=3, liveness_timeout=10.0) as sched:
        squatter = Client(ctx, sched.address, sched.public_key)
        odd = Schema.of(model(width=17)).to_wire()
        assert squatter.ask("squat", odd, session="default")["t"] == "signup_ok"
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(0.5):
                squatter.sock.send_multipart(encode(Heartbeat("default", "squat", None)))

        beating = threading.Thread(target=heartbeat, daemon=True)
        beating.start()
        results: list[Any] = [None] * 3

        def honest(i: int) -> None:
            try:
                with Peer(
                    "tcp://127.0.0.1:0",
                    sched.address,
                    peer_id=f"h{i}",
                    scheduler_key=sched.public_key,
                ) as p:
                    results[i] = p.aggregate(model(value=float(i)), timeout=30)
            except Exception as exc:  # collected for the assertions
                results[i] = exc

        threads = [threading.Thread(target=honest, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        beating.join(5)
        assert not any(t.is_alive() for t in threads)
        assert all(isinstance(r, dict) for r in results), results
        assert all(torch.equal(r["w"], torch.full((16,), 1.0)) for r in results)
        assert sched.state.queued("default") == 1  # the squatter still waits, alone


def test_a_pinned_schema_refuses_others_with_schema_mismatch():
    pin = Schema.of(model()).fingerprint()
    with (
        Scheduler(port=0, target_size=3, schema_fingerprint=pin) as s,
        Peer("tcp://127.0.0.1:0", s.address, peer_id="odd", scheduler_key=s.public_key) as p,
        pytest.raises(SchemaMismatchError, match="accepts only models with schema"),
    ):
        p.aggregate(model(width=17), timeout=10)


def test_a_failing_timer_neither_ends_the_thread_nor_spins(ctx, monkeypatch, caplog):
    """Should the state's timer code raise (a bug), the thread keeps serving sign-ups and
    retries its timers at a bounded rate instead of spinning."""
    with Scheduler(port=0, target_size=6) as sched:
        calls = {"n": 0}

        def broken() -> float:
            calls["n"] += 1
            raise RuntimeError("timer bug")

        with caplog.at_level(logging.ERROR, logger="lightning_secagg.scheduler"):
            monkeypatch.setattr(sched.state, "next_deadline", broken)
            client = Client(ctx, sched.address, sched.public_key)
            assert client.ask("one")["t"] == "signup_ok"  # wakes the loop: timers fail
            started = time.monotonic()
            time.sleep(1.5)
            assert client.ask("two", session="t")["t"] == "signup_rejected"  # key quota
            elapsed = time.monotonic() - started
        assert sched._thread is not None and sched._thread.is_alive()
        assert calls["n"] <= 2 * (elapsed + 2) + 4  # about once a second, not a spin
