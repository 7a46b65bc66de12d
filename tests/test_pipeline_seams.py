"""The pipeline's seams, as the library offers them: one `RunContext` given to a live run
(`Pipeline`) and to a `--batch` run (`BatchRun`), and a Batch API job's record, a
`BatchJob` in the run, stored in the checkpoint as the same plain dict as ever (real
providers; the Batch API is the fake Gemini server over HTTP)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings
from imgbatch.output import JsonlSink
from imgbatch.pipeline import Pipeline, RunContext, RunOptions
from imgbatch.pipeline.batch import BatchRun
from imgbatch.pipeline.batch_job import BatchJob
from imgbatch.providers.local import LocalProvider
from tests.conftest import make_image
from tests.fakegemini import FakeGemini

KEY = "test-key-SEAMS-0123456789"

#: a job's stored form, key for key and in this order, as the code before `BatchJob`
#: wrote it: checkpoints written then are read the same
STORED_KEYS = [
    "id",
    "fingerprint",
    "provider",
    "model",
    "run",
    "submitted",
    "requests",
    "bytes",
    "path",
    "file",
    "key",
    "tried",
    "name",
    "state",
    "counts",
    "polled",
]


@pytest.fixture
def server() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY}, seed=5) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"img{i}.jpg", size=(300 + 10 * i, 200), color=(50 * i, 90, 150))
    return root


def test_a_live_run_is_built_from_one_run_context(photos: Path, tmp_path: Path) -> None:
    settings = Settings()
    out = tmp_path / "out.jsonl"
    with out.open("wb") as fh, Checkpoint(tmp_path / "state") as cp:
        sink = JsonlSink(fh.fileno(), flush_every=1)
        ctx = RunContext(str(photos), settings, RunOptions(), LocalProvider(settings), cp, sink)
        summary = Pipeline(ctx).run()
        sink.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.counts["completed"] == 4 and len(lines) == 4
    assert {line["status"] for line in lines} == {"ok"}


def test_a_batch_jobs_record_is_stored_as_the_same_plain_dict(
    server: FakeGemini, photos: Path
) -> None:
    from imgbatch.providers.gemini import GeminiProvider

    settings = Settings(provider="gemini", gemini_api_keys=(KEY,), gemini_base_url=server.url)
    provider = GeminiProvider(settings, env={})
    out = photos.parent / "out.jsonl"
    with out.open("wb") as fh, Checkpoint(photos.parent / "state") as cp:
        cp.lock("analyze")
        sink = JsonlSink(fh)
        ctx = RunContext(str(photos), settings, RunOptions(batch=True), provider, cp, sink)
        summary = BatchRun(ctx).run()
        sink.close()
        stored = cp.batch_jobs()
    provider.close()
    assert summary.batch is not None and summary.batch["submitted"] == 4
    assert len(stored) == 1
    job = stored[0]
    assert list(job) == STORED_KEYS  # plain JSON values, nothing of ours
    assert job["requests"] == 4 and job["tried"] is True
    assert job["name"] is not None and job["state"] != "INTENT"
    back = BatchJob.from_dict(job).to_dict()
    assert back == job and list(back) == STORED_KEYS


def test_a_stored_record_keeps_keys_this_version_does_not_know() -> None:
    stored = dict.fromkeys(STORED_KEYS) | {"counts": {}, "later": [1, 2]}
    job = BatchJob.from_dict(stored)
    assert job.extra == {"later": [1, 2]}
    assert job.to_dict() == stored and list(job.to_dict()) == list(stored)
