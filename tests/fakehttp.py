"""The HTTP plumbing the fake API servers of the test suite share (tests/fakegemini.py,
tests/fakeopenai.py; tests/fakegemini_batch.py answers through FakeGemini). Standard
library only.

``FakeHTTPServer`` is a threaded HTTP/1.1 server on 127.0.0.1 and a free port, started and
stopped as a context manager (``stop`` cuts open connections, so a hung answer ends at
once, and joins every thread). It keeps a log of the requests (one record each, in arrival
order, with the status and outcome it was answered with), a first-in first-out script of
faults for the next requests (``fail_next``, ``hang_next``, ``malformed_next``,
``drop_next``; a subclass adds its own kinds), a latency added before every answer, and
the tracebacks of its own bugs (``errors``, each answered 500). A subclass says what a
request means: ``_new_record`` (its record type) and ``_process`` (the ``Reply``), and how
a scripted fault reads in its API's dialect (``_scripted``)."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import socket
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar

__all__ = ["Action", "FakeHTTPServer", "Record", "Reply", "json_reply", "pick_field"]


@dataclass
class Record:
    """What a fake server saw and did for one request (a subclass adds what its API
    carries). ``api_key`` is kept (tests compare it) but never shown by ``repr``."""

    index: int
    time: float  # the server clock (time.monotonic by default) when the request arrived
    method: str
    path: str
    status: int | None = None  # HTTP status answered; None while pending or if never answered
    outcome: str = "pending"  # what the server did: ok, fault, hang, malformed, dropped, ...
    response_text: str | None = None  # the model's text answered, for ok/malformed
    finished: float | None = None  # server clock when the answer was written


@dataclass
class Reply:
    """What to answer one request."""

    status: int | None  # None: close the connection without answering
    body: bytes = b""
    content_type: str = "application/json"
    outcome: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # wait ``hang_seconds`` (after the latency) before answering
    text: str | None = None  # the model's text in the body, recorded as response_text


@dataclass
class Action:
    """One scripted fault for the next request: ``kind`` is fault, hang, malformed, drop
    or a subclass's own; ``options`` holds what a subclass's kinds need."""

    kind: str
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def json_reply(
    status: int,
    body: Mapping[str, Any],
    outcome: str,
    content_type: str = "application/json",
    **extra: Any,
) -> Reply:
    """A JSON answer."""
    return Reply(status, json.dumps(body).encode(), content_type, outcome, **extra)


def pick_field(d: Mapping[str, Any], camel: str) -> tuple[str | None, Any]:
    """Look a JSON field up under its camelCase or snake_case name (Google's APIs accept
    both): (the name found, its value), or (None, None)."""
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()
    for name in (camel, snake):
        if name in d:
            return name, d[name]
    return None, None


R = TypeVar("R", bound=Record)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # SDKs pool up to 100 connections; the default 5 drops SYNs
    fake: FakeHTTPServer[Any]

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{self.fake.name}-{self.server_address[1]}-conn",
            daemon=True,
        )
        self.fake._track_thread(t)
        t.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client went away mid-answer: expected with timeouts


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real front ends
    timeout = 120  # idle keep-alive connections end by themselves eventually
    # One send() per answer, no Nagle: headers and body written separately would otherwise
    # meet the client's delayed ACK and cost ~40 ms per request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._track_conn(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track_conn(self.connection, False)

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def do_DELETE(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request line may carry a key (?key=): never print it


#: the handler type a subclass's ``_process`` receives (headers, rfile, command, path)
Handler = _Handler


class FakeHTTPServer(Generic[R]):
    """A threaded local HTTP server with a request log and scripted faults (see the
    module doc). A subclass implements ``_new_record`` and ``_process``."""

    name = "fakehttp"  # in thread names and errors
    json_type = "application/json"  # the Content-Type of JSON answers
    extra_headers: Mapping[str, str] = {}  # sent with every answer
    hang_body = b'{"error": {"message": "timeout"}}'  # the 504 after a hang
    bug_body = b'{"error": {"message": "fake server bug"}}'  # the 500 for a bug of the fake

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        latency: float = 0.0,
        hang_seconds: float = 30.0,
    ) -> None:
        """``port`` 0 takes a free one. ``clock`` times the records (and a subclass's
        quotas). ``latency`` seconds pass before every answer, errors included; a hang
        lasts ``hang_seconds``."""
        # Reentrant: a subclass builds answers with it held, and they may take it.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._clock = clock
        self._host, self._port = host, port
        self._latency = latency
        self._hang_seconds = hang_seconds
        self._script: collections.deque[Action] = collections.deque()
        self._records: list[R] = []
        self._errors: list[str] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Any:
        """Start serving (in a thread); returns the server."""
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._stop.clear()
        httpd = _Server((self._host, self._port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"{self.name}-{httpd.server_address[1]}",
            daemon=True,
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
            if t is not None and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def alive_threads(self) -> list[threading.Thread]:
        """Server and connection threads still alive (empty after ``stop``)."""
        with self._lock:
            threads = [t for t in self._threads if t.is_alive()]
        if self._thread is not None and self._thread.is_alive():
            threads.append(self._thread)
        return threads

    # ---------------------------------------------------------------- behaviour

    def set_latency(self, seconds: float) -> None:
        """Seconds added before every answer from now on."""
        with self._lock:
            self._latency = seconds

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``n`` requests get ``status``: ``body`` None (the API's error for it),
        a dict (JSON) or bytes (an HTML page, as a proxy's), with ``headers`` added."""
        self._queue(n, Action("fault", status, body, dict(headers or {})))

    def answer_next(self, n: int = 1) -> None:
        """The next ``n`` requests are answered as usual: a script can then say what the
        request after them gets, before any of them arrives (no race with the client)."""
        self._queue(n, Action("answer"))

    def hang_next(self, n: int = 1) -> None:
        """The next ``n`` requests get no answer for ``hang_seconds`` (then a 504)."""
        self._queue(n, Action("hang"))

    def malformed_next(self, n: int = 1) -> None:
        """The next ``n`` requests get a 200 whose text is not valid JSON."""
        self._queue(n, Action("malformed"))

    def drop_next(self, n: int = 1) -> None:
        """The next ``n`` requests see their connection closed without an answer."""
        self._queue(n, Action("drop"))

    def clear_script(self) -> None:
        """Forget the scripted faults not used yet."""
        with self._lock:
            self._script.clear()

    def _queue(self, n: int, action: Action) -> None:
        with self._lock:
            self._script.extend(dataclasses.replace(action) for _ in range(n))

    # ---------------------------------------------------------------- observation

    @property
    def requests(self) -> list[R]:
        """Every request so far, in arrival order (a copy of the list; records are live)."""
        with self._lock:
            return list(self._records)

    @property
    def last_request(self) -> R:
        with self._lock:
            if not self._records:
                raise IndexError("no request received yet")
            return self._records[-1]

    def count_by_status(self) -> dict[int | None, int]:
        """HTTP status -> number of requests (None: not answered, yet or ever)."""
        with self._lock:
            return dict(collections.Counter(r.status for r in self._records))

    def count_by_outcome(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(r.outcome for r in self._records))

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()
            self._max_in_flight = self._in_flight

    @property
    def in_flight(self) -> int:
        """Requests being handled right now (latency and hangs included)."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests handled at once since start (or ``clear_requests``)."""
        with self._lock:
            return self._max_in_flight

    @property
    def errors(self) -> list[str]:
        """Tracebacks of bugs in the fake itself (each also answered 500); should be []."""
        with self._lock:
            return list(self._errors)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests have arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._records) >= n, timeout)

    # ---------------------------------------------------------------- for subclasses

    def _new_record(self, index: int, now: float, method: str, path: str) -> R:
        """The record of a request just arrived (``path`` as sent, query included)."""
        raise NotImplementedError

    def _process(self, h: Handler, rec: R, split: urllib.parse.SplitResult) -> Reply:
        """What to answer ``rec`` (fill it in as the request is understood)."""
        raise NotImplementedError

    def _scripted(self, rec: R, action: Action) -> Reply:
        """The answer to a scripted ``action`` of a kind the base does not know."""
        raise NotImplementedError(action.kind)

    def _timing(self) -> tuple[float, float, Callable[[R], None] | None]:
        """(latency, hang seconds, a hook run just before the answer), lock held."""
        return self._latency, self._hang_seconds, None

    def _next_scripted(self, rec: R) -> Reply | None:
        """The answer of the next scripted fault, or None (call with the lock held)."""
        action = self._script.popleft() if self._script else None
        if action is None or action.kind == "answer":
            return None
        return self._action_reply(rec, action)

    def _action_reply(self, rec: R, action: Action) -> Reply:
        """A hang or a drop here; any other kind in the subclass's dialect."""
        if action.kind == "hang":
            return Reply(504, self.hang_body, self.json_type, "hang", hang=True)
        if action.kind == "drop":
            return Reply(None, outcome="dropped")
        return self._scripted(rec, action)

    def _json(self, status: int, body: Mapping[str, Any], outcome: str) -> Reply:
        return json_reply(status, body, outcome, self.json_type)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False if the server is stopping."""
        return not self._stop.wait(seconds) if seconds > 0 else not self._stop.is_set()

    @staticmethod
    def _read_body(h: Handler, length: int, keep: bool = True) -> bytes:
        """Read ``length`` bytes of body (all of them, to keep the connection usable),
        kept only when ``keep``."""
        chunks: list[bytes] = []
        left = length
        while left > 0:
            chunk = h.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            if keep:
                chunks.append(chunk)
        return b"".join(chunks)

    # ---------------------------------------------------------------- plumbing

    def _track_conn(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _track_thread(self, t: threading.Thread) -> None:
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _handle(self, h: Handler) -> None:
        split = urllib.parse.urlsplit(h.path)
        now = self._clock()
        with self._cond:
            rec = self._new_record(len(self._records), now, h.command, h.path)
            self._records.append(rec)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._cond.notify_all()
        try:
            reply = self._process(h, rec, split)
        except Exception:
            with self._lock:
                self._errors.append(traceback.format_exc())
            reply = Reply(500, self.bug_body, self.json_type, "bug")
        self._send(h, rec, reply)

    def _send(self, h: Handler, rec: R, reply: Reply) -> None:
        """Wait (latency, hang), then answer; the request leaves ``in_flight`` just before
        its answer is written, so a client holding an answer never sees itself counted."""
        answering = False
        try:
            with self._lock:
                latency, hang_seconds, before_answer = self._timing()
                rec.outcome = reply.outcome
                rec.response_text = reply.text
            if before_answer is not None:
                before_answer(rec)
            awake = self._sleep(latency)
            if awake and reply.hang:
                awake = self._sleep(hang_seconds)
            if not awake or reply.status is None:
                h.close_connection = True  # stopping, or a scripted drop: no answer at all
                return
            with self._lock:
                rec.status = reply.status
                rec.finished = self._clock()
                self._in_flight -= 1
                answering = True
        finally:
            if not answering:
                with self._lock:
                    self._in_flight -= 1
        try:
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.content_type)
            h.send_header("Content-Length", str(len(reply.body)))
            for name, value in {**self.extra_headers, **reply.headers}.items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(reply.body)
            h.wfile.flush()
        except OSError:
            h.close_connection = True  # the client gave up (a timeout): nothing to do
