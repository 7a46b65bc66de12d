"""Submit for `analyze --batch`: scan and plan as a live run, prepare what needs work into
request files (threads, bounded), and make each full file a job: its intent recorded
before it is uploaded and created; resume the intents a crash or a 429 left (see
`batch`)."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from imgbatch.checkpoint import BatchEntry
from imgbatch.errors import ConfigError
from imgbatch.pipeline.batch_job import BatchJob, BatchJobs
from imgbatch.pipeline.items import Outcome, WorkItem, item_failure
from imgbatch.pipeline.stages import RunStages
from imgbatch.statedb import open_private as private

if TYPE_CHECKING:
    from imgbatch.providers.batchapi import BatchClient

log = logging.getLogger("imgbatch")

_PART = ".part"


@dataclass
class _OpenFile:
    """The request file being filled: its lines so far and the items they carry."""

    id: str  # the job's display name, unique to this submission
    path: Path  # <id>.jsonl.part
    fh: IO[bytes]
    keys: dict[str, BatchEntry] = field(default_factory=dict)
    size: int = 0


class Submitter:
    """Submits the work of one `--batch` run.

    Args:
        run: the run's stages (scan, plan, record, settings, provider, stop).
        client: the Batch API.
        jobs: the jobs the checkpoint holds.
        counts: the run summary's batch counters (`submitted`, `jobs`, `deferred`).
        max_file_bytes: a request file stays under this size.
    """

    def __init__(
        self,
        run: RunStages,
        client: BatchClient,
        jobs: BatchJobs,
        counts: Counter[str],
        max_file_bytes: int,
    ) -> None:
        self.run = run
        self.client = client
        self.jobs = jobs
        self.counts = counts
        self.max_file_bytes = max_file_bytes
        self._pool = ThreadPoolExecutor(run.settings.workers, "imgbatch-prepare")
        self._preparing: dict[Future[bytes | Outcome], WorkItem] = {}
        self._open: _OpenFile | None = None
        self._pending_requests = 0  # in jobs not yet collected (intents included)
        self._files = 0  # request files of this run, for their names
        self._halted: str | None = None  # why this run submits no more

    def resume(self) -> None:
        """Send the submissions recorded but not created (a crash, a 429); first count
        the requests of every job not yet collected (`batch_max_pending`)."""
        jobs = self.jobs.all()
        self._pending_requests = sum(job.requests for job in jobs)
        for job in jobs:
            if self.run.stop.is_set() or self._halted is not None:
                return
            if not job.created:
                self._send(job)

    def submit(self) -> None:
        """Scan and plan as a live run; prepare what needs work into request files."""
        run = self.run
        s, rec, stop = run.settings, run.recorder, run.stop
        limit = run.options.limit
        max_in_flight = max(1, s.in_flight or 2 * s.workers)
        for scanned in run.scanner:
            if stop.is_set():
                break
            run.take(scanned)
            if limit is not None and run.summary.counts["processed"] >= limit:
                break
            while len(self._preparing) >= max_in_flight and not stop.is_set():
                self._drain(timeout=0.5)
            if self._preparing:
                self._drain(timeout=0)
            rec.commit_written()
        while self._preparing and not stop.is_set():
            self._drain(timeout=0.5)
            rec.commit_written()
        if self._open is not None and not stop.is_set():
            self._seal(send=True)

    def work(self, item: WorkItem) -> None:
        """An item that needs a request: into the request file, unless it is a copy of a
        request already there, or this run submits no more."""
        if self._open is not None and item.rec.hash in self._open.keys:
            self.run.drop(item)
            self.run.summary.counts["in_batch"] += 1
            return
        if self._halted is not None or self._room() <= 0:
            self.run.drop(item)  # waits for a later run
            self.counts["deferred"] += 1
            return
        self._preparing[self._pool.submit(self._prepare, item)] = item

    def close(self) -> None:
        """Stop preparing; what was prepared waits, as an intent, for the next run."""
        for fut in self._preparing:
            fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._open is not None:
            try:
                self._seal(send=False)
            except Exception:  # the file is a leftover then: its items are redone
                log.debug("could not record the last request file", exc_info=True)

    def _room(self) -> int:
        """Requests this run may still add (`batch_max_pending`, pending ones included)."""
        opened = len(self._open.keys) if self._open is not None else 0
        used = self._pending_requests + opened + len(self._preparing)
        return self.run.settings.batch_max_pending - used

    def _prepare(self, item: WorkItem) -> bytes | Outcome:
        """Decode once, encode for upload, make its request line (in a pool thread)."""
        from imgbatch.imaging import prepare

        run = self.run
        if run.stop.is_set():
            raise CancelledError
        assert item.rec.hash is not None
        try:
            s = run.settings
            image = prepare(item.rec.path, s.max_side, item.rec.hash, s.storage_option)
            return self.client.request_line(item.rec.hash, run.provider.encode(image))
        except Exception as exc:  # the item's failure, or a decoder bug: not the run's
            return item_failure(item, exc, "preparing")

    def _drain(self, timeout: float) -> None:
        done, _ = wait(self._preparing, timeout=timeout, return_when=FIRST_COMPLETED)
        for fut in done:
            item = self._preparing.pop(fut)
            try:
                prepared = fut.result()
            except CancelledError:
                self.run.drop(item)
                continue
            if isinstance(prepared, bytes):
                self._append(item, prepared)
                continue
            self.run.settle(item, prepared)  # it cannot be sent

    def _append(self, item: WorkItem, line: bytes) -> None:
        """Add a request line to the request file, first sealing a full one."""
        o = self._open
        if o is not None and (
            len(o.keys) >= min(self.run.settings.batch_max_requests, self.client.max_requests)
            or o.size + len(line) > self.max_file_bytes
        ):
            self._seal(send=self._halted is None)
        if self._open is None:
            self._files += 1
            job_id = f"imgbatch-r{self.run.summary.id}-{self._files}-{secrets.token_hex(6)}"
            path = self.jobs.folder / f"{job_id}.jsonl{_PART}"
            # 0600 at creation: the request file holds the downscaled uploads
            self._open = _OpenFile(job_id, path, os.fdopen(private(path), "wb"))
        o = self._open
        rec = item.rec
        assert rec.hash is not None
        o.fh.write(line)
        o.size += len(line)
        o.keys[rec.hash] = (item.rel_dir, item.name, rec.hash, rec.size, rec.mtime_ns)
        self.run.drop(item)  # copies met meanwhile wait for the job (see batch)

    def _seal(self, send: bool) -> None:
        """Close the request file and record its intent; then send it (`send`)."""
        o, self._open = self._open, None
        assert o is not None
        o.fh.flush()
        os.fsync(o.fh.fileno())
        o.fh.close()
        final = o.path.with_name(o.path.name.removesuffix(_PART))
        os.replace(o.path, final)
        s = self.run.summary
        job = BatchJob(
            id=o.id,
            fingerprint=self.run.fp,
            provider=s.provider,
            model=s.model,
            run=s.id,
            submitted=time.time(),
            requests=len(o.keys),
            bytes=o.size,
            path=final.name,
        )
        self.jobs.add(job, o.keys)
        self._pending_requests += len(o.keys)
        if send and self._halted is None and not self.run.stop.is_set():
            self._send(job)

    def _send(self, job: BatchJob, retried: bool = False) -> None:
        """Upload a recorded submission's file (unless done) and create its job (unless
        a killed run did: looked up by name first)."""
        from imgbatch.providers.batchapi import KeyGone, NotFound, Unavailable

        try:
            fresh = job.file is None
            if fresh:
                path = self.jobs.folder / job.path
                if not path.is_file():
                    log.warning(
                        "the request file of batch submission %s is gone; its %s items are "
                        "planned again",
                        job.id,
                        f"{job.requests:,}",
                    )
                    self.jobs.forget(job)
                    return
                job.file, job.key = self.client.upload(path, job.id, job.key)
                job.state = "UPLOADED"
                self.jobs.save(job)
            # from here on, file and key are recorded: uploaded with that key
            file, key = cast(str, job.file), cast(str, job.key)
            found = None
            if job.tried:  # a killed run may have created it: never create it twice
                owned = frozenset(j.name for j in self.jobs.all() if j.name and j.id != job.id)
                found = self.client.find(
                    job.id, key, since=job.submitted, requests=job.requests, owned=owned, file=file
                )
            if found is None:
                job.tried = True
                self.jobs.save(job)  # from here, a crash is found by name
                try:
                    found = self.client.create(file, job.id, key)
                except NotFound as exc:
                    if fresh or retried:
                        raise ConfigError(
                            f"the Batch API cannot create a job for model "
                            f"{self.run.provider.model!r} ({exc})"
                        ) from None
                    job.file = None  # the input file expired (48 h): upload it again
                    self.jobs.save(job)
                    self._send(job, retried=True)
                    return
        except KeyGone:  # uploaded with it: it may be a job in that key's project already
            self.jobs.unreachable(job)
            return
        except Unavailable as exc:
            self._halted = str(exc)
            log.warning("%s: the rest of the submission waits for the next run", exc)
            return
        job.name, job.state = found.name, found.state
        self.jobs.save(job)
        (self.jobs.folder / job.path).unlink(missing_ok=True)
        self.counts["submitted"] += job.requests
        self.counts["jobs"] += 1
        log.info(
            "batch job %s created: %s requests (%s)",
            found.name,
            f"{job.requests:,}",
            job.id,
        )
