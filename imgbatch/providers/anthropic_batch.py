"""Anthropic's Message Batches API (`analyze --batch --provider anthropic`): request lines,
batches, results; beside providers/anthropic.py, the only module that imports the SDK.

A request's `params` are the live request's (`AnthropicProvider.request`: the prompt, the
forced tool call, the same downscaled upload), so a batch result is stored under the same
settings fingerprint as a live one and either serves the other; its `custom_id` is the
image's content hash. A batch holds at most 100,000 requests and 256 MB (MAX_REQUESTS,
MAX_FILE_BYTES: the request file stays under it, with room for the body's framing). There
is no file to upload: the request file stays in the state folder until its batch exists,
and `create` sends its lines as the body.

Results are streamed (`results_url`) once a batch has ended, whatever its end: a batch
that expired or was cancelled still returns what it finished. A `succeeded` line is read
as a live answer (`AnthropicProvider.parse`), an `errored` one is classified as the live
error of its type would be, and an `expired` or `canceled` one is `NotDone`: nothing
happened to that image, the next submission sends it again.

Keys. A batch belongs to the workspace of the key that made it; another key is answered
404. So a job names its key (`key_id`: a hash of the endpoint and the key, never the key)
and is asked about with that key only: another one is `KeyGone`, never a 404 that would
make a batch look deleted while it still runs and is billed.

Crash safety. A batch has no metadata to carry the submission's name, so a submission
killed around its `create` is found again by `find`: the oldest batch created since its
intent (60 s of clock skew allowed) whose request count equals the submission's and that
no recorded submission owns. A candidate that has ended must prove it is not one this
ROOT collected and forgot a moment before (same size, same window): its results carry
exactly the custom ids of the request file, when the caller names it, else it ended
after the intent. The residual risk: another client of the same workspace creating, in
that window, a batch of exactly that size that has not ended yet.

Errors (providers/batchapi.py): NotFound (404 from the batch's own key), KeyGone,
Unavailable (a 429, a 5xx, a timeout, a network error: try again later), NotDone (above),
ConfigError for a server without the API (404 on /v1/messages/batches: `check`, before
anything is recorded), and the run-level ImgbatchErrors of the live provider (a rejected
key, a credit balance too low).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import anthropic

from imgbatch import statedb
from imgbatch.errors import ConfigError, ErrorCode, ImgbatchError, ItemError
from imgbatch.providers.anthropic import AnthropicProvider, official
from imgbatch.providers.base import Analysis
from imgbatch.providers.batchapi import JobStatus, KeyGone, NotDone, NotFound, Unavailable

log = logging.getLogger("imgbatch")

T = TypeVar("T")

MAX_REQUESTS = 100_000  # the API's cap per batch
#: a request file stays under this size (the API takes bodies up to 256 MB)
MAX_FILE_BYTES = 240_000_000
SKEW = 60.0  # seconds of clock difference allowed between us and the server (`find`)
_PAGE = 100  # batches listed per page

#: an `errored` line's error type -> the HTTP status a live answer of it carries
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


@dataclass
class _Listed:
    """A batch as listed (`find`): its status and its times (seconds since the epoch)."""

    status: JobStatus
    created: float | None
    ended: float | None


def _stamp(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


def job_status(batch: Any) -> JobStatus:
    """The pipeline's view of the SDK's `MessageBatch`. An ended batch always has results
    (`partial`: what an expired or cancelled one finished)."""
    c = batch.request_counts
    counts = {
        "pending": int(c.processing),
        "succeeded": int(c.succeeded),
        "failed": int(c.errored),
        "expired": int(c.expired),
        "canceled": int(c.canceled),
    }
    # "the sum of all values always matches the total number of requests"
    counts["requests"] = sum(counts.values())
    if batch.processing_status == "ended":
        state = "EXPIRED" if c.expired else "CANCELLED" if c.canceled else "SUCCEEDED"
    else:  # in_progress, canceling
        state = "RUNNING"
    return JobStatus(
        name=str(batch.id),
        display_name="",  # a Message Batch has no name of ours
        state=state,
        results_file=batch.results_url or None,
        counts=counts,
        partial=True,
    )


def key_id(key: str, endpoint: str) -> str:
    """The identity of an API key at an endpoint, recorded with a batch: a hash of both,
    never the key."""
    return "a1-" + hashlib.sha256(f"{endpoint.rstrip('/')}\n{key}".encode()).hexdigest()[:16]


class AnthropicBatch:
    """The Message Batches API with the key, requests and answers of an
    `AnthropicProvider`."""

    max_requests = MAX_REQUESTS
    max_file_bytes = MAX_FILE_BYTES

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider
        self._client: anthropic.Anthropic = provider._client
        self.key = key_id(self._client.api_key or "", provider.base_url)

    def holds(self, key: str | None) -> bool:
        """Whether the key named `key` (see `key_id`) is the one of this run."""
        return key is not None and key == self.key

    # -- request lines -------------------------------------------------------------

    def request_line(self, custom_id: str, encoded: tuple[dict[str, Any], int]) -> bytes:
        """One request: `{"custom_id", "params"}`, the params a live request's."""
        block, _size = encoded
        line = {"custom_id": custom_id, "params": self.provider.request(block)}
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    # -- answers -------------------------------------------------------------------

    @staticmethod
    def line_key(line: dict[str, Any]) -> str | None:
        """The request key (custom_id) of a results line."""
        key = line.get("custom_id")
        return key if isinstance(key, str) else None

    def answer(self, line: dict[str, Any]) -> Analysis:
        """The analysis of one results line; ItemError for an `errored` line (classified
        as the live error of its type) or an answer of no use; NotDone for a request
        that expired or was cancelled before it ran."""
        result = line.get("result")
        if not isinstance(result, dict):
            result = {}
        kind = result.get("type")
        if kind in ("expired", "canceled"):
            raise NotDone(str(kind))
        if kind == "errored":
            raise self._line_error(result.get("error"))
        message = result.get("message")
        if kind != "succeeded" or not isinstance(message, dict):
            raise ItemError(
                ErrorCode.AI_ERROR, f"batch results line of type {kind!r}", retryable=True
            )
        return self.provider.parse(message, 0)

    def _line_error(self, error: Any) -> ItemError:
        """An `errored` line's error object as a live answer's: 429 RATE_LIMIT, 504
        TIMEOUT, 529 and 5xx AI_ERROR retried, another 4xx AI_ERROR not retried. A key or
        billing error of one line is that line's (the batch ran: the key was good)."""
        if isinstance(error, dict) and isinstance(error.get("error"), dict):
            error = error["error"]
        kind = str(error.get("type") or "") if isinstance(error, dict) else ""
        message = str(error.get("message") or "") if isinstance(error, dict) else ""
        status = _ERROR_STATUS.get(kind, 500)
        text = self.provider.scrub(
            f"batch request failed ({status} {kind or '?'}): {' '.join(message.split())}"
        )[:300]
        if status == 429:
            return ItemError(ErrorCode.RATE_LIMIT, text)
        if status in (408, 504):
            return ItemError(ErrorCode.TIMEOUT, text)
        retryable = status >= 500 or status in (401, 402, 403, 409)
        return ItemError(ErrorCode.AI_ERROR, text, retryable=retryable)

    # -- batches -------------------------------------------------------------------

    def check(self) -> None:
        """A server at another base URL must have the Message Batches API (one list
        request; 404: ConfigError before anything is recorded). Anthropic's own has it."""
        if not official(self.provider.base_url):
            self._call(
                "listing message batches", lambda c: c.messages.batches.list(limit=1), no_api=True
            )

    def upload(self, path: Path, display_name: str, key: str | None = None) -> tuple[str, str]:
        """Nothing to upload: `create` sends the request file's lines. Returns the file's
        path as its name, and this run's key id (KeyGone for another key)."""
        if key is not None:
            self._own(key)
        return str(path.resolve()), self.key

    def create(self, file_name: str, display_name: str, key: str) -> JobStatus:
        """Create a batch of the request file's lines (NotFound: the file is gone). Not
        idempotent: the caller records its intent first, and looks for it (`find`) after
        a crash."""
        self._own(key)
        try:
            requests = _read_requests(Path(file_name))
        except FileNotFoundError:
            raise NotFound(f"the request file of {display_name} is gone") from None

        def create(client: anthropic.Anthropic) -> JobStatus:
            return job_status(client.messages.batches.create(requests=cast(Any, requests)))

        status = self._call("creating the message batch", create, no_api=True)
        status.display_name = display_name
        return status

    def status(self, name: str, key: str) -> JobStatus:
        """Poll one batch (its own key only)."""
        self._own(key)
        return self._call(
            "polling the message batch",
            lambda c: job_status(c.messages.batches.retrieve(name)),
            not_found=True,
        )

    def fetch_results(self, status: JobStatus, key: str, destination: Path) -> None:
        """Stream an ended batch's results (JSONL) to `destination`, created owner-only
        (it holds every description) and never through a link; NotFound before it ended."""
        self._own(key)
        if not status.ended:
            raise NotFound(f"batch {status.name} has not ended")
        with statedb.write_private(destination) as out:

            def stream(client: anthropic.Anthropic) -> None:
                with client.messages.batches.with_streaming_response.results(
                    status.name
                ) as response:
                    for chunk in response.iter_bytes():
                        out.write(chunk)

            self._call("downloading the batch results", stream, not_found=True)

    def _custom_ids(self, name: str) -> set[str | None]:
        """The custom ids an ended batch's results answer."""

        def read(client: anthropic.Anthropic) -> set[str | None]:
            ids: set[str | None] = set()
            with client.messages.batches.with_streaming_response.results(name) as response:
                for raw in response.iter_lines():
                    line = json.loads(raw) if raw.strip() else None
                    ids.add(self.line_key(line) if isinstance(line, dict) else None)
            return ids

        return self._call("reading the batch results", read, not_found=True)

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
        """The batch a submission whose intent was recorded at `since` (time.time()) may
        have become before a crash: the oldest created since then (less SKEW), of
        `requests` requests, not in `owned` (the batches of recorded submissions). An
        ended candidate must prove it: its results are of exactly the custom ids of the
        request file `file` (without it: it must not have ended before `since`). None:
        no such batch, create it."""
        self._own(key)
        wanted: set[str | None] | None = None
        if file is not None:
            try:
                wanted = {r.get("custom_id") for r in _read_requests(Path(file))}
            except FileNotFoundError:
                wanted = None
        candidates = [
            b
            for b in self._since(since - SKEW)
            if b.status.counts.get("requests") == requests and b.status.name not in owned
        ]
        for batch in sorted(candidates, key=lambda b: b.created or 0.0):
            status = batch.status
            if status.ended:
                if wanted is not None:
                    try:
                        if self._custom_ids(status.name) != wanted:
                            continue
                    except NotFound:
                        continue
                elif batch.ended is not None and batch.ended < since:
                    continue  # ended before the intent: another submission's
            # an unended one cannot be told from another client's: the residual risk
            status.display_name = display_name
            log.info("adopted message batch %s for submission %s", status.name, display_name)
            return status
        return None

    def _since(self, start: float) -> list[_Listed]:
        """The batches created at `start` or later (the list is newest first)."""

        def listing(client: anthropic.Anthropic) -> list[_Listed]:
            found: list[_Listed] = []
            page = client.messages.batches.list(limit=_PAGE)
            while True:
                for batch in page.data:
                    created = _stamp(batch.created_at)
                    if created is not None and created < start:
                        return found  # the rest are older still
                    found.append(_Listed(job_status(batch), created, _stamp(batch.ended_at)))
                if not page.has_next_page():
                    return found
                page = page.get_next_page()

        return self._call("listing message batches", listing, no_api=True)

    def delete_file(self, file_name: str, key: str) -> None:
        """Nothing to delete: no file is uploaded (the request file is the pipeline's)."""

    # -- plumbing ------------------------------------------------------------------

    def _own(self, key: str) -> None:
        if key != self.key:
            raise KeyGone("the API key it was made with is not configured")

    def _call(
        self,
        what: str,
        fn: Callable[[anthropic.Anthropic], T],
        not_found: bool = False,
        no_api: bool = False,
    ) -> T:
        """`fn(client)`, its failures as NotFound, Unavailable or a run-level
        ImgbatchError (never the key in a message)."""
        p = self.provider
        try:
            return fn(self._client)
        except anthropic.APIStatusError as exc:
            if exc.status_code == 404 and not_found:
                raise NotFound(f"{what}: 404") from None
            if exc.status_code in (404, 405) and no_api:
                raise ConfigError(
                    f"{p.shown} has no Message Batches API ({exc.status_code} on "
                    "/v1/messages/batches): run without --batch"
                ) from None
            error = p._status_error(exc)
            if isinstance(error, ImgbatchError):
                raise error from None
            rate_limited = isinstance(error, ItemError) and error.code is ErrorCode.RATE_LIMIT
            raise Unavailable(p.scrub(f"{what}: {error}"), rate_limited) from None
        except anthropic.APITimeoutError:
            raise Unavailable(f"{what}: no answer in time") from None
        except anthropic.APIConnectionError as exc:
            cause = type(exc.__cause__ or exc).__name__
            raise Unavailable(f"{what}: network error: {cause}") from None
        except (ValueError, KeyError, TypeError) as exc:  # an answer the SDK cannot read
            raise Unavailable(f"{what}: unexpected answer ({type(exc).__name__})") from None


def _read_requests(path: Path) -> list[dict[str, Any]]:
    """A request file's lines (written by `request_line`)."""
    with path.open("rb") as fh:
        return [json.loads(raw) for raw in fh if raw.strip()]
