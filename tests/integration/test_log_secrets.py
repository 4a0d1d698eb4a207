"""No secret reaches a log line, at any level, on the good path or the bad ones.

A scheduler and four peers run a round with every ``lightning_secagg`` logger
at DEBUG, while an outsider injects forged and malformed messages and a fifth
peer times out (so warning and error paths log too). Every record is kept,
with its formatted message, arguments, exception and stack. Then the logs are
searched for the round's secrets, in every spelling a log could use:

* the scheduler's and every peer's CURVE secret key (Z85, raw bytes' hex and repr);
* every peer's per-call X25519 round key (the secret half that seals round traffic);
* every seed the peers drew (recorded by injecting ``random_bytes``);
* the first words of every dense share and partial sum a peer sent;
* the model: a planted pattern's raw bytes (hex, repr, latin-1) and its values' text.

Public keys are fine to log and are used as the positive control: the
search must find their fingerprints.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from typing import Any

import pytest
import torch
import zmq

import lightning_secagg.codec as codec_module
import lightning_secagg.wire as wire_module
from lightning_secagg import KeyPair, Peer, RoundTimeoutError, Scheduler
from lightning_secagg.codec import encode
from lightning_secagg.messages import Message, Partial, Share
from lightning_secagg.sealing import RoundKey
from lightning_secagg.security import key_fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

N_PEERS = 4
PATTERN = torch.tensor([12345.678 + 0.5 * i for i in range(32)], dtype=torch.float32)


class KeepAll(logging.Handler):
    """Keeps every record's full text: message, args, exception and stack."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []
        self.levels: set[int] = set()
        self.formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.levels.add(record.levelno)
        parts = [self.format(record), repr(record.args), repr(record.msg)]
        if record.exc_info:
            parts.append(self.formatter.formatException(record.exc_info))
        if record.stack_info:
            parts.append(record.stack_info)
        parts.append(repr({k: v for k, v in vars(record).items() if k != "exc_info"}))
        self.texts.append("\n".join(parts))


def spellings(secret: bytes) -> list[str]:
    """The ways raw bytes could show up in text."""
    return [
        secret.hex(),
        secret.hex().upper(),
        repr(secret)[2:-1],
        base64.b64encode(secret).decode(),
        zmq.utils.z85.encode(secret).decode() if len(secret) % 4 == 0 else secret.hex(),
        secret.decode("latin-1"),
    ]


def test_debug_logs_of_a_round_hold_no_secret():
    handler = KeepAll()
    logger = logging.getLogger("lightning_secagg")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning_secagg."):
            logging.getLogger(name).setLevel(logging.DEBUG)
    seeds: list[bytes] = []
    dense: list[bytes] = []
    round_keys: list[RoundKey] = []
    original_encode = codec_module.encode

    def recording_encode(message: Message) -> list[Any]:
        if isinstance(message, Share | Partial) and message.payload is not None:
            dense.append(message.payload[:8].tobytes())
        return original_encode(message)

    class RecordingRoundKey(RoundKey):
        def __init__(self) -> None:
            super().__init__()
            round_keys.append(self)

    def recording_random(n: int) -> bytes:
        data = os.urandom(n)
        seeds.append(data)
        return data

    codec_module.encode = recording_encode  # type: ignore[assignment]
    wire_module.RoundKey = RecordingRoundKey  # type: ignore[misc]
    peer_keys = [KeyPair.generate() for _ in range(N_PEERS + 1)]
    sched_keys = KeyPair.generate()
    results: list[Any] = [None] * (N_PEERS + 1)
    try:
        with Scheduler(port=0, target_size=N_PEERS, keys=sched_keys) as sched:
            endpoints: dict[int, str] = {}
            ready = threading.Barrier(N_PEERS + 2)  # every peer and the outsider

            def work(i: int, timeout: float) -> None:
                try:
                    with Peer(
                        "tcp://127.0.0.1:0",
                        sched.address,
                        peer_id=f"p{i}",
                        session="s" if i < N_PEERS else "lonely",
                        scheduler_key=sched.public_key,
                        keys=peer_keys[i],
                        random_bytes=recording_random,
                    ) as p:
                        endpoints[i] = p.endpoint
                        ready.wait(10)
                        results[i] = p.aggregate({"w": PATTERN * (i + 1)}, timeout=timeout)
                except Exception as exc:  # kept for the asserts below
                    logging.getLogger("lightning_secagg.test").exception("peer %d failed", i)
                    results[i] = exc

            threads = [
                threading.Thread(target=work, args=(i, 30.0 if i < N_PEERS else 1.0))
                for i in range(N_PEERS + 1)
            ]
            for t in threads:
                t.start()
            ready.wait(10)
            ctx = zmq.Context()
            try:  # an outsider: a forged share, and junk, to every peer
                for i in range(N_PEERS):
                    s = ctx.socket(zmq.PUSH)  # peers' inboxes take plain connections
                    s.linger = 1000
                    s.connect(endpoints[i])
                    s.send_multipart(encode(Share("x", 0, 0, f"p{(i + 1) % N_PEERS}", bytes(32))))
                    s.send_multipart([b"\x93junk"])
                    s.close()
            finally:
                ctx.term()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a peer hung"
    finally:
        codec_module.encode = original_encode  # type: ignore[assignment]
        wire_module.RoundKey = RoundKey  # type: ignore[misc]
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    assert all(isinstance(r, dict) for r in results[:N_PEERS]), results
    assert isinstance(results[N_PEERS], RoundTimeoutError)
    assert {logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR} <= handler.levels
    logs = "\n".join(handler.texts)
    # Positive control: the search reads what was logged (public key fingerprints are).
    assert key_fingerprint(peer_keys[0].public) in logs
    assert key_fingerprint(sched_keys.public) in logs

    needles: dict[str, str] = {}
    for who, keys in [("scheduler", sched_keys), *((f"p{i}", k) for i, k in enumerate(peer_keys))]:
        needles[f"{who} secret key (z85)"] = keys.secret
        raw = zmq.utils.z85.decode(keys.secret.encode())
        for j, s in enumerate(spellings(raw)):
            needles[f"{who} secret key #{j}"] = s
    assert len(round_keys) == N_PEERS + 1
    for n, key in enumerate(round_keys):
        for j, s in enumerate(spellings(key._secret.private_bytes_raw())):
            needles[f"round key {n} #{j}"] = s
    # One group of N_PEERS with two actors: each non-actor draws a seed (the two
    # root actors keep their vectors whole).
    assert len(seeds) >= N_PEERS - 2
    for n, seed in enumerate(seeds):
        for j, s in enumerate(spellings(seed)):
            needles[f"seed {n} #{j}"] = s
    assert dense
    for n, words in enumerate(dense):
        for j, s in enumerate(spellings(words)):
            needles[f"dense share {n} #{j}"] = s
    for i in range(N_PEERS):
        model = (PATTERN * (i + 1)).numpy()
        for j, s in enumerate(spellings(model.tobytes()[:64])):
            needles[f"model p{i} bytes #{j}"] = s
        needles[f"model p{i} value"] = f"{float(model[1]):.3f}"[:8]
    leaked = sorted(label for label, needle in needles.items() if needle and needle in logs)
    assert not leaked, f"secrets in the logs: {leaked[:10]}"
