"""The command-line options that are settings: flag, type, help and default from `Settings`.

A command names the settings it takes (`@settings_options("workers", "rpm", ...)`) and
receives them as `**settings`; `load(config, settings)` makes its `Settings`. A new
setting is one field of `Settings` plus its name in the commands that take it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from imgbatch import __version__
from imgbatch.config import Settings, every_provider, load_settings, provider_settings
from imgbatch.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
#: flags that are not --the-setting-name (/--no-the-setting-name for a switch)
_FLAGS = {
    "all_files": "--all-files/--images-only",
    "include_hidden": "--include-hidden/--skip-hidden",
    "local_ocr": "--ocr/--no-ocr",
}
#: settings whose option also reads an environment variable of its own name
_ENVVARS = {"executor": "IMGBATCH_EXECUTOR", "dask_scheduler": "IMGBATCH_DASK_SCHEDULER"}
_TYPES: dict[type, Any] = {bool: bool, int: int, float: float, str: str, tuple: list[str]}


def flag(name: str) -> str:
    """The option of setting `name` as typer declares it (`--hash/--no-hash`)."""
    dashed = "--" + name.replace("_", "-")
    if isinstance(FIELDS[name].default, bool):
        return _FLAGS.get(name, f"{dashed}/--no-{dashed[2:]}")
    return dashed


def shown(name: str) -> str:
    """The default of setting `name` as its help shows it."""
    value = FIELDS[name].default
    if isinstance(value, bool):  # the switch that is on by default
        return flag(name).split("/")[0 if value else 1]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    return str(value) or "''"


def _help(text: str) -> str:
    """A setting's help as an option's: capitalised, unless it lists values; "[" escaped
    (typer's rich help would take `[dask]` for markup)."""
    text = text.replace("[", "\\[")
    starts_with_values = re.match(r"[\w.-]+( \([^)]*\))? \| ", text)
    return text if starts_with_values else text[:1].upper() + text[1:]


def _option(name: str) -> Any:
    """The annotation of the option that sets `name`: a setting, or a provider option
    (`model`) that sets the setting of every provider that has it."""
    names = [name] if name in FIELDS else provider_settings(name)
    first = FIELDS[names[0]]
    if name in FIELDS:
        text = f"{_help(first.metadata['help'])} (default: {shown(name)})."
    else:
        defaults = ", ".join(f"{shown(n)} for {n.split('_')[0]}" for n in names)
        text = f"{_help(first.metadata['help'])}, of the provider that runs (default: {defaults})."
    decl = flag(name) if name in FIELDS else "--" + name.replace("_", "-")
    info = typer.Option(decl, help=text, show_default=False, envvar=_ENVVARS.get(name))
    return Annotated[_TYPES[type(first.default)] | None, info]


def command_options(
    names: str = "", extra: Mapping[str, tuple[Any, Any]] | None = None
) -> Callable[[F], F]:
    """Give a command an option for each setting (or provider option) named in `names`
    (space-separated), then the options every command shares (--config, --verbose,
    --quiet, --log-format), and `extra` (name: (annotation, default)); the function
    takes them as `**options` (see Shared)."""

    def add(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        kind = inspect.Parameter.KEYWORD_ONLY
        added = [(n, _option(n), None) for n in names.split()]
        added += [(n, a, d) for n, (a, d) in (extra or {}).items()] + [
            ("config", ConfigOpt, None),
            ("verbose", VerboseOpt, False),
            ("quiet", QuietOpt, False),
            ("log_format", LogFormatOpt, "text"),
        ]
        params += [inspect.Parameter(n, kind, annotation=a, default=d) for n, a, d in added]
        func.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in params}
        return func

    return add


@dataclass(frozen=True)
class Shared:
    """The options every command shares, and the command's setting options."""

    config: str | None
    verbose: bool
    quiet: bool
    log_format: str
    settings: dict[str, Any]

    @classmethod
    def pop(cls, options: dict[str, Any]) -> Shared:
        """Take the shared and the setting options out of a command's `**options`."""
        settings = {n: options.pop(n) for n in list(options) if is_setting(n)}
        shared = {n: options.pop(n) for n in ("config", "verbose", "quiet", "log_format")}
        return cls(**shared, settings=settings)

    def load(self) -> Settings:
        """The command's Settings."""
        return load(self.config, self.settings)


def load(config: str | None, settings: Mapping[str, Any]) -> Settings:
    """The Settings of a command: its setting options (None: not given) over the
    environment, the config file and the defaults."""
    flags = every_provider(settings)
    for name in ("exclude", "storage_option"):
        if flags.get(name) == []:
            flags[name] = None  # typer gives [] for "not given"
    return load_settings(config, flags)


def is_setting(name: str) -> bool:
    """Whether option `name` of a command sets a setting (its own or every provider's)."""
    return name in FIELDS or bool(provider_settings(name))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imgbatch {__version__}", err=True)
        raise typer.Exit()


Version = Annotated[
    bool,
    typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
]

# -- the options every command shares -------------------------------------------------

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
StateRoot = Annotated[
    str | None,
    typer.Argument(help="The ROOT that was analysed (or use --checkpoint).", show_default=False),
]
#: ROOT of scan and analyze, or of search, unless --from-list gives a list instead
ListRoot = Annotated[
    str | None, typer.Argument(help="The folder (or use --from-list).", show_default=False)
]
SearchRoot = Annotated[
    str | None,
    typer.Argument(help="The ROOT that was analysed (or use --from-list).", show_default=False),
]


def one_source(root: str | None, from_list: str | None) -> tuple[str, bool]:
    """What a command reads: ROOT, or the list of --from-list (then True); one of the two."""
    if (root is None) == (from_list is None):
        raise UsageError("give ROOT or --from-list FILE (one of the two)")
    return (root or from_list or ""), from_list is not None


#: a list of paths and URLs instead of ROOT (listfile.py)
FromList = Annotated[
    str | None,
    typer.Option(
        "--from-list",
        help="Read the items from this list instead of ROOT ('-': stdin): one local path, "
        "http(s), s3 or gs URL per line, or JSON Lines with a url or path field (the other "
        "fields are kept under meta).",
        show_default=False,
    ),
]
#: --from-list for the commands reading a list run's state (status, runs, export)
FROM_LIST: dict[str, tuple[Any, Any]] = {"from_list": (FromList, None)}
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="Write to this file (atomically: a temporary file renamed) instead of stdout.",
        show_default=False,
    ),
]


# -- options that are not settings ----------------------------------------------------


def _opt(*flags: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*flags, help=help, show_default=False, **kwargs)


def _switch(flag: str, help: str) -> Any:
    """An on/off option that is not a setting (off by default), used as a default value."""
    return typer.Option(False, flag, help=help)


def _flag(flag: str, help: str) -> Any:
    return Annotated[bool, typer.Option(flag, help=help)]


#: analyze's options that are not settings: its run options (`pipeline.RunOptions`) and
#: --wait, as (annotation, default)
RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "limit": (
        Annotated[int | None, _opt("--limit", help="Stop after N processed items.", min=1)],
        None,
    ),
    "fresh": (_flag("--fresh", "Re-process everything (deletes nothing up front)."), False),
    "retry_failed": (
        _flag("--retry-failed", "Also retry permanent errors (BAD_IMAGE, BLOCKED, IO_ERROR)."),
        False,
    ),
    "wait": (
        _flag("--wait", "Wait for another run holding the lock instead of exiting with code 3."),
        False,
    ),
    "dry_run": (
        _flag(
            "--dry-run",
            "List what would be sent and its estimated input tokens; send nothing, record nothing.",
        ),
        False,
    ),
    "emit_all": (
        _flag(
            "--emit-all",
            "Also print stored results of unchanged files (default: only what this run processed).",
        ),
        False,
    ),
    "batch": (
        _flag(
            "--batch",
            "The Batch API (gemini, openai, anthropic) at half the price: collect the jobs "
            "that ended, then submit "
            "the new work as jobs, collected by a later run (results within 24 h).",
        ),
        False,
    ),
    "batch_wait": (
        _flag(
            "--batch-wait",
            "With --batch: poll (30 s, backing off to 5 min) and collect until every job "
            "has ended, holding the lock.",
        ),
        False,
    ),
}
Follow = Annotated[bool, typer.Option("--follow", "-f", help="Refresh until the run ends.")]
RunsLimit = Annotated[int, typer.Option("--limit", help="Runs shown at most.", min=1)]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        help="jsonl | csv | parquet (needs --output; pip install 'imgbatch\\[parquet]') | "
        "xmp (a sidecar beside each image; pip install 'imgbatch\\[xmp]') | "
        "captions (a one-line .txt beside each image, for training sets) | "
        "hf (Hugging Face imagefolder: --output DIR/metadata.jsonl, DIR holding ROOT) | "
        "labelstudio (Label Studio tasks with pre-annotations).",
    ),
]
Status = Annotated[str | None, _opt("--status", help="Only ok or only error items.")]
XmpNaming = Annotated[
    str | None,
    _opt(
        "--xmp-naming",
        help="full: IMG_0001.JPG.xmp (darktable, digiKam; the default) | "
        "basename: IMG_0001.xmp (Lightroom).",
    ),
]
XMP_DRY_RUN = _switch(
    "--dry-run",
    "With --format xmp or captions: write nothing, print one JSON line per file that would change.",
)
CaptionNaming = Annotated[
    str | None,
    _opt(
        "--caption-naming",
        help="basename: IMG_0001.txt (kohya, taggui; the default) | full: IMG_0001.JPG.txt.",
    ),
]
CaptionFrom = Annotated[
    str | None,
    _opt(
        "--caption-from",
        help="description (the default) | tags (joined with ', ') | both (the description, "
        "then the tags).",
    ),
]
Prefix = Annotated[
    str | None,
    _opt("--prefix", help="With --format captions: put 'TEXT, ' in front (a trigger word)."),
]
OnExisting = Annotated[
    str | None,
    _opt(
        "--on-existing",
        help="skip (the default): keep a caption that exists | overwrite | append (', ' "
        "and the new text; a caption holding it already is kept).",
    ),
]
LsRootUrl = Annotated[
    str | None,
    _opt(
        "--ls-root-url",
        metavar="URL",
        help="With --format labelstudio: data.image is URL + the path relative to ROOT, "
        "percent-encoded (e.g. '/data/local-files/?d=Pictures/'), not the absolute path.",
    ),
]
MaxThumbnails = Annotated[
    int,
    typer.Option(
        "--max-thumbnails",
        help="Items shown with a thumbnail at most; the others are text rows.",
        min=0,
    ),
]
Host = Annotated[
    str, typer.Option("--host", help="Address to bind; anything but loopback needs --token.")
]
Port = Annotated[int, typer.Option("--port", help="Port (0: any free one).", min=0, max=65535)]
AllowRoot = Annotated[
    list[str] | None,
    _opt(
        "--allow-root",
        help="A folder whose trees runs may analyse (repeatable); without one, every "
        "run is refused.",
    ),
]
Token = Annotated[
    str | None,
    _opt(
        "--token",
        envvar="IMGBATCH_SERVE_TOKEN",
        help="Bearer token every /api/ request must carry (required off loopback; "
        "without one a random token is made and shown on stderr). Prefer the "
        "environment variable: a command line shows in ps.",
    ),
]
ServeGrace = Annotated[
    float,
    typer.Option(
        "--grace",
        help="Seconds in-flight items get when a run is cancelled or on SIGINT/SIGTERM.",
        min=0,
        max=3600,
    ),
]
MaxRuns = Annotated[
    int, typer.Option("--max-runs", help="Runs at once at most (a start beyond: 429).", min=1)
]
Distance = Annotated[
    int,
    typer.Option(
        "--distance",
        help="Near-duplicates: perceptual hashes within this many bits of 64 (0: the same "
        "pHash; resized, re-encoded, brightened or slightly cropped copies are within ~6).",
        min=0,
        max=32,
    ),
]
PRUNE_WAIT = _switch("--wait", "Wait for a run holding the lock.")
Settle = Annotated[
    float,
    typer.Option(
        "--settle",
        help="watch: analyse a file once its size and mtime stayed the same this long "
        "(seconds), so a file being copied is never read half-written.",
        min=0,
    ),
]
Poll = Annotated[
    bool,
    typer.Option(
        "--poll",
        help="watch: poll ROOT instead of inotify (network shares; it falls back to "
        "polling by itself when the inotify watch limit is reached).",
    ),
]
ForgetBatch = Annotated[
    str | None,
    typer.Option(
        "--forget-batch",
        metavar="JOB",
        help="Instead, forget the pending Batch API job JOB (its id or batches/ name, "
        "as `status` lists it), e.g. one whose API key is gone for good: its images "
        "are submitted again.",
    ),
]

# -- search ---------------------------------------------------------------------------

SearchQuery = Annotated[
    list[str] | None,
    typer.Argument(
        help='Words (all must match), "quoted phrases", prefix*, -excluded (put -- before '
        "a query that starts with -).",
        show_default=False,
    ),
]
SearchTag = Annotated[
    list[str] | None,
    _opt("--tag", help="Only results with this whole tag, any case (repeatable: all)."),
]
SearchColor = Annotated[
    list[str] | None,
    _opt("--color", help="Only results with this colour name (repeatable: all)."),
]
SearchAfter = Annotated[
    str | None,
    _opt("--after", metavar="DATE", help="Taken on or after DATE (YYYY-MM-DD, local time)."),
]
SearchBefore = Annotated[
    str | None, _opt("--before", metavar="DATE", help="Taken before DATE (YYYY-MM-DD).")
]
SearchLimit = Annotated[int, typer.Option("--limit", help="Hits shown at most.", min=1)]
SearchFormat = Annotated[
    str,
    typer.Option(
        "--format", help="jsonl (the export record plus score) | paths (one path per line)."
    ),
]
SearchNull = Annotated[
    bool, typer.Option("-0", "--null", help="With --format paths: NUL after each path.")
]
Semantic = Annotated[
    bool,
    typer.Option(
        "--semantic",
        help="Rank by meaning: cosine with the query's embedding (needs `imgbatch index "
        "ROOT --embeddings` first).",
    ),
]
Hybrid = Annotated[
    bool,
    typer.Option(
        "--hybrid", help="Fuse the full-text and semantic rankings (reciprocal rank fusion)."
    ),
]
Embeddings = Annotated[
    bool,
    typer.Option("--embeddings", help="Embed each stored result's text for `search --semantic`."),
]
EmbeddingModel = Annotated[
    str | None,
    _opt(
        "--embedding-model",
        metavar="M",
        help="The embedding model (default: gemini-embedding-001, text-embedding-3-small "
        "for openai, nomic-embed-text for ollama).",
    ),
]
PerRequest = Annotated[
    int, typer.Option("--per-request", help="Texts embedded per request at most.", min=1)
]


def check_export(
    format: str,
    output: str | None,
    status: str | None,
    dry_run: bool,
    **format_options: str | None,
) -> None:
    """UsageError for `export` options that do not go together; `format_options` are
    the options of one format (xmp_naming, caption_from, ls_root_url, ...), None when not
    given."""
    if status not in (None, "ok", "error"):
        raise UsageError("--status must be ok or error")
    beside = format in ("xmp", "captions")
    if beside and output is not None:
        raise UsageError(f"--format {format} writes files beside the images: no --output")
    if format in ("xmp", "captions", "hf", "labelstudio") and status == "error":
        raise UsageError(f"--format {format} exports ok results only")
    if dry_run and not beside:
        raise UsageError("--dry-run: these previews go with --format xmp or captions")
    owners = {"xmp_naming": "xmp", "ls_root_url": "labelstudio"}  # the others: captions
    for name, value in format_options.items():
        owner = owners.get(name, "captions")
        if value is not None and format != owner:
            raise UsageError(f"--{name.replace('_', '-')} goes with --format {owner}")
