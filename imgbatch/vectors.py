"""The embedding vectors of semantic search: a private folder in the results store.

``embeddings/`` beside the results store's database (so copies and other roots reuse
them) holds:

- ``index.db`` (SQLite): ``meta`` (``format``: FORMAT, the layout below; a store of
  another format is refused, never misread), ``models`` (an embedding model's id, what
  it is, its dimensions) and ``vec``: one row per (model id, result fingerprint, content
  hash) naming the row of its vector;
- ``<model id>.q8``: that model's vectors, one contiguous array of fixed-size rows read
  through a numpy memory map. Each model has its own file: a second model's vectors are
  never mixed with the first one's.

A row holds a unit vector ``v`` in int8, twice (2 x dims + 8 bytes, as float16 would):
``q = round(v / s1)`` with ``s1 = max|v| / 127``, then the rest ``r = round((v - s1 q) /
s2)`` with ``s2 = max|v - s1 q| / 127``, and the two float32 scales; ``v`` is ``s1 q +
s2 r`` to within ``s1 / 508`` per component (closer than float16). numpy has BLAS for
float32 only and casts int8 to float32 ~15x faster than float16, so `top` scans ``q``
alone, keeps the rows that the bound on ``s2 r`` cannot rule out of the best k, and adds
``s2 r`` for those: the ranking is that of the stored vectors, at the cost of one int8 scan.

Writing appends the vectors to the file (fsync'ed) before the transaction that names
their rows commits; a writer killed in between leaves rows past the last committed one,
which the next writer cuts off (so an interrupted `index` loses at most the batch it was
storing). Writers take ``lock`` (flock); readers take nothing: the rows they read were
written before they were committed.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from imgbatch import statedb
from imgbatch.errors import CheckpointError

FOLDER = "embeddings"  # in the results store's folder
DB_NAME = "index.db"
LOCK = "lock"
MARK = ".imgbatch-embeddings"
FORMAT = 2  # 1: float16 rows in <model>.f16 (never released); 2: two int8 parts + scales
SUFFIX = ".q8"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS models(id TEXT PRIMARY KEY, spec TEXT NOT NULL,"
    " dims INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS vec(model TEXT NOT NULL, fp TEXT NOT NULL, hash TEXT NOT NULL,"
    " row INTEGER NOT NULL, PRIMARY KEY (model, fp, hash)) WITHOUT ROWID",
)


def row_dtype(dims: int) -> np.dtype[Any]:
    """One stored row: the int8 parts ``q`` and ``r`` and the scales ``s`` (s1, s2)."""
    return np.dtype([("q", "i1", (dims,)), ("r", "i1", (dims,)), ("s", "<f4", (2,))])


def unit(
    vectors: Sequence[Sequence[float]] | Sequence[float] | npt.NDArray[Any],
) -> npt.NDArray[np.float32]:
    """`vectors` as float32 rows of length 1 (a zero vector stays zero)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def _int8(arr: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric quantisation of each row: (round(row / scale), scale = max|row| / 127)."""
    scale = (np.abs(arr).max(axis=1, initial=0.0) / 127).astype(np.float32)
    q = np.rint(arr / np.where(scale == 0, 1, scale)[:, None])
    return np.clip(q, -127, 127).astype(np.int8), scale


def quantise(
    vectors: Sequence[Sequence[float]] | npt.NDArray[Any],
) -> npt.NDArray[Any]:
    """`vectors` made unit, as stored rows (see the module's docstring)."""
    arr = unit(vectors)
    out = np.zeros(len(arr), dtype=row_dtype(arr.shape[1]))
    q, s1 = _int8(arr)
    r, s2 = _int8(arr - q.astype(np.float32) * s1[:, None])
    out["q"], out["r"] = q, r
    out["s"][:, 0], out["s"][:, 1] = s1, s2
    return out


class Vectors:
    """A model's stored rows (memory-mapped, or a copy of some): ``len`` and ``shape``
    (rows, dimensions) as a matrix's."""

    def __init__(self, data: npt.NDArray[Any], dims: int) -> None:
        self.data = data
        self.shape = (len(data), dims)

    def __len__(self) -> int:
        return len(self.data)

    def floats(self) -> npt.NDArray[np.float32]:
        """The stored vectors as float32 (s1 q + s2 r), in memory."""
        s = np.asarray(self.data["s"], dtype=np.float32)
        q = self.data["q"].astype(np.float32) * s[:, :1]
        return q + self.data["r"].astype(np.float32) * s[:, 1:]


def _dots(ints: npt.NDArray[np.int8], query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The dot product of every int8 row with `query`, as float32. einsum casts the rows
    a buffer at a time (no float32 copy of the matrix); BLAS would be no faster here: its
    threads spin between calls and, on a busy machine, took the cores the casts needed
    (a chunked cast + matmul measured 4x slower than this under load)."""
    out = np.einsum("ij,j->i", ints, query, dtype=np.float32, casting="unsafe")
    return np.asarray(out, dtype=np.float32)


def scores(vectors: Vectors, query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The dot product of every stored vector with `query`, as float32."""
    q = query.reshape(-1).astype(np.float32)
    s = np.asarray(vectors.data["s"], dtype=np.float32)
    return _dots(vectors.data["q"], q) * s[:, 0] + _dots(vectors.data["r"], q) * s[:, 1]


def top(
    vectors: Vectors, rows: npt.NDArray[np.int64], query: npt.NDArray[np.float32], k: int
) -> list[tuple[int, float]]:
    """The `k` best of `rows` by cosine with the unit `query` (the stored rows are unit):
    (position in `rows`, similarity), best first; ties by position."""
    if len(rows) == 0 or k <= 0:
        return []
    q = query.reshape(-1).astype(np.float32)
    few = len(rows) * 4 < len(vectors)  # a filter, another ROOT: only those rows
    data = vectors.data[rows] if few else vectors.data  # else a sequential scan
    first = _dots(data["q"], q)  # the first part's dot, unscaled
    if not few:
        first = first[rows]
    s = np.asarray(data["s"][rows] if not few else data["s"], dtype=np.float32)
    approx = first * s[:, 0]
    # |s2 r . query| <= s2 127 sum|query| (the slack covers float32 rounding): no row
    # whose approx + bound is below the k-th best approx - bound can be in the best k
    bound = s[:, 1] * (127 * float(np.abs(q).sum()) * 1.001)
    k = min(k, len(rows))
    keep = np.arange(len(rows))
    if k < len(rows):
        floor = np.partition(approx - bound, len(rows) - k)[len(rows) - k]
        keep = np.flatnonzero(approx + bound >= floor)
    if len(keep) * 4 < len(rows):  # the usual: a few dozen rows to finish
        picked = rows[keep] if not few else keep
        second = _dots(np.ascontiguousarray(data["r"][picked]), q)
    else:  # most rows (the whole ranking --hybrid fuses): a second sequential scan
        second = _dots(data["r"], q)
        second = (second[rows] if not few else second)[keep]
    exact = approx[keep] + second * s[keep, 1]
    best = np.argpartition(-exact, k - 1)[:k] if k < len(exact) else np.arange(len(exact))
    order = best[np.lexsort((keep[best], -exact[best]))]  # by score, then position
    return [(int(keep[i]), float(exact[i])) for i in order]


class VectorStore:
    """The vectors in a results store's folder; `writable` opens it for `add`."""

    def __init__(self, results: Path, writable: bool = False) -> None:
        self.folder = results / FOLDER
        self.writable = writable
        names = sorted(os.listdir(self.folder)) if self.folder.is_dir() else []
        if writable:
            statedb.secure(results, True, names=statedb.STORE_ENTRIES, mark=statedb.STORE_MARK)
        statedb.secure(self.folder, writable, names=names, mark=MARK)
        self.con: sqlite3.Connection | None = None
        path = self.folder / DB_NAME
        if writable:
            statedb.private_file(path)
            self.con = sqlite3.connect(str(path), timeout=60, isolation_level=None)
            self.con.execute("PRAGMA journal_mode = WAL")
            for sql in _SCHEMA:
                self.con.execute(sql)
            self._format(path, stamp=True)
        elif path.exists():
            uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
            try:
                self.con = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
                self.con.execute("SELECT 1 FROM models LIMIT 1")
            except sqlite3.DatabaseError as exc:
                raise CheckpointError(f"cannot read the embeddings in {path}: {exc}") from None
            self._format(path, stamp=False)

    def _format(self, path: Path, stamp: bool) -> None:
        """Refuse a store of another FORMAT (CheckpointError); a writer `stamp`s a new
        one. A store without the mark but with models is format 1 (float16 files)."""
        assert self.con is not None
        try:
            row = self.con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.OperationalError:  # no meta table: written before it existed
            row = None
        if row is None:
            if self.con.execute("SELECT 1 FROM models LIMIT 1").fetchone() is None:
                if stamp:
                    self.con.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT),))
                return
            row = ("1",)
        if row[0] != str(FORMAT):
            self.close()
            raise CheckpointError(
                f"the embeddings in {path.parent} are of format {row[0]}, not {FORMAT}: "
                f"another imgbatch wrote them; remove that folder and run `imgbatch index "
                f"ROOT --embeddings` again"
            )

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dims(self, model: str) -> int | None:
        """The dimensions of `model`'s vectors, None before it has any."""
        if self.con is None:
            return None
        row = self.con.execute("SELECT dims FROM models WHERE id = ?", (model,)).fetchone()
        return int(row[0]) if row else None

    def rows(self, model: str, fp: str) -> dict[str, int]:
        """Content hash -> row, of the results of fingerprint `fp` that `model` embedded."""
        if self.con is None:
            return {}
        sql = "SELECT hash, row FROM vec WHERE model = ? AND fp = ?"
        return dict(self.con.execute(sql, (model, fp)))

    def matrix(self, model: str) -> Vectors:
        """`model`'s vectors, memory-mapped (rows past the last committed one may be
        there: no row of `vec` names them)."""
        dims = self.dims(model)
        kind = row_dtype(dims or 1)
        path = self.folder / f"{model}{SUFFIX}"
        if not dims or not path.exists() or path.stat().st_size < kind.itemsize:
            return Vectors(np.zeros(0, dtype=kind), dims or 1)
        n = path.stat().st_size // kind.itemsize
        return Vectors(np.memmap(path, dtype=kind, mode="r", shape=(n,)), dims)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.folder / LOCK
        statedb.private_file(lock)
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def add(
        self,
        model: str,
        spec: dict[str, Any],
        fp: str,
        hashes: Sequence[str],
        vectors: Sequence[Sequence[float]],
    ) -> int:
        """Store the vectors of the results (`fp`, each of `hashes`) for `model`; returns
        how many were new. CheckpointError when their length is not the model's."""
        if self.con is None or not self.writable:
            raise CheckpointError("the embeddings store was opened for reading")
        if len(vectors) != len(hashes):
            raise CheckpointError("as many vectors as results are needed")
        if not hashes:
            return 0
        arr = quantise(vectors)
        width = int(arr["q"].shape[1])
        with self._locked():
            dims = self.dims(model)
            if dims is None:
                dims = width
                self.con.execute(
                    "INSERT INTO models VALUES (?, ?, ?)", (model, json.dumps(spec), dims)
                )
            if width != dims:
                raise CheckpointError(
                    f"the model answered vectors of {width} dimensions, not the "
                    f"{dims} it answered before"
                )
            have = self.rows(model, fp)
            seen = set(have)
            new = []
            for i, h in enumerate(hashes):  # each new hash once (a set: batches are large)
                if h not in seen:
                    seen.add(h)
                    new.append(i)
            if not new:
                return 0
            row = self.con.execute(
                "SELECT COALESCE(MAX(row) + 1, 0) FROM vec WHERE model = ?", (model,)
            ).fetchone()[0]
            path = self.folder / f"{model}{SUFFIX}"
            size = arr.dtype.itemsize
            statedb.private_file(path)
            with open(path, "r+b") as fh:
                fh.truncate(row * size)  # rows a killed writer left uncommitted
                fh.seek(row * size)
                fh.write(arr[new].tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            self.con.execute("BEGIN IMMEDIATE")
            self.con.executemany(
                "INSERT INTO vec VALUES (?, ?, ?, ?)",
                [(model, fp, hashes[i], row + n) for n, i in enumerate(new)],
            )
            self.con.execute("COMMIT")
            return len(new)
