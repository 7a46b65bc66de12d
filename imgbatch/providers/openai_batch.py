"""OpenAI's Batch API (`analyze --batch --provider openai`): request lines, input files,
batches, output and error files (a `batchapi.BatchClient`).

Beside providers/openai.py, the only module that imports the `openai` SDK. It reuses that
provider's requests (the live `/v1/chat/completions` body: prompt, schema, detail, token
cap: a batch result is stored under the same settings fingerprint as a live one), its
endpoints and keys, and its reading of answers.

The wire: a JSONL file of ``{"custom_id": HASH, "method": "POST", "url":
"/v1/chat/completions", "body": ...}`` uploaded with ``purpose=batch``; ``POST
/v1/batches`` with a 24 h completion window and metadata ``{"imgbatch_submission":
NAME}``, NAME the submission's unique display name; after a crash the batch is found
again by listing ``/v1/batches`` (newest first) and reading that metadata. When a batch
ends, its output file (answers) and error file (failed requests, and those an expired or
cancelled batch never ran: `NotDone`) are read; an expired or cancelled batch is
`partial`: what it finished is collected and only the rest submitted again; a failed one
(its input refused) is submitted again whole.

A server without the Batch API (vLLM, Ollama, llama.cpp: 404 on ``/v1/batches``) is a
ConfigError from `check`, before anything is recorded or sent.

Keys. A batch and its files belong to the organisation of the key that made them, at
that endpoint: a job records its key id (endpoint and key, hashed, never the key) and is
asked about through that endpoint and key only (`KeyGone` while they are not configured).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import openai

from imgbatch import statedb
from imgbatch.errors import AuthError, ConfigError, ErrorCode, ItemError, QuotaExhaustedError
from imgbatch.providers.base import Analysis
from imgbatch.providers.batchapi import JobStatus, KeyGone, NotDone, NotFound, Unavailable
from imgbatch.providers.openai import MAX_MESSAGE, OpenAIProvider, _error_fields

__all__ = ["MAX_FILE_BYTES", "MAX_REQUESTS", "OpenAIBatch", "key_id"]

log = logging.getLogger("imgbatch")

T = TypeVar("T")

#: OpenAI takes batch input files up to 200 MB and 50,000 requests
MAX_FILE_BYTES = 190 * 1024 * 1024
MAX_REQUESTS = 50_000
ROUTE: Final = "/v1/chat/completions"
METADATA_KEY = "imgbatch_submission"
#: a batch's creation time may be this far before its intent's (clocks differ)
CLOCK_SKEW = 60.0
#: OpenAI's batch statuses as the pipeline's states
_STATES = {
    "validating": "PENDING",
    "in_progress": "RUNNING",
    "finalizing": "RUNNING",
    "cancelling": "RUNNING",
    "completed": "SUCCEEDED",
    "failed": "FAILED",
    "expired": "EXPIRED",
    "cancelled": "CANCELLED",
}
#: error codes of the lines of requests an expired or cancelled batch never ran
_NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})


def key_id(key: str, endpoint: str) -> str:
    """The identity of an API key at an endpoint, recorded with a job: a hash of both,
    never the key (the form of gemini_batch.key_id)."""
    return "k1-" + hashlib.sha256(f"{endpoint.rstrip('/')}\n{key}".encode()).hexdigest()[:16]


class OpenAIBatch:
    """The Batch API with the endpoints, keys, requests and answers of an
    `OpenAIProvider`."""

    max_file_bytes = MAX_FILE_BYTES
    max_requests = MAX_REQUESTS

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider
        self._endpoints = provider._endpoints
        #: key id -> endpoint index, for every configured endpoint and its key
        self._indexes = {
            key_id(ep.client.api_key, ep.url): i for i, ep in enumerate(self._endpoints)
        }

    def check(self) -> None:
        """Ask every endpoint for its batches (one, at most): a 404 means it has no Batch
        API (a ConfigError naming it); nothing is recorded or sent before this."""
        for index, ep in enumerate(self._endpoints):
            try:
                self._call("listing batches", index, lambda c: c.batches.list(limit=1))
            except NotFound:
                raise ConfigError(
                    f"{ep.shown} has no Batch API (404 on /v1/batches): --batch needs "
                    "OpenAI's API or a server that offers batches; nothing was sent"
                ) from None
            except Unavailable as exc:  # not now: the upload says more
                log.debug("checking %s for a Batch API: %s", ep.shown, exc)

    def holds(self, key: str | None) -> bool:
        """Whether the key id `key` (see `key_id`) is configured in this run."""
        return key is not None and key in self._indexes

    # -- request lines and answers ---------------------------------------------------

    def request_line(self, key: str, encoded: tuple[str, int]) -> bytes:
        """One line of the input file: the live request's body for this image, in the
        form the first endpoint is asked in (json_schema structured output)."""
        data_url, _ = encoded
        body = self.provider._request(self._endpoints[0], "json_schema", data_url)
        line = {"custom_id": key, "method": "POST", "url": ROUTE, "body": body}
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    def line_key(self, line: dict[str, Any]) -> str | None:
        """The request key an output or error line answers (its `custom_id`)."""
        key = line.get("custom_id")
        return key if isinstance(key, str) else None

    def answer(self, line: dict[str, Any]) -> Analysis:
        """The analysis in an output line, read as a live answer; ItemError for a failed
        request (classified as a live failure of that status), NotDone for one an
        expired or cancelled batch never ran."""
        scrub = self.provider.pool.scrub
        error = line.get("error")
        response = line.get("response")
        if isinstance(error, dict):
            code = str(error.get("code") or "")
            if code in _NOT_RUN:
                raise NotDone(code)
            message = " ".join(str(error.get("message") or "").split())
            raise ItemError(
                ErrorCode.AI_ERROR,
                scrub(f"batch request failed ({code or '?'}): {message}"[:MAX_MESSAGE]),
            )
        if not isinstance(response, dict):
            raise ItemError(ErrorCode.AI_ERROR, "batch results line without a response")
        status = response.get("status_code")
        body = response.get("body")
        if status != 200:
            raise _line_error(status, body, scrub)
        return self.provider._parse(body, 0)

    # -- files and batches -----------------------------------------------------------

    def upload(self, path: Path, display_name: str, key: str | None = None) -> tuple[str, str]:
        """Upload a request file (`purpose=batch`); returns its file id and the key id of
        the endpoint that holds it. With `key`, through that one only (KeyGone if it is
        not configured); else the pool's next endpoint."""
        index = self._index(key) if key is not None else self.provider.pool.pick()
        ep = self._endpoints[index]

        def upload(client: openai.OpenAI) -> str:
            with path.open("rb") as fh:
                made = client.files.create(
                    file=(f"{display_name}.jsonl", fh, "application/jsonl"), purpose="batch"
                )
            return made.id

        try:
            file_id = self._call("uploading the request file", index, upload)
        except NotFound:  # /v1/batches is there (see check), /v1/files not
            raise ConfigError(
                f"{ep.shown} has no Files API (404 on /v1/files): --batch needs OpenAI's API "
                "or a server that offers batches"
            ) from None
        return file_id, key or key_id(ep.client.api_key, ep.url)

    def create(self, file_name: str, display_name: str, key: str) -> JobStatus:
        """Create a batch over an uploaded file, its submission's name in its metadata.
        Not idempotent: the caller records its intent first, and looks it up (`find`)
        after a crash."""

        def create(client: openai.OpenAI) -> JobStatus:
            batch = client.batches.create(
                input_file_id=file_name,
                endpoint=ROUTE,
                completion_window="24h",
                metadata={METADATA_KEY: display_name},
            )
            return _status(batch)

        return self._call("creating the batch", self._index(key), create)

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
        """The batch whose metadata names `display_name`, among those the key's
        organisation created since the intent (`since`, less the clock skew); None when
        there is none: how a submission killed around its `create` learns whether it
        happened."""
        index = self._index(key)
        after: str | openai.Omit = openai.omit
        oldest = since - CLOCK_SKEW
        while True:
            page = self._call("listing batches", index, functools.partial(_list, after=after))
            for batch in page.data:
                if (batch.metadata or {}).get(METADATA_KEY) == display_name:
                    return _status(batch)
            # newest first: a page that reaches back before the intent ends the search
            if not page.data or page.data[-1].created_at < oldest or not page.has_more:
                return None
            after = page.data[-1].id

    def status(self, name: str, key: str) -> JobStatus:
        """Poll one batch."""
        return self._call(
            "polling the batch", self._index(key), lambda c: _status(c.batches.retrieve(name))
        )

    def fetch_results(self, status: JobStatus, key: str, destination: Path) -> None:
        """Write the lines of an ended batch's output file, then its error file, to
        `destination` (owner-only, never through a link); a completed batch with neither
        gives no lines (each item is then `missing`, and submitted again)."""
        index = self._index(key)
        with statedb.write_private(destination) as out:
            for file_id in (status.results_file, status.error_file):
                if not file_id:
                    continue

                def download(client: openai.OpenAI, file_id: str = file_id) -> None:
                    with client.files.with_streaming_response.content(file_id) as answer:
                        tail = b"\n"
                        for chunk in answer.iter_bytes():
                            out.write(chunk)
                            tail = chunk[-1:] or tail
                        if tail != b"\n":  # the next file's first line starts a line
                            out.write(b"\n")

                self._call("downloading the results", index, download)

    def delete_file(self, file_name: str, key: str) -> None:
        """Delete an input, output or error file (storage is capped per organisation);
        best effort."""
        try:
            self._call("deleting", self._index(key), lambda c: c.files.delete(file_name))
        except Exception as exc:  # never the run's trouble: files expire anyway
            log.debug("could not delete %s: %s", file_name, exc)

    # -- plumbing --------------------------------------------------------------------

    def _index(self, key: str) -> int:
        """The endpoint of the key id `key`; KeyGone if it is not configured. Never
        another: its organisation would answer 404 for a batch OpenAI still runs."""
        index = self._indexes.get(key)
        if index is None:
            raise KeyGone("the API key (or endpoint) it was made with is not configured")
        return index

    def _call(self, what: str, index: int, fn: Callable[[openai.OpenAI], T]) -> T:
        """`fn(client of endpoint index)`, its failures as NotFound (404), Unavailable
        (429, 5xx, timeouts, network) or a run-level error (a rejected key: AuthError;
        the quota: QuotaExhaustedError; another refusal: ConfigError); a message never
        holds the key or the URL's path."""
        ep = self._endpoints[index]
        scrub = self.provider.pool.scrub
        try:
            return fn(ep.client)
        except openai.APIStatusError as exc:
            code = exc.status_code
            message, kind, ecode = _error_fields(exc.body, exc.response)
            status = f"{code} {ecode if ecode and not ecode.isdigit() else kind}".strip()
            text = scrub(f"{what} at {ep.shown}: {status}: {' '.join(message.split())}")
            text = text[: MAX_MESSAGE + 80]
            if code == 404:
                raise NotFound(text) from None
            if code in (401, 403):
                raise AuthError(f"{ep.shown} rejected the API key ({status})") from None
            if code == 429 and "insufficient_quota" in (ecode, kind):
                raise QuotaExhaustedError(
                    "the OpenAI quota is exhausted (insufficient_quota): check the plan and "
                    "billing; the next run resumes"
                ) from None
            if code in (408, 409, 425, 429) or code >= 500:
                raise Unavailable(text, rate_limited=code == 429) from None
            raise ConfigError(text) from None
        except openai.APITimeoutError:
            raise Unavailable(f"{what} at {ep.shown}: no answer in time") from None
        except openai.APIConnectionError as exc:
            cause = type(exc.__cause__ or exc).__name__
            raise Unavailable(f"{what} at {ep.shown}: network error: {cause}") from None
        except (ValueError, KeyError, TypeError) as exc:  # an answer the SDK cannot read
            raise Unavailable(f"{what}: unexpected answer ({type(exc).__name__})") from None


def _list(client: openai.OpenAI, after: str | openai.Omit) -> Any:
    """One page of the organisation's batches, newest first, after batch `after`."""
    return client.batches.list(limit=100, after=after)


def _status(batch: Any) -> JobStatus:
    """A batch (the SDK's `Batch`) in the pipeline's terms."""
    state = _STATES.get(str(batch.status), "PENDING")
    counts = getattr(batch, "request_counts", None)
    numbers = {
        "requests": int(getattr(counts, "total", 0) or 0),
        "succeeded": int(getattr(counts, "completed", 0) or 0),
        "failed": int(getattr(counts, "failed", 0) or 0),
    }
    numbers["pending"] = max(0, numbers["requests"] - numbers["succeeded"] - numbers["failed"])
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    error = "; ".join(str(e.message or e.code) for e in errors) or None
    output, failures = batch.output_file_id, batch.error_file_id
    return JobStatus(
        name=str(batch.id),
        display_name=str((batch.metadata or {}).get(METADATA_KEY) or ""),
        state=state,
        results_file=output,
        counts=numbers,
        error=error,
        error_file=failures,
        # what an expired or cancelled batch finished is in its files
        partial=state in ("EXPIRED", "CANCELLED") and bool(output or failures),
    )


def _line_error(status: Any, body: Any, scrub: Callable[[str], str]) -> ItemError:
    """A failed request's line as a live failure of that status: 429 RATE_LIMIT, 408
    TIMEOUT, anything else AI_ERROR (all transient: the next run submits it again; a
    refusal or content filter is only in a 200's answer)."""
    message, kind, ecode = _error_fields(body, None)
    code = ErrorCode.AI_ERROR
    if status == 429:
        code = ErrorCode.RATE_LIMIT
    elif status == 408:
        code = ErrorCode.TIMEOUT
    what = f"{status} {ecode or kind}".strip()
    text = scrub(f"batch request failed ({what}): {' '.join(message.split())}"[:MAX_MESSAGE])
    return ItemError(code, text)
