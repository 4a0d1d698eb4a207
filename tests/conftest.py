"""Session guards: nothing a test started may outlive the run, and the run must end.

A CI run that printed its verdict and then never exited (once, in November 2026:
"1429 passed", then nothing until the 90-minute limit) lands nothing and says
nothing about why. Two guards turn such a hang into a report:

* Every process the tests start inherits a marker in its environment (all our
  helpers copy ``os.environ``). When the session ends, any process still
  carrying it, an orphan included, is listed and killed by its PID: an orphan
  holding the runner's stdout keeps a pipe reader waiting forever.
* A watchdog thread: if the interpreter has not exited two minutes after the
  session ended (a non-daemon thread that never returns, an atexit handler that
  blocks), it prints every thread's stack and exits with the session's status.
  Python threads stop running once the interpreter starts tearing down its
  modules, where a ZeroMQ context with a socket still open would block in
  ``zmq_ctx_term``; faulthandler's C watchdog covers that phase a minute
  later, printing the stacks and exiting with status 1.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

MARKER = "LIGHTNING_SECAGG_TEST_SESSION"
EXIT_GRACE_S = 120.0
TEARDOWN_GRACE_S = 180.0


def pytest_configure(config: pytest.Config) -> None:
    # A token of this session's own, even if pytest was started by another session's test.
    os.environ[MARKER] = f"{os.getpid()}-{secrets.token_hex(8)}"


def _marked_processes(token: str) -> list[tuple[int, str]]:
    """(pid, command line) of every other process whose environment carries ``token``."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(entry.name), cmd.strip()))
    return found


def _watchdog(exitstatus: int) -> None:
    time.sleep(EXIT_GRACE_S)
    stream = sys.__stderr__
    if stream is not None:
        stream.write(
            f"\nconftest watchdog: the interpreter did not exit {EXIT_GRACE_S:.0f} s after the "
            f"session ended; live threads and their stacks follow, then exit {exitstatus}.\n"
        )
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()
    os._exit(exitstatus)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line, yellow=True, bold=True)
        else:
            print(line, file=sys.stderr)

    token = os.environ.get(MARKER, "")
    if token and sys.platform.startswith("linux"):
        leftovers = _marked_processes(token)
        for pid, cmd in leftovers:
            say(f"conftest: process {pid} outlived the tests; killing it: {cmd[:200]}")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    # Daemon threads (pyzmq's zero-copy garbage collector, for one) do not hold up the
    # exit by themselves; one that does shows in the watchdog's stacks.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            say(f"conftest: thread {thread.name!r} is still alive and will hold up the exit")
    stream = sys.__stderr__
    if stream is not None:
        faulthandler.dump_traceback_later(TEARDOWN_GRACE_S, exit=True, file=stream)
    threading.Thread(
        target=_watchdog, args=(int(exitstatus),), name="conftest-exit-watchdog", daemon=True
    ).start()
