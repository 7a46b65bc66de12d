"""`imgbatch serve` through a real uvicorn on a free port: the runs API, the event
stream and its replay, the security rules, the lock shared with the CLI, and the
dashboard in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.browser import Page
from tests.conftest import REPO, make_image, run_cli

SECRET = "test-key-SECRET-serve-must-never-be-seen"


def tree(root: Path, n: int) -> Path:
    """`n` images whose widths (20, 21, ...) the fake provider can be told to fail."""
    for i in range(n):
        make_image(root / f"d{i % 2}" / f"{i:02d}.png", size=(20 + i, 16))
    return root


@dataclass
class Server:
    """`imgbatch serve` in a subprocess (the real CLI, the fake provider registered)."""

    url: str
    proc: subprocess.Popen[bytes]
    token: str | None
    log: Path

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client with the server's token (or `token`)."""
        given = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {given}"} if given else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers: serve(*args, fake={...}, token=..., env={...}); all stopped after."""
    started: list[Server] = []

    def start(
        *args: str | Path,
        fake: dict[str, Any] | None = None,
        token: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        log = tmp_path / f"serve-{len(started)}.log"
        full_env = {
            **os.environ,
            "IMGBATCH_RPM": "60000",  # the fake provider is remote: no pacing
            "IMGBATCH_TEST_FAKE": json.dumps(fake or {}),
            **({"IMGBATCH_SERVE_TOKEN": token} if token else {}),
            **(env or {}),
        }
        full_env.pop("PYTHONPATH", None)
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fake_cli", "serve", "--port", "0", *map(str, args)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=full_env,
                cwd=REPO,
            )
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"serving on (http://\S+/)", log.read_text())
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.05)
        # without a token given, the server makes one and prints the dashboard's address
        made = re.search(r"#token=([\w-]+)", log.read_text())
        server = Server(found.group(1), proc, token or (made.group(1) if made else None), log)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def read_events(
    client: httpx.Client, run_id: int, last_id: int | None = None
) -> list[dict[str, Any]]:
    """The run's event stream, event by event, until `done` (a stream that never says
    `done` fails the test after a minute: heartbeats keep it open for ever)."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    deadline = time.monotonic() + 60
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            assert time.monotonic() < deadline, f"no `done` event after a minute: {events}"
            if line.startswith(":"):
                continue  # a heartbeat
            if line:
                field, _, value = line.partition(":")
                current[field] = value.removeprefix(" ")
                continue
            if current:
                events.append(current)
                if current.get("event") == "done":
                    break
                current = {}
    return [
        {"id": int(e["id"]), "event": e["event"], "data": json.loads(e["data"])} for e in events
    ]


def start_run(client: httpx.Client, root: Path, **options: Any) -> dict[str, Any]:
    resp = client.post("/api/runs", json={"root": str(root), "provider": "fake", **options})
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- the runs API and its event stream -------------------------------------------


def test_a_run_streams_progress_its_failures_and_done_and_is_in_the_checkpoint(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 12)
    fake = {"delay": 0.02, "fail": {"22": ["BAD_IMAGE"], "25": ["BAD_IMAGE"]}}
    server = serve("--allow-root", tmp_path / "allowed", fake=fake, env={"GEMINI_API_KEY": SECRET})
    seen = []
    with server.client() as client:
        resp = client.post(
            "/api/runs", json={"root": str(photos), "provider": "fake", "workers": 2}
        )
        assert resp.status_code == 202, resp.text
        run = resp.json()
        assert resp.headers["location"] == f"/api/runs/{run['id']}"
        events = read_events(client, run["id"])
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids)) and ids[0] >= 1
        assert [e["event"] for e in events].count("done") == 1 and events[-1]["event"] == "done"
        failures = [e["data"] for e in events if e["event"] == "item"]
        assert sorted(os.path.basename(f["path"]) for f in failures) == ["02.png", "05.png"]
        assert {f["error"]["code"] for f in failures} == {"BAD_IMAGE"}
        last = [e["data"] for e in events if e["event"] == "progress"][-1]
        assert (last["done"], last["failed"], last["total"], last["percent"]) == (12, 2, 12, 100.0)
        done = events[-1]["data"]
        assert (done["state"], done["exit_code"]) == ("PARTIAL", 1)
        one = client.get(f"/api/runs/{run['id']}")
        listed = client.get("/api/runs")
        seen += [resp.text, one.text, listed.text, json.dumps(events)]
    # the same checkpoint as the CLI's: `imgbatch status` shows the run
    status = run_cli(["status", photos, "--json"])
    assert status.rc == 0, status.stderr
    recorded = json.loads(status.stdout)
    assert recorded["state"] == "PARTIAL"
    assert (recorded["counts"]["completed"], recorded["counts"]["failed"]) == (10, 2)
    body = one.json()
    assert body["run"] == recorded["id"] and body["id"] == run["id"]
    assert set(recorded) - {"id", "updated", "elapsed"} <= set(body)  # what status --json gives
    assert body["counts"] == recorded["counts"] and body["top_errors"] == recorded["top_errors"]
    assert [r["id"] for r in listed.json()["runs"]] == [run["id"]]
    assert not any(SECRET in text for text in seen)


def test_last_event_id_replays_only_what_came_after_it(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 8)
    fake = {"fail": {str(20 + i): ["BAD_IMAGE"] for i in (1, 3, 6)}}
    server = serve("--allow-root", tmp_path / "allowed", fake=fake)
    with server.client() as client:
        run_id = start_run(client, photos)["id"]
        everything = read_events(client, run_id)
        assert [e["event"] for e in everything].count("item") == 3
        first_item = next(e["id"] for e in everything if e["event"] == "item")
        replay = read_events(client, run_id, last_id=first_item)
        # what came after it: the failures it missed, only the latest progress (a run
        # that moved on publishes several; earlier ones are superseded), then `done`
        missed = [e for e in everything if e["id"] > first_item and e["event"] != "progress"]
        latest_progress = [e for e in everything if e["event"] == "progress"][-1]
        assert replay == sorted([*missed, latest_progress], key=lambda e: e["id"])
        assert replay[-1]["event"] == "done" and latest_progress["data"]["state"] == "PARTIAL"
        # a client that saw `done` is told there is nothing more: 204 stops a browser
        seen_all = {"Last-Event-ID": str(everything[-1]["id"])}
        with client.stream("GET", f"/api/runs/{run_id}/events", headers=seen_all) as resp:
            assert resp.status_code == 204


def test_items_are_paged_with_a_cursor_and_filtered_by_status(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 7)
    server = serve("--allow-root", tmp_path / "allowed", fake={"fail": {"23": ["BAD_IMAGE"]}})
    with server.client() as client:
        run_id = start_run(client, photos)["id"]
        read_events(client, run_id)
        pages, cursor = [], None
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            page = client.get(f"/api/runs/{run_id}/items", params=params).json()
            pages.append(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        paths = [r["path"] for p in pages for r in p]
        assert sorted(os.path.basename(p) for p in paths) == [f"{i:02d}.png" for i in range(7)]
        ok = next(r for p in pages for r in p if r["status"] == "ok")
        assert ok["result"]["tags"][1] == "fake" and ok["provider"] == "fake"
        errors = client.get(f"/api/runs/{run_id}/items", params={"status": "error"}).json()
        assert [os.path.basename(r["path"]) for r in errors["items"]] == ["03.png"]
        assert errors["items"][0]["error"]["code"] == "BAD_IMAGE"
        for bad in ({"limit": "0"}, {"limit": "x"}, {"status": "maybe"}, {"cursor": "-1"}):
            assert client.get(f"/api/runs/{run_id}/items", params=bad).status_code == 422
        assert client.get("/api/runs/99/items").status_code == 404


def test_a_second_run_of_the_same_root_reads_only_its_own_items(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 4)
    server = serve("--allow-root", tmp_path / "allowed")
    with server.client() as client:
        first = start_run(client, photos)["id"]
        read_events(client, first)
        make_image(photos / "new.png", size=(50, 16))
        second = start_run(client, photos)["id"]
        read_events(client, second)
        items = client.get(f"/api/runs/{second}/items").json()["items"]
        assert [os.path.basename(r["path"]) for r in items] == ["new.png"]
        assert len(client.get(f"/api/runs/{first}/items").json()["items"]) == 4


def test_cancel_stops_the_run_which_the_next_run_resumes(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 30)
    server = serve("--allow-root", tmp_path / "allowed", fake={"delay": 0.2})
    with server.client() as client:
        run_id = start_run(client, photos, workers=1)["id"]
        wait_until(
            lambda: client.get(f"/api/runs/{run_id}").json()["progress"]["done"] >= 2,
            "two items done",
        )
        resp = client.post(f"/api/runs/{run_id}/cancel", json={})
        assert resp.status_code == 202, resp.text
        done = read_events(client, run_id)[-1]["data"]
        assert done["state"] == "ABORTED"
        assert 2 <= done["progress"]["done"] < 30
        assert client.post(f"/api/runs/{run_id}/cancel", json={}).status_code == 409
    rest = run_cli(
        ["analyze", photos, "--provider", "fake"],
        env={"IMGBATCH_RPM": "60000"},
        module="tests.fake_cli",
    )
    assert rest.rc == 0, rest.stderr
    assert len(rest.records) == 30 - done["progress"]["done"]


def test_a_cli_run_holding_the_lock_makes_a_start_409(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 20)
    cli = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_cli", "analyze", "--provider", "fake", photos],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "IMGBATCH_RPM": "60000",
            "IMGBATCH_WORKERS": "1",
            "IMGBATCH_TEST_FAKE": json.dumps({"delay": 0.3}),
        },
        cwd=REPO,
    )
    try:
        assert cli.stdout is not None
        cli.stdout.readline()  # it holds the lock: it has written a record
        server = serve("--allow-root", tmp_path / "allowed")
        with server.client() as client:
            resp = client.post("/api/runs", json={"root": str(photos), "provider": "fake"})
            assert resp.status_code == 409, resp.text
            assert f"analyze (pid {cli.pid})" in resp.json()["error"]
            assert client.get("/api/runs").json()["runs"] == []  # a refused start is no run
    finally:
        cli.kill()
        cli.wait()


def test_a_served_run_holding_the_lock_makes_the_cli_exit_3(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 30)
    server = serve("--allow-root", tmp_path / "allowed", fake={"delay": 0.2})
    with server.client() as client:
        run_id = start_run(client, photos, workers=1)["id"]
        res = run_cli(["analyze", photos, "--provider", "fake"], module="tests.fake_cli")
        assert res.rc == 3, res.stderr
        assert f"pid {server.proc.pid}" in res.stderr
        # and a second start on the server is refused like the CLI's
        again = client.post("/api/runs", json={"root": str(photos), "provider": "fake"})
        assert again.status_code == 409 and f"served run {run_id}" in again.json()["error"]
        client.post(f"/api/runs/{run_id}/cancel", json={})


def test_sigterm_stops_the_server_and_its_runs_which_release_the_lock(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 30)
    server = serve("--allow-root", tmp_path / "allowed", fake={"delay": 0.2})
    with server.client() as client:
        run_id = start_run(client, photos, workers=1)["id"]
        wait_until(
            lambda: client.get(f"/api/runs/{run_id}").json()["progress"]["done"] >= 1,
            "an item done",
        )
    assert server.stop(signal.SIGTERM) == 143
    assert "Traceback" not in server.log.read_text()  # the run was stopped, not cut short
    status = json.loads(run_cli(["status", photos, "--json"]).stdout)
    assert status["state"] == "ABORTED" and status["counts"]["completed"] >= 1
    rest = run_cli(
        ["analyze", photos, "--provider", "fake"],
        env={"IMGBATCH_RPM": "60000"},
        module="tests.fake_cli",
    )
    assert rest.rc == 0, rest.stderr  # the lock was released


# -- what is refused -------------------------------------------------------------


def test_roots_outside_the_allowed_folders_are_refused_403(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    tree(allowed / "photos", 1)
    outside = tree(tmp_path / "outside", 1)
    evil = tree(tmp_path / "allowed-evil", 1)
    (allowed / "escape").symlink_to(outside)
    server = serve("--allow-root", allowed)
    with server.client() as client:
        for root in (outside, evil, allowed / ".." / "outside", allowed / "escape", Path("/")):
            resp = client.post("/api/runs", json={"root": str(root), "provider": "fake"})
            assert resp.status_code == 403, (root, resp.text)
            assert "--allow-root" in resp.json()["error"]
        # inside, through `..` that stays inside: accepted
        inside = allowed / "photos" / ".." / "photos"
        assert client.post("/api/runs", json={"root": str(inside)}).status_code == 202
    closed = serve()  # no --allow-root: every root is refused
    assert "every run will be refused" in closed.log.read_text()
    with closed.client() as client:
        resp = client.post("/api/runs", json={"root": str(allowed / "photos")})
        assert resp.status_code == 403


def test_bodies_are_validated_422(serve: Callable[..., Server], tmp_path: Path) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 1)
    server = serve("--allow-root", tmp_path / "allowed")
    root = str(photos)
    bad: list[tuple[Any, str]] = [
        ({"root": root, "dry_run": True}, "unknown field 'dry_run'"),
        ({"root": root, "gemini_api_keys": ["k"]}, "unknown field 'gemini_api_keys'"),
        ({"root": root, "workers": "4"}, "workers must be a whole number"),
        ({"root": root, "workers": True}, "workers must be a whole number"),
        ({"root": root, "limit": 0}, "limit must be at least 1"),
        ({"root": root, "fresh": 1}, "fresh must be true or false"),
        ({"root": root, "model": 3}, "model must be a string"),
        ({"root": "photos"}, "absolute path"),
        ({"provider": "fake"}, "root is required"),
        ([root], "a JSON object"),
        ({"root": str(photos / "00.png")}, "is not a folder"),
        ({"root": root, "provider": "nope"}, "unknown provider 'nope'"),
        ({"root": root, "max_side": 8}, "max_side must be at least 16"),
    ]
    with server.client() as client:
        for body, message in bad:
            resp = client.post("/api/runs", json=body)
            assert resp.status_code == 422, (body, resp.text)
            assert message in resp.json()["error"], (body, resp.text)
        resp = client.post(
            "/api/runs", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 422 and "not valid JSON" in resp.json()["error"]
        resp = client.post(
            "/api/runs", content=b" " * 70_000, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 413
        assert client.get("/api/runs").json()["runs"] == []


def test_a_token_guards_the_api_but_not_the_page(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve("--allow-root", tmp_path, token="s3cret-token")
    assert "s3cret-token" not in server.log.read_text()  # never logged
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        resp = anonymous.get("/api/runs")
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert anonymous.get("/static/dashboard.js").status_code == 200
    with server.client(token="wrong") as client:
        assert client.get("/api/runs").status_code == 401
        assert client.get("/api/runs/1/events").status_code == 401
    with server.client() as client:
        assert client.get("/api/runs").status_code == 200


def test_foreign_hosts_origins_and_non_json_posts_are_refused(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 1)
    server = serve("--allow-root", tmp_path / "allowed")
    port = server.url.rsplit(":", 1)[1].strip("/")
    body = {"root": str(photos)}
    with server.client() as client:
        # DNS rebinding: a name that resolves to 127.0.0.1 is not this server's name
        rebound = client.get("/api/runs", headers={"Host": f"attacker.example:{port}"})
        assert rebound.status_code == 400
        assert client.get("/", headers={"Host": "127.0.0.1:1"}).status_code == 400
        assert client.get("/api/runs", headers={"Host": f"localhost:{port}"}).status_code == 200
        foreign = client.post("/api/runs", json=body, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403
        # a cross-site form can only send text/plain, form or multipart bodies
        plain = {"Content-Type": "text/plain"}
        form = client.post("/api/runs", content=json.dumps(body), headers=plain)
        assert form.status_code == 415
        assert client.get("/api/runs").json()["runs"] == []
        same = client.post("/api/runs", json=body, headers={"Origin": server.url.rstrip("/")})
        assert same.status_code == 202, same.text


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    res = run_cli(["serve", "--host", "0.0.0.0", "--port", "0"], timeout=60)
    assert res.rc == 2 and "needs a token" in res.stderr


def test_without_the_serve_extra_the_command_names_the_pip_line(tmp_path: Path) -> None:
    hide = "import sys; sys.modules['starlette'] = None; from imgbatch.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", hide, "serve"], capture_output=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 2
    assert "pip install 'imgbatch[serve]'" in proc.stderr.decode()


# -- the dashboard in the browser ------------------------------------------------


def test_the_dashboard_starts_a_run_follows_it_live_to_100_percent_and_opens_its_report(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    photos = tree(tmp_path / "allowed" / "photos", 24)
    fake = {"delay": 0.3, "fail": {"23": ["BAD_IMAGE"]}}
    server = serve("--allow-root", tmp_path / "allowed", fake=fake, token="page-token")
    with Page(server.url + "#token=page-token") as page:
        page.wait_for("!document.getElementById('no-runs').hidden")  # the API answered
        # the token moved from the address bar to this tab's storage
        assert page.evaluate("location.hash") == ""
        assert page.evaluate("sessionStorage.getItem('imgbatch-token')") == "page-token"
        # every value the progress bar takes, from the run's start to its end
        page.evaluate(
            "window.seen = []; (() => { const bar = document.getElementById('d-progress');"
            " new MutationObserver(() => seen.push(Number(bar.getAttribute('aria-valuenow'))))"
            ".observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']}); })()"
        )
        page.evaluate(
            "(() => { const f = document.getElementById('start');"
            f" f.root.value = {json.dumps(str(photos))}; f.provider.value = 'fake';"
            " f.requestSubmit(); })()"
        )
        page.wait_for("document.getElementById('d-state').textContent === 'PARTIAL'")
        seen = page.evaluate("seen")
        assert seen[-1] == 100 and any(0 < v < 100 for v in seen), seen  # live, to the end
        numbers = page.evaluate("document.getElementById('d-numbers').textContent")
        assert numbers.startswith("24 of 24 images · 100% · 1 failed"), numbers
        failures = page.evaluate("document.getElementById('d-failures').textContent")
        assert failures == "BAD_IMAGE" + str(photos / "d1" / "03.png") + " · injected BAD_IMAGE"
        assert page.evaluate("document.querySelector('#runs tr.sel td').textContent") == "1"
        page.screenshot(tmp_path / "dashboard.png")
        # the report, fetched with the token, opened from a blob: URL under the page's policy
        page.evaluate("document.getElementById('d-report').click()")
        href = page.wait_for(
            "(document.querySelector('#d-report-links a') || {}).href", timeout=120
        )
        assert href.startswith("blob:")
        page.evaluate(f"location.href = {json.dumps(href)}")
        shown = page.wait_for("(document.getElementById('shown') || {}).textContent")
        assert shown == "24 of 24 shown"  # its script ran: the page's policy allows it
        # every file is a picture (the fake provider's BAD_IMAGE is its own verdict)
        assert page.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") == 24
    with Image.open(tmp_path / "dashboard.png") as img:
        assert img.size == (1280, 900)
