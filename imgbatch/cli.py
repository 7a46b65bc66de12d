"""The typer app: options -> Settings, call the library, map errors to exit codes.

Nothing here walks, hashes or analyses; every command forwards to one library call.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, cast

import typer

from imgbatch import __version__
from imgbatch.config import Settings, load_settings, results_dir, state_dir
from imgbatch.errors import ExitCode, ImgbatchError, UsageError, WaitInterrupted
from imgbatch.output import (
    JsonlSink,
    OutputClosed,
    Progress,
    SinkFile,
    human_bytes,
    human_duration,
    setup_logging,
)

log = logging.getLogger("imgbatch")

_APP_SETTINGS: dict[str, Any] = {
    "name": "imgbatch",
    "help": "Hash and analyse huge image folders, resumably, as JSON Lines on stdout.",
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
}
app = typer.Typer(**_APP_SETTINGS)


def _opt(*flags: str, help: str, **kwargs: Any) -> Any:
    """A typer option whose default is shown in its help text (defaults live in config)."""
    return typer.Option(*flags, help=help, show_default=False, **kwargs)


# -- shared options ----------------------------------------------------------------

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        envvar="IMGBATCH_CONFIG",
        help="Config file (default: $XDG_CONFIG_HOME/imgbatch/config.toml when it exists).",
        show_default=False,
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and tracebacks.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Errors only on stderr.")]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        "--log-format", help="text | json (one object per line on stderr, for log collectors)."
    ),
]
CheckpointOpt = Annotated[
    str | None,
    _opt(
        "--checkpoint",
        help="State folder (hash cache, checkpoint); default: one "
        "per ROOT under $XDG_CACHE_HOME/imgbatch.",
    ),
]
BatchSizeOpt = Annotated[int | None, _opt("--batch-size", help="Files per batch (default: 100).")]
AllFilesOpt = Annotated[
    bool | None,
    _opt("--all-files/--images-only", help="Every file, not only image extensions."),
]
HiddenOpt = Annotated[
    bool | None,
    _opt("--include-hidden/--skip-hidden", help="Descend into hidden files and folders."),
]
FollowOpt = Annotated[
    bool | None,
    _opt(
        "--follow-symlinks/--no-follow-symlinks",
        help="Follow symlinks; each folder is visited once.",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    _opt(
        "--exclude",
        help="Glob to leave out "
        "(repeatable): with '/', against the path relative to ROOT; without, "
        "against any basename.",
    ),
]
LogEveryOpt = Annotated[
    float | None,
    _opt(
        "--log-every",
        help="Seconds between progress lines when stderr is not a terminal (default: 30).",
    ),
]


class _Interrupted(BaseException):
    """A signal asked a command without a graceful stop to end.

    A BaseException, like KeyboardInterrupt: raised from the signal handler wherever
    the main thread is, it must get through `except Exception` (logging's own, when it
    lands while a log line is written) rather than be swallowed there.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class _Signals:
    """SIGINT / SIGTERM. The first one sets `stop` (graceful commands: intake stops,
    in-flight items get the grace period) or raises _Interrupted; a second one exits at
    once, which corrupts nothing: every checkpoint write is one SQLite transaction."""

    def __init__(self, graceful: bool) -> None:
        self.graceful = graceful
        self.stop = threading.Event()
        self.received: int | None = None

    def install(self) -> _Signals:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + self.received)
        self.received = signum
        if not self.graceful:
            raise _Interrupted(signum)
        self.stop.set()
        log.warning(
            "%s: stopping; in-flight items may finish (a second signal quits now)",
            signal.Signals(signum).name,
        )

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + self.received


def _exit(code: int) -> None:
    """Exit with `code`, without joining threads still blocked in a request."""
    if threading.active_count() > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    raise typer.Exit(code)


@contextmanager
def _command(verbose: bool, quiet: bool, log_format: str = "text") -> Iterator[_Signals]:
    """Run a command body: every failure becomes one stderr line and an exit code.

    Yields the signal handling: SIGINT/SIGTERM end the command with 130/143 (a command
    with a graceful stop sets `graceful`).
    """
    if log_format not in ("text", "json"):
        setup_logging()
        log.error("error: --log-format must be text or json")
        raise typer.Exit(int(ExitCode.USAGE))
    setup_logging(verbose, quiet, log_format)
    debug = verbose or os.environ.get("IMGBATCH_DEBUG") == "1"
    signals = _Signals(graceful=False).install()
    try:
        yield signals
    except WaitInterrupted as exc:  # a stop before anything was done (waiting for the lock)
        log.error("%s", exc)
        raise typer.Exit(signals.exit_code or int(exc.exit_code)) from None
    except ImgbatchError as exc:
        if debug:
            traceback.print_exc()
        log.error("error: %s", exc)
        raise typer.Exit(int(exc.exit_code)) from None
    except OutputClosed:
        raise typer.Exit(int(ExitCode.OK)) from None
    except _Interrupted as exc:
        log.error("interrupted")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        log.error("interrupted")
        raise typer.Exit(int(ExitCode.SIGINT)) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # typer's own exits and usage errors
    except Exception as exc:  # a bug, or a failure nothing above knew to expect
        if debug:
            traceback.print_exc()
        log.error("error: %s", _unexpected(exc))
        raise typer.Exit(int(ExitCode.FATAL)) from None


def _unexpected(exc: BaseException) -> str:
    """One line for an exception nobody expected: its type and message."""
    message = " ".join(str(exc).split())
    return f"unexpected {type(exc).__name__}" + (f": {message}" if message else "")


@contextmanager
def _stdout() -> Iterator[JsonlSink]:
    """stdout for a command's data: a closed pipe raises OutputClosed (a quiet exit 0),
    a failing one OutputError (exit 5). Nothing goes through sys.stdout, so the
    interpreter's exit flush has nothing left to fail on."""
    sink = JsonlSink(flush_every=100)
    try:
        yield sink
    except BaseException:
        _close_quietly(sink.close)
        raise
    sink.close()


def _print(out: JsonlSink, text: str) -> None:
    # surrogateescape: a file name that is not UTF-8 comes out as its own bytes
    out.write(text.encode("utf-8", "surrogateescape") + b"\n")


def _settings(config: str | None, **flags: Any) -> Settings:
    if flags.get("exclude") == []:
        flags["exclude"] = None  # typer gives [] for "not given"
    return load_settings(config, flags)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imgbatch {__version__}", err=True)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Hash and analyse huge image folders, resumably, as JSON Lines on stdout."""


@app.command()
def scan(
    root: Annotated[str, typer.Argument(help="Folder to walk.", show_default=False)],
    batch_size: BatchSizeOpt = None,
    all_files: AllFilesOpt = None,
    include_hidden: HiddenOpt = None,
    follow_symlinks: FollowOpt = None,
    exclude: ExcludeOpt = None,
    hash: Annotated[
        bool | None,
        _opt("--hash/--no-hash", help="Hash contents (--no-hash: metadata only, no file opened)."),
    ] = None,
    hash_threads: Annotated[
        int | None,
        _opt("--hash-threads", help="Threads hashing large files (default: 2)."),
    ] = None,
    hash_procs: Annotated[
        int | None,
        _opt(
            "--hash-procs",
            help="Processes hashing small files, started once a few thousand files have "
            "gone by (default 0: one per core; 1: none).",
        ),
    ] = None,
    hash_cache: Annotated[
        bool | None,
        _opt("--hash-cache/--no-hash-cache", help="Reuse hashes of unchanged files."),
    ] = None,
    checkpoint: CheckpointOpt = None,
    log_every: LogEveryOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """List every image under ROOT with its content hash: one JSON line per file."""
    from imgbatch.scanner import run_scan

    with _command(verbose, quiet, log_format):
        settings = _settings(
            config,
            batch_size=batch_size,
            all_files=all_files,
            include_hidden=include_hidden,
            follow_symlinks=follow_symlinks,
            exclude=exclude,
            hash=hash,
            hash_threads=hash_threads,
            hash_procs=hash_procs,
            hash_cache=hash_cache,
            checkpoint=checkpoint,
            log_every=log_every,
        )
        start = time.monotonic()
        sink = JsonlSink(flush_every=settings.batch_size, whole_lines=True)
        with Progress("files", settings.log_every, enabled=not quiet) as progress:
            try:
                stats = run_scan(root, settings, sink, progress, state_dir(root, settings))
            finally:
                _close_quietly(sink.close)
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(stats.skipped.items()))
        log.info(
            "scanned %s files (%s) in %s; %s errors; %s skipped%s; read %s, %s from the hash cache",
            f"{stats.files:,}",
            human_bytes(stats.bytes),
            human_duration(time.monotonic() - start),
            f"{stats.errors:,}",
            f"{stats.skipped_total:,}",
            f" ({skipped})" if skipped else "",
            human_bytes(stats.bytes_read),
            f"{stats.cache_hits:,}",
        )
        if stats.errors:
            raise typer.Exit(int(ExitCode.ITEM_FAILURES))


def _every_provider(**options: Any) -> dict[str, Any]:
    """`analyze` options that set a provider's setting, as the settings of every provider
    that has it (`model` -> gemini_model, openai_model, ollama_model)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(Settings)}
    return {
        f"{section}_{name}": value
        for name, value in options.items()
        for section in ("gemini", "openai", "ollama")
        if f"{section}_{name}" in names
    }


@app.command()
def analyze(
    root: Annotated[str, typer.Argument(help="Folder to analyse.", show_default=False)],
    provider: Annotated[
        str | None,
        _opt(
            "--provider",
            help="auto | local | gemini | openai | ollama (default: auto, which picks gemini "
            "only when a key is configured for imgbatch, and never openai or ollama).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        _opt(
            "--workers",
            help="Analysing threads; with --executor dask and no scheduler, the local "
            "worker processes (default: 4).",
        ),
    ] = None,
    executor: Annotated[
        str | None,
        _opt(
            "--executor",
            envvar="IMGBATCH_EXECUTOR",
            help="local (threads here) | dask (a Dask cluster; pip install "
            "'imgbatch\\[dask]') (default: local).",
        ),
    ] = None,
    dask_scheduler: Annotated[
        str | None,
        _opt(
            "--dask-scheduler",
            envvar="IMGBATCH_DASK_SCHEDULER",
            help="Address of a Dask scheduler to join (default: a LocalCluster of "
            "--workers processes). Workers must see ROOT at the same path.",
        ),
    ] = None,
    max_side: Annotated[
        int | None,
        _opt("--max-side", help="Long side of the decoded image in pixels (default: 768)."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        _opt("--max-attempts", help="Attempts per item for transient errors (default: 4)."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Stop after N processed items.", show_default=False, min=1),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Re-process everything (deletes nothing up front).")
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed", help="Also retry permanent errors (BAD_IMAGE, BLOCKED, IO_ERROR)."
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Wait for another run holding the lock instead of exiting with code 3."
        ),
    ] = False,
    grace: Annotated[
        float | None,
        _opt("--grace", help="Seconds in-flight items get after SIGINT/SIGTERM (default: 10)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="List what would be sent and its estimated input "
            "tokens; send nothing, record nothing.",
        ),
    ] = False,
    model: Annotated[
        str | None,
        _opt(
            "--model",
            help="Model of the provider that runs (default: gemini-2.5-flash-lite for "
            "gemini, gpt-4.1-mini for openai; ollama has none: e.g. gemma3).",
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        _opt(
            "--base-url",
            help="Endpoint of the provider that runs; for openai and ollama one URL ending "
            "in /v1, or several, comma-separated, that share the work.",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        _opt("--prompt", help="Prompt replacing the built-in one."),
    ] = None,
    prompt_file: Annotated[
        str | None,
        _opt("--prompt-file", help="File holding the prompt."),
    ] = None,
    schema: Annotated[
        str | None,
        _opt("--schema", help="JSON Schema file replacing the built-in response schema."),
    ] = None,
    temperature: Annotated[
        float | None,
        _opt("--temperature", help="Sampling temperature (default: 0.2)."),
    ] = None,
    max_output_tokens: Annotated[
        int | None,
        _opt("--max-output-tokens", help="Cap on answer tokens (default: 1024)."),
    ] = None,
    media_resolution: Annotated[
        str | None,
        _opt("--media-resolution", help="Gemini: low | medium | high."),
    ] = None,
    detail: Annotated[
        str | None,
        _opt("--detail", help="openai, ollama: image detail low | high | auto, where supported."),
    ] = None,
    timeout: Annotated[
        float | None,
        _opt("--timeout", help="Seconds per request (default: 60; ollama: 300)."),
    ] = None,
    rpm: Annotated[
        float | None,
        _opt(
            "--rpm",
            help="Requests per minute at most, all threads together; 0: no limit "
            "(default: 60; ollama: 0).",
        ),
    ] = None,
    tpm: Annotated[
        float | None,
        _opt("--tpm", help="Input tokens per minute at most (default: no limit)."),
    ] = None,
    max_wait: Annotated[
        float | None,
        _opt(
            "--max-wait",
            help="Seconds an item may wait out rate limits (429s); a longer retry delay "
            "ends it at once as RATE_LIMIT, which the next run retries (default: 600).",
        ),
    ] = None,
    emit_all: Annotated[
        bool,
        typer.Option(
            "--emit-all",
            help="Also print stored results of "
            "unchanged files (default: only what this run processed).",
        ),
    ] = False,
    batch: Annotated[
        bool,
        typer.Option(
            "--batch",
            help="Gemini Batch API at half the price: collect the jobs that ended, then "
            "submit the new work as jobs, collected by a later run (results within 24 h).",
        ),
    ] = False,
    batch_wait: Annotated[
        bool,
        typer.Option(
            "--batch-wait",
            help="With --batch: poll (30 s, backing off to 5 min) and collect until every "
            "job has ended, holding the lock.",
        ),
    ] = False,
    batch_max_requests: Annotated[
        int | None,
        _opt("--batch-max-requests", help="Requests per batch job at most (default: 10,000)."),
    ] = None,
    batch_max_pending: Annotated[
        int | None,
        _opt(
            "--batch-max-pending",
            help="Requests in jobs not yet collected at most; a run submits up to it "
            "(default: 50,000).",
        ),
    ] = None,
    all_files: AllFilesOpt = None,
    include_hidden: HiddenOpt = None,
    follow_symlinks: FollowOpt = None,
    exclude: ExcludeOpt = None,
    checkpoint: CheckpointOpt = None,
    log_every: LogEveryOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """Analyse every new or changed image under ROOT: one JSON line per file, resumable."""
    from imgbatch.pipeline import RunOptions, analyze_root, summary_lines

    with _command(verbose, quiet, log_format) as signals:
        settings = _settings(
            config,
            provider=provider,
            workers=workers,
            executor=executor,
            dask_scheduler=dask_scheduler,
            max_side=max_side,
            max_attempts=max_attempts,
            all_files=all_files,
            include_hidden=include_hidden,
            follow_symlinks=follow_symlinks,
            exclude=exclude,
            checkpoint=checkpoint,
            log_every=log_every,
            # each sets the setting of whichever provider runs (--model: gemini_model,
            # openai_model, ollama_model); only the one that runs reads its own
            **_every_provider(
                model=model,
                base_url=base_url,
                prompt=prompt,
                prompt_file=prompt_file,
                schema=schema,
                temperature=temperature,
                max_output_tokens=max_output_tokens,
                media_resolution=media_resolution,
                detail=detail,
                timeout=timeout,
            ),
            rpm=rpm,
            tpm=tpm,
            max_wait=max_wait,
            grace=grace,
            batch_max_requests=batch_max_requests,
            batch_max_pending=batch_max_pending,
        )
        if batch_wait and not batch:
            raise UsageError("--batch-wait goes with --batch")
        options = RunOptions(
            fresh=fresh,
            retry_failed=retry_failed,
            emit_all=emit_all,
            limit=limit,
            dry_run=dry_run,
            batch=batch,
            batch_wait=batch_wait,
        )
        # lines go out in groups: at least before every commit (one by one for a remote
        # provider, every 100 ms for the offline analyzer's thousands a second); a file
        # keeps whole lines only (a full disk leaves no half record for `>>` to glue onto)
        sink = JsonlSink(flush_every=100, max_delay=0.1, whole_lines=True)
        signals.graceful = True  # from now on a signal stops intake; in-flight items finish
        with Progress("images", settings.log_every, limit, enabled=not quiet) as progress:
            try:
                summary, scanned = analyze_root(
                    root, settings, options, sink, progress, signals.stop, wait=wait
                )
            finally:
                _close_quietly(sink.close)
        for line in summary_lines(summary, scanned):
            log.info("%s", line)
        if signals.exit_code is not None:
            _exit(signals.exit_code)
        if summary.failed:
            raise typer.Exit(int(ExitCode.ITEM_FAILURES))


StateRoot = Annotated[
    str | None,
    typer.Argument(help="The ROOT that was analysed (or use --checkpoint).", show_default=False),
]


def _state(root: str | None, checkpoint: str | None, config: str | None) -> Path:
    settings = _settings(config, checkpoint=checkpoint)
    if root is None and not settings.checkpoint:
        raise UsageError("give the ROOT that was analysed, or --checkpoint DIR")
    return state_dir(root or "", settings)


@app.command()
def status(
    root: StateRoot = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object, for machines.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Refresh until the run ends.")
    ] = False,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Where the current or last run stands (readable while it runs)."""
    from imgbatch import report

    with _command(verbose, quiet):
        state = _state(root, checkpoint, config)
        current = report.status(state)
        if current is None:
            log.info("no run recorded in %s yet", state)
            return
        if follow:
            current = _follow(state, current)
        with _stdout() as out:
            if json_:
                _print(out, json.dumps(current, sort_keys=True))
            else:
                for line in report.status_lines(current):
                    _print(out, line)


def _follow(state: Path, current: dict[str, Any]) -> dict[str, Any]:
    """Show a live line on stderr (a bar on a terminal) until the run ends."""
    from imgbatch import report

    with Progress("images", log_every=5.0, total=current.get("total")) as progress:
        while current["state"] in report.LIVE_STATES:
            c = current.get("counts", {})
            progress.update(
                c.get("completed", 0) + c.get("failed", 0),
                failed=c.get("failed", 0),
                total=current.get("total"),
                cached=c.get("cached", 0),
            )
            time.sleep(1.0)
            current = report.status(state) or current
    return current


@app.command()
def runs(
    root: StateRoot = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON Lines, one run per line.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="Runs shown at most.", min=1)] = 20,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The run history kept in the checkpoint (the last 100 runs), newest first."""
    from imgbatch import report

    with _command(verbose, quiet):
        history = report.runs(_state(root, checkpoint, config), limit)
        with _stdout() as out:
            if json_:
                for run in history:
                    _print(out, json.dumps(run, sort_keys=True))
                return
            _print(out, report.RUNS_HEADER)
            for run in history:
                _print(out, report.run_line(run))


@app.command()
def export(
    root: StateRoot = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="jsonl | csv | parquet (needs --output; pip install 'imgbatch\\[parquet]') | "
            "xmp (a sidecar beside each image; pip install 'imgbatch\\[xmp]').",
        ),
    ] = "jsonl",
    output: Annotated[
        str | None,
        _opt(
            "--output",
            "-o",
            help="Write to this file (atomically: a temporary file renamed) instead of stdout.",
        ),
    ] = None,
    status_: Annotated[
        str | None,
        _opt("--status", help="Only ok or only error items."),
    ] = None,
    xmp_naming: Annotated[
        str | None,
        _opt(
            "--xmp-naming",
            help="full: IMG_0001.JPG.xmp (darktable, digiKam; the default) | "
            "basename: IMG_0001.xmp (Lightroom).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="With --format xmp: write nothing, print one JSON line per sidecar that "
            "would change.",
        ),
    ] = False,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Every stored result (of the last run's settings) as JSONL, CSV, Parquet or XMP sidecars."""
    from imgbatch import report

    with _command(verbose, quiet):
        if status_ not in (None, "ok", "error"):
            raise UsageError("--status must be ok or error")
        if format == "xmp":
            if output is not None:
                raise UsageError("--format xmp writes sidecars beside the images: no --output")
            if status_ == "error":
                raise UsageError("--format xmp exports ok results only")
            with _stdout() as out:
                summary = report.export_sidecars(
                    _state(root, checkpoint, config),
                    out.write,
                    xmp_naming or "full",
                    dry_run,
                    results_dir(_settings(config)),
                )
            log.info("%s", summary.line())
            if summary.failed:
                raise typer.Exit(int(ExitCode.ITEM_FAILURES))
            return
        if xmp_naming is not None or dry_run:
            raise UsageError("--xmp-naming and --dry-run go with --format xmp")
        with _stdout() as out:
            # report.export writes bytes, or wraps them in a TextIOWrapper for CSV
            n = report.export(
                _state(root, checkpoint, config),
                format,
                output,
                cast("IO[bytes]", SinkFile(out)),
                status_,
                results_dir(_settings(config)),
            )
        log.info("exported %s records%s", f"{n:,}", f" to {output}" if output else "")


@app.command(name="report")
def html_report(
    root: StateRoot = None,
    output: Annotated[
        str | None,
        _opt(
            "--output",
            "-o",
            help="Write to this file (atomically: a temporary file renamed) instead of stdout.",
        ),
    ] = None,
    max_thumbnails: Annotated[
        int,
        typer.Option(
            "--max-thumbnails",
            help="Items shown with a thumbnail at most; the others are text rows.",
            min=0,
        ),
    ] = 2000,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """A self-contained HTML contact sheet of the stored results (the last run's settings)."""
    from imgbatch.web.report import write_report

    with _command(verbose, quiet):
        with _stdout() as out:
            made = write_report(
                _state(root, checkpoint, config),
                results_dir(_settings(config)),
                output,
                cast("IO[bytes]", SinkFile(out)),
                max_thumbnails,
            )
        log.info(
            "report of %s items, %s with a thumbnail%s",
            f"{made.items:,}",
            f"{made.thumbnails:,}",
            f", written to {output}" if output else "",
        )


@app.command()
def serve(
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port (0: any free one).", min=0, max=65535)
    ] = 8765,
    allow_root: Annotated[
        list[str] | None,
        _opt(
            "--allow-root",
            help="A folder whose trees runs may analyse (repeatable); without one, every "
            "run is refused.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        _opt(
            "--token",
            envvar="IMGBATCH_SERVE_TOKEN",
            help="Bearer token every /api/ request must carry (required off loopback; "
            "without one a random token is made and shown on stderr). Prefer the "
            "environment variable: a command line shows in ps.",
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            help="Seconds in-flight items get when a run is cancelled or on SIGINT/SIGTERM.",
            min=0,
            max=3600,
        ),
    ] = 10.0,
    max_runs: Annotated[
        int,
        typer.Option("--max-runs", help="Runs at once at most (a start beyond: 429).", min=1),
    ] = 4,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """A local HTTP API to start, follow and cancel runs (live over Server-Sent Events), and
    a dashboard page; needs the serve extra (pip install 'imgbatch\\[serve]')."""
    from imgbatch.web import load_server

    with _command(verbose, quiet, log_format):
        _settings(config)  # a bad config file is an error now, not at the first run
        try:
            load_server().serve(
                host, port, allow_root or [], token, config, verbose, grace, max_runs
            )
        except _Interrupted as exc:
            # the runs had their grace; a request thread stuck in a hanging model server
            # must not hold the exit (the kernel releases the locks)
            log.error("interrupted")
            _exit(exc.exit_code)


@app.command()
def prune(
    root: StateRoot = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for a run holding the lock.")] = False,
    forget_batch: Annotated[
        str | None,
        typer.Option(
            "--forget-batch",
            metavar="JOB",
            help="Instead, forget the pending Batch API job JOB (its id or batches/ name, "
            "as `status` lists it), e.g. one whose API key is gone for good: its images "
            "are submitted again.",
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """Drop files that no longer exist on disk from the checkpoint (or forget one pending
    Batch API job: --forget-batch)."""
    from imgbatch import report

    with _command(verbose, quiet, log_format):
        state = _state(root, checkpoint, config)
        if forget_batch is not None:
            job = report.forget_batch(state, forget_batch, wait)
            log.warning(
                "forgot batch job %s: its %s images will be submitted again by the next "
                "`analyze --batch` (if Google still runs the job, they are paid twice)",
                job.get("name") or job["id"],
                f"{job['requests']:,}",
            )
            return
        n = report.prune(state, wait)
        log.info("pruned %s records of files that no longer exist", f"{n:,}")


def _close_quietly(close: Callable[[], None]) -> None:
    try:
        close()
    except (OutputClosed, ImgbatchError, OSError):
        pass  # already failing: the first error is the one to report


def _app_for(argv: list[str]) -> typer.Typer:
    """The app that runs `argv`: for `imgbatch COMMAND ...`, one with COMMAND alone
    (typer reads the signature of every registered command before it parses anything,
    ~40 ms of a re-scan that takes a few hundred); else the whole app (help, errors)."""
    name = argv[1] if len(argv) > 1 else ""
    chosen = [
        info
        for info in app.registered_commands
        if name == (info.name or getattr(info.callback, "__name__", "").replace("_", "-"))
    ]
    if not chosen:
        return app
    one = typer.Typer(**_APP_SETTINGS)
    one.registered_callback = app.registered_callback
    one.registered_commands = chosen
    return one


def main() -> None:
    """Console-script entry point."""
    try:
        _app_for(sys.argv)()
    except KeyboardInterrupt:  # before a command's own handler is in place
        sys.exit(int(ExitCode.SIGINT))
    except _Interrupted as exc:  # after it (a signal while the process ends)
        sys.exit(exc.exit_code)
    except Exception as exc:  # outside a command's own handler (start-up, option parsing)
        if os.environ.get("IMGBATCH_DEBUG") == "1":
            traceback.print_exc()
        sys.stderr.write(f"imgbatch: error: {_unexpected(exc)}\n")
        sys.exit(int(ExitCode.FATAL))
