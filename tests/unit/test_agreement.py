"""Checked agreement (sans-IO): digests and the verdict on every member."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_secagg.errors import RemoteProtocolError, ResultMismatchError, RoundFailedError
from lightning_secagg.protocol.agreement import (
    DIGEST_BYTES,
    AgreementCheck,
    ResultDigest,
    result_digest,
)

pytestmark = pytest.mark.timeout(60)

MEMBERS = ["a", "b", "c", "d"]


def test_incremental_equals_whole_and_every_field_counts():
    segs = [b"\x01\x02", b"\x03" * 10]
    d = ResultDigest("r1", MEMBERS)
    for i, s in enumerate(segs):
        d.segment(i, memoryview(s))
    base = d.finish(4.0)
    assert base == result_digest("r1", MEMBERS, 4.0, segs)
    assert len(base) == DIGEST_BYTES
    assert result_digest("r2", MEMBERS, 4.0, segs) != base
    assert result_digest("r1", MEMBERS[:3], 4.0, segs) != base
    assert result_digest("r1", MEMBERS, 3.0, segs) != base
    assert result_digest("r1", MEMBERS, 4.0, [b"\x01\x02\x03", b"\x03" * 9]) != base
    with pytest.raises(ValueError):
        ResultDigest("r1", MEMBERS).segment(1, b"")


@given(st.lists(st.binary(max_size=8), min_size=1, max_size=4), st.integers(0, 3), st.data())
def test_any_changed_byte_changes_the_digest(segs, which, data):
    which %= len(segs)
    seg = segs[which]
    if not seg:
        return
    pos = data.draw(st.integers(0, len(seg) - 1))
    changed = list(segs)
    changed[which] = seg[:pos] + bytes([seg[pos] ^ 0x80]) + seg[pos + 1 :]
    assert result_digest("r", MEMBERS, 1.0, segs) != result_digest("r", MEMBERS, 1.0, changed)


def run_check(results: dict[str, bytes], silent: frozenset[str] = frozenset()):
    """Every member sends its digest to every other; returns each honest member's verdict."""
    digests = {m: result_digest("r", MEMBERS, 4.0, [results[m]]) for m in MEMBERS}
    checks = {m: AgreementCheck(m, MEMBERS, digests[m]) for m in MEMBERS}
    for sender in MEMBERS:
        if sender in silent:
            continue
        for to in MEMBERS:
            if to != sender:
                checks[to].receive(sender, digests[sender])
    return checks


def test_all_agree():
    checks = run_check(dict.fromkeys(MEMBERS, b"sum"))
    assert all(c.verdict() for c in checks.values())


def test_divergence_is_seen_by_every_member_and_names_who_differs():
    # A root actor fed "d" a modified partial sum: d decodes another result.
    checks = run_check({"a": b"sum", "b": b"sum", "c": b"sum", "d": b"sum+0.5"})
    for m in "abc":
        with pytest.raises(ResultMismatchError, match="differs at d") as info:
            checks[m].verdict()
        assert info.value.disagreeing == ("d",)
        assert isinstance(info.value, RoundFailedError)
    with pytest.raises(ResultMismatchError, match="differs at a, b, c"):
        checks["d"].verdict()


def test_a_missing_digest_fails_only_at_the_deadline():
    checks = run_check(dict.fromkeys(MEMBERS, b"sum"), silent=frozenset({"c"}))
    assert checks["a"].verdict() is False
    with pytest.raises(ResultMismatchError, match="no agreement digest from c"):
        checks["a"].verdict(deadline_passed=True)


def test_strangers_duplicates_and_bad_lengths_are_refused():
    check = AgreementCheck("a", MEMBERS, b"\0" * DIGEST_BYTES)
    with pytest.raises(RemoteProtocolError, match="non-member"):
        check.receive("x", b"\0" * DIGEST_BYTES)
    with pytest.raises(RemoteProtocolError, match="non-member"):
        check.receive("a", b"\0" * DIGEST_BYTES)
    with pytest.raises(RemoteProtocolError, match="bytes"):
        check.receive("b", b"\0")
    check.receive("b", b"\0" * DIGEST_BYTES)
    with pytest.raises(RemoteProtocolError, match="second"):
        check.receive("b", b"\0" * DIGEST_BYTES)


def test_a_mismatch_is_not_retried_blindly():
    from lightning_secagg.protocol.peer_session import is_retryable

    assert not is_retryable(ResultMismatchError("differs at d", ("d",)))
    assert is_retryable(RoundFailedError("timeout"))
