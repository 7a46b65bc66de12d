"""`imgbatch analyze --from-list`: a list's items through the analyze pipeline.

The run is `pipeline.analyze_root`'s, over a list (listfile.ListSource) instead of ROOT's
walk: the same providers, results store, checkpoint (the list's state folder, items keyed
by their path or URL as listed), lock and records, each record with its line's `meta`.
A URL's image is decoded from the body its fetch kept (written to a private spool file
while its item is analysed, then deleted), or fetched again when there is none (a 304,
or a copy that waits for another); the hash check of `imaging.prepare` catches a body
that changed since. A dry run measures a URL's image from that body too. Local threads
only: a worker process could not take the body.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgbatch import statedb
from imgbatch.config import Settings
from imgbatch.errors import Abandoned, ErrorCode, ExitCode, ImgbatchError, ItemError, UsageError
from imgbatch.listfile import (
    ListCache,
    ListedRecord,
    ListMeta,
    ListSource,
    claim,
    is_url,
    label,
    list_state,
)
from imgbatch.output import JsonlSink, Progress, close_quietly
from imgbatch.pipeline import (
    Outcome,
    Pipeline,
    RunContext,
    RunOptions,
    RunSummary,
    WorkItem,
    summary_lines,
)
from imgbatch.pipeline.analyzer import Analyzer, Limiter
from imgbatch.pipeline.engines.local import LocalEngine
from imgbatch.pipeline.run import opened, run_and_index
from imgbatch.providers.base import Provider
from imgbatch.records import FileRecord
from imgbatch.signals import Signals

log = logging.getLogger("imgbatch")


def run_analyze(
    source: str,
    settings: Settings,
    signals: Signals,
    *,
    wait: bool = False,
    show_progress: bool = True,
    **run: Any,
) -> tuple[list[str], int]:
    """`imgbatch analyze --from-list`: the records on stdout, progress on stderr (as
    api.run_analyze does for ROOT); `run` holds the run options (`pipeline.RunOptions`).
    Returns the summary lines and the exit code."""
    options = RunOptions(**run)
    _check(settings, options)  # before the sink and the progress line
    sink = JsonlSink(flush_every=100, max_delay=0.1, whole_lines=True)
    signals.graceful = True  # from now on a signal stops intake; in-flight items finish
    with Progress("images", settings.log_every, options.limit, enabled=show_progress) as progress:
        try:
            summary, read = analyze_list(
                source, settings, options, sink, progress, signals.stop, wait=wait
            )
        finally:
            close_quietly(sink.close)
    code = ExitCode.ITEM_FAILURES if summary.failed else ExitCode.OK
    return list(summary_lines(summary, read)), int(code)


def analyze_list(
    source: str,
    settings: Settings,
    options: RunOptions,
    sink: JsonlSink,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    wait: bool = False,
) -> tuple[RunSummary, int]:
    """Analyse the items of the list `source` (a file, or `-`: stdin, which needs
    `settings.checkpoint`). Returns the run summary and the number of items read."""
    _check(settings, options)
    state = list_state(source, settings)

    def claimed() -> None:
        claim(state, source, record=not options.dry_run)
        _sweep(state / "downloads")  # a killed run's spool files (the lock is ours)

    with opened(state, settings, claimed, stop=stop, wait=wait) as run:
        cache = ListCache(state) if settings.hash_cache and not options.dry_run else None
        meta = None if options.dry_run else ListMeta(state)  # a dry run writes nothing
        items: ListSource | None = None
        try:
            items = ListSource(
                source,
                settings,
                cache,
                settings.workers,
                keep_bodies=True,  # a dry run measures a URL's image from its body
                on_wait=sink.flush,
            )
            ctx = RunContext(
                label(source),
                settings,
                options,
                run.provider,
                run.checkpoint,
                sink,
                limiter=run.limiter,
                progress=progress,
                stop=stop,
                source=items,
            )
            summary = run_and_index(ListRun(ctx, items, state / "downloads", meta), state)
        finally:
            if items is not None:
                items.close()
            if cache is not None:
                cache.close()
            if meta is not None:
                meta.close()
        return summary, items.stats.seen


def _check(settings: Settings, options: RunOptions) -> None:
    """A UsageError for what a list run cannot do."""
    if options.batch:
        raise UsageError("--batch is not available with --from-list")
    if settings.executor != "local":
        raise UsageError("--from-list runs on local threads: not with --executor dask")


def _sweep(spool: Path) -> None:
    """Delete the spool files a killed run left (each holds a whole download)."""
    try:
        left = list(spool.glob("body-*"))
    except OSError:
        return
    for path in left:
        try:
            path.unlink()
        except OSError:
            log.debug("cannot delete %s", path, exc_info=True)


class ListRun(Pipeline):
    """A `Pipeline` over a list's records, on local threads, URLs decoded from their
    bodies (see the module docstring).

    Args:
        ctx: the run's context, its `source` the list's records.
        items: that source (its fetcher fetches a URL again when a body is missing).
        spool: the private folder where a body is written while its item is analysed.
        meta: where each item's `meta` is kept for the readers of the checkpoint.
    """

    def __init__(
        self, ctx: RunContext, items: ListSource, spool: Path, meta: ListMeta | None = None
    ) -> None:
        super().__init__(ctx)
        self._meta = meta
        self.analyzer = BodyAnalyzer(
            ctx.settings, ctx.provider, ctx.limiter, self.stop, items, spool
        )
        self._engine = LocalEngine(self.analyzer, ctx.settings.workers)
        self._sent: FileRecord | None = None
        self.recorder.measure = self.analyzer.measure  # a dry run's URL: from its body

    def take(self, scanned: FileRecord) -> None:
        """Plan one item; a body the plan does not send to work is let go at once (a
        skipped or stored item keeps no download in memory)."""
        if self._meta is not None and isinstance(scanned, ListedRecord):
            self._meta.put(scanned.path, scanned.meta)  # before its line: export has it
        super().take(scanned)
        if self._sent is not scanned and isinstance(scanned, ListedRecord):
            scanned.body = None

    def _work(self, item: WorkItem) -> None:
        self._sent = item.rec
        super()._work(item)


class BodyAnalyzer(Analyzer):
    """The `Analyzer` of a list: a URL's image comes from its body; a local path's is
    read as a walk's files are."""

    def __init__(
        self,
        settings: Settings,
        provider: Provider,
        limiter: Limiter | None,
        stop: threading.Event,
        items: ListSource,
        spool: Path,
    ) -> None:
        super().__init__(settings, provider, limiter, stop)
        self._items = items
        self._spool = spool

    def work(self, item: WorkItem) -> Outcome:
        """Decode, encode and send one item (in a pool thread)."""
        rec = item.rec
        if not is_url(rec.path):
            return super().work(item)
        from imgbatch.imaging import prepare

        if self.stop.is_set():
            raise Abandoned
        start = time.monotonic()
        try:
            with self._spooled(rec) as local:
                image = prepare(local, self.settings.max_side, rec.hash)
                tokens = self.tokens(*image.image.size)
                body = self.provider.encode(image)
                # sent while the spool file exists: the offline analyzer's OCR reads the
                # full-size file again
                return self.send(item, body, tokens, start)
        except (Abandoned, ImgbatchError):
            raise
        except Exception as exc:  # a decoder or provider bug must not kill the run
            return self._failed(item, exc, start, 0)

    def measure(self, rec: FileRecord, max_side: int) -> tuple[int, int]:
        """A dry run's size of an item as `prepare` would make it, read from the image's
        header: a URL's from the body its fetch kept (fetched again if none)."""
        from imgbatch.imaging import fitted_size

        if not is_url(rec.path):
            return fitted_size(rec.path, max_side)
        with self._spooled(rec) as local:
            return fitted_size(local, max_side)

    @contextmanager
    def _spooled(self, rec: FileRecord) -> Iterator[str]:
        """A private file holding the item's body (kept by its fetch, else fetched now),
        deleted on exit."""
        body = rec.body if isinstance(rec, ListedRecord) else None
        if isinstance(rec, ListedRecord):
            rec.body = None  # this thread holds it now; the record may live on (a copy)
        if body is None:
            from imgbatch.httpfetch import Stopped

            try:
                body = self._items.fetcher().fetch(rec.path, keep=True).body
            except Stopped:
                raise Abandoned from None
            assert body is not None
        statedb.private_dir(self._spool)
        with tempfile.NamedTemporaryFile(dir=self._spool, prefix="body-") as fp:
            try:
                fp.write(body)
                fp.flush()
            except OSError as exc:
                raise ItemError(ErrorCode.IO_ERROR, f"cannot spool the download: {exc}") from None
            del body
            yield fp.name
