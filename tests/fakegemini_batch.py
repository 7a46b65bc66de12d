"""The Batch API and the Files API of the fake Gemini server (tests/fakegemini.py serves
them as ``server.batch``). Standard library only.

The wire format, as google-genai 3.6.1 speaks it (see ../shared/FIELD-NOTES.md, "Gemini
Batch API"; checked by tests/test_fakegemini_batch.py with the real SDK):

- Files API, resumable upload: ``POST /upload/v1/files`` with ``X-Goog-Upload-Protocol:
  resumable`` and ``X-Goog-Upload-Command: start`` (body ``{"file": {"display_name",
  "mime_type", "size_bytes"}}``, either casing) is answered with an ``X-Goog-Upload-URL``
  header; the chunks go there (``X-Goog-Upload-Command: upload``, the last ``upload,
  finalize``, ``X-Goog-Upload-Offset``), without an API key: the URL is the credential.
  Each chunk is answered ``X-Goog-Upload-Status: active``, the last ``final`` with
  ``{"file": {...}}``. ``GET /v1/files``, ``GET|DELETE /v1/files/{id}``,
  ``GET /v1/files/{id}:download?alt=media`` (also ``/download/v1beta/files/...``).
- Batch API: ``POST /v1/models/{model}:batchGenerateContent`` with ``{"batch":
  {"displayName", "inputConfig": {"fileName"}}}`` (or ``inputConfig.requests.requests``,
  inline) creates a job, answered as an Operation; ``GET /v1/batches/{id}``, ``GET
  /v1/batches?pageSize=&pageToken=`` (``{"operations", "nextPageToken"}``), ``POST
  /v1/batches/{id}:cancel``, ``DELETE /v1/batches/{id}``. A job's ``metadata`` holds
  ``displayName``, ``model``, times, ``batchStats`` (counts as strings), ``state``
  (``BATCH_STATE_*``) and, once it SUCCEEDED, ``output.responsesFile``; ``done`` and
  ``response`` once it ended; a FAILED job carries a top-level ``error``.
- A results file holds one line per request: ``{"key", "response": {...}}`` or ``{"key",
  "error": {"code", "message", "details"}}``, the code an HTTP status or a gRPC code.

What happens to a job is planned when it is created: the next ``plan_next(...)`` if any,
else the defaults (``delay`` 0: it has ended by the first poll, SUCCEEDED, every line
answered as ``generateContent`` would be, through the server's responder). A job is
PENDING for the first half of its delay, RUNNING for the second, then ends with its
``fate``; ``advance(seconds)`` moves the batch clock forward. Jobs and files belong to the
project of the key that made them: another project's key is answered 404.

Usage::

    server.batch.plan_next(fate="EXPIRED", delay=3600)
    server.batch.plan_next(lines=[429, 13, "blocked"], download_404s=2)
    server.batch.fail_next(1, 429, on="batch_create")
    ...
    server.batch.advance(3600)
    [job] = server.batch.jobs
    assert job.state == "BATCH_STATE_EXPIRED"
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.fakegemini import (
    RecordedRequest,
    _BadRequest,
    _candidate,
    _error_body,
    _quota_body,
)
from tests.fakehttp import pick_field

if TYPE_CHECKING:
    from tests.fakegemini import FakeGemini

__all__ = ["BatchPlan", "FakeBatchJob", "FakeBatchService", "StoredFile", "GRPC_STATUS"]

#: gRPC status codes by number (a results line's error may carry one instead of an HTTP one)
GRPC_STATUS = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}
_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
FATES = ("SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED")
_V = r"(v1|v1beta|v1alpha)"
#: (method, path pattern, route); the first match wins
_ROUTES = [
    ("POST", re.compile(rf"^/upload/{_V}/files$"), "upload"),
    ("GET", re.compile(rf"^/{_V}/files$"), "file_list"),
    ("GET", re.compile(rf"^(?:/download)?/{_V}/files/([^/:]+):download$"), "file_download"),
    ("GET", re.compile(rf"^/{_V}/files/([^/:]+)$"), "file_get"),
    ("DELETE", re.compile(rf"^/{_V}/files/([^/:]+)$"), "file_delete"),
    ("POST", re.compile(rf"^/{_V}/models/([^/:]+):batchGenerateContent$"), "batch_create"),
    ("GET", re.compile(rf"^/{_V}/batches$"), "batch_list"),
    ("GET", re.compile(rf"^/{_V}/batches/([^/:]+)$"), "batch_get"),
    ("POST", re.compile(rf"^/{_V}/batches/([^/:]+):cancel$"), "batch_cancel"),
    ("DELETE", re.compile(rf"^/{_V}/batches/([^/:]+)$"), "batch_delete"),
]
_METADATA_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"

#: what the fake server sends back: (status, JSON body or raw bytes, outcome, headers)
Answer = tuple[int, "dict[str, Any] | bytes", str, dict[str, str]]


@dataclass
class BatchPlan:
    """What happens to one job, decided when it is created.

    ``fate``: how it ends (SUCCEEDED, FAILED, EXPIRED, CANCELLED); ``delay``: seconds
    (batch clock) from creation to its end; ``lines``: what the first lines get, in
    order: an int is an error with that code (HTTP status or gRPC code), "blocked" a
    blocked prompt, "malformed" an answer that is not JSON, None the normal answer;
    ``download_404s``: downloads of its results file answered 404 before it appears.
    """

    fate: str = "SUCCEEDED"
    delay: float = 0.0
    lines: Sequence[int | str | None] = ()
    download_404s: int = 0


@dataclass
class StoredFile:
    """One file of the Files API: uploaded (a job's input) or generated (its results)."""

    name: str  # files/{id}
    display_name: str
    mime_type: str
    project: str
    data: bytes = field(repr=False)
    source: str = "UPLOADED"  # or GENERATED
    created: str = ""

    def resource(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "displayName": self.display_name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": self.created,
            "updateTime": self.created,
            "expirationTime": self.created,
            "sha256Hash": hashlib.sha256(self.data).hexdigest(),
            "uri": f"https://generativelanguage.googleapis.com/v1beta/{self.name}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.source == "GENERATED":
            out["downloadUri"] = f"https://generativelanguage.googleapis.com/v1beta/{self.name}"
        return out


@dataclass
class FakeBatchJob:
    """One job as the server holds it. ``keys`` and ``digests`` (sha256 of each request's
    first image) tell what it carries; ``requests`` are the lines as the fake parsed them."""

    name: str  # batches/{id}
    display_name: str
    model: str
    project: str
    input_file: str | None
    keys: list[str]
    digests: list[str]
    created: float  # batch clock
    plan: BatchPlan
    results: list[dict[str, Any]] = field(repr=False, default_factory=list)
    requests: list[RecordedRequest] = field(repr=False, default_factory=list)
    create_time: str = ""
    cancelled: float | None = None
    deleted: bool = False
    results_file: str | None = None
    downloads: int = 0  # downloads of its results file asked so far
    state: str = "BATCH_STATE_PENDING"  # as of the last look (see FakeBatchService.jobs)


@dataclass
class _Upload:
    display_name: str
    mime_type: str
    size: int
    project: str
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Fault:
    on: str  # a route name, or "any"
    status: int
    retry_delay: str | None = None
    quota_id: str | None = None


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pick(d: Mapping[str, Any], camel: str) -> Any:
    return pick_field(d, camel)[1]


_error = _error_body  # Google's error body, as generateContent's


class FakeBatchService:
    """The Batch and Files APIs of one FakeGemini (its key checks, parser and answers)."""

    def __init__(self, fake: FakeGemini) -> None:
        self._fake = fake
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        self._uploads: dict[str, _Upload] = {}
        self._jobs: dict[str, FakeBatchJob] = {}  # by name, in creation order
        self._plans: collections.deque[BatchPlan] = collections.deque()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._offset = 0.0  # advance()
        self._ids = 0
        self.list_page_max = 50  # jobs per page of batches.list at most
        self.default_plan = BatchPlan()  # for jobs created while no plan_next is queued

    # ---------------------------------------------------------------- test controls

    def plan_next(self, n: int = 1, **plan: Any) -> None:
        """The next ``n`` jobs created follow ``BatchPlan(**plan)``."""
        made = BatchPlan(**plan)
        if made.fate not in FATES:
            raise ValueError(f"fate is one of {FATES}")
        with self._lock:
            self._plans.extend(dataclasses.replace(made) for _ in range(n))

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        on: str = "any",
        retry_delay: str | None = None,
        quota_id: str | None = None,
    ) -> None:
        """The next ``n`` requests to route ``on`` ("upload" for an upload's start,
        "batch_create", "batch_get", "batch_list", "file_download", ... or "any") get
        ``status`` (a 429 with ``retry_delay`` or ``quota_id`` carries RetryInfo and
        QuotaFailure details, as generateContent's do)."""
        with self._lock:
            self._faults.extend(_Fault(on, status, retry_delay, quota_id) for _ in range(n))

    def advance(self, seconds: float) -> None:
        """Move the batch clock forward: jobs end as if that much time had passed."""
        with self._lock:
            self._offset += seconds

    @property
    def jobs(self) -> list[FakeBatchJob]:
        """Every job created so far (deleted ones too), oldest first, states as of now."""
        with self._lock:
            now = self._now()
            for job in self._jobs.values():
                self._refresh(job, now)
            return list(self._jobs.values())

    @property
    def files(self) -> dict[str, StoredFile]:
        """The files stored now (not deleted), by name."""
        with self._lock:
            return dict(self._files)

    @property
    def stored_bytes(self) -> int:
        with self._lock:
            return sum(len(f.data) for f in self._files.values())

    # ---------------------------------------------------------------- routing

    @staticmethod
    def route(method: str, path: str, query: str) -> tuple[str, tuple[str, ...]] | None:
        """(route name, its path groups) for a Batch or Files API request, else None. An
        upload chunk (``upload_id`` in the query) is route "upload_chunk"."""
        for verb, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match and verb == method:
                if name == "upload" and "upload_id" in urllib.parse.parse_qs(query):
                    return "upload_chunk", match.groups()
                return name, match.groups()
        return None

    def handle(
        self,
        route: str,
        groups: tuple[str, ...],
        rec: RecordedRequest,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> Answer:
        """Answer one request whose key (if it needs one) has been checked."""
        fault = self._fault(route)
        if fault is not None:
            return fault
        project = rec.project or "default-project"
        params = urllib.parse.parse_qs(query)
        if route == "upload":
            return self._upload_start(rec, headers, body, project)
        if route == "upload_chunk":
            return self._upload_chunk(params["upload_id"][0], headers, body)
        if route == "batch_create":
            return self._create(rec, groups[1], body, project)
        if route == "batch_list":
            return self._list(params, project)
        if route == "file_list":
            with self._lock:
                listed = [f.resource() for f in self._files.values() if f.project == project]
            return 200, {"files": listed}, "file_list", {}
        name = groups[-1]
        if route.startswith("batch_"):
            return self._job_route(route, f"batches/{name}", project)
        return self._file_route(route, f"files/{name}", project)

    def _fault(self, route: str) -> Answer | None:
        with self._lock:
            for fault in self._faults:
                if fault.on in (route, "any") and route != "upload_chunk":
                    self._faults.remove(fault)
                    break
            else:
                return None
        if fault.status == 429 and (fault.retry_delay or fault.quota_id):
            quota = fault.quota_id or "BatchRequestsPerMinutePerProject"
            body = _quota_body(None, quota, None, fault.retry_delay or "1s")
        else:
            body = _error(fault.status, f"injected {fault.status}")
        return fault.status, body, "fault", {}

    # ---------------------------------------------------------------- files

    def _upload_start(
        self, rec: RecordedRequest, headers: Mapping[str, str], body: bytes, project: str
    ) -> Answer:
        if headers.get("X-Goog-Upload-Protocol", "").lower() != "resumable":
            return 400, _error(400, "only resumable uploads are served here"), "bad_request", {}
        if headers.get("X-Goog-Upload-Command", "").lower() != "start":
            return 400, _error(400, "X-Goog-Upload-Command must be start"), "bad_request", {}
        try:
            meta = _pick(json.loads(body or b"{}"), "file") or {}
            size = int(headers["X-Goog-Upload-Header-Content-Length"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return 400, _error(400, "bad upload start"), "bad_request", {}
        mime = headers.get("X-Goog-Upload-Header-Content-Type") or _pick(meta, "mimeType") or ""
        with self._lock:
            self._ids += 1
            upload_id = f"up-{self._ids:06d}"
            self._uploads[upload_id] = _Upload(
                str(_pick(meta, "displayName") or ""), str(mime), size, project
            )
        url = f"{self._fake.url}/upload/{rec.path.split('/')[2]}/files?upload_id={upload_id}"
        url += "&upload_protocol=resumable"
        headers_out = {
            "X-Goog-Upload-URL": url,
            "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Chunk-Granularity": "8388608",
        }
        return 200, b"", "upload_start", headers_out

    def _upload_chunk(self, upload_id: str, headers: Mapping[str, str], body: bytes) -> Answer:
        command = {c.strip() for c in headers.get("X-Goog-Upload-Command", "").lower().split(",")}
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                return 404, _error(404, "unknown upload"), "not_found", {}
            offset = int(headers.get("X-Goog-Upload-Offset", "-1"))
            if offset != len(upload.data) or "upload" not in command:
                status = {"X-Goog-Upload-Status": "active"}
                return 400, _error(400, f"bad offset {offset}"), "bad_request", status
            upload.data += body
            if "finalize" not in command:
                return 200, b"", "upload_chunk", {"X-Goog-Upload-Status": "active"}
            del self._uploads[upload_id]
            if len(upload.data) != upload.size:
                return (
                    400,
                    _error(400, "size mismatch"),
                    "bad_request",
                    {"X-Goog-Upload-Status": "final"},
                )
            self._ids += 1
            stored = StoredFile(
                f"files/{self._ids:06d}in{hashlib.sha1(upload.data).hexdigest()[:6]}",
                upload.display_name,
                upload.mime_type,
                upload.project,
                bytes(upload.data),
                created=_stamp(),
            )
            self._files[stored.name] = stored
        return 200, {"file": stored.resource()}, "upload_final", {"X-Goog-Upload-Status": "final"}

    def _file_route(self, route: str, name: str, project: str) -> Answer:
        with self._lock:
            stored = self._files.get(name)
            if stored is not None and stored.project != project:
                stored = None
            if route == "file_download":
                job = next((j for j in self._jobs.values() if j.results_file == name), None)
                if job is not None and job.downloads < job.plan.download_404s:
                    job.downloads += 1  # reported SUCCEEDED, results not downloadable yet
                    stored = None
                elif job is not None:
                    job.downloads += 1
        if stored is None:
            return 404, _error(404, f"File {name} not found."), "not_found", {}
        if route == "file_get":
            return 200, stored.resource(), "file_get", {}
        if route == "file_delete":
            with self._lock:
                self._files.pop(name, None)
            return 200, {}, "file_delete", {}
        return 200, stored.data, "file_download", {}

    # ---------------------------------------------------------------- jobs

    def _create(self, rec: RecordedRequest, model: str, body: bytes, project: str) -> Answer:
        try:
            batch = _pick(json.loads(body), "batch")
            config = _pick(batch, "inputConfig")
        except (ValueError, TypeError, AttributeError):
            return 400, _error(400, "Invalid JSON payload received."), "bad_request", {}
        if not isinstance(config, dict):
            return 400, _error(400, "batch.input_config is required"), "bad_request", {}
        input_name = _pick(config, "fileName")
        if input_name is not None:
            with self._lock:
                stored = self._files.get(str(input_name))
            if stored is None or stored.project != project:
                return 404, _error(404, f"File {input_name} not found."), "not_found", {}
            lines = [json.loads(line) for line in stored.data.splitlines() if line.strip()]
        else:
            inline = _pick(config, "requests") or {}
            lines = [
                {"key": str((_pick(r, "metadata") or {}).get("key", i)), "request": r["request"]}
                for i, r in enumerate(_pick(inline, "requests") or [])
            ]
        with self._lock:
            plan = self._plans.popleft() if self._plans else dataclasses.replace(self.default_plan)
            self._ids += 1
            name = f"batches/{self._ids:06d}job{hashlib.sha1(body[:4096]).hexdigest()[:8]}"
        job = FakeBatchJob(
            name,
            str(_pick(batch, "displayName") or ""),
            f"models/{model}",
            project,
            str(input_name) if input_name else None,
            [str(line.get("key", "")) for line in lines],
            [],
            0.0,
            plan,
            create_time=_stamp(),
        )
        self._answer_lines(job, lines)  # outside the lock: Pillow, the responder
        with self._lock:
            job.created = self._now()
            self._jobs[name] = job
            self._refresh(job, job.created)
            return 200, self._operation(job), "batch_create", {}

    def _answer_lines(self, job: FakeBatchJob, lines: list[dict[str, Any]]) -> None:
        """Every line's answer, as generateContent would give it (or as planned)."""
        fake = self._fake
        script = list(job.plan.lines)
        for i, line in enumerate(lines):
            key = str(line.get("key", ""))
            rec = RecordedRequest(i, fake._clock(), "BATCH", f"{job.name}/{key}")
            rec.model = job.model.removeprefix("models/")
            planned = script[i] if i < len(script) else None
            try:
                fake._parse(rec, json.dumps(line.get("request") or {}).encode())
            except _BadRequest as exc:
                planned = planned if planned is not None else 400
                message = exc.message
            else:
                message = None
            job.requests.append(rec)
            job.digests.append(hashlib.sha256(rec.images[0].data).hexdigest() if rec.images else "")
            if isinstance(planned, int):
                status = GRPC_STATUS.get(planned) if planned < 100 else _HTTP_STATUS.get(planned)
                # as Google writes them: a code (gRPC or HTTP) and a message, no status name
                error = {
                    "code": planned,
                    "message": message or f"planned error {planned} ({status or 'UNKNOWN'})",
                    "details": [{"@type": "type.googleapis.com/google.rpc.DebugInfo",
                                 "detail": "fake"}],
                }  # fmt: skip
                job.results.append({"key": key, "error": error})
                rec.outcome = "error"
                continue
            if planned == "blocked":
                reply = fake._answer(rec, {"promptFeedback": {"blockReason": "SAFETY"}}, None,
                                     "blocked")  # fmt: skip
            elif planned == "malformed":
                text = '{"description": "cut sh'
                reply = fake._answer(rec, _candidate(text), text, "malformed")
            else:
                reply = fake._happy(rec)
            rec.outcome = reply.outcome
            job.results.append({"key": key, "response": json.loads(reply.body)})

    def _now(self) -> float:
        return self._fake._clock() + self._offset

    def _refresh(self, job: FakeBatchJob, now: float) -> None:
        """Bring a job's state up to `now` (called with the lock held); a job that
        SUCCEEDED gets its results file."""
        if job.state in {f"BATCH_STATE_{f}" for f in FATES}:
            return
        if job.cancelled is not None:
            job.state = "BATCH_STATE_CANCELLED"
        elif now >= job.created + job.plan.delay:
            job.state = f"BATCH_STATE_{job.plan.fate}"
            if job.plan.fate == "SUCCEEDED" and job.input_file is not None:
                data = b"".join(json.dumps(r).encode() + b"\n" for r in job.results)
                name = f"files/batch-{job.name.split('/')[1]}"
                self._files[name] = StoredFile(
                    name, f"{job.display_name} results", "application/jsonl", job.project,
                    data, "GENERATED", _stamp(),
                )  # fmt: skip
                job.results_file = name
        elif now >= job.created + job.plan.delay / 2:
            job.state = "BATCH_STATE_RUNNING"

    def _operation(self, job: FakeBatchJob) -> dict[str, Any]:
        total = len(job.keys)
        ended = job.state.removeprefix("BATCH_STATE_") in FATES
        succeeded = job.state == "BATCH_STATE_SUCCEEDED"
        failed = sum("error" in r for r in job.results) if succeeded else 0
        stats = {
            "requestCount": str(total),
            "pendingRequestCount": str(0 if ended else total),
        }
        if succeeded:
            stats["successfulRequestCount"] = str(total - failed)
            if failed:
                stats["failedRequestCount"] = str(failed)
        meta: dict[str, Any] = {
            "@type": _METADATA_TYPE,
            "model": job.model,
            "displayName": job.display_name,
            "createTime": job.create_time,
            "updateTime": _stamp(),
            "batchStats": stats,
            "state": job.state,
            "name": job.name,
        }
        if job.input_file:
            meta["inputConfig"] = {"fileName": job.input_file}
        op: dict[str, Any] = {"name": job.name, "metadata": meta}
        if ended:
            meta["endTime"] = _stamp()
            op["done"] = True
        if succeeded and job.results_file:
            meta["output"] = {"responsesFile": job.results_file}
            op["response"] = {"@type": _OUTPUT_TYPE, "responsesFile": job.results_file}
        elif succeeded:  # inline requests are answered inline
            inlined = [
                {k: v for k, v in r.items() if k != "key"} | {"metadata": {"key": r["key"]}}
                for r in job.results
            ]
            meta["output"] = {"inlinedResponses": {"inlinedResponses": inlined}}
            op["response"] = {"@type": _OUTPUT_TYPE, **meta["output"]}
        if job.state == "BATCH_STATE_FAILED":
            op["error"] = {"code": 13, "message": "The batch failed: internal error."}
        return op

    def _job(self, name: str, project: str) -> FakeBatchJob | None:
        job = self._jobs.get(name)
        if job is None or job.deleted or job.project != project:
            return None
        self._refresh(job, self._now())
        return job

    def _job_route(self, route: str, name: str, project: str) -> Answer:
        with self._lock:
            job = self._job(name, project)
            if job is None:
                return 404, _error(404, f"Batch {name} not found."), "not_found", {}
            if route == "batch_get":
                return 200, self._operation(job), "batch_get", {}
            if route == "batch_cancel":
                if job.state in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
                    job.cancelled = self._now()
                    self._refresh(job, job.cancelled)
                return 200, {}, "batch_cancel", {}
            job.deleted = True
            return 200, {}, "batch_delete", {}

    def _list(self, params: Mapping[str, list[str]], project: str) -> Answer:
        size = min(int((params.get("pageSize") or ["50"])[0]), self.list_page_max)
        start = int((params.get("pageToken") or ["0"])[0] or 0)
        with self._lock:
            now = self._now()
            mine = [j for j in self._jobs.values() if j.project == project and not j.deleted]
            mine.reverse()  # newest first, as Google lists them
            page = mine[start : start + size]
            for job in page:
                self._refresh(job, now)
            body: dict[str, Any] = {"operations": [self._operation(j) for j in page]}
        if start + size < len(mine):
            body["nextPageToken"] = str(start + size)
        return 200, body, "batch_list", {}
