"""The scan's jobs at the boundary: tuples on the wire, the walk's own types at home.

A job's answer is the same whether it ran in the scanning process or in a worker process
(marshal frames through a pipe), and `scanner.receive` turns it into typed results: a
folder's cache entry is a `NewEntry`, a `LeftOpen` or None, never a dict or a tagged
tuple in the same field."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch import hashjob
from imgbatch.config import Settings
from imgbatch.hashcache import HashCache
from imgbatch.hashjob import LARGE_FILE, Large
from imgbatch.records import FileRecord
from imgbatch.scanner import (
    FolderResult,
    JobCounts,
    LeftOpen,
    NewEntry,
    PartResult,
    Scanner,
    Workers,
    receive,
)
from tests.conftest import settle

SMALL = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", 'we"ird.jpg']  # '"': a line made the slow way


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT: small files, a large one, a symlink and `sub`; `other` is not in the cache."""
    root = tmp_path_factory.mktemp("tree") / "root"
    rng = random.Random(21)
    for folder, names in (("", SMALL), ("sub", ["x.jpg"]), ("other", ["y.jpg", "z.jpg"])):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(rng.randbytes(rng.randint(0, 5000)))
    (root / "big.jpg").write_bytes(b"\1" * LARGE_FILE)
    (root / "link.jpg").symlink_to(root / "a.jpg")
    settle()  # the cache keeps no racy stamps
    with HashCache(root.parent / "cache") as cache:
        list(Scanner(str(root), Settings(exclude=("other",)), cache))
        (root.parent / "db").write_text(cache.db_path)
    return root


@pytest.fixture(scope="module")
def worker() -> Iterator[Workers]:
    workers = Workers(1, wait=True)
    assert workers.ready()
    yield workers
    workers.close()


def folder_job(
    path: Path, rel: str, db: str | None, first: int, split: int, lines: bool = True
) -> hashjob.AnyJob:
    listing = (False, False, False, ())
    return "F", (str(path), rel, listing, lines, db, first, split, hashjob.NOWAIT)


def both_ways(workers: Workers, job: hashjob.AnyJob) -> FolderResult | PartResult:
    """The job's answer run here, checked equal to the answer of a worker process."""
    here = receive(hashjob.run(job))
    there = receive(workers.result(workers.submit(job)))
    assert comparable(there) == comparable(here)
    return here


def comparable(result: FolderResult | PartResult) -> FolderResult | PartResult:
    """The result with its Large markers (which have no equality) as tuples, and no clock
    (the moment each job listed the folder)."""
    parts = [("large", p.name, p.ext) if isinstance(p, Large) else p for p in result.parts]
    result = dataclasses.replace(result, parts=parts)  # type: ignore[arg-type]
    if isinstance(result, FolderResult) and isinstance(result.store, LeftOpen):
        result.store = dataclasses.replace(result.store, listed_ns=0)
    return result


def db_of(tree: Path) -> str:
    """The hash cache's database, which the jobs read."""
    return (tree.parent / "db").read_text()


def test_a_worker_answers_every_kind_of_job_as_the_scan_itself_would(
    tree: Path, worker: Workers
) -> None:
    for lines in (True, False):  # JSON lines, or FileRecords (for `analyze`)
        root = both_ways(worker, folder_job(tree, "", None, 3, 3, lines))
        assert isinstance(root, FolderResult) and root.listed_ok
        assert [p.names for p in root.rest] == [["c.jpg", "d.jpg", 'we"ird.jpg']]
        assert root.skipped_links == 1 and [s[1] for s in root.subfolders] == ["other", "sub"]
        # the large file is left in its place, for the scanner's hashing threads
        assert [type(p) for p in root.parts][-1:] == [Large]
        [part] = root.rest  # the folder's other part, as a segment job
        rest = both_ways(worker, ("S", ([part.segment()], False, lines, hashjob.NOWAIT)))
        assert isinstance(rest, PartResult) and [r[0] for r in rest.rows] == part.names
    records = [p for p in rest.parts if isinstance(p, FileRecord)]
    assert [r.path for r in records] == [str(tree / n) for n in SMALL[2:]]
    size = sum(r.size or 0 for r in records)
    assert rest.counts == JobCounts(3, 0, size, size, 0, 0)


def test_a_folder_jobs_cache_entry_comes_back_as_one_typed_decision(
    tree: Path, worker: Workers
) -> None:
    db = db_of(tree)
    # done in several parts (or with a large file): left to the scanner, to merge
    root = both_ways(worker, folder_job(tree, "", db, 2, 3))
    assert isinstance(root, FolderResult) and isinstance(root.store, LeftOpen)
    assert root.store.listed == {*SMALL, "big.jpg", "link.jpg", "sub", "other"}
    assert root.store.old is not None and set(root.store.old) == {*SMALL, "big.jpg"}
    assert root.counts.cache_hits == 2 and root.rows == []
    assert root.store.merged({}) is None  # nothing read: the entry stands
    # done whole, files read (no entry yet): the job decides the new entry
    other = both_ways(worker, folder_job(tree / "other", "other", db, 128, 128))
    assert isinstance(other, FolderResult) and isinstance(other.store, NewEntry)
    assert sorted(other.store.hashes) == ["y.jpg", "z.jpg"] and len(other.rows) == 2
    assert other.store.hashes == dict(other.rows)
    # done whole from the cache: the entry stands; no cache: nothing to store
    sub = both_ways(worker, folder_job(tree / "sub", "sub", db, 128, 128))
    assert isinstance(sub, FolderResult) and sub.store is None and sub.counts.cache_hits == 1
    nocache = both_ways(worker, folder_job(tree / "other", "other", None, 128, 128))
    assert isinstance(nocache, FolderResult) and nocache.store is None


def test_a_folder_that_cannot_be_listed_is_one_error(tmp_path: Path, worker: Workers) -> None:
    gone = both_ways(worker, folder_job(tmp_path / "gone", "gone", None, 1, 1))
    assert isinstance(gone, FolderResult) and not gone.listed_ok
    assert len(gone.errors) == 1 and b"cannot list folder" in gone.errors[0]  # type: ignore[operator]
    assert gone.counts == JobCounts(0, 1, 0, 0, 0, 0) and gone.store is None


def test_job_counts_are_the_counters_of_a_job_in_order() -> None:
    names = tuple(f.name for f in dataclasses.fields(JobCounts))
    assert names == hashjob.COUNTERS
