"""`openai` and `ollama`: any server speaking OpenAI's chat completions (OpenAI, Ollama's
`/v1`, vLLM, llama.cpp's llama-server, LM Studio), through the `openai` SDK; the only
module that imports it.

One provider class, two names: `openai` reads the `[openai]` settings (default endpoint
OpenAI's own API, a key required there), `ollama` the `[ollama]` ones (the endpoint from
OLLAMA_HOST, no key, a model required, unthrottled unless asked). Both ask for the same
structured output as Gemini (providers/prompt.py) as `response_format: json_schema`; an
endpoint that refuses that form (400) is asked once more with `json_object` and the
schema in the prompt, and keeps the form that worked for the rest of the run. Every
answer is checked against the schema.

Several endpoints (`base_url` lists them) share the requests in turn, in a KeyPool: one
that fails cools down, longer each time, and a request it failed moves at once to a
healthy one (`Failover`).

Every failure is classified here, and nowhere else:
- per item (`ItemError`): TIMEOUT, NETWORK_ERROR (connection reset, or refused once some
  endpoint has answered), AI_ERROR (5xx; an answer that is not strict JSON, NaN or
  Infinity included, or not of its schema), RATE_LIMIT (429 with the delay of
  `retry-after-ms`, `retry-after` or `x-ratelimit-reset-*`; a 503 while the model loads
  is waited out the same way),
  BLOCKED (a refusal or a content filter; never retried), AI_ERROR not retried (another
  4xx);
- per request (`Failover`): a rejected key or a spent quota takes the endpoint out of the
  pool; a 429 or a failure cools it; while another endpoint is ready, the pipeline sends
  the request again at once (with a new rate-limiter slot);
- per run: no endpoint reachable before any has answered (FatalError: "cannot reach
  ...: is the server running?"), every endpoint rejecting the key (AuthError), OpenAI's
  quota spent (`insufficient_quota`: QuotaExhaustedError), an unknown model or a wrong
  URL (404: ConfigError, with `ollama pull MODEL` for Ollama).
API keys, and what in a base URL may be a credential (a password, the path, the query),
never appear in messages: a server is named by scheme, host and port only, and any text
taken from an answer is scrubbed of them.

The fingerprint of a result holds the identity of the endpoints (base.endpoint_identity),
so that another server's model of the same name is never taken for this one's; OpenAI's
own API and Ollama keep the fingerprints they had before.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx2
import openai

from imgbatch.config import OPENAI_URL, Settings
from imgbatch.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    FatalError,
    ImgbatchError,
    ItemError,
    QuotaExhaustedError,
)
from imgbatch.imaging import PreparedImage, encode_for_upload
from imgbatch.prices import longest_match
from imgbatch.providers.base import (
    Analysis,
    Failover,
    endpoint_identity,
    origin,
    url_secrets,
)
from imgbatch.providers.pool import DAILY_QUOTA, REJECTED, KeyPool
from imgbatch.providers.prompt import (
    DEFAULT_JSON_SCHEMA,
    load_prompt,
    load_schema,
    loads_strict,
    validate,
)
from imgbatch.ratelimit import retry_after_seconds

log = logging.getLogger("imgbatch")

OLLAMA_URL = "http://127.0.0.1:11434/v1"
#: sent where no key is configured: the SDK wants one, local servers ignore it
NO_KEY = "imgbatch-no-key"
SCHEMA_NAME = "image_analysis"
COOL_BASE, COOL_MAX = 0.5, 30.0  # an endpoint's cool-down after failures, doubled each
LOADING_RETRY = 2.0  # seconds between tries while a server loads its model (no delay sent)
MAX_MESSAGE = 300  # characters of a server's error message kept in a record
EMBEDDING_DIMS = 768  # asked of embedding models that offer a choice
#: transport failures that mean the server was never reached
_UNREACHED = (httpx2.ConnectError, httpx2.ConnectTimeout)


def ollama_url(host: str) -> str:
    """The `/v1` base URL of the Ollama server that OLLAMA_HOST names, read as Ollama
    reads it: `host`, `host:port`, `[v6]:port` or a URL, with or without a path; the
    port defaults to 11434 without a scheme, to 80/443 with http/https."""
    text = host.strip().strip("\"'").strip()
    scheme, sep, rest = text.partition("://")
    port = "11434"
    if not sep:
        scheme, rest = "http", text
    elif scheme == "http":
        port = "80"
    elif scheme == "https":
        port = "443"
    hostport, _, path = rest.partition("/")
    name, given = hostport, ""
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", hostport)
    if bracketed:  # [v6] or [v6]:port
        name, given = bracketed.group(1), bracketed.group(2) or ""
    elif hostport.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
        name, given = hostport.split(":")
    if given.isdigit() and int(given) <= 65535:
        port = given  # an invalid port falls back to the default, as in Ollama
    name = name or "127.0.0.1"
    if ":" in name:
        name = f"[{name}]"
    path = path.strip("/")
    return f"{scheme}://{name}:{port}{'/' + path if path else ''}/v1"


#: OpenAI's image rules ("Calculating costs" in its Images and vision guide), by model
#: name as prices.longest_match finds it. Tile models: (base, per 512-px tile) tokens;
#: any other model, another server's included, is estimated as GPT-4o.
TILE_MODELS: dict[str, tuple[int, int]] = {
    "gpt-4o": (85, 170),
    "gpt-4.1": (85, 170),
    "gpt-4.5": (85, 170),
    "gpt-4o-mini": (2833, 5667),
    "gpt-5": (70, 140),
    "o1": (75, 150),
    "o3": (75, 150),
    "computer-use-preview": (65, 129),
}
#: patch models: 32-px patches (at most 1536) times the model's multiplier; `detail`
#: does not change them
PATCH_MODELS: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
    "gpt-5-mini": 1.62,
    "gpt-5-nano": 2.46,
}
MAX_PATCHES = 1536


def image_tokens(width: int, height: int, detail: str, model: str = "gpt-4o") -> int:
    """Input tokens of an image for `model` by OpenAI's documented rules: a tile model
    (GPT-4o: 85, and 170 per tile) costs its base at low detail, else its base plus a
    price per 512-px tile once fitted in 2048x2048 and its short side brought to 768; a
    patch model (gpt-4.1-mini, -nano, o4-mini, gpt-5-mini, -nano) costs its 32-px
    patches, the image shrunk to at most 1536 of them, times its multiplier (rounded up)."""
    name = model.rsplit("/", 1)[-1]
    patch = longest_match(name, PATCH_MODELS)
    tile = longest_match(name, TILE_MODELS)
    if patch is not None and len(patch) > len(tile or ""):
        return math.ceil(_patches(width, height) * PATCH_MODELS[patch])
    base, per_tile = TILE_MODELS[tile or "gpt-4o"]
    if detail == "low":
        return base
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def _patches(width: int, height: int) -> int:
    """The 32-px patches covering an image, shrunk (as OpenAI does) to fit MAX_PATCHES."""
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches <= MAX_PATCHES:
        return patches
    shrink = math.sqrt(32 * 32 * MAX_PATCHES / (width * height))
    # then shrunk a little more, so that a whole number of patches covers one side
    w, h = width * shrink / 32, height * shrink / 32
    shrink *= min(math.floor(w) / w, math.floor(h) / h)
    return min(
        MAX_PATCHES, math.ceil(int(width * shrink) / 32) * math.ceil(int(height * shrink) / 32)
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 asks for, in seconds: `retry-after-ms`, else `retry-after` (seconds
    or an HTTP date), else the `x-ratelimit-reset-*` of what has none remaining (of
    requests when nothing says which); None when no header says."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    wait = retry_after_seconds(headers.get("retry-after"))
    if wait is not None:
        return wait
    spent = [
        kind
        for kind in ("requests", "tokens")
        if headers.get(f"x-ratelimit-remaining-{kind}") == "0"
    ]
    resets = [_duration(headers.get(f"x-ratelimit-reset-{kind}")) for kind in spent or ["requests"]]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _duration(text: str | None) -> float | None:
    """OpenAI's reset durations: "12ms", "1s", "6m0s", "1h2m3.5s"."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text or "")
    if not parts or "".join(n + u for n, u in parts) != (text or "").strip():
        return None
    unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * unit[u] for n, u in parts)


def _error_fields(body: object, response: httpx2.Response | None) -> tuple[str, str, str]:
    """(message, type, code) of an error answer, whatever its shape: OpenAI's and
    Ollama's `{"error": {...}}` (the SDK hands over the inner object), vLLM's flat
    object, `{"error": "text"}`, a non-JSON body; `code` may be a string or an integer."""
    if isinstance(body, dict) and isinstance(body.get("error"), (dict, str)):
        body = body["error"]
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("msg") or ""
        kind, code = body.get("type") or "", body.get("code")
        return str(message), str(kind), "" if code is None else str(code)
    if isinstance(body, str) and body.strip():
        return body.strip(), "", ""
    text = ""
    if response is not None:
        try:
            text = response.text.strip()
        except Exception:  # a body that cannot be read: the status says enough
            text = ""
    return text, "", ""


def _json_object(text: str) -> Any:
    """The JSON value in a model's answer: the whole text, else inside a ``` fence or
    between the first `{` and the last `}` (what local models in JSON mode add around
    it); None when there is none."""
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1).strip())
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return loads_strict(candidate)
        except ValueError:  # NaN and Infinity included: no strict parser would read them
            continue
    return None


def _shown(urls: list[str]) -> list[str]:
    """The endpoints as messages name them: scheme, host and port only (the path or
    query may carry a credential), numbered where two share a host and port."""
    names = [origin(url) for url in urls]
    return [
        f"{name} (endpoint {i + 1})" if names.count(name) > 1 else name
        for i, name in enumerate(names)
    ]


def _official(url: str) -> bool:
    return urlsplit(url).hostname == urlsplit(OPENAI_URL).hostname


@dataclass
class _Endpoint:
    """One server, and what this run has learnt about it."""

    url: str
    shown: str  # the URL for messages
    client: openai.OpenAI
    official: bool  # OpenAI's own API
    json_mode: str = "json_schema"  # or "json_object", after the server refused the first
    settled: bool = False  # an answer came in json_mode: keep it for the run
    failures: int = 0  # failures in a row: its cool-down grows with them


class OpenAIProvider:
    """Structured image descriptions from an OpenAI-compatible chat-completions server."""

    name = "openai"
    remote = True
    #: where its settings are (`[openai] model` is `openai_model`)
    section = "openai"

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.settings = settings
        self._model: str = self._setting("model")
        if not self._model:
            raise ConfigError(
                f"{self.name} needs a model: --model NAME, IMGBATCH_{self.section.upper()}_MODEL "
                f"or [{self.section}] model in the config file"
            )
        self.prompt = load_prompt(self._setting("prompt"), self._setting("prompt_file"))
        custom = load_schema(self._setting("schema"))
        self.schema: dict[str, Any] = custom or DEFAULT_JSON_SCHEMA
        # the built-in schema meets OpenAI's strict rules; a custom one may not, and a
        # strict server would refuse it rather than answer: it is checked here instead
        self.strict = custom is None
        self.detail: str = self._setting("detail")
        self.timeout: float = self._setting("timeout")
        urls = self._base_urls(env)
        keys = [self.key_for(url, env) for url in urls]
        # keys, and what in a URL may be a credential (a server may echo its path)
        secrets = {k for k in keys if k and k != NO_KEY}
        secrets.update(s for url in urls for s in url_secrets(url))
        self._secrets = sorted(secrets, key=len, reverse=True)
        self._endpoints = [
            _Endpoint(url, shown, self._client(url, key), _official(url))
            for url, shown, key in zip(urls, _shown(urls), keys, strict=True)
        ]
        self.pool = KeyPool(
            [e.shown for e in self._endpoints],
            self._exhausted,
            lambda i: f"endpoint {self._endpoints[i].shown}",
            secrets=self._secrets,
        )
        self._lock = threading.Lock()
        self._answered = False  # some endpoint has answered (anything) in this run
        self._unreached: set[int] = set()  # endpoints refused before any answered

    # -- settings ------------------------------------------------------------------

    def _setting(self, name: str) -> Any:
        return getattr(self.settings, f"{self.section}_{name}")

    def _base_urls(self, env: Mapping[str, str]) -> list[str]:
        return self._checked_urls(self._setting("base_url"))

    def _checked_urls(self, urls: tuple[str, ...] | list[str]) -> list[str]:
        out = []
        for url in urls:
            url = url.strip().rstrip("/")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # named by its scheme only: the rest of a URL may hold a credential
                if parts.scheme in ("http", "https"):
                    what = "one without a host"
                elif "://" in url:
                    what = f"a {parts.scheme}:// URL"
                else:
                    what = "one without its scheme"
                raise ConfigError(
                    f"[{self.section}] base_url must be http:// or https:// URLs, not {what}"
                )
            out.append(url)
        if not out:
            raise ConfigError(f"no endpoint: set --base-url or [{self.section}] base_url")
        return list(dict.fromkeys(out))

    def key_for(self, url: str, env: Mapping[str, str]) -> str:
        """The key sent to `url` (NO_KEY: none), given the environment `env`: imgbatch's
        own (IMGBATCH_OPENAI_API_KEY, [openai] api_key) to any endpoint; the generic
        OPENAI_API_KEY only to OpenAI's own API, so a key set for other tools never
        reaches another server."""
        key = self.settings.openai_api_key.strip()
        if key:
            return key
        if _official(url):
            key = env.get("OPENAI_API_KEY", "").strip()
            if not key:
                raise ConfigError(
                    "no OpenAI API key: set IMGBATCH_OPENAI_API_KEY or OPENAI_API_KEY, or "
                    "[openai] api_key; for a local server, set --base-url"
                )
            return key
        return NO_KEY

    def _client(self, url: str, key: str) -> openai.OpenAI:
        # a query (a gateway's `?key=...`, Azure's `?api-version=...`) is sent with every
        # request: the SDK would glue the route onto it if left in the base URL
        parts = urlsplit(url)
        return openai.OpenAI(
            api_key=key,
            base_url=urlunsplit(parts._replace(query="", fragment="")),
            default_query=dict(parse_qsl(parts.query, keep_blank_values=True)) or None,
            timeout=self.timeout,
            max_retries=0,  # retries are the pipeline's
            # an explicit Authorization: the SDK then drops one taken from the environment
            # (OPENAI_CUSTOM_HEADERS), which would reach this server otherwise
            default_headers={"Authorization": f"Bearer {key}"},
        )

    @property
    def model(self) -> str:
        return self._model

    def fingerprint(self) -> dict[str, Any]:
        s = self.settings
        parts = {
            "model": self._model,
            "prompt": self.prompt,
            "schema": self.schema,
            "max_side": s.max_side,
            "detail": self.detail,
            "temperature": self._setting("temperature"),
            "max_output_tokens": self._setting("max_output_tokens"),
            "upload": [s.upload_format, s.upload_quality],
        }
        identity = self._endpoint_identity()
        if identity is not None:
            parts["endpoint"] = identity
        return parts

    def _endpoint_identity(self) -> str | None:
        """What tells this run's servers from others that call a model by the same name
        (a llama.cpp server's `gpt-4.1-mini` is not OpenAI's): a hash of their URLs, one
        for the pool. OpenAI's own API needs none, and keeps the fingerprint it had
        before there was one (its stored results stay valid)."""
        if all(e.official for e in self._endpoints):
            return None
        return endpoint_identity(e.url for e in self._endpoints)

    def estimate_tokens(self, width: int, height: int) -> int:
        """Input tokens of an image uploaded at this size: OpenAI's rule for the model
        (`image_tokens`) at the run's detail; other servers' models are estimated as GPT-4o."""
        return image_tokens(width, height, self.detail, self._model)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's input tokens, estimated (4 characters a token)."""
        return len(self.prompt) // 4

    # -- requests ------------------------------------------------------------------

    def encode(self, image: PreparedImage) -> tuple[str, int]:
        """The upload, re-encoded without EXIF or GPS, as a data URL in standard base64
        (Ollama refuses the URL-safe alphabet), and its size in bytes."""
        fmt = "WEBP" if self.settings.upload_format == "webp" else "JPEG"
        data, mime = encode_for_upload(image, fmt, self.settings.upload_quality)
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", len(data)

    def _request(self, ep: _Endpoint, mode: str, data_url: str) -> dict[str, Any]:
        prompt = self.prompt
        if mode == "json_schema":
            response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": self.schema, "strict": self.strict},
            }
        else:  # llama.cpp honours a `schema` beside json_object; others ignore it
            response_format = {"type": "json_object", "schema": self.schema}
            prompt += (
                "\n\nAnswer with one JSON object only, valid against this JSON Schema:\n"
                + json.dumps(self.schema)
            )
        image: dict[str, Any] = {"url": data_url}
        if self.detail:
            image["detail"] = self.detail
        # OpenAI's newer models take only max_completion_tokens; most servers max_tokens
        cap = "max_completion_tokens" if ep.official else "max_tokens"
        return {
            "model": self._model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": image},
                    ],
                }
            ],
            "response_format": response_format,
            "temperature": self._setting("temperature"),
            cap: self._setting("max_output_tokens"),
        }

    def analyze(self, encoded: tuple[str, int]) -> Analysis:
        """One request, to the next endpoint of the pool. An endpoint's own trouble
        raises Failover (see the module doc): the pipeline sends the request again."""
        data_url, size = encoded
        index = self.pool.pick()
        ep = self._endpoints[index]
        mode = ep.json_mode
        create = ep.client.chat.completions.with_raw_response.create
        try:
            raw = create(**self._request(ep, mode, data_url))
        except openai.APIStatusError as exc:
            raise self._status_error(exc, index, mode) from None
        except openai.APIConnectionError as exc:  # APITimeoutError is one too
            raise self._transport_error(exc, index, ep) from None
        self._answered = True
        try:  # strictly: a NaN or Infinity anywhere makes an answer of no use
            body = loads_strict(raw.http_response.content)
        except ValueError:
            raise self._transient(
                index, ErrorCode.AI_ERROR, f"the server's answer is not JSON{self._at(ep)}"
            ) from None
        analysis = self._parse(body, size)  # raises for an answer of no use
        with self._lock:
            ep.failures = 0
            if not ep.settled:
                ep.settled = True
                if mode != "json_schema":
                    log.info("%s: structured output as json_object for this run", ep.shown)
        return analysis

    def _transport_error(self, exc: openai.APIConnectionError, index: int, ep: Any) -> Exception:
        """A request that got no answer: a server that cannot be reached at all (the
        run-level error once none is left), else a timeout or a network error of this
        endpoint (retried, on the next endpoint)."""
        if isinstance(exc.__cause__, _UNREACHED):
            return self._unreachable(index, exc.__cause__)
        if isinstance(exc, openai.APITimeoutError):
            message = f"no answer within {self.timeout:g}s{self._at(ep)}"
            return self._transient(index, ErrorCode.TIMEOUT, message)
        cause = type(exc.__cause__ or exc).__name__
        return self._transient(
            index, ErrorCode.NETWORK_ERROR, f"network error: {cause}{self._at(ep)}"
        )

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors of `texts` (in their order) from `POST /embeddings` with the run's
        model, one request to the next endpoint of the pool; failures classified as for
        `analyze` (a 400 is the texts' own: not retried). 768 dimensions are asked of
        OpenAI's text-embedding-3 models, which offer the choice."""
        index = self.pool.pick()
        ep = self._endpoints[index]
        extra: dict[str, Any] = {}
        if self._model.startswith("text-embedding-3"):
            extra["dimensions"] = EMBEDDING_DIMS
        try:
            answer = ep.client.embeddings.create(model=self._model, input=texts, **extra)
        except openai.APIStatusError as exc:
            if exc.status_code == 400:
                message, _, _ = _error_fields(exc.body, exc.response)
                text = self.pool.scrub(" ".join(message.split())[:MAX_MESSAGE])
                raise ItemError(ErrorCode.AI_ERROR, f"400: {text}", retryable=False) from None
            raise self._status_error(exc, index, ep.json_mode) from None
        except openai.APIConnectionError as exc:  # APITimeoutError is one too
            raise self._transport_error(exc, index, ep) from None
        self._answered = True
        data = sorted(answer.data or [], key=lambda d: d.index)
        if len(data) != len(texts) or not all(isinstance(d.embedding, list) for d in data):
            raise self._transient(
                index, ErrorCode.AI_ERROR, f"the server's embeddings do not match{self._at(ep)}"
            )
        with self._lock:
            ep.failures = 0
        return [list(d.embedding) for d in data]

    def _at(self, ep: _Endpoint) -> str:
        """Where, in a message: only worth saying when there are several endpoints."""
        return f" ({ep.shown})" if len(self._endpoints) > 1 else ""

    def _transient(
        self, index: int, code: ErrorCode, message: str, retry: float | None = None
    ) -> ItemError:
        """A failure worth retrying: the endpoint cools down, longer after each failure
        in a row; the request moves at once to an endpoint that is ready and has not
        failed lately, if there is one (so a request fails over at most once per
        endpoint), else it is retried with backoff."""
        ep = self._endpoints[index]
        with self._lock:
            ep.failures += 1
            cool = min(COOL_MAX, COOL_BASE * 2 ** (ep.failures - 1))
        self.pool.cool(index, max(cool, retry or 0.0))
        if self._healthy_ready(index):
            return Failover(code, message)
        return ItemError(code, message, retry_after=retry)

    def _healthy_ready(self, but: int) -> bool:
        if len(self._endpoints) == 1:
            return False
        if self.pool.ready_in() != 0.0:
            return False
        with self._lock:
            return any(
                e.failures == 0 and i != but and i not in self._unreached
                for i, e in enumerate(self._endpoints)
            )

    def _unreachable(self, index: int, cause: BaseException) -> Exception:
        """Connection refused (or no connection within the timeout). Before any endpoint
        has answered, the run stops once every endpoint was tried so: nothing is
        listening, and an error record per file would say less."""
        ep = self._endpoints[index]
        with self._lock:
            if not self._answered:
                self._unreached.add(index)
                if len(self._unreached) == len(self._endpoints):
                    where = ", ".join(e.shown for e in self._endpoints)
                    return FatalError(f"cannot reach {where}: is the server running?{self._hint()}")
        return self._transient(
            index, ErrorCode.NETWORK_ERROR, f"cannot connect: {type(cause).__name__}{self._at(ep)}"
        )

    def _hint(self) -> str:
        return ""

    def _status_error(self, exc: openai.APIStatusError, index: int, mode: str) -> Exception:
        """The error to raise for an error answer from endpoint `index`."""
        self._answered = True
        ep = self._endpoints[index]
        code = exc.status_code
        message, kind, ecode = _error_fields(exc.body, exc.response)
        status = f"{code} {ecode if ecode and not ecode.isdigit() else kind}".strip()
        text = self.pool.scrub(f"{status}: {' '.join(message.split())}"[:MAX_MESSAGE])
        text += self._at(ep)
        if code in (401, 403):
            if self.pool.leave(index, REJECTED, status):
                return Failover(ErrorCode.AUTH_ERROR, f"key rejected ({status}){self._at(ep)}")
            return self.pool.exhausted()
        if code == 404:
            return ConfigError(self._not_found(ep, text, message))
        if code == 429 and "insufficient_quota" in (ecode, kind):
            if self.pool.leave(index, DAILY_QUOTA, status):
                return Failover(ErrorCode.RATE_LIMIT, text)
            return self.pool.exhausted()
        loading = code == 503 and ("loading" in message.lower() or kind == "unavailable_error")
        if code == 429 or loading:
            delay = retry_after(exc.response.headers)
            if delay is None and loading:
                delay = LOADING_RETRY
            self.pool.cool(index, delay if delay is not None else 1.0)
            wait = self.pool.ready_in()
            if wait is None:  # every endpoint left meanwhile (other threads)
                return self.pool.exhausted()
            if wait == 0.0:
                return Failover(ErrorCode.RATE_LIMIT, text)  # another endpoint is ready
            if delay is not None:
                delay = min(delay, wait)
            return ItemError(ErrorCode.RATE_LIMIT, text, retry_after=delay)
        # a 400 to a request sent in a form the endpoint has left since (another thread
        # learnt it refuses json_schema, and has perhaps been answered since) is sent again
        if code == 400 and (not ep.settled or mode != ep.json_mode):
            return self._bad_request(ep, mode, text)
        if code == 408:
            return self._transient(index, ErrorCode.TIMEOUT, text)
        if code in (409, 425) or code >= 500:
            return self._transient(index, ErrorCode.AI_ERROR, text)
        return ItemError(ErrorCode.AI_ERROR, text, retryable=False)

    def _bad_request(self, ep: _Endpoint, mode: str, text: str) -> ItemError:
        """A 400 before the endpoint has ever answered: perhaps it refuses the json_schema
        form (llama.cpp's nested form, older servers). Ask again at once with
        json_object; if that is refused too, the 400 was about something else, and the
        endpoint is asked with json_schema again next time."""
        with self._lock:
            if mode == "json_schema":
                if ep.json_mode == "json_schema":
                    ep.json_mode = "json_object"
                    log.warning(
                        "%s refused the request with a json_schema response_format (%s); "
                        "asking with json_object and the schema in the prompt",
                        ep.shown,
                        text,
                    )
                return Failover(ErrorCode.AI_ERROR, text)
            ep.json_mode = "json_schema"
        return ItemError(ErrorCode.AI_ERROR, text, retryable=False)

    def _not_found(self, ep: _Endpoint, text: str, message: str) -> str:
        if "model" in message.lower():
            return f"model {self._model!r} not found at {ep.shown} ({text}){self._pull_hint()}"
        return (
            f"{ep.shown} has no chat completions at the base URL ({text}): check the "
            "base_url (it usually ends in /v1)"
        )

    def _pull_hint(self) -> str:
        return ""

    def _exhausted(self, left: list[tuple[str, str]]) -> ImgbatchError:
        """The error that stops the run once no endpoint is left: QuotaExhaustedError
        when any left for its quota (the next run resumes), AuthError when every one
        rejected the key."""
        rejected = [status for why, status in left if why == REJECTED]
        if len(rejected) < len(left):
            return QuotaExhaustedError(
                "the OpenAI quota is exhausted (insufficient_quota): check the plan and "
                "billing; the next run resumes"
            )
        where = ", ".join(e.shown for e in self._endpoints)
        status = f" ({rejected[0]})" if rejected else ""
        return AuthError(f"{where} rejected the API key{status}; {self._key_hint()}")

    def _key_hint(self) -> str:
        return "check IMGBATCH_OPENAI_API_KEY (or OPENAI_API_KEY for OpenAI's own API)"

    def _parse(self, body: Any, upload_bytes: int) -> Analysis:
        choices = body.get("choices") if isinstance(body, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise ItemError(ErrorCode.AI_ERROR, "the answer has no choices")
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        reason = str(choice.get("finish_reason") or "")
        refusal = message.get("refusal")
        if refusal:
            text = self.pool.scrub(" ".join(str(refusal).split()))[:MAX_MESSAGE]
            raise ItemError(ErrorCode.BLOCKED, f"refused: {text}")
        if reason == "content_filter":
            raise ItemError(ErrorCode.BLOCKED, "answer blocked: content_filter")
        content = message.get("content")
        if isinstance(content, list):  # some servers answer in parts
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
        if not isinstance(content, str) or not content.strip():
            raise ItemError(ErrorCode.AI_ERROR, f"empty answer (finish reason {reason or '?'})")
        result = _json_object(content)
        if result is None:
            cut = " (cut at max_output_tokens)" if reason == "length" else ""
            raise ItemError(ErrorCode.AI_ERROR, f"the answer is not valid JSON{cut}")
        if not isinstance(result, dict):
            raise ItemError(ErrorCode.AI_ERROR, "the answer is not a JSON object")
        error = validate(result, self.schema)
        if error:
            raise ItemError(ErrorCode.AI_ERROR, f"the answer does not match the schema: {error}")
        usage = body.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        return Analysis(
            result,
            input_tokens=_count(usage.get("prompt_tokens")),
            output_tokens=_count(usage.get("completion_tokens")),
            extra={"upload_bytes": upload_bytes},
        )

    def close(self) -> None:
        for ep in self._endpoints:
            try:
                ep.client.close()
            except Exception:  # closing is best effort
                pass


class OllamaProvider(OpenAIProvider):
    """The same provider for a local Ollama server: everything stays on the machine."""

    name = "ollama"
    section = "ollama"

    def _base_urls(self, env: Mapping[str, str]) -> list[str]:
        urls = self._setting("base_url")
        if not urls:
            host = env.get("OLLAMA_HOST", "").strip()
            urls = [ollama_url(host) if host else OLLAMA_URL]
        return self._checked_urls(urls)

    def key_for(self, url: str, env: Mapping[str, str]) -> str:
        """No key: see OpenAIProvider.key_for."""
        return NO_KEY  # Ollama asks for none; no configured key is ever sent to it

    def _endpoint_identity(self) -> str | None:
        return None  # as before endpoints were told apart: Ollama's results stay valid

    def _hint(self) -> str:
        return " (start it with `ollama serve`; OLLAMA_HOST says where it listens)"

    def _pull_hint(self) -> str:
        return f"; run `ollama pull {self._model}`"

    def _key_hint(self) -> str:
        return (
            "Ollama itself asks for no key: for a server behind a proxy that does, use "
            "--provider openai with --base-url and IMGBATCH_OPENAI_API_KEY"
        )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
