"""Benchmarks of `imgbatch scan`: small, flat and large trees, the hash-cache re-scan, memory."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
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
    child_env,
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


# -- issue 14: the targets table -----------------------------------------------------------

#: the issue's trees: 50,000 files of 1-8 KiB (100 per folder), 25 files of 160 MB
ISSUE_SPECS = {
    "small": TreeSpec("small-50k", 50_000, SMALL, 100),
    "large": TreeSpec("large-25", 25, (160 * 10**6, 160 * 10**6), 0, ext=".tif", seed=6),
}
ISSUE_QUICK = {
    "small": TreeSpec("small-10k", 10_000, SMALL, 100),
    "large": TreeSpec("large-5", 5, (160 * 10**6, 160 * 10**6), 0, ext=".tif", seed=6),
}
#: imgbatch runs here with its bytecode cached, as an installed package does (pip compiles
#: it); these machines set PYTHONDONTWRITEBYTECODE=1, which makes every run of a source
#: checkout compile its modules again (~0.1 s), a cost no user pays
BYTECODE = {"PYTHONDONTWRITEBYTECODE": ""}


def issue_tree(name: str, quick: bool) -> tuple[Tree, str]:
    spec = (ISSUE_QUICK if quick else ISSUE_SPECS)[name]
    t = make_tree(spec)
    age = time.time() - t.path.stat().st_mtime  # let racy files age (see tree())
    if age < 2.1:
        time.sleep(2.1 - age)
    return t, f"{t.files:,} files ({mb(t.bytes)})"


def target_row(table: Table, what: str, now: float, today: str, target: float) -> None:
    """A row of the issue's table: the ratio now, the issue's "today", the target."""
    ok = check(now <= target)
    table.add(what, f"{now:.2f}x", f"today {today} (issue 14); target <= {target:g}x: {ok}")


def evict(t: Tree) -> None:
    """Drop the tree's file contents from the page cache (POSIX_FADV_DONTNEED; folders
    and inodes stay cached), so the next read comes from the disk."""
    for dirpath, _, files in os.walk(t.path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cached_share(t: Tree, sample: int = 200) -> float:
    """Share of a sample of the tree's bytes in the page cache, from `fincore`."""
    files = sorted(str(p) for p in itertools.islice(t.path.rglob("*.*"), sample))
    if not files or not shutil.which("fincore"):
        return float("nan")
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return res / size if size else float("nan")


def targets(table: Table, quick: bool) -> None:
    """Every row of issue 14's scan targets, as ratios against baselines of this run."""
    t, desc = issue_tree("small", quick)
    table.section(f"issue 14 targets, scan: {desc} (100 per folder); bytecode cached")
    xxh = sh("find {} -type f -print0 | xargs -0 xxh128sum", t.path)
    xxh_s = best_of(xxh).seconds
    table.add("baseline: find + xargs -0 xxh128sum", secs(xxh_s), rate(t, xxh_s))
    state = scratch("issue-state")
    argv = imgbatch(t.path, "--checkpoint", str(state))
    first = checked(t, best_of(argv, setup=lambda: scratch("issue-state"), env=BYTECODE))
    table.add("imgbatch scan, fresh state", secs(first.seconds), rate(t, first.seconds))
    target_row(table, "first scan / xxh128sum", first.seconds / xxh_s, "2.2x", 1.2)
    run(argv, env=BYTECODE)  # writes the hash cache (its files are not racy: aged above)
    again = checked(t, best_of(argv, env=BYTECODE))
    hits = summary(again).cache_hits
    note = f"{hits:,} of {t.files:,} from the hash cache"
    table.add("imgbatch scan again, same state folder", secs(again.seconds), note)
    target_row(table, "re-scan (unchanged) / xxh128sum", again.seconds / xxh_s, "1.5x", 0.7)
    for label, procs in (("--hash-procs 1 (no worker processes)", "1"), ("--hash-procs 2", "2")):
        one = checked(t, best_of([*argv, "--hash-procs", procs], env=BYTECODE))
        table.add(f"re-scan, {label}", secs(one.seconds), ratio(one.seconds, xxh_s))

    # cold: contents evicted before every run (folders and inodes stay cached)
    evict(t)
    share = cached_share(t)
    note = f"fincore after eviction: {share:.1%} of a sample cached"
    cold_xxh = best_of(xxh, setup=lambda: evict(t)).seconds
    table.add("cold: find + xargs -0 xxh128sum", secs(cold_xxh), note)
    plain = imgbatch(t.path, "--no-hash-cache")
    cold = checked(t, best_of(plain, setup=lambda: evict(t), env=BYTECODE))
    table.add("cold: imgbatch scan --no-hash-cache", secs(cold.seconds), rate(t, cold.seconds))
    target_row(table, "cold first scan / cold xxh128sum", cold.seconds / cold_xxh, "1.65x", 0.6)

    big, desc = issue_tree("large", quick)
    table.section(f"issue 14 targets, scan: large files, {desc}; bytecode cached")
    xxh = sh("find {} -type f -print0 | xargs -0 xxh128sum", big.path)
    xxh_s = best_of(xxh).seconds
    table.add("baseline: find + xargs -0 xxh128sum", secs(xxh_s), rate(big, xxh_s))
    two = sh("find {} -type f -print0 | xargs -0 -P2 -n1 xxh128sum", big.path)
    two_s = best_of(two).seconds
    table.add("two streams: xargs -P2 xxh128sum", secs(two_s), ratio(two_s, xxh_s))
    plain = imgbatch(big.path, "--no-hash-cache")
    r = checked(big, best_of(plain, env=BYTECODE))
    table.add(
        "imgbatch scan --no-hash-cache (2 hashing threads)", secs(r.seconds), rate(big, r.seconds)
    )
    target_row(table, "first scan of large files / xxh128sum", r.seconds / xxh_s, "1.0x", 0.8)
    one = checked(big, best_of([*plain, "--hash-threads", "1"], env=BYTECODE))
    table.add("--hash-threads 1", secs(one.seconds), ratio(one.seconds, xxh_s))

    many, desc = tree("many", quick)
    few, _ = tree("few", quick)
    table.section(f"issue 14 targets, scan: peak RSS summed over the process tree, {desc}")
    peaks = {}
    for tr, procs in ((few, "1"), (many, "1"), (many, "0")):
        argv = imgbatch(tr.path, "--checkpoint", str(scratch("issue-mem")), "--hash-procs", procs)
        peaks[tr.files, procs] = peak = tree_peak_rss(argv, BYTECODE)
        what = "no worker processes" if procs == "1" else "worker processes (default)"
        table.add(f"{tr.files:,} files, fresh hash cache, {what}", f"{peak:.1f} MB")
    grow = peaks[many.files, "1"] - peaks[few.files, "1"]
    summed = peaks[many.files, "0"]
    ok = check(summed < 80 and grow <= 10)
    note = f"{grow:+.1f} MB from {few.files:,} files; today flat; target flat, < 80 MB: {ok}"
    table.add(f"peak RSS, {many.files:,} files, summed", f"{summed:.1f} MB", note)


def tree_peak_rss(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Peak of the summed RSS (MB) of a command and all its descendants, sampled every
    5 ms from /proc (ru_maxrss only knows the largest single process)."""
    page = os.sysconf("SC_PAGE_SIZE")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**child_env(), **(env or {})},
    )
    peak = 0
    while proc.poll() is None:
        total = 0
        for pid in descendants(proc.pid):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                pass  # it just ended
        peak = max(peak, total)
        time.sleep(0.005)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}")
    return peak / 1e6


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (/proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {
    "small": small,
    "flat": flat,
    "large": large,
    "rescan": rescan,
    "memory": memory,
    "targets": targets,
}
