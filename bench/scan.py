"""Benchmarks of `imgbatch scan`: small, flat and large trees, the hash-cache re-scan, memory."""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    IMGBATCH,
    MiB,
    Run,
    Table,
    Tree,
    TreeSpec,
    best_of,
    check,
    make_tree,
    mb,
    ratio,
    run,
    scratch,
    secs,
    sh,
    summary,
)

Setup = Callable[[], object] | None  # called, untimed, before each run
NAIVE = Path(__file__).with_name("naive_sha256.py")
SMALL = (1024, 8 * 1024)
LARGE = (4 * MiB, 40 * MiB)
TINY = (1, 64)
SPECS = {  # full runs; --quick uses QUICK
    "small": TreeSpec("small-100k", 100_000, SMALL, 100),
    "flat": TreeSpec("flat-100k", 100_000, SMALL, 0, seed=2),
    "large": TreeSpec("large-190", 190, LARGE, 20, ext=".png", seed=3),  # ~4.1 GiB
    "few": TreeSpec("tiny-10k", 10_000, TINY, 100, seed=4),
    "many": TreeSpec("tiny-200k", 200_000, TINY, 100, seed=5),
}
QUICK = {
    "small": TreeSpec("small-10k", 10_000, SMALL, 100),
    "flat": TreeSpec("flat-10k", 10_000, SMALL, 0, seed=2),
    "large": TreeSpec("large-20", 20, LARGE, 20, ext=".png", seed=3),
    "few": TreeSpec("tiny-2k", 2_000, TINY, 100, seed=4),
    "many": TreeSpec("tiny-20k", 20_000, TINY, 100, seed=5),
}


def tree(name: str, quick: bool) -> tuple[Tree, str]:
    """The tree `name` (generated if needed) and a description of it."""
    spec = (QUICK if quick else SPECS)[name]
    t = make_tree(spec)
    # files written under 2 s ago are "racy" and never cached (scanner.RACY_NS): let a
    # tree made just now age, or the re-scan figures would measure re-reading it
    age = time.time() - t.path.stat().st_mtime
    if age < 2.1:
        time.sleep(2.1 - age)
    lo, hi = spec.sizes
    unit, div = ("MiB", MiB) if lo >= MiB else ("KiB", 1024) if lo >= 1024 else ("B", 1)
    layout = f"{spec.per_dir} per folder" if spec.per_dir else "all in one folder"
    return t, f"{t.files:,} files of {lo // div}-{hi // div} {unit}, {layout} ({mb(t.bytes)})"


def imgbatch(root: Path, *opts: str) -> list[str]:
    return [IMGBATCH, "scan", str(root), *opts]


def checked(t: Tree, r: Run) -> Run:
    """`r`, an imgbatch scan of `t`, once its summary line shows that it saw every file."""
    if (n := summary(r).files) != t.files:
        raise RuntimeError(f"imgbatch scanned {n:,} files of {t.files:,} in {t.path}")
    return r


def scan(t: Tree, argv: list[str], runs: int = 3, setup: Setup = None) -> Run:
    """best_of() an imgbatch scan of `t`, checked."""
    return checked(t, best_of(argv, runs, setup))


def rate(t: Tree, seconds: float) -> str:
    return f"{t.files / seconds:,.0f} files/s, {t.bytes / seconds / 1e6:,.0f} MB/s"


def timed(table: Table, t: Tree, label: str, argv: list[str], setup: Setup = None) -> float:
    """Best-of-3 seconds of `argv` over `t` (an imgbatch scan is checked), added as a row."""
    r = scan(t, argv, setup=setup) if argv[0] == IMGBATCH else best_of(argv, setup=setup)
    table.add(label, secs(r.seconds), rate(t, r.seconds))
    return r.seconds


def compare(table: Table, t: Tree, threads: bool = False) -> None:
    """imgbatch (without and with a fresh hash cache) against xxh128sum and naive sha256."""
    state = scratch("state")
    plain = imgbatch(t.path, "--no-hash-cache")
    imgb = timed(table, t, "imgbatch scan --no-hash-cache", plain)
    fresh = imgbatch(t.path, "--checkpoint", str(state))
    cached = timed(table, t, "imgbatch scan, fresh hash cache", fresh, lambda: scratch("state"))
    if threads:
        label = "imgbatch scan --no-hash-cache --hash-threads 1"
        one = timed(table, t, label, [*plain, "--hash-threads", "1"])
    xxh = sh("find {} -type f -print0 | xargs -0 xxh128sum", t.path)
    xxh_s = timed(table, t, "find + xargs -0 xxh128sum", xxh)
    naive = [sys.executable, str(NAIVE), str(t.path)]
    naive_s = timed(table, t, "naive os.walk + sha256 (naive_sha256.py)", naive)
    table.add("ratio imgbatch / xxh128sum", ratio(imgb, xxh_s), "< 1: imgbatch faster")
    table.add("ratio naive / imgbatch", ratio(naive_s, imgb), "> 1: imgbatch faster")
    table.add("ratio fresh hash cache / --no-hash-cache", ratio(cached, imgb), "cost of the cache")
    if threads:
        table.add("ratio --hash-threads 1 / 2", ratio(one, imgb), "> 1: 2 threads faster")


def small(table: Table, quick: bool) -> None:
    t, desc = tree("small", quick)
    table.section(f"1a. small files: {desc}")
    empty = Tree(scratch("empty"), 0, 0)
    start = scan(empty, imgbatch(empty.path, "--no-hash-cache"))
    table.add("start-up: imgbatch scan of an empty folder", secs(start.seconds))
    compare(table, t)


def flat(table: Table, quick: bool) -> None:
    t, desc = tree("flat", quick)
    table.section(f"1b. small files, flat: {desc}")
    compare(table, t)


def large(table: Table, quick: bool) -> None:
    t, desc = tree("large", quick)
    table.section(f"2. large files: {desc}")
    compare(table, t, threads=True)


# Bytes actually read, cross-checked with strace: -ff writes one file per thread (no
# interleaved lines), -y shows each fd's path, so the return values of all read-family
# calls are summed by where they read from. `strace -c` only counts calls, and
# /proc/<pid>/io rchar cannot tell image bytes from the interpreter's own reads.
_READ = re.compile(r"^\w+\(\d+<(.*?)>,.*\)\s+=\s+(\d+)$", re.M)


def strace_reads(t: Tree, state: Path) -> dict[str, int]:
    """Bytes read by a scan of `t` with `state` from the tree, the state folder, elsewhere."""
    out = scratch("strace")
    calls = "trace=read,readv,pread64,preadv,preadv2"
    strace = ["strace", "-ff", "-y", "--seccomp-bpf", "-s0", "-e", calls, "-o", f"{out}/t"]
    checked(t, run([*strace, *imgbatch(t.path, "--checkpoint", str(state))]))
    totals = {"tree": 0, "state": 0, "other": 0}
    for f in out.iterdir():
        for path, n in _READ.findall(f.read_text(errors="replace")):
            where = "tree" if path.startswith(f"{t.path}/") else "other"
            totals["state" if path.startswith(f"{state}/") else where] += int(n)
    shutil.rmtree(out)
    return totals


def rescan(table: Table, quick: bool) -> None:
    t, desc = tree("small", quick)
    table.section(f"3. re-scan with a warm hash cache: {desc}")
    state = scratch("rescan-state")
    argv = imgbatch(t.path, "--checkpoint", str(state))
    run(imgbatch(t.path, "--no-hash-cache"))  # warms the page cache, writes no hash cache
    first = checked(t, run(argv))
    table.add("first scan (writes the hash cache)", secs(first.seconds), rate(t, first.seconds))
    again = scan(t, argv)
    s = summary(again)
    hits = f"{s.cache_hits:,} of {t.files:,} files from the hash cache"
    table.add("re-scan, same state folder", secs(again.seconds), hits)
    table.add("ratio re-scan / first scan", ratio(again.seconds, first.seconds))
    pct = 100 * s.bytes_read / t.bytes
    note = f"{mb(s.bytes_read)} of {mb(t.bytes)}; target < 3%: {check(pct < 3)}"
    table.add("bytes read on re-scan (summary line)", f"{pct:.2f}%", note)
    if not shutil.which("strace"):
        table.add("bytes read (strace)", "n/a", "strace is not installed")
        return
    for label, folder in (("re-scan", state), ("first scan", scratch("rescan-fresh"))):
        r = strace_reads(t, folder)
        note = f"{mb(r['tree'])} from the tree; {mb(r['state'])} from the hash cache, "
        note += f"{mb(r['other'])} elsewhere (Python, libraries)"
        table.add(f"bytes read on {label} (strace)", f"{100 * r['tree'] / t.bytes:.2f}%", note)


def memory(table: Table, quick: bool) -> None:
    (few, _), (many, _) = tree("few", quick), tree("many", quick)
    empty = Tree(scratch("empty"), 0, 0)
    table.section("4. memory: peak RSS of imgbatch scan (ru_maxrss from os.wait4); files of 1-64 B")
    state = scratch("mem-state")
    peaks: dict[int, tuple[float, float]] = {}  # files: MB with a fresh hash cache, without
    for t in (empty, few, many):
        argv = imgbatch(t.path, "--checkpoint", str(state))
        cached = scan(t, argv, 1, lambda: scratch("mem-state")).maxrss_mb
        plain = scan(t, imgbatch(t.path, "--no-hash-cache"), 1).maxrss_mb
        peaks[t.files] = cached, plain
        note = f"--no-hash-cache: {plain:.1f} MB"
        if t is many:
            note += f"; target < 80 MB: {check(cached < 80)}"
        label = f"{t.files:,} files" if t.files else "empty folder"
        table.add(f"peak RSS, {label}, fresh hash cache", f"{cached:.1f} MB", note)
    (c1, p1), (c2, p2) = peaks[few.files], peaks[many.files]
    note = f"--no-hash-cache: {p2 - p1:+.1f} MB; target <= 10 MB: {check(c2 - c1 <= 10)}"
    table.add(f"difference {many.files:,} - {few.files:,} files", f"{c2 - c1:+.1f} MB", note)


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {
    "small": small,
    "flat": flat,
    "large": large,
    "rescan": rescan,
    "memory": memory,
}
