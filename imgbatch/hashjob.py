"""The scan's jobs: list a folder, then stat, hash and describe its files.

A folder job lists one folder (`listing`), reads its hash-cache entry (`hashcache`)
and does its first files; a segment job does more files of a folder listed before. The
scanner runs jobs inline, or in worker processes (`--hash-procs`, `workerproto`: marshal
frames of jobs on stdin, answers on stdout). This module imports only
xxhash at load time, so a worker starts in ~20 ms. A job's result is finished output:
the JSON lines of the scan (or FileRecords, for `analyze`), the folder's new cache
entry or rows, and counters; the main process only orders results and writes. Jobs and
results are plain tuples (the wire form); the scanner turns results into its own types
(`scanner.receive`) as it gets them.

Cold caches: a file's first read is tried with RWF_NOWAIT; when it would block (the
content is not in the page cache: a NAS, a spinning disk, a first run), the job opens
the next few files of its folder ahead and asks the kernel to read them
(POSIX_FADV_WILLNEED), so several reads are in flight instead of one at a time.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

import xxhash

from imgbatch.hashcache import FolderHashes, Stamp, merge_entry, read_entry
from imgbatch.jsontext import is_clean, iso_seconds
from imgbatch.listing import Listing, Subfolder, errmsg, io_error, list_folder, stat_error

try:
    from _json import encode_basestring as _quote
except ImportError:  # pragma: no cover (CPython has it)
    from json.encoder import encode_basestring as _quote

# A worker process starts in a few tens of milliseconds only if this module imports
# little: records (dataclasses), errors (enum), typing, re and sqlite3 are
# imported where needed, and jobs and answers travel as marshal data
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from imgbatch.records import FileRecord

CHUNK = 1 << 20  # 1 MiB reads: large enough to amortise syscalls, small enough to stay in cache
LARGE_FILE = 4 << 20  # files from this size may go to the scanner's hashing threads
READAHEAD = 32  # files of a folder opened and announced ahead once reads block

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
#: the flag of a first read that must not block (RWF_NOWAIT, Linux >= 4.14): it tells a
#: cold page cache (0: plain reads, no read-ahead). Jobs carry it (Schedule.nowait).
NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


class Large:
    """A large file the job left to the scanner's hashing threads, in its place."""

    __slots__ = ("ext", "name")

    def __init__(self, name: str, ext: str) -> None:
        self.name = name
        self.ext = ext


# Jobs and their answers are plain tuples: the worker protocol (`workerproto`) sends
# them as they are, and the scanner turns answers into its own types on receipt.

#: one folder's part of a job: its path, the names of selected files (in output
#: order), their extensions, and their hash-cache stamps (None: no cache entry)
Segment = tuple[str, list[str], list[str], "list[Stamp | None] | None"]
#: segments, follow symlinks, JSON lines (True) or FileRecords, NOWAIT (or 0)
Job = tuple[list[Segment], bool, bool, int]
#: a job's output: JSON lines as bytes, or FileRecords; Large markers in place
Parts = list["bytes | FileRecord | Large"]
#: cache rows (name, stamp) of the files read
Rows = list[tuple[str, Stamp]]
#: per segment its parts and rows; then counters (see COUNTERS)
Done = tuple[list[tuple[Parts, Rows]], list[int]]
COUNTERS = ("files", "errors", "bytes", "bytes_read", "cache_hits", "not_regular")
FILES, ERRORS, BYTES, BYTES_READ, HITS, NOT_REGULAR = range(6)

#: a folder job: the folder's path and its path relative to ROOT, how to list it, JSON
#: lines (True) or FileRecords, the hash cache's database (None: no cache), files done
#: in the job itself (the rest come back as segments of `split` files, for the scanner
#: to send out), NOWAIT (or 0)
FolderJob = tuple[str, str, Listing, bool, "str | None", int, int, int]
#: what becomes of the folder's hash-cache entry: None (no cache, or it stands as it
#: is), ("put", the new entry), or left to the scanner (a folder done in several parts,
#: or with large files): ("open", the old entry, the names listed, the clock before
#: listing)
Store = tuple[str, FolderHashes] | tuple[str, FolderHashes | None, frozenset[str], int] | None
#: the answer to a folder job: listed (False: it could not be, one error), error records
#: of its entries (or of the folder), subfolders, symlinks and other files skipped, the
#: first files' parts and rows, the folder's other files cut into segments, Store,
#: counters, why the cache entry could not be read ("": it could)
FolderDone = tuple[
    bool, "list[bytes | FileRecord]", list[Subfolder], int, int, Parts, Rows, list[Segment],
    Store, list[int], str,
]  # fmt: skip
#: a job as sent to a worker: ("F", FolderJob) or ("S", Job); answered ("F", FolderDone)
#: or ("S", Done)
AnyJob = tuple[str, "FolderJob | Job"]
Answer = tuple[str, "FolderDone | Done"]


_buffer: memoryview | None = None


def buffer() -> memoryview:
    """The job's read buffer: page-aligned (the kernel copies into it ~40% faster than
    into a bytearray) and reused for every file. One per process: jobs run in the
    scanning thread or in a worker, one at a time (the hashing threads have their own)."""
    global _buffer
    if _buffer is None:
        _buffer = memoryview(mmap.mmap(-1, CHUNK))
    return _buffer


def open_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "file vanished before it could be read"
    if exc.errno == errno.ELOOP:
        return "file was replaced by a symlink"
    return errmsg(exc, "cannot open")


def open_flags(follow: bool) -> int:
    # O_NONBLOCK: a file swapped for a FIFO cannot hang us; O_NOFOLLOW: nor a symlink
    return _OPEN_FLAGS if follow else _OPEN_FLAGS | os.O_NOFOLLOW


def digest(
    fd: int, st: os.stat_result, view: memoryview, nowait: int = 0
) -> tuple[str, int, os.stat_result, bool]:
    """Hash an open regular file: (xxh3-128 hex digest, bytes read, its stat after the
    read, whether the first read would have blocked). `nowait` (NOWAIT, or 0: a plain
    read): the first read's flag, to learn whether the content is in the page cache."""
    size = st.st_size
    blocked = False
    if nowait:
        try:
            n = os.preadv(fd, [view], 0, nowait)
        except BlockingIOError:
            blocked = True
            n = os.readv(fd, [view])
        except OSError as exc:  # EOPNOTSUPP on some filesystems: read as usual
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.readv(fd, [view])
        else:
            if n != size or n >= CHUNK:
                os.lseek(fd, n, os.SEEK_SET)  # preadv left the offset where it was
    else:
        n = os.readv(fd, [view])
    if n == size < CHUNK:
        # the whole file in one read: the common case for photos under 1 MiB
        return xxhash.xxh3_128_hexdigest(view[:n]), n, st, blocked
    h = xxhash.xxh3_128(view[:n])
    while k := os.readv(fd, [view]):
        h.update(view[:k])
        n += k
    return h.hexdigest(), n, os.fstat(fd), blocked  # read in several calls: it may change


class _Opener:
    """Opens a folder's files by name (relative to the folder's descriptor), and once
    reads block, keeps the next READAHEAD files opened and announced to the kernel."""

    def __init__(self, folder: str, prefix: str, names: list[str], follow: bool) -> None:
        self.names = names
        self.flags = open_flags(follow)
        self.ahead: dict[int, int | OSError] = {}  # index -> fd, or the error opening it
        self.next_ahead = 0
        self.cold = False
        try:
            self.dir_fd: int | None = os.open(folder, _DIR_FLAGS)
        except OSError:  # each file then fails (or not) on its own, by path
            self.dir_fd = None
        self.prefix = "" if self.dir_fd is not None else prefix

    def open(self, i: int) -> int:
        """The descriptor of file `i`; raises the OSError of opening it."""
        opened = self.ahead.pop(i, None)
        if opened is None:
            return os.open(self.prefix + self.names[i], self.flags, dir_fd=self.dir_fd)
        if isinstance(opened, OSError):
            raise opened
        return opened

    def read_ahead(self, i: int, wanted: Callable[[int], bool]) -> None:
        """Open and announce (WILLNEED) the files after `i` that will be read."""
        if _WILLNEED is None:
            return
        j = max(self.next_ahead, i + 1)
        end = min(len(self.names), i + 1 + READAHEAD)
        while j < end:
            if wanted(j):
                try:
                    fd = os.open(self.prefix + self.names[j], self.flags, dir_fd=self.dir_fd)
                except OSError as exc:
                    self.ahead[j] = exc
                else:
                    self.ahead[j] = fd
                    try:
                        os.posix_fadvise(fd, 0, LARGE_FILE, _WILLNEED)
                    except OSError:
                        pass
            j += 1
        self.next_ahead = j

    def close(self) -> None:
        for opened in self.ahead.values():
            if isinstance(opened, int):
                os.close(opened)
        self.ahead.clear()
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


def run_job(job: Job) -> Done:
    """Run one job (see Job, Done). Files from LARGE_FILE are left in place (Large): the
    scanner hashes them in its threads, after writing what comes before them."""
    segments, follow, lines, nowait = job
    counts = [0] * len(COUNTERS)
    view = buffer()
    return [_segment(seg, follow, lines, nowait, counts, view) for seg in segments], counts


class _Failed(Exception):
    """A file that could not be read: why, its stat if known, and bytes read anyway."""

    def __init__(self, message: str, st: os.stat_result | None = None, read: int = 0) -> None:
        self.message = message
        self.st = st
        self.read = read


def _read(
    opener: _Opener, i: int, view: memoryview, nowait: int
) -> tuple[os.stat_result, str | None, int]:
    """Open, stat and hash file `i` of a folder: (its stat, its digest, bytes read). The
    digest is None for a file not hashed here: not a regular file, or a large one.
    Raises _Failed."""
    try:
        fd = opener.open(i)
    except OSError as exc:
        raise _Failed(open_error(exc)) from None
    try:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _Failed(errmsg(exc, "cannot stat")) from None
        if st.st_size >= LARGE_FILE or not stat.S_ISREG(st.st_mode):
            return st, None, 0
        try:
            hexdigest, n, after, blocked = digest(fd, st, view, 0 if opener.cold else nowait)
        except OSError as exc:
            raise _Failed(errmsg(exc, "cannot read"), st) from None
    finally:
        os.close(fd)
    if blocked:
        opener.cold = True
    size = st.st_size
    if n != size or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns:
        raise _Failed("file changed while it was being read", after, n)
    return st, hexdigest, n


def _line_template(prefix: str, lines: bool) -> str | None:
    """The line of FileRecord.to_json's fast path for the files of folder `prefix`, its
    part of the path quoted once (JSON escaping is per character); None: every line is
    made the slow way (FileRecords wanted, or a folder path that needs escaping)."""
    qprefix = _quote(prefix)[:-1]
    if not lines or not is_clean(qprefix):
        return None
    return (
        '{"path":' + qprefix.replace("%", "%%") + '%s,"hash":"%s","size":%d,'
        '"extension":%s,"mtime":"%s.%06dZ","status":"ok"}\n'
    )


def _segment(
    seg: Segment, follow: bool, lines: bool, nowait: int, counts: list[int], view: memoryview
) -> tuple[Parts, Rows]:
    """One folder's part of a job. This loop is the scan's hot path: a file answered
    from the cache costs a stat and a formatted line, so that path is written inline
    (a file read costs syscalls: `_read`, a call more, is lost in them)."""
    folder, names, exts, stamps = seg
    parts: Parts = []
    rows: Rows = []
    if not names:
        return parts, rows
    prefix = folder if folder.endswith("/") else folder + "/"
    template = _line_template(prefix, lines)
    text: list[str] = []  # ok lines not yet encoded
    quoted_ext: dict[str, str] = {}
    quote, iso, clean, read = _quote, iso_seconds, is_clean, _read
    files = hits = nbytes = nread = 0
    opener = _Opener(folder, prefix, names, follow)
    stat_, dir_fd = os.stat, opener.dir_fd
    where = opener.prefix  # "" when names are opened relative to dir_fd

    def emit(rec: FileRecord | Large) -> None:
        if lines:
            if text:
                parts.append(_encode(text))
                text.clear()
            parts.append(rec if isinstance(rec, Large) else rec.to_json())
        else:
            parts.append(rec)

    def failed(rec: FileRecord) -> None:
        counts[ERRORS] += 1
        emit(rec)

    try:
        for i, name in enumerate(names):
            stamp = stamps[i] if stamps is not None else None
            hit = False
            if stamp is not None:
                try:
                    st = stat_(where + name, dir_fd=dir_fd, follow_symlinks=follow)
                except OSError as exc:
                    failed(io_error(prefix + name, stat_error(exc)))
                    continue
                if (
                    st.st_mtime_ns == stamp[2]
                    and st.st_size == stamp[1]
                    and st.st_ino == stamp[0]
                    and st.st_ctime_ns == stamp[3]
                ):
                    hits += 1
                    hexdigest = stamp[4]
                    hit = True
            if not hit:
                if opener.cold:
                    opener.read_ahead(i, lambda j: stamps is None or stamps[j] is None)
                try:
                    st, digested, n = read(opener, i, view, nowait)
                except _Failed as exc:
                    nread += exc.read
                    failed(io_error(prefix + name, exc.message, exc.st))
                    continue
                if digested is None:
                    if stat.S_ISREG(st.st_mode):
                        emit(Large(name, exts[i]))  # hashed by the scanner's threads
                    else:
                        counts[NOT_REGULAR] += 1
                    continue
                hexdigest = digested
                nread += n
                rows.append(
                    (name, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, hexdigest))
                )
            # an ok record: from the cache, or just read
            size = st.st_size
            files += 1
            nbytes += size
            ext = exts[i]
            if template is not None and clean(name):
                qext = quoted_ext.get(ext)
                if qext is None:
                    qext = quoted_ext[ext] = quote(ext)
                sec, ns = divmod(st.st_mtime_ns, 1_000_000_000)
                text.append(
                    template % (quote(name)[1:], hexdigest, size, qext, iso(sec), ns // 1000)
                )
            else:
                from imgbatch.records import FileRecord

                rec = FileRecord(
                    prefix + name, size, st.st_mtime_ns, hexdigest, st.st_ino, st.st_ctime_ns
                )
                rec.ext = ext
                emit(rec)
    finally:
        opener.close()
        counts[FILES] += files
        counts[HITS] += hits
        counts[BYTES] += nbytes
        counts[BYTES_READ] += nread
    if text:
        parts.append(_encode(text))
    return parts, rows


def _encode(text: list[str]) -> bytes:
    return "".join(text).encode("utf-8")


def run(job: AnyJob) -> Answer:
    """Run a folder job or a segment job: its answer, tagged as the job was."""
    kind, body = job
    if kind == "F":
        return kind, run_folder(body)  # type: ignore[arg-type]
    return kind, run_job(body)  # type: ignore[arg-type]


def run_folder(job: FolderJob) -> FolderDone:
    """List a folder, look its files up in the hash cache, and hash the first `first`
    of them (the rest are returned as segments of `split` files)."""
    path, rel, listing, lines, db, first, split, nowait = job
    counts = [0] * len(COUNTERS)
    try:
        found = list_folder(path, rel, listing, db is not None)
    except OSError as exc:
        rec = io_error(path, errmsg(exc, "cannot list folder"))
        counts[ERRORS] += 1
        return False, [rec.to_json() if lines else rec], [], 0, 0, [], [], [], None, counts, ""
    errors: list[bytes | FileRecord] = (
        [r.to_json() for r in found.errors] if lines else list(found.errors)
    )
    counts[ERRORS] += len(errors)
    names, exts = found.names, found.exts
    old: FolderHashes | None = None
    damaged = ""
    if db is not None:
        old, damaged = read_entry(db, rel)
    stamps = [old.get(n) for n in names] if old else None
    follow = listing[0]
    seg: Segment = (path, names[:first], exts[:first], stamps[:first] if stamps else None)
    parts, rows = _segment(seg, follow, lines, nowait, counts, buffer())
    rest: list[Segment] = [
        (path, names[k : k + split], exts[k : k + split], stamps[k : k + split] if stamps else None)
        for k in range(first, len(names), split)
    ]
    store: Store = None
    if db is None:
        pass
    elif rest or any(isinstance(p, Large) for p in parts):
        store = ("open", old, found.listed, found.listed_ns)
    else:
        entry = merge_entry(old, found.listed, dict(rows), found.listed_ns)
        if entry is not None:
            store = ("put", entry)
    skipped = found.skipped_links, found.skipped_other
    return True, errors, found.subfolders, *skipped, parts, rows, rest, store, counts, damaged
