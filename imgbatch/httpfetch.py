"""http(s) downloads for URL lists: a deadline per attempt, retries of what is transient,
a size cap, redirects to http(s) only, and conditional re-fetches (ETag / Last-Modified).

The only module that imports httpx (imported when a list holds its first URL). A body is
hashed (xxh3-128) as it streams in; it is kept in memory only when asked (`keep`), never
beyond the cap. Failures are `ItemError`s: IO_ERROR for what a retry would not change (a
4xx, over the cap, a refused redirect), NETWORK_ERROR / RATE_LIMIT / TIMEOUT (transient:
the next run tries again) once this run's attempts are spent.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import xxhash

from imgbatch.errors import ErrorCode, ItemError
from imgbatch.ratelimit import retry_after_seconds

if TYPE_CHECKING:
    import httpx

#: schemes a URL of a list, and every redirect it takes, may have
SCHEMES = frozenset({"http", "https"})
MAX_REDIRECTS = 10
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
_CHUNK = 1024 * 1024
#: the statuses followed to their Location (304 is not one: it answers a conditional GET)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: a Retry-After longer than this is not waited for within the run (the next run retries)
_MAX_RETRY_AFTER = 60.0


def is_url(text: str) -> bool:
    """Whether `text` is an http(s) URL (what this module fetches)."""
    return urlsplit(text).scheme.lower() in SCHEMES and "://" in text


@dataclass(frozen=True)
class Validators:
    """What a server said identifies a body's version: sent back on the next fetch."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)


@dataclass
class Fetched:
    """One URL fetched: its body's hash and size (or, `unchanged`, a 304: the caller's
    stored ones hold), its validators, and the body itself when it was asked for."""

    url: str
    unchanged: bool
    hash: str | None
    size: int | None
    mtime_ns: int | None
    validators: Validators
    body: bytes | None = None
    requests: int = 0


class Stopped(Exception):
    """The run stopped while a fetch waited to retry."""


class Fetcher:
    """Downloads URLs; one per run, shared by its threads (httpx's pool is thread-safe).

    Args:
        timeout: seconds per attempt, from the request to the body's last byte.
        max_size: bytes a body may have at most.
        attempts: attempts per URL for transient failures (429, 5xx, timeouts, network).
        retry_delay: first backoff, doubled each retry (full jitter).
        stop: set when the run stops: a wait for a retry ends at once.
    """

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        max_size: int = DEFAULT_MAX_SIZE,
        attempts: int = 4,
        retry_delay: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        import httpx  # here: a list of local paths never pays for it

        from imgbatch import __version__

        self.timeout = timeout
        self.max_size = max_size
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.stop = stop or threading.Event()
        # redirects are followed by hand (each target's scheme checked); no proxy or netrc
        # from the environment is needed to be correct, but both are honoured as usual
        self._client = httpx.Client(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": f"imgbatch/{__version__}"},
        )
        self._httpx = httpx

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, url: str, known: Validators | None = None, keep: bool = False) -> Fetched:
        """Fetch `url` (conditionally when `known` has validators), with retries.

        Raises:
            ItemError: see the module docstring.
            Stopped: the run stopped while waiting to retry.
        """
        failures = 0
        requests = 0
        while True:
            try:
                got = self._attempt(url, known, keep)
                got.requests += requests
                return got
            except _Retry as retry:
                requests += retry.requests
                failures += 1
                if failures >= self.attempts:
                    raise retry.error from None
                ceiling = min(60.0, self.retry_delay * 2 ** (failures - 1))
                delay = max(random.uniform(0, ceiling), retry.after or 0.0)
                if self.stop.wait(delay):
                    raise Stopped from None

    def _attempt(self, url: str, known: Validators | None, keep: bool) -> Fetched:
        """One attempt: the request, its redirects, the body, within one deadline."""
        httpx = self._httpx
        deadline = time.monotonic() + self.timeout
        headers = {}
        if known is not None and known.etag:
            headers["If-None-Match"] = known.etag
        if known is not None and known.last_modified:
            headers["If-Modified-Since"] = known.last_modified
        current, requests = url, 0
        try:
            for _ in range(MAX_REDIRECTS + 1):
                requests += 1
                with self._client.stream("GET", current, headers=headers) as resp:
                    if resp.status_code in _REDIRECTS:
                        current = _redirect(current, resp.headers.get("location"))
                        continue
                    got = self._response(url, resp, deadline, keep)
                    got.requests = requests
                    return got
        except (httpx.TimeoutException, _Deadline):  # no answer, or a body that trickles
            raise _Retry(ItemError(ErrorCode.TIMEOUT, _timeout(self.timeout)), requests) from None
        except (httpx.InvalidURL, UnicodeError) as exc:  # e.g. a name not encodable
            raise ItemError(ErrorCode.IO_ERROR, f"not a valid URL ({exc})") from None
        except httpx.TransportError as exc:  # refused, reset, DNS, a body cut short
            what = type(exc).__name__
            message = (
                f"download failed ({what}: {exc})" if str(exc) else f"download failed ({what})"
            )
            raise _Retry(ItemError(ErrorCode.NETWORK_ERROR, message), requests) from None
        raise ItemError(ErrorCode.IO_ERROR, f"more than {MAX_REDIRECTS} redirects")

    def _response(self, url: str, resp: httpx.Response, deadline: float, keep: bool) -> Fetched:
        """The answer of an attempt's last request (not a redirect)."""
        status = resp.status_code
        validators = Validators(resp.headers.get("etag"), resp.headers.get("last-modified"))
        if status == 304:
            return Fetched(url, True, None, None, None, validators)
        if status == 429 or status >= 500:
            code = ErrorCode.RATE_LIMIT if status == 429 else ErrorCode.NETWORK_ERROR
            error = ItemError(code, f"HTTP {status} {resp.reason_phrase}".rstrip())
            raise _Retry(error, 0, _retry_after(resp.headers.get("retry-after")))
        if status != 200:  # 4xx, or a success that is not the whole body (206, 204)
            raise ItemError(ErrorCode.IO_ERROR, f"HTTP {status} {resp.reason_phrase}".rstrip())
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_size:
            raise ItemError(ErrorCode.IO_ERROR, _too_big(self.max_size, f"{int(length):,} bytes"))
        digest = xxhash.xxh3_128()
        parts: list[bytes] = []
        size = 0
        for chunk in resp.iter_bytes(_CHUNK):
            size += len(chunk)
            if size > self.max_size:  # no (or a false) Content-Length: stop at the cap
                raise ItemError(ErrorCode.IO_ERROR, _too_big(self.max_size, "more"))
            digest.update(chunk)
            if keep:
                parts.append(chunk)
            if time.monotonic() > deadline:  # a body that trickles in never times out
                raise _Deadline
        mtime_ns = _http_date_ns(validators.last_modified)
        body = b"".join(parts) if keep else None
        return Fetched(url, False, digest.hexdigest(), size, mtime_ns, validators, body)


class _Retry(Exception):
    """A transient failure of one attempt: `error` if it was the last one."""

    def __init__(self, error: ItemError, requests: int, after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.requests = requests
        self.after = after


class _Deadline(Exception):
    """The attempt's deadline passed while its body was streaming in."""


def _redirect(current: str, location: str | None) -> str:
    """The URL a redirect from `current` leads to; an IO_ERROR for any but http(s)."""
    if not location:
        raise ItemError(ErrorCode.IO_ERROR, "redirect without a Location")
    target = urljoin(current, location)
    scheme = urlsplit(target).scheme.lower()
    if scheme not in SCHEMES:
        shown = f"{scheme}://" if scheme else repr(location[:100])
        raise ItemError(ErrorCode.IO_ERROR, f"redirect to {shown} refused (http and https only)")
    return target


def _retry_after(value: str | None) -> float | None:
    """A Retry-After in seconds (a number, or an HTTP date), capped; None if absent."""
    seconds = retry_after_seconds(value)
    return None if seconds is None else min(seconds, _MAX_RETRY_AFTER)


def _http_date_ns(value: str | None) -> int | None:
    """An HTTP date (Last-Modified) as nanoseconds since the epoch; None if unreadable."""
    if not value:
        return None
    try:
        parsed: Any = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return int(parsed.timestamp()) * 1_000_000_000


def _too_big(cap: int, got: str) -> str:
    return f"over --max-download-size ({cap:,} bytes): {got}"


def _timeout(seconds: float) -> str:
    return f"no whole answer within --download-timeout ({seconds:g}s)"
