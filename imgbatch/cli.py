"""The typer app: options -> Settings, call the library, map errors to exit codes.

Nothing here walks, hashes or analyses; every command forwards to one library call.
The options are declared in cli_options.py (those that are settings, from `Settings`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Annotated, Any, cast

import typer

from imgbatch import cli_options as o
from imgbatch import cli_runtime as runtime
from imgbatch.cli_options import OutputOpt, StateRoot
from imgbatch.config import results_dir, state_dir
from imgbatch.errors import ExitCode, SignalStop, UsageError
from imgbatch.output import Progress, SinkFile

log = logging.getLogger("imgbatch")

app = typer.Typer(**runtime.APP_SETTINGS)

_WALK = "all_files include_hidden follow_symlinks exclude"  # of a walk (scan, analyze)


@app.callback()
def _main(version: o.Version = False) -> None:
    """Hash and analyse huge image folders, resumably, as JSON Lines on stdout."""


@app.command()
@o.command_options(
    f"batch_size {_WALK} hash hash_threads hash_procs hash_cache checkpoint log_every "
    "storage_option download_timeout max_download_size max_attempts"
)
def scan(
    root: o.ListRoot = None,
    from_list: o.FromList = None,
    **options: Any,
) -> None:
    """List every image under ROOT with its content hash: one JSON line per file."""
    from imgbatch import api

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        source, listed = o.one_source(root, from_list)
        if listed:
            from imgbatch.listfile import run_scan as run_list
        runtime.finish(*(run_list if listed else api.run_scan)(source, cmd.load(), not cmd.quiet))


@app.command()
@o.command_options(
    "provider workers executor dask_scheduler max_side max_attempts grace local_ocr "
    # each sets the setting of whichever provider runs (--model: gemini_model, ...)
    "model base_url prompt prompt_file schema temperature max_output_tokens "
    "media_resolution detail timeout "
    f"rpm tpm max_wait batch_max_requests batch_max_pending {_WALK} checkpoint log_every "
    "storage_option download_timeout max_download_size",
    o.RUN_OPTIONS,
)
def analyze(
    root: o.ListRoot = None,
    from_list: o.FromList = None,
    **options: Any,
) -> None:
    """Analyse every new or changed image under ROOT: one JSON line per file, resumable."""
    from imgbatch import api

    cmd = o.Shared.pop(options)
    with runtime.command(cmd) as signals:
        source, listed = o.one_source(root, from_list)
        if listed:
            from imgbatch.listrun import run_analyze as run_list
        lines, code = (run_list if listed else api.run_analyze)(
            source,
            cmd.load(),
            signals,
            show_progress=not cmd.quiet,
            **{n: options.pop(n) for n in o.RUN_OPTIONS},
        )
        runtime.finish(lines, code, signals)


@app.command()
@o.command_options(
    "provider workers executor dask_scheduler max_side max_attempts grace local_ocr "
    "model base_url prompt prompt_file schema temperature max_output_tokens "
    f"media_resolution detail timeout rpm tpm max_wait {_WALK} checkpoint log_every"
)
def watch(
    root: Annotated[str, typer.Argument(help="Folder to watch.", show_default=False)],
    settle: o.Settle = 5.0,
    poll: o.Poll = False,
    **options: Any,
) -> None:
    """Analyse ROOT as analyze does, then every image created or changed under it once
    settled, until stopped (pip install 'imgbatch[watch]')."""
    from imgbatch import watch

    cmd = o.Shared.pop(options)
    with runtime.command(cmd) as signals:
        run = watch.run(root, cmd.load(), signals, settle=settle, poll=poll, show_progress=False)
        runtime.finish(*run, signals)


def _state(root: str | None, cmd: o.Shared, from_list: str | None = None) -> Path:
    loaded = cmd.load()
    if from_list is not None:  # a list run's: the list's state folder, or --checkpoint
        from imgbatch.listfile import list_state

        return list_state(o.one_source(root, from_list)[0], loaded)
    if root is None and not loaded.checkpoint:
        raise UsageError("give the ROOT that was analysed, or --checkpoint DIR")
    return state_dir(root or "", loaded)


@app.command()
@o.command_options("checkpoint", o.FROM_LIST)
def status(
    root: StateRoot = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object, for machines.")] = False,
    follow: o.Follow = False,
    **options: Any,
) -> None:
    """Where the current or last run stands (readable while it runs)."""
    from imgbatch import history

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        state = _state(root, cmd, options.pop("from_list"))
        current = history.status(state)
        if current is None:
            log.info("no run recorded in %s yet", state)
            return
        if follow:
            current = _follow(state, current)
        runtime.print_lines(
            [json.dumps(current, sort_keys=True)] if json_ else history.status_lines(current)
        )


def _follow(state: Path, current: dict[str, Any]) -> dict[str, Any]:
    """Show a live line on stderr (a bar on a terminal) until the run ends."""
    from imgbatch import history

    with Progress("images", log_every=5.0, total=current.get("total")) as progress:
        for now in history.follow(state, current):
            c, current = now.get("counts", {}), now
            if now["state"] in history.LIVE_STATES:
                done, failed = c.get("completed", 0) + c.get("failed", 0), c.get("failed", 0)
                cached = c.get("cached", 0)
                progress.update(done, failed=failed, total=now.get("total"), cached=cached)
    return current


@app.command()
@o.command_options("checkpoint", o.FROM_LIST)
def runs(
    root: StateRoot = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON Lines, one run per line.")] = False,
    limit: o.RunsLimit = 20,
    **options: Any,
) -> None:
    """The run history kept in the checkpoint (the last 100 runs), newest first."""
    from imgbatch import history

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        past = history.runs(_state(root, cmd, options.pop("from_list")), limit)
        if json_:
            runtime.print_lines(json.dumps(run, sort_keys=True) for run in past)
        else:
            runtime.print_lines([history.RUNS_HEADER, *map(history.run_line, past)])


@app.command()
# storage_option: as scan's (nothing is read)
@o.command_options("checkpoint storage_option", o.FROM_LIST)
def export(
    root: StateRoot = None,
    format: o.Format = "jsonl",
    output: OutputOpt = None,
    status_: o.Status = None,
    xmp_naming: o.XmpNaming = None,
    dry_run: bool = o.XMP_DRY_RUN,
    caption_naming: o.CaptionNaming = None,
    caption_from: o.CaptionFrom = None,
    prefix: o.Prefix = None,
    on_existing: o.OnExisting = None,
    ls_root_url: o.LsRootUrl = None,
    **options: Any,
) -> None:
    """Every stored result (of the last run's settings) as JSONL, CSV, Parquet, XMP
    sidecars, caption files, Hugging Face imagefolder metadata or Label Studio tasks."""
    from imgbatch import history

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        captioning = {
            "caption_naming": caption_naming,
            "caption_from": caption_from,
            "prefix": prefix,
            "on_existing": on_existing,
        }
        of_format = {"xmp_naming": xmp_naming, "ls_root_url": ls_root_url, **captioning}
        o.check_export(format, output, status_, dry_run, **of_format)
        state, results = _state(root, cmd, options.pop("from_list")), results_dir(cmd.load())
        with runtime.stdout() as out:
            if format == "xmp":
                naming = xmp_naming or "full"
                made = history.export_sidecars(state, out.write, naming, dry_run, results)
                beside = made.line(), made.failed
            elif format == "captions":
                given: dict[str, Any] = {k: v for k, v in captioning.items() if v is not None}
                given["naming"] = given.pop("caption_naming", "basename")
                given["dry_run"] = dry_run
                captioned = history.export_captions(state, out.write, given, results)
                beside = captioned.line(), captioned.failed
            else:  # history.export writes bytes, or wraps them in a TextIOWrapper for CSV
                sink = cast("IO[bytes]", SinkFile(out))
                n = history.export(state, format, output, sink, status_, results, ls_root_url)
        if format in ("xmp", "captions"):
            line, failed = beside
            runtime.finish([line], int(ExitCode.ITEM_FAILURES) if failed else 0)
        else:
            log.info("exported %s records%s", f"{n:,}", f" to {output}" if output else "")


@app.command()
@o.command_options("checkpoint base_url timeout")
def search(
    root: o.SearchRoot = None,
    query: o.SearchQuery = None,
    tag: o.SearchTag = None,
    color: o.SearchColor = None,
    after: o.SearchAfter = None,
    before: o.SearchBefore = None,
    status_: o.Status = None,
    limit: o.SearchLimit = 20,
    format: o.SearchFormat = "jsonl",
    null: o.SearchNull = False,
    semantic: o.Semantic = False,
    hybrid: o.Hybrid = False,
    from_list: o.FromList = None,
    **options: Any,
) -> None:
    """Find stored results (of the last run's settings) by their words (or meaning:
    --semantic, --hybrid): one JSON line per hit, best first; exit 1 when nothing matches."""
    from imgbatch import searching

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        if format not in ("jsonl", "paths") or (null and format != "paths"):
            raise UsageError("--format is jsonl or paths; -0 goes with --format paths")
        where = searching.filters(tag or (), color or (), after, before, status_)
        loaded = cmd.load()
        if from_list is not None and root is not None:  # no ROOT: a word of the query
            query, root = [root, *(query or [])], None
        state, results = _state(root, cmd, from_list), results_dir(loaded)
        mode = "hybrid" if hybrid else "semantic" if semantic else "text"
        hits = searching.search(state, query or [], where, limit, results, mode, loaded)
        with runtime.stdout() as out:
            for hit in hits:
                out.write(searching.output_line(hit, format, null))
        if not hits:
            raise typer.Exit(int(ExitCode.ITEM_FAILURES))  # grep's "no match"


@app.command(name="report")
@o.command_options("checkpoint storage_option", o.FROM_LIST)
def html_report(
    root: StateRoot = None,
    output: OutputOpt = None,
    max_thumbnails: o.MaxThumbnails = 2000,
    **options: Any,
) -> None:
    """A self-contained HTML contact sheet of the stored results (the last run's settings)."""
    from imgbatch.web.report import write_report

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        loaded = cmd.load()
        state, results = _state(root, cmd, options.pop("from_list")), results_dir(loaded)
        with runtime.stdout() as out:
            sink = cast("IO[bytes]", SinkFile(out))
            made = write_report(state, results, output, sink, max_thumbnails, loaded.storage_option)
        where = f", written to {output}" if output else ""
        runtime.finish(
            [f"report of {made.items:,} items, {made.thumbnails:,} with a thumbnail{where}"], 0
        )


@app.command()
@o.command_options("provider base_url timeout rpm max_attempts checkpoint")
def index(
    root: Annotated[str, typer.Argument(help="The ROOT that was analysed.", show_default=False)],
    embeddings: o.Embeddings = False,
    embedding_model: o.EmbeddingModel = None,
    per_request: o.PerRequest = 100,
    **options: Any,
) -> None:
    """Embed the stored results (of the last run's settings) for `search --semantic`."""
    from imgbatch import embeddings as embedder

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        if not embeddings:
            raise UsageError("give --embeddings (the index to build)")
        loaded = cmd.load()
        model, done = embedder.index(
            state_dir(root, loaded), results_dir(loaded), loaded, None, embedding_model, per_request
        )
        runtime.finish([done.line(model)], int(ExitCode.ITEM_FAILURES) if done.failed else 0)


@app.command()
@o.command_options("checkpoint storage_option", o.FROM_LIST)
def dupes(
    root: StateRoot = None,
    distance: o.Distance = 8,
    **options: Any,
) -> None:
    """Groups of exact copies and near-duplicates among the stored files (the last run's):
    one JSON line per group, biggest waste first, with a suggested keeper. Changes nothing."""
    from imgbatch import dupes as finder

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        loaded, state = cmd.load(), _state(root, cmd, options.pop("from_list"))
        read = (loaded.max_side, None, loaded.storage_option)  # the size, threads, bucket
        found = finder.find(state, results_dir(loaded), distance, *read)
        runtime.print_lines(json.dumps(group, ensure_ascii=False) for group in found.groups)
        runtime.finish(found.lines(), 0)


@app.command()
@o.command_options()
def serve(
    host: o.Host = "127.0.0.1",
    port: o.Port = 8765,
    allow_root: o.AllowRoot = None,
    token: o.Token = None,
    grace: o.ServeGrace = 10.0,
    max_runs: o.MaxRuns = 4,
    **options: Any,
) -> None:
    """A local HTTP API to start, follow and cancel runs (live over Server-Sent Events), and
    a dashboard page; needs the serve extra (pip install 'imgbatch\\[serve]')."""
    from imgbatch.web import load_server

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        cmd.load()  # a bad config file is an error now, not at the first run
        try:
            load_server().serve(
                host, port, allow_root or [], token, cmd.config, cmd.verbose, grace, max_runs
            )
        except SignalStop as exc:
            # the runs had their grace; a request thread stuck in a hanging model server
            # must not hold the exit (the kernel releases the locks)
            log.error("interrupted")
            runtime.exit_now(exc.exit_code)


@app.command()
@o.command_options("checkpoint")
def prune(
    root: StateRoot = None,
    wait: bool = o.PRUNE_WAIT,
    forget_batch: o.ForgetBatch = None,
    **options: Any,
) -> None:
    """Drop files that no longer exist on disk from the checkpoint (or forget one pending
    Batch API job: --forget-batch)."""
    from imgbatch import history

    cmd = o.Shared.pop(options)
    with runtime.command(cmd):
        state = _state(root, cmd)
        if forget_batch is not None:
            job = history.forget_batch(state, forget_batch, wait)
            log.warning(
                "forgot batch job %s: its %s images will be submitted again by the next "
                "`analyze --batch` (if Google still runs the job, they are paid twice)",
                job.get("name") or job["id"],
                f"{job['requests']:,}",
            )
            return
        n = history.prune(state, wait)
        log.info("pruned %s records of files that no longer exist", f"{n:,}")


def main() -> None:
    """Console-script entry point."""
    runtime.main(app)
