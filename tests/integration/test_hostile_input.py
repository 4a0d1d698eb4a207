"""Hostile input against LIVE processes: the scheduler CLI and six honest peer processes.

Every test attacks the running cluster, then runs a round and checks that every
process is still alive, that nothing was executed (an armed pickle never fired),
and that the round's result is bitwise identical on every peer *and* to the
clean baseline round (the inputs never change, and ring sums are exact, so any
accepted forgery, duplicate or lost share would change the digest).

The two kinds of link are attacked differently, because they are secured
differently:

* the scheduler is a CurveZMQ server: a plaintext ZeroMQ or raw TCP client must
  never complete a handshake with it, and a client with its own CURVE key gets
  every message read and dropped;
* a peer's inbox is a plain ZeroMQ socket (NULL mechanism: anybody can connect)
  and round traffic is *sealed* message by message (``lightning_secagg.sealing``):
  a plaintext client completes the handshake by design, so the tests check that
  every message it sends is read and dropped (counted exactly in the peers' logs)
  and that raw TCP that is not valid ZMTP still gets its connection closed.

Attacks: plaintext and raw TCP; junk, pickles, ext types, malformed envelopes and
floods from an outsider; frames over the inbox limit; members of another round
and an outsider sealing this round's shares, partials and results in real
members' names with their own round keys (the authentication fails), and
envelopes naming non-members; real sealed messages recorded on the wire (every
peer's inbox sits behind a recording TCP relay) and replayed within their round
(duplicates), to another member (authentication fails), after their round
(ignored as finished), and into the next round (authentication fails: fresh keys).
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

import lightning_secagg.wire as wire_module
from lightning_secagg import KeyPair, Peer
from lightning_secagg.codec import MAX_HEADER_BYTES, encode
from lightning_secagg.errors import RemoteProtocolError
from lightning_secagg.messages import (
    Abort,
    Done,
    Leave,
    Message,
    Partial,
    Result,
    Share,
    Signup,
)
from lightning_secagg.schema import Schema
from lightning_secagg.sealing import MAX_PARTS, SEAL_VERSION, Envelope, Link, RoundKey
from lightning_secagg.security import make_curve_client
from lightning_secagg.tree import AggregationTree
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

# What the peers log (tests/integration/_hostile_peer_worker.py keeps warnings and the
# one debug line about finished rounds), one line per message read and refused.
MALFORMED = "dropped a malformed message"  # the envelope (or frame 0) is not one
# The claimed sender's key does not open it: the whole line is "dropped a sealed
# message: a message claiming to be from S failed authentication".
SEALED = "failed authentication"
NOT_MEMBER = "not a member of round"  # the envelope names a non-member sender
ITSELF = "itself, in round"  # the envelope names the receiver itself
# The envelope names a member the receiver has no link with (links: tree neighbours only).
NOT_NEIGHBOUR = "not a tree neighbour) in round"
DUPLICATE = "dropped a share: duplicate"  # the round's state machine refuses a repeat
FINISHED = "ignores a message of finished round"  # traffic of a round already over
DROPPED = "dropped a"  # every drop line (all of the above but FINISHED, and more)


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


def wait_until(done: Callable[[], bool], what: Callable[[], str], timeout: float) -> None:
    """Bounded wait for ``done()``; the failure says ``what()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout}s: {what()}"
        time.sleep(0.05)


class RecordingProxy:
    """A TCP relay in front of one peer's inbox that records what clients send.

    The peer advertises the proxy's port, so the other members connect through it
    (and only they: attacks go to the peer's own port); the recordings are the
    real ZMTP streams of members' sealed round traffic, for the replay test.
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
                    record += data  # recorded before it is forwarded
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


def zmtp_messages(stream: bytes) -> list[list[bytes]]:
    """The messages a ZMTP 3 client sent in ``stream`` (its greeting, commands and an
    incomplete tail skipped): frame by frame, as the peer received them."""
    if len(stream) < 64 or stream[0] != 0xFF:
        return []
    pos, out, current = 64, [], []
    while pos + 2 <= len(stream):
        flags = stream[pos]
        if flags & 0x02:  # LONG: an 8-byte size
            if pos + 9 > len(stream):
                break
            size, start = int.from_bytes(stream[pos + 1 : pos + 9], "big"), pos + 9
        else:
            size, start = stream[pos + 1], pos + 2
        if start + size > len(stream):
            break
        body, pos = stream[start : start + size], start + size
        if flags & 0x04:  # a command (READY)
            continue
        current.append(body)
        if not flags & 0x01:  # no MORE: the message is complete
            out.append(current)
            current = []
    return out


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[str]
    log: Path
    proxy: RecordingProxy
    bind_port: int
    peer_id: str = ""
    endpoint: str = ""  # advertised (the proxy): where members connect
    key: str = ""

    @property
    def direct(self) -> str:
        """The inbox itself, past the recording proxy: where attacks go."""
        return f"tcp://127.0.0.1:{self.bind_port}"

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def count(self, needle: str) -> int:
        """How many times this peer logged ``needle``."""
        return self.log.read_text().count(needle)

    def recorded(self, round_id: str) -> list[tuple[Envelope, list[bytes]]]:
        """The sealed messages of ``round_id`` members have sent to this peer so far."""
        out = []
        for stream in list(self.proxy.streams):
            for frames in zmtp_messages(bytes(stream)):
                envelope = Envelope.unpack(frames[0])  # members send nothing else
                if envelope.round_id == round_id:
                    out.append((envelope, frames))
        return out


@dataclass
class Cluster:
    scheduler: subprocess.Popen[str]
    address: str
    key: str
    workers: list[Worker]
    marker: Path
    baseline: dict = field(default_factory=dict)
    scheduler_log: list[str] = field(default_factory=list)

    @property
    def procs(self) -> list[subprocess.Popen[str]]:
        return [self.scheduler, *(w.proc for w in self.workers)]

    def worker(self, peer_id: str) -> Worker:
        return next(w for w in self.workers if w.peer_id == peer_id)

    def round(
        self,
        during: Callable[[], None] | None = None,
        stall: float = 0.0,
        on_assigned: Callable[[dict], None] | None = None,
        stall_index: int = 0,
    ) -> list[dict]:
        """One round: all but the last peer wait in ``aggregate()`` while ``during``
        attacks; then the last one signs up and the round forms. With ``stall``, the
        worker ``stall_index`` sleeps that long after its assignment, before sending
        anything (so nobody can finish the round before it wakes up)."""
        *first, last = self.workers
        assert stall_index != last.index
        for w in first:
            w.send(f"stall {stall}" if stall and w.index == stall_index else "go")
        time.sleep(0.3)  # their sign-ups reach the scheduler; they read their inboxes now
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

    def counts(self, needle: str) -> dict[int, int]:
        """How many times each peer (by index) has logged ``needle`` so far."""
        return {w.index: w.count(needle) for w in self.workers}

    def dropped(self, needle: str) -> int:
        """How many times the peers logged ``needle`` (each dropped message logs once)."""
        return sum(self.counts(needle).values())

    def wait_for_counts(self, needle: str, expected: dict[int, int], timeout: float = 15.0) -> None:
        """Bounded wait until each peer ``i`` in ``expected`` logged ``needle`` that often
        (never more: one too many fails at once)."""

        def done() -> bool:
            now = self.counts(needle)
            assert all(now[i] <= n for i, n in expected.items()), (needle, now, expected)
            return all(now[i] == n for i, n in expected.items())

        wait_until(done, lambda: f"{needle!r}: {self.counts(needle)} != {expected}", timeout)

    def scheduler_dropped(self) -> int:
        """How many messages the scheduler has logged as dropped so far."""
        lines = _lines(self.scheduler)
        with contextlib.suppress(queue.Empty):
            while (line := lines.get_nowait()) is not None:
                self.scheduler_log.append(line)
        return sum("scheduler dropped a message" in line for line in self.scheduler_log)


def plus(before: dict[int, int], added: dict[int, int]) -> dict[int, int]:
    """``before`` with ``added`` on top, for the indices in ``added`` (others: unchanged)."""
    return {i: n + added.get(i, 0) for i, n in before.items()}


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
    proxies: list[RecordingProxy] = []
    try:
        workers = []
        for i in range(N_PEERS):
            port = free_port()
            proxy = RecordingProxy(port)
            proxies.append(proxy)
            log = tmp / f"peer{i}.log"
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
                        "--port",
                        str(port),
                        "--advertise",
                        f"tcp://127.0.0.1:{proxy.port}",
                    ],
                    cwd=REPO,
                    env={**python_env(), "PYTHONPATH": str(REPO)},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            procs.append(proc)
            workers.append(Worker(i, proc, log, proxy, port))
        for w in workers:
            ready = next_event(w.proc, ("READY",), 60)
            w.peer_id, w.endpoint, w.key = ready["peer_id"], ready["endpoint"], ready["key"]
        c = Cluster(sched, address, key, workers, tmp / "PWNED")
        results = c.round()  # the clean baseline
        assert len({r["digest"] for r in results}) == 1
        assert_exact(results[0]["values"])
        c.baseline = results[0]
        assert c.dropped(DROPPED) == 0, "a clean round dropped a message"
        # Members' round traffic went through the recording proxies, sealed.
        assert sum(len(w.recorded(c.baseline["round_id"])) for w in workers) >= N_PEERS
        yield c
    finally:
        for p in procs[1:]:
            with contextlib.suppress(OSError):
                if p.stdin is not None:
                    p.stdin.close()  # EOF: the workers leave their loop
        stop_all(procs)
        for proxy in proxies:
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

    def plain(self, endpoint: str) -> zmq.Socket:
        """A plaintext PUSH to a peer's inbox: the (NULL) handshake succeeds by design."""
        sock, monitor = self.connect(zmq.PUSH, endpoint, None)
        seen = watch(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 10)
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in seen, f"no NULL handshake with {endpoint}"
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


def envelope_junk(marker: Path) -> list[list[Any]]:
    """Messages shaped like sealed ones whose envelope (frame 0) is not a valid one."""
    rid, sender, sealed = "f" * 16, "peer1", bytes(48)  # 48 bytes: a sealed part's size

    def env(*fields: Any) -> list[Any]:
        return [msgpack.packb(list(fields), use_bin_type=True), sealed]

    valid = Envelope(rid, sender, 0, 1).pack()
    v = SEAL_VERSION
    bad_versions = (0, v - 1, v + 1, str(v), None, float(v), True)
    out = [env(bad, rid, sender, 0, 1) for bad in bad_versions]  # versions
    out += [env(v, r, sender, 0, 1) for r in ("x" * 129, "", "a b", None, 7)]  # round ids
    out += [env(v, rid, s, 0, 1) for s in ("peer 1", "", "p/1", ["peer1"])]  # senders
    out += [env(v, rid, sender, q, 1) for q in (-1, 1.5, "0", True, None)]  # sequence numbers
    out += [env(v, rid, sender, 0, n) for n in (0, -1, MAX_PARTS + 1, True, 1.0)]  # part counts
    out += [env(v, rid, sender, 0), env(v, rid, sender, 0, 1, 0), env(), env(v)]  # arity
    out += [
        [msgpack.packb([v, rid.encode(), sender, 0, 1], use_bin_type=True), sealed],  # bin id
        [msgpack.packb([v, rid, msgpack.ExtType(1, b"peer1"), 0, 1]), sealed],  # ext type
        [msgpack.packb({"v": v, "round_id": rid}), sealed],  # a map
        [valid + b"\x00", sealed],  # trailing bytes
        [valid[:-1], sealed],  # truncated
        [msgpack.packb([v, "a" * 600, sender, 0, 1]), sealed],  # over 512 bytes
        [b"\x95\xdd\xff\xff\xff\xff", sealed],  # an array32 inside announcing 4 billion
        [b"\x95" * 4000, sealed],  # nested deeper than the unpacker allows
        [b"\xd7\xff" + bytes(8), sealed],  # a timestamp (ext type -1)
    ]
    out += [[p, sealed] for p in pickles(marker)]  # a pickle as the envelope
    return out


def not_an_envelope(frames: list[Any]) -> bool:
    """Whether the peer refuses frame 0 as an envelope (what it logs as malformed)."""
    try:
        Envelope.unpack(frames[0])
    except RemoteProtocolError:
        return True
    return False


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def closed_within(s: socket.socket, timeout: float) -> bool:
    """True when the other end closes ``s`` within ``timeout`` (whatever it sends first)."""
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


def raw_tcp(endpoint: str, data: bytes, timeout: float = 3.0) -> bool:
    """Send raw bytes; True when the server closes the connection within ``timeout``."""
    with socket.create_connection(host_port(endpoint), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        return closed_within(s, timeout)


def greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting (64 bytes) offering ``mechanism``."""
    return b"\xff" + bytes(8) + b"\x7f\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + bytes(31)


def ready_command(socket_type: bytes) -> bytes:
    """The NULL mechanism's READY command, announcing ``socket_type``."""
    body = b"\x05READY\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
    return b"\x04" + bytes([len(body)]) + body


def null_session(endpoint: str, socket_type: bytes, then: bytes, timeout: float = 3.0) -> bool:
    """A NULL handshake by hand, then ``then``: True when the server closes within ``timeout``.

    Our READY goes out only after the server's greeting and READY have arrived, as
    a real client does (sent at once, the bytes after it would race the server's
    own READY and be refused as a second handshake command, for the wrong reason).
    """
    with socket.create_connection(host_port(endpoint), timeout=timeout) as s:
        s.sendall(greeting(b"NULL"))
        got = b""
        deadline = time.monotonic() + timeout
        while len(got) < 66 or len(got) < 66 + got[65]:  # greeting, then READY's header
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data = s.recv(4096)
            if not data:
                return True  # refused during the handshake
            got += data
        assert got[:1] == b"\xff" and got[64] == 0x04 and got[67:72] == b"READY", got[:80]
        s.sendall(ready_command(socket_type) + then)
        return closed_within(s, max(0.1, deadline - time.monotonic()))


def long_frame(size: int) -> bytes:
    """The header of a ZMTP 3 data frame (LONG flag, 8-byte size) announcing ``size`` bytes."""
    return b"\x02" + size.to_bytes(8, "big")


# An unversioned (ZMTP 1.0) client: an empty identity frame, then one 5-byte message.
# A NULL socket speaks ZMTP 1.0 without any handshake, so the message is delivered.
ZMTP1_MESSAGE = b"\x01\x00" + b"\x06\x00hello"


# -- the tests -----------------------------------------------------------------


def test_armed_pickle_would_fire(tmp_path):
    """Positive control: the pickle payloads really run code when unpickled."""
    control = tmp_path / "control"
    for payload in pickles(control):
        with contextlib.suppress(Exception):
            pickle.loads(payload)  # noqa: S301 - the point of the control
        assert control.exists()
        control.unlink()


def test_plaintext_refused_by_scheduler_and_dropped_by_peers(cluster):
    """The scheduler never completes a non-CURVE handshake (plaintext ZeroMQ, raw TCP).
    A peer's inbox is plain ZeroMQ by design: there the handshake succeeds, and every
    plaintext message (junk, and well-formed codec messages that a peer without sealing
    would have taken) is read and dropped, counted exactly; raw TCP that is not valid
    ZMTP still gets the connection closed, and a frame over the limit too."""
    waiting = cluster.workers[:-1]  # inside aggregate(): they read their inboxes now
    # The last peer is not in aggregate() yet: nothing that would be delivered is sent
    # to it (it would wait in its inbox until the next test's round).
    plaintext = [
        *junk(cluster.marker, for_scheduler=False),
        *[encode(Share("r0", 0, 0, "peer1", bytes(32)))] * 300,
    ]
    assert all(not_an_envelope(m) for m in plaintext)
    # Per waiting peer: the plaintext, ZMTP1_MESSAGE, and the hand-made session's frame.
    expected = plus(cluster.counts(MALFORMED), {w.index: len(plaintext) + 2 for w in waiting})
    others_before = cluster.dropped(DROPPED) - cluster.dropped(MALFORMED)
    sched_seen: set[int] = set()
    peer_seen: dict[int, set[int]] = {}
    rng = np.random.default_rng(1)
    # Not ZMTP at the CURVE scheduler: every one closes the connection.
    sched_cases = [
        rng.bytes(256),  # not ZMTP at all (taken for ZMTP 1.0, refused: CURVE needs 3.0)
        b"\xff" + rng.bytes(200),  # a signature, then garbage
        greeting(b"NULL") + rng.bytes(64),  # plaintext mechanism
        greeting(b"PLAIN") + b"\x04\x26\x05HELLO\x05admin\x05admin" + bytes(16),
        greeting(b"CURVE") + b"\x04\xc8" + rng.bytes(200),  # HELLO of garbage
        greeting(b"NULL") + b"\x06" + b"\x7f" * 8,  # a frame of ~2**63 bytes
    ]
    # Not valid ZMTP (or over the limit) at a NULL peer: every one closes the connection.
    # Random bytes without a ZMTP 3 signature are not among them: a NULL socket takes
    # them for an unversioned (ZMTP 1.0) client, which needs no handshake at all, so
    # they may be read as frames (each delivered one is dropped as malformed: see
    # ZMTP1_MESSAGE) or leave the connection waiting for more bytes; nor is
    # b"\xff" + random bytes (the same, or a ZMTP 2/3 greeting, depending on the bytes).
    peer_cases = [
        greeting(b"PLAIN") + b"\x04\x26\x05HELLO\x05admin\x05admin" + bytes(16),
        greeting(b"CURVE") + b"\x04\xc8" + rng.bytes(200),  # a mechanism it does not speak
        greeting(b"NULL") + b"\x04\x06\x05HELLO",  # a CURVE command where READY belongs
        greeting(b"NULL") + b"\x00\x05hello",  # a message before the handshake
        greeting(b"NULL") + b"\x06" + b"\x7f" * 8,  # a command of ~2**63 bytes
        b"\xff" + (2**63 - 1).to_bytes(8, "big") + b"\x00",  # ZMTP 1.0: a ~2**63-byte frame
    ]

    def attack() -> None:
        attacker = Attacker()
        try:
            sock, monitor = attacker.connect(zmq.DEALER, cluster.address, None)
            frames = junk(cluster.marker, for_scheduler=True)
            send_all(sock, [*frames, *[plaintext[-1]] * 300], block=False)
            sched_seen.update(
                watch(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED}, 5)
            )
            for w in waiting:
                sock, monitor = attacker.connect(zmq.PUSH, w.direct, None)
                peer_seen[w.index] = watch(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 10)
                assert send_all(sock, plaintext) == len(plaintext)
            for w in waiting:
                # Positive controls, each delivering one message: the hand-made NULL
                # session (so the closures below are not a broken handshake) and ZMTP 1.0.
                assert not null_session(w.direct, b"PUSH", b"\x00\x05hello", timeout=0.5)
                assert not raw_tcp(w.direct, ZMTP1_MESSAGE, timeout=0.5)
            # All read and dropped, none more (before closing: linger 0 drops what is queued).
            cluster.wait_for_counts(MALFORMED, expected)
        finally:
            attacker.close()
        for data in sched_cases:
            assert raw_tcp(cluster.address, data), "the scheduler kept a bogus connection open"
        raw_tcp(cluster.address, b"\xff\x00\x00", timeout=0.2)  # truncated greeting: hang up
        for w in cluster.workers:
            for data in peer_cases:
                assert raw_tcp(w.direct, data), f"{w.peer_id} kept {data[:16]!r}... open"
            # A socket type a PULL does not talk to; frames announcing more than the limit.
            assert null_session(w.direct, b"REQ", b""), f"{w.peer_id} took a REQ"
            for size in (PEER_MAX_MESSAGE + 1, 2**63 - 1):
                assert null_session(w.direct, b"PUSH", long_frame(size)), (w.peer_id, size)
            raw_tcp(w.direct, b"\xff\x00\x00", timeout=0.2)  # truncated greeting: hang up

    cluster.check(cluster.round(during=attack))
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in sched_seen
    assert sched_seen & {
        zmq.EVENT_DISCONNECTED,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    }
    assert all(zmq.EVENT_HANDSHAKE_SUCCEEDED in seen for seen in peer_seen.values()), peer_seen
    assert cluster.counts(MALFORMED) == expected
    assert cluster.dropped(DROPPED) - cluster.dropped(MALFORMED) == others_before


def test_outsider_with_own_curve_key_is_heard_and_dropped(cluster):
    """Peers: an outsider connects plainly (no key needed) and sends junk, pickles, ext
    types, wrong versions and types, malformed envelopes and floods of well-formed
    envelopes: each malformed one is dropped (counted exactly), the flood naming a
    finished round is ignored as such (counted exactly), the flood naming an unknown
    round waits, bounded, until the next assignment and goes without a trace, and
    nothing is executed. Scheduler: the same junk over a valid CURVE handshake with the
    attacker's own key is read and dropped, and the scheduler keeps answering at once."""
    peer_junk = junk(cluster.marker, for_scheduler=False)
    bad_envelopes = envelope_junk(cluster.marker)
    sched_junk = junk(cluster.marker, for_scheduler=True) * 3
    # The envelope is all a peer reads before a round's key opens a message: every
    # plaintext codec message (pickles as payloads included) fails there now.
    malformed = [*peer_junk, *bad_envelopes]
    assert all(not_an_envelope(f) for f in malformed)
    finished_round = cluster.baseline["round_id"]
    unknown_flood = [[Envelope("f" * 16, "peer1", 0, 1).pack(), bytes(48)]] * 300
    finished_flood = [[Envelope(finished_round, "peer1", 0, 1).pack(), bytes(48)]] * 300
    sentinel = [b"\xc1"]  # malformed, and last on its connection: read after the rest
    assert not not_an_envelope(unknown_flood[0]) and not_an_envelope(sentinel)
    waiting = cluster.workers[:-1]  # inside aggregate(): they read their inboxes now
    added = {w.index: len(malformed) + 1 for w in waiting}
    expected = plus(cluster.counts(MALFORMED), added)
    expected_finished = plus(cluster.counts(FINISHED), {w.index: 300 for w in waiting})
    dropped_before = cluster.dropped(DROPPED)
    sched_before = cluster.scheduler_dropped()
    started = time.monotonic()

    def attack() -> None:
        attacker = Attacker()
        try:
            for w in waiting:
                sock = attacker.plain(w.direct)
                messages = [*malformed, *unknown_flood, *finished_flood, sentinel]
                assert send_all(sock, messages) == len(messages)
            # One connection is one queue: once the sentinel is dropped, all was read.
            cluster.wait_for_counts(MALFORMED, expected)
            cluster.wait_for_counts(FINISHED, expected_finished)
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
    assert cluster.counts(MALFORMED) == expected
    assert cluster.counts(FINISHED) == expected_finished
    # The unknown round's flood left no line: it was neither dropped nor opened.
    assert cluster.dropped(DROPPED) - dropped_before == sum(added.values())
    # Everything but the three bad-key sign-ups (answered with a rejection) was dropped,
    # and said so in a rate-limited log: a burst of lines, then about one a second, each
    # counting the lines it held back (issue 19), never one line per hostile message.
    logged = cluster.scheduler_dropped() - sched_before
    assert 1 <= logged <= min(len(sched_junk) - 3, 10 + int(time.monotonic() - started) + 1)


def test_oversized_frames_are_cut_by_maxmsgsize(cluster):
    """A frame over the inbox limit (first or later in its message) closes a plain
    connection before it is buffered, and nothing of its message is delivered; a frame
    just under it is read and dropped as malformed (the positive control). The
    scheduler (CURVE, limit MAX_HEADER_BYTES) likewise."""
    outcomes: dict[str, set[int]] = {}
    w = cluster.workers[1]
    before = cluster.counts(MALFORMED)

    def attack() -> None:
        attacker = Attacker()
        try:
            for label, frames in (
                ("under", [bytes(PEER_MAX_MESSAGE - 200)]),  # too large for an envelope
                ("over", [bytes(PEER_MAX_MESSAGE + 1)]),
                # Frame 0 would be logged as malformed if the message were delivered.
                ("over, later frame", [b"\xc1", bytes(PEER_MAX_MESSAGE + 1)]),
            ):
                sock, monitor = attacker.connect(zmq.PUSH, w.direct, None)
                assert zmq.EVENT_HANDSHAKE_SUCCEEDED in watch(
                    monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 10
                )
                sock.send_multipart(frames)
                outcomes[label] = watch(monitor, {zmq.EVENT_DISCONNECTED}, 3)
            cluster.wait_for_counts(MALFORMED, plus(before, {w.index: 1}))
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
    assert zmq.EVENT_DISCONNECTED in outcomes["over, later frame"]
    assert zmq.EVENT_DISCONNECTED in outcomes["scheduler"]
    assert cluster.counts(MALFORMED) == plus(before, {w.index: 1})


def forgeries(info: dict, exclude: str) -> list[tuple[str, Message]]:
    """Well-formed round traffic for the current round, in real members' names:
    ``(target, message)``, the claimed sender being ``message.sender``."""
    out: list[tuple[str, Message]] = []
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
                    out.append((actor, Share(rid, li, gi, p, None, poison)))
                    out.append((actor, Share(rid, li, gi, p, os.urandom(32))))
            for p in participants:
                if p != exclude:
                    out += [(p, Result(rid, a, result)) for a in actors if a != p]
    root_actors = levels[-1][0][1]
    for a in root_actors:
        for b in root_actors:
            if a != b and a != exclude:
                out.append((a, Partial(rid, b, poison)))
    return out


def relayed_keys(info: dict) -> dict[str, str]:
    """Each member's round key, as the scheduler relayed it in the assignment."""
    assert info["round_keys"] and len(info["round_keys"]) == len(info["members"])
    return {m[0]: k for m, k in zip(info["members"], info["round_keys"], strict=True)}


def sealer(key: RoundKey, round_id: str, claimed: str, target: str, target_key: str) -> Link:
    """The link ``key``'s owner would seal with if it were ``claimed`` sending to ``target``."""
    return key.links(round_id, claimed, {target: target_key})[target][0]


def test_registered_non_member_cannot_deliver_shares(cluster, monkeypatch):
    """Members of another round (registered with the scheduler, their round keys relayed
    by it) and an outsider seal this round's shares, partials and results in real
    members' names, each with its own round key and the target's real one, while peer0
    is held back: every forgery arrives and fails authentication, and so do envelopes
    naming senders that are not members; the result stays exact."""
    other_keys: list[RoundKey] = []

    class RecordedRoundKey(RoundKey):
        def __init__(self) -> None:
            super().__init__()
            other_keys.append(self)

    monkeypatch.setattr(wire_module, "RoundKey", RecordedRoundKey)
    peers = [
        Peer(
            "tcp://127.0.0.1:0",
            cluster.address,
            session="other",
            peer_id=f"other{i}",
            scheduler_key=cluster.key,
            keys=KeyPair.generate(),
        )
        for i in range(N_PEERS)
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
    monkeypatch.undo()
    # The keys the other round really used (the scheduler relayed them), and an outsider's.
    assert len(other_keys) == N_PEERS
    forgers = [(f"other{i}", k) for i, k in enumerate(other_keys)] + [("mallory", RoundKey())]

    sealed_before = cluster.counts(SEALED)
    member_before = cluster.counts(NOT_MEMBER)
    itself_before = cluster.counts(ITSELF)
    no_link_before = cluster.counts(NOT_NEIGHBOUR)
    dropped_before = cluster.dropped(DROPPED)
    sent: dict[str, Any] = {
        "sealed": {},
        "not_member": {},
        "itself": {},
        "no_link": {},
        "late": False,
    }
    stall = 6.0  # ample time to forge on a loaded machine

    def forge(info: dict) -> None:
        started = time.monotonic()
        rid = info["round_id"]
        keys = relayed_keys(info)
        plan = forgeries(info, exclude="peer0")  # peer0 sleeps: its shares come last
        targets = {w.peer_id: w for w in cluster.workers if w.peer_id != "peer0"}
        sealed = {w.index: 0 for w in targets.values()}
        not_member = {w.index: 0 for w in targets.values()}
        itself = {w.index: 0 for w in targets.values()}
        # A member holds links with its tree neighbours only: a forgery in the name of
        # a member it exchanges nothing with (e.g. its own group's other actor, below
        # the root group) finds no link and is dropped as such, unopened.
        tree = AggregationTree.from_wire(info["tree"], info["group_size"], info["num_actors"])
        no_link = {w.index: 0 for w in targets.values()}
        attacker = Attacker()
        try:
            socks = {pid: attacker.plain(w.direct) for pid, w in targets.items()}
            links: dict[tuple[int, str, str], Link] = {}
            for n, (name, key) in enumerate(forgers):
                for target, msg in plan:
                    claimed = msg.sender  # type: ignore[attr-defined]
                    link = links.get((n, claimed, target))
                    if link is None:
                        link = sealer(key, rid, claimed, target, keys[target])
                        links[(n, claimed, target)] = link
                    socks[target].send_multipart(link.seal(encode(msg)))
                    if claimed in tree.neighbours(target):
                        sealed[targets[target].index] += 1
                    else:
                        no_link[targets[target].index] += 1
                for target, sock in socks.items():
                    # In its own name: sealed properly, but the name is no member's.
                    link = sealer(key, rid, name, target, keys[target])
                    sock.send_multipart(link.seal(encode(Share(rid, 0, 0, name, bytes(32)))))
                    not_member[targets[target].index] += 1
            for target, sock in socks.items():
                # Claiming to be the receiver itself: it has no link with itself.
                sock.send_multipart([Envelope(rid, target, 0, 1).pack(), os.urandom(48)])
                itself[targets[target].index] += 1
            # Every forgery is read (and refused) while peer0 still holds its shares back.
            cluster.wait_for_counts(SEALED, plus(sealed_before, sealed), timeout=stall - 1.0)
            cluster.wait_for_counts(NOT_MEMBER, plus(member_before, not_member), timeout=3.0)
            cluster.wait_for_counts(ITSELF, plus(itself_before, itself), timeout=3.0)
            cluster.wait_for_counts(NOT_NEIGHBOUR, plus(no_link_before, no_link), timeout=3.0)
        finally:
            attacker.close()
        sent.update(sealed=sealed, not_member=not_member, itself=itself, no_link=no_link)
        sent["late"] = time.monotonic() - started > stall - 0.5

    cluster.check(cluster.round(stall=stall, on_assigned=forge))
    assert not sent["late"], "forgeries took too long; they may have lost the race"
    assert sum(sent["sealed"].values()) >= len(forgers) * 10
    assert cluster.counts(SEALED) == plus(sealed_before, sent["sealed"])
    assert cluster.counts(NOT_MEMBER) == plus(member_before, sent["not_member"])
    assert cluster.counts(ITSELF) == plus(itself_before, sent["itself"])
    assert cluster.counts(NOT_NEIGHBOUR) == plus(no_link_before, sent["no_link"])
    # Nothing else was dropped: each forgery logged exactly one line.
    total = sum(sum(sent[k].values()) for k in ("sealed", "not_member", "itself", "no_link"))
    assert cluster.dropped(DROPPED) - dropped_before == total


def test_replayed_sealed_messages_are_dropped(cluster):
    """Real sealed messages, recorded on the wire between members, replayed by an
    outsider: within their round to their receiver (duplicates the round's state
    machine refuses), to another member (authentication fails: another link's key),
    with a bumped sequence number (authentication fails: the envelope is bound);
    after their round (ignored as a finished round); into the next round with the
    envelope rewritten to its id (authentication fails: fresh keys). Each drop is
    counted exactly, and both rounds' results stay exact."""
    holder = cluster.workers[3]  # held back: nobody can finish a round before it wakes
    stall = 6.0
    first: dict[str, Any] = {}

    def send_to(sock: zmq.Socket, frames: list[bytes], copies: int = 1) -> None:
        for _ in range(copies):
            sock.send_multipart(frames)

    def within_round(info: dict) -> None:
        started = time.monotonic()
        rid = first["round_id"] = info["round_id"]
        held = holder.peer_id
        # Every level-0 actor but the holder gets one share from each other participant
        # of its group that is not held back, at once: known before anything is replayed.
        # (Below the root group, only from its non-actors: an actor does not split there.)
        tree = AggregationTree.from_wire(info["tree"], info["group_size"], info["num_actors"])
        due: dict[str, int] = {}
        for group in tree.levels[0]:
            for a in group.actors:
                if a != held:
                    due[a] = sum(p not in (a, held) for p in tree.senders_to(group, a))
        due = {a: n for a, n in due.items() if n}
        assert due, info["tree"]
        receivers = {pid: cluster.worker(pid) for pid in due}
        wait_until(
            lambda: all(len(w.recorded(rid)) >= due[p] for p, w in receivers.items()),
            lambda: f"recorded {[(p, len(w.recorded(rid))) for p, w in receivers.items()]}",
            stall - 2.0,
        )
        # What each has received by now (level-1 shares too, maybe): replayed twice to it;
        # once to another member (not its sender, nor the holder); once with seq + 1.
        snapshot = {p: w.recorded(rid) for p, w in receivers.items()}
        duplicates = {w.index: 0 for w in cluster.workers}
        sealed = {w.index: 0 for w in cluster.workers}
        # A member holds links with its tree neighbours only: a replay from anyone
        # else finds no link (and says so) instead of failing authentication.
        no_link = {w.index: 0 for w in cluster.workers}
        attacker = Attacker()
        try:
            socks = {w.peer_id: attacker.plain(w.direct) for w in cluster.workers}
            for pid, messages in snapshot.items():
                for envelope, frames in messages:
                    send_to(socks[pid], frames, copies=2)
                    duplicates[cluster.worker(pid).index] += 2
                    other = next(
                        w for w in cluster.workers if w.peer_id not in (pid, envelope.sender, held)
                    )
                    send_to(socks[other.peer_id], frames)
                    if envelope.sender in tree.neighbours(other.peer_id):
                        sealed[other.index] += 1
                    else:
                        no_link[other.index] += 1
                    bumped = Envelope(rid, envelope.sender, envelope.seq + 1, envelope.parts)
                    send_to(socks[pid], [bumped.pack(), *frames[1:]])
                    sealed[cluster.worker(pid).index] += 1
            cluster.wait_for_counts(DUPLICATE, plus(first["dup0"], duplicates), stall - 1.0)
            cluster.wait_for_counts(SEALED, plus(first["sealed0"], sealed), 3.0)
            cluster.wait_for_counts(NOT_NEIGHBOUR, plus(first["no_link0"], no_link), 3.0)
        finally:
            attacker.close()
        first.update(duplicates=duplicates, sealed=sealed, no_link=no_link)
        first["late"] = time.monotonic() - started > stall - 0.5

    first["dup0"] = cluster.counts(DUPLICATE)
    first["sealed0"] = cluster.counts(SEALED)
    first["no_link0"] = cluster.counts(NOT_NEIGHBOUR)
    dropped0 = cluster.dropped(DROPPED)
    cluster.check(cluster.round(stall=stall, stall_index=holder.index, on_assigned=within_round))
    assert not first["late"], "the replays took too long; the round may have moved on"
    assert sum(first["duplicates"].values()) >= 4
    assert cluster.counts(DUPLICATE) == plus(first["dup0"], first["duplicates"])
    assert cluster.counts(SEALED) == plus(first["sealed0"], first["sealed"])
    assert cluster.counts(NOT_NEIGHBOUR) == plus(first["no_link0"], first["no_link"])
    replayed = sum(sum(first[k].values()) for k in ("duplicates", "sealed", "no_link"))
    assert cluster.dropped(DROPPED) - dropped0 == replayed

    # The whole first round as received by each member (the round is over: all of it).
    rid1 = first["round_id"]
    recorded = {w.peer_id: w.recorded(rid1) for w in cluster.workers}
    assert all(recorded.values()), "a member received nothing in the first round"
    waiting = cluster.workers[:-1]
    second: dict[str, Any] = {}

    def after_round() -> None:
        # Verbatim, to the peers waiting for the next round: a finished round's traffic.
        expected = plus(
            cluster.counts(FINISHED), {w.index: len(recorded[w.peer_id]) for w in waiting}
        )
        attacker = Attacker()
        try:
            for w in waiting:
                messages = [frames for _, frames in recorded[w.peer_id]]
                assert send_all(attacker.plain(w.direct), messages) == len(messages)
            cluster.wait_for_counts(FINISHED, expected)
        finally:
            attacker.close()
        second["finished"] = expected

    def into_next_round(info: dict) -> None:
        started = time.monotonic()
        rid2 = info["round_id"]
        assert rid2 != rid1
        # Same sender, sequence number and sealed parts; the new round's id. A sender
        # that is no tree neighbour of its receiver in the new round finds no link.
        targets = [w for w in cluster.workers if w is not holder]
        tree = AggregationTree.from_wire(info["tree"], info["group_size"], info["num_actors"])
        sealed = {
            w.index: sum(e.sender in tree.neighbours(w.peer_id) for e, _ in recorded[w.peer_id])
            for w in targets
        }
        no_link = {w.index: len(recorded[w.peer_id]) - sealed[w.index] for w in targets}
        expected = plus(cluster.counts(SEALED), sealed)
        expected_no_link = plus(cluster.counts(NOT_NEIGHBOUR), no_link)
        attacker = Attacker()
        try:
            for w in targets:
                messages = [
                    [Envelope(rid2, e.sender, e.seq, e.parts).pack(), *frames[1:]]
                    for e, frames in recorded[w.peer_id]
                ]
                assert send_all(attacker.plain(w.direct), messages) == len(messages)
            cluster.wait_for_counts(SEALED, expected, stall - 1.0)
            cluster.wait_for_counts(NOT_NEIGHBOUR, expected_no_link, 3.0)
        finally:
            attacker.close()
        second.update(
            sealed=expected, no_link=expected_no_link, late=time.monotonic() - started > stall - 0.5
        )

    dropped1 = cluster.dropped(DROPPED)
    cluster.check(
        cluster.round(
            during=after_round, stall=stall, stall_index=holder.index, on_assigned=into_next_round
        )
    )
    assert not second["late"], "the replays took too long; the round may have moved on"
    assert cluster.counts(FINISHED) == second["finished"]
    assert cluster.counts(SEALED) == second["sealed"]
    assert cluster.counts(NOT_NEIGHBOUR) == second["no_link"]
    assert cluster.dropped(DROPPED) - dropped1 == sum(
        len(recorded[w.peer_id]) for w in cluster.workers if w is not holder
    )
