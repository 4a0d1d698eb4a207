"""Bounded, rate-limited logging for input an attacker controls.

A hostile client can make a process log once per message it sends. Every such
line goes through a :class:`LogLimiter`: a token bucket that lets a burst of
lines through, then at most one line per ``interval`` seconds, and says how
many lines it held back when it speaks again. The text of each line is the
caller's job to bound (see :func:`lightning_secagg.messages.safe_text`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogLimiter:
    """A token bucket in front of one logger.

    Args:
        logger: Where the lines go.
        burst: Lines let through at once before the rate applies.
        interval: Seconds per further line.
        clock: Monotonic seconds (injectable for tests).

    Invariant: over any window of ``T`` seconds at most ``burst + T / interval``
    lines are written, whatever the caller does.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.suppressed = 0

    def allow(self) -> bool:
        """Take a token if one is left (the caller then logs); count a suppressed line if not."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log one line if the bucket allows it; True when it was written."""
        if not self.allow():
            return False
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} similar lines suppressed)"
            self.suppressed = 0
        self._log.log(level, msg, *args, exc_info=exc_info)
        return True
