"""`--executor local`: a run's items on a pool of threads in this process, and for the
offline analyzer of a big run, on worker processes (engines.procs)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from imgbatch.cpus import SpareCores
from imgbatch.pipeline.analyzer import Analyzer
from imgbatch.pipeline.items import Outcome, WorkItem

if TYPE_CHECKING:
    from imgbatch.pipeline.engines.procs import OfflineProcesses

#: a local run of the offline analyzer moves to worker processes once this many items
#: went to its threads (a small run never pays for starting them)
PROCS_AFTER = 500
PROCS_AFTER_SECONDS = 0.05  # and this long after the engine started (see cpus.SpareCores)


class LocalEngine:
    """Items analysed by a pool of threads in this process (`--executor local`), and for
    the offline analyzer of a big run, by `procs` worker processes (engines.procs).

    Args:
        analyzer: what happens to one item.
        workers: the threads.
        procs: the worker processes wanted (0 or 1: none; never for a remote provider).
        start_procs: whether to start them now, given the items submitted so far (None:
            after PROCS_AFTER items and PROCS_AFTER_SECONDS, while a core is spare: see
            cpus.SpareCores); tests pass one that starts them at once.
    """

    def __init__(
        self,
        analyzer: Analyzer,
        workers: int,
        procs: int = 0,
        start_procs: Callable[[int], bool] | None = None,
    ) -> None:
        self.analyzer = analyzer
        self._pool = ThreadPoolExecutor(workers, "imgbatch-ai")
        self._procs_wanted = procs if procs > 1 and not analyzer.provider.remote else 0
        self._procs: OfflineProcesses | None = None
        self._submitted = 0
        self._start_procs: Callable[[int], bool] | None = None
        if self._procs_wanted:
            self._start_procs = start_procs or SpareCores(PROCS_AFTER, PROCS_AFTER_SECONDS).now

    def submit(self, item: WorkItem) -> Future[Outcome]:
        procs = self._procs
        if procs is None and self._start_procs is not None:
            self._submitted += 1
            if self._start_procs(self._submitted):
                from imgbatch.pipeline.engines.procs import OfflineProcesses

                procs = self._procs = OfflineProcesses(
                    self.analyzer, self._procs_wanted, self._pool
                )
                self._start_procs = None
        if procs is not None and procs.usable():
            return procs.submit(item)
        return self._pool.submit(self.analyzer.work, item)

    def flush(self) -> None:
        if self._procs is not None:
            self._procs.flush()

    def capacity(self) -> int:
        from imgbatch.pipeline.engines.procs import CHUNK

        return 3 * CHUNK * self._procs_wanted if self._procs_wanted else 0

    def check(self, failed: bool = False) -> None:
        pass

    def shutdown(self, wait: bool) -> None:
        if self._procs is not None:
            self._procs.shutdown(wait)
        # when stopping, threads blocked in a request are not waited for: the caller
        # exits without joining them, having flushed the output and the checkpoint
        self._pool.shutdown(wait=wait, cancel_futures=True)
