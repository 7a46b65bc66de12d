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
import datetime
import io
import json
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.fakehttp import Action, FakeHTTPServer, Handler, Record, Reply
from tests.fakeopenai import RecordedImage, _describe

__all__ = ["FakeAnthropic", "AnthropicRequest", "error_body"]

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
    ) -> None:
        """``keys``: the valid keys (None: any non-empty one). ``models``: the models
        served (None: any)."""
        super().__init__(latency=latency, hang_seconds=hang_seconds)
        self._keys = None if keys is None else frozenset(keys)
        self._models = None if models is None else frozenset(models)
        self._responder = responder

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
