"""Stat-keyed hash cache: one diskcache entry per folder, so a re-scan reads no contents.

Each entry maps a folder (path relative to ROOT) to ``{name: (inode, size, mtime_ns,
ctime_ns, hash)}``. One row per folder keeps writes at one SQLite transaction per
folder instead of one per file (75 us each), and the device number is left out of
the key because it changes across remounts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from imgbatch.errors import CheckpointError
from imgbatch.hashjob import FolderHashes, Stamp, entry_key

log = logging.getLogger("imgbatch")

__all__ = ["DISKCACHE_SETTINGS", "FolderHashes", "HashCache", "Stamp"]

#: diskcache settings that keep memory flat: no SQLite mmap, a small page cache, and
#: no eviction (a cache that silently drops entries would re-hash, or worse, forget).
DISKCACHE_SETTINGS: dict[str, Any] = {
    "size_limit": 2**62,
    "eviction_policy": "none",
    "sqlite_mmap_size": 0,
    "sqlite_cache_size": 256,
    "statistics": False,
    # every value inside SQLite's transactions: diskcache writes values over 32 KB (a big
    # folder's row) to separate files that are not fsynced; a crash could lose them
    "disk_min_file_size": 2**30,
}


FLUSH_EVERY = 64  # folders per write transaction: a crash loses at most these (it's a cache)


class HashCache:
    """Folder-keyed hashes of the files below one ROOT."""

    def __init__(self, directory: Path) -> None:
        import diskcache  # imported here: `imgbatch --help` should not pay for it

        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(directory), **DISKCACHE_SETTINGS)
        except Exception as exc:  # sqlite3.DatabaseError, OSError, ...
            raise CheckpointError(f"cannot open hash cache in {directory}: {exc}") from None
        self._pending: dict[bytes, FolderHashes] = {}
        self._warned = False

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
        except Exception as exc:  # a damaged entry (unpickling, SQLite): a cache miss
            self.unreadable(str(exc))
            return None
        return value if isinstance(value, dict) else None

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
                    self._cache.set(key, hashes)
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
