"""Sniff a real round on loopback: CURVE to the scheduler, sealed traffic between peers.

A raw ``AF_PACKET`` socket bound to ``lo`` (root only) records every TCP
segment while a scheduler and four peers run one round over real sockets. The
segments of the round's connections (those touching the scheduler's or a
peer's listening port) are reassembled per direction. Then:

* every connection to the scheduler greets with the ``CURVE`` mechanism, and
  every connection between peers with ``NULL``: round traffic is sealed message
  by message instead (``lightning_secagg.sealing``);
* no recorded secret appears in the bytes on the wire: the averaged model (a
  planted 256-byte pattern, which every peer also holds as its input), every
  share seed, every dense share or partial sum a peer sent, and the plaintext
  codec header of every message a peer sent to another (level, group, seed);
* what sealing leaves in the clear is there: every envelope a peer sent (round
  id, sender, counter) is found on the wire between peers, so those streams were
  captured whole and searched;
* positive control: the same round with ``insecure=True`` shows ``NULL``
  greetings everywhere and *does* leak all of the secrets, so the detector works.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import lightning_secagg.codec as codec_module
import lightning_secagg.peer as peer_module
from lightning_secagg import Peer, Scheduler
from lightning_secagg.messages import Message, Partial, Result, Share

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

N_PEERS = 4
ETH_P_ALL = 0x0003
# Exactly representable, and equal on every peer with equal weights: the
# fixed-point mean is exact, so the result's bytes are these very bytes.
PATTERN = torch.tensor([1000.25 + 3 * i for i in range(64)], dtype=torch.float32)
PATTERN_BYTES = PATTERN.numpy().tobytes()
assert len(PATTERN_BYTES) >= 64


@dataclass
class Capture:
    """TCP payloads seen on ``lo``, by direction, with each direction's initial sequence number."""

    segments: dict[tuple[int, int, int, int], dict[int, bytes]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    isn: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    packets: int = 0

    def add(self, frame: bytes) -> None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return  # not IPv4 over the loopback's Ethernet framing
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:  # not TCP
            return
        total = struct.unpack("!H", ip[2:4])[0]
        src, dst = struct.unpack("!II", ip[12:20])
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        offset = (tcp[12] >> 4) * 4
        flags = tcp[13]
        key = (src, sport, dst, dport)
        self.packets += 1
        if flags & 0x02:  # SYN: data starts at ISN + 1
            self.isn[key] = seq
        payload = bytes(tcp[offset:])
        if payload:
            self.segments[key].setdefault(seq, payload)  # lo shows each packet twice

    def streams(self, ports: set[int]) -> dict[tuple[int, int, int, int], bytes]:
        """Reassembled byte streams of every direction that touches one of ``ports``."""
        out = {}
        for key, segs in self.segments.items():
            if key[1] not in ports and key[3] not in ports:
                continue
            assert key in self.isn, f"connection {key} started before the capture"
            start = (self.isn[key] + 1) & 0xFFFFFFFF
            data = bytearray()
            for seq in sorted(segs, key=lambda s: (s - start) & 0xFFFFFFFF):
                rel = (seq - start) & 0xFFFFFFFF
                chunk = segs[seq]
                # A gap would hide bytes from the search: fail loudly instead.
                assert rel <= len(data), f"capture lost a segment of {key}"
                if rel + len(chunk) > len(data):
                    data += chunk[len(data) - rel :]
            out[key] = bytes(data)
        return out


class Sniffer:
    """Records every frame on ``lo`` in a thread, until :meth:`stop` (bounded)."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except (PermissionError, AttributeError, OSError) as exc:
            pytest.skip(f"cannot open a raw AF_PACKET socket (needs root on Linux): {exc}")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.capture = Capture()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            self.capture.add(frame)

    def stop(self) -> Capture:
        time.sleep(0.3)  # the last segments (and their loopback echo) are on their way
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return self.capture


@dataclass
class Secrets:
    """What must never be visible on the wire, recorded while the round runs; and what
    a peer put in front of each message it sent to another (its sealed envelope)."""

    seeds: list[bytes] = field(default_factory=list)
    dense: list[bytes] = field(default_factory=list)
    headers: list[bytes] = field(default_factory=list)
    first_frames: list[bytes] = field(default_factory=list)


def run_round(
    insecure: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Capture, set[int], int, Secrets]:
    """One round on loopback, sniffed: the capture, the listening ports (the scheduler's
    among them, and also on its own) and what the peers sent."""
    secrets_seen = Secrets()
    original_encode = codec_module.encode
    original_send_frames = peer_module.send_frames

    def recording_encode(message: Message) -> list[Any]:
        # The peer encodes each round message here, then seals it (secure links).
        frames = original_encode(message)
        if isinstance(message, Share | Partial | Result):
            secrets_seen.headers.append(bytes(frames[0]))
            if isinstance(message, Share | Partial) and message.payload is not None:
                secrets_seen.dense.append(message.payload.tobytes()[:64])
        return frames

    def recording_send_frames(sock: Any, frames: Any, what: str) -> int:
        secrets_seen.first_frames.append(bytes(frames[0]))  # the envelope, when sealed
        return original_send_frames(sock, frames, what)

    def recording_random(n: int) -> bytes:
        data = os.urandom(n)
        if n == 32:
            secrets_seen.seeds.append(data)
        return data

    monkeypatch.setattr(codec_module, "encode", recording_encode)
    monkeypatch.setattr(peer_module, "send_frames", recording_send_frames)
    sniffer = Sniffer()
    results: list[Any] = [None] * N_PEERS
    try:
        with Scheduler(port=0, target_size=N_PEERS, insecure=insecure) as sched:
            sched_port = int(sched.address.rsplit(":", 1)[1])
            ports = {sched_port}
            kwargs: dict[str, Any] = (
                {"insecure": True} if insecure else {"scheduler_key": sched.public_key}
            )

            def work(i: int) -> None:
                with Peer(
                    "tcp://127.0.0.1:0",
                    sched.address,
                    peer_id=f"p{i}",
                    random_bytes=recording_random,
                    **kwargs,
                ) as p:
                    ports.add(int(p.endpoint.rsplit(":", 1)[1]))
                    results[i] = p.aggregate({"pattern": PATTERN.clone()}, timeout=30)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(N_PEERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a peer hung"
    finally:
        capture = sniffer.stop()
    for r in results:
        assert isinstance(r, dict), r
        assert r["pattern"].numpy().tobytes() == PATTERN_BYTES, "planted result is not exact"
    assert secrets_seen.seeds and secrets_seen.dense, "the recorders saw no secrets"
    assert secrets_seen.headers and secrets_seen.first_frames, "the recorders saw no messages"
    return capture, ports, sched_port, secrets_seen


def greeting_mechanism(stream: bytes) -> bytes:
    """The mechanism field of a ZMTP 3.x greeting (bytes 12-31, NUL padded)."""
    assert len(stream) >= 64 and stream[0] == 0xFF and stream[10] == 3, stream[:16]
    return stream[12:32].rstrip(b"\x00")


def leaks(streams: dict[Any, bytes], secrets_seen: Secrets) -> dict[str, int]:
    wire = list(streams.values())

    def count(needles: list[bytes]) -> int:
        return sum(any(n in s for s in wire) for n in needles)

    return {
        "result": count([PATTERN_BYTES]),
        "seeds": count(secrets_seen.seeds),
        "dense": count(secrets_seen.dense),
        "headers": count(secrets_seen.headers),
    }


def split_streams(
    streams: dict[tuple[int, int, int, int], bytes], sched_port: int
) -> tuple[dict[Any, bytes], dict[Any, bytes]]:
    """The directions of the connections to the scheduler, and those between peers."""
    to_sched = {k: v for k, v in streams.items() if sched_port in (k[1], k[3])}
    between = {k: v for k, v in streams.items() if k not in to_sched}
    return to_sched, between


def connections(streams: dict[tuple[int, int, int, int], bytes]) -> set[tuple[Any, ...]]:
    return {tuple(sorted([(k[0], k[1]), (k[2], k[3])])) for k in streams}


def test_curve_to_scheduler_sealed_between_peers_nothing_in_the_clear(monkeypatch):
    capture, ports, sched_port, secrets_seen = run_round(insecure=False, monkeypatch=monkeypatch)
    to_sched, between = split_streams(capture.streams(ports), sched_port)
    # every peer talks to the scheduler, and shares flow between peers
    assert len(connections(to_sched)) >= N_PEERS, (len(to_sched), capture.packets)
    assert len(connections(between)) >= 2, (len(between), capture.packets)
    mechanisms = {key: greeting_mechanism(data) for key, data in to_sched.items()}
    assert set(mechanisms.values()) == {b"CURVE"}, mechanisms
    mechanisms = {key: greeting_mechanism(data) for key, data in between.items()}
    assert set(mechanisms.values()) == {b"NULL"}, mechanisms
    wire = {**to_sched, **between}
    assert leaks(wire, secrets_seen) == {"result": 0, "seeds": 0, "dense": 0, "headers": 0}
    # Sealed: what went out first in each message was an envelope, not the header it
    # seals; and every one of them is on the wire between peers, so those streams were
    # captured whole and searched (the secrets above would have been found there).
    assert not set(secrets_seen.headers) & set(secrets_seen.first_frames)
    assert all(any(e in s for s in between.values()) for e in secrets_seen.first_frames)


def test_positive_control_insecure_round_leaks_everything(monkeypatch):
    capture, ports, _, secrets_seen = run_round(insecure=True, monkeypatch=monkeypatch)
    streams = capture.streams(ports)
    assert {greeting_mechanism(d) for d in streams.values()} == {b"NULL"}
    found = leaks(streams, secrets_seen)
    assert found["result"] == 1, "the detector missed the planted result"
    assert found["seeds"] == len(secrets_seen.seeds), "the detector missed a seed"
    assert found["dense"] == len(secrets_seen.dense), "the detector missed a dense share"
    assert found["headers"] == len(secrets_seen.headers), "the detector missed a header"
    # Unsealed: each message went out as its codec header, and every one is on the wire.
    assert sorted(secrets_seen.first_frames) == sorted(secrets_seen.headers)
