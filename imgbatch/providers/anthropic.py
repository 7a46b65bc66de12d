"""`anthropic`: Claude through Anthropic's Messages API and the official `anthropic` SDK,
the only module that imports it.

The image goes as a base64 `image` block (the same downscaled upload as the other
providers'); the structured output is a forced call of one tool whose `input_schema` is
the schema (built-in or `--schema`), and the tool's input is checked against it here.
The client is built with the key, the base URL and `max_retries=0` always given, and
the headers of ANTHROPIC_CUSTOM_HEADERS left out: no ANTHROPIC_* variable, and no
profile file, changes what is sent.

Every failure is classified here, and nowhere else:
- per item (`ItemError`): TIMEOUT, NETWORK_ERROR, RATE_LIMIT (429, with the delay of
  `retry-after`, else the reset of the `anthropic-ratelimit-*` quota that is spent),
  AI_ERROR retried (529 overloaded, 5xx; no tool call, an answer cut at
  max_output_tokens, a tool input not of the schema, a body that is not strict JSON),
  BLOCKED (`stop_reason` refusal; never retried), AI_ERROR not retried (another 4xx);
- per run: a rejected key (401/403: AuthError, exit 5), a credit balance too low (400 or
  402 `billing_error`: QuotaExhaustedError, exit 4), an unknown model (404: ConfigError),
  no server at the base URL before any answer (FatalError).
The key, and what in the base URL may be a credential, never appear in messages: the
server is named by scheme, host and port only, and any text taken from an answer is
scrubbed of them.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx2

from imgbatch.config import ANTHROPIC_URL, Settings
from imgbatch.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    FatalError,
    ItemError,
    QuotaExhaustedError,
)
from imgbatch.imaging import PreparedImage, encode_for_upload
from imgbatch.providers.base import Analysis, endpoint_identity, origin, url_secrets
from imgbatch.providers.prompt import (
    DEFAULT_JSON_SCHEMA,
    load_prompt,
    load_schema,
    loads_strict,
    validate,
)
from imgbatch.ratelimit import retry_after_seconds

log = logging.getLogger("imgbatch")

#: sent where no key is configured (a server that needs none): the SDK wants one
NO_KEY = "imgbatch-no-key"
TOOL_NAME = "image_analysis"
MAX_MESSAGE = 300  # characters of a server's error message kept in a record
DEFAULT_TEMPERATURE = 0.2  # Settings' default: a warning only for a value asked for
#: whether this SDK's (and so its API version's) Messages API takes a temperature
TAKES_TEMPERATURE = (
    "temperature" in inspect.signature(anthropic.resources.messages.Messages.create).parameters
)
_UNREACHED = (httpx2.ConnectError, httpx2.ConnectTimeout)
_warned = threading.Event()  # the temperature warning: once per process


def official(url: str) -> bool:
    """Whether `url` is Anthropic's own API."""
    return urlsplit(url).hostname == urlsplit(ANTHROPIC_URL).hostname


def key_for(settings: Settings, url: str, env: Mapping[str, str]) -> str:
    """The key sent to `url` (NO_KEY: none), given the environment `env`: imgbatch's own
    (IMGBATCH_ANTHROPIC_API_KEY, [anthropic] api_key) to any server; the generic
    ANTHROPIC_API_KEY only to Anthropic's own API, so a key set for other tools never
    reaches another server."""
    key = settings.anthropic_api_key.strip()
    if key:
        return key
    if official(url):
        key = env.get("ANTHROPIC_API_KEY", "").strip()
        if not key:
            raise ConfigError(
                "no Anthropic API key: set IMGBATCH_ANTHROPIC_API_KEY or ANTHROPIC_API_KEY, "
                "or [anthropic] api_key"
            )
        return key
    return NO_KEY


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a 429 asks for, in seconds: `retry-after` (seconds or an HTTP date), else
    the latest `anthropic-ratelimit-*-reset` (RFC 3339) of a quota with none remaining
    (of requests when nothing says which); None when no header says."""
    now = time.time() if now is None else now
    wait = retry_after_seconds(headers.get("retry-after"), now)
    if wait is not None:
        return wait
    kinds = ("requests", "tokens", "input-tokens", "output-tokens")
    spent = [k for k in kinds if headers.get(f"anthropic-ratelimit-{k}-remaining") == "0"]
    waits = []
    for kind in spent or ["requests"]:
        reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
        try:
            stamp = datetime.fromisoformat((reset or "").replace("Z", "+00:00"))
        except ValueError:
            continue
        if stamp.tzinfo is not None:
            waits.append(max(0.0, stamp.timestamp() - now))
    return max(waits) if waits else None


def _error_fields(body: object) -> tuple[str, str]:
    """(message, type) of an error answer: Anthropic's `{"type": "error", "error":
    {"type", "message"}}`, a proxy's other JSON, or text."""
    if isinstance(body, dict) and isinstance(body.get("error"), (dict, str)):
        body = body["error"]
    if isinstance(body, dict):
        return str(body.get("message") or ""), str(body.get("type") or "")
    if isinstance(body, str):
        return body.strip(), ""
    return "", ""


def _custom_header_names(env: Mapping[str, str]) -> list[str]:
    """The headers ANTHROPIC_CUSTOM_HEADERS names, read as the SDK reads it."""
    text = env.get("ANTHROPIC_CUSTOM_HEADERS")
    if text is None:
        return []
    return [line.split(":", 1)[0].strip() for line in text.split("\n") if ":" in line]


class AnthropicProvider:
    """Structured image descriptions from a Claude model."""

    name = "anthropic"
    remote = True

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.settings = settings
        self._model = settings.anthropic_model
        if not self._model:
            raise ConfigError(
                "anthropic needs a model: --model NAME, IMGBATCH_ANTHROPIC_MODEL or "
                "[anthropic] model in the config file"
            )
        self.prompt = load_prompt(settings.anthropic_prompt, settings.anthropic_prompt_file)
        self.schema: dict[str, Any] = load_schema(settings.anthropic_schema) or DEFAULT_JSON_SCHEMA
        self.timeout: float = settings.anthropic_timeout
        url = settings.anthropic_base_url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # named by its scheme only: the rest of a URL may hold a credential
            raise ConfigError("[anthropic] base_url must be an http:// or https:// URL")
        self.base_url = url
        self.shown = origin(url)
        key = key_for(settings, url, env)
        secrets = {key} if key != NO_KEY else set()
        secrets.update(url_secrets(url))
        self._secrets = sorted(secrets, key=len, reverse=True)
        self.temperature: float | None = settings.anthropic_temperature
        if not TAKES_TEMPERATURE:
            if self.temperature != DEFAULT_TEMPERATURE and not _warned.is_set():
                _warned.set()
                log.warning(
                    "temperature %g ignored: the Messages API of anthropic %s takes none",
                    self.temperature,
                    anthropic.__version__,
                )
            self.temperature = None
        self._answered = False  # the server has answered (anything) in this run
        # explicit: the key, the base URL, no retries of the SDK's own (the pipeline's);
        # the headers ANTHROPIC_CUSTOM_HEADERS adds are omitted, and an explicit key makes
        # the SDK read no ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN or profile file
        headers: dict[str, Any] = dict.fromkeys(_custom_header_names(env), anthropic.omit)
        headers["Authorization"] = f"Bearer {key}"
        self._client = anthropic.Anthropic(
            api_key=key,
            base_url=url,
            timeout=self.timeout,
            max_retries=0,
            default_headers=headers,
        )

    # -- settings ------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self._model

    def fingerprint(self) -> dict[str, Any]:
        s = self.settings
        parts: dict[str, Any] = {
            "model": self._model,
            "prompt": self.prompt,
            "schema": self.schema,
            "max_side": s.max_side,
            "max_output_tokens": s.anthropic_max_output_tokens,
            "upload": [s.upload_format, s.upload_quality],
        }
        if self.temperature is not None:  # only what is sent changes a result
            parts["temperature"] = self.temperature
        # Anthropic's own API keeps a plain fingerprint; another server's model of the
        # same name is not Anthropic's (issue 20 item 4)
        if not official(self.base_url):
            parts["endpoint"] = endpoint_identity([self.base_url])
        return parts

    def estimate_tokens(self, width: int, height: int) -> int:
        """Input tokens of an image uploaded at this size: Anthropic's rule, width x
        height / 750 (rounded), once an image of a long side over 1568 px is shrunk to
        it; about 1600 at most (larger ones are shrunk further by the API)."""
        scale = min(1.0, 1568 / max(width, height))
        return max(1, min(1600, round(width * scale * (height * scale) / 750)))

    @property
    def prompt_tokens(self) -> int:
        """The prompt's input tokens, estimated (4 characters a token), and the tool's
        schema, which is sent with every request."""
        return (len(self.prompt) + len(json.dumps(self.schema))) // 4

    # -- requests ------------------------------------------------------------------

    def encode(self, image: PreparedImage) -> tuple[dict[str, Any], int]:
        """The upload, re-encoded without EXIF or GPS, as a base64 image block, and its
        size in bytes."""
        fmt = "WEBP" if self.settings.upload_format == "webp" else "JPEG"
        data, mime = encode_for_upload(image, fmt, self.settings.upload_quality)
        block = {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": mime,
                "data": base64.b64encode(data).decode("ascii"),
            },
        }
        return block, len(data)

    def request(self, block: dict[str, Any]) -> dict[str, Any]:
        """The Messages API parameters for one image (also a batch request's `params`)."""
        params: dict[str, Any] = {
            "model": self._model,
            "max_tokens": self.settings.anthropic_max_output_tokens,
            "messages": [
                {"role": "user", "content": [block, {"type": "text", "text": self.prompt}]}
            ],
            "tools": [
                {
                    "name": TOOL_NAME,
                    "description": "Record the structured description of the image.",
                    "input_schema": self.schema,
                }
            ],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
        }
        if self.temperature is not None:
            params["temperature"] = self.temperature
        return params

    def analyze(self, encoded: tuple[dict[str, Any], int]) -> Analysis:
        """One request; raises ItemError for this item's failure, an ImgbatchError for
        the run's (see the module doc)."""
        block, size = encoded
        try:
            raw = self._client.messages.with_raw_response.create(**self.request(block))
        except anthropic.APIStatusError as exc:
            raise self._status_error(exc) from None
        except anthropic.APITimeoutError as exc:
            if isinstance(exc.__cause__, _UNREACHED) and not self._answered:
                raise self._unreachable() from None
            raise ItemError(ErrorCode.TIMEOUT, f"no answer within {self.timeout:g}s") from None
        except anthropic.APIConnectionError as exc:
            if isinstance(exc.__cause__, _UNREACHED) and not self._answered:
                raise self._unreachable() from None
            cause = type(exc.__cause__ or exc).__name__
            raise ItemError(ErrorCode.NETWORK_ERROR, f"network error: {cause}") from None
        self._answered = True
        try:  # strictly: a NaN or Infinity anywhere makes an answer of no use
            body = loads_strict(raw.http_response.content)
        except ValueError:
            raise ItemError(ErrorCode.AI_ERROR, "the server's answer is not JSON") from None
        return self.parse(body, size)

    def _unreachable(self) -> FatalError:
        return FatalError(f"cannot reach {self.shown}: check --base-url")

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _status_error(self, exc: anthropic.APIStatusError) -> Exception:
        """The error to raise for an error answer."""
        self._answered = True
        code = exc.status_code
        message, kind = _error_fields(exc.body)
        status = f"{code} {kind}".strip()
        text = self.scrub(f"{status}: {' '.join(message.split())}"[:MAX_MESSAGE])
        if code in (401, 403):
            return AuthError(
                f"{self.shown} rejected the API key ({status}); check "
                "IMGBATCH_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY for Anthropic's own API)"
            )
        if (
            kind == "billing_error"
            or code == 402
            or (code == 400 and "credit balance" in message.lower())
        ):
            return QuotaExhaustedError(
                f"the Anthropic credit balance is too low ({text}): add credits in the "
                "Console's billing settings; the next run resumes"
            )
        if code == 404:
            return ConfigError(f"model {self._model!r} not found at {self.shown} ({text})")
        if code == 429:
            return ItemError(
                ErrorCode.RATE_LIMIT, text, retry_after=retry_after(exc.response.headers)
            )
        if code == 408:
            return ItemError(ErrorCode.TIMEOUT, text)
        if code in (409, 425) or code >= 500:  # 529: overloaded
            return ItemError(ErrorCode.AI_ERROR, text, retryable=True)
        return ItemError(ErrorCode.AI_ERROR, text, retryable=False)

    def parse(self, body: Any, upload_bytes: int) -> Analysis:
        """A Messages API answer (JSON), read: the forced tool call's input, checked
        against the schema; ItemError for an answer of no use."""
        if not isinstance(body, dict):
            raise ItemError(ErrorCode.AI_ERROR, "the answer is not a JSON object", retryable=True)
        reason = str(body.get("stop_reason") or "")
        if reason == "refusal":
            raise ItemError(ErrorCode.BLOCKED, "answer refused (stop_reason refusal)")
        if reason == "max_tokens":
            raise ItemError(
                ErrorCode.AI_ERROR, "the answer was cut at max_output_tokens", retryable=True
            )
        content = body.get("content")
        calls = [
            b
            for b in (content if isinstance(content, list) else [])
            if isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") == TOOL_NAME
        ]
        if not calls:
            raise ItemError(
                ErrorCode.AI_ERROR,
                f"the answer has no {TOOL_NAME} tool call (stop reason {reason or '?'})",
                retryable=True,
            )
        result = calls[0].get("input")
        if not isinstance(result, dict):
            raise ItemError(
                ErrorCode.AI_ERROR, "the tool input is not a JSON object", retryable=True
            )
        error = validate(result, self.schema)
        if error:
            raise ItemError(
                ErrorCode.AI_ERROR,
                self.scrub(f"the answer does not match the schema: {error}")[:MAX_MESSAGE],
                retryable=True,
            )
        usage = body.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        return Analysis(
            result,
            input_tokens=_count(usage.get("input_tokens")),
            output_tokens=_count(usage.get("output_tokens")),
            extra={"upload_bytes": upload_bytes},
        )

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing is best effort
            pass


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
