"""`analyze --batch --provider openai`: OpenAI Batch API jobs submitted by one run and
collected by a later one, through the real CLI (a subprocess) and the real `openai` SDK
talking HTTP to the fake server's Files and Batch APIs (tests/fakeopenai_batch.py)."""

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
from tests.fakeopenai import FakeOpenAI
from tests.fakeopenai_batch import FakeOpenAIBatch

KEY = "sk-test-BATCH-0123456789abcdef"
OTHER_KEY = "sk-test-OTHER-0123456789abcdef"


@pytest.fixture
def server() -> Iterator[FakeOpenAIBatch]:
    with FakeOpenAIBatch(keys={KEY, OTHER_KEY}) as fake:
        yield fake
        assert fake.errors == []  # the fake itself never crashed


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(5):
        make_image(root / f"img{i}.jpg", size=(90 + 10 * i, 60), color=(40 * i, 90, 150))
    return root


def env_for(base_url: str, key: str = KEY, **more: str) -> dict[str, str]:
    return {
        "IMGBATCH_OPENAI_API_KEY": key,
        "IMGBATCH_OPENAI_BASE_URL": base_url,
        "IMGBATCH_BATCH_POLL": "0.05",
        **more,
    }


def batch(server: FakeOpenAIBatch, root: Path, *args: str, key: str = KEY) -> CliResult:
    argv = ["analyze", "--provider", "openai", "--batch", *args, root]
    return run_cli(argv, env=env_for(server.base_url, key))


def test_a_run_submits_a_later_run_collects_and_a_rerun_costs_nothing(
    server: FakeOpenAIBatch, photos: Path
) -> None:
    first = batch(server, photos)
    assert first.rc == 0, first.stderr
    assert first.records == []  # nothing answered yet
    assert "submitted 5 requests in 1 jobs" in first.stderr
    assert server.creates == 1 and server.count_route("chat") == 0  # nothing sent live
    (made,) = server.batches.values()
    assert made.metadata["imgbatch_submission"].startswith("imgbatch-r")
    line = made.lines[0]
    assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
    assert line["body"]["model"] == "gpt-4.1-mini"
    assert line["body"]["response_format"]["type"] == "json_schema"  # the live request's body
    assert len(line["custom_id"]) >= 16  # the content hash

    again = batch(server, photos)  # still running: polled, nothing new sent
    assert again.rc == 0 and again.records == [] and server.creates == 1

    server.end("completed")
    collected = batch(server, photos)
    assert collected.rc == 0, collected.stderr
    records = collected.records
    assert sorted(Path(r["path"]).name for r in records) == [f"img{i}.jpg" for i in range(5)]
    assert all(r["status"] == "ok" and r["batch"] is True for r in records)
    assert all(r["provider"] == "openai" and r["result"]["description"] for r in records)
    assert all(r["input_tokens"] and r["output_tokens"] for r in records)
    assert server.files == {}  # input, output files deleted once collected

    rerun = batch(server, photos)  # unchanged and stored: costs nothing
    assert rerun.rc == 0, rerun.stderr
    assert server.creates == 1 and server.uploads == 1 and server.count_route("chat") == 0
    assert all(r.get("status") != "ok" or r.get("batch") is not True for r in rerun.records)
    assert KEY not in first.stderr + collected.stderr + rerun.stderr
    stored = [p for p in the_state_folder().rglob("*") if p.is_file()]
    assert stored and not any(KEY.encode() in p.read_bytes() for p in stored)  # a hash only


def test_batch_wait_polls_until_the_batch_ended_and_collects_it(
    server: FakeOpenAIBatch, photos: Path
) -> None:
    def end_once_created(rec: Any) -> None:
        if rec.route == "GET batches/ID" and server.creates:
            server.end("completed")  # polled once while running, then it ends

    server.before_answer = end_once_created
    res = batch(server, photos, "--batch-wait")
    assert res.rc == 0, res.stderr
    assert len(res.records) == 5 and all(r["batch"] for r in res.records)
    assert server.creates == 1 and server.count_route("GET batches/ID") >= 1


def test_status_lists_the_pending_jobs(server: FakeOpenAIBatch, photos: Path) -> None:
    assert batch(server, photos).rc == 0
    status = json.loads(run_cli(["status", photos, "--json"]).stdout)
    (job,) = status["batch_jobs"]
    (made,) = server.batches.values()
    assert job["name"] == made.id and job["requests"] == 5
    assert job["id"] == made.metadata["imgbatch_submission"]
    text = run_cli(["status", photos]).stderr + run_cli(["status", photos]).stdout.decode()
    assert "batch jobs pending: 1" in text


@pytest.mark.parametrize("how", ["expired", "cancelled"])
def test_an_expired_or_cancelled_batch_gives_what_it_finished_and_the_rest_is_resubmitted(
    server: FakeOpenAIBatch, photos: Path, how: str
) -> None:
    assert batch(server, photos).rc == 0
    (first,) = server.batches.values()
    server.end(how, finished=2)
    res = batch(server, photos)
    assert res.rc == 0, res.stderr
    done = {first.lines[i]["custom_id"] for i in range(2)}
    assert len(res.records) == 2 and all(r["batch"] and r["status"] == "ok" for r in res.records)
    assert {r["hash"] for r in res.records} == done
    assert server.creates == 2  # the rest, in a new batch, in the same run
    second = list(server.batches.values())[1]
    assert set(second.custom_ids) == set(first.custom_ids) - done  # never paid twice
    assert f"ended {how.upper()}: collected 2 items; its 3 others" in res.stderr
    server.end("completed")
    last = batch(server, photos)
    assert len(last.records) == 3 and server.creates == 2
    assert set(server.answered.values()) == {1} and len(server.answered) == 5  # paid once


def test_a_failed_batch_is_resubmitted_whole(server: FakeOpenAIBatch, photos: Path) -> None:
    server.fail_next_batch = "Invalid input: something"
    assert batch(server, photos).rc == 0
    res = batch(server, photos)  # sees it failed: all submitted again
    assert res.rc == 0, res.stderr
    assert res.records == [] and server.creates == 2
    assert "ended FAILED (Invalid input: something)" in res.stderr
    first, second = server.batches.values()
    assert sorted(first.custom_ids) == sorted(second.custom_ids)
    server.end("completed")
    assert len(batch(server, photos).records) == 5


def test_per_line_errors_are_classified_as_live_failures_and_resubmitted(
    server: FakeOpenAIBatch, photos: Path
) -> None:
    assert batch(server, photos).rc == 0
    server.line_errors.extend([429, 500])
    server.end("completed")
    res = batch(server, photos)
    assert res.rc == 1, res.stderr  # some items failed
    failed = [r for r in res.records if r["status"] == "error"]
    assert sorted(r["error"]["code"] for r in failed) == ["AI_ERROR", "RATE_LIMIT"]
    assert all(r["batch"] for r in failed)
    assert "429" in " ".join(r["error"]["message"] for r in failed)
    # transient: those two (only) submitted again, by the run that collected them
    assert server.creates == 2
    assert sorted(list(server.batches.values())[1].custom_ids) == sorted(r["hash"] for r in failed)


def test_a_job_is_asked_about_only_with_the_key_that_made_it(
    server: FakeOpenAIBatch, photos: Path
) -> None:
    assert batch(server, photos).rc == 0
    server.end("completed")
    before = len(server.requests)
    other = batch(server, photos, key=OTHER_KEY)  # another organisation's key
    assert other.rc == 0, other.stderr
    assert "made with an API key that is not configured now" in other.stderr
    assert other.records == [] and server.creates == 1  # neither resubmitted nor sent live
    assert server.count_route("chat") == 0
    # only its own Batch API check: the batch is never asked about with the other key
    assert [r.route for r in server.requests[before:]] == ["GET batches"]
    assert OTHER_KEY not in other.stderr and KEY not in other.stderr
    back = batch(server, photos)  # its own key again: collected
    assert len(back.records) == 5 and server.creates == 1


def test_a_server_without_a_batch_api_is_exit_2_and_nothing_is_sent(photos: Path) -> None:
    with FakeOpenAI(dialect="llamacpp") as plain:  # 404 on /v1/batches, as vLLM, Ollama
        res = run_cli(
            ["analyze", "--provider", "openai", "--batch", photos], env=env_for(plain.base_url)
        )
        assert res.rc == 2, res.stderr
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, res.stderr
        assert f"{plain.url} has no Batch API" in lines[0]
        assert res.records == []
        assert {r.path.split("?")[0] for r in plain.requests} == {"/v1/batches"}
    status = run_cli(["analyze", "--provider", "ollama", "--batch", photos])
    assert status.rc == 2 and "--batch needs the gemini provider" in status.stderr


# -- crash safety ------------------------------------------------------------------------


def _run_until(
    args: list[str], env: dict[str, str], server: FakeOpenAIBatch, kill: tuple[str, int] | None
) -> tuple[list[dict[str, Any]], bool]:
    """Run the CLI; SIGKILL it at the moment `kill` names: ("request", n) when the server
    has acted on the n-th Files or Batch API request but not yet answered it, ("line", n)
    after its n-th output line. Returns the lines it wrote, and whether it was killed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout is not None
    seen = 0

    def at_request(rec: Any) -> None:
        nonlocal seen
        seen += 1
        if kill is not None and kill[0] == "request" and seen == kill[1]:
            os.kill(proc.pid, signal.SIGKILL)

    server.before_answer = at_request
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
    server.before_answer = None
    assert proc.returncode in (0, 1, -signal.SIGKILL), stderr
    return out, proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "route", ["GET batches", "POST files", "POST batches", "GET files/content"]
)
def test_sigkill_at_each_step_loses_nothing_and_pays_once(
    server: FakeOpenAIBatch, tmp_path: Path, route: str
) -> None:
    """Killed once the server acted on the first request of `route`: after the intent
    (the check), after the upload, after the create, during the collection."""
    root = tmp_path / "photos"
    for i in range(6):
        make_image(root / f"{i}.png", size=(30 + i, 20))
    env = {**os.environ, **env_for(server.base_url)}
    args = [sys.executable, "-m", "imgbatch", "analyze", "--provider", "openai", "--batch"]
    args += [str(root), "--batch-max-requests", "4"]
    target = route.replace("/content", "")

    def kill_at(rec: Any) -> None:
        if rec.route.startswith(target) and (
            route != "GET files/content" or "content" in rec.route
        ):
            os.kill(proc_pid[0], signal.SIGKILL)

    proc_pid: list[int] = []
    if route == "GET files/content":
        assert batch(server, root).rc == 0  # submitted
        server.end("completed")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    proc_pid.append(proc.pid)
    server.before_answer = kill_at
    out, _ = proc.communicate(timeout=120)
    server.before_answer = None
    assert proc.returncode == -signal.SIGKILL
    lines = [json.loads(x) for x in out.splitlines()]
    for _ in range(3):
        lines += _run_until(args, env, server, None)[0]
        server.end("completed")
    lines += _run_until(args, env, server, None)[0]
    ok = {r["path"] for r in lines if r["status"] == "ok"}
    assert ok == {str(p) for p in root.iterdir()}  # no item lost
    assert max(server.carried().values()) == 1  # no image in two batches: paid once
    names = [b.metadata["imgbatch_submission"] for b in server.batches.values()]
    assert len(set(names)) == len(names)  # no submission created twice
    status = json.loads(run_cli(["status", root, "--json"]).stdout)
    assert "batch_jobs" not in status


@pytest.mark.slow
def test_sigkill_at_seeded_moments_of_submission_and_collection_loses_nothing_and_pays_once(
    server: FakeOpenAIBatch, tmp_path: Path
) -> None:
    rng = random.Random(2026)  # the kill moments are reproducible
    root = tmp_path / "photos"
    files = 16
    for i in range(files):
        make_image(root / f"{i:02d}.png", size=(30 + i, 20))
    make_image(root / "dup.png", size=(30, 20))  # a copy of 00.png
    env = {**os.environ, **env_for(server.base_url)}
    args = [sys.executable, "-m", "imgbatch", "analyze", "--provider", "openai", "--batch"]
    args += [str(root), "--batch-max-requests", "4"]
    lines: list[dict[str, Any]] = []
    killed: list[tuple[str, int]] = []
    for _ in range(10):
        kind = rng.choice(["request", "request", "line"])
        kill = (kind, rng.randint(1, 8) if kind == "request" else rng.randint(1, 4))
        out, was_killed = _run_until(args, env, server, kill)
        lines += out
        killed += [kill] if was_killed else []
        if rng.random() < 0.5:
            server.end("completed")
    for _ in range(4):
        server.end("completed")
        lines += _run_until(args, env, server, None)[0]
    status = json.loads(run_cli(["status", root, "--json"]).stdout)
    assert "batch_jobs" not in status and status["state"] == "COMPLETED"
    ok = {r["path"] for r in lines if r["status"] == "ok"}
    assert ok == {str(p) for p in root.iterdir()}  # no item lost
    carried = server.carried()
    assert max(carried.values()) == 1 and len(carried) == files  # paid once; copy never sent
    names = [b.metadata["imgbatch_submission"] for b in server.batches.values()]
    assert len(set(names)) == len(names)
    assert len(killed) >= 5 and {kind for kind, _ in killed} == {"request", "line"}
    assert Counter(r.route for r in server.requests if r.route != "chat")["POST batches"] == len(
        server.batches
    )
