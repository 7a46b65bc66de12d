"""A Batch API job is never paid twice across keys: a job belongs to the project of the key
that made it, so only that key is asked about it, and it stays pending (named in a
warning) while that key is not configured. Through the real CLI (subprocesses) and the
real google-genai SDK against the fake Gemini server, whose keys belong to two projects."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, CliResult, make_image, run_cli, the_state_folder
from tests.fakegemini import FakeGemini

KEY_A = "test-key-PROJECT-A-0123456789"
KEY_B = "test-key-PROJECT-B-9876543210"
#: Batch and Files API routes: what a run asks about jobs and submissions
BATCH_ROUTES = {"upload", "batch_create", "batch_list", "batch_get", "file_download"}


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    projects = {KEY_A: "project-a", KEY_B: "project-b"}
    with FakeGemini(keys={KEY_A, KEY_B}, projects=projects, seed=5) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(6):
        make_image(root / f"img{i}.jpg", size=(200 + 10 * i, 150), color=(40 * i, 90, 150))
    return root


def env_for(server: FakeGemini, keys: str) -> dict[str, str]:
    """The environment of a run whose configured keys are `keys` (comma-separated)."""
    return {
        "IMGBATCH_GEMINI_API_KEYS": keys,
        "IMGBATCH_GEMINI_BASE_URL": server.url,
        "IMGBATCH_BATCH_POLL": "0.05",
    }


def batch(server: FakeGemini, root: Path, keys: str, *args: str) -> CliResult:
    return run_cli(["analyze", "--batch", *args, root], env=env_for(server, keys), timeout=60)


def asked_with(server: FakeGemini, key: str) -> list[str]:
    """The Batch and Files API routes asked with `key`, in order."""
    return [r.route for r in server.requests if r.api_key == key and r.route in BATCH_ROUTES]


def pending_ids(root: Path) -> list[str]:
    status = json.loads(run_cli(["status", root, "--json"]).stdout)
    return [job["id"] for job in status.get("batch_jobs", [])]


def test_a_job_stays_pending_while_its_key_is_gone_and_is_collected_when_it_is_back(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 3600
    first = batch(server, photos, KEY_A)
    assert first.rc == 0, first.stderr
    [job] = server.batch.jobs
    assert job.project == "project-a"
    [job_id] = pending_ids(photos)
    state = [f.read_bytes() for f in the_state_folder().rglob("*") if f.is_file()]
    assert state and not any(KEY_A.encode() in data for data in state)  # its identity only
    server.batch.advance(3600)  # it has ended at Google: only project A can tell

    only_b = batch(server, photos, KEY_B)
    assert only_b.rc == 0, only_b.stderr
    assert only_b.records == []
    warnings = [line for line in only_b.stderr.splitlines() if "not configured now" in line]
    assert len(warnings) == 1  # one warning, naming the job and how to forget it
    assert job.name in warnings[0] and job_id in warnings[0]
    assert f"imgbatch prune --forget-batch {job_id}" in warnings[0]
    assert "submitted 0 requests in 0 jobs; 1 jobs pending" in only_b.stderr
    assert len(server.batch.jobs) == 1  # its images were not submitted again
    assert asked_with(server, KEY_B) == []  # another project's 404 is no answer about it
    assert pending_ids(photos) == [job_id]  # `status` still lists it
    assert KEY_A not in only_b.stderr and KEY_B not in only_b.stderr

    # --batch-wait waits for the jobs of its keys, not for one it cannot see end
    new = make_image(photos / "new.jpg", size=(120, 90))
    server.batch.plan_next(delay=0)
    waited = batch(server, photos, KEY_B, "--batch-wait")
    assert waited.rc == 0, waited.stderr
    assert [r["path"] for r in waited.records] == [str(new)]  # key B's own job
    assert sum("not configured now" in line for line in waited.stderr.splitlines()) == 1
    assert [j.project for j in server.batch.jobs] == ["project-a", "project-b"]
    assert pending_ids(photos) == [job_id]

    # its key back, in another place of the list: collected, never submitted again
    before = len(asked_with(server, KEY_B))
    back = batch(server, photos, f"{KEY_B},{KEY_A}")
    assert back.rc == 0, back.stderr
    assert "collected 6 items" in back.stderr and "0 jobs pending" in back.stderr
    assert sorted(r["path"] for r in back.records) == sorted(
        str(p) for p in photos.iterdir() if p != new
    )
    assert all(r["status"] == "ok" and r["batch"] for r in back.records)
    assert len(server.batch.jobs) == 2 and pending_ids(photos) == []
    assert len(asked_with(server, KEY_B)) == before  # A's job: asked with A only


def test_a_job_is_forgotten_when_its_own_key_says_it_is_gone(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 3600
    assert batch(server, photos, KEY_A).rc == 0
    [job] = server.batch.jobs
    delete = urllib.request.Request(
        f"{server.url}/v1beta/{job.name}", method="DELETE", headers={"x-goog-api-key": KEY_A}
    )
    urllib.request.urlopen(delete, timeout=10).close()  # deleted in project A
    before = len(server.requests)
    res = batch(server, photos, f"{KEY_B},{KEY_A}")
    assert res.rc == 0, res.stderr
    assert "unknown to the Batch API of its own key" in res.stderr
    assert "submitted 6 requests in 1 jobs" in res.stderr
    polls = [r.api_key for r in server.requests[before:] if r.route == "batch_get"]
    assert polls == [KEY_A]  # asked once, with its own key


def _killed_at_create(server: FakeGemini, root: Path, keys: str) -> None:
    """Run `analyze --batch` and SIGKILL it once the server has created the job, before
    the answer reaches it: the submission is recorded as tried, its job unknown to it."""
    env = {**os.environ, **env_for(server, keys)}
    env.pop("PYTHONPATH", None)
    args = [sys.executable, "-m", "imgbatch", "analyze", "--batch", str(root)]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO
    )

    def kill_at_create(rec: Any) -> None:
        if rec.route == "batch_create":
            os.kill(proc.pid, signal.SIGKILL)

    server.configure(before_answer=kill_at_create)
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        server.configure(before_answer=None)


def test_a_tried_submission_is_never_created_with_another_key(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 3600
    _killed_at_create(server, photos, KEY_A)
    [job] = server.batch.jobs  # created in project A; the run never learnt its name
    assert job.project == "project-a"
    [submission] = pending_ids(photos)
    assert submission == job.display_name

    only_b = batch(server, photos, KEY_B)
    assert only_b.rc == 0, only_b.stderr
    warnings = [line for line in only_b.stderr.splitlines() if "not configured now" in line]
    assert len(warnings) == 1 and submission in warnings[0]
    assert len(server.batch.jobs) == 1  # neither created again nor its images resubmitted
    assert asked_with(server, KEY_B) == []  # not uploaded, listed or created with key B
    assert pending_ids(photos) == [submission]

    back = batch(server, photos, f"{KEY_B},{KEY_A}")
    assert back.rc == 0, back.stderr
    assert len(server.batch.jobs) == 1  # found by its name in project A
    assert asked_with(server, KEY_A)[-1] == "batch_list"
    server.batch.advance(3600)
    done = batch(server, photos, KEY_A)
    assert done.rc == 0 and len(done.records) == 6, done.stderr
    assert len(server.batch.jobs) == 1 and asked_with(server, KEY_B) == []


def test_prune_forget_batch_forgets_a_job_whose_key_is_gone_for_good(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 3600
    assert batch(server, photos, KEY_A).rc == 0
    [job_id] = pending_ids(photos)
    [job] = server.batch.jobs

    forgot = run_cli(["prune", photos, "--forget-batch", job_id])
    assert forgot.rc == 0, forgot.stderr
    assert job.name in forgot.stderr
    assert "its 6 images will be submitted again" in forgot.stderr
    assert forgot.stdout == b""
    assert pending_ids(photos) == []

    again = batch(server, photos, KEY_B)
    assert again.rc == 0, again.stderr
    assert "submitted 6 requests in 1 jobs" in again.stderr
    assert "not configured now" not in again.stderr
    old, new = server.batch.jobs
    assert new.project == "project-b" and set(new.keys) == set(old.keys)
    # the job's name (as `status` shows it) serves as well as its id
    forgot_by_name = run_cli(["prune", photos, "--forget-batch", new.name])
    assert forgot_by_name.rc == 0, forgot_by_name.stderr
    assert pending_ids(photos) == []


def test_prune_forget_batch_of_an_unknown_job_is_a_usage_error(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.default_plan.delay = 3600
    assert batch(server, photos, KEY_A).rc == 0
    res = run_cli(["prune", photos, "--forget-batch", "imgbatch-r9-9-nosuchjob"])
    assert res.rc == 2
    assert res.stderr.strip().splitlines() == [
        "imgbatch: error: no pending batch job 'imgbatch-r9-9-nosuchjob': "
        "`imgbatch status` lists them"
    ]
    assert len(pending_ids(photos)) == 1  # nothing else forgotten


def test_a_tried_submission_whose_file_expired_is_uploaded_again_with_its_own_key(
    server: FakeGemini, photos: Path
) -> None:
    server.batch.fail_next(1, 500, on="batch_create")  # tried, never created
    first = batch(server, photos, KEY_A)
    assert first.rc == 0 and "waits for the next run" in first.stderr, first.stderr
    [submission] = pending_ids(photos)
    [uploaded] = [f for f in server.batch.files.values() if f.display_name == submission]
    expire = urllib.request.Request(
        f"{server.url}/v1beta/{uploaded.name}", method="DELETE", headers={"x-goog-api-key": KEY_A}
    )
    urllib.request.urlopen(expire, timeout=10).close()  # as after 48 hours

    # the pool's next pick is key B: fine for a new upload, never for this submission
    res = batch(server, photos, f"{KEY_A},{KEY_B}")
    assert res.rc == 0, res.stderr
    assert "submitted 6 requests in 1 jobs" in res.stderr
    assert asked_with(server, KEY_B) == []
    [job] = server.batch.jobs
    assert job.project == "project-a" and job.display_name == submission


def test_a_keys_identity_is_its_endpoint_and_key_not_its_place_nor_the_key(
    server: FakeGemini,
) -> None:
    """Library level: which configured key a recorded job names."""
    from imgbatch.config import Settings
    from imgbatch.providers.gemini import GeminiProvider
    from imgbatch.providers.gemini_batch import GeminiBatch, key_id

    def client(keys: tuple[str, ...], url: str) -> GeminiBatch:
        settings = Settings(provider="gemini", gemini_api_keys=keys, gemini_base_url=url)
        return GeminiBatch(GeminiProvider(settings, env={}))

    a = key_id(KEY_A, server.url)
    assert KEY_A not in a and a == key_id(KEY_A, server.url + "/")
    assert client((KEY_A,), server.url).holds(a) and client((KEY_B, KEY_A), server.url).holds(a)
    assert not client((KEY_B,), server.url).holds(a)
    assert not client((KEY_A,), "http://127.0.0.1:9").holds(a)  # another endpoint
    assert a != key_id(KEY_A, "")  # Google's own endpoint when none is set
    # jobs recorded before the endpoint was part of it name the key alone
    legacy = hashlib.sha256(KEY_A.encode()).hexdigest()[:12]
    assert client((KEY_B, KEY_A), server.url).holds(legacy)
