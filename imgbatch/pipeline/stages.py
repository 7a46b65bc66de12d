"""What every `analyze` run over ROOT shares, live or `--batch`: its `RunContext` (what the
caller hands it), and `RunStages` (the scan, the fingerprint of the result-changing
settings, the run summary, the plan and record stages, and what a run does with a
planned item or a finished one). `run.Pipeline` and `batch.BatchRun` build on it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, cast

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings, price_overrides, root_id
from imgbatch.errors import UsageError
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, Progress
from imgbatch.pipeline.analyzer import Limiter
from imgbatch.pipeline.items import Outcome, RunOptions, WorkItem
from imgbatch.pipeline.plan import Action, Planner
from imgbatch.pipeline.recorder import Recorder, RunSummary
from imgbatch.prices import FREE, Price, lookup
from imgbatch.providers.base import Provider, fingerprint_id
from imgbatch.records import FileRecord
from imgbatch.scanner import Scanner, ScanStats


@dataclass
class RunContext:
    """What one `analyze` run over ROOT is given: `Pipeline` and `BatchRun` take it.

    Args:
        root: the folder to analyse.
        settings: all settings (scan filters, workers, executor, max side, retries).
        options: fresh / retry-failed / emit-all / limit / dry run / batch.
        provider: the analysing provider (see providers.base.create).
        checkpoint: where items, results and runs are recorded (locked by the caller).
        sink: where output lines go, one per item.
        hash_cache: the scanner's hash cache, or None.
        limiter: taken before every request of a remote provider (a live run's only).
        progress: updated as items finish.
        stop: set it (e.g. from a signal handler) to stop taking new items; in-flight
            items then get `settings.grace` seconds, or the event's own `grace`
            attribute when it has one that is not None.
        source: the records to take instead of ROOT's walk (a list: listfile.ListSource);
            its items are keyed by their path as given, and `root` only names the run.
    """

    root: str
    settings: Settings
    options: RunOptions
    provider: Provider
    checkpoint: Checkpoint
    sink: JsonlSink
    hash_cache: HashCache | None = None
    limiter: Limiter | None = None
    progress: Progress | None = None
    stop: threading.Event | None = None
    source: Source | None = None


def run_price(provider: Provider, settings: Settings) -> Price | None:
    """What the provider's tokens cost (prices.lookup by model name, config overrides
    first); the offline analyzer costs nothing; None when the model's price is unknown."""
    if not provider.remote:
        return FREE
    return lookup(provider.model, price_overrides(settings.prices))


class Source(Protocol):
    """Records to take instead of ROOT's walk, in order, and their counters."""

    stats: ScanStats

    def __iter__(self) -> Iterator[FileRecord]: ...


class RunStages:
    """The stages of one run over ROOT (see the module docstring). A subclass says what
    "work" is (`_work`: an engine's future, or a Batch API request line).

    Args:
        ctx: what the run is given.
        record_run: take a run id (a dry run records nothing and takes none).
        remote: commit each item on its own (see record.COMMIT_EVERY).
    """

    def __init__(self, ctx: RunContext, *, record_run: bool, remote: bool) -> None:
        settings, options, provider = ctx.settings, ctx.options, ctx.provider
        if not settings.hash:
            raise UsageError("analyze needs content hashes: --no-hash applies to scan only")
        self.ctx = ctx
        # a folder's absolute path, or a bucket URL; "" for a list: its items are keyed
        # by their whole path as listed
        self.root = root_id(ctx.root) if ctx.source is None else ""
        self.settings = settings
        self.options = options
        self.provider = provider
        self.checkpoint = ctx.checkpoint
        self.sink = ctx.sink
        self.stop = ctx.stop or threading.Event()
        if ctx.source is None:
            self.scanner = Scanner(self.root, settings, ctx.hash_cache, on_wait=ctx.sink.flush)
        else:  # a run reads only a scanner's records and `stats` (what a Source has)
            self.scanner = cast("Scanner", ctx.source)
        self.fp = fingerprint_id({"provider": provider.name, **provider.fingerprint()})
        run_id = ctx.checkpoint.next_run_id() if record_run else 0
        named = self.root or ctx.root  # what the run record calls it (a list: its file)
        self.summary = RunSummary(run_id, provider.name, provider.model, self.fp, named)
        self.summary.total = options.limit
        self.summary.price = run_price(provider, settings)
        if provider.remote:  # a dry run's bound on answer tokens
            cap = getattr(settings, f"{provider.name}_max_output_tokens", 0)
            self.summary.max_output_tokens = cap if isinstance(cap, int) else 0
        self.planner = Planner(
            ctx.checkpoint, self.fp, options, self.root, self.summary.counts, run_id
        )
        self.recorder = Recorder(
            ctx.checkpoint, ctx.sink, self.summary, options, ctx.progress, remote=remote
        )

    def _work(self, item: WorkItem) -> None:
        """Start the work an item needs (the subclass's own)."""
        raise NotImplementedError

    def take(self, scanned: FileRecord) -> None:
        """Plan one scanned file, then act on the decision."""
        d = self.planner.decide(scanned)
        if d.action is Action.SKIP or d.action is Action.JOIN:
            return
        assert d.item is not None
        if d.action is Action.WORK:
            self._work(d.item)
        elif d.action is Action.EMIT:
            assert d.outcome is not None
            self.recorder.emit(d.item, d.outcome, d.cached)
        elif d.action is Action.REEMIT:
            assert d.outcome is not None
            self.recorder.write(d.item, d.outcome, True)
        else:  # Action.DRY
            s = self.settings
            p = self.provider
            self.recorder.would_send(
                d.item, s.max_side, p.estimate_tokens, p.remote, p.prompt_tokens,
                s.storage_option,
            )  # fmt: skip

    def settle(self, item: WorkItem, outcome: Outcome) -> None:
        """An item's work ended with `outcome`: its line, then the lines of the copies
        that share it; a copy that must now work for itself (the item failed for itself,
        not for its content) is sent to work."""
        self.recorder.emit(item, outcome, cached=False)
        copies, retry = self.planner.settle(item, outcome)
        for copy in copies:
            self.recorder.emit(copy, outcome, cached=True)
        if retry is not None:
            self._work(retry)

    def drop(self, item: WorkItem) -> None:
        """An item's work ended without an outcome (abandoned, a run-level stop, or it
        waits for a later run): nothing is recorded, its copies wait for a later run."""
        self.planner.settle(item, None)
