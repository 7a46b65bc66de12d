"""Benchmark of `imgbatch scan s3://...` (issue 24 item 1) against moto's S3 server on
127.0.0.1: the first scan (every object read once, `--hash-threads` at a time) against a
plain s3fs loop (list, then `cat` and hash each object in turn), and the re-scan (list
requests only, from the hash cache), and the re-scan of many objects (`rescan`: 5,000
unchanged objects) against s3fs's plain listing of the same prefix. moto is no real S3
(its latency is a local server's), so the ratios say what imgbatch adds or saves over
s3fs, not S3's speed."""

from __future__ import annotations

import random
import shutil
import sys
from collections.abc import Callable

from bench.common import IMGBATCH, Table, best_of, log, ratio, run, scratch, secs, summary

SIZES = (20_000, 400_000)  # bytes per object, inclusive
OBJECTS = 400  # --quick: QUICK
QUICK = 60
RUNS = 3  # timed runs after a warm-up; --quick: 1
THREADS = 8  # imgbatch's --hash-threads for the first scan

#: the baseline: what a user writes with s3fs alone (list, then read and hash in turn)
_NAIVE = """
import sys, s3fs, xxhash
fs = s3fs.S3FileSystem()
for path in sorted(fs.find(sys.argv[1])):
    if path.endswith(".jpg"):
        print(path, xxhash.xxh3_128(fs.cat(path)).hexdigest())
"""


def _server() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _fill(url: str, objects: int) -> int:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="bench")
    rng = random.Random(20261207)
    total = 0
    for i in range(objects):
        body = rng.randbytes(rng.randint(*SIZES))
        total += len(body)
        client.put_object(Bucket="bench", Key=f"d{i // 100:03d}/{i:05d}.jpg", Body=body)
    return total


def scan(table: Table, quick: bool) -> None:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        table.section("scan of an S3 bucket (moto)")
        table.add("skipped", "n/a", "needs the s3 extra and moto[server] (the dev extra)")
        return
    objects, runs = (QUICK, 1) if quick else (OBJECTS, RUNS)
    server, url = _server()
    try:
        log(f"data: {objects:,} objects in moto's S3 server...")
        total = _fill(url, objects)
        env = {  # added to child_env()
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        state = scratch("s3-state")
        fresh = lambda: shutil.rmtree(state, ignore_errors=True)  # noqa: E731
        argv = [IMGBATCH, "scan", "s3://bench/", "--checkpoint", str(state)]
        table.section(f"scan of an S3 bucket (moto): {objects:,} objects, {total / 1e6:,.1f} MB")
        naive = best_of([sys.executable, "-c", _NAIVE, "bench"], runs, env=env)
        table.add("baseline: s3fs find, then cat + xxh3 in turn", secs(naive.seconds))
        one = best_of([*argv, "--hash-threads", "1"], runs, fresh, env=env)
        table.add("imgbatch scan, --hash-threads 1, fresh state", secs(one.seconds))
        first = best_of([*argv, "--hash-threads", str(THREADS)], runs, fresh, env=env)
        hits = summary(first).cache_hits
        table.add(f"imgbatch scan, --hash-threads {THREADS}, fresh state", secs(first.seconds))
        table.add("ratio s3fs loop / imgbatch (1 thread)", ratio(naive.seconds, one.seconds))
        table.add(
            f"ratio s3fs loop / imgbatch ({THREADS} threads)",
            ratio(naive.seconds, first.seconds),
            "> 1: imgbatch faster",
        )
        again = best_of(argv, runs, env=env)
        note = f"{summary(again).cache_hits:,} from the hash cache (first: {hits})"
        table.add("imgbatch re-scan, same state (list requests only)", secs(again.seconds), note)
        table.add("ratio re-scan / first scan", ratio(again.seconds, first.seconds))
    finally:
        server.stop()  # type: ignore[attr-defined]


MANY = 5_000  # objects of the re-scan figure; --quick: MANY_QUICK
MANY_QUICK = 1_000

#: the re-scan's yardstick: the plain listing of the same prefix with s3fs
_LIST = """
import sys, s3fs
fs = s3fs.S3FileSystem()
print(len(fs.find(sys.argv[1])))
"""


def _fill_many(url: str, bucket: str, objects: int) -> None:
    """`objects` tiny objects (a re-scan reads none: their size does not matter)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)

    def put(i: int) -> None:
        key = f"d{i // 100:04d}/{i:06d}.jpg"
        client.put_object(Bucket=bucket, Key=key, Body=b"%d" % i)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(objects)))


def rescan(table: Table, quick: bool) -> None:
    """The re-scan of many unchanged objects (hash cache lookups, list requests only)
    against the plain s3fs listing of the same prefix, in the same run."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        table.section("re-scan of an S3 bucket (moto)")
        table.add("skipped", "n/a", "needs the s3 extra and moto[server] (the dev extra)")
        return
    objects, runs = (MANY_QUICK, 1) if quick else (MANY, RUNS)
    server, url = _server()
    try:
        log(f"data: {objects:,} tiny objects in moto's S3 server...")
        _fill_many(url, "many", objects)
        env = {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        state = scratch("s3-many-state")
        argv = [IMGBATCH, "scan", "s3://many/", "--checkpoint", str(state)]
        table.section(f"re-scan of an S3 bucket (moto): {objects:,} unchanged objects")
        listing = best_of([sys.executable, "-c", _LIST, "many/"], runs, env=env)
        table.add("baseline: s3fs find of the prefix (listing only)", secs(listing.seconds))
        first = run(argv, env=env)  # fills the hash cache: every object read once
        again = best_of(argv, runs, env=env)
        hits = f"{summary(again).cache_hits:,} from the hash cache"
        note = f"{hits} (first: {summary(first).cache_hits})"
        table.add("imgbatch re-scan, same state", secs(again.seconds), note)
        table.add(
            "ratio re-scan / s3fs listing",
            ratio(again.seconds, listing.seconds),
            "what the hash cache adds to the listing",
        )
    finally:
        server.stop()  # type: ignore[attr-defined]


LOOKUPS = 50_000  # objects of the hash-cache lookup figure; --quick: LOOKUPS_QUICK
LOOKUPS_QUICK = 5_000


def lookups(table: Table, quick: bool) -> None:
    """The hash-cache lookups of a bucket re-scan alone, in this process (no server): one
    query per object (`object_hash`) against one per listing page (`object_hashes`)."""
    import time

    from imgbatch.hashcache import HashCache
    from imgbatch.objectstore import ObjectInfo

    n = LOOKUPS_QUICK if quick else LOOKUPS
    infos = [
        ObjectInfo(f"s3://b/d{i // 100:04d}/{i:06d}.jpg", f"d{i // 100:04d}/{i:06d}.jpg", i, i, "e")
        for i in range(n)
    ]
    folder = scratch("s3-lookups")
    with HashCache(folder) as cache:
        for info in infos:
            cache.put_object(info.key, info.size, info.mtime_ns, info.etag, "0" * 32)
    table.section(f"hash-cache lookups of a bucket re-scan: {n:,} objects, pages of 1,000")
    timings = {}
    for how in ("one", "page", "one", "page"):  # interleaved: the load changes meanwhile
        with HashCache(folder) as cache:
            start = time.perf_counter()
            if how == "one":
                hits = [cache.object_hash(i.key, i.size, i.mtime_ns, i.etag) for i in infos]
            else:
                hits = [
                    h
                    for at in range(0, n, 1000)
                    for h in cache.object_hashes(infos[at : at + 1000])
                ]
            took = time.perf_counter() - start
        assert all(hits)
        timings[how] = min(took, timings.get(how, took))
    one, page = timings["one"], timings["page"]
    table.add("one query per object (object_hash)", secs(one), f"{one / n * 1e6:.0f} us an object")
    table.add(
        "one query per page (object_hashes)", secs(page), f"{page / n * 1e6:.0f} us an object"
    )
    table.add("ratio per object / per page", ratio(one, page), "> 1: pages faster")
    shutil.rmtree(folder, ignore_errors=True)


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {
    "scan": scan,
    "rescan": rescan,
    "lookups": lookups,
}
