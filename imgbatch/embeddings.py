"""`imgbatch index ROOT --embeddings`: the vectors of semantic search, and the query's.

Each stored result of ROOT's last run (its settings fingerprint, as `export` and
`search` read) is embedded from its text (`text_of`: description, tags, objects,
legible text) through the provider's embedding endpoint, several texts per request,
each request paced by the rate limiter and retried as `analyze` retries (a 429's delay
pauses the limiter). The vectors are stored in the results store (vectors.py) by
(embedding model, result fingerprint, content hash) as each request is answered, so an
interrupted `index` resumes where it stopped and copies or other roots with the same
results cost nothing. The embedding model is remembered in ROOT's state folder
(``search/semantic.json``): `search --semantic` embeds its query with it, and only
its vectors are ranked.

An embedding model's id holds the provider, the model's name, the dimensions asked for
and the endpoint's identity (as a result's fingerprint does): another model, or the same
name on another server, gets vectors of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgbatch import history, searchindex, statedb
from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings
from imgbatch.errors import CheckpointError, ErrorCode, FatalError, ItemError, UsageError
from imgbatch.providers import base
from imgbatch.vectors import VectorStore

log = logging.getLogger("imgbatch")

PROVIDERS = ("gemini", "openai", "ollama")
#: the embedding model of each provider when --embedding-model is not given
DEFAULT_MODELS = {
    "gemini": "gemini-embedding-001",
    "openai": "text-embedding-3-small",
    "ollama": "nomic-embed-text",
}
#: texts per request at most (Gemini's batchEmbedContents takes 100)
PER_REQUEST = 100
MAX_TEXT = 8000  # characters of a result's text embedded (models cut longer input anyway)
SEMANTIC = "semantic.json"  # in the state folder's search/ (searchindex.INDEX_DIR)
INDEX_HINT = "imgbatch index ROOT --embeddings"


def text_of(result: Any) -> str:
    """What is embedded of a stored result: its description, tags, objects and legible
    text, one per line ('' when it has none)."""
    if not isinstance(result, dict):
        return ""
    doc = searchindex.document(result)
    parts = [doc["description"], ", ".join(doc["tags"]), ", ".join(doc["objects"]), doc["text"]]
    return "\n".join(p.strip() for p in parts if p.strip())[:MAX_TEXT]


@dataclass(frozen=True)
class Model:
    """An embedding model as `index` used it: what `search --semantic` asks again."""

    provider: str
    model: str
    id: str

    def spec(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "id": self.id}


@dataclass
class Indexed:
    """What one `index` did."""

    embedded: int = 0  # results embedded now
    known: int = 0  # results whose vectors were there already (this or another root)
    empty: int = 0  # results without text (errors, or the offline analyzer's)
    failed: int = 0  # results whose requests failed (the next `index` tries again)
    requests: int = 0

    def line(self, model: Model) -> str:
        failed = f", {self.failed:,} failed (run it again)" if self.failed else ""
        return (
            f"embedded {self.embedded:,} results with {model.provider} {model.model} in "
            f"{self.requests:,} requests, {self.known:,} already embedded, "
            f"{self.empty:,} without text{failed}"
        )


class Embedder:
    """A provider's `embed`, paced by the rate limiter and retried."""

    def __init__(
        self, settings: Settings, provider: str | None, model: str | None, stop: threading.Event
    ) -> None:
        name = base.choose(provider or settings.provider, settings, os.environ)
        if name not in PROVIDERS:
            raise UsageError(
                f"embeddings come from --provider gemini, openai or ollama, not {name}"
            )
        model = model or DEFAULT_MODELS[name]
        # the provider runs with the embedding model as its model
        swapped: dict[str, Any] = {f"{name}_model": model}
        settings = dataclasses.replace(settings, **swapped)
        self.provider: Any = base.create(name, settings)
        if not callable(getattr(self.provider, "embed", None)):
            raise UsageError(f"{name} has no embeddings")
        endpoint = self.provider.fingerprint().get("endpoint")
        ident = base.fingerprint_id({"provider": name, "model": model, "endpoint": endpoint})
        self.model = Model(name, model, ident)
        from imgbatch.ratelimit import AdaptiveLimiter

        self.attempts = max(1, settings.max_attempts)
        self.stop = stop
        self.limiter = AdaptiveLimiter(getattr(self.provider, "rpm", settings.rpm), stop=stop)
        self.requests = 0

    def __call__(self, texts: list[str]) -> list[list[float]]:
        """The vectors of `texts`; ItemError once its attempts are spent."""
        failed, failovers = 0, 0
        while True:
            self.limiter.acquire()
            self.requests += 1
            try:
                vectors: list[list[float]] = self.provider.embed(texts)
            except base.Failover as exc:
                failovers += 1  # another endpoint or key at once, a bounded number of times
                if failovers > 4 * self.attempts:
                    raise ItemError(exc.code, exc.message) from None
                continue
            except ItemError as exc:
                failed += 1
                if exc.code is ErrorCode.RATE_LIMIT:
                    self.limiter.rate_limited_for(exc.retry_after)  # pauses the next acquire
                if not exc.retryable or failed >= self.attempts:
                    raise
                if exc.code is not ErrorCode.RATE_LIMIT or exc.retry_after is None:
                    self.stop.wait(min(30.0, 0.5 * 2 ** (failed - 1)))
                continue
            self.limiter.accepted()
            return vectors

    def close(self) -> None:
        self.provider.close()


def _semantic_path(state: Path) -> Path:
    return state / searchindex.INDEX_DIR / SEMANTIC


def remember(state: Path, model: Model) -> None:
    """Make `model` ROOT's embedding model (written whole, private, in one rename)."""
    folder = state / searchindex.INDEX_DIR
    statedb.private_dir(folder)
    tmp = folder / f".{SEMANTIC}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        with os.fdopen(statedb.open_private(tmp), "w") as f:
            f.write(json.dumps(model.spec()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _semantic_path(state))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot record the embedding model in {folder}: {exc}") from None


def remembered(state: Path) -> Model | None:
    """ROOT's embedding model (its last `index --embeddings`), or None."""
    try:
        spec = json.loads(_semantic_path(state).read_text())
        return Model(str(spec["provider"]), str(spec["model"]), str(spec["id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def index(
    state: Path,
    results: Path,
    settings: Settings,
    provider: str | None = None,
    model: str | None = None,
    per_request: int = PER_REQUEST,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Model, Indexed]:
    """Embed the stored results of ROOT's last run that the embedding model has not
    embedded yet (see the module doc). Item failures are counted, not raised; a failure
    of the run (key, quota, unknown model) raises its ImgbatchError."""
    if isinstance(per_request, bool) or not isinstance(per_request, int) or per_request < 1:
        raise UsageError(f"--per-request must be at least 1, not {per_request!r}")
    stop = stop or threading.Event()
    done = Indexed()
    with history.open_checkpoint(state) as cp, history.open_results(results) as store:
        cp.results = store
        run = searchindex.last_run(cp)
        if run is None:
            raise UsageError(f"nothing was analysed into {state} yet: run `imgbatch analyze`")
        fp = run["fingerprint"]
        embed = Embedder(settings, provider, model, stop)
        try:
            with VectorStore(results, writable=True) as vectors:
                # the results to embed, by content hash; their texts are read a request's
                # worth at a time, so memory follows the hashes, never the texts
                todo = _to_embed(cp, fp, vectors.rows(embed.model.id, fp), done)
                remember(state, embed.model)
                for i in range(0, len(todo), per_request):
                    hashes = todo[i : i + per_request]
                    try:
                        answer = embed([_text(cp, fp, h) for h in hashes])
                    except ItemError as exc:
                        done.failed += len(hashes)
                        log.warning("%s results not embedded: %s", len(hashes), exc.message)
                        continue
                    if len(answer) != len(hashes):
                        done.failed += len(hashes)
                        continue
                    done.embedded += vectors.add(
                        embed.model.id, embed.model.spec(), fp, hashes, answer
                    )
                    if progress is not None:
                        progress(done.embedded, len(todo))
                done.requests = embed.requests
                return embed.model, done
        finally:
            embed.close()


def _text(cp: Checkpoint, fp: str, content: str) -> str:
    """What is embedded of the stored result of `content`."""
    stored = cp.result(fp, content)
    return text_of(stored.get("result") if stored else None)


def _to_embed(cp: Checkpoint, fp: str, have: dict[str, int], done: Indexed) -> list[str]:
    """The content hashes of the stored results (each once) that have text and no vector
    in `have`; those with a vector are counted in `done.known`, those without text in
    `done.empty`. Texts are read one at a time and dropped (only hashes are kept)."""
    todo: list[str] = []
    seen: set[str] = set()
    for _, states in cp.iter_folders(fp):
        for content, code, *_ in states.values():
            if not content or code is not None or content in seen:
                continue
            seen.add(content)
            if content in have:  # embedded, so it had text
                done.known += 1
            elif _text(cp, fp, content):
                todo.append(content)
            else:
                done.empty += 1
    return todo


def query_vector(state: Path, settings: Settings, text: str) -> tuple[Model, list[float]]:
    """The vector of a query, from ROOT's embedding model; UsageError naming the command
    to run when ROOT has none."""
    model = remembered(state)
    if model is None:
        raise UsageError(f"no embeddings for this ROOT yet: run `{INDEX_HINT}` first")
    embed = Embedder(settings, model.provider, model.model, threading.Event())
    try:
        if embed.model.id != model.id:  # another endpoint now: its vectors are not these
            raise UsageError(
                f"the embeddings of this ROOT come from another {model.provider} endpoint: "
                f"run `{INDEX_HINT}` again"
            )
        try:
            answer = embed([text])
        except ItemError as exc:
            raise FatalError(f"cannot embed the query: {exc.message}") from None
        if len(answer) != 1:
            raise FatalError(f"cannot embed the query: {len(answer)} vectors came back, not 1")
        return model, answer[0]
    finally:
        embed.close()
