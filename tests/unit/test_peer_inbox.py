"""The peer's inbox before a round: what it reads, what it keeps, and the bounds on both.

Real sockets on loopback, but no scheduler and no round: the shell's
``_recv_peer`` and the session's ``receive_peer`` (which keeps what belongs to a
round it is not assigned yet) are driven directly, so every byte count is exact.
"""

from __future__ import annotations

import logging

import pytest
import zmq

from lightning_secagg import KeyPair, Peer
from lightning_secagg.protocol.peer_session import MAX_EARLY_MESSAGES, result_slot
from lightning_secagg.sealing import Envelope

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def peer():
    p = Peer(
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:1",  # never reached: nothing here talks to a scheduler
        peer_id="me",
        scheduler_key=KeyPair.generate().public,
        linger=0,
    )
    with p:
        yield p


@pytest.fixture
def sender(peer):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.connect(peer.endpoint)
    yield sock
    sock.close()
    ctx.term()


def receive(peer: Peer):
    assert peer._inbox.poll(5000), "nothing arrived"
    return peer._recv_peer()


def test_a_sealed_message_is_kept_as_its_envelope_and_raw_frames(peer, sender):
    envelope = Envelope("r1", "alice", 0, 2)
    sender.send_multipart([envelope.pack(), b"h" * 40, b"p" * 100])
    item = receive(peer)
    assert (item.round_id, item.sender, item.envelope) == ("r1", "alice", envelope)
    assert [bytes(f) for f in item.frames[1:]] == [b"h" * 40, b"p" * 100]
    assert item.message is None


@pytest.mark.parametrize("parts", [1, 3, 200])
def test_a_part_count_other_than_the_envelopes_is_dropped_before_it_is_kept(
    peer, sender, parts, caplog
):
    frames = [Envelope("r1", "alice", 0, 2).pack(), *[b"x" * 10] * parts]
    with caplog.at_level(logging.WARNING, logger="lightning_secagg.peer"):
        sender.send_multipart(frames)
        assert receive(peer) is None
    assert "its envelope says 2" in caplog.text


@pytest.mark.parametrize(
    "frames",
    [[b"\x93junk"], [b""], [Envelope("r1", "alice", 0, 1).pack()[:-1], b"x" * 20]],
)
def test_anything_but_an_envelope_is_dropped_as_malformed(peer, sender, frames, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_secagg.peer"):
        sender.send_multipart(frames)
        assert receive(peer) is None
    assert "dropped a malformed message" in caplog.text


def test_early_messages_are_bounded_in_bytes_oldest_dropped_first(peer, sender, caplog):
    session = peer._session
    session._early_budget = 1000
    sizes = []
    with caplog.at_level(logging.WARNING, logger="lightning_secagg"):
        for i in range(5):
            envelope = Envelope("r9", f"s{i}", 0, 1).pack()
            sender.send_multipart([envelope, b"z" * 300])
            assert session.receive_peer(receive(peer), 0.0) == []
            sizes.append(len(envelope) + 300)
    kept = [item.sender for item in session.early]
    assert kept == ["s2", "s3", "s4"]  # three fit in 1000 bytes, the two oldest went
    assert session.early_bytes == sum(sizes[2:]) <= 1000
    assert caplog.text.count("dropped an early message") == 2


def test_early_messages_are_bounded_in_number(peer, sender):
    session = peer._session
    session._early_budget = 1 << 30
    maxlen = MAX_EARLY_MESSAGES
    for i in range(maxlen + 5):
        sender.send_multipart([Envelope("r9", f"s{i}", 0, 1).pack(), b"z"])
        session.receive_peer(receive(peer), 0.0)
    assert len(session.early) == maxlen
    assert session.early[0].sender == "s5"
    assert session.early_bytes == sum(item.nbytes for item in session.early)


def test_result_payloads_are_opened_into_the_round_result_buffer():
    """``result_slot`` (the ``place`` of ``Link.open_message``) reads the
    authenticated header and offers a result segment's slice of the round's
    buffer only for a result the round waits for, from the sender the seal names."""
    from lightning_secagg import codec
    from lightning_secagg.messages import Share
    from tests.unit.test_segmented_round import result_setup

    setup, net, leaf = result_setup()
    state = setup.peers[leaf]
    m = next(x.message for x in net.pending if x.to == leaf)
    header = codec.decode_header(codec.encode(m)[0])
    n = m.payload.nbytes
    lo, _ = setup.spans[m.segment]
    slot = result_slot(state, m.sender, header, n)
    assert slot is not None and slot.ctypes.data == state.buffer[lo:].ctypes.data
    # The seal's sender must be the header's; other types get a buffer of their own.
    assert result_slot(state, "someone-else", header, n) is None
    share = Share("r1", 0, 0, m.sender, None, m.payload, m.segment)
    assert result_slot(state, m.sender, codec.decode_header(codec.encode(share)[0]), n) is None
    assert result_slot(state, m.sender, {**header, "segment": "0"}, n) is None


def test_inbox_limit_checked_once_per_model_and_a_refusal_every_time(peer, monkeypatch):
    import torch

    from lightning_secagg import peer as peer_module
    from lightning_secagg.errors import ConfigurationError
    from lightning_secagg.schema import Schema

    calls = []
    real = peer_module.required_message_bytes

    def counting(schema, **kw):
        calls.append(schema)
        return real(schema, **kw)

    monkeypatch.setattr(peer_module, "required_message_bytes", counting)
    small = Schema.of({"w": torch.zeros(10)})
    peer._check_inbox_limit(small)
    peer._check_inbox_limit(Schema.of({"w": torch.ones(10)}))  # the same layout
    assert calls == [small]
    big = Schema.of({"w": torch.zeros(10), "v": torch.zeros(3)})
    peer.max_message_bytes = real(small) + 4
    for _ in range(2):  # a model that does not fit is refused every time
        with pytest.raises(ConfigurationError, match="max_message_bytes"):
            peer._check_inbox_limit(big)
    assert calls == [small, big, big]
