"""The lazy walk: folders listed one at a time, files hashed in order, cut into batches.

The main thread lists folders (sorted, files before subfolders) and cuts their files
into jobs (`hashjob`): runs of names with their hash-cache stamps. A job stats each
file, answers it from the cache when its stamp still matches, or reads and hashes it,
and returns finished output: JSON lines (`lines()`, for `scan`) or FileRecords
(iteration, for `analyze`), plus the cache rows of what it read. Jobs run inline; a
`scan` of a big tree (`procs`, `--hash-procs`) also starts a few worker processes once
PROCS_AFTER files have gone by, and then sends jobs to them, so that small files are
hashed on every core while this process only lists, orders and writes. Files from
LARGE_FILE go to a few threads (xxhash and the kernel copy release the GIL), each
reading with its own page-aligned buffer. Results are put back in order.

Memory is bounded by the largest single folder (its entries are sorted) plus a small
window of jobs (and of large files being hashed); it never grows with the tree.

Outcomes for a hostile tree (documented in the README):
- unreadable folder / unreadable file / file vanished before it was read / file that
  changed while being read / dangling or looping symlink (when following): an error
  record with code IO_ERROR;
- symlink while not following, FIFO, socket or device (never opened), a folder already
  visited through another symlink: a counted skip (`ScanStats.skipped`).
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import mmap
import os
import pickle
import re
import select
import stat
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

from imgbatch import hashjob
from imgbatch.config import Settings
from imgbatch.errors import ErrorCode, UsageError
from imgbatch.hashcache import FolderHashes, HashCache
from imgbatch.hashjob import CHUNK, LARGE_FILE, Done, Job, Large, Segment, Stamp
from imgbatch.output import JsonlSink, Progress
from imgbatch.records import FileRecord, error_record

log = logging.getLogger("imgbatch")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)

__all__ = [
    "CHUNK",
    "IMAGE_EXTENSIONS",
    "LARGE_FILE",
    "RACY_NS",
    "ScanStats",
    "Scanner",
    "batched",
    "check_root",
    "count_files",
    "run_scan",
]

JOB_FILES = 128  # files per job run inline: the window below holds 4 jobs
WINDOW_JOBS = 4  # jobs held back at most while an earlier large file is being hashed
WORKER_JOB_FILES = 512  # files per job sent to a worker (one or more folders)
WORKER_JOB_FOLDERS = 64  # folders per job sent to a worker, at most
QUEUED_PER_WORKER = 2  # jobs sent to a worker and not yet answered, at most
#: worker processes are started once this many files, and this many seconds, went by
#: inline: a tree scanned in less never pays for them (each costs ~50 ms of CPU to
#: start, and a re-scan from the hash cache does ~150k files a second inline); and only
#: while a core is idle (the load average leaves SPARE_CORE of one): on a busy machine
#: they only add their overhead, as the kernel runs them instead of the scan
PROCS_AFTER = 500
PROCS_AFTER_SECONDS = 0.0
SPARE_CORE = 0.75

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


_errmsg, _stat_error = hashjob.errmsg, hashjob.stat_error


def _ext(name: str) -> str:
    """records.extension_of for a bare name (no '/'): the walk's hot path."""
    i = name.rfind(".")
    if i <= 0 or (name[0] == "." and not name[:i].strip(".")):
        return ""
    return name[i:].lower()


class _Excluder:
    """`--exclude` globs: with a '/', matched against the path relative to ROOT;
    without, against any basename (as in .gitignore). A trailing '/' means folders only."""

    def __init__(self, patterns: Iterable[str]) -> None:
        groups: dict[tuple[bool, bool], list[str]] = {}
        for pat in patterns:
            dir_only = pat.endswith("/")
            pat = pat.rstrip("/")
            if not pat:
                continue
            anchored = "/" in pat
            groups.setdefault((anchored, dir_only), []).append(fnmatch.translate(pat.lstrip("/")))
        self._res = {k: re.compile("|".join(v)) for k, v in groups.items()}

    def __bool__(self) -> bool:
        return bool(self._res)

    def excluded(self, name: str, rel: str, is_dir: bool) -> bool:
        for (anchored, dir_only), rx in self._res.items():
            if dir_only and not is_dir:
                continue
            if rx.match(rel if anchored else name):
                return True
        return False


@dataclass
class _Folder:
    path: str
    rel: str
    names: list[str]  # the selected files, in output order
    exts: list[str]  # their extensions
    listed: frozenset[str] = frozenset()  # every name listed (to keep others' cache entries)
    listed_ns: int = 0  # wall clock before listing: entries changed after it are racy


@dataclass
class _Open:
    """A folder whose files are being hashed: its cache entry, and the rows read so far."""

    folder: _Folder
    old: FolderHashes | None
    hashes: FolderHashes = field(default_factory=dict)


class _Slot:
    """A job in the ordered window: sent to a worker (`ticket`) or done (`done`); its
    output parts are yielded in order, a segment at a time (large files in between)."""

    __slots__ = ("done", "job", "lasts", "opens", "part", "seg", "ticket")

    def __init__(self, job: Job, opens: list[_Open], lasts: list[bool]) -> None:
        self.job = job
        self.opens = opens  # per segment: its folder
        self.lasts = lasts  # per segment: whether it ends its folder
        self.ticket: _Ticket | None = None
        self.done: Done | None = None
        self.seg = 0
        self.part = 0


#: a large file hashed by a thread: its record (None: not a regular file), bytes read
_LargeResult = tuple["FileRecord | None", int]

#: a hash-cache entry whose mtime or ctime is this close to the moment the file was read
#: is "racy" (git's rule): on a filesystem with coarse timestamps (FAT/exFAT: 2 s, HFS+:
#: 1 s, some NFS/SMB) the file may change again without its stamp changing. Such entries
#: are not stored; the next scan hashes the file again.
RACY_NS = 2_000_000_000


def check_root(root: str) -> str:
    """ROOT as an absolute path; a UsageError if it is missing or not a folder."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.lexists(root) else "is not a folder"
        raise UsageError(f"ROOT {what}: {root}")
    return root


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def spare_cores() -> float:
    """Cores left idle by the machine's load (its 1-minute average)."""
    try:
        return cores() - os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average here: assume the cores are ours
        return float(cores())


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
    """

    def __init__(
        self,
        root: str,
        settings: Settings,
        hash_cache: HashCache | None = None,
        on_wait: Callable[[], None] | None = None,
        procs: int = 0,
    ) -> None:
        self.root = check_root(root)
        self.settings = settings
        self.stats = ScanStats()
        self._cache = hash_cache if settings.hash else None
        self._on_wait = on_wait
        self._procs = procs if procs > 1 else 0
        self._yielded = 0  # parts yielded so far
        self._yielded_at_wait = 0  # _yielded when on_wait was last called
        self._exclude = _Excluder(settings.exclude)
        self._local = threading.local()

    # -- the walk ----------------------------------------------------------------

    def _waiting(self) -> None:
        """The scan may wait now: let the consumer flush what it holds of ours, if any."""
        if self._on_wait is not None and self._yielded != self._yielded_at_wait:
            self._yielded_at_wait = self._yielded
            self._on_wait()

    def _folders(self) -> Iterator[_Folder | FileRecord]:
        """Folders depth-first in sorted order, each with its selected files."""
        s = self.settings
        follow, hidden, every = s.follow_symlinks, s.include_hidden, s.all_files
        exclude = self._exclude
        excluding = bool(exclude)
        keep_names = self._cache is not None
        skipped = self.stats.skipped
        visited: set[tuple[int, int]] = set()
        if follow:
            st = os.stat(self.root)
            visited.add((st.st_dev, st.st_ino))
        by_name = attrgetter("name")
        stack: list[tuple[str, str]] = [(self.root, "")]
        while stack:
            path, rel = stack.pop()
            self._waiting()
            listed_ns = time.time_ns()
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=by_name)
            except OSError as exc:
                self.stats.errors += 1
                yield error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot list folder"))
                continue
            self.stats.folders += 1
            names: list[str] = []
            exts: list[str] = []
            subdirs: list[tuple[str, str]] = []
            for e in entries:
                name = e.name
                if name[0] == "." and not hidden:
                    continue
                try:
                    if e.is_symlink():
                        if not follow:
                            if every or _ext(name) in IMAGE_EXTENSIONS or e.is_dir():
                                skipped[_SKIP_LINK] += 1
                            continue
                        is_dir = e.is_dir(follow_symlinks=True)
                    else:
                        is_dir = e.is_dir(follow_symlinks=False)
                    if excluding and exclude.excluded(
                        name, f"{rel}/{name}" if rel else name, is_dir
                    ):
                        continue
                    if is_dir:
                        if follow:
                            st = e.stat()
                            key = (st.st_dev, st.st_ino)
                            if key in visited:
                                skipped[_SKIP_VISITED] += 1
                                continue
                            visited.add(key)
                        subdirs.append((e.path, f"{rel}/{name}" if rel else name))
                        continue
                    ext = _ext(name)
                    if not every and ext not in IMAGE_EXTENSIONS:
                        continue
                    if e.is_file(follow_symlinks=follow):
                        names.append(name)
                        exts.append(ext)
                    elif follow and e.is_symlink():
                        # following symlinks, and the target is neither file nor folder
                        try:
                            os.stat(e.path)
                        except OSError as exc:
                            self.stats.errors += 1
                            yield error_record(e.path, ErrorCode.IO_ERROR, _stat_error(exc))
                        else:
                            skipped[_SKIP_OTHER] += 1
                    else:
                        skipped[_SKIP_OTHER] += 1
                except OSError as exc:  # a stat was needed and failed
                    self.stats.errors += 1
                    yield error_record(e.path, ErrorCode.IO_ERROR, _stat_error(exc))
            listed = frozenset(map(by_name, entries)) if keep_names else frozenset()
            del entries
            yield _Folder(path, rel, names, exts, listed, listed_ns)
            stack.extend(reversed(subdirs))

    # -- hashing -----------------------------------------------------------------

    def __iter__(self) -> Iterator[FileRecord]:
        if self.settings.hash:
            return self._hashed(lines=False)  # type: ignore[return-value]
        return self._listed()

    def lines(self) -> Iterator[bytes]:
        """The scan's JSON lines, several records per item (a run of whole lines)."""
        if self.settings.hash:
            return self._hashed(lines=True)  # type: ignore[return-value]
        return (rec.to_json() for rec in self._listed())

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
        """Every record, in order: JSON lines (`lines`) or FileRecords."""
        s = self.settings
        threads = s.hash_threads
        pool = ThreadPoolExecutor(threads, "imgbatch-hash") if threads > 1 else None
        stats, cache = self.stats, self._cache
        follow = s.follow_symlinks
        window: deque[_Slot | FileRecord] = deque()
        unstored: dict[int, _Open] = {}  # folders whose hashes are not stored yet
        workers: _Workers | None = None
        inline_files = 0
        ramp = 1  # files in the next job run inline, doubling up to JOB_FILES
        next_look = time.perf_counter() + PROCS_AFTER_SECONDS  # whether to start workers
        pending: list[Segment] = []  # segments of the next job for the workers
        pending_opens: list[_Open] = []
        pending_lasts: list[bool] = []
        pending_files = 0

        def store(opened: _Open) -> None:
            assert cache is not None
            unstored.pop(id(opened), None)
            folder, hashes, old = opened.folder, opened.hashes, opened.old or {}
            if not hashes and old.keys() <= folder.listed:
                return  # nothing read, nothing gone: the entry stands as it is
            # entries of names still listed but not selected this time (an images-only
            # run after --all-files, excluded or hidden files, a stop mid-folder) stay:
            # each is checked against the file's stat before it is used
            merged = {n: v for n, v in old.items() if n in folder.listed}
            fresh = folder.listed_ns - RACY_NS
            for name, stamp in hashes.items():
                if stamp[2] < fresh and stamp[3] < fresh:
                    merged[name] = stamp
                else:
                    merged.pop(name, None)  # racy: hashed again next time
            if merged != old:
                cache.put(folder.rel, merged)

        def complete(slot: _Slot) -> None:
            """Get a job's result (waiting for its worker), and start its large files."""
            nonlocal workers
            if slot.done is None and slot.ticket is not None and workers is not None:
                try:
                    slot.done = workers.result(slot.ticket)
                except _WorkerLost as exc:
                    log.warning("a hashing process %s; hashing in this process", exc)
                    workers.close()
                    workers = None
            if slot.done is None:  # run here (its worker was lost)
                slot.done = hashjob.run_job(slot.job)
            if pool is None:  # large files are hashed here, when their turn comes
                return
            for (parts, _), opened in zip(slot.done[0], slot.opens, strict=True):
                for i, part in enumerate(parts):
                    if isinstance(part, Large):
                        fut = pool.submit(self._hash_large, _join(opened.folder.path, part.name))
                        parts[i] = _Pending(fut, part.name, part.ext)  # type: ignore[call-overload]

        def dispatch(job: Job, opens: list[_Open], lasts: list[bool]) -> None:
            slot = _Slot(job, opens, lasts)
            if workers is not None and workers.ready():
                slot.ticket = workers.submit(job)
            else:
                slot.done = hashjob.run_job(job)
                complete(slot)
            window.append(slot)

        def flush_pending() -> None:
            nonlocal pending, pending_opens, pending_lasts, pending_files
            if pending:
                dispatch((pending, follow, lines), pending_opens, pending_lasts)
                pending, pending_opens, pending_lasts, pending_files = [], [], [], 0

        def pop(wait: bool = False, drain: bool = False) -> Iterator[bytes | FileRecord]:
            """Yield what is ready at the head of the window: `wait` for the head job to
            end first, or `drain` the whole window, waiting as needed."""
            block = wait or drain
            while window:
                head = window[0]
                if isinstance(head, FileRecord):  # a folder that could not be listed
                    window.popleft()
                    self._yielded += 1
                    yield head.to_json() if lines else head
                    block = drain
                    continue
                if head.done is None:
                    if not block and not answered(head):
                        return
                    self._waiting()
                    complete(head)
                assert head.done is not None
                segments, counts = head.done
                while head.seg < len(segments):
                    parts, rows = segments[head.seg]
                    opened = head.opens[head.seg]
                    while head.part < len(parts):
                        part: bytes | FileRecord | Large | _Pending = parts[head.part]
                        if isinstance(part, Large):  # no hashing threads: hashed now
                            self._waiting()  # a long read: what came before goes out first
                            hashed = self._hash_large(_join(opened.folder.path, part.name))
                            part = _Pending(_done_future(hashed), part.name, part.ext)
                        if isinstance(part, _Pending):
                            if not part.future.done():
                                if not block:
                                    return
                                self._waiting()
                            rec = large_done(part, opened)
                            head.part += 1
                            if rec is not None:
                                self._yielded += 1
                                yield rec.to_json() if lines else rec
                            continue
                        head.part += 1
                        self._yielded += 1
                        yield part
                    if cache is not None:
                        opened.hashes.update(rows)
                        if head.lasts[head.seg]:
                            store(opened)
                    head.seg += 1
                    head.part = 0
                window.popleft()
                block = drain
                stats.files += counts[hashjob.FILES]
                stats.errors += counts[hashjob.ERRORS]
                stats.bytes += counts[hashjob.BYTES]
                stats.bytes_read += counts[hashjob.BYTES_READ]
                stats.cache_hits += counts[hashjob.HITS]
                if counts[hashjob.NOT_REGULAR]:
                    stats.skipped[_SKIP_OTHER] += counts[hashjob.NOT_REGULAR]

        def answered(slot: _Slot) -> bool:
            """Whether the slot's job can be completed without waiting."""
            if slot.ticket is None or workers is None:
                return True  # it runs here
            return workers.answered(slot.ticket)

        def large_done(part: _Pending, opened: _Open) -> FileRecord | None:
            rec, n = part.future.result()
            stats.bytes_read += n
            if rec is None:
                stats.skipped[_SKIP_OTHER] += 1
                return None
            rec.ext = part.ext
            if rec.ok:
                stats.files += 1
                stats.bytes += rec.size or 0
                if cache is not None and rec.hash is not None:
                    size, mtime = rec.size or 0, rec.mtime_ns or 0
                    stamp: Stamp = (rec.ino, size, mtime, rec.ctime_ns, rec.hash)
                    opened.hashes[part.name] = stamp
            else:
                stats.errors += 1
            return rec

        try:
            for item in self._folders():
                if isinstance(item, FileRecord):
                    flush_pending()  # in order: after the files listed before it
                    window.append(item)
                    yield from pop()
                    continue
                opened = _Open(item, cache.get(item.rel) if cache is not None else None)
                if cache is not None:
                    unstored[id(opened)] = opened
                old = opened.old
                names, exts = item.names, item.exts
                stamps = [old.get(n) for n in names] if old else None
                if (
                    workers is None
                    and self._procs
                    and inline_files >= PROCS_AFTER
                    and time.perf_counter() >= next_look
                ):
                    next_look = time.perf_counter() + 1.0  # the load changes slowly
                    if spare_cores() >= SPARE_CORE:
                        workers = _Workers(self._procs)
                busy = workers is not None and workers.ready()
                k = 0
                while True:
                    if busy:
                        step = WORKER_JOB_FILES
                    else:  # the first jobs are small: the first records come at once
                        step, ramp = min(ramp, JOB_FILES), ramp * 2
                    seg: Segment = (
                        item.path,
                        names[k : k + step],
                        exts[k : k + step],
                        stamps[k : k + step] if stamps is not None else None,
                    )
                    k += step
                    last = k >= len(names)
                    if busy:
                        pending.append(seg)
                        pending_opens.append(opened)
                        pending_lasts.append(last)
                        pending_files += len(seg[1])
                        if pending_files >= WORKER_JOB_FILES or len(pending) >= WORKER_JOB_FOLDERS:
                            flush_pending()
                    else:
                        flush_pending()  # a worker was lost: what waited for one goes first
                        inline_files += len(seg[1])
                        dispatch(([seg], follow, lines), [opened], [last])
                    yield from pop()
                    limit = workers.capacity() if busy and workers is not None else WINDOW_JOBS
                    while len(window) > limit:
                        yield from pop(wait=True)
                    if last:
                        break
            flush_pending()
            yield from pop(drain=True)
        finally:
            if workers is not None:
                workers.close()
            if pool is not None:
                for slot in window:
                    if isinstance(slot, _Slot) and slot.done is not None:
                        for parts, _ in slot.done[0]:
                            for part in parts:
                                if isinstance(part, _Pending):
                                    part.future.cancel()
                pool.shutdown(wait=True)
            if cache is not None:  # stopped mid-folder: keep the part hashed
                for slot in window:
                    if isinstance(slot, _Slot) and slot.done is not None:
                        for (_, rows), opened in zip(slot.done[0], slot.opens, strict=True):
                            opened.hashes.update(rows)
                for opened in list(unstored.values()):
                    store(opened)


def _join(folder: str, name: str) -> str:
    """A file's path, as os.scandir writes it."""
    return folder + name if folder.endswith("/") else f"{folder}/{name}"


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


class _WorkerLost(Exception):
    """A worker process ended, or answered nonsense."""


class _Ticket:
    __slots__ = ("worker",)

    def __init__(self, worker: int) -> None:
        self.worker = worker


#: the worker's command: imports this very imgbatch, whatever the working directory
_WORKER = "import sys; sys.path.insert(0, {path!r}); from imgbatch.hashjob import serve; serve()"


class _Workers:
    """Worker processes running hash jobs (`hashjob.serve`), started in a background
    thread so that the scan goes on inline meanwhile. Each answers its jobs in the order
    they were sent; the scanner takes answers in the order it sent jobs overall."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._procs: list[subprocess.Popen[bytes]] = []
        self._queued: list[deque[_Ticket]] = []  # per worker, its unanswered tickets
        self._ready = threading.Event()
        self._lost = False
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._start, name="imgbatch-procs", daemon=True).start()

    def _start(self) -> None:
        import imgbatch

        path = os.path.dirname(os.path.dirname(os.path.abspath(imgbatch.__file__)))
        cmd = [sys.executable, "-c", _WORKER.format(path=path)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(self._n):
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                procs.append(proc)
                assert proc.stdin is not None and proc.stdout is not None
                # room for whole jobs and answers: neither side waits for the other to read
                _pipe_size(proc.stdin.fileno())
                _pipe_size(proc.stdout.fileno())
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
        return len(self._procs) * QUEUED_PER_WORKER

    def submit(self, job: Job) -> _Ticket:
        w = min(range(len(self._procs)), key=lambda i: len(self._queued[i]))
        ticket = _Ticket(w)
        stdin = self._procs[w].stdin
        assert stdin is not None
        try:
            hashjob.write_frame(stdin.fileno(), pickle.dumps(job, pickle.HIGHEST_PROTOCOL))
        except OSError:
            self._lost = True
            ticket.worker = -1  # answered by nobody: run inline when its turn comes
            return ticket
        self._queued[w].append(ticket)
        return ticket

    def answered(self, ticket: _Ticket) -> bool:
        """Whether the answer to `ticket` can be read without waiting (or never will)."""
        if ticket.worker < 0 or self._lost:
            return True
        stdout = self._procs[ticket.worker].stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout.fileno()], [], [], 0)
        return bool(readable)

    def result(self, ticket: _Ticket) -> Done:
        """The answer to `ticket`, the oldest unanswered one of its worker."""
        if ticket.worker < 0 or self._lost:
            raise _WorkerLost("could not be reached")
        queued = self._queued[ticket.worker]
        if not queued or queued[0] is not ticket:
            raise AssertionError("answers are taken in the order jobs were sent")
        proc = self._procs[ticket.worker]
        assert proc.stdout is not None
        try:
            frame = hashjob.read_frame(proc.stdout.fileno())
            if frame is None:
                raise _WorkerLost(f"ended (exit status {proc.poll()})")
            done: Done = pickle.loads(frame)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            self._lost = True
            raise _WorkerLost(f"failed ({exc})") from None
        except _WorkerLost:
            self._lost = True
            raise
        queued.popleft()
        return done

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
    for item in Scanner(root, settings.replace(hash=False))._folders():
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
    scanner = Scanner(root, settings, cache, on_wait=sink.flush, procs=procs)
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
