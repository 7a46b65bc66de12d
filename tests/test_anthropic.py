"""The anthropic provider: the real `anthropic` SDK talking HTTP to the fake Messages API
(tests/fakeanthropic.py), driven through the real CLI in a subprocess."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.config import Settings
from imgbatch.errors import ConfigError
from tests.conftest import CliResult, make_image, run_cli
from tests.fakeanthropic import FakeAnthropic, error_body

KEY = "sk-ant-test-SECRET-0123456789abcdef"
GENERIC_KEY = "sk-ant-generic-OTHER-TOOL-9876543210"
FIELDS = {"description", "tags", "objects", "colors", "mood", "text"}


@pytest.fixture(autouse=True)
def no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the machine's own ANTHROPIC_* settings."""
    for name in list(os.environ):
        if name.startswith("ANTHROPIC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(keys={KEY}, hang_seconds=5.0) as fake:
        yield fake
        assert fake.errors == []  # the fake itself never crashed


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"img{i}.jpg", size=(1600 + 10 * i, 1200), color=(30 * i, 90, 150))
    return root


def analyze(
    server: FakeAnthropic,
    root: Path,
    *args: str | Path,
    key: str = KEY,
    env: dict[str, str] | None = None,
) -> CliResult:
    """`imgbatch analyze --provider anthropic` against `server`."""
    full_env = {
        "IMGBATCH_ANTHROPIC_API_KEY": key,
        "IMGBATCH_ANTHROPIC_BASE_URL": server.url,
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "6000",
        **(env or {}),
    }
    return run_cli(["analyze", "--provider", "anthropic", *args, root], env=full_env)


def errors(res: CliResult) -> list[str]:
    """The error lines of stderr (beside them, only the run's summary line)."""
    return [line for line in res.stderr.splitlines() if line.startswith("imgbatch: error:")]


def test_happy_path_a_forced_tool_call_with_the_schema_and_tokens(
    server: FakeAnthropic, photos: Path
) -> None:
    res = analyze(server, photos, "--workers", "2")
    assert res.rc == 0, res.stderr
    assert len(res.records) == 4
    for r in res.records:
        assert r["status"] == "ok" and r["provider"] == "anthropic"
        assert r["model"] == "claude-haiku-4-5" and r["attempts"] == 1
        assert set(r["result"]) == FIELDS
        assert r["input_tokens"] > 0 and r["output_tokens"] > 0
    req = server.last_request
    assert req.api_key == KEY and req.version and req.model == "claude-haiku-4-5"
    [tool] = req.tools
    assert req.tool_choice == {"type": "tool", "name": tool["name"]}
    assert set(tool["input_schema"]["required"]) == FIELDS
    assert req.max_tokens == 1024 and "searchable catalogue" in req.prompt
    assert "temperature" not in req.body  # the Messages API of anthropic 2.x takes none
    assert "tokens:" in res.stderr


def test_the_image_is_a_base64_block_of_the_downscaled_jpeg(
    server: FakeAnthropic, tmp_path: Path
) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    Image.new("RGB", (4000, 3000), (120, 60, 30)).save(root / "big.jpg", exif=exif)
    res = analyze(server, root, "--max-side", "512")
    assert res.rc == 0, res.stderr
    [block] = [
        b for b in server.last_request.body["messages"][0]["content"] if b["type"] == "image"
    ]
    assert block["source"]["type"] == "base64" and block["source"]["media_type"] == "image/jpeg"
    [image] = server.last_request.images
    with image.open() as up:
        assert max(up.size) == 512 and up.format == "JPEG" and not up.getexif()
    assert base64.b64decode(block["source"]["data"]) == image.data


def test_a_custom_schema_is_the_tool_input_schema_and_checked(
    server: FakeAnthropic, photos: Path, tmp_path: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["animal", "count"],
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    server.set_responder(lambda rec: {"animal": "cat", "count": "three"})  # not an integer
    res = analyze(server, photos, "--schema", path, "--limit", "1", "--max-attempts", "2")
    assert res.rc == 1
    [rec] = res.records
    assert rec["status"] == "error" and rec["error"]["code"] == "AI_ERROR"
    assert "does not match the schema" in rec["error"]["message"]
    assert len(server.requests) == 2  # retried
    assert server.last_request.tools[0]["input_schema"] == schema
    server.set_responder(lambda rec: {"animal": "cat", "count": 3})
    res = analyze(server, photos, "--schema", path, "--limit", "1")
    assert res.rc == 0 and res.records[0]["result"] == {"animal": "cat", "count": 3}


@pytest.mark.parametrize("fault", ["cut", "no_tool", "malformed", "529", "500"])
def test_answers_of_no_use_and_overloads_are_retried(
    server: FakeAnthropic, photos: Path, fault: str
) -> None:
    if fault == "cut":
        server.cut_next(1)
    elif fault == "no_tool":
        server.no_tool_next(1)
    elif fault == "malformed":
        server.malformed_next(1)
    else:
        server.fail_next(1, int(fault))
    res = analyze(server, photos, "--workers", "1", "--limit", "1")
    assert res.rc == 0, res.stderr
    assert res.records[0]["status"] == "ok" and res.records[0]["attempts"] == 2
    assert [r.status for r in server.requests] == [
        200 if fault in ("cut", "no_tool", "malformed") else int(fault),
        200,
    ]


def test_a_max_tokens_stop_every_time_is_an_ai_error(server: FakeAnthropic, photos: Path) -> None:
    server.cut_next(2)
    res = analyze(server, photos, "--limit", "1", "--max-attempts", "2")
    assert res.rc == 1
    [rec] = res.records
    assert rec["error"]["code"] == "AI_ERROR" and "max_output_tokens" in rec["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "1.5"},
        {  # no retry-after: the spent quota's reset, 1.5 s after the answer
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-tokens-reset": "in:1.5",
            "anthropic-ratelimit-requests-remaining": "10",
            "anthropic-ratelimit-requests-reset": "in:0",
        },
    ],
)
def test_a_429_waits_what_its_headers_say(
    server: FakeAnthropic, photos: Path, headers: dict[str, str]
) -> None:
    wait = 1.5
    body = error_body(429, "Number of request tokens has exceeded your rate limit")
    server.fail_next(1, 429, body=body, headers=headers)
    res = analyze(server, photos, "--workers", "1")
    assert res.rc == 0, res.stderr
    assert all(r["status"] == "ok" for r in res.records)
    [limited] = [r for r in server.requests if r.status == 429]
    assert limited.finished is not None
    later = [r.time - limited.finished for r in server.requests if r.time > limited.time]
    assert later and min(later) >= wait - 0.1  # a sleep never ends early


def test_a_rejected_key_stops_the_run_with_exit_5_and_one_line(
    server: FakeAnthropic, photos: Path
) -> None:
    wrong = "sk-ant-WRONG-000111222333"
    res = analyze(server, photos, "--workers", "2", key=wrong)
    assert res.rc == 5
    assert res.records == []
    assert len(errors(res)) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{server.url} rejected the API key (401 authentication_error)" in res.stderr
    assert wrong not in res.stderr and wrong.encode() not in res.stdout


@pytest.mark.parametrize("status", [400, 402])
def test_a_credit_balance_too_low_stops_the_run_with_exit_4(
    server: FakeAnthropic, photos: Path, status: int
) -> None:
    message = "Your credit balance is too low to access the Anthropic API."
    kind = "invalid_request_error" if status == 400 else "billing_error"
    server.fail_next(100, status, body=error_body(status, message, kind))
    res = analyze(server, photos, "--workers", "2")
    assert res.rc == 4, res.stderr
    assert len(errors(res)) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "the Anthropic credit balance is too low" in res.stderr
    assert res.records == [] and len(server.requests) <= 2


def test_no_anthropic_variable_changes_what_is_sent(
    server: FakeAnthropic, photos: Path, tmp_path: Path
) -> None:
    res = analyze(server, photos, "--limit", "1")
    assert res.rc == 0, res.stderr
    plain = server.last_request
    with FakeAnthropic() as elsewhere:  # where ANTHROPIC_BASE_URL points: never asked
        hostile = {
            "ANTHROPIC_API_KEY": GENERIC_KEY,
            "ANTHROPIC_AUTH_TOKEN": "auth-token-OTHER-123456",
            "ANTHROPIC_BASE_URL": elsewhere.url,
            "ANTHROPIC_CUSTOM_HEADERS": "X-Leak: leaked-123456\nAuthorization: Bearer nope",
            "ANTHROPIC_PROFILE": "other",
            "ANTHROPIC_CONFIG_DIR": str(tmp_path / "anthropic-config"),
            "ANTHROPIC_LOG": "debug",
        }
        res = analyze(server, photos, "--limit", "1", "--fresh", env=hostile)
        assert res.rc == 0, res.stderr
        assert elsewhere.requests == []
    sent = server.last_request
    assert sent.api_key == KEY and sent.key_header == plain.key_header
    assert sent.headers.keys() == plain.headers.keys()
    assert "x-leak" not in sent.headers
    assert sent.body == plain.body
    for secret in (KEY, GENERIC_KEY, "auth-token-OTHER"):
        assert secret not in res.stderr and secret.encode() not in res.stdout


def test_the_generic_key_goes_to_anthropic_only(server: FakeAnthropic, photos: Path) -> None:
    from imgbatch.providers.anthropic import NO_KEY, key_for

    env = {"ANTHROPIC_API_KEY": GENERIC_KEY}
    res = analyze(server, photos, "--limit", "1", key="", env=env)
    assert res.rc == 5  # the fake wants a key: it got the dummy, never the generic one
    assert {r.api_key for r in server.requests} == {NO_KEY}
    settings = Settings(provider="anthropic")
    official = settings.anthropic_base_url  # https://api.anthropic.com
    assert key_for(settings, official, env) == GENERIC_KEY
    assert key_for(settings, server.url, env) == NO_KEY
    own = Settings(provider="anthropic", anthropic_api_key=KEY)
    assert key_for(own, server.url, env) == KEY
    with pytest.raises(ConfigError, match="no Anthropic API key"):
        key_for(settings, official, {})


def test_the_key_never_appears_in_output_logs_or_state(server: FakeAnthropic, photos: Path) -> None:
    server.fail_next(1, 529)
    server.fail_next(1, 400, body=error_body(400, f"bad request from key {KEY}"))
    res = analyze(server, photos, "--verbose", "--workers", "1")
    assert res.rc == 1, res.stderr  # the 400 is not retried: one item failed
    assert "bad request from key ***" in res.stdout.decode()  # scrubbed, not dropped
    assert KEY.encode() not in res.stdout and KEY not in res.stderr
    state = Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"
    read = 0
    for dirpath, _, files in os.walk(state):
        for name in files:
            assert KEY.encode() not in (Path(dirpath) / name).read_bytes()
            read += 1
    assert read > 0  # the state and results were there to read


def test_auto_never_picks_anthropic(server: FakeAnthropic, photos: Path) -> None:
    env = {
        "IMGBATCH_ANTHROPIC_API_KEY": KEY,
        "ANTHROPIC_API_KEY": KEY,
        "IMGBATCH_ANTHROPIC_BASE_URL": server.url,
    }
    res = run_cli(["analyze", "--limit", "1", photos], env=env)
    assert res.rc == 0 and res.records[0]["provider"] == "local"
    assert server.requests == []


def test_another_base_url_changes_the_fingerprint_anthropics_own_does_not() -> None:
    from imgbatch.providers.anthropic import AnthropicProvider

    own = AnthropicProvider(Settings(provider="anthropic", anthropic_api_key=KEY), env={})
    other = AnthropicProvider(
        Settings(provider="anthropic", anthropic_base_url="http://127.0.0.1:9"), env={}
    )
    assert "endpoint" not in own.fingerprint() and "endpoint" in other.fingerprint()
    assert own.estimate_tokens(1000, 750) == 1000  # width x height / 750
    assert KEY not in repr(own.settings)
    own.close()
    other.close()


def test_a_temperature_the_api_takes_not_is_ignored_with_one_warning(
    server: FakeAnthropic, photos: Path
) -> None:
    res = analyze(server, photos, "--temperature", "0.7", "--workers", "2")
    assert res.rc == 0, res.stderr
    assert res.stderr.count("temperature 0.7 ignored") == 1
    assert all("temperature" not in r.body for r in server.requests)
