"""Semantic search (issue 22, item 2): `imgbatch index ROOT --embeddings` and `search
--semantic` / `--hybrid`, through the real CLI, with results described by the fake Gemini
server and embedded by the fake OpenAI-compatible server's `/v1/embeddings` through the
real openai SDK. The fake's vectors put words of one meaning on one axis
(tests/fakegemini.fake_embedding): "puppy" lands near "dog" with no word in common."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini
from tests.fakeopenai import FakeOpenAI
from tests.test_search import ANSWERS, KEY, NAMES, analyze_gemini

OPENAI_KEY = "sk-test-EMBEDDINGS-0123456789"
MODEL = "text-embedding-fake"


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    def answer(record: Any) -> dict[str, Any] | None:
        width = record.images[0].width if record.images else None
        return ANSWERS.get(width) if isinstance(width, int) else None

    with FakeGemini(keys={KEY}, seed=3, responder=answer) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def embedder() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(keys={OPENAI_KEY}, hang_seconds=10) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def photos(gemini: FakeGemini, tmp_path: Path) -> Path:
    """The four described photos of test_search: a red car on a beach, a dog sled, a
    receipt, a brown dog on a beach."""
    root = tmp_path / "photos"
    for width, name in NAMES.items():
        make_image(root / ("docs" if width == 42 else "") / name, (width, 30))
    analyze_gemini(gemini, root)
    return root


def env(server: FakeOpenAI) -> dict[str, str]:
    return {
        "IMGBATCH_OPENAI_API_KEY": OPENAI_KEY,
        "IMGBATCH_OPENAI_BASE_URL": server.base_url,
        "IMGBATCH_RPM": "6000",
    }


def index(root: Path, server: FakeOpenAI, *args: str) -> CliResult:
    cmd = ["index", root, "--embeddings", "--provider", "openai", "--embedding-model", MODEL]
    return run_cli([*cmd, *args], env=env(server))


def search(root: Path, server: FakeOpenAI, *args: str) -> CliResult:
    return run_cli(["search", root, *args], env=env(server))


def names(res: CliResult) -> list[str]:
    assert res.rc in (0, 1), res.stderr
    return [Path(r["path"]).name for r in res.records]


def embedded_texts(server: FakeOpenAI) -> Counter[str]:
    """Every text the fake embedded and answered (the query's included)."""
    return Counter(
        t
        for r in server.requests
        if r.path.endswith("/embeddings") and r.outcome == "ok"
        for t in r.inputs
    )


def test_a_query_finds_results_that_share_no_word_with_it(
    photos: Path, embedder: FakeOpenAI
) -> None:
    res = index(photos, embedder)
    assert res.rc == 0, res.stderr
    assert "embedded 4 results" in res.stderr
    sent = [r for r in embedder.requests if r.path.endswith("/embeddings")]
    assert len(sent) == 1 and len(sent[0].inputs) == 4  # several texts per request
    assert sent[0].model == MODEL and sent[0].encoding_format == "base64"  # the SDK's own
    assert any("A paper receipt" in t and "TOTAL 42.50" in t for t in sent[0].inputs)
    # no stored text holds "puppy" or "invoice": full text finds nothing
    assert search(photos, embedder, "puppy").rc == 1
    hits = search(photos, embedder, "--semantic", "puppy").records
    assert [Path(h["path"]).name for h in hits[:2]] in (
        ["dog.jpg", "sled.jpg"],
        ["sled.jpg", "dog.jpg"],
    )
    assert len(hits) == 4  # every embedded result is ranked: no cut-off
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    assert names(search(photos, embedder, "--semantic", "invoice"))[0] == "receipt.png"
    assert names(search(photos, embedder, "--semantic", "seaside", "automobile"))[0] == "car.jpg"
    assert names(search(photos, embedder, "--semantic", "--limit", "1", "kitten", "hound")) in (
        ["dog.jpg"],
        ["sled.jpg"],
    )
    # the filters hold: the receipt is the only one tagged paper
    assert names(search(photos, embedder, "--semantic", "--tag", "paper", "puppy")) == [
        "receipt.png"
    ]
    # each hit is the export record plus its score
    exported = {r["path"]: r for r in run_cli(["export", photos]).records}
    for hit in hits:
        hit.pop("score")
        assert hit == exported[hit["path"]]


def test_a_second_index_embeds_nothing_again_and_copies_reuse_vectors(
    photos: Path, embedder: FakeOpenAI, gemini: FakeGemini, tmp_path: Path
) -> None:
    assert index(photos, embedder).rc == 0
    before = sum(embedded_texts(embedder).values())
    res = index(photos, embedder)
    assert res.rc == 0, res.stderr
    assert "embedded 0 results" in res.stderr and "4 already embedded" in res.stderr
    assert sum(embedded_texts(embedder).values()) == before
    # another ROOT holding copies: its results are the same (fingerprint, content)
    copies = tmp_path / "copies"
    for path in photos.rglob("*.*"):
        target = copies / path.relative_to(photos)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    analyze_gemini(gemini, copies)
    res = index(copies, embedder)
    assert res.rc == 0 and "4 already embedded" in res.stderr, res.stderr
    assert sum(embedded_texts(embedder).values()) == before
    assert names(search(copies, embedder, "--semantic", "invoice"))[0] == "receipt.png"


def test_without_embeddings_semantic_is_a_usage_error_naming_the_command(
    photos: Path, embedder: FakeOpenAI
) -> None:
    for mode in ("--semantic", "--hybrid"):
        res = search(photos, embedder, mode, "puppy")
        assert res.rc == 2 and res.stdout == b""
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "imgbatch index ROOT --embeddings" in lines[0], res.stderr
    assert embedder.requests == []
    res = run_cli(["index", photos], env=env(embedder))  # index without --embeddings
    assert res.rc == 2 and "--embeddings" in res.stderr


def test_429s_are_retried(photos: Path, embedder: FakeOpenAI) -> None:
    embedder.fail_next(2, 429, headers={"retry-after-ms": "50"})
    res = index(photos, embedder)
    assert res.rc == 0, res.stderr
    assert embedder.count_by_status() == {429: 2, 200: 1}
    assert sorted(embedded_texts(embedder).values()) == [1, 1, 1, 1]
    assert names(search(photos, embedder, "--semantic", "invoice"))[0] == "receipt.png"


def test_an_interrupted_index_resumes_without_embedding_anything_twice(
    photos: Path, embedder: FakeOpenAI
) -> None:
    cmd = ["index", str(photos), "--embeddings", "--provider", "openai"]
    cmd += ["--embedding-model", MODEL, "--per-request", "1"]
    embedder.answer_next(1)  # the first request is answered, the second is held: the run
    embedder.hang_next(1)  # is killed during it
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", *cmd],
        env={**os.environ, **env(embedder)},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert embedder.wait_for_requests(2, timeout=60)
        deadline = time.monotonic() + 60  # the second one read and held, not just arrived
        while embedder.count_by_outcome().get("hang") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        assert proc.stderr is not None
        proc.stderr.close()
    assert embedder.count_by_outcome() == {"ok": 1, "hang": 1}
    res = index(photos, embedder)
    assert res.rc == 0, res.stderr
    assert "embedded 3 results" in res.stderr and "1 already embedded" in res.stderr
    texts = embedded_texts(embedder)
    assert len(texts) == 4 and set(texts.values()) == {1}  # nothing embedded twice
    hits = search(photos, embedder, "--semantic", "invoice").records
    assert Path(hits[0]["path"]).name == "receipt.png" and len(hits) == 4


def test_a_second_embedding_model_is_never_mixed_with_the_first(
    photos: Path, embedder: FakeOpenAI
) -> None:
    assert index(photos, embedder).rc == 0
    # another model, interrupted after one result: the ROOT now searches with it, and
    # only its one vector is ranked (the first model's four are not comparable)
    embedder.fail_next(10, 400)
    res = index(photos, embedder, "--embedding-model", "other-model", "--per-request", "1")
    assert res.rc == 1 and "4 failed" in res.stderr, res.stderr
    embedder.clear_script()
    assert search(photos, embedder, "--semantic", "puppy").rc == 1  # none embedded yet
    last = embedder.requests[-1]
    assert last.model == "other-model" and last.inputs == ["puppy"]  # the query: model 2
    res = index(photos, embedder, "--embedding-model", "other-model")
    assert res.rc == 0 and "embedded 4 results" in res.stderr, res.stderr
    hits = search(photos, embedder, "--semantic", "invoice").records
    assert Path(hits[0]["path"]).name == "receipt.png" and len(hits) == 4
    # back to the first model: its vectors are still there, nothing is embedded again
    res = index(photos, embedder)
    assert res.rc == 0 and "4 already embedded" in res.stderr, res.stderr


def test_hybrid_fuses_the_two_rankings_by_reciprocal_rank(
    photos: Path, embedder: FakeOpenAI
) -> None:
    assert index(photos, embedder).rc == 0
    words = ["beach"]  # full text: the two beach photos; semantic: all four
    full = [r["path"] for r in search(photos, embedder, *words, "--limit", "100").records]
    close = [
        r["path"] for r in search(photos, embedder, "--semantic", *words, "--limit", "100").records
    ]
    assert full and close and full != close
    fused: dict[str, float] = {}
    for ranking in (full, close):
        for rank, path in enumerate(ranking, 1):
            fused[path] = fused.get(path, 0.0) + 1 / (60 + rank)
    hybrid = search(photos, embedder, "--hybrid", *words, "--limit", "100").records
    assert [h["path"] for h in hybrid] == sorted(fused, key=lambda p: -fused[p])
    for hit in hybrid:
        assert hit["score"] == pytest.approx(fused[hit["path"]], abs=1e-6)
