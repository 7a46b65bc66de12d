"""The lazy walk: folders listed one at a time, files hashed in order, cut into batches.

The walk is made of jobs (`hashjob`). A folder job lists one folder (sorted, files
before subfolders), reads its hash-cache entry, and stats and hashes its first files: a
file whose stamp still matches is answered from the cache, others are read. Its answer
is finished output: JSON lines (`lines()`, for `scan`) or FileRecords (iteration, for
`analyze`), the cache entry to store, the subfolders, and the folder's other files cut
into segment jobs. Jobs run inline; a `scan` of a big tree (`procs`, `--hash-procs`)
also starts a few worker processes once PROCS_AFTER files have gone by, and then sends
them the next jobs in order, so that listing, stat'ing and hashing run on every core
while this process only orders and writes. Files from LARGE_FILE go to a few threads
(xxhash and the kernel copy release the GIL), each reading with its own page-aligned
buffer. Results are put back in order.

Memory is bounded by the largest single folder (its entries are sorted) plus a few
jobs ahead (and large files being hashed); it never grows with the tree.

A bucket ROOT (`s3://bucket/prefix/`, `gs://...`: `Scanner.bucket`) is walked through
objectstore instead: its listing, a page at a time in key order, filtered as a folder's
names are (`listing.select_key`); each object's hash from the hash cache (a page's
objects looked up in one query) while its listing stamp is unchanged, else read as a
stream by one of `hash_threads` threads, at most 2 x `hash_threads` objects ahead; a
per-object failure is an IO_ERROR record.

Outcomes for a hostile tree (documented in the README):
- unreadable folder / unreadable file / file vanished before it was read / file that
  changed while being read / dangling or looping symlink (when following): an error
  record with code IO_ERROR;
- symlink while not following, FIFO, socket or device (never opened), a folder already
  visited through another symlink: a counted skip (`ScanStats.skipped`).
"""

from __future__ import annotations

import itertools
import logging
import marshal
import mmap
import os
import stat
import subprocess
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from imgbatch import hashcache, hashjob, listing, objectstore, workerproto
from imgbatch.config import Settings
from imgbatch.cpus import SpareCores, cores
from imgbatch.errors import ErrorCode, ItemError, UsageError
from imgbatch.hashcache import FolderHashes, HashCache, Stamp
from imgbatch.hashjob import CHUNK, LARGE_FILE, Large, Parts, Rows
from imgbatch.listing import IMAGE_EXTENSIONS
from imgbatch.output import JsonlSink, Progress
from imgbatch.records import FileRecord, error_record

log = logging.getLogger("imgbatch")


__all__ = [
    "CHUNK",
    "IMAGE_EXTENSIONS",
    "LARGE_FILE",
    "RACY_NS",
    "ScanStats",
    "Schedule",
    "Scanner",
    "batched",
    "check_root",
    "count_files",
    "run_scan",
]

JOB_FILES = 128  # files of a folder per job run inline (the first jobs have fewer)
WINDOW_JOBS = 4  # jobs held back at most while an earlier large file is being hashed
WORKER_JOB_FILES = 512  # files of a folder per job sent to a worker
QUEUED_PER_WORKER = 3  # jobs sent to a worker and not yet taken, at most
#: worker processes are started once this many files went by inline, and this many
#: seconds (see cpus.SpareCores): a tree scanned in less never pays for them (each costs
#: ~20 ms of CPU to start; jobs run inline until they said they started); and only while
#: a core is spare: on a busy machine they only add their overhead
PROCS_AFTER = 1000
PROCS_AFTER_SECONDS = 0.05


@dataclass(frozen=True)
class Schedule:
    """How a walk cuts its jobs and hands them to worker processes. The defaults are
    the tuned ones; tests pass small jobs, or workers that start at once."""

    job_files: int = JOB_FILES
    window_jobs: int = WINDOW_JOBS
    worker_job_files: int = WORKER_JOB_FILES
    procs_after: int = PROCS_AFTER
    procs_after_seconds: float = PROCS_AFTER_SECONDS
    #: whether to start the worker processes now, given the files done inline so far
    #: (None: after procs_after files and procs_after_seconds, while a core is spare)
    start_workers: Callable[[int], bool] | None = None
    #: makes the pool of `n` worker processes (None: `Workers(n)`)
    workers: Callable[[int], Workers] | None = None
    #: the flag of a file's first read, which must not block (RWF_NOWAIT): when it
    #: would, the page cache is cold and the next files are read ahead (0: plain reads)
    nowait: int = hashjob.NOWAIT


_SKIP_LINK, _SKIP_OTHER, _SKIP_VISITED = "symlink", "not a regular file", "folder already visited"

T = TypeVar("T")


@dataclass
class ScanStats:
    """Counters of one scan, updated as records are yielded."""

    files: int = 0
    errors: int = 0
    bytes: int = 0
    bytes_read: int = 0
    cache_hits: int = 0
    folders: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def seen(self) -> int:
        """Records yielded so far: files listed, and errors."""
        return self.files + self.errors

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def batched(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    """Cut `iterable` into lists of `size` items (the last may be shorter), lazily."""
    if size < 1:
        raise ValueError("batch size must be at least 1")
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        yield batch


_errmsg, _stat_error = listing.errmsg, listing.stat_error
RACY_NS = hashcache.RACY_NS


@dataclass
class _Folder:
    path: str
    rel: str
    names: list[str]  # the selected files, in output order
    exts: list[str]  # their extensions


# -- the answers of jobs, as the walk keeps them (see receive) --------------------------


@dataclass(slots=True)
class JobCounts:
    """A job's counters (hashjob.COUNTERS, in that order)."""

    files: int
    errors: int
    bytes: int
    bytes_read: int
    cache_hits: int
    not_regular: int


@dataclass(slots=True)
class FolderPart:
    """A further part of a folder listed before: a segment job's files, in output order,
    their extensions and hash-cache stamps (None: no cache entry)."""

    path: str
    names: list[str]
    exts: list[str]
    stamps: list[Stamp | None] | None

    def segment(self) -> hashjob.Segment:
        """The part as a job carries it."""
        return self.path, self.names, self.exts, self.stamps


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A folder's new hash-cache entry, decided by its job (stored once it is written)."""

    hashes: FolderHashes


@dataclass(frozen=True, slots=True)
class LeftOpen:
    """A folder's hash-cache entry left to the scanner (the folder is done in several
    parts, or has large files): the entry as it was, the names listed, the clock before
    listing; merged with the hashes of its files once they are all written."""

    old: FolderHashes | None
    listed: frozenset[str]
    listed_ns: int

    def merged(self, hashes: FolderHashes) -> FolderHashes | None:
        """The new entry (None: the old one stands)."""
        return hashcache.merge_entry(self.old, self.listed, hashes, self.listed_ns)


@dataclass(slots=True)
class FolderResult:
    """The answer to a folder job (hashjob.FolderDone)."""

    listed_ok: bool  # False: the folder could not be listed (one error)
    errors: list[bytes | FileRecord]  # records of entries that failed (or of the folder)
    subfolders: list[listing.Subfolder]
    skipped_links: int
    skipped_other: int
    parts: Parts  # the first files' output
    rows: Rows  # their cache rows
    rest: list[FolderPart]  # the folder's other files, cut into parts
    #: what becomes of the folder's cache entry (None: nothing to store: no cache, or
    #: the entry stands as it is)
    store: NewEntry | LeftOpen | None
    counts: JobCounts
    damaged: str  # why the cache entry could not be read, if it could not


@dataclass(slots=True)
class PartResult:
    """The answer to a segment job of one part (hashjob.Done)."""

    parts: Parts
    rows: Rows
    counts: JobCounts


def receive(answer: hashjob.Answer) -> FolderResult | PartResult:
    """A job's answer (run here, or decoded from a worker) in the walk's own types."""
    kind, body = answer
    if kind == "S":
        [(parts, rows)], counts = body  # type: ignore[misc]
        return PartResult(parts, rows, JobCounts(*counts))
    ok, errors, subfolders, links, other, parts, rows, rest, store, counts, damaged = body  # type: ignore[misc]
    return FolderResult(
        ok,
        errors,
        subfolders,
        links,
        other,
        parts,
        rows,
        [FolderPart(*seg) for seg in rest],
        _store(store),
        JobCounts(*counts),
        damaged,
    )


def _store(store: hashjob.Store) -> NewEntry | LeftOpen | None:
    if store is None:
        return None
    if len(store) == 2:  # ("put", entry)
        return NewEntry(store[1])
    _, old, listed, listed_ns = store
    return LeftOpen(old, listed, listed_ns)


class _Open:
    """A folder done in several parts (or with large files): its cache entry left open,
    and the rows hashed so far, until its last part is written."""

    __slots__ = ("entry", "hashes", "parts", "rel")

    def __init__(self, rel: str, entry: LeftOpen, parts: int) -> None:
        self.rel = rel
        self.entry = entry
        self.parts = parts  # parts not yet written
        self.hashes: FolderHashes = {}


class _Node:
    """A job of the walk: a folder to list (`seg` None), or a part of one listed before
    (`seg`); sent to a worker (`ticket`), run (`done`), and once taken off the stack, its
    output parts (`parts`, written from `part` on)."""

    __slots__ = ("done", "opened", "part", "parts", "path", "rel", "seg", "ticket")

    def __init__(
        self, path: str, rel: str, seg: FolderPart | None = None, opened: _Open | None = None
    ) -> None:
        self.path = path
        self.rel = rel
        self.seg = seg
        self.opened = opened
        self.ticket: Ticket | None = None
        self.done: FolderResult | PartResult | None = None
        self.parts: list[bytes | FileRecord | Large | _Pending] = []
        self.part = 0


#: a large file hashed by a thread: its record (None: not a regular file), bytes read
_LargeResult = tuple["FileRecord | None", int]


def check_root(root: str) -> str:
    """ROOT as an absolute path (a bucket URL: `scheme://bucket/prefix/`, see
    objectstore.check_root); a UsageError if it is missing or not a folder."""
    if objectstore.is_url(root):
        return objectstore.check_root(root)
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.lexists(root) else "is not a folder"
        raise UsageError(f"ROOT {what}: {root}")
    return root


class Scanner:
    """Walks ROOT and yields a FileRecord for every selected file, in a fixed order.

    Args:
        root: the folder to scan.
        settings: scan settings (filters, hashing, threads).
        hash_cache: where hashes of unchanged files are looked up and stored, or None.
        on_wait: called before the scan may wait (listing a folder, which can take long
            on a network share; a hashing thread or process) when records were yielded
            since the last call, so a consumer can flush what it has buffered.
        procs: worker processes hashing small files, started once PROCS_AFTER files
            have gone by (0 or 1: none; `scan` passes --hash-procs).
        schedule: how jobs are cut and handed to the worker processes (Schedule()).
    """

    def __init__(
        self,
        root: str,
        settings: Settings,
        hash_cache: HashCache | None = None,
        on_wait: Callable[[], None] | None = None,
        procs: int = 0,
        schedule: Schedule | None = None,
    ) -> None:
        self.root = check_root(root)
        self.settings = settings
        self.stats = ScanStats()
        self._cache = hash_cache if settings.hash else None
        self._on_wait = on_wait
        self._procs = procs if procs > 1 else 0
        self.schedule = schedule or Schedule()
        self._yielded = 0  # parts yielded so far
        self._yielded_at_wait = 0  # _yielded when on_wait was last called
        self._local = threading.local()
        #: a bucket ROOT (s3://, gs://): its listing and reads (see _objects)
        self.bucket = objectstore.is_url(self.root)

    # -- the walk ----------------------------------------------------------------

    def _waiting(self) -> None:
        """The scan may wait now: let the consumer flush what it holds of ours, if any."""
        if self._on_wait is not None and self._yielded != self._yielded_at_wait:
            self._yielded_at_wait = self._yielded
            self._on_wait()

    def _folders(self) -> Iterator[_Folder | FileRecord]:
        """Folders depth-first in sorted order, each with its selected files (no file
        is opened: `--no-hash`, and the count of files for progress)."""
        how, visited = self._listing(), self._visited()
        skipped = self.stats.skipped
        stack: list[tuple[str, str]] = [(self.root, "")]
        while stack:
            path, rel = stack.pop()
            self._waiting()
            try:
                found = listing.list_folder(path, rel, how, keep_names=False)
            except OSError as exc:
                self.stats.errors += 1
                yield error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot list folder"))
                continue
            self.stats.folders += 1
            if found.skipped_links:
                skipped[_SKIP_LINK] += found.skipped_links
            if found.skipped_other:
                skipped[_SKIP_OTHER] += found.skipped_other
            for rec in found.errors:
                self.stats.errors += 1
                yield rec
            subdirs = [
                (sub, sub_rel) for sub, sub_rel in self._unvisited(found.subfolders, visited)
            ]
            yield _Folder(path, rel, found.names, found.exts)
            stack.extend(reversed(subdirs))

    def _listing(self) -> listing.Listing:
        s = self.settings
        return (s.follow_symlinks, s.include_hidden, s.all_files, tuple(s.exclude))

    def _visited(self) -> set[tuple[int, int]]:
        """The (device, inode) of folders visited, ROOT's at first (following symlinks:
        each folder is visited once, so loops end)."""
        if not self.settings.follow_symlinks:
            return set()
        st = os.stat(self.root)
        return {(st.st_dev, st.st_ino)}

    def _unvisited(
        self, subfolders: list[listing.Subfolder], visited: set[tuple[int, int]]
    ) -> Iterator[tuple[str, str]]:
        """The subfolders (path, rel) not visited yet, now marked; the others counted."""
        for path, rel, key in subfolders:
            if key is not None:
                if key in visited:
                    self.stats.skipped[_SKIP_VISITED] += 1
                    continue
                visited.add(key)
            yield path, rel

    # -- hashing -----------------------------------------------------------------

    def __iter__(self) -> Iterator[FileRecord]:
        if self.bucket:
            return self._objects()
        if self.settings.hash:
            return self._hashed(lines=False)  # type: ignore[return-value]
        return self._listed()

    def lines(self) -> Iterator[bytes]:
        """The scan's JSON lines, several records per item (a run of whole lines)."""
        if self.bucket:
            return (rec.to_json() for rec in self._objects())
        if self.settings.hash:
            return self._hashed(lines=True)  # type: ignore[return-value]
        return (rec.to_json() for rec in self._listed())

    # -- a bucket ROOT -------------------------------------------------------------

    def _selected(self) -> Iterator[tuple[objectstore.ObjectInfo, str]]:
        """The objects under ROOT's prefix that the filters select, with their
        extensions, in key order, as the listing pages come (folder markers left out)."""
        for page in self._selected_pages():
            yield from page

    def _selected_pages(self) -> Iterator[list[tuple[objectstore.ObjectInfo, str]]]:
        """`_selected` a listing page at a time (the hash cache looks a page up at once)."""
        how = self._listing()
        start = len(objectstore.split(self.root)[2])
        for page in objectstore.list_pages(self.root, self.settings.storage_option):
            chosen = [(info, listing.select_key(info.key[start:], how)) for info in page]
            yield [(info, ext) for info, ext in chosen if ext is not None]

    def _objects(self) -> Iterator[FileRecord]:
        """A bucket ROOT's records in key order: each object's hash from the hash cache
        while its listing stamp (size, LastModified, ETag) is unchanged, else read as a
        stream by one of `hash_threads` threads; a few objects are read ahead."""
        stats, cache, pairs = self.stats, self._cache, self.settings.storage_option
        if not self.settings.hash:
            for info, ext in self._selected():
                stats.files += 1
                stats.bytes += info.size
                yield FileRecord(info.url, info.size, info.mtime_ns, None, ext=ext)
            return
        threads = self.settings.hash_threads
        pool = ThreadPoolExecutor(threads, thread_name_prefix="imgbatch-get")
        window: deque[tuple[objectstore.ObjectInfo, str, Future[str] | str]] = deque()
        try:
            for page in self._selected_pages():
                # one hash-cache query per page, not one per object
                infos = [info for info, _ in page]
                knowns = [None] * len(page) if cache is None else cache.object_hashes(infos)
                for (info, ext), known in zip(page, knowns, strict=True):
                    if known is not None:
                        stats.cache_hits += 1
                        window.append((info, ext, known))
                    else:
                        future = pool.submit(objectstore.hash_object, info, pairs)
                        window.append((info, ext, future))
                    # a window of 2 x threads: reads run ahead while records go out in order
                    while window and (len(window) > 2 * threads or _ready(window[0][2])):
                        yield self._object_done(*window.popleft())
            while window:
                yield self._object_done(*window.popleft())
        finally:
            for _, _, pending in window:
                if isinstance(pending, Future):
                    pending.cancel()
            pool.shutdown(wait=True)

    def _object_done(
        self, info: objectstore.ObjectInfo, ext: str, pending: Future[str] | str
    ) -> FileRecord:
        """An object's record once its hash is known (the hash cache learns it)."""
        stats = self.stats
        if isinstance(pending, Future):
            if not pending.done():
                self._waiting()
            try:
                digest = pending.result()
            except ItemError as exc:
                stats.errors += 1
                rec = error_record(info.url, exc.code, str(exc))
                rec.size, rec.mtime_ns, rec.ext = info.size, info.mtime_ns, ext
                self._yielded += 1
                return rec
            stats.bytes_read += info.size
            if self._cache is not None:
                self._cache.put_object(info.key, info.size, info.mtime_ns, info.etag, digest)
        else:
            digest = pending
        stats.files += 1
        stats.bytes += info.size
        self._yielded += 1
        return FileRecord(info.url, info.size, info.mtime_ns, digest, ext=ext)

    def _listed(self) -> Iterator[FileRecord]:
        """Metadata only (`--no-hash`): no file is opened."""
        stats = self.stats
        follow = self.settings.follow_symlinks
        for item in self._folders():
            if isinstance(item, FileRecord):
                yield item
                continue
            prefix = item.path if item.path.endswith("/") else item.path + "/"
            for name, ext in zip(item.names, item.exts, strict=True):
                path = prefix + name
                try:
                    st = os.stat(path, follow_symlinks=follow)
                except OSError as exc:
                    stats.errors += 1
                    yield error_record(path, ErrorCode.IO_ERROR, _stat_error(exc))
                    continue
                stats.files += 1
                stats.bytes += st.st_size
                yield FileRecord(
                    path, st.st_size, st.st_mtime_ns, None, st.st_ino, st.st_ctime_ns, ext=ext
                )

    def _thread_buffer(self) -> memoryview:
        # One page-aligned buffer per hashing thread, reused for every file.
        view: memoryview | None = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = memoryview(mmap.mmap(-1, CHUNK))
        return view

    def _hash_large(self, path: str) -> _LargeResult:
        """Open and hash one large file (in a hashing thread)."""
        flags = hashjob.open_flags(self.settings.follow_symlinks)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            return error_record(path, ErrorCode.IO_ERROR, hashjob.open_error(exc)), 0
        try:
            try:
                st = os.fstat(fd)
            except OSError as exc:
                return error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot stat")), 0
            if not stat.S_ISREG(st.st_mode):
                return None, 0
            try:
                hexdigest, n, after, _ = hashjob.digest(fd, st, self._thread_buffer())
            except OSError as exc:
                return error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot read"), st), 0
        finally:
            os.close(fd)
        size = st.st_size
        if n != size or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns:
            return error_record(
                path, ErrorCode.IO_ERROR, "file changed while it was being read", after
            ), n
        return FileRecord(path, size, st.st_mtime_ns, hexdigest, st.st_ino, st.st_ctime_ns), n

    def _hashed(self, lines: bool) -> Iterator[bytes | FileRecord]:
        """Every record, in order: JSON lines (`lines`) or FileRecords (see _Walk)."""
        yield from _Walk(self, lines).run()

    def file(self, path: str) -> FileRecord | None:
        """One file's record, hashed as the walk hashes it (`watch`'s changed files; the
        caller has selected it): answered from the hash cache while its stamp matches,
        else read, and the cache learns it; an IO_ERROR record if it cannot be read; None
        when it is not a regular file (any more)."""
        import time

        folder, name = os.path.split(path)
        rel = os.path.relpath(folder, self.root)
        rel = "" if rel == "." else rel
        ext = listing.ext_of(name)
        old = self._cache.get(rel) if self._cache is not None else None
        stamps: list[Stamp | None] | None = [old.get(name)] if old else None
        listed_ns = time.time_ns()
        follow = self.settings.follow_symlinks
        job: hashjob.Job = ([(folder, [name], [ext], stamps)], follow, False, 0)
        [(parts, rows)], _ = hashjob.run_job(job)
        rec: FileRecord | None = None
        for part in parts:
            if isinstance(part, Large):
                rec = self._hash_large(path)[0]
                if rec is not None and rec.ok and rec.hash is not None:
                    size, mtime = rec.size or 0, rec.mtime_ns or 0
                    rows = [(name, (rec.ino, size, mtime, rec.ctime_ns, rec.hash))]
            elif isinstance(part, FileRecord):
                rec = part
        if rec is None:
            return None
        rec.ext = ext
        if rec.ok:
            self.stats.files += 1
            self.stats.bytes += rec.size or 0
        else:
            self.stats.errors += 1
        if self._cache is not None and rows:
            listed = frozenset(old or ()) | {name}  # the folder's other entries stay
            merged = hashcache.merge_entry(old, listed, dict(rows), listed_ns)
            if merged is not None:
                self._cache.put(rel, merged)
        return rec


class _Walk:
    """One hashed walk of a Scanner, and the state it keeps while it runs.

    The walk is a stack of jobs in output order (`todo`, the next on top): a folder to
    list (hashing its first files), or a further part of a folder listed before. A
    job's result tells what comes next (its folder's other parts, then the subfolders),
    so the top of the stack is always the next job in order; with worker processes, the
    next few jobs on the stack are sent out ahead. Results then go through a short
    window while their large files are hashed; folders done in several parts wait in
    `unstored` until their last part is written, then their cache entry is stored."""

    def __init__(self, scanner: Scanner, lines: bool) -> None:
        s = scanner.settings
        self.scanner = scanner
        self.lines = lines
        self.schedule = schedule = scanner.schedule
        self.stats = scanner.stats
        threads = s.hash_threads
        self.pool = ThreadPoolExecutor(threads, "imgbatch-hash") if threads > 1 else None
        self.cache = cache = scanner._cache
        self.follow = s.follow_symlinks
        self.listing, self.visited = scanner._listing(), scanner._visited()
        self.db: str | None = None
        if cache is not None:
            cache.flush()  # jobs read the database itself: what an earlier scan left too
            self.db = cache.db_path
        self.todo: list[_Node] = [_Node(scanner.root, "")]
        self.window: deque[_Node] = deque()  # taken off the stack, being written
        self.unstored: dict[int, _Open] = {}  # folders in several parts, not all written
        self.workers: Workers | None = None
        self.sent = 0  # jobs sent to workers and still on the stack
        self.inline_files = 0
        self.ramp = 1  # files of a folder hashed in its own job inline, doubling to job_files
        self.start_workers: Callable[[int], bool] | None = None
        if scanner._procs:
            self.start_workers = schedule.start_workers or (
                SpareCores(schedule.procs_after, schedule.procs_after_seconds).now
            )

    def run(self) -> Iterator[bytes | FileRecord]:
        """The walk's output, in order; the walk is closed when it ends or is closed."""
        todo, window = self.todo, self.window
        window_jobs = self.schedule.window_jobs
        try:
            while todo:
                if (
                    self.workers is None
                    and self.start_workers is not None
                    and self.start_workers(self.inline_files)
                ):
                    make = self.schedule.workers or Workers
                    self.workers = make(self.scanner._procs)
                self.send_ahead()
                self.take(todo.pop())
                yield from self.write(block=False)
                while len(window) > window_jobs:
                    yield from self.write(block=True)
            yield from self.write(block=True)
        finally:
            self.close()

    def job_of(self, node: _Node, first: int, split: int) -> hashjob.AnyJob:
        nowait = self.schedule.nowait
        if node.seg is not None:
            return "S", ([node.seg.segment()], self.follow, self.lines, nowait)
        job = (node.path, node.rel, self.listing, self.lines, self.db, first, split, nowait)
        return "F", job

    def send_ahead(self) -> None:
        """Send the next jobs in order (the top of the stack) to the workers."""
        workers = self.workers
        if workers is None or not workers.ready():
            return
        limit = workers.capacity()
        files = self.schedule.worker_job_files
        for node in itertools.islice(reversed(self.todo), limit):
            if self.sent >= limit:
                return
            if node.ticket is None and node.done is None:
                node.ticket = workers.submit(self.job_of(node, files, files))
                self.sent += 1

    def get(self, node: _Node) -> FolderResult | PartResult:
        """The node's result: from its worker (waiting for it), or run here."""
        if node.ticket is not None:
            self.sent -= 1
            if node.done is None and self.workers is not None:
                self.scanner._waiting()
                try:
                    node.done = receive(self.workers.result(node.ticket))
                except WorkerLost as exc:
                    log.warning("a hashing process %s; hashing in this process", exc)
                    self.workers.close()
                    self.workers = None
                    # the jobs sent ahead are run here (later workers know nothing of them)
                    for waiting in self.todo:
                        waiting.ticket = None
                    self.sent = 0
        if node.done is None:
            self.scanner._waiting()  # listing a folder may take long (a network share)
            job_files = self.schedule.job_files
            first = min(self.ramp, job_files)
            if node.seg is None:
                self.ramp *= 2
            node.done = receive(hashjob.run(self.job_of(node, first, job_files)))
        return node.done

    def take(self, node: _Node) -> None:
        """Take the next node off the stack: what comes after it goes on the stack,
        its output into the window (its large files to the hashing threads)."""
        done = self.get(node)
        if isinstance(done, FolderResult):
            node.parts = [*done.errors, *done.parts]
            if isinstance(done.store, LeftOpen):  # a folder in parts, or with large files
                node.opened = _Open(node.rel, done.store, 1 + len(done.rest))
                self.unstored[id(node.opened)] = node.opened
            if node.ticket is None:
                self.inline_files += done.counts.files
            subfolders = [
                _Node(p, r) for p, r in self.scanner._unvisited(done.subfolders, self.visited)
            ]
            self.todo.extend(reversed(subfolders))
            self.todo.extend(_Node(g.path, "", g, node.opened) for g in reversed(done.rest))
        else:
            node.parts = list(done.parts)
            if node.ticket is None:
                self.inline_files += len(node.parts)
        pool = self.pool
        if pool is not None:
            for i, part in enumerate(node.parts):
                if isinstance(part, Large):
                    fut = pool.submit(self.scanner._hash_large, _join(node.path, part.name))
                    node.parts[i] = _Pending(fut, part.name, part.ext)
        self.window.append(node)

    def finish(self, node: _Node) -> None:
        """The node's output is written: count it, and store what it hashed."""
        done = node.done
        assert done is not None
        stats, cache, counts = self.stats, self.cache, done.counts
        stats.files += counts.files
        stats.errors += counts.errors
        stats.bytes += counts.bytes
        stats.bytes_read += counts.bytes_read
        stats.cache_hits += counts.cache_hits
        if counts.not_regular:
            stats.skipped[_SKIP_OTHER] += counts.not_regular
        if isinstance(done, FolderResult):
            stats.folders += done.listed_ok
            if done.skipped_links:
                stats.skipped[_SKIP_LINK] += done.skipped_links
            if done.skipped_other:
                stats.skipped[_SKIP_OTHER] += done.skipped_other
            if cache is not None:
                if done.damaged:
                    cache.unreadable(done.damaged)
                if isinstance(done.store, NewEntry):
                    cache.put(node.rel, done.store.hashes)
        node.done = None
        node.parts = []
        if node.opened is not None:
            node.opened.hashes.update(done.rows)
            node.opened.parts -= 1
            if node.opened.parts == 0:
                self.store(node.opened)

    def store(self, opened: _Open) -> None:
        """Store the cache entry of a folder done in parts (all of them written)."""
        assert self.cache is not None
        self.unstored.pop(id(opened), None)
        entry = opened.entry.merged(opened.hashes)
        if entry is not None:
            self.cache.put(opened.rel, entry)

    def write(self, block: bool) -> Iterator[bytes | FileRecord]:
        """Yield the window's output in order, as far as it is ready (`block`: all
        of it, waiting for large files as needed)."""
        window, scanner, lines = self.window, self.scanner, self.lines
        while window:
            node = window[0]
            parts = node.parts
            while node.part < len(parts):
                part: bytes | FileRecord | Large | _Pending = parts[node.part]
                if isinstance(part, Large):  # no hashing threads: hashed now
                    scanner._waiting()  # a long read: what came before goes out first
                    hashed = scanner._hash_large(_join(node.path, part.name))
                    part = _Pending(_done_future(hashed), part.name, part.ext)
                if isinstance(part, _Pending):
                    if not part.future.done():
                        if not block:
                            return
                        scanner._waiting()
                    rec = self.large_done(part, node.opened)
                    node.part += 1
                    if rec is not None:
                        scanner._yielded += 1
                        yield rec.to_json() if lines else rec
                    continue
                node.part += 1
                scanner._yielded += 1
                yield part
            window.popleft()
            self.finish(node)

    def large_done(self, part: _Pending, opened: _Open | None) -> FileRecord | None:
        """The record of a large file hashed by a thread, counted (None: skipped)."""
        stats = self.stats
        rec, n = part.future.result()
        stats.bytes_read += n
        if rec is None:
            stats.skipped[_SKIP_OTHER] += 1
            return None
        rec.ext = part.ext
        if rec.ok:
            stats.files += 1
            stats.bytes += rec.size or 0
            if opened is not None and rec.hash is not None:
                size, mtime = rec.size or 0, rec.mtime_ns or 0
                opened.hashes[part.name] = (rec.ino, size, mtime, rec.ctime_ns, rec.hash)
        else:
            stats.errors += 1
        return rec

    def close(self) -> None:
        """End the walk (done or stopped): workers and threads end; what was hashed is
        kept in the cache, written or not."""
        if self.workers is not None:
            self.workers.close()
        if self.pool is not None:
            for node in self.window:
                for part in node.parts:
                    if isinstance(part, _Pending):
                        part.future.cancel()
            self.pool.shutdown(wait=True)
        hashcache.close_readers()
        if self.cache is not None:
            self.keep_hashed(self.cache)

    def keep_hashed(self, cache: HashCache) -> None:
        """Store the entries of every folder hashed, in whole or in part (a stop)."""
        for node in [*self.window, *self.todo]:
            done = node.done
            if done is None:
                continue
            if isinstance(done, FolderResult):
                if isinstance(done.store, NewEntry):
                    cache.put(node.rel, done.store.hashes)
                elif isinstance(done.store, LeftOpen) and node.opened is None:
                    entry = done.store.merged(dict(done.rows))
                    if entry is not None:
                        cache.put(node.rel, entry)
            if node.opened is not None:
                node.opened.hashes.update(done.rows)
        for opened in list(self.unstored.values()):
            self.store(opened)


def _join(folder: str, name: str) -> str:
    """A file's path, as os.scandir writes it."""
    return folder + name if folder.endswith("/") else f"{folder}/{name}"


def _ready(pending: Future[str] | str) -> bool:
    """Whether an object's hash is known: from the cache, or read."""
    return not isinstance(pending, Future) or pending.done()


def _done_future(result: _LargeResult) -> Future[_LargeResult]:
    fut: Future[_LargeResult] = Future()
    fut.set_result(result)
    return fut


class _Pending:
    """A large file being hashed by a thread, in its place among a job's parts."""

    __slots__ = ("ext", "future", "name")

    def __init__(self, future: Future[_LargeResult], name: str, ext: str) -> None:
        self.future = future
        self.name = name
        self.ext = ext


# -- worker processes -------------------------------------------------------------------


class WorkerLost(Exception):
    """A worker process ended, or answered nonsense."""


class Ticket:
    """A job sent to worker `worker` (-1: to none, it could not be sent), and its answer."""

    __slots__ = ("answer", "worker")

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.answer: hashjob.Answer | None = None  # read before its turn


#: the worker's command: imports this very imgbatch and xxhash, whatever the working
#: directory, without `site` (-S: its start-up and a virtualenv's .pth files cost more
#: than the worker's own imports)
_WORKER = "import sys; sys.path[:0] = {paths!r}; from imgbatch.workerproto import serve; serve()"


class Workers:
    """Worker processes running hash jobs (`workerproto.serve`), started in a background
    thread so that the scan goes on inline meanwhile. Each answers its jobs in the order
    they were sent; the scanner takes answers in the order it sent jobs overall."""

    def __init__(self, n: int, queued: int = QUEUED_PER_WORKER, wait: bool = False) -> None:
        """`n` processes, each sent at most `queued` jobs ahead; `wait`: start them
        before returning (the scan starts them in the background and goes on inline)."""
        self._n = n
        self._queued_max = queued
        self._procs: list[subprocess.Popen[bytes]] = []
        self._queued: list[deque[Ticket]] = []  # per worker, its unanswered tickets
        self._ready = threading.Event()
        self._lost = False
        self._closed = False
        self._lock = threading.Lock()
        if wait:
            self._start()
        else:
            threading.Thread(target=self._start, name="imgbatch-procs", daemon=True).start()

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The worker processes, once started (none after close)."""
        return list(self._procs)

    def _start(self) -> None:
        import xxhash

        # the folders holding this imgbatch (this file's package) and xxhash
        paths = [
            os.path.dirname(os.path.dirname(os.path.abspath(file)))
            for file in (__file__, xxhash.__file__ or "")
        ]
        cmd = [sys.executable, "-S", "-c", _WORKER.format(paths=paths)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(self._n):
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                procs.append(proc)
                assert proc.stdin is not None and proc.stdout is not None
                # room for whole jobs and answers: neither side waits for the other to read
                _pipe_size(proc.stdin.fileno())
                _pipe_size(proc.stdout.fileno())
            for proc in procs:  # each says it started (an empty frame) before it gets jobs
                assert proc.stdout is not None
                if workerproto.read_frame(proc.stdout.fileno()) != b"":
                    raise OSError(f"a hashing process ended as it started ({proc.poll()})")
        except OSError as exc:
            log.debug("cannot start hashing processes: %s", exc)
            for proc in procs:
                proc.kill()
                proc.wait()
            return
        with self._lock:
            if self._closed:
                for proc in procs:
                    _stop(proc)
                return
            self._procs = procs
            self._queued = [deque() for _ in procs]
            self._ready.set()

    def ready(self) -> bool:
        return self._ready.is_set() and not self._lost

    def capacity(self) -> int:
        """Jobs that may wait in the window while workers run."""
        return len(self._procs) * self._queued_max

    def submit(self, job: hashjob.AnyJob) -> Ticket:
        w = min(range(len(self._procs)), key=lambda i: len(self._queued[i]))
        ticket = Ticket(w)
        stdin = self._procs[w].stdin
        assert stdin is not None
        try:
            workerproto.write_frame(stdin.fileno(), marshal.dumps(job))
        except OSError:
            self._lost = True
            ticket.worker = -1  # answered by nobody: run inline when its turn comes
            return ticket
        self._queued[w].append(ticket)
        return ticket

    def result(self, ticket: Ticket) -> hashjob.Answer:
        """The answer to `ticket`. A worker answers its jobs in the order they were
        sent: the answers to its earlier jobs are read first, and kept in their tickets."""
        if ticket.answer is not None:
            return ticket.answer
        if ticket.worker < 0 or self._lost:
            raise WorkerLost("could not be reached")
        queued = self._queued[ticket.worker]
        proc = self._procs[ticket.worker]
        assert proc.stdout is not None
        while queued:
            try:
                frame = workerproto.read_frame(proc.stdout.fileno())
                if frame is None:
                    raise WorkerLost(f"ended (exit status {proc.poll()})")
                answer = workerproto.decode(frame)
            except (OSError, ValueError, TypeError, EOFError) as exc:  # ValueError: marshal
                self._lost = True
                raise WorkerLost(f"failed ({exc})") from None
            except WorkerLost:
                self._lost = True
                raise
            first = queued.popleft()
            first.answer = answer
            if first is ticket:
                return answer
        raise AssertionError("a ticket of this worker was answered twice")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
        for proc in procs:
            _stop(proc)


def _pipe_size(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ (Linux): 1 MiB, the default maximum
    except (ImportError, OSError):
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a worker: its stdin closes, so it exits once its job is done (or at once when
    idle); its stdout closes, so it cannot block writing. Not waited for: the scan's
    end need not wait for it (subprocess reaps it later)."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
    proc.poll()


def count_files(root: str, settings: Settings, stop: threading.Event | None = None) -> int | None:
    """How many records a scan of ROOT would yield, from folder listings alone (no file
    is opened, nor stat'ed where the listing tells files from folders); None if `stop`
    was set first. Runs beside the work, to give progress a total."""
    n = 0
    scanner = Scanner(root, settings.replace(hash=False))
    if scanner.bucket:
        for _ in scanner._selected():
            if stop is not None and stop.is_set():
                return None
            n += 1
        return n
    for item in scanner._folders():
        if stop is not None and stop.is_set():
            return None
        n += 1 if isinstance(item, FileRecord) else len(item.names)
    return n


def run_scan(
    root: str,
    settings: Settings,
    sink: JsonlSink,
    progress: Progress | None = None,
    state: Path | None = None,
    schedule: Schedule | None = None,
) -> ScanStats:
    """`imgbatch scan`: every record to `sink`, hashes cached under `state`.

    Returns the stats; raises OutputClosed when the reader of the sink went away.
    """
    cache = None
    if state and settings.hash and settings.hash_cache:
        from imgbatch.checkpoint import claim_root

        claim_root(state, check_root(root))  # a state folder serves one ROOT
        cache = HashCache(state / "hashcache")
    procs = settings.hash_procs or cores()
    scanner = Scanner(root, settings, cache, on_wait=sink.flush, procs=procs, schedule=schedule)
    stats = scanner.stats
    batch = settings.batch_size
    try:
        unflushed = reported = 0
        for lines in scanner.lines():  # one or more whole lines at a time
            sink.write(lines)
            unflushed += lines.count(b"\n")
            if unflushed >= batch:  # a batch of lines in one write
                sink.flush()
                unflushed = 0
            if progress is not None and stats.seen - reported >= batch:
                reported = stats.seen
                progress.update(stats.seen, stats.bytes, stats.errors)
        sink.flush()
        if progress is not None:
            progress.update(stats.seen, stats.bytes, stats.errors)
    finally:
        if cache is not None:
            cache.close()
    return stats
