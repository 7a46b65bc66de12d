"""`imgbatch search` (issue 22, item 1): full text over the stored results of ROOT, through
the real CLI on real images, with results of the offline analyzer and of the fake Gemini
server (descriptions, tags, legible text)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NOBODY, CliResult, make_image, run_cli, the_state_folder
from tests.fakegemini import FakeGemini
from tests.test_serve import Server, serve  # noqa: F401, F811 (the fixture)

KEY = "test-key-SECRET-0123456789"
SKIMAGE = Path(__import__("skimage").__file__).parent / "data"

#: the fake model's answers, by the uploaded image's width
ANSWERS: dict[int, dict[str, Any]] = {
    40: {
        "description": "A red car parked by the beach at sunset.",
        "tags": ["car", "Beach", "sunset"],
        "objects": ["car", "sand"],
        "colors": ["red", "orange"],
        "mood": "calm",
        "text": "",
    },
    41: {
        "description": "A dog running on a sled in the snow.",
        "tags": ["dogsled", "snow", "winter"],
        "objects": ["dog", "sled"],
        "colors": ["white"],
        "mood": "joyful",
        "text": "",
    },
    42: {
        "description": "A paper receipt from a grocery store.",
        "tags": ["receipt", "paper"],
        "objects": ["receipt"],
        "colors": ["white", "gray"],
        "mood": "plain",
        "text": "TOTAL 42.50 EUR March 2024 Thank you",
    },
    43: {
        "description": "A brown dog on the beach with a red ball.",
        "tags": ["dog", "beach"],
        "objects": ["dog", "ball"],
        "colors": ["brown", "red"],
        "mood": "happy",
        "text": "",
    },
}
NAMES = {40: "car.jpg", 41: "sled.jpg", 42: "receipt.png", 43: "dog.jpg"}


def answer(record: Any) -> dict[str, Any] | None:
    width = record.images[0].width if record.images else None
    return ANSWERS.get(width) if isinstance(width, int) else None


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY}, seed=3, responder=answer) as fake:
        yield fake
        assert fake.errors == []


def gemini_env(server: FakeGemini) -> dict[str, str]:
    return {"GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url, "IMGBATCH_RPM": "6000"}


def analyze_gemini(server: FakeGemini, root: Path, *args: str) -> None:
    res = run_cli(["analyze", "--provider", "gemini", *args, root], env=gemini_env(server))
    assert res.rc == 0, res.stderr


def described(base: Path) -> Path:
    root = base / "photos"
    for width, name in NAMES.items():
        make_image(root / ("docs" if width == 42 else "") / name, (width, 30))
    return root


def search(root: Path, *args: str | Path, **kw: Any) -> CliResult:
    return run_cli(["search", root, *args], **kw)


def found(res: CliResult) -> list[str]:
    assert res.rc in (0, 1), res.stderr
    return [Path(r["path"]).name for r in res.records]


def one_line_error(res: CliResult) -> None:
    assert res.rc == 2, (res.rc, res.stderr)
    assert res.stdout == b""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgbatch: error:"), res.stderr
    assert "Traceback" not in res.stderr


# -- with descriptions (the fake Gemini) ---------------------------------------------------


@pytest.fixture
def photos(gemini: FakeGemini, tmp_path: Path) -> Path:
    root = described(tmp_path)
    analyze_gemini(gemini, root)
    return root


def test_words_phrases_prefixes_and_exclusions(photos: Path) -> None:
    assert sorted(found(search(photos, "dog"))) == ["dog.jpg", "sled.jpg"]
    assert found(search(photos, "dog", "beach")) == ["dog.jpg"]  # words are AND-ed
    assert found(search(photos, '"red car"')) == ["car.jpg"]  # a phrase
    # an exclusion: after -- (else the shell word is taken for an option)
    assert found(search(photos, "--", "red", "-car")) == ["dog.jpg"]
    assert found(search(photos, "--", "-car", "red")) == ["dog.jpg"]
    assert found(search(photos, "red -car")) == ["dog.jpg"]  # one quoted query
    assert found(search(photos, 'beach -"red car"')) == ["dog.jpg"]
    assert found(search(photos, "rece*")) == ["receipt.png"]  # a prefix
    assert found(search(photos, "march", "total")) == ["receipt.png"]  # legible text
    assert found(search(photos, "docs")) == ["receipt.png"]  # the path
    assert found(search(photos, "ORANGE")) == ["car.jpg"]  # colour names, any case
    res = search(photos, "giraffe")
    assert res.rc == 1 and res.stdout == b""  # no hits: grep's exit 1


def test_each_hit_is_the_export_record_plus_a_score_best_first(photos: Path) -> None:
    exported = {r["path"]: r for r in run_cli(["export", photos]).records}
    res = search(photos, "beach")
    assert res.rc == 0, res.stderr
    hits = res.records
    assert {Path(h["path"]).name for h in hits} == {"car.jpg", "dog.jpg"}
    for hit in hits:
        score = hit.pop("score")
        assert isinstance(score, float) and score > 0
        assert hit == exported[hit["path"]]
    # "beach" is a tag of both, and in the description of both: the one with "dog" twice
    # ranks first for "dog beach"
    scores = [h["score"] for h in search(photos, "beach").records]
    assert scores == sorted(scores, reverse=True)
    assert found(search(photos, "dog", "--limit", "1")) in (["dog.jpg"], ["sled.jpg"])
    assert len(search(photos, "dog", "--limit", "1").records) == 1


def test_filters_tag_color_status_and_dates(photos: Path) -> None:
    # a whole tag, any case: dog is not dogsled
    assert found(search(photos, "dog", "--tag", "DOG")) == ["dog.jpg"]
    assert found(search(photos, "--tag", "beach")) == ["car.jpg", "dog.jpg"]  # filters alone
    assert found(search(photos, "--tag", "beach", "--tag", "car")) == ["car.jpg"]  # all
    assert found(search(photos, "--color", "white")) == ["sled.jpg", "receipt.png"]  # by path
    assert found(search(photos, "--tag", "be")).__len__() == 0
    assert found(search(photos, "dog", "--status", "error")) == []
    # no EXIF from Gemini: the file's mtime (today) decides
    assert len(found(search(photos, "--tag", "beach", "--after", "2000-01-01"))) == 2
    assert found(search(photos, "--tag", "beach", "--before", "2000-01-01")) == []
    for bad in (["--after", "2024-13-01"], ["--before", "yesterday"], ["--status", "maybe"]):
        one_line_error(search(photos, "dog", *bad))
    one_line_error(search(photos, "dog", "--format", "xml"))
    one_line_error(search(photos, "dog", "-0"))


HOSTILE = [
    ['"red car'],  # an unterminated quote
    ['red"car'],
    ["--", "-car"],  # only exclusions
    ["--", "-car", "-dog"],
    ["*"],  # no word
    ["***", "&&"],
    ["x" * 1200],  # too long
    [" ".join(f"w{i}" for i in range(100))],  # too many words
]
AS_WORDS = [
    ["NEAR(red", "car)"],
    ["red", "AND", "car"],
    ["red", "OR", "giraffe"],
    ["description:car"],
    ["car", "NOT", "red"],
    ["^car"],
    ["(car)"],
    ["car*", "*"],
    ["\u00e9t\u00e9", "\U0001f600"],
    ["--", "-", "car"],
]


def test_hostile_queries_are_one_line_errors_or_words_never_a_traceback(photos: Path) -> None:
    for words in HOSTILE:
        one_line_error(search(photos, *words))
    for words in AS_WORDS:
        res = search(photos, *words)
        assert res.rc in (0, 1), (words, res.rc, res.stderr)
        assert "Traceback" not in res.stderr and "error" not in res.stderr, (words, res.stderr)
    # FTS5 operators are words: "OR" is not an alternative, "NOT" not an exclusion
    assert found(search(photos, "red", "OR", "giraffe")) == []
    assert found(search(photos, "NEAR(red", "car)")) == []  # the phrases "near red", "car"
    assert found(search(photos, "description:car")) == []  # the phrase "description car"
    assert found(search(photos, "(car)")) == ["car.jpg"]
    one_line_error(search(photos))  # no words and no filter


def test_the_python_library_refuses_a_nul_or_odd_query_with_a_usage_error(photos: Path) -> None:
    from imgbatch import searching
    from imgbatch.errors import UsageError

    state = the_state_folder()
    hits = searching.search(state, "red\x00car")  # NUL separates words
    assert [Path(h["path"]).name for h in hits] == ["car.jpg"]
    for bad in ('"', '-"red car"', "x" * 5000):
        with pytest.raises(UsageError):
            searching.search(state, bad)


def test_a_reanalysed_file_is_found_by_its_new_text_only(gemini: FakeGemini, photos: Path) -> None:
    assert found(search(photos, "grocery")) == ["receipt.png"]
    new = {**ANSWERS[42], "description": "An invoice for a bicycle.", "tags": ["invoice"]}
    new["text"] = "INVOICE bicycle"
    new["objects"] = ["invoice"]
    gemini.set_responder(lambda r: new if r.images and r.images[0].width == 42 else answer(r))
    analyze_gemini(gemini, photos, "--fresh")
    assert found(search(photos, "grocery")) == []
    assert found(search(photos, "march")) == []
    assert found(search(photos, "bicycle")) == ["receipt.png"]
    assert found(search(photos, "--tag", "invoice")) == ["receipt.png"]


def test_prune_and_changed_files_keep_the_index_current(gemini: FakeGemini, photos: Path) -> None:
    (photos / "car.jpg").unlink()
    assert run_cli(["prune", photos]).rc == 0
    assert found(search(photos, "beach")) == ["dog.jpg"]
    make_image(photos / "more" / "car2.jpg", (40, 30))
    analyze_gemini(gemini, photos)
    assert found(search(photos, "sunset")) == ["car2.jpg"]


def test_search_reads_while_a_run_holds_the_lock(photos: Path) -> None:
    from imgbatch.checkpoint import Checkpoint

    with Checkpoint(the_state_folder()) as cp:
        cp.lock("analyze")
        res = search(photos, "receipt")
        assert res.rc == 0, res.stderr
        assert found(res) == ["receipt.png"]


def test_the_index_is_private_and_outside_the_checkpoint(photos: Path) -> None:
    state = the_state_folder()
    index = state / "search" / "index.db"
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    assert stat.S_IMODE(index.parent.stat().st_mode) == 0o700
    before = (state / "checkpoint" / "cache.db").read_bytes()
    index.unlink()  # gone: rebuilt by the next search
    assert found(search(photos, "receipt")) == ["receipt.png"]
    assert (state / "checkpoint" / "cache.db").read_bytes() == before
    index.write_bytes(b"not a database at all" * 100)  # damaged: ours to rebuild
    assert found(search(photos, "receipt")) == ["receipt.png"]
    assert stat.S_IMODE(index.stat().st_mode) == 0o600


# -- offline results ------------------------------------------------------------------------


@pytest.fixture
def skimage_photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(SKIMAGE / name, root / name)
    res = run_cli(["analyze", "--provider", "local", root])
    assert res.rc == 0, res.stderr
    return root


def test_offline_results_by_path_and_colour_name(skimage_photos: Path) -> None:
    assert found(search(skimage_photos, "chelsea")) == ["chelsea.png"]
    assert found(search(skimage_photos, "--", "png", "-coffee", "-astronaut")) == ["chelsea.png"]
    browns = found(search(skimage_photos, "--color", "brown"))
    assert "chelsea.png" in browns and "rocket.jpg" not in browns
    assert found(search(skimage_photos, "brown", "chelsea")) == ["chelsea.png"]


def test_dates_are_the_exif_capture_time_in_local_time(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2019:05:01 10:00:00"  # DateTimeOriginal
    with Image.open(SKIMAGE / "chelsea.png") as img:
        img.convert("RGB").save(root / "old.jpg", exif=exif)
    shutil.copy(SKIMAGE / "coffee.png", root / "new.png")  # no EXIF: its mtime (today)
    assert run_cli(["analyze", "--provider", "local", root]).rc == 0
    assert found(search(root, "--after", "2019-05-01", "--before", "2019-05-02")) == ["old.jpg"]
    assert found(search(root, "--before", "2019-05-01")) == []
    assert found(search(root, "--after", "2019-05-02")) == ["new.png"]


def test_never_analysed_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    one_line_error(search(tmp_path / "empty", "dog"))


def test_paths_with_nul_separators_keep_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    odd = os.fsencode(root) + b"/caf\xe9 chelsea.png"
    shutil.copy(SKIMAGE / "chelsea.png", odd)
    shutil.copy(SKIMAGE / "coffee.png", root / "chelsea two.png")
    assert run_cli(["analyze", "--provider", "local", root]).rc == 0
    res = search(root, "chelsea", "--format", "paths", "-0")
    assert res.rc == 0, res.stderr
    paths = res.stdout.split(b"\0")
    assert paths[-1] == b"" and sorted(paths[:-1]) == sorted(
        [odd, os.fsencode(root) + b"/chelsea two.png"]
    )
    assert all(os.path.exists(p) for p in paths[:-1])
    lines = search(root, "chelsea", "--format", "paths").stdout.splitlines()
    assert odd in lines
    # the JSON form stays strict UTF-8, with the name's bytes in path_bytes_b64
    assert any("path_bytes_b64" in r for r in search(root, "chelsea").records)


def test_read_only_state_searches_an_index_in_memory_and_says_so_once(
    as_nobody: dict[str, str], shared_tmp: Path
) -> None:
    root = shared_tmp / "photos"
    root.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(SKIMAGE / name, root / name)
    root.chmod(0o755)
    res = run_cli(["analyze", "--provider", "local", root], env=as_nobody, user=NOBODY)
    assert res.rc == 0, res.stderr
    cache = Path(as_nobody["XDG_CACHE_HOME"]) / "imgbatch"
    (state,) = [p for p in cache.iterdir() if p.name != "results"]
    shutil.rmtree(state / "search")  # as an earlier imgbatch left it: no index yet
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    res = run_cli(["search", root, "chelsea"], env=as_nobody, user=NOBODY)
    assert res.rc == 0, res.stderr
    assert [Path(r["path"]).name for r in res.records] == ["chelsea.png"]
    assert res.stderr.count("in memory") == 1, res.stderr
    assert not (state / "search").exists()


def test_the_python_api_gives_the_clis_records(photos: Path) -> None:
    import imgbatch

    cli = search(photos, "beach", "--tag", "dog").records
    assert imgbatch.search(photos, "beach", tag=["dog"]) == cli
    assert imgbatch.search(photos, ["beach"], tag="dog") == cli
    assert imgbatch.search(photos, "giraffe") == []
    from imgbatch.errors import UsageError

    with pytest.raises(UsageError):
        imgbatch.search(photos, '"red')
    with pytest.raises(TypeError, match="tag"):
        imgbatch.search(photos, "dog", tags=["dog"])


def test_search_needs_no_key_and_no_network(photos: Path) -> None:
    env = {"GEMINI_API_KEY": "", "IMGBATCH_GEMINI_BASE_URL": "http://127.0.0.1:9"}
    assert found(search(photos, "receipt", env=env)) == ["receipt.png"]
    assert sys.executable  # the same interpreter runs every CLI here


# -- serve ------------------------------------------------------------------------------


def test_the_serve_endpoint_answers_the_clis_hits(
    photos: Path,
    tmp_path: Path,
    serve: Callable[..., Server],  # noqa: F811
) -> None:
    server = serve("--allow-root", photos.parent)
    cli = search(photos, "beach", "--tag", "dog").records
    with server.client() as client:
        resp = client.get("/api/search", params={"root": str(photos), "q": "beach", "tag": "dog"})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"hits": cli}
        params = {"root": str(photos), "q": "beach", "limit": "1"}
        assert len(client.get("/api/search", params=params).json()["hits"]) == 1
        resp = client.get("/api/search", params={"root": str(photos), "q": "giraffe"})
        assert resp.status_code == 200 and resp.json() == {"hits": []}
        for bad in ({"q": '"red car'}, {"q": "-car"}, {"q": "dog", "after": "soon"}):
            resp = client.get("/api/search", params={"root": str(photos), **bad})
            assert resp.status_code == 422, resp.text
            assert "\n" not in resp.json()["error"] and "Traceback" not in resp.text
        outside = tmp_path.parent / "elsewhere"
        resp = client.get("/api/search", params={"root": str(outside), "q": "dog"})
        assert resp.status_code == 403
    with server.client(token="wrong") as client:
        resp = client.get("/api/search", params={"root": str(photos), "q": "beach"})
        assert resp.status_code == 401
        assert "hits" not in resp.text


# -- catching up by the checkpoint's change log (issue 22.1, speed) ----------------------


def test_the_index_catches_up_by_the_change_log_small_and_large_folders(tmp_path: Path) -> None:
    from imgbatch import searchindex, searching
    from imgbatch.checkpoint import Checkpoint
    from imgbatch.results import ResultStore

    state, results = tmp_path / "state", tmp_path / "results"

    def item(cp: Checkpoint, folder: str, name: str, words: str, run: int) -> None:
        digest = f"{folder}/{name}/{words}"  # a content hash of its own per version
        stored = {"result": {"description": words}, "provider": "local", "model": None}
        cp.commit("fp1", folder, name, (digest, None, run, 1, 1, None), stored)

    def kites() -> list[str]:
        hits = searching.search(state, "kite", results=results)
        return sorted(str(Path(h["path"]).relative_to(tmp_path / "photos")) for h in hits)

    with ResultStore(results) as store, Checkpoint(state, results=store, large_folder=2) as cp:
        cp.lock("analyze")
        cp.set_root(str(tmp_path / "photos"))
        cp.save_run({"id": cp.next_run_id(), "fingerprint": "fp1", "provider": "local"})
        item(cp, "small", "a.png", "a red kite", 1)
        item(cp, "small", "b.png", "a blue boat", 1)
        for n, words in ((1, "an old kite"), (2, "a cat"), (3, "a dog")):
            item(cp, "big", f"x{n}.png", words, 1)  # 3 > 2: stored one row per item
        cp.flush()
        searchindex.refresh(state, cp)
        indexed = cp.commits()
        # a second run: a new item of the large folder, one re-analysed, one gone
        item(cp, "big", "x4.png", "a green kite", 2)
        item(cp, "small", "b.png", "a yellow kite", 2)
        cp.flush()
        cp.forget("fp1", "big", ["x1.png"])
        assert sorted(cp.changes(indexed, cp.commits()) or []) == [
            ("fp1", "big", "x1.png"),
            ("fp1", "big", "x4.png"),
            ("fp1", "small", None),
        ]
        assert cp.changes(0, cp.commits() + 1) is None  # beyond the log: a full diff
    # `search` brings the index up to date from what the log names
    assert kites() == ["big/x4.png", "small/a.png", "small/b.png"]
    assert searching.search(state, "boat", results=results) == []
