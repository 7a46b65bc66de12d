"""The runs of `imgbatch serve`: started through the Python API (`imgbatch.analyze`) in
background threads, followed as numbered events, and read back from their checkpoint.

A served run takes ROOT's lock like the CLI and is recorded in the same checkpoint, so
`imgbatch status` shows it and a CLI run on the same ROOT is refused (and the other way
round). Its records are committed to the checkpoint only; failures also become events.

Events, numbered from 1 per run, for the event stream and its replay: `progress`
(published on change, at most PROGRESS_HZ a second, by a ticker beside the run),
`item` (a failed item's record; the last ITEM_EVENTS are kept for replay) and `done`
(the final status, last). Only the latest `progress` is kept: a client replaying from
an old id gets the failures it missed, the current progress, and `done` if it came.
The server's own limits are here too: at most `max_runs` live runs, none whose ROOT is
inside, or contains, a live run's ROOT (both would pay for the same files). No HTTP
here: see server.py.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import every_provider, load_settings, results_dir, state_dir
from imgbatch.errors import ExitCode, ImgbatchError, LockHeldError
from imgbatch.history import items, run_status
from imgbatch.lockfile import holder
from imgbatch.records import utf8_clean
from imgbatch.results import ResultStore

log = logging.getLogger("imgbatch")

PROGRESS_HZ = 4  # progress events a second at most
ITEM_EVENTS = 1000  # failures kept per run for replay (all of them are in /items)
KEEP_RUNS = 100  # ended runs remembered by the server; older ones are forgotten
START_WAIT = 30.0  # seconds a start waits to see the run hold ROOT's lock, or fail
#: the options a client may give a run (anything else is refused), with their types
OPTIONS: dict[str, type] = {
    "provider": str,
    "model": str,
    "workers": int,
    "limit": int,
    "max_side": int,
    "fresh": bool,
    "retry_failed": bool,
}
_RUN_OPTIONS = ("limit", "fresh", "retry_failed")  # run options of imgbatch.analyze
_LIVE = ("QUEUED", "PROCESSING")


@dataclass(frozen=True)
class Event:
    """One event of a run's stream."""

    id: int
    name: str  # progress | item | done
    data: dict[str, Any]


class TooManyRuns(Exception):
    """A start refused: the server already runs as many runs as it may (`--max-runs`)."""


class Overlapping(Exception):
    """A start refused: its ROOT is inside, or contains, the ROOT of a live run."""


class BadCursor(ValueError):
    """A paging cursor this server did not give."""


class StartError(Exception):
    """A run that could not start: the ImgbatchError it met (LockHeldError, UsageError,
    ...), before it held ROOT's lock."""

    def __init__(self, error: ImgbatchError) -> None:
        super().__init__(str(error))
        self.error = error


def api_options(options: dict[str, Any]) -> dict[str, Any]:
    """A client's options as `imgbatch.analyze` takes them: `model` sets the model of
    whichever provider runs (gemini_model, openai_model, ollama_model)."""
    return every_provider({k: v for k, v in options.items() if k != "provider"})


def record_key(rec: dict[str, Any], root: str) -> tuple[str, str]:
    """The (folder, name) under ROOT of a record `report.items` gave: its paging key
    (the exact name, from `path_bytes_b64` when it is not UTF-8)."""
    raw = rec.get("path_bytes_b64")
    path = os.fsdecode(base64.b64decode(raw)) if raw else str(rec["path"])
    folder, _, name = path[len(root) :].lstrip("/").rpartition("/")
    return folder, name


def encode_cursor(key: tuple[str, str]) -> str:
    """A paging key as an opaque cursor (URL-safe; any file name survives it)."""
    folder, name = key
    raw = os.fsencode(f"{folder}/{name}" if folder else name)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The key of a cursor from encode_cursor; BadCursor for anything else."""
    if len(cursor) > 8192 or not cursor.isascii():
        raise BadCursor(cursor)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (ValueError, binascii.Error):
        raise BadCursor(cursor) from None
    if not raw or b"\0" in raw or encode_cursor(("", os.fsdecode(raw))) != cursor:
        raise BadCursor(cursor)  # not canonical: not one this server gave
    folder, _, name = os.fsdecode(raw).rpartition("/")
    return folder, name


class ServedRun:
    """One run started by the server.

    Args:
        run_id: its id, unique across the server.
        root: the folder to analyse (resolved and allowed by the caller).
        options: the client's options (see OPTIONS).
        config: the config file the server reads, or None.
        grace: seconds its in-flight items get when it is cancelled (or the server stops).
    """

    def __init__(
        self,
        run_id: int,
        root: str,
        options: dict[str, Any],
        config: str | None,
        grace: float = 10.0,
    ):
        self.id = run_id
        self.root = root
        self.options = options
        self.config = config
        self.grace = grace
        settings = load_settings(config)
        self.state_folder = state_dir(root, settings)
        self.results = results_dir(settings)
        self.created = time.time()
        self.state = "QUEUED"
        self.error: str | None = None
        self.exit_code: int | None = None
        self.failure: ImgbatchError | None = None  # what stopped it, if anything did
        self.checkpoint_run: int | None = None  # its id in ROOT's checkpoint, once found
        self._before = self._newest_recorded()  # ROOT's last run id before this one
        self._lock = threading.Lock()
        self._last_id = 0
        self._items: deque[Event] = deque(maxlen=ITEM_EVENTS)
        self._progress: Event | None = None
        self._done: Event | None = None
        self._counts: tuple[int, int | None, int] = (0, None, 0)  # done, total, failed
        self._changed = True  # the first progress event tells a client it has begun
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._records: Any = None  # the API's Records, once created
        self._cancelled = False
        self._ended = threading.Event()
        self._final: dict[str, Any] | None = None
        # a daemon: a run stuck in a request that outlives the server's grace must not
        # keep the process from exiting (the kernel releases ROOT's lock)
        self._thread = threading.Thread(
            target=self._work, name=f"imgbatch-serve-{run_id}", daemon=True
        )

    # -- the run -------------------------------------------------------------------

    def start(self) -> None:
        """Start the run, and wait until it holds ROOT's lock (or ended); a run that
        failed before that raises StartError."""
        self._thread.start()
        ticker = threading.Thread(target=self._tick, name=f"imgbatch-tick-{self.id}", daemon=True)
        ticker.start()
        deadline = time.monotonic() + START_WAIT
        while not self._ended.wait(0.02):
            if self._holds_lock() or time.monotonic() > deadline:
                return  # under way (or slow to start: the client follows it like any run)
        if self.failure is not None and self._find_checkpoint_run() is None:
            raise StartError(self.failure)  # it never recorded a run: it never started

    def _holds_lock(self) -> bool:
        info = holder(self.state_folder)
        return info is not None and info.get("pid") == os.getpid()

    def _work(self) -> None:
        import imgbatch

        records = None
        try:
            records = imgbatch.analyze(
                self.root,
                self.options.get("provider"),
                on_progress=self._on_progress,
                config=self.config,
                **api_options(self.options),
            )
            with self._lock:
                self._records = records
                cancelled = self._cancelled
            if cancelled:
                records.stop(self.grace)  # before its first record: it never starts
            self._started_at = time.time()
            for record in records:
                if record.get("status") != "ok":
                    self._publish("item", record)
        except ImgbatchError as exc:
            self.failure = exc
            self.error = str(exc)
            self.exit_code = int(exc.exit_code)
        except Exception as exc:  # a bug: the run fails, the server goes on
            log.exception("served run %s failed", self.id)
            self.error = f"unexpected {type(exc).__name__}: {exc}"
            self.exit_code = int(ExitCode.FATAL)
        finally:
            if records is not None:
                records.close()  # nothing left to do once it ended; else stop it now
            self._finish()

    def _on_progress(self, done: int, total: int | None, failed: int) -> None:
        with self._lock:
            self._counts = (done, total, failed)
            self._changed = True
            if done and self.state == "QUEUED":
                self.state = "PROCESSING"

    def _tick(self) -> None:
        """Publish the progress when it changed, at most PROGRESS_HZ times a second."""
        while not self._ended.wait(1 / PROGRESS_HZ):
            self._publish_progress()

    def _publish_progress(self, final: bool = False) -> None:
        with self._lock:
            if not self._changed and not final:
                return
            self._changed = False
        self._publish("progress", self.progress(final))

    def progress(self, final: bool = False) -> dict[str, Any]:
        """Items done of the total, rate and ETA, as the run's thread last saw them.

        At the end of a run that went through (not cancelled, not failed), everything it
        was going to do is done: the total is what was done, 100%.
        """
        with self._lock:
            done, total, failed = self._counts
            state = self.state
        if final and state in ("COMPLETED", "PARTIAL"):
            total = done
        elapsed = max(0.0, (self._ended_at or time.time()) - (self._started_at or self.created))
        rate = 60 * done / elapsed if elapsed > 0 else 0.0
        eta = None
        if total is not None and rate > 0 and done < total and state in _LIVE:
            eta = round(60 * (total - done) / rate, 1)
        return {
            "run": self.id,
            "state": state,
            "done": done,
            "failed": failed,
            "total": total,
            "percent": (100.0 if total == 0 else round(100 * min(done, total) / total, 1))
            if total is not None
            else None,
            "elapsed": round(elapsed, 1),
            "images_per_min": round(rate, 1),
            "eta_seconds": eta,
        }

    def _finish(self) -> None:
        """The run's end: its final state from the checkpoint, the last progress, `done`."""
        self._ended_at = time.time()
        status = self._compose(final=False)  # the record's state, final by now
        with self._lock:
            if status.get("run") is None:  # no run record: it failed before its first
                self.state = "FAILED" if self.error else "ABORTED"
            else:
                self.state = status["state"]
                if self.exit_code is None:
                    self.exit_code = status.get("exit_code")
        self._publish_progress(final=True)
        self._final = self._compose(final=True)
        self._publish("done", self._final)
        self._ended.set()

    def cancel(self) -> bool:
        """Stop the run gracefully (the API's `stop(grace)`): it takes no new item, the
        items in flight are recorded for up to `grace` seconds, then it ends (ABORTED)
        and releases ROOT's lock. Returns at once; False if it had already ended."""
        with self._lock:
            if self._ended.is_set():
                return False
            self._cancelled = True
            records = self._records
        if records is not None:
            records.stop(self.grace)
        return True

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def live(self) -> bool:
        return not self._ended.is_set()

    # -- events --------------------------------------------------------------------

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._last_id += 1
            event = Event(self._last_id, name, data)
            if name == "item":
                self._items.append(event)
            elif name == "progress":
                self._progress = event
            else:
                self._done = event

    def events_after(self, last: int) -> list[Event]:
        """The kept events numbered after `last`, in order."""
        with self._lock:
            out = [e for e in self._items if e.id > last]
            for e in (self._progress, self._done):
                if e is not None and e.id > last:
                    out.append(e)
        return sorted(out, key=lambda e: e.id)

    @property
    def done_id(self) -> int | None:
        """The id of the `done` event, once the run has ended."""
        return self._done.id if self._done is not None else None

    # -- what the checkpoint says ----------------------------------------------------

    def _newest_recorded(self) -> int:
        if not (self.state_folder / "checkpoint").is_dir():
            return 0
        try:
            with Checkpoint(self.state_folder, create=False) as cp:
                runs = cp.runs()
        except ImgbatchError:
            return 0
        return int(runs[0]["id"]) if runs else 0

    def _find_checkpoint_run(self) -> dict[str, Any] | None:
        """This run's record in ROOT's checkpoint (read without the lock), as `status`
        derives it; None before it is written."""
        if not (self.state_folder / "checkpoint").is_dir():
            return None
        try:
            with Checkpoint(self.state_folder, create=False) as cp:
                runs = cp.runs()
                for i, run in enumerate(runs):
                    mine = (
                        run["id"] == self.checkpoint_run
                        if self.checkpoint_run is not None
                        else run["id"] > self._before and run.get("pid") == os.getpid()
                    )
                    if mine:
                        self.checkpoint_run = int(run["id"])
                        return run_status(cp, run, i == 0 and cp.locked_by_other())
        except ImgbatchError as exc:  # damaged: the run itself will say so
            log.debug("cannot read the run record: %s", exc)
        return None

    def status(self) -> dict[str, Any]:
        """What `imgbatch status --json` gives for this run (its `id` is the checkpoint's
        `run` here), plus the server's view: id, options, live progress, error."""
        return self._final if self._final is not None else self._compose()

    def _compose(self, final: bool = False) -> dict[str, Any]:
        """The status: the server's fields first, then its run record's (`status --json`'s,
        whose `id` is `run` here), then the live progress."""
        record = self._find_checkpoint_run()
        with self._lock:
            # while it runs, its record's state (QUEUED until its first item is written,
            # then PROCESSING); at its end, the one _finish settled
            state = record["state"] if record is not None and not final else self.state
            if record is None and self.error:
                state = "FAILED"
            body: dict[str, Any] = {
                "id": self.id,
                "run": record["id"] if record is not None else None,
                "root": utf8_clean(self.root),
                "state": state,
                "exit_code": self.exit_code,
                "error": self.error,
                "options": self.options,
                "created": self.created,
            }
        if record is not None:
            if body["exit_code"] is None:
                body["exit_code"] = record.get("exit_code")
            body.update((k, v) for k, v in record.items() if k not in body)
        body["progress"] = self.progress(final)
        return body

    def items(
        self, status: str | None, limit: int, after: tuple[str, str] | None
    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """This run's records (the items it wrote), at most `limit` of them in (folder,
        name) order after the key `after`, and the key to pass for the next page (None
        at the end). The cursor is a key, not a position: while the run goes on, a page
        never repeats an item, and items recorded meanwhile show up on later pages if
        they sort after it (a paging begun once the run has ended lists every one)."""
        if self.checkpoint_run is None and self._find_checkpoint_run() is None:
            return [], None
        with (
            ResultStore(self.results) as store,
            Checkpoint(self.state_folder, create=False, results=store) as cp,
        ):
            run = next((r for r in cp.runs() if r["id"] == self.checkpoint_run), None)
            root = cp.root()
            if run is None or root is None:
                return [], None
            page = list(items(cp, status, run, after=after, limit=limit + 1))
        if len(page) <= limit:
            return page, None
        return page[:limit], record_key(page[limit - 1], root)


class Runs:
    """Every run the server started, by id.

    Args:
        config: the config file runs read (the server's `--config`), or None.
        max_runs: live runs at most; a start beyond is TooManyRuns.
        grace: seconds a cancelled run's in-flight items get (the server's `--grace`).
    """

    def __init__(self, config: str | None = None, max_runs: int = 4, grace: float = 10.0) -> None:
        self.config = config
        self.max_runs = max_runs
        self.grace = grace
        self._runs: dict[int, ServedRun] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stopped_at: float | None = None  # when stop() first came

    def start(self, root: str, options: dict[str, Any]) -> ServedRun:
        """Start a run on ROOT (resolved); TooManyRuns, Overlapping, or StartError
        (LockHeldError, ...) if it could not start."""
        with self._lock:
            live = [r for r in self._runs.values() if r.live]
            if len(live) >= self.max_runs:
                raise TooManyRuns(
                    f"this server already runs {len(live)} runs, its most at once "
                    "(--max-runs): wait for one to end"
                )
            for other in live:
                common = os.path.commonpath([root, other.root])
                if root != other.root and common in (root, other.root):
                    where = "inside" if common == other.root else "a folder holding"
                    raise Overlapping(
                        f"{utf8_clean(root)} is {where} {utf8_clean(other.root)}, which served "
                        f"run {other.id} is analysing: both would pay for the same files"
                    )
            self._next += 1
            run = ServedRun(self._next, root, options, self.config, self.grace)
            busy = next((r for r in live if r.state_folder == run.state_folder), None)
            if busy is not None:  # the lock would refuse it: say which of ours holds it
                raise StartError(
                    LockHeldError(f"served run {busy.id} holds the lock on {run.state_folder}")
                )
            self._runs[run.id] = run
        try:
            run.start()
        except StartError:
            with self._lock:
                del self._runs[run.id]
            raise
        self._forget_old()
        return run

    def _forget_old(self) -> None:
        with self._lock:
            ended = [r.id for r in self._runs.values() if not r.live]
            for run_id in ended[: max(0, len(ended) - KEEP_RUNS)]:
                del self._runs[run_id]

    def get(self, run_id: int) -> ServedRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def all(self) -> list[ServedRun]:
        """Newest first."""
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: -r.id)

    def stop(self) -> None:
        """Cancel every live run (each gets the grace); returns at once."""
        with self._lock:
            if self._stopped_at is None:
                self._stopped_at = time.monotonic()
        for run in self.all():
            run.cancel()

    def close(self, slack: float = 3.0) -> None:
        """Stop every live run and wait for them to end, until `grace` + `slack` seconds
        after the first stop() (the server's shutdown: a run stuck in a request is left
        behind; the process's exit releases its lock)."""
        live = [r for r in self.all() if r.live]
        self.stop()
        deadline = (self._stopped_at or time.monotonic()) + self.grace + slack
        for run in live:
            run.join(max(0.0, deadline - time.monotonic()))
            if run.live:
                log.warning("served run %s did not end within the grace period", run.id)
