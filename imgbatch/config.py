"""Settings and their loading, in one place: defaults < config file < IMGBATCH_* env < flags.

Every setting is a field of `Settings`; its metadata names the config-file section.
The key in the file is the field name without the section prefix (`gemini_model` is
`[gemini] model`); the environment variable is `IMGBATCH_` + the field name in upper
case (`IMGBATCH_GEMINI_MODEL`, `IMGBATCH_BATCH_SIZE`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from imgbatch.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


OPENAI_URL = "https://api.openai.com/v1"
#: Anthropic's API root as its SDK takes it (no /v1)
ANTHROPIC_URL = "https://api.anthropic.com"


def _s(default: Any, section: str, help: str, secret: bool = False) -> Any:
    metadata = {"section": section, "help": help, "secret": secret}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every setting of imgbatch with its default; see the top-level config.toml."""

    # [scan]
    batch_size: int = _s(100, "scan", "files per batch handed to the pipeline")
    all_files: bool = _s(False, "scan", "list every file, not only image extensions")
    include_hidden: bool = _s(False, "scan", "descend into hidden files and folders")
    follow_symlinks: bool = _s(False, "scan", "follow symlinks (each folder visited once)")
    exclude: tuple[str, ...] = _s(
        (),
        "scan",
        "glob patterns to leave out (repeatable): with '/', against the path relative to "
        "ROOT; without, against any basename",
    )
    hash: bool = _s(True, "scan", "hash file contents (xxh3-128)")
    hash_threads: int = _s(2, "scan", "threads hashing large files")
    hash_procs: int = _s(0, "scan", "processes hashing small files (scan); 0 = one per core")
    hash_cache: bool = _s(True, "scan", "reuse hashes of unchanged files")
    # [analyze]
    provider: str = _s(
        "auto",
        "analyze",
        "auto | local | gemini | openai | ollama | anthropic; auto picks gemini only when a "
        "key is configured for imgbatch, and never openai, ollama or anthropic",
    )
    workers: int = _s(4, "analyze", "threads analysing images (dask: local worker processes)")
    executor: str = _s(
        "local", "analyze", "local (threads) | dask (a Dask cluster; pip install 'imgbatch[dask]')"
    )
    dask_scheduler: str = _s(
        "", "analyze", "address of a Dask scheduler to join; '' = a LocalCluster here"
    )
    in_flight: int = _s(0, "analyze", "items held in flight at most; 0 = 2 x workers")
    analyze_procs: int = _s(
        0, "analyze", "processes running the offline analyzer of a big run; 0 = one per core"
    )
    max_side: int = _s(768, "analyze", "long side of the decoded image, in pixels")
    max_attempts: int = _s(4, "analyze", "attempts per item for transient errors")
    retry_delay: float = _s(1.0, "analyze", "first backoff delay in seconds, doubled each retry")
    grace: float = _s(10.0, "analyze", "seconds in-flight items get after SIGINT/SIGTERM")
    upload_format: str = _s("jpeg", "analyze", "upload encoding for remote providers: jpeg | webp")
    upload_quality: int = _s(85, "analyze", "upload encoding quality, 1-100")
    # [local]: the offline analyzer
    local_ocr: bool = _s(
        False,
        "local",
        "read legible text offline (offline analyzer only; pip install 'imgbatch[ocr]')",
    )
    # [rate]
    rpm: float = _s(60.0, "rate", "requests per minute at most, all threads; 0 = no limit")
    tpm: float = _s(0.0, "rate", "input tokens per minute at most; 0 = no limit")
    max_wait: float = _s(600.0, "rate", "seconds one item may spend waiting out rate limits")
    # [gemini]
    gemini_api_keys: tuple[str, ...] = _s((), "gemini", "API keys (several: failover)", secret=True)
    gemini_model: str = _s("gemini-2.5-flash-lite", "gemini", "model name")
    gemini_base_url: str = _s("", "gemini", "API endpoint; '' = Google's")
    gemini_prompt: str = _s("", "gemini", "prompt; '' = the built-in one")
    gemini_prompt_file: str = _s("", "gemini", "file holding the prompt")
    gemini_schema: str = _s("", "gemini", "JSON Schema file replacing the built-in schema")
    gemini_temperature: float = _s(0.2, "gemini", "sampling temperature")
    gemini_max_output_tokens: int = _s(1024, "gemini", "cap on answer tokens")
    gemini_media_resolution: str = _s("", "gemini", "low | medium | high; '' = model default")
    gemini_timeout: float = _s(60.0, "gemini", "seconds per request")
    # [openai]: any server speaking OpenAI's chat completions (vLLM, llama.cpp, LM Studio)
    openai_base_url: tuple[str, ...] = _s(
        (OPENAI_URL,), "openai", "endpoint URL(s), each ending in /v1; several share the work"
    )
    openai_api_key: str = _s(
        "", "openai", "API key ('' = OPENAI_API_KEY for OpenAI's own URL)", secret=True
    )
    openai_model: str = _s("gpt-4.1-mini", "openai", "model name")
    openai_prompt: str = _s("", "openai", "prompt; '' = the built-in one")
    openai_prompt_file: str = _s("", "openai", "file holding the prompt")
    openai_schema: str = _s("", "openai", "JSON Schema file replacing the built-in schema")
    openai_temperature: float = _s(0.2, "openai", "sampling temperature")
    openai_max_output_tokens: int = _s(1024, "openai", "cap on answer tokens")
    openai_detail: str = _s("", "openai", "image detail: low | high | auto; '' = not sent")
    openai_timeout: float = _s(60.0, "openai", "seconds per request")
    # [ollama]: the same provider, for a local Ollama server: no key, unthrottled
    ollama_base_url: tuple[str, ...] = _s(
        (), "ollama", "endpoint URL(s); none = from OLLAMA_HOST, else http://127.0.0.1:11434/v1"
    )
    ollama_model: str = _s("", "ollama", "model name (required: e.g. gemma3)")
    ollama_rpm: float = _s(0.0, "ollama", "requests per minute at most; 0 = no limit (--rpm wins)")
    ollama_prompt: str = _s("", "ollama", "prompt; '' = the built-in one")
    ollama_prompt_file: str = _s("", "ollama", "file holding the prompt")
    ollama_schema: str = _s("", "ollama", "JSON Schema file replacing the built-in schema")
    ollama_temperature: float = _s(0.2, "ollama", "sampling temperature")
    ollama_max_output_tokens: int = _s(1024, "ollama", "cap on answer tokens")
    ollama_detail: str = _s("", "ollama", "image detail: low | high | auto; '' = not sent")
    ollama_timeout: float = _s(300.0, "ollama", "seconds per request (a model may load first)")
    # [anthropic]: Claude through Anthropic's Messages API
    anthropic_base_url: str = _s(
        ANTHROPIC_URL, "anthropic", "API root as the SDK takes it (no /v1)"
    )
    anthropic_api_key: str = _s(
        "", "anthropic", "API key ('' = ANTHROPIC_API_KEY for Anthropic's own URL)", secret=True
    )
    anthropic_model: str = _s("claude-haiku-4-5", "anthropic", "model name")
    anthropic_prompt: str = _s("", "anthropic", "prompt; '' = the built-in one")
    anthropic_prompt_file: str = _s("", "anthropic", "file holding the prompt")
    anthropic_schema: str = _s("", "anthropic", "JSON Schema file replacing the built-in schema")
    anthropic_temperature: float = _s(
        0.2, "anthropic", "sampling temperature (ignored, with a warning, where the API takes none)"
    )
    anthropic_max_output_tokens: int = _s(1024, "anthropic", "cap on answer tokens")
    anthropic_timeout: float = _s(60.0, "anthropic", "seconds per request")
    # [batch]: analyze --batch, the Batch APIs (gemini, openai, anthropic)
    batch_max_requests: int = _s(10_000, "batch", "requests per batch job at most")
    batch_max_pending: int = _s(
        50_000, "batch", "requests in jobs not yet collected at most (a run submits up to it)"
    )
    batch_poll: float = _s(
        30.0, "batch", "first seconds between polls with --batch-wait; backs off to 10x"
    )
    # [download]: the http(s) URLs of a list (--from-list)
    download_timeout: float = _s(
        30.0, "download", "seconds per attempt at a URL of a list (--from-list), body included"
    )
    max_download_size: int = _s(
        50 * 1024 * 1024, "download", "bytes a URL's body may have at most (--from-list)"
    )
    # [state]
    checkpoint: str = _s("", "state", "state folder; '' = per root under the cache dir")
    results: str = _s(
        "", "state", "shared results store (all roots); '' = imgbatch/results under the cache dir"
    )
    # [storage]: bucket roots (s3://, gs://); each KEY = VALUE of the section is a pair
    storage_option: tuple[str, ...] = _s(
        (),
        "storage",
        "KEY=VALUE passed to the bucket's fsspec filesystem (repeatable): endpoint_url, "
        "key, secret, token, ...",
        secret=True,  # may hold credentials: masked in a repr; see key_free
    )
    # [prices."MODEL"]: input = ..., output = ... (each model a table of its own)
    prices: tuple[str, ...] = _s(
        (),
        "prices",
        "MODEL=INPUT/OUTPUT: a model's dollars per million input and output tokens, over "
        "the built-in table (prices.py); 0 allowed",
    )
    # [output]
    log_every: float = _s(30.0, "output", "seconds between progress lines off a terminal")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def key_free(self) -> Settings:
        """These settings without any secret: what may travel to another process or
        machine (a Dask worker)."""
        blank: dict[str, Any] = {
            f.name: type(getattr(self, f.name))()
            for f in dataclasses.fields(self)
            if f.metadata.get("secret")
        }
        # the storage options that are no credential (endpoint_url, region, ...) travel
        from imgbatch.objectstore import shareable

        blank["storage_option"] = shareable(self.storage_option)
        return dataclasses.replace(self, **blank)

    def __repr__(self) -> str:
        """Every setting, secrets masked: a repr ends up in logs, tracebacks and reports."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = ("***",) * len(value) if isinstance(value, tuple) else "***"
            elif f.name.endswith("base_url"):  # a path or query may carry a credential
                value = (
                    tuple(map(_url_origin, value))
                    if isinstance(value, tuple)
                    else (_url_origin(value))
                )
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def _url_origin(url: str) -> str:
    """A base URL as a repr shows it: scheme, host and port, with "/..." for the rest."""
    if not url:
        return url
    parts = urlsplit(url)
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return (
        f"{parts.scheme}://{parts.hostname or ''}"
        + (f":{parts.port}" if _port(parts) else "")
        + rest
    )


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


SECTIONS = (
    "scan",
    "analyze",
    "local",
    "rate",
    "gemini",
    "openai",
    "ollama",
    "anthropic",
    "batch",
    "download",
    "state",
    "storage",
    "output",
    "prices",
)
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def file_key(name: str) -> tuple[str, str]:
    """(section, key) under which the setting `name` appears in config.toml."""
    section = _FIELDS[name].metadata["section"]
    prefix = section + "_"
    return section, name[len(prefix) :] if name.startswith(prefix) else name


def env_var(name: str) -> str:
    """The environment variable that sets `name`."""
    return "IMGBATCH_" + name.upper()


_BY_FILE_KEY = {file_key(name): name for name in _FIELDS}

PROVIDERS = ("gemini", "openai", "ollama", "anthropic")  # the providers with settings of their own


def provider_settings(name: str) -> list[str]:
    """The settings an option of whichever provider runs sets (`model`: gemini_model,
    openai_model, ollama_model); [] for a setting's own name or anything else."""
    if name in _FIELDS:
        return []
    return [f"{p}_{name}" for p in PROVIDERS if f"{p}_{name}" in _FIELDS]


def every_provider(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with each provider option (`model`, `base_url`, ...) given as the setting
    of every provider that has it (only the one that runs reads its own); other names
    as they are. Shared by `analyze`'s flags and `serve`'s run options."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        out.update(dict.fromkeys(provider_settings(name) or [name], value))
    return out


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Check and convert `value` to the type of setting `name`."""
    default = _FIELDS[name].default
    from_text = isinstance(value, str)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if from_text and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if from_text and value.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true or false")
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            return float(value)
        if isinstance(default, tuple):
            if from_text:
                return tuple(p.strip() for p in value.split(",") if p.strip())
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if not from_text:
            raise ValueError("expected a string")
        return value
    except ValueError as exc:
        raise ConfigError(f"{origin}: invalid value for {name}: {exc}") from None


def config_path(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: `--config`, else the user's one if it exists (never the cwd)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = Path(base) / "imgbatch" / "config.toml"
    return path if path.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file, by field name; unknown keys are an error with a hint."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    valid = [f"{s}.{k}" for s, k in _BY_FILE_KEY]
    out: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(_unknown(path, section, valid + list(SECTIONS)))
        if section == "storage":  # any fsspec keyword: `endpoint_url = "..."`
            out["storage_option"] = _storage_pairs(path, table)
            continue
        if section == "prices":  # [prices."MODEL"] input = ..., output = ...
            out["prices"] = _price_entries(path, table)
            continue
        for key, value in table.items():
            name = _BY_FILE_KEY.get((section, key))
            if name is None:
                raise ConfigError(_unknown(path, f"{section}.{key}", valid))
            out[name] = _coerce(name, value, f"{path} [{section}] {key}")
    return out


def _storage_pairs(path: Path, table: dict[str, Any]) -> tuple[str, ...]:
    """The [storage] section as KEY=VALUE pairs (strings, numbers, booleans)."""
    pairs = []
    for key, value in table.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path} [storage] {key}: expected a string, number or boolean")
        pairs.append(f"{key}={value}")
    return tuple(pairs)


def _price_entries(path: Path, table: dict[str, Any]) -> tuple[str, ...]:
    """The [prices] tables as MODEL=INPUT/OUTPUT entries (the form of IMGBATCH_PRICES)."""
    entries = []
    for model, price in table.items():
        where = f"{path} [prices.{model!r}]"
        if not isinstance(price, dict) or set(price) != {"input", "output"}:
            raise ConfigError(f"{where}: expected input = DOLLARS and output = DOLLARS")
        for key, value in price.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where} {key}: expected dollars per million tokens, >= 0")
        entries.append(f"{model}={float(price['input'])!r}/{float(price['output'])!r}")
    return tuple(entries)


def price_overrides(entries: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """The `prices` setting as model -> (input, output) dollars per million tokens."""
    out: dict[str, tuple[float, float]] = {}
    for entry in entries:
        model, _, price = entry.rpartition("=")
        parts = price.split("/")
        try:
            numbers = tuple(float(p) for p in parts)
        except ValueError:
            numbers = ()
        if not (model and len(numbers) == 2 and all(0 <= n < math.inf for n in numbers)):
            raise ConfigError(
                f"prices: {entry!r} is not MODEL=INPUT/OUTPUT (dollars per million tokens, >= 0)"
            )
        out[model] = (numbers[0], numbers[1])
    return out


def _unknown(path: Path, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{path}: unknown setting {key!r}{hint}"


def load_settings(
    config: str | os.PathLike[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings with the precedence defaults < config file < environment < flags.

    `flags` holds only the options given on the command line (None means not given).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path(config or env.get("IMGBATCH_CONFIG"), env)
    if path is not None:
        values.update(read_config_file(path))
    file_storage: tuple[str, ...] = values.get("storage_option", ())
    for name in _FIELDS:
        raw = env.get(env_var(name))
        if raw is not None:
            values[name] = _coerce(name, raw, f"environment {env_var(name)}")
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, f"option --{name.replace('_', '-')}")
            if name == "storage_option":  # flags add to the file's pairs (later ones win)
                values[name] = (*file_storage, *values[name])
    if values.get("provider") == "ollama" and (flags or {}).get("rpm") is None:
        # a local server is limited by --workers, not by a quota: [rate] rpm is for paid
        # APIs; [ollama] rpm (default 0, no limit) applies unless --rpm is given
        values["rpm"] = values.get("ollama_rpm", _FIELDS["ollama_rpm"].default)
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if s.batch_size < 1:
        raise ConfigError("batch_size must be at least 1")
    if s.hash_threads < 1:
        raise ConfigError("hash_threads must be at least 1")
    if s.analyze_procs < 0:
        raise ConfigError("analyze_procs must be at least 0 (0 = one per core)")
    if s.hash_procs < 0:
        raise ConfigError("hash_procs must be at least 0 (0 = one per core)")
    if s.executor not in ("local", "dask"):
        raise ConfigError(f"executor must be local or dask, not {s.executor!r}")
    if s.workers < 1 or s.max_attempts < 1 or s.in_flight < 0:
        raise ConfigError("workers and max_attempts must be at least 1, in_flight at least 0")
    if s.max_side < 16:
        raise ConfigError("max_side must be at least 16 pixels")
    if s.upload_format not in ("jpeg", "webp") or not 1 <= s.upload_quality <= 100:
        raise ConfigError("upload_format must be jpeg or webp, upload_quality 1-100")
    if s.rpm < 0 or s.ollama_rpm < 0 or s.tpm < 0 or s.max_wait < 0:
        raise ConfigError("rpm, tpm and max_wait must be at least 0")
    if s.gemini_media_resolution not in ("", "low", "medium", "high"):
        raise ConfigError("gemini media_resolution must be low, medium or high")
    if min(s.gemini_timeout, s.openai_timeout, s.ollama_timeout, s.anthropic_timeout) <= 0:
        raise ConfigError("timeout must be positive")
    for section in ("openai", "ollama"):
        if getattr(s, f"{section}_detail") not in ("", "low", "high", "auto"):
            raise ConfigError(f"{section} detail must be low, high or auto")
    if s.log_every <= 0:
        raise ConfigError("log_every must be positive")
    price_overrides(s.prices)
    if s.download_timeout <= 0 or s.max_download_size < 1:
        raise ConfigError("download timeout must be positive, max_download_size at least 1 byte")
    if s.batch_max_requests < 1 or s.batch_max_pending < 1 or s.batch_poll <= 0:
        raise ConfigError("batch max_requests and max_pending must be at least 1, poll positive")


def gemini_keys(settings: Settings, env: Mapping[str, str], explicit: bool) -> list[str]:
    """The Gemini keys configured for imgbatch, in order (`gemini_api_keys` already holds
    IMGBATCH_GEMINI_API_KEYS); the generic GOOGLE_API_KEY only when gemini was asked for
    by name, since a key that happens to be set must not send pictures to a paid API."""
    keys = list(settings.gemini_api_keys)
    for name in ("GEMINI_API_KEY",) + (("GOOGLE_API_KEY",) if explicit else ()):
        value = env.get(name, "").strip()
        if value:
            keys.append(value)
    return list(dict.fromkeys(k for k in keys if k))  # de-duplicated, order kept


def state_dir(root: str, settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """Where the state (hash cache, checkpoint) of ROOT lives.

    `checkpoint` when set, else `$XDG_CACHE_HOME/imgbatch/<name>-<hash of the path>`.
    """
    if settings.checkpoint:
        return Path(settings.checkpoint).expanduser()
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    raw = os.fsencode(root_id(root))
    digest = hashlib.sha256(raw).hexdigest()[:16]
    name = (
        re.sub(
            r"[^A-Za-z0-9._-]+", "_", os.path.basename(raw.rstrip(b"/")).decode("utf-8", "replace")
        )[:40]
        or "root"
    )
    return Path(base) / "imgbatch" / f"{name}-{digest}"


def root_id(root: str) -> str:
    """ROOT as its state folder knows it: a folder's absolute path, or a bucket URL
    (`s3://bucket/prefix/`, the prefix ending in "/")."""
    from imgbatch import objectstore

    return objectstore.normalize(root) if objectstore.is_url(root) else os.path.abspath(root)


def _cache_base(env: Mapping[str, str]) -> Path:
    return Path(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def results_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """Where the results store shared by every ROOT lives: `results` when set (env
    IMGBATCH_RESULTS), else `$XDG_CACHE_HOME/imgbatch/results`."""
    if settings.results:
        return Path(settings.results).expanduser()
    return _cache_base(os.environ if env is None else env) / "imgbatch" / "results"
