"""Semantic search with Gemini embeddings (issue 22, item 2): `imgbatch index ROOT
--embeddings --provider gemini` through the real CLI and the real google-genai SDK to the
fake Gemini server's `batchEmbedContents` (tests/fakegemini.py), which answers vectors that
put words of one meaning on one axis: "puppy" lands near "dog" with no word in common."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini
from tests.test_search import ANSWERS, KEY, NAMES, analyze_gemini, gemini_env
from tests.test_security_state import cache_dir, modes, run_with_umask
from tests.test_serve import Server, serve  # noqa: F401 (the fixture)


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    def answer(record: Any) -> dict[str, Any] | None:
        width = record.images[0].width if record.images else None
        return ANSWERS.get(width) if isinstance(width, int) else None

    with FakeGemini(keys={KEY}, seed=3, responder=answer) as fake:
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
    gemini.clear_requests()
    return root


def index(root: Path, server: FakeGemini, *args: str) -> CliResult:
    cmd = ["index", root, "--embeddings", "--provider", "gemini", *args]
    return run_cli(cmd, env=gemini_env(server))


def search(root: Path, server: FakeGemini, *args: str) -> CliResult:
    return run_cli(["search", root, *args], env=gemini_env(server))


def names(res: CliResult) -> list[str]:
    assert res.rc in (0, 1), res.stderr
    return [Path(r["path"]).name for r in res.records]


def embeds(server: FakeGemini) -> list[Any]:
    return [r for r in server.requests if r.route == "embed"]


def test_gemini_embeddings_find_a_result_that_shares_no_word_with_the_query(
    photos: Path, gemini: FakeGemini
) -> None:
    res = index(photos, gemini)
    assert res.rc == 0, res.stderr
    assert "embedded 4 results with gemini gemini-embedding-001 in 1 requests" in res.stderr
    (sent,) = embeds(gemini)
    # one batchEmbedContents call holding the four texts, each asking 768 dimensions
    assert sent.path.endswith("/models/gemini-embedding-001:batchEmbedContents")
    assert len(sent.texts) == 4 and sent.dimensions == [768] * 4
    assert any("A paper receipt" in t and "TOTAL 42.50" in t for t in sent.texts)
    assert sent.api_key == KEY and KEY not in res.stderr
    # no stored text holds "invoice" or "puppy": full text finds nothing, meaning does
    assert search(photos, gemini, "invoice").rc == 1
    hits = search(photos, gemini, "--semantic", "invoice")
    assert hits.rc == 0, hits.stderr
    assert names(hits)[0] == "receipt.png" and len(hits.records) == 4
    assert set(names(search(photos, gemini, "--semantic", "--limit", "2", "puppy"))) == {
        "dog.jpg",
        "sled.jpg",
    }
    query = embeds(gemini)[-1]
    assert query.texts == ["puppy"] and query.model == "gemini-embedding-001"
    # a second index embeds nothing again
    before = len(embeds(gemini))
    res = index(photos, gemini)
    assert res.rc == 0 and "4 already embedded" in res.stderr, res.stderr
    assert len(embeds(gemini)) == before


def test_up_to_100_texts_a_request(photos: Path, gemini: FakeGemini) -> None:
    # the fake answers 400 past 100 texts (as Google does); --per-request cuts smaller
    res = index(photos, gemini, "--per-request", "3")
    assert res.rc == 0, res.stderr
    assert [len(r.texts) for r in embeds(gemini)] == [3, 1]


def test_429s_are_retried(photos: Path, gemini: FakeGemini) -> None:
    gemini.fail_next(2, 429, retry_delay="0.05s")
    res = index(photos, gemini)
    assert res.rc == 0, res.stderr
    assert [r.status for r in embeds(gemini)] == [429, 429, 200]
    assert "embedded 4 results" in res.stderr
    assert names(search(photos, gemini, "--semantic", "invoice"))[0] == "receipt.png"


def test_an_unknown_embedding_model_is_a_one_line_configuration_error(
    photos: Path, gemini: FakeGemini
) -> None:
    gemini.configure(models={"gemini-embedding-001"})
    res = index(photos, gemini, "--embedding-model", "no-such-model")
    assert res.rc == 2, (res.rc, res.stderr)  # configuration: as analyze's unknown model
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and KEY not in res.stderr


# -- the Python API and serve ----------------------------------------------------------


def test_the_python_api_searches_by_meaning_as_the_cli_does(
    photos: Path, gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgbatch
    from imgbatch.errors import UsageError

    for name, value in gemini_env(gemini).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="imgbatch index ROOT --embeddings"):
        imgbatch.search(photos, "invoice", mode="semantic")
    assert index(photos, gemini).rc == 0
    for mode in ("semantic", "hybrid"):
        cli = search(photos, gemini, f"--{mode}", "receipt", "puppy").records
        assert imgbatch.search(photos, "receipt puppy", mode=mode) == cli
        assert len(cli) == 4
    hits = imgbatch.search(photos, ["invoice"], mode="semantic", limit=1)
    assert [Path(h["path"]).name for h in hits] == ["receipt.png"]
    # settings reach the query's embedding: a server that is not there fails it
    with pytest.raises(imgbatch.errors.FatalError, match="cannot embed the query"):
        imgbatch.search(
            photos, "invoice", mode="semantic", gemini_base_url="http://127.0.0.1:9", max_attempts=1
        )
    with pytest.raises(UsageError, match="mode"):
        imgbatch.search(photos, "invoice", mode="meaning")


def test_the_serve_endpoint_searches_by_meaning(
    photos: Path,
    gemini: FakeGemini,
    serve: Callable[..., Server],  # noqa: F811
) -> None:
    server = serve("--allow-root", photos.parent, env=gemini_env(gemini))
    params = {"root": str(photos), "q": "invoice"}
    with server.client() as client:
        resp = client.get("/api/search", params={**params, "mode": "semantic"})
        assert resp.status_code == 422, resp.text  # no embeddings yet: one line naming index
        error = resp.json()["error"]
        assert "imgbatch index ROOT --embeddings" in error and "\n" not in error
        assert index(photos, gemini).rc == 0
        for mode in ("semantic", "hybrid"):
            resp = client.get("/api/search", params={**params, "mode": mode})
            assert resp.status_code == 200, resp.text
            cli = search(photos, gemini, f"--{mode}", "invoice").records
            assert resp.json() == {"hits": cli}
            assert Path(cli[0]["path"]).name == "receipt.png"
        resp = client.get("/api/search", params={**params, "mode": "text"})
        assert resp.status_code == 200 and resp.json() == {"hits": []}  # no such word
        resp = client.get("/api/search", params={**params, "mode": "meaning"})
        assert resp.status_code == 422 and "mode" in resp.json()["error"]


# -- state at rest -----------------------------------------------------------------------


def test_the_embeddings_are_private_and_checked_with_the_results_store(
    photos: Path, gemini: FakeGemini
) -> None:
    # under a permissive umask: the embeddings are made 0600 files in 0700 folders
    cmd: list[str | Path] = ["index", photos, "--embeddings", "--provider", "gemini"]
    res = run_with_umask(cmd, 0o022, env=gemini_env(gemini))
    assert res.rc == 0, res.stderr
    folder = cache_dir() / "results" / "embeddings"
    found = modes(folder)
    assert {"index.db", "lock"} <= set(found) and any(n.endswith(".q8") for n in found)
    assert found == {n: "700" if n == "." else "600" for n in found}, found
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    # the results store's check walks its embeddings: a vector file anyone may write is
    # refused before anything is read, by every command that reads the store
    vectors = next(folder.glob("*.q8"))
    vectors.chmod(0o666)
    res = run_cli(["export", photos])
    assert res.rc == 5 and res.stdout == b"", res.stderr
    assert str(vectors) in res.stderr and "chmod -R go-w" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
