"""The scanner library: what it yields, in which order, and what it skips."""

from __future__ import annotations

import itertools
import os
import re
import threading
from pathlib import Path

import pytest
import xxhash

from imgbatch.config import Settings
from imgbatch.errors import ErrorCode, UsageError
from imgbatch.hashcache import HashCache
from imgbatch.records import FileRecord
from imgbatch.scanner import LARGE_FILE, Scanner, batched, count_files
from tests.conftest import make_image, settle


def scan(root: Path, cache: HashCache | None = None, **settings: object) -> Scanner:
    return Scanner(str(root), Settings(**settings), cache)  # type: ignore[arg-type]


def rels(records: list[FileRecord], root: Path) -> list[str]:
    return [os.path.relpath(r.path, root) for r in records]


def test_a_record_identifies_the_file_by_content(tmp_path: Path) -> None:
    img = make_image(tmp_path / "Photo.JPG")
    [rec] = list(scan(tmp_path))
    data = img.read_bytes()
    fields = rec.fields()
    assert fields["path"] == str(img) and os.path.isabs(fields["path"])
    assert fields["hash"] == xxhash.xxh3_128_hexdigest(data)
    assert fields["size"] == len(data)
    assert fields["extension"] == ".jpg"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fields["mtime"])
    assert fields["status"] == "ok"


def test_order_is_sorted_within_each_folder_files_before_subfolders(tmp_path: Path) -> None:
    for rel in ["b.png", "a.png", "z/c.png", "m/d.png", "m/a.png", "c.png"]:
        make_image(tmp_path / rel)
    first = rels(list(scan(tmp_path)), tmp_path)
    assert first == ["a.png", "b.png", "c.png", "m/a.png", "m/d.png", "z/c.png"]
    assert rels(list(scan(tmp_path)), tmp_path) == first


def test_images_only_by_default_and_every_file_with_all_files(tmp_path: Path) -> None:
    for name in ["a.jpeg", "b.TIFF", "c.webp", "d.heic", "e.AVIF", "f.bmp", "g.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "README").write_text("hi")
    assert len(list(scan(tmp_path))) == 7
    everything = rels(list(scan(tmp_path, all_files=True)), tmp_path)
    assert "notes.txt" in everything and "README" in everything and len(everything) == 9


def test_exclude_matches_basenames_or_paths_relative_to_root(tmp_path: Path) -> None:
    for rel in ["keep.jpg", "thumbs/t.jpg", "a/thumbs/t.jpg", "a/b/skip.jpg", "x_small.jpg"]:
        make_image(tmp_path / rel)
    found = rels(list(scan(tmp_path, exclude=("thumbs", "a/b", "*_small.jpg"))), tmp_path)
    assert found == ["keep.jpg"]
    anchored = rels(list(scan(tmp_path, exclude=("/thumbs",))), tmp_path)
    assert "a/thumbs/t.jpg" in anchored and "thumbs/t.jpg" not in anchored


def test_hidden_files_and_folders_only_with_include_hidden(tmp_path: Path) -> None:
    make_image(tmp_path / ".hidden.jpg")
    make_image(tmp_path / ".cache" / "a.jpg")
    make_image(tmp_path / "seen.jpg")
    assert rels(list(scan(tmp_path)), tmp_path) == ["seen.jpg"]
    assert len(list(scan(tmp_path, include_hidden=True))) == 3


def test_symlinks_are_counted_skips_unless_followed(tmp_path: Path) -> None:
    make_image(tmp_path / "real" / "a.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real" / "a.jpg")
    (tmp_path / "linkdir").symlink_to(tmp_path / "real")
    s = scan(tmp_path)
    assert rels(list(s), tmp_path) == ["real/a.jpg"]
    assert s.stats.skipped["symlink"] == 2
    followed = scan(tmp_path, follow_symlinks=True)
    # the folder behind linkdir is visited once, under whichever name comes first
    assert rels(list(followed), tmp_path) == ["link.jpg", "linkdir/a.jpg"]
    assert followed.stats.skipped["folder already visited"] == 1


def test_a_symlink_loop_ends_when_following(tmp_path: Path) -> None:
    make_image(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "up").symlink_to(tmp_path)
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")
    s = scan(tmp_path, follow_symlinks=True)
    records = list(s)
    assert [r.path for r in records if r.ok] == [str(tmp_path / "a" / "x.jpg")]
    [loop] = [r for r in records if not r.ok]
    assert loop.path == str(tmp_path / "self.jpg") and loop.error_code is ErrorCode.IO_ERROR
    assert "symlink loop" in (loop.error_message or "")


def test_batches_have_the_given_size_and_are_cut_lazily() -> None:
    assert [len(b) for b in batched(range(250), 100)] == [100, 100, 50]
    endless = batched(itertools.count(), 3)
    assert next(endless) == [0, 1, 2] and next(endless) == [3, 4, 5]
    with pytest.raises(ValueError):
        next(batched([1], 0))


def test_the_walk_is_lazy_records_come_before_the_tree_is_listed(tmp_path: Path) -> None:
    for d in range(20):
        make_image(tmp_path / f"d{d:02d}" / "a.png")
    s = scan(tmp_path)
    first = next(iter(s))
    assert first.path.endswith("d00/a.png")
    assert s.stats.folders < 5


def test_large_files_are_hashed_by_threads_in_order(tmp_path: Path) -> None:
    contents = {}
    for i, size in enumerate([LARGE_FILE + 1, 10, LARGE_FILE * 2, 1 << 20, 0, LARGE_FILE]):
        data = os.urandom(size)
        (tmp_path / f"f{i}.png").write_bytes(data)
        contents[f"f{i}.png"] = xxhash.xxh3_128_hexdigest(data)
    records = list(scan(tmp_path, hash_threads=2))
    assert [os.path.basename(r.path) for r in records] == sorted(contents)
    assert {os.path.basename(r.path): r.hash for r in records} == contents


def test_no_hash_lists_metadata_without_reading(tmp_path: Path) -> None:
    make_image(tmp_path / "a.jpg")
    s = scan(tmp_path, hash=False)
    [rec] = list(s)
    assert rec.hash is None and rec.size == (tmp_path / "a.jpg").stat().st_size
    assert s.stats.bytes_read == 0


def test_count_files_counts_what_a_scan_yields_from_listings_alone(tmp_path: Path) -> None:
    for i in range(7):
        make_image(tmp_path / f"d{i % 3}" / f"{i}.png")
    (tmp_path / "d0" / "notes.txt").write_text("not an image")
    make_image(tmp_path / ".hidden" / "h.png")
    make_image(tmp_path / "old" / "o.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "d0" / "0.png")
    os.mkfifo(tmp_path / "pipe.png")
    assert count_files(str(tmp_path), Settings()) == 8
    for settings in (
        {},
        {"all_files": True},
        {"include_hidden": True},
        {"exclude": ("old/",)},
        {"follow_symlinks": True},
    ):
        assert count_files(str(tmp_path), Settings(**settings)) == len(  # type: ignore[arg-type]
            list(scan(tmp_path, **settings))
        ), settings
    stopped = threading.Event()
    stopped.set()
    assert count_files(str(tmp_path), Settings(), stopped) is None


def test_missing_or_non_folder_root_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a folder"):
        scan(tmp_path / "f.jpg")


class TestHashCache:
    def test_a_rescan_of_an_unchanged_tree_reads_no_contents(self, tmp_path: Path) -> None:
        root = tmp_path / "root"
        for i in range(30):
            make_image(root / f"d{i % 3}" / f"{i}.png")
        settle()
        with HashCache(tmp_path / "cache") as cache:
            first = [r.fields() for r in scan(root, cache)]
        with HashCache(tmp_path / "cache") as cache:
            again = scan(root, cache)
            second = [r.fields() for r in again]
        assert second == first
        assert again.stats.bytes_read == 0 and again.stats.cache_hits == 30

    def test_a_file_rewritten_at_the_same_size_and_mtime_is_rehashed(self, tmp_path: Path) -> None:
        root = tmp_path / "root"
        make_image(root / "a.png")
        b = make_image(root / "b.png")
        settle()  # else both are racy and re-hashed anyway
        with HashCache(tmp_path / "cache") as cache:
            list(scan(root, cache))
            before = b.stat()
            new = bytes(255 - byte for byte in b.read_bytes())  # other bytes, same length
            with b.open("r+b") as fh:  # in place: the same inode
                fh.write(new)
            os.utime(b, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a copy tool does
            after = b.stat()
            # only the ctime (which nothing can set back) tells the change
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
                before.st_ino,
                before.st_size,
                before.st_mtime_ns,
            )
            assert after.st_ctime_ns != before.st_ctime_ns
            again = scan(root, cache)
            recs = {os.path.basename(r.path): r.hash for r in again}
        assert recs["b.png"] == xxhash.xxh3_128_hexdigest(new)
        assert again.stats.cache_hits == 1  # a.png, unchanged

    def test_the_key_is_relative_to_root_so_a_moved_tree_stays_cached(self, tmp_path: Path) -> None:
        make_image(tmp_path / "one" / "sub" / "a.png")
        settle()
        with HashCache(tmp_path / "cache") as cache:
            list(scan(tmp_path / "one", cache))
            (tmp_path / "one").rename(tmp_path / "two")
            again = scan(tmp_path / "two", cache)
            assert len(list(again)) == 1 and again.stats.cache_hits == 1
