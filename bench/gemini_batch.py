"""Benchmark of `imgbatch analyze --batch` against tests/fakegemini.py's Batch and Files
APIs: requests per job, what a submission and a collection cost, and a live run of the
same tree as the baseline (measured in the same run). The fake server runs in this
process (run from the repository's top folder, so that `tests` is importable); the CLI
runs as a child process pointed at it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Run, Table, analyze_against, check, log, mb, ratio, scratch, secs
from bench.images import small_jpegs

if TYPE_CHECKING:
    from tests.fakegemini import FakeGemini

KEY = "bench-key"
FILES, QUICK_FILES = 2000, 300
MAX_REQUESTS = 500  # --batch-max-requests: 4 jobs for the full tree
TURNAROUND = 3600.0  # the jobs' delay on the fake's batch clock (advanced, not waited)


def fake_gemini() -> FakeGemini:
    try:
        from tests.fakegemini import FakeGemini
    except ImportError as exc:  # pragma: no cover - depends on the working directory
        raise RuntimeError("run the benchmarks from the repository's top folder") from exc
    return FakeGemini(keys={KEY}, seed=20240601)


def analyze(
    server: FakeGemini, root: Path, state: Path, *opts: str
) -> tuple[Run, list[dict[str, Any]]]:
    """One `imgbatch analyze --provider gemini` run of `root` with state folder `state`
    (its own results store: nothing is answered from another benchmark's results)."""
    env = {"GEMINI_API_KEY": KEY, "GOOGLE_API_KEY": "", "IMGBATCH_GEMINI_BASE_URL": server.url}
    return analyze_against("gemini", root, state, env, server.errors, *opts)


def submit_and_collect(table: Table, quick: bool) -> None:
    n = QUICK_FILES if quick else FILES
    tree = small_jpegs(n)
    table.section(
        f"gemini_batch 1. --batch over {tree.files:,} small JPEGs, --batch-max-requests "
        f"{MAX_REQUESTS}, jobs ending {TURNAROUND:g} s later (the fake's clock)"
    )
    state = scratch("gemini-batch") / "state"
    with fake_gemini() as server:
        server.batch.default_plan.delay = TURNAROUND
        sub, sub_lines = analyze(server, tree.path, state, "--batch", "--batch-max-requests",
                                 str(MAX_REQUESTS))  # fmt: skip
        jobs = server.batch.jobs
        sizes = [len(server.batch.files[j.input_file or ""].data) for j in jobs]
        per_job = [len(j.keys) for j in jobs]
        note = f"{len(jobs)} jobs for {sum(per_job):,} requests; cap {MAX_REQUESTS}: "
        note += check(max(per_job) <= MAX_REQUESTS and sum(per_job) == tree.files)
        table.add("requests per job", f"{max(per_job):,}", note)
        note = f"{sum(sizes) / sum(per_job) / 1e3:.1f} KB per request (base64 JPEG, prompt, config)"
        table.add("largest request file", mb(max(sizes)), note)
        rate = tree.files / sub.seconds
        note = f"decode, encode, write, upload, create: {rate:,.0f} requests/s; "
        note += f"{len(sub_lines)} lines (nothing is back yet)"
        table.add("submission run", secs(sub.seconds), note)

        server.batch.advance(TURNAROUND)
        col, lines = analyze(server, tree.path, state, "--batch")
        ok = sum(line.get("status") == "ok" and line.get("batch") is True for line in lines)
        note = f"poll, download, parse, write and commit {ok:,} lines: "
        note += f"{ok / col.seconds:,.0f} items/s; all ok: {check(ok == tree.files)}"
        table.add("time to collect", secs(col.seconds), note)
        carried = Counter(d for job in server.batch.jobs for d in job.digests)
        note = f"left in Files API storage: {server.batch.stored_bytes:,} bytes"
        table.add("requests sent twice", f"{sum(c > 1 for c in carried.values())}", note)

        again, again_lines = analyze(server, tree.path, state, "--batch")
        note = f"{len(again_lines)} lines, {len(server.batch.jobs) - len(jobs)} new jobs"
        table.add("re-run after the collection", secs(again.seconds), note)

        live_state = scratch("gemini-batch-live") / "state"
        live, live_lines = analyze(server, tree.path, live_state, "--rpm", "0", "--workers", "8")
        note = f"the same tree, generateContent, --rpm 0, no latency: {len(live_lines):,} lines; "
        note += f"submit + collect take {ratio(sub.seconds + col.seconds, live.seconds)} of it"
        table.add("live run (baseline)", secs(live.seconds), note)
    log(f"   collection stderr: {col.stderr.strip().splitlines()[-1]}")


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {"batch": submit_and_collect}
