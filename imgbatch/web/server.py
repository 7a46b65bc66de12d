"""`imgbatch serve`: the runs API, its event stream (Server-Sent Events) and the dashboard.

Starlette and uvicorn, sse-starlette for the stream: the `imgbatch[serve]` extra. The
runs themselves live in runs.py; this module is HTTP only: routes, request validation,
and the rules every request passes first (`Guard`):

- the `Host` header must name the address and port the server is bound to (DNS
  rebinding: a foreign page whose name resolves to 127.0.0.1 gets nothing), unless it is
  bound to every address (0.0.0.0, ::), which needs an explicit token;
- every `/api/` request (the report too) carries the token as a bearer token, compared
  in constant time, on loopback too (any local user or container could otherwise spend
  the owner's API keys); without one given, a random one is made at each start. The
  page and its assets (`GET /`, `/static/...`) hold no data and need none; a token in a
  query string is never read;
- a request must come from this origin: `Sec-Fetch-Site`, when sent, is `same-origin`
  or `none` (typed, bookmarked), and `Origin`, when sent, names this server (`null` does
  not); so a foreign page can neither start a run nor make the server work for it;
- a POST carries `application/json`, which no cross-site form can send.

Malformed input is a 4xx with a JSON error, never a traceback: run ids, numbers and
headers are read as ASCII digits of bounded length, bodies with a bounded depth.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import anyio
import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from imgbatch.errors import ImgbatchError, LockHeldError, UsageError
from imgbatch.records import utf8_clean
from imgbatch.web import static
from imgbatch.web.report import MAX_THUMBNAILS, SCRIPT_HASH, Report
from imgbatch.web.runs import (
    OPTIONS,
    BadCursor,
    Overlapping,
    Runs,
    ServedRun,
    StartError,
    TooManyRuns,
    decode_cursor,
    encode_cursor,
)

log = logging.getLogger("imgbatch")

MAX_BODY = 64 * 1024  # bytes of a request body at most
PAGE_LIMIT, MAX_PAGE = 100, 1000  # items per page of /items: default, at most
#: the most a client may ask of a run: more workers or bigger images than this are a
#: typo or an attack on the owner's keys and memory, not a setting
MAXIMA = {"workers": 32, "max_side": 4096, "limit": 10**9}
MAX_REPORT_THUMBNAILS = 10_000  # ?max_thumbnails of the report at most
MAX_DIGITS = 12  # digits of a number in a path, query or header at most
TOKEN_BYTES = 32  # a generated token: 256 random bits
POLL = 0.1  # seconds between looks at a run's new events, per open stream
PING = 15  # seconds between heartbeat comments on an open stream
#: the dashboard's policy; it also allows the report's script (by hash), its inline
#: styles and data: images, since a report opened from the page as a blob: URL
#: inherits this policy
PAGE_CSP = (
    f"default-src 'none'; script-src 'self' {SCRIPT_HASH}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class Problem(Exception):
    """A request refused: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        body = _dumps(content)
    except (ValueError, TypeError, RecursionError):  # a stored result JSON cannot hold
        body = _dumps(_jsonable(content))
    # "replace": a lone surrogate (a name that is not UTF-8) never makes the answer fail
    return Response(
        body.encode("utf-8", "replace"),
        status,
        {"Cache-Control": "no-store", **(headers or {})},
        "application/json",
    )


def _dumps(content: Any) -> str:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_DEEPEST = 500  # levels kept by _jsonable (json.dumps itself stops near 1,000)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """`value` with what strict JSON cannot hold replaced: NaN and the infinities (which
    a model's answer may carry: Python's json reads them) become null, bytes and other
    objects their text, anything nested deeper than _DEEPEST levels null."""
    if depth > _DEEPEST:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else str(k): _jsonable(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _problem(status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _json({"error": message}, status, headers)


# -- the rules every request passes ------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The `Host` headers this server answers (lower case), or None for any (bound to
    every address: a token guards it)."""
    if _is_wildcard(host):
        return None
    names = {host, "localhost"} if is_loopback(host) else {host}
    out = set()
    for name in names:
        literal = f"[{name}]" if ":" in name else name
        out.add(f"{literal}:{port}".lower())
        if port == 80:
            out.add(literal.lower())
    return frozenset(out)


class Guard:
    """The rules above, before any route (a pure ASGI middleware, so streams pass
    through untouched)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, token: str) -> None:
        if not token:
            raise ValueError("the server needs a token")
        self.app = app
        self.hosts = hosts
        self.token = token.encode("utf-8", "surrogateescape")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            return _problem(400, f"this server does not answer for Host {host[:100]!r}")
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            return _problem(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}":  # "null" is foreign
            return _problem(403, f"cross-origin request refused (Origin: {origin[:100]})")
        if scope["path"].startswith("/api/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # latin-1: the header's own bytes, so any value compares (and fails) in
            # constant time instead of raising
            valid = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("latin-1"), self.token
            )
            if not valid:
                return _problem(401, "a bearer token is required (Authorization: Bearer ...)")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _problem(415, "the body of a POST must be application/json")
        return None


def allowed_root(root: str, allowed: list[str]) -> str | None:
    """ROOT resolved (symlinks, `..`) if it is one of the allowed folders or inside one,
    else None. `allowed` holds resolved paths; a sibling such as `DIR-evil` is not
    inside `DIR`."""
    real = os.path.realpath(root)
    for folder in allowed:
        if os.path.commonpath([real, folder]) == folder:
            return real
    return None


# -- the API -----------------------------------------------------------------------


def _run_options(body: Any) -> tuple[str, dict[str, Any]]:
    """ROOT and the options of a POST /api/runs body; a Problem (422) for anything else
    than the known fields of the right types."""
    if not isinstance(body, dict):
        raise Problem(422, "the body must be a JSON object")
    unknown = sorted(set(body) - {"root", *OPTIONS})
    if unknown:
        raise Problem(
            422,
            f"unknown field {unknown[0]!r}; the fields are root, " + ", ".join(OPTIONS),
        )
    root = body.get("root")
    if not isinstance(root, str) or not root:
        raise Problem(422, "root is required: the folder to analyse, as a string")
    if "\0" in root or not utf8_clean(root) == root:
        raise Problem(422, "root must be a path without NUL characters or lone surrogates")
    if not os.path.isabs(root):
        raise Problem(422, f"root must be an absolute path, not {root[:200]!r}")
    options: dict[str, Any] = {}
    for name, kind in OPTIONS.items():
        if name not in body or body[name] is None:
            continue
        value: Any = body[name]
        # bool is an int in Python, not in JSON: true is no worker count
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            given = json.dumps(value)  # JSON's own values: it cannot fail
            raise Problem(422, f"{name} must be {_KIND_NAMES[kind]}, not {given[:100]}")
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise Problem(422, f"{name} must be at least 1, not {_short(value)}")
            if name in MAXIMA and value > MAXIMA[name]:
                raise Problem(422, f"{name} must be at most {MAXIMA[name]:,}, not {_short(value)}")
        if isinstance(value, str) and ("\0" in value or utf8_clean(value) != value):
            raise Problem(422, f"{name} must be text without NUL characters or lone surrogates")
        options[name] = value
    return root, options


_KIND_NAMES = {str: "a string", int: "a whole number", bool: "true or false"}


def _short(value: int) -> str:
    """A number for a message: a huge one by its size only (an int of thousands of
    digits cannot even be turned into text)."""
    return str(value) if value.bit_length() < 64 else f"a number of {value.bit_length():,} bits"


async def _body(request: Request) -> Any:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Problem(413, f"the body is over {MAX_BODY:,} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:  # also a number of 4,300+ digits
        raise Problem(422, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Problem(422, "the body is not valid JSON: nested too deep") from None


class Api:
    """The routes, over the server's runs."""

    def __init__(self, runs: Runs, allowed: list[str]) -> None:
        self.runs = runs
        self.allowed = allowed

    def _run(self, request: Request) -> ServedRun:
        raw = request.path_params["run_id"]
        run_id = _number(raw)
        run = self.runs.get(run_id) if run_id is not None else None
        if run is None:
            raise Problem(404, f"no run {raw[:40]!r} on this server")
        return run

    async def list_runs(self, request: Request) -> Response:
        runs = await run_in_threadpool(lambda: [r.status() for r in self.runs.all()])
        return _json({"runs": runs})

    async def start(self, request: Request) -> Response:
        root, options = _run_options(await _body(request))
        real = allowed_root(root, self.allowed)
        if real is None:
            raise Problem(403, f"{root} is not under a folder this server allows (--allow-root)")
        if not os.path.isdir(real):
            raise Problem(422, f"{root} is not a folder")
        try:
            run = await run_in_threadpool(self.runs.start, real, options)
        except TooManyRuns as exc:
            raise Problem(429, str(exc)) from None
        except Overlapping as exc:
            raise Problem(409, str(exc)) from None
        except (StartError, ImgbatchError) as exc:
            error = exc.error if isinstance(exc, StartError) else exc
            status = 500
            if isinstance(error, LockHeldError):
                status = 409
            elif isinstance(error, UsageError):  # a bad setting, an unknown provider
                status = 422
            raise Problem(status, str(error)) from None
        body = await run_in_threadpool(run.status)
        return _json(body, 202, {"Location": f"/api/runs/{run.id}"})

    async def get(self, request: Request) -> Response:
        run = self._run(request)
        return _json(await run_in_threadpool(run.status))

    async def search(self, request: Request) -> Response:
        """GET /api/search: `imgbatch search`'s records, in its order (issue 22.1);
        `mode=semantic|hybrid` as `--semantic` / `--hybrid`."""
        from imgbatch import api

        q = request.query_params
        root = q.get("root") or ""
        if not root or len(root) > 4096:
            raise Problem(422, "root is required: the folder that was analysed")
        real = allowed_root(root, self.allowed)
        if real is None:
            raise Problem(403, f"{root} is not under a folder this server allows (--allow-root)")
        words = q.get("q") or ""
        limit = _int_param(q.get("limit"), "limit", 20, 1, MAX_PAGE)
        mode = q.get("mode") or "text"
        if mode not in ("text", "semantic", "hybrid"):
            raise Problem(422, "mode must be text, semantic or hybrid")
        try:
            hits = await run_in_threadpool(
                lambda: api.search(
                    real,
                    words,
                    tag=q.getlist("tag"),
                    color=q.getlist("color"),
                    after=q.get("after") or None,
                    before=q.get("before") or None,
                    status=q.get("status") or None,
                    limit=limit,
                    mode=mode,
                    config=self.runs.config,
                )
            )
        except UsageError as exc:  # a malformed query, a ROOT never analysed (or embedded)
            raise Problem(422, str(exc)) from None
        except ImgbatchError as exc:
            raise Problem(500, str(exc)) from None
        return _json({"hits": hits})

    async def cancel(self, request: Request) -> Response:
        run = self._run(request)
        if not await run_in_threadpool(run.cancel):
            raise Problem(409, f"run {run.id} has already ended")
        return _json(await run_in_threadpool(run.status), 202)

    async def items(self, request: Request) -> Response:
        run = self._run(request)
        q = request.query_params
        status = q.get("status") or None
        if status not in (None, "ok", "error"):
            raise Problem(422, "status must be ok or error")
        limit = _int_param(q.get("limit"), "limit", PAGE_LIMIT, 1, MAX_PAGE)
        cursor = q.get("cursor") or None
        try:
            after = decode_cursor(cursor) if cursor is not None else None
        except BadCursor:
            raise Problem(422, "cursor must be a next_cursor this server gave") from None
        items, following = await run_in_threadpool(run.items, status, limit, after)
        cursor = encode_cursor(following) if following is not None else None
        return _json({"items": items, "next_cursor": cursor})

    async def events(self, request: Request) -> Response:
        run = self._run(request)
        raw = request.headers.get("last-event-id", "").strip()
        last = _number(raw) if raw else 0
        if last is None:
            raise Problem(422, "Last-Event-ID must be an event id this server sent")
        done = run.done_id
        if done is not None and last >= done:
            return Response(status_code=204)  # all seen: a browser stops reconnecting

        async def stream() -> AsyncIterator[ServerSentEvent]:
            cursor = last
            while True:
                for event in run.events_after(cursor):
                    cursor = event.id
                    data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
                    yield ServerSentEvent(data=data, event=event.name, id=str(event.id))
                    if event.name == "done":
                        return
                await anyio.sleep(POLL)

        return EventSourceResponse(stream(), ping=PING, headers={"Cache-Control": "no-store"})

    async def report(self, request: Request) -> Response:
        run = self._run(request)
        cap = _int_param(
            request.query_params.get("max_thumbnails"),
            "max_thumbnails",
            MAX_THUMBNAILS,
            0,
            MAX_REPORT_THUMBNAILS,
        )
        report = Report(run.state_folder, run.results, cap)
        if not (run.state_folder / "checkpoint").is_dir():
            raise Problem(409, f"run {run.id} has recorded nothing yet")
        return StreamingResponse(
            report.chunks(),
            media_type="text/html; charset=utf-8",
            headers={"Content-Disposition": 'inline; filename="report.html"', **PAGE_HEADERS},
        )

    async def page(self, request: Request) -> Response:
        return Response(static("dashboard.html"), 200, PAGE_HEADERS, "text/html; charset=utf-8")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _ASSETS:
            raise Problem(404, "not found")
        return Response(static(name), 200, PAGE_HEADERS, _ASSETS[name] + "; charset=utf-8")


def _number(raw: str) -> int | None:
    """A whole number written in at most MAX_DIGITS ASCII digits, else None (`isdigit`
    alone takes "²" and "٣", and int() of thousands of digits raises)."""
    if not (0 < len(raw) <= MAX_DIGITS and raw.isascii() and raw.isdigit()):
        return None
    return int(raw)


def _int_param(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    value = _number(raw)
    if value is None or not low <= value <= high:
        raise Problem(
            422, f"{name} must be a whole number from {low} to {high:,}, not {raw[:40]!r}"
        )
    return value


def _route(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Problem as exc:
            return _problem(exc.status, exc.message)
        except ImgbatchError as exc:  # e.g. a damaged checkpoint read for a status
            log.error("error: %s %s: %s", request.method, request.url.path, exc)
            return _problem(503, str(exc))
        except Exception as exc:  # a bug: one line (a traceback with --verbose), no crash
            log.error("error: %s %s: unexpected %s", request.method, request.url.path, exc)
            log.debug("the traceback", exc_info=True)
            return _problem(500, f"unexpected {type(exc).__name__}")

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, method not allowed), as JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "error"
    return _problem(status, str(detail).lower())


def create_app(runs: Runs, allowed: list[str], hosts: frozenset[str] | None, token: str) -> ASGIApp:
    """The ASGI application: routes behind the Guard; stopping it stops the live runs."""
    api = Api(runs, allowed)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # in-flight items get the grace, then the runs end (records committed, lock
        # released); one stuck in a request is left to the process's exit
        await run_in_threadpool(runs.close)

    routes = [
        Route("/", _route(api.page), methods=["GET"]),
        Route("/static/{name}", _route(api.asset), methods=["GET"]),
        Route("/api/search", _route(api.search), methods=["GET"]),
        Route("/api/runs", _route(api.list_runs), methods=["GET"]),
        Route("/api/runs", _route(api.start), methods=["POST"]),
        Route("/api/runs/{run_id}", _route(api.get), methods=["GET"]),
        Route("/api/runs/{run_id}/cancel", _route(api.cancel), methods=["POST"]),
        Route("/api/runs/{run_id}/items", _route(api.items), methods=["GET"]),
        Route("/api/runs/{run_id}/events", _route(api.events), methods=["GET"]),
        Route("/api/runs/{run_id}/report", _route(api.report), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    return Guard(app, hosts, token)


# -- serving ---------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); a UsageError when it cannot
    be had, before anything else starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    host: str,
    port: int,
    allow_roots: list[str],
    token: str | None = None,
    config: str | None = None,
    access_log: bool = False,
    grace: float = 10.0,
    max_runs: int = 4,
) -> None:
    """Serve the API and the dashboard until SIGINT/SIGTERM; then stop the live runs.

    Args:
        host: the address to bind; anything but loopback needs `token`.
        port: the port (0: any free one; the address is logged).
        allow_roots: the folders whose trees may be analysed (none: every run refused).
        token: the bearer token every /api/ request must carry; None on loopback: a
            random one, shown once in the dashboard's address on stderr.
        config: the config file the runs read.
        access_log: log every request on stderr.
        grace: seconds in-flight items get when a run is cancelled or the server stops.
        max_runs: runs at once at most.
    """
    if not is_loopback(host) and not token:
        raise UsageError(
            f"serving on {host} (not loopback) needs a token: --token or IMGBATCH_SERVE_TOKEN"
        )
    if not (isinstance(grace, (int, float)) and 0 <= grace <= 3600):
        raise UsageError(f"--grace must be from 0 to 3600 seconds, not {grace}")
    if max_runs < 1:
        raise UsageError(f"--max-runs must be at least 1, not {max_runs}")
    allowed = []
    for folder in allow_roots:
        real = os.path.realpath(folder)
        if not os.path.isdir(real):
            raise UsageError(f"--allow-root {folder}: not a folder")
        allowed.append(real)
    sock = listen(host, port)
    port = sock.getsockname()[1]
    runs = Runs(config, max_runs=max_runs, grace=grace)
    shown = f"[{host}]" if ":" in host else host
    if token:
        # a token the user chose is never written anywhere
        log.info(
            "serving on http://%s:%d/ (the dashboard; the API under /api/); "
            "open it as http://%s:%d/#token=YOUR_TOKEN",
            *(shown, port) * 2,
        )
    else:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        # as Jupyter does: the address with a token made for this start, on stderr only
        # (a warning, so that --quiet still shows the one way in)
        log.warning(
            "serving on http://%s:%d/ (the dashboard; the API under /api/); open "
            "http://%s:%d/#token=%s",
            *(shown, port) * 2,
            token,
        )
    app = create_app(runs, allowed, allowed_hosts(host, port), token)
    if not allowed:
        log.warning("no --allow-root given: every run will be refused")
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=access_log,
            proxy_headers=False,
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        ),
        runs,
    )
    server.run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts stopping the runs as soon as a signal comes:
    their grace then runs while uvicorn waits for open connections (whose streams end
    with the runs), not after."""

    def __init__(self, config: uvicorn.Config, runs: Runs) -> None:
        super().__init__(config)
        self.runs = runs

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # a thread: the signal handler may have interrupted a holder of the runs' lock
        threading.Thread(target=self.runs.stop, name="imgbatch-serve-stop", daemon=True).start()
