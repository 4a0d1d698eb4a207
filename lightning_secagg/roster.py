"""Admission control: the roster of keys allowed to take part, and its file format.

A roster file lists one party per line, ``name public-key``: a short name for
logs, then the party's 40-character Z85 CURVE public key (the ``public-key``
of its ``NAME.key`` file, see ``lightning-secagg keygen``). A line whose
first field starts with ``#`` is a comment, and so is everything from a
third field that starts with ``#`` (Z85 keys may contain ``#`` themselves);
blank lines are ignored. A malformed line, a key or a name listed
twice, refuses the whole file with every bad line's number: a half-read
roster would silently admit or exclude the wrong parties.

This module imports neither torch nor ZeroMQ, so the scheduler's sans-IO
state and the peer side both use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lightning_secagg.errors import ConfigurationError
from lightning_secagg.messages import is_z85_key

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@+\-]{1,128}")
#: Largest roster file read (a roster of 100,000 parties is about 6 MB).
MAX_ROSTER_BYTES = 16 * 1024 * 1024


def key_fingerprint(public_key: str) -> str:
    """A short, non-secret name for a public key, for logs (never log a secret key)."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Roster:
    """An immutable set of admitted public keys, each with its party's name.

    Attributes:
        names: Public key (Z85) -> the party's name.
        source: Where it was read from, for messages.
    """

    names: Mapping[str, str] = field(default_factory=dict)
    source: str = "<roster>"

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", MappingProxyType(dict(self.names)))

    @classmethod
    def parse(cls, text: str, source: str = "<roster>") -> Roster:
        """Read the ``name public-key`` lines of ``text``.

        Raises:
            ConfigurationError: naming every malformed or duplicate line by number.
        """
        names: dict[str, str] = {}
        seen_names: dict[str, int] = {}
        seen_keys: dict[str, int] = {}
        problems: list[str] = []
        for number, raw in enumerate(text.splitlines(), 1):
            parts = raw.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) > 2 and parts[2].startswith("#"):
                parts = parts[:2]  # a trailing comment (keys may hold "#": not split there)
            if len(parts) != 2:
                problems.append(
                    f"line {number}: expected 'name public-key', got {len(parts)} fields"
                )
                continue
            name, key = parts
            if not _NAME_RE.fullmatch(name):
                problems.append(f"line {number}: bad name (1-128 of A-Z a-z 0-9 _ . : @ + -)")
                continue
            if not is_z85_key(key):
                problems.append(f"line {number}: not a 40-character Z85 public key")
                continue
            if key in seen_keys:
                problems.append(f"line {number}: key already listed on line {seen_keys[key]}")
                continue
            if name in seen_names:
                problems.append(f"line {number}: name already listed on line {seen_names[name]}")
                continue
            seen_keys[key], seen_names[name] = number, number
            names[key] = name
        if problems:
            shown = "; ".join(problems[:20])
            more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
            raise ConfigurationError(f"roster {source}: {shown}{more}")
        return cls(names, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        """Read a roster file (at most :data:`MAX_ROSTER_BYTES`).

        Raises:
            ConfigurationError: unreadable, too large, not UTF-8, or malformed.
        """
        p = os.fspath(path)
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_ROSTER_BYTES + 1)
        except OSError as exc:
            raise ConfigurationError(f"cannot read roster {p!r}: {exc.strerror}") from None
        if len(data) > MAX_ROSTER_BYTES:
            raise ConfigurationError(f"roster {p!r} is larger than {MAX_ROSTER_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"roster {p!r} is not UTF-8 text") from None
        return cls.parse(text, p)

    def admits(self, public_key: str | None) -> bool:
        """True when ``public_key`` is listed."""
        return public_key is not None and public_key in self.names

    def name_of(self, public_key: str) -> str | None:
        """The listed party's name, or None."""
        return self.names.get(public_key)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


class RosterFile:
    """A roster file, re-read when it changes.

    :meth:`poll` looks at the file's ``stat`` (inode, size, modification time)
    at most once per ``interval`` seconds, and re-reads it only when one of
    them changed; a file that became unreadable or malformed keeps the last
    good roster (and says so in the log, once per change).

    Args:
        path: The roster file.
        interval: Seconds between two looks at the file.
        clock: Monotonic seconds.

    Raises:
        ConfigurationError: the file cannot be read at start.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.path = os.fspath(path)
        self.interval = interval
        self._clock = clock or time.monotonic
        self._stamp = self._stat()
        self.roster = Roster.load(self.path)
        self._next = self._clock() + interval

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def next_check(self) -> float:
        """When :meth:`poll` next looks at the file."""
        return self._next

    def poll(self) -> Roster | None:
        """The new roster if the file changed and reads well; None otherwise."""
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + self.interval
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            roster = Roster.load(self.path)
        except ConfigurationError as exc:
            log.error("roster changed but cannot be used, keeping the previous one: %s", exc)
            return None
        self.roster = roster
        log.info("roster %s re-read: %d keys admitted", self.path, len(roster))
        return roster
