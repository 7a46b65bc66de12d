"""Integrity of state: every line delivered before it counts as done, every result true
to the bytes of its hash, results shared by content across roots, state that survives
old formats, coarse timestamps, damage and interruptions."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from imgbatch import statedb
from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings
from imgbatch.imaging import PreparedImage
from imgbatch.output import JsonlSink
from imgbatch.pipeline import Pipeline, RunContext, RunOptions
from imgbatch.providers.base import Analysis
from tests.conftest import REPO, make_image, run_cli, settle

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-v1"


def fake(log: Path, delay: float = 0.0) -> dict[str, str]:
    return {"IMGBATCH_TEST_FAKE": json.dumps({"log": str(log), "delay": delay})}


def calls(log: Path) -> list[int]:
    """Image widths the fake provider was asked about, in order."""
    return [int(w) for w in log.read_text().split()] if log.exists() else []


def analyze(*args: Any, env: dict[str, str] | None = None) -> Any:
    return run_cli(["analyze", *map(str, args)], env=env, module="tests.fake_cli")


def error_line(stderr: str) -> str:
    """The one error line a failed command printed (info lines aside)."""
    (line,) = [line for line in stderr.splitlines() if "error" in line]
    return line


# -- 1. a checkpoint belongs to one ROOT ------------------------------------------------


class TestOneRootPerStateFolder:
    def test_a_state_folder_of_another_root_is_refused_with_both_roots_named(
        self, tmp_path: Path
    ) -> None:
        make_image(tmp_path / "one" / "a.png")
        make_image(tmp_path / "two" / "a.png")
        state = tmp_path / "state"
        first = run_cli(["analyze", tmp_path / "one", "--checkpoint", state])
        assert first.rc == 0, first.stderr
        for command in ("analyze", "scan"):
            other = run_cli([command, tmp_path / "two", "--checkpoint", state])
            assert other.rc == 2, other.stderr
            line = error_line(other.stderr)
            assert str(tmp_path / "one") in line and str(tmp_path / "two") in line
            assert other.stdout == b""
        # and the first tree's state is untouched: export still shows only its file
        exported = run_cli(["export", "--checkpoint", state])
        assert [r["path"] for r in exported.records] == [str(tmp_path / "one" / "a.png")]

    def test_scan_records_its_root_too(self, tmp_path: Path) -> None:
        make_image(tmp_path / "one" / "a.png")
        make_image(tmp_path / "two" / "a.png")
        state = tmp_path / "state"
        assert run_cli(["scan", tmp_path / "one", "--checkpoint", state]).rc == 0
        refused = run_cli(["analyze", tmp_path / "two", "--checkpoint", state])
        assert refused.rc == 2 and str(tmp_path / "one") in refused.stderr

    def test_root_slash_records_paths_whole(self) -> None:
        """ROOT `/`: the path relative to it keeps its first character."""
        base = Path(tempfile.mkdtemp(prefix="imgbatch-slash-", dir="/tmp"))
        try:
            make_image(base / "deep" / "a.png", (21, 9))
            # leave out everything under / but this folder (other tests may add files)
            excludes = [f"{name}/" for name in os.listdir("/") if name != "tmp"]
            excludes += [f"tmp/{n}" for n in os.listdir("/tmp") if n != base.name]
            args = [f"--exclude={pattern}" for pattern in excludes]
            ours = str(base / "deep" / "a.png")
            first = run_cli(["analyze", "/", "--provider", "local", *args])
            assert first.rc == 0, first.stderr
            assert ours in [r["path"] for r in first.records]
            again = run_cli(["analyze", "/", "--provider", "local", *args])
            assert ours not in [r["path"] for r in again.records]  # recorded as done
            exported = {r["path"]: r for r in run_cli(["export", "/"]).records}
            assert exported[ours]["exists"] is True
            assert exported[ours]["result"]["width"] == 21
        finally:
            shutil.rmtree(base, ignore_errors=True)


# -- 2. results shared across roots ----------------------------------------------------


class TestSharedResults:
    def test_a_copied_or_moved_tree_costs_no_request(self, tmp_path: Path) -> None:
        log = tmp_path / "calls.log"
        for i in range(4):
            make_image(tmp_path / "a" / f"{i}.png", (20 + i, 10))
        first = analyze(tmp_path / "a", "--provider", "fake", "--rpm", "6000", env=fake(log))
        assert first.rc == 0 and len(calls(log)) == 4
        shutil.copytree(tmp_path / "a", tmp_path / "copy")
        (tmp_path / "a").rename(tmp_path / "moved")
        for root in ("copy", "moved"):
            res = analyze(tmp_path / root, "--provider", "fake", env=fake(log))
            assert res.rc == 0, res.stderr
            assert len(res.records) == 4 and all(r["cached"] for r in res.records)
            assert sorted(r["result"]["tags"][0] for r in res.records) == [
                "w20",
                "w21",
                "w22",
                "w23",
            ]
        assert len(calls(log)) == 4  # nothing requested again

    def test_the_store_is_where_settings_say(self, tmp_path: Path) -> None:
        log = tmp_path / "calls.log"
        make_image(tmp_path / "a" / "x.png")
        env = {**fake(log), "IMGBATCH_RESULTS": str(tmp_path / "shared")}
        assert analyze(tmp_path / "a", "--provider", "fake", env=env).rc == 0
        assert (tmp_path / "shared" / "cache.db").is_file()
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        other_store = {**fake(log), "IMGBATCH_RESULTS": str(tmp_path / "elsewhere")}
        assert analyze(tmp_path / "b", "--provider", "fake", env=other_store).rc == 0
        assert len(calls(log)) == 2  # another store knows nothing

    def test_concurrent_runs_on_different_roots_share_the_store(self, tmp_path: Path) -> None:
        log = tmp_path / "calls.log"
        for tree in ("a", "b"):
            for i in range(6):
                make_image(
                    tmp_path / tree / f"{i}.png", (30 + i, 10) if tree == "a" else (50 + i, 10)
                )
        env = {**os.environ, **fake(log, delay=0.05)}
        env.pop("PYTHONPATH", None)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.fake_cli", "analyze", str(tmp_path / t)]
                + ["--provider", "fake", "--rpm", "6000", "--quiet"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd=REPO,
            )
            for t in ("a", "b")
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        shutil.copytree(tmp_path / "a", tmp_path / "both" / "a")
        shutil.copytree(tmp_path / "b", tmp_path / "both" / "b")
        res = analyze(tmp_path / "both", "--provider", "fake", env=fake(log))
        assert res.rc == 0 and len(res.records) == 12
        assert all(r["cached"] for r in res.records)
        assert len(calls(log)) == 12

    def test_a_store_keyed_by_tuples_as_before_is_migrated_and_still_read(
        self, tmp_path: Path
    ) -> None:
        """Stores written before bytes keys held (fingerprint, hash) tuples and pickled
        values: the first run migrates them to plain data, and nothing is requested again."""
        import diskcache

        from imgbatch.hashcache import DISKCACHE_SETTINGS
        from imgbatch.results import FORMAT
        from imgbatch.statedb import data_disk

        log = tmp_path / "calls.log"
        make_image(tmp_path / "a" / "x.png", (34, 10))
        shared = tmp_path / "shared"
        env = {**fake(log), "IMGBATCH_RESULTS": str(shared)}
        assert analyze(tmp_path / "a", "--provider", "fake", env=env).rc == 0
        with diskcache.Cache(str(shared), disk=data_disk(), **DISKCACHE_SETTINGS) as db:
            assert db.pop(FORMAT) == 3  # the old main left no mark
            values = {k: db.pop(k) for k in list(db)}
        with diskcache.Cache(str(shared), **DISKCACHE_SETTINGS) as db:  # pickles
            assert values and all(isinstance(k, bytes) for k in values)
            for k, value in values.items():  # rewritten as the old main wrote them
                _, fp, content_hash = k.decode().split("\0")
                db.set((fp, content_hash), value)
            assert all(isinstance(k, tuple) for k in db)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        res = analyze(tmp_path / "b", "--provider", "fake", env=env)
        assert res.rc == 0 and res.records[0]["cached"] is True
        assert calls(log) == [34]  # nothing requested again
        with sqlite3.connect(shared / "cache.db") as conn:
            rows = conn.execute("SELECT raw, mode FROM Cache").fetchall()
        assert rows and all(raw == 1 and mode in (1, 5) for raw, mode in rows)  # no pickle

    def test_results_are_rows_diskcache_itself_reads_and_counts(self, tmp_path: Path) -> None:
        import diskcache

        from imgbatch.hashcache import DISKCACHE_SETTINGS
        from imgbatch.results import ResultStore, key
        from imgbatch.statedb import data_disk

        first = {"status": "ok", "result": {"tags": ["a"]}}
        with ResultStore(tmp_path / "r") as store:
            assert store.put_many([(("fp1", "h1"), first), (("fp1", "h2"), {"x": 1})]) == 2
            assert store.put_many([(("fp1", "h1"), {"status": "ok", "again": True})]) == 1
            assert len(store) == 2 and store.get("fp1", "h2") == {"x": 1}
        with diskcache.Cache(str(tmp_path / "r"), disk=data_disk(), **DISKCACHE_SETTINGS) as db:
            assert db.get(key("fp1", "h1")) == {"status": "ok", "again": True}
            assert len(db) == 3  # the two results and the format mark
            assert db.volume() > 0 and db.check() == []  # consistent as diskcache sees it

    def test_prune_never_deletes_shared_results(self, tmp_path: Path) -> None:
        log = tmp_path / "calls.log"
        make_image(tmp_path / "a" / "x.png", (33, 10))
        assert analyze(tmp_path / "a", "--provider", "fake", env=fake(log)).rc == 0
        shutil.copytree(tmp_path / "a", tmp_path / "keep")
        (tmp_path / "a" / "x.png").unlink()
        pruned = run_cli(["prune", tmp_path / "a"])
        assert pruned.rc == 0 and "pruned 1 " in pruned.stderr
        res = analyze(tmp_path / "keep", "--provider", "fake", env=fake(log))
        assert res.records[0]["cached"] is True and calls(log) == [33]


# -- 3. format 1 migrated ----------------------------------------------------------------


@pytest.fixture
def legacy_tree() -> Iterator[Path]:
    """The format-1 state folder written by imgbatch a25f03b, with its tree at the ROOT
    it records (tests/fixtures/legacy-v1/README.md)."""
    base = Path("/tmp/imgbatch-legacy-v1")
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(FIXTURE / "photos", base / "photos")
    shutil.copytree(FIXTURE / "state", base / "state")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_a_format_1_checkpoint_is_migrated_and_nothing_is_requested_again(
    legacy_tree: Path, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    state = legacy_tree / "state"
    with Checkpoint(state, create=False) as old:
        assert old.format == 1
    res = analyze(
        legacy_tree / "photos", "--provider", "fake", "--checkpoint", state, env=fake(log)
    )
    assert res.rc == 0, res.stderr
    assert "checkpoint upgraded: 5 result(s) moved" in res.stderr
    assert res.records == [] and calls(log) == []  # every item was done: nothing to do
    with Checkpoint(state, create=False) as cp:
        assert cp.format == 3
    db = statedb.ReadOnlyCache(state / "checkpoint")  # the layout on disk, as stored
    keys = list(db.iterkeys())
    db.close()
    assert keys and all(isinstance(k, bytes) for k in keys)  # plain data only
    assert not [k for k in keys if k.startswith(b"result")]
    # the results now serve any tree with the same content, with no request
    shutil.copytree(legacy_tree / "photos", tmp_path / "copy")
    copy = analyze(tmp_path / "copy", "--provider", "fake", env=fake(log))
    assert copy.rc == 1  # broken.bmp is still BAD_IMAGE, from the stored verdict
    by_name = {os.path.basename(r["path"]): r for r in copy.records}
    assert by_name["img0.bmp"]["cached"] and by_name["img0.bmp"]["result"]["tags"][0] == "w33"
    assert by_name["broken.bmp"]["error"]["code"] == "BAD_IMAGE"
    assert calls(log) == []
    exported = run_cli(["export", "--checkpoint", state])
    assert {os.path.basename(r["path"]) for r in exported.records if r["status"] == "ok"} == {
        "img0.bmp",
        "img1.bmp",
        "img2.bmp",
        "deep.bmp",
    }


# -- 4. nothing recorded before its line is written --------------------------------------


class Writer:
    """A provider answering at once (the offline analyzer's shape, without its work)."""

    name = "writer"
    remote = False

    @property
    def model(self) -> str:
        return "writer-1"

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "writer-1"}

    prompt_tokens = 0

    def estimate_tokens(self, width: int, height: int) -> int:
        return 0

    def encode(self, image: PreparedImage) -> PreparedImage:
        return image

    def analyze(self, image: PreparedImage) -> Analysis:
        return Analysis({"w": image.width})

    def close(self) -> None:
        pass


class WatchedCheckpoint(Checkpoint):
    """A checkpoint that checks, as each group of items is written to its database, that
    every one of them already has its line in the output file."""

    def __init__(self, state: Path, out: Path) -> None:
        super().__init__(state)
        self.out = out
        self.group: list[str] = []
        self.checked = 0
        self.violations: list[str] = []

    def commit(self, fp: str, rel_dir: str, name: str, *args: Any, **kwargs: Any) -> None:
        self.group.append(f"{rel_dir}/{name}")
        super().commit(fp, rel_dir, name, *args, **kwargs)

    def flush(self) -> None:
        written = self.out.read_text()
        self.checked += len(self.group)
        self.violations += [item for item in self.group if item not in written]
        self.group.clear()
        super().flush()


def test_the_library_commits_an_item_only_after_its_line_is_out(tmp_path: Path) -> None:
    for i in range(150):
        make_image(tmp_path / "root" / "d" / f"{i:03d}.png", (16, 16), (i, 0, 0))
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    settings = Settings(workers=1)
    with out.open("wb") as fh, WatchedCheckpoint(state, out) as cp:
        sink = JsonlSink(fh.fileno())  # the library default: 100 lines per write
        ctx = RunContext(str(tmp_path / "root"), settings, RunOptions(), Writer(), cp, sink)
        Pipeline(ctx).run()
        sink.close()
        assert cp.checked == 150 and cp.violations == []
    assert len(out.read_text().splitlines()) == 150


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_file_on_stdout_is_synced_before_a_commit(tmp_path: Path) -> None:
    for i in range(3):
        make_image(tmp_path / "root" / f"{i}.png")
    trace = tmp_path / "trace"

    def traced(stdout: Any) -> str:
        subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=fdatasync,fsync", "-o", str(trace)]
            + [sys.executable, "-m", "imgbatch", "analyze", str(tmp_path / "root"), "--fresh"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            check=True,
            cwd=REPO,
        )
        return trace.read_text()

    with (tmp_path / "out.jsonl").open("wb") as fh:
        assert "fdatasync(1)" in traced(fh)
    assert "fdatasync(1)" not in traced(subprocess.PIPE)


# -- 5. a result always describes the bytes of its hash --------------------------------


def test_a_file_rewritten_between_scan_and_decoding_gets_no_result_under_the_old_hash(
    tmp_path: Path,
) -> None:
    log = tmp_path / "calls.log"
    root = tmp_path / "root"
    make_image(root / "a.png", (20, 10))
    b = make_image(root / "b.png", (41, 10))
    old_bytes = b.read_bytes()
    env = {**os.environ, **fake(log, delay=2.0)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_cli", "analyze", str(root), "--provider", "fake"]
        + ["--workers", "1", "--rpm", "6000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while calls(log) != [20] and time.monotonic() < deadline:  # a.png is being analysed,
        time.sleep(0.02)
    time.sleep(0.3)  # b.png was scanned (hashed) meanwhile and waits for the worker
    make_image(b, (77, 10))  # rewritten before it is decoded
    out, err = proc.communicate(timeout=60)
    records = {os.path.basename(r["path"]): r for r in map(json.loads, out.splitlines())}
    assert proc.returncode == 1, err
    assert records["b.png"]["hash"] == xxhash.xxh3_128_hexdigest(old_bytes)
    assert records["b.png"]["error"]["code"] == "IO_ERROR"
    assert "changed since it was scanned" in records["b.png"]["error"]["message"]
    assert calls(log) == [20]  # the new picture was never sent under the old hash
    # a real copy of the old content is analysed for itself, not served a poisoned result
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "b.png").write_bytes(old_bytes)
    copy = analyze(tmp_path / "copy", "--provider", "fake", "--rpm", "6000", env=fake(log))
    assert copy.records[0]["result"]["tags"][0] == "w41"
    # and the next run over the tree analyses b.png's new content
    again = analyze(root, "--provider", "fake", "--rpm", "6000", env=fake(log))
    assert [os.path.basename(r["path"]) for r in again.records] == ["b.png"]
    assert again.records[0]["result"]["tags"][0] == "w77"


# -- 6. racy hash-cache entries ----------------------------------------------------------


def scan_summary(root: Path) -> str:
    res = run_cli(["scan", root])
    assert res.rc == 0, res.stderr
    return res.stderr


def test_a_file_hashed_within_2s_of_its_change_is_read_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(root / "new.png")
    scan_summary(root)  # at once: the entry is racy
    assert ", 0 from the hash cache" in scan_summary(root)
    settle()
    scan_summary(root)  # now older than 2 s: cached for good
    summary = scan_summary(root)
    assert "read 0 B, 1 from the hash cache" in summary


# -- 7. damaged state is survivable ----------------------------------------------------


def corrupt_values(db: Path, like: bytes) -> int:
    """Replace the pickled values whose key contains `like` with garbage."""
    with sqlite3.connect(db) as conn:
        cur = conn.execute(
            "UPDATE Cache SET value = ?, mode = 4 WHERE instr(key, ?) > 0", (b"\x80garbage", like)
        )
        return cur.rowcount


def test_an_unreadable_hash_cache_entry_is_a_miss(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(root / "sub" / "a.png")
    settle()
    state = tmp_path / "state"
    assert run_cli(["scan", root, "--checkpoint", state]).rc == 0
    assert corrupt_values(state / "hashcache" / "cache.db", b"sub") == 1
    res = run_cli(["scan", root, "--checkpoint", state])
    assert res.rc == 0 and len(res.records) == 1 and res.records[0]["hash"]
    assert res.stderr.count("hash cache: unreadable entry") == 1
    assert "Traceback" not in res.stderr


def test_an_unreadable_checkpoint_entry_is_exit_5_naming_the_state_folder(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    make_image(root / "sub" / "a.png")
    state = tmp_path / "state"
    assert run_cli(["analyze", root, "--checkpoint", state]).rc == 0
    assert corrupt_values(state / "checkpoint" / "cache.db", b"sub") == 1
    res = run_cli(["analyze", root, "--checkpoint", state])
    assert res.rc == 5
    line = error_line(res.stderr)
    assert str(state) in line and "damaged" in line and "move that folder aside" in line
    assert "Traceback" not in res.stderr and "Aborted" not in res.stderr


def test_big_values_stay_inside_sqlite(tmp_path: Path) -> None:
    """diskcache keeps values over 32 KB as separate, un-fsynced files by default."""
    root = tmp_path / "root"
    for i in range(400):  # one folder row of ~40 KB in the checkpoint and the hash cache
        (root / "big").mkdir(parents=True, exist_ok=True)
        (root / "big" / f"{i:04d}-a-rather-long-file-name-for-a-bigger-row.gif").write_bytes(
            b"GIF89a" + i.to_bytes(4, "big")
        )
    state = tmp_path / "state"
    res = run_cli(["analyze", root, "--checkpoint", state])
    assert res.rc == 1 and len(res.records) == 400  # not decodable: 400 error records
    files = sorted(p.name for p in state.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".val")], files


# -- 8. interrupted folders keep their work ------------------------------------------------


def test_a_stopped_run_keeps_the_hashes_of_the_part_of_a_folder_it_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i in range(10):
        make_image(root / "one" / f"{i}.png", (10 + i, 10))
    settle()
    res = run_cli(["analyze", root, "--limit", "3"])
    assert res.rc == 0 and len(res.records) == 3
    summary = scan_summary(root)
    hits = int(summary.split(" from the hash cache")[0].rsplit(", ", 1)[1])
    assert hits >= 3


def test_an_images_only_run_keeps_the_hashes_all_files_cached(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(root / "a.png")
    (root / "notes.txt").write_text("not an image")
    settle()
    assert run_cli(["scan", root, "--all-files"]).rc == 0
    assert run_cli(["scan", root]).rc == 0  # images only
    res = run_cli(["scan", root, "--all-files"])
    assert res.rc == 0 and "read 0 B, 2 from the hash cache" in res.stderr


# -- a missing decoder is not a permanent verdict (issue 9, item 6) ----------------------


def test_a_heic_file_is_retried_once_pillow_heif_imports(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra is in dev")
    from PIL import Image

    pillow_heif.register_heif_opener()
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "phone.heic", format="HEIF")
    # a Python where `import pillow_heif` fails, as without the extra
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['pillow_heif'] = None\n")
    without = {"PYTHONPATH": str(hide)}

    def analyze_heic(env: dict[str, str]) -> Any:
        full = {**os.environ, **env}
        proc = subprocess.run(
            [sys.executable, "-m", "imgbatch", "analyze", str(root)],
            capture_output=True,
            env=full,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]

    rc, records = analyze_heic(without)
    assert rc == 1 and records[0]["error"]["code"] == "BAD_IMAGE"
    assert "pip install 'imgbatch[heif]'" in records[0]["error"]["message"]
    assert analyze_heic(without) == (0, [])  # still missing: not tried again
    rc, records = analyze_heic({})  # the extra is installed now
    assert rc == 0 and records[0]["status"] == "ok"
    assert records[0]["result"]["width"] == 40 and records[0]["result"]["format"] == "HEIF"
