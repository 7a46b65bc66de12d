"""The loop that ties plan, the engine and record over one ROOT, and `analyze_root`.

The driver keeps the scan, the plan, the checkpoint, the limiter and stdout; only the
work itself goes to the engine. The stream is never materialised: the scanner is lazy,
and at most `in_flight` items (work plus copies waiting for it) are held at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgbatch.checkpoint import Checkpoint, claim_root
from imgbatch.config import Settings, results_dir, root_id, state_dir
from imgbatch.errors import Abandoned, FatalError, ImgbatchError, UsageError
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, Progress
from imgbatch.pipeline.analyzer import Analyzer, Limiter
from imgbatch.pipeline.batch import BatchRun
from imgbatch.pipeline.engines import Engine, make_engine
from imgbatch.pipeline.items import Outcome, RunOptions, WorkItem
from imgbatch.pipeline.recorder import RunSummary, summary_lines
from imgbatch.pipeline.stages import RunContext, RunStages
from imgbatch.providers.base import Provider
from imgbatch.records import FileRecord
from imgbatch.results import ResultStore
from imgbatch.scanner import check_root

log = logging.getLogger("imgbatch")


class Pipeline(RunStages):
    """One `analyze` run over ROOT. Library API: build it, call `run()`.

    Args:
        ctx: what the run is given (see `RunContext`).
        engine: runs the work; default: the one `settings.executor` names.
    """

    def __init__(self, ctx: RunContext, engine: Engine | None = None) -> None:
        super().__init__(
            ctx,
            record_run=not ctx.options.dry_run,  # a dry run writes nothing
            remote=ctx.provider.remote,
        )
        self.summary.executor = ctx.settings.executor
        self.analyzer = Analyzer(ctx.settings, ctx.provider, ctx.limiter, self.stop)
        self._engine = engine
        self._pending: dict[Future[Outcome], WorkItem] = {}
        self._finished: deque[Future[Outcome]] = deque()  # pending ones that ended
        self._fatal: ImgbatchError | None = None

    # -- the run -----------------------------------------------------------------

    def run(self) -> RunSummary:
        """Process ROOT; returns the summary, raises ImgbatchError for a run-level stop."""
        s, rec = self.summary, self.recorder  # QUEUED until its first item is written
        if not self.options.dry_run:
            self.checkpoint.set_root(self.root)  # for export and prune
        rec.save(force=True)
        limit = self.options.limit
        max_in_flight = max(1, self.settings.in_flight or 2 * self.settings.workers)
        engine = None
        try:
            if not self.options.dry_run:
                engine = self._engine or make_engine(self.settings, self.analyzer, self.root)
                if not self.settings.in_flight:  # as many as the engine needs to keep busy
                    max_in_flight = max(max_in_flight, engine.capacity())
            self._engine = engine
            for scanned in self.records():
                if self.stop.is_set() or self._fatal is not None:
                    break
                self.take(scanned)
                if limit is not None and s.counts["processed"] >= limit:
                    break
                while self._in_flight() >= max_in_flight and not self.stop.is_set():
                    self._drain(block=True, timeout=0.5)
                    rec.commit_written()
                if self._pending:
                    self._drain(block=False)
                rec.commit_written()
            stopped: float | None = None
            # a run-level stop (the daily quota, a rejected key) sets `stop` too: requests
            # already sent are paid for, so their answers get the grace like a signal's
            while self._pending:
                if self.stop.is_set():  # stopping: in-flight items get `grace` seconds
                    stopped = stopped or time.monotonic()
                    left = stopped + self._grace() - time.monotonic()
                    if left <= 0:
                        running = sum(1 for f in self._pending if f.running())
                        log.warning(
                            "abandoning %d in-flight item(s); the next run redoes them",
                            running or len(self._pending),
                        )
                        break
                    self._drain(block=True, timeout=min(left, 0.5))  # notices a new grace
                else:
                    self._drain(block=True, timeout=0.5)  # wakes up to notice a stop
                rec.commit_written()  # a slow trickle is committed within a second
        except BaseException as exc:  # closed output, interrupt: what is unrecorded is redone
            self.stop.set()
            if isinstance(exc, ImgbatchError) and self._fatal is None:
                self._fatal = exc  # e.g. stdout failed: the run record says FAILED, 5
            raise
        finally:
            for fut in self._pending:
                fut.cancel()
            if engine is not None:
                engine.shutdown(wait=not self.stop.is_set())
            rec.in_flight = 0
            rec.finish(self._fatal, self.stop.is_set())
        if self._fatal is not None:
            raise self._fatal
        return s

    def records(self) -> Iterable[FileRecord]:
        """The files the run takes, in order: ROOT's walk (`watch.WatchRun` goes on with
        the files that change after it)."""
        return self.scanner

    def _grace(self) -> float:
        """Seconds in-flight items get once the run stops: the `grace` of a stop that
        carries its own (the Python API's `Records.stop`; read again while waiting, so a
        later `close()` cuts it short), else the setting."""
        grace = getattr(self.stop, "grace", None)
        return self.settings.grace if grace is None else float(grace)

    def _in_flight(self) -> int:
        """Work running or queued, plus copies waiting for it."""
        return len(self._pending) + self.planner.joined()

    def _work(self, item: WorkItem) -> None:
        """Send an item to the engine."""
        assert self._engine is not None
        fut = self._engine.submit(item)
        self._pending[fut] = item
        fut.add_done_callback(self._finished.append)  # from any thread; deque is safe
        self.recorder.in_flight = len(self._pending)

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        assert self._engine is not None
        self._engine.check()
        if block and not self._finished:
            self._engine.flush()
            wait(self._pending, timeout=timeout, return_when=FIRST_COMPLETED)
        # the ended ones, in the order they ended (not a visit of every pending future
        # per item: with the offline processes ~100 are in flight)
        done = [self._finished.popleft() for _ in range(len(self._finished))]
        for fut in done:
            item = self._pending.pop(fut)
            try:
                outcome = fut.result()
            except Abandoned:
                self.drop(item)
                continue
            except ImgbatchError as exc:  # run-level: stop intake, record nothing for it
                self._stop_run(exc)
                self.drop(item)
                continue
            except Exception as exc:  # the engine itself failed (a lost cluster)
                self._stop_run(self._engine_failure(exc))
                self.drop(item)
                continue
            self.settle(item, outcome)
        self.recorder.in_flight = len(self._pending)

    def _engine_failure(self, exc: Exception) -> ImgbatchError:
        """The run-level error for a future the engine itself failed: the engine's own
        diagnosis (e.g. a lost scheduler) when it has one."""
        assert self._engine is not None
        try:
            self._engine.check(failed=True)
        except ImgbatchError as diagnosis:
            return diagnosis
        detail = str(exc) or "no detail"
        return FatalError(f"the executor failed ({type(exc).__name__}: {detail})")

    def _stop_run(self, exc: ImgbatchError) -> None:
        if self._fatal is None:
            self._fatal = exc
            self.stop.set()


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


@dataclass(frozen=True)
class Opened:
    """What `opened` gives a run: its provider, the provider's limiter (remote ones) and
    the state folder's checkpoint, locked."""

    provider: Provider
    limiter: Limiter | None
    checkpoint: Checkpoint


@contextmanager
def opened(
    state: Path,
    settings: Settings,
    claim: Callable[[], None],
    check: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = False,
    command: str = "analyze",
) -> Iterator[Opened]:
    """What every `analyze` run does first (`analyze_root`, listrun.analyze_list): choose
    and make the provider and its limiter, open the results store and the checkpoint of
    `state`, take the lock (as `command`), `claim` the folder, note a killed run.

    `check(name)` refuses a provider, or the run, before anything is created.
    """
    from imgbatch.providers import base

    env = os.environ if env is None else env
    name = base.choose(settings.provider, settings, env)
    if settings.provider == "auto":
        log.info(
            "provider: %s%s",
            name,
            " (no API key configured: offline analyzer)"
            if name == "local"
            else " (an API key is configured)",
        )
    if settings.local_ocr and name != "local":  # OCR is the offline analyzer's
        log.warning(
            '--ocr is for the offline analyzer: %s ignores it (its answer\'s "text" '
            "holds the legible text it reads)",
            name,
        )
    if check is not None:
        check(name)
    provider = base.create(name, settings)
    limiter = None
    if provider.remote:
        from imgbatch.ratelimit import AdaptiveLimiter

        # a provider may pace itself otherwise (ollama: unthrottled unless asked)
        rpm = getattr(provider, "rpm", settings.rpm)
        limiter = AdaptiveLimiter(rpm, settings.tpm, stop=stop)
    try:
        with (
            ResultStore(results_dir(settings, env)) as results,
            Checkpoint(state, results=results) as checkpoint,
        ):
            # holding the lock migrates an earlier imgbatch's checkpoint (once, in place)
            checkpoint.lock(command, wait=wait, stop=stop)
            claim()
            if checkpoint.mark_dead_runs():
                log.warning("an earlier run was killed; resuming where it stopped")
            yield Opened(provider, limiter, checkpoint)
    finally:
        provider.close()


def run_and_index(pipeline: Pipeline | BatchRun, state: Path) -> RunSummary:
    """Run, then bring the search index of `state` up to date (not after a dry run); a
    run-level stop still logs what was done before it is raised."""
    try:
        summary = pipeline.run()
        if not pipeline.options.dry_run:  # `search` then answers at once (issue 22.1)
            from imgbatch.searchindex import refresh

            refresh(state, pipeline.checkpoint)
    except ImgbatchError:  # a run-level stop: still say what was done, if anything was
        seen = pipeline.scanner.stats.seen
        if seen:  # else the error's one line says it all (a missing bucket, a bad root)
            for line in summary_lines(pipeline.summary, seen):
                log.info("%s", line)
        raise
    return summary


def analyze_root(
    root: str,
    settings: Settings,
    options: RunOptions,
    sink: JsonlSink,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = False,
    make: Callable[[RunContext], Pipeline] = Pipeline,
    command: str = "analyze",
) -> tuple[RunSummary, int]:
    """`imgbatch analyze`: choose the provider, open and lock the state, run.

    `make` builds the live run (`imgbatch watch`: a `watch.WatchRun`); `command` names
    the lock's holder. Returns the run summary and the number of files scanned.
    """
    env = os.environ if env is None else env
    state = state_dir(root, settings, env)

    def check(name: str) -> None:
        if settings.local_ocr and name == "local" and "://" in root:
            # OCR decodes the full-size file again, by path: objects are not read that way
            raise UsageError("--ocr is for local folders: not for a bucket ROOT")
        if options.batch:
            from imgbatch.providers.batchapi import BATCH_NEEDS, BATCH_PROVIDERS

            if name not in BATCH_PROVIDERS:
                raise UsageError(f"{BATCH_NEEDS}, not {name}")
        check_root(root)  # before anything is created

    def claim() -> None:
        # a dry run records nothing: it checks the root
        claim_root(state, root_id(root), record=not options.dry_run)

    with opened(state, settings, claim, check, stop, env, wait, command) as run:
        hash_cache = HashCache(state / "hashcache") if settings.hash_cache else None
        try:
            # --batch: Batch API jobs (a dry run is the same either way)
            batch = options.batch and not options.dry_run
            ctx = RunContext(
                root,
                settings,
                options,
                run.provider,
                run.checkpoint,
                sink,
                hash_cache,
                run.limiter,
                progress,
                stop,
            )
            pipeline = BatchRun(ctx) if batch else make(ctx)
            counting = _count_beside(root, settings, pipeline.summary)
            try:
                summary = run_and_index(pipeline, state)
            finally:
                counting.set()
        finally:
            if hash_cache is not None:
                hash_cache.close()
        return summary, pipeline.scanner.stats.seen
