"""The Batch API mode of `analyze` (`--batch`): half the price, results within a day, through
the provider's Batch API (gemini, openai, anthropic: a `providers.batchapi.BatchClient`).

Each run of the same command does, in order:

1. collect: poll every job the checkpoint holds. A job that SUCCEEDED has its results
   downloaded, and each line written and committed as a live run's are (the Recorder),
   with ``"batch": true``; a job that EXPIRED or was CANCELLED with partial results (what
   it finished: OpenAI's output file, Anthropic's succeeded lines) has those collected
   the same way, and the rest, unrecorded, is planned again in step 3; a job that FAILED,
   EXPIRED or was CANCELLED without results (or that its own key's project no longer
   knows) is forgotten, so all its items are planned again in step 3; a job whose results
   file cannot be downloaded yet (404) is polled again later.
2. resume the submissions that a crash or a 429 left between their intent and their job.
3. submit: the scan and the plan are a live run's (Planner: unchanged, stored and
   duplicate items cost nothing, items in a pending job wait); what needs work is decoded
   and encoded here (threads) and written as request lines to a file in the state folder.
   A file, once full (`batch_max_requests` and the client's `max_requests`, its
   `max_file_bytes`) or at the end of the scan,
   becomes one job: its intent recorded, the file uploaded, the job created. A run
   submits only up to `batch_max_pending` requests in jobs not yet collected; a 429 (or
   any transient failure) on upload or create leaves the rest for the next run.
4. with --batch-wait: poll (backing off from `batch_poll` to ten times it) and collect
   until every job has ended.

Crash safety. Creating a job is not idempotent, so a submission is recorded in the
checkpoint before anything of it is sent: its display name (unique to it: the job's id
here), the items it carries by request key, and its contents as batched, which keeps them
from being submitted again or sent live (see Checkpoint.batched). The record is marked
`tried` before `create`; a submission found `tried` is looked up (`client.find`: Gemini by
display name, OpenAI by metadata, Anthropic by creation time and size) before it is
created again. A server without a Batch API is found out (`client.check`) before any
intent is recorded. A request file is written as ``.part``,
synced, then renamed before its intent is recorded: a file that no record names is a
leftover, deleted at the next start. Collection is at-least-once, like a live run: lines,
then commits, then the job is forgotten; a run killed in between writes again only the
lines not committed yet.

Never paid twice across keys. A job (and its input file) belongs to the project of the key
that made it, recorded with the job as its identity (a key id: key and endpoint, hashed,
e.g. `gemini_batch.key_id`). Only that key is asked about it: while it is not configured, the job
stays pending with a warning naming it (and `imgbatch prune --forget-batch JOB`, for a
key gone for good); it is forgotten only when its own key says it is gone. A submission
uploaded with a key is looked up, created (and uploaded again, once its file expired)
with that key only, so it never becomes a second job in another project.

A copy of an image submitted in this run waits for its original's job; it gets its line
from the stored result in the run that collects the job (after the collection, the scan
meets it), or, with --batch-wait, in the next run.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from imgbatch.errors import ImgbatchError
from imgbatch.pipeline.batch_collect import Collector
from imgbatch.pipeline.batch_job import BATCH_DIR, BatchJobs
from imgbatch.pipeline.batch_submit import Submitter
from imgbatch.pipeline.items import WorkItem
from imgbatch.pipeline.recorder import RunSummary
from imgbatch.pipeline.stages import RunContext, RunStages

if TYPE_CHECKING:
    from imgbatch.providers.batchapi import BatchClient

__all__ = ["BATCH_DIR", "BatchRun"]

log = logging.getLogger("imgbatch")


class BatchRun(RunStages):
    """One `analyze --batch` run over ROOT. Library API: build it, call `run()`.

    Args:
        ctx: as for `Pipeline` (the checkpoint locked by the caller; its provider one with
            a Batch API (`batchapi.batch_client`): its requests, keys and answers; its limiter
            not used, the Batch API paces its jobs itself).
        max_file_bytes: a request file stays under this size.
    """

    def __init__(self, ctx: RunContext, max_file_bytes: int | None = None) -> None:
        from imgbatch.providers.batchapi import batch_client

        provider, settings = ctx.provider, ctx.settings
        client = batch_client(provider)  # ConfigError: a provider without a Batch API
        client.check()  # no Batch API at this endpoint: stop before anything is recorded
        if settings.executor != "local":
            log.info(
                "--batch prepares its requests here: --executor %s is not used", settings.executor
            )
        # collected results cost nothing to collect again: committed in groups
        super().__init__(ctx, record_run=True, remote=False)
        self.client: BatchClient = client
        self.batch: Counter[str] = Counter(submitted=0, jobs=0, pending=0, collected=0, deferred=0)
        self.summary.batch = self.batch
        self.folder = ctx.checkpoint.directory / BATCH_DIR
        self.jobs = BatchJobs(ctx.checkpoint, self.client, self.folder)
        self.collector = Collector(self, self.client, self.jobs, self.batch)
        self.submitter = Submitter(
            self, self.client, self.jobs, self.batch, max_file_bytes or client.max_file_bytes
        )
        self._fatal: ImgbatchError | None = None

    def run(self) -> RunSummary:
        """Collect, resume, submit (and wait); returns the summary, raises ImgbatchError
        for a run-level stop (the daily quota, rejected keys)."""
        s, rec = self.summary, self.recorder
        self.checkpoint.set_root(self.root)
        rec.save(force=True)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: uploads
            self.jobs.remove_leftovers()
            self.collector.collect_ended()
            self.submitter.resume()
            self.submitter.submit()
            if self.options.batch_wait:
                self.collector.wait(self.settings.batch_poll)
        except BaseException as exc:  # closed output, interrupt: what is unrecorded is redone
            self.stop.set()
            if isinstance(exc, ImgbatchError) and self._fatal is None:
                self._fatal = exc
            raise
        finally:
            self.submitter.close()
            try:
                self.batch["pending"] = len(self.checkpoint.batch_jobs())
            except ImgbatchError:  # a damaged checkpoint: the error on its way says so
                pass
            rec.in_flight = 0
            rec.finish(self._fatal, self.stop.is_set())
        return s

    def _work(self, item: WorkItem) -> None:
        """An item that needs a request: the submitter's."""
        self.submitter.work(item)
