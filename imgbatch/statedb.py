"""State at rest: private folders and files, their owner check, a codec that stores data
only (never pickle), the restricted unpickler of the one-time migration, read-only opening.

Every SQLite store of imgbatch (a ROOT's checkpoint and hash cache, the user's results
store) is a diskcache folder opened here:

- **Private.** Folders are made 0700 and files 0600 at creation, whatever the umask (a
  database file is created before SQLite opens it: SQLite gives its ``-wal`` and
  ``-shm`` files the main file's mode). `secure()` checks a state folder (or the results
  store) and the entries imgbatch keeps in it before anything is read, as ssh's
  StrictModes does: owned by another user, a symlink, or writable by group or others is
  refused (`CheckpointError`, exit 5) with the command that fixes it. A folder without
  its mark file (`MARK`, `STORE_MARK`) was written by an earlier imgbatch (often 0775
  under a 002 umask): a writer narrows it to 0700/0600 once and marks it; a reader
  refuses it while it is writable by others, naming both fixes (chmod, or one
  `imgbatch analyze` run).
- **Inert.** `DataDisk` stores bytes, str, int and float as diskcache does (raw, in
  SQLite) and everything else as JSON (mode `MODE_JSON`), and refuses keys that are
  not bytes, str or int. Reading, it refuses a pickled key, a pickled value (mode 4)
  and a value kept in a separate file: nothing read from state can run code. Tuples
  come back as lists (callers convert where they rely on tuples).
- **Migrated once.** State written before (pickled values, tuple keys) is read by the
  writer that migrates it with `restricted_loads`, an unpickler that refuses every
  class: plain containers, strings, bytes and numbers only, so a planted payload fails
  to load instead of running.
- **Looking never writes.** `ReadOnlyCache` reads a diskcache folder with SQLite's
  ``mode=ro`` (plus ``immutable=1`` where the folder cannot be written: a WAL database
  cannot otherwise be opened there), never through `diskcache.Cache`, whose constructor
  writes its Settings table. `LegacyReadOnlyCache` reads an earlier imgbatch's folder
  the same way, as it is (`search`, `dupes`), decoding through `restricted_loads`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imgbatch.errors import CheckpointError

log = logging.getLogger("imgbatch")

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

DB_NAME = "cache.db"  # diskcache's database file in its folder
#: present in a state folder (or results store) made or narrowed by this imgbatch: its
#: modes are owner-only, so anything writable by others since then is refused
MARK = "private"
#: the same in the results store, a diskcache folder: diskcache's `check` passes over
#: (and never deletes) a file whose name holds its database's
STORE_MARK = f"{DB_NAME}.private"
#: the format mark (key b"format") of the checkpoint, the hash cache and the results
#: store once every value is plain data
DATA_FORMAT = 3

MODE_RAW = 1  # diskcache's: bytes, str, int, float kept as they are
MODE_PICKLE = 4  # diskcache's default for anything else: refused here
MODE_JSON = 5  # ours: JSON text (ASCII bytes)

#: the entries of a state folder imgbatch keeps (and so checks); folders are walked
STATE_ENTRIES = ("root", "lock", "checkpoint", "hashcache", "batch", "search", "phashes.db", MARK)
#: the entries of a diskcache folder (the results store), and its embeddings (vectors.py)
STORE_ENTRIES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", STORE_MARK, "embeddings")


class UnsafeState(CheckpointError):
    """A stored key or value that is not plain data (pickled, or kept in a file)."""


# -- private folders and files -----------------------------------------------------------


def private_dir(path: Path) -> None:
    """Make `path` (and any missing parent) a folder created 0700 (umask only removes
    bits, so it is never wider at any moment)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists (e.g. a database before SQLite
    opens it: SQLite would create it 0644 minus the umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """os.open with mode 0600 for a file created now."""
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def write_private(path: Path) -> io.BufferedWriter:
    """`path` opened for writing from its start, owner-only (0600, also when an older
    file of that name was wider) and never through a link: a file of state that holds
    answers (downloaded batch results)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    out = os.fdopen(os.open(path, flags, 0o600), "wb")
    os.fchmod(out.fileno(), 0o600)
    return out


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _entries(folder: Path, names: Iterable[str]) -> Iterator[tuple[Path, os.stat_result]]:
    """(path, lstat) of the named entries of `folder` that exist, folders walked."""
    for name in names:
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _entries(path, sorted(os.listdir(path)))


def secure(
    folder: Path, writer: bool, names: Iterable[str] = STATE_ENTRIES, mark: str = MARK
) -> None:
    """Check a state folder (or with `STORE_ENTRIES`, the results store) before anything
    in it is read; a `writer` creates it private (0700) when missing, and narrows one
    written by an earlier imgbatch to 0700/0600. Raises CheckpointError (exit 5) with the
    fix: another user's, a symlink inside, writable by group or others."""
    me = os.geteuid()
    try:
        top = os.stat(folder)
    except FileNotFoundError:
        if writer:
            private_dir(folder)
            private_file(folder / mark)
        return
    except OSError as exc:
        raise CheckpointError(f"cannot read {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise CheckpointError(f"{folder} is not a folder; give imgbatch a folder for its state")
    try:
        found = [(folder, top), *_entries(folder, names)]
    except OSError as exc:
        raise CheckpointError(f"cannot read {folder}: {exc.strerror}") from None
    marked = any(p.name == mark and p.parent == folder for p, _ in found)
    wide: list[tuple[Path, os.stat_result]] = []
    for path, st in found:
        if st.st_uid != me:
            raise CheckpointError(
                f"{path} belongs to user {_user(st.st_uid)}, not {_user(me)}: refused (state "
                f"must be your own); `chown -R {_user(me)} {folder}` if it is yours, else "
                "use another --checkpoint folder"
            )
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(
                f"{path} is a symlink, which imgbatch never makes there: refused; remove it"
            )
        if st.st_mode & 0o077:
            wide.append((path, st))
    writable = [(p, st) for p, st in wide if st.st_mode & 0o022]
    if marked:
        if writable:
            path, st = writable[0]
            raise CheckpointError(
                f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"refused, anyone could plant state there; `chmod -R go-w {folder}` fixes it"
            )
        return
    # no mark: an earlier imgbatch's state (or a folder not made by imgbatch)
    if not writer:
        if writable:
            path, st = writable[0]
            raise CheckpointError(
                f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}, "
                "as an earlier imgbatch left it): refused; `chmod -R go-w "
                f"{folder}`, or run `imgbatch analyze` once (it makes its state private)"
            )
        return
    for path, st in wide:
        try:
            os.chmod(path, 0o700 if stat.S_ISDIR(st.st_mode) else 0o600)
        except OSError as exc:
            raise CheckpointError(f"cannot make {path} private: {exc.strerror}") from None
    if wide:
        log.info("made %s private (folders 0700, files 0600)", folder)
    private_file(folder / mark)


# -- the codec ------------------------------------------------------------------------


def encode(value: Any) -> tuple[int, Any]:
    """(mode, SQLite value) of a stored value: raw for bytes, str, int and float, JSON
    for the rest. Raises TypeError (or ValueError) for what JSON cannot hold."""
    kind = type(value)
    if kind is bytes:
        return MODE_RAW, sqlite3.Binary(value)
    if kind is str or kind is float or (kind is int and -(2**63) <= value < 2**63):
        return MODE_RAW, value
    return MODE_JSON, json.dumps(value, separators=(",", ":")).encode()


def decode(mode: int, filename: str | None, value: Any) -> Any:
    """A stored value; UnsafeState for anything that is not plain data."""
    if filename is not None:
        raise UnsafeState("a value kept in a separate file")
    if mode == MODE_JSON:
        return json.loads(value)
    if mode == MODE_RAW:
        return bytes(value) if isinstance(value, memoryview) else value
    raise UnsafeState(f"a value of mode {mode} (pickled: refused)")


def key(*parts: bytes | str | int) -> bytes:
    """A bytes key from its parts, joined by NUL (which no file name holds)."""
    return b"\0".join(
        p if isinstance(p, bytes) else os.fsencode(p) if isinstance(p, str) else b"%d" % p
        for p in parts
    )


class _Refused(pickle.UnpicklingError):
    pass


class _Restricted(pickle.Unpickler):
    """Loads plain data only: every class and every persistent id is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"refused to load {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refused a persistent id")


def restricted_loads(data: bytes) -> Any:
    """Unpickle containers, strings, bytes and numbers; UnsafeState for anything else
    (a class, a function: a payload is refused, never run)."""
    try:
        return _Restricted(io.BytesIO(data)).load()
    except Exception as exc:  # _Refused, or a damaged pickle
        raise UnsafeState(str(exc) or type(exc).__name__) from None


def old_value(mode: int, filename: str | None, value: Any) -> Any:
    """A value written by an earlier imgbatch (pickled, mode 4) or by this one, read
    with the restricted unpickler (migration only)."""
    if mode == MODE_PICKLE and filename is None and value is not None:
        return restricted_loads(bytes(value))
    return decode(mode, filename, value)


def old_key(db_key: Any, raw: int) -> Any:
    """A key as an earlier imgbatch wrote it: raw, or a pickled tuple (restricted)."""
    if raw:
        return bytes(db_key) if isinstance(db_key, memoryview) else db_key
    return restricted_loads(bytes(db_key))


_disk_class: Any = None


def data_disk() -> Any:
    """The diskcache Disk that stores data only (see the module's docstring)."""
    global _disk_class
    if _disk_class is None:
        import diskcache

        class DataDisk(diskcache.Disk):  # type: ignore[misc]
            """diskcache's Disk without pickle: JSON values, raw keys only."""

            def put(self, key: Any) -> Any:
                if type(key) not in (bytes, str, int):
                    raise TypeError(f"state keys are bytes, not {type(key).__name__}")
                return super().put(key)

            def get(self, key: Any, raw: bool) -> Any:
                if not raw:
                    raise UnsafeState("a pickled key (refused)")
                return super().get(key, raw)

            def store(self, value: Any, read: bool, key: Any = None) -> Any:
                if read:
                    raise TypeError("state values are data, not files")
                mode, data = encode(value)
                return 0, mode, None, data

            def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
                return decode(mode, filename, value)

        _disk_class = DataDisk
    return _disk_class


def open_cache(directory: Path) -> Any:
    """A diskcache Cache for writing, private (folder 0700, database 0600) and with
    `data_disk()`. The caller has checked the folder it lives in (`secure`)."""
    import diskcache

    private_dir(directory)
    private_file(directory / DB_NAME)
    return diskcache.Cache(str(directory), disk=data_disk(), **DISKCACHE_SETTINGS)


def rows(con: sqlite3.Connection) -> Iterator[tuple[int, Any, int, int, Any, Any]]:
    """Every row (rowid, key, raw, mode, filename, value) of a diskcache table, fetched
    in rowid order a few hundred at a time (rows may be updated meanwhile)."""
    last = -(2**63)
    while True:
        batch = con.execute(
            "SELECT rowid, key, raw, mode, filename, value FROM Cache WHERE rowid > ?"
            " ORDER BY rowid LIMIT 500",
            (last,),
        ).fetchall()
        if not batch:
            return
        yield from batch
        last = batch[-1][0]


def rewrite(con: sqlite3.Connection, rowid: int, new_key: bytes, value: Any) -> None:
    """Rewrite one row (inside the caller's transaction) with a bytes key and a plain
    value; raises TypeError/ValueError when the value is not JSON data."""
    mode, data = encode(value)
    con.execute(
        "UPDATE Cache SET key = ?, raw = 1, mode = ?, value = ?, filename = NULL, size = 0"
        " WHERE rowid = ?",
        (sqlite3.Binary(new_key), mode, data, rowid),
    )


def delete_row(con: sqlite3.Connection, rowid: int) -> None:
    con.execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))  # diskcache's trigger counts


# -- reading without writing ---------------------------------------------------------------


class ReadOnlyCache:
    """A diskcache folder read with SQLite's read-only modes: `get` and `iterkeys` as
    diskcache's (bytes, str or int keys; values through `decode`), nothing written.

    A folder without a database reads as empty. Safe to share between threads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        db = directory / DB_NAME
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None
        if not db.exists():
            return
        uri = f"file:{urllib.parse.quote(str(db))}?mode=ro"
        if not os.access(directory, os.W_OK):
            # SQLite cannot make the -shm file there: a WAL database opens read-only only
            # as immutable (what a writer left in a -wal file is then not seen)
            uri += "&immutable=1"
        try:
            self._con = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)
            self._con.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot read {db}: {exc}") from None

    def get(self, key: bytes | str | int, default: Any = None) -> Any:
        if self._con is None:
            return default
        db_key = sqlite3.Binary(key) if isinstance(key, bytes) else key
        with self._lock:
            row = self._con.execute(
                "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (db_key,)
            ).fetchone()
        if row is None:
            return default
        return decode(*row)

    def iterkeys(self) -> Iterator[Any]:
        """Every key, in diskcache's order (by key); a pickled one is refused (UnsafeState)."""
        if self._con is None:
            return
        query = "SELECT key, raw FROM Cache ORDER BY key, raw LIMIT 500"
        args: tuple[Any, ...] = ()
        while True:
            with self._lock:
                batch = self._con.execute(query, args).fetchall()
            if not batch:
                return
            for db_key, raw in batch:
                if not raw:
                    raise UnsafeState("a pickled key (refused)")
                yield bytes(db_key) if isinstance(db_key, memoryview) else db_key
            last, raw = batch[-1]
            query = (
                "SELECT key, raw FROM Cache WHERE key > ? OR (key = ? AND raw > ?)"
                " ORDER BY key, raw LIMIT 500"
            )
            args = (last, last, raw)

    def __len__(self) -> int:
        if self._con is None:
            return 0
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0])

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


class LegacyReadOnlyCache:
    """A diskcache folder an earlier imgbatch wrote (pickled tuple keys, pickled values),
    read as it is: `get`, `iterkeys` and `len` as `ReadOnlyCache`'s, under the keys the
    migration would give (`rekey`: an old key to its bytes key, or None to pass over it),
    and nothing written (`search` and `dupes` before a run migrates it).

    Keys are decoded once, when opened, with `restricted_loads` (only a rowid is kept per
    key); values are decoded when asked for, with the same unpickler. What is not plain
    data (a planted payload) is never run: a key is passed over, a value reads as missing,
    each with one warning."""

    def __init__(self, directory: Path, rekey: Any) -> None:
        self._ro = ReadOnlyCache(directory)
        self.directory = directory
        self._rows: dict[bytes, int] = {}
        self._refused: set[int] = set()
        con = self._ro._con
        if con is None:
            return
        passed = 0
        try:
            for rowid, db_key, raw in _key_rows(con):
                try:
                    new_key = rekey(old_key(db_key, raw))
                except UnsafeState:
                    new_key = None
                if isinstance(new_key, bytes):
                    self._rows.setdefault(new_key, rowid)
                else:
                    passed += 1
        except sqlite3.Error as exc:
            self._ro.close()
            raise CheckpointError(f"cannot read {directory / DB_NAME}: {exc}") from None
        if passed:
            log.warning(
                "%s: %s entr%s that %s not plain data (or unknown) passed over, never loaded",
                directory,
                passed,
                "y" if passed == 1 else "ies",
                "is" if passed == 1 else "are",
            )

    def get(self, key: bytes | str | int, default: Any = None) -> Any:
        con = self._ro._con
        rowid = self._rows.get(key) if isinstance(key, bytes) else None
        if con is None or rowid is None:
            return default
        with self._ro._lock:
            row = con.execute(
                "SELECT mode, filename, value FROM Cache WHERE rowid = ?", (rowid,)
            ).fetchone()
        if row is None:  # gone meanwhile (a writer migrated it)
            return default
        try:
            # as the migration stores it (`rewrite`): plain data, tuples turned to lists
            mode, data = encode(old_value(*row))
            return decode(mode, None, data)
        except (UnsafeState, TypeError, ValueError) as exc:
            if rowid not in self._refused:
                self._refused.add(rowid)
                log.warning("%s: an entry is not plain data (%s); passed over", self.directory, exc)
            return default

    def iterkeys(self) -> Iterator[bytes]:
        """Every (migrated) key, sorted as diskcache sorts bytes keys."""
        yield from sorted(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        self._ro.close()


def _key_rows(con: sqlite3.Connection) -> Iterator[tuple[int, Any, int]]:
    """(rowid, key, raw) of every row, in rowid order, a few hundred at a time."""
    last = -(2**63)
    while True:
        batch = con.execute(
            "SELECT rowid, key, raw FROM Cache WHERE rowid > ? ORDER BY rowid LIMIT 500",
            (last,),
        ).fetchall()
        if not batch:
            return
        yield from batch
        last = batch[-1][0]
