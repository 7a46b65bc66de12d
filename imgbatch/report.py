"""Reading the checkpoint: `status`, the run history, `export` and `prune`.

`status`, `runs` and `export` only read (SQLite in WAL mode lets them run beside a
writer, e.g. a cron run in the background); `prune` writes and takes the lock.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings, results_dir
from imgbatch.errors import OutputError, UsageError
from imgbatch.output import human_duration
from imgbatch.records import FileRecord, json_line
from imgbatch.results import ResultStore

LIVE_STATES = ("QUEUED", "PROCESSING")
FILE_COLUMNS = [
    "path",
    "path_bytes_b64",
    "hash",
    "size",
    "extension",
    "mtime",
    "exists",
    "status",
    "provider",
    "model",
    "error_code",
    "error_message",
]


def open_checkpoint(state: Path) -> Checkpoint:
    """An existing checkpoint, for reading; a clear error when there is none."""
    if not (state / "checkpoint").is_dir():
        raise UsageError(
            f"no checkpoint in {state}: run `imgbatch analyze` first, or pass "
            "the folder given to --checkpoint"
        )
    return Checkpoint(state, create=False)


def run_status(cp: Checkpoint, run: dict[str, Any], live: bool) -> dict[str, Any]:
    """A run record with what a reader derives: ABORTED if its process died, elapsed,
    rate, ETA when a total is known."""
    out = dict(run)
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
        return run_status(cp, runs[0], cp.locked_by_other())


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
        f"  root: {s['root']}  provider: {s['provider']} ({s['model']})",
        f"  completed {c.get('completed', 0):,}  failed {c.get('failed', 0):,}  "
        f"cached {c.get('cached', 0):,}  processing {c.get('processing', 0):,}  "
        f"unchanged {c.get('skipped', 0):,}",
        f"  rate {s['images_per_min']:,.1f} images/min  tokens "
        f"{s['tokens']['input']:,} in / {s['tokens']['output']:,} out"
        + (f"  ETA {human_duration(s['eta_seconds'])}" if s.get("eta_seconds") else ""),
    ]
    if s.get("errors"):
        lines.append(
            "  failed by code: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(s["errors"].items(), key=lambda kv: -kv[1]))
        )
    for code, message, n in s.get("top_errors", [])[:5]:
        lines.append(f"  {n:>6,} x {code}: {message}")
    return lines


def run_line(s: dict[str, Any]) -> str:
    """One row of `imgbatch runs`."""
    c = s.get("counts", {})
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["started"]))
    code = "" if s.get("exit_code") is None else str(s["exit_code"])
    top = s.get("top_errors") or []
    return (
        f"{s['id']:>5}  {started}  {s['state']:<10} {human_duration(s['elapsed']):>9}  "
        f"{c.get('completed', 0):>8,} {c.get('failed', 0):>7,} {c.get('cached', 0):>7,}  "
        f"{s['images_per_min']:>9,.1f}  {s['tokens']['input'] + s['tokens']['output']:>10,}"
        f"  {code:>4}  {top[0][0] + ': ' + top[0][1] if top else ''}"
    )


RUNS_HEADER = (
    " run  started           state          elapsed        ok  failed  cached  "
    "images/min      tokens  exit  top error"
)


# -- export and prune ----------------------------------------------------------------


def _items(cp: Checkpoint, status_filter: str | None) -> Iterator[dict[str, Any]]:
    """Every stored item of the latest run's settings, as an output record."""
    root = cp.root()
    last = next((r for r in cp.runs() if r.get("fingerprint")), None)
    if root is None or last is None:
        return
    fp = last["fingerprint"]
    for rel_dir, states in cp.iter_folders(fp):
        for name in sorted(states):
            content, code, _run, size, mtime_ns, message = states[name]
            status_ = "ok" if code is None else "error"
            if status_filter and status_ != status_filter:
                continue
            path = os.path.join(root, rel_dir, name)  # an empty rel_dir adds nothing
            rec = FileRecord(path, size, mtime_ns, content).fields()
            rec["exists"] = os.path.lexists(path)
            rec["status"] = status_
            stored = cp.result(fp, content) if content else None
            rec["provider"] = (stored or last).get("provider")
            rec["model"] = (stored or last).get("model")
            if code is None:
                rec["result"] = stored.get("result") if stored else None
            else:
                rec["error"] = {"code": code, "message": message or ""}
            yield rec


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "; ".join(
            v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value
        )
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if value is None:
        return ""
    return value


def _write_export(
    records: Iterator[dict[str, Any]], fmt: str, out: IO[bytes], result_cols: list[str]
) -> int:
    n = 0
    if fmt == "jsonl":
        for rec in records:
            out.write(json_line(rec))
            n += 1
        return n
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.writer(text)
    writer.writerow(FILE_COLUMNS + result_cols + ["result_other"])
    for rec in records:
        result = rec.pop("result", None) or {}
        error = rec.pop("error", None) or {}
        row = [_csv_value(rec.get(c)) for c in FILE_COLUMNS[:10]]
        row += [error.get("code", ""), error.get("message", "")]
        row += [_csv_value(result.get(c)) for c in result_cols]
        other = {k: v for k, v in result.items() if k not in result_cols}
        row.append(_csv_value(other) if other else "")
        writer.writerow(row)
        n += 1
    text.detach()
    return n


def export(
    state: Path,
    fmt: str,
    output: str | None,
    out: IO[bytes],
    status_filter: str | None = None,
    results: Path | None = None,
) -> int:
    """Write every stored result as JSONL or CSV to `output` (atomically) or `out`.

    `results` is the shared results store's folder (default: the user's).
    """
    if fmt not in ("jsonl", "csv"):
        raise UsageError(f"unknown export format {fmt!r}: use jsonl or csv")
    if results is None:
        results = results_dir(Settings(results=os.environ.get("IMGBATCH_RESULTS", "")))
    with open_checkpoint(state) as cp, ResultStore(results) as store:
        cp.results = store
        # CSV columns: file fields first, then the keys of the first stored result
        first = next((r for r in _items(cp, "ok") if r.get("result")), None)
        result_cols = list(first["result"]) if first else []
        records = _items(cp, status_filter)
        if output is None:
            return _write_export(records, fmt, out, result_cols)
        target = Path(output)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                n = _write_export(records, fmt, fh, result_cols)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)  # a reader never sees half a file
        except OSError as exc:  # a full disk, an I/O error: the old file stays as it was
            os.unlink(tmp)
            raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
        except BaseException:
            os.unlink(tmp)
            raise
        return n


def prune(state: Path, wait: bool = False) -> int:
    """Drop items whose file no longer exists; returns how many were dropped."""
    with open_checkpoint(state) as cp:
        cp.lock("prune", wait=wait)
        root = cp.root()
        if root is None:
            return 0
        dropped = 0
        for fp in cp.fingerprints():
            # streamed: one folder (or one item of a large folder) at a time; forgetting
            # while iterating is safe (diskcache walks the keys by rowid ranges)
            for rel_dir, states in cp.iter_folders(fp):
                gone = [n for n in states if not os.path.lexists(os.path.join(root, rel_dir, n))]
                if gone:
                    cp.forget(fp, rel_dir, gone)
                    dropped += len(gone)
        return dropped
