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
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.fakegemini import decode_base64_any, fake_embedding, minimal_instance
from tests.fakehttp import Action, FakeHTTPServer, Handler, Record, Reply

__all__ = ["DIALECTS", "FakeOpenAI", "RecordedImage", "RecordedRequest"]

DIALECTS = ("openai", "ollama", "llamacpp")
Responder = Callable[["RecordedRequest"], "str | dict[str, Any] | None"]
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
class RecordedRequest(Record):
    """What the server saw and did for one request. ``api_key`` is kept (tests compare
    it) but never shown by ``repr``. ``outcome``: ok, fault, quota, hang, malformed,
    dropped, refused, loading, bad_key, bad_request, bad_format, not_found, bug."""

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
    inputs: list[str] = field(default_factory=list)  # POST /v1/embeddings: the texts
    dimensions: int | None = None
    encoding_format: str | None = None


class _Bad(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.outcome)
        self.reply = reply


class FakeOpenAI(FakeHTTPServer[RecordedRequest]):
    """A local stand-in for an OpenAI-compatible server (see the module doc); ``url``
    (``http://127.0.0.1:PORT``) is what OLLAMA_HOST would name."""

    name = "fakeopenai"
    bug_body = b'{"error": {"message": "fake bug"}}'

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
        super().__init__(host=host, latency=latency, hang_seconds=hang_seconds)
        self.dialect = dialect
        self._keys = None if keys is None else frozenset(keys)
        self._models = None if models is None else frozenset(models)
        self._quota = quota
        self._responder = responder
        self._prefix = prefix.rstrip("/")
        self._loading_until = 0.0
        self._window: collections.deque[float] = collections.deque()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (the prefix before ``/v1``): the SDK's base_url."""
        return self.url + self._prefix + "/v1"

    # ---------------------------------------------------------------- behaviour

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

    def malformed_next(self, n: int = 1, where: str = "content") -> None:
        """The next n answers are cut short: the model's JSON ("content") or the HTTP
        body itself ("body")."""
        self._queue(n, Action("malformed", options={"where": where}))

    def refuse_next(self, n: int = 1, message: str = "I can't help with that.") -> None:
        """The next n answers are a refusal (`message.refusal`, OpenAI's structured
        outputs)."""
        self._queue(n, Action("refuse", body=message))

    # ---------------------------------------------------------------- requests

    def _new_record(self, index: int, now: float, method: str, path: str) -> RecordedRequest:
        return RecordedRequest(index, now, method, path)

    def _process(self, h: Handler, rec: RecordedRequest, split: urllib.parse.SplitResult) -> Reply:
        raw = self._read_body(h, int(h.headers.get("Content-Length") or 0))
        auth = h.headers.get("Authorization") or ""
        rec.api_key = auth[7:] if auth.startswith("Bearer ") else (auth or None)
        try:
            with self._lock:
                loading = self.dialect == "llamacpp" and time.monotonic() < self._loading_until
            if loading:
                return self._error(503, "Loading model", "unavailable_error", "loading")
            route = self._prefix + "/v1/chat/completions"
            if h.command == "POST" and split.path.rstrip("/") == self._prefix + "/v1/embeddings":
                self._check_key(rec)
                self._parse_embeddings(rec, raw)
                with self._lock:
                    reply = self._decide(rec)
                return reply or self._embeddings(rec)
            if h.command != "POST" or split.path.rstrip("/") != route:
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

    def _no_route(self, h: Handler) -> Reply:
        if self.dialect == "ollama":
            return Reply(404, b"404 page not found", "text/plain", "not_found")
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

    def _parse_embeddings(self, rec: RecordedRequest, raw: bytes) -> None:
        """``POST /v1/embeddings``: ``model``, ``input`` (a string or a list of them),
        ``encoding_format`` (float, or base64: little-endian float32, the SDK's default),
        ``dimensions``."""
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Bad(self._error(400, "invalid JSON body", "invalid_request_error")) from None
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _Bad(self._error(400, "'input' must be strings", "invalid_request_error"))
        rec.body, rec.model, rec.inputs = body, body.get("model"), texts
        rec.dimensions, rec.encoding_format = body.get("dimensions"), body.get("encoding_format")
        if self._models is not None and rec.model not in self._models:
            message = f"The model `{rec.model}` does not exist or you do not have access to it."
            raise _Bad(
                self._error(404, message, "invalid_request_error", "not_found", "model_not_found")
            )

    def _embeddings(self, rec: RecordedRequest) -> Reply:
        """Deterministic vectors (tests/fakegemini.fake_embedding) in the form asked for."""
        data = []
        for i, text in enumerate(rec.inputs):
            vec = fake_embedding(text, rec.model or "", rec.dimensions)
            value: Any = vec
            if rec.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(t.split()) for t in rec.inputs)
        body = {
            "object": "list",
            "data": data,
            "model": rec.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Reply(200, json.dumps(body).encode(), outcome="ok")

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

    def _decide(self, rec: RecordedRequest) -> Reply | None:
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
        return self._next_scripted(rec)

    def _scripted(self, rec: RecordedRequest, action: Action) -> Reply:
        """A fault, a malformed answer or a refusal, in the dialect's shape."""
        if action.kind == "fault":
            if isinstance(action.body, bytes):
                reply = Reply(action.status, action.body, "text/html", "fault")
            elif isinstance(action.body, dict):
                reply = Reply(action.status, json.dumps(action.body).encode(), outcome="fault")
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
        if action.kind == "refuse":
            return self._completion(rec, None, "refused", refusal=str(action.body))
        if action.kind != "malformed":
            raise ValueError(f"unknown scripted action {action.kind!r}")
        if action.options.get("where") == "body":
            return Reply(
                200, b'{"id": "chatcmpl-x", "choices": [{"message": {"con', outcome="malformed"
            )
        return self._completion(rec, '{"description": "A photo of a cat sitting on', "malformed")

    def _happy(self, rec: RecordedRequest) -> Reply:
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
    ) -> Reply:
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
        reply = Reply(200, json.dumps(body).encode(), outcome=outcome, text=text)
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
    ) -> Reply:
        """An error in the dialect's shape: OpenAI's and Ollama's string (or null) code,
        llama.cpp's integer one."""
        error: dict[str, Any] = {"message": message, "type": kind}
        if self.dialect == "llamacpp":
            error = {"code": status, **error}
        else:
            error.update(param=None, code=code)
        return Reply(status, json.dumps({"error": error}).encode(), outcome=outcome)


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
