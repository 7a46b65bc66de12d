"""The Gemini Batch API (`analyze --batch`): request lines, input files, jobs, results.

Beside providers/gemini.py, the only module that imports the Gemini SDK. It reuses that
provider's requests (prompt, schema, generation settings, upload encoding: a batch
result is stored under the same settings fingerprint as a live one, so either serves
the other), its key pool and its classification of error answers.

The SDK does the talking: the Files API's resumable upload, creating, deleting and
downloading. Where its types fall short of what the server answers (google-genai 3.6.1:
`BatchJob` drops `batchStats`, `done` and a top-level `error`; a per-line error with
`details` objects makes `batches.get` raise), the job is read as raw JSON through the
same client.

Keys. A job and its files belong to the project of the key that made them: another
project answers 404 for them. So a job record names its key (`key_id`: a hash of the
endpoint and the key, never the key) and every later call about it goes through that key
alone; a key no longer configured (or at another endpoint) is `KeyGone`, never another
key, whose 404 would make the job look deleted while Google still runs (and bills) it.

Errors, for the caller (pipeline/batch.py):
- `NotFound`: a job or file the server does not know (deleted, expired, or a results
  file not downloadable yet), as its own key's project says;
- `KeyGone`: the key a job or file was made with is not configured in this run;
- `Unavailable`: a 429, a 5xx, a timeout or a network error: try again later (a 429 on
  upload or create leaves the rest of the submission for the next run);
- an `ImgbatchError` stops the run as a live request's would: the daily quota
  (QuotaExhaustedError), every key rejected (AuthError), an unknown model (ConfigError).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from imgbatch import statedb
from imgbatch.errors import ErrorCode, ImgbatchError, ItemError
from imgbatch.providers.base import Analysis, Failover
from imgbatch.providers.batchapi import ENDED, JobStatus, KeyGone, NotFound, Unavailable  # shared
from imgbatch.providers.gemini import _TIMEOUTS, _TRANSPORT, GeminiProvider
from imgbatch.providers.prompt import DEFAULT_SCHEMA

__all__ = [
    "ENDED",
    "MAX_FILE_BYTES",
    "GeminiBatch",
    "JobStatus",
    "KeyGone",
    "NotFound",
    "Unavailable",
    "key_id",
]

log = logging.getLogger("imgbatch")

T = TypeVar("T")

#: a request file stays under this size (Google takes input files up to 2 GB)
MAX_FILE_BYTES = 100 * 1024 * 1024
MIME_TYPE = "application/jsonl"  # Python's mimetypes has no .jsonl
#: gRPC codes a results line may carry instead of an HTTP status, by name
_GRPC = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}
_HTTP = {429: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED", 503: "UNAVAILABLE", 500: "INTERNAL"}
_MEDIA = {
    "low": "MEDIA_RESOLUTION_LOW",
    "medium": "MEDIA_RESOLUTION_MEDIUM",
    "high": "MEDIA_RESOLUTION_HIGH",
}


def _job_status(op: dict[str, Any]) -> JobStatus:
    """A job as its raw JSON (an operation) describes it."""
    meta = op.get("metadata") if isinstance(op.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    state = str(meta.get("state") or "PENDING")
    state = state.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
    output = meta.get("output") or op.get("response") or {}
    results = output.get("responsesFile") if isinstance(output, dict) else None
    stats = meta.get("batchStats") if isinstance(meta.get("batchStats"), dict) else {}
    assert isinstance(stats, dict)
    counts = {}
    for ours, theirs in (
        ("requests", "requestCount"),
        ("pending", "pendingRequestCount"),
        ("succeeded", "successfulRequestCount"),
        ("failed", "failedRequestCount"),
    ):
        try:  # counts come as strings (int64 in JSON)
            counts[ours] = int(stats.get(theirs) or 0)
        except (TypeError, ValueError):
            counts[ours] = 0
    error = op.get("error")
    return JobStatus(
        name=str(op.get("name") or meta.get("name") or ""),
        display_name=str(meta.get("displayName") or ""),
        state=state,
        results_file=str(results) if results else None,
        counts=counts,
        error=str(error.get("message") or error) if isinstance(error, dict) else None,
    )


#: where requests go when no base URL is set (part of a key's identity, see `key_id`)
DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com"


def key_id(key: str, endpoint: str) -> str:
    """The identity of an API key at an endpoint, recorded with a job (whose project must
    be asked about it later): a hash of both, not the key, and independent of the key's
    place in the configured list."""
    where = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    return "k1-" + hashlib.sha256(f"{where}\n{key}".encode()).hexdigest()[:16]


def _legacy_key_id(key: str) -> str:
    """The identity recorded by imgbatch before the endpoint was part of it."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class GeminiBatch:
    """The Batch API with the keys, requests and answers of a `GeminiProvider` (a
    `batchapi.BatchClient`)."""

    max_file_bytes = MAX_FILE_BYTES
    max_requests = 10**9  # no limit of its own: `batch_max_requests` and the file size

    def __init__(self, provider: GeminiProvider) -> None:
        self.provider = provider
        self._indexes: dict[str, int] = {}  # key_id -> pool index, for every configured key
        index = 0
        while True:  # every configured key (len(pool) counts only those still in it)
            try:
                key = provider.pool.key(index)
            except IndexError:
                break
            self._indexes.setdefault(key_id(key, provider.base_url), index)
            # jobs recorded before: their ids name the key alone (the endpoint unknown)
            self._indexes.setdefault(_legacy_key_id(key), index)
            index += 1

    def check(self) -> None:
        """Every Gemini endpoint has the Batch API: nothing to check."""

    def holds(self, key: str | None) -> bool:
        """Whether the key named `key` (see `key_id`) is configured in this run."""
        return key is not None and key in self._indexes

    # -- request lines -------------------------------------------------------------

    def _request_template(self) -> dict[str, Any]:
        """A request without its image: the live request's prompt and settings, in the
        REST form of generateContent."""
        p, s = self.provider, self.provider.settings
        config: dict[str, Any] = {
            "responseMimeType": "application/json",
            "temperature": s.gemini_temperature,
            "maxOutputTokens": s.gemini_max_output_tokens,
        }
        if p.json_schema is not None:
            config["responseJsonSchema"] = p.json_schema
        else:
            config["responseSchema"] = DEFAULT_SCHEMA
        if s.gemini_media_resolution:
            config["mediaResolution"] = _MEDIA[s.gemini_media_resolution]
        return {
            "contents": [{"role": "user", "parts": ["IMAGE", {"text": p.prompt}]}],
            "generationConfig": config,
        }

    def request_line(self, key: str, encoded: tuple[bytes, str]) -> bytes:
        """One line of a request file: `{"request": ..., "key": key}` with the image."""
        data, mime = encoded
        image = {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}
        request = self._request_template()
        request["contents"][0]["parts"][0] = image
        line = {"key": key, "request": request}
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    # -- answers -------------------------------------------------------------------

    def line_key(self, line: dict[str, Any]) -> str | None:
        """The request key a results line answers (its `key`)."""
        key = line.get("key")
        return key if isinstance(key, str) else None

    def answer(self, line: dict[str, Any]) -> Analysis:
        """The analysis in one results line; ItemError for an error line (classified as
        a live failure: a gRPC code or an HTTP status), or a blocked, empty or malformed
        answer."""
        error = line.get("error")
        if isinstance(error, dict):
            raise _line_error(error, self.provider.pool.scrub)
        response = line.get("response")
        if not isinstance(response, dict):
            raise ItemError(ErrorCode.AI_ERROR, "batch results line without a response")
        return self.provider.parse_answer(response)

    # -- files and jobs --------------------------------------------------------------

    def upload(self, path: Path, display_name: str, key: str | None = None) -> tuple[str, str]:
        """Upload a request file (resumable, in 8 MiB chunks); returns its Files API name
        and the id of the key whose project now holds it (see `key_id`). With `key` (a
        submission that has a key already), through that key only (KeyGone if it is not
        configured); else through the pool: a key's own trouble moves on to the next key,
        none left is the pool's run-level error."""
        config = types.UploadFileConfig(mime_type=MIME_TYPE, display_name=display_name)
        while True:
            index = self._index(key) if key is not None else self.provider.pool.pick()
            try:
                uploaded = self._call(
                    "uploading the request file",
                    index,
                    lambda c: c.files.upload(file=path, config=config),
                )
                break
            except Unavailable as exc:
                if not exc.failover or key is not None:
                    raise
        if not uploaded.name:
            raise Unavailable("the Files API answered an upload without a file name")
        return uploaded.name, key or key_id(self.provider.pool.key(index), self.provider.base_url)

    def create(self, file_name: str, display_name: str, key: str) -> JobStatus:
        """Create a job over an uploaded request file. Not idempotent: the caller records
        its intent (the display name) first, and looks it up (`find`) after a crash."""

        def create(client: genai.Client) -> JobStatus:
            job = client.batches.create(
                model=self.provider.model, src=file_name, config={"display_name": display_name}
            )
            state = str(getattr(job.state, "value", job.state) or "PENDING")
            return JobStatus(
                job.name or "", display_name, state.removeprefix("JOB_STATE_"), None, {}
            )

        return self._call("creating the batch job", self._index(key), create, not_found=True)

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
        """The job created under `display_name` (listed by the project of key `key`), or
        None: how a submission killed around its `create` learns whether it happened."""
        token = ""
        while True:
            page = self._raw("listing batch jobs", key, "get", f"batches?pageSize=100{token}")
            for op in page.get("operations") or []:
                if isinstance(op, dict):
                    status = _job_status(op)
                    if status.display_name == display_name:
                        return status
            nxt = page.get("nextPageToken")
            if not nxt:
                return None
            token = f"&pageToken={nxt}"

    def status(self, name: str, key: str) -> JobStatus:
        """Poll one job (raw JSON: see the module docstring)."""
        return _job_status(self._raw("polling the batch job", key, "get", name))

    def fetch_results(self, status: JobStatus, key: str, destination: Path) -> None:
        """A SUCCEEDED job's results file to `destination` (see `download`)."""
        if not status.results_file:
            raise NotFound("no results file named yet")
        self.download(status.results_file, key, destination)

    def download(self, file_name: str, key: str, destination: Path) -> None:
        """Stream a results file to `destination`; NotFound while it cannot be
        downloaded (a job has been seen SUCCEEDED before its results file was). The file
        is created owner-only (it holds every description) and never through a link."""
        index = self._index(key)
        with statedb.write_private(destination) as out:
            self._call(
                "downloading the results",
                index,
                lambda c: c.files.download(file=file_name, destination=out),
                not_found=True,
            )

    def delete_file(self, file_name: str, key: str) -> None:
        """Delete an input file (Files API storage is capped per project); best effort:
        it expires after 48 hours anyway."""
        try:
            self._call("deleting", self._index(key), lambda c: c.files.delete(name=file_name))
        except (NotFound, Unavailable, KeyGone) as exc:
            log.debug("could not delete %s: %s", file_name, exc)

    # -- plumbing ------------------------------------------------------------------

    def _index(self, key: str) -> int:
        """The pool index of the key named `key` (see `key_id`); KeyGone if it is not
        configured. Never another key: its project would answer 404 for a job that
        Google still runs."""
        index = self._indexes.get(key)
        if index is None:
            raise KeyGone("the API key it was made with is not configured")
        return index

    def _raw(self, what: str, key: str, method: str, path: str) -> dict[str, Any]:
        def request(client: genai.Client) -> dict[str, Any]:
            # the SDK's own transport (base URL, key, timeout), without its types
            answer = client._api_client.request(method, path, {})
            body = json.loads(answer.body or "{}")
            if not isinstance(body, dict):
                raise Unavailable(f"{what}: the answer is not a JSON object")
            return body

        return self._call(what, self._index(key), request, not_found=True)

    def _call(
        self, what: str, index: int, fn: Callable[[genai.Client], T], not_found: bool = False
    ) -> T:
        """`fn(client of key index)`, its failures as NotFound, Unavailable or a run-level
        ImgbatchError (never the key itself in a message)."""
        try:
            return fn(self.provider.client(index))
        except genai_errors.APIError as exc:
            if exc.code == 404 and not_found:
                raise NotFound(f"{what}: 404 {exc.message or ''}".strip()) from None
            error = self.provider.classify(exc, index)
            if isinstance(error, ImgbatchError):
                raise error from None
            message = self.provider.pool.scrub(f"{what}: {error}")
            rate_limited = isinstance(error, ItemError) and error.code is ErrorCode.RATE_LIMIT
            raise Unavailable(message, rate_limited, isinstance(error, Failover)) from None
        except _TIMEOUTS:
            raise Unavailable(f"{what}: no answer in time") from None
        except _TRANSPORT as exc:
            raise Unavailable(f"{what}: network error: {type(exc).__name__}") from None
        except (ValueError, KeyError) as exc:  # an answer the SDK cannot read
            raise Unavailable(f"{what}: unexpected answer ({type(exc).__name__})") from None


def _line_error(error: dict[str, Any], scrub: Callable[[str], str]) -> ItemError:
    """A results line's `error` as a live failure: RESOURCE_EXHAUSTED (gRPC 8, HTTP 429)
    is RATE_LIMIT, DEADLINE_EXCEEDED (4, 504) TIMEOUT, anything else AI_ERROR; all three
    are transient, so the next run submits the item again."""
    raw = error.get("code")
    try:
        code = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        code = None
    name = str(error.get("status") or "")
    if code is not None and not name:
        name = _GRPC.get(code, "") if code < 100 else _HTTP.get(code, "")
    if name == "RESOURCE_EXHAUSTED":
        kind = ErrorCode.RATE_LIMIT
    elif name == "DEADLINE_EXCEEDED":
        kind = ErrorCode.TIMEOUT
    else:
        kind = ErrorCode.AI_ERROR
    message = str(error.get("message") or "")
    status = " ".join(str(x) for x in (code, name) if x not in (None, ""))
    return ItemError(kind, scrub(f"batch request failed ({status or '?'}): {message}".strip()))
