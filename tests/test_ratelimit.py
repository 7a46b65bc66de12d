"""The adaptive limiter, on a fake clock: pacing, 429 pauses, learning the real quota."""

from __future__ import annotations

import threading
from collections import deque

import pytest

from imgbatch.errors import LimiterClosed
from imgbatch.ratelimit import MARGIN, STEP_BACK, AdaptiveLimiter, WaitTooLong


class Clock:
    """A clock that only moves when a waiting thread 'sleeps' through the stop event."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SleepingEvent(threading.Event):
    """`wait(t)` advances the fake clock by t instead of sleeping."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += timeout or 0.0
        return self.is_set()


def limiter(rpm: float, tpm: float = 0.0) -> tuple[AdaptiveLimiter, Clock]:
    clock = Clock()
    return AdaptiveLimiter(rpm, tpm, clock=clock, stop=SleepingEvent(clock)), clock


def starts(lim: AdaptiveLimiter, clock: Clock, n: int, tokens: int = 0) -> list[float]:
    out = []
    for _ in range(n):
        lim.acquire(tokens)
        out.append(clock.now)
    return out


def test_requests_are_spaced_evenly_never_above_rpm() -> None:
    lim, clock = limiter(rpm=120)
    times = starts(lim, clock, 10)
    # 0.5 s apart, with a 1% margin so that start-time jitter never exceeds the rate
    assert times == pytest.approx([0.5 * (1 + MARGIN) * i for i in range(10)])
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:], strict=False))


def test_tokens_per_minute_space_large_requests_further() -> None:
    lim, clock = limiter(rpm=6000, tpm=600)
    times = starts(lim, clock, 3, tokens=100)  # 100 tokens at 600/min: one per 10 s
    assert times == pytest.approx([0.0, 10.0 * (1 + MARGIN), 20.0 * (1 + MARGIN)])


def test_a_429_pauses_everyone_for_the_retry_delay_and_slows_down() -> None:
    lim, clock = limiter(rpm=600)
    starts(lim, clock, 5)
    for _ in range(5):
        lim.accepted()
    before = lim.rate
    lim.rate_limited_for(3.0)
    assert lim.rate < before
    lim.acquire()
    assert clock.now >= 0.4 + 3.0  # nobody starts before the retry delay is over


def test_in_flight_429s_of_one_event_cut_the_rate_once() -> None:
    lim, _ = limiter(rpm=600)
    lim.rate_limited_for(2.0)
    once = lim.rate
    lim.rate_limited_for(2.0)
    lim.rate_limited_for(2.0)
    assert lim.rate == once and lim.rate_limited == 3


def test_the_first_quota_429_teaches_the_window_it_ends() -> None:
    lim, clock = limiter(rpm=6000)
    for _ in range(20):  # the server accepts 20 requests over 10 s: 120/min
        lim.acquire()
        lim.accepted()
        clock.now += 0.5
    lim.rate_limited_for(1.0)  # its window began with the first request, ends in 1 s
    assert lim.rate == pytest.approx(60 * 20 / 11)  # 20 per 11 s
    assert lim.rate < 120  # below what the server was seen to accept


def test_answers_in_flight_when_the_pause_began_count_once_it_ends() -> None:
    lim, clock = limiter(rpm=6000)
    for _ in range(10):
        lim.acquire()
        lim.accepted()
    end = clock.now + 4.0
    lim.rate_limited_for(4.0)  # the window is full: 10 answers seen so far
    for _ in range(6):  # six more were accepted: their answers arrive during the pause
        lim.accepted()
    lim.acquire()  # the pause is over
    assert clock.now == pytest.approx(end)
    assert lim.rate == pytest.approx(60 * 16 / end)


def test_accepted_requests_raise_the_rate_back_but_never_past_rpm() -> None:
    lim, _ = limiter(rpm=100)
    lim.rate_limited_for(1.0)
    low = lim.rate
    for _ in range(10):
        lim.accepted()
    assert low < lim.rate <= 100
    for _ in range(500):
        lim.accepted()
    assert lim.rate == 100


def test_a_slot_booked_before_a_pause_is_booked_again_after_it() -> None:
    clock = Clock()
    lim: AdaptiveLimiter
    paused = []

    class PauseWhileSleeping(SleepingEvent):
        def wait(self, timeout: float | None = None) -> bool:
            if not paused:  # another thread's request is refused meanwhile
                paused.append(True)
                lim.rate_limited_for(5.0)
            return super().wait(timeout)

    lim = AdaptiveLimiter(60, clock=clock, stop=PauseWhileSleeping(clock))
    lim.acquire()  # goes at once; this thread's next slot is 1 s (and the margin) away
    lim.acquire()
    assert clock.now >= 5.0  # it did not go out inside the pause


def test_a_request_may_bound_its_wait_for_a_pause_and_is_refused_at_once_past_it() -> None:
    lim, clock = limiter(rpm=600)
    assert lim.acquire(max_pause=0) is False  # not held by a pause
    lim.rate_limited_for(3600.0)  # "retry in an hour"
    with pytest.raises(WaitTooLong) as refused:
        lim.acquire(max_pause=600)
    assert refused.value.seconds == pytest.approx(3600) and clock.now == 0.0  # at once
    assert lim.acquire(max_pause=3600) is True  # within its bound: waits the pause out
    assert clock.now == pytest.approx(3600)


def test_a_pause_that_starts_while_a_request_waits_is_bounded_too() -> None:
    clock = Clock()
    lim: AdaptiveLimiter
    paused = []

    class PauseWhileSleeping(SleepingEvent):
        def wait(self, timeout: float | None = None) -> bool:
            if not paused:  # another thread's request is refused meanwhile
                paused.append(True)
                lim.rate_limited_for(3600.0)
            return super().wait(timeout)

    lim = AdaptiveLimiter(60, clock=clock, stop=PauseWhileSleeping(clock))
    lim.acquire()  # goes at once; this thread's next slot is 1 s (and the margin) away
    with pytest.raises(WaitTooLong):
        lim.acquire(max_pause=600)
    assert clock.now == pytest.approx(1.0 * (1 + MARGIN))


def test_a_bare_429_slows_down_a_little_and_pauses_nobody() -> None:
    lim, clock = limiter(rpm=600)
    lim.rate_limited_for(None)
    assert lim.rate == pytest.approx(600 * 0.95)
    lim.acquire()
    assert clock.now == 0.0


def test_a_stop_interrupts_a_waiting_thread() -> None:
    clock = Clock()
    stop = SleepingEvent(clock)
    lim = AdaptiveLimiter(1, clock=clock, stop=stop)
    lim.acquire()
    stop.set()
    with pytest.raises(LimiterClosed):
        lim.acquire()


def test_a_quota_429_past_the_learned_rate_steps_back_and_probes_half_as_fast() -> None:
    lim, clock = limiter(rpm=6000)
    for _ in range(20):  # accepted: 20 over 10 s
        lim.acquire()
        lim.accepted()
        clock.now += 0.5
    lim.rate_limited_for(1.0)
    lim.acquire()  # the pause is over: the quota is learned
    learned = lim.rate
    for _ in range(10):  # probing: +0.3% an accepted request
        lim.accepted()
    assert lim.rate == pytest.approx(learned * 1.003**10)
    clock.now += 5  # another event
    met = lim.rate
    lim.rate_limited_for(1.0)
    assert lim.rate == pytest.approx(met * STEP_BACK)
    back = lim.rate
    for _ in range(10):
        lim.accepted()
    assert lim.rate == pytest.approx(back * 1.0015**10)


def test_with_nothing_learned_a_quota_429_cuts_below_the_accepted_rate() -> None:
    lim, clock = limiter(rpm=600)
    lim.rate_limited_for(2.0)  # no request accepted yet: nothing to measure
    assert lim.rate == pytest.approx(600 * 0.7)


def test_the_limiter_learns_a_quota_far_below_rpm_instead_of_hitting_it_every_window() -> None:
    lim, clock = limiter(rpm=6000)
    window: deque[float] = deque()  # the server: 4 requests in any 1 s, on the same clock
    refused = []
    for i in range(100):
        lim.acquire()
        while window and window[0] <= clock.now - 1.0:
            window.popleft()
        if len(window) < 4:
            window.append(clock.now)
            lim.accepted()
        else:
            refused.append(i)
            lim.rate_limited_for(window[0] + 1.0 - clock.now)
    # 3 refusals: the first teaches the rate, later ones probe; without the decrease
    # the limiter goes back to --rpm after each pause, and 38 requests are refused
    assert len(refused) <= 5


def test_rpm_0_paces_nothing_but_a_429_still_pauses_everyone() -> None:
    lim, clock = limiter(rpm=0)  # a local server: limited by the workers, not by a quota
    assert starts(lim, clock, 50) == [0.0] * 50
    for _ in range(20):
        lim.accepted()
    lim.rate_limited_for(None)  # a bare 429: nothing to slow down from
    assert starts(lim, clock, 3) == [0.0] * 3
    lim.rate_limited_for(2.0)  # the server asked for a pause: everyone waits it out
    assert starts(lim, clock, 3) == pytest.approx([2.0] * 3)
    assert lim.rate_limited == 2


@pytest.mark.parametrize(("limit", "window", "items"), [(20, 5.0, 600), (4, 1.0, 100)])
def test_a_quota_far_below_rpm_is_used_to_95_percent_with_few_429s(
    limit: int, window: float, items: int
) -> None:
    """The benchmark's case on a fake clock (the deterministic twin of `make bench`'s
    gemini 5.): `limit` requests per sliding `window` at the server, --rpm 6000; an
    accepted request's answer arrives 0.2 s after its slot, a refusal at once. Only
    multiplicative decrease used 89% and 86% of these quotas."""
    lim, clock = limiter(rpm=6000)
    sent: deque[float] = deque()  # the server's sliding window
    accepted: list[float] = []
    refused = 0
    while len(accepted) < items:
        lim.acquire()
        while sent and sent[0] <= clock.now - window:
            sent.popleft()
        if len(sent) < limit:
            sent.append(clock.now)
            accepted.append(clock.now)
            clock.now += 0.2  # the answer arrives
            lim.accepted()
            clock.now -= 0.2
        else:
            refused += 1
            lim.rate_limited_for(sent[0] + window - clock.now)
    used = (len(accepted) - 1) / (accepted[-1] - accepted[0]) / (limit / window)
    assert used >= 0.95
    assert refused / (len(accepted) + refused) <= 0.05
