"""Collect for `analyze --batch`: poll the jobs the checkpoint holds, write and commit the
lines of those that SUCCEEDED (or ended with partial results), forget those that ended
otherwise (see `batch`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

from imgbatch.checkpoint import BatchEntry
from imgbatch.errors import ErrorCode, ItemError
from imgbatch.output import human_duration
from imgbatch.pipeline.batch_job import BatchJob, BatchJobs
from imgbatch.pipeline.items import CONTENT_ERRORS, Outcome, WorkItem
from imgbatch.pipeline.stages import RunStages
from imgbatch.records import FileRecord

if TYPE_CHECKING:
    from imgbatch.providers.batchapi import BatchClient, JobStatus

log = logging.getLogger("imgbatch")

_Foreign = list[tuple[tuple[str, str], dict[str, Any]]]  # results store entries


class Collector:
    """Collects the ended jobs of one `--batch` run.

    Args:
        run: the run's stages (its checkpoint, recorder, fingerprint, stop).
        client: the Batch API.
        jobs: the jobs the checkpoint holds.
        counts: the run summary's batch counters (`collected`).
    """

    def __init__(
        self, run: RunStages, client: BatchClient, jobs: BatchJobs, counts: Counter[str]
    ) -> None:
        self.run = run
        self.client = client
        self.jobs = jobs
        self.counts = counts

    def collect_ended(self) -> None:
        """Poll every created job; collect those that SUCCEEDED or ended with partial
        results, forget those that ended otherwise."""
        from imgbatch.providers.batchapi import KeyGone, NotFound, Unavailable

        for job in self.jobs.all():
            if self.run.stop.is_set():
                return
            if job.name is None:  # not created yet: see Submitter.resume
                continue
            try:
                status = self.client.status(job.name, cast(str, job.key))
            except KeyGone:  # only its own key's project can say whether it ended
                self.jobs.unreachable(job)
                continue
            except NotFound:
                log.warning(
                    "batch job %s is unknown to the Batch API of its own key (deleted, or "
                    "expired long ago): its %s requests are submitted again",
                    job.name,
                    f"{job.requests:,}",
                )
                self.jobs.forget(job)
                continue
            except Unavailable as exc:
                log.warning("cannot poll batch job %s now (%s); polled again later", job.name, exc)
                if exc.rate_limited:
                    return
                continue
            if (status.state, status.counts) != (job.state, job.counts):
                job.state, job.counts, job.polled = status.state, status.counts, time.time()
                self.jobs.save(job)
            if status.collectable:
                self._collect(job, status)
            elif status.ended:
                log.warning(
                    "batch job %s ended %s%s: its %s requests are submitted again",
                    job.name,
                    status.state,
                    f" ({status.error})" if status.error else "",
                    f"{job.requests:,}",
                )
                self.jobs.forget(job)

    def wait(self, poll: float) -> None:
        """--batch-wait: poll (every `poll` seconds, backing off to ten times it) and
        collect until every created job ended."""
        run = self.run
        first = interval = poll
        while not run.stop.is_set():
            created = [
                j for j in self.jobs.all() if j.created and self.client.holds(j.key)
            ]  # a job whose key is gone cannot be seen to end: not waited for
            if not created:
                return
            log.info(
                "waiting for %d batch job(s); next poll in %s",
                len(created),
                human_duration(interval),
            )
            run.recorder.commit_written(force=True)
            if run.stop.wait(interval):
                return
            self.collect_ended()
            interval = min(interval * 1.5, 10 * first)

    def _collect(self, job: BatchJob, status: JobStatus) -> None:
        """Download a job's results; write and commit one line per item (an ended job's
        partial results: per item answered; the rest is planned again); forget the job."""
        from imgbatch.providers.batchapi import NotDone, NotFound, Unavailable

        run, key_id = self.run, cast(str, job.key)  # recorded at its upload
        results = self.jobs.folder / f"{job.id}.results.jsonl"
        try:
            self.client.fetch_results(status, key_id, results)
        except NotFound:
            log.info(
                "batch job %s %s, but its results cannot be downloaded yet; polled again later",
                job.name,
                status.state,
            )
            return
        except Unavailable as exc:
            log.warning("cannot download the results of %s now (%s)", job.name, exc)
            return
        keys = run.checkpoint.batch_keys(job.id)
        own = job.fingerprint == run.fp
        foreign: _Foreign = []
        seen: set[str] = set()
        with results.open("rb") as fh:
            for raw in fh:
                if run.stop.is_set():
                    return  # the next run collects it again (what is committed stays so)
                try:
                    line = json.loads(raw)
                except ValueError:
                    log.debug("a results line of %s is not JSON", job.name)
                    continue
                key = self.client.line_key(line) if isinstance(line, dict) else None
                if key is None or key not in keys or key in seen:
                    continue  # not ours, or twice: the first answer counts
                try:
                    outcome = self._outcome(line)
                except NotDone:  # never run (expired, cancelled): submitted again
                    continue
                entry = keys[key]
                seen.add(key)
                self._collected(job, entry, outcome, own, foreign)
        unfinished = 0
        for key, entry in keys.items():
            if key not in seen and status.state != "SUCCEEDED":
                unfinished += 1  # what an expired or cancelled job did not do: no record
            elif key not in seen:  # transient: the next submission sends it again
                missing = Outcome.failed(
                    ErrorCode.AI_ERROR,
                    f"missing from the results of batch job {job.name}",
                    attempts=1,
                    batch=True,
                )
                self._collected(job, entry, missing, own, foreign)
        if foreign and run.checkpoint.results is not None:
            run.checkpoint.results.put_many(foreign)
        run.recorder.commit_written(force=True)
        run.checkpoint.end_batch_job(job.id)
        results.unlink(missing_ok=True)
        for name in (job.file, status.results_file, status.error_file):  # storage is capped
            if name:
                self.client.delete_file(name, key_id)
        if unfinished:
            log.warning(
                "batch job %s ended %s: collected %s items; its %s others are submitted again",
                job.name,
                status.state,
                f"{len(keys) - unfinished:,}",
                f"{unfinished:,}",
            )
        else:
            log.info("collected batch job %s: %s items", job.name, f"{len(keys):,}")

    def _outcome(self, line: dict[str, Any]) -> Outcome:
        """One results line as its item's outcome."""
        try:
            analysis = self.client.answer(line)
        except ItemError as exc:
            return Outcome.failed(exc.code, exc.message, attempts=1, batch=True)
        return Outcome(
            "ok",
            analysis.result,
            attempts=1,
            input_tokens=analysis.input_tokens,
            output_tokens=analysis.output_tokens,
            batch=True,
        )

    def _collected(
        self,
        job: BatchJob,
        entry: BatchEntry,
        outcome: Outcome,
        own: bool,
        foreign: _Foreign,
    ) -> None:
        """One collected item: written and committed (the Recorder), unless a collection
        that a crash cut short already committed it. A job submitted under other settings
        (another fingerprint) only fills the results store: this run's records are of
        its own settings, and its planner sends those items again."""
        run = self.run
        rel_dir, name, content, size, mtime_ns = entry
        if not own:
            if outcome.status == "ok" or outcome.code in CONTENT_ERRORS:
                stored = outcome.stored(job.provider, job.model, job.run)
                foreign.append(((job.fingerprint, content), stored))
            return
        state = run.checkpoint.state(run.fp, rel_dir, name)
        if state is not None and state[0] == content and state[2] > job.run:
            return  # committed after its submission: its line is out
        path = os.path.join(run.root, rel_dir, name)
        item = WorkItem(FileRecord(path, size, mtime_ns, content), rel_dir, name)
        run.recorder.emit(item, outcome, cached=False)
        self.counts["collected"] += 1
