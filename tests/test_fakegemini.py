"""The fake Gemini server speaks the wire format of the real google-genai SDK.

Each test drives the real SDK (or, for wire details the SDK never produces, raw httpx2)
against tests/fakegemini.py and states one behaviour the rest of the suite relies on.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image

from tests.fakegemini import DEFAULT_SCHEMA, FakeGemini, decode_base64_any, minimal_instance

MODEL = "gemini-2.5-flash-lite"
PROMPT = "describe"  # 8 characters: 2 text tokens


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeGemini]]:
    """Start fake servers with the given settings; all are stopped after the test."""
    started: list[FakeGemini] = []

    def make(**settings: Any) -> FakeGemini:
        server = FakeGemini(**settings).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
        assert server.errors == []
        assert server.alive_threads == []


def make_client(url: str, key: str = "k1", timeout_ms: int = 5000) -> genai.Client:
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(
            base_url=url, timeout=timeout_ms, client_args={"trust_env": False}
        ),
    )


def png(size: tuple[int, int] = (64, 48), seed: int = 1) -> bytes:
    """A noisy PNG: its URL-safe base64 certainly contains '-' or '_'."""
    rng = random.Random(seed)
    noise = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    img = Image.frombytes("RGB", size, noise)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def flat_png(size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def generate(
    client: genai.Client, image: bytes | None = None, **config: Any
) -> types.GenerateContentResponse:
    config.setdefault("response_mime_type", "application/json")
    config.setdefault("temperature", 0)
    contents: list[types.PartUnionDict] = [
        types.Part.from_bytes(data=image or png(), mime_type="image/png"),
        PROMPT,
    ]
    return client.models.generate_content(
        model=MODEL, contents=contents, config=types.GenerateContentConfig(**config)
    )


def detail(exc: errors.APIError, type_suffix: str) -> dict[str, Any]:
    """The entry of ``error.details`` whose @type ends with ``type_suffix``."""
    entries = exc.details["error"]["details"]
    return next(d for d in entries if d["@type"].endswith(type_suffix))


def seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- happy path


def test_happy_answer_is_schema_conforming_json_with_usage_metadata(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    resp = generate(make_client(server.url), flat_png((300, 200)), response_schema=DEFAULT_SCHEMA)

    answer = json.loads(resp.text or "")
    assert set(answer) == {"description", "tags", "objects", "colors", "mood", "text"}
    assert "300x200" in answer["description"]
    assert answer["colors"] == ["red"]
    assert all(isinstance(answer[k], list) and answer[k] for k in ("tags", "objects", "colors"))
    assert resp.candidates and resp.candidates[0].finish_reason == types.FinishReason.STOP
    usage = resp.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == 258 + len(PROMPT) // 4
    assert usage.candidates_token_count and usage.candidates_token_count > 0
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert resp.model_version == MODEL


def test_answer_is_deterministic_from_the_image_bytes(fake: Callable[..., FakeGemini]) -> None:
    client = make_client(fake().url)
    first, again, other = (generate(client, png(seed=s)).text for s in (1, 1, 2))
    assert first == again
    assert first != other


def test_sdk_posts_to_v1_generate_content_with_key_header(fake: Callable[..., FakeGemini]) -> None:
    server = fake(keys={"k1"})
    generate(make_client(server.url, timeout_ms=2500))

    rec = server.last_request
    assert rec.path == f"/v1/models/{MODEL}:generateContent"  # 3.x: v1, not v1beta
    assert (rec.api_key, rec.key_source) == ("k1", "header")
    assert rec.server_timeout == "3"  # X-Server-Timeout: the client timeout, rounded up
    assert rec.prompt == PROMPT
    assert rec.temperature == 0
    assert rec.response_mime_type == "application/json"
    assert "k1" not in repr(rec)


def test_server_decodes_the_sdks_urlsafe_base64_image_exactly(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    image = png((80, 60), seed=3)
    generate(make_client(server.url), image)

    [received] = server.last_request.images
    assert received.alphabet == "urlsafe"  # so this test does exercise '-' and '_'
    assert received.data == image
    assert (received.mime_type, received.width, received.height) == ("image/png", 80, 60)


def test_recorded_image_opens_with_pillow_exif_included(fake: Callable[..., FakeGemini]) -> None:
    server = fake()
    exif = Image.Exif()
    exif[0x010F] = "FakeCam"  # Make
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(out, "JPEG", exif=exif)
    client = make_client(server.url)
    client.models.generate_content(
        model=MODEL, contents=types.Part.from_bytes(data=out.getvalue(), mime_type="image/jpeg")
    )

    with server.last_request.images[0].open() as img:
        assert img.size == (40, 30)
        assert img.getexif()[0x010F] == "FakeCam"


@pytest.mark.parametrize(
    ("size", "media_resolution", "image_tokens"),
    [
        ((384, 384), None, 258),
        ((1000, 500), None, 2 * 258),  # two 768x768 tiles
        ((1000, 500), "MEDIA_RESOLUTION_LOW", 64),
    ],
)
def test_prompt_tokens_follow_image_size_and_media_resolution(
    fake: Callable[..., FakeGemini],
    size: tuple[int, int],
    media_resolution: str | None,
    image_tokens: int,
) -> None:
    server = fake()
    resp = generate(make_client(server.url), flat_png(size), media_resolution=media_resolution)

    assert resp.usage_metadata and resp.usage_metadata.prompt_token_count == image_tokens + 2
    assert server.last_request.media_resolution == media_resolution


# --------------------------------------------------------------------------- schemas


def test_response_schema_arrives_as_openapi_under_response_schema(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    generate(make_client(server.url), response_schema=DEFAULT_SCHEMA)

    rec = server.last_request
    assert rec.schema_field == "responseSchema"
    assert rec.schema["type"] == "OBJECT"  # the SDK upper-cases OpenAPI types
    assert rec.schema["properties"]["tags"]["items"]["type"] == "STRING"


def test_response_json_schema_arrives_unchanged_and_answer_satisfies_it(
    fake: Callable[..., FakeGemini],
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["cat", "dog"]},
            "count": {"type": "integer", "minimum": 1},
            "sure": {"type": "boolean"},
            "boxes": {"type": "array", "items": {"$ref": "#/$defs/box"}},
            "note": {"type": ["string", "null"]},
        },
        "required": ["label", "count", "sure", "boxes"],
        "$defs": {"box": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    server = fake()
    resp = generate(make_client(server.url), response_json_schema=schema)

    assert server.last_request.schema_field == "responseJsonSchema"
    assert server.last_request.schema == schema
    assert json.loads(resp.text or "") == {
        "label": "cat",
        "count": 1,
        "sure": False,
        "boxes": [{"x": 0.0}],
        "note": "x",
    }


def test_minimal_instance_keeps_fitting_hints_and_walks_the_rest() -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "description": {"type": "STRING"},
            "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["a", "b"]}},
            "extra": {"anyOf": [{"type": "null"}, {"type": "INTEGER"}]},
        },
    }
    hints = {"description": "rich", "tags": ["not-in-enum"]}
    assert minimal_instance(schema, hints) == {"description": "rich", "tags": ["a"], "extra": 0}


def test_pydantic_schema_is_parsed_by_the_sdk(fake: Callable[..., FakeGemini]) -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        description: str
        tags: list[str]

    resp = generate(make_client(fake().url), flat_png((50, 50)), response_schema=Answer)
    assert isinstance(resp.parsed, Answer)
    assert "50x50" in resp.parsed.description


# --------------------------------------------------------------------------- raw wire details


def test_standard_base64_snake_case_query_key_and_v1beta_are_accepted(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake(keys={"k1"})
    image = png(seed=4)
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"inline_data": {"mime_type": "image/png",
                                     "data": base64.b64encode(image).decode()}},
                    {"text": "what is this"},
                ],
            }
        ],
        "generation_config": {"response_mime_type": "application/json",
                              "response_schema": {"type": "object"}, "max_output_tokens": 64},
    }  # fmt: skip
    with httpx2.Client(trust_env=False) as http:
        r = http.post(f"{server.url}/v1beta/models/{MODEL}:generateContent?key=k1", json=body)

    assert r.status_code == 200
    assert "candidates" in r.json()
    rec = server.last_request
    assert (rec.api_version, rec.key_source, rec.api_key) == ("v1beta", "query", "k1")
    assert rec.images[0].data == image
    assert (rec.images[0].alphabet, rec.images[0].padded) in {
        ("standard", True), ("standard", False), ("plain", True), ("plain", False)
    }  # fmt: skip
    assert rec.schema_field == "response_schema"
    assert rec.max_output_tokens == 64
    assert "k1" not in rec.path


def test_base64_decoder_accepts_both_alphabets_with_or_without_padding() -> None:
    data = bytes(range(256)) + b"\xfb\xff"
    for encoded in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
        text = encoded.decode()
        assert decode_base64_any(text)[0] == data
        assert decode_base64_any(text.rstrip("="))[0] == data
    with pytest.raises(ValueError):
        decode_base64_any("not base64!")


def test_undecodable_base64_is_a_400(fake: Callable[..., FakeGemini]) -> None:
    server = fake()
    body = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "@@@"}}]}]}
    with httpx2.Client(trust_env=False) as http:
        r = http.post(
            f"{server.url}/v1/models/{MODEL}:generateContent",
            json=body,
            headers={"x-goog-api-key": "k1"},
        )
    assert r.status_code == 400
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_oversized_request_is_a_400(fake: Callable[..., FakeGemini]) -> None:
    server = fake(max_request_bytes=1000)
    with pytest.raises(errors.ClientError) as caught:
        generate(make_client(server.url), png((100, 100)))
    assert caught.value.code == 400
    assert "payload size exceeds the limit" in (caught.value.message or "")


def test_unknown_model_is_a_404_when_models_are_listed(fake: Callable[..., FakeGemini]) -> None:
    server = fake(models={"gemini-2.5-flash"})
    with pytest.raises(errors.ClientError) as caught:
        generate(make_client(server.url))
    assert (caught.value.code, caught.value.status) == (404, "NOT_FOUND")


# --------------------------------------------------------------------------- keys


def test_bad_key_raises_client_error_400_api_key_invalid(fake: Callable[..., FakeGemini]) -> None:
    server = fake(keys={"good"})
    with pytest.raises(errors.ClientError) as caught:
        generate(make_client(server.url, key="wrong"))

    exc = caught.value
    assert (exc.code, exc.status) == (400, "INVALID_ARGUMENT")
    assert exc.message == "API key not valid. Please pass a valid API key."
    assert detail(exc, "google.rpc.ErrorInfo")["reason"] == "API_KEY_INVALID"
    assert server.last_request.api_key == "wrong"
    assert server.count_by_outcome() == {"bad_key": 1}


def test_forbidden_key_raises_client_error_403(fake: Callable[..., FakeGemini]) -> None:
    server = fake(keys={"good"}, forbidden_keys={"blocked"})
    with pytest.raises(errors.ClientError) as caught:
        generate(make_client(server.url, key="blocked"))
    assert (caught.value.code, caught.value.status) == (403, "PERMISSION_DENIED")


def test_valid_keys_can_change_while_running(fake: Callable[..., FakeGemini]) -> None:
    server = fake(keys={"old"})
    client = make_client(server.url, key="new")
    with pytest.raises(errors.ClientError):
        generate(client)
    server.configure(keys={"old", "new"})
    assert generate(client).text


# --------------------------------------------------------------------------- quotas


def test_full_window_answers_429_with_retry_info_and_per_minute_quota_id(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake(quota=(2, 5.0))
    client = make_client(server.url)
    generate(client)
    generate(client)
    with pytest.raises(errors.ClientError) as caught:
        generate(client)

    exc = caught.value
    assert (exc.code, exc.status) == (429, "RESOURCE_EXHAUSTED")
    assert 4.0 <= seconds(detail(exc, "google.rpc.RetryInfo")["retryDelay"]) <= 5.0
    [violation] = detail(exc, "google.rpc.QuotaFailure")["violations"]
    assert "PerMinute" in violation["quotaId"]
    assert server.count_by_status() == {200: 2, 429: 1}


def test_window_slides_and_retry_delay_counts_down(fake: Callable[..., FakeGemini]) -> None:
    clock = ManualClock()
    server = fake(quota=(1, 10.0), clock=clock)
    client = make_client(server.url)
    generate(client)
    clock.now += 9.5
    with pytest.raises(errors.ClientError) as caught:
        generate(client)
    assert detail(caught.value, "RetryInfo")["retryDelay"] == "0.5s"
    clock.now += 0.5
    assert generate(client).text


def test_quotas_are_per_project_not_per_key(fake: Callable[..., FakeGemini]) -> None:
    server = fake(keys={"a1", "a2", "b1"}, projects={"b1": "project-b"}, quota=(1, 60.0))
    generate(make_client(server.url, key="a1"))
    with pytest.raises(errors.ClientError) as caught:
        generate(make_client(server.url, key="a2"))  # same (default) project: no new quota
    assert caught.value.code == 429
    assert generate(make_client(server.url, key="b1")).text  # another project: its own window


def test_day_quota_answers_429_with_per_day_quota_id_and_long_delay(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake(day_quota=1, day_retry_delay=7200)
    client = make_client(server.url)
    generate(client)
    with pytest.raises(errors.ClientError) as caught:
        generate(client)

    exc = caught.value
    assert exc.code == 429
    assert "PerDay" in detail(exc, "QuotaFailure")["violations"][0]["quotaId"]
    assert detail(exc, "RetryInfo")["retryDelay"] == "7200s"
    server.reset_quotas()
    assert generate(client).text


def test_day_quota_delay_defaults_to_pacific_midnight(fake: Callable[..., FakeGemini]) -> None:
    server = fake(day_quota=0)
    with pytest.raises(errors.ClientError) as caught:
        generate(make_client(server.url))
    assert 1 <= seconds(detail(caught.value, "RetryInfo")["retryDelay"]) <= 25 * 3600


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("status", "name"), [(500, "INTERNAL"), (503, "UNAVAILABLE")])
def test_injected_5xx_raises_server_error(
    fake: Callable[..., FakeGemini], status: int, name: str
) -> None:
    server = fake()
    server.fail_next(1, status)
    client = make_client(server.url)
    with pytest.raises(errors.ServerError) as caught:
        generate(client)
    assert (caught.value.code, caught.value.status) == (status, name)
    assert generate(client).text  # only the next one failed


def test_injected_429_without_retry_delay_has_no_details(fake: Callable[..., FakeGemini]) -> None:
    server = fake()
    server.fail_next(1, 429)
    server.fail_next(1, 429, retry_delay="2s")
    client = make_client(server.url)
    with pytest.raises(errors.ClientError) as bare:
        generate(client)
    with pytest.raises(errors.ClientError) as detailed:
        generate(client)
    assert "details" not in bare.value.details["error"]
    assert detail(detailed.value, "RetryInfo")["retryDelay"] == "2s"


def test_non_json_error_page_surfaces_as_text(fake: Callable[..., FakeGemini]) -> None:
    server = fake()
    server.fail_next(1, 502, body=b"<html>Bad Gateway</html>")
    with pytest.raises(errors.ServerError) as caught:
        generate(make_client(server.url))
    exc = caught.value
    assert (exc.code, exc.status, exc.message) == (502, "Bad Gateway", "<html>Bad Gateway</html>")
    assert exc.details == {"message": "<html>Bad Gateway</html>", "status": "Bad Gateway"}


def test_random_faults_are_reproducible_from_the_seed(fake: Callable[..., FakeGemini]) -> None:
    def statuses(seed: int) -> list[int | None]:
        server = fake(fault_rate=0.4, fault_statuses=(429, 500, 503), seed=seed)
        client = make_client(server.url)
        for _ in range(25):
            try:
                generate(client)
            except errors.APIError:
                pass
        return [r.status for r in server.requests]

    first = statuses(seed=11)
    assert first == statuses(seed=11)
    assert {200, 429, 500, 503} <= set(first)


def test_hang_with_client_timeout_raises_httpx2_read_timeout(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    server.hang_next(1)
    start = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout) as caught:
        generate(make_client(server.url, timeout_ms=500))
    assert isinstance(caught.value, httpx2.TimeoutException)
    assert isinstance(caught.value, httpx2.TransportError)
    assert time.monotonic() - start < 2.0
    assert server.last_request.outcome == "hang"
    assert server.last_request.status is None  # still hanging: not answered


def test_connection_refused_raises_httpx2_connect_error() -> None:
    server = FakeGemini().start()
    url = server.url
    server.stop()
    with pytest.raises(httpx2.ConnectError) as caught:
        generate(make_client(url, timeout_ms=2000))
    assert isinstance(caught.value, httpx2.TransportError)


def test_dropped_connection_raises_httpx2_remote_protocol_error(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    server.drop_next(1)
    client = make_client(server.url)
    with pytest.raises(httpx2.RemoteProtocolError):
        generate(client)
    assert generate(client).text  # the client reconnects


def test_malformed_answer_is_200_with_text_that_is_not_json(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    server.malformed_next(1)
    resp = generate(make_client(server.url), response_schema=DEFAULT_SCHEMA)

    assert resp.text
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)
    assert resp.parsed is None  # the SDK swallows the parse failure
    assert server.count_by_outcome() == {"malformed": 1}


def test_safety_block_of_the_prompt_has_no_candidates(fake: Callable[..., FakeGemini]) -> None:
    server = fake()
    server.block_next(1, form="prompt")
    resp = generate(make_client(server.url))

    assert resp.text is None
    assert not resp.candidates
    assert resp.prompt_feedback is not None
    assert resp.prompt_feedback.block_reason == types.BlockedReason.SAFETY


def test_safety_block_of_the_candidate_has_finish_reason_and_no_content(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake()
    server.block_next(1, form="candidate")
    resp = generate(make_client(server.url))

    assert resp.text is None
    assert resp.candidates and resp.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert resp.candidates[0].content is None


def test_scripted_actions_run_in_the_order_queued(fake: Callable[..., FakeGemini]) -> None:
    server = fake()
    server.fail_next(2, 503)
    server.malformed_next(1)
    server.block_next(1)
    client = make_client(server.url)
    for _ in range(5):
        try:
            generate(client)
        except errors.APIError:
            pass
    assert [r.outcome for r in server.requests] == ["fault", "fault", "malformed", "blocked", "ok"]


# --------------------------------------------------------------------------- timing and life


def test_latency_delays_every_answer_and_can_change_while_running(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake(latency=0.3)
    client = make_client(server.url)
    start = time.monotonic()
    generate(client)
    assert time.monotonic() - start >= 0.3
    server.set_latency(0.0)
    start = time.monotonic()
    generate(client)
    assert time.monotonic() - start < 0.25


def test_concurrent_requests_are_served_in_parallel_and_counted(
    fake: Callable[..., FakeGemini],
) -> None:
    server = fake(latency=0.3)
    client = make_client(server.url)
    threads = [threading.Thread(target=generate, args=(client,)) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start < 1.0
    assert server.max_in_flight == 4
    assert server.in_flight == 0
    assert server.count_by_status() == {200: 4}


def test_stop_ends_hung_answers_and_leaves_no_threads() -> None:
    server = FakeGemini(hang_seconds=60).start()
    client = make_client(server.url, timeout_ms=30_000)
    generate(client)  # leaves an idle keep-alive connection open
    server.hang_next(1)
    outcome: list[BaseException] = []

    def hung_call() -> None:
        try:
            generate(client)
        except BaseException as exc:  # noqa: B036 - recorded for the main thread
            outcome.append(exc)

    caller = threading.Thread(target=hung_call)
    caller.start()
    assert server.wait_for_requests(2)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 1.0
    caller.join(5)
    assert server.alive_threads == []
    assert [type(e) for e in outcome] == [httpx2.RemoteProtocolError]
    assert not any(t.name.startswith("fakegemini") for t in threading.enumerate())
