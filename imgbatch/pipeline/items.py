"""What flows between the stages of a run: work items, outcomes, per-run options."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from imgbatch.errors import ContentChanged, ErrorCode, ItemError
from imgbatch.records import FileRecord

log = logging.getLogger("imgbatch")

#: errors caused by the content itself: stored by hash, so duplicates share them
CONTENT_ERRORS = frozenset({ErrorCode.BAD_IMAGE.value, ErrorCode.BLOCKED.value})


@dataclass
class RunOptions:
    """Per-run choices that are not settings of the results."""

    fresh: bool = False  # re-process everything (deleting nothing up front)
    retry_failed: bool = False  # also retry permanent errors
    emit_all: bool = False  # re-emit stored results of unchanged files
    limit: int | None = None  # stop after this many processed items
    dry_run: bool = False  # list what would be sent, with estimated tokens; send nothing
    batch: bool = False  # Batch API jobs: collect those ended, submit the new work
    batch_wait: bool = False  # with batch: poll until every job has ended, collecting them


@dataclass
class WorkItem:
    """One scanned file on its way through a run."""

    rec: FileRecord
    rel_dir: str  # its folder, relative to ROOT ("" for ROOT itself)
    name: str


@dataclass
class Outcome:
    """The end of one item's processing (plain data: it travels back from a worker)."""

    status: str  # "ok" | "error"
    result: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None
    attempts: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: int | None = None
    changed: bool = False  # the file changed since its scan: nothing true to store
    batch: bool = False  # the answer came from a Batch API job (its line says so)

    def stored(self, provider: str, model: str, run: int) -> dict[str, Any]:
        """Its form in the results store."""
        return {
            "status": self.status,
            "provider": provider,
            "model": model,
            "result": self.result,
            "code": self.code,
            "message": self.message,
            "attempts": self.attempts,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "latency_ms": self.latency_ms,
            "run": run,
        }

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> Outcome:
        return cls(
            d["status"],
            d.get("result"),
            d.get("code"),
            d.get("message"),
            d.get("attempts", 0),
            d.get("input_tokens"),
            d.get("output_tokens"),
            d.get("latency_ms"),
        )

    @classmethod
    def failed(cls, code: ErrorCode | str, message: str | None, **more: Any) -> Outcome:
        return cls(
            "error",
            code=code.value if isinstance(code, ErrorCode) else code,
            message=message,
            **more,
        )


def item_failure(item: WorkItem, exc: Exception, doing: str, **more: Any) -> Outcome:
    """The guard around an item's decoding, encoding and request: what it raised, as its
    outcome. An ItemError is the item's own (a ContentChanged: `changed`, nothing true
    to store); anything else is a decoder or provider bug, which must not kill the run:
    AI_ERROR, with the traceback in the debug log. `more`: further Outcome fields."""
    if isinstance(exc, ItemError):
        changed = isinstance(exc, ContentChanged)
        return Outcome.failed(exc.code, exc.message, changed=changed, **more)
    log.debug("unexpected error %s %s", doing, item.rec.path, exc_info=exc)
    return Outcome.failed(ErrorCode.AI_ERROR, f"unexpected error: {type(exc).__name__}", **more)
