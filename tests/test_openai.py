"""The openai and ollama providers: the real `openai` SDK talking HTTP to the fake
OpenAI-compatible server in its three dialects, driven through the real CLI in a
subprocess."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.config import Settings, load_settings
from imgbatch.errors import ConfigError
from tests.conftest import CliResult, make_image, run_cli
from tests.fakeopenai import FakeOpenAI

KEY = "sk-test-SECRET-0123456789abcdef"
GENERIC_KEY = "sk-generic-OTHER-TOOL-9876543210"
FIELDS = {"description", "tags", "objects", "colors", "mood", "text"}


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dialect="openai", keys={KEY}, hang_seconds=5.0) as fake:
        yield fake
        assert fake.errors == []  # the fake itself never crashed


@pytest.fixture
def ollama() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dialect="ollama", models={"gemma3"}, hang_seconds=5.0) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(6):
        make_image(root / f"img{i}.jpg", size=(1600 + 10 * i, 1200), color=(30 * i, 90, 150))
    return root


def analyze(
    server: FakeOpenAI,
    root: Path,
    *args: str | Path,
    key: str = KEY,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> CliResult:
    """`imgbatch analyze --provider openai` against `server`."""
    full_env = {
        "IMGBATCH_OPENAI_API_KEY": key,
        "IMGBATCH_OPENAI_BASE_URL": server.base_url,
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "6000",
        **(env or {}),
    }
    return run_cli(["analyze", "--provider", "openai", *args, root], env=full_env, timeout=timeout)


def analyze_ollama(
    server: FakeOpenAI, root: Path, *args: str | Path, env: dict[str, str] | None = None
) -> CliResult:
    """`imgbatch analyze --provider ollama --model gemma3`, found through OLLAMA_HOST."""
    full_env = {
        "OLLAMA_HOST": server.url.removeprefix("http://"),
        "IMGBATCH_RETRY_DELAY": "0.01",
        **(env or {}),
    }
    args = ("--provider", "ollama", "--model", "gemma3", *args)
    return run_cli(["analyze", *args, root], env=full_env)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- openai ------------------------------------------------------------------------------


def test_openai_happy_path_structured_output_with_tokens(server: FakeOpenAI, photos: Path) -> None:
    res = analyze(server, photos, "--workers", "3")
    assert res.rc == 0, res.stderr
    assert len(res.records) == 6
    for r in res.records:
        assert r["status"] == "ok" and r["provider"] == "openai"
        assert r["model"] == "gpt-4.1-mini" and r["attempts"] == 1
        assert set(r["result"]) == FIELDS
        assert r["input_tokens"] > 0 and r["output_tokens"] > 0
    req = server.last_request
    assert req.api_key == KEY and req.model == "gpt-4.1-mini"
    assert req.response_format["type"] == "json_schema" and req.schema_form == "nested"
    assert req.strict is True and req.schema["additionalProperties"] is False
    assert set(req.schema["required"]) == FIELDS
    assert req.max_tokens == 1024 and req.max_completion_tokens is None  # not OpenAI's host
    assert req.temperature == 0.2 and "searchable catalogue" in req.prompt
    assert "tokens:" in res.stderr and "top tags:" in res.stderr


def test_uploads_are_downscaled_standard_base64_jpegs_without_exif(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    Image.new("RGB", (4000, 3000), (120, 60, 30)).save(root / "big.jpg", exif=exif)
    res = analyze(server, root, "--max-side", "512", "--detail", "low")
    assert res.rc == 0, res.stderr
    [image] = server.last_request.images
    assert image.alphabet in ("standard", "plain") and image.mime_type == "image/jpeg"
    assert image.detail == "low"
    with image.open() as up:
        assert max(up.size) == 512 and up.format == "JPEG"
        assert not up.getexif() and "exif" not in up.info


def test_a_custom_schema_is_sent_not_strict_and_answers_are_checked_against_it(
    server: FakeOpenAI, photos: Path, tmp_path: Path
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
    assert server.last_request.schema == schema and server.last_request.strict is False
    assert set(res.records[0]["result"]) == {"animal", "count"}
    # an answer of the wrong shape is an AI_ERROR, retried like invalid JSON
    server.set_responder(lambda req: {"animal": "cat", "count": "three"})
    bad = analyze(server, photos, "--schema", path, "--limit", "1", "--max-attempts", "2")
    assert bad.rc == 1
    assert bad.records[0]["error"] == {
        "code": "AI_ERROR",
        "message": "the answer does not match the schema: count: expected integer, got string",
    }
    assert bad.records[0]["attempts"] == 2


def test_5xx_bursts_and_resets_are_retried_with_backoff(server: FakeOpenAI, photos: Path) -> None:
    server.fail_next(2, 500)
    server.fail_next(1, 502, body=b"<html>Bad gateway</html>")
    server.drop_next(1)  # a connection reset
    res = analyze(server, photos, "--workers", "1", "--max-attempts", "5")
    assert res.rc == 0, res.stderr
    assert all(r["status"] == "ok" for r in res.records)
    assert sorted(r["attempts"] for r in res.records)[-1] == 5
    assert server.count_by_status() == {500: 2, 502: 1, None: 1, 200: 6}


def test_a_request_that_never_answers_times_out(server: FakeOpenAI, photos: Path) -> None:
    server.hang_next(1)
    res = analyze(server, photos, "--timeout", "0.5", "--max-attempts", "1", "--workers", "1")
    assert res.rc == 1
    [failed] = [r for r in res.records if r["status"] == "error"]
    assert failed["error"] == {"code": "TIMEOUT", "message": "no answer within 0.5s"}
    again = analyze(server, photos, "--timeout", "0.5")  # transient: the next run retries it
    assert again.rc == 0 and [r["path"] for r in again.records] == [failed["path"]]


@pytest.mark.parametrize("where", ["content", "body"])
def test_malformed_answers_are_retried(server: FakeOpenAI, photos: Path, where: str) -> None:
    server.malformed_next(1, where=where)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 0 and all(r["status"] == "ok" for r in res.records)
    assert sorted(r["attempts"] for r in res.records) == [1, 1, 1, 1, 1, 2]
    server.malformed_next(1, where=where)
    res = analyze(server, photos, "--fresh", "--limit", "1", "--max-attempts", "1")
    assert res.rc == 1 and res.records[0]["error"]["code"] == "AI_ERROR"
    expected = "the answer is not valid JSON" if where == "content" else "answer is not JSON"
    assert expected in res.records[0]["error"]["message"]


def test_a_refusal_is_blocked_and_never_retried(server: FakeOpenAI, photos: Path) -> None:
    server.refuse_next(1)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 1
    [refused] = [r for r in res.records if r["status"] == "error"]
    assert refused["error"] == {"code": "BLOCKED", "message": "refused: I can't help with that."}
    assert refused["attempts"] == 1
    assert analyze(server, photos).records == []  # permanent: not retried next run


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "2"}, 2.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}, 1.5),
    ],
)
def test_a_429_waits_what_its_headers_say(
    server: FakeOpenAI, photos: Path, headers: dict[str, str], wait: float
) -> None:
    server.fail_next(1, 429, headers=headers)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 0, res.stderr
    assert all(r["status"] == "ok" for r in res.records)
    [limited] = [r for r in server.requests if r.status == 429]
    assert limited.finished is not None
    # the next request waits for the server's delay (a sleep never ends early)
    later = [r.time - limited.finished for r in server.requests if r.time > limited.time]
    assert later and min(later) >= wait - 0.1
    # waiting out a 429 uses no attempt: the item's record counts its two requests
    assert sorted(r["attempts"] for r in res.records)[-1] == 2


def test_a_quota_far_below_rpm_is_learnt_from_the_reset_headers(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    for i in range(12):
        make_image(root / f"{i:02d}.png", size=(30 + i, 30))
    server.set_quota((4, 1.0))  # 4 a second, against --rpm 6000; no retry-after header
    res = analyze(server, root, "--workers", "4")
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["ok"] * 12
    statuses = [r.status for r in server.requests]
    assert statuses.count(200) == 12
    # the reset header pauses every thread until the window frees: no storm of 429s
    assert statuses.count(429) <= 6


def test_insufficient_quota_stops_the_run_with_exit_4(server: FakeOpenAI, photos: Path) -> None:
    body = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    server.fail_next(100, 429, body=body)
    res = analyze(server, photos, "--workers", "2")
    assert res.rc == 4, res.stderr
    assert "the OpenAI quota is exhausted (insufficient_quota)" in res.stderr
    assert res.records == [] and len(server.requests) <= 2


def test_a_rejected_key_stops_the_run_with_exit_5_and_is_never_shown(
    server: FakeOpenAI, photos: Path
) -> None:
    wrong = "sk-test-WRONG-000111222333"
    res = analyze(server, photos, "--workers", "2", "--verbose", key=wrong)
    assert res.rc == 5
    assert res.records == []
    assert f"{server.url} rejected the API key (401 invalid_api_key)" in res.stderr
    assert len(server.requests) <= 2
    # the server echoed the whole key in its message: it reached no output
    assert wrong not in res.stderr and wrong.encode() not in res.stdout


def test_the_key_never_appears_in_output_logs_or_checkpoint(
    server: FakeOpenAI, photos: Path
) -> None:
    server.fail_next(1, 503)
    server.fail_next(1, 400, body={"error": {"message": f"bad request from key {KEY}"}})
    res = analyze(server, photos, "--verbose", "--workers", "1")
    refused = analyze(server, photos, "--fresh", "--verbose", key=KEY[:-1] + "X")
    assert res.rc == 0 and refused.rc == 5, res.stderr + refused.stderr
    assert "bad request from key ***" in res.stderr  # scrubbed, not dropped
    for out in (res, refused):
        assert KEY.encode() not in out.stdout and KEY not in out.stderr
        assert KEY[:-1] + "X" not in out.stderr
    state = Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"
    for dirpath, _, files in os.walk(state):
        for name in files:
            assert KEY.encode() not in (Path(dirpath) / name).read_bytes()


def test_the_generic_openai_key_goes_to_openai_only(
    server: FakeOpenAI, photos: Path, tmp_path: Path
) -> None:
    from imgbatch.providers.openai import NO_KEY, OpenAIProvider

    env = {"OPENAI_API_KEY": GENERIC_KEY, "IMGBATCH_OPENAI_API_KEY": ""}
    res = analyze(server, photos, "--limit", "1", key="", env=env)
    assert res.rc == 5  # the fake (an OpenAI dialect) wants a key: it got the dummy
    assert {r.api_key for r in server.requests} == {"imgbatch-no-key"}
    settings = Settings(provider="openai")  # OpenAI's own URL: the generic key is used
    provider = OpenAIProvider(settings, env={"OPENAI_API_KEY": GENERIC_KEY})
    [official] = settings.openai_base_url  # https://api.openai.com/v1
    assert provider.key_for(official, {"OPENAI_API_KEY": GENERIC_KEY}) == GENERIC_KEY
    assert provider.key_for(server.base_url, {"OPENAI_API_KEY": GENERIC_KEY}) == NO_KEY
    provider.close()
    with pytest.raises(ConfigError, match="no OpenAI API key"):
        OpenAIProvider(settings, env={})


def test_auto_never_picks_openai_or_ollama(server: FakeOpenAI, photos: Path) -> None:
    env = {
        "IMGBATCH_OPENAI_API_KEY": KEY,
        "OPENAI_API_KEY": KEY,
        "IMGBATCH_OPENAI_BASE_URL": server.base_url,
        "OLLAMA_HOST": server.url,
    }
    res = run_cli(["analyze", "--limit", "1", photos], env=env)
    assert res.rc == 0 and res.records[0]["provider"] == "local"
    assert server.requests == []


def test_an_unknown_model_or_a_wrong_url_is_a_configuration_error(photos: Path) -> None:
    with FakeOpenAI(dialect="openai", models={"gpt-4.1-mini"}) as server:
        res = analyze(server, photos, "--model", "gpt-0-nope")
        assert res.rc == 2 and res.records == []
        assert "model 'gpt-0-nope' not found" in res.stderr and "model_not_found" in res.stderr
        res = analyze(server, photos, "--base-url", server.url)  # /v1 forgotten
        assert res.rc == 2 and "it usually ends in /v1" in res.stderr


def test_a_server_that_cannot_be_reached_stops_the_run_with_one_line(photos: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    res = run_cli(
        ["analyze", "--provider", "openai", "--base-url", url, "--workers", "3", photos],
        env={"IMGBATCH_RETRY_DELAY": "0.01"},
    )
    assert res.rc == 5 and res.records == []
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == [f"imgbatch: error: cannot reach {url[:-3]}: is the server running?"]


# -- several endpoints -------------------------------------------------------------------


def test_several_endpoints_share_the_work(photos: Path) -> None:
    with FakeOpenAI(dialect="openai") as a, FakeOpenAI(dialect="llamacpp") as b:
        urls = f"{a.base_url},{b.base_url}"
        res = analyze(a, photos, "--base-url", urls, "--workers", "2")
        assert res.rc == 0, res.stderr
        assert all(r["status"] == "ok" for r in res.records)
        assert a.count_by_status()[200] >= 2 and b.count_by_status()[200] >= 2


def test_a_failing_endpoint_cools_down_and_its_work_moves(photos: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeOpenAI(dialect="openai") as good, FakeOpenAI(dialect="openai") as sick:
        sick.fail_next(1000, 500)
        urls = f"{dead},{sick.base_url},{good.base_url}"
        res = analyze(good, photos, "--base-url", urls, "--workers", "2", "--max-attempts", "1")
        assert res.rc == 0, res.stderr
        assert [r["status"] for r in res.records] == ["ok"] * 6
        assert good.count_by_status() == {200: 6}
        # a failing endpoint is asked again only after its cool-down, which grows
        assert 1 <= len(sick.requests) <= 3
        # a request an endpoint failed moved at once, using up none of --max-attempts 1
        # (nothing else could save an item), and counts in the item's attempts
        assert sum(r["attempts"] for r in res.records) >= 6 + len(sick.requests)


# -- ollama ------------------------------------------------------------------------------


def test_ollama_runs_unthrottled_with_no_key_and_the_model_asked_for(
    ollama: FakeOpenAI, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    for i in range(12):
        make_image(root / f"{i:02d}.png", size=(40 + i, 30))
    ollama.set_latency(0.3)
    env = {"OPENAI_API_KEY": GENERIC_KEY, "IMGBATCH_OPENAI_API_KEY": KEY}  # never sent
    res = analyze_ollama(ollama, root, "--workers", "4", env=env)
    assert res.rc == 0, res.stderr
    assert {(r["provider"], r["model"], r["status"]) for r in res.records} == {
        ("ollama", "gemma3", "ok")
    }
    assert all(set(r["result"]) == FIELDS for r in res.records)
    # no rpm pacing (the default [rate] rpm of 60 would send one a second): the
    # workers keep the server busy
    assert ollama.max_in_flight >= 3
    assert {r.api_key for r in ollama.requests} == {"imgbatch-no-key"}
    assert {r.schema_form for r in ollama.requests} == {"nested"}  # json_schema honoured
    assert all(i.alphabet in ("standard", "plain") for r in ollama.requests for i in r.images)


def test_ollama_without_a_model_is_exit_2_naming_the_option(
    ollama: FakeOpenAI, photos: Path
) -> None:
    env = {"OLLAMA_HOST": ollama.url}
    res = run_cli(["analyze", "--provider", "ollama", photos], env=env)
    assert res.rc == 2 and "ollama needs a model: --model NAME" in res.stderr
    assert ollama.requests == []


def test_ollama_a_model_not_pulled_says_how_to_pull_it(ollama: FakeOpenAI, photos: Path) -> None:
    res = run_cli(
        ["analyze", "--provider", "ollama", "--model", "llava", photos],
        env={"OLLAMA_HOST": ollama.url},
    )
    assert res.rc == 2 and res.records == []
    assert "run `ollama pull llava`" in res.stderr


def test_ollama_that_is_not_running_stops_the_run_with_one_line(photos: Path) -> None:
    port = free_port()
    res = run_cli(
        ["analyze", "--provider", "ollama", "--model", "gemma3", photos],
        env={"OLLAMA_HOST": f"127.0.0.1:{port}"},
    )
    assert res.rc == 5 and res.records == []
    assert f"cannot reach http://127.0.0.1:{port}: is the server running?" in res.stderr


def test_ollama_dry_run_needs_no_server(photos: Path) -> None:
    res = run_cli(
        ["analyze", "--provider", "ollama", "--model", "gemma3", "--dry-run", photos],
        env={"OLLAMA_HOST": f"127.0.0.1:{free_port()}"},
    )
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["would-send"] * 6


# -- llama.cpp ---------------------------------------------------------------------------


def test_llamacpp_refusing_the_nested_schema_is_asked_with_json_object_once(
    photos: Path,
) -> None:
    with FakeOpenAI(dialect="llamacpp") as server:
        res = analyze(server, photos, "--workers", "1")
        assert res.rc == 0, res.stderr
        assert all(r["status"] == "ok" and set(r["result"]) == FIELDS for r in res.records)
        first, *rest = server.requests
        assert first.status == 400 and first.schema_form == "nested"
        # remembered for the run: every later request asks with json_object and the
        # schema (in the prompt too), and is answered
        assert [(r.status, r.response_format["type"]) for r in rest] == [(200, "json_object")] * 6
        assert all('"required"' in r.prompt for r in rest)
        assert res.stderr.count("refused the request with a json_schema") == 1
        # the fallback request counts in the item's attempts, not in max_attempts
        assert sorted(r["attempts"] for r in res.records) == [1, 1, 1, 1, 1, 2]


def test_llamacpp_loading_its_model_is_waited_out(photos: Path) -> None:
    with FakeOpenAI(dialect="llamacpp") as server:
        server.set_loading(1.5)
        res = analyze(server, photos, "--workers", "3", "--max-attempts", "1")
        assert res.rc == 0, res.stderr
        assert all(r["status"] == "ok" for r in res.records)
        # every thread pauses while it loads (integer error codes parsed): no storm
        assert server.count_by_status().get(503, 0) <= 6


def test_llamacpp_integer_error_codes_are_parsed(photos: Path) -> None:
    with FakeOpenAI(dialect="llamacpp", keys={"llama-key"}) as server:
        res = analyze(server, photos, key="wrong-llama-key")
        assert res.rc == 5
        assert "rejected the API key (401 authentication_error)" in res.stderr


# -- units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1:11434", "http://127.0.0.1:11434/v1"),
        ("gpu-box", "http://gpu-box:11434/v1"),
        ("gpu-box:9000", "http://gpu-box:9000/v1"),
        ("http://gpu-box", "http://gpu-box:80/v1"),
        ("https://ollama.example.com/proxy/", "https://ollama.example.com:443/proxy/v1"),
        ("[::1]:8080", "http://[::1]:8080/v1"),
        ("::1", "http://[::1]:11434/v1"),
        ("'0.0.0.0'", "http://0.0.0.0:11434/v1"),
        ("gpu-box:http", "http://gpu-box:11434/v1"),  # an invalid port: the default
        (":11434", "http://127.0.0.1:11434/v1"),
    ],
)
def test_ollama_host_is_read_as_ollama_reads_it(host: str, url: str) -> None:
    from imgbatch.providers.openai import ollama_url

    assert ollama_url(host) == url


def test_retry_after_headers() -> None:
    import email.utils
    import time

    from imgbatch.providers.openai import retry_after

    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (retry_after({"retry-after": date}) or 0) <= 31
    reset = {"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "12ms"}
    assert retry_after(reset) == 360.0  # nothing says which ran out: requests
    spent = {**reset, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "5"}
    assert retry_after(spent) == 0.012
    assert retry_after({"x-ratelimit-reset-requests": "1h2m3.5s"}) == 3723.5
    assert retry_after({}) is None and retry_after({"retry-after": "soon"}) is None


def test_ollama_rpm_is_its_own_unless_rpm_is_given(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[rate]\nrpm = 100\n")
    assert load_settings(cfg, {"provider": "ollama"}, {}).rpm == 0.0  # [rate] is for paid APIs
    assert load_settings(cfg, {"provider": "ollama", "rpm": 30}, {}).rpm == 30.0
    assert load_settings(cfg, {"provider": "gemini"}, {}).rpm == 100.0
    cfg.write_text("[ollama]\nrpm = 5\n")
    assert load_settings(cfg, {"provider": "ollama"}, {}).rpm == 5.0
    env = {"IMGBATCH_PROVIDER": "ollama", "IMGBATCH_OLLAMA_RPM": "7"}
    assert load_settings(None, {}, env).rpm == 7.0


def test_the_openai_key_never_shows_in_the_settings_repr() -> None:
    settings = load_settings(None, {}, {"IMGBATCH_OPENAI_API_KEY": KEY})
    assert settings.openai_api_key == KEY and KEY not in repr(settings)
