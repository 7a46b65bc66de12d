"""`analyze`: scanner records -> bounded pool -> retries -> sink, then checkpoint.

The stream is never materialised: the scanner is lazy, and at most `in_flight` items
(analyses plus duplicates waiting for one) are held at a time. Each finished item is
written to the sink first and committed to the checkpoint second, so a crash between
the two repeats that line on the next run, and never loses one (at-least-once).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from imgbatch.checkpoint import FORMAT_VERSION, Checkpoint, ItemState, claim_root
from imgbatch.config import Settings, results_dir, state_dir
from imgbatch.errors import (
    DECODER_MISSING,
    ContentChanged,
    ErrorCode,
    ExitCode,
    ImgbatchError,
    ItemError,
    UsageError,
)
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, Progress
from imgbatch.providers.base import Analysis, Provider, fingerprint_id
from imgbatch.ratelimit import Interrupted
from imgbatch.records import FileRecord, json_line
from imgbatch.results import ResultStore
from imgbatch.scanner import Scanner, check_root

if TYPE_CHECKING:
    import tenacity

log = logging.getLogger("imgbatch")

#: errors caused by the content itself: stored by hash, so duplicates share them
CONTENT_ERRORS = frozenset({ErrorCode.BAD_IMAGE.value, ErrorCode.BLOCKED.value})
RUN_SAVE_EVERY = 2.0  # seconds between run-record updates (read by `status`)
MAX_TAGS, TOP_TAGS = 2000, 500  # a run's tag counter: pruned to the top 500 past 2000
#: the offline analyzer's finished items are committed in groups: at most this many, or
#: this many seconds after the group's first, each group after its lines are flushed (and
#: synced to a file). A remote provider's are committed one by one: a crash must not make
#: the next run pay for a request again, and one commit is nothing beside one request.
COMMIT_EVERY = 64
COMMIT_DELAY = 0.5


class Limiter(Protocol):
    """Rate limiting of remote requests (ratelimit.AdaptiveLimiter)."""

    def acquire(self, tokens: int = 0, max_pause: float | None = None) -> bool: ...

    def accepted(self) -> None: ...

    def rate_limited_for(self, retry_after: float | None) -> None: ...


class Abandoned(Exception):
    """An item given up because the run is stopping: it is not recorded."""


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


@dataclass
class RunOptions:
    """Per-run choices that are not settings of the results."""

    fresh: bool = False  # re-process everything (deleting nothing up front)
    retry_failed: bool = False  # also retry permanent errors
    emit_all: bool = False  # re-emit stored results of unchanged files
    limit: int | None = None  # stop after this many processed items
    dry_run: bool = False  # list what would be sent, with estimated tokens; send nothing


@dataclass
class Outcome:
    """The end of one item's processing."""

    status: str  # "ok" | "error"
    result: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None
    attempts: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: int | None = None
    changed: bool = False  # the file changed since its scan: nothing true to store

    def stored(self, provider: str, model: str, run: int) -> dict[str, Any]:
        return {
            "status": self.status,
            "provider": provider,
            "model": model,
            "result": self.result,
            "code": self.code,
            "message": self.message,
            "attempts": self.attempts,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "latency_ms": self.latency_ms,
            "run": run,
        }

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> Outcome:
        return cls(
            d["status"],
            d.get("result"),
            d.get("code"),
            d.get("message"),
            d.get("attempts", 0),
            d.get("input_tokens"),
            d.get("output_tokens"),
            d.get("latency_ms"),
        )


@dataclass
class RunSummary:
    """Counts of one run; also the body of its run record."""

    id: int
    provider: str
    model: str
    fingerprint: str
    root: str
    started: float = field(default_factory=time.time)
    ended: float | None = None
    state: str = "QUEUED"
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    messages: Counter[tuple[str, str]] = field(default_factory=Counter)
    tags: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    exit_code: int | None = None
    total: int | None = None  # --limit: items this run processes at most
    listed: int | None = None  # files found by the listing-only count, once it has ended

    @property
    def failed(self) -> int:
        return self.counts["failed"]

    @property
    def elapsed(self) -> float:
        return (self.ended or time.time()) - self.started

    @property
    def images_per_min(self) -> float:
        return 60 * (self.counts["completed"] + self.counts["failed"]) / max(self.elapsed, 1e-9)

    def expected_total(self) -> int | None:
        """Items this run will write, as far as known: the files listed less the unchanged
        ones skipped so far (exact once the scan has passed them), at most --limit."""
        if self.listed is None:
            return self.total
        left = max(0, self.listed - self.counts["skipped"])
        return left if self.total is None else min(left, self.total)

    def count_tags(self, tags: list[Any]) -> None:
        """Count an item's tags. Free-form tags are countless: past MAX_TAGS distinct ones
        only the TOP_TAGS most common are kept (a tag dropped then counts afresh)."""
        self.tags.update(t for t in tags if isinstance(t, str))
        if len(self.tags) > MAX_TAGS:
            self.tags = Counter(dict(self.tags.most_common(TOP_TAGS)))

    def record(self) -> dict[str, Any]:
        """The run record stored in the checkpoint (plain data, for `status` and `runs`)."""
        return {
            "id": self.id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "root": self.root,
            "provider": self.provider,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "started": self.started,
            "updated": time.time(),
            "ended": self.ended,
            "state": self.state,
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "top_errors": [[c, m, n] for (c, m), n in self.messages.most_common(5)],
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "images_per_min": round(self.images_per_min, 1),
            "exit_code": self.exit_code,
            "total": self.expected_total(),
        }


@dataclass
class _Item:
    rec: FileRecord
    rel_dir: str
    name: str


class Pipeline:
    """One `analyze` run over ROOT. Library API: build it, call `run()`.

    Args:
        root: the folder to analyse.
        settings: all settings (scan filters, workers, max side, retries).
        options: fresh / retry-failed / emit-all / limit.
        provider: the analysing provider (see providers.base.create).
        checkpoint: where items, results and runs are recorded (locked by the caller).
        sink: where output lines go, one per item, flushed each.
        hash_cache: the scanner's hash cache, or None.
        limiter: taken before every request of a remote provider.
        progress: updated as items finish.
        stop: set it (e.g. from a signal handler) to stop taking new items.
    """

    def __init__(
        self,
        root: str,
        settings: Settings,
        options: RunOptions,
        provider: Provider,
        checkpoint: Checkpoint,
        sink: JsonlSink,
        hash_cache: HashCache | None = None,
        limiter: Limiter | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if not settings.hash:
            raise UsageError("analyze needs content hashes: --no-hash applies to scan only")
        self.root = os.path.abspath(root)
        self._root_len = len(self.root.rstrip("/") + "/")  # ROOT "/" included
        self.settings = settings
        self.options = options
        self.provider = provider
        self.checkpoint = checkpoint
        self.sink = sink
        self.limiter = limiter if provider.remote else None
        self.progress = progress
        self.stop = stop or threading.Event()
        self.scanner = Scanner(self.root, settings, hash_cache, on_wait=sink.flush)
        self.fp = fingerprint_id({"provider": provider.name, **provider.fingerprint()})
        run_id = 0 if options.dry_run else checkpoint.next_run_id()  # a dry run writes nothing
        self.summary = RunSummary(run_id, provider.name, provider.model, self.fp, self.root)
        self.summary.total = options.limit
        self._pending: dict[Future[Outcome], _Item] = {}
        self._waiting: dict[str, list[_Item]] = {}  # content hash -> duplicates in flight
        self._last_save = 0.0
        self._first_uncommitted: float | None = None
        self._commit_every = 1 if provider.remote else COMMIT_EVERY
        self._decoders: dict[str, bool] = {}  # decoder -> loads now (see _final)
        self._fatal: ImgbatchError | None = None

    # -- the run -----------------------------------------------------------------

    def run(self) -> RunSummary:
        """Process ROOT; returns the summary, raises ImgbatchError for a run-level stop."""
        s = self.summary  # QUEUED until its first item is written (see _emit)
        if not self.options.dry_run:
            self.checkpoint.set_root(self.root)  # for export and prune
        self._save(force=True)
        limit = self.options.limit
        max_in_flight = max(1, self.settings.in_flight or 2 * self.settings.workers)
        self._pool = pool = ThreadPoolExecutor(self.settings.workers, "imgbatch-ai")
        try:
            for rec in self.scanner:
                if self.stop.is_set() or self._fatal is not None:
                    break
                self._take(rec)
                if limit is not None and s.counts["processed"] >= limit:
                    break
                while self._in_flight() >= max_in_flight and not self.stop.is_set():
                    self._drain(block=True, timeout=0.5)
                    self._commit_written()
                if self._pending:
                    self._drain(block=False)
                self._commit_written()
            deadline: float | None = None
            while self._pending and self._fatal is None:
                if self.stop.is_set():  # stopping: in-flight items get `grace` seconds
                    deadline = deadline or time.monotonic() + self.settings.grace
                    left = deadline - time.monotonic()
                    if left <= 0:
                        running = sum(1 for f in self._pending if f.running())
                        log.warning(
                            "abandoning %d in-flight item(s); the next run redoes them",
                            running,
                        )
                        break
                    self._drain(block=True, timeout=left)
                else:
                    self._drain(block=True, timeout=0.5)  # wakes up to notice a stop
                self._commit_written()  # a slow trickle is committed within a second
        except BaseException as exc:  # closed output, interrupt: what is unrecorded is redone
            self.stop.set()
            if isinstance(exc, ImgbatchError) and self._fatal is None:
                self._fatal = exc  # e.g. stdout failed: the run record says FAILED, 5
            raise
        finally:
            self._finish(pool)
        if self._fatal is not None:
            raise self._fatal
        return s

    def _in_flight(self) -> int:
        """Analyses running or queued, plus duplicates waiting for one of them."""
        return len(self._pending) + sum(map(len, self._waiting.values()))

    def _take(self, rec: FileRecord) -> None:
        """Decide what one scanned file needs: nothing, a stored result, or analysis."""
        s, opts = self.summary, self.options
        rel_dir, _, name = rec.path[self._root_len :].rpartition("/")
        state = self.checkpoint.state(self.fp, rel_dir, name)
        if (  # the common case of a re-run, first and cheapest: unchanged and done
            state is not None
            and state[0] == rec.hash
            and rec.hash is not None
            and not opts.fresh
            and (state[1] is None or self._final(state[1], state[5]))
        ):
            s.counts["skipped"] += 1
            if opts.emit_all:
                stored = self.checkpoint.result(self.fp, rec.hash)
                if stored is not None:
                    self._write(_Item(rec, rel_dir, name), Outcome.from_stored(stored), True)
            return
        item = _Item(rec, rel_dir, name)
        if not rec.ok:  # a scan error (IO_ERROR): no content to analyse
            code = (rec.error_code or ErrorCode.IO_ERROR).value
            if (
                state is not None
                and state[:2] == (None, code)
                and not opts.fresh
                and self._final(code)
            ):
                s.counts["skipped"] += 1
                return
            outcome = Outcome("error", code=code, message=rec.error_message)
            self._emit(item, outcome, cached=False)
            return
        s.counts["processed"] += 1
        stored = self.checkpoint.result(self.fp, rec.hash or "")
        if stored is not None and self._reusable(stored):
            if opts.dry_run:  # nothing to send, and a dry run records nothing
                s.counts["cached"] += 1
            else:
                self._emit(item, Outcome.from_stored(stored), cached=True)
            return
        assert rec.hash is not None
        if opts.dry_run:
            self._dry_run(item)
            return
        if rec.hash in self._waiting:
            self._waiting[rec.hash].append(item)
            return
        self._waiting[rec.hash] = []
        self._pending[self._pool.submit(self._work, item)] = item

    def _dry_run(self, item: _Item) -> None:
        """Print what would be sent and its estimated input tokens (header read only)."""
        from imgbatch.imaging import estimate_tokens, fitted_size

        out = item.rec.fields()
        try:
            w, h = fitted_size(item.rec.path, self.settings.max_side)
            tokens = estimate_tokens(w, h, self.settings.gemini_media_resolution or None)
        except ItemError as exc:
            out.update(status="error", error={"code": exc.code.value, "message": exc.message})
            tokens = 0
        else:
            out["status"] = "would-send"
            self.summary.counts["would_send"] += 1
        out["provider"], out["model"] = self.provider.name, self.provider.model
        out["estimated_tokens"] = tokens if self.provider.remote else 0
        self.summary.input_tokens += out["estimated_tokens"]
        self.sink.write(json_line(out))

    def _final(self, code: str | None, message: str | None = None) -> bool:
        """Whether an item that ended with `code` is done for this run's options.

        A BAD_IMAGE that a missing decoder caused is done only while the decoder is
        still missing: once `pillow_heif` imports, it is retried without --retry-failed.
        """
        if code is None:
            return True
        if code == "BAD_IMAGE" and message and message.startswith(DECODER_MISSING):
            return not self._decoder_back(message) and not self.options.retry_failed
        return not ErrorCode(code).transient and not self.options.retry_failed

    def _decoder_back(self, message: str) -> bool:
        """Whether the decoder a decoder-missing message names loads now (asked once per
        decoder and run: only such items pay for importing Pillow here)."""
        key = "AVIF" if "AVIF" in message else "HEIF"
        if key not in self._decoders:
            from imgbatch.imaging import decoder_available

            self._decoders[key] = decoder_available(message)
        return self._decoders[key]

    def _reusable(self, stored: dict[str, Any]) -> bool:
        if self.options.fresh and stored.get("run") != self.summary.id:
            return False
        if stored["status"] == "ok":
            return True
        return stored.get("code") in CONTENT_ERRORS and not self.options.retry_failed

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        done, _ = wait(self._pending, timeout=timeout if block else 0, return_when=FIRST_COMPLETED)
        for fut in done:
            item = self._pending.pop(fut)
            try:
                outcome = fut.result()
            except Abandoned:
                self._waiting.pop(item.rec.hash or "", None)
                continue
            except ImgbatchError as exc:  # run-level: stop intake, record nothing for it
                if self._fatal is None:
                    self._fatal = exc
                    self.stop.set()
                self._waiting.pop(item.rec.hash or "", None)
                continue
            self._emit(item, outcome, cached=False)
            waiters = self._waiting.pop(item.rec.hash or "", [])
            if outcome.status == "ok" or outcome.code in CONTENT_ERRORS:
                for dup in waiters:
                    self._emit(dup, outcome, cached=True)
            elif waiters:  # a transient failure: the next duplicate tries for itself
                first, self._waiting[item.rec.hash or ""] = waiters[0], waiters[1:]
                self._pending[self._pool.submit(self._work, first)] = first

    # -- one item ----------------------------------------------------------------

    def _work(self, item: _Item) -> Outcome:
        """Runs in a pool thread: decode once, then the provider with retries."""
        from imgbatch.imaging import prepare
        from imgbatch.providers.base import Failover
        from imgbatch.ratelimit import WaitTooLong

        if self.stop.is_set():  # queued behind a run-level stop: don't start
            raise Abandoned
        start = time.monotonic()
        tries = _Tries()
        max_wait = self.settings.max_wait
        try:
            image = prepare(item.rec.path, self.settings.max_side, expect_hash=item.rec.hash)
            tokens = self.provider.estimate_tokens(image)
            # encoded once, before a slot is taken: nothing slow between slot and send
            request_body = self.provider.encode(image)

            def request() -> Analysis:
                if self.limiter is not None:  # every request takes a slot, failovers too
                    asked = time.monotonic()
                    try:
                        if self.limiter.acquire(tokens, max_pause=tries.pause_left(max_wait)):
                            tries.rate_limited(asked, max_wait)
                    except WaitTooLong as exc:  # transient: the next run retries the item
                        raise ItemError(
                            ErrorCode.RATE_LIMIT,
                            f"{exc}: past max_wait ({max_wait:g}s)",
                            retryable=False,
                        ) from None
                tries.requests += 1
                try:
                    analysis = self.provider.analyze(request_body)
                except ItemError as exc:
                    rate_limit = exc.code is ErrorCode.RATE_LIMIT
                    if rate_limit and self.limiter is not None and not isinstance(exc, Failover):
                        self.limiter.rate_limited_for(exc.retry_after)
                    raise
                if self.limiter is not None:
                    self.limiter.accepted()
                return analysis

            analysis = self._retrying(tries)(request)
            return Outcome(
                "ok",
                analysis.result,
                attempts=tries.requests,
                input_tokens=analysis.input_tokens,
                output_tokens=analysis.output_tokens,
                latency_ms=int((time.monotonic() - start) * 1000),
            )
        except ItemError as exc:
            return Outcome(
                "error",
                code=exc.code.value,
                message=exc.message,
                attempts=tries.requests,
                latency_ms=int((time.monotonic() - start) * 1000),
                changed=isinstance(exc, ContentChanged),
            )
        except ImgbatchError:
            self.stop.set()  # a run-level stop: no other thread starts a request
            raise
        except Abandoned:
            raise
        except Interrupted:
            raise Abandoned from None
        except Exception as exc:  # a provider bug must not kill the run: record it
            log.debug("unexpected error analysing %s", item.rec.path, exc_info=True)
            return Outcome(
                "error",
                code=ErrorCode.AI_ERROR.value,
                message=f"unexpected error: {type(exc).__name__}",
                attempts=tries.requests,
            )

    def _retrying(self, tries: _Tries) -> tenacity.Retrying:
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
            stop=lambda _: tries.give_up,
            wait=lambda _: tries.delay,
            sleep=sleep,
            reraise=True,
        )

    # -- output and bookkeeping ----------------------------------------------------

    def _emit(self, item: _Item, outcome: Outcome, cached: bool) -> None:
        """Write the line, then commit the item (at-least-once)."""
        self._write(item, outcome, cached)
        s, rec = self.summary, item.rec
        code = outcome.code
        message = outcome.message if outcome.status != "ok" else None
        # a changed file is recorded without a hash: the next run scans and analyses it
        content = None if outcome.changed else rec.hash
        state: ItemState = (content, code, s.id, rec.size, rec.mtime_ns, message)
        stored = None
        if not cached and (
            outcome.status == "ok"
            # a verdict of this machine's missing decoder is not one about the content
            or (code in CONTENT_ERRORS and not (message or "").startswith(DECODER_MISSING))
        ):
            stored = outcome.stored(self.provider.name, self.provider.model, s.id)
        if not self.options.dry_run:
            self.checkpoint.commit(self.fp, item.rel_dir, item.name, state, stored)
            self._commit_written()
        if outcome.status == "ok":
            s.counts["completed"] += 1
            tags = (outcome.result or {}).get("tags")
            if isinstance(tags, list):
                s.count_tags(tags)
        else:
            s.counts["failed"] += 1
            s.errors[code or "?"] += 1
            s.messages[(code or "?", outcome.message or "")] += 1
        if cached:
            s.counts["cached"] += 1
        else:
            s.input_tokens += outcome.input_tokens or 0
            s.output_tokens += outcome.output_tokens or 0
        if self.progress is not None:
            self.progress.update(
                s.counts["completed"] + s.counts["failed"],
                failed=s.counts["failed"],
                total=s.expected_total(),
                cached=s.counts["cached"],
            )
        if s.state == "QUEUED":  # its first item is written: the run is under way
            s.state = "PROCESSING"
            self._save(force=True)
        else:
            self._save()

    def _write(self, item: _Item, outcome: Outcome, cached: bool) -> None:
        out = item.rec.fields()
        out["status"] = outcome.status
        out.pop("error", None)
        out["provider"] = self.provider.name
        out["model"] = self.provider.model
        if outcome.status == "ok":
            out["result"] = outcome.result
        else:
            out["error"] = {"code": outcome.code, "message": outcome.message or ""}
        out["attempts"] = 0 if cached else outcome.attempts
        out["cached"] = cached
        out["input_tokens"] = outcome.input_tokens
        out["output_tokens"] = outcome.output_tokens
        out["latency_ms"] = 0 if cached else outcome.latency_ms
        self.sink.write(json_line(out))

    def _commit_written(self, force: bool = False) -> None:
        """Commit the finished items once their lines are out: flush the sink (and sync
        it when it is a file, so a power loss cannot keep a commit whose line was lost),
        then write the group in one transaction."""
        cp = self.checkpoint
        if not cp.pending:
            return
        now = time.monotonic()
        if self._first_uncommitted is None:
            self._first_uncommitted = now
        if (
            force
            or cp.pending >= self._commit_every
            or now - self._first_uncommitted >= COMMIT_DELAY
        ):
            self.sink.flush()
            self.sink.sync()
            cp.flush()
            self._first_uncommitted = None

    def _save(self, force: bool = False) -> None:
        if self.options.dry_run:
            return
        now = time.monotonic()
        if force or now - self._last_save >= RUN_SAVE_EVERY:
            self._last_save = now
            self.summary.counts["processing"] = len(self._pending)
            self.checkpoint.save_run(self.summary.record())

    def _finish(self, pool: ThreadPoolExecutor) -> None:
        for fut in self._pending:
            fut.cancel()
        # when stopping, threads blocked in a request are not waited for: the caller
        # exits without joining them, having flushed the output and the checkpoint
        pool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)
        if self.sink.closed:  # lines still buffered were lost: their items are redone
            self.checkpoint.discard()
        else:
            try:
                self._commit_written(force=True)
            except BaseException:
                self.checkpoint.discard()
                raise
        s = self.summary
        s.ended = time.time()
        s.counts["processing"] = 0
        if self._fatal is not None:
            s.state, s.exit_code = "FAILED", int(self._fatal.exit_code)
        elif self.stop.is_set():
            s.state = "ABORTED"
        elif s.failed:
            s.state = "PARTIAL" if s.counts["completed"] else "FAILED"
            s.exit_code = int(ExitCode.ITEM_FAILURES)
        else:
            s.state, s.exit_code = "COMPLETED", int(ExitCode.OK)
        if not self.options.dry_run:
            self.checkpoint.save_run(s.record())


def summary_lines(s: RunSummary, scanned: int) -> list[str]:
    """The human summary printed on stderr at the end of a run."""
    if s.id == 0:  # a dry run
        return [
            f"dry run: {s.counts['would_send']:,} images would be sent to {s.provider} "
            f"({s.model}), about {s.input_tokens:,} input tokens for the images; "
            f"{s.counts['cached']:,} have stored results, {s.counts['skipped']:,} unchanged "
            f"(of {scanned:,} files); nothing was sent"
        ]
    lines = [
        f"{s.state.lower()}: {s.counts['completed']:,} ok, {s.counts['failed']:,} failed, "
        f"{s.counts['cached']:,} from stored results, {s.counts['skipped']:,} unchanged "
        f"(of {scanned:,} files) in {s.elapsed:.1f}s, {s.images_per_min:,.0f} images/min"
    ]
    if s.errors:
        lines.append("errors: " + ", ".join(f"{c} {n}" for c, n in s.errors.most_common()))
    if s.input_tokens or s.output_tokens:
        lines.append(f"tokens: {s.input_tokens:,} in, {s.output_tokens:,} out")
    if s.tags:
        lines.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in s.tags.most_common(8)))
    return lines


def _count_beside(root: str, settings: Settings, summary: RunSummary) -> threading.Event:
    """Count ROOT's files from listings alone in a daemon thread, beside the run: the
    total of its progress and of `status`. Set the returned event to stop it."""
    from imgbatch.scanner import count_files

    stop = threading.Event()

    def count() -> None:
        try:
            listed = count_files(root, settings, stop)
        except Exception:  # only a total is lost: the run's own walk reports errors
            log.debug("counting the files under ROOT failed", exc_info=True)
            return
        if listed is not None:
            summary.listed = listed

    threading.Thread(target=count, name="imgbatch-count", daemon=True).start()
    return stop


def analyze_root(
    root: str,
    settings: Settings,
    options: RunOptions,
    sink: JsonlSink,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = False,
) -> tuple[RunSummary, int]:
    """`imgbatch analyze`: choose the provider, open and lock the state, run.

    Returns the run summary and the number of files scanned.
    """
    from imgbatch.providers import base

    env = os.environ if env is None else env
    state = state_dir(root, settings, env)
    name = base.choose(settings.provider, settings, env)
    if settings.provider == "auto":
        log.info(
            "provider: %s%s",
            name,
            " (no API key configured: offline analyzer)"
            if name == "local"
            else " (an API key is configured)",
        )
    check_root(root)  # before anything is created
    provider = base.create(name, settings)
    limiter = None
    if provider.remote:
        from imgbatch.ratelimit import AdaptiveLimiter

        limiter = AdaptiveLimiter(settings.rpm, settings.tpm, stop=stop)
    try:
        with (
            ResultStore(results_dir(settings, env)) as results,
            Checkpoint(state, results=results) as checkpoint,
        ):
            checkpoint.lock("analyze", wait=wait, stop=stop)
            # a dry run records nothing: it checks the root, and reads format 1 as it is
            claim_root(state, os.path.abspath(root), record=not options.dry_run)
            if checkpoint.format != FORMAT_VERSION and not options.dry_run:
                moved = checkpoint.upgrade()
                log.info("checkpoint upgraded: %s result(s) moved to %s", moved, results.directory)
            if checkpoint.mark_dead_runs():
                log.warning("an earlier run was killed; resuming where it stopped")
            hash_cache = HashCache(state / "hashcache") if settings.hash_cache else None
            try:
                pipeline = Pipeline(
                    root,
                    settings,
                    options,
                    provider,
                    checkpoint,
                    sink,
                    hash_cache,
                    limiter,
                    progress,
                    stop,
                )
                counting = _count_beside(root, settings, pipeline.summary)
                try:
                    summary = pipeline.run()
                except ImgbatchError:  # a run-level stop: still say what was done
                    for line in summary_lines(pipeline.summary, pipeline.scanner.stats.seen):
                        log.info("%s", line)
                    raise
                finally:
                    counting.set()
            finally:
                if hash_cache is not None:
                    hash_cache.close()
            return summary, pipeline.scanner.stats.seen
    finally:
        provider.close()
