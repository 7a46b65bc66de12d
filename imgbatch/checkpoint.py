"""The checkpoint in diskcache: per-folder item states, results by content, runs, the lock.

Layout (all keys are bytes or tuples, values pickled by diskcache):
- ``b"format"`` -> FORMAT_VERSION; any other version is refused with a clear error.
- ``b"root"`` -> the ROOT this checkpoint belongs to (absolute path, bytes).
- ``(b"done", fingerprint, folder)`` -> ``{name: ItemState}`` (hash, error code or None,
  run, size, mtime_ns, error message):
  what happened to each file of a folder under one set of result-changing settings.
  One row per folder keeps a re-run at one read per folder, like the hash cache.
  A folder with more than LARGE_FOLDER items keeps only a marker there, and one
  ``(b"item", fingerprint, folder, name)`` row per item.
- ``(b"result", fingerprint, hash)`` -> the stored outcome for that content (ok, or a
  permanent, content-caused error), so identical content is analysed once.
- ``(b"run", id)`` -> the run record, rewritten every few seconds while it runs.

One process writes at a time: `lock()` takes an OS-level lock (fcntl) that the kernel
releases when the process dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgbatch.errors import CheckpointError, LockHeldError
from imgbatch.hashcache import DISKCACHE_SETTINGS

FORMAT_VERSION = 1
RUN_HISTORY = 100  # run records kept
#: above this many items a folder is stored one row per item: rewriting the folder's row
#: on every commit would cost O(items) each time (13 ms per commit at 20k items)
LARGE_FOLDER = 1000
_LARGE = "\0large"  # marker in a large folder's row ("\0" is in no file name)
#: hash (None for a scan error), error code (None: ok), run id, size, mtime_ns, message
ItemState = tuple["str | None", "str | None", int, "int | None", "int | None", "str | None"]
FolderStates = dict[str, ItemState]


class Checkpoint:
    """Results and item states of one ROOT (or one `--checkpoint DIR`)."""

    def __init__(self, directory: Path, create: bool = True) -> None:
        import diskcache

        self.directory = directory
        db = directory / "checkpoint"
        if not create and not db.is_dir():
            raise CheckpointError(f"no checkpoint in {directory}")
        try:
            db.mkdir(parents=True, exist_ok=True)
            self._db = diskcache.Cache(str(db), **DISKCACHE_SETTINGS)
            version = self._db.get(b"format")
            if version is None and create:
                self._db.add(b"format", FORMAT_VERSION)
                version = self._db.get(b"format")
        except Exception as exc:  # sqlite3.DatabaseError, OSError
            raise CheckpointError(f"cannot open the checkpoint in {db}: {exc}") from None
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"the checkpoint in {db} has format version {version}, this imgbatch reads "
                f"version {FORMAT_VERSION}; use another --checkpoint folder or delete this one"
            )
        self._folders: OrderedDict[tuple[str, str], FolderStates] = OrderedDict()
        self._last: tuple[tuple[str, str] | None, FolderStates] = (None, {})
        self._lock_fd: int | None = None

    # -- lock --------------------------------------------------------------------

    def lock(self, command: str, wait: bool = False) -> None:
        """Take the writer's lock, or raise LockHeldError naming its holder."""
        path = self.directory / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
                who = f"{info['command']} (pid {info['pid']}) since {since}"
            except (ValueError, KeyError, TypeError):
                who = "another imgbatch process"
            raise LockHeldError(f"{who} holds the lock on {self.directory}") from None
        info = json.dumps({"pid": os.getpid(), "since": time.time(), "command": command})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._lock_fd = fd

    def locked_by_other(self) -> bool:
        """Whether a live process holds the lock (for readers such as `status`)."""
        try:
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- items -------------------------------------------------------------------

    def folder(self, fp: str, rel_dir: str) -> FolderStates:
        """The item states of one folder (kept in a small write-through LRU)."""
        key = (fp, rel_dir)
        states = self._folders.get(key)
        if states is None:
            states = self._db.get((b"done", fp, os.fsencode(rel_dir))) or {}
            self._folders[key] = states
            if len(self._folders) > 256:
                self._folders.popitem(last=False)
        else:
            self._folders.move_to_end(key)
        return states

    def state(self, fp: str, rel_dir: str, name: str) -> ItemState | None:
        """What happened to one file under fingerprint `fp`, or None."""
        if self._last[0] == (fp, rel_dir):  # files come folder by folder
            states = self._last[1]
        else:
            states = self.folder(fp, rel_dir)
            self._last = ((fp, rel_dir), states)
        if _LARGE in states:
            value = self._db.get((b"item", fp, os.fsencode(rel_dir), name))
            return value if isinstance(value, tuple) else None
        return states.get(name)

    def commit(
        self,
        fp: str,
        rel_dir: str,
        name: str,
        state: ItemState,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Record one finished item (and its result by content) in one transaction."""
        states = self.folder(fp, rel_dir)
        self._last = ((fp, rel_dir), states)
        folder = os.fsencode(rel_dir)
        with self._db.transact():
            if _LARGE in states:
                self._db.set((b"item", fp, folder, name), state)
            else:
                states[name] = state
                if len(states) > LARGE_FOLDER:  # from now on, one row per item
                    for n, st in states.items():
                        self._db.set((b"item", fp, folder, n), st)
                    states.clear()
                    states[_LARGE] = (None, None, 0, None, None, None)
                self._db.set((b"done", fp, folder), states)
            if result is not None and state[0] is not None:
                self._db.set((b"result", fp, state[0]), result)

    def set_root(self, root: str) -> None:
        self._db.set(b"root", os.fsencode(root))

    def root(self) -> str | None:
        raw = self._db.get(b"root")
        return os.fsdecode(raw) if isinstance(raw, bytes) else None

    def forget(self, fp: str, rel_dir: str, names: list[str]) -> None:
        """Drop items (files gone from disk) from a folder's states."""
        folder = os.fsencode(rel_dir)
        states = dict(self._db.get((b"done", fp, folder)) or {})
        with self._db.transact():
            for name in names:
                states.pop(name, None)
                self._db.delete((b"item", fp, folder, name))
            if states:
                self._db.set((b"done", fp, folder), states)
            else:
                self._db.delete((b"done", fp, folder))
        self._folders.pop((fp, rel_dir), None)
        self._last = (None, {})

    def result(self, fp: str, content_hash: str) -> dict[str, Any] | None:
        value = self._db.get((b"result", fp, content_hash))
        return value if isinstance(value, dict) else None

    def fingerprints(self) -> set[str]:
        """Every fingerprint with recorded items."""
        return {
            key[1] for key in self._db.iterkeys() if isinstance(key, tuple) and key[0] == b"done"
        }

    def iter_folders(self, fp: str) -> Iterator[tuple[str, FolderStates]]:
        """(folder, states) of every folder with items under fingerprint `fp`, one at a time."""
        for key in self._db.iterkeys():
            if not isinstance(key, tuple) or key[1:2] != (fp,):
                continue
            if key[0] == b"done":
                states = self._db.get(key)
                if states and _LARGE not in states:
                    yield os.fsdecode(key[2]), states
            elif key[0] == b"item":  # a large folder's items, one at a time
                state = self._db.get(key)
                if state is not None:
                    yield os.fsdecode(key[2]), {key[3]: state}

    # -- runs --------------------------------------------------------------------

    def next_run_id(self) -> int:
        return int(self._db.incr(b"run-counter"))

    def save_run(self, run: dict[str, Any]) -> None:
        self._db.set((b"run", run["id"]), run)
        old = run["id"] - RUN_HISTORY
        if old > 0:
            self._db.delete((b"run", old))

    def mark_dead_runs(self) -> int:
        """Mark runs left QUEUED/PROCESSING as ABORTED: their process died.

        Only a lock holder may call this: holding the lock proves no run is alive.
        """
        n = 0
        for run in self.runs():
            if run.get("state") in ("QUEUED", "PROCESSING"):
                run["state"] = "ABORTED"
                self._db.set((b"run", run["id"]), run)
                n += 1
        return n

    def runs(self) -> list[dict[str, Any]]:
        """Run records, newest first."""
        last = int(self._db.get(b"run-counter", 0))
        out = []
        for rid in range(last, max(0, last - RUN_HISTORY), -1):
            run = self._db.get((b"run", rid))
            if run is not None:
                out.append(run)
        return out

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
