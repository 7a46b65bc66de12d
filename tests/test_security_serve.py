"""What `imgbatch serve` refuses, through the real CLI and a real uvicorn: a token on
loopback too (made at each start when none is given), requests from other sites, runs
beyond its limits, malformed input of every kind (a 4xx JSON error, no traceback, the
server still up); and how it stops: cancelled runs record their in-flight items, a
signal ends it within the grace even while a model server hangs. Also /items: keyed
pages while a run writes, and stored results JSON cannot hold."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import load_settings, results_dir, state_dir
from imgbatch.results import ResultStore
from tests.browser import Page
from tests.conftest import REPO, make_image
from tests.fakeopenai import FakeOpenAI
from tests.test_serve import Server, read_events, serve, start_run, tree, wait_until

__all__ = ["serve"]  # the fixture, shared with test_serve.py

TOKEN = re.compile(r"#token=([A-Za-z0-9_-]+)")


def photos_of(root: Path, folders: dict[str, int]) -> Path:
    """`count` images in each folder, each of its own width (so the fake can tell them)."""
    width = 20
    for folder, count in folders.items():
        for i in range(count):
            make_image(root / folder / f"{i:02d}.png", size=(width, 16))
            width += 1
    return root


# -- the token -------------------------------------------------------------------


def test_loopback_without_a_token_makes_one_at_each_start_and_prints_the_dashboard_url(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 2)
    first = serve("--allow-root", tmp_path / "allowed")
    second = serve("--allow-root", tmp_path / "allowed")
    printed = [TOKEN.findall(s.log.read_text()) for s in (first, second)]
    assert [len(p) for p in printed] == [1, 1], printed  # printed once, on stderr
    token = printed[0][0]
    assert len(token) >= 22 and token != printed[1][0]  # >= 128 bits, new at each start
    assert f"{first.url}#token={token}" in first.log.read_text()
    with httpx.Client(base_url=first.url, timeout=30) as anonymous:
        for path in ("/api/runs", "/api/runs/1", "/api/runs/1/report", "/api/nothing"):
            resp = anonymous.get(path)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"].startswith("a bearer token is required")
        refused = anonymous.post("/api/runs", json={"root": str(photos), "provider": "fake"})
        assert refused.status_code == 401
        # a token in a query string is never accepted (it would land in logs and history)
        assert anonymous.get("/api/runs", params={"token": token}).status_code == 401
        assert anonymous.get("/").status_code == 200  # the page holds no data
    with first.client(token=printed[1][0]) as other:  # the other server's token
        assert other.get("/api/runs").status_code == 401
    with first.client() as client:
        run_id = start_run(client, photos)["id"]
        read_events(client, run_id)
        report = client.get(f"/api/runs/{run_id}/report")
        assert report.status_code == 200 and "<html" in report.text.lower()


def test_a_given_token_is_never_printed(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(token="given-token-0123456789")  # IMGBATCH_SERVE_TOKEN
    text = server.log.read_text()
    assert "given-token-0123456789" not in text and "#token=YOUR_TOKEN" in text
    with server.client() as client:
        assert client.get("/api/runs").status_code == 200


def test_the_dashboard_opened_from_the_printed_address_uses_the_made_token(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 3)
    server = serve("--allow-root", tmp_path / "allowed")
    address = TOKEN.search(server.log.read_text())
    assert address is not None
    with Page(server.url + address.group(0)) as page:
        page.wait_for("!document.getElementById('no-runs').hidden")  # the API answered
        assert page.evaluate("location.hash") == ""
        page.evaluate(
            "(() => { const f = document.getElementById('start');"
            f" f.root.value = {json.dumps(str(photos))}; f.provider.value = 'fake';"
            " f.requestSubmit(); })()"
        )
        page.wait_for("document.getElementById('d-state').textContent === 'COMPLETED'")
    with Page(server.url) as bare:  # no token: the page says how to get in
        message = bare.wait_for("document.getElementById('api-error').textContent")
        assert "token" in message


# -- other sites -----------------------------------------------------------------


def test_requests_from_other_sites_are_refused_gets_as_posts(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 2)
    server = serve("--allow-root", tmp_path / "allowed")
    own = server.url.rstrip("/")
    with server.client() as client:
        run_id = start_run(client, photos)["id"]
        read_events(client, run_id)
        paths = ["/api/runs", f"/api/runs/{run_id}/report", f"/api/runs/{run_id}/items"]
        foreign: list[dict[str, str]] = [
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},  # another port of localhost is another origin
            {"Origin": "https://evil.example"},
            {"Origin": "null"},  # a sandboxed frame, a file: page
            {"Origin": own.replace("http://", "https://")},
        ]
        for headers in foreign:
            for path in paths:
                resp = client.get(path, headers=headers)
                assert resp.status_code == 403, (headers, path, resp.text)
                assert "refused" in resp.json()["error"]
            body = {"root": str(photos), "provider": "fake"}
            assert client.post("/api/runs", json=body, headers=headers).status_code == 403
        assert len(client.get("/api/runs").json()["runs"]) == 1  # nothing was started
        for headers in (
            {"Sec-Fetch-Site": "same-origin", "Origin": own},
            {"Sec-Fetch-Site": "none"},
        ):
            for path in paths:
                assert client.get(path, headers=headers).status_code == 200, (headers, path)


# -- limits ----------------------------------------------------------------------


def test_limits_on_what_a_client_may_ask_are_422(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 1)
    server = serve("--allow-root", tmp_path / "allowed")
    root = str(photos)
    with server.client() as client:
        for body, message in (
            ({"root": root, "workers": 33}, "workers must be at most 32"),
            ({"root": root, "max_side": 4097}, "max_side must be at most 4,096"),
            ({"root": root, "limit": 10**1000}, "limit must be at most"),
        ):
            resp = client.post("/api/runs", json=body)
            assert resp.status_code == 422 and message in resp.json()["error"], resp.text
        assert client.get("/api/runs").json()["runs"] == []
        run_id = start_run(client, photos, workers=32, max_side=4096)["id"]
        read_events(client, run_id)
        resp = client.get(f"/api/runs/{run_id}/report", params={"max_thumbnails": "10001"})
        assert resp.status_code == 422 and "max_thumbnails" in resp.json()["error"]
        ok = client.get(f"/api/runs/{run_id}/report", params={"max_thumbnails": "10000"})
        assert ok.status_code == 200


def test_runs_beyond_max_runs_are_429_and_overlapping_roots_409(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    photos = photos_of(allowed / "photos", {"a": 10, "b/inner": 10})
    other = tree(allowed / "other", 10)
    third = tree(allowed / "third", 1)
    server = serve("--allow-root", allowed, "--max-runs", "2", fake={"delay": 0.3})
    with server.client() as client:
        first = start_run(client, photos / "b", workers=1)["id"]
        # the same files twice would be paid twice: inside, or holding, the live root
        for root, where in ((photos / "b" / "inner", "inside"), (photos, "a folder holding")):
            resp = client.post("/api/runs", json={"root": str(root), "provider": "fake"})
            assert resp.status_code == 409, resp.text
            assert where in resp.json()["error"] and f"run {first}" in resp.json()["error"]
        second = start_run(client, other, workers=1)["id"]  # a sibling: fine
        resp = client.post("/api/runs", json={"root": str(third), "provider": "fake"})
        assert resp.status_code == 429 and "--max-runs" in resp.json()["error"], resp.text
        assert len(client.get("/api/runs").json()["runs"]) == 2
        client.post(f"/api/runs/{first}/cancel", json={})
        read_events(client, first)
        third_id = start_run(client, third)["id"]  # one ended: room again
        read_events(client, third_id)
        client.post(f"/api/runs/{second}/cancel", json={})


# -- malformed input -------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """One server (and one ended run) for every hostile request below."""
    base = tmp_path_factory.mktemp("hostile")
    home = base / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IMGBATCH_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    }
    env.pop("PYTHONPATH", None)
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        NO_PROXY="127.0.0.1,localhost",
        IMGBATCH_RPM="60000",
    )
    photos = tree(base / "allowed" / "photos", 2)
    log = base / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_cli", "serve", "--port", "0"]
            + ["--allow-root", str(base / "allowed")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving on (http://\S+/)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        made = TOKEN.search(log.read_text())
        server = Server(found.group(1), proc, made.group(1) if made else None, log)
        with server.client() as client:
            read_events(client, start_run(client, photos)["id"])
        yield server, photos
    finally:
        proc.kill()
        proc.wait()


DEEP = b"[" * 30_000 + b"]" * 30_000  # under the body limit, thousands deep
LONG = "9" * 5000  # more digits than int() takes


def _raw(text: bytes) -> dict[str, Any]:
    """A body sent as it is (what httpx's json= could not write)."""
    return {"content": text, "headers": {"Content-Type": "application/json"}}


def _hostile(root: bytes) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Each malformed request: (method, path, httpx keywords); `root` is an allowed folder."""
    start = b'{"root": "' + root + b'"'
    return {
        "NUL in root": ("POST", "/api/runs", _raw(b'{"root": "' + root + b'/a\\u0000b"}')),
        "lone surrogate in root": ("POST", "/api/runs", _raw(start[:-1] + b'/\\ud800"}')),
        "lone surrogate in model": ("POST", "/api/runs", _raw(start + b', "model": "\\udfff"}')),
        "JSON nested thousands deep": ("POST", "/api/runs", _raw(DEEP)),
        "nested thousands deep in a field": (
            "POST",
            "/api/runs",
            _raw(start + b', "model": ' + DEEP + b"}"),
        ),
        "thousands of digits in a number": (
            "POST",
            "/api/runs",
            _raw(start + b', "workers": ' + LONG.encode() + b"}"),
        ),
        "a number just under int()'s limit": (
            "POST",
            "/api/runs",
            _raw(start + b', "limit": ' + b"9" * 4000 + b"}"),
        ),
        "superscript digit in a number": (
            "POST",
            "/api/runs",
            _raw(start + ', "workers": ²}'.encode()),
        ),
        "huge exponent": ("POST", "/api/runs", _raw(start + b', "workers": 1e999}')),
        "limit ²": ("GET", "/api/runs/1/items", {"params": {"limit": "²"}}),
        "limit ٣ (Arabic-Indic)": ("GET", "/api/runs/1/items", {"params": {"limit": "٣"}}),
        "limit of thousands of digits": ("GET", "/api/runs/1/items", {"params": {"limit": LONG}}),
        "cursor the server never gave": (
            "GET",
            "/api/runs/1/items",
            {"params": {"cursor": "!!"}},
        ),
        "cursor of thousands of characters": (
            "GET",
            "/api/runs/1/items",
            {"params": {"cursor": "A" * 20_000}},
        ),
        "cursor ²": ("GET", "/api/runs/1/items", {"params": {"cursor": "²"}}),
        "max_thumbnails ٣": ("GET", "/api/runs/1/report", {"params": {"max_thumbnails": "٣"}}),
        "max_thumbnails of thousands of digits": (
            "GET",
            "/api/runs/1/report",
            {"params": {"max_thumbnails": LONG}},
        ),
        "Last-Event-ID ²": (
            "GET",
            "/api/runs/1/events",
            {"headers": {"Last-Event-ID": "²".encode("latin-1")}},
        ),
        "Last-Event-ID ٣": (
            "GET",
            "/api/runs/1/events",
            {"headers": {"Last-Event-ID": "٣".encode()}},
        ),
        "Last-Event-ID of thousands of digits": (
            "GET",
            "/api/runs/1/events",
            {"headers": {"Last-Event-ID": LONG}},
        ),
        "run id of thousands of digits": ("GET", f"/api/runs/{LONG}", {}),
        "run id of thousands of digits, items": ("GET", f"/api/runs/{LONG}/items", {}),
        "run id ²": ("GET", "/api/runs/²", {}),
        "run id ٣ to cancel": ("POST", "/api/runs/٣/cancel", {"json": {}}),
        "unknown route": ("GET", "/api/runs/1/nothing", {}),
        "wrong method": ("DELETE", "/api/runs/1", {}),
    }


@pytest.mark.parametrize("case", list(_hostile(b"/x")))
def test_malformed_input_is_a_4xx_json_error_and_the_server_stays_up(
    hostile: tuple[Server, Path], case: str
) -> None:
    server, photos = hostile
    method, path, kwargs = _hostile(os.fsencode(photos))[case]
    before = len(server.log.read_text())
    with server.client() as client:
        resp = client.request(method, path, **kwargs)
        assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text[:300])
        assert resp.headers["content-type"] == "application/json", case
        assert isinstance(resp.json()["error"], str) and resp.json()["error"], case
        assert client.get("/api/runs").status_code == 200  # still up
    assert server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()[before:], server.log.read_text()[before:]


# -- stopping --------------------------------------------------------------------


def test_a_cancelled_run_records_its_in_flight_items(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 40)
    calls = tmp_path / "calls.log"
    server = serve(
        "--allow-root",
        tmp_path / "allowed",
        "--grace",
        "20",
        fake={"delay": 1.0, "log": str(calls)},
    )
    with server.client() as client:
        run_id = start_run(client, photos, workers=4)["id"]
        wait_until(
            lambda: client.get(f"/api/runs/{run_id}").json()["progress"]["done"] >= 4,
            "four items done",
        )
        assert client.post(f"/api/runs/{run_id}/cancel", json={}).status_code == 202
        done = read_events(client, run_id)[-1]["data"]
    assert done["state"] == "ABORTED"
    sent = len(calls.read_text().splitlines())
    recorded = done["counts"]["completed"] + done["counts"].get("failed", 0)
    # every item sent to the provider was waited for and recorded: none paid for nothing
    assert recorded == sent == done["progress"]["done"], (recorded, sent, done["progress"])
    assert sent < 40


def test_sigterm_ends_serve_within_the_grace_while_the_model_server_hangs(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 6)
    with FakeOpenAI(dialect="openai", hang_seconds=300) as fake:
        fake.hang_next(100)
        env = {
            "IMGBATCH_OPENAI_BASE_URL": fake.base_url,
            "IMGBATCH_OPENAI_API_KEY": "sk-test-hanging",
            "IMGBATCH_OPENAI_TIMEOUT": "300",
        }
        server = serve("--allow-root", tmp_path / "allowed", "--grace", "1", env=env)
        with server.client() as client:
            resp = client.post(
                "/api/runs", json={"root": str(photos), "provider": "openai", "workers": 2}
            )
            assert resp.status_code == 202, resp.text
            wait_until(lambda: len(fake.requests) >= 1, "a request to the model server")
        server.proc.send_signal(signal.SIGTERM)
        try:
            rc = server.proc.wait(timeout=1 + 5 + 30)  # --grace + 5 s, and slack
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not end within its grace while the model server hung")
    assert rc == 143, server.log.read_text()
    assert "Traceback" not in server.log.read_text()


# -- /items ----------------------------------------------------------------------


def test_items_pages_are_keyed_never_repeating_an_item_while_the_run_writes(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # walked first, "aaaa" is listed after "zz" by the checkpoint (shorter keys first):
    # a count of items seen would shift as "zz" is recorded before it
    photos = photos_of(tmp_path / "allowed" / "photos", {"aaaa": 6, "zz": 6})
    server = serve("--allow-root", tmp_path / "allowed", fake={"delay": 0.3})
    with server.client() as client:
        run_id = start_run(client, photos, workers=1)["id"]
        wait_until(
            lambda: client.get(f"/api/runs/{run_id}").json()["progress"]["done"] >= 3,
            "three items recorded",
        )
        first = client.get(f"/api/runs/{run_id}/items", params={"limit": "2"}).json()
        assert first["next_cursor"] is not None
        read_events(client, run_id)  # the run ends: "zz" recorded meanwhile
        seen = [r["path"] for r in first["items"]]
        cursor = first["next_cursor"]
        while cursor is not None:
            page = client.get(
                f"/api/runs/{run_id}/items", params={"limit": "2", "cursor": cursor}
            ).json()
            seen += [r["path"] for r in page["items"]]
            cursor = page["next_cursor"]
    rel = [os.path.relpath(p, photos) for p in seen]
    assert len(rel) == len(set(rel)), rel  # no item twice
    assert rel == sorted(rel) and len(rel) == 12  # and every one, in (folder, name) order


def test_items_never_answer_500_for_stored_results_json_cannot_hold(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 3)
    server = serve("--allow-root", tmp_path / "allowed")
    with server.client() as client:
        run_id = start_run(client, photos)["id"]
        read_events(client, run_id)
        # results as an earlier version (or another tool) may have stored them
        settings = load_settings(None)
        with Checkpoint(state_dir(str(photos), settings), create=False) as cp:
            fp = cp.runs()[0]["fingerprint"]
        deep: Any = "bottom"
        for _ in range(300):
            deep = [deep]
        odd = {"score": math.nan, "big": math.inf, "small": -math.inf, "deep": deep}
        with ResultStore(results_dir(settings)) as store:
            hashes = [r["hash"] for r in client.get(f"/api/runs/{run_id}/items").json()["items"]]
            rows = []
            for h in hashes:
                stored = store.get(fp, h)
                assert stored is not None
                rows.append(((fp, h), {**stored, "result": {**stored["result"], **odd}}))
            store.put_many(rows)
        resp = client.get(f"/api/runs/{run_id}/items")
        assert resp.status_code == 200, resp.text
        result = resp.json()["items"][0]["result"]
        assert (result["score"], result["big"], result["small"]) == (None, None, None)
        assert result["tags"][1] == "fake" and json.dumps(result["deep"]).count("[") == 300
    assert "Traceback" not in server.log.read_text()
