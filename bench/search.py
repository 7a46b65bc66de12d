"""Benchmarks of `imgbatch search` (issue 22, item 1) over 100,000 stored results (10,000
with --quick): 8x8 PNGs analysed once by the offline analyzer (timed apart), then

- a query against `imgbatch --version` (the interpreter's and the CLI's start-up): wall
  and CPU time (the child's user + system time, from wait4), best of RERUNS each,
  alternating; target: < version + 100 ms CPU and + 200 ms wall;
- an `analyze` run that finds 20 new files (analysed, recorded, and indexed at the run's
  end) against one that finds nothing new, alternating; target <= 1.5x.

The 20 new files of each round go in a folder of their own inside the tree, removed at
the end, so the cached tree stays as bench/images.py made it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.analyze import analyze, analyze_summary
from bench.common import IMGBATCH, Table, check, child_env, ratio, run, scratch, secs
from bench.images import tiny_pngs

SIZE, QUICK = 100_000, 10_000
RERUNS = 5
NEW = 20  # files a run adds
NEW_DIR = "zz-bench-search-new"  # in the tree, removed at the end


@dataclass(frozen=True)
class Timed:
    wall: float
    cpu: float  # user + system seconds of the child
    rc: int


def timed(argv: list[str], env: dict[str, str]) -> Timed:
    """Run `argv` (stdout, stderr to /dev/null): its wall and CPU time. Started straight
    from here: a child's rusage from wait4 counts only its own CPU time."""
    full = {**child_env(), **env}
    with open(os.devnull, "wb") as null:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=null, stderr=null, env=full)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Timed(wall, usage.ru_utime + usage.ru_stime, proc.returncode)


def best(runs: list[Timed]) -> Timed:
    """The fastest wall time and the least CPU time (each its own best)."""
    return Timed(min(r.wall for r in runs), min(r.cpu for r in runs), runs[0].rc)


def add_files(root: Path, round_: int) -> None:
    """NEW distinct 8x8 PNGs in a new folder of the tree."""
    from PIL import Image

    folder = root / NEW_DIR / f"r{round_:02d}"
    folder.mkdir(parents=True)
    rng = random.Random(1000 + round_)
    for i in range(NEW):
        img = Image.frombytes("RGB", (8, 8), rng.randbytes(8 * 8 * 3))
        img.save(folder / f"new{i:02d}.png", "PNG")


def search_and_update(table: Table, quick: bool) -> None:
    n = QUICK if quick else SIZE
    t = tiny_pngs(n)
    table.section(f"search: {t.files:,} stored results (8x8 PNGs, offline analyzer)")
    state = scratch("search-state")
    env = {"IMGBATCH_RESULTS": str(state / "results")}
    shutil.rmtree(t.path / NEW_DIR, ignore_errors=True)
    try:
        first = run(analyze(t.path, state))
        s = analyze_summary(first)
        if s.ok != t.files:
            raise RuntimeError(f"the first run analysed {s.ok} of {t.files}: {first.stderr}")
        table.add("first analyze (builds the results and the index)", secs(first.seconds))
        _queries(table, t.path, state, env)
        _update(table, t.path, state)
    finally:
        shutil.rmtree(t.path / NEW_DIR, ignore_errors=True)


def _queries(table: Table, root: Path, state: Path, env: dict[str, str]) -> None:
    version = [IMGBATCH, "--version"]
    queries = {
        "every file matches (png), top 20 ranked": ["png"],
        "one file matches (its name)": ["0000042"],
        "every file matches, with --color and --after filters": [
            "png",
            "--after",
            "2000-01-01",
            "--color",
            "gray",
        ],
    }
    for label, words in queries.items():
        argv = [IMGBATCH, "search", str(root), *words, "--checkpoint", str(state)]
        if timed(argv, env).rc not in (0, 1):  # the warm-up; a failure is the bench's
            raise RuntimeError(f"{argv} failed")
        got: list[Timed] = []
        base: list[Timed] = []
        for _ in range(RERUNS):
            got.append(timed(argv, env))
            base.append(timed(version, env))
        q, v = best(got), best(base)
        hits = "hits" if q.rc == 0 else "no hit"
        table.add(f"search, {label}", secs(q.wall), f"{hits}; CPU {q.cpu * 1000:.0f} ms")
        table.add("imgbatch --version", secs(v.wall), f"CPU {v.cpu * 1000:.0f} ms")
        extra_wall, extra_cpu = q.wall - v.wall, q.cpu - v.cpu
        ok = extra_wall < 0.2 and extra_cpu < 0.1
        table.add(
            "search over --version",
            f"+{extra_wall * 1000:.0f} ms",
            f"CPU +{extra_cpu * 1000:.0f} ms; target < +200 ms wall, +100 ms CPU: {check(ok)}",
        )


def _update(table: Table, root: Path, state: Path) -> None:
    argv = analyze(root, state)
    run(argv)  # the warm-up: nothing new
    noop: list[float] = []
    added: list[float] = []
    for i in range(RERUNS):
        r = run(argv)
        if analyze_summary(r).ok:
            raise RuntimeError(f"a run with nothing new analysed something:\n{r.stderr}")
        noop.append(r.seconds)
        add_files(root, i)
        r = run(argv)
        if analyze_summary(r).ok != NEW:
            raise RuntimeError(f"a run with {NEW} new files:\n{r.stderr}")
        added.append(r.seconds)
    check_hit = [IMGBATCH, "search", str(root), "new05", "--checkpoint", str(state)]
    found = timed(check_hit, {"IMGBATCH_RESULTS": str(state / "results")})
    if found.rc != 0:
        raise RuntimeError("the files a run added are not found by search")
    a, b = min(noop), min(added)
    table.add("analyze, nothing new", secs(a), f"best of {RERUNS}, alternating")
    table.add(f"analyze, {NEW} new files (indexed at its end)", secs(b), f"best of {RERUNS}")
    table.add(
        f"ratio {NEW} new / nothing new", ratio(b, a), f"target <= 1.5x: {check(b <= 1.5 * a)}"
    )


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {"search_and_update": search_and_update}
