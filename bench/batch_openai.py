"""Benchmark of `imgbatch analyze --batch --provider openai` against tests/fakeopenai_batch.py's
Files and Batch APIs: what a submission and a collection cost (requests per second), and a
live run of the same tree as the baseline, measured in the same run. The fake server runs
in this process (run from the repository's top folder, so that `tests` is importable); the
CLI runs as a child process pointed at it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Run, Table, analyze_against, check, log, ratio, scratch, secs
from bench.images import small_jpegs

if TYPE_CHECKING:
    from tests.fakeopenai_batch import FakeOpenAIBatch

KEY = "sk-bench-key"
FILES, QUICK_FILES = 2000, 300
MAX_REQUESTS = 500  # --batch-max-requests: 4 batches for the full tree


def fake_openai() -> FakeOpenAIBatch:
    try:
        from tests.fakeopenai_batch import FakeOpenAIBatch
    except ImportError as exc:  # pragma: no cover - depends on the working directory
        raise RuntimeError("run the benchmarks from the repository's top folder") from exc
    return FakeOpenAIBatch(keys={KEY})


def analyze(
    server: FakeOpenAIBatch, root: Path, state: Path, *opts: str
) -> tuple[Run, list[dict[str, Any]]]:
    """One `imgbatch analyze --provider openai` run of `root` with state folder `state`
    (its own results store: nothing is answered from another benchmark's results)."""
    env = {"IMGBATCH_OPENAI_API_KEY": KEY, "IMGBATCH_OPENAI_BASE_URL": server.base_url}
    return analyze_against("openai", root, state, env, server.errors, *opts)


def submit_and_collect(table: Table, quick: bool) -> None:
    n = QUICK_FILES if quick else FILES
    tree = small_jpegs(n)
    table.section(
        f"batch_openai 1. --batch --provider openai over {tree.files:,} small JPEGs, "
        f"--batch-max-requests {MAX_REQUESTS}"
    )
    state = scratch("openai-batch") / "state"
    with fake_openai() as server:
        sub, sub_lines = analyze(server, tree.path, state, "--batch", "--batch-max-requests",
                                 str(MAX_REQUESTS))  # fmt: skip
        batches = list(server.batches.values())
        per_batch = [len(b.lines) for b in batches]
        note = f"{len(batches)} batches for {sum(per_batch):,} requests; cap {MAX_REQUESTS}: "
        note += check(max(per_batch) <= MAX_REQUESTS and sum(per_batch) == tree.files)
        table.add("requests per batch", f"{max(per_batch):,}", note)
        rate = tree.files / sub.seconds
        note = f"decode, encode, write, upload, create: {rate:,.0f} requests/s; "
        note += f"{len(sub_lines)} lines (nothing is back yet)"
        table.add("submission run", secs(sub.seconds), note)

        server.end("completed")  # the fake answers every line now (not timed: OpenAI's part)
        col, lines = analyze(server, tree.path, state, "--batch")
        ok = sum(line.get("status") == "ok" and line.get("batch") is True for line in lines)
        note = f"poll, download output, parse, write and commit {ok:,} lines: "
        note += f"{ok / col.seconds:,.0f} items/s; all ok: {check(ok == tree.files)}"
        table.add("time to collect", secs(col.seconds), note)
        twice = sum(c > 1 for c in server.carried().values())
        table.add("requests sent twice", f"{twice}", f"files left: {len(server.files)}")

        live_state = scratch("openai-batch-live") / "state"
        live, live_lines = analyze(server, tree.path, live_state, "--rpm", "0", "--workers", "8")
        note = f"the same tree, chat completions, --rpm 0, no latency: {len(live_lines):,} "
        note += f"lines; submit + collect take {ratio(sub.seconds + col.seconds, live.seconds)}"
        note += " of it"
        table.add("live run (baseline)", secs(live.seconds), note)
    log(f"   collection stderr: {col.stderr.strip().splitlines()[-1]}")


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {"openai_batch": submit_and_collect}
