"""Issue 22 at scale: what `search` and `index --embeddings` cost as the tree grows, by
counting (SQLite's virtual-machine steps, bytes allocated, a child's peak RSS), never by
timing. The trees are tiny distinct PNGs described by a fake remote provider registered
in the real CLI (`python -m tests.test_search_scale`, the `__main__` at the end), whose
description is IMGBATCH_TEST_CHARS characters long."""

from __future__ import annotations

import os
import sqlite3
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.fakeopenai import FakeOpenAI
from tests.fakeprovider import FakeRemote

OPENAI_KEY = "sk-test-SCALE-0123456789"
MODEL = "text-embedding-fake"
THIS = "tests.test_search_scale"  # the CLI with the fake provider "long" registered
FACE = "\U0001f600"  # four bytes a character in a str: long texts cost memory fast


class LongText(FakeRemote):
    """FakeRemote whose description is IMGBATCH_TEST_CHARS characters (default short)."""

    def analyze(self, image: Any) -> Any:
        out = super().analyze(image)
        chars = int(os.environ.get("IMGBATCH_TEST_CHARS", "0"))
        if chars:  # each its own text (no string shared between results)
            out.result["description"] = FACE * (chars - 8) + image.image.tobytes()[:4].hex()
        return out


def tree(root: Path, folders: int, per_folder: int) -> Path:
    """folders x per_folder distinct 8x8 PNGs (distinct content: one result each)."""
    n = 0
    for f in range(folders):
        folder = root / f"d{f:03d}"
        folder.mkdir(parents=True)
        for _ in range(per_folder):
            color = (n % 256, n // 256 % 256, 7)
            Image.new("RGB", (8, 8), color).save(folder / f"{n:05d}.png", "PNG")
            n += 1
    return root


def analyze(root: Path, state: Path, chars: int = 0, env: dict[str, str] | None = None) -> None:
    env = {**(env or {}), "IMGBATCH_TEST_CHARS": str(chars)}
    args = ["analyze", root, "--provider", "long", "--rpm", "0", "--checkpoint", state, "-q"]
    res = run_cli(args, env=env, module=THIS, timeout=600)
    assert res.rc == 0, res.stderr


def index_db(state: Path) -> Path:
    return state / "search" / "index.db"


# -- search: the ranking scores a bounded number of matches ----------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """1,200 described files in 12 folders, analysed, their index built by the run (in
    a home of its own: the per-test isolation comes after a module's fixtures)."""
    base = tmp_path_factory.mktemp("many")
    home = base / "home"
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env |= {"XDG_CONFIG_HOME": str(home / ".config"), "IMGBATCH_RESULTS": str(base / "results")}
    root, state = tree(base / "root", 12, 100), base / "state"
    analyze(root, state, env=env)
    yield root, state


@pytest.fixture
def results_env(many: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGBATCH_RESULTS", str(many[1].parent / "results"))


def exact(con: sqlite3.Connection, newest: int | None, limit: int) -> list[int]:
    """The reference ranking, computed here: bm25 (the weights of searching.WEIGHTS)
    over every match (or the `newest` highest doc ids), best first, ties by path."""
    from imgbatch.searching import WEIGHTS

    weights = ", ".join(map(str, WEIGHTS))
    rows = con.execute(
        f"SELECT fts.rowid, bm25(fts, {weights}), d.folder, d.name FROM fts"
        " JOIN docs d ON d.id = fts.rowid WHERE fts MATCH '\"image\"'"
    ).fetchall()
    if newest is not None:
        rows = sorted(rows, key=lambda r: -r[0])[:newest]
    rows.sort(key=lambda r: (r[1], bytes(r[2]), bytes(r[3])))
    return [r[0] for r in rows[:limit]]


def steps(con: sqlite3.Connection, run: Any) -> int:
    """SQLite virtual-machine steps `run()` takes (counted by the progress handler)."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    con.set_progress_handler(tick, 100)
    try:
        run()
    finally:
        con.set_progress_handler(None, 100)
    return count[0] * 100


def test_a_query_every_file_matches_scores_a_bounded_number_of_them(
    many: tuple[Path, Path], results_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    from imgbatch import searching

    root, state = many
    con = sqlite3.connect(index_db(state))
    query, where = searching.parse("image"), searching.Filters()
    # every one of the 1,200 files matches: all are ranked while fewer than `scored` match
    assert searching.rank(con, query, where, 20) == [
        (i, pytest.approx(s)) for i, s in searching.rank(con, query, where, 20, 1_000_000)
    ]
    assert [i for i, _ in searching.rank(con, query, where, 20)] == exact(con, None, 20)
    assert "files match" not in caplog.text
    # with a bound of 100: the 100 newest matches are ranked, exactly as bm25 ranks them
    bounded = searching.rank(con, query, where, 20, scored=100)
    assert [i for i, _ in bounded] == exact(con, 100, 20)
    assert "more than 100 files match: only the 100 indexed last are ranked" in caplog.text
    # and the work follows the bound, not the tree: a tenth of the matches, < 1/4 the steps
    few = steps(con, lambda: searching.rank(con, query, where, 20, scored=100))
    every = steps(con, lambda: searching.rank(con, query, where, 20, scored=1_000_000))
    assert 0 < few < every / 4
    # --limit above the bound ranks that many
    assert len(searching.rank(con, query, where, 300, scored=100)) == 300
    con.close()


def test_the_cli_ranks_as_bm25_does_and_fetches_the_hits_in_order(
    many: tuple[Path, Path], results_env: None
) -> None:
    root, state = many
    res = run_cli(["search", root, "image", "--limit", "7", "--checkpoint", state])
    assert res.rc == 0, res.stderr
    assert "files match" not in res.stderr  # 1,200 < searching.SCORED: every one ranked
    con = sqlite3.connect(index_db(state))
    want = exact(con, None, 7)
    paths = {
        i: os.path.join(os.fsdecode(bytes(f)), os.fsdecode(bytes(n)))
        for i, f, n in con.execute("SELECT id, folder, name FROM docs")
    }
    con.close()
    assert [os.path.relpath(r["path"], root) for r in res.records] == [paths[i] for i in want]
    scores = [r["score"] for r in res.records]
    assert scores == sorted(scores, reverse=True)


# -- the index brought up to date without a change log: a folder at a time -------------


def peak_of_a_full_diff(root: Path, state: Path) -> int:
    """Bytes allocated at most by a search whose index must compare every item state
    with the one indexed (its change-log position forgotten, as an index from before the
    log): the index is first damaged (a doc dropped, a stray one added), and checked to
    come back whole."""
    import imgbatch

    imgbatch.search(root, "image", limit=1, checkpoint=str(state))  # imports, warm
    con = sqlite3.connect(index_db(state))
    total = con.execute("SELECT count(*) FROM docs").fetchone()[0]
    with con:
        dropped = con.execute("SELECT id, name FROM docs ORDER BY id LIMIT 1 OFFSET 5").fetchone()
        con.execute("DELETE FROM docs WHERE id = ?", (dropped[0],))
        con.execute("DELETE FROM fts WHERE rowid = ?", (dropped[0],))
        con.execute(
            "INSERT INTO docs (folder, name, state, status, tags, colors)"
            " VALUES (x'676f6e65', x'782e706e67', '[]', 'ok', '', '')"
        )
        con.execute("INSERT INTO fts (rowid, path) VALUES (last_insert_rowid(), 'gone image')")
        con.execute("UPDATE meta SET v = -1 WHERE k = 'commits'")
    con.close()
    tracemalloc.start()
    try:
        hits = imgbatch.search(root, "image", limit=1, checkpoint=str(state))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(hits) == 1
    con = sqlite3.connect(index_db(state))
    assert con.execute("SELECT count(*) FROM docs").fetchone()[0] == total
    assert con.execute("SELECT count(*) FROM fts").fetchone()[0] == total
    assert con.execute("SELECT 1 FROM docs WHERE folder = x'676f6e65'").fetchone() is None
    assert con.execute("SELECT 1 FROM docs WHERE name = ?", (dropped[1],)).fetchone()
    assert con.execute("SELECT v FROM meta WHERE k = 'commits'").fetchone()[0] >= 0
    con.close()
    assert imgbatch.search(root, os.fsdecode(bytes(dropped[1]))[:5], checkpoint=str(state))
    return peak


def test_a_full_compare_holds_one_folder_not_the_tree(
    many: tuple[Path, Path], results_env: None, tmp_path: Path
) -> None:
    # the same folders (100 files each), 3 of them and 12 of them
    small = tmp_path / "small"
    tree(small, 3, 100)
    analyze(small, tmp_path / "small-state")
    big_root, big_state = many
    peak_small = peak_of_a_full_diff(small, tmp_path / "small-state")
    peak_big = peak_of_a_full_diff(big_root, big_state)
    # every indexed doc held at once was ~400 bytes each: 900 more docs, +360 kB
    print(f"peak allocated: {peak_small:,} B, {peak_big:,} B")
    assert peak_big < peak_small + 120_000, (peak_small, peak_big)


# -- index --embeddings: texts read a request's worth at a time -------------------------


@pytest.fixture
def embedder() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(keys={OPENAI_KEY}) as fake:
        yield fake
        assert fake.errors == []


def index_peak(root: Path, state: Path, server: FakeOpenAI, tmp_path: Path) -> int:
    """Run `imgbatch index ROOT --embeddings` (the real openai SDK to the fake) under
    tracemalloc: the most bytes Python held at once (SQLite's and mmap's pages aside)."""
    peak = tmp_path / f"peak-{root.name}"
    args = ["index", root, "--embeddings", "--provider", "openai", "--embedding-model", MODEL]
    args += ["--checkpoint", state, "--per-request", "10"]
    env = {
        "IMGBATCH_OPENAI_API_KEY": OPENAI_KEY,
        "IMGBATCH_OPENAI_BASE_URL": server.base_url,
        "IMGBATCH_RPM": "60000",
        "IMGBATCH_TEST_PEAK": str(peak),
    }
    res = run_cli(args, env=env, module=THIS, timeout=600)
    assert res.rc == 0 and "failed" not in res.stderr, res.stderr
    return int(peak.read_text())


def test_index_embeddings_memory_follows_a_request_not_the_tree(
    tmp_path: Path, embedder: FakeOpenAI
) -> None:
    chars = 8000  # embeddings.MAX_TEXT: ~32 kB a text in a str
    small, big = tree(tmp_path / "small", 1, 20), tree(tmp_path / "big", 12, 100)
    analyze(small, tmp_path / "s-small", chars)
    analyze(big, tmp_path / "s-big", chars)
    peak_small = index_peak(small, tmp_path / "s-small", embedder, tmp_path)
    peak_big = index_peak(big, tmp_path / "s-big", embedder, tmp_path)
    embedded = [t for r in embedder.requests if r.path.endswith("/embeddings") for t in r.inputs]
    # the big tree's first 20 are the small one's (the same pixels): embedded once
    assert len(embedded) == 1200 and len(set(embedded)) == 1200
    assert all(len(t) == chars and t.startswith(FACE * (chars - 8)) for t in embedded)
    # every text held at once: 1,180 more texts of ~32 kB, +37 MB
    print(f"peak allocated: {peak_small / 2**20:.1f} MiB, {peak_big / 2**20:.1f} MiB")
    assert peak_big < peak_small + 4 * 2**20, (peak_small, peak_big)


if __name__ == "__main__":  # the real CLI, with the fake provider "long" registered
    from imgbatch.cli import main
    from imgbatch.providers import base

    base.register("long", LongText)
    if "IMGBATCH_TEST_PEAK" not in os.environ:
        main()
    else:  # the peak of Python's allocations, written to that file at the end
        tracemalloc.start()
        try:
            main()
        finally:
            Path(os.environ["IMGBATCH_TEST_PEAK"]).write_text(
                str(tracemalloc.get_traced_memory()[1])
            )
