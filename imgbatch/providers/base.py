"""The provider protocol and registry: adding a provider is a module and one line here.

A provider turns one prepared image into an analysis. It raises `ItemError` for a
failure of that item (the pipeline records it and goes on), `Failover` for a failure of
one request that another request may avoid at once (another API key), and an
`ImgbatchError` for a failure of the run (every key rejected, the day's quota gone).

Also what identifies a result's settings (`fingerprint_id`, `endpoint_identity`) and what
a message may say of an endpoint's URL (`origin`) or must scrub from a server's text
(`url_secrets`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from imgbatch.errors import ErrorCode, ItemError, UsageError

if TYPE_CHECKING:
    from imgbatch.config import Settings
    from imgbatch.imaging import PreparedImage


@dataclass
class Analysis:
    """What a provider returns for one image."""

    result: dict[str, Any]
    input_tokens: int | None = None
    output_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Failover(ItemError):
    """This request failed for a reason of its own, not the item's (its API key was
    rejected, or its key's quota is used up while another key is ready): the pipeline
    sends it again at once, through the rate limiter like any request. It counts in the record's
    `attempts` but uses none of `max_attempts`; as a 429 (`code` RATE_LIMIT) it uses the
    item's `max_wait`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message, retry_after=0.0, retryable=True)


class Provider(Protocol):
    """What the pipeline needs from a provider."""

    name: str
    #: remote providers cost money and are rate-limited; local ones run unthrottled
    remote: bool

    @property
    def model(self) -> str:
        """The model, or the analyzer's version, written in every record."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """Every setting that changes a result (model, prompt, schema, max side, ...)."""
        ...

    def estimate_tokens(self, width: int, height: int) -> int:
        """Input tokens of an image uploaded at this size, by this provider's own rule (0
        for a local provider): a dry run's estimate; a request costs `prompt_tokens` more."""
        ...

    @property
    def prompt_tokens(self) -> int:
        """Input tokens of what every request sends beside the image (the prompt)."""
        ...

    def encode(self, image: PreparedImage) -> Any:
        """What `analyze` takes: done once per item, before a rate-limiter slot."""
        ...

    def analyze(self, encoded: Any) -> Analysis:
        """Analyse one encoded image with one request (the pipeline takes a rate-limiter
        slot before each call, and retries); raise ItemError for this item's failure,
        Failover to have the request sent again at once."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


ProviderFactory = Callable[["Settings"], Provider]

#: name -> "module:attribute" of the factory; imported only when chosen
_BUILTIN: dict[str, str] = {
    "local": "imgbatch.providers.local:LocalProvider",
    "gemini": "imgbatch.providers.gemini:GeminiProvider",
    # never chosen by `auto`: always asked for by name (no key check below)
    "openai": "imgbatch.providers.openai:OpenAIProvider",
    "ollama": "imgbatch.providers.openai:OllamaProvider",
    "anthropic": "imgbatch.providers.anthropic:AnthropicProvider",
}
_registered: dict[str, ProviderFactory] = {}
#: remote providers and the function telling whether a key is configured for them
_KEY_CHECKS: dict[str, Callable[[Settings, Mapping[str, str]], bool]] = {}


def register(
    name: str,
    factory: ProviderFactory,
    has_key: Callable[[Settings, Mapping[str, str]], bool] | None = None,
) -> None:
    """Make `factory` available as `--provider NAME` (tests register fakes this way)."""
    _registered[name] = factory
    if has_key is not None:
        _KEY_CHECKS[name] = has_key


def names() -> list[str]:
    return sorted({*_BUILTIN, *_registered})


def _gemini_has_key(settings: Settings, env: Mapping[str, str]) -> bool:
    from imgbatch.config import gemini_keys

    return bool(gemini_keys(settings, env, explicit=False))


_KEY_CHECKS["gemini"] = _gemini_has_key


def choose(requested: str, settings: Settings, env: Mapping[str, str]) -> str:
    """The provider to use: `auto` picks a remote one only when a key is configured for
    imgbatch itself (the generic GOOGLE_API_KEY needs an explicit `--provider gemini`),
    and never `openai`, `ollama` or `anthropic`, which are always asked for by name."""
    if requested != "auto":
        if requested not in _BUILTIN and requested not in _registered:
            raise UsageError(
                f"unknown provider {requested!r}; choose from auto, " + ", ".join(names())
            )
        return requested
    for name, has_key in _KEY_CHECKS.items():
        if has_key(settings, env):
            return name
    return "local"


def create(name: str, settings: Settings) -> Provider:
    """Instantiate provider `name` (importing its module only now)."""
    factory = _registered.get(name)
    if factory is None:
        target = _BUILTIN.get(name)
        if target is None:
            raise UsageError(f"unknown provider {name!r}; choose from " + ", ".join(names()))
        module, attr = target.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(settings)


def fingerprint_id(parts: Mapping[str, Any]) -> str:
    """A short stable id of the settings that change a result."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# -- endpoints: what may be said of a URL, and what identifies it --------------------------

#: the shortest path segment or query value scrubbed from a server's text: shorter ones
#: ("v1", "api") are words, not credentials, and scrubbing them would garble messages
SECRET_MIN = 6


def origin(url: str) -> str:
    """A URL as a message may name it: scheme, host and port only. The user, path and
    query are left out: any of them may carry a credential (`?key=...`, `/token/.../v1`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: say nothing of it
        port = None
    return f"{parts.scheme}://{host}" + ("" if port is None else f":{port}")


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that may carry a credential, to scrub from any text a server
    sends back (a 404 that echoes the path it was asked for): the password, the path,
    its segments and the query's values of SECRET_MIN characters or more, the query."""
    parts = urlsplit(url)
    found = [parts.password or "", parts.query, parts.path.strip("/")]
    found += parts.path.split("/")
    found += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    found += [unquote(text) for text in found]
    return sorted({s for s in found if len(s) >= SECRET_MIN}, key=len, reverse=True)


def endpoint_identity(urls: Iterable[str]) -> str:
    """One hash for the endpoints a run sends its requests to, whatever their order (a
    pool shares one identity): the scheme, host, port (the scheme's default when none is
    given) and path of each URL; never its user or query. It goes into a result's
    fingerprint, so that a result of one server is never served for another's model of
    the same name; only the hash is kept, never the URLs."""
    ids = set()
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            port = {"http": 80, "https": 443}.get(parts.scheme)
        path = parts.path.rstrip("/")
        ids.add(f"{parts.scheme}://{parts.hostname or ''}:{port}{path}")
    canonical = json.dumps(sorted(ids), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
