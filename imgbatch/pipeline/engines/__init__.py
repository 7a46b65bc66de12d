"""The engines that run a run's items: the `Engine` protocol and `make_engine`.

An engine runs `analyzer.Analyzer` on items, bounded in flight by the caller:
`engines.local.LocalEngine` on a thread pool (xxhash, Pillow and the SDKs release the
GIL; for the offline analyzer of a big run, `engines.procs`' worker processes), or
`engines.dask.DaskEngine` on a Dask cluster. Every engine has the shape of a
`concurrent.futures.Executor` for this one job: `submit(item) -> Future[Outcome]`.
Each is imported only when chosen (Dask is an optional extra).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from imgbatch.pipeline.items import Outcome, WorkItem

if TYPE_CHECKING:
    from imgbatch.config import Settings
    from imgbatch.pipeline.analyzer import Analyzer


class Engine(Protocol):
    """Runs items: the executor of a run (local threads, or a Dask cluster)."""

    def submit(self, item: WorkItem) -> Future[Outcome]: ...

    def flush(self) -> None:
        """Send what the engine holds back to group it (the caller is about to wait)."""
        ...

    def capacity(self) -> int:
        """Items the engine wants in flight to keep busy (0: no wish)."""
        ...

    def check(self, failed: bool = False) -> None:
        """Raise an ImgbatchError if the engine can no longer run anything (`failed`:
        asked after one of its futures failed)."""
        ...

    def shutdown(self, wait: bool) -> None: ...


def make_engine(
    settings: Settings, analyzer: Analyzer, root: str, address: str | None = None
) -> Engine:
    """The engine `settings.executor` names."""
    if settings.executor == "dask":
        from imgbatch.pipeline.engines.dask import DaskEngine

        return DaskEngine(analyzer, settings, root, address or settings.dask_scheduler or None)
    from imgbatch.cpus import cores
    from imgbatch.pipeline.engines.local import LocalEngine

    return LocalEngine(analyzer, settings.workers, settings.analyze_procs or cores())
