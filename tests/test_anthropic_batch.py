"""`analyze --batch --provider anthropic`: Message Batches submitted by one run and
collected by a later one, through the real CLI (a subprocess) and the real `anthropic`
SDK talking HTTP to the fake Message Batches API of tests/fakeanthropic.py."""

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
from tests.fakeanthropic import AnthropicRequest, FakeAnthropic

KEY = "sk-ant-test-BATCH-SECRET-0123456789"


@pytest.fixture(autouse=True)
def no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the machine's own ANTHROPIC_* settings."""
    for name in list(os.environ):
        if name.startswith("ANTHROPIC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(keys={KEY}, hang_seconds=20.0) as fake:
        yield fake
        assert fake.errors == []  # the fake itself never crashed


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(5):
        make_image(root / f"img{i}.jpg", size=(900 + 10 * i, 600), color=(40 * i, 90, 150))
    return root


def env_for(server: FakeAnthropic, key: str = KEY) -> dict[str, str]:
    return {
        "IMGBATCH_ANTHROPIC_API_KEY": key,
        "IMGBATCH_ANTHROPIC_BASE_URL": server.url,
        "IMGBATCH_BATCH_POLL": "0.05",
    }


def batch(server: FakeAnthropic, root: Path, *args: str, key: str = KEY) -> CliResult:
    cmd = ["analyze", "--batch", "--provider", "anthropic", *args, str(root)]
    return run_cli(cmd, env=env_for(server, key))


def ours(server: FakeAnthropic) -> list[Any]:
    """The batches imgbatch created (not a test's foreign ones)."""
    return [b for b in server.batch.jobs if b.custom_ids[:1] != ["foreign-0"]]


def carried(server: FakeAnthropic) -> Counter[str]:
    """How many batches carried each custom_id (our content hashes)."""
    return Counter(c for b in ours(server) for c in b.custom_ids)


def routes(server: FakeAnthropic) -> list[str]:
    return [r.route for r in server.requests]


def test_a_run_submits_a_later_run_collects_and_a_rerun_costs_nothing(
    server: FakeAnthropic, photos: Path
) -> None:
    make_image(photos / "zcopy.jpg", size=(900, 600), color=(0, 90, 150))  # = img0.jpg
    server.batch.default_plan.delay = 3600
    first = batch(server, photos, "--batch-max-requests", "3")
    assert first.rc == 0, first.stderr
    assert first.records == []  # nothing is back yet
    assert "submitted 5 requests in 2 jobs; 2 jobs pending; collected 0 items" in first.stderr
    assert [len(b.custom_ids) for b in ours(server)] == [3, 2]
    assert max(carried(server).values()) == 1 and len(carried(server)) == 5  # copy not sent
    one = ours(server)[0]
    params = one.params[0]  # the live request's: the forced tool call, the prompt, the image
    assert params["tool_choice"] == {"type": "tool", "name": "image_analysis"}
    assert params["model"] == "claude-haiku-4-5"
    assert params["messages"][0]["content"][0]["type"] == "image"
    assert all(r.version and r.api_key == KEY for r in server.requests)
    assert routes(server).count("messages") == 0  # nothing sent live

    status = run_cli(["status", str(photos)])
    assert "batch jobs pending: 2 (5 requests" in status.stdout.decode()
    as_json = json.loads(run_cli(["status", str(photos), "--json"]).stdout)
    assert [j["state"] for j in as_json["batch_jobs"]] == ["RUNNING", "RUNNING"]
    assert {j["name"] for j in as_json["batch_jobs"]} == {b.id for b in ours(server)}

    server.batch.advance(3600)
    second = batch(server, photos)
    assert second.rc == 0, second.stderr
    assert "submitted 0 requests in 0 jobs; 0 jobs pending; collected 5 items" in second.stderr
    collected = {r["path"]: r for r in second.records}
    assert len(collected) == 6  # the copy too, from the stored result
    assert collected[str(photos / "zcopy.jpg")]["cached"] is True
    by_id = {c: b for b in ours(server) for c in b.custom_ids}
    for r in collected.values():
        assert r["status"] == "ok" and r["provider"] == "anthropic"
        assert r.get("batch", False) is not r["cached"]  # a batch answer, or a copy of one
        assert r["hash"] in by_id  # custom_id is the content hash
        assert r["input_tokens"] > 0 and set(r["result"]) >= {"description", "tags"}
    assert KEY not in second.stderr + second.stdout.decode()

    requests_before = len(server.requests)
    again = batch(server, photos)
    assert again.rc == 0 and again.records == []
    # a rerun costs nothing: at most the check that this server has the API
    assert routes(server)[requests_before:] == ["batch_list"]
    assert len(ours(server)) == 2


@pytest.mark.parametrize("fate", ["expired", "canceled"])
def test_an_expired_or_cancelled_batch_gives_what_it_finished_and_the_rest_is_resubmitted(
    server: FakeAnthropic, photos: Path, fate: str
) -> None:
    server.batch.plan_next(delay=10, lines=[None, None], rest=fate)
    assert batch(server, photos).rc == 0
    [first] = ours(server)
    server.batch.advance(10)
    second = batch(server, photos)
    assert second.rc == 0, second.stderr
    done = {r["hash"] for r in second.records}
    assert [r["status"] for r in second.records] == ["ok", "ok"]
    assert done == set(first.custom_ids[:2])
    assert all(r["batch"] for r in second.records)
    [_, again] = ours(server)
    assert set(again.custom_ids) == set(first.custom_ids[2:])  # only the rest, once
    assert max(carried(server).values()) <= 2 and len(carried(server)) == 5
    third = batch(server, photos)
    assert third.rc == 0, third.stderr
    assert {r["hash"] for r in third.records} == set(again.custom_ids)
    assert [r["status"] for r in third.records] == ["ok"] * 3


def test_errored_lines_are_classified_as_live_failures_and_transient_ones_resubmitted(
    server: FakeAnthropic, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    for i in range(8):
        make_image(root / f"{i}.png", size=(40 + i, 30))
    server.batch.plan_next(lines=[429, 529, 500, 504, 400, "refusal", "cut"])
    assert batch(server, root).rc == 0  # submits; a later run collects
    res = batch(server, root)
    assert res.rc == 1, res.stderr  # collected items failed
    index = {c: i for i, c in enumerate(ours(server)[0].custom_ids)}
    codes = {index[r["hash"]]: r["error"]["code"] for r in res.records if r["status"] == "error"}
    assert codes == {
        0: "RATE_LIMIT",
        1: "AI_ERROR",
        2: "AI_ERROR",
        3: "TIMEOUT",
        4: "AI_ERROR",
        5: "BLOCKED",
        6: "AI_ERROR",
    }
    messages = {index[r["hash"]]: r["error"]["message"] for r in res.records if "error" in r}
    assert "(529 overloaded_error)" in messages[1] and "max_output_tokens" in messages[6]
    assert all(r["batch"] for r in res.records)
    [ok] = [r for r in res.records if r["status"] == "ok"]
    assert index[ok["hash"]] == 7
    # the collecting run submitted the transient failures again, not the refused one
    resent = {index[c] for c in ours(server)[1].custom_ids}
    assert 5 not in resent and {0, 1, 2, 3} <= resent


def test_a_batch_is_asked_about_only_with_the_key_that_made_it(
    photos: Path,
) -> None:
    other = "sk-ant-test-OTHER-WORKSPACE-987654"
    with FakeAnthropic(keys={KEY, other}) as server:
        server.batch.default_plan.delay = 10
        assert batch(server, photos).rc == 0
        [made] = ours(server)
        server.batch.advance(10)
        asked = len(server.requests)
        res = batch(server, photos, key=other)
        assert res.rc == 0, res.stderr
        assert res.records == [] and "not configured now" in res.stderr
        assert made.id in res.stderr and other not in res.stderr
        # never asked about with the other key (its 404 would make it look deleted);
        # listed only by the check that this server has the API
        assert [r.route for r in server.requests[asked:]] == ["batch_list"]
        assert len(ours(server)) == 1  # and its images not submitted again
        back = batch(server, photos)
        assert [r["status"] for r in back.records] == ["ok"] * 5
        assert server.errors == []


def test_a_server_without_message_batches_is_exit_2_and_nothing_is_recorded_or_sent(
    photos: Path,
) -> None:
    with FakeAnthropic(keys={KEY}, batches=False) as server:
        res = batch(server, photos)
        assert res.rc == 2, res.stderr
        [line] = [x for x in res.stderr.splitlines() if "error" in x]
        assert f"{server.url} has no Message Batches API" in line
        # one request, the check's listing; nothing sent live
        assert [(r.method, r.path.split("?")[0]) for r in server.requests] == [
            ("GET", "/v1/messages/batches")
        ]
        live = run_cli(["analyze", "--provider", "anthropic", str(photos)], env=env_for(server))
        assert live.rc == 0, live.stderr
        assert len(live.records) == 5  # nothing was left waiting in a batch
        assert server.errors == []


# -- crash safety ------------------------------------------------------------------------


def _run_until(
    root: Path,
    server: FakeAnthropic,
    kill: tuple[str, int] | None,
    *extra: str,
) -> tuple[list[dict[str, Any]], bool]:
    """Run the CLI; SIGKILL it at the moment `kill` names: ("request", n) when the server
    has acted on the n-th Message Batches request but not yet answered it, ("create", n)
    the same for the n-th create, ("hang", n) while its n-th create hangs, the server not
    having acted on it, ("line", n) after its n-th output line. Returns the lines it
    wrote, and whether it was killed."""
    args = [sys.executable, "-m", "imgbatch", "analyze", "--batch", "--provider", "anthropic"]
    args += [*extra, str(root)]
    env = {**os.environ, **env_for(server)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout is not None
    seen: Counter[str] = Counter()

    def at_request(rec: AnthropicRequest) -> None:
        if kill is None or not rec.route.startswith("batch_"):
            return
        seen["request"] += 1
        seen["create"] += rec.route == "batch_create"
        seen["hang"] += rec.outcome == "hang"
        if seen[kill[0]] == kill[1] and kill[0] != "line":
            os.kill(proc.pid, signal.SIGKILL)

    if kill is not None and kill[0] == "hang":
        for _ in range(kill[1]):
            server.batch.fail_next("batch_create", 0)
    server.set_before_answer(at_request)
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
    server.set_before_answer(None)
    server.batch.clear_faults()
    assert proc.returncode in (0, 1, -signal.SIGKILL), stderr
    assert KEY not in stderr
    return out, proc.returncode == -signal.SIGKILL


def test_a_batch_created_before_a_crash_is_adopted_not_created_again(
    server: FakeAnthropic, photos: Path
) -> None:
    server.batch.default_plan.delay = 100
    # killed once the server created the batch, before the run could record it
    out, killed = _run_until(photos, server, ("create", 1))
    assert killed and out == [] and len(ours(server)) == 1
    [made] = ours(server)
    # other clients of the same workspace, meanwhile: the same size but created long
    # before the intent (beyond the clock skew allowed), another size within the window
    server.batch.add_foreign(KEY, 5, shift=-600)
    server.batch.add_foreign(KEY, 4)
    res = batch(server, photos)
    assert res.rc == 0, res.stderr
    assert len(ours(server)) == 1  # adopted: not created again
    assert "submitted 5 requests in 1 jobs; 1 jobs pending" in res.stderr
    as_json = json.loads(run_cli(["status", str(photos), "--json"]).stdout)
    assert [j["name"] for j in as_json["batch_jobs"]] == [made.id]
    server.batch.advance(100)
    done = batch(server, photos)
    assert sorted(r["hash"] for r in done.records) == sorted(made.custom_ids)


def test_a_batch_collected_since_the_intent_is_never_adopted_in_its_place(
    server: FakeAnthropic, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"a{i}.png", size=(40 + i, 30))
    server.batch.default_plan.delay = 10
    # two submissions of 2: the first becomes X, recorded; the run is killed once the
    # server created the second's batch Y, before it could record it
    out, killed = _run_until(root, server, ("create", 2), "--batch-max-requests", "2")
    assert killed and out == []
    x, y = ours(server)
    server.batch.advance(10)  # both end, after the second's intent
    # X is collected and forgotten; then the second submission is resumed: X is older,
    # of the same size, created and ended within the window, owned by no record now
    res = batch(server, root, "--batch-max-requests", "2")
    assert res.rc == 0, res.stderr
    assert sorted(r["hash"] for r in res.records) == sorted(x.custom_ids)
    assert f"adopted message batch {y.id}" in res.stderr
    assert len(ours(server)) == 2  # Y adopted, not created again
    done = batch(server, root)
    assert sorted(r["hash"] for r in done.records) == sorted(y.custom_ids)
    assert [r["status"] for r in done.records] == ["ok", "ok"]
    assert max(carried(server).values()) == 1


def test_killed_after_its_intent_before_create_a_run_sends_it_once(
    server: FakeAnthropic, photos: Path
) -> None:
    server.batch.default_plan.delay = 100
    out, killed = _run_until(photos, server, ("hang", 1))
    assert killed and ours(server) == []  # the create hung: never acted on
    res = batch(server, photos)
    assert res.rc == 0, res.stderr
    assert "submitted 5 requests in 1 jobs" in res.stderr
    assert len(ours(server)) == 1 and max(carried(server).values()) == 1


@pytest.mark.slow
def test_sigkill_at_seeded_moments_of_submission_and_collection_loses_nothing_and_pays_once(
    server: FakeAnthropic, tmp_path: Path
) -> None:
    from imgbatch.checkpoint import Checkpoint

    rng = random.Random(2026)  # the kill moments are reproducible
    root = tmp_path / "photos"
    for i in range(10):
        make_image(root / f"a{i:02d}.png", size=(30 + i, 20))
    make_image(root / "dup.png", size=(30, 20))  # a copy of a00.png
    server.batch.default_plan.delay = 50
    server.batch.list_page_max = 2  # the lookup after a kill pages through the list
    lines: list[dict[str, Any]] = []
    killed: list[tuple[str, int]] = []
    for run in range(16):
        for i in range(3):  # new images: every run has something to submit
            make_image(root / f"r{run:02d}-{i}.png", size=(80 + run, 20 + i))
        kind = rng.choice(["request", "create", "hang", "line"])
        kill = (kind, {"request": rng.randint(1, 4), "line": rng.randint(1, 4)}.get(kind, 1))
        out, was_killed = _run_until(root, server, kill, "--batch-max-requests", "4")
        lines += out
        killed += [kill] if was_killed else []
        with Checkpoint(the_state_folder()) as cp:  # opens cleanly after every kill
            assert cp.runs()
        if rng.random() < 0.6:
            server.batch.advance(50)  # some batches end: the next run collects
    for _ in range(6):  # then runs without kills until every batch is collected
        server.batch.advance(50)
        lines += _run_until(root, server, None, "--batch-max-requests", "4")[0]
    status = json.loads(run_cli(["status", str(root), "--json"]).stdout)
    assert "batch_jobs" not in status and status["state"] == "COMPLETED"

    files = {str(p) for p in root.iterdir()}
    ok = {r["path"] for r in lines if r["status"] == "ok"}
    assert ok == files  # no item lost
    digests = Counter(d for b in ours(server) for d in b.digests)
    assert max(digests.values()) == 1  # no two batches carry the same image: paid once
    assert len(digests) == len(files) - 1  # the copy was never sent
    # the moments drawn killed runs while they submitted, created and collected
    assert len(killed) >= 8, killed
    assert {kind for kind, _ in killed} == {"request", "create", "hang", "line"}, killed
