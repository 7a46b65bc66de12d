"""Benchmarks of `imgbatch analyze --provider gemini` against tests/fakegemini.py: how much
of a quota the rate limiter uses, with faults and with a quota far below --rpm, and what
is uploaded. The fake server runs in this process (run from the repository's top folder,
so that `tests` is importable); the CLI runs as a child process pointed at it."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import IMGBATCH, Run, Table, check, log, ratio, run, scratch, secs
from bench.images import ImageTree, photos, small_jpegs

if TYPE_CHECKING:
    from tests.fakegemini import FakeGemini, RecordedRequest

KEY = "bench-key"
WORKERS = 8
LATENCY = 0.2
QUOTA = (50, 5.0)  # 600 requests per minute, in 5-second windows to keep the runs short
LOW_QUOTA = (20, 5.0)  # 240 per minute, far below --rpm 6000
SIZES = {"quota": 200, "low": 150}  # full runs; --quick uses QUICK
QUICK = {"quota": 60, "low": 50}
REFUSED = ("quota_minute", "quota_day")  # outcomes of requests the quota turned away
_clean_runs: dict[int, Result] = {}  # files -> the run of `quota` (the baseline of `faults`)


def fake_gemini(**kwargs: Any) -> FakeGemini:
    try:
        from tests.fakegemini import FakeGemini
    except ImportError as exc:  # pragma: no cover - depends on the working directory
        raise RuntimeError("run the benchmarks from the repository's top folder") from exc
    return FakeGemini(keys={KEY}, seed=20240601, **kwargs)


@dataclass
class Result:
    run: Run
    lines: list[dict[str, Any]]
    requests: list[RecordedRequest]  # in arrival order

    @property
    def ok_paths(self) -> set[str]:
        return {line["path"] for line in self.lines if line.get("status") == "ok"}

    def lost(self, tree: ImageTree) -> int:
        """Files of `tree` without an ok line."""
        return len({str(p) for p in tree.paths()} - self.ok_paths)

    @property
    def retries(self) -> int:
        """Requests beyond the first of each item, from the output's attempts."""
        return sum(max(0, int(line.get("attempts") or 0) - 1) for line in self.lines)

    @property
    def accepted(self) -> list[float]:
        """Arrival times of the requests that got past the server's quota (answered
        200, or a fault injected after the quota counted them)."""
        return [r.time for r in self.requests if r.outcome not in REFUSED]

    def refused(self) -> int:
        return sum(r.outcome in REFUSED for r in self.requests)


def analyze(
    server: FakeGemini, root: Path, name: str, rpm: float, *opts: str, workers: int = WORKERS
) -> Result:
    """One `imgbatch analyze --provider gemini` run of `root` against `server`, fresh state."""
    state, out = scratch(f"gemini-{name}"), scratch(f"gemini-{name}-out") / "stdout.jsonl"
    argv = [IMGBATCH, "analyze", str(root), "--provider", "gemini", "--checkpoint", str(state)]
    argv += ["--workers", str(workers), "--rpm", f"{rpm:g}", "--timeout", "30", *opts]
    env = {
        "GEMINI_API_KEY": KEY,
        "GOOGLE_API_KEY": "",  # a second key would fail over on 429s instead of waiting
        "IMGBATCH_GEMINI_BASE_URL": server.url,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # a results store of its own: the user's would answer a second run from stored
        # results, without a request (every run here must ask the server)
        "IMGBATCH_RESULTS": str(scratch(f"gemini-{name}-results")),
    }
    server.clear_requests()
    r = run(argv, env=env, stdout=out, check=False)
    if r.returncode not in (0, 1):  # 1: some items failed, which the caller reports
        raise RuntimeError(f"imgbatch analyze exited {r.returncode}:\n{r.stderr[-2000:]}")
    if server.errors:
        raise RuntimeError(f"the fake server failed:\n{server.errors[0]}")
    lines = [json.loads(line) for line in out.read_bytes().splitlines() if line.strip()]
    return Result(r, lines, sorted(server.requests, key=lambda q: q.time))


# -- timeline analysis --------------------------------------------------------------


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most of `times` (sorted) in any half-open window (t - window, t]: the server's
    sliding window."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def quota_use(times: Sequence[float], quota: tuple[int, float]) -> tuple[float, float]:
    """(fraction of the quota's rate, span in seconds) of accepted requests at `times`:
    (n - 1) requests over the span between the first and the last, against a client that
    spaces them evenly at exactly the quota's rate."""
    n, window = quota
    if len(times) < 2:
        return 0.0, 0.0
    span = times[-1] - times[0]
    return (len(times) - 1) / span / (n / window), span


def congestion_events(res: Result, gap: float = 0.5) -> int:
    """Runs of 429 answers (quota refusals) separated by more than `gap` seconds."""
    times = [r.time for r in res.requests if r.outcome in REFUSED]
    return sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] > gap)


def log_timeline(res: Result, window: float) -> None:
    """Per window: requests accepted / refused by the quota / faulted, on stderr."""
    if not res.requests:
        return
    t0 = res.requests[0].time
    rows: dict[int, Counter[str]] = {}
    for r in res.requests:
        kind = "429q" if r.outcome in REFUSED else "ok" if r.outcome == "ok" else str(r.status)
        rows.setdefault(int((r.time - t0) // window), Counter())[kind] += 1
    for k in range(max(rows) + 1):
        c = rows.get(k, Counter())
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(c.items()))
        log(f"   t={k * window:5.1f}-{(k + 1) * window:5.1f}s: {parts or '-'}")


def start_burst(res: Result, rpm: float) -> int:
    """Requests that arrived within the first interval (60 / rpm seconds): 1 if paced."""
    t0 = res.requests[0].time
    return sum(r.time - t0 < 60 / rpm for r in res.requests)


def end_pace(res: Result, quota: tuple[int, float]) -> str:
    """Requests/min over the last quarter of the requests, and as a fraction of the quota."""
    times = [r.time for r in res.requests]
    last = times[len(times) * 3 // 4 :]
    rate = 60 * (len(last) - 1) / (last[-1] - last[0]) if len(last) > 1 else 0.0
    return f"{rate:.0f}/min ({rate / (60 * quota[0] / quota[1]):.0%} of the quota)"


def longest_gap(res: Result) -> float:
    times = [r.time for r in res.requests]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


# -- the benchmarks -----------------------------------------------------------------


def add_outcome(table: Table, t: ImageTree, res: Result) -> None:
    lost = res.lost(t)
    ok = len(res.ok_paths)
    note = f"{lost} lost; exit code {res.run.returncode}: {check(lost == 0)}"
    table.add("items ending ok", f"{ok} of {t.files}", note)


def add_quota_rows(
    table: Table, res: Result, quota: tuple[int, float], rpm: float, target: float
) -> float:
    n, window = quota
    acc = res.accepted
    frac, span = quota_use(acc, quota)
    note = f"{len(acc)} accepted over {span:.1f} s vs {n}/{window:g} s = {60 * n / window:g}/min"
    if target:
        note += f"; target >= {target:.0%}: {check(frac >= target)}"
    table.add("accepted requests/min (of the quota)", f"{60 * frac * n / window:.0f}/min", note)
    table.add("fraction of the quota used", f"{frac:.1%}", "accepted rate / quota rate")
    sent = max_in_window([r.time for r in res.requests], window)
    allowed = rpm * window / 60
    note = f"--rpm {rpm:g} allows {allowed:g}, the quota {n}: "
    note += f"{check(sent <= min(allowed, n))}" if allowed <= n else "(quota below --rpm)"
    table.add(f"most requests sent in any {window:g} s window", f"{sent}", note)
    note = "by arrival time; the server counts a few ms later, after reading the body"
    table.add(f"most accepted in any {window:g} s window", f"{max_in_window(acc, window)}", note)
    return frac


def quota(table: Table, quick: bool) -> None:
    n = (QUICK if quick else SIZES)["quota"]
    t = small_jpegs(n)
    q, rpm = QUOTA, 60 * QUOTA[0] / QUOTA[1]
    table.section(
        f"gemini 3. quota use: {t.files} small JPEGs, --workers {WORKERS}, latency "
        f"{LATENCY:g} s, quota {q[0]}/{q[1]:g} s, --rpm {rpm:g}"
    )
    with fake_gemini(latency=LATENCY) as server:
        free = analyze(server, t.path, "free", 1e6)
        with_quota(server, q)
        res = _clean_runs[t.files] = analyze(server, t.path, "quota", rpm)
    if free.lost(t):
        raise RuntimeError(f"the unthrottled run lost {free.lost(t)} items")
    free_rpm = 60 * (len(free.requests) - 1) / (free.requests[-1].time - free.requests[0].time)
    note = f"{free_rpm:,.0f} requests/min: the ceiling of {WORKERS} workers at this latency"
    table.add("baseline: no quota, --rpm 1e6", secs(free.run.seconds), note)
    ideal = t.files / (q[0] / q[1])
    note = f"ideal at the quota: {ideal:.1f} s; ratio {ratio(res.run.seconds, ideal)}"
    table.add("wall time with the quota", secs(res.run.seconds), note)
    add_outcome(table, t, res)
    add_quota_rows(table, res, q, rpm, 0.95)
    refused = res.refused()
    note = f"{refused / len(res.requests):.1%} of {len(res.requests)} requests"
    table.add("requests answered 429 (quota)", f"{refused}", note)
    burst = start_burst(res, rpm)
    table.add(f"requests in the first {60 / rpm:g} s", f"{burst}", f"paced: 1: {check(burst == 1)}")
    log(f"   timeline of {res.run.seconds:.1f} s (5-s windows):")
    log_timeline(res, q[1])


def with_quota(server: FakeGemini, q: tuple[int, float] | None) -> None:
    server.set_quota(q)
    server.reset_quotas()


def faults(table: Table, quick: bool) -> None:
    n = (QUICK if quick else SIZES)["quota"]
    t = small_jpegs(n)
    q, rpm = QUOTA, 60 * QUOTA[0] / QUOTA[1]
    table.section(
        f"gemini 4. quota use with 10% injected faults (429, 503): {t.files} small JPEGs, "
        f"--workers {WORKERS}, latency {LATENCY:g} s, quota {q[0]}/{q[1]:g} s, --rpm {rpm:g}"
    )
    clean = _clean_runs.get(t.files)
    if clean is None:  # `quota` did not run in this process
        with fake_gemini(latency=LATENCY, quota=q) as server:
            clean = _clean_runs[t.files] = analyze(server, t.path, "clean", rpm)
    with fake_gemini(latency=LATENCY, quota=q, fault_rate=0.1, fault_statuses=(429, 503)) as server:
        res = analyze(server, t.path, "faults", rpm)
    clean_frac, _ = quota_use(clean.accepted, q)
    note = f"{clean_frac:.1%} of the quota used, {clean.retries} retries"
    table.add("baseline: the run without faults (3.)", secs(clean.run.seconds), note)
    note = f"ratio to the run without faults {ratio(res.run.seconds, clean.run.seconds)}"
    table.add("wall time with faults", secs(res.run.seconds), note)
    add_outcome(table, t, res)
    frac = add_quota_rows(table, res, q, rpm, 0.0)
    table.add("ratio quota used: faults / no faults", ratio(frac, clean_frac))
    faulted = Counter(r.status for r in res.requests if r.outcome == "fault")
    injected = ", ".join(f"{k}: {v}" for k, v in sorted(faulted.items(), key=str))
    table.add("faults injected", f"{sum(faulted.values())}", injected)
    table.add("refused by the quota (429)", f"{res.refused()}", f"of {len(res.requests)} requests")
    note = f"{len(res.requests) - t.files} requests beyond one per item (server count)"
    table.add("retries (output's attempts - 1, summed)", f"{res.retries}", note)
    ok200 = sum(r.status == 200 for r in res.requests)
    frac200, _ = quota_use([r.time for r in res.requests if r.status == 200], q)
    table.add("goodput (answered 200) of the quota", f"{frac200:.1%}", f"{ok200} answers 200")
    table.add("longest pause between requests", secs(longest_gap(res)))
    table.add("pace over the last quarter of requests", end_pace(res, q))
    log(f"   timeline of {res.run.seconds:.1f} s (5-s windows):")
    log_timeline(res, q[1])


def low_quota(table: Table, quick: bool) -> None:
    n = (QUICK if quick else SIZES)["low"]
    t = small_jpegs(n)
    q, rpm = LOW_QUOTA, 6000.0
    table.section(
        f"gemini 5. server quota far below --rpm: {t.files} small JPEGs, --workers {WORKERS}, "
        f"latency {LATENCY:g} s, quota {q[0]}/{q[1]:g} s ({60 * q[0] / q[1]:g}/min), --rpm {rpm:g}"
    )
    with fake_gemini(latency=LATENCY, quota=q) as server:
        res = analyze(server, t.path, "low", rpm)
    ideal = t.files / (q[0] / q[1])
    note = f"ideal at the quota: {ideal:.1f} s; ratio {ratio(res.run.seconds, ideal)}"
    table.add("wall time", secs(res.run.seconds), note)
    add_outcome(table, t, res)
    frac = add_quota_rows(table, res, q, rpm, 0.75)
    refused = res.refused()
    share = refused / len(res.requests)
    note = f"{refused} of {len(res.requests)} requests; target < 30%: {check(share < 0.3)}"
    table.add("requests answered 429", f"{share:.1%}", note)
    ok = check(frac >= 0.9 and share <= 0.1)
    note = f"today 83% / 8% (issue 14); target >= 90% / <= 10%: {ok}"
    table.add("issue 14 target: quota used / 429 share", f"{frac:.0%} / {share:.0%}", note)
    table.add("congestion events (runs of 429s)", f"{congestion_events(res)}")
    table.add("retries (output's attempts - 1, summed)", f"{res.retries}")
    table.add("longest pause between requests", secs(longest_gap(res)))
    table.add("pace over the last quarter of requests", end_pace(res, q))
    log(f"   timeline of {res.run.seconds:.1f} s (5-s windows):")
    log_timeline(res, q[1])


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
        f"gemini 6. uploads of {t.files} 12-megapixel JPEGs ({orig_side} px, "
        f"{orig_bytes / 1e6:.1f} MB each on average, {orig_exif} EXIF tags with GPS)"
    )
    with fake_gemini() as server:
        for side in (768, 1024):
            res = analyze(server, folder, f"upload{side}", 1e6, "--max-side", str(side))
            upload_rows(table, t, res, side, orig_side, orig_bytes)


def upload_rows(
    table: Table, t: ImageTree, res: Result, side: int, orig_side: int, orig_bytes: float
) -> None:
    images = [img for r in res.requests if r.status == 200 for img in r.images]
    if res.lost(t) or len(images) != t.files:
        raise RuntimeError(f"{len(images)} uploads for {t.files} photos, {res.lost(t)} lost")
    longest = max(max(i.width or 0, i.height or 0) for i in images)
    note = f"--max-side {side}: {check(longest <= side)}; ratio to the original "
    note += ratio(longest, orig_side)
    table.add(f"--max-side {side}: longest side uploaded", f"{longest} px", note)
    sizes = [i.size for i in images]
    note = f"median {statistics.median(sizes) / 1e3:.0f} KB; ratio to the original file "
    note += ratio(max(sizes), orig_bytes)
    if side == 768:
        note += f"; target < 150 KB: {check(max(sizes) < 150_000)}"
    table.add(f"--max-side {side}: largest upload", f"{max(sizes) / 1e3:.0f} KB", note)
    meta: Counter[str] = Counter()
    for i in images:
        with i.open() as img:
            if len(img.getexif()):
                meta["EXIF"] += 1
            for key in ("icc_profile", "xmp", "comment", "exif"):
                if img.info.get(key):
                    meta[key] += 1
    formats = Counter(f"{i.format} ({i.mime_type})" for i in images)
    note = f"{', '.join(f'{f}: {n}' for f, n in formats.items())}; "
    note += f"metadata found: {dict(meta) or 'none'}: {check(not meta)}"
    table.add(f"--max-side {side}: uploads with EXIF", f"{meta['EXIF']} of {len(images)}", note)


BENCHMARKS: dict[str, Callable[[Table, bool], None]] = {
    "quota": quota,
    "faults": faults,
    "overquota": low_quota,
    "uploads": uploads,
}
