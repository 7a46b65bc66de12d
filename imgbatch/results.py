"""The shared results store: analyses by (settings fingerprint, content hash), one per user.

Results describe content, not places: a tree that was moved, renamed or remounted, or
a second tree holding copies, finds its results here and costs no provider request.
Item states (what happened to which file of which ROOT) stay in each ROOT's checkpoint.

Keys are bytes (`key()`), stored as they are; values are JSON (`statedb`: plain data,
never a pickle). The store's mark (``b"format"``) says FORMAT: a store written by an
earlier imgbatch (pickled values; without a mark, (fingerprint, hash) tuple keys) is
migrated once, in place and in one transaction, by the first writer that opens it,
reading the old values with the restricted unpickler; a value that is not plain data
is dropped with a warning (that content is analysed again).

Several processes (runs on different roots) share the store: it is one SQLite database
in WAL mode through diskcache, whose writers wait for each other (SQLite's busy
timeout), and every value is a whole result, so there is nothing to merge. Nothing
deletes from it (`prune` forgets item states only); delete the folder to start afresh.
Its folder is private (`statedb.secure`); readers (`export`, `report`) open it with
``readonly`` and write nothing; `search` and `dupes` also read a store not migrated yet,
as it is (``legacy_ok``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imgbatch import statedb
from imgbatch.errors import CheckpointError
from imgbatch.statedb import UnsafeState

log = logging.getLogger("imgbatch")

ResultKey = tuple[str, str]  # fingerprint, content hash


FORMAT = b"format"  # the store's mark: 3 = bytes keys, JSON values (see key())
FORMAT_VERSION = statedb.DATA_FORMAT


#: a result's row as diskcache's `set` leaves it (JSON, the value in SQLite)
_UPSERT = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    f" size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, 0, {statedb.MODE_JSON},"
    " NULL, ?) ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time,"
    f" access_time = excluded.access_time, size = 0, mode = {statedb.MODE_JSON},"
    " filename = NULL, value = excluded.value"
)

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def key(fp: str, content_hash: str) -> bytes:
    """The store's key of a result (fingerprints and hashes are hexadecimal)."""
    return f"r\0{fp}\0{content_hash}".encode()


def _legacy_key(old: Any) -> bytes | None:
    """The key `_migrate` gives an earlier imgbatch's key: (fingerprint, hash), or bytes."""
    if isinstance(old, tuple) and len(old) == 2:
        return key(str(old[0]), str(old[1]))
    if isinstance(old, bytes) and (old.startswith(b"r\0") or old == FORMAT):
        return old
    return None


class ResultStore:
    """Stored outcomes (ok, or a permanent error caused by the content) by content.

    `readonly`: read without writing anything (a missing store reads as empty; one an
    earlier imgbatch wrote is refused until a writer migrates it, or with `legacy_ok`
    read as it is, through the restricted unpickler: `legacy` then tells)."""

    def __init__(self, directory: Path, readonly: bool = False, legacy_ok: bool = False) -> None:
        self.directory = directory
        self.readonly = readonly
        self.legacy = False
        statedb.secure(
            directory, not readonly, names=statedb.STORE_ENTRIES, mark=statedb.STORE_MARK
        )
        try:
            if readonly:
                self._db: Any = statedb.ReadOnlyCache(directory)
                mark = self._db.get(FORMAT)
                if mark != FORMAT_VERSION and len(self._db) and legacy_ok:
                    self._db.close()
                    self._db = statedb.LegacyReadOnlyCache(directory, _legacy_key)
                    self.legacy = True
                elif mark != FORMAT_VERSION and len(self._db):
                    self._db.close()
                    raise CheckpointError(
                        f"the results store in {directory} was written by an earlier imgbatch; "
                        "run `imgbatch analyze` once to upgrade it (this command does not "
                        "write state)"
                    )
            else:
                self._db = statedb.open_cache(directory)
                if self._db.get(FORMAT) != FORMAT_VERSION:
                    self._migrate()
        except CheckpointError:
            raise
        except Exception as exc:  # sqlite3.DatabaseError, OSError, a refused mark
            raise CheckpointError(
                f"cannot open the results store in {directory}: {exc}; move it aside "
                "(results are then requested again) or set [state] results elsewhere"
            ) from None

    def _migrate(self) -> None:
        """Rewrite an earlier imgbatch's rows as plain data, in one transaction (see the
        module's docstring); an empty store only gets its mark."""
        con = self._db._con
        converted = dropped = 0
        with self._db.transact():
            if self._db.get(FORMAT) == FORMAT_VERSION:
                return  # another process migrated it meanwhile
            for rowid, db_key, raw, mode, filename, value in statedb.rows(con):
                try:
                    old = statedb.old_key(db_key, raw)
                    if old == FORMAT:
                        continue
                    if isinstance(old, tuple) and len(old) == 2:
                        new_key = key(str(old[0]), str(old[1]))
                    elif isinstance(old, bytes) and old.startswith(b"r\0"):
                        new_key = old
                    else:
                        raise UnsafeState(f"an unknown key {old!r}")
                    data = statedb.old_value(mode, filename, value)
                    if not isinstance(data, dict):
                        raise UnsafeState("not a result")
                    if (
                        new_key != old
                        and con.execute(
                            "SELECT 1 FROM Cache WHERE key = ? AND raw = 1",
                            (sqlite3.Binary(new_key),),
                        ).fetchone()
                    ):
                        statedb.delete_row(con, rowid)  # also stored under its bytes key
                        continue
                    statedb.rewrite(con, rowid, new_key, data)
                    converted += 1
                except (UnsafeState, TypeError, ValueError) as exc:
                    log.warning(
                        "results store %s: an entry is not plain data (%s); dropped",
                        self.directory,
                        exc,
                    )
                    statedb.delete_row(con, rowid)
                    dropped += 1
            self._db.set(FORMAT, FORMAT_VERSION)
        if converted or dropped:
            log.info(
                "results store %s upgraded: %s result(s) rewritten as plain data%s",
                self.directory,
                converted,
                f", {dropped} dropped" if dropped else "",
            )

    def get(self, fp: str, content_hash: str) -> dict[str, Any] | None:
        """The stored outcome for this content under fingerprint `fp`, or None.

        A damaged entry is a miss (warned about): the item is analysed again.
        """
        try:
            value = self._db.get(key(fp, content_hash))
        except Exception as exc:  # an unreadable value: refused, SQLite
            log.warning(
                "results store %s: unreadable entry (%s); re-analysing", self.directory, exc
            )
            return None
        return value if isinstance(value, dict) else None

    def put_many(self, items: Iterable[tuple[ResultKey, dict[str, Any]]]) -> int:
        """Store outcomes in one transaction; returns how many.

        The rows are written as diskcache's `set` would write them with `statedb`'s Disk
        (JSON inside SQLite, under a raw bytes key; its triggers keep the count), in one
        statement for the lot: diskcache's `set` runs three or four statements a row,
        ~100 us, and the offline analyzer writes thousands a second."""
        if self.readonly:
            raise CheckpointError("the results store was opened read-only")
        now = time.time()
        rows = [
            (key(fp, content_hash), now, now, _dumps(value).encode())
            for (fp, content_hash), value in items
        ]
        if rows:
            with self._db.transact():
                self._db._con.executemany(_UPSERT, rows)
        return len(rows)

    def __len__(self) -> int:
        """Results stored (the format mark aside)."""
        return int(len(self._db)) - (self._db.get(FORMAT) is not None)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
