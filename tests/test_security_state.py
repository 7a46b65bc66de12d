"""State at rest is private and inert (issue 19, item 2): state folders and the results
store are created 0700/0600 whatever the umask; another user's state, or state writable
by others, is refused before anything in it is read (exit 5, the fix named); an earlier
imgbatch's state is narrowed and migrated once, with an unpickler that refuses every
class; nothing read from state runs code (real planted payloads, real CLI)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NOBODY, REPO, CliResult, make_image, run_cli

LEGACY = Path(__file__).parent / "fixtures" / "legacy-v1"


def cache_dir() -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"


def run_with_umask(
    args: list[str | Path], umask: int, env: dict[str, str] | None = None
) -> CliResult:
    """The CLI in a subprocess started under `umask`."""
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "imgbatch", *map(str, args)],
        capture_output=True,
        env=env,
        cwd=REPO,
        check=False,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),  # noqa: PLW1509 (no threads in the child)
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


def modes(folder: Path) -> dict[str, str]:
    """Path (relative to `folder`) -> octal mode of the folder and everything in it."""
    out = {".": f"{stat.S_IMODE(folder.stat().st_mode):o}"}
    for path in folder.rglob("*"):
        out[str(path.relative_to(folder))] = f"{stat.S_IMODE(path.lstat().st_mode):o}"
    return out


def error_line(res: CliResult) -> str:
    (line,) = [line for line in res.stderr.splitlines() if "error" in line]
    return line


def no_pickles(db: Path) -> None:
    """Every key raw and every value raw or JSON (no diskcache pickle, mode 4)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT key, raw, mode FROM Cache").fetchall()
    assert rows
    assert [r for r in rows if r[1] != 1 or r[2] not in (1, 5)] == []


class Payload:
    """Unpickling this runs `touch MARKER` (what a planted pickle would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant(
    db: Path, marker: Path, like: bytes | None = None, as_key: bool = False, at: bytes = b""
) -> int:
    """Replace values (of keys containing `like`) with a payload pickle (diskcache's mode
    4), or add a row whose pickled key is the payload, or whose value is, under key `at`."""
    payload = pickle.dumps(Payload(marker), protocol=5)
    assert b"system" in payload
    with sqlite3.connect(db) as conn:
        if at:
            conn.execute(
                "INSERT OR REPLACE INTO Cache(key, raw, store_time, expire_time, access_time,"
                " access_count, tag, size, mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0,"
                " NULL, 0, 4,"
                " NULL, ?)",
                (at, payload),
            )
            return 1
        if as_key:
            conn.execute(
                "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
                " tag, size, mode, filename, value) VALUES (?, 0, 0, NULL, 0, 0, NULL, 0, 1,"
                " NULL, 1)",
                (payload,),
            )
            return 1
        cur = conn.execute(
            "UPDATE Cache SET value = ?, mode = 4 WHERE instr(key, ?) > 0", (payload, like)
        )
        return cur.rowcount


@pytest.fixture
def analysed(tmp_path: Path) -> Path:
    """A ROOT analysed once (offline), its state in the default place."""
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"{i}.png", (20 + i, 10))
    make_image(root / "sub" / "deep.png", (40, 10))
    for image in root.rglob("*.png"):  # settled files: the hash cache keeps their entries
        os.utime(image, (time.time() - 60, time.time() - 60))
    res = run_cli(["analyze", root])
    assert res.rc == 0, res.stderr
    return root


def fake_analyze(root: Path, state: Path, env: dict[str, str], log: Path) -> CliResult:
    """`analyze` with the fake provider the legacy fixture was made with."""
    env = {**env, "IMGBATCH_TEST_FAKE": json.dumps({"log": str(log), "delay": 0.0})}
    args = ["analyze", root, "--provider", "fake", "--checkpoint", state]
    return run_cli(args, env=env, module="tests.fake_cli")


def state_of(root: Path) -> Path:
    (folder,) = [p for p in cache_dir().iterdir() if p.name != "results"]
    return folder


# -- created private ------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_state_and_results_are_created_0700_0600_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    root = tmp_path / "photos"
    make_image(root / "a.png")
    make_image(root / "sub" / "b.png", (30, 10))
    res = run_with_umask(["analyze", root], umask)
    assert res.rc == 0, res.stderr
    scanned = run_with_umask(["scan", root, "--checkpoint", tmp_path / "scan-state"], umask)
    assert scanned.rc == 0, scanned.stderr
    for folder in (cache_dir(), tmp_path / "scan-state"):
        found = modes(folder)
        expected = {p: "700" if (folder / p).is_dir() else "600" for p in found}
        assert found == expected
    # what is there: the checkpoint, the hash cache, the lock, the root, the results store
    names = set(modes(cache_dir()))
    state = state_of(root).name
    for entry in ("checkpoint/cache.db", "hashcache/cache.db", "lock", "root"):
        assert f"{state}/{entry}" in names
    assert "results/cache.db" in names
    assert {"hashcache/cache.db", "root"} <= set(modes(tmp_path / "scan-state"))


def test_batch_request_files_are_created_private(tmp_path: Path) -> None:
    """`analyze --batch`: a request file waits in the state folder's batch/ while its job
    cannot be created (here: the daily quota); it holds the downscaled uploads."""
    from tests.fakegemini import FakeGemini

    key = "test-key-BATCH-0123456789"
    root = tmp_path / "photos"
    for i in range(2):
        make_image(root / f"{i}.jpg", (300 + i, 200))
    with FakeGemini(keys={key}, seed=3) as server:
        quota = "BatchRequestsPerDayPerProject"
        server.batch.fail_next(1, 429, on="batch_create", quota_id=quota, retry_delay="3600s")
        env = {"GEMINI_API_KEY": key, "IMGBATCH_GEMINI_BASE_URL": server.url}
        res = run_with_umask(["analyze", "--batch", root], 0o002, env)
    assert res.rc == 4, res.stderr  # the quota: the submission waits, recorded
    batch = state_of(root) / "batch"
    files = list(batch.iterdir())
    assert files, "no request file left to check"
    found = modes(batch)
    assert found == {p: "700" if (batch / p).is_dir() else "600" for p in found}


# -- refused before anything is read ------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give state to another user")
def test_state_of_another_user_is_refused_naming_chown(analysed: Path, tmp_path: Path) -> None:
    state = state_of(analysed)
    marker = tmp_path / "ran"
    plant(state / "checkpoint" / "cache.db", marker, b"run")  # read, it would run
    for dirpath, _, files in os.walk(state):
        os.chown(dirpath, NOBODY, NOBODY)
        for f in files:
            os.chown(os.path.join(dirpath, f), NOBODY, NOBODY)
    for command in (["status", analysed], ["runs", analysed], ["export", analysed]):
        res = run_cli(command)
        assert res.rc == 5, (command, res.stderr)
        line = error_line(res)
        assert str(state) in line and "chown -R root" in line and "another" in line
        assert res.stdout == b""
    res = run_cli(["analyze", analysed])
    assert res.rc == 5 and f"chown -R root {state}" in error_line(res)
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give state to another user")
def test_a_results_store_of_another_user_is_refused(analysed: Path) -> None:
    store = cache_dir() / "results"
    os.chown(store / "cache.db", NOBODY, NOBODY)
    for command in (["analyze", analysed], ["export", analysed]):
        res = run_cli(command)
        assert res.rc == 5, res.stderr
        line = error_line(res)
        assert str(store / "cache.db") in line and f"chown -R root {store}" in line


def test_state_writable_by_others_is_refused_naming_chmod(analysed: Path, tmp_path: Path) -> None:
    state = state_of(analysed)
    marker = tmp_path / "ran"
    plant(state / "checkpoint" / "cache.db", marker, b"run")
    (state / "checkpoint").chmod(0o770)  # someone of the group could have planted it
    for command in ("status", "runs", "export", "analyze", "prune"):
        res = run_cli([command, analysed])
        assert res.rc == 5, (command, res.stderr)
        line = error_line(res)
        assert f"{state / 'checkpoint'} is writable by group or others (mode 0770)" in line
        assert f"chmod -R go-w {state}" in line
    assert not marker.exists()
    (state / "checkpoint").chmod(0o700)
    store = cache_dir() / "results"
    store.chmod(0o707)
    res = run_cli(["analyze", analysed])
    assert res.rc == 5 and f"chmod -R go-w {store}" in error_line(res)


# -- an earlier imgbatch's state -------------------------------------------------------------


@pytest.fixture
def legacy(tmp_path: Path) -> tuple[Path, Path]:
    """An earlier imgbatch's state folder (format 1: tuple keys, pickled values, results
    in the checkpoint, a pickled hash cache) as a 002 umask left it (0775/0664), with its
    ROOT moved to this test's tree."""
    root, state = tmp_path / "photos", tmp_path / "state"
    shutil.copytree(LEGACY / "photos", root)
    shutil.copytree(LEGACY / "state", state)
    with sqlite3.connect(state / "checkpoint" / "cache.db") as conn:
        n = conn.execute(
            "UPDATE Cache SET value = ? WHERE key = ? AND raw = 1",
            (os.fsencode(root), b"root"),
        ).rowcount
        assert n == 1
    for dirpath, _, files in os.walk(state):
        os.chmod(dirpath, 0o775)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o664)
    return root, state


def test_an_earlier_versions_state_is_refused_by_readers_and_migrated_by_analyze(
    legacy: tuple[Path, Path], tmp_path: Path
) -> None:
    root, state = legacy
    results = tmp_path / "results"
    env = {"IMGBATCH_RESULTS": str(results)}
    for command in ("status", "runs", "export"):
        res = run_cli([command, "--checkpoint", state], env=env)
        assert res.rc == 5, (command, res.stderr)
        line = error_line(res)
        assert "writable by group or others" in line
        assert f"chmod -R go-w {state}" in line and "run `imgbatch analyze` once" in line
    log = tmp_path / "calls.log"
    res = fake_analyze(root, state, env, log)
    assert res.rc == 0, res.stderr
    assert "checkpoint upgraded: 5 result(s) moved" in res.stderr
    assert res.records == [] and not log.exists()  # every item was done: nothing to do
    found = modes(state)
    assert found == {p: "700" if (state / p).is_dir() else "600" for p in found}
    for db in (state / "checkpoint", state / "hashcache", results):
        no_pickles(db / "cache.db")
    res = run_cli(["export", "--checkpoint", state], env=env)
    assert res.rc == 0, res.stderr
    ok = {Path(r["path"]).name: r for r in res.records if r["status"] == "ok"}
    assert set(ok) == {"img0.bmp", "img1.bmp", "img2.bmp", "deep.bmp"}
    assert all(r["result"] for r in ok.values())
    status = run_cli(["status", "--checkpoint", state], env=env)
    assert status.rc == 0 and "COMPLETED" in status.stderr + status.stdout.decode()
    # migrated once: a second run finds nothing to upgrade
    again = fake_analyze(root, state, env, log)
    assert again.rc == 0 and "upgraded" not in again.stderr and not log.exists()


def test_a_planted_payload_in_a_copied_checkpoint_never_runs(
    legacy: tuple[Path, Path], tmp_path: Path
) -> None:
    """A copied --checkpoint folder of an earlier format, with pickles that run `touch`
    when loaded, in its values and as a key: readers refuse it, `analyze` migrates it,
    dropping what is not plain data (with a warning); nothing runs."""
    root, state = legacy
    for dirpath, _, files in os.walk(state):  # as copied by its user: not writable by others
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    marker = tmp_path / "ran"
    db = state / "checkpoint" / "cache.db"
    assert plant(db, marker, b"run") >= 1  # the run record
    assert plant(db, marker, b"sub") >= 1  # a folder's item states
    plant(db, marker, as_key=True)
    assert plant(state / "hashcache" / "cache.db", marker, b"sub") == 1
    env = {"IMGBATCH_RESULTS": str(tmp_path / "results")}
    for command in ("status", "runs", "export"):
        res = run_cli([command, "--checkpoint", state], env=env)
        assert res.rc == 5, (command, res.stderr)
        assert "written by an earlier imgbatch" in error_line(res)
        assert "run `imgbatch analyze` on its ROOT once" in error_line(res)
    assert not marker.exists()
    res = fake_analyze(root, state, env, tmp_path / "calls.log")
    assert res.rc == 0, res.stderr
    assert "an entry is not plain data (refused to load posix.system); dropped" in res.stderr
    assert "4 entries dropped" in res.stderr  # the run record and counter, sub/, the key
    assert not marker.exists()
    # the item of the dropped folder is planned again (its stored result serves it); the
    # other folder's states were kept
    assert [(Path(r["path"]).name, r["cached"]) for r in res.records] == [("deep.bmp", True)]
    for command in ("status", "runs", "export"):
        assert run_cli([command, "--checkpoint", state], env=env).rc == 0
    assert not marker.exists()
    for name in ("checkpoint", "hashcache"):
        no_pickles(state / name / "cache.db")


def test_a_planted_pickle_in_current_state_is_refused_never_run(
    analysed: Path, tmp_path: Path
) -> None:
    state = state_of(analysed)
    marker = tmp_path / "ran"
    # the checkpoint: a reader stops with exit 5 naming the folder
    assert plant(state / "checkpoint" / "cache.db", marker, b"run\0") == 1
    res = run_cli(["status", analysed])
    assert res.rc == 5 and "damaged" in error_line(res) and str(state) in error_line(res)
    assert run_cli(["runs", analysed]).rc == 5
    # the hash cache and the results store: a miss (hashed, analysed again)
    plant(state / "hashcache" / "cache.db", marker, at=b"d:sub")  # written, or replaced
    assert plant(cache_dir() / "results" / "cache.db", marker, b"r\0") == 4
    scanned = run_cli(["scan", analysed])
    assert scanned.rc == 0 and len(scanned.records) == 4
    assert "hash cache: unreadable entry (entry of mode 4)" in scanned.stderr
    shutil.copytree(analysed, tmp_path / "copy")  # served from the store, if it could be
    res = run_cli(["analyze", tmp_path / "copy"])
    assert res.rc == 0 and len(res.records) == 4
    assert not any(r.get("cached") for r in res.records)
    assert "results store" in res.stderr and "unreadable entry" in res.stderr
    assert not marker.exists()
    # a pickled key is refused too
    plant(state / "checkpoint" / "cache.db", marker, as_key=True)
    assert run_cli(["export", analysed]).rc == 5
    assert not marker.exists()
