"""What every `analyze` run over ROOT sets up the same way, live or `--batch`: the scan,
the fingerprint of the result-changing settings, the run summary, the plan and record
stages. `run.Pipeline` and `batch.BatchRun` build on it."""

from __future__ import annotations

import os
import threading

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings
from imgbatch.errors import UsageError
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, Progress
from imgbatch.pipeline.items import RunOptions
from imgbatch.pipeline.plan import Planner
from imgbatch.pipeline.record import Recorder, RunSummary
from imgbatch.providers.base import Provider, fingerprint_id
from imgbatch.scanner import Scanner


class RunStages:
    """The stages of one run over ROOT (see the module docstring).

    Args:
        record_run: take a run id (a dry run records nothing and takes none).
        remote: commit each item on its own (see record.COMMIT_EVERY).
    """

    def __init__(
        self,
        root: str,
        settings: Settings,
        options: RunOptions,
        provider: Provider,
        checkpoint: Checkpoint,
        sink: JsonlSink,
        hash_cache: HashCache | None,
        progress: Progress | None,
        stop: threading.Event | None,
        *,
        record_run: bool,
        remote: bool,
    ) -> None:
        if not settings.hash:
            raise UsageError("analyze needs content hashes: --no-hash applies to scan only")
        self.root = os.path.abspath(root)
        self.settings = settings
        self.options = options
        self.provider = provider
        self.checkpoint = checkpoint
        self.sink = sink
        self.stop = stop or threading.Event()
        self.scanner = Scanner(self.root, settings, hash_cache, on_wait=sink.flush)
        self.fp = fingerprint_id({"provider": provider.name, **provider.fingerprint()})
        run_id = checkpoint.next_run_id() if record_run else 0
        self.summary = RunSummary(run_id, provider.name, provider.model, self.fp, self.root)
        self.summary.total = options.limit
        self.planner = Planner(checkpoint, self.fp, options, self.root, self.summary.counts, run_id)
        self.recorder = Recorder(checkpoint, sink, self.summary, options, progress, remote=remote)
