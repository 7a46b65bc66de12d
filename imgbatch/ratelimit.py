"""The shared, adaptive rate limiter for remote requests.

Requests are spaced evenly (a GCRA-style schedule: each request takes the next slot
`60 / rate` seconds after the previous one), so the configured `rpm` is never exceeded
and there are no bursts. It adapts to the quota the server really has:

- a 429 with a retry delay (a quota's answer) pauses every thread until the server's
  retry delay has passed, once per congestion event however many in-flight requests
  were refused; a request may bound how long it waits out such a pause
  (`acquire(max_pause=...)`), and is then refused at once, rather than held, when the
  pause would outlast it;
- the first such 429 teaches the quota: the window it belongs to ends when the retry
  delay does, and began at the first request; the requests the server accepted from
  then until the pause ends filled it. The rate goes to that many per that long (again
  when the pause ends, with the answers in flight counted);
- each accepted request raises the rate again, never above `rpm`: quickly (+5%) up to
  the rate last known to be good, then slowly (+0.3%), probing; a later quota 429 means
  the probe went past the quota: the rate steps back under the one that met it, and
  probes half as fast from then on. So the limiter settles just under the real quota
  instead of bouncing off it;
- a 429 without a retry delay (no quota details) slows down a little: a hint, not a
  measurement; without anything learned yet, a quota 429 cuts the rate
  multiplicatively, below the rate the server was seen to accept.

With `tpm`, each request also takes its estimated input tokens from the schedule.
With `rpm` 0 requests are not paced (a local server is limited by the workers, not by a
quota), but a 429's retry delay still pauses every thread.

Hand-written: the maintained limiters considered (`pyrate-limiter`, `limits`) enforce
fixed rates; neither adapts to 429s nor pauses all threads for a server's retry delay.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections import deque
from collections.abc import Callable

from imgbatch.errors import LimiterClosed


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """An HTTP `Retry-After` value in seconds from `now` (time.time()): a number of
    seconds or an HTTP date, never negative; None when absent or unreadable."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


MIN_RPM = 1.0
MARGIN = 0.02  # pace 2% under the rate: threads waking late must not push a window over it
DECREASE = 0.7  # on a quota 429 with nothing learned: below the accepted rate by this factor
MILD_DECREASE = 0.95  # on a bare 429 (no quota details): a hint, not a measurement
FAST_INCREASE = 0.05  # per accepted request, below the last known-good rate
SLOW_INCREASE = 0.003  # per accepted request, above it (at least +0.5 rpm): probing
GOOD = 0.9  # with nothing learned, the known-good rate: this much of the accepted rate
STEP_BACK = 0.97  # a quota 429 while probing past the learned rate: under the rate that met it
MIN_PROBE = 0.0002  # each step back halves the probing above a known quota, down to this
WINDOW = 60.0  # seconds of accepted requests remembered to measure the accepted rate


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
        self._first: float | None = None  # the first request's slot: where a window began
        self._learn_at: float | None = None  # a quota window to measure once its pause ends
        self._learned = False  # the quota's rate is known (then 429s only step back)
        self._probe = SLOW_INCREASE  # per accepted request above a known quota
        self.rate_limited = 0  # 429s seen
        self.acquired = 0  # requests let through
        self.waited = 0.0  # seconds threads spent waiting here, summed

    def acquire(self, tokens: int = 0, max_pause: float | None = None) -> bool:
        """Block until this request may start; returns whether a 429's pause held it.

        With `max_pause`, raises WaitTooLong at once, booking nothing, when a pause would
        hold the request longer than that many seconds (the pacing alone is never refused).
        Raises errors.LimiterClosed if stopping.
        """
        held = False
        limit = None if max_pause is None else self._clock() + max_pause
        while True:
            with self._lock:
                now = self._clock()
                if limit is not None and self._paused_until > limit:
                    raise WaitTooLong(self._paused_until - now)
                held = held or self._paused_until > now
                if self._learn_at is not None and now >= self._learn_at:
                    self._learn(self._learn_at)  # the window's answers are all in now
                start = max(now, self._next, self._paused_until)
                if self._first is None and self.paced:
                    self._first = start
                interval = 60.0 * (1 + MARGIN) / self.rate if self.paced else 0.0
                if self.tpm and tokens:
                    interval = max(interval, 60.0 * (1 + MARGIN) * tokens / self.tpm)
                self._next = start + interval
            delay = start - now
            if delay > 0:
                self.waited += delay
                if self._stop.wait(delay):
                    raise LimiterClosed
            with self._lock:
                now = self._clock()
                if self._learn_at is not None and now >= self._learn_at:
                    self._learn(self._learn_at)  # for the slots booked from now on
                # a 429 may have paused everyone while this thread slept: book again
                if self._paused_until <= now:
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
            if self.rate < self._good:
                rate = min(self._good, self.rate + max(0.5, self.rate * FAST_INCREASE))
            elif self._learned:  # probing just above a known quota, more gently each time
                rate = self.rate * (1 + self._probe)
            else:
                rate = self.rate + max(0.5, self.rate * SLOW_INCREASE)
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
            if self._learned:  # probing went past the quota: step back under it
                self.rate = self._good = max(MIN_RPM, self.rate * STEP_BACK)
                self._probe = max(MIN_PROBE, self._probe / 2)
                return
            if self._first is not None and self._learn_at is None:
                # the quota's window began with our first request and ends with the pause:
                # measured when the pause ends, once the answers in flight are in
                self._learn_at = now + pause
            if not self._window_rate(self._first, now + pause):  # what is known so far
                seen = self._accepted_rate(now)
                basis = self.rate if seen is None else min(self.rate, seen)
                self._good = GOOD * basis
                self.rate = max(MIN_RPM, basis * DECREASE)

    def _window_rate(self, first: float | None, end: float) -> bool:
        """Set the rate to the requests accepted in [first, end) per that time (a quota
        window that was filled); False if too few tell nothing. No margin: the retry
        delay is rounded up (to whole seconds above one), so the window measured is at
        least the real one, and pacing keeps its own MARGIN."""
        if first is None or end <= first:
            return False
        accepted = sum(1 for t in self._accepted if first <= t < end)
        if accepted < 2:
            return False
        self.rate = self._good = max(MIN_RPM, min(self.ceiling, 60.0 * accepted / (end - first)))
        return True

    def _learn(self, end: float) -> None:
        """The pause after the first quota 429 has ended: measure its window again."""
        assert self._first is not None
        self._learn_at = None
        self._learned = self._window_rate(self._first, end)

    def _accepted_rate(self, now: float) -> float | None:
        """Requests per minute the server accepted recently, or None if too few to tell."""
        while self._accepted and self._accepted[0] < now - WINDOW:
            self._accepted.popleft()
        if len(self._accepted) < 2:
            return None
        span = max(now - self._accepted[0], 1.0)
        return 60.0 * len(self._accepted) / span
