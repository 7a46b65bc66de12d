"""The Gemini Batch API mode of `analyze` (`--batch`): half the price, results within a day.

Each run of the same command does, in order:

1. collect: poll every job the checkpoint holds. A job that SUCCEEDED has its results
   downloaded, and each line written and committed as a live run's are (the Recorder),
   with ``"batch": true``; a job that FAILED, EXPIRED or was CANCELLED (or that its own
   key's project no longer knows) is forgotten, so its items are planned again in step 3;
   a job whose results file cannot be downloaded yet (404) is polled again later.
2. resume the submissions that a crash or a 429 left between their intent and their job.
3. submit: the scan and the plan are a live run's (Planner: unchanged, stored and
   duplicate items cost nothing, items in a pending job wait); what needs work is decoded
   and encoded here (threads) and written as request lines to a file in the state folder.
   A file, once full (`batch_max_requests`, MAX_FILE_BYTES) or at the end of the scan,
   becomes one job: its intent recorded, the file uploaded, the job created. A run
   submits only up to `batch_max_pending` requests in jobs not yet collected; a 429 (or
   any transient failure) on upload or create leaves the rest for the next run.
4. with --batch-wait: poll (backing off from `batch_poll` to ten times it) and collect
   until every job has ended.

Crash safety. Creating a job is not idempotent, so a submission is recorded in the
checkpoint before anything of it is sent: its display name (unique to it: the job's id
here), the items it carries by request key, and its contents as batched, which keeps them
from being submitted again or sent live (see Checkpoint.batched). The record is marked
`tried` before `create`; a submission found `tried` is looked up by its display name
(`batches.list`) before it is created again. A request file is written as ``.part``,
synced, then renamed before its intent is recorded: a file that no record names is a
leftover, deleted at the next start. Collection is at-least-once, like a live run: lines,
then commits, then the job is forgotten; a run killed in between writes again only the
lines not committed yet.

Never paid twice across keys. A job (and its input file) belongs to the project of the key
that made it, recorded with the job as its identity (`gemini_batch.key_id`: key and
endpoint, hashed). Only that key is asked about it: while it is not configured, the job
stays pending with a warning naming it (and `imgbatch prune --forget-batch JOB`, for a
key gone for good); it is forgotten only when its own key says it is gone. A submission
uploaded with a key is looked up, created (and uploaded again, once its file expired)
with that key only, so it never becomes a second job in another project.

A copy of an image submitted in this run waits for its original's job; it gets its line
from the stored result in the run that collects the job (after the collection, the scan
meets it), or, with --batch-wait, in the next run.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from imgbatch.checkpoint import BatchEntry, Checkpoint
from imgbatch.config import Settings
from imgbatch.errors import ConfigError, ContentChanged, ErrorCode, ImgbatchError, ItemError
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, Progress, human_duration
from imgbatch.pipeline.execute import Limiter
from imgbatch.pipeline.items import CONTENT_ERRORS, Outcome, RunOptions, WorkItem
from imgbatch.pipeline.plan import Action
from imgbatch.pipeline.record import RunSummary
from imgbatch.pipeline.stages import RunStages
from imgbatch.providers.base import Provider
from imgbatch.records import FileRecord
from imgbatch.statedb import open_private as private

if TYPE_CHECKING:
    from imgbatch.providers.gemini_batch import GeminiBatch, JobStatus

log = logging.getLogger("imgbatch")

BATCH_DIR = "batch"  # in the state folder: request files until their job exists, results
_PART = ".part"


@dataclass
class _OpenFile:
    """The request file being filled: its lines so far and the items they carry."""

    id: str  # the job's display name, unique to this submission
    path: Path  # <id>.jsonl.part
    fh: IO[bytes]
    keys: dict[str, BatchEntry] = field(default_factory=dict)
    size: int = 0


class BatchRun(RunStages):
    """One `analyze --batch` run over ROOT. Library API: build it, call `run()`.

    Args:
        root, settings, options, checkpoint, sink, hash_cache, progress, stop: as for
            `Pipeline` (the checkpoint locked by the caller).
        provider: the gemini provider (its requests, keys and answers).
        limiter: not used (the Batch API paces its jobs itself): `Pipeline`'s signature.
        max_file_bytes: a request file stays under this size.
    """

    def __init__(
        self,
        root: str,
        settings: Settings,
        options: RunOptions,
        provider: Provider,
        checkpoint: Checkpoint,
        sink: JsonlSink,
        hash_cache: HashCache | None = None,
        limiter: Limiter | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        max_file_bytes: int | None = None,
    ) -> None:
        from imgbatch.providers.gemini import GeminiProvider
        from imgbatch.providers.gemini_batch import MAX_FILE_BYTES, GeminiBatch

        if not isinstance(provider, GeminiProvider):
            raise ConfigError(f"--batch needs the gemini provider, not {provider.name}")
        if settings.executor != "local":
            log.info(
                "--batch prepares its requests here: --executor %s is not used", settings.executor
            )
        # collected results cost nothing to collect again: committed in groups
        super().__init__(
            root,
            settings,
            options,
            provider,
            checkpoint,
            sink,
            hash_cache,
            progress,
            stop,
            record_run=True,
            remote=False,
        )
        self.client: GeminiBatch = GeminiBatch(provider)
        self.max_file_bytes = max_file_bytes or MAX_FILE_BYTES
        self.summary.batch = Counter(submitted=0, jobs=0, pending=0, collected=0, deferred=0)
        self.folder = checkpoint.directory / BATCH_DIR
        self._pool = ThreadPoolExecutor(settings.workers, "imgbatch-prepare")
        self._preparing: dict[Future[bytes | Outcome], WorkItem] = {}
        self._open: _OpenFile | None = None
        self._pending_requests = 0  # in jobs not yet collected (intents included)
        self._files = 0  # request files of this run, for their names
        self._halted: str | None = None  # why this run submits no more
        self._unreachable_warned: set[str] = set()  # jobs whose key is gone, warned once
        self._fatal: ImgbatchError | None = None

    @property
    def batch(self) -> Counter[str]:
        assert self.summary.batch is not None
        return self.summary.batch

    # -- the run -----------------------------------------------------------------

    def run(self) -> RunSummary:
        """Collect, resume, submit (and wait); returns the summary, raises ImgbatchError
        for a run-level stop (the daily quota, rejected keys)."""
        s, rec = self.summary, self.recorder
        self.checkpoint.set_root(self.root)
        rec.save(force=True)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: uploads
            self._remove_leftovers()
            self._collect_ended()
            self._pending_requests = sum(j["requests"] for j in self.checkpoint.batch_jobs())
            self._resume()
            self._submit()
            if self.options.batch_wait:
                self._wait()
        except BaseException as exc:  # closed output, interrupt: what is unrecorded is redone
            self.stop.set()
            if isinstance(exc, ImgbatchError) and self._fatal is None:
                self._fatal = exc
            raise
        finally:
            for fut in self._preparing:
                fut.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._open is not None:
                try:  # what was prepared waits, as an intent, for the next run
                    self._seal(send=False)
                except Exception:  # the file is a leftover then: its items are redone
                    log.debug("could not record the last request file", exc_info=True)
            try:
                self.batch["pending"] = len(self.checkpoint.batch_jobs())
            except ImgbatchError:  # a damaged checkpoint: the error on its way says so
                pass
            rec.in_flight = 0
            rec.finish(self._fatal, self.stop.is_set())
        return s

    def _remove_leftovers(self) -> None:
        """Delete request files no intent names (a crash before the intent was recorded)
        and downloads of results (a crash during a collection)."""
        named = {job["path"] for job in self.checkpoint.batch_jobs() if job.get("name") is None}
        for path in self.folder.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)

    # -- collect -------------------------------------------------------------------

    def _collect_ended(self) -> None:
        """Poll every created job; collect those that SUCCEEDED, forget those that ended
        otherwise."""
        from imgbatch.providers.gemini_batch import KeyGone, NotFound, Unavailable

        for job in self.checkpoint.batch_jobs():
            if self.stop.is_set():
                return
            if job.get("name") is None:  # not created yet: see _resume
                continue
            try:
                status = self.client.status(job["name"], job["key"])
            except KeyGone:  # only its own key's project can say whether it ended
                self._unreachable(job)
                continue
            except NotFound:
                log.warning(
                    "batch job %s is unknown to the Batch API of its own key (deleted, or "
                    "expired long ago): its %s requests are submitted again",
                    job["name"],
                    f"{job['requests']:,}",
                )
                self._forget(job)
                continue
            except Unavailable as exc:
                log.warning(
                    "cannot poll batch job %s now (%s); polled again later", job["name"], exc
                )
                if exc.rate_limited:
                    return
                continue
            if (status.state, status.counts) != (job["state"], job["counts"]):
                job["state"], job["counts"], job["polled"] = (
                    status.state,
                    status.counts,
                    time.time(),
                )
                self.checkpoint.save_batch_job(job)
            if status.state == "SUCCEEDED":
                self._collect(job, status)
            elif status.ended:
                log.warning(
                    "batch job %s ended %s%s: its %s requests are submitted again",
                    job["name"],
                    status.state,
                    f" ({status.error})" if status.error else "",
                    f"{job['requests']:,}",
                )
                self._forget(job)

    def _collect(self, job: dict[str, Any], status: JobStatus) -> None:
        """Download a job's results; write and commit one line per item; forget the job."""
        from imgbatch.providers.gemini_batch import NotFound, Unavailable

        results = self.folder / f"{job['id']}.results.jsonl"
        try:
            if not status.results_file:
                raise NotFound("no results file named yet")
            self.client.download(status.results_file, job["key"], results)
        except NotFound:
            log.info(
                "batch job %s SUCCEEDED, but its results cannot be downloaded yet; polled "
                "again later",
                job["name"],
            )
            return
        except Unavailable as exc:
            log.warning("cannot download the results of %s now (%s)", job["name"], exc)
            return
        keys = self.checkpoint.batch_keys(job["id"])
        own = job["fingerprint"] == self.fp
        foreign: list[tuple[tuple[str, str], dict[str, Any]]] = []
        seen: set[str] = set()
        with results.open("rb") as fh:
            for raw in fh:
                if self.stop.is_set():
                    return  # the next run collects it again (what is committed stays so)
                try:
                    line = json.loads(raw)
                except ValueError:
                    log.debug("a results line of %s is not JSON", job["name"])
                    continue
                key = line.get("key") if isinstance(line, dict) else None
                if not isinstance(key, str) or key not in keys or key in seen:
                    continue  # not ours, or twice: the first answer counts
                entry = keys[key]
                seen.add(key)
                self._settle(job, entry, self._outcome(line), own, foreign)
        for key, entry in keys.items():
            if key not in seen:  # transient: the next submission sends it again
                missing = Outcome.failed(
                    ErrorCode.AI_ERROR,
                    f"missing from the results of batch job {job['name']}",
                    attempts=1,
                    batch=True,
                )
                self._settle(job, entry, missing, own, foreign)
        if foreign and self.checkpoint.results is not None:
            self.checkpoint.results.put_many(foreign)
        self.recorder.commit_written(force=True)
        self.checkpoint.end_batch_job(job["id"])
        results.unlink(missing_ok=True)
        for name in (job.get("file"), status.results_file):  # Files API storage is capped
            if name:
                self.client.delete_file(name, job["key"])
        log.info("collected batch job %s: %s items", job["name"], f"{len(keys):,}")

    def _outcome(self, line: dict[str, Any]) -> Outcome:
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

    def _settle(
        self,
        job: dict[str, Any],
        entry: BatchEntry,
        outcome: Outcome,
        own: bool,
        foreign: list[tuple[tuple[str, str], dict[str, Any]]],
    ) -> None:
        """One collected item: written and committed (the Recorder), unless a collection
        that a crash cut short already committed it. A job submitted under other settings
        (another fingerprint) only fills the results store: this run's records are of
        its own settings, and its planner sends those items again."""
        rel_dir, name, content, size, mtime_ns = entry
        if not own:
            if outcome.status == "ok" or outcome.code in CONTENT_ERRORS:
                stored = outcome.stored(job["provider"], job["model"], job["run"])
                foreign.append(((job["fingerprint"], content), stored))
            return
        state = self.checkpoint.state(self.fp, rel_dir, name)
        if state is not None and state[0] == content and state[2] > job["run"]:
            return  # committed after its submission: its line is out
        path = os.path.join(self.root, rel_dir, name)
        item = WorkItem(FileRecord(path, size, mtime_ns, content), rel_dir, name)
        self.recorder.emit(item, outcome, cached=False)
        self.batch["collected"] += 1

    def _unreachable(self, job: dict[str, Any]) -> None:
        """A job (or a submission that may have become one) whose key is not configured:
        it stays pending, said once a run. Asking with another key would get a 404 from
        another project, while Google may still run and bill the job."""
        if job["id"] in self._unreachable_warned:
            return
        self._unreachable_warned.add(job["id"])
        name = f"{job['name']} ({job['id']})" if job.get("name") else job["id"]
        log.warning(
            "batch job %s was made with an API key that is not configured now (or with "
            "another endpoint): it stays pending until that key is back; if the key is gone "
            "for good, `imgbatch prune --forget-batch %s` forgets it and its %s images are "
            "submitted again",
            name,
            job["id"],
            f"{job['requests']:,}",
        )

    def _forget(self, job: dict[str, Any]) -> None:
        """Drop a job (or an intent): its items are planned again."""
        self.checkpoint.end_batch_job(job["id"])
        (self.folder / job["path"]).unlink(missing_ok=True)
        if job.get("file"):
            self.client.delete_file(job["file"], job["key"])

    def _wait(self) -> None:
        """--batch-wait: poll, backing off, and collect until every created job ended."""
        first = interval = self.settings.batch_poll
        while not self.stop.is_set():
            created = [
                j
                for j in self.checkpoint.batch_jobs()
                if j.get("name") is not None and self.client.holds(j["key"])
            ]  # a job whose key is gone cannot be seen to end: not waited for
            if not created:
                return
            log.info(
                "waiting for %d batch job(s); next poll in %s",
                len(created),
                human_duration(interval),
            )
            self.recorder.commit_written(force=True)
            if self.stop.wait(interval):
                return
            self._collect_ended()
            interval = min(interval * 1.5, 10 * first)

    # -- submit --------------------------------------------------------------------

    def _resume(self) -> None:
        """Send the submissions recorded but not created (a crash, a 429)."""
        for job in self.checkpoint.batch_jobs():
            if self.stop.is_set() or self._halted is not None:
                return
            if job.get("name") is None:
                self._send(job)

    def _submit(self) -> None:
        """Scan and plan as a live run; prepare what needs work into request files."""
        s, rec = self.settings, self.recorder
        limit = self.options.limit
        max_in_flight = max(1, s.in_flight or 2 * s.workers)
        for scanned in self.scanner:
            if self.stop.is_set():
                break
            self._take(scanned)
            if limit is not None and self.summary.counts["processed"] >= limit:
                break
            while len(self._preparing) >= max_in_flight and not self.stop.is_set():
                self._drain(timeout=0.5)
            if self._preparing:
                self._drain(timeout=0)
            rec.commit_written()
        while self._preparing and not self.stop.is_set():
            self._drain(timeout=0.5)
            rec.commit_written()
        if self._open is not None and not self.stop.is_set():
            self._seal(send=True)

    def _take(self, scanned: FileRecord) -> None:
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

    def _room(self) -> int:
        """Requests this run may still add (`batch_max_pending`, pending ones included)."""
        opened = len(self._open.keys) if self._open is not None else 0
        used = self._pending_requests + opened + len(self._preparing)
        return self.settings.batch_max_pending - used

    def _work(self, item: WorkItem) -> None:
        """An item that needs a request: into the request file, unless it is a copy of a
        request already there, or this run submits no more."""
        if self._open is not None and item.rec.hash in self._open.keys:
            self.planner.settle(item, None)
            self.summary.counts["in_batch"] += 1
            return
        if self._halted is not None or self._room() <= 0:
            self.planner.settle(item, None)  # waits for a later run
            self.batch["deferred"] += 1
            return
        self._preparing[self._pool.submit(self._prepare, item)] = item

    def _prepare(self, item: WorkItem) -> bytes | Outcome:
        """Decode once, encode for upload, make its request line (in a pool thread)."""
        from imgbatch.imaging import prepare

        if self.stop.is_set():
            raise CancelledError
        assert item.rec.hash is not None
        try:
            image = prepare(item.rec.path, self.settings.max_side, expect_hash=item.rec.hash)
            return self.client.request_line(item.rec.hash, self.provider.encode(image))
        except ItemError as exc:
            return Outcome.failed(exc.code, exc.message, changed=isinstance(exc, ContentChanged))
        except Exception as exc:  # a decoder bug must not kill the run
            log.debug("unexpected error preparing %s", item.rec.path, exc_info=exc)
            return Outcome.failed(ErrorCode.AI_ERROR, f"unexpected error: {type(exc).__name__}")

    def _drain(self, timeout: float) -> None:
        done, _ = wait(self._preparing, timeout=timeout, return_when=FIRST_COMPLETED)
        for fut in done:
            item = self._preparing.pop(fut)
            try:
                prepared = fut.result()
            except CancelledError:
                self.planner.settle(item, None)
                continue
            if isinstance(prepared, bytes):
                self._append(item, prepared)
                continue
            self.recorder.emit(item, prepared, cached=False)  # it cannot be sent
            copies, retry = self.planner.settle(item, prepared)
            for copy in copies:
                self.recorder.emit(copy, prepared, cached=True)
            if retry is not None:
                self._work(retry)

    def _append(self, item: WorkItem, line: bytes) -> None:
        """Add a request line to the request file, first sealing a full one."""
        o = self._open
        if o is not None and (
            len(o.keys) >= self.settings.batch_max_requests
            or o.size + len(line) > self.max_file_bytes
        ):
            self._seal(send=self._halted is None)
        if self._open is None:
            self._files += 1
            job_id = f"imgbatch-r{self.summary.id}-{self._files}-{secrets.token_hex(6)}"
            path = self.folder / f"{job_id}.jsonl{_PART}"
            # 0600 at creation: the request file holds the downscaled uploads
            self._open = _OpenFile(job_id, path, os.fdopen(private(path), "wb"))
        o = self._open
        rec = item.rec
        assert rec.hash is not None
        o.fh.write(line)
        o.size += len(line)
        o.keys[rec.hash] = (item.rel_dir, item.name, rec.hash, rec.size, rec.mtime_ns)
        self.planner.settle(item, None)  # copies met meanwhile wait for the job (see above)

    def _seal(self, send: bool) -> None:
        """Close the request file and record its intent; then send it (`send`)."""
        o, self._open = self._open, None
        assert o is not None
        o.fh.flush()
        os.fsync(o.fh.fileno())
        o.fh.close()
        final = o.path.with_name(o.path.name.removesuffix(_PART))
        os.replace(o.path, final)
        s = self.summary
        job: dict[str, Any] = {
            "id": o.id,  # also its display name
            "fingerprint": self.fp,
            "provider": s.provider,
            "model": s.model,
            "run": s.id,
            "submitted": time.time(),
            "requests": len(o.keys),
            "bytes": o.size,
            "path": final.name,  # in the state folder's batch/, until the job exists
            "file": None,  # the Files API name, once uploaded
            "key": None,  # the id of the key whose project holds file and job
            "tried": False,  # create was called (maybe): look it up before again
            "name": None,  # batches/..., once created
            "state": "INTENT",
            "counts": {},
            "polled": None,
        }
        self.checkpoint.add_batch_job(job, o.keys)
        self._pending_requests += len(o.keys)
        if send and self._halted is None and not self.stop.is_set():
            self._send(job)

    def _send(self, job: dict[str, Any], retried: bool = False) -> None:
        """Upload a recorded submission's file (unless done) and create its job (unless
        a killed run did: looked up by name first)."""
        from imgbatch.providers.gemini_batch import KeyGone, NotFound, Unavailable

        try:
            fresh = job["file"] is None
            if fresh:
                path = self.folder / job["path"]
                if not path.is_file():
                    log.warning(
                        "the request file of batch submission %s is gone; its %s items are "
                        "planned again",
                        job["id"],
                        f"{job['requests']:,}",
                    )
                    self._forget(job)
                    return
                job["file"], job["key"] = self.client.upload(path, job["id"], job["key"])
                job["state"] = "UPLOADED"
                self.checkpoint.save_batch_job(job)
            found = self.client.find(job["id"], job["key"]) if job["tried"] else None
            if found is None:
                job["tried"] = True
                self.checkpoint.save_batch_job(job)  # from here, a crash is found by name
                try:
                    found = self.client.create(job["file"], job["id"], job["key"])
                except NotFound as exc:
                    if fresh or retried:
                        raise ConfigError(
                            f"the Batch API cannot create a job for model "
                            f"{self.provider.model!r} ({exc})"
                        ) from None
                    job["file"] = None  # the input file expired (48 h): upload it again
                    self.checkpoint.save_batch_job(job)
                    self._send(job, retried=True)
                    return
        except KeyGone:  # uploaded with it: it may be a job in that key's project already
            self._unreachable(job)
            return
        except Unavailable as exc:
            self._halted = str(exc)
            log.warning("%s: the rest of the submission waits for the next run", exc)
            return
        job["name"], job["state"] = found.name, found.state
        self.checkpoint.save_batch_job(job)
        (self.folder / job["path"]).unlink(missing_ok=True)
        self.batch["submitted"] += job["requests"]
        self.batch["jobs"] += 1
        log.info(
            "batch job %s created: %s requests (%s)",
            found.name,
            f"{job['requests']:,}",
            job["id"],
        )
