"""The scan's jobs: list a folder, then stat, hash and describe its files.

A folder job lists one folder (`listing`), reads its hash-cache entry (`hashcache`)
and does its first files; a segment job does more files of a folder listed before. The
scanner runs jobs inline, or in worker processes (`--hash-procs`, `workerproto`: marshal
frames of jobs on stdin, answers on stdout). This module imports only
xxhash at load time, so a worker starts in ~20 ms. A job's result is finished output:
the JSON lines of the scan (or FileRecords, for `analyze`), the folder's new cache
entry or rows, and counters; the main process only orders results and writes.

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
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14
_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


class Large:
    """A large file the job left to the scanner's hashing threads, in its place."""

    __slots__ = ("ext", "name")

    def __init__(self, name: str, ext: str) -> None:
        self.name = name
        self.ext = ext


#: one folder's part of a job: its path, the names of selected files (in output
#: order), their extensions, and their hash-cache stamps (None: no cache entry)
Segment = tuple[str, list[str], list[str], "list[Stamp | None] | None"]
#: segments, follow symlinks, JSON lines (True) or FileRecords
Job = tuple[list[Segment], bool, bool]
#: per segment: output parts (JSON lines as bytes, or FileRecords; Large markers) and
#: cache rows (name, stamp) of the files read; then counters (see COUNTERS)
Done = tuple[list[tuple[list["bytes | FileRecord | Large"], list[tuple[str, Stamp]]]], list[int]]
COUNTERS = ("files", "errors", "bytes", "bytes_read", "cache_hits", "not_regular")
FILES, ERRORS, BYTES, BYTES_READ, HITS, NOT_REGULAR = range(6)

#: a folder job: the folder's path and its path relative to ROOT, how to list it, JSON
#: lines (True) or FileRecords, the hash cache's database (None: no cache), whether the
#: cache entry must keep every listed name, files done in the job itself (the rest come
#: back as segments of `split` files, for the scanner to send out)
FolderJob = tuple[str, str, Listing, bool, "str | None", int, int]


class FolderDone:
    """The answer to a folder job (see `encode` for the way it travels)."""

    __slots__ = (
        "damaged",
        "errors",
        "listed_ok",
        "parts",
        "rest",
        "rows",
        "skipped_links",
        "skipped_other",
        "store",
        "subfolders",
        "counts",
    )

    def __init__(self) -> None:
        self.errors: list[bytes | FileRecord] = []  # records of entries that failed
        self.listed_ok = False  # False: the folder could not be listed (one error)
        self.subfolders: list[Subfolder] = []
        self.skipped_links = 0
        self.skipped_other = 0
        self.parts: list[bytes | FileRecord | Large] = []  # the first files' output
        self.rows: list[tuple[str, Stamp]] = []  # their cache rows
        self.rest: list[Segment] = []  # the folder's other files, cut into segments
        #: what becomes of the folder's hash-cache entry: decided by the job (the new
        #: entry, or None when it stands as it is), or left to the scanner (a folder done
        #: in several parts, or with large files): ("open", old entry, names listed,
        #: clock before listing)
        self.store: object = None
        self.counts = [0] * len(COUNTERS)
        self.damaged = ""  # why the cache entry could not be read, if it could not


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
    fd: int, st: os.stat_result, view: memoryview, nowait: bool = False
) -> tuple[str, int, os.stat_result, bool]:
    """Hash an open regular file: (xxh3-128 hex digest, bytes read, its stat after the
    read, whether the first read would have blocked). `nowait`: try the first read
    without blocking (RWF_NOWAIT), to learn whether the content is in the page cache."""
    size = st.st_size
    blocked = False
    if nowait and _NOWAIT:
        try:
            n = os.preadv(fd, [view], 0, _NOWAIT)
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
    segments, follow, lines = job
    counts = [0] * len(COUNTERS)
    view = buffer()
    return [_segment(seg, follow, lines, counts, view) for seg in segments], counts


def _segment(
    seg: Segment, follow: bool, lines: bool, counts: list[int], view: memoryview
) -> tuple[list[bytes | FileRecord | Large], list[tuple[str, Stamp]]]:
    """One folder's part of a job. This loop is the scan's hot path: a file answered
    from the cache costs a stat and a formatted line, so it is written flat."""
    folder, names, exts, stamps = seg
    parts: list[bytes | FileRecord | Large] = []
    rows: list[tuple[str, Stamp]] = []
    if not names:
        return parts, rows
    prefix = folder if folder.endswith("/") else folder + "/"
    qprefix = _quote(prefix)[:-1]
    # The line of FileRecord.to_json's fast path, with the folder's part of the path
    # quoted once (JSON escaping is per character); None: every line the slow way
    template = None
    if lines and is_clean(qprefix):
        template = (
            '{"path":' + qprefix.replace("%", "%%") + '%s,"hash":"%s","size":%d,'
            '"extension":%s,"mtime":"%s.%06dZ","status":"ok"}\n'
        )
    text: list[str] = []  # ok lines not yet encoded
    quoted_ext: dict[str, str] = {}
    quote, iso, clean = _quote, iso_seconds, is_clean
    files = hits = nbytes = nread = 0
    opener = _Opener(folder, prefix, names, follow)
    stat_, dir_fd = os.stat, opener.dir_fd
    where = opener.prefix  # "" when names are opened relative to dir_fd

    def emit(rec: FileRecord) -> None:
        if lines:
            if text:
                parts.append(_encode(text))
                text.clear()
            parts.append(rec.to_json())
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
                    fd = opener.open(i)
                except OSError as exc:
                    failed(io_error(prefix + name, open_error(exc)))
                    continue
                try:
                    try:
                        st = os.fstat(fd)
                    except OSError as exc:
                        msg = errmsg(exc, "cannot stat")
                        failed(io_error(prefix + name, msg))
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        counts[NOT_REGULAR] += 1
                        continue
                    if st.st_size >= LARGE_FILE:
                        if text:
                            parts.append(_encode(text))
                            text.clear()
                        parts.append(Large(name, exts[i]))
                        continue
                    try:
                        hexdigest, n, after, blocked = digest(fd, st, view, not opener.cold)
                    except OSError as exc:
                        msg = errmsg(exc, "cannot read")
                        failed(io_error(prefix + name, msg, st))
                        continue
                finally:
                    os.close(fd)
                if blocked:
                    opener.cold = True
                nread += n
                size = st.st_size
                if n != size or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns:
                    msg = "file changed while it was being read"
                    failed(io_error(prefix + name, msg, after))
                    continue
                rows.append((name, (st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns, hexdigest)))
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


#: a job as sent to a worker: ("F", FolderJob) or ("S", Job)
AnyJob = tuple[str, "FolderJob | Job"]


def run(job: AnyJob) -> FolderDone | Done:
    """Run a folder job or a segment job."""
    kind, body = job
    if kind == "F":
        return run_folder(body)  # type: ignore[arg-type]
    return run_job(body)  # type: ignore[arg-type]


def run_folder(job: FolderJob) -> FolderDone:
    """List a folder, look its files up in the hash cache, and hash the first `first`
    of them (the rest are returned as segments of `split` files)."""
    path, rel, listing, lines, db, first, split = job
    done = FolderDone()
    try:
        found = list_folder(path, rel, listing, db is not None)
    except OSError as exc:
        rec = io_error(path, errmsg(exc, "cannot list folder"))
        done.errors.append(rec.to_json() if lines else rec)
        done.counts[ERRORS] += 1
        return done
    done.listed_ok = True
    done.errors = [r.to_json() for r in found.errors] if lines else list(found.errors)
    done.counts[ERRORS] += len(found.errors)
    done.subfolders = found.subfolders
    done.skipped_links, done.skipped_other = found.skipped_links, found.skipped_other
    names, exts = found.names, found.exts
    old: FolderHashes | None = None
    if db is not None:
        old, done.damaged = read_entry(db, rel)
    stamps = [old.get(n) for n in names] if old else None
    follow = listing[0]
    seg: Segment = (path, names[:first], exts[:first], stamps[:first] if stamps else None)
    done.parts, done.rows = _segment(seg, follow, lines, done.counts, buffer())
    for k in range(first, len(names), split):
        done.rest.append(
            (
                path,
                names[k : k + split],
                exts[k : k + split],
                stamps[k : k + split] if stamps else None,
            )
        )
    if db is None:
        done.store = None
    elif done.rest or any(isinstance(p, Large) for p in done.parts):
        done.store = ("open", old, found.listed, found.listed_ns)
    else:
        done.store = merge_entry(old, found.listed, dict(done.rows), found.listed_ns)
    return done
