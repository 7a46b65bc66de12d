"""Record: write the line, then commit the item, then update the run record and summary.

Write-then-commit lives here and only here: an item counts as done only once its line
is out (flushed, and synced when stdout is a file), so a crash between the two repeats
a line on the next run and never loses one (at-least-once).
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgbatch.checkpoint import Checkpoint, ItemState
from imgbatch.errors import DECODER_MISSING, ExitCode, ImgbatchError, ItemError, OutputClosed
from imgbatch.output import JsonlSink, Progress
from imgbatch.pipeline.items import CONTENT_ERRORS, Outcome, RunOptions, WorkItem
from imgbatch.prices import FREE, Price, dollars
from imgbatch.records import FileRecord, json_line

RUN_SAVE_EVERY = 2.0  # seconds between run-record updates (read by `status`)
MAX_TAGS, TOP_TAGS = 2000, 500  # a run's tag counter: pruned to the top 500 past 2000
#: a run's (code, message) counter of failures: messages may be as many as the items (they
#: can name a size or a request id), so past MAX_MESSAGES distinct ones it is pruned to
#: the TOP_MESSAGES most common, and each message is kept to MESSAGE_CHARS characters
MAX_MESSAGES, TOP_MESSAGES, MESSAGE_CHARS = 200, 50, 300
#: the offline analyzer's finished items are committed in groups: at least every
#: COMMIT_DELAY seconds (a group's first item waits no longer), at most COMMIT_EVERY items
#: a group, each group after its lines are flushed (and synced to a file: one fdatasync
#: and one transaction a group, ~5 ms, so a thousand items a second cost ten of them).
#: A remote provider's are committed one by one: a crash must not make the next run pay
#: for a request again, and one commit is nothing beside one request.
COMMIT_EVERY = 1000
COMMIT_DELAY = 0.1


@dataclass
class RunSummary:
    """Counts of one run; also the body of its run record."""

    id: int
    provider: str
    model: str
    fingerprint: str
    root: str
    started: float = field(default_factory=time.time)
    ended: float | None = None
    state: str = "QUEUED"
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    messages: Counter[tuple[str, str]] = field(default_factory=Counter)
    tags: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    exit_code: int | None = None
    total: int | None = None  # --limit: items this run processes at most
    listed: int | None = None  # files found by the listing-only count, once it has ended
    executor: str = "local"
    #: a --batch run's submitted / jobs / pending / collected counts (None: a live run)
    batch: Counter[str] | None = None
    #: the model's price (prices.lookup; None: unknown, and so is the cost) and the
    #: estimated dollars of this run's requests, a Batch API answer's at half price
    price: Price | None = None
    cost: float = 0.0
    #: a dry run: each request's cap on answer tokens, its output estimate (at most)
    max_output_tokens: int = 0

    @property
    def failed(self) -> int:
        return self.counts["failed"]

    @property
    def elapsed(self) -> float:
        return (self.ended or time.time()) - self.started

    @property
    def images_per_min(self) -> float:
        return 60 * (self.counts["completed"] + self.counts["failed"]) / max(self.elapsed, 1e-9)

    @property
    def cost_usd(self) -> float | None:
        """The estimated dollars of this run's tokens; None when the price is unknown."""
        return None if self.price is None else round(self.cost, 10)

    def expected_total(self) -> int | None:
        """Items this run will write, as far as known: the files listed less the unchanged
        ones skipped so far (exact once the scan has passed them), at most --limit."""
        if self.listed is None:
            return self.total
        left = max(0, self.listed - self.counts["skipped"])
        return left if self.total is None else min(left, self.total)

    def count_tags(self, tags: list[Any]) -> None:
        """Count an item's tags. Free-form tags are countless: past MAX_TAGS distinct ones
        only the TOP_TAGS most common are kept (a tag dropped then counts afresh)."""
        self.tags.update(t for t in tags if isinstance(t, str))
        if len(self.tags) > MAX_TAGS:
            self.tags = Counter(dict(self.tags.most_common(TOP_TAGS)))

    def count_message(self, code: str, message: str) -> None:
        """Count a failure's message (for the run record's top errors) within the bound
        of MAX_MESSAGES: one dropped by a pruning counts afresh if it comes again."""
        self.messages[(code, message[:MESSAGE_CHARS])] += 1
        if len(self.messages) > MAX_MESSAGES:
            self.messages = Counter(dict(self.messages.most_common(TOP_MESSAGES)))

    def record(self) -> dict[str, Any]:
        """The run record stored in the checkpoint (plain data, for `status` and `runs`)."""
        return {
            "id": self.id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "root": self.root,
            "provider": self.provider,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "executor": self.executor,
            "started": self.started,
            "updated": time.time(),
            "ended": self.ended,
            "state": self.state,
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "top_errors": [[c, m, n] for (c, m), n in self.messages.most_common(5)],
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "cost_usd": self.cost_usd,
            "price": None if self.price is None else self.price.as_dict(),
            "images_per_min": round(self.images_per_min, 1),
            "exit_code": self.exit_code,
            "total": self.expected_total(),
            "mode": "live" if self.batch is None else "batch",
            **({} if self.batch is None else {"batch": dict(self.batch)}),
        }


def summary_lines(s: RunSummary, scanned: int) -> list[str]:
    """The human summary printed on stderr at the end of a run."""
    if s.id == 0:  # a dry run
        return [
            f"dry run: {s.counts['would_send']:,} images would be sent to {s.provider} "
            f"({s.model}), about {s.input_tokens:,} input tokens (images and prompts); "
            f"{s.counts['cached']:,} have stored results, {s.counts['skipped']:,} unchanged "
            f"(of {scanned:,} files); nothing was sent",
            *([] if s.price is FREE else [dry_run_cost(s)]),
        ]
    lines = [
        f"{s.state.lower()}: {s.counts['completed']:,} ok, {s.counts['failed']:,} failed, "
        f"{s.counts['cached']:,} from stored results, {s.counts['skipped']:,} unchanged "
        f"(of {scanned:,} files) in {s.elapsed:.1f}s, {s.images_per_min:,.0f} images/min"
    ]
    if s.counts["in_batch"]:
        lines.append(
            f"{s.counts['in_batch']:,} waiting in Batch API jobs (`analyze --batch` collects them)"
        )
    if s.batch is not None:
        b = s.batch
        lines.append(
            f"submitted {b['submitted']:,} requests in {b['jobs']:,} jobs; {b['pending']:,} "
            f"jobs pending; collected {b['collected']:,} items"
            + (f"; {b['deferred']:,} left for a later run" if b["deferred"] else "")
            + " (the Batch API price applies: half of live)"
        )
    if s.errors:
        lines.append("errors: " + ", ".join(f"{c} {n}" for c, n in s.errors.most_common()))
    if s.input_tokens or s.output_tokens:
        lines.append(
            f"tokens: {s.input_tokens:,} in, {s.output_tokens:,} out; estimated cost "
            f"{dollars(s.cost_usd)}" + price_note(s.model, s.price)
        )
    if s.tags:
        lines.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in s.tags.most_common(8)))
    return lines


def price_note(model: str, price: Price | None) -> str:
    """Where a cost came from, for people: the price used, or why there is none."""
    if price is None:
        return f' (no price known for {model}: add [prices."{model}"] to the config)'
    return f" (${price.input:g} in, ${price.output:g} out per million tokens, {price.source})"


def dry_run_cost(s: RunSummary) -> str:
    """A dry run's price line: tokens in, an output bound, dollars live and at batch price."""
    output = s.counts["would_send"] * s.max_output_tokens
    if s.price is None:
        amounts = "unknown"
    else:
        live = s.price.cost(s.input_tokens, output)
        batch = s.price.cost(s.input_tokens, output, batch=True)
        amounts = f"up to {dollars(live)} live, {dollars(batch)} at the Batch API price (half)"
    return (
        f"estimated cost: {amounts}, for about {s.input_tokens:,} input tokens and at most "
        f"{output:,} output tokens ({s.max_output_tokens:,} an image, the cap on answers)"
        + price_note(s.model, s.price)
    )


class Recorder:
    """Where finished items go: their line to the sink, their state and result to the
    checkpoint (after the line), their counts to the run summary and progress.

    Args:
        checkpoint: item states (buffered commits) and the shared results store.
        sink: the JSONL output.
        summary: the run's counts, saved as its run record.
        provider, model: written in every record.
        options: a dry run records nothing.
        progress: updated as items finish.
        remote: a remote provider's items are committed one by one (see COMMIT_EVERY).
        clock: seconds for grouping commits and saving the run record (time.monotonic;
            a test passes its own).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        sink: JsonlSink,
        summary: RunSummary,
        options: RunOptions,
        progress: Progress | None = None,
        remote: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checkpoint = checkpoint
        self._clock = clock
        self.sink = sink
        self.summary = summary
        self.options = options
        self.progress = progress
        self._commit_every = 1 if remote else COMMIT_EVERY
        self._first_uncommitted: float | None = None
        self._last_save = 0.0
        self.in_flight = 0  # set by the run: shown as "processing" in the run record
        # a dry run's (width, height) of an item, as prepare() would make it (max_side
        # given); None: the header of the file at its path (a list run measures a URL's
        # downloaded body: listrun.ListRun)
        self.measure: Callable[[FileRecord, int], tuple[int, int]] | None = None

    def emit(self, item: WorkItem, outcome: Outcome, cached: bool) -> None:
        """Write the line, then commit the item (at-least-once), then count it."""
        try:
            self.write(item, outcome, cached)
        except OutputClosed:
            self._keep_result(item, outcome, cached)
            raise
        s, rec = self.summary, item.rec
        code = outcome.code
        message = outcome.message if outcome.status != "ok" else None
        # a changed file is recorded without a hash: the next run scans and analyses it
        content = None if outcome.changed else rec.hash
        state: ItemState = (content, code, s.id, rec.size, rec.mtime_ns, message)
        stored = self._stored(outcome, cached)
        if not self.options.dry_run:
            self.checkpoint.commit(s.fingerprint, item.rel_dir, item.name, state, stored)
            self.commit_written()
        if outcome.status == "ok":
            s.counts["completed"] += 1
            tags = (outcome.result or {}).get("tags")
            if isinstance(tags, list):
                s.count_tags(tags)
        else:
            s.counts["failed"] += 1
            s.errors[code or "?"] += 1
            s.count_message(code or "?", outcome.message or "")
        if cached:
            s.counts["cached"] += 1
        else:
            s.input_tokens += outcome.input_tokens or 0
            s.output_tokens += outcome.output_tokens or 0
            if s.price is not None:
                s.cost += s.price.cost(
                    outcome.input_tokens or 0, outcome.output_tokens or 0, batch=outcome.batch
                )
        if self.progress is not None:
            self.progress.update(
                s.counts["completed"] + s.counts["failed"],
                failed=s.counts["failed"],
                total=s.expected_total(),
                cached=s.counts["cached"],
            )
        if s.state == "QUEUED":  # its first item is written: the run is under way
            s.state = "PROCESSING"
            self.save(force=True)
        else:
            self.save()

    def _stored(self, outcome: Outcome, cached: bool) -> dict[str, Any] | None:
        """An item's outcome as the results store keeps it, or None if it keeps nothing."""
        if cached or not (
            outcome.status == "ok"
            # a verdict of this machine's missing decoder is not one about the content
            or (
                outcome.code in CONTENT_ERRORS
                and not (outcome.message or "").startswith(DECODER_MISSING)
            )
        ):
            return None
        s = self.summary
        return outcome.stored(s.provider, s.model, s.id)

    def _keep_result(self, item: WorkItem, outcome: Outcome, cached: bool) -> None:
        """Store the result of an item whose line its reader never handled (the Python
        API's caller raised, a closed pipe): the item is not committed, so the next run
        does it again, from the results store (a request is not paid for twice)."""
        stored = self._stored(outcome, cached)
        results = self.checkpoint.results
        if stored is None or results is None or self.options.dry_run or outcome.changed:
            return
        if item.rec.hash is not None:
            results.put_many([((self.summary.fingerprint, item.rec.hash), stored)])

    def write(self, item: WorkItem, outcome: Outcome, cached: bool) -> None:
        """Write an item's line (and nothing else: --emit-all's unchanged items)."""
        out = item.rec.fields()
        out["status"] = outcome.status
        out.pop("error", None)
        out["provider"] = self.summary.provider
        out["model"] = self.summary.model
        if outcome.status == "ok":
            out["result"] = outcome.result
        else:
            out["error"] = {"code": outcome.code, "message": outcome.message or ""}
        out["attempts"] = 0 if cached else outcome.attempts
        out["cached"] = cached
        out["input_tokens"] = outcome.input_tokens
        out["output_tokens"] = outcome.output_tokens
        out["latency_ms"] = 0 if cached else outcome.latency_ms
        if outcome.batch:
            out["batch"] = True
        self.sink.write(json_line(out))

    def would_send(
        self,
        item: WorkItem,
        max_side: int,
        estimate: Callable[[int, int], int],
        remote: bool,
        prompt_tokens: int = 0,
        storage_options: Sequence[str] = (),
    ) -> None:
        """A dry run's line: what would be sent and its estimated input tokens, by the
        provider's own rule (`estimate`: Provider.estimate_tokens; the image's header only
        is read, a bucket object's with `storage_options`) plus the prompt's
        (`prompt_tokens`)."""
        from imgbatch.imaging import fitted_size

        out = item.rec.fields()
        try:
            if self.measure is not None:
                w, h = self.measure(item.rec, max_side)
            else:
                w, h = fitted_size(item.rec.path, max_side, storage_options)
            tokens = estimate(w, h) + prompt_tokens
        except ItemError as exc:
            out.update(status="error", error={"code": exc.code.value, "message": exc.message})
            tokens = 0
        else:
            out["status"] = "would-send"
            self.summary.counts["would_send"] += 1
        out["provider"], out["model"] = self.summary.provider, self.summary.model
        out["estimated_tokens"] = tokens if remote else 0
        self.summary.input_tokens += out["estimated_tokens"]
        self.sink.write(json_line(out))

    def commit_written(self, force: bool = False) -> None:
        """Commit the finished items once their lines are out: flush the sink (and sync
        it when it is a file, so a power loss cannot keep a commit whose line was lost),
        then write the group in one transaction."""
        cp = self.checkpoint
        if not cp.pending:
            return
        now = self._clock()
        if self._first_uncommitted is None:
            self._first_uncommitted = now
        if (
            force
            or cp.pending >= self._commit_every
            or now - self._first_uncommitted >= COMMIT_DELAY
        ):
            self.sink.flush()
            self.sink.sync()
            cp.flush()
            self._first_uncommitted = None

    def save(self, force: bool = False) -> None:
        """Rewrite the run record (every few seconds, or now)."""
        if self.options.dry_run:
            return
        now = self._clock()
        if force or now - self._last_save >= RUN_SAVE_EVERY:
            self._last_save = now
            self.summary.counts["processing"] = self.in_flight
            self.checkpoint.save_run(self.summary.record())

    def finish(self, fatal: ImgbatchError | None, stopped: bool) -> None:
        """Commit what was written (or forget what may not have been), and close the run
        record with its state and exit code; a failure of the last flush is the run's
        (FAILED, raised after the record is saved)."""
        failed: BaseException | None = None
        if self.sink.closed:  # lines still buffered were lost: their items are redone
            self.checkpoint.discard()
        else:
            try:
                # every line goes out now, also those no commit waits for (--emit-all's
                # reprinted ones, a dry run's): a failure must not pass unseen at close
                self.sink.flush()
                self.commit_written(force=True)
            except ImgbatchError as exc:  # e.g. a full disk: the run failed with it
                self.checkpoint.discard()
                failed = fatal = exc
            except OutputClosed as exc:  # the reader left (`| head`): stopped, as mid-run
                self.checkpoint.discard()
                failed, stopped = exc, True
            except BaseException:
                self.checkpoint.discard()
                raise
        s = self.summary
        s.ended = time.time()
        s.counts["processing"] = 0
        if fatal is not None:
            s.state, s.exit_code = "FAILED", int(fatal.exit_code)
        elif stopped:
            s.state = "ABORTED"
        elif s.failed:
            s.state = "PARTIAL" if s.counts["completed"] else "FAILED"
            s.exit_code = int(ExitCode.ITEM_FAILURES)
        else:
            s.state, s.exit_code = "COMPLETED", int(ExitCode.OK)
        if not self.options.dry_run:
            self.checkpoint.save_run(s.record())
        if failed is not None:
            raise failed
