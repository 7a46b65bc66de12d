"""The lazy walk: folders listed one at a time, files hashed in order, cut into batches.

Memory is bounded by the largest single folder (its entries are sorted) plus a small
window of files being hashed; it never grows with the tree. Small files are hashed
inline (threads only slow syscall-bound work down); large ones go to a few threads,
since xxhash and the kernel copy release the GIL.

Outcomes for a hostile tree (documented in the README):
- unreadable folder / unreadable file / file vanished before it was read / file that
  changed while being read / dangling or looping symlink (when following): an error
  record with code IO_ERROR;
- symlink while not following, FIFO, socket or device (never opened), a folder already
  visited through another symlink: a counted skip (`ScanStats.skipped`).
"""

from __future__ import annotations

import errno
import fnmatch
import itertools
import mmap
import os
import re
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import xxhash

from imgbatch.config import Settings
from imgbatch.errors import ErrorCode, UsageError
from imgbatch.hashcache import FolderHashes, HashCache
from imgbatch.output import JsonlSink, Progress
from imgbatch.records import FileRecord, error_record, extension_of

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)

CHUNK = 1 << 20  # 1 MiB reads: large enough to amortise syscalls, small enough to stay in cache
LARGE_FILE = 4 << 20  # files from this size go to the hashing threads
WINDOW = 512  # records held back at most while an earlier large file is being hashed

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

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


def _errmsg(exc: OSError, what: str) -> str:
    # never the path: the record carries it, and strerror is always clean text
    return f"{what}: {exc.strerror or exc.__class__.__name__}"


def _stat_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return _errmsg(exc, "symlink loop")
    if exc.errno == errno.ENOENT:
        return _errmsg(exc, "dangling symlink or vanished file")
    return _errmsg(exc, "cannot stat")


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


_Slot = tuple["FileRecord | Future[FileRecord] | None", FolderHashes, str, "FolderHashes | None"]


@dataclass
class _Folder:
    path: str
    rel: str
    files: list[tuple[os.DirEntry[str], str]]  # entry, extension
    names: frozenset[str] = frozenset()  # every name listed (to keep others' cache entries)
    listed_ns: int = 0  # wall clock before listing: entries changed after it are racy


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


class Scanner:
    """Walks ROOT and yields a FileRecord for every selected file, in a fixed order.

    Args:
        root: the folder to scan.
        settings: scan settings (filters, hashing, threads).
        hash_cache: where hashes of unchanged files are looked up and stored, or None.
        on_wait: called before the scan may wait (listing a folder, which can take long
            on a network share; a hashing thread) when records were yielded since the
            last call, so a consumer can flush what it has buffered.
    """

    def __init__(
        self,
        root: str,
        settings: Settings,
        hash_cache: HashCache | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.root = check_root(root)
        self.settings = settings
        self.stats = ScanStats()
        self._cache = hash_cache if settings.hash else None
        self._on_wait = on_wait
        self._seen_at_wait = 0  # stats.seen when on_wait was last called
        self._exclude = _Excluder(settings.exclude)
        self._local = threading.local()
        self._read_lock = threading.Lock()

    # -- the walk ----------------------------------------------------------------

    def _waiting(self) -> None:
        """The scan may wait now: let the consumer flush what it holds of ours, if any."""
        if self._on_wait is not None and self.stats.seen != self._seen_at_wait:
            self._seen_at_wait = self.stats.seen
            self._on_wait()

    def _wants_file(self, name: str) -> str | None:
        """The file's extension if it is selected, else None."""
        ext = extension_of(name)
        return ext if self.settings.all_files or ext in IMAGE_EXTENSIONS else None

    def _folders(self) -> Iterator[_Folder | FileRecord]:
        """Folders depth-first in sorted order, each with its selected files."""
        s = self.settings
        follow = s.follow_symlinks
        visited: set[tuple[int, int]] = set()
        if follow:
            st = os.stat(self.root)
            visited.add((st.st_dev, st.st_ino))
        stack: list[tuple[str, str]] = [(self.root, "")]
        while stack:
            path, rel = stack.pop()
            self._waiting()
            listed_ns = time.time_ns()
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                self.stats.errors += 1
                yield error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot list folder"))
                continue
            self.stats.folders += 1
            files: list[tuple[os.DirEntry[str], str]] = []
            subdirs: list[tuple[str, str]] = []
            for e in entries:
                name = e.name
                if name[0] == "." and not s.include_hidden:
                    continue
                erel = f"{rel}/{name}" if rel else name
                try:
                    is_link = e.is_symlink()
                    if is_link and not follow:
                        if self._wants_file(name) is not None or e.is_dir():
                            self.stats.skipped["symlink"] += 1
                        continue
                    is_dir = e.is_dir(follow_symlinks=follow)
                    if self._exclude and self._exclude.excluded(name, erel, is_dir):
                        continue
                    if is_dir:
                        if follow:
                            st = e.stat()
                            key = (st.st_dev, st.st_ino)
                            if key in visited:
                                self.stats.skipped["folder already visited"] += 1
                                continue
                            visited.add(key)
                        subdirs.append((e.path, erel))
                        continue
                    ext = self._wants_file(name)
                    if ext is None:
                        continue
                    if e.is_file(follow_symlinks=follow):
                        files.append((e, ext))
                    elif is_link:
                        # following symlinks, and the target is neither file nor folder
                        try:
                            os.stat(e.path)
                        except OSError as exc:
                            self.stats.errors += 1
                            yield error_record(e.path, ErrorCode.IO_ERROR, _stat_error(exc))
                        else:
                            self.stats.skipped["not a regular file"] += 1
                    else:
                        self.stats.skipped["not a regular file"] += 1
                except OSError as exc:  # a stat was needed and failed
                    self.stats.errors += 1
                    yield error_record(e.path, ErrorCode.IO_ERROR, _stat_error(exc))
            names = frozenset(e.name for e in entries) if self._cache is not None else frozenset()
            del entries
            yield _Folder(path, rel, files, names, listed_ns)
            stack.extend(reversed(subdirs))

    # -- hashing -----------------------------------------------------------------

    def _buffer(self) -> memoryview:
        # One page-aligned buffer per thread: the kernel copies into it ~40% faster
        # than into a bytearray, and it is reused for every file.
        view: memoryview | None = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = memoryview(mmap.mmap(-1, CHUNK))
        return view

    def _hash_open_file(self, path: str, fd: int, st: os.stat_result) -> FileRecord:
        """Hash an opened regular file and close it."""
        try:
            size = st.st_size
            view = self._buffer()
            n = os.readv(fd, [view])
            if n == size < CHUNK:
                # the whole file in one read: the common case for photos under 1 MiB
                digest = xxhash.xxh3_128_hexdigest(view[:n])
                after = st
            else:
                h = xxhash.xxh3_128(view[:n])
                while k := os.readv(fd, [view]):
                    h.update(view[:k])
                    n += k
                digest = h.hexdigest()
                after = os.fstat(fd)  # a file read in several calls may change meanwhile
        except OSError as exc:
            return error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot read"), st)
        finally:
            os.close(fd)
        with self._read_lock:  # large files are hashed by several threads
            self.stats.bytes_read += n
        if n != size or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns:
            return error_record(
                path, ErrorCode.IO_ERROR, "file changed while it was being read", after
            )
        return FileRecord(path, size, st.st_mtime_ns, digest, st.st_ino, st.st_ctime_ns)

    def _open(self, path: str) -> tuple[int, os.stat_result] | FileRecord | None:
        """Open a listed file for hashing: (fd, stat), an error record, or None (skipped)."""
        flags = _OPEN_FLAGS if self.settings.follow_symlinks else _OPEN_FLAGS | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)  # O_NONBLOCK: a file swapped for a FIFO cannot hang us
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                msg = "file vanished before it could be read"
            elif exc.errno == errno.ELOOP:
                msg = "file was replaced by a symlink"
            else:
                msg = _errmsg(exc, "cannot open")
            return error_record(path, ErrorCode.IO_ERROR, msg)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            return error_record(path, ErrorCode.IO_ERROR, _errmsg(exc, "cannot stat"))
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self.stats.skipped["not a regular file"] += 1
            return None
        return fd, st

    def _stat(self, entry: os.DirEntry[str]) -> os.stat_result | FileRecord:
        try:
            return entry.stat(follow_symlinks=self.settings.follow_symlinks)
        except OSError as exc:
            return error_record(entry.path, ErrorCode.IO_ERROR, _stat_error(exc))

    def __iter__(self) -> Iterator[FileRecord]:
        if self.settings.hash:
            return self._hashed()
        return self._listed()

    def _listed(self) -> Iterator[FileRecord]:
        """Metadata only (`--no-hash`): no file is opened."""
        stats = self.stats
        for item in self._folders():
            if isinstance(item, FileRecord):
                yield item
                continue
            for e, ext in item.files:
                st = self._stat(e)
                if isinstance(st, FileRecord):
                    stats.errors += 1
                    yield st
                    continue
                stats.files += 1
                stats.bytes += st.st_size
                yield FileRecord(
                    e.path, st.st_size, st.st_mtime_ns, None, st.st_ino, st.st_ctime_ns, ext=ext
                )

    def _hashed(self) -> Iterator[FileRecord]:
        threads = self.settings.hash_threads
        pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="imgbatch-hash") if threads > 1 else None
        )
        # The ordered window: (record or future, folder hashes to fill, name); a None
        # record marks the end of a folder (name is then its path relative to ROOT),
        # whose hashes are stored if they differ from `old`.
        window: deque[_Slot] = deque()
        fds: dict[Future[FileRecord], int] = {}  # to close the files of cancelled futures
        in_flight = 0
        stats, cache = self.stats, self._cache
        #: folders whose hashes are not stored yet: at their end, or at a stop (--limit, a
        #: signal, a closed pipe), their part hashed so far is kept
        open_folders: dict[str, tuple[_Folder, FolderHashes, FolderHashes | None]] = {}

        def store(rel: str) -> None:
            folder, hashes, old = open_folders.pop(rel)
            assert cache is not None
            # entries of names still listed but not selected this time (an images-only
            # run after --all-files, excluded or hidden files, a stop mid-folder) stay:
            # each is checked against the file's stat before it is used
            merged = {n: v for n, v in old.items() if n in folder.names} if old else {}
            fresh = folder.listed_ns - RACY_NS
            for name, stamp in hashes.items():
                if stamp[2] < fresh and stamp[3] < fresh:
                    merged[name] = stamp
                else:
                    merged.pop(name, None)  # racy: hashed again next time
            if merged != (old or {}):
                cache.put(rel, merged)

        def pop() -> Iterator[FileRecord]:
            nonlocal in_flight
            item, hashes, name, old = window.popleft()
            if item is None:
                if cache is not None:
                    store(name)
                return
            if isinstance(item, Future):
                in_flight -= 1
                del fds[item]
                if not item.done():
                    self._waiting()
                item = item.result()
            account(item, hashes, name)
            yield item

        def account(rec: FileRecord, hashes: FolderHashes, name: str) -> None:
            if rec.ok:
                stats.files += 1
                stats.bytes += rec.size or 0
                if rec.hash is not None and cache is not None:
                    size, mtime = rec.size or 0, rec.mtime_ns or 0
                    hashes[name] = (rec.ino, size, mtime, rec.ctime_ns, rec.hash)
            else:
                stats.errors += 1

        def ready() -> bool:
            head = window[0][0]
            return not isinstance(head, Future) or head.done()

        try:
            for folder in self._folders():
                if isinstance(folder, FileRecord):
                    yield folder
                    continue
                old = None
                hashes: FolderHashes = {}
                if cache is not None:
                    old = cache.get(folder.rel)
                    open_folders[folder.rel] = (folder, hashes, old)
                for e, ext in folder.files:
                    name = e.name
                    rec: FileRecord | Future[FileRecord] | None = None
                    stamp = old.get(name) if old else None
                    if stamp is not None:
                        st = self._stat(e)
                        if isinstance(st, FileRecord):
                            rec = st
                        elif (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == stamp[:4]:
                            stats.cache_hits += 1
                            rec = FileRecord(
                                e.path,
                                st.st_size,
                                st.st_mtime_ns,
                                stamp[4],
                                st.st_ino,
                                st.st_ctime_ns,
                            )
                    if rec is None:
                        opened = self._open(e.path)
                        if opened is None:
                            continue
                        if isinstance(opened, FileRecord):
                            rec = opened
                        else:
                            fd, st = opened
                            if pool is not None and st.st_size >= LARGE_FILE:
                                fut = pool.submit(self._hash_open_file, e.path, fd, st)
                                fds[fut] = fd
                                rec = fut
                                in_flight += 1
                            else:
                                if st.st_size >= LARGE_FILE:  # a long read: flush first
                                    self._waiting()
                                rec = self._hash_open_file(e.path, fd, st)
                    if not window and isinstance(rec, FileRecord):
                        rec.ext = ext
                        account(rec, hashes, name)  # nothing held back: no queueing
                        yield rec
                        continue
                    window.append((rec, hashes, name, old))
                    # keep at most `threads` large files in flight and WINDOW items held
                    while window and (in_flight > threads or len(window) > WINDOW or ready()):
                        yield from pop()
                window.append((None, hashes, folder.rel, old))
                while window and ready():
                    yield from pop()
            while window:
                yield from pop()
        finally:
            if pool is not None:
                for fut, fd in fds.items():
                    if fut.cancel():
                        os.close(fd)
                pool.shutdown(wait=True)
            for rel in list(open_folders):  # stopped mid-folder: keep the part hashed
                store(rel)


def count_files(root: str, settings: Settings, stop: threading.Event | None = None) -> int | None:
    """How many records a scan of ROOT would yield, from folder listings alone (no file
    is opened, nor stat'ed where the listing tells files from folders); None if `stop`
    was set first. Runs beside the work, to give progress a total."""
    n = 0
    for item in Scanner(root, settings.replace(hash=False))._folders():
        if stop is not None and stop.is_set():
            return None
        n += 1 if isinstance(item, FileRecord) else len(item.files)
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
    scanner = Scanner(root, settings, cache, on_wait=sink.flush)
    stats = scanner.stats
    try:
        for n, rec in enumerate(scanner, 1):
            sink.write(rec.to_json())
            if progress is not None and n % settings.batch_size == 0:
                progress.update(stats.seen, stats.bytes, stats.errors)
        sink.flush()
        if progress is not None:
            progress.update(stats.seen, stats.bytes, stats.errors)
    finally:
        if cache is not None:
            cache.close()
    return stats
