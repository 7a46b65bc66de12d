"""The offline analyzer on worker processes, for the local engine (engines.local).

The offline analyzer's work is Python: a few dozen Pillow and numpy calls per image,
which for thumbnails cost more in the interpreter than in C. Threads run it one at a
time (the GIL), beside the run's own bookkeeping in the main thread, so on one core.
`OfflineProcesses` runs it on worker processes instead, one per core: items travel as
(path, hash) with the key-free settings, in chunks of CHUNK (one pickling round trip
for many thumbnails), and each item gets its own Future back, as a thread pool gives.

The processes are started in the background once a run has shown it is big enough
(LocalEngine decides), forked from a server that imported the analyzer once, and are
used only once all of them answered: until then, and for good if one dies, items run
on the threads as before (those of a lost chunk run again there: nothing is lost).
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from imgbatch.config import Settings
from imgbatch.pipeline.analyzer import analyse_file
from imgbatch.pipeline.items import Outcome, WorkItem

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from imgbatch.pipeline.analyzer import Analyzer

log = logging.getLogger("imgbatch")

CHUNK = 16  # items per task sent to a process: the caller flushes a partial one
#: what the fork server imports once, so that each worker starts without importing it
PRELOAD = ["imgbatch.pipeline.engines.procs", "imgbatch.providers.local", "imgbatch.imaging"]

# -- in the worker processes -----------------------------------------------------------


def analyse_chunk(files: list[tuple[str, str]], provider: str, settings: Settings) -> list[Outcome]:
    """A chunk of files, each analysed whole (analyzer.analyse_file)."""
    return [analyse_file(path, content_hash, provider, settings) for path, content_hash in files]


def _started() -> int:
    import os

    return os.getpid()


def _worker_init() -> None:
    import signal

    # a terminal's Ctrl-C reaches the whole process group: the run stops intake and
    # lets what is in flight finish, so a worker must not die of it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- in the run's process ---------------------------------------------------------------


class OfflineProcesses:
    """`n` worker processes running the analyzer's provider (see the module's doc)."""

    def __init__(self, analyzer: Analyzer, n: int, threads: Executor) -> None:
        self.analyzer = analyzer
        self._n = n
        self._threads = threads  # where items go while the processes are not usable
        # a bucket's storage options whole: these processes are this user's, on this
        # machine, and read the objects as the threads would (no API key needed)
        storage = analyzer.settings.storage_option
        self._settings = analyzer.settings.key_free().replace(storage_option=storage)
        self._provider = analyzer.provider.name
        self._pool: ProcessPoolExecutor | None = None
        self._ready = threading.Event()
        self._broken = False
        self._closed = False
        self._lock = threading.Lock()
        self._chunk: list[tuple[WorkItem, Future[Outcome]]] = []
        threading.Thread(target=self._start, name="imgbatch-procs", daemon=True).start()

    def _start(self) -> None:
        import multiprocessing

        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            pool = ProcessPoolExecutor(self._n, mp_context=ctx, initializer=_worker_init)
            # every process answers once before any item goes to them
            started = [pool.submit(_started) for _ in range(self._n)]
            for fut in started:
                fut.result(timeout=120)
        except Exception as exc:  # noqa: BLE001 (no processes: the threads do the work)
            log.debug("cannot start analysing processes: %s", exc)
            return
        with self._lock:
            if self._closed:
                pool.shutdown(wait=False, cancel_futures=True)
                return
            self._pool = pool
            self._ready.set()

    def usable(self) -> bool:
        return self._ready.is_set() and not self._broken

    def submit(self, item: WorkItem) -> Future[Outcome]:
        fut: Future[Outcome] = Future()
        self._chunk.append((item, fut))
        if len(self._chunk) >= CHUNK:
            self.flush()
        return fut

    def flush(self) -> None:
        """Send the partial chunk (the caller is about to wait for results)."""
        chunk, self._chunk = self._chunk, []
        if not chunk:
            return
        files = [(item.rec.path, item.rec.hash or "") for item, _ in chunk]
        try:
            assert self._pool is not None
            task = self._pool.submit(analyse_chunk, files, self._provider, self._settings)
        except (BrokenProcessPool, RuntimeError, AssertionError) as exc:
            self._lost(exc, chunk)
            return
        task.add_done_callback(lambda t: self._done(t, chunk))

    def _done(
        self, task: Future[list[Outcome]], chunk: list[tuple[WorkItem, Future[Outcome]]]
    ) -> None:
        if task.cancelled():
            for _, fut in chunk:
                fut.cancel()
            return
        exc = task.exception()
        if isinstance(exc, BrokenProcessPool):
            self._lost(exc, chunk)
            return
        for i, (_, fut) in enumerate(chunk):
            if not fut.set_running_or_notify_cancel():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(task.result()[i])

    def _lost(self, exc: BaseException, chunk: list[tuple[WorkItem, Future[Outcome]]]) -> None:
        """A process died (or the pool is gone): these items, and all later ones, run on
        the threads."""
        if not self._broken:
            self._broken = True
            if not self._closed:
                log.warning("an analysing process failed (%s); analysing in threads", exc)
        for item, fut in chunk:
            if self._closed:
                fut.cancel()
                continue
            again = self._threads.submit(self.analyzer.work, item)
            again.add_done_callback(functools.partial(_copy, target=fut))

    def shutdown(self, wait: bool) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        for _, fut in self._chunk:
            fut.cancel()
        self._chunk = []
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)


def _copy(source: Future[Any], target: Future[Any]) -> None:
    if not target.set_running_or_notify_cancel():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())
