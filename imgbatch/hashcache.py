"""Stat-keyed hash cache: one diskcache entry per folder, so a re-scan reads no contents.

Each entry maps a folder (path relative to ROOT) to ``{name: (inode, size, mtime_ns,
ctime_ns, hash)}``, stored as plain bytes (`dump_entry`: NUL-separated fields, never a
pickle). One row per folder keeps writes at one SQLite transaction per folder instead
of one per file (75 us each), and the device number is left out of the key because it
changes across remounts. The cache's mark (``b"format"``) says the entries are plain
data: a cache written by an earlier imgbatch (pickled entries) is emptied once by the
first scan or run that opens it, and rebuilt (its files are hashed again).

This module owns the entry's stored form and rules (`dump_entry`, `load_entry`,
`entry_key`, `merge_entry`) and its reading straight from the database (`read_entry`,
for the scan's jobs). Scan jobs run in worker processes that start in ~20 ms, so it
imports nothing heavy at load time: logging, sqlite3, statedb (diskcache) and errors
are imported where they are needed.
"""

from __future__ import annotations

import os
from _thread import get_ident

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import sqlite3
    from collections.abc import Sequence
    from pathlib import Path

    from imgbatch.objectstore import ObjectInfo

__all__ = [
    "FolderHashes",
    "HashCache",
    "Stamp",
    "close_readers",
    "dump_entry",
    "entry_key",
    "load_entry",
    "merge_entry",
    "read_entry",
]

Stamp = tuple[int, int, int, int, str]  # inode, size, mtime_ns, ctime_ns, hash
FolderHashes = dict[str, Stamp]  # a folder's entry: a stamp per file name

FLUSH_EVERY = 64  # folders per write transaction: a crash loses at most these (it's a cache)
LOOKUP_BATCH = 500  # objects per hash-cache query (SQLite's bound parameters: 999 at least)
FORMAT = b"format"  # the cache's mark: statedb.DATA_FORMAT once entries are plain data

#: a hash-cache entry whose mtime or ctime is this close to the moment the file was read
#: is "racy" (git's rule): on a filesystem with coarse timestamps (FAT/exFAT: 2 s, HFS+:
#: 1 s, some NFS/SMB) the file may change again without its stamp changing. Such entries
#: are not stored; the next scan hashes the file again.
RACY_NS = 2_000_000_000


def __getattr__(name: str) -> object:
    # statedb's settings, re-exported without importing statedb (diskcache) at load time
    if name == "DISKCACHE_SETTINGS":
        from imgbatch.statedb import DISKCACHE_SETTINGS

        return DISKCACHE_SETTINGS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("imgbatch")


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


#: the entry-name prefix of a bucket object (no folder's relative path starts with NUL)
_OBJECT = "\0o:"


def _decode(mode: int, filename: str | None, value: object) -> object:
    from imgbatch.statedb import decode

    return decode(mode, filename, value)


def _etag_id(etag: str) -> int:
    """An ETag as the entry's integer field (its ctime_ns slot): 63 bits of a digest."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(etag.encode(), digest_size=8).digest(), "big") >> 1


class HashCache:
    """Folder-keyed hashes of the files below one ROOT (or, for a bucket ROOT, object-keyed
    hashes: `object_hash`, `put_object`)."""

    def __init__(self, directory: Path) -> None:
        from imgbatch import statedb
        from imgbatch.errors import CheckpointError

        try:
            self._cache = statedb.open_cache(directory)
            if self._cache.get(FORMAT) != statedb.DATA_FORMAT:
                self._rebuild()
        except Exception as exc:  # sqlite3.DatabaseError, OSError, ...
            raise CheckpointError(f"cannot open hash cache in {directory}: {exc}") from None
        self._pending: dict[bytes, FolderHashes] = {}
        self._warned = False

    def _rebuild(self) -> None:
        """Empty a cache an earlier imgbatch wrote (pickled entries), once, in one
        transaction, and mark it: its files are hashed again by this scan."""
        from imgbatch.statedb import DATA_FORMAT

        with self._cache.transact():
            if self._cache.get(FORMAT) == DATA_FORMAT:
                return  # another process did it meanwhile
            emptied = self._cache._con.execute("DELETE FROM Cache").rowcount
            self._cache.set(FORMAT, DATA_FORMAT)
        if emptied:
            _log().info(
                "hash cache rebuilt (written by an earlier imgbatch): files are hashed again"
            )

    @property
    def db_path(self) -> str:
        """The SQLite file, which scan jobs read directly (read_entry)."""
        return os.path.join(self._cache.directory, "cache.db")

    def unreadable(self, reason: str) -> None:
        """An entry could not be read (it is a miss): warned once per cache."""
        if not self._warned:
            self._warned = True
            _log().warning("hash cache: unreadable entry (%s); re-hashing those files", reason)

    def get(self, rel_dir: str) -> FolderHashes | None:
        key = entry_key(rel_dir)
        if key in self._pending:
            return self._pending[key]
        try:
            value = self._cache.get(key)
            return load_entry(value) if isinstance(value, bytes) else None
        except Exception as exc:  # a damaged or refused entry, SQLite: a cache miss
            self.unreadable(str(exc) or type(exc).__name__)
            return None

    # -- bucket objects: one entry each, keyed by the object's key --------------------

    def object_hash(self, key: str, size: int, mtime_ns: int, etag: str) -> str | None:
        """The hash stored for an object while its listing (size, LastModified, ETag)
        is the one it was hashed at; None otherwise. An ETag is a version stamp here,
        never a content hash (multipart uploads and KMS change it)."""
        entry = self.get(_OBJECT + key)
        stamp = entry.get("o") if entry else None
        if stamp is None or stamp[1:4] != (size, mtime_ns, _etag_id(etag)):
            return None
        return stamp[4]

    def object_hashes(self, objects: Sequence[ObjectInfo]) -> list[str | None]:
        """`object_hash` of each object (None where unknown or its listing changed), read
        in one query per `LOOKUP_BATCH` objects: a re-scan looks a listing page up at once
        instead of one diskcache get per object (bench s3.lookups: ~17 us an object
        instead of ~53, on 2 loaded cores)."""
        found: dict[bytes, FolderHashes | None] = {}
        keys = [entry_key(_OBJECT + o.key) for o in objects]
        wanted = []
        for k in keys:
            if k in self._pending:
                found[k] = self._pending[k]
            else:
                wanted.append(k)
        con = self._cache._con
        for at in range(0, len(wanted), LOOKUP_BATCH):
            part = list(dict.fromkeys(wanted[at : at + LOOKUP_BATCH]))
            marks = ",".join("?" * len(part))
            try:
                rows = con.execute(
                    "SELECT key, mode, filename, value FROM Cache"
                    f" WHERE raw = 1 AND key IN ({marks})",  # placeholders only: no value in it
                    part,
                ).fetchall()
            except Exception as exc:  # SQLite refused: these are misses
                self.unreadable(str(exc) or type(exc).__name__)
                continue
            for key, mode, filename, value in rows:
                try:
                    data = _decode(mode, filename, value)
                    found[bytes(key)] = load_entry(data) if isinstance(data, bytes) else None
                except Exception as exc:  # a damaged or refused entry: a miss
                    self.unreadable(str(exc) or type(exc).__name__)
        out: list[str | None] = []
        for obj, k in zip(objects, keys, strict=True):
            entry = found.get(k)
            stamp = entry.get("o") if entry else None
            ok = stamp is not None and stamp[1:4] == (obj.size, obj.mtime_ns, _etag_id(obj.etag))
            out.append(stamp[4] if ok and stamp is not None else None)
        return out

    def put_object(self, key: str, size: int, mtime_ns: int, etag: str, digest: str) -> None:
        """Store an object's hash under its listing's stamp (see object_hash)."""
        self.put(_OBJECT + key, {"o": (0, size, mtime_ns, _etag_id(etag), digest)})

    def put(self, rel_dir: str, hashes: FolderHashes) -> None:
        """Store a folder's hashes; written with others in one transaction (~235 us each
        on their own), at the latest when the cache is closed."""
        self._pending[entry_key(rel_dir)] = hashes
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        with self._cache.transact():
            for key, hashes in self._pending.items():
                if hashes:
                    self._cache.set(key, dump_entry(hashes))
                else:
                    self._cache.delete(key)
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._cache.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
