"""`gs://` roots (issue 24 item 1) through the real CLI and the real gcsfs, against the fake
GCS JSON API of tests/fakegcs.py on 127.0.0.1 (`STORAGE_EMULATOR_HOST`); and the hash
cache's lookup of a bucket listing's page at once (`HashCache.object_hashes`)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("gcsfs")

import xxhash  # noqa: E402
from PIL import Image  # noqa: E402

from imgbatch.hashcache import LOOKUP_BATCH, HashCache  # noqa: E402
from imgbatch.objectstore import ObjectInfo  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.fakegcs import FakeGCS  # noqa: E402


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[FakeGCS]:
    with FakeGCS() as server:
        yield server


@pytest.fixture
def gcs(gcs_server: FakeGCS) -> Iterator[FakeGCS]:
    gcs_server.log.clear()
    gcs_server.max_page = 1000
    gcs_server.after_list = None
    yield gcs_server
    gcs_server.after_list = None


def env(gcs: FakeGCS) -> dict[str, str]:
    # NO_GCE_CHECK: gcsfs and google-auth do not probe the GCE metadata server; with no
    # credentials found (HOME is isolated), gcsfs goes anonymous, as against an emulator
    return {"STORAGE_EMULATOR_HOST": gcs.url, "NO_GCE_CHECK": "true"}


def new_bucket(gcs: FakeGCS, objects: dict[str, bytes]) -> str:
    name = "g-" + uuid.uuid4().hex[:12]
    gcs.bucket(name)
    for key, body in objects.items():
        gcs.put(name, key, body)
    gcs.log.clear()
    return name


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (33, 21), (seed % 256, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


# -- through the CLI ------------------------------------------------------------------


def test_scan_of_a_gs_prefix_pages_through_the_listing(gcs: FakeGCS) -> None:
    objects = {
        "p/a.jpg": jpeg(1),
        "p/b/c.png": png(2),
        "p/b/": b"",  # a folder marker
        "p/notes.txt": b"not an image",
        "p/d/e f.jpg": jpeg(3),  # a space, kept as stored
        "p2/x.jpg": jpeg(4),  # outside the prefix p/
        "q.jpg": jpeg(5),
    }
    bucket = new_bucket(gcs, objects)
    gcs.max_page = 2  # the prefix's 5 objects span 3 pages
    res = run_cli(["scan", f"gs://{bucket}/p"], env=env(gcs))
    assert res.rc == 0, res.stderr
    got = {r["path"]: (r["hash"], r["size"]) for r in res.records}
    want = ["p/a.jpg", "p/b/c.png", "p/d/e f.jpg"]
    assert got == {f"gs://{bucket}/{k}": (xxh(objects[k]), len(objects[k])) for k in want}
    assert [r["path"] for r in res.records] == sorted(got)  # key order
    assert gcs.kinds(bucket).count("list") == 3
    assert sorted(gcs.reads(bucket)) == want  # each image read, nothing else


def test_rescan_reads_no_object_and_an_overwrite_only_that_one(gcs: FakeGCS) -> None:
    bucket = new_bucket(gcs, {"a.jpg": jpeg(1), "b/c.jpg": jpeg(2), "b/d.png": png(3)})
    gcs.max_page = 2  # the re-scan's hash-cache lookups span several listing pages
    first = run_cli(["scan", f"gs://{bucket}"], env=env(gcs))
    assert first.rc == 0 and len(gcs.reads(bucket)) == 3, first.stderr
    gcs.log.clear()
    again = run_cli(["scan", f"gs://{bucket}/"], env=env(gcs))
    assert again.rc == 0, again.stderr
    assert again.records == first.records
    assert gcs.reads(bucket) == [] and set(gcs.kinds(bucket)) == {"list"}
    assert "3 from the hash cache" in again.stderr
    # an overwritten object (new generation, updated, etag) is read again, and only it
    gcs.put(bucket, "b/c.jpg", jpeg(9))
    gcs.log.clear()
    third = run_cli(["scan", f"gs://{bucket}"], env=env(gcs))
    assert third.rc == 0, third.stderr
    assert gcs.reads(bucket) == ["b/c.jpg"]
    assert third.records[1]["hash"] == xxh(jpeg(9))
    assert "2 from the hash cache" in third.stderr


def test_analyze_a_gs_prefix_shares_the_scan_hash_cache(gcs: FakeGCS) -> None:
    bucket = new_bucket(gcs, {"p/a.jpg": jpeg(1), "p/x/b.png": png(2), "other/c.jpg": jpeg(3)})
    anon = ["--storage-option", "token=anon"]  # as emulators are used: no credentials
    assert run_cli(["scan", f"gs://{bucket}/p/", *anon], env=env(gcs)).rc == 0
    gcs.log.clear()
    # (with token=anon, gcsfs's default class asked the Storage Control gRPC API, which an
    # emulator does not serve, for the bucket's layout at each open: ~60 s each)
    res = run_cli(["analyze", f"gs://{bucket}/p/", "--provider", "local", *anon], env=env(gcs))
    assert res.rc == 0, res.stderr
    widths = {r["path"]: r["result"]["width"] for r in res.records if r["status"] == "ok"}
    assert widths == {f"gs://{bucket}/p/a.jpg": 40, f"gs://{bucket}/p/x/b.png": 33}
    # each object's bytes downloaded to be analysed only (the hashes came from the cache)
    media = [n for _, kind, b, n in gcs.log if b == bucket and kind == "media"]
    assert sorted(set(media)) == ["p/a.jpg", "p/x/b.png"]
    assert [e for e in gcs.log if e[1] == "garbled"] == []  # JSON API requests only
    gcs.log.clear()
    again = run_cli(["analyze", f"gs://{bucket}/p/", "--provider", "local"], env=env(gcs))
    assert again.rc == 0 and again.records == [], again.stderr
    assert gcs.reads(bucket) == []


def test_an_object_overwritten_after_listing_is_an_io_error_not_a_wrong_hash(
    gcs: FakeGCS,
) -> None:
    bucket = new_bucket(gcs, {"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    gcs.after_list = lambda name: gcs.put(name, "a.jpg", jpeg(7, (60, 50)))
    res = run_cli(["scan", f"gs://{bucket}"], env=env(gcs))
    assert res.rc == 1, res.stderr
    a, b = res.records
    # the listed generation is read, or nothing: never the new bytes under the old listing
    assert a["path"] == f"gs://{bucket}/a.jpg" and a["error"]["code"] == "IO_ERROR"
    assert "gone since listed" in a["error"]["message"]
    assert b["hash"] == xxh(jpeg(2))


def test_missing_gs_bucket_is_fatal_in_one_line(gcs: FakeGCS) -> None:
    res = run_cli(["scan", "gs://no-such-bucket-here/p/"], env=env(gcs))
    assert res.rc == 5, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "bucket not found: gs://no-such-bucket-here" in lines[0] and gcs.url in lines[0]
    res = run_cli(["analyze", "gs://no-such-bucket-here/", "--provider", "local"], env=env(gcs))
    assert res.rc == 5, res.stderr
    # analyze too: nothing was seen, so no run summary, the error alone
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("imgbatch: error: bucket not found: gs://no-such-bucket-here at ")


# -- the hash cache's page lookup ---------------------------------------------------


def _info(i: int, etag: str = "e") -> ObjectInfo:
    key = f"k/{i:05d}.jpg"
    return ObjectInfo(f"s3://b/{key}", key, 100 + i, 1_000_000_000 * i, etag)


def test_object_hashes_looks_a_page_up_as_object_hash_does(tmp_path: Path) -> None:
    n = 2 * LOOKUP_BATCH + 7  # several queries
    infos = [_info(i) for i in range(n)]
    with HashCache(tmp_path / "c") as cache:
        for info in infos:  # two objects in three known
            if info.size % 3 == 0:
                continue
            cache.put_object(info.key, info.size, info.mtime_ns, info.etag, f"h{info.size}")
        cache.put_object("k/late.jpg", 1, 2, "x", "pending")  # not flushed yet: still seen
        assert cache.object_hashes([ObjectInfo("", "k/late.jpg", 1, 2, "x")]) == ["pending"]
    with HashCache(tmp_path / "c") as cache:
        page = [*infos, infos[0]]  # a key twice
        # known objects listed with another ETag, size, LastModified: misses
        page += [_info(1, etag="other"), ObjectInfo("", infos[3].key, 1, infos[3].mtime_ns, "e")]
        page += [ObjectInfo("", infos[4].key, infos[4].size, 7, "e")]
        got = cache.object_hashes(page)
        want = [cache.object_hash(o.key, o.size, o.mtime_ns, o.etag) for o in page]
        assert got == want
        assert got[: n + 1] == [f"h{o.size}" if o.size % 3 else None for o in page[: n + 1]]
        assert got[n + 1 :] == [None, None, None]
        assert cache.object_hashes([]) == []
