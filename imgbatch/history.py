"""Reading the checkpoint: `status`, the run history, `export` and `prune`.

`status`, `runs` and `export` only read, and write nothing at all: the checkpoint and
the results store are opened read-only (`statedb.ReadOnlyCache`), so they work on state
made read-only and change no byte of it; SQLite in WAL mode lets them run beside a
writer, e.g. a cron run in the background. `prune` writes and takes the lock.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings, results_dir
from imgbatch.errors import UsageError
from imgbatch.output import human_duration
from imgbatch.prices import dollars
from imgbatch.records import FileRecord
from imgbatch.results import ResultStore
from imgbatch.sources import is_url

if TYPE_CHECKING:  # the writers are imported by the exports that use them: search, status
    # and runs start faster without them
    from imgbatch import captions, datasets, exports

log = logging.getLogger("imgbatch")

LIVE_STATES = ("QUEUED", "PROCESSING")


def open_checkpoint(state: Path, write: bool = False, legacy_ok: bool = False) -> Checkpoint:
    """An existing checkpoint, read-only unless `write` (then the caller takes the lock);
    a clear error when there is none. `legacy_ok`: one an earlier imgbatch wrote is read
    as it is (`Checkpoint.legacy`), not refused (`search`, `dupes`)."""
    if not (state / "checkpoint").is_dir():
        raise UsageError(
            f"no checkpoint in {state}: run `imgbatch analyze` first, or pass "
            "the folder given to --checkpoint"
        )
    return Checkpoint(state, create=False, readonly=not write, legacy_ok=legacy_ok)


def open_results(results: Path | None, legacy_ok: bool = False) -> ResultStore:
    """The results store (default: the user's), for reading only (`legacy_ok`: as
    `open_checkpoint`'s)."""
    return ResultStore(_results(results), readonly=True, legacy_ok=legacy_ok)


def legacy_folder(cp: Checkpoint, store: ResultStore) -> Path | None:
    """The checkpoint's state folder, or the results store, if an earlier imgbatch wrote
    it and it is read as it is; else None."""
    return cp.directory if cp.legacy else store.directory if store.legacy else None


def run_status(cp: Checkpoint, run: dict[str, Any], live: bool) -> dict[str, Any]:
    """A run record with what a reader derives: ABORTED if its process died, elapsed,
    rate, ETA when a total is known."""
    out = dict(run)
    out.setdefault("cost_usd", None)  # a run of an imgbatch before prices.py: unknown
    if out.get("state") in LIVE_STATES and not live:
        out["state"] = "ABORTED"  # nobody holds the lock: the process died
    end = out.get("ended") or (time.time() if out["state"] in LIVE_STATES else out["updated"])
    out["elapsed"] = max(0.0, end - out["started"])
    counts = out.get("counts", {})
    done = counts.get("completed", 0) + counts.get("failed", 0)
    out["images_per_min"] = round(60 * done / out["elapsed"], 1) if out["elapsed"] else 0.0
    total = out.get("total")
    out["eta_seconds"] = None
    if total and out["state"] in LIVE_STATES and out["images_per_min"]:
        left = max(0, total - counts.get("processed", done))
        out["eta_seconds"] = round(60 * left / out["images_per_min"], 1)
    return out


def status(state: Path) -> dict[str, Any] | None:
    """Where the current or last run stands, or None if there was no run yet."""
    with open_checkpoint(state) as cp:
        runs = cp.runs()
        if not runs:
            return None
        out = run_status(cp, runs[0], cp.locked_by_other())
        jobs = cp.batch_jobs()
        if jobs:  # analyze --batch: the Batch API jobs not yet collected
            out["batch_jobs"] = [
                {k: job.get(k) for k in ("id", "name", "state", "requests", "counts", "submitted")}
                for job in jobs
            ]
        return out


def runs(state: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The run history, newest first."""
    with open_checkpoint(state) as cp:
        live = cp.locked_by_other()
        return [run_status(cp, r, live and i == 0) for i, r in enumerate(cp.runs()[:limit])]


def status_lines(s: dict[str, Any]) -> list[str]:
    """A run's status for people."""
    c = s.get("counts", {})
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["started"]))
    lines = [
        f"run {s['id']}: {s['state']} (pid {s['pid']} on {s['host']}), started {started}, "
        f"{human_duration(s['elapsed'])} elapsed"
        + (f", exit code {s['exit_code']}" if s.get("exit_code") is not None else ""),
        f"  root: {s['root']}  provider: {s['provider']} ({s['model']})"
        + ("  mode: batch (the Batch API price applies: half of live)" if _batch(s) else ""),
        f"  completed {c.get('completed', 0):,}  failed {c.get('failed', 0):,}  "
        f"cached {c.get('cached', 0):,}  processing {c.get('processing', 0):,}  "
        f"unchanged {c.get('skipped', 0):,}",
        f"  rate {s['images_per_min']:,.1f} images/min  tokens "
        f"{s['tokens']['input']:,} in / {s['tokens']['output']:,} out  estimated cost "
        f"{dollars(s['cost_usd'])}"
        + (" (batch answers at half price)" if _batch(s) else "")
        + (f"  ETA {human_duration(s['eta_seconds'])}" if s.get("eta_seconds") else ""),
    ]
    if s.get("errors"):
        lines.append(
            "  failed by code: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(s["errors"].items(), key=lambda kv: -kv[1]))
        )
    for code, message, n in s.get("top_errors", [])[:5]:
        lines.append(f"  {n:>6,} x {code}: {message}")
    b = s.get("batch")
    if b:
        lines.append(
            f"  batch: submitted {b.get('submitted', 0):,} requests in {b.get('jobs', 0):,} "
            f"jobs, collected {b.get('collected', 0):,} items"
        )
    jobs = s.get("batch_jobs") or []
    if jobs:
        lines.append(
            f"  batch jobs pending: {len(jobs):,} ({sum(j['requests'] for j in jobs):,} "
            "requests, at the Batch API price: half of live); `analyze --batch` collects them"
        )
    for job in jobs:
        c = job.get("counts") or {}
        done = c.get("succeeded", 0) + c.get("failed", 0)
        progress = f", {done:,} done" if done else ""
        submitted = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["submitted"]))
        lines.append(
            f"    {job['name'] or job['id']}  {job['state']}  {job['requests']:,} "
            f"requests{progress}, submitted {submitted}"
        )
    return lines


def _batch(run: dict[str, Any]) -> bool:
    return run.get("mode") == "batch"


def run_line(s: dict[str, Any]) -> str:
    """One row of `imgbatch runs`."""
    c = s.get("counts", {})
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["started"]))
    code = "" if s.get("exit_code") is None else str(s["exit_code"])
    top = s.get("top_errors") or []
    return (
        f"{s['id']:>5}  {started}  {s['state']:<10} {'batch' if _batch(s) else 'live':<5} "
        f"{human_duration(s['elapsed']):>9}  "
        f"{c.get('completed', 0):>8,} {c.get('failed', 0):>7,} {c.get('cached', 0):>7,}  "
        f"{s['images_per_min']:>9,.1f}  {s['tokens']['input'] + s['tokens']['output']:>10,}"
        f"  {dollars(s['cost_usd']):>10}  {code:>4}  {top[0][0] + ': ' + top[0][1] if top else ''}"
    )


RUNS_HEADER = (
    " run  started           state      mode        elapsed        ok  failed  cached  "
    "images/min      tokens        cost  exit  top error"
)


# -- export and prune ----------------------------------------------------------------


def items(
    cp: Checkpoint,
    status_filter: str | None = None,
    run: dict[str, Any] | None = None,
    after: tuple[str, str] | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Stored items as output records, folder by folder: every item of the latest run's
    settings, or (given `run`, a run record) only the items that run wrote.

    A page (`after` or `limit` given): the items in (folder, name) order instead, those
    whose (folder, name) comes after `after`, at most `limit`. Keyed, not counted, so
    items recorded meanwhile never shift a page (`serve`'s /items); each page reads
    every item's state, but builds records only for its own."""
    root = cp.root()
    last = run or next((r for r in cp.runs() if r.get("fingerprint")), None)
    if root is None or last is None:
        return
    fp = last["fingerprint"]
    chosen: Iterable[tuple[str, str, Any]] = (
        (rel_dir, name, states[name])
        for rel_dir, states in cp.iter_folders(fp)
        for name in sorted(states)
        if (run is None or states[name][2] == run["id"])
        and (not status_filter or ("ok" if states[name][1] is None else "error") == status_filter)
    )
    if after is not None and limit is None:
        raise ValueError("paging after a key needs a limit (it would sort every item)")
    if limit is not None:
        later = (item for item in chosen if after is None or item[:2] > after)
        chosen = heapq.nsmallest(limit, later, key=lambda item: item[:2])
    listed = None
    if root == "":  # a list run's: each item's `meta`, kept beside the checkpoint
        from imgbatch.listfile import ListMeta

        listed = ListMeta.read(cp.directory)
    try:
        for rel_dir, name, state in chosen:
            rec = record(cp, root, last, rel_dir, name, state)
            meta = listed.get(os.path.join(rel_dir, name)) if listed is not None else None
            if meta is not None:
                rec["meta"] = meta
            yield rec
    finally:
        if listed is not None:
            listed.close()


class StoredItem(NamedTuple):
    """One stored item of the latest run's settings without its export record
    (`stored_items`): the path as `record` makes it, the file as scanned, and whether
    its path can be looked up on disk (`local`: not a URL, a bucket object or a list's
    relative path, whose `exists` export leaves unknown)."""

    path: str
    hash: str | None
    size: int | None
    mtime_ns: int | None
    ok: bool
    local: bool
    fingerprint: str  #: the settings' fingerprint: `cp.result(fingerprint, hash)` is its result


def stored_items(cp: Checkpoint) -> Iterator[StoredItem]:
    """Every stored item of the latest run's settings, in `items`' order, as `items`
    sees them but lean: no export record is built, no result is read and nothing is
    looked up on disk (`dupes` reads 50,000 of these in a fraction of a re-scan and
    reads a result only where it needs one)."""
    root = cp.root()
    last = next((r for r in cp.runs() if r.get("fingerprint")), None)
    if root is None or last is None:
        return
    fp = last["fingerprint"]
    url_root = is_url(root)
    for rel_dir, states in cp.iter_folders(fp):
        # the folder with its separator: a name joins it by concatenation (os.path.join
        # per item is a tenth of this loop), as os.path.join(root, rel_dir, name) would
        folder = os.path.join(root, rel_dir, "")
        for name in sorted(states):
            content, code, _, size, mtime_ns, _ = states[name]
            if folder and not os.path.isabs(name):
                path = folder + name
            else:
                path = os.path.join(folder, name)
            local = not url_root and "://" not in path and os.path.isabs(path)  # as `record`
            yield StoredItem(path, content, size, mtime_ns, code is None, local, fp)


def record(
    cp: Checkpoint, root: str, run: dict[str, Any], rel_dir: str, name: str, state: Any
) -> dict[str, Any]:
    """One stored item as its export record: `state` is its ItemState under `run`'s
    fingerprint (`items`, and `search` for its hits)."""
    content, code, _, size, mtime_ns, message = state
    path = os.path.join(root, rel_dir, name)  # an empty rel_dir adds nothing
    rec = FileRecord(path, size, mtime_ns, content).fields()
    # an object or a URL is not looked up (a request per item), nor a list's relative
    # path (relative to where `analyze` ran): unknown
    unknown = is_url(root) or "://" in path or not os.path.isabs(path)
    rec["exists"] = None if unknown else os.path.lexists(path)
    rec["status"] = "ok" if code is None else "error"
    stored = cp.result(run["fingerprint"], content) if content else None
    rec["provider"] = (stored or run).get("provider")
    rec["model"] = (stored or run).get("model")
    rec["input_tokens"] = stored.get("input_tokens") if stored else None
    rec["output_tokens"] = stored.get("output_tokens") if stored else None
    if code is None:
        rec["result"] = stored.get("result") if stored else None
    else:
        rec["error"] = {"code": code, "message": message or ""}
    return rec


def _results(results: Path | None) -> Path:
    return results or results_dir(Settings(results=os.environ.get("IMGBATCH_RESULTS", "")))


def export(
    state: Path,
    fmt: str,
    output: str | None,
    out: IO[bytes],
    status_filter: str | None = None,
    results: Path | None = None,
    ls_root_url: str | None = None,
) -> int:
    """Write every stored result as JSONL, CSV or Parquet, or the ok ones as a Hugging
    Face `metadata.jsonl` (hf) or Label Studio tasks (labelstudio; `ls_root_url`: see
    datasets.LabelStudioWriter), to `output` (atomically) or `out`; returns how many
    records. Parquet and hf need `output`; hf, a ROOT inside its folder.

    `results` is the shared results store's folder (default: the user's).
    """
    from imgbatch import datasets, exports

    if fmt not in ("jsonl", "csv", "parquet", "hf", "labelstudio"):
        raise UsageError(
            f"unknown export format {fmt!r}: use jsonl, csv, parquet, xmp, captions, hf "
            "or labelstudio"
        )
    if fmt == "parquet":
        exports.require("parquet")  # before any work: a missing extra is the error to report
        if output is None:
            raise UsageError("--format parquet needs --output FILE: Parquet is not a stream")
    if fmt == "hf" and output is None:
        raise UsageError("--format hf needs --output DIR/metadata.jsonl, DIR holding ROOT")
    with open_checkpoint(state) as cp, open_results(results) as store:
        cp.results = store
        manifest: datasets.HfWriter | datasets.LabelStudioWriter | None = None
        if fmt in ("hf", "labelstudio"):
            root = cp.root()
            if root is None:
                raise UsageError(f"nothing was analysed with the checkpoint in {state}")
            # before anything is written: a ROOT outside the folder of hf's output
            if fmt == "hf":
                _files_beside(cp, "hf")
                manifest = datasets.HfWriter(root, str(output))
            else:
                manifest = datasets.LabelStudioWriter(root, ls_root_url)

        def write(fh: IO[bytes]) -> int:
            if manifest is not None:
                return manifest.write_all(items(cp, "ok"), fh).written
            records = items(cp, status_filter)
            if fmt == "jsonl":
                return exports.write_jsonl(records, fh)
            if fmt == "parquet":
                return exports.write_parquet(records, fh)
            # CSV columns: file fields first, then the keys of the first stored result
            first = next((r for r in items(cp, "ok") if r.get("result")), None)
            return exports.write_csv(records, fh, list(first["result"]) if first else [])

        if output is None:
            return write(out)
        return exports.write_output(output, write)


def _files_beside(cp: Checkpoint, fmt: str) -> None:
    """A UsageError for a format that writes beside the images when ROOT is a bucket
    (files beside objects are out of scope)."""
    root = cp.root()
    if root is not None and is_url(root):
        raise UsageError(f"--format {fmt} writes beside the images: not for a bucket ROOT ({root})")


def export_sidecars(
    state: Path,
    emit: Callable[[bytes], None],
    naming: str = "full",
    dry_run: bool = False,
    results: Path | None = None,
) -> exports.SidecarSummary:
    """Write or merge an XMP sidecar beside every image with a stored ok result that has
    tags or a description (see exports.SidecarWriter). With `dry_run`, write nothing and
    give `emit` one JSON line per sidecar that would change."""
    from imgbatch import exports

    writer = exports.SidecarWriter(emit, naming, dry_run)  # first: a missing extra, a bad naming
    with open_checkpoint(state) as cp, open_results(results) as store:
        _files_beside(cp, "xmp")
        cp.results = store
        return writer.write_all(items(cp, "ok"))


def export_captions(
    state: Path,
    emit: Callable[[bytes], None],
    options: dict[str, Any],
    results: Path | None = None,
) -> captions.CaptionSummary:
    """Write, replace or extend a caption file beside every image with a stored ok
    result (see captions.CaptionWriter, whose keyword arguments `options` holds). With
    `dry_run` among them, write nothing and give `emit` one JSON line per caption that
    would change."""
    from imgbatch import captions

    writer = captions.CaptionWriter(emit, **options)  # first: a bad option
    with open_checkpoint(state) as cp, open_results(results) as store:
        _files_beside(cp, "captions")
        cp.results = store
        return writer.write_all(items(cp, "ok"))


def forget_batch(state: Path, job_ref: str, wait: bool = False) -> dict[str, Any]:
    """Forget one pending Batch API job on purpose (`prune --forget-batch`), e.g. one whose
    key is gone for good: named by its id (its display name) or its name (``batches/...``,
    with or without the prefix). Its items are no longer batched, so the next `analyze
    --batch` submits them again. Returns the job's record; UsageError if no pending job
    has that name."""
    with open_checkpoint(state, write=True) as cp:
        cp.lock("prune", wait=wait)
        for job in cp.batch_jobs():
            name = str(job.get("name") or "")
            if job_ref and job_ref in {job.get("id"), name, name.removeprefix("batches/")}:
                # its request file, if any, is a leftover the next batch run deletes
                cp.end_batch_job(job["id"])
                return job
    raise UsageError(f"no pending batch job {job_ref!r}: `imgbatch status` lists them")


def prune(state: Path, wait: bool = False) -> int:
    """Drop items whose file no longer exists; returns how many were dropped.

    A list run's state (`--from-list`: items keyed by their path or URL as listed) is
    pruned of its absolute local paths only: a URL, a bucket object or a relative path
    (relative to where `analyze` ran) cannot be checked here and is kept, counted in a
    warning. Absence is not evidence that an item is gone."""
    with open_checkpoint(state, write=True) as cp:
        cp.lock("prune", wait=wait)
        root = cp.root()
        if root is None:
            return 0
        if is_url(root):
            raise UsageError(f"prune looks for files on disk: not for a bucket ROOT ({root})")
        dropped = unchecked = 0
        for fp in cp.fingerprints():
            # streamed: one folder (or one item of a large folder) at a time; forgetting
            # while iterating is safe (diskcache walks the keys by ranges of keys)
            for rel_dir, states in cp.iter_folders(fp):
                folder = os.path.join(root, rel_dir)  # a list run's root is ""
                if "://" in folder or not os.path.isabs(folder):
                    unchecked += len(states)
                    continue
                gone = [n for n in states if not os.path.lexists(os.path.join(folder, n))]
                if gone:
                    cp.forget(fp, rel_dir, gone)
                    dropped += len(gone)
        if unchecked:
            log.warning(
                "kept %s items of a list that prune cannot check on disk (URLs, bucket "
                "objects, relative paths)",
                f"{unchecked:,}",
            )
        return dropped


def follow(state: Path, current: dict[str, Any], every: float = 1.0) -> Iterator[dict[str, Any]]:
    """`current` and the status read again every `every` seconds while the run is live:
    the last one yielded is the status of the ended run (`status --follow`)."""
    yield current
    while current["state"] in LIVE_STATES:
        time.sleep(every)
        current = status(state) or current
        yield current
