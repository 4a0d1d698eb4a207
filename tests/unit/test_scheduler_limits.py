"""Issue 19 against ``SchedulerState`` (the sans-IO scheduler, built as the CLI builds
it): absurd schemas refused before anything is built, schemas held compactly, empty
sessions pruned, per-key quotas and total bounds, admission control, relayed text."""

from __future__ import annotations

import gc
import logging
import tracemalloc

import pytest

from lightning_secagg.cli import build_parser, scheduler_kwargs
from lightning_secagg.codec import decode, encode
from lightning_secagg.errors import ConfigurationError
from lightning_secagg.messages import (
    Abort,
    Assignment,
    Leave,
    Signup,
    SignupAck,
    SignupRejected,
    safe_text,
)
from lightning_secagg.protocol.scheduler_state import SchedulerState, schema_elements
from lightning_secagg.roster import Roster, key_fingerprint
from lightning_secagg.scheduler import Scheduler

pytestmark = pytest.mark.timeout(120)

SMALL = [["w", [4], "float32"]]
HUGE = [["w", [2**39] * 27, "float32"]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> str:
    """Distinct valid Z85 keys."""
    return f"{i:0>10}".replace("0", "a") + "b" * 30


def cli_state(*argv: str, clock: Clock | None = None) -> SchedulerState:
    """The state exactly as ``lightning-secagg scheduler ARGV`` builds it (not started)."""
    args = build_parser().parse_args(["scheduler", "--port", "0", *argv])
    kwargs = scheduler_kwargs(args)
    return Scheduler(**kwargs, clock=clock or Clock()).state


def signup(i: int, schema=SMALL, session: str = "s", pid: str | None = None, k=None) -> Signup:
    return Signup(
        session, pid or f"p{i}", "tcp://127.0.0.1:1", k or key(i), 1.0, 32, schema
    )  # fmt: skip


def send(state: SchedulerState, i: int, msg, k=None):
    """Through the codec, as the I/O thread does."""
    wire = decode([bytes(f) for f in encode(msg)])
    return state.receive(f"c{i}".encode(), wire, k if k is not None else key(i))


def test_cli_defaults_are_what_the_state_runs_with():
    state = cli_state()
    assert state.round_timeout is None  # the deadline is derived: finding 1's path
    assert state.max_ids_per_key == 1 and state.max_elements == 2**34
    assert state.roster is None


def test_the_overflow_attack_is_refused_at_signup_before_anything_is_built():
    """Finding 1: six sign-ups with 27 dimensions of 2**39 elements each."""
    state = cli_state()
    outs = [send(state, i, signup(i, HUGE)) for i in range(6)]
    for out in outs:
        (o,) = out
        assert isinstance(o.message, SignupRejected) and o.message.code == "schema_too_large"
        assert "more than 17179869184 elements" in o.message.reason
    assert state.sessions == {} and state.schemas == {} and state.rounds == {}
    # And a normal round still forms and gets a finite deadline.
    out = [o for i in range(6) for o in send(state, 10 + i, signup(10 + i))]
    (asg,) = {o.message.round_id for o in out if isinstance(o.message, Assignment)}
    assert 0 < state.rounds[asg].deadline - state._clock() <= 3600


def test_schema_elements_stops_multiplying_at_the_limit():
    assert schema_elements([["a", [3, 4], "f"], ["b", [], "f"], ["z", [0, 2**39], "f"]], 13) == 13
    with pytest.raises(ValueError, match="more than 12 elements"):
        schema_elements([["a", [3, 4], "f"], ["b", [], "f"]], 12)
    with pytest.raises(ValueError, match="more than 100"):
        schema_elements([["w", [2**39] * 10_000, "f"]], 100)  # never multiplied out
    with pytest.raises(ValueError, match="bad shape"):
        schema_elements([["a", [-1], "f"]], 100)


def test_max_elements_is_configurable():
    state = cli_state("--max-elements", "3")
    (o,) = send(state, 0, signup(0))
    assert o.message.code == "schema_too_large"
    with pytest.raises(ConfigurationError):
        cli_state("--max-elements", "0")


def test_a_queued_schema_is_held_once_and_compactly():
    """Finding 5: a sign-up's schema used to be held at 9x its wire size per peer.
    Now its packed wire form is held once per distinct schema."""
    big = [[f"layer{i}.weight", [64, 64, 3, 3], "float32"] for i in range(5_000)]
    wire = len(encode(signup(0, big))[0])
    state = cli_state()
    tracemalloc.start()
    try:
        for i in range(5):
            assert isinstance(send(state, i, signup(i, big))[0].message, SignupAck)
        gc.collect()  # what is held, not what awaits collection
        held = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    mine = [tracemalloc.Filter(True, "*lightning_secagg*"), tracemalloc.Filter(True, "*msgpack*")]
    kept = sum(s.size for s in held.filter_traces(mine).statistics("filename"))
    assert len(state.schemas) == 1
    assert state.schema_bytes <= wire
    assert kept < 2 * wire, (kept, wire)  # 5 peers, one schema: about its wire size


def test_schema_bytes_held_are_bounded():
    state = SchedulerState(6, 3, 2, clock=Clock(), max_schema_bytes=200)
    wide = [[f"t{j}", [1], "float32"] for j in range(10)]
    assert isinstance(state.receive(b"a", signup(0, wide), key(0))[0].message, SignupAck)
    other = [[f"u{j}", [1], "float32"] for j in range(10)]
    (o,) = state.receive(b"b", signup(1, other), key(1))
    assert o.message.code == "busy"
    # The schema already held costs nothing more: a peer with it is still queued.
    assert isinstance(state.receive(b"c", signup(2, wide), key(2))[0].message, SignupAck)


def test_sybils_get_one_queued_id_per_key():
    """Finding 2 (scheduler side): one key, five ids: one place."""
    state = cli_state()
    outs = [send(state, 0, signup(0, pid=f"s{i}")) for i in range(5)]
    codes = [o[0].message.code if isinstance(o[0].message, SignupRejected) else "ok" for o in outs]
    assert codes == ["ok", "key_quota", "key_quota", "key_quota", "key_quota"]
    assert state.queued("s") == 1
    # The holder may sign the same id up again (a restart), and after leaving, another.
    assert isinstance(send(state, 0, signup(0, pid="s0"))[0].message, SignupAck)
    send(state, 0, Leave("s", "s0"))
    assert isinstance(send(state, 0, signup(0, pid="s1"))[0].message, SignupAck)
    # The quota spans sessions and is configurable.
    (o,) = send(state, 0, signup(0, pid="s9", session="t"))
    assert o.message.code == "key_quota"
    roomy = cli_state("--max-ids-per-key", "3")
    oks = [send(roomy, 0, signup(0, pid=f"s{i}"))[0].message for i in range(4)]
    assert [type(m).__name__ for m in oks] == ["SignupAck"] * 3 + ["SignupRejected"]


def test_200k_sessions_signed_up_and_left_leave_nothing_behind():
    """Finding 5: empty sessions were never deleted and every loop walked them all."""
    state = cli_state()
    for i in range(200_000):
        k = key(i % 7)
        state.receive(b"c", signup(0, session=f"x{i}", pid="p", k=k), k)
        state.receive(b"c", Leave(f"x{i}", "p"), k)
    assert state.sessions == {} and state.schemas == {} and state.key_ids == {}
    assert state.queued_total == 0
    assert state.next_deadline() is None


def test_queued_peers_are_bounded_in_total():
    state = SchedulerState(6, 3, 2, clock=Clock(), max_queued=3)
    codes = []
    for i in range(5):
        (o,) = state.receive(b"c", signup(i, session=f"x{i}"), key(i))
        codes.append(getattr(o.message, "code", "ok"))
    assert codes == ["ok", "ok", "ok", "busy", "busy"]
    assert len(state.sessions) == 3


def test_liveness_expiry_prunes_sessions_and_quotas():
    clock = Clock()
    state = cli_state(clock=clock)
    send(state, 0, signup(0, session="a"))
    clock.now += 11
    state.tick()
    assert state.sessions == {} and state.key_ids == {} and state.schemas == {}


# -- admission control ------------------------------------------------------------


def test_only_roster_keys_sign_up_and_refusals_log_the_fingerprint_only(caplog):
    roster = Roster.parse(f"alice {key(1)}\nbob {key(2)}\n")
    state = SchedulerState(3, 3, 2, clock=Clock(), roster=roster)
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            (o,) = state.receive(b"m", signup(9), key(9))
            assert o.message.code == "not_admitted"
            assert key(9) not in o.message.reason
    assert isinstance(state.receive(b"a", signup(1), key(1))[0].message, SignupAck)
    lines = [r.getMessage() for r in caplog.records if "roster" in r.getMessage()]
    assert lines and all(key(9) not in line for line in lines)
    assert any(key_fingerprint(key(9)) in line for line in lines)
    assert len(lines) <= 11  # rate-limited: a burst, then about one a second


def test_a_key_removed_from_the_roster_loses_its_queued_place():
    state = SchedulerState(3, 3, 2, clock=Clock(), roster=Roster.parse(f"a {key(1)}\nb {key(2)}"))
    state.receive(b"a", signup(1), key(1))
    state.receive(b"b", signup(2), key(2))
    state.set_roster(Roster.parse(f"a {key(1)}"))
    assert state.queued("s") == 1 and set(state.sessions["s"].queue) == {"p1"}
    (o,) = state.receive(b"b", signup(2), key(2))
    assert o.message.code == "not_admitted"


def test_without_a_roster_every_round_says_anyone_can_join(caplog):
    state = cli_state("--target-size", "3")
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            send(state, i, signup(i))
    assert sum("anyone with a key could join" in r.getMessage() for r in caplog.records) == 1


def test_a_roster_needs_authenticated_keys():
    with pytest.raises(ConfigurationError, match="insecure"):
        SchedulerState(3, 3, 2, clock=Clock(), insecure=True, roster=Roster.parse(""))


# -- relayed text (finding 10) ----------------------------------------------------

FORGED = "gave up\n2026-12-04 10:00:00,000 CRITICAL lightning_secagg: forged\r\x1b[2K"


def test_an_abort_reason_cannot_forge_a_log_line_or_an_exception_line(caplog):
    state = cli_state("--target-size", "3")
    out = [o for i in range(3) for o in send(state, i, signup(i))]
    rid = next(o.message.round_id for o in out if isinstance(o.message, Assignment))
    with caplog.at_level(logging.DEBUG):
        relayed = send(state, 0, Abort(rid, "p0", FORGED + "x" * (4096 - len(FORGED))))
    assert relayed
    for o in relayed:
        # What a member reads back off the wire: one line, bounded.
        back = decode([bytes(f) for f in encode(o.message)])
        assert "\n" not in back.reason and "\r" not in back.reason and "\x1b" not in back.reason
        assert "\\n2026-12-04" in back.reason
        assert len(back.reason) <= 4096
    for r in caplog.records:
        assert "\n" not in r.getMessage() and "\r" not in r.getMessage()


def test_safe_text_escapes_and_bounds():
    assert safe_text("a\nb\r\tc\x00\x1b\u2028\u202e") == "a\\nb\\r\\tc\\x00\\x1b\\u2028\\u202e"
    assert safe_text("é 日本 ok") == "é 日本 ok"
    assert safe_text("x" * 50, 10) == "xxxxxxx..."
    once = safe_text(FORGED * 100, 300)
    assert safe_text(once, 300) == once and len(once) <= 300
    assert safe_text(ValueError("bad\nthing")) == "bad\\nthing"


def test_roster_file_format():
    r = Roster.parse(f"# comment\n\nalice {key(1)}   # trailing\nbob\t{key(2)}\n", "f")
    assert len(r) == 2 and r.name_of(key(1)) == "alice" and r.admits(key(2))
    assert not r.admits(key(3)) and not r.admits(None)
    bad = f"alice {key(1)}\nonly-a-name\ncarol {'#' * 40}\nalice {key(4)}\ndave {key(1)}\n"
    with pytest.raises(ConfigurationError) as info:
        Roster.parse(bad, "f")
    msg = str(info.value)
    for n in (2, 3, 4, 5):
        assert f"line {n}:" in msg
    assert "line 1:" not in msg
    hashed = key(5)[:-1] + "#"  # Z85 keys may hold "#": not a comment there
    r = Roster.parse(f"  # indented comment\ne {hashed} #c\n")
    assert r.admits(hashed) and len(r) == 1
    with pytest.raises(ConfigurationError, match="line 1: not a 40-character"):
        Roster.parse(f"f {key(6)}#glued")  # a comment needs its own field
    overflow = "#" * 40  # Z85 alphabet, but its groups exceed 32 bits
    with pytest.raises(ConfigurationError, match="line 1"):
        Roster.parse(f"x {overflow}")


def test_roster_file_is_reread_on_change_at_a_bounded_rate_and_a_bad_edit_keeps_the_old(
    tmp_path, caplog
):
    from lightning_secagg.roster import RosterFile

    path = tmp_path / "roster"
    path.write_text(f"a {key(1)}\n")
    clock = Clock()
    watched = RosterFile(path, interval=1.0, clock=clock)
    assert watched.roster.admits(key(1)) and watched.poll() is None
    path.write_text(f"a {key(1)}\nb {key(2)}\n")
    assert watched.poll() is None  # not looked at before the interval is over
    clock.now += 1.0
    new = watched.poll()
    assert new is not None and new.admits(key(2)) and watched.poll() is None
    assert watched.next_check() == clock.now + 1.0
    path.write_text(f"a {key(1)}\nb not-a-key\n")
    clock.now += 1.0
    with caplog.at_level(logging.ERROR):
        assert watched.poll() is None
    assert watched.roster.admits(key(2))  # the last good roster stays
    assert any("line 2" in r.getMessage() for r in caplog.records)


def test_the_cli_refuses_a_malformed_roster_naming_its_lines(tmp_path, capsys):
    from lightning_secagg.cli import main

    path = tmp_path / "roster"
    path.write_text(f"# ok\na {key(1)}\nbroken\nb {key(1)}\n")
    assert main(["scheduler", "--port", "0", "--allow-keys", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 3:" in err and "line 4: key already listed on line 2" in err
    assert main(["scheduler", "--port", "0", "--allow-keys", str(tmp_path / "none")]) == 2
    assert "cannot read roster" in capsys.readouterr().err
