"""`search` and `dupes` on state an earlier imgbatch wrote and no run has migrated yet
(issue 22, item 1): read as it is (pickled tuple keys and values, decoded by the
restricted unpickler), the index built and the pHashes computed in memory, one warning
line, no byte of the state written, a planted payload never run; state writable by
others still refused. Real CLI, real fake Gemini server, real legacy state."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.statedb import DISKCACHE_SETTINGS, MARK, STORE_MARK, data_disk
from tests.conftest import CliResult, run_cli
from tests.fakegemini import FakeGemini
from tests.test_search import KEY, answer, gemini_env
from tests.test_security_state import legacy, plant  # noqa: F401 (the fixture)

WARNING = "was written by an earlier imgbatch and is read as it is"
#: the fake Gemini's answers are chosen by width (tests/test_search.py's ANSWERS)
NAMES = {40: "car.jpg", 41: "sled.jpg", 42: "docs/receipt.png", 43: "dog.jpg"}


def noise(path: Path, width: int, seed: int) -> None:
    """An image of random pixels: no two of them are near-duplicates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(width * 30 * 3)
    Image.frombytes("RGB", (width, 30), data).resize((width * 8, 240)).resize((width, 30)).save(
        path, quality=95
    )


def fingerprints(*folders: Path) -> dict[str, str]:
    """Path -> sha256 of every file (and every folder, by name) under `folders`; SQLite's
    -shm and an empty -wal aside (a read-only connection may make them: nothing is
    written through them), but a -wal with frames counts."""
    out: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                out[str(path)] = "folder"
            elif path.name.endswith("-wal") and path.stat().st_size == 0:
                continue
            elif not path.name.endswith("-shm"):
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def legacify(state: Path, results: Path) -> None:
    """Rewrite a current state folder and results store as an earlier imgbatch (format 2)
    left them: pickled tuple keys and pickled values (diskcache's default Disk), no
    marks, no search index; folders 0755 and files 0644 (readable, not writable by
    others)."""
    import diskcache

    with diskcache.Cache(str(state / "checkpoint"), disk=data_disk(), **DISKCACHE_SETTINGS) as db:
        rows = {k: db[k] for k in list(db)}
        db.clear()
    with diskcache.Cache(str(state / "checkpoint"), **DISKCACHE_SETTINGS) as db:  # pickles
        for k, value in rows.items():
            parts = k.split(b"\0")
            if parts[0] in (b"commits", b"changes"):
                continue  # a later format's
            if k == b"format":
                value = 2
            if parts[0] == b"done":  # item states were tuples
                value = {name: tuple(st) for name, st in value.items()}
            db.set(k if len(parts) == 1 else tuple(parts), value)
        assert any(isinstance(k, tuple) for k in db)
    with diskcache.Cache(str(results), disk=data_disk(), **DISKCACHE_SETTINGS) as db:
        assert db.pop(b"format") == 3
        stored = {k: db.pop(k) for k in list(db)}
    with diskcache.Cache(str(results), **DISKCACHE_SETTINGS) as db:  # as test_state does
        for k, value in stored.items():
            _, fp, content_hash = k.decode().split("\0")
            db.set((fp, content_hash), value)
    (state / MARK).unlink()
    (results / STORE_MARK).unlink()
    shutil.rmtree(state / "search")
    for folder in (state, results):
        for dirpath, _, files in os.walk(folder):
            os.chmod(dirpath, 0o755)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)


@pytest.fixture
def old_state(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    """(ROOT, state folder, results store, env): a tree analysed by the fake Gemini
    (car.jpg with an exact copy), then rewritten as format 2 (`legacify`)."""
    root, state, results = tmp_path / "photos", tmp_path / "state", tmp_path / "results"
    for width, name in NAMES.items():
        noise(root / name, width, width)
    (root / "copies").mkdir()
    shutil.copyfile(root / "car.jpg", root / "copies" / "car copy.jpg")
    env = {"IMGBATCH_RESULTS": str(results)}
    res = analyze(root, state, env)
    assert len(res.records) == 5
    legacify(state, results)
    return root, state, results, env


def analyze(root: Path, state: Path, env: dict[str, str]) -> CliResult:
    with FakeGemini(keys={KEY}, seed=3, responder=answer) as server:
        args = ["analyze", "--provider", "gemini", "--checkpoint", state, root]
        res = run_cli(args, env={**gemini_env(server), **env})
    assert res.rc == 0, res.stderr
    return res


def content_hash(root: Path, name: str) -> str:
    """The content hash imgbatch gives a file (as `scan` prints it)."""
    res = run_cli(["scan", root])
    (record,) = [r for r in res.records if Path(r["path"]).name == name]
    return str(record["hash"])


def search(root: Path, state: Path, env: dict[str, Any], *words: str) -> CliResult:
    return run_cli(["search", root, "--checkpoint", state, *words], env=env)


def dupes(root: Path, state: Path, env: dict[str, Any]) -> CliResult:
    return run_cli(["dupes", root, "--checkpoint", state], env=env)


def names(res: CliResult) -> list[str]:
    return [Path(r["path"]).name for r in res.records]


def test_format_2_state_is_searched_and_grouped_as_it_is_with_one_warning(
    old_state: tuple[Path, Path, Path, dict[str, Any]],
) -> None:
    root, state, results, env = old_state
    before = fingerprints(state, results)
    res = search(root, state, env, "receipt")
    assert res.rc == 0, res.stderr
    assert names(res) == ["receipt.png"]
    assert res.records[0]["result"]["text"].startswith("TOTAL 42.50")  # from the old store
    (line,) = res.stderr.splitlines()  # exactly one line: the warning
    assert WARNING in line and f"imgbatch analyze {root}" in line and str(state) in line
    res = search(root, state, env, '"red ball"')
    assert res.rc == 0 and names(res) == ["dog.jpg"], res.stderr
    assert search(root, state, env, "--tag", "snow").records[0]["path"].endswith("sled.jpg")
    assert search(root, state, env, "zebra").rc == 1
    res = dupes(root, state, env)
    assert res.rc == 0, res.stderr
    (group,) = res.records
    assert group["kind"] == "exact"
    assert sorted(Path(f["path"]).name for f in group["files"]) == ["car copy.jpg", "car.jpg"]
    assert res.stderr.count(WARNING) == 1 and "in memory only" in res.stderr
    assert "cannot be written" not in res.stderr  # the one warning, not a second
    assert "4 computed now" in res.stderr  # 4 contents (a copy)
    assert fingerprints(state, results) == before  # no byte written, no file made
    assert not (state / "search").exists() and not (state / "phashes.db").exists()
    # the other readers still refuse it, and one run migrates it
    assert run_cli(["export", "--checkpoint", state], env=env).rc == 5
    res = analyze(root, state, env)
    assert "checkpoint upgraded" in res.stderr and res.records == []  # nothing to do
    res = search(root, state, env, "receipt")
    assert res.rc == 0 and names(res) == ["receipt.png"] and WARNING not in res.stderr


def test_format_1_state_keeps_its_results_in_the_checkpoint(
    legacy: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The state folder imgbatch a25f03b wrote (tests/fixtures/legacy-v1): its results
    are read from the checkpoint itself; the results store is empty."""
    root, state = legacy
    for dirpath, _, files in os.walk(state):  # as its user copied it: not writable by others
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    env = {"IMGBATCH_RESULTS": str(tmp_path / "results")}
    before = fingerprints(state)
    res = search(root, state, env, "--tag", "w41")
    assert res.rc == 0, res.stderr
    assert names(res) == ["img1.bmp"] and res.records[0]["result"]["description"] == "a test image"
    assert res.stderr.count(WARNING) == 1 and len(res.stderr.splitlines()) == 1
    assert sorted(names(search(root, state, env, "test", "image"))) == [
        "deep.bmp",
        "img0.bmp",
        "img1.bmp",
        "img2.bmp",
    ]
    res = dupes(root, state, env)
    assert res.rc == 0 and res.stderr.count(WARNING) == 1, res.stderr
    assert fingerprints(state) == before
    assert not (tmp_path / "results").exists()


def test_a_planted_payload_is_never_run(
    old_state: tuple[Path, Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Pickles that run `touch MARKER` when loaded, as values (a folder's item states, a
    result) and as a key: passed over with a warning, never loaded; the rest is found."""
    root, state, results, env = old_state
    marker = tmp_path / "ran"
    db = state / "checkpoint" / "cache.db"
    assert plant(db, marker, b"docs") == 1  # the folder of receipt.png
    plant(db, marker, as_key=True)
    # the dog's result in the store (its pickled tuple key holds its hash)
    assert plant(results / "cache.db", marker, content_hash(root, "dog.jpg").encode()) == 1
    before = fingerprints(state, results)
    res = search(root, state, env, "receipt")
    assert res.rc == 1, res.stderr  # its folder's states were passed over: nothing found
    assert "not plain data" in res.stderr and "Traceback" not in res.stderr
    assert search(root, state, env, '"red ball"').rc == 1  # the dog's result, passed over
    res = search(root, state, env, "sunset")  # the rest is found
    assert res.rc == 0 and sorted(names(res)) == ["car copy.jpg", "car.jpg"], res.stderr
    assert res.stderr.count(WARNING) == 1
    res = dupes(root, state, env)
    assert res.rc == 0 and [g["kind"] for g in res.records] == ["exact"], res.stderr
    assert not marker.exists()
    assert fingerprints(state, results) == before


def test_a_legacy_folder_writable_by_others_is_still_refused(
    legacy: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    root, state = legacy  # 0775/0664, as a 002 umask left it
    env = {"IMGBATCH_RESULTS": str(tmp_path / "results")}
    for res in (search(root, state, env, "test"), dupes(root, state, env)):
        assert res.rc == 5, res.stderr
        assert "writable by group or others" in res.stderr and WARNING not in res.stderr
        assert res.stdout == b""
