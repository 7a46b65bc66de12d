"""The public Python API: `scan_batches`, `scan`, `analyze`, `search` and `find_dupes`,
the records of the CLI.

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
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from imgbatch.config import Settings, load_settings, results_dir, state_dir
from imgbatch.errors import ExitCode, OutputClosed, UsageError, WaitInterrupted
from imgbatch.hashcache import HashCache
from imgbatch.output import JsonlSink, Progress, close_quietly, human_bytes, human_duration
from imgbatch.records import FileRecord
from imgbatch.scanner import Scanner, batched, check_root

if TYPE_CHECKING:
    from imgbatch.pipeline import RunOptions
    from imgbatch.signals import Signals

__all__ = ["Records", "analyze", "find_dupes", "scan", "scan_batches", "search"]

# a library is silent by default: without this, Python's last-resort handler would print
# the pipeline's warnings on stderr
logging.getLogger("imgbatch").addHandler(logging.NullHandler())

PathArg = str | os.PathLike[str]
ProgressCallback = Callable[[int, int | None, int], object]

_SETTINGS = frozenset(f.name for f in dataclasses.fields(Settings))
#: what a scan reads: the [scan] settings, where ROOT's hash cache lives, and a bucket's
#: storage options (and a list's downloads: `from_list`)
_SCAN_OPTIONS = frozenset(
    f.name for f in dataclasses.fields(Settings) if f.metadata["section"] in ("scan", "download")
) | {"checkpoint", "storage_option", "max_attempts", "retry_delay"}


# -- scan --------------------------------------------------------------------------


def scan_batches(
    root: PathArg | None = None,
    batch_size: int | None = None,
    *,
    from_list: PathArg | None = None,
    config: PathArg | None = None,
    **options: Any,
) -> Iterator[list[dict[str, Any]]]:
    """The files under ROOT in lists of `batch_size` records, lazily, as `imgbatch scan`
    prints them.

    The tree is walked as the batches are taken, so memory stays flat however big it
    is; hashes are looked up in and stored to ROOT's hash cache, as the command does.

    Args:
        root: the folder to walk, or a bucket URL (`s3://bucket/prefix/`, `gs://...`).
        batch_size: records per list (the last one may be shorter); default: the
            `batch_size` setting (100).
        from_list: instead of ROOT, a list of paths and URLs (`scan --from-list`: a
            file, or `-` for stdin), its items in its order, with `meta` of JSON Lines.
        config: a config file to read instead of `$XDG_CONFIG_HOME/imgbatch/config.toml`.
        **options: scan settings by name: `all_files`, `include_hidden`,
            `follow_symlinks`, `exclude`, `hash`, `hash_threads`, `hash_cache`,
            `checkpoint`, `storage_option` (KEY=VALUE pairs for a bucket ROOT).

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
    return _batches(_records(root, from_list, settings), settings.batch_size)


def scan(
    root: PathArg | None = None,
    *,
    from_list: PathArg | None = None,
    config: PathArg | None = None,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """The files under ROOT one record at a time, lazily, as `imgbatch scan` prints them.

    Args:
        root: the folder to walk.
        from_list: instead of ROOT, a list of paths and URLs, as for `scan_batches`.
        config: a config file to read instead of `$XDG_CONFIG_HOME/imgbatch/config.toml`.
        **options: scan settings by name, as for `scan_batches`.

    Returns:
        An iterator of dicts, the records of `scan_batches`.

    Raises:
        TypeError: an unknown option.
        UsageError: ROOT is missing or not a folder; ConfigError for an invalid setting.
    """
    settings = _settings("scan", config, options, _SCAN_OPTIONS)
    return _fields(_records(root, from_list, settings))


def _source(root: PathArg | None, from_list: PathArg | None) -> tuple[str, bool]:
    """What a call reads: ROOT (checked), or the list `from_list` (then True)."""
    if (root is None) == (from_list is None):
        raise UsageError("give root or from_list (one of the two)")
    if from_list is not None:
        return os.fspath(from_list), True
    assert root is not None
    return check_root(os.fspath(root)), False


def _records(
    root: PathArg | None, from_list: PathArg | None, settings: Settings
) -> Generator[FileRecord, None, None]:
    """The records of a scan of ROOT or of a list."""
    source, listed = _source(root, from_list)
    return _listed(source, settings) if listed else _scanned(source, settings)


def _listed(source: str, settings: Settings) -> Generator[FileRecord, None, None]:
    """A list's records, as `scan --from-list` has them."""
    from imgbatch.listfile import scanning

    with scanning(source, settings) as items:
        yield from items


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
    root: PathArg | None = None,
    provider: str | None = None,
    on_progress: ProgressCallback | None = None,
    *,
    from_list: PathArg | None = None,
    config: PathArg | None = None,
    **options: Any,
) -> Records:
    """Analyse every new or changed image under ROOT: the records `imgbatch analyze`
    prints, resumably, through the same checkpoint and under the same lock.

    The run starts at the first `next()`, in a background thread, and holds ROOT's lock
    until it ends or is closed. Delivery is at least once: a record is committed to the
    checkpoint only once the caller has handled it, that is asked for the next record,
    or ended the iteration normally (the run's end; leaving a `with` block without an
    exception, `break` inside it included). A record the caller has asked past is never
    yielded again (commits are grouped as the command's are: a process killed meanwhile
    repeats the last group's records next time, never loses one); one whose handling
    raised is yielded again by the next run, from the results store (no request is paid
    for twice). Without `with`, `break` cannot be told from an exception: the last
    record taken then comes back next run too, as after `close()`. Stopping early
    abandons the items finished but not yet taken and those in flight: the next run
    redoes them. `Records.stop(grace)` stops gracefully instead: the records of the
    items in flight keep coming for up to `grace` seconds, then the iteration ends
    normally. A run left unclosed is closed when it is garbage-collected, like a
    generator; use `with` or `close()` to release the lock at a known moment.

    Args:
        root: the folder to analyse.
        provider: auto | local | gemini | openai | ollama | anthropic; default: the
            `provider` setting (auto: gemini only when a key is configured for imgbatch, else the
            offline analyzer).
        on_progress: called as `on_progress(done, total, failed)` as items finish, in
            the thread that iterates, before the next record is returned: items done
            and failed so far in this run, and the items it will do (None until the
            count beside the work has ended, or `limit` when that is smaller).
        from_list: instead of ROOT, a list of paths and URLs (`analyze --from-list`:
            a file, or `-` for stdin with the `checkpoint` option); local threads only.
        config: a config file to read instead of `$XDG_CONFIG_HOME/imgbatch/config.toml`.
        **options: any setting by name (`workers`, `rpm`, `max_side`, `gemini_model`,
            `exclude`, `checkpoint`, ...); the run options of the command's flags
            (`fresh`, `retry_failed`, `emit_all`, `limit`, `dry_run`, ...: the fields
            of `pipeline.RunOptions`); and `wait`, to wait for another run's lock
            instead of raising LockHeldError. `grace` has no effect: give it to
            `Records.stop(grace)`; `close()` abandons in-flight items at once.

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
    # close(): in-flight items finishing after the caller left could not be yielded, so no
    # grace; stop(grace) gives its own
    settings = load_settings(config, {"provider": provider, **options}).replace(grace=0.0)
    source, listed = _source(root, from_list)
    return Records(source, settings, RunOptions(**run), on_progress, wait, listed)


class Records(Iterator[dict[str, Any]]):
    """The records of one `analyze` run (see `analyze`): an iterator, `stop(grace)`,
    `close()`, and a context manager that closes it."""

    def __init__(
        self,
        root: str,
        settings: Settings,
        run: RunOptions,
        on_progress: ProgressCallback | None,
        wait: bool,
        listed: bool = False,
    ) -> None:
        self._args = (root, settings, run, wait, listed)
        self._on_progress = on_progress
        self._channel = _Channel()
        self._stop = _Stop()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._guard = threading.Lock()  # stop() and close() may come from another thread

    def __iter__(self) -> Records:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            with self._guard:
                stopped = self._stop.is_set()  # stop() before the first record
                if not stopped and not self._closed:
                    self._start()
            if stopped or self._closed:
                self.close()
                raise StopIteration
        # asking for the next record is what says the records taken so far were handled
        self._channel.handled()
        try:
            record = self._receive()
        except BaseException:  # the run's error, on_progress's, an interrupt: all stop it
            self.close()
            raise
        if record is None:
            self.close()
            raise StopIteration
        return record

    def stop(self, grace: float = 10.0) -> None:
        """Stop the run gracefully: it takes no new item, and the iteration ends normally
        (no exception) once the items in flight are done, or after `grace` seconds.

        It returns at once and may be called from any thread, the loop's body included.
        The records of the items in flight keep coming for up to `grace` seconds; those
        still out then are abandoned, and the items never sent are left, to the next run.
        Calling it again can only shorten the grace; `close()` ends the run at once.
        Before the first record, the iteration ends without starting the run.

        Raises:
            UsageError: `grace` is not a number of seconds of at least 0.
        """
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise UsageError(f"grace must be a number of seconds of at least 0, not {grace!r}")
        with self._guard:
            if self._closed:
                return
            before = self._stop.grace
            self._stop.grace = float(grace) if before is None else min(before, float(grace))
            self._stop.set()  # after the grace: the run reads it once it sees the stop

    def close(self) -> None:
        """Stop the run now, if it is going, and wait until it has released ROOT's lock.

        The last record taken counts as not handled (the caller did not ask past it):
        the next run yields it again, as it redoes the items in flight and those
        finished but not yet taken. Leaving a `with` block without an exception closes
        the run too, but with the last record taken counted as handled. Calling it
        again does nothing.
        """
        self._close(handled=False)

    def __enter__(self) -> Records:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # left cleanly (the loop ended, or a `break`): the caller handled what it took
        self._close(handled=exc_type is None)

    def __del__(self) -> None:
        # like a generator's finalizer: `for r in imgbatch.analyze(x): break` leaves no
        # run holding the lock (the thread holds no reference to this object); it cannot
        # tell a `break` from an exception, so the last record taken is not committed
        self.close()

    def _close(self, handled: bool) -> None:
        with self._guard:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._stop.grace = 0.0  # in-flight items are abandoned at once
                self._stop.set()
                self._channel.leave(handled)
        if thread is not None:
            thread.join()

    def _start(self) -> None:
        root, settings, run, wait, listed = self._args
        channel = self._channel
        progress = _ProgressEvents(channel) if self._on_progress is not None else None
        sink = _Handoff(channel)
        self._thread = threading.Thread(
            target=_analysis,
            args=(root, settings, run, sink, progress, self._stop, wait, channel, listed),
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
                return record
            if kind == "progress":
                if self._on_progress is not None:
                    self._on_progress(*value)
            elif kind == "error":
                raise value
            else:
                return None


#: runs started and not yet closed: closed at exit (their threads are daemons, which the
#: interpreter would stop wherever they are), so what was handled is committed
_open_runs: weakref.WeakSet[Records] = weakref.WeakSet()


@atexit.register
def _close_open_runs() -> None:
    for records in list(_open_runs):
        records.close()


class _Stop(threading.Event):
    """A run's stop, and the seconds its in-flight items get once it is set (None: the
    `grace` setting); the pipeline reads `grace` again while it waits for them."""

    def __init__(self) -> None:
        super().__init__()
        self.grace: float | None = None


def _analysis(
    root: str,
    settings: Settings,
    run: RunOptions,
    sink: JsonlSink,
    progress: Progress | None,
    stop: threading.Event,
    wait: bool,
    channel: _Channel,
    listed: bool = False,
) -> None:
    """The body of a run's thread: `imgbatch analyze` (of ROOT, or of a list: `listed`)
    into the handoff sink."""
    from imgbatch.pipeline import analyze_root

    try:
        if listed:
            from imgbatch.listrun import analyze_list

            analyze_list(root, settings, run, sink, progress, stop, wait)
        else:
            analyze_root(root, settings, run, sink, progress=progress, stop=stop, wait=wait)
    except OutputClosed:
        pass  # the caller stopped: the pipeline committed exactly what it had handled
    except WaitInterrupted:
        pass  # stopped while waiting for the lock (`wait=True`): nothing was done
    except BaseException as exc:  # raised in the caller's thread, after the records before
        channel.put("error", exc)
    channel.put("end")


class _Channel:
    """From a run's thread to the caller, in order: each line, progress, the end.

    A line is handed over, not queued: `hand_over` returns only once the caller has
    handled it, that is asked for the next record (or left a `with` block cleanly). So
    every line the pipeline wrote was handled, and its write-then-commit order makes
    "committed" mean "handled": a record whose handling raised (the loop's body failed)
    is never committed, and the next run yields it again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: deque[tuple[str, Any]] = deque()
        self._handed = 0  # lines handed over so far
        self._taken = 0  # lines the caller took
        self._handled = 0  # lines the caller is done with
        self._left = False  # the caller stopped

    def hand_over(self, line: bytes) -> None:
        """Give the caller `line`, and return once it has handled it; OutputClosed if it
        stops without handling it."""
        with self._cond:
            if self._left:
                raise OutputClosed
            self._events.append(("line", line))
            self._handed += 1
            mine = self._handed
            self._cond.notify_all()
            while self._handled < mine and not self._left:
                self._cond.wait()
            if self._handled < mine:
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
            if not self._events:
                return ("end", None)
            event = self._events.popleft()
            if event[0] == "line":
                self._taken += 1
            return event

    def handled(self) -> None:
        """The caller is done with every line it took: the run may commit them."""
        with self._cond:
            self._handled = self._taken
            self._cond.notify_all()

    def leave(self, handled: bool) -> None:
        """The caller stops; `handled`: it is done with the lines it took."""
        with self._cond:
            if handled:
                self._handled = self._taken
            self._left = True
            self._events.clear()
            self._cond.notify_all()


class _Handoff(JsonlSink):
    """The sink of an API run: each line goes to the caller through the channel.

    Nothing is ever held (`write` returns once the caller handled the line), so `flush`
    and `sync` have nothing to do, and a commit group holds handled lines only; `closed`
    stays False: when the caller stops, the run's end commits what was handled, and the
    item whose line was refused is not committed (its result is kept in the results
    store, so the next run does not pay for it again).
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


# -- the commands' runs: what `imgbatch scan` and `imgbatch analyze` do --------------


def search(
    root: PathArg,
    query: str | Collection[str],
    *,
    tag: str | Collection[str] = (),
    color: str | Collection[str] = (),
    after: str | None = None,
    before: str | None = None,
    status: str | None = None,
    limit: int = 20,
    mode: str = "text",
    config: PathArg | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """The stored results of ROOT (of its last run's settings) that match `query`, best
    first: the records `imgbatch search` prints (the `export` record plus `score`).

    `query` is the command's words (one string, or several joined); `tag` and `color`
    one name or several (all must match); `after`/`before` dates YYYY-MM-DD; `options`
    the settings that say where state lives (`checkpoint`, `results`). `mode` "semantic"
    ranks by meaning (`search --semantic`: the query is embedded with ROOT's embedding
    model, so `options` may also be any setting, e.g. a key or a base URL), "hybrid"
    fuses both rankings (`--hybrid`). Reads without the lock, beside a run; writes only
    ROOT's search index. Raises UsageError for a malformed query, a ROOT never analysed
    or never embedded (semantic), CheckpointError for unusable state, FatalError when the
    query cannot be embedded.
    """
    from imgbatch import searching

    # a semantic query goes to the embedding provider: its settings are valid too
    valid = {"checkpoint", "results"} if mode == "text" else _SETTINGS
    settings = _settings("search", config, options, valid)
    where = searching.filters(
        [tag] if isinstance(tag, str) else tag,
        [color] if isinstance(color, str) else color,
        after,
        before,
        status,
    )
    return searching.search(
        state_dir(os.fspath(root), settings),
        query,
        where,
        limit,
        results_dir(settings),
        mode=mode,
        settings=settings,
    )


def find_dupes(
    root: PathArg,
    distance: int = 8,
    *,
    config: PathArg | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """The groups of exact copies and near-duplicates among ROOT's stored files (its last
    run's): the records `imgbatch dupes` prints, biggest waste first. (Not `dupes`: that
    name is the module imgbatch/dupes.py.)

    `distance` is the most bits of 64 a near-duplicate's pHash differs from its keeper's;
    `options` the settings that say where state lives (`checkpoint`, `results`), the
    size pHashes are computed at (`max_side`) and how a bucket ROOT's objects are read
    (`storage_option`, KEY=VALUE pairs). Changes no file; stores the pHashes it
    computes in ROOT's state folder. Raises UsageError for a bad `distance`,
    CheckpointError for unusable state.
    """
    from imgbatch import dupes as finder

    known = {"checkpoint", "results", "max_side", "storage_option"}
    settings = _settings("find_dupes", config, options, known)
    state = state_dir(os.fspath(root), settings)
    found = finder.find(
        state, results_dir(settings), distance, settings.max_side, None, settings.storage_option
    )
    return found.groups


class Done(NamedTuple):
    """How a command's run ended: its summary lines (for stderr) and its exit code."""

    lines: list[str]
    exit_code: int


def run_scan(root: str, settings: Settings, show_progress: bool = True) -> Done:
    """`imgbatch scan`: ROOT's records on stdout (whole lines only), progress on stderr."""
    from imgbatch.scanner import run_scan as scan_tree

    start = time.monotonic()
    sink = JsonlSink(flush_every=settings.batch_size, whole_lines=True)
    with Progress("files", settings.log_every, enabled=show_progress) as progress:
        try:
            stats = scan_tree(root, settings, sink, progress, state_dir(root, settings))
        finally:
            close_quietly(sink.close)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(stats.skipped.items()))
    line = (
        f"scanned {stats.files:,} files ({human_bytes(stats.bytes)}) in "
        f"{human_duration(time.monotonic() - start)}; {stats.errors:,} errors; "
        f"{stats.skipped_total:,} skipped{f' ({skipped})' if skipped else ''}; "
        f"read {human_bytes(stats.bytes_read)}, {stats.cache_hits:,} from the hash cache"
    )
    return Done([line], int(ExitCode.ITEM_FAILURES if stats.errors else ExitCode.OK))


def run_analyze(
    root: str,
    settings: Settings,
    signals: Signals,
    *,
    wait: bool = False,
    show_progress: bool = True,
    **run: Any,
) -> Done:
    """`imgbatch analyze`: the records on stdout, progress on stderr; `run` holds the
    run options (`pipeline.RunOptions`). From its start a signal stops intake gracefully
    (`signals.stop`); the caller exits with `signals.exit_code` when one came."""
    from imgbatch.pipeline import RunOptions, analyze_root, summary_lines

    if run.get("batch_wait") and not run.get("batch"):
        raise UsageError("--batch-wait goes with --batch")
    options = RunOptions(**run)
    # lines go out in groups: at least before every commit (one by one for a remote
    # provider, every 100 ms for the offline analyzer's thousands a second); a file
    # keeps whole lines only (a full disk leaves no half record for `>>` to glue onto)
    sink = JsonlSink(flush_every=100, max_delay=0.1, whole_lines=True)
    signals.graceful = True  # from now on a signal stops intake; in-flight items finish
    limit = options.limit
    with Progress("images", settings.log_every, limit, enabled=show_progress) as progress:
        try:
            summary, scanned = analyze_root(
                root, settings, options, sink, progress, signals.stop, wait=wait
            )
        finally:
            close_quietly(sink.close)
    code = ExitCode.ITEM_FAILURES if summary.failed else ExitCode.OK
    return Done(list(summary_lines(summary, scanned)), int(code))


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
