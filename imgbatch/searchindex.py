"""The full-text index of `imgbatch search`: SQLite FTS5 in the state folder, kept current.

One database, ``search/index.db`` in ROOT's state folder (folder 0700, files 0600, made
with statedb's helpers), indexes the items of the last run's settings fingerprint:

- ``docs``: one row per item (folder and name as bytes, its checkpoint ItemState as
  JSON, and the columns the filters read: status, capture time, tags and colour names);
- ``fts``: the FTS5 table (rowid = the doc's id) over the file's path relative to ROOT,
  the description, tags, objects, legible text and colour names;
- ``meta``: the fingerprint indexed and the checkpoint's commit counter it reflects.

**Current.** The checkpoint counts the transactions that change item states
(`Checkpoint.commits`); the index is stale when that count or the last run's fingerprint
moved (never judged by mtime: opening a diskcache Cache writes its database). Bringing
it up to date re-reads only the folders and names the checkpoint's change log
(`Checkpoint.changes`) names since the count indexed, and re-indexes the items that
changed (new, re-analysed, gone), in one transaction; without a log that covers the
range (an older checkpoint, a changed fingerprint) it compares every item state with the
one indexed. The results store is read for the changed items only. `refresh` does it
at the end of every run (inside its lock, see pipeline/run.py); `open_index` does it for
`search` when stale, without the lock (the checkpoint is only read; SQLite serialises
two updaters of the index).

**Read-only.** Where the state folder cannot be written (state made read-only), the
index is built in memory from what can be read, and a warning says so once per process;
so it is for state an earlier imgbatch wrote and no run has migrated yet, read as it is
(`Checkpoint.legacy`), beside which nothing is written.
A damaged index file is ours to throw away: it is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from imgbatch import statedb
from imgbatch.checkpoint import Checkpoint
from imgbatch.errors import CheckpointError
from imgbatch.records import utf8_clean

log = logging.getLogger("imgbatch")

INDEX_DIR = "search"  # in the state folder (statedb.STATE_ENTRIES checks it)
DB_NAME = "index.db"
FORMAT = 1  # of the index's tables: another one is rebuilt
#: the indexed columns, in the FTS table's order
COLUMNS = ("path", "description", "tags", "objects", "text", "colors")
SEP = "\x1f"  # joins tags and colour names in the filter columns (in no tag)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v)",
    "CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, folder BLOB NOT NULL,"
    " name BLOB NOT NULL, state TEXT NOT NULL, status TEXT NOT NULL, taken REAL,"
    " tags TEXT NOT NULL, colors TEXT NOT NULL, UNIQUE(folder, name))",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5({', '.join(COLUMNS)},"
    " tokenize = 'unicode61 remove_diacritics 2')",
)

_warned: set[str] = set()  # the in-memory warning, once per state folder and process


def last_run(cp: Checkpoint) -> dict[str, Any] | None:
    """The newest run with a settings fingerprint (what `export` and `search` read)."""
    return next((r for r in cp.runs() if r.get("fingerprint")), None)


@contextmanager
def open_index(state: Path, cp: Checkpoint, fp: str) -> Iterator[sqlite3.Connection]:
    """A connection to ROOT's index of fingerprint `fp`, brought up to date first: the
    file in the state folder, or (state that cannot be written) one built in memory."""
    commits = cp.commits()  # first: what changes while the index is read counts next time
    folder = state / INDEX_DIR
    old = getattr(cp.results, "legacy", False)
    if cp.legacy or old:  # not migrated yet: nothing is written beside it
        if str(state) not in _warned:
            _warned.add(str(state))
            log.warning(
                "the %s in %s was written by an earlier imgbatch and is read as it is: "
                "searching an index built in memory (one `imgbatch analyze %s` run migrates it)",
                "state" if cp.legacy else "results store",
                state if cp.legacy else getattr(cp.results, "directory", ""),
                cp.root() or "ROOT",
            )
        con = _connect(":memory:")
    elif os.access(state, os.W_OK) and (not folder.exists() or os.access(folder, os.W_OK)):
        con = _open_file(folder)
    else:
        current = _open_current_readonly(folder / DB_NAME, fp, commits)
        if current is not None:
            con = current
        else:
            if str(state) not in _warned:
                _warned.add(str(state))
                log.warning(
                    "the state in %s cannot be written: searching an index built in memory "
                    "(slower; a run by the state's owner brings its index file up to date)",
                    state,
                )
            con = _connect(":memory:")
    try:
        _update(con, cp, fp, commits)
        yield con
    finally:
        con.close()


def refresh(state: Path, cp: Checkpoint) -> None:
    """Bring ROOT's index up to date (the end of a run, holding the lock); a failure is
    a warning, never the run's: `search` catches up when it next reads."""
    try:
        run = last_run(cp)
        if run is None:
            return
        with open_index(state, cp, run["fingerprint"]):
            pass
    except (sqlite3.Error, OSError, CheckpointError) as exc:
        log.warning("the search index was not updated (%s); `imgbatch search` catches up", exc)


def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
    con = sqlite3.connect(target, uri=uri, timeout=60, isolation_level=None)
    con.execute("PRAGMA cache_size = -16000")
    return con


def _open_file(folder: Path) -> sqlite3.Connection:
    """The index file, created private; a damaged one (ours alone) is made anew."""
    statedb.private_dir(folder)
    path = folder / DB_NAME
    for attempt in (1, 2):
        statedb.private_file(path)  # before SQLite opens it: its -wal/-shm take its mode
        con: sqlite3.Connection | None = None
        try:
            con = _connect(str(path))
            con.execute("PRAGMA journal_mode = WAL")
            if _format(con) != FORMAT:
                _recreate(con)
            return con
        except sqlite3.DatabaseError as exc:
            if attempt == 2:
                raise
            log.warning("the search index %s is damaged (%s): rebuilding it", path, exc)
            if con is not None:
                con.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _format(con: sqlite3.Connection) -> int | None:
    if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
        return None
    row = con.execute("SELECT v FROM meta WHERE k = 'format'").fetchone()
    return row[0] if row else None


def _recreate(con: sqlite3.Connection) -> None:
    """Empty tables of this FORMAT (an index of another format is dropped)."""
    con.execute("BEGIN IMMEDIATE")
    for table in ("fts", "docs", "meta"):
        con.execute(f"DROP TABLE IF EXISTS {table}")
    for sql in _SCHEMA:
        con.execute(sql)
    con.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
    con.execute("COMMIT")


def _open_current_readonly(path: Path, fp: str, commits: int) -> sqlite3.Connection | None:
    """The index file read-only, when it exists and is current; else None."""
    if not path.exists():
        return None
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    try:
        con = _connect(uri, uri=True)
        if _format(con) == FORMAT and _indexed(con) == (fp, commits):
            return con
        con.close()
    except sqlite3.DatabaseError:
        pass
    return None


def _indexed(con: sqlite3.Connection) -> tuple[Any, Any]:
    meta = dict(con.execute("SELECT k, v FROM meta WHERE k IN ('fp', 'commits')").fetchall())
    return meta.get("fp"), meta.get("commits")


def _update(con: sqlite3.Connection, cp: Checkpoint, fp: str, commits: int) -> None:
    """Re-index what changed since the index was last brought up to date."""
    if _format(con) != FORMAT:
        _recreate(con)
    if _indexed(con) == (fp, commits):
        return
    con.execute("BEGIN IMMEDIATE")  # another updater may have done it meanwhile
    try:
        indexed_fp, indexed_commits = _indexed(con)
        if (indexed_fp, indexed_commits) != (fp, commits):
            if indexed_fp != fp:
                con.execute("DELETE FROM docs")
                con.execute("DELETE FROM fts")
            logged = (
                cp.changes(indexed_commits, commits)
                if indexed_fp == fp and isinstance(indexed_commits, int)
                else None
            )
            if logged is None or not _catch_up(con, cp, fp, logged):
                _diff(con, cp, fp)
            con.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("fp", fp), ("commits", commits)]
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _catch_up(
    con: sqlite3.Connection, cp: Checkpoint, fp: str, logged: list[tuple[str, str, str | None]]
) -> bool:
    """Re-index only the folders and names the checkpoint's change log names; False (the
    caller diffs everything) when a folder turned large meanwhile."""
    folders: set[str] = set()
    names: set[tuple[str, str]] = set()
    for changed_fp, rel_dir, name in logged:
        if changed_fp != fp:
            continue
        if name is None:
            folders.add(rel_dir)
        else:
            names.add((rel_dir, name))
    for rel_dir in folders:
        states = cp.folder(fp, rel_dir)
        if any("\0" in name for name in states):  # a large folder's marker: items elsewhere
            return False
        folder = os.fsencode(rel_dir)
        known = {
            os.fsdecode(bytes(name)): (doc_id, state)
            for doc_id, name, state in con.execute(
                "SELECT id, name, state FROM docs WHERE folder = ?", (folder,)
            )
        }
        for name, state in states.items():
            _sync(con, cp, fp, rel_dir, name, state, known.pop(name, None))
        _delete(con, [doc_id for doc_id, _ in known.values()])
    for rel_dir, name in names:
        row = con.execute(
            "SELECT id, state FROM docs WHERE folder = ? AND name = ?",
            (os.fsencode(rel_dir), os.fsencode(name)),
        ).fetchone()
        now = cp.state(fp, rel_dir, name)
        if now is None:
            _delete(con, [row[0]] if row else [])
        else:
            _sync(con, cp, fp, rel_dir, name, now, row)
    return True


def _sync(
    con: sqlite3.Connection,
    cp: Checkpoint,
    fp: str,
    rel_dir: str,
    name: str,
    state: Any,
    old: tuple[int, str] | None,
) -> int:
    """Index one item's state unless `old` (its doc id and state indexed) says the same:
    the id of its doc now."""
    text = json.dumps(list(state), separators=(",", ":"))
    if old is not None:
        if old[1] == text:
            return old[0]
        _delete(con, [old[0]])
    return _insert(con, cp, fp, rel_dir, name, os.fsencode(rel_dir), os.fsencode(name), state, text)


def _delete(con: sqlite3.Connection, ids: list[int]) -> None:
    for i in range(0, len(ids), 500):
        rows = [(doc_id,) for doc_id in ids[i : i + 500]]
        con.executemany("DELETE FROM docs WHERE id = ?", rows)
        con.executemany("DELETE FROM fts WHERE rowid = ?", rows)


def _diff(con: sqlite3.Connection, cp: Checkpoint, fp: str) -> None:
    """Compare every item state with the one indexed, a folder at a time (a large
    folder's items one at a time), so memory follows the largest folder, never the tree:
    the ids of the docs still current go to a temporary table, the others are deleted."""
    con.execute("CREATE TEMP TABLE IF NOT EXISTS seen(id INTEGER PRIMARY KEY)")
    con.execute("DELETE FROM temp.seen")
    for rel_dir, states in cp.iter_folders(fp):
        folder = os.fsencode(rel_dir)
        if len(states) == 1:  # a large folder's item, or a folder of one
            (one,) = states
            rows = con.execute(
                "SELECT id, name, state FROM docs WHERE folder = ? AND name = ?",
                (folder, os.fsencode(one)),
            )
        else:
            rows = con.execute("SELECT id, name, state FROM docs WHERE folder = ?", (folder,))
        known = {os.fsdecode(bytes(name)): (doc_id, state) for doc_id, name, state in rows}
        current = [
            (_sync(con, cp, fp, rel_dir, name, state, known.get(name)),)
            for name, state in states.items()
        ]
        con.executemany("INSERT OR IGNORE INTO temp.seen VALUES (?)", current)
    gone = "SELECT id FROM docs WHERE id NOT IN (SELECT id FROM temp.seen)"
    con.execute(f"DELETE FROM fts WHERE rowid IN ({gone})")
    con.execute(f"DELETE FROM docs WHERE id IN ({gone})")
    con.execute("DELETE FROM temp.seen")


def _insert(
    con: sqlite3.Connection,
    cp: Checkpoint,
    fp: str,
    rel_dir: str,
    name: str,
    folder: bytes,
    raw_name: bytes,
    state: Any,
    text: str,
) -> int:
    """Index one item: the id of its new doc."""
    content, code, _, _, mtime_ns, message = state
    stored = cp.result(fp, content) if content and code is None else None
    result = stored.get("result") if stored else None
    doc = document(result if isinstance(result, dict) else {})
    taken = capture_time(result) if isinstance(result, dict) else None
    if taken is None and isinstance(mtime_ns, int):
        taken = mtime_ns / 1e9
    cur = con.execute(
        "INSERT INTO docs (folder, name, state, status, taken, tags, colors)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            folder,
            raw_name,
            text,
            "ok" if code is None else "error",
            taken,
            _joined(doc["tags"]),
            _joined(doc["colors"]),
        ),
    )
    path = utf8_clean(os.path.join(rel_dir, name))
    con.execute(
        f"INSERT INTO fts (rowid, {', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            cur.lastrowid,
            path,
            doc["description"],
            " ; ".join(doc["tags"]),
            " ; ".join(doc["objects"]),
            doc["text"] or (message or ""),
            " ".join(doc["colors"]),
        ),
    )
    return int(cur.lastrowid or 0)


def _joined(words: list[str]) -> str:
    """A filter column: casefolded whole values between separators (`SEP dog SEP`)."""
    return SEP + SEP.join(w.casefold() for w in words) + SEP if words else ""


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [utf8_clean(v).replace(SEP, " ") for v in value if isinstance(v, str) and v.strip()]
    return []


def document(result: dict[str, Any]) -> dict[str, Any]:
    """The indexed text of a stored result: the built-in schema's description, tags,
    objects, legible text and colours, or the offline analyzer's colour names."""
    colors = _strings(result.get("colors"))
    dominant = result.get("dominant_colors")
    if isinstance(dominant, list):
        colors += [c["name"] for c in dominant if isinstance(c, dict) and _strings(c.get("name"))]
    description = result.get("description")
    text = result.get("text")
    return {
        "description": utf8_clean(description) if isinstance(description, str) else "",
        "tags": _strings(result.get("tags")),
        "objects": _strings(result.get("objects")),
        "text": utf8_clean(text) if isinstance(text, str) else "",
        "colors": list(dict.fromkeys(colors)),
    }


def capture_time(result: dict[str, Any]) -> float | None:
    """The EXIF capture time of an offline result as a POSIX time (a time without an
    offset is local time), or None."""
    exif = result.get("exif")
    stamp = exif.get("datetime") if isinstance(exif, dict) else None
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is not None:
        return when.timestamp()
    try:
        return time.mktime(when.timetuple())
    except (OverflowError, ValueError):
        return None
