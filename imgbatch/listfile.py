"""`--from-list FILE`: the items of a list (a file, or `-` for stdin) instead of a walk.

A list holds one local path (relative ones to the current folder), http(s) URL or
bucket URL (`s3://`, `gs://`) per line, or JSON Lines objects with a `url` or `path`
field (the object's other fields travel as they are under `"meta"` in every record of
that line, error records included). It is read as it is consumed (flat memory on any
length) and its items come out in its order, hashed (local files; bucket objects through
sources.open_item) or fetched (URLs, httpfetch.py) a few at a time ahead of the consumer.

A line that is not an item (not JSON where JSON starts, no `url` or `path`, another
scheme, a URL without a host) is an IO_ERROR record (named `LIST:LINE` when it has no
item), never the end of the run.

The state folder is the list's (config.state_dir of its absolute path) unless
`--checkpoint`; in it `listcache.db` keeps what lets a re-run skip reading an item: a
local file's stat stamp, a URL's ETag / Last-Modified (a 304 reuses the stored hash),
with the hash, size and mtime they vouch for; and `listmeta.db` each item's `meta` (of
its last line), which the checkpoint does not keep, for the records `export` reads.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import xxhash

from imgbatch.config import Settings, state_dir
from imgbatch.errors import CheckpointError, ErrorCode, ImgbatchError, ItemError, UsageError
from imgbatch.hashcache import RACY_NS
from imgbatch.records import FileRecord, extension_of, json_line
from imgbatch.scanner import ScanStats

if TYPE_CHECKING:
    from imgbatch.httpfetch import Fetcher
    from imgbatch.output import JsonlSink, Progress

log = logging.getLogger("imgbatch")

STDIN = "-"
_CHUNK = 1024 * 1024
#: validator rows written per transaction
_COMMIT_EVERY = 200


# -- the list --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One line of a list: its item (a path or URL) and meta, or why it is none."""

    line: int
    target: str | None
    meta: dict[str, Any] | None = None
    problem: str | None = None


def label(source: str) -> str:
    """How records and messages name a list: its absolute path, or `<stdin>`."""
    return "<stdin>" if source == STDIN else os.path.abspath(source)


def entries(source: str) -> Iterator[Entry]:
    """The lines of the list `source` (a file, or `-` for stdin), as they are read;
    blank lines are skipped. A UsageError if the file cannot be opened."""
    if source == STDIN:
        yield from _entries(sys.stdin.buffer)
        return
    try:
        fp = open(source, "rb")  # noqa: SIM115 - closed below, after the last line
    except OSError as exc:
        raise UsageError(f"cannot read the list {source}: {exc.strerror}") from None
    with fp:
        try:
            yield from _entries(fp)
        except OSError as exc:
            raise UsageError(f"cannot read the list {source}: {exc.strerror}") from None


def _entries(fp: IO[bytes]) -> Iterator[Entry]:
    for number, raw in enumerate(fp, 1):
        text = os.fsdecode(raw.rstrip(b"\r\n")).strip()
        if not text:
            continue
        if text.startswith("{"):
            yield _json_entry(number, text)
        else:
            yield _checked(Entry(number, text))


def _json_entry(number: int, text: str) -> Entry:
    """A JSON Lines line: `url` (else `path`) is the item, the other fields its meta."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeError):
        return Entry(number, None, None, "not a JSON object")
    if not isinstance(obj, dict):
        return Entry(number, None, None, "not a JSON object")
    field = "url" if "url" in obj else "path"
    target = obj.pop(field, None)
    if not isinstance(target, str) or not target:
        return Entry(number, None, obj, 'no "url" or "path" string')
    return _checked(Entry(number, target, obj))


def _checked(entry: Entry) -> Entry:
    """The entry, or a problem for a scheme this list cannot read."""
    assert entry.target is not None
    scheme = _scheme(entry.target)
    if scheme in ("http", "https") and not _valid_url(entry.target):
        problem = "not a valid URL"
    elif scheme is None or scheme in ("http", "https", "s3", "gs"):
        return entry
    elif scheme == "file":
        problem = "file:// URLs are not read: give the path itself"
    else:
        problem = f"{scheme}:// is not supported (local paths, http(s), s3 and gs URLs)"
    return Entry(entry.line, entry.target, entry.meta, problem)


def _valid_url(url: str) -> bool:
    """Whether an http(s) URL has a host (and a port, if any, that is a number)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:  # e.g. an unclosed [IPv6 address
        return False
    return bool(parts.hostname)


def _scheme(target: str) -> str | None:
    """A URL's scheme (lower case), None for a local path."""
    head, sep, _ = target.partition("://")
    if not sep or not head or not head.replace("+", "").replace("-", "").isalnum():
        return None
    return head.lower()


def is_url(target: str) -> bool:
    """Whether a list's item is an http(s) URL."""
    return _scheme(target) in ("http", "https")


def is_object(target: str) -> bool:
    """Whether a list's item is a bucket object (`s3://`, `gs://`: objectstore.py)."""
    return _scheme(target) in ("s3", "gs")


# -- records -----------------------------------------------------------------------


@dataclass(slots=True)
class ListedRecord(FileRecord):
    """A FileRecord of a list's item: `path` as listed, plus the line's `meta`, and
    (for analysis) the downloaded `body`, which is never written out."""

    meta: dict[str, Any] | None = None
    body: bytes | None = None

    def fields(self) -> dict[str, Any]:
        """The JSON object of this record, with `meta` for a JSON Lines item."""
        out = FileRecord.fields(self)
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    def to_json(self) -> bytes:
        """One JSON line (with its newline)."""
        return json_line(self.fields())


def _record(entry: Entry, source: str) -> ListedRecord:
    """An entry's record before its content is read (an error record for a problem)."""
    target, ext = entry.target, None  # None: the record's path tells it
    if target is None:  # named by its line: no item, no extension
        path, ext = f"{label(source)}:{entry.line}", ""
    else:
        path = target
        if is_url(path) and entry.problem is None:  # not the query's "extension"
            ext = extension_of(urlsplit(path).path)
    rec = ListedRecord(path, ext=ext, meta=entry.meta)
    if entry.problem is not None:
        rec.error_code = ErrorCode.IO_ERROR
        rec.error_message = f"list line {entry.line}: {entry.problem}"
    return rec


# -- what a re-run need not read again ---------------------------------------------


@dataclass(frozen=True)
class Known:
    """What the last read of an item left: the stamp or validators that vouch for its
    hash, size and mtime."""

    stamp: str | None
    etag: str | None
    last_modified: str | None
    hash: str
    size: int | None
    mtime_ns: int | None


class _ItemTable:
    """A SQLite table by item in the state folder, written from one thread: `_wrote`
    commits every _COMMIT_EVERY writes, `save` the rest, `close` both."""

    _db: sqlite3.Connection
    _unsaved = 0

    def _wrote(self, sql: str, row: tuple[Any, ...]) -> None:
        self._db.execute(sql, row)
        self._unsaved += 1
        if self._unsaved >= _COMMIT_EVERY:
            self.save()

    def save(self) -> None:
        self._db.commit()
        self._unsaved = 0

    def close(self) -> None:
        try:
            self.save()
        finally:
            self._db.close()


class ListCache(_ItemTable):
    """`listcache.db` in the state folder: `Known` by item (the path or URL as listed).

    Used from one thread (the one consuming the records)."""

    def __init__(self, state: Path) -> None:
        from imgbatch import statedb

        statedb.private_dir(state)
        path = state / "listcache.db"
        statedb.private_file(path)
        try:
            self._db = sqlite3.connect(path, timeout=30.0)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS known (item BLOB PRIMARY KEY, stamp TEXT,"
                " etag TEXT, last_modified TEXT, hash TEXT NOT NULL, size INTEGER,"
                " mtime_ns INTEGER)"
            )
            self._db.commit()
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot use {path}: {exc} (delete it to start afresh)") from None

    def get(self, item: str) -> Known | None:
        row = self._db.execute(
            "SELECT stamp, etag, last_modified, hash, size, mtime_ns FROM known WHERE item = ?",
            (os.fsencode(item),),
        ).fetchone()
        return None if row is None else Known(*row)

    def put(self, item: str, known: Known) -> None:
        self._wrote(
            "INSERT OR REPLACE INTO known VALUES (?, ?, ?, ?, ?, ?, ?)",
            (os.fsencode(item), known.stamp, known.etag, known.last_modified, known.hash)
            + (known.size, known.mtime_ns),
        )


class ListMeta(_ItemTable):
    """`listmeta.db` in a list run's state folder: the `meta` of each item's last line
    (the checkpoint keeps none), for `export`, `search` and `serve`'s records.

    Written by `analyze --from-list` from the thread consuming the records; `read` opens
    it read-only (None when there is none)."""

    def __init__(self, state: Path, readonly: bool = False) -> None:
        path = state / "listmeta.db"
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
            else:
                from imgbatch import statedb

                statedb.private_file(path)
                self._db = sqlite3.connect(path, timeout=30.0)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (item BLOB PRIMARY KEY, meta TEXT)"
                )
                self._db.commit()
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot use {path}: {exc} (delete it to start afresh)") from None

    @classmethod
    def read(cls, state: Path) -> ListMeta | None:
        """The state folder's item meta for reading, or None if it has none."""
        if not (state / "listmeta.db").is_file():
            return None
        return cls(state, readonly=True)

    def get(self, item: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT meta FROM meta WHERE item = ?", (os.fsencode(item),)
        ).fetchone()
        meta = json.loads(row[0]) if row is not None and row[0] is not None else None
        return meta if isinstance(meta, dict) else None

    def put(self, item: str, meta: dict[str, Any] | None) -> None:
        """Keep an item's meta (None: its line has none now)."""
        text = None if meta is None else json.dumps(meta, ensure_ascii=False)
        self._wrote("INSERT OR REPLACE INTO meta VALUES (?, ?)", (os.fsencode(item), text))


# -- reading the items ---------------------------------------------------------------


@dataclass
class _Read:
    """An item read in a pool thread: its record, and what to remember of it."""

    rec: ListedRecord
    known: Known | None = None  # to store (None: nothing new)
    cached: bool = False  # the hash came from the list cache
    unchanged: bool = False  # a 304
    fetched: bool = False  # a URL was asked for (requests made)
    bytes_read: int = 0


class ListSource:
    """The records of a list in its order; `threads` items read ahead at most.

    Args:
        source: the list file, or `-` for stdin.
        settings: `hash` (False: nothing is read), `download_timeout`,
            `max_download_size`, `max_attempts`, `retry_delay`.
        cache: the list cache, or None.
        threads: items read at once (local files hashed, URLs fetched).
        keep_bodies: keep each downloaded body on its record (`analyze`).
        on_wait: called before waiting for an item, so a consumer can flush its output.
    """

    def __init__(
        self,
        source: str,
        settings: Settings,
        cache: ListCache | None = None,
        threads: int = 4,
        keep_bodies: bool = False,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.stats = ScanStats()
        self.fetched = 0  # URLs asked for
        self.unchanged = 0  # of them, answered 304
        self._cache = cache
        self._threads = max(1, threads)
        self._keep = keep_bodies
        self._on_wait = on_wait
        # set when the consumer leaves early, or at the close: a fetch waiting to retry
        # gives up (not the run's stop, which a list source never sets)
        self._stop = threading.Event()
        self._fetcher: Fetcher | None = None
        self._fetcher_lock = threading.Lock()

    def __iter__(self) -> Iterator[FileRecord]:
        pool = ThreadPoolExecutor(self._threads, thread_name_prefix="imgbatch-list")
        window: deque[Future[_Read]] = deque()
        try:
            for entry in entries(self.source):
                rec = _record(entry, self.source)
                known = self._known(rec)  # here: the cache is this thread's
                window.append(pool.submit(self._read, rec, known))
                while len(window) > 2 * self._threads:
                    yield self._take(window.popleft())
            while window:
                yield self._take(window.popleft())
        finally:
            if window:  # left early (a closed output, a stop): a wait to retry ends now,
                self._stop.set()  # and what is downloading is abandoned (close() cuts it)
            pool.shutdown(wait=not window, cancel_futures=True)

    def close(self) -> None:
        """Close the fetcher's connections (the analysis may fetch until the run ends)."""
        self._stop.set()
        if self._fetcher is not None:
            self._fetcher.close()

    def __enter__(self) -> ListSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, fut: Future[_Read]) -> ListedRecord:
        """The next item's record, once read; what it taught is stored."""
        if not fut.done() and self._on_wait is not None:
            self._on_wait()
        read = fut.result()
        rec, stats = read.rec, self.stats
        if rec.ok:
            stats.files += 1
            stats.bytes += rec.size or 0
        else:
            stats.errors += 1
        stats.bytes_read += read.bytes_read
        stats.cache_hits += read.cached or read.unchanged
        self.fetched += read.fetched
        self.unchanged += read.unchanged
        if read.known is not None and self._cache is not None:
            self._cache.put(rec.path, read.known)
        return rec

    def _known(self, rec: ListedRecord) -> Known | None:
        """What the list cache knows of an item that is to be read."""
        if self._cache is None or not rec.ok or not self.settings.hash:
            return None
        return self._cache.get(rec.path)

    def _read(self, rec: ListedRecord, known: Known | None) -> _Read:
        """Read one item (in a pool thread): hash a file, fetch a URL."""
        if not rec.ok:
            return _Read(rec)
        if not self.settings.hash:  # --no-hash: a file's stat (as a walk's), a URL as is
            if not is_url(rec.path) and not is_object(rec.path):
                try:
                    st = os.stat(rec.path)
                except OSError as exc:
                    rec.error_code = ErrorCode.IO_ERROR
                    rec.error_message = f"cannot stat file: {exc.strerror}"
                else:
                    rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
            return _Read(rec)
        try:
            if is_url(rec.path):
                return self._fetch(rec, known)
            if is_object(rec.path):
                return _hash_object(rec, self.settings.storage_option)
            return _hash_file(rec, known)
        except ItemError as exc:
            rec.error_code, rec.error_message = exc.code, exc.message
            return _Read(rec, fetched=is_url(rec.path))
        except ImgbatchError:  # the run's (a missing extra, an unreachable endpoint)
            raise
        except Exception as exc:  # one item's surprise must not end the run: its record
            log.debug("unexpected error reading %s", rec.path, exc_info=True)
            rec.error_code = ErrorCode.IO_ERROR
            rec.error_message = f"cannot read it ({type(exc).__name__}: {exc})"
            return _Read(rec, fetched=is_url(rec.path))

    def _fetch(self, rec: ListedRecord, known: Known | None) -> _Read:
        from imgbatch.httpfetch import Stopped, Validators

        given = Validators(known.etag, known.last_modified) if known is not None else None
        try:
            got = self.fetcher().fetch(rec.path, given, keep=self._keep)
        except Stopped:
            raise ItemError(ErrorCode.NETWORK_ERROR, "stopped before the download") from None
        if got.unchanged:
            if known is None:  # a 304 to a request that was not conditional
                raise ItemError(ErrorCode.IO_ERROR, "HTTP 304 to an unconditional request")
            rec.hash, rec.size, rec.mtime_ns = known.hash, known.size, known.mtime_ns
            return _Read(rec, fetched=True, unchanged=True)
        assert got.hash is not None
        rec.hash, rec.size, rec.mtime_ns, rec.body = got.hash, got.size, got.mtime_ns, got.body
        v = got.validators
        learnt = Known(None, v.etag, v.last_modified, got.hash, got.size, got.mtime_ns)
        # a body that cannot be validated is fetched again next time: nothing to store
        return _Read(rec, learnt if v else None, fetched=True, bytes_read=got.size or 0)

    def fetcher(self) -> Fetcher:
        """The run's fetcher, made at the first URL (httpx is imported then)."""
        with self._fetcher_lock:
            if self._fetcher is None:
                from imgbatch.httpfetch import Fetcher

                s = self.settings
                self._fetcher = Fetcher(
                    s.download_timeout,
                    s.max_download_size,
                    s.max_attempts,
                    s.retry_delay,
                    self._stop,
                )
            return self._fetcher


def _hash_object(rec: ListedRecord, storage_options: tuple[str, ...]) -> _Read:
    """A bucket object's hash, read as a stream through sources.open_item (its reading
    function of every item: a missing extra is a UsageError naming the pip command)."""
    from imgbatch.sources import open_item

    digest, n = xxhash.xxh3_128(), 0
    with open_item(rec.path, storage_options) as fp:
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
            n += len(chunk)
    rec.hash, rec.size = digest.hexdigest(), n
    return _Read(rec, bytes_read=n)


def _hash_file(rec: ListedRecord, known: Known | None) -> _Read:
    """A local file's hash: from the list cache while its stat stamp holds, else read."""
    try:
        fd = os.open(rec.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ItemError(ErrorCode.IO_ERROR, f"cannot open file: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as fp:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ItemError(ErrorCode.IO_ERROR, "not a regular file")
        rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
        stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        if known is not None and known.stamp == stamp:
            rec.hash = known.hash
            return _Read(rec, cached=True)
        digest, n = xxhash.xxh3_128(), 0
        try:
            while chunk := fp.read(_CHUNK):
                digest.update(chunk)
                n += len(chunk)
        except OSError as exc:
            raise ItemError(ErrorCode.IO_ERROR, f"cannot read file: {exc.strerror}") from None
    rec.hash = digest.hexdigest()
    # not stored: a file that changed while read (the hash is of no version), or one
    # changed so lately that a change now could keep its stamp (the hash cache's rule)
    if n != st.st_size or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
        return _Read(rec, bytes_read=n)
    return _Read(rec, Known(stamp, None, None, rec.hash, st.st_size, st.st_mtime_ns), bytes_read=n)


# -- state ----------------------------------------------------------------------------


def list_state(source: str, settings: Settings) -> Path:
    """The state folder of a list run: `--checkpoint`, else the list file's own (a
    UsageError for stdin without `--checkpoint`)."""
    if source == STDIN and not settings.checkpoint:
        raise UsageError("a list on stdin needs --checkpoint DIR (where its state is kept)")
    return state_dir(label(source), settings)


def claim(state: Path, source: str, record: bool = True) -> None:
    """Make sure the state folder belongs to this list (checkpoint.claim_root)."""
    from imgbatch.checkpoint import claim_root

    claim_root(state, f"list:{label(source)}", record=record)


# -- `imgbatch scan --from-list` -----------------------------------------------------


def run_scan(source: str, settings: Settings, show_progress: bool = True) -> tuple[list[str], int]:
    """`imgbatch scan --from-list`: the records on stdout (whole lines only), progress on
    stderr. Returns the summary lines and the exit code (1 when an item failed)."""
    from imgbatch.errors import ExitCode
    from imgbatch.output import JsonlSink, Progress, close_quietly, human_bytes, human_duration

    start = time.monotonic()
    sink = JsonlSink(flush_every=settings.batch_size, whole_lines=True)
    with Progress("files", settings.log_every, enabled=show_progress) as progress:
        try:
            items = scan_list(source, settings, sink, progress)
        finally:
            close_quietly(sink.close)
    stats = items.stats
    line = (
        f"scanned {stats.seen:,} items of {label(source)} ({human_bytes(stats.bytes)}) in "
        f"{human_duration(time.monotonic() - start)}; {stats.errors:,} errors; "
        f"{items.fetched:,} URLs asked for, {items.unchanged:,} unchanged (HTTP 304); "
        f"read {human_bytes(stats.bytes_read)}, {stats.cache_hits:,} hashes reused"
    )
    return [line], int(ExitCode.ITEM_FAILURES if stats.errors else ExitCode.OK)


def scan_list(
    source: str, settings: Settings, sink: JsonlSink, progress: Progress | None = None
) -> ListSource:
    """Every item's record of the list `source` to `sink`, in the list's order.

    Returns the source (its stats); raises OutputClosed when the reader went away.
    """
    batch = settings.batch_size
    with scanning(source, settings, on_wait=sink.flush) as items:
        stats, unflushed = items.stats, 0
        for rec in items:
            sink.write(rec.to_json())
            unflushed += 1
            if unflushed >= batch:
                sink.flush()
                unflushed = 0
            if progress is not None:
                progress.update(stats.seen, stats.bytes, stats.errors)
        sink.flush()
    return items


@contextmanager
def scanning(
    source: str, settings: Settings, on_wait: Callable[[], None] | None = None
) -> Iterator[ListSource]:
    """The list `source` to scan (`scan --from-list`, `imgbatch.scan(from_list=...)`):
    its ListSource on `hash_threads` threads, with the list's cache when hashing."""
    cache = None  # (none for a list on stdin without --checkpoint: no state to keep it)
    if settings.hash and settings.hash_cache and (source != STDIN or settings.checkpoint):
        state = list_state(source, settings)
        claim(state, source)
        cache = ListCache(state)
    try:
        with ListSource(source, settings, cache, settings.hash_threads, on_wait=on_wait) as items:
            yield items
    finally:
        if cache is not None:
            cache.close()
