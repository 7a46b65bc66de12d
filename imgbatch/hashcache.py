"""Stat-keyed hash cache: one diskcache entry per folder, so a re-scan reads no contents.

Each entry maps a folder (path relative to ROOT) to ``{name: (inode, size, mtime_ns,
ctime_ns, hash)}``, stored as plain bytes (`hashjob.dump_entry`: NUL-separated fields,
never a pickle). One row per folder keeps writes at one SQLite transaction per folder
instead of one per file (75 us each), and the device number is left out of the key
because it changes across remounts. The cache's mark (``b"format"``) says the entries
are plain data: a cache written by an earlier imgbatch (pickled entries) is emptied
once by the first scan or run that opens it, and rebuilt (its files are hashed again).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from imgbatch import statedb
from imgbatch.errors import CheckpointError
from imgbatch.hashjob import FolderHashes, Stamp, dump_entry, entry_key, load_entry
from imgbatch.statedb import DISKCACHE_SETTINGS

log = logging.getLogger("imgbatch")

__all__ = ["DISKCACHE_SETTINGS", "FolderHashes", "HashCache", "Stamp"]

FLUSH_EVERY = 64  # folders per write transaction: a crash loses at most these (it's a cache)
FORMAT = b"format"  # the cache's mark: FORMAT_VERSION once entries are plain data
FORMAT_VERSION = statedb.DATA_FORMAT


class HashCache:
    """Folder-keyed hashes of the files below one ROOT."""

    def __init__(self, directory: Path) -> None:
        try:
            self._cache = statedb.open_cache(directory)
            if self._cache.get(FORMAT) != FORMAT_VERSION:
                self._rebuild()
        except Exception as exc:  # sqlite3.DatabaseError, OSError, ...
            raise CheckpointError(f"cannot open hash cache in {directory}: {exc}") from None
        self._pending: dict[bytes, FolderHashes] = {}
        self._warned = False

    def _rebuild(self) -> None:
        """Empty a cache an earlier imgbatch wrote (pickled entries), once, in one
        transaction, and mark it: its files are hashed again by this scan."""
        with self._cache.transact():
            if self._cache.get(FORMAT) == FORMAT_VERSION:
                return  # another process did it meanwhile
            emptied = self._cache._con.execute("DELETE FROM Cache").rowcount
            self._cache.set(FORMAT, FORMAT_VERSION)
        if emptied:
            log.info("hash cache rebuilt (written by an earlier imgbatch): files are hashed again")

    @property
    def db_path(self) -> str:
        """The SQLite file, which scan jobs read directly (hashjob.read_entry)."""
        return os.path.join(self._cache.directory, "cache.db")

    def unreadable(self, reason: str) -> None:
        """An entry could not be read (it is a miss): warned once per cache."""
        if not self._warned:
            self._warned = True
            log.warning("hash cache: unreadable entry (%s); re-hashing those files", reason)

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
