"""The shared, adaptive rate limiter for remote requests.

Requests are spaced evenly (a GCRA-style schedule: each request takes the next slot
`60 / rate` seconds after the previous one), so the configured `rpm` is never exceeded
and there are no bursts. It adapts to the quota the server really has:

- a 429 pauses every thread until the server's retry delay has passed, and lowers the
  rate to below what the server was seen to accept recently (multiplicative decrease,
  once per congestion event, however many in-flight requests were refused); a request
  may bound how long it waits out such a pause (`acquire(max_pause=...)`), and is then
  refused at once, rather than held, when the pause would outlast it;
- each accepted request raises the rate again, never above `rpm`: quickly (+5%) up to
  90% of the rate the server was last seen to accept, then slowly (+0.5%), probing; so
  the limiter settles near the real quota instead of bouncing off it.

With `tpm`, each request also takes its estimated input tokens from the schedule.
With `rpm` 0 requests are not paced (a local server is limited by the workers, not by a
quota), but a 429's retry delay still pauses every thread.

Hand-written: the maintained limiters considered (`pyrate-limiter`, `limits`) enforce
fixed rates; neither adapts to 429s nor pauses all threads for a server's retry delay.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

MIN_RPM = 1.0
MARGIN = 0.02  # pace 2% under the rate: threads waking late must not push a window over it
DECREASE = 0.7  # on a quota 429: below the accepted rate by this factor
MILD_DECREASE = 0.95  # on a bare 429 (no quota details): a hint, not a measurement
FAST_INCREASE = 0.05  # per accepted request, below the last known-good rate
SLOW_INCREASE = 0.005  # per accepted request, above it (at least +0.5 rpm)
GOOD = 0.9  # the known-good rate: this much of the rate accepted before a 429
WINDOW = 60.0  # seconds of accepted requests remembered to measure the accepted rate


class Interrupted(Exception):
    """The limiter was closed while a thread waited in it."""


class WaitTooLong(Exception):
    """A 429's pause would hold this request longer than it may wait."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"rate limited for {seconds:.0f}s more")
        self.seconds = seconds  # left of the pause


class AdaptiveLimiter:
    """Thread-safe pacing of remote requests; see the module docstring."""

    def __init__(
        self,
        rpm: float,
        tpm: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
    ) -> None:
        self.paced = rpm > 0  # rpm 0: no pacing, no rate to learn; 429 pauses only
        self.ceiling = float(rpm)
        self.rate = float(rpm)
        self._good = float(rpm)  # up to here the rate recovers quickly
        self.tpm = float(tpm)
        self._clock = clock
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._next = 0.0  # the earliest moment the next request may start
        self._paused_until = 0.0
        self._last_decrease = -1e18
        self._accepted: deque[float] = deque()
        self.rate_limited = 0  # 429s seen
        self.acquired = 0  # requests let through
        self.waited = 0.0  # seconds threads spent waiting here, summed

    def acquire(self, tokens: int = 0, max_pause: float | None = None) -> bool:
        """Block until this request may start; returns whether a 429's pause held it.

        With `max_pause`, raises WaitTooLong at once, booking nothing, when a pause would
        hold the request longer than that many seconds (the pacing alone is never refused).
        Raises Interrupted if stopping.
        """
        held = False
        limit = None if max_pause is None else self._clock() + max_pause
        while True:
            with self._lock:
                now = self._clock()
                if limit is not None and self._paused_until > limit:
                    raise WaitTooLong(self._paused_until - now)
                held = held or self._paused_until > now
                start = max(now, self._next, self._paused_until)
                interval = 60.0 * (1 + MARGIN) / self.rate if self.paced else 0.0
                if self.tpm and tokens:
                    interval = max(interval, 60.0 * (1 + MARGIN) * tokens / self.tpm)
                self._next = start + interval
            delay = start - now
            if delay > 0:
                self.waited += delay
                if self._stop.wait(delay):
                    raise Interrupted
            with self._lock:
                # a 429 may have paused everyone while this thread slept: book again
                if self._paused_until <= self._clock():
                    self.acquired += 1
                    return held

    def accepted(self) -> None:
        """The server accepted a request: remember it, and raise the rate a little."""
        if not self.paced:
            return
        with self._lock:
            now = self._clock()
            self._accepted.append(now)
            while self._accepted and self._accepted[0] < now - WINDOW:
                self._accepted.popleft()
            step = FAST_INCREASE if self.rate < self._good else SLOW_INCREASE
            rate = self.rate + max(0.5, self.rate * step)
            if self.rate < self._good:
                rate = min(rate, self._good)
            self.rate = min(self.ceiling, rate)

    def rate_limited_for(self, retry_after: float | None) -> None:
        """The server answered 429: with a retry delay (a quota's answer), pause everyone
        and slow down below the accepted rate, once per event; without one, slow down a
        little (the item backs off on its own)."""
        with self._lock:
            now = self._clock()
            self.rate_limited += 1
            if retry_after is None:
                if self.paced and now - self._last_decrease >= 1.0:
                    self._last_decrease = now
                    self.rate = max(MIN_RPM, self.rate * MILD_DECREASE)
                return
            pause = retry_after
            self._paused_until = max(self._paused_until, now + pause)
            if not self.paced:
                return
            # requests already in flight when the quota ran out are refused too:
            # they belong to the same event and must not cut the rate again
            if now - self._last_decrease < max(pause, 1.0):
                return
            self._last_decrease = now
            seen = self._accepted_rate(now)
            basis = self.rate if seen is None else min(self.rate, seen)
            self._good = GOOD * basis
            self.rate = max(MIN_RPM, basis * DECREASE)

    def _accepted_rate(self, now: float) -> float | None:
        """Requests per minute the server accepted recently, or None if too few to tell."""
        while self._accepted and self._accepted[0] < now - WINDOW:
            self._accepted.popleft()
        if len(self._accepted) < 2:
            return None
        span = max(now - self._accepted[0], 1.0)
        return 60.0 * len(self._accepted) / span
