"""The fake server's Batch and Files APIs speak the wire format of the real google-genai
SDK (3.6.1), and show the SDK's gaps that imgbatch works around by reading raw JSON.

Each test drives the real SDK over HTTP against tests/fakegemini.py.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image

from tests.fakegemini import FakeGemini

MODEL = "gemini-2.5-flash-lite"
KEY = "batch-key-0123456789"


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY, "other-key"}, projects={"other-key": "project-b"}) as fake:
        yield fake
        assert fake.errors == []


def client(server: FakeGemini, key: str = KEY) -> genai.Client:
    options = types.HttpOptions(base_url=server.url, timeout=5000, client_args={"trust_env": False})
    return genai.Client(api_key=key, http_options=options)


def jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, "JPEG")
    return out.getvalue()


def request(color: tuple[int, int, int]) -> dict[str, Any]:
    data = base64.b64encode(jpeg(color)).decode()
    return {
        "contents": [
            {"role": "user", "parts": [{"inlineData": {"mimeType": "image/jpeg", "data": data}}]}
        ],
        "generationConfig": {"responseMimeType": "application/json"},
    }


def request_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "requests.jsonl"
    lines = [json.dumps({"key": f"k{i}", "request": request((20 * i, 50, 90))}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def upload(c: genai.Client, path: Path) -> types.File:
    config = types.UploadFileConfig(mime_type="application/jsonl", display_name="requests")
    return c.files.upload(file=path, config=config)


def raw_get(c: genai.Client, name: str) -> dict[str, Any]:
    answer = c._api_client.request("get", name, {})
    body = json.loads(answer.body)
    assert isinstance(body, dict)
    return body


def test_a_resumable_upload_goes_in_8_mib_chunks_that_carry_no_key(
    server: FakeGemini, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * (9 * 1024 * 1024))  # two chunks
    uploaded = upload(client(server), path)
    assert uploaded.name and uploaded.name.startswith("files/")
    assert uploaded.mime_type == "application/jsonl" and uploaded.size_bytes == 9 * 1024 * 1024
    assert server.batch.files[uploaded.name].data == path.read_bytes()
    routes = [(r.route, r.api_key) for r in server.requests]
    assert routes == [("upload", KEY), ("upload_chunk", None), ("upload_chunk", None)]


def test_a_job_goes_pending_running_succeeded_and_its_results_download(
    server: FakeGemini, tmp_path: Path
) -> None:
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 3))
    server.batch.plan_next(delay=100)
    job = c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "d-1"})
    assert job.name and job.display_name == "d-1"
    assert job.state == types.JobState.JOB_STATE_PENDING
    server.batch.advance(60)
    op = raw_get(c, job.name)
    assert op["metadata"]["state"] == "BATCH_STATE_RUNNING"
    assert op["metadata"]["batchStats"] == {"requestCount": "3", "pendingRequestCount": "3"}
    server.batch.advance(40)
    done = c.batches.get(name=job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.file_name
    op = raw_get(c, job.name)
    assert op["done"] is True and op["response"]["responsesFile"] == done.dest.file_name
    lines = [json.loads(x) for x in c.files.download(file=done.dest.file_name).splitlines()]
    assert [line["key"] for line in lines] == ["k0", "k1", "k2"]
    answer = types.GenerateContentResponse._from_response(response=lines[0]["response"], kwargs={})
    assert json.loads(answer.text or "")["description"].startswith("A 40x30 JPEG image")
    assert answer.usage_metadata and answer.usage_metadata.prompt_token_count == 258


def test_the_sdk_drops_batch_stats_and_a_failed_jobs_error(
    server: FakeGemini, tmp_path: Path
) -> None:
    """Why imgbatch reads a job's raw JSON (field notes: SDK gaps)."""
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 2))
    server.batch.plan_next(fate="FAILED")
    job = c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "d"})
    assert job.name
    sdk = c.batches.get(name=job.name)
    assert sdk.state == types.JobState.JOB_STATE_FAILED
    assert sdk.error is None  # not mapped from the Operation's top-level error
    op = raw_get(c, job.name)
    assert op["error"]["message"] and op["metadata"]["batchStats"]["requestCount"] == "2"


def test_an_inline_job_with_a_per_line_error_breaks_the_sdks_get(server: FakeGemini) -> None:
    c = client(server)
    server.batch.plan_next(lines=[13], delay=10)
    image = types.Part.from_bytes(data=jpeg((1, 2, 3)), mime_type="image/jpeg")
    inlined = [
        types.InlinedRequest(
            contents=[types.Content(role="user", parts=[image])], metadata={"key": "a"}
        )
    ]
    job = c.batches.create(model=MODEL, src=inlined, config={"display_name": "inline"})
    assert job.name
    server.batch.advance(10)
    with pytest.raises(pydantic.ValidationError):  # the error's details are objects
        c.batches.get(name=job.name)
    op = raw_get(c, job.name)
    [line] = op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert line["error"]["code"] == 13 and "INTERNAL" in line["error"]["message"]


@pytest.mark.parametrize(
    ("code", "status"),
    [(429, "RESOURCE_EXHAUSTED"), (8, "RESOURCE_EXHAUSTED"), (14, "UNAVAILABLE"), (504, None)],
)
def test_results_lines_carry_http_statuses_or_grpc_codes(
    server: FakeGemini, tmp_path: Path, code: int, status: str | None
) -> None:
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 2))
    server.batch.plan_next(lines=[code, "blocked"])
    job = c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "e"})
    results = raw_get(c, job.name or "")["response"]["responsesFile"]
    first, second = (json.loads(x) for x in c.files.download(file=results).splitlines())
    assert first["error"]["code"] == code and "status" not in first["error"]
    assert (status or "DEADLINE_EXCEEDED") in first["error"]["message"]
    assert second["response"]["promptFeedback"]["blockReason"] == "SAFETY"


def test_a_results_file_can_404_after_its_job_succeeded(server: FakeGemini, tmp_path: Path) -> None:
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 1))
    server.batch.plan_next(download_404s=2)
    job = c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "f"})
    results = raw_get(c, job.name or "")["response"]["responsesFile"]
    for _ in range(2):
        with pytest.raises(errors.ClientError) as caught:
            c.files.download(file=results)
        assert caught.value.code == 404
    assert c.files.download(file=results)


def test_jobs_are_listed_newest_first_in_pages_and_belong_to_one_project(
    server: FakeGemini, tmp_path: Path
) -> None:
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 1))
    server.batch.list_page_max = 2
    for i in range(5):
        c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": f"n{i}"})
    names = [job.display_name for job in c.batches.list(config={"page_size": 100})]
    assert names == ["n4", "n3", "n2", "n1", "n0"]
    assert [r.route for r in server.requests].count("batch_list") == 3
    other = client(server, "other-key")  # another project sees none of them
    assert list(other.batches.list()) == []
    with pytest.raises(errors.ClientError) as caught:
        other.batches.get(name=server.batch.jobs[0].name)
    assert caught.value.code == 404


def test_cancel_delete_and_file_delete(server: FakeGemini, tmp_path: Path) -> None:
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 1))
    server.batch.plan_next(delay=100)
    job = c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "g"})
    c.batches.cancel(name=job.name or "")
    assert c.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_CANCELLED
    c.batches.delete(name=job.name or "")
    with pytest.raises(errors.ClientError):
        c.batches.get(name=job.name or "")
    c.files.delete(name=uploaded.name or "")
    assert server.batch.files == {} and server.batch.stored_bytes == 0


def test_scripted_failures_on_batch_routes(server: FakeGemini, tmp_path: Path) -> None:
    c = client(server)
    server.batch.fail_next(1, 429, on="upload", retry_delay="30s")
    with pytest.raises(errors.ClientError) as caught:
        upload(c, request_file(tmp_path, 1))
    assert caught.value.code == 429
    details = caught.value.details["error"]["details"]
    assert any(d.get("retryDelay") == "30s" for d in details)
    uploaded = upload(c, request_file(tmp_path, 1))  # the next one goes through
    server.batch.fail_next(1, 503, on="batch_create")
    with pytest.raises(errors.ServerError):
        c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "h"})
    assert server.batch.jobs == []  # refused: nothing was created


def test_before_answer_sees_the_request_after_the_server_acted(
    server: FakeGemini, tmp_path: Path
) -> None:
    c = client(server)
    uploaded = upload(c, request_file(tmp_path, 1))
    seen: list[int] = []
    server.configure(
        before_answer=lambda rec: (
            seen.append(len(server.batch.jobs)) if rec.route == "batch_create" else None
        )
    )
    c.batches.create(model=MODEL, src=uploaded.name or "", config={"display_name": "i"})
    assert seen == [1]  # the job existed before its answer left
