"""`analyze --batch`: Gemini Batch API jobs submitted by one run and collected by a later
one, through the real CLI (a subprocess) and the real google-genai SDK talking HTTP to the
fake Gemini server's Batch and Files APIs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, CliResult, make_image, run_cli, the_state_folder
from tests.fakegemini import FakeGemini

KEY = "test-key-BATCH-0123456789"
LIVE_ONLY = {"batch"}  # the one field a collected record adds to a live one


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY}, seed=3) as fake:
        yield fake
        assert fake.errors == []  # the fake itself never crashed


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(6):
        make_image(root / f"img{i}.jpg", size=(900 + 10 * i, 600), color=(40 * i, 90, 150))
    return root


def env_for(server: FakeGemini, **more: str) -> dict[str, str]:
    return {
        "GEMINI_API_KEY": KEY,
        "IMGBATCH_GEMINI_BASE_URL": server.url,
        "IMGBATCH_BATCH_POLL": "0.05",
        **more,
    }


def batch(server: FakeGemini, root: Path, *args: str, key: str = KEY) -> CliResult:
    return run_cli(["analyze", "--batch", *args, root], env=env_for(server, GEMINI_API_KEY=key))


def submitted(server: FakeGemini) -> Counter[str]:
    """How many jobs carried each request key (our keys are content hashes)."""
    return Counter(key for job in server.batch.jobs for key in job.keys)


def test_a_run_submits_a_later_run_collects_with_a_live_runs_record_shape(
    server: FakeGemini, photos: Path
) -> None:
    make_image(photos / "zcopy.jpg", size=(900, 600), color=(0, 90, 150))  # = img0.jpg
    server.batch.default_plan.delay = 3600  # Google's turnaround: within 24 h
    first = batch(server, photos, "--batch-max-requests", "4")
    assert first.rc == 0, first.stderr
    assert first.records == []  # nothing is back yet
    assert "submitted 6 requests in 2 jobs; 2 jobs pending; collected 0 items" in first.stderr
    assert "the Batch API price applies" in first.stderr
    jobs = server.batch.jobs
    assert [len(j.keys) for j in jobs] == [4, 2] and sum(submitted(server).values()) == 6
    assert {j.display_name for j in jobs} == {f.display_name for f in server.batch.files.values()}
    [upload] = jobs[0].requests[0].images  # decoded once, downscaled, without EXIF
    assert upload.format == "JPEG" and max(upload.width or 0, upload.height or 0) == 768
    assert jobs[0].requests[0].schema_field == "responseSchema"

    status = run_cli(["status", photos])
    assert "mode: batch (the Batch API price applies: half of live)" in status.stdout.decode()
    assert "batch jobs pending: 2 (6 requests" in status.stdout.decode()
    as_json = json.loads(run_cli(["status", photos, "--json"]).stdout)
    assert [j["state"] for j in as_json["batch_jobs"]] == ["PENDING", "PENDING"]

    server.batch.advance(3600)
    second = batch(server, photos)
    assert second.rc == 0, second.stderr
    assert "submitted 0 requests in 0 jobs; 0 jobs pending; collected 6 items" in second.stderr
    collected = {r["path"]: r for r in second.records}
    assert len(collected) == 7  # the copy too, from the stored result
    assert collected[str(photos / "zcopy.jpg")]["cached"] is True
    for r in collected.values():
        assert r["status"] == "ok" and r["provider"] == "gemini"
        assert r.get("batch", False) is not r["cached"]  # a batch answer, or a copy of one
        assert r["input_tokens"] > 0 and set(r["result"]) >= {"description", "tags"}
    assert server.batch.files == {}  # input and results files deleted once collected
    assert batch(server, photos).records == []  # nothing left to do

    live_root = photos.parent / "live"
    make_image(live_root / "one.jpg", size=(50, 40))
    live = run_cli(
        ["analyze", "--provider", "gemini", live_root],
        env=env_for(server),
    )
    [live_record] = live.records
    assert set(collected[str(photos / "img1.jpg")]) - set(live_record) == LIVE_ONLY
    assert set(live_record) <= set(collected[str(photos / "img1.jpg")])

    runs = run_cli(["runs", photos]).stdout.decode().splitlines()
    assert runs[0].split()[3] == "mode" and all(line.split()[4] == "batch" for line in runs[1:])


def test_items_in_a_pending_job_are_neither_resubmitted_nor_sent_live(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 3600
    assert batch(server, photos).rc == 0
    again = batch(server, photos)
    assert again.rc == 0 and "submitted 0 requests in 0 jobs; 1 jobs pending" in again.stderr
    live = run_cli(["analyze", "--provider", "gemini", photos], env=env_for(server))
    assert live.rc == 0, live.stderr
    assert live.records == []
    assert "6 waiting in Batch API jobs" in live.stderr
    assert [r.route for r in server.requests].count("generate") == 0
    assert max(submitted(server).values()) == 1


def test_per_line_errors_are_classified_as_live_failures_and_transient_ones_resubmitted(
    server: FakeGemini, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    for i in range(9):
        make_image(root / f"{i}.png", size=(40 + i, 30))
    # HTTP statuses and gRPC codes: 429 / 8 RESOURCE_EXHAUSTED, 504 / 4 DEADLINE_EXCEEDED,
    # 13 INTERNAL, 14 UNAVAILABLE, 400; a blocked prompt; a last line answered normally
    server.batch.plan_next(lines=[429, 8, 504, 4, 13, 14, 400, "blocked"])
    assert batch(server, root).rc == 0  # submits; a later run collects
    res = batch(server, root)
    assert res.rc == 1, res.stderr  # collected items failed
    by_key = dict(zip(server.batch.jobs[0].keys, range(9), strict=True))
    codes = {by_key[r["hash"]]: r["error"]["code"] for r in res.records if r["status"] == "error"}
    assert codes == {
        0: "RATE_LIMIT",
        1: "RATE_LIMIT",
        2: "TIMEOUT",
        3: "TIMEOUT",
        4: "AI_ERROR",
        5: "AI_ERROR",
        6: "AI_ERROR",
        7: "BLOCKED",
    }
    messages = [r["error"]["message"] for r in res.records if r["status"] == "error"]
    assert any("(8 RESOURCE_EXHAUSTED)" in m for m in messages)
    assert any("(429 RESOURCE_EXHAUSTED)" in m for m in messages)
    assert all(r["batch"] for r in res.records)
    # the collecting run submitted the transient failures again, not the blocked one
    assert "submitted 7 requests in 1 jobs" in res.stderr
    resent = server.batch.jobs[1].keys
    assert sorted(by_key[k] for k in resent) == [0, 1, 2, 3, 4, 5, 6]
    nxt = batch(server, root)
    assert nxt.rc == 0, nxt.stderr
    assert [r["status"] for r in nxt.records] == ["ok"] * 7


@pytest.mark.parametrize("fate", ["FAILED", "EXPIRED", "CANCELLED"])
def test_a_job_that_ends_without_results_has_its_items_submitted_again(
    server: FakeGemini, photos: Path, fate: str
) -> None:
    server.batch.plan_next(fate=fate, delay=10)
    server.batch.plan_next(delay=1000)  # another job still pending meanwhile
    first = batch(server, photos, "--batch-max-requests", "4")
    assert first.rc == 0, first.stderr
    server.batch.advance(10)
    second = batch(server, photos)
    assert second.rc == 0, second.stderr
    assert (
        f"ended {fate}" in second.stderr and "its 4 requests are submitted again" in second.stderr
    )
    assert second.records == []  # nothing happened to the items themselves
    ended, pending, again = server.batch.jobs
    assert set(again.keys) == set(ended.keys) and not set(pending.keys) & set(again.keys)
    server.batch.advance(1000)
    third = batch(server, photos)
    assert [r["status"] for r in third.records] == ["ok"] * 6


def test_a_succeeded_job_whose_results_404_is_polled_again(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.plan_next(download_404s=2, delay=5)
    batch(server, photos)
    server.batch.advance(5)
    for _ in range(2):
        res = batch(server, photos)
        assert res.rc == 0 and res.records == []
        assert "cannot be downloaded yet" in res.stderr and "1 jobs pending" in res.stderr
    res = batch(server, photos)
    assert len(res.records) == 6 and "collected 6 items" in res.stderr
    assert len(server.batch.jobs) == 1  # polled again, never submitted again


def test_batch_wait_polls_until_every_job_has_ended(server: FakeGemini, photos: Path) -> None:
    server.batch.default_plan.delay = 1e9  # ends when the test says so
    polls = 0

    def end_after_three_polls(rec: Any) -> None:
        nonlocal polls
        if rec.route == "batch_get":
            polls += 1
            if polls == 3:
                server.batch.advance(1e9)

    server.configure(before_answer=end_after_three_polls)
    res = batch(server, photos, "--batch-wait", "--batch-max-requests", "3")
    assert res.rc == 0, res.stderr
    assert len(res.records) == 6 and all(r["batch"] for r in res.records)
    assert "waiting for 2 batch job(s)" in res.stderr
    assert "0 jobs pending; collected 6 items" in res.stderr
    assert [r.route for r in server.requests].count("batch_get") > 3  # polled until ended


def test_caps_leave_the_rest_for_a_later_run(server: FakeGemini, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(8):
        make_image(root / f"{i}.png", size=(40 + i, 30))
    server.batch.default_plan.delay = 100
    args = ("--batch-max-requests", "2", "--batch-max-pending", "5")
    first = batch(server, root, *args)
    assert first.rc == 0, first.stderr
    assert "submitted 5 requests in 3 jobs" in first.stderr
    assert "3 left for a later run" in first.stderr
    second = batch(server, root, *args)  # still 5 pending: room for none
    assert "submitted 0 requests in 0 jobs; 3 jobs pending" in second.stderr
    server.batch.advance(100)
    third = batch(server, root, *args)
    assert "submitted 3 requests in 2 jobs" in third.stderr and "collected 5 items" in third.stderr
    assert max(submitted(server).values()) == 1 and len(submitted(server)) == 8


@pytest.mark.parametrize("route", ["upload", "batch_create"])
def test_a_429_on_upload_or_create_leaves_the_rest_for_the_next_run(
    server: FakeGemini, photos: Path, route: str
) -> None:
    server.batch.fail_next(1, 429, on=route, retry_delay="60s")
    first = batch(server, photos, "--batch-max-requests", "2")
    assert first.rc == 0, first.stderr
    assert "waits for the next run" in first.stderr
    # what was prepared waits as recorded submissions; what was not, for the next scan
    assert "submitted 0 requests in 0 jobs;" in first.stderr
    assert server.batch.jobs == []
    second = batch(server, photos, "--batch-max-requests", "2")
    assert second.rc == 0, second.stderr
    assert "submitted 6 requests in 3 jobs; 3 jobs pending" in second.stderr
    assert max(submitted(server).values()) == 1 and len(submitted(server)) == 6
    if route == "batch_create":  # create was tried: the next run looked it up first
        routes = [r.route for r in server.requests]
        refused = routes.index("batch_create")
        assert refused < routes.index("batch_list") < routes.index("batch_create", refused + 1)


def test_the_daily_quota_is_exit_4_and_a_rejected_key_exit_5(
    server: FakeGemini, photos: Path
) -> None:
    quota = "BatchRequestsPerDayPerProject"
    server.batch.fail_next(1, 429, on="batch_create", quota_id=quota, retry_delay="3600s")
    res = batch(server, photos)
    assert res.rc == 4, res.stderr
    assert "daily quota is exhausted" in res.stderr
    assert "submitted 0 requests in 0 jobs; 1 jobs pending" in res.stderr  # waits, recorded
    make_image(photos / "new.jpg", size=(64, 48))  # to send: the pending one is KEY's alone
    bad = batch(server, photos, key="test-key-WRONG-000")
    assert bad.rc == 5 and "rejected the key" in bad.stderr
    assert "test-key-WRONG-000" not in bad.stderr
    ok = batch(server, photos)
    assert ok.rc == 0 and "submitted 7 requests in 2 jobs" in ok.stderr


def test_batch_is_for_gemini_only(server: FakeGemini, photos: Path) -> None:
    res = run_cli(["analyze", "--batch", "--provider", "local", photos])
    assert res.rc == 2 and "--batch needs the gemini provider" in res.stderr
    res = run_cli(["analyze", "--batch-wait", photos], env=env_for(server))
    assert res.rc == 2 and "--batch-wait goes with --batch" in res.stderr


def test_a_job_of_other_settings_is_stored_for_them_not_written(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 10
    assert batch(server, photos).rc == 0
    server.batch.advance(10)
    other = batch(server, photos, "--prompt", "Name the main colour only.")
    assert other.rc == 0, other.stderr
    assert other.records == []  # the old job's answers are not of these settings
    assert "submitted 6 requests" in other.stderr
    live = run_cli(["analyze", "--provider", "gemini", photos], env=env_for(server))
    assert [r["cached"] for r in live.records] == [True] * 6  # the old job's answers
    assert [r.route for r in server.requests].count("generate") == 0


def test_requests_files_are_split_under_the_size_cap(server: FakeGemini, photos: Path) -> None:
    """Library level: a request file stays under `max_file_bytes`."""
    from imgbatch.checkpoint import Checkpoint
    from imgbatch.config import Settings
    from imgbatch.output import JsonlSink
    from imgbatch.pipeline import RunContext, RunOptions
    from imgbatch.pipeline.batch import BatchRun
    from imgbatch.providers.gemini import GeminiProvider

    settings = Settings(provider="gemini", gemini_api_keys=(KEY,), gemini_base_url=server.url)
    provider = GeminiProvider(settings, env={})
    out = photos.parent / "out.jsonl"
    with out.open("wb") as fh, Checkpoint(photos.parent / "state") as cp:
        cp.lock("analyze")
        sink = JsonlSink(fh)
        ctx = RunContext(str(photos), settings, RunOptions(batch=True), provider, cp, sink)
        run = BatchRun(ctx, max_file_bytes=25_000)
        summary = run.run()
        sink.close()
    provider.close()
    sizes = [len(server.batch.files[j.input_file or ""].data) for j in server.batch.jobs]
    assert all(size <= 25_000 for size in sizes) and len(sizes) > 1
    assert summary.batch is not None and summary.batch["submitted"] == 6


# -- crash safety ------------------------------------------------------------------------


def _run_until(
    args: list[str], env: dict[str, str], server: FakeGemini, kill: tuple[str, int] | None
) -> tuple[list[dict[str, Any]], bool]:
    """Run the CLI; SIGKILL it at the moment `kill` names: ("request", n) when the server
    has acted on the n-th Batch or Files API request but not yet answered it, ("line", n)
    after its n-th output line. Returns the lines it wrote, and whether it was killed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout is not None
    seen = 0

    def at_request(rec: Any) -> None:
        nonlocal seen
        if rec.route != "generate":
            seen += 1
            if kill is not None and kill[0] == "request" and seen == kill[1]:
                os.kill(proc.pid, signal.SIGKILL)

    server.configure(before_answer=at_request)
    out: list[dict[str, Any]] = []
    for raw in proc.stdout:
        out.append(json.loads(raw))
        if kill is not None and kill[0] == "line" and len(out) == kill[1]:
            proc.send_signal(signal.SIGKILL)
            out += [json.loads(line) for line in proc.stdout.read().splitlines()]
            break
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    server.configure(before_answer=None)
    assert proc.returncode in (0, 1, -signal.SIGKILL), stderr
    return out, proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_seeded_moments_of_submission_and_collection_loses_nothing_and_pays_once(
    server: FakeGemini, tmp_path: Path
) -> None:
    from imgbatch.checkpoint import Checkpoint

    rng = random.Random(2024)  # the kill moments are reproducible
    root = tmp_path / "photos"
    files = 24
    for i in range(files):
        make_image(root / f"{i:02d}.png", size=(30 + i, 20))
    make_image(root / "dup.png", size=(30, 20))  # a copy of 00.png
    server.batch.default_plan.delay = 50
    server.batch.list_page_max = 2  # the lookup after a kill pages through the list
    env = {**os.environ, **env_for(server)}
    args = [sys.executable, "-m", "imgbatch", "analyze", "--batch", str(root)]
    args += ["--batch-max-requests", "5"]
    lines: list[dict[str, Any]] = []
    killed: list[tuple[str, int]] = []
    for _ in range(16):
        kind = rng.choice(["request", "request", "line"])
        kill = (kind, rng.randint(1, 10) if kind == "request" else rng.randint(1, 5))
        out, was_killed = _run_until(args, env, server, kill)
        lines += out
        killed += [kill] if was_killed else []
        with Checkpoint(the_state_folder()) as cp:  # opens cleanly after every kill
            assert cp.runs()
        if rng.random() < 0.5:
            server.batch.advance(50)  # some jobs end: the next run collects
    for _ in range(6):  # then runs without kills until every job is collected
        server.batch.advance(50)
        lines += _run_until(args, env, server, None)[0]
    status = json.loads(run_cli(["status", root, "--json"]).stdout)
    assert "batch_jobs" not in status and status["state"] == "COMPLETED"

    ok = {r["path"] for r in lines if r["status"] == "ok"}
    assert ok == {str(p) for p in root.iterdir()}  # no item lost
    jobs = server.batch.jobs
    carried = Counter(d for job in jobs for d in job.digests)
    assert max(carried.values()) == 1  # no two jobs carry the same image: paid once
    assert len({j.display_name for j in jobs}) == len(jobs)  # no submission created twice
    assert len(carried) == files  # the copy was never sent
    runs = [json.loads(x) for x in run_cli(["runs", root, "--json"]).stdout.splitlines()]
    # a run killed at a request had not ended; one killed after its last line may have
    aborted = Counter(r["state"] for r in runs)["ABORTED"]
    assert sum(kind == "request" for kind, _ in killed) <= aborted <= len(killed)
    # the moments drawn killed runs while they submitted and while they collected
    assert len(killed) >= 8 and {kind for kind, _ in killed} == {"request", "line"}
