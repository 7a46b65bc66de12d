"""A fake OpenAI-compatible chat-completions server for the test suite, in three dialects.
Standard library only, plus Pillow to describe the images it receives.

``POST /v1/chat/completions`` with the body OpenAI documents: ``messages`` whose user
content holds ``{"type": "text"}`` and ``{"type": "image_url", "image_url": {"url":
"data:image/jpeg;base64,...", "detail": ...}}`` parts, ``response_format``,
``temperature``, ``max_tokens`` / ``max_completion_tokens``. The answer is a
``chat.completion`` whose ``choices[0].message.content`` is a JSON string, with
``usage.prompt_tokens`` / ``completion_tokens``. Errors are ``{"error": {...}}``.

Dialects (what differs, after ../shared/FIELD-NOTES.md):
- ``openai``: a bearer key is required (``keys``: the valid ones; a wrong one is echoed
  whole in the 401, as a careless proxy would, so that scrubbing is tested); error
  ``code`` strings (``invalid_api_key``, ``model_not_found``, ``rate_limit_exceeded``);
  ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers on every answer,
  429s from the sliding-window ``quota`` without ``retry-after``.
- ``ollama``: no auth (the header is recorded, never checked); data URLs in **standard**
  base64 only (URL-safe characters: 400 "invalid image input"); ``json_schema``
  honoured; an unknown model is 404 "model "x" not found, try pulling it first"; an
  unknown route a plain-text "404 page not found".
- ``llamacpp`` (llama-server): integer error ``code``s; 503 ``unavailable_error``
  "Loading model" while ``loading`` lasts (see ``set_loading``); the nested OpenAI form
  ``{"type": "json_schema", "json_schema": {"schema": ...}}`` is refused with a 400,
  ``{"type": "json_object" | "json_schema", "schema": ...}`` honoured; one model served,
  whatever name is asked for; a key only when ``keys`` is given.

Usage::

    with FakeOpenAI(dialect="ollama", models={"gemma3"}, latency=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        server.fail_next(2, 503)
        ...
        assert server.count_by_status() == {503: 2, 200: 5}

For each request the server decides as follows (the first rule that applies wins):
1. llama.cpp still loading -> 503; unknown route -> 404;
2. auth (openai: missing or unknown key -> 401; llamacpp with ``keys``: 401);
3. body not JSON, no messages, a bad image -> 400; model not in ``models`` -> 404;
   a refused ``response_format`` form (llamacpp's nested json_schema) -> 400;
4. the sliding-window ``quota`` full -> 429 (openai: with rate-limit headers);
5. the next scripted action (``fail_next``, ``hang_next``, ``malformed_next``,
   ``drop_next``, ``refuse_next``; first in, first out);
6. a happy answer: ``responder`` if set, else a value of the schema asked for (a
   deterministic description of the image where the schema allows it).
``latency`` is added before every answer, errors included.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import io
import json
import math
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakegemini import decode_base64_any, minimal_instance

__all__ = ["DIALECTS", "FakeOpenAI", "RecordedImage", "RecordedRequest"]

DIALECTS = ("openai", "ollama", "llamacpp")
Responder = Callable[["RecordedRequest"], "str | dict[str, Any] | None"]
_POLL = 0.02  # seconds between stop checks while sleeping
_DATA_URL = re.compile(r"data:([\w/+.-]+);base64,(.*)", re.DOTALL)
_TAGS = ("outdoor", "indoor", "portrait", "landscape", "closeup", "urban", "nature", "night")
_MOODS = ("calm", "cheerful", "moody", "serene", "playful")


@dataclass
class RecordedImage:
    """One ``image_url`` part, decoded."""

    mime_type: str
    data: bytes = field(repr=False)
    alphabet: str  # "standard", "urlsafe", "mixed", "plain" (see decode_base64_any)
    detail: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> Any:
        """The image as a ``PIL.Image.Image`` (raises if Pillow cannot read it)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.data))


@dataclass
class RecordedRequest:
    """What the server saw and did for one request. ``api_key`` is kept (tests compare
    it) but never shown by ``repr``."""

    index: int
    time: float  # time.monotonic() at arrival
    method: str
    path: str
    api_key: str | None = field(default=None, repr=False)  # the bearer token, if any
    model: str | None = None
    images: list[RecordedImage] = field(default_factory=list)
    prompt: str = ""  # the text parts, joined with "\n"
    response_format: Any = None
    schema: Any = None  # the schema asked for, wherever it was
    schema_form: str | None = None  # "nested" (OpenAI's), "flat" (llama.cpp's) or None
    strict: bool | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    status: int | None = None  # answered; None while pending or if never answered
    outcome: str = "pending"  # ok, fault, quota, hang, malformed, dropped, refused,
    # loading, bad_key, bad_request, bad_format, not_found, bug
    response_text: str | None = None  # the content answered, for ok/malformed
    finished: float | None = None


@dataclass
class _Action:
    kind: str  # fault, hang, malformed, drop, refuse
    status: int = 500
    body: Any = None  # a dict (sent as JSON) or bytes (sent as text/html)
    headers: dict[str, str] = field(default_factory=dict)
    where: str = "content"  # malformed: "content" (the model's JSON) or "body" (HTTP's)


@dataclass
class _Reply:
    status: int | None  # None: close the connection without answering
    body: bytes = b""
    content_type: str = "application/json"
    outcome: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    text: str | None = None


class _Bad(Exception):
    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.outcome)
        self.reply = reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    fake: FakeOpenAI

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self.fake._lock:
            self.fake._threads.append(t)
        t.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client went away mid-answer: expected with timeouts


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120
    wbufsize = 1 << 16  # one send() per answer (see fakegemini: delayed ACKs)
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.fake._lock:
                self.server.fake._conns.discard(self.connection)

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeOpenAI:
    """A local stand-in for an OpenAI-compatible server (see the module doc)."""

    def __init__(
        self,
        *,
        dialect: str = "openai",
        keys: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        quota: tuple[int, float] | None = None,
        latency: float = 0.0,
        hang_seconds: float = 30.0,
        responder: Responder | None = None,
        host: str = "127.0.0.1",
        prefix: str = "",
    ) -> None:
        """``keys``: the valid bearer keys (openai: None accepts any non-empty key;
        llamacpp: None asks for none). ``models``: the models served (None: any).
        ``quota=(n, seconds)``: n accepted requests per sliding window. ``prefix``: a
        path before ``/v1`` (a proxy's, e.g. ``/token/SECRET``), part of ``base_url``."""
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}")
        self.dialect = dialect
        self._lock = threading.RLock()  # answers are built with it held, and take it
        self._keys = None if keys is None else frozenset(keys)
        self._models = None if models is None else frozenset(models)
        self._quota = quota
        self._latency = latency
        self._hang_seconds = hang_seconds
        self._responder = responder
        self._host = host
        self._prefix = prefix.rstrip("/")
        self._loading_until = 0.0
        self._window: collections.deque[float] = collections.deque()
        self._script: collections.deque[_Action] = collections.deque()
        self._records: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FakeOpenAI:
        self._stop.clear()
        httpd = _Server((self._host, 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, cut open connections (hung answers end at once), join threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [self._thread, *self._threads]
        for t in threads:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: what OLLAMA_HOST would name."""
        if self._httpd is None:
            raise RuntimeError("FakeOpenAI is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (the prefix before ``/v1``): the SDK's base_url."""
        return self.url + self._prefix + "/v1"

    # ---------------------------------------------------------------- behaviour

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = seconds

    def set_quota(self, quota: tuple[int, float] | None) -> None:
        with self._lock:
            self._quota = quota
            self._window.clear()

    def set_responder(self, responder: Responder | None) -> None:
        with self._lock:
            self._responder = responder

    def set_loading(self, seconds: float) -> None:
        """llamacpp: answer 503 "Loading model" for that many seconds from now."""
        with self._lock:
            self._loading_until = time.monotonic() + seconds

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next n requests get `status`: `body` a dict (JSON), bytes (an HTML page)
        or None (the dialect's error for that status), with `headers` added."""
        self._queue(n, _Action("fault", status, body, dict(headers or {})))

    def hang_next(self, n: int = 1) -> None:
        """The next n requests get no answer for `hang_seconds` (then a 504)."""
        self._queue(n, _Action("hang"))

    def malformed_next(self, n: int = 1, where: str = "content") -> None:
        """The next n answers are cut short: the model's JSON ("content") or the HTTP
        body itself ("body")."""
        self._queue(n, _Action("malformed", where=where))

    def drop_next(self, n: int = 1) -> None:
        """The next n requests: the connection is closed without an answer."""
        self._queue(n, _Action("drop"))

    def refuse_next(self, n: int = 1, message: str = "I can't help with that.") -> None:
        """The next n answers are a refusal (`message.refusal`, OpenAI's structured
        outputs)."""
        self._queue(n, _Action("refuse", body=message))

    def _queue(self, n: int, action: _Action) -> None:
        with self._lock:
            self._script.extend([action] * n)

    # ---------------------------------------------------------------- inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            return self._records[-1]

    def count_by_status(self) -> dict[int | None, int]:
        return dict(collections.Counter(r.status for r in self.requests))

    def count_by_outcome(self) -> dict[str, int]:
        return dict(collections.Counter(r.outcome for r in self.requests))

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()
            self._max_in_flight = self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests the server held at once."""
        with self._lock:
            return self._max_in_flight

    @property
    def errors(self) -> list[str]:
        """Tracebacks of the server's own failures (a test should see none)."""
        with self._lock:
            return list(self._errors)

    # ---------------------------------------------------------------- requests

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when stopping cut it short."""
        return not self._stop.wait(seconds) if seconds > 0 else not self._stop.is_set()

    def _handle(self, h: _Handler) -> None:
        with self._lock:
            rec = RecordedRequest(len(self._records), time.monotonic(), h.command, h.path)
            self._records.append(rec)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            reply = self._process(h, rec)
        except Exception:
            with self._lock:
                self._errors.append(traceback.format_exc())
            reply = _Reply(500, b'{"error": {"message": "fake bug"}}', outcome="bug")
        self._send(h, rec, reply)

    def _process(self, h: _Handler, rec: RecordedRequest) -> _Reply:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization") or ""
        rec.api_key = auth[7:] if auth.startswith("Bearer ") else (auth or None)
        try:
            with self._lock:
                loading = self.dialect == "llamacpp" and time.monotonic() < self._loading_until
            if loading:
                return self._error(503, "Loading model", "unavailable_error", "loading")
            route = self._prefix + "/v1/chat/completions"
            if h.command != "POST" or h.path.split("?")[0].rstrip("/") != route:
                return self._no_route(h)
            self._check_key(rec)
            self._parse(rec, raw)
            with self._lock:
                reply = self._decide(rec)
            return reply or self._happy(rec)
        except _Bad as bad:
            return bad.reply

    def _check_key(self, rec: RecordedRequest) -> None:
        key = rec.api_key
        if self.dialect == "openai" and (not key or (self._keys and key not in self._keys)):
            message = (
                f"Incorrect API key provided: {key}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
                if key
                else "You didn't provide an API key."
            )
            raise _Bad(
                self._error(401, message, "invalid_request_error", "bad_key", "invalid_api_key")
            )
        if self.dialect == "llamacpp" and self._keys is not None and key not in self._keys:
            raise _Bad(self._error(401, "Invalid API Key", "authentication_error", "bad_key"))

    def _no_route(self, h: _Handler) -> _Reply:
        if self.dialect == "ollama":
            return _Reply(404, b"404 page not found", "text/plain", "not_found")
        if self.dialect == "llamacpp":
            return self._error(404, "File Not Found", "not_found_error", "not_found")
        message = f"Invalid URL ({h.command} {h.path.removeprefix('/v1')})"
        return self._error(404, message, "invalid_request_error", "not_found")

    def _parse(self, rec: RecordedRequest, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Bad(self._error(400, "invalid JSON body", "invalid_request_error")) from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise _Bad(self._error(400, "'messages' is required", "invalid_request_error"))
        rec.body = body
        rec.model = body.get("model")
        rec.temperature = body.get("temperature")
        rec.max_tokens = body.get("max_tokens")
        rec.max_completion_tokens = body.get("max_completion_tokens")
        texts: list[str] = []
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
                continue
            for part in content if isinstance(content, list) else []:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    rec.images.append(self._image(part.get("image_url")))
        rec.prompt = "\n".join(texts)
        if (
            self._models is not None
            and self.dialect != "llamacpp"
            and rec.model not in self._models
        ):
            if self.dialect == "ollama":
                message = f'model "{rec.model}" not found, try pulling it first'
                raise _Bad(self._error(404, message, "api_error", "not_found"))
            message = f"The model `{rec.model}` does not exist or you do not have access to it."
            raise _Bad(
                self._error(404, message, "invalid_request_error", "not_found", "model_not_found")
            )
        fmt = body.get("response_format")
        rec.response_format = fmt
        if isinstance(fmt, dict):
            nested = fmt.get("json_schema")
            if isinstance(nested, dict) and "schema" in nested:
                rec.schema, rec.schema_form, rec.strict = (
                    nested["schema"],
                    "nested",
                    nested.get("strict"),
                )
            elif "schema" in fmt:
                rec.schema, rec.schema_form = fmt["schema"], "flat"
            if self.dialect == "llamacpp" and rec.schema_form == "nested":
                message = (
                    'response_format: "json_schema" must hold its "schema" directly; use '
                    '{"type": "json_object", "schema": {...}}'
                )
                raise _Bad(self._error(400, message, "invalid_request_error", "bad_format"))
            if self.dialect == "ollama" and fmt.get("type") == "json_object":
                rec.schema = None  # Ollama's "format": "json": any JSON, no schema

    def _image(self, part: Any) -> RecordedImage:
        url = part.get("url") if isinstance(part, dict) else part
        match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
        if match is None:
            message = (
                "image URLs are not currently supported, please use base64 encoded data instead"
                if self.dialect == "ollama"
                else "Invalid image_url: expected a data URL"
            )
            raise _Bad(self._error(400, message, "invalid_request_error"))
        mime, data = match.groups()
        try:
            if self.dialect == "ollama":  # Go's base64.StdEncoding: standard alphabet only
                decoded, alphabet = base64.b64decode(data, validate=True), "standard"
            else:
                decoded, alphabet, _ = decode_base64_any(data)
        except (binascii.Error, ValueError):
            raise _Bad(self._error(400, "invalid image input", "invalid_request_error")) from None
        image = RecordedImage(
            mime, decoded, alphabet, part.get("detail") if isinstance(part, dict) else None
        )
        try:
            with image.open() as img:
                image.width, image.height = img.size
                image.format = img.format
        except Exception:
            if self.dialect == "ollama":
                raise _Bad(
                    self._error(400, "invalid image input", "invalid_request_error")
                ) from None
        return image

    def _decide(self, rec: RecordedRequest) -> _Reply | None:
        """Quota and script (with the lock held); None: answer happily."""
        now = time.monotonic()
        if self._quota is not None:
            limit, seconds = self._quota
            while self._window and self._window[0] <= now - seconds:
                self._window.popleft()
            if len(self._window) >= limit:
                wait = self._window[0] + seconds - now
                reply = self._error(
                    429,
                    f"Rate limit reached for {rec.model} on requests per min (RPM): Limit "
                    f"{limit}, Used {limit}, Requested 1. Please try again in {wait:.3f}s.",
                    "requests",
                    "quota",
                    "rate_limit_exceeded",
                )
                reply.headers.update(self._limit_headers(0, wait))
                return reply
            self._window.append(now)
        action = self._script.popleft() if self._script else None
        if action is None:
            return None
        if action.kind == "fault":
            if isinstance(action.body, bytes):
                reply = _Reply(action.status, action.body, "text/html", "fault")
            elif isinstance(action.body, dict):
                reply = _Reply(action.status, json.dumps(action.body).encode(), outcome="fault")
            else:
                reply = self._error(
                    action.status, _MESSAGES.get(action.status, "error"), "server_error", "fault"
                )
                if action.status == 429:
                    reply = self._error(
                        429, "Rate limit reached", "requests", "fault", "rate_limit_exceeded"
                    )
            reply.headers.update(action.headers)
            return reply
        if action.kind == "hang":
            return _Reply(504, b'{"error": {"message": "timeout"}}', outcome="hang", hang=True)
        if action.kind == "drop":
            return _Reply(None, outcome="dropped")
        if action.kind == "refuse":
            return self._completion(rec, None, "refused", refusal=str(action.body))
        if action.where == "body":
            return _Reply(
                200, b'{"id": "chatcmpl-x", "choices": [{"message": {"con', outcome="malformed"
            )
        return self._completion(rec, '{"description": "A photo of a cat sitting on', "malformed")

    def _happy(self, rec: RecordedRequest) -> _Reply:
        with self._lock:
            responder = self._responder
        text: str | None = None
        if responder is not None:
            custom = responder(rec)
            if custom is not None:
                text = custom if isinstance(custom, str) else json.dumps(custom)
        if text is None:
            rich = _describe(rec.images)
            text = json.dumps(rich if rec.schema is None else minimal_instance(rec.schema, rich))
        return self._completion(rec, text, "ok")

    def _completion(
        self, rec: RecordedRequest, text: str | None, outcome: str, refusal: str | None = None
    ) -> _Reply:
        prompt_tokens = len(rec.prompt) // 4 + sum(_image_tokens(i) for i in rec.images)
        out_tokens = max(1, len(text) // 4) if text else 0
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.dialect == "openai":
            message["refusal"] = refusal
        elif refusal:
            message["content"] = refusal
        body = {
            "id": "chatcmpl-" + hashlib.sha1(f"{rec.index}".encode()).hexdigest()[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": rec.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": out_tokens,
                "total_tokens": prompt_tokens + out_tokens,
            },
        }
        reply = _Reply(200, json.dumps(body).encode(), outcome=outcome, text=text)
        if self.dialect == "openai":
            with self._lock:
                used = len(self._window)
            limit = self._quota[0] if self._quota else 10_000
            reply.headers.update(self._limit_headers(max(0, limit - used), 0.0))
        return reply

    def _limit_headers(self, remaining: int, reset: float) -> dict[str, str]:
        if self.dialect != "openai":
            return {}  # local servers send none
        limit = self._quota[0] if self._quota else 10_000
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": _openai_duration(reset),
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "1999000",
            "x-ratelimit-reset-tokens": "0s",
        }

    def _error(
        self,
        status: int,
        message: str,
        kind: str,
        outcome: str = "bad_request",
        code: str | None = None,
    ) -> _Reply:
        """An error in the dialect's shape: OpenAI's and Ollama's string (or null) code,
        llama.cpp's integer one."""
        error: dict[str, Any] = {"message": message, "type": kind}
        if self.dialect == "llamacpp":
            error = {"code": status, **error}
        else:
            error.update(param=None, code=code)
        return _Reply(status, json.dumps({"error": error}).encode(), outcome=outcome)

    def _send(self, h: _Handler, rec: RecordedRequest, reply: _Reply) -> None:
        with self._lock:
            latency, hang = self._latency, self._hang_seconds
            rec.outcome, rec.response_text = reply.outcome, reply.text
        awake = self._sleep(latency)
        if awake and reply.hang:
            awake = self._sleep(hang)
        with self._lock:
            self._in_flight -= 1
            if awake and reply.status is not None:
                rec.status, rec.finished = reply.status, time.monotonic()
        if not awake or reply.status is None:
            h.close_connection = True  # stopping, or a scripted drop: no answer at all
            return
        try:
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.content_type)
            h.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(reply.body)
            h.wfile.flush()
        except OSError:
            h.close_connection = True  # the client gave up (a timeout)


_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
}


def _openai_duration(seconds: float) -> str:
    """OpenAI's reset format: "12ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:.0f}s" if minutes else f"{secs:.3g}s"


def _image_tokens(image: RecordedImage) -> int:
    if image.detail == "low" or not image.width or not image.height:
        return 85
    return 85 + 170 * math.ceil(image.width / 512) * math.ceil(image.height / 512)


def _describe(images: list[RecordedImage]) -> dict[str, Any]:
    """The default answer: deterministic from the first image's bytes."""
    first = images[0] if images else None
    digest = hashlib.sha256(first.data if first else b"").digest()
    what = f"A {first.width}x{first.height} {first.format} image." if first else "No image."
    return {
        "description": what,
        "tags": list(dict.fromkeys(_TAGS[b % len(_TAGS)] for b in digest[:3])),
        "objects": ["thing"],
        "colors": ["gray"],
        "mood": _MOODS[digest[3] % len(_MOODS)],
        "text": "",
    }
