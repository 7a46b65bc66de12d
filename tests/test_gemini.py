"""The gemini provider: the real google-genai SDK talking HTTP to the fake Gemini server,
driven through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.providers.gemini import image_tokens
from imgbatch.providers.prompt import DEFAULT_PROMPT
from tests.conftest import CliResult, make_image, run_cli, the_state_folder
from tests.fakegemini import FakeGemini

KEY = "test-key-SECRET-0123456789"
OTHER_KEY = "test-key-OTHER-9876543210"


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY, OTHER_KEY}, seed=7, hang_seconds=5.0) as fake:
        yield fake
        assert fake.errors == []  # the fake itself never crashed


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(6):
        make_image(root / f"img{i}.jpg", size=(1600 + 10 * i, 1200), color=(30 * i, 90, 150))
    return root


def analyze(
    server: FakeGemini,
    root: Path,
    *args: str | Path,
    key: str = KEY,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> CliResult:
    full_env = {
        "GEMINI_API_KEY": key,
        "IMGBATCH_GEMINI_BASE_URL": server.url,
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "6000",
        **(env or {}),
    }
    return run_cli(["analyze", *args, root], env=full_env, timeout=timeout)


def test_happy_path_structured_output_with_tokens(server: FakeGemini, photos: Path) -> None:
    res = analyze(server, photos, "--workers", "3")
    assert res.rc == 0, res.stderr
    assert "provider: gemini (an API key is configured)" in res.stderr
    assert len(res.records) == 6
    for r in res.records:
        assert r["status"] == "ok" and r["provider"] == "gemini"
        assert r["model"] == "gemini-2.5-flash-lite" and r["attempts"] == 1
        assert set(r["result"]) == {"description", "tags", "objects", "colors", "mood", "text"}
        assert r["input_tokens"] > 0 and r["output_tokens"] > 0
    req = server.last_request
    assert req.schema_field == "responseSchema" and req.response_mime_type == "application/json"
    assert "tokens:" in res.stderr and "top tags:" in res.stderr


def test_uploads_are_downscaled_jpegs_without_exif(server: FakeGemini, tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    Image.new("RGB", (4000, 3000), (120, 60, 30)).save(root / "big.jpg", exif=exif)
    res = analyze(server, root, "--max-side", "512")
    assert res.rc == 0, res.stderr
    [image] = server.last_request.images
    assert image.alphabet == "urlsafe"
    with image.open() as up:
        assert max(up.size) == 512 and up.format == "JPEG"
        assert not up.getexif() and "exif" not in up.info


def test_a_quota_window_far_below_rpm_is_learnt_and_every_item_ends_ok(
    server: FakeGemini, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    for i in range(24):
        make_image(root / f"{i:02d}.png", size=(30 + i, 30))
    server.set_quota((4, 1.0))  # 4 a second, against --rpm 6000
    res = analyze(server, root, "--rpm", "6000", "--workers", "4")
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["ok"] * 24
    statuses = [r.status for r in server.requests]
    assert statuses.count(200) == 24
    # learnt from the first 429s: without the limiter's decrease, every window of the
    # quota ends in a 429 (5-6 of them, the last ones late in the run); with it, 1 or 2
    assert statuses.count(429) <= 3
    assert 429 not in statuses[len(statuses) // 2 :]


def test_5xx_bursts_are_retried_with_backoff(server: FakeGemini, photos: Path) -> None:
    server.fail_next(2, 503)
    server.fail_next(1, 500)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 0, res.stderr
    assert all(r["status"] == "ok" for r in res.records)
    assert sorted(r["attempts"] for r in res.records)[-1] == 4
    assert server.count_by_status() == {503: 2, 500: 1, 200: 6}


def test_a_request_that_never_answers_times_out(server: FakeGemini, photos: Path) -> None:
    server.hang_next(1)
    res = analyze(server, photos, "--timeout", "0.5", "--max-attempts", "1", "--workers", "1")
    assert res.rc == 1
    [failed] = [r for r in res.records if r["status"] == "error"]
    assert failed["error"] == {"code": "TIMEOUT", "message": "no answer within 0.5s"}
    again = analyze(server, photos, "--timeout", "0.5")  # transient: the next run retries it
    assert again.rc == 0 and [r["path"] for r in again.records] == [failed["path"]]


def test_malformed_output_is_retried(server: FakeGemini, photos: Path) -> None:
    server.malformed_next(1)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 0 and all(r["status"] == "ok" for r in res.records)
    assert sorted(r["attempts"] for r in res.records) == [1, 1, 1, 1, 1, 2]
    server.malformed_next(1)
    (photos / "new.png").write_bytes((photos / "img0.jpg").read_bytes()[:0])
    make_image(photos / "new.png", size=(64, 64))
    res = analyze(server, photos, "--max-attempts", "1")
    assert res.rc == 1
    assert res.records[0]["error"]["code"] == "AI_ERROR"
    assert "not valid JSON" in res.records[0]["error"]["message"]


@pytest.mark.parametrize("form", ["prompt", "candidate"])
def test_a_blocked_image_is_blocked_and_never_retried(
    server: FakeGemini, photos: Path, form: str
) -> None:
    server.block_next(1, form=form)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 1
    [blocked] = [r for r in res.records if r["status"] == "error"]
    assert blocked["error"]["code"] == "BLOCKED" and blocked["attempts"] == 1
    assert "SAFETY" in blocked["error"]["message"]
    assert analyze(server, photos).records == []  # permanent: not retried next run


def test_the_daily_quota_stops_the_run_with_exit_4_and_the_next_run_resumes(
    server: FakeGemini, photos: Path
) -> None:
    server.set_day_quota(3)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 4, res.stderr
    assert "daily quota is exhausted" in res.stderr
    assert "failed: 3 ok, 0 failed" in res.stderr  # the summary of what was done
    assert [r["status"] for r in res.records] == ["ok"] * 3  # no failed record per file
    assert server.count_by_status()[429] == 1
    server.reset_quotas()  # the quota resets at midnight Pacific
    nxt = analyze(server, photos)
    assert nxt.rc == 0
    assert sorted(r["path"] for r in res.records + nxt.records) == sorted(
        str(p) for p in photos.iterdir()
    )


def test_the_daily_quota_of_every_project_is_exit_4_with_several_keys_and_workers(
    photos: Path,
) -> None:
    keys = [KEY, OTHER_KEY, "test-key-THIRD-5555555555"]
    projects = {key: f"project-{i}" for i, key in enumerate(keys)}
    with FakeGemini(keys=set(keys), projects=projects, day_quota=1) as server:
        res = analyze(
            server,
            photos,
            "--workers",
            "4",
            key="",
            env={"IMGBATCH_GEMINI_API_KEYS": ",".join(keys), "GEMINI_API_KEY": ""},
        )
        assert res.rc == 4, res.stderr
        assert "daily quota is exhausted" in res.stderr and "rejected" not in res.stderr
        assert [r["status"] for r in res.records] == ["ok"] * 3, (  # one a project
            res.stderr,
            [(r.api_key[-4:] if r.api_key else None, r.status, r.outcome) for r in server.requests],
        )
        assert all(r.outcome == "quota_day" for r in server.requests if r.status == 429)


def test_a_pool_emptied_by_daily_quotas_stops_every_thread_for_the_quota(
    tmp_path: Path,
) -> None:
    """Once the last key has left the pool for its daily quota, the next thread to pick a
    key must stop the run for the quota too (exit 4), not for rejected keys (exit 5).
    Threads of a run meet only in the key pool, so calls in turn replay that race."""
    from imgbatch.config import Settings
    from imgbatch.imaging import prepare
    from imgbatch.providers.gemini import GeminiProvider

    projects = {KEY: "project-a", OTHER_KEY: "project-b"}
    with FakeGemini(keys=set(projects), projects=projects, day_quota=0) as server:
        settings = Settings(provider="gemini", gemini_api_keys=(KEY, OTHER_KEY))
        provider = GeminiProvider(settings, env={"IMGBATCH_GEMINI_BASE_URL": server.url})
        encoded = provider.encode(prepare(make_image(tmp_path / "a.png")))
        raised = []
        for _ in range(4):  # one thread's request, then the next thread's, ...
            try:
                provider.analyze(encoded)
            except Exception as exc:
                raised.append(type(exc).__name__)
        provider.close()
    # the first key leaves (its request goes to the other key at once), then the last
    assert raised == ["Failover"] + ["QuotaExhaustedError"] * 3
    assert len(server.requests) == 2  # an empty pool sends nothing


def test_a_rejected_key_and_a_spent_daily_quota_are_exit_4_naming_the_rejected_key(
    server: FakeGemini, photos: Path
) -> None:
    server.set_day_quota(0)  # the valid key's project has no quota left today
    res = analyze(
        server,
        photos,
        "--workers",
        "1",  # the valid key is tried first: the rejected one is the last to leave
        key="",
        env={"IMGBATCH_GEMINI_API_KEYS": f"test-key-WRONG-000,{KEY}", "GEMINI_API_KEY": ""},
    )
    assert res.rc == 4, res.stderr  # the one a later run resumes from
    assert "daily quota is exhausted" in res.stderr
    assert "1 of the 2 keys rejected (400 INVALID_ARGUMENT)" in res.stderr
    assert res.records == []


def test_a_rejected_key_stops_the_run_with_exit_5_and_few_requests(
    server: FakeGemini, photos: Path
) -> None:
    res = analyze(server, photos, "--workers", "2", key="test-key-WRONG-000")
    assert res.rc == 5
    assert res.records == []
    assert "rejected the key" in res.stderr
    assert len(server.requests) <= 4
    assert "test-key-WRONG-000" not in res.stderr


def test_a_pool_of_keys_fails_over_from_a_rejected_key(server: FakeGemini, photos: Path) -> None:
    res = analyze(
        server,
        photos,
        key="",
        env={"IMGBATCH_GEMINI_API_KEYS": f"test-key-WRONG-000,{KEY}", "GEMINI_API_KEY": ""},
    )
    assert res.rc == 0, res.stderr
    assert all(r["status"] == "ok" for r in res.records)
    bad = [r for r in server.requests if r.status == 400]
    assert len(bad) <= 2  # the bad key left the pool after its first answers
    assert "key 1 of 2 left the pool (rejected: 400 INVALID_ARGUMENT)" in res.stderr
    # a failover is a request like any other: through the limiter, counted in attempts
    assert sum(r["attempts"] for r in res.records) == len(server.requests)


def test_keys_of_two_projects_share_the_work_when_one_is_rate_limited(
    tmp_path: Path, photos: Path
) -> None:
    projects = {KEY: "project-a", OTHER_KEY: "project-b"}
    with FakeGemini(
        keys=set(projects),
        projects=projects,
        project_quotas={"project-a": (1, 30.0), "project-b": None},
    ) as server:
        res = analyze(
            server,
            photos,
            key="",
            env={"IMGBATCH_GEMINI_API_KEYS": f"{KEY},{OTHER_KEY}", "GEMINI_API_KEY": ""},
        )
        assert res.rc == 0, res.stderr
        used = {r.api_key for r in server.requests if r.status == 200}
        assert used == {KEY, OTHER_KEY}
        # the request refused for project-a went at once to project-b, through the
        # limiter like any request, and counts in the item's attempts
        assert server.count_by_status()[429] >= 1
        assert sum(r["attempts"] for r in res.records) == len(server.requests)
        assert max(r["attempts"] for r in res.records) >= 2


def test_a_retry_delay_longer_than_max_wait_fails_items_at_once_not_after_it(
    server: FakeGemini, photos: Path
) -> None:
    server.fail_next(1, 429, retry_delay="3600s")  # e.g. an hourly quota: come back in 1 h
    res = analyze(server, photos, "--workers", "2", timeout=60)  # the default --max-wait 600
    assert res.rc == 1, res.stderr
    failed = [r for r in res.records if r["status"] == "error"]
    assert len(res.records) == 6 and len(failed) >= 5  # the other worker's request was sent
    for r in failed:
        assert r["error"]["code"] == "RATE_LIMIT"
        assert r["error"]["message"].endswith("s more: past max_wait (600s)")
    assert len(server.requests) <= 2  # nobody asked again within the server's delay
    again = analyze(server, photos)  # transient: the next run retries them
    assert again.rc == 0 and sorted(r["path"] for r in again.records) == sorted(
        r["path"] for r in failed
    )


def test_bare_429s_are_waited_out_for_max_wait_then_the_item_fails(
    server: FakeGemini, photos: Path
) -> None:
    server.fail_next(100_000, 429)  # no retry delay: each item backs off on its own
    res = analyze(server, photos, "--limit", "2", "--max-wait", "1", timeout=60)
    assert res.rc == 1, res.stderr
    assert [r["error"]["code"] for r in res.records] == ["RATE_LIMIT"] * 2
    assert all(r["attempts"] > 1 for r in res.records)  # waited out: no attempt used up


def test_a_custom_schema_is_sent_as_response_json_schema(
    server: FakeGemini, photos: Path, tmp_path: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["animal", "count"],
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    res = analyze(server, photos, "--schema", path, "--limit", "1")
    assert res.rc == 0, res.stderr
    assert server.last_request.schema_field == "responseJsonSchema"
    assert server.last_request.schema == schema
    assert set(res.records[0]["result"]) == {"animal", "count"}


def test_dry_run_sends_nothing_and_estimates_tokens(server: FakeGemini, photos: Path) -> None:
    res = analyze(server, photos, "--dry-run")
    assert res.rc == 0, res.stderr
    assert server.requests == []
    assert [r["status"] for r in res.records] == ["would-send"] * 6
    # 768x576: one tile, plus the prompt's tokens (4 characters a token; issue 23.3)
    prompt = len(DEFAULT_PROMPT) // 4
    assert all(r["estimated_tokens"] == 258 + prompt for r in res.records)
    assert "6 images would be sent" in res.stderr
    assert f"{6 * (258 + prompt):,} input tokens" in res.stderr
    assert (
        analyze(server, photos, "--dry-run", "--media-resolution", "low").records[0][
            "estimated_tokens"
        ]
        == 64 + prompt
    )
    assert len(analyze(server, photos).records) == 6  # the dry run recorded nothing


def test_duplicate_files_cost_one_request(server: FakeGemini, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"copy{i}.png", size=(40, 40))
    res = analyze(server, root, "--workers", "4")
    assert res.rc == 0 and len(res.records) == 4
    assert len(server.requests) == 1 and sum(r["cached"] for r in res.records) == 3


def test_the_key_never_appears_in_output_logs_or_checkpoint(
    server: FakeGemini, photos: Path
) -> None:
    server.fail_next(1, 503)
    server.block_next(1)
    res = analyze(server, photos, "--verbose")
    bad = analyze(server, photos, "--fresh", "--verbose", key=KEY[:-1] + "X")
    for out in (res, bad):
        assert KEY.encode() not in out.stdout and KEY not in out.stderr
        assert KEY[:-1] + "X" not in out.stderr
    state = Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"
    for dirpath, _, files in os.walk(state):
        for name in files:
            assert KEY.encode() not in (Path(dirpath) / name).read_bytes()


def test_google_api_key_only_with_an_explicit_provider(server: FakeGemini, photos: Path) -> None:
    env = {"GOOGLE_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url}
    auto = run_cli(["analyze", "--limit", "1", photos], env=env)
    assert auto.rc == 0 and auto.records[0]["provider"] == "local"
    assert server.requests == []
    explicit = run_cli(["analyze", "--provider", "gemini", "--limit", "1", photos], env=env)
    assert explicit.rc == 0 and explicit.records[0]["provider"] == "gemini"


def test_an_unknown_model_is_a_configuration_error(server: FakeGemini, photos: Path) -> None:
    server.configure(models={"gemini-2.5-flash-lite"})
    res = analyze(server, photos, "--model", "gemini-0-nope")
    assert res.rc == 2 and "not found" in res.stderr


def test_sigkill_at_random_moments_against_the_server_loses_nothing(tmp_path: Path) -> None:
    import random
    import subprocess
    import sys
    from collections import Counter

    from imgbatch.checkpoint import Checkpoint
    from tests.conftest import REPO, run_and_kill

    rng = random.Random(42)  # kill moments are reproducible
    root = tmp_path / "photos"
    files, kills, workers = 40, 3, 2
    for i in range(files):
        make_image(root / f"{i:02d}.png", size=(30 + i, 20))
    with FakeGemini(keys={KEY}, latency=0.05) as server:
        env = {
            **os.environ,
            "GEMINI_API_KEY": KEY,
            "IMGBATCH_GEMINI_BASE_URL": server.url,
            "IMGBATCH_RPM": "60000",
        }
        args = [sys.executable, "-m", "imgbatch", "analyze", "--workers", str(workers), str(root)]
        lines: list[dict[str, object]] = []
        for _ in range(kills):
            lines += run_and_kill(args, env, rng, lines=(2, 10))
            state = the_state_folder()
            with Checkpoint(state) as cp:  # opens cleanly after every kill
                assert cp.runs()
        final = subprocess.run(args, capture_output=True, env=env, cwd=REPO, timeout=120)
        assert final.returncode == 0, final.stderr.decode()
        lines += [json.loads(line) for line in final.stdout.splitlines()]
        requests = len(server.requests)
    ok = Counter(str(r["path"]) for r in lines if r["status"] == "ok")
    assert len(ok) == files
    assert requests <= files + kills * 2 * workers  # in-flight limit: 2 x workers
    status = run_cli(["runs", root, "--json"])
    states = [json.loads(line)["state"] for line in status.stdout.splitlines()]
    assert states == ["COMPLETED"] + ["ABORTED"] * kills


# --- token estimate (Gemini's rule: gemini.image_tokens) ------------------------------


@pytest.mark.parametrize(
    ("size", "resolution", "tokens"),
    [
        ((384, 384), None, 258),  # small: one flat price
        ((100, 50), None, 258),
        ((385, 100), None, 258),  # one 768x768 tile
        ((768, 576), None, 258),
        ((769, 576), None, 516),  # two tiles
        ((1536, 1536), None, 1032),
        ((2000, 1000), None, 1548),  # 3 x 2 tiles
        ((2000, 1000), "low", 64),
        ((2000, 1000), "MEDIA_RESOLUTION_LOW", 64),
        ((2000, 1000), "medium", 1548),
    ],
)
def test_estimate_tokens_follows_gemini_2_rules(
    size: tuple[int, int], resolution: str | None, tokens: int
) -> None:
    assert image_tokens(*size, media_resolution=resolution) == tokens


def test_estimate_tokens_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        image_tokens(0, 10)
    with pytest.raises(ValueError):
        image_tokens(10, 10, "ultra")
