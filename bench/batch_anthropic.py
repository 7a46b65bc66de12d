"""Benchmark of `imgbatch analyze --batch --provider anthropic` against
tests/fakeanthropic.py's Message Batches API: what a submission and a collection cost
(requests per second), and a live run of the same tree (the Messages API) as the baseline,
measured in the same run. The fake server runs in this process (run from the repository's
top folder, so that `tests` is importable); the CLI runs as a child process pointed at it."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Run, Table, analyze_against, check, log, ratio, run, scratch, secs
from bench.images import small_jpegs

if TYPE_CHECKING:
    from tests.fakeanthropic import FakeAnthropic

KEY = "sk-ant-bench-key"
FILES, QUICK_FILES = 2000, 300
MAX_REQUESTS = 500  # --batch-max-requests: 4 batches for the full tree
PENDING = 3600.0  # batch-clock seconds a batch stays in progress (until `advance`)


def fake_anthropic() -> FakeAnthropic:
    try:
        from tests.fakeanthropic import FakeAnthropic
    except ImportError as exc:  # pragma: no cover - depends on the working directory
        raise RuntimeError("run the benchmarks from the repository's top folder") from exc
    return FakeAnthropic(keys={KEY})


def analyze(
    server: FakeAnthropic, root: Path, state: Path, *opts: str
) -> tuple[Run, list[dict[str, Any]]]:
    """One `imgbatch analyze --provider anthropic` run of `root` with state folder `state`
    (its own results store: nothing is answered from another benchmark's results)."""
    env = {"IMGBATCH_ANTHROPIC_API_KEY": KEY, "IMGBATCH_ANTHROPIC_BASE_URL": server.url}
    return analyze_against("anthropic", root, state, env, server.errors, *opts)


def submit_and_collect(table: Table, quick: bool) -> None:
    n = QUICK_FILES if quick else FILES
    tree = small_jpegs(n)
    table.section(
        f"batch_anthropic 1. --batch --provider anthropic over {tree.files:,} small JPEGs, "
        f"--batch-max-requests {MAX_REQUESTS}"
    )
    state = scratch("anthropic-batch") / "state"
    with fake_anthropic() as server:
        server.batch.default_plan.delay = PENDING  # in progress until the clock moves
        sub, sub_lines = analyze(server, tree.path, state, "--batch", "--batch-max-requests",
                                 str(MAX_REQUESTS))  # fmt: skip
        batches = server.batch.jobs
        per_batch = [len(b.custom_ids) for b in batches]
        note = f"{len(batches)} batches for {sum(per_batch):,} requests; cap {MAX_REQUESTS}: "
        note += check(max(per_batch) <= MAX_REQUESTS and sum(per_batch) == tree.files)
        table.add("requests per batch", f"{max(per_batch):,}", note)
        rate = tree.files / sub.seconds
        note = f"decode, encode, create (JSON bodies): {rate:,.0f} requests/s; "
        note += f"{len(sub_lines)} lines (nothing is back yet)"
        table.add("submission run", secs(sub.seconds), note)

        server.batch.advance(PENDING)  # every batch ends (not timed: Anthropic's part)
        col, lines = analyze(server, tree.path, state, "--batch")
        ok = sum(line.get("status") == "ok" and line.get("batch") is True for line in lines)
        note = f"poll, stream results, parse, write and commit {ok:,} lines: "
        note += f"{ok / col.seconds:,.0f} items/s; all ok: {check(ok == tree.files)}"
        table.add("time to collect", secs(col.seconds), note)
        carried = Counter(c for b in server.batch.jobs for c in b.custom_ids)
        twice = sum(c > 1 for c in carried.values())
        table.add("requests sent twice", f"{twice}", f"batches: {len(batches)}")

        live_state = scratch("anthropic-batch-live") / "state"
        live, live_lines = analyze(server, tree.path, live_state, "--rpm", "0", "--workers", "8")
        note = f"the same tree, Messages API, --rpm 0, no latency: {len(live_lines):,} "
        note += f"lines; submit + collect take {ratio(sub.seconds + col.seconds, live.seconds)}"
        note += " of it"
        table.add("live run (baseline)", secs(live.seconds), note)
    # every run above pays it once: on a small tree it is much of each run's time
    sdk = run([sys.executable, "-c", "import anthropic"])
    note = "`import anthropic` in a fresh interpreter, a fixed cost of each run above"
    table.add("SDK import", secs(sdk.seconds), note)
    summary = [line for line in col.stderr.splitlines() if "collected" in line]
    log(f"   collection stderr: {(summary or [col.stderr.strip()])[-1]}")


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {"anthropic_batch": submit_and_collect}
