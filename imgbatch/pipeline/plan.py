"""Plan: for each scanned file, decide what it needs before any work is spent on it.

Skip it (unchanged and done), emit a stored result (identical content analysed before,
in any tree), emit its scan error, join a duplicate already in flight, or send it to
work. The planner also keeps the duplicates that wait for an item in flight, so that
the outcome of one analysis serves every copy met meanwhile.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from imgbatch.checkpoint import Checkpoint
from imgbatch.errors import DECODER_MISSING, ErrorCode
from imgbatch.pipeline.items import CONTENT_ERRORS, Outcome, RunOptions, WorkItem
from imgbatch.records import FileRecord


class Action(enum.Enum):
    SKIP = "skip"  # unchanged and done: nothing to write
    REEMIT = "reemit"  # unchanged and done, but --emit-all: write, record nothing new
    EMIT = "emit"  # a stored result or a scan error: write and record, no work
    JOIN = "join"  # a copy of an item in flight: waits for its outcome
    WORK = "work"  # needs analysis
    DRY = "dry"  # a dry run's would-send


@dataclass
class Decision:
    action: Action
    item: WorkItem | None = None
    outcome: Outcome | None = None
    cached: bool = False


_SKIP = Decision(Action.SKIP)


class Planner:
    """Decisions for one run: the checkpoint's item states and the shared results, read
    under one settings fingerprint `fp`; counts go to `counts` (the run summary's)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        fp: str,
        options: RunOptions,
        root: str,
        counts: Any,
        run_id: int,
    ) -> None:
        self.checkpoint = checkpoint
        self.fp = fp
        self.options = options
        # ROOT "/" included; ROOT "" (a list's items): the whole path is the key
        self._root_len = len(root.rstrip("/") + "/") if root else 0
        self.counts = counts
        self.run_id = run_id
        self._waiting: dict[str, list[WorkItem]] = {}  # content hash -> copies in flight
        self._decoders: dict[str, bool] = {}  # decoder -> loads now (see final)

    def decide(self, rec: FileRecord) -> Decision:
        """What one scanned file needs."""
        opts = self.options
        path, start = rec.path, self._root_len
        cut = path.rfind("/")  # ROOT "/" rel_dir "/" name, or ROOT "/" name
        rel_dir, name = path[start:cut] if cut >= start else "", path[cut + 1 :]
        state = self.checkpoint.state(self.fp, rel_dir, name)
        if (  # the common case of a re-run, first and cheapest: unchanged and done
            state is not None
            and state[0] == rec.hash
            and rec.hash is not None
            and not opts.fresh
            and (state[1] is None or self.final(state[1], state[5]))
        ):
            self.counts["skipped"] += 1
            if opts.emit_all:
                stored = self.checkpoint.result(self.fp, rec.hash)
                if stored is not None:
                    item = WorkItem(rec, rel_dir, name)
                    return Decision(Action.REEMIT, item, Outcome.from_stored(stored), True)
            return _SKIP
        item = WorkItem(rec, rel_dir, name)
        if not rec.ok:  # a scan error (IO_ERROR): no content to analyse
            code = (rec.error_code or ErrorCode.IO_ERROR).value
            if (
                state is not None
                and state[:2] == (None, code)
                and not opts.fresh
                and self.final(code)
            ):
                self.counts["skipped"] += 1
                return _SKIP
            return Decision(Action.EMIT, item, Outcome.failed(code, rec.error_message))
        stored = self.checkpoint.result(self.fp, rec.hash or "")
        if stored is not None and self._reusable(stored):
            self.counts["processed"] += 1
            if opts.dry_run:  # nothing to send, and a dry run records nothing
                self.counts["cached"] += 1
                return _SKIP
            return Decision(Action.EMIT, item, Outcome.from_stored(stored), True)
        assert rec.hash is not None
        if self.checkpoint.batched(self.fp, rec.hash) is not None:
            # its request waits in a Batch API job: neither sent again nor live
            self.counts["in_batch"] += 1
            return _SKIP
        self.counts["processed"] += 1
        if opts.dry_run:
            return Decision(Action.DRY, item)
        if rec.hash in self._waiting:
            self._waiting[rec.hash].append(item)
            return Decision(Action.JOIN, item)
        self._waiting[rec.hash] = []
        return Decision(Action.WORK, item)

    def joined(self) -> int:
        """Copies waiting for an item in flight."""
        return sum(map(len, self._waiting.values()))

    def settle(
        self, item: WorkItem, outcome: Outcome | None
    ) -> tuple[list[WorkItem], WorkItem | None]:
        """`item` ended (`outcome`, or None: abandoned, or a run-level stop). Returns the
        copies that share its outcome, and the copy that must now work for itself (after
        a failure that is not the content's)."""
        content = item.rec.hash or ""
        waiters = self._waiting.pop(content, [])
        if outcome is None:
            return [], None
        if outcome.status == "ok" or (outcome.code in CONTENT_ERRORS and not outcome.changed):
            return waiters, None
        if waiters:  # a transient failure: the next copy tries for itself
            first, self._waiting[content] = waiters[0], waiters[1:]
            return [], first
        return [], None

    def final(self, code: str | None, message: str | None = None) -> bool:
        """Whether an item that ended with `code` is done for this run's options.

        A BAD_IMAGE that a missing decoder caused is done only while the decoder is
        still missing: once `pillow_heif` imports, it is retried without --retry-failed.
        """
        if code is None:
            return True
        if code == "BAD_IMAGE" and message and message.startswith(DECODER_MISSING):
            return not self._decoder_back(message) and not self.options.retry_failed
        return not ErrorCode(code).transient and not self.options.retry_failed

    def _decoder_back(self, message: str) -> bool:
        """Whether the decoder a decoder-missing message names loads now (asked once per
        decoder and run: only such items pay for importing Pillow here)."""
        key = "AVIF" if "AVIF" in message else "HEIF"
        if key not in self._decoders:
            from imgbatch.imaging import decoder_available

            self._decoders[key] = decoder_available(message)
        return self._decoders[key]

    def _reusable(self, stored: dict[str, Any]) -> bool:
        if self.options.fresh and stored.get("run") != self.run_id:
            return False
        if stored["status"] == "ok":
            return True
        return stored.get("code") in CONTENT_ERRORS and not self.options.retry_failed
