"""Hostile input against LIVE processes: the scheduler CLI and six honest peer processes.

Every test attacks the running cluster, then runs a round and checks that every
process is still alive, that nothing was executed (an armed pickle never fired),
and that the round's result is bitwise identical on every peer *and* to the
clean baseline round (the inputs never change, and ring sums are exact, so any
accepted forgery, duplicate or lost share would change the digest).

Attack channels:

* plaintext ZeroMQ and raw TCP: the handshake must never complete;
* CurveZMQ with the attacker's own key pair: the handshake completes (checked
  with a socket monitor), every message must then be dropped by validation;
* a registered peer (a member of *another* round) sending shares that carry
  the right round id, level, group and a real member's name while that member
  is deliberately slow: dropped, because its CURVE key is not the member's;
* replay of the recorded TCP byte stream of a real CURVE connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
import zmq.utils.monitor

from lightning_secagg import KeyPair, Peer
from lightning_secagg.codec import MAX_HEADER_BYTES, MAX_PEER_HEADER_BYTES, decode, encode
from lightning_secagg.encoding import Schema
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import (
    PEER_TO_PEER,
    Abort,
    Done,
    Leave,
    Message,
    Partial,
    Result,
    Share,
    Signup,
)
from lightning_secagg.security import make_curve_client
from tests.integration._peer_worker import make_state
from tests.integration._procs import REPO, _lines, free_port, python_env, start_scheduler, stop_all
from tests.integration._reference import assert_matches_reference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

WORKER = Path(__file__).with_name("_hostile_peer_worker.py")
N_PEERS = 6
PEER_MAX_MESSAGE = 1 << 16  # the workers' inbox limit (their model needs ~9 KiB)
SCHEMA = Schema.of(make_state(0))
VECTOR_SIZE = SCHEMA.vector_size
POISON = 0x4141414141414141


class _Armed:
    """Unpickling this opens (creates) ``path``: proof that someone ran our code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


# -- the cluster -------------------------------------------------------------


def next_event(proc: subprocess.Popen[str], tags: tuple[str, ...], timeout: float) -> dict:
    """The next stdout line of ``proc`` starting with one of ``tags`` (bounded wait)."""
    lines = _lines(proc)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise AssertionError(f"process {proc.pid} exited (rc={proc.poll()})")
        tag, _, rest = line.partition(" ")
        if tag in tags:
            event = json.loads(rest)
            event["tag"] = tag
            return event
    raise AssertionError(f"no {tags} line from process {proc.pid} within {timeout}s")


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[str]
    log: Path
    peer_id: str = ""
    endpoint: str = ""
    key: str = ""
    bind_port: int = 0

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()


class RecordingProxy:
    """A TCP relay in front of one peer's inbox that records what clients send.

    The peer advertises the proxy's port, so other members connect through it;
    the recordings are real CurveZMQ byte streams for the replay test.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.streams: list[bytearray] = []
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            record = bytearray()
            self.streams.append(record)
            self._socks += [client, server]
            for src, dst, rec in ((client, server, record), (server, client, None)):
                threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        src.settimeout(None)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@dataclass
class Cluster:
    scheduler: subprocess.Popen[str]
    address: str
    key: str
    workers: list[Worker]
    proxy: RecordingProxy
    marker: Path
    baseline: dict = field(default_factory=dict)
    member_streams: list[bytearray] = field(default_factory=list)
    scheduler_log: list[str] = field(default_factory=list)

    @property
    def procs(self) -> list[subprocess.Popen[str]]:
        return [self.scheduler, *(w.proc for w in self.workers)]

    def round(
        self,
        during: Callable[[], None] | None = None,
        stall: float = 0.0,
        on_assigned: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """One round: all but the last peer wait in ``aggregate()`` while ``during``
        attacks; then the last one signs up and the round forms."""
        *first, last = self.workers
        for w in first:
            w.send(f"stall {stall}" if stall and w.index == 0 else "go")
        time.sleep(0.3)  # their sign-ups reach the scheduler; they now answer ZAP
        if during is not None:
            during()
        last.send("go")
        if on_assigned is not None:
            on_assigned(next_event(self.workers[1].proc, ("ASSIGNED",), 30))
        results = [next_event(w.proc, ("RESULT", "FAILED"), 60) for w in self.workers]
        failed = [r for r in results if r["tag"] == "FAILED"]
        assert not failed, failed
        return results

    def check(self, results: list[dict]) -> None:
        """Alive, nothing executed, and bitwise identical to the clean baseline round."""
        assert all(p.poll() is None for p in self.procs), "a process died"
        assert not self.marker.exists(), "a pickle was executed"
        assert len({r["round_id"] for r in results}) == 1, "peers were in different rounds"
        digests = {r["digest"] for r in results}
        assert digests == {self.baseline["digest"]}, "result differs from the clean round"

    def dropped(self, needle: str) -> int:
        """How many times the peers logged ``needle`` (each dropped message logs once)."""
        return sum(w.log.read_text().count(needle) for w in self.workers)

    def scheduler_dropped(self) -> int:
        """How many messages the scheduler has logged as dropped so far."""
        lines = _lines(self.scheduler)
        with contextlib.suppress(queue.Empty):
            while (line := lines.get_nowait()) is not None:
                self.scheduler_log.append(line)
        return sum("scheduler dropped a message" in line for line in self.scheduler_log)

    def wait_for_drops(self, needle: str, count: int, timeout: float = 15.0) -> None:
        """Bounded wait until the peers have logged ``count`` drops."""
        deadline = time.monotonic() + timeout
        while self.dropped(needle) < count:
            assert time.monotonic() < deadline, f"only {self.dropped(needle)}/{count} {needle!r}"
            time.sleep(0.05)


def assert_exact(values: dict[str, list]) -> None:
    """The decoded result equals the weighted mean up to fixed point and dtype rounding."""
    assert_matches_reference(values, N_PEERS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("hostile")
    sched, address, key = start_scheduler(
        "--port", str(free_port()), "--target-size", str(N_PEERS), "--round-timeout", "60"
    )
    assert key is not None
    procs = [sched]
    proxy = None
    try:
        peer0_port = free_port()
        proxy = RecordingProxy(peer0_port)
        workers = []
        for i in range(N_PEERS):
            log = tmp / f"peer{i}.log"
            extra = []
            if i == 0:
                extra = ["--port", str(peer0_port), "--advertise", f"tcp://127.0.0.1:{proxy.port}"]
            with log.open("w") as err:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER),
                        "--scheduler",
                        address,
                        f"--scheduler-key={key}",  # a Z85 key may start with "-"
                        "--index",
                        str(i),
                        "--weight",
                        str(i + 1),
                        "--max-message-bytes",
                        str(PEER_MAX_MESSAGE),
                        *extra,
                    ],
                    cwd=REPO,
                    env={**python_env(), "PYTHONPATH": str(REPO)},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            procs.append(proc)
            workers.append(Worker(i, proc, log, bind_port=peer0_port if i == 0 else 0))
        for w in workers:
            ready = next_event(w.proc, ("READY",), 60)
            w.peer_id, w.endpoint, w.key = ready["peer_id"], ready["endpoint"], ready["key"]
        c = Cluster(sched, address, key, workers, proxy, tmp / "PWNED")
        results = c.round()  # the clean baseline
        assert len({r["digest"] for r in results}) == 1
        assert_exact(results[0]["values"])
        c.baseline = results[0]
        c.member_streams = list(proxy.streams)  # real members' CURVE connections to peer0
        yield c
    finally:
        for p in procs[1:]:
            with contextlib.suppress(OSError):
                if p.stdin is not None:
                    p.stdin.close()  # EOF: the workers leave their loop
        stop_all(procs)
        if proxy is not None:
            proxy.close()


# -- the attacker's tools ------------------------------------------------------


class Attacker:
    """ZeroMQ sockets an attacker controls; every one monitored, closed with linger 0."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.keys = KeyPair.generate()

    def connect(
        self,
        kind: int,
        endpoint: str,
        server_key: str | None,
        keys: KeyPair | None = None,
    ) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndtimeo = 2000
        sock.sndhwm = 100_000
        if server_key is not None:
            make_curve_client(sock, keys or self.keys, server_key)
        monitor = sock.get_monitor_socket()
        self.sockets += [sock, monitor]
        sock.connect(endpoint)
        return sock, monitor

    def secure(self, kind: int, endpoint: str, server_key: str, **kw: Any) -> zmq.Socket:
        """A CURVE connection with our own key: the handshake must succeed."""
        sock, monitor = self.connect(kind, endpoint, server_key, **kw)
        seen = watch(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 10)
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in seen, f"no CURVE handshake with {endpoint}"
        return sock

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        self.ctx.term()


def watch(monitor: zmq.Socket, stop_on: set[int], timeout: float) -> set[int]:
    """Monitor events until one of ``stop_on`` or ``timeout`` seconds."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not monitor.poll(int(left * 1000) + 1):
            break
        event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
        seen.add(event)
        if event in stop_on:
            break
    return seen


def send_all(sock: zmq.Socket, messages: list[list[Any]], block: bool = True) -> int:
    """Send each message (blocking at most ``sndtimeo`` each, or not at all); count them."""
    sent = 0
    for frames in messages:
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK)
            sent += 1
    return sent


def pickles(marker: Path) -> list[bytes]:
    return [
        pickle.dumps(_Armed(str(marker)), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)
    ]


def junk(marker: Path, for_scheduler: bool) -> list[list[Any]]:
    """Malformed, mistyped, executable and ext-typed messages (each a list of frames)."""
    rng = np.random.default_rng(7)  # junk bytes, not secrets
    valid_share = encode(Share("r0", 0, 0, "peer1", None, np.zeros(VECTOR_SIZE, np.uint64)))
    header = msgpack.unpackb(valid_share[0])
    evil = pickles(marker)

    def hdr(**changes: Any) -> bytes:
        return msgpack.packb({**header, **changes}, use_bin_type=True)

    out: list[list[Any]] = [[rng.bytes(n)] for n in (1, 7, 64, 4096)]
    out += [[rng.bytes(16), rng.bytes(8 * VECTOR_SIZE)], [b""], [b"", b""], [b"\xc1"]]
    out += [[valid_share[0][:k]] for k in (1, 5, len(valid_share[0]) - 1)]  # truncated
    out += [[valid_share[0], bytes(8 * VECTOR_SIZE - 3)]]  # payload not whole items
    out += [[valid_share[0], bytes(8 * VECTOR_SIZE), b"extra"]]  # too many frames
    out += [[hdr(v=v)] for v in (0, 2, "1", None, 1.0, True)]  # wrong versions
    out += [[hdr(t=t)] for t in ("pickle", 5, None, "assignment", "signup_ok", "SHARE")]
    out += [
        [hdr(level="0")],
        [hdr(group=-1)],
        [hdr(level=10**6)],
        [hdr(sender="peer 1")],
        [hdr(seed=bytes(33))],
        [hdr(seed=evil[-1])],  # a pickle where a 32-byte seed belongs
        [hdr(extra=1)],
        [hdr(round_id="x" * 129)],
        [msgpack.packb([1, "share"])],
        [msgpack.packb({1: 2})],
        [b"\xdf\xff\xff\xff\xff"],  # map32 announcing 4 billion entries
        [b"\xdd\xff\xff\xff\xff"],  # array32 likewise
        [b"\xdb\xff\xff\xff\xff" + b"a" * 10],  # str32 likewise
        [b"\x91" * 4000 + b"\xc0"],  # nested deeper than the unpacker allows
        [msgpack.packb({**header, "seed": msgpack.ExtType(1, bytes(32))})],
        [b"\xd7\xff" + bytes(8)],  # a timestamp (ext type -1)
        [msgpack.packb({**header, "sender": msgpack.ExtType(42, b"peer1")})],
    ]
    out += [[p] for p in evil]  # a pickle as the header
    out += [[valid_share[0], p] for p in evil]  # a pickle as the payload
    if for_scheduler:
        key = KeyPair.generate().public  # not the key of the connection
        signup = Signup("hostile", "mallory", "tcp://127.0.0.1:1", key, 1.0, 32, [["w", [1], "x"]])
        out += [
            encode(signup),
            encode(Done("0" * 16, "peer0", 1.0, 1, 1)),
            encode(Abort("0" * 16, "peer0", "x")),
            encode(Leave("default", "peer0")),  # not the connection peer0 signed up on
            valid_share,
        ]
    return out


def raw_tcp(endpoint: str, data: bytes, timeout: float = 3.0) -> bool:
    """Send raw bytes; True when the server closes the connection within ``timeout``."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                if not s.recv(65536):
                    return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
    return False


def greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting (64 bytes) offering ``mechanism``."""
    return b"\xff" + bytes(8) + b"\x7f\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + bytes(31)


# -- the tests -----------------------------------------------------------------


def test_armed_pickle_would_fire(tmp_path):
    """Positive control: the pickle payloads really run code when unpickled."""
    control = tmp_path / "control"
    for payload in pickles(control):
        with contextlib.suppress(Exception):
            pickle.loads(payload)  # noqa: S301 - the point of the control
        assert control.exists()
        control.unlink()


def test_plaintext_and_raw_tcp_never_complete_a_handshake(cluster):
    """No CURVE, no conversation: plaintext ZeroMQ and raw TCP junk, at every process."""
    targets = [cluster.address, *(w.endpoint for w in cluster.workers)]
    seen_per_target: list[set[int]] = []

    def attack() -> None:
        attacker = Attacker()
        try:
            monitors = []
            for endpoint in targets:
                kind = zmq.DEALER if endpoint == cluster.address else zmq.PUSH
                sock, monitor = attacker.connect(kind, endpoint, None)
                frames = junk(cluster.marker, endpoint == cluster.address)
                valid = encode(Share("r0", 0, 0, "peer1", bytes(32)))
                send_all(sock, [*frames, *[valid] * 300], block=False)
                monitors.append(monitor)
            for monitor in monitors:
                seen_per_target.append(
                    watch(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED}, 5)
                )
        finally:
            attacker.close()
        rng = np.random.default_rng(1)
        for endpoint in targets:
            for data in (
                rng.bytes(256),  # not ZMTP at all (taken for ZMTP 1.0, refused)
                b"\xff" + rng.bytes(200),  # a signature, then garbage
                greeting(b"NULL") + rng.bytes(64),  # plaintext mechanism
                greeting(b"PLAIN") + b"\x04\x26\x05HELLO\x05admin\x05admin" + bytes(16),
                greeting(b"CURVE") + b"\x04\xc8" + rng.bytes(200),  # HELLO of garbage
                greeting(b"NULL") + b"\x06" + b"\x7f" * 8,  # a frame of ~2**63 bytes
            ):
                assert raw_tcp(endpoint, data), f"{endpoint} kept a bogus connection open"
            # A truncated greeting: the process just waits; we hang up.
            raw_tcp(endpoint, b"\xff\x00\x00", timeout=0.2)

    cluster.check(cluster.round(during=attack))
    for endpoint, seen in zip(targets, seen_per_target, strict=True):
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen, endpoint
        assert seen & {
            zmq.EVENT_DISCONNECTED,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        }, endpoint


def malformed(frames: list[Any], allowed: tuple[type[Message], ...]) -> bool:
    """Whether the codec refuses ``frames`` (what the receiver logs as malformed)."""
    try:
        decode(
            frames, MAX_PEER_HEADER_BYTES if allowed == PEER_TO_PEER else MAX_HEADER_BYTES, allowed
        )
    except RemoteProtocolError:
        return True
    return False


def test_outsider_with_own_curve_key_is_heard_and_dropped(cluster):
    """Junk, pickles, ext types, wrong versions/types, duplicates and floods over a valid
    CURVE handshake with the attacker's own key: every message is read and dropped,
    nothing is executed, and the scheduler keeps answering at once."""
    needle = "dropped a malformed message"
    peer_junk = junk(cluster.marker, for_scheduler=False)
    sched_junk = junk(cluster.marker, for_scheduler=True) * 3
    expected = sum(malformed(f, PEER_TO_PEER) for f in peer_junk)
    # Nearly all of it is refused by the codec itself. Payload bytes are opaque to the
    # codec (their width depends on the round's ring): a pickle as a payload, or a
    # payload of the wrong size, passes it and is dropped by the round (or waits, inert,
    # among the early messages of a round that never comes).
    opaque_payloads = len(pickles(cluster.marker)) + 1
    assert expected >= len(peer_junk) - 3 - opaque_payloads
    waiting = cluster.workers[:-1]  # inside aggregate(): they answer the handshake now
    before, sched_before = cluster.dropped(needle), cluster.scheduler_dropped()

    def attack() -> None:
        attacker = Attacker()
        try:
            for w in waiting:
                sock = attacker.secure(zmq.PUSH, w.endpoint, w.key)
                assert send_all(sock, peer_junk) == len(peer_junk)
                # duplicates: a flood of one well-formed share of an unknown round
                flood = encode(Share("f" * 16, 0, 0, "peer1", bytes(32)))
                assert send_all(sock, [flood] * 300) == 300
            cluster.wait_for_drops(needle, before + expected * len(waiting))
            sched = attacker.secure(zmq.DEALER, cluster.address, cluster.key)
            assert send_all(sched, sched_junk) == len(sched_junk)
            # Answered in order on this connection, so all the junk was handled first.
            hello = Signup(
                "probe",
                "probe",
                "tcp://127.0.0.1:1",
                attacker.keys.public,
                1.0,
                32,
                SCHEMA.to_wire(),
            )
            sched.send_multipart(encode(hello))
            replies = []
            deadline = time.monotonic() + 15
            while not any(r["t"] == "signup_ok" for r in replies):
                assert sched.poll(max(1, int((deadline - time.monotonic()) * 1000))), replies
                replies.append(msgpack.unpackb(sched.recv_multipart()[0]))
            assert [r["code"] for r in replies if r["t"] == "signup_rejected"] == ["bad_key"] * 3
            sched.send_multipart(encode(Leave("probe", "probe")))
        finally:
            attacker.close()

    cluster.check(cluster.round(during=attack))
    assert cluster.dropped(needle) - before == expected * len(waiting)
    # Everything but the three bad-key sign-ups (answered with a rejection) was dropped.
    assert cluster.scheduler_dropped() - sched_before >= len(sched_junk) - 3


def test_oversized_frames_are_cut_by_maxmsgsize(cluster):
    """A frame over the inbox limit closes the connection before it is buffered;
    a frame just under it is read and dropped as malformed (the positive control)."""
    outcomes: dict[str, set[int]] = {}

    def attack() -> None:
        attacker = Attacker()
        try:
            w = cluster.workers[1]
            for label, size in (("under", PEER_MAX_MESSAGE - 200), ("over", PEER_MAX_MESSAGE + 1)):
                sock, monitor = attacker.connect(zmq.PUSH, w.endpoint, w.key)
                assert zmq.EVENT_HANDSHAKE_SUCCEEDED in watch(
                    monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 10
                )
                sock.send(bytes(size))
                outcomes[label] = watch(monitor, {zmq.EVENT_DISCONNECTED}, 3)
            sock, monitor = attacker.connect(zmq.DEALER, cluster.address, cluster.key)
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED in watch(
                monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 10
            )
            sock.send(bytes(MAX_HEADER_BYTES + 1))
            outcomes["scheduler"] = watch(monitor, {zmq.EVENT_DISCONNECTED}, 10)
        finally:
            attacker.close()

    cluster.check(cluster.round(during=attack))
    assert zmq.EVENT_DISCONNECTED not in outcomes["under"]
    assert zmq.EVENT_DISCONNECTED in outcomes["over"]
    assert zmq.EVENT_DISCONNECTED in outcomes["scheduler"]


def forgeries(info: dict, exclude: str) -> list[tuple[str, list[Any]]]:
    """Well-formed round traffic for the current round, in real members' names."""
    out: list[tuple[str, list[Any]]] = []
    poison = np.full(VECTOR_SIZE, POISON, dtype=np.uint64)
    result = np.full(SCHEMA.result_nbytes, 0x41, dtype=np.uint8)
    rid = info["round_id"]
    levels = info["tree"]
    for li, level in enumerate(levels):
        for gi, (participants, actors) in enumerate(level):
            for actor in actors:
                for p in participants:
                    if actor in (p, exclude):
                        continue
                    out.append((actor, encode(Share(rid, li, gi, p, None, poison))))
                    out.append((actor, encode(Share(rid, li, gi, p, os.urandom(32)))))
            for p in participants:
                if p != exclude:
                    out += [(p, encode(Result(rid, a, result))) for a in actors if a != p]
    root_actors = levels[-1][0][1]
    for a in root_actors:
        for b in root_actors:
            if a != b and a != exclude:
                out.append((a, encode(Partial(rid, b, poison))))
    return out


def test_registered_non_member_cannot_deliver_shares(cluster):
    """Members of another round (registered with the scheduler, keys known to it) and an
    outsider send this round's shares, partials and results in real members' names while
    peer0 is held back: every forgery arrives and is dropped, the result stays exact."""
    others = [KeyPair.generate() for _ in range(N_PEERS)]
    peers = [
        Peer(
            "tcp://127.0.0.1:0",
            cluster.address,
            session="other",
            peer_id=f"other{i}",
            scheduler_key=cluster.key,
            keys=k,
        )
        for i, k in enumerate(others)
    ]
    results: list[Any] = [None] * len(peers)

    def other_round(i: int) -> None:
        with peers[i]:
            results[i] = peers[i].aggregate({"w": torch.ones(4)}, timeout=30)

    threads = [threading.Thread(target=other_round, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert all(isinstance(r, dict) for r in results), "the other session's round failed"

    endpoints = {w.peer_id: w for w in cluster.workers}
    needle = "is not that member's"
    before = cluster.dropped(needle)
    sent = {"n": 0, "late": False}
    stall = 6.0  # ample time to forge on a loaded machine

    def forge(info: dict) -> None:
        started = time.monotonic()
        attacker = Attacker()
        try:
            plan = forgeries(info, exclude="peer0")  # peer0 sleeps and cannot handshake now
            for keys in [*others, attacker.keys]:
                socks = {
                    pid: attacker.secure(zmq.PUSH, w.endpoint, w.key, keys=keys)
                    for pid, w in endpoints.items()
                    if pid != "peer0"
                }
                for target, frames in plan:
                    socks[target].send_multipart(frames)
                    sent["n"] += 1
            # Every forgery is read (and refused) while peer0 still holds its shares back.
            cluster.wait_for_drops(needle, before + sent["n"], timeout=stall - 1.0)
        finally:
            attacker.close()
        sent["late"] = time.monotonic() - started > stall - 0.5

    cluster.check(cluster.round(stall=stall, on_assigned=forge))
    assert not sent["late"], "forgeries took too long; they may have lost the race"
    assert sent["n"] > 0
    assert cluster.dropped(needle) - before == sent["n"]


def test_replayed_curve_stream_is_refused(cluster):
    """The recorded bytes of a real member's CURVE connection to peer0, replayed on a
    fresh TCP connection: the server's cookie is per connection, so the replayed
    INITIATE fails and the connection is closed before any message is delivered."""
    streams = [bytes(s) for s in cluster.member_streams if len(s) > 200]
    assert streams, "no member connection to peer0 was recorded"
    direct = f"tcp://127.0.0.1:{cluster.workers[0].bind_port}"
    closed: list[bool] = []

    def attack() -> None:
        for data in streams:
            closed.extend(raw_tcp(direct, data) for _ in range(2))

    before = cluster.dropped("peer0 dropped")
    cluster.check(cluster.round(during=attack))
    assert all(closed), "a replayed stream kept its connection"
    assert cluster.dropped("peer0 dropped") == before, "a replayed message reached peer0"
