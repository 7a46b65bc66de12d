"""A fake of the Google Cloud Storage JSON API, enough for gcsfs to list and read a bucket
(`gs://` roots, issue 24 item 1). Standard library only, on 127.0.0.1; gcsfs is pointed
at it by `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (gcsfs.core._location reads it).

Served (what gcsfs 2026.10 sends, measured by tests/test_gcs.py):

- ``GET /storage/v1/b/BUCKET``: the bucket's resource; 404 for a missing bucket.
- ``GET /storage/v1/b/BUCKET/o?prefix=&delimiter=&maxResults=&pageToken=``: objects.list,
  in lexicographic order of the names, at most ``maxResults`` (default 1,000; never more
  than ``max_page``) a page with an opaque ``nextPageToken``; with a delimiter, the
  ``prefixes`` below it.
- ``GET /storage/v1/b/BUCKET/o/NAME`` (the name percent-encoded, "/" as %2F): the
  object's resource (``size``, ``updated``, ``etag``, ``md5Hash``, ``generation``...);
  with ``alt=media``, its bytes.
- ``GET /download/storage/v1/b/BUCKET/o/NAME?alt=media[&generation=N]``: the bytes, or the
  ``Range: bytes=A-B`` of them (206); a generation that is not the object's: 404.

Anything else is 404 and logged as ``("GET", "other", "", path)``; what is not an HTTP
request at all (a gRPC client's TLS handshake, say) as ``("?", "garbled", "", status)``.
Every request is in ``log`` as ``(method, kind, bucket, name)``, kind one of "bucket",
"list", "meta", "media", "other": a test counts the reads of objects with ``reads()``.

Usage::

    with FakeGCS() as gcs:
        gcs.put("bkt", "p/a.jpg", data)
        env = {"STORAGE_EMULATOR_HOST": gcs.url}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Blob:
    """One stored object, at one generation."""

    data: bytes
    generation: int
    updated: datetime

    def resource(self, bucket: str, name: str) -> dict[str, Any]:
        md5 = base64.b64encode(hashlib.md5(self.data).digest()).decode()  # noqa: S324
        stamp = (
            self.updated.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self.updated.microsecond // 1000:03d}Z"
        )
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{self.generation}",
            "selfLink": f"/storage/v1/b/{bucket}/o/{name}",
            "name": name,
            "bucket": bucket,
            "generation": str(self.generation),
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "size": str(len(self.data)),
            "md5Hash": md5,
            "etag": base64.b64encode(b"gen%d" % self.generation).decode(),
            "timeCreated": stamp,
            "updated": stamp,
        }


@dataclass
class FakeGCS:
    """The server's state: buckets of objects, and the request log."""

    buckets: dict[str, dict[str, Blob]] = field(default_factory=dict)
    log: list[tuple[str, str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    #: the most objects (and prefixes) a list page holds, whatever maxResults asks (GCS
    #: may return fewer than asked): small, it makes a few objects span several pages
    max_page: int = 1000
    #: called (bucket) once a list page is answered: a test overwrites objects there,
    #: between the listing and the reads
    after_list: Callable[[str], None] | None = None
    _server: ThreadingHTTPServer | None = None
    _generation: int = 1_700_000_000_000_000

    def bucket(self, name: str) -> None:
        with self.lock:
            self.buckets.setdefault(name, {})

    def put(self, bucket: str, name: str, data: bytes) -> None:
        """Store (or overwrite: a new generation and `updated`) an object."""
        with self.lock:
            self._generation += 1
            self.buckets.setdefault(bucket, {})[name] = Blob(
                data, self._generation, datetime.now(UTC)
            )

    def reads(self, bucket: str) -> list[str]:
        """The names of the objects of `bucket` whose metadata or bytes were asked for."""
        with self.lock:
            return [n for _, kind, b, n in self.log if b == bucket and kind in ("meta", "media")]

    def kinds(self, bucket: str) -> list[str]:
        with self.lock:
            return [kind for _, kind, b, _ in self.log if b == bucket]

    def start(self) -> FakeGCS:
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: the log list is the record

            def do_GET(self) -> None:  # noqa: N802
                state._get(self)

            def send_error(
                self, code: int, message: str | None = None, explain: str | None = None
            ) -> None:
                # not HTTP/1.x (e.g. a gRPC client's TLS handshake) or an unknown method
                with state.lock:
                    state.log.append(("?", "garbled", "", str(code)))
                super().send_error(code, message, explain)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeGCS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API ------------------------------------------------------------------------

    def _get(self, req: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segs = parts.path.split("/")  # split before unquoting: a name's "/" is %2F
        # /storage/v1/b/B, /storage/v1/b/B/o, /storage/v1/b/B/o/NAME, /download/storage/...
        if segs[1:4] == ["download", "storage", "v1"]:
            segs = ["", *segs[2:]]
        if segs[1:4] != ["storage", "v1", "b"] or len(segs) < 5:
            return self._answer(req, ("GET", "other", "", req.path), 404, _error(404, "Not Found"))
        bucket = unquote(segs[4])
        if len(segs) == 5:
            return self._bucket(req, bucket)
        if segs[5] != "o":
            return self._answer(
                req, ("GET", "other", bucket, req.path), 404, _error(404, "no route")
            )
        if len(segs) == 6 or (len(segs) == 7 and segs[6] == ""):
            return self._list(req, bucket, query)
        name = unquote("/".join(segs[6:]))
        if query.get("alt") == "media":
            return self._media(req, bucket, name, query)
        with self.lock:
            blob = self.buckets.get(bucket, {}).get(name)
        if blob is None:
            return self._answer(
                req, ("GET", "meta", bucket, name), 404, _error(404, "No such object")
            )
        return self._answer(req, ("GET", "meta", bucket, name), 200, blob.resource(bucket, name))

    def _bucket(self, req: BaseHTTPRequestHandler, bucket: str) -> None:
        entry = ("GET", "bucket", bucket, "")
        if bucket not in self.buckets:
            return self._answer(
                req, entry, 404, _error(404, "The specified bucket does not exist.")
            )
        body = {"kind": "storage#bucket", "id": bucket, "name": bucket, "location": "US"}
        return self._answer(req, entry, 200, body)

    def _list(self, req: BaseHTTPRequestHandler, bucket: str, query: dict[str, str]) -> None:
        entry = ("GET", "list", bucket, "")
        with self.lock:
            objects = self.buckets.get(bucket)
            names = None if objects is None else sorted(objects)
        if objects is None or names is None:
            return self._answer(
                req, entry, 404, _error(404, "The specified bucket does not exist.")
            )
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        size = max(1, min(int(query.get("maxResults") or 1000), self.max_page))
        after = (
            base64.urlsafe_b64decode(query["pageToken"]).decode() if "pageToken" in query else None
        )
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        token, last = None, ""
        for name in names:
            if not name.startswith(prefix) or (after is not None and name <= after):
                continue
            if len(items) + len(prefixes) >= size:
                token = base64.urlsafe_b64encode(last.encode()).decode()
                break
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                folder = prefix + rest.split(delimiter, 1)[0] + delimiter
                if not prefixes or prefixes[-1] != folder:
                    prefixes.append(folder)
            else:
                items.append(objects[name].resource(bucket, name))
            last = name
        body: dict[str, Any] = {"kind": "storage#objects"}
        if items:
            body["items"] = items
        if prefixes:
            body["prefixes"] = prefixes
        if token:
            body["nextPageToken"] = token
        self._answer(req, entry, 200, body)
        if self.after_list is not None:
            self.after_list(bucket)

    def _media(
        self, req: BaseHTTPRequestHandler, bucket: str, name: str, query: dict[str, str]
    ) -> None:
        entry = ("GET", "media", bucket, name)
        with self.lock:
            blob = self.buckets.get(bucket, {}).get(name)
        wanted = query.get("generation")
        if blob is None or (wanted and int(wanted) != blob.generation):
            return self._answer(req, entry, 404, _error(404, "No such object"))
        data = blob.data
        found = _RANGE.match(req.headers.get("Range", "") or "")
        if not found:
            return self._answer(req, entry, 200, data)
        first, last = found.groups()
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
        if start >= len(data):
            return self._answer(req, entry, 416, _error(416, "Request range not satisfiable"))
        extra = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
        return self._answer(req, entry, 206, data[start : end + 1], extra)

    def _answer(
        self,
        req: BaseHTTPRequestHandler,
        entry: tuple[str, str, str, str],
        status: int,
        body: bytes | dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        with self.lock:
            self.log.append(entry)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        req.send_response(status)
        req.send_header("Content-Type", kind)
        req.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)


def _error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "errors": [{"message": message}]}}
