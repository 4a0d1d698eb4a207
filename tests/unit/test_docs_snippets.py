"""The documentation's code must keep working: snippets, commands and quoted errors.

- Every ``python`` block of the docs and the README is compiled; blocks marked
  ``<!-- test: run -->`` (complete programs, e.g. the quickstart's round with
  an in-process scheduler) are executed.
- Every ``lightning-secagg ...`` command in a ``bash`` block is parsed by the
  real argument parser.
- The error messages quoted in ``troubleshooting.md`` are produced by the code.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from lightning_secagg import (
    ConfigurationError,
    EncodingError,
    KeyPair,
    Peer,
    RoundTimeoutError,
    Scheduler,
)
from lightning_secagg.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [*sorted(p for p in DOCS.glob("*.md") if not p.name.startswith("_")), REPO / "README.md"]

FENCE = re.compile(
    r"(?P<marker><!-- test: (?P<mode>\w+) -->\s*\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)```",
    re.S,
)


def blocks(lang: str) -> list[tuple[str, str, str]]:
    """``(id, mode, code)`` for every fenced block of ``lang`` in the docs."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group("lang") == lang:
                line = text[: m.start()].count("\n") + 1
                rel = page.relative_to(REPO)
                found.append((f"{rel}:{line}", m.group("mode") or "compile", m.group("body")))
    return found


PYTHON = blocks("python")
BASH = blocks("bash")


def test_the_docs_have_runnable_snippets():
    runnable = [b for b in PYTHON if b[1] == "run"]
    assert any("quickstart" in b[0] for b in runnable)
    assert any("concepts" in b[0] for b in runnable)


@pytest.mark.parametrize(("where", "mode", "code"), PYTHON, ids=[b[0] for b in PYTHON])
def test_python_snippet(where, mode, code):
    compiled = compile(code, where, "exec")
    if mode == "run":
        exec(compiled, {"__name__": "__docs__"})  # noqa: S102 - our own documentation
    else:
        assert mode == "compile", f"{where}: unknown test mode {mode!r}"


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for where, _mode, code in BASH:
        joined = re.sub(r"\\\n\s*", " ", code)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("lightning-secagg "):
                out.append((where, shlex.split(line, comments=True)[1:]))
    return out


COMMANDS = _commands()


def test_the_docs_show_every_subcommand():
    used = {argv[0] for _, argv in COMMANDS}
    assert {"scheduler", "keygen"} <= used


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[" ".join(c[1]) for c in COMMANDS])
def test_documented_commands_parse(where, argv):
    args = build_parser().parse_args(argv)
    assert args.command == argv[0], where


# -- the quoted errors are the real ones -----------------------------------

TROUBLE = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")


def quoted(message: str) -> None:
    """``message`` (a real error) appears in the page, up to the parts shown as ``…``."""
    for line in TROUBLE.splitlines():
        parts = line.split(": ", 1)
        if len(parts) != 2:
            continue
        pattern = ".*".join(re.escape(piece) for piece in parts[1].split("…"))
        if re.fullmatch(pattern, message):
            return
    pytest.fail(f"troubleshooting.md does not quote this error:\n{message}")


def test_encoding_errors_are_quoted():
    for state, frac in (
        ({"w": torch.tensor([2.0**31])}, 32),
        ({"w": torch.tensor([1.0, float("nan")])}, 32),
    ):
        from lightning_secagg.encoding import check_values

        with pytest.raises(EncodingError) as exc:
            check_values(state, frac)
        quoted(str(exc.value))
    from lightning_secagg.schema import Schema

    with pytest.raises(EncodingError) as exc:
        Schema.of({"w": torch.zeros(2, dtype=torch.complex64)})
    quoted(str(exc.value))


def test_configuration_errors_are_quoted():
    with pytest.raises(ConfigurationError) as exc:
        Scheduler(port=0, target_size=6, group_size=3, num_actors=3)
    quoted(str(exc.value))
    with pytest.raises(ConfigurationError) as exc:
        Peer("tcp://0.0.0.0:6000", "tcp://127.0.0.1:5555", scheduler_key=KeyPair.generate().public)
    quoted(str(exc.value))
    with pytest.raises(ConfigurationError) as exc:
        Peer("tcp://127.0.0.1:0", "tcp://127.0.0.1:5555")
    quoted(str(exc.value))


def test_network_errors_are_quoted():
    with Scheduler(port=0, target_size=3) as sched:
        port = int(sched.address.rsplit(":", 1)[1])
        with pytest.raises(ConfigurationError) as exc:
            Scheduler(port=port, target_size=3).start()
        quoted(str(exc.value).replace(f":{port}", ":5555"))
        with pytest.raises(ConfigurationError) as exc:
            Peer(sched.address, sched.address, scheduler_key=sched.public_key).start()
        quoted(str(exc.value).replace(f":{port}", ":6000"))
        with Peer(
            "tcp://127.0.0.1:0",
            sched.address,
            peer_id="p0",
            scheduler_key=sched.public_key,
            max_message_bytes=4096,
        ) as peer:
            with pytest.raises(ConfigurationError) as exc:
                peer.aggregate({"w": torch.zeros(1000)}, timeout=1)
            quoted(str(exc.value))
        wrong_key = KeyPair.generate().public
        with (
            Peer(
                "tcp://127.0.0.1:0", sched.address, peer_id="p0", scheduler_key=wrong_key, linger=0
            ) as peer,
            pytest.raises(RoundTimeoutError) as exc,
        ):
            peer.aggregate({"w": torch.zeros(2)}, timeout=0.3)
        quoted(str(exc.value).replace("0.3 s", "120 s"))


def test_the_tree_figure_script_runs(tmp_path):
    pytest.importorskip("matplotlib")
    import runpy

    script = runpy.run_path(str(DOCS / "_scripts" / "draw_tree.py"))
    out = tmp_path / "tree.png"
    assert script["main"](["--target-size", "7", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "_static" / "tree.png").is_file(), "the committed figure is missing"


def test_waiting_errors_are_quoted():
    """Issue 22: a finished peer (too few peers) and a pinned schema's difference."""
    import itertools
    import random

    from lightning_secagg.messages import Farewell, SignupRejected
    from lightning_secagg.protocol.scheduler_state import SchedulerState
    from lightning_secagg.schema import Schema
    from tests.unit.test_peer_session import begun
    from tests.unit.test_scheduler_state import SCHEMA, Clock, conn, signup

    clock = Clock()
    ids = itertools.count()
    state = SchedulerState(
        3, 3, 2, queue_wait=2.0, clock=clock, rng=random.Random(0),
        new_round_id=lambda: f"r{next(ids)}", schema_fingerprint=SCHEMA.fingerprint(),
    )  # fmt: skip
    state.receive(conn(1), signup(1))
    state.receive(conn(2), signup(2))
    other = Schema.of({"w": torch.zeros(4), "n": torch.zeros((), dtype=torch.int64)})
    (pinned,) = state.receive(conn(4), signup(4, schema=other))
    assert isinstance(pinned.message, SignupRejected)
    s = begun()
    s.receive_scheduler(SignupRejected("s", "me", pinned.message.code, pinned.message.reason), 0.1)
    quoted(str(s.error).replace("refused peer me", "refused peer p3"))
    state._signed_up[("s", "p3")] = conn(3)  # p3 signed up earlier; its round is over
    state.receive(conn(3), Farewell("s", "p3"))
    clock.now += 2.0
    refusal = state.tick()[0].message
    s = begun()
    s.receive_scheduler(SignupRejected("s", "me", refusal.code, refusal.reason), 0.1)
    assert type(s.error).__name__ == "TooFewPeersError"
    quoted(f"TooFewPeersError: {s.error}".split(": ", 1)[1])
