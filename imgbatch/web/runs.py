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
No HTTP here: see server.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings, load_settings, results_dir, state_dir
from imgbatch.errors import ExitCode, ImgbatchError
from imgbatch.lockfile import holder
from imgbatch.records import utf8_clean
from imgbatch.report import items, run_status
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


class StartError(Exception):
    """A run that could not start: the ImgbatchError it met (LockHeldError, UsageError,
    ...), before it held ROOT's lock."""

    def __init__(self, error: ImgbatchError) -> None:
        super().__init__(str(error))
        self.error = error


def api_options(options: dict[str, Any]) -> dict[str, Any]:
    """A client's options as `imgbatch.analyze` takes them: `model` sets the model of
    whichever provider runs (gemini_model, openai_model, ollama_model)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(Settings)}
    out = {k: v for k, v in options.items() if k not in ("model", "provider")}
    if "model" in options:
        for section in ("gemini", "openai", "ollama"):
            if f"{section}_model" in names:
                out[f"{section}_model"] = options["model"]
    return out


class ServedRun:
    """One run started by the server.

    Args:
        run_id: its id, unique across the server.
        root: the folder to analyse (resolved and allowed by the caller).
        options: the client's options (see OPTIONS).
        config: the config file the server reads, or None.
    """

    def __init__(self, run_id: int, root: str, options: dict[str, Any], config: str | None):
        self.id = run_id
        self.root = root
        self.options = options
        self.config = config
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
        self._closed = threading.Event()  # set by cancel() once the run is closed
        self._ended = threading.Event()
        self._final: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._work, name=f"imgbatch-serve-{run_id}")

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
                records.close()
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
                records.close()  # nothing to do if cancel() closed it first...
            if self._cancelled:
                self._closed.wait()  # ...but its record is final only once that returned
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
        """Stop the run (the API's stop: items taken are committed, those in flight are
        redone by the next run); False if it had already ended."""
        with self._lock:
            if self._ended.is_set():
                return False
            self._cancelled = True
            records = self._records
        if records is not None:
            records.close()  # returns once the run has ended and released ROOT's lock
        self._closed.set()
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
        self, status: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """This run's records (the items it wrote), `limit` from `offset` on, and the
        offset of the next page (None at the end). Items are listed in the checkpoint's
        order; while the run goes on, a page may repeat an item already seen (the listing
        only grows), never miss one."""
        if self.checkpoint_run is None and self._find_checkpoint_run() is None:
            return [], None
        out: list[dict[str, Any]] = []
        with (
            ResultStore(self.results) as store,
            Checkpoint(self.state_folder, create=False, results=store) as cp,
        ):
            run = next((r for r in cp.runs() if r["id"] == self.checkpoint_run), None)
            root = cp.root()
            if run is None or root is None:
                return [], None
            seen = 0
            for rec in items(cp, status, run):
                if seen >= offset:
                    if len(out) == limit:
                        return out, seen
                    out.append(rec)
                seen += 1
        return out, None


class Runs:
    """Every run the server started, by id.

    Args:
        config: the config file runs read (the server's `--config`), or None.
    """

    def __init__(self, config: str | None = None) -> None:
        self.config = config
        self._runs: dict[int, ServedRun] = {}
        self._next = 0
        self._lock = threading.Lock()

    def start(self, root: str, options: dict[str, Any]) -> ServedRun:
        """Start a run on ROOT; StartError (LockHeldError, ...) if it could not start."""
        with self._lock:
            self._next += 1
            run = ServedRun(self._next, root, options, self.config)
            busy = next(
                (r for r in self._runs.values() if r.live and r.state_folder == run.state_folder),
                None,
            )
            if busy is not None:  # the lock would refuse it: say which of ours holds it
                from imgbatch.errors import LockHeldError

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

    def close(self, timeout: float = 30.0) -> None:
        """Stop every live run and wait for them to end (the server's shutdown)."""
        live = [r for r in self.all() if r.live]
        for run in live:
            run.cancel()
        deadline = time.monotonic() + timeout
        for run in live:
            run.join(max(0.0, deadline - time.monotonic()))
