"""`gemini`: Google Gemini through google-genai, the only module that imports the SDK.

Every failure is classified here, and nowhere else:
- per item (`ItemError`): TIMEOUT, NETWORK_ERROR (transport exceptions: the SDK's
  retries are off and it wraps none of them), RATE_LIMIT (429, with the server's retry
  delay), AI_ERROR (5xx; an answer that is empty, not strict JSON, or not of the schema
  asked for, checked here as the OpenAI-compatible provider checks it), BLOCKED
  (a blocked prompt or answer; never retried), AI_ERROR not retried (another 400);
- per request (`Failover`): a rejected key, or a key whose project's daily quota is
  used up, leaves the pool; a key answered 429 cools down; while another key is ready,
  the pipeline sends the request again at once (with a new rate-limiter slot);
- per run: no key left; QuotaExhaustedError if any key left for the daily quota (a
  429 whose QuotaFailure names a PerDay quota: the next run resumes), AuthError if every
  key was rejected; an unknown model is a configuration error.
API keys never appear in messages: any text taken from an answer is scrubbed of them
(and of what in a `--base-url` may be a credential: its path, query, password).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from imgbatch.config import Settings, gemini_keys
from imgbatch.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    ImgbatchError,
    ItemError,
    QuotaExhaustedError,
)
from imgbatch.imaging import PreparedImage, encode_for_upload, upload_and_size
from imgbatch.providers.base import Analysis, Failover, url_secrets
from imgbatch.providers.pool import DAILY_QUOTA, REJECTED, KeyPool, OnEmpty
from imgbatch.providers.prompt import (
    DEFAULT_SCHEMA,
    load_prompt,
    load_schema,
    loads_strict,
    validate,
)

try:  # the SDK also uses plain httpx when it is installed
    import httpx

    _TIMEOUTS: tuple[type[BaseException], ...] = (httpx2.TimeoutException, httpx.TimeoutException)
    _TRANSPORT: tuple[type[BaseException], ...] = (httpx2.TransportError, httpx.TransportError)
except ImportError:  # pragma: no cover - depends on the environment
    _TIMEOUTS = (httpx2.TimeoutException,)
    _TRANSPORT = (httpx2.TransportError,)

T = TypeVar("T")

log = logging.getLogger("imgbatch")

BLOCK_REASONS = {
    "SAFETY",
    "RECITATION",
    "PROHIBITED_CONTENT",
    "IMAGE_SAFETY",
    "BLOCKLIST",
    "SPII",
    "OTHER",
    "LANGUAGE",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "IMAGE_OTHER",
    "NO_IMAGE",
    "JAILBREAK",
}
_MEDIA = {
    "low": "MEDIA_RESOLUTION_LOW",
    "medium": "MEDIA_RESOLUTION_MEDIUM",
    "high": "MEDIA_RESOLUTION_HIGH",
}
EMBEDDING_DIMS = 768  # asked of the embedding model (gemini-embedding-001 gives 3,072 unasked)


def image_tokens(width: int, height: int, media_resolution: str | None = None) -> int:
    """Gemini 2.x input tokens for an image of this size (the size that is uploaded).

    Both sides <= 384 px: 258 tokens; larger images are tiled at 768x768, 258 tokens per
    tile; media_resolution "low" is a flat 64. Other resolutions ("medium", "high",
    "unspecified") are estimated with the tiling rule.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if media_resolution is not None:
        level = media_resolution.lower().removeprefix("media_resolution_")
        if level not in ("low", "medium", "high", "unspecified"):
            raise ValueError(f"unknown media_resolution {media_resolution!r}")
        if level == "low":
            return 64
    if width <= 384 and height <= 384:
        return 258
    return math.ceil(width / 768) * math.ceil(height / 768) * 258


def _parse_duration(text: Any) -> float | None:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", str(text or ""))
    return float(match.group(1)) if match else None


def _exhausted(total: int) -> OnEmpty:
    """The error that stops the run once no key is left: QuotaExhaustedError when any
    key left for its daily quota (the next run can resume from it, so it wins over
    rejected keys, which the message names), AuthError when every key was rejected."""

    def error(left: list[tuple[str, str]]) -> ImgbatchError:
        rejected = [status for why, status in left if why == REJECTED]
        check = "check GEMINI_API_KEY / IMGBATCH_GEMINI_API_KEYS"
        if len(rejected) < len(left):
            also = ""
            if rejected:  # named: they need mending before the next run
                also = f"; {len(rejected)} of the {total} keys rejected ({rejected[0]}): {check}"
            return QuotaExhaustedError(
                "the Gemini daily quota is exhausted; the next run resumes "
                f"(daily quotas reset at midnight Pacific time){also}"
            )
        which = "the key" if total == 1 else f"all {total} keys"
        status = f" ({rejected[0]})" if rejected else ""
        return AuthError(f"the Gemini API rejected {which}{status}; {check}")

    return error


class GeminiProvider:
    """Structured image descriptions from a Gemini model."""

    name = "gemini"
    remote = True

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        import os

        env = os.environ if env is None else env
        explicit = settings.provider == "gemini"
        keys = gemini_keys(settings, env, explicit)
        if not keys:
            raise ConfigError(
                "no Gemini API key: set GEMINI_API_KEY or IMGBATCH_GEMINI_API_KEYS, or "
                "[gemini] api_keys in the config file"
            )
        self.settings = settings
        # settings hold IMGBATCH_GEMINI_BASE_URL already, under --base-url; `env` serves callers
        # that build Settings themselves
        self.base_url = settings.gemini_base_url or env.get("IMGBATCH_GEMINI_BASE_URL", "")
        secrets = [*keys, *(url_secrets(self.base_url) if self.base_url else [])]
        self.pool = KeyPool(
            keys,
            _exhausted(len(keys)),
            lambda i: f"Gemini API key {i + 1} of {len(keys)}",
            secrets=sorted(set(secrets), key=len, reverse=True),
        )
        self._model = settings.gemini_model
        self.prompt = load_prompt(settings.gemini_prompt, settings.gemini_prompt_file)
        self.json_schema = load_schema(settings.gemini_schema)
        self._clients: dict[int, genai.Client] = {}
        self._lock = threading.Lock()
        for index in range(len(keys)):  # built now: ~75 ms each, not inside a rate slot
            self._client(index)

    # -- settings ------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self._model

    def fingerprint(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model": self._model,
            "prompt": self.prompt,
            "schema": self.json_schema or DEFAULT_SCHEMA,
            "max_side": s.max_side,
            "media_resolution": s.gemini_media_resolution,
            "temperature": s.gemini_temperature,
            "max_output_tokens": s.gemini_max_output_tokens,
            "upload": [s.upload_format, s.upload_quality],
        }

    def estimate_tokens(self, width: int, height: int) -> int:
        """Input tokens of an image uploaded at this size: `image_tokens`, at the run's
        media resolution."""
        return image_tokens(width, height, self.settings.gemini_media_resolution or None)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's input tokens, estimated (4 characters a token)."""
        return len(self.prompt) // 4

    # -- requests ------------------------------------------------------------------

    def _client(self, index: int) -> genai.Client:
        with self._lock:
            client = self._clients.get(index)
            if client is None:
                options = types.HttpOptions(
                    timeout=int(self.settings.gemini_timeout * 1000),  # milliseconds
                    base_url=self.base_url or None,
                )
                client = genai.Client(api_key=self.pool.key(index), http_options=options)
                self._clients[index] = client
            return client

    def _config(self) -> types.GenerateContentConfig:
        s = self.settings
        extra: dict[str, Any] = {}
        if self.json_schema is not None:
            extra["response_json_schema"] = self.json_schema
        else:
            extra["response_schema"] = DEFAULT_SCHEMA
        if s.gemini_media_resolution:
            extra["media_resolution"] = _MEDIA[s.gemini_media_resolution]
        return types.GenerateContentConfig(
            response_mime_type="application/json",
            temperature=s.gemini_temperature,
            max_output_tokens=s.gemini_max_output_tokens,
            **extra,
        )

    def encode(self, image: PreparedImage) -> tuple[bytes, str]:
        """The upload: re-encoded without EXIF or GPS."""
        fmt = "WEBP" if self.settings.upload_format == "webp" else "JPEG"
        return encode_for_upload(image, fmt, self.settings.upload_quality)

    def upload_encoder(
        self,
    ) -> Callable[[PreparedImage], tuple[tuple[bytes, str], tuple[int, int]]]:
        """What a Dask worker runs to make the upload and measure it: key-free and
        picklable (a partial of imaging's function), so only the ~70 KB upload and its
        size travel back to the driver, which estimates its tokens and sends it through
        its limiter and key pool."""
        s = self.settings
        return functools.partial(
            upload_and_size,
            fmt="WEBP" if s.upload_format == "webp" else "JPEG",
            quality=s.upload_quality,
        )

    def analyze(self, encoded: tuple[bytes, str]) -> Analysis:
        """One request, with the next key of the pool. A key's own trouble raises
        Failover (see `_classify`): the pipeline sends the request again, with a slot."""
        data, mime = encoded
        contents: list[Any] = [types.Part.from_bytes(data=data, mime_type=mime), self.prompt]
        resp = self._request(
            lambda client: client.models.generate_content(
                model=self._model, contents=contents, config=self._config()
            )
        )
        return self._parse(resp, len(data))

    def _request(self, send: Callable[[genai.Client], T]) -> T:
        """`send(client)` with the next key of the pool; its failures classified (an
        API error by its status and body, a timeout, a network error)."""
        index = self.pool.pick()
        try:
            return send(self._client(index))
        except genai_errors.APIError as exc:
            raise self._classify(exc, index) from None
        except _TIMEOUTS:
            raise ItemError(
                ErrorCode.TIMEOUT, f"no answer within {self.settings.gemini_timeout:g}s"
            ) from None
        except _TRANSPORT as exc:
            raise ItemError(
                ErrorCode.NETWORK_ERROR, f"network error: {type(exc).__name__}"
            ) from None

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors of `texts` (in their order; at most 100) from one `batchEmbedContents`
        request with the run's model and the next key of the pool, 768 dimensions asked
        for; failures classified as for `analyze`."""
        # one Content per text: a list of bare strings is merged into one Content for
        # the multimodal embedding models
        contents = [types.Content(parts=[types.Part(text=text)]) for text in texts]
        config = types.EmbedContentConfig(output_dimensionality=EMBEDDING_DIMS)
        resp = self._request(
            lambda client: client.models.embed_content(
                model=self._model, contents=contents, config=config
            )
        )
        vectors = [e.values for e in resp.embeddings or []]
        if len(vectors) != len(texts) or not all(vectors):
            raise ItemError(ErrorCode.AI_ERROR, "the server's embeddings do not match the texts")
        return [list(v or ()) for v in vectors]

    def _key_rejected(self, exc: genai_errors.APIError) -> bool:
        if exc.code in (401, 403):
            return True
        if exc.code == 400:
            text = json.dumps(exc.details) if exc.details else ""
            return "API_KEY_INVALID" in text or "API key not valid" in (exc.message or "")
        return False

    def _classify(self, exc: genai_errors.APIError, index: int) -> Exception:
        """The error to raise for an error answer to a request made with key `index`."""
        status = f"{exc.code} {exc.status or ''}".strip()
        message = self.pool.scrub(f"{status}: {exc.message or ''}".strip())
        if self._key_rejected(exc):
            if self.pool.leave(index, REJECTED, status):
                return Failover(ErrorCode.AUTH_ERROR, f"key rejected ({status})")
            return self.pool.exhausted()
        if exc.code == 429:
            retry_after, quota_ids = None, []
            body = exc.details.get("error", {}) if isinstance(exc.details, dict) else {}
            for detail in body.get("details", []) if isinstance(body, dict) else []:
                if not isinstance(detail, dict):
                    continue
                kind = str(detail.get("@type", ""))
                if kind.endswith("google.rpc.RetryInfo"):
                    retry_after = _parse_duration(detail.get("retryDelay"))
                elif kind.endswith("google.rpc.QuotaFailure"):
                    quota_ids += [
                        str(v.get("quotaId", ""))
                        for v in detail.get("violations", [])
                        if isinstance(v, dict)
                    ]
            if any("PerDay" in q for q in quota_ids):
                if self.pool.leave(index, DAILY_QUOTA, status):
                    return Failover(ErrorCode.RATE_LIMIT, message)  # another project's key
                return self.pool.exhausted()
            self.pool.cool(index, retry_after if retry_after is not None else 1.0)
            wait = self.pool.ready_in()
            if wait is None:  # every key left meanwhile (other threads)
                return self.pool.exhausted()
            if wait == 0.0:
                return Failover(ErrorCode.RATE_LIMIT, message)  # another key (project) is ready
            if retry_after is not None:
                retry_after = min(retry_after, wait)
            return ItemError(ErrorCode.RATE_LIMIT, message, retry_after=retry_after)
        if exc.code == 404:
            return ConfigError(f"Gemini model {self._model!r} not found: {message}")
        if exc.code is not None and exc.code >= 500:
            return ItemError(ErrorCode.AI_ERROR, message)
        return ItemError(ErrorCode.AI_ERROR, message, retryable=False)

    def _parse(self, resp: types.GenerateContentResponse, upload_bytes: int) -> Analysis:
        feedback = resp.prompt_feedback
        if feedback is not None and feedback.block_reason:
            raise ItemError(ErrorCode.BLOCKED, f"prompt blocked: {_enum(feedback.block_reason)}")
        candidate = resp.candidates[0] if resp.candidates else None
        reason = _enum(candidate.finish_reason) if candidate and candidate.finish_reason else ""
        if reason in BLOCK_REASONS:
            raise ItemError(ErrorCode.BLOCKED, f"answer blocked: {reason}")
        text = resp.text
        if not text:
            raise ItemError(ErrorCode.AI_ERROR, f"empty answer (finish reason {reason or '?'})")
        try:  # strictly: NaN or Infinity would make a line no strict parser reads
            result = loads_strict(text)
        except ValueError:
            raise ItemError(
                ErrorCode.AI_ERROR,
                "the answer is not valid JSON"
                + (" (cut at max_output_tokens)" if reason == "MAX_TOKENS" else ""),
            ) from None
        if not isinstance(result, dict):
            raise ItemError(ErrorCode.AI_ERROR, "the answer is not a JSON object")
        # the server is asked for the schema; its answer is checked all the same
        error = validate(result, self.json_schema or DEFAULT_SCHEMA)
        if error:
            raise ItemError(ErrorCode.AI_ERROR, f"the answer does not match the schema: {error}")
        usage = resp.usage_metadata
        return Analysis(
            result,
            input_tokens=usage.prompt_token_count if usage else None,
            output_tokens=usage.candidates_token_count if usage else None,
            extra={"upload_bytes": upload_bytes},
        )

    # -- for the Batch API mode (providers/gemini_batch.py) ----------------------------

    def client(self, index: int) -> genai.Client:
        """The SDK client of key `index` (built once)."""
        return self._client(index)

    def classify(self, exc: genai_errors.APIError, index: int) -> Exception:
        """What an error answer to a request made with key `index` means, as for a live
        request (the key pool learns from it too)."""
        return self._classify(exc, index)

    def parse_answer(self, raw: dict[str, Any]) -> Analysis:
        """An answer in its REST JSON form (a Batch API results line's `response`), read as
        a live answer is: ItemError for a blocked, empty or malformed one."""
        try:  # _from_response drops fields this SDK does not know, as its own calls do
            resp = types.GenerateContentResponse._from_response(response=raw, kwargs={})
        except ValueError:  # pydantic's ValidationError
            raise ItemError(ErrorCode.AI_ERROR, "an answer the SDK cannot read") from None
        return self._parse(resp, 0)

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                try:
                    client.close()
                except Exception:  # closing is best effort
                    pass
            self._clients.clear()


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value) or "")
