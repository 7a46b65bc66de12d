"""What happens to one item: decode once, encode, the request through the limiter, with
retries (`Analyzer`), whatever engine runs it (pipeline.engines).

Also the entry point of a worker process or a Dask worker, which builds its own analyzer
from the provider's name and the key-free settings (`analyse_file`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from imgbatch.config import Settings
from imgbatch.errors import Abandoned, ErrorCode, ImgbatchError, ItemError, LimiterClosed
from imgbatch.pipeline.items import Outcome, WorkItem, item_failure
from imgbatch.providers.base import Analysis, Provider
from imgbatch.records import FileRecord

if TYPE_CHECKING:
    import tenacity

log = logging.getLogger("imgbatch")


class Limiter(Protocol):
    """Rate limiting of remote requests (ratelimit.AdaptiveLimiter)."""

    def acquire(self, tokens: int = 0, max_pause: float | None = None) -> bool: ...

    def accepted(self) -> None: ...

    def rate_limited_for(self, retry_after: float | None) -> None: ...


@dataclass
class _Tries:
    """One item's requests, and what its retries have used of their budgets."""

    requests: int = 0  # requests sent, failovers included: the record's `attempts`
    failures: int = 0  # failed requests other than 429s and failovers: max_attempts
    limited: int = 0  # 429s without a retry delay: they back off on their own
    deadline: float | None = None  # max_wait after the item first met a 429 (monotonic)
    delay: float = 0.0  # the wait before the next request
    give_up: bool = False  # the last failure ends the item

    def rate_limited(self, since: float, max_wait: float) -> float:
        """The item met a 429 (its own, or a pause it waited out): its max_wait runs from
        the first time. Returns when it ends."""
        if self.deadline is None:
            self.deadline = since + max_wait
        return self.deadline

    def pause_left(self, max_wait: float) -> float:
        """How long the next request may wait out a 429's pause."""
        if self.deadline is None:
            return max_wait
        return max(0.0, self.deadline - time.monotonic())


def elapsed_ms(start: float) -> int:
    """Milliseconds since `start` (a time.monotonic() reading): an outcome's latency."""
    return int((time.monotonic() - start) * 1000)


class Analyzer:
    """What happens to one item: decode once, then the provider with retries.

    Args:
        settings: max side, retries and waits.
        provider: the analysing provider.
        limiter: taken before every request of a remote provider (None: unthrottled).
        stop: set when the run stops: queued items are abandoned, waits cut short.
    """

    def __init__(
        self,
        settings: Settings,
        provider: Provider,
        limiter: Limiter | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.provider = provider
        self.limiter = limiter if provider.remote else None
        self.stop = stop or threading.Event()
        self._local = threading.local()  # per thread: its Retrying, and the item's tries

    def work(self, item: WorkItem) -> Outcome:
        """Decode, encode and send one item (in a pool thread)."""
        from imgbatch.imaging import prepare

        if self.stop.is_set():  # queued behind a run-level stop: don't start
            raise Abandoned
        start = time.monotonic()
        try:
            s, rec = self.settings, item.rec
            image = prepare(rec.path, s.max_side, rec.hash, storage_options=s.storage_option)
            tokens = self.tokens(*image.image.size)
            # encoded once, before a slot is taken: nothing slow between slot and send
            body = self.provider.encode(image)
        except Exception as exc:  # a decoder or provider bug must not kill the run
            return self._failed(item, exc, start, 0)
        return self.send(item, body, tokens, start)

    def tokens(self, width: int, height: int) -> int:
        """A request's estimated input tokens for an upload of this size: the image by the
        provider's rule, and its prompt (what the limiter counts against `tpm`)."""
        return self.provider.estimate_tokens(width, height) + self.provider.prompt_tokens

    def send(self, item: WorkItem, body: Any, tokens: int, start: float) -> Outcome:
        """Send an encoded item to the provider, with retries."""
        from imgbatch.providers.base import Failover
        from imgbatch.ratelimit import WaitTooLong

        if self.stop.is_set():
            raise Abandoned
        tries = _Tries()
        max_wait = self.settings.max_wait
        limiter = self.limiter

        def request() -> Analysis:
            if limiter is not None:  # every request takes a slot, failovers too
                asked = time.monotonic()
                try:
                    if limiter.acquire(tokens, max_pause=tries.pause_left(max_wait)):
                        tries.rate_limited(asked, max_wait)
                except WaitTooLong as exc:  # transient: the next run retries the item
                    raise ItemError(
                        ErrorCode.RATE_LIMIT,
                        f"{exc}: past max_wait ({max_wait:g}s)",
                        retryable=False,
                    ) from None
            tries.requests += 1
            try:
                analysis = self.provider.analyze(body)
            except ItemError as exc:
                rate_limit = exc.code is ErrorCode.RATE_LIMIT
                if rate_limit and limiter is not None and not isinstance(exc, Failover):
                    limiter.rate_limited_for(exc.retry_after)
                raise
            if limiter is not None:
                limiter.accepted()
            return analysis

        try:
            analysis = self._retrying(tries)(request)
            return Outcome(
                "ok",
                analysis.result,
                attempts=tries.requests,
                input_tokens=analysis.input_tokens,
                output_tokens=analysis.output_tokens,
                latency_ms=elapsed_ms(start),
            )
        except ItemError as exc:
            return self._failed(item, exc, start, tries.requests)
        except ImgbatchError:
            self.stop.set()  # a run-level stop: no other thread starts a request
            raise
        except Abandoned:
            raise
        except LimiterClosed:
            raise Abandoned from None
        except Exception as exc:  # a provider bug must not kill the run: record it
            return self._failed(item, exc, start, tries.requests)

    @staticmethod
    def _failed(item: WorkItem, exc: Exception, start: float, attempts: int) -> Outcome:
        """The item's outcome for what its work raised (items.item_failure): an ItemError
        with its latency, a bug's AI_ERROR without."""
        more = {"latency_ms": elapsed_ms(start)} if isinstance(exc, ItemError) else {}
        return item_failure(item, exc, "analysing", attempts=attempts, **more)

    def _retrying(self, tries: _Tries) -> tenacity.Retrying:
        """The retry loop for an item's `tries`: one Retrying per thread, built once (it
        costs ~60 us, a tenth of a thumbnail's whole analysis), reading the current
        item's tries from the thread's slot."""
        local = self._local
        local.tries = tries
        retrying: tenacity.Retrying | None = getattr(local, "retrying", None)
        if retrying is None:
            retrying = local.retrying = self._new_retrying(local)
        return retrying

    def _new_retrying(self, local: threading.local) -> tenacity.Retrying:
        """Retries of what is retryable. Other transient errors: exponential backoff with
        full jitter, up to `max_attempts`. 429s use no attempt: from the item's first 429
        (its own, or a pause it waited out) it has `max_wait` seconds, the limiter's pauses
        and its own backoffs included, then ends as RATE_LIMIT. A Failover is sent again at
        once, using no attempt (as a 429, it uses the item's max_wait)."""
        import tenacity  # here: a re-run with nothing to analyse never pays for it

        from imgbatch.providers.base import Failover

        s = self.settings

        def note(state: tenacity.RetryCallState) -> None:
            """After a failed request that may be retried (before `wait` and `stop`, in
            every tenacity version): what it used up, the wait before the next one."""
            tries: _Tries = local.tries
            exc = state.outcome.exception() if state.outcome else None
            now = time.monotonic()
            if isinstance(exc, ItemError) and exc.code is ErrorCode.RATE_LIMIT:
                deadline = tries.rate_limited(now, s.max_wait)
                if isinstance(exc, Failover):
                    delay = 0.0  # another key is ready
                elif exc.retry_after is not None:  # the limiter pauses everyone that long
                    delay = 0.0 if self.limiter is not None else exc.retry_after
                else:  # a bare 429: back off on our own
                    tries.limited += 1
                    delay = random.uniform(0, min(60.0, s.retry_delay * 2 ** (tries.limited - 1)))
                tries.delay, tries.give_up = delay, now + delay > deadline
            elif isinstance(exc, Failover):  # a rejected key: the pool shrinks, so this ends
                tries.delay, tries.give_up = 0.0, False
            else:
                tries.failures += 1
                ceiling = min(60.0, s.retry_delay * 2 ** (tries.failures - 1))
                retry_after = getattr(exc, "retry_after", None) or 0.0
                tries.delay = max(random.uniform(0, ceiling), retry_after)
                tries.give_up = tries.failures >= s.max_attempts

        def sleep(seconds: float) -> None:
            if self.stop.wait(seconds):
                raise Abandoned

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, ItemError) and e.retryable),
            after=note,
            stop=lambda _: local.tries.give_up,
            wait=lambda _: local.tries.delay,
            sleep=sleep,
            reraise=True,
        )


# -- in a worker process (engines.procs) or on a Dask worker (engines.dask) --------------

_analyzers: dict[tuple[str, Settings], Analyzer] = {}
_analyzers_lock = threading.Lock()


def analyzer_for(provider: str, settings: Settings) -> Analyzer:
    """One analyzer per process and settings, its provider built once."""
    key = (provider, settings)
    with _analyzers_lock:
        found = _analyzers.get(key)
        if found is None:
            from imgbatch.providers import base

            found = _analyzers[key] = Analyzer(settings, base.create(provider, settings))
        return found


def analyse_file(path: str, content_hash: str, provider: str, settings: Settings) -> Outcome:
    """The whole analysis of one file by a local (offline) provider, in another process."""
    item = WorkItem(FileRecord(path, hash=content_hash), "", "")
    return analyzer_for(provider, settings).work(item)
