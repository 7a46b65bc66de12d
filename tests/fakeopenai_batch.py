"""OpenAI's Files and Batch APIs on the fake OpenAI server (tests/fakeopenai.py), with the
wire format OpenAI documents, for `analyze --batch --provider openai`. Standard library
only (plus what FakeOpenAI uses).

Routes (under the server's ``/v1``; a key is required as for chat completions, and a
file or batch is visible only to the key that made it, as to an organisation):
- ``POST /files`` (multipart: ``file``, ``purpose=batch``), ``GET /files/ID/content``,
  ``DELETE /files/ID``;
- ``POST /batches`` (``input_file_id``, ``endpoint``, ``completion_window`` 24h,
  ``metadata``: at most 16 pairs, keys up to 64 and values up to 512 characters), ``GET
  /batches/ID``, ``GET /batches?limit=&after=`` (newest first, ``has_more``,
  ``first_id``, ``last_id``), ``POST /batches/ID/cancel``.

A batch is ``validating`` when created, ``in_progress`` once polled, and ends only when
the test says (``end``): ``completed`` (every line answered, as a live request to this
server is), ``expired`` or ``cancelled`` (the first ``finished`` lines answered, the
others in the error file as ``batch_expired`` / ``batch_cancelled``), or ``failed``
(nothing run, ``errors`` say why). Answered lines go to the output file, failed ones
(``line_errors``) to the error file, each ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``. ``creates`` and ``uploads`` count what was made,
``answered`` the lines run (paid for); ``before_answer`` is called with each Files or Batch
request's record once the server acted on it, before it answers (a test kills the client
there).

Usage::

    with FakeOpenAIBatch(keys={KEY}) as server:
        ...  # a run submits
        server.end("expired", finished=2)
        ...  # the next run collects
"""

from __future__ import annotations

import collections
import email.parser
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakehttp import Handler, Reply
from tests.fakeopenai import FakeOpenAI, RecordedRequest, _Bad

__all__ = ["FakeBatch", "FakeOpenAIBatch"]

ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass
class BatchRecord(RecordedRequest):
    """A request's record, with the Files or Batch API route it took ("chat" else)."""

    route: str = "chat"


@dataclass
class FakeBatch:
    """One batch as the server holds it."""

    id: str
    owner: str
    input_file_id: str
    lines: list[dict[str, Any]] = field(repr=False)
    metadata: dict[str, str]
    created_at: int
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    completed: int = 0
    failed: int = 0

    @property
    def custom_ids(self) -> list[str]:
        return [str(line.get("custom_id")) for line in self.lines]

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86400,
            "request_counts": {
                "total": len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


class FakeOpenAIBatch(FakeOpenAI):
    """FakeOpenAI (dialect ``openai``) with the Files and Batch APIs (see the module doc)."""

    name = "fakeopenai-batch"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (owner key, content)
        self.batches: dict[str, FakeBatch] = {}  # in creation order
        self.creates = 0
        self.uploads = 0
        #: how many times each custom_id was run (paid for): expired lines were not
        self.answered: collections.Counter[str] = collections.Counter()
        #: statuses (429, 500, ...) the next answered lines get instead of an answer
        self.line_errors: collections.deque[int] = collections.deque()
        self.fail_next_batch: str | None = None  # the next created batch fails so
        self.before_answer: Callable[[BatchRecord], None] | None = None
        self._ids = 0

    # ---------------------------------------------------------------- the test's side

    def end(self, status: str = "completed", finished: int | None = None) -> list[FakeBatch]:
        """End every batch not ended yet with `status`; expired or cancelled ones answer
        their first `finished` lines (None: none). Returns the batches ended."""
        assert status in ENDED - {"failed"}, status
        ended = []
        with self._lock:
            for batch in self.batches.values():
                if batch.status in ENDED:
                    continue
                done = len(batch.lines) if status == "completed" else finished or 0
                output, errors = [], []
                for i, line in enumerate(batch.lines):
                    if i < done:
                        answered = self._run_line(line)
                        self.answered[str(line.get("custom_id"))] += 1
                        ok = answered["response"]["status_code"] == 200
                        (output if ok else errors).append(answered)  # as OpenAI splits them
                        batch.completed += answered["response"]["status_code"] == 200
                        batch.failed += answered["response"]["status_code"] != 200
                    else:
                        code = "batch_expired" if status == "expired" else "batch_cancelled"
                        errors.append(
                            {
                                "id": self._new_id("batch_req_"),
                                "custom_id": line.get("custom_id"),
                                "response": None,
                                "error": {"code": code, "message": f"This request {status}."},
                            }
                        )
                batch.output_file_id = self._store(batch.owner, output) if output else None
                batch.error_file_id = self._store(batch.owner, errors) if errors else None
                batch.status = status
                ended.append(batch)
        return ended

    def carried(self) -> collections.Counter[str]:
        """How many batches carried each custom_id (our keys are content hashes)."""
        with self._lock:
            return collections.Counter(c for b in self.batches.values() for c in b.custom_ids)

    def count_route(self, route: str) -> int:
        return sum(1 for r in self.requests if getattr(r, "route", "chat") == route)

    # ---------------------------------------------------------------- requests

    def _new_record(self, index: int, now: float, method: str, path: str) -> BatchRecord:
        return BatchRecord(index, now, method, path)

    def _timing(self) -> tuple[float, float, Callable[[Any], None] | None]:
        latency, hang, _ = super()._timing()
        hook = self.before_answer

        def before(rec: Any) -> None:
            if hook is not None and getattr(rec, "route", "chat") != "chat":
                hook(rec)

        return latency, hang, before

    def _process(self, h: Handler, rec: Any, split: urllib.parse.SplitResult) -> Reply:
        path = split.path.rstrip("/")
        base = self._prefix + "/v1/"
        if not path.startswith(base):
            return super()._process(h, rec, split)
        parts = path[len(base) :].split("/")
        if parts[0] not in ("files", "batches"):
            return super()._process(h, rec, split)
        raw = self._read_body(h, int(h.headers.get("Content-Length") or 0))
        auth = h.headers.get("Authorization") or ""
        rec.api_key = auth[7:] if auth.startswith("Bearer ") else (auth or None)
        # "GET batches", "GET batches/ID", "GET files/ID/content", "POST batches/ID/cancel"
        rec.route = " ".join([h.command, "/".join([parts[0], "ID", *parts[2:]][: len(parts)])])
        try:
            self._check_key(rec)
            with self._lock:
                scripted = self._next_scripted(rec)
                if scripted is not None:
                    return scripted
                return self._route(h, rec, parts, raw, split.query)
        except _Bad as bad:
            return bad.reply

    def _route(
        self, h: Handler, rec: BatchRecord, parts: list[str], raw: bytes, query: str
    ) -> Reply:
        owner = rec.api_key or ""
        if parts == ["files"] and h.command == "POST":
            return self._upload(h, owner, raw)
        if parts[0] == "files" and len(parts) >= 2:
            stored = self.files.get(parts[1])
            if stored is None or stored[0] != owner:
                return self._error(
                    404, f"No such File object: {parts[1]}", "invalid_request_error", "not_found"
                )
            if len(parts) == 3 and parts[2] == "content" and h.command == "GET":
                return Reply(200, stored[1], "application/octet-stream", "ok")
            if len(parts) == 2 and h.command == "DELETE":
                del self.files[parts[1]]
                return self._json(200, {"id": parts[1], "object": "file", "deleted": True}, "ok")
        if parts == ["batches"] and h.command == "POST":
            return self._create(owner, raw)
        if parts == ["batches"] and h.command == "GET":
            return self._list(owner, query)
        if parts[0] == "batches" and len(parts) >= 2:
            batch = self.batches.get(parts[1])
            if batch is None or batch.owner != owner:
                return self._error(
                    404,
                    f"No batch found with id '{parts[1]}'.",
                    "invalid_request_error",
                    "not_found",
                )
            if len(parts) == 2 and h.command == "GET":
                if batch.status == "validating":
                    batch.status = "in_progress"
                return self._json(200, batch.json(), "ok")
            if len(parts) == 3 and parts[2] == "cancel" and h.command == "POST":
                if batch.status not in ENDED:
                    batch.status = "cancelling"
                return self._json(200, batch.json(), "ok")
        return self._no_route(h)

    def _upload(self, h: Handler, owner: str, raw: bytes) -> Reply:
        ctype = h.headers.get("Content-Type") or ""
        message = email.parser.BytesParser().parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw
        )
        fields: dict[str, bytes] = {}
        filename = ""
        for part in message.walk() if message.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str):
                payload = part.get_payload(decode=True)
                fields[name] = payload if isinstance(payload, bytes) else b""
                filename = str(part.get_filename() or filename)
        if fields.get("purpose") != b"batch" or "file" not in fields:
            return self._error(
                400, "purpose=batch and a file are required", "invalid_request_error"
            )
        file_id = self._new_id("file-")
        self.files[file_id] = (owner, fields["file"])
        self.uploads += 1
        body = {
            "id": file_id,
            "object": "file",
            "bytes": len(fields["file"]),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": "batch",
            "status": "processed",
        }
        return self._json(200, body, "ok")

    def _create(self, owner: str, raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "invalid JSON body", "invalid_request_error")
        meta = body.get("metadata") or {}
        if (
            not isinstance(meta, dict)
            or len(meta) > 16
            or any(len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in meta.items())
        ):
            return self._error(400, "Invalid metadata", "invalid_request_error")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return self._error(
                400, "Invalid endpoint or completion_window", "invalid_request_error"
            )
        stored = self.files.get(str(body.get("input_file_id")))
        if stored is None or stored[0] != owner:
            return self._error(404, "No such File object", "invalid_request_error", "not_found")
        lines = [json.loads(x) for x in stored[1].splitlines() if x.strip()]
        batch = FakeBatch(
            self._new_id("batch_"),
            owner,
            str(body["input_file_id"]),
            lines,
            dict(meta),
            int(time.time()),
        )
        ids = batch.custom_ids
        bad = len(set(ids)) != len(ids) or any(
            line.get("method") != "POST" or line.get("url") != "/v1/chat/completions"
            for line in lines
        )
        if bad or self.fail_next_batch:
            reason = self.fail_next_batch or "invalid input file"
            batch.status, batch.errors = "failed", [{"code": "invalid_request", "message": reason}]
            self.fail_next_batch = None
        self.batches[batch.id] = batch
        self.creates += 1
        return self._json(200, batch.json(), "ok")

    def _list(self, owner: str, query: str) -> Reply:
        q = dict(urllib.parse.parse_qsl(query))
        limit = max(1, min(100, int(q.get("limit") or 20)))
        mine = [b for b in reversed(self.batches.values()) if b.owner == owner]  # newest first
        after = q.get("after")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        page = mine[:limit]
        body = {
            "object": "list",
            "data": [b.json() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(mine) > limit,
        }
        return self._json(200, body, "ok")

    # ---------------------------------------------------------------- plumbing

    def _run_line(self, line: dict[str, Any]) -> dict[str, Any]:
        """One request line answered as this server answers it live (or a scripted
        `line_errors` status)."""
        rec = RecordedRequest(-1, time.monotonic(), "POST", "/v1/chat/completions")
        request_id = self._new_id("req_")
        status = self.line_errors.popleft() if self.line_errors else 200
        if status != 200:
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            body: Any = {
                "error": {"message": f"fake line error {status}", "type": kind, "code": kind}
            }
        else:
            try:
                self._parse(rec, json.dumps(line.get("body")).encode())
                reply = self._happy(rec)
            except _Bad as bad:
                reply = bad.reply
            status, body = reply.status or 500, json.loads(reply.body)
        return {
            "id": self._new_id("batch_req_"),
            "custom_id": line.get("custom_id"),
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }

    def _store(self, owner: str, lines: list[dict[str, Any]]) -> str:
        file_id = self._new_id("file-")
        self.files[file_id] = (owner, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        return file_id

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:06d}"
