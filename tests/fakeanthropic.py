"""A fake Anthropic Messages API (``POST /v1/messages``) for the test suite, on the shared
plumbing of tests/fakehttp.py. Standard library (and Pillow, to read the images sent).

The wire format is the real one: the key as ``x-api-key`` or ``Authorization: Bearer``
(SDKs 2.x send the latter), ``anthropic-version`` required, the answer's ``content`` a
``tool_use`` block when a tool is forced (else a ``text`` block), ``stop_reason``,
``usage``; errors ``{"type": "error", "error": {"type", "message"}}`` (400
invalid_request_error, 401 authentication_error, 402 billing_error, 404 not_found_error,
429 rate_limit_error with ``retry-after`` and ``anthropic-ratelimit-*`` headers, 500
api_error, 529 overloaded_error). Scripted faults (fakehttp's, plus ``cut_next``: a
``max_tokens`` stop, ``no_tool_next``: a text answer without the tool call; a header
value ``in:SECONDS`` is answered as the time that far ahead) and a ``responder`` for the
tool input. Every request is logged with its headers (a test
compares what was sent)."""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime
import hashlib
import io
import json
import re
import secrets
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fakehttp import Action, FakeHTTPServer, Handler, Record, Reply
from tests.fakeopenai import RecordedImage, _describe

__all__ = ["FakeAnthropic", "AnthropicRequest", "BatchPlan", "FakeMessageBatch", "error_body"]

#: what a responder returns for a request: the tool input (a dict), or None (the default)
Responder = Callable[["AnthropicRequest"], Any]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _resets(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with each value ``in:SECONDS`` made the RFC 3339 time that far from now
    (an ``anthropic-ratelimit-*-reset`` relative to the answer, not to the test's start)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        name: (now + datetime.timedelta(seconds=float(v[3:]))).isoformat()
        if v.startswith("in:")
        else v
        for name, v in headers.items()
    }


def error_body(status: int, message: str, kind: str | None = None) -> dict[str, Any]:
    """Anthropic's error object."""
    return {
        "type": "error",
        "error": {"type": kind or _ERROR_TYPES.get(status, "api_error"), "message": message},
    }


@dataclass
class AnthropicRequest(Record):
    """What the server saw for one request. ``api_key`` is kept (tests compare it) but
    never shown by ``repr``; so are the headers."""

    api_key: str | None = field(default=None, repr=False)
    key_header: str | None = None  # "x-api-key" or "authorization"
    version: str | None = None  # anthropic-version
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # lower-cased names
    model: str | None = None
    images: list[RecordedImage] = field(default_factory=list)
    prompt: str = ""
    tools: Any = None
    tool_choice: Any = None
    temperature: Any = None
    max_tokens: int | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    route: str = "messages"  # or a Message Batches route: batch_create, batch_get, ...


class _Bad(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.outcome)
        self.reply = reply


class FakeAnthropic(FakeHTTPServer[AnthropicRequest]):
    """A local stand-in for Anthropic's Messages API; ``url`` is the SDK's base_url."""

    name = "fakeanthropic"
    hang_body = json.dumps(error_body(504, "timeout", "timeout_error")).encode()
    bug_body = json.dumps(error_body(500, "fake bug")).encode()

    def __init__(
        self,
        *,
        keys: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        responder: Responder | None = None,
        latency: float = 0.0,
        hang_seconds: float = 30.0,
        batches: bool = True,
    ) -> None:
        """``keys``: the valid keys (None: any non-empty one). ``models``: the models
        served (None: any). ``batches``: False, a server without the Message Batches API
        (its routes answered 404)."""
        super().__init__(latency=latency, hang_seconds=hang_seconds)
        self._keys = None if keys is None else frozenset(keys)
        self._models = None if models is None else frozenset(models)
        self._responder = responder
        self._before_answer: Callable[[AnthropicRequest], None] | None = None
        #: the Message Batches API (see the end of this module)
        self.batch = FakeBatches(self)
        self._serves_batches = batches

    def set_before_answer(self, hook: Callable[[AnthropicRequest], None] | None) -> None:
        """Run ``hook(record)`` once a request has been acted on, just before its answer
        (a test kills the client at that moment)."""
        with self._lock:
            self._before_answer = hook

    def _timing(self) -> tuple[float, float, Callable[[AnthropicRequest], None] | None]:
        return self._latency, self._hang_seconds, self._before_answer

    def set_responder(self, responder: Responder | None) -> None:
        with self._lock:
            self._responder = responder

    def cut_next(self, n: int = 1) -> None:
        """The next n answers stop at max_tokens, their tool input cut short."""
        self._queue(n, Action("cut"))

    def no_tool_next(self, n: int = 1) -> None:
        """The next n answers are text, without the tool call."""
        self._queue(n, Action("no_tool"))

    def rate_limit_next(self, n: int = 1, *, headers: dict[str, str] | None = None) -> None:
        """The next n requests get a 429 with ``headers`` (retry-after, ratelimit ones)."""
        self.fail_next(n, 429, headers=headers)

    # ---------------------------------------------------------------- requests

    def _new_record(self, index: int, now: float, method: str, path: str) -> AnthropicRequest:
        return AnthropicRequest(index, now, method, path)

    def _process(self, h: Handler, rec: AnthropicRequest, split: urllib.parse.SplitResult) -> Reply:
        raw = self._read_body(h, int(h.headers.get("Content-Length") or 0))
        rec.headers = {k.lower(): v for k, v in h.headers.items()}
        auth = rec.headers.get("authorization", "")
        if rec.headers.get("x-api-key"):
            rec.api_key, rec.key_header = rec.headers["x-api-key"], "x-api-key"
        elif auth:
            rec.api_key = auth[7:] if auth.startswith("Bearer ") else auth
            rec.key_header = "authorization"
        rec.version = rec.headers.get("anthropic-version")
        try:
            batch_route = self.batch.route(h.command, split.path)
            if batch_route is not None and self._serves_batches:
                if not rec.api_key or (self._keys is not None and rec.api_key not in self._keys):
                    return self._error(401, "invalid x-api-key", "bad_key")
                if not rec.version:
                    return self._error(400, "anthropic-version: header is required", "bad_request")
                query = urllib.parse.parse_qs(split.query)
                return self.batch.process(rec, *batch_route, raw, query)
            if h.command != "POST" or split.path.rstrip("/") != "/v1/messages":
                return self._error(404, f"Not found: {h.command} {split.path}", "not_found")
            if not rec.api_key or (self._keys is not None and rec.api_key not in self._keys):
                return self._error(401, "invalid x-api-key", "bad_key")
            if not rec.version:
                return self._error(400, "anthropic-version: header is required", "bad_request")
            self._parse(rec, raw)
            with self._lock:
                reply = self._next_scripted(rec)
            return reply or self._answer(rec, "ok")
        except _Bad as bad:
            return bad.reply

    def _error(self, status: int, message: str, outcome: str, kind: str | None = None) -> Reply:
        body = json.dumps(error_body(status, message, kind)).encode()
        return Reply(status, body, "application/json", outcome)

    def _parse(self, rec: AnthropicRequest, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Bad(self._error(400, "invalid JSON body", "bad_request")) from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise _Bad(self._error(400, "messages: Field required", "bad_request"))
        if not isinstance(body.get("max_tokens"), int):
            raise _Bad(self._error(400, "max_tokens: Field required", "bad_request"))
        rec.body = body
        rec.model = body.get("model")
        rec.tools, rec.tool_choice = body.get("tools"), body.get("tool_choice")
        rec.temperature, rec.max_tokens = body.get("temperature"), body.get("max_tokens")
        texts = []
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
                continue
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "text":
                    texts.append(str(block.get("text", "")))
                elif isinstance(block, dict) and block.get("type") == "image":
                    rec.images.append(self._image(block.get("source")))
        rec.prompt = "\n".join(texts)
        if self._models is not None and rec.model not in self._models:
            raise _Bad(self._error(404, f"model: {rec.model}", "not_found"))

    def _image(self, source: Any) -> RecordedImage:
        if not isinstance(source, dict) or source.get("type") != "base64":
            raise _Bad(self._error(400, "image source: expected base64", "bad_request"))
        mime = str(source.get("media_type"))
        if mime not in ("image/jpeg", "image/png", "image/gif", "image/webp"):
            raise _Bad(self._error(400, f"media_type {mime!r} is not supported", "bad_request"))
        try:
            data = base64.b64decode(str(source.get("data")), validate=True)
        except (binascii.Error, ValueError):
            raise _Bad(self._error(400, "invalid base64 image data", "bad_request")) from None
        image = RecordedImage(mime, data, "standard")
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                image.width, image.height = img.size
                image.format = img.format
        except Exception:
            raise _Bad(self._error(400, "Could not process image", "bad_request")) from None
        return image

    def _scripted(self, rec: AnthropicRequest, action: Action) -> Reply:
        if action.kind == "fault":
            if isinstance(action.body, (bytes, dict)):
                data = action.body if isinstance(action.body, bytes) else json.dumps(action.body)
                reply = Reply(
                    action.status,
                    data if isinstance(data, bytes) else data.encode(),
                    "application/json",
                    "fault",
                )
            else:
                reply = self._error(action.status, "scripted fault", "fault")
            reply.headers.update(_resets(action.headers))
            return reply
        if action.kind == "malformed":
            return Reply(200, b'{"id": "msg_x", "content": [{"type": "tool_', outcome="malformed")
        if action.kind in ("cut", "no_tool"):
            return self._answer(rec, action.kind)
        raise ValueError(f"unknown scripted action {action.kind!r}")

    def _answer(self, rec: AnthropicRequest, outcome: str) -> Reply:
        with self._lock:
            responder = self._responder
        tool = rec.tool_choice.get("name") if isinstance(rec.tool_choice, dict) else None
        result = responder(rec) if responder is not None else None
        if result is None:
            result = _describe(rec.images)
        input_tokens = len(rec.prompt) // 4 + sum(
            (i.width or 0) * (i.height or 0) // 750 for i in rec.images
        )
        if outcome == "no_tool" or tool is None:
            content: list[dict[str, Any]] = [{"type": "text", "text": json.dumps(result)}]
            stop = "end_turn"
        elif outcome == "cut":
            content = [{"type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}]
            stop = "max_tokens"
        else:
            content = [{"type": "tool_use", "id": "toolu_1", "name": tool, "input": result}]
            stop = "tool_use"
        body = {
            "id": f"msg_{rec.index:08d}",
            "type": "message",
            "role": "assistant",
            "model": rec.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": max(1, len(json.dumps(result)) // 4),
            },
        }
        text = json.dumps(result)
        return Reply(200, json.dumps(body).encode(), "application/json", outcome, text=text)


# ---------------------------------------------------------------- Message Batches
#
# The Message Batches API as anthropic 2.17 speaks it (see ../shared/FIELD-NOTES.md):
# ``POST /v1/messages/batches`` ``{"requests": [{"custom_id", "params"}]}`` creates a batch
# (``message_batch``: id, processing_status in_progress | canceling | ended,
# request_counts, created_at, expires_at, ended_at, results_url once ended);
# ``GET /v1/messages/batches/ID``; ``GET /v1/messages/batches?limit=&after_id=&before_id=``
# (newest first, ``{"data", "has_more", "first_id", "last_id"}``); ``POST
# /v1/messages/batches/ID/cancel``; ``DELETE /v1/messages/batches/ID`` (ended only);
# ``GET /v1/messages/batches/ID/results`` streams JSONL lines ``{"custom_id", "result":
# {"type": "succeeded", "message"} | {"type": "errored", "error": <error object>} |
# {"type": "canceled"} | {"type": "expired"}}``. A batch belongs to the key (workspace)
# that made it: another key is answered 404.
#
# What happens to a batch is planned when it is created (``plan_next``, else
# ``default_plan``): it is in_progress for ``delay`` seconds of the batch clock
# (``advance``), then ended; its lines are answered as ``lines`` says, in request order,
# and the rest as ``rest`` says. ``cancel`` ends it with the lines not scripted canceled.

BATCH_FATES = ("succeeded", "expired", "canceled")
_BATCH_ROUTES = [
    ("POST", re.compile(r"^/v1/messages/batches$"), "batch_create"),
    ("GET", re.compile(r"^/v1/messages/batches$"), "batch_list"),
    ("GET", re.compile(r"^/v1/messages/batches/([^/]+)$"), "batch_get"),
    ("POST", re.compile(r"^/v1/messages/batches/([^/]+)/cancel$"), "batch_cancel"),
    ("DELETE", re.compile(r"^/v1/messages/batches/([^/]+)$"), "batch_delete"),
    ("GET", re.compile(r"^/v1/messages/batches/([^/]+)/results$"), "batch_results"),
]


@dataclass
class BatchPlan:
    """What happens to one batch, decided when it is created. ``delay``: batch-clock
    seconds until it ends; ``lines``: what the first requests get, in order (None: the
    normal answer; "expired", "canceled"; an int: an ``errored`` result with that HTTP
    status's error object; "refusal", "cut": a succeeded message stopped by a refusal or
    at max_tokens); ``rest``: what every later request gets ("succeeded", "expired",
    "canceled"); ``created_shift``: seconds added to its ``created_at`` (clock skew)."""

    delay: float = 0.0
    lines: Sequence[int | str | None] = ()
    rest: str = "succeeded"
    created_shift: float = 0.0


@dataclass
class FakeMessageBatch:
    """One batch as the server holds it: what it carries (``custom_ids``, ``digests``:
    sha256 of each request's image) and the key that made it."""

    id: str
    api_key: str = field(repr=False)
    custom_ids: list[str]
    digests: list[str]
    params: list[dict[str, Any]] = field(repr=False)
    created: float  # batch clock
    created_at: str  # RFC 3339, wall clock (+ the plan's shift)
    plan: BatchPlan
    canceled: bool = False
    deleted: bool = False
    results_reads: int = 0
    ended_at: str | None = None  # RFC 3339, wall clock: when it was first seen ended


def _iso(when: datetime.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


class FakeBatches:
    """The Message Batches API of a ``FakeAnthropic`` (``server.batch``): its state,
    scripting and routes."""

    def __init__(self, fake: FakeAnthropic) -> None:
        self.fake = fake
        self._lock = fake._lock
        self.default_plan = BatchPlan()
        self._batch_plans: collections.deque[BatchPlan] = collections.deque()
        self._batches: list[FakeMessageBatch] = []
        self._batch_clock = 0.0
        self._batch_faults: list[tuple[str, int, dict[str, str]]] = []
        self.list_page_max = 1000  # the API's own maximum page size

    # -- scripting ---------------------------------------------------------------------

    def plan_next(self, **plan: Any) -> None:
        """The next batch created follows ``BatchPlan(**plan)``."""
        with self._lock:
            self._batch_plans.append(BatchPlan(**plan))

    def advance(self, seconds: float) -> None:
        """Move the batch clock forward: batches whose delay has passed have ended."""
        with self._lock:
            self._batch_clock += seconds
            for batch in self._batches:
                self.status(batch)  # stamps the end of those that end now

    def fail_next(
        self, route: str, status: int = 500, *, headers: dict[str, str] | None = None
    ) -> None:
        """The next request of ``route`` (batch_create, batch_list, batch_get,
        batch_results, batch_cancel) gets ``status`` with the API's error object; status
        0: it is not acted on and hangs (``hang_seconds``, then a 504)."""
        with self._lock:
            self._batch_faults.append((route, status, dict(headers or {})))

    def clear_faults(self) -> None:
        """Forget the scripted faults not used yet."""
        with self._lock:
            self._batch_faults.clear()

    def add_foreign(self, api_key: str, requests: int, shift: float = 0.0) -> str:
        """A batch another client of the same key made (``requests`` dummy requests,
        ``created_at`` shifted by ``shift`` seconds); returns its id."""
        plan = BatchPlan(delay=1e9, created_shift=shift)
        ids = [f"foreign-{i}" for i in range(requests)]
        return self._new_batch(api_key, ids, [""] * requests, [{}] * requests, plan).id

    # -- observation -------------------------------------------------------------------

    @property
    def jobs(self) -> list[FakeMessageBatch]:
        """Every batch created (foreign ones included), oldest first."""
        with self._lock:
            return list(self._batches)

    @property
    def creates(self) -> int:
        """Batches created through the API (a foreign one added by a test not counted)."""
        with self._lock:
            return sum(1 for b in self._batches if not b.custom_ids[:1] == ["foreign-0"])

    def status(self, batch: FakeMessageBatch) -> str:
        """in_progress, canceling or ended, as of now (an end is stamped when first seen:
        at its creation, a cancel, or the ``advance`` that ended it)."""
        with self._lock:
            if batch.canceled or self._batch_clock - batch.created >= batch.plan.delay:
                if batch.ended_at is None:
                    batch.ended_at = _iso(datetime.datetime.now(datetime.timezone.utc))
                return "ended"
            return "in_progress"

    # -- requests ------------------------------------------------------------------------

    def route(self, method: str, path: str) -> tuple[str, str | None] | None:
        for verb, pattern, route in _BATCH_ROUTES:
            match = pattern.match(path.rstrip("/"))
            if match and verb == method:
                return route, (match.group(1) if match.groups() else None)
        return None

    def process(
        self,
        rec: AnthropicRequest,
        route: str,
        batch_id: str | None,
        raw: bytes,
        query: dict[str, list[str]],
    ) -> Reply:
        rec.route = route
        with self._lock:
            for i, (on, status, headers) in enumerate(self._batch_faults):
                if on == route:
                    del self._batch_faults[i]
                    if status == 0:
                        return Reply(504, self.fake.hang_body, outcome="hang", hang=True)
                    body = json.dumps(error_body(status, "scripted fault")).encode()
                    return Reply(status, body, "application/json", "fault", headers=headers)
        key = str(rec.api_key)
        if route == "batch_create":
            return self._batch_create(rec, key, raw)
        if route == "batch_list":
            return self._batch_list(key, query)
        batch = self._find_batch(key, str(batch_id))
        if batch is None:
            return _error_reply(404, f"message batch {batch_id} not found", "not_found")
        if route == "batch_get":
            return _json_reply(self._batch_json(batch), "ok")
        if route == "batch_cancel":
            with self._lock:
                if self.status(batch) != "ended":
                    batch.canceled = True
                    self.status(batch)
            answer = self._batch_json(batch)
            return _json_reply(answer, "ok")
        if route == "batch_delete":
            if self.status(batch) != "ended":
                return _error_reply(400, "cannot delete a batch in progress", "bad_request")
            with self._lock:
                batch.deleted = True
            return _json_reply({"id": batch.id, "type": "message_batch_deleted"}, "ok")
        # results
        if self.status(batch) != "ended":
            return _error_reply(400, "results are not available yet", "bad_request")
        with self._lock:
            batch.results_reads += 1
        lines = [self._result_line(batch, i) for i in range(len(batch.custom_ids))]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return Reply(200, data, "application/binary", "ok")

    def _find_batch(self, key: str, batch_id: str) -> FakeMessageBatch | None:
        with self._lock:
            for batch in self._batches:
                if batch.id == batch_id and batch.api_key == key and not batch.deleted:
                    return batch
        return None

    def _batch_create(self, rec: AnthropicRequest, key: str, raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            return _error_reply(400, "invalid JSON body", "bad_request")
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _error_reply(400, "requests: Field required", "bad_request")
        if len(requests) > 100_000 or len(raw) > 256 * 1024 * 1024:
            return _error_reply(413, "batch too large", "too_large", "request_too_large")
        ids, digests, params = [], [], []
        for r in requests:
            if not isinstance(r, dict) or not isinstance(r.get("params"), dict):
                return _error_reply(400, "requests.params: Field required", "bad_request")
            custom_id = r.get("custom_id")
            if not isinstance(custom_id, str) or not re.fullmatch(
                r"[a-zA-Z0-9_-]{1,64}", custom_id
            ):
                return _error_reply(
                    400, "custom_id: must match ^[a-zA-Z0-9_-]{1,64}$", "bad_request"
                )
            if custom_id in ids:
                return _error_reply(400, f"custom_id {custom_id} is not unique", "bad_request")
            one = AnthropicRequest(0, 0.0, "POST", "/v1/messages")
            try:
                self.fake._parse(one, json.dumps(r["params"]).encode())
            except _Bad as bad:
                return bad.reply
            ids.append(custom_id)
            digests.append(hashlib.sha256(one.images[0].data).hexdigest() if one.images else "")
            params.append(r["params"])
        with self._lock:
            plan = self._batch_plans.popleft() if self._batch_plans else self.default_plan
        batch = self._new_batch(key, ids, digests, params, dataclasses.replace(plan))
        return _json_reply(self._batch_json(batch), "ok")

    def _new_batch(
        self,
        key: str,
        ids: list[str],
        digests: list[str],
        params: list[dict[str, Any]],
        plan: BatchPlan,
    ) -> FakeMessageBatch:
        now = datetime.datetime.now(datetime.timezone.utc)
        with self._lock:
            batch = FakeMessageBatch(
                id=f"msgbatch_{len(self._batches) + 1:04d}{secrets.token_hex(6)}",
                api_key=key,
                custom_ids=ids,
                digests=digests,
                params=params,
                created=self._batch_clock,
                created_at=_iso(now + datetime.timedelta(seconds=plan.created_shift)),
                plan=plan,
            )
            self._batches.append(batch)
            self.status(batch)  # one of delay 0 has ended at once
        return batch

    def _batch_list(self, key: str, query: dict[str, list[str]]) -> Reply:
        try:
            limit = int((query.get("limit") or ["20"])[0])
        except ValueError:
            return _error_reply(400, "limit: must be an integer", "bad_request")
        limit = max(1, min(limit, 1000, self.list_page_max))
        with self._lock:
            mine = [b for b in reversed(self._batches) if b.api_key == key and not b.deleted]
        # newest first by creation time (a test's batch created "earlier" is listed so)
        mine.sort(key=lambda b: datetime.datetime.fromisoformat(b.created_at), reverse=True)
        ids = [b.id for b in mine]
        after = query["after_id"][0] if query.get("after_id") else None
        before = query["before_id"][0] if query.get("before_id") else None
        if after is not None:
            start = ids.index(after) + 1 if after in ids else len(ids)
            page = mine[start : start + limit]
            more = start + limit < len(mine)
        elif before is not None:
            end = ids.index(before) if before in ids else 0
            page = mine[max(0, end - limit) : end]
            more = end - limit > 0
        else:
            page, more = mine[:limit], len(mine) > limit
        body = {
            "data": [self._batch_json(b) for b in page],
            "has_more": more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
        return _json_reply(body, "ok")

    def _outcome_of(self, batch: FakeMessageBatch, i: int) -> int | str | None:
        lines = batch.plan.lines
        if i < len(lines):
            return lines[i]
        if batch.canceled:
            return "canceled"
        return None if batch.plan.rest == "succeeded" else batch.plan.rest

    def _result_line(self, batch: FakeMessageBatch, i: int) -> dict[str, Any]:
        custom_id = batch.custom_ids[i]
        what = self._outcome_of(batch, i)
        if what in ("expired", "canceled"):
            return {"custom_id": custom_id, "result": {"type": what}}
        if isinstance(what, int):
            error = error_body(what, f"scripted batch error {what}")
            return {"custom_id": custom_id, "result": {"type": "errored", "error": error}}
        one = AnthropicRequest(i, 0.0, "POST", "/v1/messages")
        self.fake._parse(one, json.dumps(batch.params[i]).encode())
        kind = "cut" if what == "cut" else "ok"
        reply = self.fake._answer(one, kind)
        message = json.loads(reply.body)
        if what == "refusal":
            message["stop_reason"], message["content"] = "refusal", []
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}

    def _batch_json(self, batch: FakeMessageBatch) -> dict[str, Any]:
        status = self.status(batch)
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if status == "ended":
            for i in range(len(batch.custom_ids)):
                what = self._outcome_of(batch, i)
                kind = (
                    what
                    if what in ("expired", "canceled")
                    else "errored"
                    if isinstance(what, int)
                    else "succeeded"
                )
                counts[str(kind)] += 1
        else:
            counts["processing"] = len(batch.custom_ids)
        created = datetime.datetime.fromisoformat(batch.created_at.replace("Z", "+00:00"))
        out: dict[str, Any] = {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "canceling" if batch.canceled and status != "ended" else status,
            "request_counts": counts,
            "created_at": batch.created_at,
            "expires_at": _iso(created + datetime.timedelta(hours=24)),
            "ended_at": batch.ended_at if status == "ended" else None,
            "cancel_initiated_at": batch.created_at if batch.canceled else None,
            "archived_at": None,
            "results_url": None,
        }
        if status == "ended":
            base = self.fake.url
            out["results_url"] = f"{base}/v1/messages/batches/{batch.id}/results"
        return out


def _json_reply(body: dict[str, Any], outcome: str) -> Reply:
    return Reply(200, json.dumps(body).encode(), "application/json", outcome)


def _error_reply(status: int, message: str, outcome: str, kind: str | None = None) -> Reply:
    return Reply(
        status, json.dumps(error_body(status, message, kind)).encode(), "application/json", outcome
    )
