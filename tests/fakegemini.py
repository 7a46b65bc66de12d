"""A fake Gemini API server (``generateContent``) for the test suite. Standard library only,
plus Pillow, which it uses only to describe the images it receives. Its Batch and Files
APIs (``server.batch``) are in tests/fakegemini_batch.py; ``before_answer`` lets a test act
at the moment the server has done what a request asked but not yet answered it.

What the real SDK (google-genai 3.4.0, with its retries off, which is the default) raises
against this server, measured by tests/test_fakegemini.py:

- client timeout (``HttpOptions(timeout=500)``; the value is in milliseconds) while the
  server hangs -> ``httpx2.ReadTimeout``, a subclass of ``httpx2.TimeoutException``
  < ``httpx2.TransportError`` < ``httpx2.RequestError`` < ``httpx2.HTTPError``.
  A timeout while connecting would be ``httpx2.ConnectTimeout`` (also a TimeoutException).
- connection refused (nothing listening) -> ``httpx2.ConnectError``
  < ``httpx2.NetworkError`` < ``httpx2.TransportError``.
- server closes the connection without answering -> ``httpx2.RemoteProtocolError``
  < ``httpx2.ProtocolError`` < ``httpx2.TransportError``.
- HTTP 4xx -> ``google.genai.errors.ClientError``; 5xx -> ``google.genai.errors.ServerError``
  (both subclass ``google.genai.errors.APIError``; any other status that is not 200 raises
  a bare ``APIError``). ``.code`` is the HTTP status, ``.status`` / ``.message`` come
  from the body's ``error`` object, ``.details`` is the whole parsed body
  ``{"error": {...}}``. For a body that is not JSON, ``.details`` is
  ``{"message": <body text>, "status": <reason phrase>}``.
None of the transport exceptions is wrapped by the SDK. The SDK imports the plain
``httpx`` as well when it is installed; it is not in this virtualenv, so only the httpx2
classes can occur here.

Wire format the SDK sends (checked by the tests):
``POST {base_url}/v1/models/{model}:generateContent``. google-genai 3.x defaults to the
``v1`` API version; 2.x and most documentation use ``v1beta``; both are served here. The
key is in the ``x-goog-api-key`` header, and the SDK also sends ``X-Server-Timeout``
(the client timeout in whole seconds, rounded up) when a timeout is set. The body is
camelCase at the top level (``generationConfig``, ``inlineData``, ``responseSchema``,
``responseJsonSchema``), but ``inlineData`` carries ``mime_type`` in snake_case and the
image bytes as URL-safe base64 with padding. A ``response_schema`` arrives in OpenAPI
form with upper-case types (``"type": "OBJECT"``) and snake_case ``property_ordering``;
a ``response_json_schema`` arrives unchanged (JSON Schema, lower-case types).
``POST .../models/{model}:batchEmbedContents`` (``client.models.embed_content`` with a
list) answers ``fake_embedding`` vectors of each request's ``outputDimensionality``, after
the same rules 1-5 (quotas, scripted faults).

Usage::

    with FakeGemini(keys={"k1"}, quota=(20, 5.0), seed=1) as server:
        client = genai.Client(api_key="k1", http_options=types.HttpOptions(
            base_url=server.url, timeout=2000, client_args={"trust_env": False}))
        server.fail_next(2, 503)
        ...
        assert server.count_by_status() == {503: 2, 200: 5}

For each request the server decides as follows (the first rule that applies wins):
1. no key -> 403; a key outside ``keys`` -> 400 API_KEY_INVALID; a key in
   ``forbidden_keys`` -> 403 PERMISSION_DENIED;
2. unknown route -> 404; body too large, not JSON, or with bad base64 -> 400; model
   not in ``models`` (when given) -> 404;
3. the project's daily quota used up -> 429 (quotaId ``...PerDay...``);
4. the project's sliding window full -> 429 (quotaId ``...PerMinute...``, RetryInfo);
   a request that gets past rules 3 and 4 counts against both quotas, whatever
   happens to it next;
5. the next scripted action, if any (``fail_next``, ``hang_next``, ``malformed_next``,
   ``block_next``, ``drop_next``; first in, first out);
6. one seeded random draw against ``fault_rate``, ``hang_rate``, ``malformed_rate``,
   ``block_rate`` (bands in that order);
7. a happy answer (``responder`` if set, otherwise the default description).
``latency`` is added before every answer, errors included.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime as dt
import hashlib
import io
import json
import math
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.fakehttp import Action, FakeHTTPServer, Handler, Record, Reply, pick_field

if TYPE_CHECKING:
    from tests.fakegemini_batch import FakeBatchService

__all__ = [
    "DEFAULT_SCHEMA",
    "FakeGemini",
    "RecordedImage",
    "RecordedRequest",
    "decode_base64_any",
    "image_tokens",
    "minimal_instance",
]

Quota = tuple[int, float]
Responder = Callable[["RecordedRequest"], "str | dict[str, Any] | None"]

# The default imgbatch answer's schema, as JSON Schema.
DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "description": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "objects": {"type": "array", "items": {"type": "string"}},
        "colors": {"type": "array", "items": {"type": "string"}},
        "mood": {"type": "string"},
        "text": {"type": "string"},
    },
    "required": ["description", "tags", "objects", "colors", "mood", "text"],
}

_ROUTE = re.compile(r"^/(v1|v1beta|v1alpha)/(?:models/)?([^/:]+):generateContent$")
_EMBED_ROUTE = re.compile(r"^/(v1|v1beta|v1alpha)/(?:models/)?([^/:]+):batchEmbedContents$")
MAX_EMBED_REQUESTS = 100  # batchEmbedContents' limit of texts a call
_MINUTE_QUOTA_ID = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
_DAY_QUOTA_ID = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
_QUOTA_METRIC = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
_RATE_LIMIT_DOCS = "https://ai.google.dev/gemini-api/docs/rate-limits"

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_STATUS_MESSAGES = {
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    502: "Bad Gateway",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}

_TAGS = (
    "outdoor", "indoor", "portrait", "landscape", "closeup", "urban", "nature", "night",
    "daylight", "abstract", "pattern", "texture", "minimal", "vintage", "macro", "still-life",
)  # fmt: skip
_OBJECTS = (
    "tree", "car", "person", "cat", "dog", "building", "cup", "book", "chair", "flower",
    "bicycle", "window", "lamp", "bottle", "sign", "boat",
)  # fmt: skip
_MOODS = ("calm", "cheerful", "moody", "serene", "energetic", "melancholic", "playful", "neutral")
_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
    "red": (220, 30, 30), "orange": (240, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (130, 50, 170),
    "brown": (120, 80, 40), "pink": (240, 150, 190), "cyan": (40, 200, 220),
}  # fmt: skip


# --------------------------------------------------------------------------- records


@dataclass
class RecordedImage:
    """One decoded ``inlineData`` part."""

    mime_type: str
    data: bytes = field(repr=False)
    alphabet: str  # "urlsafe" ('-' or '_' seen), "standard" ('+' or '/'), "mixed", "plain"
    padded: bool
    width: int | None = None  # from Pillow, None when Pillow cannot read the header
    height: int | None = None
    format: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def head(self) -> bytes:
        return self.data[:16]

    def open(self) -> Any:
        """The image as a ``PIL.Image.Image`` (lazy; raises if Pillow cannot read it)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.data))


@dataclass
class RecordedRequest(Record):
    """What the server saw and did for one request (``path`` without the query string,
    which may carry the key). ``api_key`` is kept (tests compare it) but never shown by
    ``repr``. ``outcome``: ok, quota_minute, quota_day, fault, hang, malformed, blocked,
    dropped, bad_key, no_key, forbidden, bad_request, too_large, not_found, bug."""

    api_version: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    key_source: str | None = None  # "header" | "query" | None
    project: str | None = None
    images: list[RecordedImage] = field(default_factory=list)
    prompt: str = ""  # the text parts of contents, joined with "\n"
    system_instruction: str | None = None
    schema: Any = None
    schema_field: str | None = None  # which field carried it, e.g. "responseJsonSchema"
    generation_config: dict[str, Any] = field(default_factory=dict)
    response_mime_type: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    media_resolution: str | None = None
    server_timeout: str | None = None  # the X-Server-Timeout header the SDK sends
    body_size: int = 0
    prompt_tokens: int = 0
    route: str = "generate"  # or a Batch / Files API route (see tests/fakegemini_batch.py)
    #: batchEmbedContents (route "embed"): each request's text, outputDimensionality, taskType
    texts: list[str] = field(default_factory=list)
    dimensions: list[int | None] = field(default_factory=list)
    task_types: list[str | None] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def decode_base64_any(text: str) -> tuple[bytes, str, bool]:
    """Decode standard or URL-safe base64, padded or not. Returns (bytes, alphabet, padded).

    Raises ValueError on anything else."""
    s = "".join(text.split())
    has_url = "-" in s or "_" in s
    has_std = "+" in s or "/" in s
    alphabet = (
        "mixed"
        if has_url and has_std
        else "urlsafe"
        if has_url
        else ("standard" if has_std else "plain")
    )
    padded = s.endswith("=")
    core = s.rstrip("=").replace("-", "+").replace("_", "/")
    if len(core) % 4 == 1:
        raise ValueError("truncated base64")
    try:
        data = base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return data, alphabet, padded


def image_tokens(width: int | None, height: int | None, media_resolution: str | None) -> int:
    """Gemini 2.x image tokens: 64 at LOW media resolution; 258 when both sides <= 384 px
    (or the size is unknown); otherwise 258 per 768x768 tile."""
    if media_resolution and "LOW" in media_resolution.upper():
        return 64
    if width is None or height is None or (width <= 384 and height <= 384):
        return 258
    return 258 * math.ceil(width / 768) * math.ceil(height / 768)


def _duration(seconds: float) -> str:
    """A google.protobuf.Duration in JSON form, rounded up: "53s", "0.5s"."""
    seconds = max(seconds, 0.001)
    if seconds >= 1:
        return f"{math.ceil(seconds - 1e-9)}s"
    ms = math.ceil(seconds * 1000 - 1e-9)
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def _seconds_until_pacific_midnight() -> float:
    try:
        from zoneinfo import ZoneInfo

        tz: dt.tzinfo = ZoneInfo("America/Los_Angeles")
    except Exception:  # no tz database: Pacific standard time is close enough
        tz = dt.timezone(dt.timedelta(hours=-8))
    now = dt.datetime.now(tz)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(0), tz)
    return max((midnight - now).total_seconds(), 1.0)


def _error_body(
    code: int, message: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code,
        "message": message or _STATUS_MESSAGES.get(code, f"HTTP {code}"),
        "status": _STATUS_NAMES.get(code, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return {"error": error}


def _quota_body(model: str | None, quota_id: str, limit: int | None, retry: str) -> dict[str, Any]:
    per_day = "PerDay" in quota_id
    violation: dict[str, Any] = {
        "quotaMetric": _QUOTA_METRIC,
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model or "unknown"},
    }
    if limit is not None:
        violation["quotaValue"] = str(limit)
    message = (
        "You exceeded your current quota, please check your plan and billing details. For "
        f"more information on this error, head to: {_RATE_LIMIT_DOCS}. To monitor your "
        "current usage, head to: https://ai.dev/usage?tab=rate-limit. \n"
        f"* Quota exceeded for metric: {_QUOTA_METRIC}, limit: {limit}, model: {model}"
        f"{' (per day)' if per_day else ''}\nPlease retry in {retry}."
    )
    return _error_body(
        429,
        message,
        [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {"description": "Learn more about Gemini API quotas", "url": _RATE_LIMIT_DOCS}
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry},
        ],
    )


def _schema_type(schema: Mapping[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if str(x).lower() != "null"), t[0] if t else None)
    if isinstance(t, str):
        return t.lower()
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


def _fits(value: Any, schema: Mapping[str, Any]) -> bool:
    """Whether a rich default value can stand for a (simple) schema."""
    if "enum" in schema or "const" in schema or "format" in schema:
        return False
    t = _schema_type(schema)
    if t == "string":
        return isinstance(value, str) and len(value) >= int(schema.get("minLength", 0))
    if t == "array" and isinstance(value, list):
        items = schema.get("items") or {}
        return (
            _schema_type(items) == "string"
            and "enum" not in items
            and all(isinstance(v, str) for v in value)
            and int(schema.get("minItems", 0)) <= len(value) <= int(schema.get("maxItems", 1e9))
        )
    return False


def minimal_instance(
    schema: Any, hints: Mapping[str, Any] | None = None, *, _root: Any = None, _depth: int = 0
) -> Any:
    """A small value satisfying ``schema`` (OpenAPI-style or JSON Schema). Objects get
    every declared property; strings "x", numbers 0, booleans false, arrays one item,
    enums their first value. A property named in ``hints`` whose value fits the property's
    schema takes that value instead."""
    root = schema if _root is None else _root
    if not isinstance(schema, Mapping) or _depth > 32:
        return None
    if "$ref" in schema:
        ref = str(schema["$ref"])
        target: Any = root
        for part in ref.lstrip("#/").split("/") if ref.startswith("#") else []:
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return minimal_instance(target, hints, _root=root, _depth=_depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combiner in ("anyOf", "any_of", "oneOf", "one_of", "allOf", "all_of"):
        options = schema.get(combiner)
        if options:
            chosen = next((o for o in options if _schema_type(o) != "null"), options[0])
            return minimal_instance(chosen, hints, _root=root, _depth=_depth + 1)
    t = _schema_type(schema)
    if t == "object":
        out: dict[str, Any] = {}
        for name, sub in (schema.get("properties") or {}).items():
            if hints and name in hints and isinstance(sub, Mapping) and _fits(hints[name], sub):
                out[name] = hints[name]
            else:
                out[name] = minimal_instance(sub, None, _root=root, _depth=_depth + 1)
        return out
    if t == "array":
        if schema.get("maxItems") is not None and int(schema["maxItems"]) == 0:
            return []
        n = max(1, int(schema.get("minItems", schema.get("min_items", 1))))
        return [minimal_instance(schema.get("items") or {}, None, _root=root, _depth=_depth + 1)
                for _ in range(n)]  # fmt: skip
    if t in ("number", "integer"):
        low = schema.get("minimum")
        value = max(0, math.ceil(float(low))) if low is not None else 0
        return value if t == "integer" else float(value)
    if t == "boolean":
        return False
    if t == "null":
        return None
    n = int(schema.get("minLength", schema.get("min_length", 1)))
    return "x" * max(1, n)


def _distance(a: Sequence[int], b: Sequence[int]) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def _describe(images: list[RecordedImage], prompt: str) -> dict[str, Any]:
    """The default answer: deterministic from the first image's bytes."""
    data = images[0].data if images else prompt.encode()
    digest = hashlib.sha256(data).digest()
    tags = list(dict.fromkeys(_TAGS[b % len(_TAGS)] for b in digest[:3]))
    objects = list(dict.fromkeys(_OBJECTS[b % len(_OBJECTS)] for b in digest[3:5]))
    mood = _MOODS[digest[5] % len(_MOODS)]
    colors = ["gray"]
    if not images:
        description = "No image was given."
    else:
        first = images[0]
        try:
            from PIL import Image

            with Image.open(io.BytesIO(first.data)) as img:
                img.draft("RGB", (64, 64))
                mean = img.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
            assert isinstance(mean, tuple)
            colors = [min(_PALETTE, key=lambda name: _distance(_PALETTE[name], mean))]
            description = (
                f"A {first.width}x{first.height} {first.format} image, mostly {colors[0]}."
            )
        except Exception:
            description = f"An undecodable {first.mime_type} payload of {first.size} bytes."
        if len(images) > 1:
            description += f" (first of {len(images)} images)"
    return {
        "description": description,
        "tags": tags,
        "objects": objects,
        "colors": colors,
        "mood": mood,
        "text": "",
    }


# --------------------------------------------------------------------------- behaviour


@dataclass
class _Behaviour:
    keys: frozenset[str] | None = None
    forbidden_keys: frozenset[str] = frozenset()
    projects: dict[str, str] = field(default_factory=dict)
    default_project: str = "default-project"
    quota: Quota | None = None
    day_quota: int | None = None
    project_quotas: dict[str, Quota | None] = field(default_factory=dict)
    project_day_quotas: dict[str, int | None] = field(default_factory=dict)
    day_retry_delay: float | None = None  # None: seconds until midnight Pacific
    latency: float = 0.0
    fault_rate: float = 0.0
    fault_statuses: tuple[int, ...] = (429, 500, 503)
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    block_rate: float = 0.0
    block_form: str = "prompt"
    block_reason: str = "SAFETY"
    hang_seconds: float = 30.0
    models: frozenset[str] | None = None
    max_request_bytes: int = 20 * 1024 * 1024
    responder: Responder | None = None
    #: called with each request's record just before its answer is written (outside the
    #: lock): e.g. to SIGKILL a client at the moment the server has acted but the client
    #: has not heard of it
    before_answer: Callable[[RecordedRequest], None] | None = None


_SET_FIELDS = {"keys", "forbidden_keys", "models"}
_TUPLE_FIELDS = {"fault_statuses"}
_DICT_FIELDS = {"projects", "project_quotas", "project_day_quotas"}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome = status, message, outcome


# --------------------------------------------------------------------------- the server


class FakeGemini(FakeHTTPServer[RecordedRequest]):
    """A local stand-in for ``generativelanguage.googleapis.com`` (see the module doc)."""

    name = "fakegemini"
    json_type = "application/json; charset=UTF-8"
    extra_headers = {"Vary": "Origin, X-Origin, Referer"}
    hang_body = json.dumps(_error_body(504)).encode()
    bug_body = json.dumps(_error_body(500, "fake server bug")).encode()

    def __init__(
        self,
        *,
        keys: Iterable[str] | None = None,
        forbidden_keys: Iterable[str] = (),
        projects: Mapping[str, str] | None = None,
        quota: Quota | None = None,
        day_quota: int | None = None,
        project_quotas: Mapping[str, Quota | None] | None = None,
        project_day_quotas: Mapping[str, int | None] | None = None,
        day_retry_delay: float | None = None,
        latency: float = 0.0,
        fault_rate: float = 0.0,
        fault_statuses: Sequence[int] = (429, 500, 503),
        hang_rate: float = 0.0,
        malformed_rate: float = 0.0,
        block_rate: float = 0.0,
        block_form: str = "prompt",
        block_reason: str = "SAFETY",
        hang_seconds: float = 30.0,
        models: Iterable[str] | None = None,
        max_request_bytes: int = 20 * 1024 * 1024,
        responder: Responder | None = None,
        before_answer: Callable[[RecordedRequest], None] | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``keys``: the valid keys (None: any non-empty key). ``projects``: key -> project
        name; unmapped keys share "default-project". Quotas are per project, as at Google:
        ``quota=(n, seconds)`` allows n accepted requests per sliding window,
        ``day_quota=k`` allows k accepted requests in the server's life (until
        ``reset_quotas``); ``project_quotas`` / ``project_day_quotas`` override them per
        project. Rates are fractions of requests, drawn from ``random.Random(seed)``.
        ``clock`` drives the quota windows and the record times."""
        super().__init__(host=host, port=port, clock=clock)
        self._behaviour = _Behaviour()
        self._rng = random.Random(seed)
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self._day_counts: collections.Counter[str] = collections.Counter()
        self.configure(
            keys=keys,
            forbidden_keys=forbidden_keys,
            projects=projects or {},
            quota=quota,
            day_quota=day_quota,
            project_quotas=project_quotas or {},
            project_day_quotas=project_day_quotas or {},
            day_retry_delay=day_retry_delay,
            latency=latency,
            fault_rate=fault_rate,
            fault_statuses=fault_statuses,
            hang_rate=hang_rate,
            malformed_rate=malformed_rate,
            block_rate=block_rate,
            block_form=block_form,
            block_reason=block_reason,
            hang_seconds=hang_seconds,
            models=models,
            max_request_bytes=max_request_bytes,
            responder=responder,
            before_answer=before_answer,
        )
        from tests.fakegemini_batch import FakeBatchService  # it builds on this module

        #: the Batch and Files APIs (tests/fakegemini_batch.py)
        self.batch: FakeBatchService = FakeBatchService(self)

    # ---------------------------------------------------------------- behaviour setters

    def configure(self, **changes: Any) -> None:
        """Change any constructor behaviour setting while running, atomically, e.g.
        ``configure(fault_rate=0.2, fault_statuses=(503,))``. ``seed``, ``clock``, ``host``
        and ``port`` cannot change."""
        with self._lock:
            b = self._behaviour
            names = {f.name for f in dataclasses.fields(b)}
            for name, value in changes.items():
                if name not in names:
                    raise TypeError(f"unknown FakeGemini setting: {name!r}")
                if name in _SET_FIELDS:
                    if isinstance(value, str):
                        raise TypeError(f"{name} takes a collection of strings, not a string")
                    value = (
                        None
                        if value is None and name != "forbidden_keys"
                        else frozenset(value or ())
                    )
                elif name in _TUPLE_FIELDS:
                    value = tuple(value)
                elif name in _DICT_FIELDS:
                    value = dict(value or {})
                elif name == "block_form" and value not in ("prompt", "candidate"):
                    raise ValueError("block_form is 'prompt' or 'candidate'")
                setattr(b, name, value)

    def set_latency(self, seconds: float) -> None:
        self.configure(latency=seconds)

    def set_quota(self, quota: Quota | None, project: str | None = None) -> None:
        """``(n, window_seconds)`` for every project, or for one project."""
        with self._lock:
            if project is None:
                self._behaviour.quota = quota
            else:
                self._behaviour.project_quotas[project] = quota

    def set_day_quota(self, limit: int | None, project: str | None = None) -> None:
        with self._lock:
            if project is None:
                self._behaviour.day_quota = limit
            else:
                self._behaviour.project_day_quotas[project] = limit

    def set_responder(self, responder: Responder | None) -> None:
        """``responder(record) -> str | dict | None``: the answer's text part (a dict is
        JSON-encoded; None falls back to the default answer)."""
        self.configure(responder=responder)

    def reset_quotas(self) -> None:
        """Empty every window and the daily counts (the daily reset)."""
        with self._lock:
            self._windows.clear()
            self._day_counts.clear()

    # ---------------------------------------------------------------- scripted actions

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        retry_delay: str | None = None,
        quota_id: str | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``n`` accepted requests get ``status`` with Google's error body. A 429
        with ``retry_delay`` (e.g. "2s") or ``quota_id`` carries QuotaFailure + RetryInfo
        details; a plain 429 has none. ``body`` replaces the body verbatim (text/html), like
        a proxy's error page; ``headers`` are added."""
        self._queue(
            n,
            Action("fault", status, body, dict(headers or {}),
                   {"retry_delay": retry_delay, "quota_id": quota_id}),
        )  # fmt: skip

    def block_next(self, n: int = 1, form: str = "prompt", reason: str = "SAFETY") -> None:
        """The next ``n`` accepted requests are blocked: ``form="prompt"`` answers no
        candidates and ``promptFeedback.blockReason``; ``form="candidate"`` answers one
        candidate with ``finishReason`` = reason and no content."""
        if form not in ("prompt", "candidate"):
            raise ValueError("form is 'prompt' or 'candidate'")
        self._queue(n, Action("block", options={"form": form, "reason": reason}))

    # ---------------------------------------------------------------- requests

    def _new_record(self, index: int, now: float, method: str, path: str) -> RecordedRequest:
        return RecordedRequest(index, now, method, urllib.parse.urlsplit(path).path)

    def _timing(self) -> tuple[float, float, Callable[[RecordedRequest], None] | None]:
        b = self._behaviour
        return b.latency, b.hang_seconds, b.before_answer

    def _process(self, h: Handler, rec: RecordedRequest, split: Any) -> Reply:
        route = _ROUTE.match(split.path)
        embed = _EMBED_ROUTE.match(split.path)
        if embed:
            route, rec.route = embed, "embed"
        if route:
            rec.api_version, rec.model = route.group(1), route.group(2)
        rec.server_timeout = h.headers.get("X-Server-Timeout")
        key = h.headers.get("x-goog-api-key")
        rec.key_source = "header" if key is not None else None
        if key is None:
            query = urllib.parse.parse_qs(split.query)
            if query.get("key"):
                key, rec.key_source = query["key"][0], "query"
        rec.api_key = key
        length = int(h.headers.get("Content-Length") or 0)
        rec.body_size = length
        with self._lock:
            b = self._behaviour
            too_big = length > b.max_request_bytes
            limit = b.max_request_bytes
        raw = self._read_body(h, length, keep=not too_big)
        batch = self.batch.route(h.command, split.path, split.query)
        if batch is not None:
            rec.route = batch[0]
        if batch is not None and batch[0] == "upload_chunk":  # its URL is its credential
            return self._batch_reply(batch, rec, split, h, raw)
        with self._lock:
            b = self._behaviour
            rec.project = b.projects.get(key, b.default_project) if key else None
            if not key:
                return self._json(
                    403,
                    _error_body(
                        403,
                        "Method doesn't allow unregistered callers (callers without established "
                        "identity). Please use API Key or other form of API consumer identity "
                        "to call this API.",
                    ),
                    "no_key",
                )
            if b.keys is not None and key not in b.keys and key not in b.forbidden_keys:
                return self._json(400, _bad_key_body(), "bad_key")
            if key in b.forbidden_keys:
                return self._json(403, _forbidden_body(), "forbidden")
        if batch is not None:
            return self._batch_reply(batch, rec, split, h, raw)
        if h.command != "POST" or not route:
            return self._json(
                404, _error_body(404, f"Method not found: {h.command} {split.path}"), "not_found"
            )
        if too_big:
            return self._json(
                400,
                _error_body(400, f"Request payload size exceeds the limit: {limit} bytes."),
                "too_large",
            )
        try:
            if embed:
                self._parse_embed(rec, raw)
            else:
                self._parse(rec, raw)
        except _BadRequest as exc:
            return self._json(exc.status, _error_body(exc.status, exc.message), exc.outcome)
        with self._lock:
            reply = self._decide(rec)
        if reply is None and embed:
            return self._embeddings(rec)
        if reply is None:  # the happy answer: built outside the lock (Pillow, responder)
            reply = self._happy(rec)
        return reply

    def _batch_reply(
        self, batch: tuple[str, tuple[str, ...]], rec: RecordedRequest, split: Any, h: Handler,
        raw: bytes,
    ) -> Reply:  # fmt: skip
        status, body, outcome, headers = self.batch.handle(
            batch[0], batch[1], rec, split.query, h.headers, raw
        )
        if isinstance(body, bytes):
            kind = "application/octet-stream" if outcome == "file_download" else "text/plain"
            return Reply(status, body, kind, outcome, headers=headers)
        reply = self._json(status, body, outcome)
        reply.headers = headers
        return reply

    def _parse(self, rec: RecordedRequest, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _BadRequest(400, f"Invalid JSON payload received. {exc}", "bad_request") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "Invalid JSON payload received.", "bad_request")
        _, config = pick_field(body, "generationConfig")
        config = config if isinstance(config, dict) else {}
        rec.generation_config = config
        for camel in ("responseSchema", "responseJsonSchema"):
            name, value = pick_field(config, camel)
            if name is not None:
                rec.schema_field, rec.schema = name, value
                break
        rec.response_mime_type = pick_field(config, "responseMimeType")[1]
        rec.temperature = pick_field(config, "temperature")[1]
        rec.max_output_tokens = pick_field(config, "maxOutputTokens")[1]
        rec.media_resolution = pick_field(config, "mediaResolution")[1]
        texts: list[str] = []
        _, contents = pick_field(body, "contents")
        if isinstance(contents, dict):
            contents = [contents]
        if not isinstance(contents, list) or not contents:
            raise _BadRequest(400, "* GenerateContentRequest.contents: contents is not specified",
                              "bad_request")  # fmt: skip
        for ci, content in enumerate(contents):
            parts = content.get("parts", []) if isinstance(content, dict) else []
            for pi, part in enumerate(parts if isinstance(parts, list) else []):
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                _, inline = pick_field(part, "inlineData")
                if isinstance(inline, dict):
                    rec.images.append(self._image(inline, f"contents[{ci}].parts[{pi}]"))
        rec.prompt = "\n".join(texts)
        _, system = pick_field(body, "systemInstruction")
        if isinstance(system, dict):
            rec.system_instruction = "\n".join(
                p["text"] for p in system.get("parts", []) if isinstance(p, dict) and "text" in p
            )
        text_len = len(rec.prompt) + len(rec.system_instruction or "")
        rec.prompt_tokens = text_len // 4 + sum(
            image_tokens(i.width, i.height, rec.media_resolution) for i in rec.images
        )

    def _parse_embed(self, rec: RecordedRequest, raw: bytes) -> None:
        """``batchEmbedContents``: ``{"requests": [{"model": "models/M", "content": {"parts":
        [{"text": ...}]}, "outputDimensionality": N, "taskType": T}, ...]}``, at most 100
        requests, each naming the URL's model (as Google checks)."""
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _BadRequest(400, f"Invalid JSON payload received. {exc}", "bad_request") from None
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise _BadRequest(400, "* BatchEmbedContentsRequest.requests: requests is not "
                              "specified", "bad_request")  # fmt: skip
        if len(requests) > MAX_EMBED_REQUESTS:
            raise _BadRequest(400, f"* BatchEmbedContentsRequest.requests: at most "
                              f"{MAX_EMBED_REQUESTS} requests can be in one batch",
                              "bad_request")  # fmt: skip
        for i, request in enumerate(requests):
            request = request if isinstance(request, dict) else {}
            if request.get("model") != f"models/{rec.model}":
                raise _BadRequest(400, f"* BatchEmbedContentsRequest.requests[{i}].model: "
                                  "the model must be the batch's model", "bad_request")  # fmt: skip
            _, content = pick_field(request, "content")
            parts = content.get("parts") if isinstance(content, dict) else None
            texts = [p["text"] for p in parts or [] if isinstance(p, dict) and "text" in p]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise _BadRequest(400, f"* BatchEmbedContentsRequest.requests[{i}].content: "
                                  "contents is not specified", "bad_request")  # fmt: skip
            rec.texts.append("\n".join(texts))
            rec.dimensions.append(pick_field(request, "outputDimensionality")[1])
            rec.task_types.append(pick_field(request, "taskType")[1])
        rec.prompt_tokens = sum(len(t) // 4 for t in rec.texts)

    def _embeddings(self, rec: RecordedRequest) -> Reply:
        """Deterministic vectors (`fake_embedding`), of the dimensions asked for (3,072,
        gemini-embedding-001's own, when none is)."""
        embeddings = [
            {"values": fake_embedding(text, rec.model or "", dims or 3072)}
            for text, dims in zip(rec.texts, rec.dimensions, strict=True)
        ]
        return self._json(200, {"embeddings": embeddings}, "ok")

    @staticmethod
    def _image(inline: Mapping[str, Any], where: str) -> RecordedImage:
        _, mime = pick_field(inline, "mimeType")
        _, data = pick_field(inline, "data")
        if not isinstance(data, str):
            raise _BadRequest(400, f"Invalid value at '{where}.inline_data.data': missing data",
                              "bad_request")  # fmt: skip
        try:
            decoded, alphabet, padded = decode_base64_any(data)
        except ValueError:
            raise _BadRequest(
                400,
                f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), Base64 decoding failed",
                "bad_request",
            ) from None
        image = RecordedImage(str(mime or ""), decoded, alphabet, padded)
        try:
            with image.open() as img:
                image.width, image.height = img.size
                image.format = img.format
        except Exception:
            pass
        return image

    def _decide(self, rec: RecordedRequest) -> Reply | None:
        """Quotas, script, random faults (called with the lock held); None: answer happily."""
        b = self._behaviour
        now = self._clock()
        if b.models is not None and rec.model not in b.models:
            body = _error_body(
                404,
                f"models/{rec.model} is not found for API version {rec.api_version}, or is not "
                "supported for generateContent. Call ListModels to see the list of available "
                "models and their supported methods.",
            )
            return self._json(404, body, "not_found")
        project = rec.project or b.default_project
        day_limit = b.project_day_quotas.get(project, b.day_quota)
        if day_limit is not None and self._day_counts[project] >= day_limit:
            delay = b.day_retry_delay
            retry = _duration(delay if delay is not None else _seconds_until_pacific_midnight())
            return self._json(429, _quota_body(rec.model, _DAY_QUOTA_ID, day_limit, retry),
                              "quota_day")  # fmt: skip
        quota = b.project_quotas.get(project, b.quota)
        window = self._windows[project]
        if quota is not None:
            limit, seconds = quota
            while window and window[0] <= now - seconds:
                window.popleft()
            if len(window) >= limit:
                wait = window[0] + seconds - now if window else seconds
                body = _quota_body(rec.model, _MINUTE_QUOTA_ID, limit, _duration(wait))
                return self._json(429, body, "quota_minute")
        window.append(now)
        self._day_counts[project] += 1

        if self._script:
            return self._next_scripted(rec)
        draw = self._rng.random()
        for kind, rate in (
            ("fault", b.fault_rate),
            ("hang", b.hang_rate),
            ("malformed", b.malformed_rate),
            ("block", b.block_rate),
        ):
            if draw < rate:
                status = self._rng.choice(b.fault_statuses) if kind == "fault" else 500
                options = {"form": b.block_form, "reason": b.block_reason}
                return self._action_reply(rec, Action(kind, status, options=options))
            draw -= rate
        return None

    def _scripted(self, rec: RecordedRequest, action: Action) -> Reply:
        """A fault, a malformed answer or a block, as Google answers them."""
        if action.kind == "fault":
            if action.body is not None:
                reply = Reply(action.status, action.body, "text/html; charset=UTF-8", "fault")
            else:
                retry_delay = action.options.get("retry_delay")
                quota_id = action.options.get("quota_id")
                if action.status == 429 and (retry_delay or quota_id):
                    body = _quota_body(rec.model, quota_id or _MINUTE_QUOTA_ID, None,
                                       retry_delay or "1s")  # fmt: skip
                else:
                    body = _error_body(action.status)
                reply = self._json(action.status, body, "fault")
            reply.headers.update(action.headers)
            return reply
        if action.kind == "malformed":
            text = '{"description": "A photo of a cat sitting on'  # cut short: invalid JSON
            return self._answer(rec, _candidate(text), text, "malformed")
        if action.kind != "block":
            raise ValueError(f"unknown scripted action {action.kind!r}")
        reason = action.options["reason"]
        if action.options["form"] == "prompt":
            payload: dict[str, Any] = {
                "promptFeedback": {"blockReason": reason, "safetyRatings": _RATINGS}
            }
        else:
            payload = {
                "candidates": [{"finishReason": reason, "index": 0, "safetyRatings": _RATINGS}]
            }
        return self._answer(rec, payload, None, "blocked")

    def _happy(self, rec: RecordedRequest) -> Reply:
        with self._lock:
            responder = self._behaviour.responder
        text: str | None = None
        if responder is not None:
            custom = responder(rec)
            if custom is not None:
                text = custom if isinstance(custom, str) else json.dumps(custom)
        if text is None:
            rich = _describe(rec.images, rec.prompt)
            value = rich if rec.schema is None else minimal_instance(rec.schema, rich)
            text = json.dumps(value)
        return self._answer(rec, _candidate(text), text, "ok")

    def _answer(
        self, rec: RecordedRequest, payload: dict[str, Any], text: str | None, outcome: str
    ) -> Reply:
        out_tokens = max(1, len(text) // 4) if text else 0
        image_part = sum(image_tokens(i.width, i.height, rec.media_resolution) for i in rec.images)
        usage: dict[str, Any] = {
            "promptTokenCount": rec.prompt_tokens,
            "totalTokenCount": rec.prompt_tokens + out_tokens,
            "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": rec.prompt_tokens - image_part},
                *([{"modality": "IMAGE", "tokenCount": image_part}] if rec.images else []),
            ],
        }
        if out_tokens:
            usage["candidatesTokenCount"] = out_tokens
        payload = {
            **payload,
            "usageMetadata": usage,
            "modelVersion": rec.model,
            "responseId": hashlib.sha1(f"{rec.index}".encode()).hexdigest()[:22],
        }
        reply = self._json(200, payload, outcome)
        reply.text = text
        return reply


_RATINGS = [
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "HIGH", "blocked": True},
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
]


def _candidate(text: str) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ]
    }


def _bad_key_body() -> dict[str, Any]:
    message = "API key not valid. Please pass a valid API key."
    return _error_body(
        400,
        message,
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ],
    )


def _forbidden_body() -> dict[str, Any]:
    return _error_body(
        403,
        "Requests to this API generativelanguage.googleapis.com method "
        "google.ai.generativelanguage.v1beta.GenerativeService.GenerateContent are blocked.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_SERVICE_BLOCKED",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ],
    )


# -- embeddings (issue 22.2): deterministic vectors that make meaning testable --------------

#: words that share a meaning share an axis: "puppy" lands near "dog" with no word in
#: common; any other word adds a little on an axis of its own (by its hash)
TOPICS: dict[str, int] = {
    **dict.fromkeys(("dog", "dogs", "puppy", "puppies", "canine", "hound", "pooch"), 0),
    **dict.fromkeys(("cat", "cats", "kitten", "kitty", "feline"), 1),
    **dict.fromkeys(("car", "cars", "automobile", "vehicle", "sedan", "truck"), 2),
    **dict.fromkeys(("beach", "seaside", "shore", "sand", "ocean", "coast", "sea"), 3),
    **dict.fromkeys(("receipt", "invoice", "bill", "grocery", "purchase", "total"), 4),
    **dict.fromkeys(("snow", "winter", "sled", "dogsled", "frozen", "ice", "cold"), 5),
    **dict.fromkeys(("sunset", "dusk", "evening", "twilight"), 6),
    **dict.fromkeys(("ball", "toy", "fetch"), 7),
}
N_TOPICS = 8
DEFAULT_EMBEDDING_DIMS = 32


def fake_embedding(text: str, model: str = "", dims: int | None = None) -> list[float]:
    """A unit vector of `dims` (default 32) floats for `text` under `model`: each topic
    word adds 1 on its topic's axis, any other word 0.15 on an axis of its own (from its
    hash, past the topics). Another model puts the axes elsewhere (a rotation by its
    name's hash), so its vectors mean nothing to the first one's."""
    n = max(int(dims or DEFAULT_EMBEDDING_DIMS), N_TOPICS + 2)
    shift = int(hashlib.sha256(model.encode()).hexdigest(), 16) % n
    vec = [0.0] * n
    for word in re.findall(r"[^\W_]+", text.casefold()):
        axis = TOPICS.get(word)
        if axis is not None:
            vec[(axis + shift) % n] += 1.0
        else:
            h = int(hashlib.sha256(word.encode()).hexdigest(), 16)
            vec[(N_TOPICS + h % (n - N_TOPICS) + shift) % n] += 0.15
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    if not any(vec):
        vec[(n - 1 + shift) % n], norm = 1.0, 1.0
    return [x / norm for x in vec]
