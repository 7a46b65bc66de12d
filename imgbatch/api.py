"""The public Python API: `scan_batches`, `scan` and `analyze`, the records of the CLI.

Options are the names of the settings (`config.Settings`: `workers=`, `rpm=`,
`max_side=`, ...) and, for `analyze`, of the run options (`fresh=`, `limit=`, ...); like
the command's flags they override the config file and the `IMGBATCH_*` environment, so
a script and the command share one state folder and one results store. An unknown
option is a TypeError naming the closest valid one. Nothing prints and nothing exits:
failures are `imgbatch.errors` exceptions, and logs go to the `imgbatch` logger, which
is silent unless the application configures logging.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import json
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from imgbatch.config import Settings, load_settings, state_dir
from imgbatch.errors import UsageError
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, OutputClosed, Progress
from imgbatch.records import FileRecord
from imgbatch.scanner import Scanner, batched, check_root

if TYPE_CHECKING:
    from imgbatch.pipeline import RunOptions

__all__ = ["Records", "analyze", "scan", "scan_batches"]

# a library is silent by default: without this, Python's last-resort handler would print
# the pipeline's warnings on stderr
logging.getLogger("imgbatch").addHandler(logging.NullHandler())

PathArg = str | os.PathLike[str]
ProgressCallback = Callable[[int, int | None, int], object]

_SETTINGS = frozenset(f.name for f in dataclasses.fields(Settings))
#: what a scan reads: the [scan] settings, and where ROOT's hash cache lives
_SCAN_OPTIONS = frozenset(
    f.name for f in dataclasses.fields(Settings) if f.metadata["section"] == "scan"
) | {"checkpoint"}


# -- scan --------------------------------------------------------------------------


def scan_batches(
    root: PathArg,
    batch_size: int | None = None,
    *,
    config: PathArg | None = None,
    **options: Any,
) -> Iterator[list[dict[str, Any]]]:
    """The files under ROOT in lists of `batch_size` records, lazily, as `imgbatch scan`
    prints them.

    The tree is walked as the batches are taken, so memory stays flat however big it
    is; hashes are looked up in and stored to ROOT's hash cache, as the command does.

    Args:
        root: the folder to walk.
        batch_size: records per list (the last one may be shorter); default: the
            `batch_size` setting (100).
        config: a config file to read instead of `$XDG_CONFIG_HOME/imgbatch/config.toml`.
        **options: scan settings by name: `all_files`, `include_hidden`,
            `follow_symlinks`, `exclude`, `hash`, `hash_threads`, `hash_cache`,
            `checkpoint`.

    Returns:
        An iterator of lists of dicts `{path, hash, size, extension, mtime, status}`
        (plus `error` for a file that could not be read, `path_bytes_b64` for a name
        that is not UTF-8). Closing it (or dropping it) ends the walk.

    Raises:
        TypeError: an unknown option.
        UsageError: ROOT is missing or not a folder; ConfigError (a UsageError) for an
            invalid setting.
    """
    if batch_size is not None:
        options["batch_size"] = batch_size
    settings = _settings("scan_batches", config, options, _SCAN_OPTIONS)
    records = _scanned(check_root(os.fspath(root)), settings)
    return _batches(records, settings.batch_size)


def scan(
    root: PathArg, *, config: PathArg | None = None, **options: Any
) -> Iterator[dict[str, Any]]:
    """The files under ROOT one record at a time, lazily, as `imgbatch scan` prints them.

    Args:
        root: the folder to walk.
        config: a config file to read instead of `$XDG_CONFIG_HOME/imgbatch/config.toml`.
        **options: scan settings by name, as for `scan_batches`.

    Returns:
        An iterator of dicts, the records of `scan_batches`.

    Raises:
        TypeError: an unknown option.
        UsageError: ROOT is missing or not a folder; ConfigError for an invalid setting.
    """
    settings = _settings("scan", config, options, _SCAN_OPTIONS)
    return _fields(_scanned(check_root(os.fspath(root)), settings))


def _scanned(root: str, settings: Settings) -> Generator[FileRecord, None, None]:
    """ROOT's records, with its hash cache when hashing, as `scanner.run_scan` has them."""
    cache = None
    if settings.hash and settings.hash_cache:
        from imgbatch.checkpoint import claim_root

        state = state_dir(root, settings)
        claim_root(state, root)  # a state folder serves one ROOT
        cache = HashCache(state / "hashcache")
    try:
        # closing this generator closes the scanner's: it keeps the hashes computed so far
        yield from Scanner(root, settings, cache)
    finally:
        if cache is not None:
            cache.close()


def _fields(records: Generator[FileRecord, None, None]) -> Iterator[dict[str, Any]]:
    try:
        for rec in records:
            yield rec.fields()
    finally:
        records.close()


def _batches(
    records: Generator[FileRecord, None, None], size: int
) -> Iterator[list[dict[str, Any]]]:
    try:
        for batch in batched(records, size):
            yield [rec.fields() for rec in batch]
    finally:
        records.close()


# -- analyze -----------------------------------------------------------------------


def analyze(
    root: PathArg,
    provider: str | None = None,
    on_progress: ProgressCallback | None = None,
    *,
    config: PathArg | None = None,
    **options: Any,
) -> Records:
    """Analyse every new or changed image under ROOT: the records `imgbatch analyze`
    prints, resumably, through the same checkpoint and under the same lock.

    The run starts at the first `next()`, in a background thread, and holds ROOT's lock
    until it ends or is closed. A record is committed to the checkpoint once it has
    been handed to the caller, never before, so the next run does not yield it again
    (commits are grouped as the command's are: a process killed meanwhile repeats the
    last group's records next time, never loses one). Stopping early
    (`break`, `close()`, leaving `with imgbatch.analyze(...) as records:`, an exception)
    abandons the items finished but not yet taken and those in flight: the next run
    redoes them. A run left unclosed is closed when it is garbage-collected, like a
    generator; use `with` or `close()` to release the lock at a known moment.

    Args:
        root: the folder to analyse.
        provider: auto | local | gemini | openai | ollama; default: the `provider`
            setting (auto: gemini only when a key is configured for imgbatch, else the
            offline analyzer).
        on_progress: called as `on_progress(done, total, failed)` as items finish, in
            the thread that iterates, before the next record is returned: items done
            and failed so far in this run, and the items it will do (None until the
            count beside the work has ended, or `limit` when that is smaller).
        config: a config file to read instead of `$XDG_CONFIG_HOME/imgbatch/config.toml`.
        **options: any setting by name (`workers`, `rpm`, `max_side`, `gemini_model`,
            `exclude`, `checkpoint`, ...); the run options of the command's flags
            (`fresh`, `retry_failed`, `emit_all`, `limit`, `dry_run`, ...: the fields
            of `pipeline.RunOptions`); and `wait`, to wait for another run's lock
            instead of raising LockHeldError. `grace` has no effect: in-flight items
            are abandoned at once when the caller stops.

    Returns:
        An iterator of dicts, one per file this run processed (with `emit_all`, also
        the stored results of unchanged files); also a context manager.

    Raises:
        TypeError: an unknown option.
        UsageError: ROOT is missing or not a folder, an invalid option value;
            ConfigError for an invalid setting.

    While iterating, a run-level stop raises its `imgbatch.errors` exception after the
    records written before it: LockHeldError (another run holds the lock),
    QuotaExhaustedError, AuthError, CheckpointError, UsageError (e.g. an unknown
    provider). A failed item is a record with `"status": "error"`, not an
    exception.
    """
    from imgbatch.pipeline import RunOptions

    fields = dataclasses.fields(RunOptions)
    run_names = {f.name for f in fields} | {"wait"}
    _check_names("analyze", options, _SETTINGS | run_names)
    run = {name: options.pop(name) for name in list(options) if name in run_names}
    for name in [f.name for f in fields if isinstance(f.default, bool)] + ["wait"]:
        if not isinstance(run.get(name, False), bool):
            raise UsageError(f"{name} must be True or False, not {run[name]!r}")
    limit = run.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be a whole number of at least 1, not {limit!r}")
    wait = run.pop("wait", False)
    # in-flight items finishing after the caller stopped could not be yielded: no grace
    settings = load_settings(config, {"provider": provider, **options}).replace(grace=0.0)
    return Records(check_root(os.fspath(root)), settings, RunOptions(**run), on_progress, wait)


class Records(Iterator[dict[str, Any]]):
    """The records of one `analyze` run (see `analyze`): an iterator, `close()`, and a
    context manager that closes it."""

    def __init__(
        self,
        root: str,
        settings: Settings,
        run: RunOptions,
        on_progress: ProgressCallback | None,
        wait: bool,
    ) -> None:
        self._args = (root, settings, run, wait)
        self._on_progress = on_progress
        self._channel = _Channel()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __iter__(self) -> Records:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            self._start()
        try:
            record = self._receive()
        except BaseException:  # the run's error, on_progress's, an interrupt: all stop it
            self.close()
            raise
        if record is None:
            self.close()
            raise StopIteration
        return record

    def close(self) -> None:
        """Stop the run, if it is going, and wait until it has released ROOT's lock.

        Items finished but not yet taken, and those in flight, are not recorded: the next
        run redoes them. Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._channel.leave()
            self._thread.join()

    def __enter__(self) -> Records:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # like a generator's finalizer: `for r in imgbatch.analyze(x): break` leaves no
        # run holding the lock (the thread holds no reference to this object)
        self.close()

    def _start(self) -> None:
        root, settings, run, wait = self._args
        channel = self._channel
        progress = _ProgressEvents(channel) if self._on_progress is not None else None
        self._thread = threading.Thread(
            target=_analysis,
            args=(root, settings, run, _Handoff(channel), progress, self._stop, wait, channel),
            name="imgbatch-analyze",
            daemon=True,  # an unclosed run must not keep the interpreter from exiting
        )
        self._thread.start()
        _open_runs.add(self)

    def _receive(self) -> dict[str, Any] | None:
        """The next record, after the progress events before it; None at the end."""
        while True:
            kind, value = self._channel.get()
            if kind == "line":
                record: dict[str, Any] = json.loads(value)
                self._channel.taken()  # now the run may commit it
                return record
            if kind == "progress":
                if self._on_progress is not None:
                    self._on_progress(*value)
            elif kind == "error":
                raise value
            else:
                return None


#: runs started and not yet closed: closed at exit (their threads are daemons, which the
#: interpreter would stop wherever they are), so what was taken is committed
_open_runs: weakref.WeakSet[Records] = weakref.WeakSet()


@atexit.register
def _close_open_runs() -> None:
    for records in list(_open_runs):
        records.close()


def _analysis(
    root: str,
    settings: Settings,
    run: RunOptions,
    sink: JsonlSink,
    progress: Progress | None,
    stop: threading.Event,
    wait: bool,
    channel: _Channel,
) -> None:
    """The body of a run's thread: `imgbatch analyze` into the handoff sink."""
    from imgbatch.pipeline import analyze_root

    try:
        analyze_root(root, settings, run, sink, progress=progress, stop=stop, wait=wait)
    except OutputClosed:
        pass  # the caller stopped: the pipeline committed exactly what it had taken
    except BaseException as exc:  # raised in the caller's thread, after the records before
        channel.put("error", exc)
    channel.put("end")


class _Channel:
    """From a run's thread to the caller, in order: each line, progress, the end.

    A line is handed over, not queued: `hand_over` returns only once the caller has
    taken it. So everything the pipeline wrote was taken, and its write-then-commit
    order makes "yielded" mean "written": a record is committed after it was taken,
    never before, and none is ever committed that the caller did not get.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: deque[tuple[str, Any]] = deque()
        self._handed = 0  # lines handed over so far
        self._taken = 0  # lines the caller took
        self._left = False  # the caller stopped

    def hand_over(self, line: bytes) -> None:
        """Give the caller `line`; OutputClosed if it stops before taking it."""
        with self._cond:
            if self._left:
                raise OutputClosed
            self._events.append(("line", line))
            self._handed += 1
            mine = self._handed
            self._cond.notify_all()
            while self._taken < mine and not self._left:
                self._cond.wait()
            if self._taken < mine:
                raise OutputClosed

    def put(self, kind: str, value: Any = None) -> None:
        with self._cond:
            self._events.append((kind, value))
            self._cond.notify_all()

    def get(self) -> tuple[str, Any]:
        """The next event (the caller's side); ("end", None) once the caller has left."""
        with self._cond:
            while not self._events and not self._left:
                self._cond.wait()
            return self._events.popleft() if self._events else ("end", None)

    def taken(self) -> None:
        with self._cond:
            self._taken += 1
            self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self._left = True
            self._events.clear()
            self._cond.notify_all()


class _Handoff(JsonlSink):
    """The sink of an API run: each line goes to the caller through the channel.

    Nothing is ever held (every line written was taken), so `flush` and `sync` have
    nothing to do, and `closed` stays False: when the caller stops, the run's end
    commits what was taken, and the item whose line was refused is not committed.
    """

    def __init__(self, channel: _Channel) -> None:
        super().__init__(fd=-1)  # no file: nothing may be written to one
        self._channel = channel

    def write(self, line: bytes) -> None:
        self._channel.hand_over(line)
        self.written += 1

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ProgressEvents(Progress):
    """The run's progress as events, for `on_progress` in the caller's thread."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__("images", enabled=False)
        self._channel = channel

    def update(
        self,
        done: int,
        nbytes: int = 0,
        failed: int = 0,
        total: int | None = None,
        **extra: Any,
    ) -> None:
        self._channel.put("progress", (done, total, failed))


# -- options -----------------------------------------------------------------------


def _settings(
    function: str, config: PathArg | None, options: Mapping[str, Any], valid: Collection[str]
) -> Settings:
    """Settings with `options` as flags: defaults < config file < environment < options."""
    _check_names(function, options, valid)
    return load_settings(config, options)


def _check_names(function: str, options: Mapping[str, Any], valid: Collection[str]) -> None:
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
            hint = f". Did you mean {close[0]!r}?" if close else ""
            if not close and function.startswith("scan") and name in _SETTINGS:
                hint = " (a setting of analyze only)"
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")
