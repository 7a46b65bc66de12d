"""The checkpoint of one ROOT in diskcache: per-folder item states, runs, the lock.

Layout (keys are bytes, their parts joined by NUL (`statedb.key`); values are plain data,
JSON or raw (`statedb.data_disk`), never pickles; every value inside SQLite's
transactions: no value is ever a separate, un-fsynced file):
- ``b"format"`` -> FORMAT_VERSION (3: plain data). Formats 1 and 2 (earlier imgbatch)
  pickled their values under tuple keys; format 1 also kept results here. The first
  writer that holds the lock migrates them in place (`upgrade`, one transaction), reading
  them with the restricted unpickler, and moves format 1's results into the shared store;
  until then only their format and root can be read, except by a reader that asks for
  them as they are (``legacy_ok``: `search`, `dupes`), through
  `statedb.LegacyReadOnlyCache`. Any other version is refused.
- ``b"root"`` -> the ROOT this checkpoint belongs to (absolute path, bytes); the state
  folder's ``root`` file says the same for `scan` (see `claim_root`).
- ``done NUL fingerprint NUL folder`` -> ``{name: ItemState}`` (hash, error code or None,
  run, size, mtime_ns, error message):
  what happened to each file of a folder under one set of result-changing settings.
  One row per folder keeps a re-run at one read per folder, like the hash cache.
  A folder with more than LARGE_FOLDER items keeps only a marker there, and one
  ``item NUL fingerprint NUL folder NUL name`` row per item.
- ``b"commits"`` -> how many transactions changed item states (`commits`);
  ``changes NUL n`` -> the folders (and a large folder's names) that transaction n
  changed, the last CHANGE_LOG of them (`changes`: the search index catches up by them).
- ``run NUL id`` -> the run record, rewritten every few seconds while it runs.
- Batch API jobs (`analyze --batch`, see pipeline/batch.py), from the intent
  recorded before anything is sent until their results are collected:
  ``b"batch-jobs"`` -> the ids of the jobs not yet collected, oldest first;
  ``batch NUL id`` -> the job's record (its display name, unique to the submission,
  is its id; then the Files API name of its input, the job's name once created, its
  state and counts as last polled); ``batch-keys NUL id`` -> ``{request key: (folder,
  name, hash, size, mtime_ns)}``, the items it carries; ``batched NUL fingerprint NUL
  hash`` -> the id of the job carrying that content, so that it is neither submitted
  again nor sent live meanwhile (see `batched`). Each change is one transaction.

Results (by fingerprint and content hash) live in the shared `results.ResultStore`.
`commit()` only buffers: `flush()` writes every buffered result, then every buffered
item state, each in one transaction. The caller flushes only once the items' output
lines are written (pipeline: write, flush the sink, then `flush()`), so nothing is
recorded as done before its line is out, and commits cost one transaction per group.

The state folder is checked before anything in it is read (`statedb.secure`: owner,
modes); a reader (``readonly``: status, runs, export, report) opens the database
read-only (`statedb.ReadOnlyCache`) and changes no byte of it.

One process writes at a time: `lock()` takes an OS-level lock (fcntl) that the kernel
releases when the process dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgbatch import statedb
from imgbatch.errors import CheckpointError, UsageError
from imgbatch.lockfile import StateLock, holder
from imgbatch.results import ResultKey, ResultStore
from imgbatch.statedb import UnsafeState, key

log = logging.getLogger("imgbatch")

FORMAT_VERSION = statedb.DATA_FORMAT
READABLE_FORMATS = (1, 2, 3)  # 1 and 2 only until a writer migrates them (`upgrade`)
RUN_HISTORY = 100  # run records kept
#: above this many items a folder is stored one row per item: rewriting the folder's row
#: on every commit would cost O(items) each time (13 ms per commit at 20k items)
LARGE_FOLDER = 1000
#: counts the transactions that changed item states (`commits`): a file's mtime cannot
#: tell (opening a diskcache Cache writes its Settings table)
COMMITS = b"commits"
#: ``changes NUL n`` -> what commit n changed: [[fingerprint, folder, name or None (the
#: whole folder)], ...], so that a reader catches up without reading every state
#: (`changes`); the last CHANGE_LOG commits are kept
CHANGES = b"changes"
CHANGE_LOG = 10_000
_LARGE = "\0large"  # marker in a large folder's row ("\0" is in no file name)
#: hash (None for a scan error), error code (None: ok), run id, size, mtime_ns, message
ItemState = tuple["str | None", "str | None", int, "int | None", "int | None", "str | None"]
FolderStates = dict[str, ItemState]
#: an item carried by a batch job: folder, name, hash, size, mtime_ns
BatchEntry = tuple[str, str, str, "int | None", "int | None"]
_FolderKey = tuple[str, str]  # fingerprint, folder relative to ROOT


def claim_root(state: Path, root: str, record: bool = True) -> None:
    """Make sure the state folder belongs to ROOT, recording it there the first time.

    A state folder shared by two trees would answer "unchanged" for the second tree's
    files and mix both in `export` and `prune`: that is a UsageError naming both roots.
    A folder written before the ``root`` file existed is asked its checkpoint's ROOT.
    With `record`, the caller writes state: the folder is made private if it is not.
    """
    statedb.secure(state, writer=record)
    path = state / "root"
    raw = os.fsencode(root)
    try:
        current: bytes | None = path.read_bytes()
    except FileNotFoundError:
        current = None
        if (state / "checkpoint").is_dir():
            # the ROOT is a raw bytes value in every format: read it, nothing else
            db = statedb.ReadOnlyCache(state / "checkpoint")
            try:
                recorded = db.get(b"root")
            except (UnsafeState, OSError) as exc:
                raise damaged(state, exc) from None
            finally:
                db.close()
            current = recorded if isinstance(recorded, bytes) else None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if current is not None and current != raw:
        raise UsageError(
            f"the state folder {state} belongs to ROOT {os.fsdecode(current)}, not {root}; "
            "give each tree its own --checkpoint folder (by default each ROOT has one)"
        )
    if record and not path.exists():
        tmp = state / f".root.{os.getpid()}"
        fd = statedb.open_private(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)


def damaged(directory: Path, exc: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint entry that cannot be read."""
    detail = str(exc) or type(exc).__name__
    return CheckpointError(
        f"the checkpoint in {directory} is damaged ({detail}); move that folder aside and "
        "run again: files are re-hashed and stored results reused, nothing is re-requested"
    )


def _legacy_key(old: Any) -> bytes | None:
    """The key `upgrade` gives an earlier format's key (a tuple of parts, or bytes)."""
    if isinstance(old, bytes):
        return old
    if isinstance(old, tuple) and old and all(isinstance(p, (bytes, str, int)) for p in old):
        return key(*old)
    return None


def _states(value: Any) -> FolderStates:
    """A folder's row as stored (JSON: lists) to item states (tuples)."""
    if not isinstance(value, dict):
        return {}
    return {name: tuple(st) for name, st in value.items()}


class Checkpoint:
    """Item states and runs of one ROOT (or one `--checkpoint DIR`).

    Args:
        directory: the state folder.
        create: create the checkpoint if there is none (readers pass False).
        results: the shared results store (the caller closes it); None: a writer opens
            the user's default store and closes it with the checkpoint, a reader goes
            without (`status` and `runs` need no results).
        readonly: open without writing anything (`status`, `runs`, `export`, `report`);
            the default: when not `create`. A writer that does not create (`prune`)
            passes False.
        large_folder: above this many items a folder is stored one row per item
            (LARGE_FOLDER; tests pass a small one).
        legacy_ok: a reader reads a format 1 or 2 checkpoint as it is (not migrated,
            nothing written; `legacy` tells), instead of refusing it.
    """

    def __init__(
        self,
        directory: Path,
        create: bool = True,
        results: ResultStore | None = None,
        readonly: bool | None = None,
        large_folder: int = LARGE_FOLDER,
        legacy_ok: bool = False,
    ) -> None:
        self.directory = directory
        #: read as an earlier imgbatch wrote it (`legacy_ok`): its values decoded through
        #: the restricted unpickler, format 1's results from its own rows
        self.legacy = False
        self.large_folder = large_folder
        self.readonly = not create if readonly is None else readonly
        statedb.secure(directory, writer=not self.readonly)
        db = directory / "checkpoint"
        if not create and not db.is_dir():
            raise CheckpointError(f"no checkpoint in {directory}")
        self._own_results = results is None and not self.readonly
        if self._own_results:
            from imgbatch.config import Settings, results_dir

            env_dir = os.environ.get("IMGBATCH_RESULTS", "")
            results = ResultStore(results_dir(Settings(results=env_dir)))
        self.results = results
        try:
            if self.readonly:
                self._db: Any = statedb.ReadOnlyCache(db)
                version = self._db.get(b"format")
                if legacy_ok and version in READABLE_FORMATS and version != FORMAT_VERSION:
                    self._db.close()
                    self._db = statedb.LegacyReadOnlyCache(db, _legacy_key)
                    self.legacy = True
            else:
                self._db = statedb.open_cache(db)
                version = self._db.get(b"format")
                if version is None and create:
                    self._db.add(b"format", FORMAT_VERSION)
                    version = self._db.get(b"format")
        except Exception as exc:  # sqlite3.DatabaseError, OSError, refused values
            if self._own_results and self.results is not None:
                self.results.close()
            raise CheckpointError(
                f"cannot open the checkpoint in {db}: {exc}; move that folder aside and "
                "run again (files are re-hashed, stored results reused)"
            ) from None
        if version not in READABLE_FORMATS:
            self._db.close()
            if self._own_results and self.results is not None:
                self.results.close()
            raise CheckpointError(
                f"the checkpoint in {db} has format version {version}, this imgbatch reads "
                f"versions {', '.join(map(str, READABLE_FORMATS))}; use another --checkpoint "
                "folder or move this one aside"
            )
        self.format: int = int(version)
        self._folders: OrderedDict[_FolderKey, FolderStates] = OrderedDict()
        self._last: tuple[_FolderKey | None, FolderStates] = (None, {})
        # buffered by commit(), written by flush()
        self._dirty: dict[_FolderKey, FolderStates] = {}
        self._dirty_items: dict[tuple[str, str, str], ItemState] = {}
        self._pending_results: dict[ResultKey, dict[str, Any]] = {}
        self.pending = 0  # items committed but not yet flushed
        self._lock: StateLock | None = None
        # read once: without batch jobs, `batched()` costs nothing
        self._any_batch = self.format == FORMAT_VERSION and bool(self._get(b"batch-jobs"))

    def _get(self, key: bytes) -> Any:
        """A value, or a CheckpointError naming the folder when it cannot be read."""
        if self.format != FORMAT_VERSION and not self.legacy:
            raise CheckpointError(
                f"the checkpoint in {self.directory} was written by an earlier imgbatch "
                f"(format {self.format}); run `imgbatch analyze` on its ROOT once to upgrade "
                "it (this command does not write state)"
            )
        try:
            return self._db.get(key)
        except Exception as exc:  # refused values, sqlite3.DatabaseError, OSError
            raise damaged(self.directory, exc) from None

    def upgrade(self) -> int:
        """Migrate a format 1 or 2 checkpoint to plain data, in place; returns how many
        results of a format-1 checkpoint moved to the shared store.

        Only a lock holder calls this (`lock` does). Old keys and values are read with the
        restricted unpickler (a planted payload is refused, never run: its row is dropped
        with a warning); format 1's results are copied to the shared store first (storing
        one twice is harmless); then every row is rewritten and the format bumped in one
        transaction: a crash at any moment leaves the checkpoint old or new, whole.
        """
        if self.format == FORMAT_VERSION:
            return 0
        if self.results is None:
            raise CheckpointError("upgrading a checkpoint needs the results store")
        con = self._db._con
        moved = dropped = 0
        batch: list[tuple[ResultKey, dict[str, Any]]] = []
        try:
            with self._db.transact():
                for rowid, db_key, raw, mode, filename, value in statedb.rows(con):
                    try:
                        old = statedb.old_key(db_key, raw)
                        if old == b"format":
                            continue
                        data = statedb.old_value(mode, filename, value)
                        if isinstance(old, tuple) and old[:1] == (b"result",):
                            if len(old) == 3 and isinstance(data, dict):
                                batch.append(((str(old[1]), str(old[2])), data))
                            statedb.delete_row(con, rowid)
                            continue
                        if isinstance(old, tuple):
                            if not old or not all(isinstance(p, (bytes, str, int)) for p in old):
                                raise UnsafeState(f"an unknown key {old!r}")
                            new_key = key(*old)
                        elif isinstance(old, bytes):
                            new_key = old
                        else:
                            raise UnsafeState(f"an unknown key {old!r}")
                        statedb.rewrite(con, rowid, new_key, data)
                    except (UnsafeState, TypeError, ValueError) as exc:
                        log.warning(
                            "checkpoint in %s: an entry is not plain data (%s); dropped",
                            self.directory,
                            exc,
                        )
                        statedb.delete_row(con, rowid)
                        dropped += 1
                    if len(batch) >= 500:
                        moved += self.results.put_many(batch)
                        batch.clear()
                moved += self.results.put_many(batch)
                self._db.set(b"format", FORMAT_VERSION)
        except CheckpointError:
            raise
        except Exception as exc:  # sqlite3.DatabaseError, OSError
            raise damaged(self.directory, exc) from None
        self.format = FORMAT_VERSION
        self._any_batch = bool(self._get(b"batch-jobs"))
        log.info(
            "checkpoint upgraded: %s result(s) moved to %s%s",
            moved,
            self.results.directory,
            f", {dropped} entr{'y' if dropped == 1 else 'ies'} dropped" if dropped else "",
        )
        return moved

    # -- lock --------------------------------------------------------------------

    def lock(self, command: str, wait: bool = False, stop: threading.Event | None = None) -> None:
        """Take the writer's lock, or raise LockHeldError naming its holder.

        With `wait`, wait for it (polling); setting `stop` ends the wait with WaitInterrupted.
        A checkpoint written by an earlier imgbatch is then migrated (`upgrade`), once.
        """
        if self.readonly:
            raise CheckpointError("a checkpoint opened read-only cannot be locked")
        lock = StateLock(self.directory)
        lock.acquire(command, wait, stop)
        self._lock = lock  # close() releases it
        if self.format != FORMAT_VERSION:
            self.upgrade()

    def locked_by_other(self) -> bool:
        """Whether a live process holds the lock (for readers such as `status`); told
        from the lock file's record, without taking the lock (see `lockfile`)."""
        return holder(self.directory) is not None

    # -- items -------------------------------------------------------------------

    def folder(self, fp: str, rel_dir: str) -> FolderStates:
        """The item states of one folder (kept in a small LRU, buffered changes first)."""
        fk = (fp, rel_dir)
        states = self._dirty.get(fk)
        if states is not None:
            return states
        states = self._folders.get(fk)
        if states is None:
            states = _states(self._get(key(b"done", fp, os.fsencode(rel_dir))))
            self._folders[fk] = states
            if len(self._folders) > 256:
                self._folders.popitem(last=False)
        else:
            self._folders.move_to_end(fk)
        return states

    def state(self, fp: str, rel_dir: str, name: str) -> ItemState | None:
        """What happened to one file under fingerprint `fp`, or None."""
        if self._last[0] == (fp, rel_dir):  # files come folder by folder
            states = self._last[1]
        else:
            states = self.folder(fp, rel_dir)
            self._last = ((fp, rel_dir), states)
        if _LARGE in states:
            pending = self._dirty_items.get((fp, rel_dir, name))
            if pending is not None:
                return pending
            value = self._get(key(b"item", fp, os.fsencode(rel_dir), name))
            return tuple(value) if isinstance(value, list) else None
        return states.get(name)

    def commit(
        self,
        fp: str,
        rel_dir: str,
        name: str,
        state: ItemState,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Record one finished item (and its result by content); buffered until `flush()`.

        Reads (`state`, `result`) see it at once; the database only after `flush()`.
        """
        fk = (fp, rel_dir)
        states = self.folder(fp, rel_dir)
        self._last = (fk, states)
        if _LARGE in states:
            self._dirty_items[(fp, rel_dir, name)] = state
        else:
            states[name] = state
            self._dirty[fk] = states
        if result is not None and state[0] is not None:
            self._pending_results[(fp, state[0])] = result
        self.pending += 1

    def flush(self) -> None:
        """Write what `commit()` buffered: results first (shared store), then item states,
        each in one transaction. Call it only once the items' lines are written."""
        if not self.pending:
            return
        if self._pending_results:
            if self.results is None:
                raise CheckpointError("storing results needs the results store")
            self.results.put_many(self._pending_results.items())
        with self._db.transact():
            for (fp, rel_dir), states in self._dirty.items():
                folder = os.fsencode(rel_dir)
                if len(states) > self.large_folder and _LARGE not in states:
                    for n, st in states.items():  # from now on, one row per item
                        self._db.set(key(b"item", fp, folder, n), st)
                    states.clear()
                    states[_LARGE] = (None, None, 0, None, None, None)
                self._db.set(key(b"done", fp, folder), states)
            for (fp, rel_dir, name), st in self._dirty_items.items():
                self._db.set(key(b"item", fp, os.fsencode(rel_dir), name), st)
            self._log_changes(
                [[fp, d, None] for fp, d in self._dirty]
                + [[fp, d, n] for fp, d, n in self._dirty_items]
            )
        self._dirty.clear()
        self._dirty_items.clear()
        self._pending_results.clear()
        self.pending = 0

    def discard(self) -> None:
        """Forget buffered commits whose lines may not have been written (the next run
        redoes those items)."""
        self._dirty.clear()
        self._dirty_items.clear()
        self._pending_results.clear()
        self._folders.clear()
        self._last = (None, {})
        self.pending = 0

    def set_root(self, root: str) -> None:
        self._db.set(b"root", os.fsencode(root))

    def root(self) -> str | None:
        raw = self._get(b"root")
        return os.fsdecode(raw) if isinstance(raw, bytes) else None

    def forget(self, fp: str, rel_dir: str, names: list[str]) -> None:
        """Drop items (files gone from disk) from a folder's states, in one transaction."""
        folder = os.fsencode(rel_dir)
        with self._db.transact():
            states = _states(self._get(key(b"done", fp, folder)))
            for name in names:
                states.pop(name, None)
                self._db.delete(key(b"item", fp, folder, name))
            if states:
                self._db.set(key(b"done", fp, folder), states)
            else:
                self._db.delete(key(b"done", fp, folder))
            self._log_changes([[fp, rel_dir, name] for name in names])
        self._folders.pop((fp, rel_dir), None)
        self._last = (None, {})

    def _log_changes(self, changed: list[list[str | None]]) -> None:
        """Count a commit and record what it changed (inside its transaction)."""
        n = int(self._db.incr(COMMITS))
        self._db.set(key(CHANGES, n), changed)
        self._db.delete(key(CHANGES, n - CHANGE_LOG))

    def changes(self, since: int, upto: int) -> list[tuple[str, str, str | None]] | None:
        """What commits since+1..upto changed: (fingerprint, folder, name or None for the
        whole folder), or None when the log no longer holds (or never held) one of them."""
        if not 0 <= since <= upto or upto - since > CHANGE_LOG:
            return None
        out: list[tuple[str, str, str | None]] = []
        for n in range(since + 1, upto + 1):
            logged = self._get(key(CHANGES, n))
            if not isinstance(logged, list):
                return None
            out.extend((fp, folder, name) for fp, folder, name in logged)
        return out

    def commits(self) -> int:
        """How many times item states changed (flush, forget): a reader that derives
        something from them (the search index) is stale when this moved."""
        return int(self._get(COMMITS) or 0)

    def result(self, fp: str, content_hash: str) -> dict[str, Any] | None:
        """The stored outcome for this content (buffered, or the shared store), or None."""
        value = self._pending_results.get((fp, content_hash))
        if value is not None:
            return value
        if self.legacy and self.format == 1:  # format 1 kept its results in the checkpoint
            value = self._get(key(b"result", fp, content_hash))
            if isinstance(value, dict):
                return value
        if self.results is not None:
            value = self.results.get(fp, content_hash)
        return value if isinstance(value, dict) else None

    def fingerprints(self) -> set[str]:
        """Every fingerprint with recorded items."""
        out = set()
        for k in self._keys():
            parts = k.split(b"\0")
            if parts[0] == b"done" and len(parts) == 3:
                out.add(parts[1].decode())
        return out

    def _keys(self) -> Iterator[bytes]:
        try:
            for k in self._db.iterkeys():
                if isinstance(k, bytes):
                    yield k
        except Exception as exc:  # a refused (pickled) key, sqlite3.DatabaseError
            raise damaged(self.directory, exc) from None

    def iter_folders(self, fp: str) -> Iterator[tuple[str, FolderStates]]:
        """(folder, states) of every folder with items under fingerprint `fp`, one at a time
        (a large folder's items one by one)."""
        self._get(b"format")  # an old format is refused here, not half-read
        want = fp.encode()
        for k in self._keys():
            parts = k.split(b"\0")
            if len(parts) < 3 or parts[1] != want:
                continue
            if parts[0] == b"done" and len(parts) == 3:
                states = _states(self._get(k))
                if states and _LARGE not in states:
                    yield os.fsdecode(parts[2]), states
            elif parts[0] == b"item" and len(parts) == 4:
                state = self._get(k)
                if isinstance(state, list):
                    yield os.fsdecode(parts[2]), {os.fsdecode(parts[3]): tuple(state)}

    # -- Batch API jobs (gemini, openai, anthropic) --------------------------------------

    def batch_jobs(self) -> list[dict[str, Any]]:
        """The records of the batch jobs not yet collected (intents included), oldest
        first."""
        jobs = [self._get(key(b"batch", job_id)) for job_id in self._get(b"batch-jobs") or []]
        return [job for job in jobs if isinstance(job, dict)]

    def add_batch_job(self, job: dict[str, Any], keys: dict[str, BatchEntry]) -> None:
        """Record a submission's intent before anything of it is sent, in one transaction:
        the job (`id`, `fingerprint`, ...), the items it carries by request key, and each
        of their contents as batched under the job's fingerprint."""
        job_id, fp = job["id"], job["fingerprint"]
        with self._db.transact():
            ids = list(self._get(b"batch-jobs") or [])
            self._db.set(key(b"batch", job_id), job)
            self._db.set(key(b"batch-keys", job_id), keys)
            for entry in keys.values():
                self._db.set(key(b"batched", fp, entry[2]), job_id)
            self._db.set(b"batch-jobs", [*ids, job_id])
        self._any_batch = True

    def save_batch_job(self, job: dict[str, Any]) -> None:
        """Rewrite a job's record (uploaded, created, polled)."""
        self._db.set(key(b"batch", job["id"]), job)

    def batch_keys(self, job_id: str) -> dict[str, BatchEntry]:
        """The items a job carries, by request key."""
        keys = self._get(key(b"batch-keys", job_id))
        if not isinstance(keys, dict):
            return {}
        return {k: tuple(v) for k, v in keys.items()}

    def end_batch_job(self, job_id: str) -> None:
        """Forget a job (collected, or ended without results), in one transaction: its
        contents are no longer batched, so what was not recorded is planned again."""
        job = self._get(key(b"batch", job_id))
        fp = job.get("fingerprint") if isinstance(job, dict) else None
        with self._db.transact():
            for entry in self.batch_keys(job_id).values() if isinstance(fp, str) else ():
                assert isinstance(fp, str)
                batched = key(b"batched", fp, entry[2])
                if self._db.get(batched) == job_id:
                    self._db.delete(batched)
            self._db.delete(key(b"batch-keys", job_id))
            self._db.delete(key(b"batch", job_id))
            ids = [i for i in self._get(b"batch-jobs") or [] if i != job_id]
            self._db.set(b"batch-jobs", ids)
        self._any_batch = bool(ids)

    def batched(self, fp: str, content_hash: str) -> str | None:
        """The id of the batch job that carries this content under fingerprint `fp`, or
        None (at once when no job is recorded: a live run pays nothing for this)."""
        if not self._any_batch:
            return None
        job_id = self._get(key(b"batched", fp, content_hash))
        return job_id if isinstance(job_id, str) else None

    # -- runs --------------------------------------------------------------------

    def next_run_id(self) -> int:
        return int(self._db.incr(b"run-counter"))

    def save_run(self, run: dict[str, Any]) -> None:
        self._db.set(key(b"run", run["id"]), run)
        old = run["id"] - RUN_HISTORY
        if old > 0:
            self._db.delete(key(b"run", old))

    def mark_dead_runs(self) -> int:
        """Mark runs left QUEUED/PROCESSING as ABORTED: their process died.

        Only a lock holder may call this: holding the lock proves no run is alive.
        """
        n = 0
        for run in self.runs():
            if run.get("state") in ("QUEUED", "PROCESSING"):
                run["state"] = "ABORTED"
                self._db.set(key(b"run", run["id"]), run)
                n += 1
        return n

    def runs(self) -> list[dict[str, Any]]:
        """Run records, newest first."""
        last = int(self._get(b"run-counter") or 0)
        out = []
        for rid in range(last, max(0, last - RUN_HISTORY), -1):
            run = self._get(key(b"run", rid))
            if run is not None:
                out.append(run)
        return out

    def close(self) -> None:
        self._db.close()
        if self._own_results and self.results is not None:
            self.results.close()
        if self._lock is not None:
            self._lock.release()  # empties the holder's record, then unlocks
            self._lock = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
