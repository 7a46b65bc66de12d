"""The scan's jobs: list a folder, then stat, hash and describe its files.

A folder job lists one folder, reads its hash-cache entry and does its first files; a
segment job does more files of a folder listed before. The scanner runs jobs inline,
or in worker processes (`--hash-procs`): a worker is `python -S -c "...serve()"` fed
marshal frames of jobs on stdin and answering on stdout. This module imports only
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
import marshal
import mmap
import os
import stat
import sys
import time
from _thread import get_ident

import xxhash

try:
    from _json import encode_basestring as _quote
except ImportError:  # pragma: no cover (CPython has it)
    from json.encoder import encode_basestring as _quote

# A worker process starts in a few tens of milliseconds only if this module imports
# little: records (dataclasses), errors (enum), typing, re and sqlite3 are
# imported where needed, and jobs and answers travel as marshal data
TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterable

    from imgbatch.records import FileRecord

CHUNK = 1 << 20  # 1 MiB reads: large enough to amortise syscalls, small enough to stay in cache
LARGE_FILE = 4 << 20  # files from this size may go to the scanner's hashing threads
READAHEAD = 32  # files of a folder opened and announced ahead once reads block

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14
_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)

Stamp = tuple[int, int, int, int, str]  # inode, size, mtime_ns, ctime_ns, hash (hashcache)
FolderHashes = dict[str, Stamp]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)

#: a hash-cache entry whose mtime or ctime is this close to the moment the file was read
#: is "racy" (git's rule): on a filesystem with coarse timestamps (FAT/exFAT: 2 s, HFS+:
#: 1 s, some NFS/SMB) the file may change again without its stamp changing. Such entries
#: are not stored; the next scan hashes the file again.
RACY_NS = 2_000_000_000


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

#: how folders are listed: follow symlinks, hidden files, every file (not only images),
#: the --exclude globs
Listing = tuple[bool, bool, bool, tuple[str, ...]]
#: a folder job: the folder's path and its path relative to ROOT, how to list it, JSON
#: lines (True) or FileRecords, the hash cache's database (None: no cache), whether the
#: cache entry must keep every listed name, files done in the job itself (the rest come
#: back as segments of `split` files, for the scanner to send out)
FolderJob = tuple[str, str, Listing, bool, "str | None", int, int]
#: a subfolder found by a folder job: path, path relative to ROOT, (device, inode) when
#: following symlinks (the scanner skips folders it visited through another link)
Subfolder = tuple[str, str, "tuple[int, int] | None"]


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


def io_error(path: str, message: str, st: os.stat_result | None = None) -> FileRecord:
    """An IO_ERROR record."""
    from imgbatch.errors import ErrorCode
    from imgbatch.records import error_record

    return error_record(path, ErrorCode.IO_ERROR, message, st)


_iso: dict[int, str] = {}


def iso_seconds(sec: int) -> str:
    """``2024-05-01T12:00:00`` (UTC) for a Unix time in seconds; remembered, as files of
    one folder often share their second (strftime once per second seen)."""
    text = _iso.get(sec)
    if text is None:
        if len(_iso) >= 4096:
            _iso.clear()
        text = _iso[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return text


def errmsg(exc: OSError, what: str) -> str:
    # never the path: the record carries it, and strerror is always clean text
    return f"{what}: {exc.strerror or exc.__class__.__name__}"


def stat_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return errmsg(exc, "symlink loop")
    if exc.errno == errno.ENOENT:
        return errmsg(exc, "dangling symlink or vanished file")
    return errmsg(exc, "cannot stat")


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


def is_clean(text: str) -> bool:
    """Whether `text` encodes to UTF-8 as it is (no surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encode(text: list[str]) -> bytes:
    return "".join(text).encode("utf-8")


# -- folder jobs: list a folder, then hash its files ------------------------------------


def ext_of(name: str) -> str:
    """records.extension_of for a bare name (no '/'): the listing's hot path."""
    i = name.rfind(".")
    if i <= 0 or (name[0] == "." and not name[:i].strip(".")):
        return ""
    return name[i:].lower()


class Excluder:
    """`--exclude` globs: with a '/', matched against the path relative to ROOT;
    without, against any basename (as in .gitignore). A trailing '/' means folders only."""

    def __init__(self, patterns: Iterable[str]) -> None:
        import fnmatch
        import re

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


_excluders: dict[tuple[str, ...], Excluder] = {}


def _excluder(patterns: tuple[str, ...]) -> Excluder:
    ex = _excluders.get(patterns)
    if ex is None:
        ex = _excluders[patterns] = Excluder(patterns)
    return ex


class Listed:
    """One folder's listing (see list_folder)."""

    __slots__ = (
        "errors",
        "exts",
        "listed",
        "listed_ns",
        "names",
        "skipped_links",
        "skipped_other",
        "subfolders",
    )

    def __init__(self, listed_ns: int) -> None:
        self.errors: list[FileRecord] = []
        self.names: list[str] = []
        self.exts: list[str] = []
        self.subfolders: list[Subfolder] = []
        self.listed: frozenset[str] = frozenset()
        self.listed_ns = listed_ns
        self.skipped_links = 0
        self.skipped_other = 0


def list_folder(path: str, rel: str, listing: Listing, keep_names: bool) -> Listed:
    """List one folder, sorted by name: its selected files (names, extensions), its
    subfolders, error records of entries that could not be told apart, and (`keep_names`)
    every name listed. Raises the OSError of listing the folder itself."""
    follow, hidden, every, patterns = listing
    exclude = _excluder(patterns) if patterns else None
    out = Listed(time.time_ns())
    with os.scandir(path) as it:
        entries = sorted(it, key=_by_name)
    names, exts, subfolders, errors = out.names, out.exts, out.subfolders, out.errors
    images = IMAGE_EXTENSIONS
    for e in entries:
        name = e.name
        if name[0] == "." and not hidden:
            continue
        try:
            if not follow and exclude is None and e.is_file(follow_symlinks=False):
                # the common case first: a regular file (not a symlink), nothing excluded
                ext = ext_of(name)
                if every or ext in images:
                    names.append(name)
                    exts.append(ext)
                continue
            if e.is_symlink():
                if not follow:
                    if every or ext_of(name) in images or e.is_dir():
                        out.skipped_links += 1
                    continue
                is_dir = e.is_dir(follow_symlinks=True)
            else:
                is_dir = e.is_dir(follow_symlinks=False)
            if exclude is not None and exclude.excluded(
                name, f"{rel}/{name}" if rel else name, is_dir
            ):
                continue
            if is_dir:
                key = None
                if follow:
                    st = e.stat()
                    key = (st.st_dev, st.st_ino)
                subfolders.append((e.path, f"{rel}/{name}" if rel else name, key))
                continue
            ext = ext_of(name)
            if not every and ext not in images:
                continue
            if e.is_file(follow_symlinks=follow):
                names.append(name)
                exts.append(ext)
            elif follow and e.is_symlink():
                # following symlinks, and the target is neither file nor folder
                try:
                    os.stat(e.path)
                except OSError as exc:
                    errors.append(io_error(e.path, stat_error(exc)))
                else:
                    out.skipped_other += 1
            else:
                out.skipped_other += 1
        except OSError as exc:  # a stat was needed and failed
            errors.append(io_error(e.path, stat_error(exc)))
    if keep_names:
        out.listed = frozenset([e.name for e in entries])
    return out


def _by_name(e: os.DirEntry[str]) -> str:
    return e.name


#: open hash-cache databases, per thread (a served process scans in several at once)
#: and file; the scanner closes its thread's when its scan ends
_readers: dict[tuple[int, str], sqlite3.Connection] = {}


def read_entry(db: str, rel: str) -> tuple[FolderHashes | None, str]:
    """A folder's hash-cache entry, read straight from the cache's SQLite file (a
    diskcache Cache: `dump_entry` bytes under raw bytes keys, see hashcache), and why it
    could not be read ("" when it could, or there was none). Anything else (a pickle an
    earlier imgbatch or someone else left) is a miss: nothing read here can run code."""
    slot = (get_ident(), db)
    conn = _readers.get(slot)
    try:
        if conn is None:
            import sqlite3

            conn = _readers[slot] = sqlite3.connect(db, timeout=60)
            conn.execute("PRAGMA query_only = 1")
        row = conn.execute(
            "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1",
            (entry_key(rel),),
        ).fetchone()
        if row is None:
            return None, ""
        mode, filename, value = row
        if mode != 1 or filename is not None or not isinstance(value, bytes):
            return None, f"entry of mode {mode}"  # diskcache's MODE_RAW bytes only
        return load_entry(value), ""
    except Exception as exc:  # a damaged entry or database: a miss
        return None, str(exc) or exc.__class__.__name__


def dump_entry(hashes: FolderHashes) -> bytes:
    """A folder's entry as stored: name, inode, size, mtime_ns, ctime_ns, hash of each
    file, all NUL-separated (no file name holds NUL; names that are not UTF-8 keep their
    bytes through surrogateescape). Plain data: loading it runs nothing."""
    return "\0".join(
        ["\0".join((n, str(i), str(s), str(m), str(c), h)) for n, (i, s, m, c, h) in hashes.items()]
    ).encode("utf-8", "surrogateescape")


def load_entry(data: bytes) -> FolderHashes:
    """The entry `dump_entry` stored; ValueError when it is damaged. (Column slices and
    map(int): ~1.7 us a file, near pickle's speed, on a re-scan's hot path.)"""
    if not data:
        return {}
    f = data.decode("utf-8", "surrogateescape").split("\0")
    if len(f) % 6:
        raise ValueError("damaged entry")
    ints = [map(int, f[k::6]) for k in range(1, 5)]
    return dict(zip(f[0::6], zip(*ints, f[5::6], strict=True), strict=True))


def close_readers() -> None:
    """Close the databases read_entry opened in this thread."""
    me = get_ident()
    for slot in [slot for slot in _readers if slot[0] == me]:
        _readers.pop(slot).close()


def entry_key(rel: str) -> bytes:
    # bytes keys: a folder name that is not valid UTF-8 cannot be SQLite TEXT
    return b"d:" + os.fsencode(rel)


def merge_entry(
    old: FolderHashes | None, listed: frozenset[str], hashes: FolderHashes, listed_ns: int
) -> FolderHashes | None:
    """A folder's new hash-cache entry, or None when the old one stands as it is.

    Entries of names still listed but not read this time (an images-only run after
    --all-files, excluded or hidden files, a stop mid-folder) stay: each is checked
    against the file's stat before it is used. Racy stamps are left out."""
    old = old or {}
    if not hashes and old.keys() <= listed:
        return None  # nothing read, nothing gone
    merged = {n: v for n, v in old.items() if n in listed}
    fresh = listed_ns - RACY_NS
    for name, stamp in hashes.items():
        if stamp[2] < fresh and stamp[3] < fresh:
            merged[name] = stamp
        else:
            merged.pop(name, None)  # racy: hashed again next time
    return None if merged == old else merged


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


# -- the worker process ----------------------------------------------------------------


def _read_exactly(fd: int, n: int) -> bytes | None:
    """`n` bytes from `fd`, or None at end of file."""
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    """One length-prefixed frame from `fd`, or None at end of file."""
    head = _read_exactly(fd, 8)
    if head is None:
        return None
    return _read_exactly(fd, int.from_bytes(head, "little"))


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:
        view = view[os.write(fd, view) :]


def encode(done: FolderDone | Done) -> bytes:
    """A job's answer as marshal data: JSON lines travel as bytes, FileRecords and Large
    markers as tagged tuples."""
    if isinstance(done, FolderDone):
        state = [getattr(done, k) for k in FolderDone.__slots__]
        for k in ("errors", "parts"):
            state[FolderDone.__slots__.index(k)] = _plain(getattr(done, k))
        return marshal.dumps(("F", state))
    segments, counts = done
    return marshal.dumps(("S", ([(_plain(parts), rows) for parts, rows in segments], counts)))


def decode(data: bytes) -> FolderDone | Done:
    """The answer `encode` sent."""
    kind, body = marshal.loads(data)
    if kind == "F":
        done = FolderDone()
        for k, v in zip(FolderDone.__slots__, body, strict=True):
            setattr(done, k, _parts(v) if k in ("errors", "parts") else v)
        return done
    segments, counts = body
    return [(_parts(parts), rows) for parts, rows in segments], counts


def _plain(parts: list[bytes | FileRecord | Large]) -> list[object]:
    out: list[object] = []
    for p in parts:
        if isinstance(p, bytes):
            out.append(p)
        elif isinstance(p, Large):
            out.append(("L", p.name, p.ext))
        else:
            code = p.error_code.value if p.error_code is not None else None
            out.append(
                ("R", p.path, p.size, p.mtime_ns, p.hash, p.ino, p.ctime_ns)
                + (code, p.error_message, p.ext)
            )
    return out


def _parts(plain: Iterable[object]) -> list[bytes | FileRecord | Large]:
    out: list[bytes | FileRecord | Large] = []
    for p in plain:
        if isinstance(p, bytes):
            out.append(p)
        elif isinstance(p, tuple) and p[0] == "L":
            out.append(Large(p[1], p[2]))
        else:
            from imgbatch.errors import ErrorCode
            from imgbatch.records import FileRecord

            assert isinstance(p, tuple)
            _, path, size, mtime, digest, ino, ctime, code, message, ext = p
            error = ErrorCode(code) if code is not None else None
            out.append(FileRecord(path, size, mtime, digest, ino, ctime, error, message, ext))
    return out


def serve() -> None:
    """A worker's loop: jobs from stdin, results to stdout, until stdin ends."""
    import _signal  # type: ignore[import-not-found]  # not signal: it imports enum

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # the scanner stops us (stdin ends)
    out = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the results
    sys.stdout = sys.stderr
    try:
        write_frame(out, b"")  # started: jobs may come
        while (frame := read_frame(0)) is not None:
            write_frame(out, encode(run(marshal.loads(frame))))
    except BrokenPipeError:  # the scanner went away
        pass
