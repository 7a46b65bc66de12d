"""Benchmarks of `imgbatch analyze --provider ollama|openai` against tests/fakeopenai.py: how
well the workers keep a slow local server busy (no rpm pacing for ollama), and what is
uploaded. The fake server runs in this process (run from the repository's top folder,
so that `tests` is importable); the CLI runs as a child process pointed at it."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import IMGBATCH, Table, check, ratio, run, scratch, secs
from bench.gemini import Result, add_outcome, upload_rows
from bench.images import ImageTree, photos, small_jpegs

if TYPE_CHECKING:
    from tests.fakeopenai import FakeOpenAI

MODEL = "gemma3"
LATENCY = 0.2  # seconds per answer: a small vision model on a GPU
WORKERS = 8
SIZES = {"single": 48, "parallel": 192}  # full runs; --quick uses QUICK
QUICK = {"single": 16, "parallel": 64}


def fake_server(dialect: str, **kwargs: Any) -> FakeOpenAI:
    try:
        from tests.fakeopenai import FakeOpenAI
    except ImportError as exc:  # pragma: no cover - depends on the working directory
        raise RuntimeError("run the benchmarks from the repository's top folder") from exc
    return FakeOpenAI(dialect=dialect, **kwargs)


def analyze(server: FakeOpenAI, root: Path, name: str, provider: str, *opts: str) -> Result:
    """One `imgbatch analyze` run of `root` against `server`, fresh state."""
    state, out = scratch(f"openai-{name}"), scratch(f"openai-{name}-out") / "stdout.jsonl"
    argv = [IMGBATCH, "analyze", str(root), "--provider", provider, "--model", MODEL]
    argv += ["--checkpoint", str(state), "--base-url", server.base_url, *opts]
    env = {
        "IMGBATCH_OPENAI_API_KEY": "bench-key",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # a results store of its own, fresh with the state: every run must ask the server
        "IMGBATCH_RESULTS": str(state / "results"),
    }
    server.clear_requests()
    r = run(argv, env=env, stdout=out, check=False)
    if r.returncode not in (0, 1):  # 1: some items failed, which the caller reports
        raise RuntimeError(f"imgbatch analyze exited {r.returncode}:\n{r.stderr[-2000:]}")
    if server.errors:
        raise RuntimeError(f"the fake server failed:\n{server.errors[0]}")
    lines = [json.loads(line) for line in out.read_bytes().splitlines() if line.strip()]
    return Result(r, lines, sorted(server.requests, key=lambda q: q.time))


def answered_rate(res: Result) -> tuple[float, float]:
    """(answers per second, span in seconds) from the first request's arrival to the last
    answer: the server's own timeline, without the CLI's start-up."""
    done = [r for r in res.requests if r.status == 200 and r.finished is not None]
    span = max(r.finished for r in done) - min(r.time for r in res.requests)
    return len(done) / span, span


def throughput(table: Table, quick: bool) -> None:
    sizes = QUICK if quick else SIZES
    one, many = small_jpegs(sizes["single"]), small_jpegs(sizes["parallel"])
    table.section(
        f"openai 1. a local server with {LATENCY:g} s per answer: --workers {WORKERS} against "
        f"{WORKERS} x the single-request rate (small JPEGs)"
    )
    with fake_server("ollama", models={MODEL}, latency=LATENCY) as server:
        single = analyze(server, one.path, "single", "ollama", "--workers", "1")
        parallel = analyze(server, many.path, "parallel", "ollama", "--workers", str(WORKERS))
        peak = server.max_in_flight
    with fake_server("openai", latency=LATENCY) as server:
        paid = analyze(
            server, many.path, "paid", "openai", "--workers", str(WORKERS), "--rpm", "1e6"
        )
    r1, span1 = answered_rate(single)
    note = f"{one.files} images in {span1:.1f} s (server timeline); ideal {1 / LATENCY:g}/s"
    table.add("ollama --workers 1: answers/s", f"{r1:.2f}/s", note)
    add_outcome(table, one, single)
    r8, span8 = answered_rate(parallel)
    target = r1 * WORKERS
    note = f"{many.files} images in {span8:.1f} s; {WORKERS} x single = {target:.1f}/s"
    table.add(f"ollama --workers {WORKERS}: answers/s", f"{r8:.1f}/s", note)
    share = r8 / target
    note = f"target >= 90%: {check(share >= 0.9)} (rpm 0: no pacing)"
    table.add(f"ratio to {WORKERS} x the single-request rate", f"{share:.0%}", note)
    note = f"--workers {WORKERS}: {check(peak == WORKERS)}"
    table.add("most requests held at once by the server", f"{peak}", note)
    add_outcome(table, many, parallel)
    wall = ratio(single.run.seconds / one.files, parallel.run.seconds / many.files)
    note = f"wall time per image, start-up included: 1 worker / {WORKERS} workers = {wall}"
    table.add(f"ollama --workers {WORKERS}: wall time", secs(parallel.run.seconds), note)
    rp, _ = answered_rate(paid)
    note = f"ratio to {WORKERS} x single {ratio(rp, target)}; --rpm 1e6 (the limiter in the path)"
    table.add(f"openai --workers {WORKERS}: answers/s", f"{rp:.1f}/s", note)


def uploads(table: Table, quick: bool) -> None:
    from PIL import Image

    tree = photos(10 if quick else 40)
    folder = tree.path / "d00000"  # 10 photos
    originals = sorted(p for p in folder.iterdir() if p.is_file())
    orig_bytes = statistics.mean(p.stat().st_size for p in originals)
    with Image.open(originals[0]) as img:
        orig_side, orig_exif = max(img.size), len(img.getexif())
    t = ImageTree(folder, len(originals), int(orig_bytes * len(originals)))
    table.section(
        f"openai 2. uploads (data URLs) of {t.files} 12-megapixel JPEGs ({orig_side} px, "
        f"{orig_bytes / 1e6:.1f} MB each on average, {orig_exif} EXIF tags with GPS)"
    )
    with fake_server("ollama", models={MODEL}) as server:
        for side in (768, 1024):
            res = analyze(server, folder, f"upload{side}", "ollama", "--max-side", str(side))
            upload_rows(table, t, res, side, orig_side, orig_bytes)
            images = [i for r in res.requests for i in r.images]
            alphabets = sorted({i.alphabet for i in images})
            ok = set(alphabets) <= {"standard", "plain"}
            table.add(
                f"--max-side {side}: base64 alphabet",
                ", ".join(alphabets),
                f"standard: {check(ok)}",
            )


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {
    "throughput": throughput,
    "uploads": uploads,
}
