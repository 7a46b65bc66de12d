"""The shared results store: analyses by (settings fingerprint, content hash), one per user.

Results describe content, not places: a tree that was moved, renamed or remounted, or
a second tree holding copies, finds its results here and costs no provider request.
Item states (what happened to which file of which ROOT) stay in each ROOT's checkpoint.

Keys are bytes (`key()`), stored as they are: diskcache pickles any other key and runs
pickletools.optimize over it, ~100 us per lookup, more than the offline analyzer spends
on a small image. Stores written before kept (fingerprint, hash) tuples; those are
still read, after the bytes key missed, for as long as the store holds any.

Several processes (runs on different roots) share the store: it is one SQLite database
in WAL mode through diskcache, whose writers wait for each other (SQLite's busy
timeout), and every value is a whole result, so there is nothing to merge. Nothing
deletes from it (`prune` forgets item states only); delete the folder to start afresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imgbatch.errors import CheckpointError

log = logging.getLogger("imgbatch")

ResultKey = tuple[str, str]  # fingerprint, content hash


FORMAT = b"format"  # the store's mark: 2 = bytes keys only (see key())


#: a result's row as diskcache's `set` leaves it (mode 4: pickled, the value in SQLite)
_UPSERT = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    " size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, 0, 4, NULL, ?)"
    " ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time,"
    " access_time = excluded.access_time, size = 0, mode = 4, filename = NULL,"
    " value = excluded.value"
)


def key(fp: str, content_hash: str) -> bytes:
    """The store's key of a result (fingerprints and hashes are hexadecimal)."""
    return f"r\0{fp}\0{content_hash}".encode()


class ResultStore:
    """Stored outcomes (ok, or a permanent error caused by the content) by content."""

    def __init__(self, directory: Path) -> None:
        import diskcache

        from imgbatch.hashcache import DISKCACHE_SETTINGS

        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._db = diskcache.Cache(str(directory), **DISKCACHE_SETTINGS)
        except Exception as exc:  # sqlite3.DatabaseError, OSError
            raise CheckpointError(
                f"cannot open the results store in {directory}: {exc}; move it aside "
                "(results are then requested again) or set [state] results elsewhere"
            ) from None
        # A store made with bytes keys says so (FORMAT); one without that mark that holds
        # anything was written with (fingerprint, hash) tuples: misses look there too
        try:
            if self._db.get(FORMAT) != 2:
                with self._db.transact():
                    if len(self._db) == 0:
                        self._db.set(FORMAT, 2)
            self._tuples = self._db.get(FORMAT) != 2
        except Exception:  # noqa: BLE001 (unreadable: look both ways, errors are misses)
            self._tuples = True

    def get(self, fp: str, content_hash: str) -> dict[str, Any] | None:
        """The stored outcome for this content under fingerprint `fp`, or None.

        A damaged entry is a miss (warned about): the item is analysed again.
        """
        try:
            value = self._db.get(key(fp, content_hash))
            if value is None and self._tuples:
                value = self._db.get((fp, content_hash))
        except Exception as exc:  # an unreadable value: unpickling, SQLite
            log.warning(
                "results store %s: unreadable entry (%s); re-analysing", self.directory, exc
            )
            return None
        return value if isinstance(value, dict) else None

    def put_many(self, items: Iterable[tuple[ResultKey, dict[str, Any]]]) -> int:
        """Store outcomes in one transaction; returns how many.

        The rows are written as diskcache writes them (a pickled value inside SQLite,
        under a raw bytes key; its triggers keep the count), in one statement for the
        lot: diskcache's `set` runs three or four statements a row, ~100 us, and the
        offline analyzer writes thousands a second."""
        import pickle

        now = time.time()
        rows = [
            (key(fp, content_hash), now, now, pickle.dumps(value, protocol=5))
            for (fp, content_hash), value in items
        ]
        if rows:
            with self._db.transact():
                self._db._con.executemany(_UPSERT, rows)
        return len(rows)

    def __len__(self) -> int:
        """Results stored (the format mark aside)."""
        return int(len(self._db)) - (not self._tuples)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
