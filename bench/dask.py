"""Benchmark of `imgbatch analyze --executor dask` (issue 11): the offline analyzer over
12-megapixel JPEGs on a LocalCluster of 2 worker processes against 1 and 2 local threads,
whole-run and at steady state, and what travels between the driver and a worker per item."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.analyze import analyze, analyze_summary, per_sec
from bench.common import Run, Table, check, child_env, log, ratio, scratch, secs
from bench.images import ImageTree, photos

SIZES = {"photos": 120}  # full runs; --quick uses QUICK
QUICK = {"photos": 20}
ROUNDS = 3  # timed rounds, after one warm-up round; --quick: 1
RUNS = (("local", 1), ("local", 2), ("dask", 2))  # (executor, workers); the first is the base
TARGET = 1.2  # steady state of dask on 2 processes / one local thread, at least
# Reads of stdout less than this apart are one write by imgbatch (a write larger than
# the pipe's buffer arrives in several reads); distinct writes follow finished items, and
# items finish tens of milliseconds apart here.
SAME_WRITE = 0.01
WINDOW = 32  # bytes: a window of the file found in what travels would be file bytes


@dataclass(frozen=True)
class Timed:
    """One run of `imgbatch analyze`, timed from the outside."""

    seconds: float  # the whole run: from its start to its exit
    first_line: float  # seconds from its start to its first output line
    steady: float | None  # images/s at steady state; None: too few writes to tell
    results: dict[str, Any]  # path -> the output line's result


def timed_run(argv: list[str], env: dict[str, str], workers: int) -> Timed:
    """Run `argv`, reading its stdout as it arrives, and time it."""
    writes: list[tuple[float, int]] = []  # (seconds since the start, lines so far)
    results: dict[str, Any] = {}
    lines, rest = 0, b""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, env={**child_env(), **env}
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            now = time.perf_counter() - start
            *complete, rest = (rest + chunk).split(b"\n")
            for line in complete:
                out = json.loads(line)
                if out.get("status") == "ok":
                    results[out["path"]] = out["result"]
            if not complete:
                continue
            lines += len(complete)
            if writes and now - writes[-1][0] < SAME_WRITE:
                writes[-1] = (now, lines)
            else:
                writes.append((now, lines))
        proc.stdout.close()
        code = proc.wait()
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {code}:\n{stderr[-2000:]}")
    if rest:
        raise RuntimeError(f"{shlex.join(argv)}: its output ends in a partial line")
    s = analyze_summary(Run(seconds, 0, stderr))
    if s.ok != lines or len(results) != lines:
        raise RuntimeError(f"{s.ok} ok, {len(results)} ok lines of {lines}:\n{stderr}")
    first = writes[0][0] if writes else seconds
    return Timed(seconds, first, steady_rate(writes, workers), results)


def steady_rate(writes: list[tuple[float, int]], workers: int) -> float | None:
    """Items per second once every worker has finished an item, up to the last write
    but one.

    Steady state is measured inside each run, from the output lines as they arrive,
    rather than as the difference of two runs of n and 2n files: that costs no extra
    runs, and the difference of two timings on a shared machine is as noisy as both
    together. imgbatch writes lines right after items finish (one by one, or in commit
    groups), so the lines that arrive between two writes over the time between them is
    an item rate. The window starts once `workers` lines are out, which leaves out all
    start-up: the interpreter, imports, the cluster's start, and each worker's first
    item (its own imports). It ends at the last write but one: the last may wait for
    the engine's shut-down (for Dask: the cluster closing)."""
    begin = next((i for i, (_, n) in enumerate(writes) if n >= workers), None)
    end = len(writes) - 2
    if begin is None or end <= begin:
        return None
    (t0, n0), (t1, n1) = writes[begin], writes[end]
    return (n1 - n0) / (t1 - t0)


def scaleout(table: Table, quick: bool) -> None:
    n = (QUICK if quick else SIZES)["photos"]
    t = photos(n)
    rounds = 1 if quick else ROUNDS
    table.section(
        f"dask 1. --provider local on {t.files} 12-megapixel JPEGs: --executor dask on 2 "
        f"processes against local threads (fresh state each run; best of {rounds}, "
        "after a warm-up round)"
    )
    load = os.getloadavg()[0]
    timed: dict[tuple[str, int], list[Timed]] = {r: [] for r in RUNS}
    for i in range(rounds + 1):  # alternating: the load of a shared machine drifts
        for executor, workers in RUNS:
            state, results = scratch("dask-state"), scratch("dask-results")
            argv = analyze(t.path, state, "--executor", executor, "--workers", str(workers))
            r = timed_run(argv, {"IMGBATCH_RESULTS": str(results)}, workers)
            if len(r.results) != t.files:
                raise RuntimeError(f"{executor} --workers {workers}: {len(r.results)} ok lines")
            rate = f"{r.steady:.1f} images/s" if r.steady else "n/a"
            log(f"   round {i}: {executor} {workers}: {r.seconds:.2f} s, steady state {rate}")
            if i:  # round 0 is the warm-up
                timed[executor, workers].append(r)
    whole = {k: min(r.seconds for r in v) for k, v in timed.items()}
    rates = [r.steady for v in timed.values() for r in v]
    steady = (
        {k: max(r.steady for r in v if r.steady is not None) for k, v in timed.items()}
        if all(rates)
        else None
    )

    for (executor, workers), runs in timed.items():
        what = f"--executor {executor} --workers {workers}"
        if executor == "local":
            what += f" ({workers} thread{'s' if workers > 1 else ''})"
        else:
            what += " (LocalCluster, 2 processes)"
        first = min(r.first_line for r in runs)
        note = f"{per_sec(t.files, whole[executor, workers])} whole run; "
        if steady is not None:
            note += f"{steady[executor, workers]:,.1f} images/s at steady state; "
        note += f"first line after {first:.2f} s"
        table.add(what, secs(whole[executor, workers]), note)
    base = RUNS[0]
    for key in RUNS[1:]:
        name = f"{key[0]} {key[1]}"
        table.add(f"ratio images/s {name} / local 1, whole run", ratio(whole[base], whole[key]))
        if steady is None:
            table.add(f"ratio images/s {name} / local 1, steady state", "n/a", "too few writes")
            continue
        target = ""
        if key == ("dask", 2):
            ok = steady[key] / steady[base] >= TARGET
            target = f"target >= {TARGET}x: {check(ok)}"
        table.add(
            f"ratio images/s {name} / local 1, steady state",
            ratio(steady[key], steady[base]),
            target,
        )
    if steady is not None:
        table.add(
            "ratio images/s dask 2 / local 2, steady state",
            ratio(steady["dask", 2], steady["local", 2]),
        )
    same = all(runs[-1].results == timed[base][-1].results for runs in timed.values())
    table.add("results of every run equal, field for field", "yes" if same else "NO")
    table.add(
        "load average (1 min) before / after",
        f"{load:.2f} / {os.getloadavg()[0]:.2f}",
        f"{os.cpu_count()} cores, shared with other work: figures vary",
    )
    travels(table, t)


def travels(table: Table, t: ImageTree) -> None:
    """What one item costs in transfer: the task sent to a worker (function, path, hash,
    provider, key-free settings) and the Outcome sent back, pickled as Dask does for
    plain data, by running the worker's function here on one file."""
    import xxhash

    from imgbatch.config import Settings
    from imgbatch.pipeline.engines.dask import analyse_on_worker

    path = t.paths()[0]
    data = path.read_bytes()
    settings = Settings(
        provider="local", executor="dask", workers=2, checkpoint=str(scratch("dask-state"))
    ).key_free()
    args = (str(path), xxhash.xxh3_128_hexdigest(data), "local", settings)
    sent = pickle.dumps((analyse_on_worker, args), protocol=pickle.HIGHEST_PROTOCOL)
    outcome = analyse_on_worker(*args)
    if outcome.status != "ok":
        raise RuntimeError(f"analyse_on_worker failed on {path}: {outcome}")
    back = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    # no file bytes: no window of the file, taken every 4 KiB, is in what travels
    windows = [data[i : i + WINDOW] for i in range(0, len(data) - WINDOW, 4096)]
    found = sum(1 for w in windows if w in sent or w in back)
    table.add(
        "per item, driver -> worker: pickled task", f"{len(sent):,} B", "path, hash, settings"
    )
    table.add("per item, worker -> driver: pickled Outcome", f"{len(back):,} B")
    table.add(
        "per item, both ways / the file",
        f"{(len(sent) + len(back)) / len(data):.4%}",
        f"of {len(data) / 1e6:.2f} MB",
    )
    table.add(
        f"{WINDOW}-byte windows of the file in what travels",
        f"{found} of {len(windows)}",
        f"target 0 (no original bytes travel): {check(found == 0)}",
    )


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {"scaleout": scaleout}
