"""`scan --from-list` and `analyze --from-list` through the real CLI, against a real HTTP
server on 127.0.0.1 that the tests start (http.server in threads): local paths and URLs,
JSON Lines meta, 404 / 5xx / 429 / slow / oversize / redirects, stdin, and re-runs that
ask conditionally (counted at the server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.conftest import REPO, make_image, run_cli

FAST_RETRIES = {"IMGBATCH_RETRY_DELAY": "0.01"}


@dataclass
class Seen:
    """One request the server answered."""

    path: str
    status: int
    conditional: bool


@dataclass
class Site:
    """What the server serves, and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)  # /img/NAME -> body
    etags: dict[str, str] = field(default_factory=dict)  # NAME -> ETag (none: no validators)
    failures: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, name: str, body: bytes, etag: str | None = None) -> str:
        self.files[name] = body
        if etag is not None:
            self.etags[name] = etag
        return self.url(f"/img/{name}")

    def requests(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]


class _Handler(BaseHTTPRequestHandler):
    site: Site

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        conditional = "If-None-Match" in self.headers
        with self.site.lock:
            self.site.seen.append(Seen(self.path, status, conditional))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        if "Content_Length" not in headers and status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client went away (refused the size): what it should do
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        site, path = self.site, self.path
        with site.lock:
            scripted = site.failures.get(path)
            status = scripted.pop(0) if scripted else None
        if status is not None:
            self._answer(status, b"scripted failure")
        elif path.startswith("/img/"):
            name = path[len("/img/") :]
            body = site.files.get(name)
            if body is None:
                self._answer(404, b"not found")
                return
            etag = site.etags.get(name)
            if etag is not None and self.headers.get("If-None-Match") == etag:
                self._answer(304, ETag=etag)
            elif etag is not None:
                self._answer(200, body, ETag=etag, Last_Modified="Mon, 07 Dec 2026 04:00:00 GMT")
            else:
                self._answer(200, body)
        elif path == "/slow":  # no answer within any small timeout
            site.stop.wait(10)
            self._answer(200, b"late")
        elif path == "/trickle":  # a byte now and then: no read ever times out
            self._trickle()
        elif path == "/big-length":  # a Content-Length over the cap: refused unread
            self._answer(200, b"x" * 5000, Content_Length="5000")
        elif path == "/big-unsized":  # no Content-Length: the body ends at the close
            self._unsized(b"y" * 5000)
        elif path == "/to-file":
            self._answer(302, Location="file:///etc/passwd")
        elif path == "/to-http":
            self._answer(301, Location="/hop")
        elif path == "/hop":
            self._answer(307, Location=site.url("/img/target.png"))
        else:
            self._answer(404, b"no such route")

    def _trickle(self) -> None:
        with self.site.lock:
            self.site.seen.append(Seen(self.path, 200, False))
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            if self.site.stop.wait(0.1):
                return
            try:
                self.wfile.write(b"z")
                self.wfile.flush()
            except OSError:
                return

    def _unsized(self, body: bytes) -> None:
        with self.site.lock:
            self.site.seen.append(Seen(self.path, 200, False))
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass


@pytest.fixture
def site() -> Iterator[Site]:
    """A real HTTP server on 127.0.0.1 and a free port, in threads."""
    state = Site()
    handler = type("Handler", (_Handler,), {"site": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()


def image_bytes(tmp_path: Path, name: str, color: Any) -> bytes:
    return make_image(tmp_path / "made" / name, color=color).read_bytes()


def write_list(path: Path, *lines: str | dict[str, Any]) -> Path:
    path.write_text(
        "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


def by_path(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in records}


def hash_of(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


# -- scan ------------------------------------------------------------------------------


def test_scan_lists_paths_and_urls_in_order_with_the_meta_of_json_lines(
    site: Site, tmp_path: Path
) -> None:
    local = make_image(tmp_path / "pics" / "local.jpg", color=(1, 2, 3))
    red = site.serve("red.png", image_bytes(tmp_path, "red.png", (250, 0, 0)), etag='"r1"')
    blue = site.serve("blue.png", image_bytes(tmp_path, "blue.png", (0, 0, 250)))
    listed = write_list(
        tmp_path / "items.txt",
        str(local),
        red,
        "",  # blank lines are skipped
        {"url": blue, "caption": "a blue square", "id": 7},
        {"path": str(local), "split": "train"},
        {"url": site.url("/img/gone.png"), "id": 8},  # a 404 keeps its meta too
        {"caption": "neither url nor path"},
        "ftp://example.org/x.jpg",
    )

    done = run_cli(["scan", "--from-list", listed])

    assert done.rc == 1, done.stderr  # some items failed
    recs = done.records
    assert [r["path"] for r in recs] == [
        str(local),
        red,
        blue,
        str(local),
        site.url("/img/gone.png"),
        f"{listed}:7",
        "ftp://example.org/x.jpg",
    ]
    assert recs[0]["hash"] == hash_of(local.read_bytes()) and "meta" not in recs[0]
    assert recs[1]["hash"] == hash_of(site.files["red.png"])
    assert recs[1]["size"] == len(site.files["red.png"])
    assert recs[1]["extension"] == ".png" and recs[1]["mtime"] == "2026-12-07T04:00:00.000000Z"
    assert recs[2]["meta"] == {"caption": "a blue square", "id": 7}
    assert recs[2]["hash"] == hash_of(site.files["blue.png"])
    assert recs[3]["meta"] == {"split": "train"} and recs[3]["status"] == "ok"
    assert recs[4]["status"] == "error" and recs[4]["meta"] == {"id": 8}
    assert recs[4]["error"] == {"code": "IO_ERROR", "message": "HTTP 404 Not Found"}
    assert recs[5]["meta"] == {"caption": "neither url nor path"}
    assert recs[5]["error"]["code"] == "IO_ERROR" and "line 7" in recs[5]["error"]["message"]
    assert "ftp://" in recs[6]["error"]["message"]
    assert "scanned 7 items" in done.stderr


def test_root_and_from_list_are_one_or_the_other(tmp_path: Path) -> None:
    listed = write_list(tmp_path / "l.txt", "x.jpg")
    for args in (["scan"], ["scan", str(tmp_path), "--from-list", str(listed)]):
        done = run_cli(args)
        assert done.rc == 2 and done.stdout == b""
        assert (
            done.stderr.strip()
            .splitlines()[-1]
            .endswith("give ROOT or --from-list FILE (one of the two)")
        )


def test_a_5xx_is_retried_until_it_answers(site: Site, tmp_path: Path) -> None:
    url = site.serve("flaky.png", image_bytes(tmp_path, "flaky.png", (9, 9, 9)))
    site.failures["/img/flaky.png"] = [500, 503]
    listed = write_list(tmp_path / "l.txt", url)

    done = run_cli(["scan", "--from-list", listed, "--max-attempts", "3"], env=FAST_RETRIES)

    assert done.rc == 0, done.stderr
    (rec,) = done.records
    assert rec["status"] == "ok" and rec["hash"] == hash_of(site.files["flaky.png"])
    assert [s.status for s in site.requests("/img/flaky.png")] == [500, 503, 200]


@pytest.mark.parametrize(("status", "code"), [(500, "NETWORK_ERROR"), (429, "RATE_LIMIT")])
def test_a_5xx_or_429_after_every_attempt_is_transient(
    site: Site, tmp_path: Path, status: int, code: str
) -> None:
    url = site.serve("down.png", b"never served")
    site.failures["/img/down.png"] = [status] * 3
    listed = write_list(tmp_path / "l.txt", url)

    done = run_cli(["scan", "--from-list", listed, "--max-attempts", "3"], env=FAST_RETRIES)

    assert done.rc == 1
    (rec,) = done.records
    assert rec["error"]["code"] == code  # a transient code: the next run tries again
    assert len(site.requests("/img/down.png")) == 3


@pytest.mark.parametrize("route", ["/slow", "/trickle"])
def test_an_answer_slower_than_the_download_timeout_is_a_timeout(
    site: Site, tmp_path: Path, route: str
) -> None:
    listed = write_list(tmp_path / "l.txt", site.url(route))

    done = run_cli(
        ["scan", "--from-list", listed, "--download-timeout", "0.5", "--max-attempts", "1"]
    )

    assert done.rc == 1
    (rec,) = done.records
    assert rec["error"]["code"] == "TIMEOUT"
    assert "--download-timeout (0.5s)" in rec["error"]["message"]


@pytest.mark.parametrize(
    ("route", "said"), [("/big-length", "5,000 bytes"), ("/big-unsized", "more")]
)
def test_a_body_over_the_size_cap_is_refused(
    site: Site, tmp_path: Path, route: str, said: str
) -> None:
    listed = write_list(tmp_path / "l.txt", site.url(route))

    done = run_cli(["scan", "--from-list", listed, "--max-download-size", "1000"])

    assert done.rc == 1
    (rec,) = done.records
    assert rec["error"] == {
        "code": "IO_ERROR",
        "message": f"over --max-download-size (1,000 bytes): {said}",
    }
    assert len(site.requests(route)) == 1  # a permanent error: not retried


def test_the_same_bodies_pass_under_a_larger_cap(site: Site, tmp_path: Path) -> None:
    listed = write_list(tmp_path / "l.txt", site.url("/big-length"), site.url("/big-unsized"))

    done = run_cli(["scan", "--from-list", listed, "--max-download-size", "5000"])

    assert done.rc == 0, done.stderr
    assert [r["hash"] for r in done.records] == [hash_of(b"x" * 5000), hash_of(b"y" * 5000)]


def test_a_redirect_to_file_is_refused_and_http_redirects_are_followed(
    site: Site, tmp_path: Path
) -> None:
    site.serve("target.png", image_bytes(tmp_path, "target.png", (0, 200, 0)))
    listed = write_list(tmp_path / "l.txt", site.url("/to-file"), site.url("/to-http"))

    done = run_cli(["scan", "--from-list", listed])

    assert done.rc == 1
    refused, followed = done.records
    assert refused["path"] == site.url("/to-file")
    assert refused["error"] == {
        "code": "IO_ERROR",
        "message": "redirect to file:// refused (http and https only)",
    }
    assert followed["path"] == site.url("/to-http")  # the URL as listed
    assert followed["status"] == "ok"
    assert followed["hash"] == hash_of(site.files["target.png"])
    assert len(site.requests("/img/target.png")) == 1


def test_a_rescan_asks_conditionally_and_reads_only_what_changed(
    site: Site, tmp_path: Path
) -> None:
    same = site.serve("same.png", image_bytes(tmp_path, "same.png", (1, 1, 1)), etag='"s1"')
    edited = site.serve("edit.png", image_bytes(tmp_path, "edit.png", (2, 2, 2)), etag='"e1"')
    plain = site.serve("plain.png", image_bytes(tmp_path, "plain.png", (3, 3, 3)))  # no ETag
    listed = write_list(tmp_path / "l.txt", same, edited, plain)
    first = run_cli(["scan", "--from-list", listed])
    assert first.rc == 0, first.stderr
    site.serve("edit.png", image_bytes(tmp_path, "edit2.png", (4, 4, 4)), etag='"e2"')
    site.seen.clear()

    again = run_cli(["scan", "--from-list", listed])

    assert again.rc == 0, again.stderr
    answered = {s.path: (s.status, s.conditional) for s in site.seen}
    assert answered == {
        "/img/same.png": (304, True),  # unchanged: no body
        "/img/edit.png": (200, True),  # changed: its new body
        "/img/plain.png": (200, False),  # nothing to validate it by: fetched again
    }
    recs = by_path(again.records)
    assert recs[same]["hash"] == by_path(first.records)[same]["hash"]
    assert recs[same]["size"] == len(site.files["same.png"])
    assert recs[edited]["hash"] == hash_of(site.files["edit.png"])
    assert recs[edited]["hash"] != by_path(first.records)[edited]["hash"]
    assert "1 unchanged (HTTP 304)" in again.stderr


def test_scan_reads_a_list_on_stdin(site: Site, tmp_path: Path) -> None:
    url = site.serve("in.png", image_bytes(tmp_path, "in.png", (5, 5, 5)))
    proc = subprocess.run(
        [sys.executable, "-m", "imgbatch", "scan", "--from-list", "-"],
        input=json.dumps({"url": url, "k": "v"}).encode() + b"\n",
        capture_output=True,
        cwd=REPO,
        env=os.environ.copy(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rec["path"] == url and rec["meta"] == {"k": "v"}
    assert rec["hash"] == hash_of(site.files["in.png"])


# -- analyze ---------------------------------------------------------------------------


def analyze_stdin(lines: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "imgbatch", "analyze", "--provider", "local", "--from-list", "-"]
        + list(args),
        input=lines,
        capture_output=True,
        cwd=REPO,
        env=os.environ.copy(),
        timeout=120,
        check=False,
    )


def test_analyze_a_list_then_a_rerun_does_nothing_and_asks_conditionally(
    site: Site, tmp_path: Path
) -> None:
    local = make_image(tmp_path / "pics" / "here.jpg", size=(40, 30), color=(10, 20, 30))
    red = site.serve("red.png", image_bytes(tmp_path, "red.png", (250, 0, 0)), etag='"r1"')
    listed = write_list(
        tmp_path / "items.jsonl",
        {"url": red, "caption": "red"},
        {"path": str(local), "caption": "here"},
        {"url": site.url("/img/missing.png"), "caption": "gone"},
    )

    first = run_cli(["analyze", "--provider", "local", "--from-list", listed])

    assert first.rc == 1, first.stderr  # the 404
    recs = by_path(first.records)
    assert set(recs) == {red, str(local), site.url("/img/missing.png")}
    assert recs[red]["status"] == "ok" and recs[red]["meta"] == {"caption": "red"}
    assert recs[red]["hash"] == hash_of(site.files["red.png"])
    assert recs[red]["result"]["format"] == "PNG"  # decoded from the downloaded body
    assert recs[str(local)]["result"]["width"] == 40 and recs[str(local)]["meta"]
    gone = recs[site.url("/img/missing.png")]
    assert gone["error"]["code"] == "IO_ERROR" and gone["meta"] == {"caption": "gone"}
    assert len(site.requests("/img/red.png")) == 1  # fetched once: hashed and analysed
    site.seen.clear()

    again = run_cli(["analyze", "--provider", "local", "--from-list", listed])

    assert again.rc == 0, again.stderr
    assert again.records == []  # nothing new, nothing failed anew (the 404 is permanent)
    assert [(s.status, s.conditional) for s in site.requests("/img/red.png")] == [(304, True)]


def test_analyze_from_stdin_needs_a_checkpoint(site: Site, tmp_path: Path) -> None:
    url = site.serve("s.png", image_bytes(tmp_path, "s.png", (7, 7, 7)))

    refused = analyze_stdin(url.encode() + b"\n")

    assert refused.returncode == 2 and refused.stdout == b""
    assert (
        refused.stderr.decode()
        .strip()
        .splitlines()[-1]
        .endswith("a list on stdin needs --checkpoint DIR (where its state is kept)")
    )
    assert site.seen == []

    state = tmp_path / "state"
    done = analyze_stdin(url.encode() + b"\n", "--checkpoint", str(state))

    assert done.returncode == 0, done.stderr
    (rec,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert rec["path"] == url and rec["status"] == "ok"
    assert (state / "checkpoint").is_dir()
    again = analyze_stdin(url.encode() + b"\n", "--checkpoint", str(state))
    assert again.returncode == 0 and again.stdout == b""  # resumed from the same state


def test_analyze_a_body_that_changed_since_its_fetch_is_not_described(
    site: Site, tmp_path: Path
) -> None:
    """A 304 gives no body: analysis fetches it again, and the hash check catches a
    server that changed it meanwhile without changing its ETag."""
    url = site.serve("c.png", image_bytes(tmp_path, "c.png", (8, 8, 8)), etag='"c1"')
    listed = write_list(tmp_path / "l.txt", url)
    assert run_cli(["scan", "--from-list", listed]).rc == 0
    site.serve("c.png", image_bytes(tmp_path, "c2.png", (9, 90, 9)), etag='"c1"')

    done = run_cli(["analyze", "--provider", "local", "--from-list", listed])

    assert done.rc == 1, done.stderr
    (rec,) = done.records
    assert rec["error"]["code"] == "IO_ERROR", done.stderr
    assert "changed" in rec["error"]["message"]


def test_status_runs_export_and_search_read_a_list_run_by_its_list_or_checkpoint(
    site: Site, tmp_path: Path
) -> None:
    red = site.serve("red.png", image_bytes(tmp_path, "red.png", (250, 0, 0)), etag='"r1"')
    local = make_image(tmp_path / "pics" / "blue.jpg", color=(0, 0, 250))
    listed = write_list(tmp_path / "items.txt", red, str(local))
    assert run_cli(["analyze", "--provider", "local", "--from-list", listed]).rc == 0

    status = run_cli(["status", "--json", "--from-list", listed])
    assert status.rc == 0, status.stderr
    current = json.loads(status.stdout)
    assert current["state"] == "COMPLETED" and current["root"] == str(listed)
    assert current["counts"]["completed"] == 2

    runs = run_cli(["runs", "--json", "--from-list", listed])
    assert runs.rc == 0 and len(runs.records) == 1

    exported = run_cli(["export", "--from-list", listed])
    assert exported.rc == 0, exported.stderr
    assert sorted(r["path"] for r in exported.records) == sorted([red, str(local)])

    found = run_cli(["search", "--from-list", listed, "red"])
    assert found.rc == 0, found.stderr
    assert [r["path"] for r in found.records] == [red]

    # the same state by its folder (named after the list): --checkpoint
    (folder,) = (Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch").glob("items.txt-*")
    by_folder = run_cli(["export", "--checkpoint", folder])
    assert by_folder.rc == 0 and by_folder.records == exported.records

    both = run_cli(["status", str(tmp_path), "--from-list", listed])
    assert both.rc == 2


# -- bucket objects in a list (objectstore.py, through sources.open_item) -------------------


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A bucket on moto's S3 server (a real S3 HTTP API) on 127.0.0.1; yields a boto3
    client with the bucket's name as `.name`."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import socket

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="listed")
    try:
        yield client
    finally:
        server.stop()


def test_a_list_may_name_bucket_objects(bucket: Any, tmp_path: Path) -> None:
    red = image_bytes(tmp_path, "red.png", (250, 0, 0))
    blue = image_bytes(tmp_path, "blue.jpg", (0, 0, 250))
    bucket.put_object(Bucket="listed", Key="pics/red.png", Body=red)
    bucket.put_object(Bucket="listed", Key="pics/blue.jpg", Body=blue)
    listed = write_list(
        tmp_path / "l.txt",
        "s3://listed/pics/red.png",
        {"url": "s3://listed/pics/blue.jpg", "k": 1},
        "s3://listed/pics/none.png",
    )

    scanned = run_cli(["scan", "--from-list", listed])

    assert scanned.rc == 1, scanned.stderr
    red_rec, blue_rec, none_rec = scanned.records
    assert red_rec["hash"] == hash_of(red) and red_rec["size"] == len(red)
    assert blue_rec["hash"] == hash_of(blue) and blue_rec["meta"] == {"k": 1}
    assert none_rec["status"] == "error" and none_rec["error"]["code"] == "IO_ERROR"

    analyzed = run_cli(["analyze", "--provider", "local", "--from-list", listed])

    assert analyzed.rc == 1, analyzed.stderr
    recs = by_path(analyzed.records)
    assert recs["s3://listed/pics/red.png"]["result"]["format"] == "PNG"
    assert recs["s3://listed/pics/blue.jpg"]["result"]["format"] == "JPEG"
    assert recs["s3://listed/pics/blue.jpg"]["meta"] == {"k": 1}


def test_a_malformed_url_is_an_error_record_not_the_end(site: Site, tmp_path: Path) -> None:
    url = site.serve("ok.png", image_bytes(tmp_path, "ok.png", (6, 6, 6)))
    listed = write_list(tmp_path / "l.txt", "http://[::1/x.jpg", "https://", url)

    done = run_cli(["scan", "--from-list", listed])

    assert done.rc == 1, done.stderr
    bad_host, no_host, fine = done.records
    assert bad_host["error"] == {"code": "IO_ERROR", "message": "list line 1: not a valid URL"}
    assert no_host["error"] == {"code": "IO_ERROR", "message": "list line 2: not a valid URL"}
    assert fine["status"] == "ok"
