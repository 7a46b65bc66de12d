"""The pHashes `dupes` computed, by content hash: a private SQLite file in ROOT's state folder.

Rows are plain data (content hash, version, pHash as 16 hex digits or NULL for a file
Pillow cannot decode, width, height): nothing read back can run code. The file is
created 0600 before SQLite opens it (SQLite gives its journal the same mode), in the
state folder, checked first as every state entry is (`statedb.secure`). Where the folder
cannot be written, the store is read-only (what an earlier `dupes` stored is still read)
and `writable` is False: the caller keeps what it computes in memory.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from imgbatch import statedb
from imgbatch.errors import CheckpointError, ErrorCode, ItemError
from imgbatch.providers.local import ANALYZER_VERSION

log = logging.getLogger("imgbatch")

#: the store's file in the state folder
NAME = "phashes.db"

#: (pHash or None if undecodable, width, height)
Answer = tuple[int | None, int | None, int | None]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS phash (hash TEXT NOT NULL, version TEXT NOT NULL, "
    "phash TEXT, width INTEGER, height INTEGER, PRIMARY KEY (hash, version)) WITHOUT ROWID"
)


def compute(
    path: str, content_hash: str, max_side: int, storage_options: tuple[str, ...] = ()
) -> Answer | None:
    """The pHash, width and height of the file at `path` as the offline analyzer computes
    them (the same decoding at `max_side`, the same function): (None, None, None) for a
    file that is no decodable image; None when it cannot be read now or no longer has
    the content `content_hash` (nothing to store). A bucket object is read with
    `storage_options` (KEY=VALUE pairs, as `analyze` read it)."""
    from imgbatch.imaging import prepare
    from imgbatch.providers.local_features import phash

    try:
        prep = prepare(path, max_side, content_hash, storage_options)
    except ItemError as exc:
        return (None, None, None) if exc.code is ErrorCode.BAD_IMAGE else None
    return int(phash(prep.image.convert("L")), 16), prep.width, prep.height


class PhashStore:
    """The computed pHashes of one state folder, for one pHash version and `max_side`."""

    def __init__(self, state: Path, max_side: int) -> None:
        self.path = state / NAME
        self.version = f"{ANALYZER_VERSION}/{max_side}"
        self.writable = False
        self._con: sqlite3.Connection | None = None
        statedb.secure(state, writer=False, names=(NAME,))
        if os.access(state, os.W_OK):
            try:
                statedb.private_file(self.path)
                self._con = sqlite3.connect(self.path, timeout=60)
                self._con.execute(_SCHEMA)
                self._con.commit()
                self.writable = True
                return
            except (OSError, sqlite3.Error):
                self.close()  # read-only after all (a read-only file, a full disk)
        if self.path.exists():
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
            if not os.access(state, os.W_OK):
                uri += "&immutable=1"  # no journal can be made there: nobody writes it
            try:
                self._con = sqlite3.connect(uri, uri=True, timeout=60)
                self._con.execute("SELECT 1 FROM phash LIMIT 1").fetchall()
            except sqlite3.Error as exc:
                raise CheckpointError(f"cannot read {self.path}: {exc}") from None

    def get_many(self, hashes: Iterable[str]) -> dict[str, Answer]:
        """The stored answers of those content hashes that have one."""
        wanted = set(hashes)
        out: dict[str, Answer] = {}
        if self._con is None or not wanted:
            return out
        rows = self._con.execute(
            "SELECT hash, phash, width, height FROM phash WHERE version = ?", (self.version,)
        )
        for h, ph, w, hgt in rows:  # the whole version at once: one scan beats n lookups
            if h in wanted:
                out[h] = (
                    int(ph, 16) if isinstance(ph, str) and len(ph) == 16 else None,
                    w if isinstance(w, int) else None,
                    hgt if isinstance(hgt, int) else None,
                )
        return out

    def put_many(self, answers: Iterable[tuple[str, int | None, int | None, int | None]]) -> None:
        """Store answers (content hash, pHash, width, height) in one transaction; nothing
        when the store is read-only (or stops being writable: then `writable` turns False)."""
        rows = [
            (h, self.version, None if ph is None else f"{ph:016x}", w, hgt)
            for h, ph, w, hgt in answers
        ]
        if not self.writable or self._con is None or not rows:
            return
        try:
            with self._con:
                self._con.executemany("INSERT OR REPLACE INTO phash VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:  # a full disk: the pHashes are still good for this run
            log.warning(
                "cannot write %s (%s): the pHashes computed now are not kept", self.path, exc
            )
            self.writable = False

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> PhashStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
