"""Benchmarks of `imgbatch analyze --provider local`: 12-megapixel photos against a naive
Pillow loop, and the re-run of a finished run against a re-scan."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import IMGBATCH, Run, Table, best_of, check, mb, ratio, run, scratch, secs
from bench.images import ImageTree, photos, tiny_pngs

NAIVE = Path(__file__).with_name("naive_pillow.py")
SIZES = {"photos": 40, "tiny": 20_000}  # full runs; --quick uses QUICK
QUICK = {"photos": 10, "tiny": 2_000}
RERUNS = 7  # timed re-runs and re-scans, alternating

_SUMMARY = re.compile(
    r"(\w+): ([\d,]+) ok, ([\d,]+) failed, ([\d,]+) from stored results, "
    r"([\d,]+) unchanged \(of ([\d,]+) files\) in ([\d.]+)s"
)


@dataclass(frozen=True)
class AnalyzeSummary:
    state: str  # completed, partial...
    ok: int
    failed: int
    stored: int  # from stored results
    unchanged: int
    files: int
    seconds: float  # the run's own elapsed time (after start-up)


def analyze_summary(r: Run) -> AnalyzeSummary:
    """The figures of `imgbatch analyze`'s summary line on stderr."""
    m = _SUMMARY.search(r.stderr)
    if not m:
        raise RuntimeError(f"no summary line in imgbatch's stderr:\n{r.stderr[-2000:]}")
    state, *counts, seconds = m.groups()
    ok, failed, stored, unchanged, files = (int(c.replace(",", "")) for c in counts)
    return AnalyzeSummary(state, ok, failed, stored, unchanged, files, float(seconds))


def analyze(root: Path, state: Path, *opts: str) -> list[str]:
    # the results store is shared by every ROOT: keep it in the state folder, so that a
    # fresh state is a fresh run, not one answered from the last run's results
    return [
        "env",
        f"IMGBATCH_RESULTS={state / 'results'}",
        IMGBATCH,
        "analyze",
        str(root),
        "--provider",
        "local",
        "--checkpoint",
        str(state),
        *opts,
    ]


def per_sec(n: int, seconds: float) -> str:
    return f"{n / seconds:,.1f} images/s"


def photos_vs_naive(table: Table, quick: bool) -> None:
    n = (QUICK if quick else SIZES)["photos"]
    t = photos(n)
    table.section(
        f"analyze 1. --provider local on 12-megapixel JPEGs: {t.files} files of 4000x3000, "
        f"quality 90 ({mb(t.bytes)})"
    )
    naive = best_of([sys.executable, str(NAIVE), str(t.path)])
    if f"naive_pillow: {t.files} images" not in naive.stderr:
        raise RuntimeError(f"naive_pillow.py did not read {t.files} images:\n{naive.stderr}")
    note = f"{per_sec(t.files, naive.seconds)}; full decode + resize to 768, one file at a time"
    table.add("naive Pillow loop (naive_pillow.py)", secs(naive.seconds), note)
    empty = scratch("analyze-empty")
    start = best_of(analyze(empty, scratch("analyze-empty-state")), 2).seconds
    table.add("start-up: imgbatch analyze of an empty folder", secs(start))
    results: dict[int, Run] = {}
    for workers in (1, 2, 4):
        state = scratch("analyze-photos")

        def fresh(state: Path = state) -> None:
            scratch(state.name)

        r = best_of(analyze(t.path, state, "--workers", str(workers)), setup=fresh)
        s = analyze_summary(r)
        if s.ok != t.files:
            raise RuntimeError(f"imgbatch analyzed {s.ok} of {t.files} photos: {r.stderr[-2000:]}")
        results[workers] = r
        note = f"{per_sec(t.files, r.seconds)}, peak RSS {r.maxrss_mb:.0f} MB; "
        note += f"{per_sec(t.files, s.seconds)} after start-up"
        table.add(f"imgbatch analyze --workers {workers}, fresh state", secs(r.seconds), note)
    for workers, r in results.items():
        target = (
            f"target >= 2.5x: {check(naive.seconds / r.seconds >= 2.5)}" if workers == 2 else ""
        )
        label = f"ratio images/s --workers {workers} / naive"
        table.add(label, ratio(naive.seconds, r.seconds), target)
    table.add(
        "ratio images/s --workers 2 / --workers 1", ratio(results[1].seconds, results[2].seconds)
    )


def rerun(table: Table, quick: bool) -> None:
    n = (QUICK if quick else SIZES)["tiny"]
    t: ImageTree = tiny_pngs(n)
    table.section(f"analyze 2. re-run of a finished run: {t.files:,} 8x8 PNGs, 100 per folder")
    state = scratch("analyze-rerun")
    out = scratch("analyze-out") / "stdout.jsonl"
    argv = analyze(t.path, state)
    first = run(argv, stdout=out)
    s = analyze_summary(first)
    lines = count_lines(out)
    if s.ok != t.files or lines != t.files:
        raise RuntimeError(f"first run: {s.ok} ok, {lines} lines for {t.files} files")
    note = f"{per_sec(t.files, first.seconds)}; {lines:,} lines printed"
    table.add("first run, fresh state (timed apart)", secs(first.seconds), note)
    rate = t.files / first.seconds
    note = f"today 286/s (issue 14, 20,000 files); target >= 1,500/s: {check(rate >= 1500)}"
    table.add("issue 14 target: first run, images/s", f"{rate:,.0f}/s", note)
    # the same first run with the offline analyzer kept in threads ([analyze] procs = 1)
    state1 = scratch("analyze-threads")
    threads = run(["env", "IMGBATCH_ANALYZE_PROCS=1", *analyze(t.path, state1)], stdout=out)
    if analyze_summary(threads).ok != t.files:
        raise RuntimeError(f"first run in threads: {threads.stderr[-2000:]}")
    note = f"{per_sec(t.files, threads.seconds)}; worker processes / threads: "
    table.add(
        "first run, threads only (procs = 1)",
        secs(threads.seconds),
        note + ratio(first.seconds, threads.seconds),
    )
    # both are short (~0.5 s) and the load of a shared machine drifts: alternate them
    rescan_argv = [IMGBATCH, "scan", str(t.path), "--checkpoint", str(state)]
    again, rescan = interleaved(argv, rescan_argv, RERUNS, out)
    s, lines = analyze_summary(again), count_lines(out)
    note = f"{s.ok} ok, {s.stored} stored, {s.unchanged:,} unchanged; {lines} lines printed"
    table.add("re-run, same state folder", secs(again.seconds), f"{note}; best of {RERUNS}")
    if f"{t.files:,} from the hash cache" not in rescan.stderr:
        raise RuntimeError(f"the re-scan missed the hash cache:\n{rescan.stderr[-2000:]}")
    note = f"warm hash cache; best of {RERUNS}, alternating with the re-run"
    table.add("re-scan: imgbatch scan --checkpoint SAMEDIR", secs(rescan.seconds), note)
    ok = again.seconds / rescan.seconds <= 1.2
    table.add(
        "ratio re-run / re-scan",
        ratio(again.seconds, rescan.seconds),
        f"target <= 1.2x: {check(ok)}",
    )
    table.add("ratio re-run / first run", ratio(again.seconds, first.seconds))
    table.add(
        "lines printed by the re-run", f"{lines}", f"target 0 (no analysis): {check(lines == 0)}"
    )


def interleaved(a: list[str], b: list[str], runs: int, a_out: Path) -> tuple[Run, Run]:
    """The fastest of `runs` runs of `a` (stdout to `a_out`) and of `b`, alternating,
    after one warm-up run of each."""
    timed: tuple[list[Run], list[Run]] = ([], [])
    for i in range(runs + 1):
        ra, rb = run(a, stdout=a_out), run(b)
        if i:  # the first pair is the warm-up
            timed[0].append(ra)
            timed[1].append(rb)
    return min(timed[0], key=lambda r: r.seconds), min(timed[1], key=lambda r: r.seconds)


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {
    "photos": photos_vs_naive,
    "rerun": rerun,
}
