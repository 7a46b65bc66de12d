"""A Batch API job of `analyze --batch` as the run sees it (`BatchJob`), and the jobs the
checkpoint holds (`BatchJobs`: read, saved, forgotten, warned about).

The checkpoint stores a job as a plain JSON dict (`Checkpoint.add_batch_job`,
`save_batch_job`, `batch_jobs`; `status` and `prune --forget-batch` read it there): a
`BatchJob` is made from that dict and turned back into it, key for key, at that boundary.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from imgbatch.checkpoint import BatchEntry, Checkpoint

if TYPE_CHECKING:
    from imgbatch.providers.batchapi import BatchClient

log = logging.getLogger("imgbatch")

BATCH_DIR = "batch"  # in the state folder: request files until their job exists, results


@dataclass
class BatchJob:
    """One submission: an intent until its job is created, then the job until collected."""

    id: str  # also its display name, unique to this submission
    fingerprint: str  # the settings its requests were made under
    provider: str
    model: str
    run: int  # the run that submitted it
    submitted: float  # time.time()
    requests: int
    bytes: int
    path: str  # in the state folder's batch/, until the job exists
    file: str | None = None  # the Files API name, once uploaded (Anthropic: the local file)
    key: str | None = None  # the id of the key whose project holds file and job
    tried: bool = False  # create was called (maybe): look it up before again
    name: str | None = None  # the server's job id (batches/..., batch_...), once created
    state: str = "INTENT"
    counts: dict[str, Any] = field(default_factory=dict)
    polled: float | None = None
    #: keys of its stored form that this version does not know: kept as they were
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> BatchJob:
        """A job from its stored form."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in stored.items() if k not in known}
        return cls(**{k: v for k, v in stored.items() if k in known}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Its stored form (the same keys, in the same order, as ever)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["extra"]
        return {**out, **self.extra}

    @property
    def created(self) -> bool:
        """Whether the Batch API has made it a job (else: an intent, not sent or not yet
        created)."""
        return self.name is not None


class BatchJobs:
    """The jobs the checkpoint holds (intents included), for one run.

    Args:
        checkpoint: where they are recorded (locked by the run).
        client: the Batch API, to delete a forgotten job's input file.
        folder: the state folder's `batch/` (request files, downloads).
    """

    def __init__(self, checkpoint: Checkpoint, client: BatchClient, folder: Path) -> None:
        self.checkpoint = checkpoint
        self.client = client
        self.folder = folder
        self._unreachable_warned: set[str] = set()  # jobs whose key is gone, warned once

    def all(self) -> list[BatchJob]:
        """Every job not yet collected, oldest first."""
        return [BatchJob.from_dict(job) for job in self.checkpoint.batch_jobs()]

    def add(self, job: BatchJob, keys: dict[str, BatchEntry]) -> None:
        """Record a submission's intent (see Checkpoint.add_batch_job)."""
        self.checkpoint.add_batch_job(job.to_dict(), keys)

    def save(self, job: BatchJob) -> None:
        """Rewrite a job's record (uploaded, created, polled)."""
        self.checkpoint.save_batch_job(job.to_dict())

    def remove_leftovers(self) -> None:
        """Delete request files no intent names (a crash before the intent was recorded)
        and downloads of results (a crash during a collection)."""
        named = {job.path for job in self.all() if not job.created}
        for path in self.folder.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)

    def forget(self, job: BatchJob) -> None:
        """Drop a job (or an intent): its items are planned again."""
        self.checkpoint.end_batch_job(job.id)
        (self.folder / job.path).unlink(missing_ok=True)
        if job.file:  # uploaded: with the key it records
            self.client.delete_file(job.file, cast(str, job.key))

    def unreachable(self, job: BatchJob) -> None:
        """A job (or a submission that may have become one) whose key is not configured:
        it stays pending, said once a run. Asking with another key would get a 404 from
        another project, while the provider may still run and bill the job."""
        if job.id in self._unreachable_warned:
            return
        self._unreachable_warned.add(job.id)
        name = f"{job.name} ({job.id})" if job.created else job.id
        log.warning(
            "batch job %s was made with an API key that is not configured now (or with "
            "another endpoint): it stays pending until that key is back; if the key is gone "
            "for good, `imgbatch prune --forget-batch %s` forgets it and its %s images are "
            "submitted again",
            name,
            job.id,
            f"{job.requests:,}",
        )
