"""The batch protocol: what `analyze --batch` (pipeline/batch*.py) needs from a provider's
Batch API (`BatchClient`), the job status it reads (`JobStatus`) and the failures it tells
apart (`NotFound`, `KeyGone`, `Unavailable`, `NotDone`).

`batch_client(provider)` gives a provider's `BatchClient` (a provider's own
`batch_client()` method, else the class `_BATCH` names for it); the clients are
providers/gemini_batch.py (`GeminiBatch`), providers/openai_batch.py (`OpenAIBatch`) and
providers/anthropic_batch.py (`AnthropicBatch`), imported only when asked for. Imports
only providers/base.py and errors.

The pipeline's steps, in the client's terms:
- `check()` once, before anything is recorded (a server without a Batch API: ConfigError);
- a request file of `request_line(key, encoded)` lines (at most `max_requests` lines and
  `max_file_bytes` bytes), its intent recorded, then `upload` (Anthropic: nothing sent,
  its `create` sends the requests inline), then `create` under the submission's unique
  display name, after `find` when a killed run may have created it already;
- `status` until `ended`; then, when `collectable` (SUCCEEDED, or ended otherwise with
  `partial` results: an expired or cancelled job's finished part), `fetch_results` into
  a local JSONL file whose lines `line_key` and `answer` read; the items without an
  answer (or whose answer raised `NotDone`) are submitted again; a job ended otherwise
  is forgotten: all its items are submitted again;
- `delete_file` for the input and results files once collected (best effort).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imgbatch.errors import ConfigError
from imgbatch.providers.base import Analysis, Provider

#: job states after which nothing changes
ENDED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"})


class NotFound(Exception):
    """The server does not know this job or file (or not yet: a results file)."""


class KeyGone(Exception):
    """The key a job or file was made with is not configured (at this endpoint) in this
    run: only that key's project can say anything about it."""


class Unavailable(Exception):
    """Not now: a 429, a 5xx, a timeout or a network error. `rate_limited`: a 429;
    `failover`: the key's own trouble (rejected, or cooling down while another is ready)."""

    def __init__(self, message: str, rate_limited: bool = False, failover: bool = False) -> None:
        super().__init__(message)
        self.rate_limited = rate_limited
        self.failover = failover


class NotDone(Exception):
    """`answer`: a results line of a request the job never ran (expired or cancelled
    before its turn): no record is written, the item is submitted again."""


@dataclass
class JobStatus:
    """A job as the server describes it, in the pipeline's terms."""

    name: str  # the server's id of the job (Gemini: batches/...; OpenAI: batch_...)
    display_name: str  # the submission's unique name (our BatchJob.id)
    state: str  # PENDING | RUNNING | SUCCEEDED | FAILED | CANCELLED | EXPIRED
    results_file: str | None = None  # where its answers are, once it ended
    counts: dict[str, int] = field(default_factory=dict)  # requests, pending, succeeded, failed
    error: str | None = None  # a FAILED job's reason
    error_file: str | None = None  # a second file of answers (OpenAI's per-line errors)
    #: an EXPIRED or CANCELLED job that still returns what it finished: collected, and
    #: only the rest submitted again
    partial: bool = False

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def collectable(self) -> bool:
        """Whether its results are read: SUCCEEDED, or ended with partial results."""
        return self.state == "SUCCEEDED" or (self.ended and self.partial)


class BatchClient(Protocol):
    """A provider's Batch API with that provider's keys, requests and answers."""

    #: a request file (or inline batch) stays under this size, and under this many lines
    max_file_bytes: int
    max_requests: int

    def check(self) -> None:
        """Before anything is recorded: raise ConfigError when the endpoint has no Batch
        API (nothing is then sent, live or batched)."""
        ...

    def holds(self, key: str | None) -> bool:
        """Whether the key named `key` (a key id: endpoint and key, hashed) is configured."""
        ...

    def request_line(self, key: str, encoded: Any) -> bytes:
        """One line of a request file, carrying `key` (the content hash) as its id, for
        what the provider's `encode` returned; ends in a newline."""
        ...

    def line_key(self, line: dict[str, Any]) -> str | None:
        """The request key (content hash) a results line answers, if any."""
        ...

    def answer(self, line: dict[str, Any]) -> Analysis:
        """The analysis in one results line; ItemError for a failed line (classified as a
        live failure), NotDone for a request the job never ran."""
        ...

    def upload(self, path: Path, display_name: str, key: str | None = None) -> tuple[str, str]:
        """Make a request file available to `create`; returns (file name, key id). With
        `key`, through that key only (KeyGone if it is not configured)."""
        ...

    def create(self, file_name: str, display_name: str, key: str) -> JobStatus:
        """Create a job (not idempotent: the caller recorded its intent first); NotFound
        when the file is gone (expired): uploaded again once."""
        ...

    def find(
        self,
        display_name: str,
        key: str,
        *,
        since: float = 0.0,
        requests: int = 0,
        owned: frozenset[str] = frozenset(),
        file: str | None = None,
    ) -> JobStatus | None:
        """The job a killed run may have created for this submission, or None. `since`:
        when its intent was recorded (time.time()); `requests`: its request count;
        `owned`: the job names that other recorded submissions hold; `file`: its recorded
        file name (for a Batch API without metadata, which adopts a job by time and size,
        and checks an ended one's results against the request file)."""
        ...

    def status(self, name: str, key: str) -> JobStatus:
        """Poll one job."""
        ...

    def fetch_results(self, status: JobStatus, key: str, destination: Path) -> None:
        """Write every results line of an ended job (results and error files) to
        `destination` (created owner-only, never through a link); NotFound while they
        cannot be read yet."""
        ...

    def delete_file(self, file_name: str, key: str) -> None:
        """Delete an input or results file; best effort (never raises)."""
        ...


#: the providers with a Batch API (`analyze --batch`): provider name -> "module:class" of
#: its `batchapi.BatchClient`, made from the provider; imported only when asked for
_BATCH: dict[str, str] = {
    "gemini": "imgbatch.providers.gemini_batch:GeminiBatch",
    "openai": "imgbatch.providers.openai_batch:OpenAIBatch",
    "anthropic": "imgbatch.providers.anthropic_batch:AnthropicBatch",
}
BATCH_PROVIDERS = tuple(_BATCH)
BATCH_NEEDS = "--batch needs the gemini provider, the openai or the anthropic one (a Batch API)"


def batch_client(provider: Provider) -> BatchClient:
    """The Batch API of `provider`: its own `batch_client()` if it has one (a provider
    registered by a test or a plugin), else the client `_BATCH` names for it; ConfigError
    for a provider without one (`ollama`, `local`)."""
    hook: Callable[[], BatchClient] | None = getattr(provider, "batch_client", None)
    if hook is not None:
        return hook()
    target = _BATCH.get(provider.name)
    if target is None:
        raise ConfigError(f"{BATCH_NEEDS}, not {provider.name}")
    module, attr = target.split(":")
    client: BatchClient = getattr(importlib.import_module(module), attr)(provider)
    return client
