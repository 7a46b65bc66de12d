"""`imgbatch watch ROOT`: a catch-up run as `analyze` does, then every image created or
changed under ROOT analysed once it has settled. The only module that imports watchfiles
(the `watch` extra).

It is one long `analyze` run (one run record, PROCESSING while it watches, ABORTED once
a signal ends it) under ROOT's lock, held throughout: `WatchRun` is a `Pipeline` whose
files are ROOT's walk followed by the files that settle later, each hashed as the walk
hashes it (`Scanner.file`) and planned by the same Planner. So a moved or renamed image
is a stored result found by its content hash (`cached: true`, no request), an unchanged
one is skipped, and every line is written, flushed and synced before it is committed.

A file has settled when its size and mtime stayed the same for `settle` seconds with no
event for it meanwhile: a file still being copied is never read half-written. Deleted
files are left to `prune`.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from types import ModuleType

from imgbatch.config import Settings, state_dir
from imgbatch.errors import ExitCode, FatalError, OutputClosed, UsageError
from imgbatch.listing import IMAGE_EXTENSIONS, Excluder, ext_of
from imgbatch.output import JsonlSink, Progress
from imgbatch.pipeline.items import RunOptions
from imgbatch.pipeline.recorder import summary_lines
from imgbatch.pipeline.run import Pipeline, analyze_root
from imgbatch.pipeline.stages import RunContext
from imgbatch.records import FileRecord
from imgbatch.signals import Signals

log = logging.getLogger("imgbatch")

PIP_WATCH = "pip install 'imgbatch[watch]'"
#: what the warning of a reached inotify limit tells the user to run
SYSCTL = "sudo sysctl fs.inotify.max_user_watches=524288"
TICK = 0.2  # seconds between looks at what settled (and at a stop)

_ADDED, _MODIFIED, _DELETED = 1, 2, 3  # watchfiles.Change values

Signature = tuple[int, int]  # size, mtime_ns


def load() -> ModuleType:
    """watchfiles, or a UsageError naming the pip command when the extra is missing."""
    try:
        import watchfiles  # here only: a missing extra is a usage error, not an ImportError
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "watchfiles":
            raise UsageError(
                f"imgbatch watch needs watchfiles, which is not installed: {PIP_WATCH}"
            ) from None
        raise
    return watchfiles


def run(
    root: str,
    settings: Settings,
    signals: Signals,
    *,
    settle: float = 5.0,
    poll: bool = False,
    show_progress: bool = True,
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], int]:
    """`imgbatch watch`: the records on stdout (one line each, flushed as it is
    recorded) until a signal stops it; returns the summary lines and the exit code (the
    caller exits with the signal's). `poll`: poll ROOT instead of inotify."""
    if settle < 0:
        raise UsageError("--settle must be 0 or more seconds")
    if "://" in root:  # a bucket ROOT has no file system events to watch
        raise UsageError(f"watch takes a local folder, not {root}")
    watchfiles = load()  # before the lock or anything else
    sink = JsonlSink(flush_every=100, max_delay=0.1, whole_lines=True)
    signals.graceful = True  # a signal stops the watch; in-flight items finish
    state = state_dir(root, settings, env)

    def make(ctx: RunContext) -> Pipeline:
        return WatchRun(ctx, Changes(watchfiles, ctx.root, poll), settle, str(state))

    with Progress("images", settings.log_every, None, enabled=show_progress) as progress:
        try:
            summary, scanned = analyze_root(
                root,
                settings,
                RunOptions(),
                sink,
                progress,
                signals.stop,
                env,
                make=make,
                command="watch",
            )
        finally:
            try:
                sink.close()
            except (OutputClosed, OSError, FatalError):
                pass  # already failing: the first error is the one reported
    code = ExitCode.ITEM_FAILURES if summary.failed else ExitCode.OK
    return summary_lines(summary, scanned), int(code)


class Changes:
    """ROOT's file system events, from watchfiles in a thread, as (change, path) in a
    queue. Falls back to polling, once, when the inotify watch limit is reached.

    Args:
        watchfiles: the module (see `load`).
        root: the folder to watch (absolute).
        poll: poll from the start (no inotify).
    """

    def __init__(self, watchfiles: ModuleType, root: str, poll: bool) -> None:
        self._watchfiles = watchfiles
        self.root = root
        self.poll = poll
        self.events: queue.Queue[tuple[int, str]] = queue.Queue()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgbatch-watch", daemon=True)

    def start(self, stop: threading.Event) -> None:
        """Start watching; returns once the watch is in place (events from now on are
        queued), or `stop` is set."""
        self._thread.start()
        while not self._ready.wait(TICK) and not stop.is_set():
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # watchfiles' ignore_permission_denied ignores every error of adding a watch, the
        # inotify limit's too: it is used only once an unreadable folder needs it
        unreadable = False
        while not self._stop.is_set():
            try:
                for changes in self._watchfiles.watch(
                    self.root,
                    watch_filter=None,  # our own selection (the walk's rules) applies
                    debounce=200,
                    step=50,
                    stop_event=self._stop,
                    rust_timeout=int(TICK * 1000),
                    yield_on_timeout=True,  # the first yield says the watch is in place
                    raise_interrupt=False,
                    force_polling=self.poll,
                    ignore_permission_denied=unreadable,
                ):
                    for change, path in changes:
                        self.events.put((int(change), path))
                    self._ready.set()
                return
            except Exception as exc:  # OSError, WatchfilesRustInternalError
                if "watch limit" in str(exc) and not self.poll:
                    log.warning(
                        "the system's inotify watch limit is reached: polling ROOT instead "
                        "(slower); raise the limit with `%s`",
                        SYSCTL,
                    )
                    self.poll = True
                    continue
                if isinstance(exc, PermissionError) or "ermission denied" in str(exc):
                    if not unreadable:
                        log.warning("some folders under ROOT cannot be read: not watched")
                        unreadable = True
                        continue
                self.error = exc
                self._ready.set()
                return


class Settler:
    """The files waiting to settle: each is due `settle` seconds after its last event
    or change, and settled when its size and mtime are then as they were.

    Args:
        settle: seconds a file must stay unchanged.
        follow: symlinks are followed (else a symlink is never a file to analyse).
    """

    def __init__(self, settle: float, follow: bool) -> None:
        self.settle = settle
        self.follow = follow
        self._waiting: dict[str, tuple[Signature | None, float]] = {}  # path: sig, due
        self._due: list[tuple[float, str]] = []  # a heap; entries older than _waiting's are stale

    def __len__(self) -> int:
        return len(self._waiting)

    def touch(self, path: str, now: float) -> None:
        """An event for `path`: its clock starts again."""
        self._set(path, self.signature(path), now + self.settle)

    def forget(self, path: str) -> None:
        """`path` was deleted (a folder: every file below it)."""
        self._waiting.pop(path, None)
        below = path.rstrip("/") + "/"
        for p in [p for p in self._waiting if p.startswith(below)]:
            del self._waiting[p]

    def settled(self, now: float) -> list[tuple[str, Signature]]:
        """The files that settled by `now` (no longer waiting), with their signature."""
        out: list[tuple[str, Signature]] = []
        while self._due and self._due[0][0] <= now:
            due, path = heapq.heappop(self._due)
            entry = self._waiting.get(path)
            if entry is None or entry[1] != due:
                continue  # stale: touched again since, or forgotten
            sig = self.signature(path)
            if sig is None:  # gone, or not a regular file any more
                del self._waiting[path]
            elif sig == entry[0]:
                del self._waiting[path]
                out.append((path, sig))
            else:  # still changing
                self._set(path, sig, now + self.settle)
        return sorted(out)

    def _set(self, path: str, sig: Signature | None, due: float) -> None:
        self._waiting[path] = (sig, due)
        heapq.heappush(self._due, (due, path))

    def signature(self, path: str) -> Signature | None:
        """A regular file's size and mtime, or None."""
        try:
            st = os.stat(path, follow_symlinks=self.follow)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size, st.st_mtime_ns


class WatchRun(Pipeline):
    """The `watch` run: a `Pipeline` whose files are ROOT's walk, then each file that
    settles (see the module docstring). Between files, finished work is recorded and
    its lines flushed, so a line goes out as its item is recorded.

    Args:
        ctx: what the run is given.
        changes: ROOT's events (started at the beginning of the walk).
        settle: seconds a file must stay unchanged before it is analysed.
        state: ROOT's state folder (never watched, when it is inside ROOT).
    """

    def __init__(self, ctx: RunContext, changes: Changes, settle: float, state: str) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.changes = changes
        self.settler = Settler(settle, s.follow_symlinks)
        self._state = os.path.abspath(state).rstrip("/") + "/"
        self._exclude = Excluder(s.exclude) if s.exclude else None

    def records(self) -> Iterator[FileRecord]:
        """ROOT's walk, then the files that settle, until the run stops."""
        self.changes.start(self.stop)  # before the walk: nothing changed during it is lost
        try:
            yield from self.scanner
            log.info("caught up: watching %s for new or changed images", self.root)
            while not self.stop.is_set() and self._fatal is None:
                if self.changes.error is not None:
                    raise FatalError(f"watching ROOT failed: {self.changes.error}")
                self._take_events()
                for path, sig in self.settler.settled(time.monotonic()):
                    rec = self.scanner.file(path)
                    if rec is None:
                        continue
                    if self.settler.signature(path) != sig:  # changed while it was read
                        self.settler.touch(path, time.monotonic())  # it settles later
                        continue
                    yield rec
                self._idle()
        finally:
            self.changes.close()

    def _take_events(self) -> None:
        """Events queued so far (waiting up to a tick for the first)."""
        try:
            change, path = self.changes.events.get(timeout=TICK)
        except queue.Empty:
            return
        now = time.monotonic()
        while True:
            self._event(change, path, now)
            try:
                change, path = self.changes.events.get_nowait()
            except queue.Empty:
                return

    def _event(self, change: int, path: str, now: float) -> None:
        if change == _DELETED:
            self.settler.forget(path)
            return
        if path.startswith(self._state):
            return
        try:
            st = os.stat(path, follow_symlinks=self.settings.follow_symlinks)
        except OSError:
            return  # gone already
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir:
            if self._selected(path):
                self.settler.touch(path, now)
            return
        # a folder created or moved in: its files get no events of their own
        if not self._selected(path, folder=True):
            return
        for top, dirs, files in os.walk(path, followlinks=self.settings.follow_symlinks):
            dirs[:] = [d for d in dirs if self._selected(os.path.join(top, d), folder=True)]
            for name in files:
                p = os.path.join(top, name)
                if self._selected(p):
                    self.settler.touch(p, now)

    def _selected(self, path: str, folder: bool = False) -> bool:
        """Whether the walk would take `path` (hidden names, --exclude, the extensions
        of images unless --all-files; its type is checked when it settles)."""
        rel = os.path.relpath(path, self.root)
        if rel == "." or rel.startswith("../") or rel == "..":
            return False
        parts = rel.split("/")
        s = self.settings
        if not s.include_hidden and any(p.startswith(".") for p in parts):
            return False
        if self._exclude is not None:
            for i, name in enumerate(parts):
                is_dir = folder or i < len(parts) - 1
                if self._exclude.excluded(name, "/".join(parts[: i + 1]), is_dir):
                    return False
        return folder or s.all_files or ext_of(parts[-1]) in IMAGE_EXTENSIONS

    def _idle(self) -> None:
        """Record the work that finished, and let its lines out now."""
        if self._pending:
            assert self._engine is not None
            self._engine.flush()  # an engine holding items back to group them sends them
            self._drain(block=False)
        self.recorder.commit_written(force=True)
        self.sink.flush()
        self.recorder.save()
