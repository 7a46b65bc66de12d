"""The embedding vectors of semantic search: a private folder in the results store.

``embeddings/`` beside the results store's database (so copies and other roots reuse
them) holds:

- ``index.db`` (SQLite): ``models`` (an embedding model's id, what it is, its dimensions)
  and ``vec``: one row per (model id, result fingerprint, content hash) naming the row of
  its vector;
- ``<model id>.f16``: that model's vectors, unit length, float16, one contiguous
  row-major array read through a numpy memory map. Each model has its own file: a second
  model's vectors are never mixed with the first one's.

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
DTYPE = np.float16
CHUNK = 4096  # rows `scores` casts to float32 at a time (12 MB at 768 dimensions)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS models(id TEXT PRIMARY KEY, spec TEXT NOT NULL,"
    " dims INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS vec(model TEXT NOT NULL, fp TEXT NOT NULL, hash TEXT NOT NULL,"
    " row INTEGER NOT NULL, PRIMARY KEY (model, fp, hash)) WITHOUT ROWID",
)

Matrix = npt.NDArray[np.float16]


def unit(
    vectors: Sequence[Sequence[float]] | Sequence[float] | npt.NDArray[Any],
) -> npt.NDArray[np.float32]:
    """`vectors` as float32 rows of length 1 (a zero vector stays zero)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def scores(matrix: Matrix, query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The dot product of every row of `matrix` with `query`, as float32. numpy has no
    BLAS for float16 (its float16 dot is ~40x slower than a float32 matmul): the rows are
    cast CHUNK at a time into one float32 buffer that stays in cache, and multiplied by
    BLAS there, with no float32 copy of the whole matrix."""
    q = query.reshape(-1).astype(np.float32)
    out = np.empty(len(matrix), dtype=np.float32)
    buf = np.empty((min(CHUNK, len(matrix)), matrix.shape[1]), dtype=np.float32)
    for start in range(0, len(matrix), CHUNK):
        part = matrix[start : start + CHUNK]
        np.copyto(buf[: len(part)], part)
        np.matmul(buf[: len(part)], q, out=out[start : start + len(part)])
    return out


def top(
    matrix: Matrix, rows: npt.NDArray[np.int64], query: npt.NDArray[np.float32], k: int
) -> list[tuple[int, float]]:
    """The `k` best of `rows` by cosine with the unit `query` (the stored rows are unit):
    (position in `rows`, similarity), best first; ties by position."""
    if len(rows) == 0 or k <= 0:
        return []
    if len(rows) * 4 < len(matrix):  # a few rows (a filter, another ROOT): only those
        picked = scores(matrix[rows], query)
    else:  # most rows: a sequential scan beats gathering them
        picked = scores(matrix, query)[rows]
    k = min(k, len(picked))
    best = np.argpartition(-picked, k - 1)[:k] if k < len(picked) else np.arange(len(picked))
    order = best[np.lexsort((best, -picked[best]))]  # by score, then position
    return [(int(i), float(picked[i])) for i in order]


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
        elif path.exists():
            uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
            try:
                self.con = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
                self.con.execute("SELECT 1 FROM models LIMIT 1")
            except sqlite3.DatabaseError as exc:
                raise CheckpointError(f"cannot read the embeddings in {path}: {exc}") from None

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

    def matrix(self, model: str) -> Matrix:
        """`model`'s vectors, memory-mapped (rows past the last committed one may be
        there: no row of `vec` names them)."""
        dims = self.dims(model)
        path = self.folder / f"{model}.f16"
        if not dims or not path.exists() or path.stat().st_size < dims * 2:
            return np.zeros((0, dims or 1), dtype=DTYPE)
        n = path.stat().st_size // (dims * 2)
        return np.memmap(path, dtype=DTYPE, mode="r", shape=(n, dims))

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
        arr = unit(vectors).astype(DTYPE)
        if len(arr) != len(hashes):
            raise CheckpointError("as many vectors as results are needed")
        with self._locked():
            dims = self.dims(model)
            if dims is None:
                dims = int(arr.shape[1])
                self.con.execute(
                    "INSERT INTO models VALUES (?, ?, ?)", (model, json.dumps(spec), dims)
                )
            if arr.shape[1] != dims:
                raise CheckpointError(
                    f"the model answered vectors of {arr.shape[1]} dimensions, not the "
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
            path = self.folder / f"{model}.f16"
            statedb.private_file(path)
            with open(path, "r+b") as fh:
                fh.truncate(row * dims * 2)  # rows a killed writer left uncommitted
                fh.seek(row * dims * 2)
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
