"""A multi-host network on one Linux machine: one network namespace per host.

Benchmarks and integration tests use it to put every process on its own
"machine": its own network namespace, its own address, its own link, capped to
a rate both ways. On loopback a round is CPU-bound; behind per-host links it is
bandwidth-bound, as in a real deployment.

Layout of one :class:`Network` (``<run>`` is unique per run)::

    lsnet-<run>-br                    the switch: a namespace holding one bridge
      br0 ── v0 ══ veth ══ eth0       lsnet-<run>-h0   198.18.0.1/24
          ── v1 ══ veth ══ eth0       lsnet-<run>-h1   198.18.0.2/24
          ...

Invariants:

* Nothing is created in the root namespace: the bridge and the switch side of
  every veth live in the run's own bridge namespace, the host side in the
  host's namespace. Two runs (even concurrent ones) share no interface, so the
  same addresses can be reused by each.
* Addresses come only from 198.18.0.0/15 (RFC 2544, reserved for benchmarking),
  and exist only inside the namespaces of the run.
* A capped host gets a token bucket (``tc tbf``) on the egress of both ends of
  its veth: its own ``eth0`` caps what it sends, the switch side ``v<i>`` what
  it receives. (netem does not exist in every kernel; tbf does.)
* :class:`Network` is a context manager whose exit ALWAYS ends the processes
  it started (by PID) and deletes its namespaces (which deletes their links),
  on exceptions and ``KeyboardInterrupt`` too. Namespaces left behind by a run
  that was killed outright carry their creator's PID in their name; the next
  run deletes those whose creator is gone (:func:`remove_stale`).

Requires root, ``ip`` and ``tc`` (iproute2); :func:`unavailable_reason` says
why not, for a test skip or an error message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

#: Every namespace this module creates starts with this prefix.
PREFIX = "lsnet-"
#: The benchmarking range (RFC 2544); every address handed out lies in it.
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
#: The subnet of one run (its bridge is isolated, so every run may use the same one).
SUBNET = ipaddress.ip_network("198.18.0.0/24")
MAX_HOSTS = SUBNET.num_addresses - 2
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(?P<pid>\d+)-[0-9a-f]+-(?:br|h\d+)$")
_RATE_RE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>[kmg]?)(?:bit)?$", re.IGNORECASE)
#: Seconds any single ``ip``/``tc`` command may take.
_CMD_TIMEOUT = 30.0


def rate_bits(rate: str) -> int:
    """``"100mbit"`` -> 100_000_000 bits per second (tc's decimal units: k, m, g).

    Raises:
        ValueError: not a rate such as ``100mbit``, ``1gbit`` or ``500kbit``.
    """
    m = _RATE_RE.fullmatch(rate.strip())
    if m is None or float(m.group("num")) <= 0:
        raise ValueError(f"rate must look like 100mbit, 1gbit or 500kbit, got {rate!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group("unit").lower()]
    return int(float(m.group("num")) * scale)


def _run(*argv: str) -> str:
    """Run one iproute2 command; raise with its stderr when it fails."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()[:500]}")
    return proc.stdout


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose creating process is gone.

    Only names this module makes (:data:`PREFIX`, the creator's PID) are
    touched; a live run's namespaces are left alone.

    Returns:
        The names deleted.
    """
    gone = []
    for name in _namespaces():
        m = _NAME_RE.fullmatch(name)
        if m and not _pid_alive(int(m.group("pid"))):
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=_CMD_TIMEOUT, check=False
            )
            gone.append(name)
    return gone


def unavailable_reason() -> str | None:
    """Why a :class:`Network` cannot be built here, or ``None`` when it can.

    Checks what the network needs, in order: Linux, root, ``ip`` and ``tc``, and
    that a namespace, a veth pair and a tbf qdisc can actually be created (a
    container without ``CAP_NET_ADMIN`` fails only there). The probe cleans up
    after itself.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root to include these"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        with Network(1, rate="100mbit"):
            pass
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace with a capped veth: {exc}"
    return None


@dataclass(frozen=True)
class Host:
    """One simulated machine: a namespace, its address and its cap."""

    name: str  #: a short name for humans ("sched", "p0", ...)
    netns: str  #: the namespace, for ``ip netns exec``
    address: str  #: its IPv4 address on the bridge (in 198.18.0.0/15)
    rate: str | None  #: the cap both ways, tc syntax; ``None``: uncapped

    def endpoint(self, port: int) -> str:
        """``tcp://ADDRESS:PORT`` on this host."""
        return f"tcp://{self.address}:{port}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it:
        the process started is the command itself, with its own PID)."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Network:
    """Hosts on one bridge, each in its own namespace, capped both ways.

    Args:
        hosts: How many hosts, or their names (``"h0"``, ``"h1"``... by default).
        rate: Every capped host's rate both ways, tc syntax (``"100mbit"``);
            ``None``: no caps.
        uncapped: Names of hosts that get no cap (e.g. the scheduler's).

    Use it as a context manager; its exit stops every process started with
    :meth:`popen` and deletes everything the network created.
    """

    def __init__(
        self, hosts: int | Sequence[str], rate: str | None = None, uncapped: Sequence[str] = ()
    ) -> None:
        names = [f"h{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= MAX_HOSTS or len(set(names)) != len(names):
            raise ValueError(f"need 1 to {MAX_HOSTS} distinct host names, got {len(names)}")
        if rate is not None:
            rate_bits(rate)  # validated before anything is created
        self.rate = rate
        self.run_id = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self._names = names
        self._uncapped = set(uncapped)
        self.hosts: dict[str, Host] = {}
        self._created: list[str] = []  # namespaces, in creation order
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- life cycle ----------------------------------------------------------------------
    def __enter__(self) -> Network:
        try:
            remove_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """End every process started here (by PID), then delete every namespace.

        Idempotent; errors while deleting do not stop the rest of the cleanup.
        """
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a process stuck in D state
                proc.wait(timeout=10)
        self._procs.clear()
        for name in reversed(self._created):
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=_CMD_TIMEOUT, check=False
            )
        self._created.clear()

    def _add_netns(self, name: str) -> None:
        # Recorded first: a Ctrl-C while `ip netns add` runs still gets it deleted.
        self._created.append(name)
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        bridge_ns = f"{self.run_id}-br"
        self._add_netns(bridge_ns)
        _run("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", bridge_ns, "link", "set", "br0", "up")
        addresses = SUBNET.hosts()
        for i, name in enumerate(self._names):
            ns = f"{self.run_id}-h{i}"
            self._add_netns(ns)
            address = str(next(addresses))
            assert ipaddress.ip_address(address) in BENCH_NET  # the module's invariant
            switch_side = f"v{i}"
            # Both ends are created inside the bridge namespace; the host end moves
            # straight into the host's namespace: no name in the root namespace.
            _run(
                "ip", "-n", bridge_ns, "link", "add", switch_side, "type", "veth",
                "peer", "name", "eth0", "netns", ns,
            )  # fmt: skip
            _run("ip", "-n", bridge_ns, "link", "set", switch_side, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            capped = self.rate is not None and name not in self._uncapped
            if capped:
                assert self.rate is not None
                _shape(ns, "eth0", self.rate)  # what the host sends
                _shape(bridge_ns, switch_side, self.rate)  # what it receives
            self.hosts[name] = Host(name, ns, address, self.rate if capped else None)

    # -- processes -----------------------------------------------------------------------
    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host``; :meth:`close` ends it by PID if it is still running."""
        proc = subprocess.Popen(self.hosts[host].command(argv), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        """End one process started here (terminate, then kill) and return its status."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout=timeout)

    def qdisc_stats(self, host: str) -> str:
        """``tc -s qdisc`` of a host's link (both ends), for diagnostics."""
        i = self._names.index(host)
        return _run("tc", "-n", self.hosts[host].netns, "-s", "qdisc", "show", "dev", "eth0") + (
            _run("tc", "-n", f"{self.run_id}-br", "-s", "qdisc", "show", "dev", f"v{i}")
        )


def _shape(netns: str, dev: str, rate: str) -> None:
    """A token bucket on ``dev``'s egress: ``rate``, 10 ms of burst, 50 ms of queue.

    The burst is at least 64 KiB: veth hands tbf segmentation-offload packets of
    up to 64 KiB, and tbf must be able to send the largest packet at once.
    """
    bits = rate_bits(rate)
    burst = max(64 * 1024, bits // 8 // 100)
    _run(
        "tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf",
        "rate", str(bits), "burst", str(burst), "latency", "50ms",
    )  # fmt: skip


def python_path_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with this checkout first on ``PYTHONPATH``."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


__all__ = [
    "BENCH_NET",
    "PREFIX",
    "Host",
    "Network",
    "python_path_env",
    "rate_bits",
    "remove_stale",
    "unavailable_reason",
]
