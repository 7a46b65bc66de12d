"""The fake OpenAI-compatible server speaks each dialect as the real `openai` SDK expects,
and the SDK (retries off) raises what providers/openai.py classifies."""

from __future__ import annotations

import base64
import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from PIL import Image

from tests.fakeopenai import FakeOpenAI

SCHEMA = {
    "type": "object",
    "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["animal", "count"],
}


def data_url(urlsafe: bool = False) -> str:
    buf = io.BytesIO()
    # a noisy image, so that its base64 holds '+' or '/' (or '-' or '_' when URL-safe)
    Image.frombytes("L", (64, 48), bytes(range(256)) * 12).convert("RGB").save(buf, "JPEG")
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return "data:image/jpeg;base64," + encode(buf.getvalue()).decode()


def ask(client: openai.OpenAI, **changes: Any) -> Any:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe."},
                    {"type": "image_url", "image_url": {"url": data_url(), "detail": "low"}},
                ],
            }
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
        },
    }
    body.update(changes)
    return client.chat.completions.with_raw_response.create(**body)


def client(server: FakeOpenAI, key: str = "k1", timeout: float = 5.0) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.base_url, max_retries=0, timeout=timeout)


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dialect="openai", keys={"k1"}, models={"m"}, hang_seconds=5) as fake:
        yield fake
        assert fake.errors == []


def test_openai_answers_the_schema_with_usage_and_rate_limit_headers(
    openai_server: FakeOpenAI,
) -> None:
    raw = ask(client(openai_server))
    body = raw.http_response.json()
    assert raw.headers["x-ratelimit-remaining-requests"].isdigit()
    assert raw.headers["x-ratelimit-reset-requests"].endswith("ms")
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"animal", "count"} and isinstance(answer["count"], int)
    assert body["usage"]["prompt_tokens"] > 85 and body["usage"]["completion_tokens"] > 0
    req = openai_server.last_request
    assert req.api_key == "k1" and req.schema == SCHEMA and req.schema_form == "nested"
    assert req.strict is True and req.images[0].detail == "low"
    assert req.images[0].alphabet == "standard" and req.images[0].format == "JPEG"


def test_openai_errors_carry_string_codes(openai_server: FakeOpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as bad_key:
        ask(client(openai_server, key="wrong-key-123"))
    assert bad_key.value.code == "invalid_api_key"
    assert "wrong-key-123" in str(bad_key.value.body)  # echoed whole: scrubbing is tested
    with pytest.raises(openai.NotFoundError) as no_model:
        ask(client(openai_server), model="gpt-0")
    assert no_model.value.code == "model_not_found"
    openai_server.fail_next(1, 429, headers={"retry-after": "2"})
    with pytest.raises(openai.RateLimitError) as limited:
        ask(client(openai_server))
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "2"


def test_openai_quota_answers_429_with_the_reset_headers() -> None:
    with FakeOpenAI(dialect="openai", quota=(1, 30.0)) as server:
        ask(client(server))
        with pytest.raises(openai.RateLimitError) as limited:
            ask(client(server))
    headers = limited.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "retry-after" not in headers  # OpenAI does not always send it


def test_ollama_takes_standard_base64_only_and_no_auth() -> None:
    with FakeOpenAI(dialect="ollama", models={"gemma3"}) as server:
        c = client(server, key="anything")
        ask(c, model="gemma3")
        assert server.last_request.api_key == "anything"  # recorded, never checked
        image = {"type": "image_url", "image_url": {"url": data_url(urlsafe=True)}}
        with pytest.raises(openai.BadRequestError, match="invalid image input"):
            ask(c, model="gemma3", messages=[{"role": "user", "content": [image]}])
        with pytest.raises(openai.NotFoundError, match="try pulling it first"):
            ask(c, model="llava")
        with pytest.raises(openai.NotFoundError) as no_route:  # a base_url without /v1
            ask(openai.OpenAI(api_key="x", base_url=server.url, max_retries=0), model="gemma3")
        assert no_route.value.body == "404 page not found"


def test_llamacpp_refuses_the_nested_schema_and_answers_503_while_loading() -> None:
    with FakeOpenAI(dialect="llamacpp") as server:
        c = client(server)
        with pytest.raises(openai.BadRequestError) as nested:
            ask(c)
        assert isinstance(nested.value.body, dict) and nested.value.body["code"] == 400
        flat = {"type": "json_object", "schema": SCHEMA}
        raw = ask(c, response_format=flat)
        answer = json.loads(raw.http_response.json()["choices"][0]["message"]["content"])
        assert set(answer) == {"animal", "count"}
        server.set_loading(30)
        with pytest.raises(openai.InternalServerError) as loading:
            ask(c, response_format=flat)
        assert loading.value.status_code == 503
        assert loading.value.body == {
            "code": 503,
            "message": "Loading model",
            "type": "unavailable_error",
        }


def test_transport_failures_as_the_sdk_raises_them(openai_server: FakeOpenAI) -> None:
    c = client(openai_server, timeout=0.5)
    openai_server.hang_next(1)
    with pytest.raises(openai.APITimeoutError) as hung:
        ask(c)
    assert isinstance(hung.value.__cause__, httpx2.TimeoutException)
    openai_server.drop_next(1)
    with pytest.raises(openai.APIConnectionError) as dropped:
        ask(c)
    assert isinstance(dropped.value.__cause__, httpx2.RemoteProtocolError)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = openai.OpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(openai.APIConnectionError) as refused:
        ask(nobody)
    assert isinstance(refused.value.__cause__, httpx2.ConnectError)
    assert len(openai_server.requests) == 2  # max_retries=0: one request per call


def test_malformed_answers(openai_server: FakeOpenAI) -> None:
    c = client(openai_server)
    openai_server.malformed_next(1, where="body")
    with pytest.raises(ValueError):
        ask(c).http_response.json()
    openai_server.malformed_next(1)
    content = ask(c).http_response.json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(content)
    openai_server.fail_next(1, 502, body=b"<html>Bad gateway</html>")
    with pytest.raises(openai.InternalServerError) as html:
        ask(c)
    assert html.value.body == "<html>Bad gateway</html>"
