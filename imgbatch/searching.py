"""`imgbatch search`: the query language, the filters and the ranking over ROOT's index.

A query is words (AND-ed), ``"quoted phrases"``, ``prefix*`` and ``-word`` (or
``-"phrase"``) exclusions. It is parsed here into terms and the FTS5 MATCH expression is
built from them, each term quoted: FTS5's own syntax (NEAR, AND/OR/NOT, ``col:``,
parentheses, ``^``) is never passed through, so such words are searched as words. A
malformed query (an unterminated quote, nothing but exclusions, too long) is a
UsageError of one line.

Rankings are ordered lists of (doc id, score): `rank` is full text (FTS5's bm25, higher is
better), `rank_semantic` the cosine of embedded results (see embeddings.py, vectors.py),
and `fuse` their reciprocal rank fusion (k = 60) for `--hybrid`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from imgbatch import history, searchindex
from imgbatch.config import Settings, results_dir
from imgbatch.errors import UsageError
from imgbatch.records import json_line
from imgbatch.searchindex import SEP

log = logging.getLogger("imgbatch")

MAX_QUERY = 1000  # characters
MAX_TERMS = 64
DEFAULT_LIMIT = 20
RRF_K = 60  # reciprocal rank fusion's constant (`fuse`)
ALL = 1 << 62  # a limit that is none: every hit of a ranking, for fusion
#: matches bm25 scores at most (`rank`), ~1-2 us each: a query that all of 100,000 files
#: match took ~150 ms of CPU to score them all (issue 22's target: 100 ms in all)
SCORED = 5_000
#: bm25 weights of searchindex.COLUMNS: path, description, tags, objects, text, colors
WEIGHTS = (0.5, 1.0, 2.0, 1.5, 1.0, 0.5)
_WORD = re.compile(r"[^\W_]")  # what the unicode61 tokenizer keeps (letters, digits)
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Term:
    """A word or phrase of a query (searched as FTS5 tokenizes it), maybe a prefix."""

    text: str
    prefix: bool = False

    def fts(self) -> str:
        """The term as a quoted FTS5 string (a phrase when it holds several tokens)."""
        return '"' + self.text.replace('"', '""') + '"' + ("*" if self.prefix else "")


@dataclass(frozen=True)
class Query:
    """A parsed query: the terms to find (all of them) and those to exclude."""

    include: tuple[Term, ...] = ()
    exclude: tuple[Term, ...] = ()

    def match(self) -> str | None:
        """The FTS5 MATCH expression, or None for no words (filters alone)."""
        if not self.include:
            return None
        expr = "(" + " AND ".join(t.fts() for t in self.include) + ")"
        return expr + "".join(f" NOT {t.fts()}" for t in self.exclude)


def parse(text: str) -> Query:
    """Parse a query (see the module's docstring); UsageError when malformed."""
    if len(text) > MAX_QUERY:
        raise UsageError(f"the query is longer than {MAX_QUERY:,} characters")
    text = _SPACE.sub(" ", text)  # control characters (NUL included) separate words
    include: list[Term] = []
    exclude: list[Term] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == " ":
            i += 1
            continue
        negative = text[i] == "-"
        if negative:
            i += 1
            if i == n or text[i] == " ":
                continue  # a lone "-" excludes nothing
        if text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise UsageError(
                    'the query has an unterminated " (a phrase needs its closing quote)'
                )
            word, i = text[i + 1 : end], end + 1
        else:
            end = i
            while end < n and text[end] not in ' "':
                end += 1
            word, i = text[i:end], end
        prefix = False
        if i < n and text[i] == "*":  # "phrase"*
            prefix, i = True, i + 1
        if word.endswith("*"):
            prefix, word = True, word.rstrip("*")
        if not _WORD.search(word):
            continue  # punctuation only (`*`, `&&`): no token to look for
        (exclude if negative else include).append(Term(word, prefix))
    if len(include) + len(exclude) > MAX_TERMS:
        raise UsageError(f"the query has more than {MAX_TERMS} words")
    if exclude and not include:
        raise UsageError("the query only excludes (-word): give at least one word to look for")
    return Query(tuple(include), tuple(exclude))


@dataclass(frozen=True)
class Filters:
    """What a hit must also be: every tag, every colour, captured in [after, before)."""

    tags: tuple[str, ...] = ()
    colors: tuple[str, ...] = ()
    after: float | None = None
    before: float | None = None
    status: str | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """The WHERE conditions on `d` (docs) and their parameters."""
        where: list[str] = ["1"]
        args: list[Any] = []
        for column, values in (("tags", self.tags), ("colors", self.colors)):
            for value in values:
                where.append(f"instr(d.{column}, ?) > 0")
                args.append(SEP + value.casefold() + SEP)
        if self.after is not None:
            where.append("d.taken >= ?")
            args.append(self.after)
        if self.before is not None:
            where.append("d.taken < ?")
            args.append(self.before)
        if self.status is not None:
            where.append("d.status = ?")
            args.append(self.status)
        return " AND ".join(where), args


def local_date(text: str | None, flag: str) -> float | None:
    """A YYYY-MM-DD date as the POSIX time of its local midnight."""
    if text is None:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d")
    except (ValueError, TypeError):
        raise UsageError(f"{flag} takes a date YYYY-MM-DD, not {text!r}") from None
    return time.mktime(day.timetuple())


def filters(
    tags: Iterable[str] = (),
    colors: Iterable[str] = (),
    after: str | None = None,
    before: str | None = None,
    status: str | None = None,
) -> Filters:
    """Filters from the command's options; UsageError for a bad value."""
    if status not in (None, "ok", "error"):
        raise UsageError("--status must be ok or error")
    for flag, values in (("--tag", tags), ("--color", colors)):
        for value in values:
            if not isinstance(value, str) or not value.strip() or SEP in value:
                raise UsageError(f"{flag} takes a non-empty name, not {value!r}")
    return Filters(
        tuple(t.strip() for t in tags),
        tuple(c.strip() for c in colors),
        local_date(after, "--after"),
        local_date(before, "--before"),
        status,
    )


def rank(
    con: sqlite3.Connection, query: Query, where: Filters, limit: int, scored: int = SCORED
) -> list[tuple[int, float]]:
    """The full-text ranking: (doc id, score) best first, at most `limit` (ties by path).
    Without words, every doc that passes the filters, by path, with score 0.

    bm25 scores every doc it ranks (1-2 us each), so at most
    max(`scored`, `limit`) of the matches are ranked: when more match, the words are in
    so many files that they hardly tell them apart, and the newest indexed matches (the
    highest doc ids, found without scoring) are ranked, with a warning saying so."""
    condition, args = where.sql()
    match = query.match()
    if match is None:
        sql = f"SELECT d.id, 0.0 FROM docs d WHERE {condition} ORDER BY d.folder, d.name LIMIT ?"
        return [(i, s) for i, s in con.execute(sql, [*args, limit])]
    weights = ", ".join(map(str, WEIGHTS))
    matches = f"FROM fts JOIN docs d ON d.id = fts.rowid WHERE fts MATCH ? AND {condition}"
    try:
        bound = max(scored, limit)
        # the doc id past the `bound` newest matches, when more match (found without bm25)
        cut = con.execute(
            f"SELECT fts.rowid {matches} ORDER BY fts.rowid DESC LIMIT 1 OFFSET ?",
            [match, *args, bound],
        ).fetchone()
        if cut is not None:
            log.warning(
                "more than %s files match: only the %s indexed last are ranked "
                "(add words to narrow the search)",
                f"{bound:,}",
                f"{bound:,}",
            )
        newest = (cut[0] if cut is not None else -1,)
        sql = (
            f"SELECT d.id, -bm25(fts, {weights}) AS score {matches} AND fts.rowid > ?"
            " ORDER BY score DESC, d.folder, d.name LIMIT ?"
        )
        return [(i, s) for i, s in con.execute(sql, [match, *args, *newest, limit])]
    except sqlite3.OperationalError as exc:  # never expected: every term is quoted
        raise UsageError(f"cannot search for that query ({exc})") from None


def rank_semantic(
    con: sqlite3.Connection,
    vector: tuple[Any, list[float]],
    fp: str,
    where: Filters,
    results: Path | None,
    limit: int = ALL,
) -> list[tuple[int, float]]:
    """The semantic ranking: (doc id, cosine) of every embedded doc that passes the
    filters, best first (no cut-off but `limit`)."""
    import numpy as np

    from imgbatch import vectors

    model, query = vector
    condition, args = where.sql()
    folder = results or results_dir(Settings(results=os.environ.get("IMGBATCH_RESULTS", "")))
    with vectors.VectorStore(folder) as store:
        known = store.rows(model.id, fp)
        matrix = store.matrix(model.id)
        if matrix.shape[1] != len(query):
            return []  # no vectors yet (or of another length: never this model's)
        ids: list[int] = []
        rows: list[int] = []
        sql = f"SELECT d.id, json_extract(d.state, '$[0]') FROM docs d WHERE {condition}"
        for doc_id, content in con.execute(sql, args):
            row = known.get(content)
            if row is not None and row < len(matrix):  # never past what was written
                ids.append(doc_id)
                rows.append(row)
        best = vectors.top(matrix, np.asarray(rows, dtype=np.int64), vectors.unit(query)[0], limit)
    return [(ids[i], score) for i, score in best]


def fuse(rankings: Iterable[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each doc scores the sum of 1 / (k + its rank) over the
    rankings it is in (ranks from 1), best first; ties in the order first seen."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for position, (doc_id, _) in enumerate(ranking, 1):
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + position)
    return sorted(scores.items(), key=lambda item: -item[1])


def search(
    state: Path,
    words: str | Iterable[str],
    where: Filters | None = None,
    limit: int = DEFAULT_LIMIT,
    results: Path | None = None,
    mode: str = "text",
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """The stored records (of the last run's settings, as `export` gives them) that match,
    best first, each with its `score` (higher is better). Reads the checkpoint without
    the lock and writes only the index (see searchindex). `mode` "semantic" ranks the
    embedded results by cosine with the query's vector (embedded with ROOT's embedding
    model, `settings` giving its endpoint and key), "hybrid" fuses that ranking with the
    full-text one (`fuse`)."""
    text = words if isinstance(words, str) else " ".join(words)
    if mode not in ("text", "semantic", "hybrid"):
        raise UsageError(f"the search mode is text, semantic or hybrid, not {mode!r}")
    # a semantic query is meaning, not syntax: its text is embedded as it is
    query = parse(text) if mode != "semantic" else Query()
    where = where or Filters()
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"--limit must be a whole number of at least 1, not {limit!r}")
    if mode != "text" and not text.strip():
        raise UsageError(f"--{mode} needs words to look for")
    if query.match() is None and where == Filters() and mode == "text":
        raise UsageError("give words to look for, or a filter (--tag, --color, --after, ...)")
    vector: tuple[Any, list[float]] | None = None
    if mode != "text":
        from imgbatch import embeddings

        vector = embeddings.query_vector(state, settings or Settings(), text)
    # state an earlier imgbatch wrote is read as it is (the index is then built in memory)
    with (
        history.open_checkpoint(state, legacy_ok=True) as cp,
        history.open_results(results, legacy_ok=True) as store,
    ):
        cp.results = store
        run, root = searchindex.last_run(cp), cp.root()
        if run is None or root is None:
            raise UsageError(f"nothing was analysed into {state} yet: run `imgbatch analyze`")
        with searchindex.open_index(state, cp, run["fingerprint"]) as con:
            if vector is None:
                hits = rank(con, query, where, limit)
            else:
                # hybrid fuses whole rankings; semantic alone needs only its best `limit`
                k = limit if mode == "semantic" else ALL
                close = rank_semantic(con, vector, run["fingerprint"], where, results, k)
                hits = close if mode == "semantic" else fuse([rank(con, query, where, ALL), close])
                hits = hits[:limit]
            # the hits' rows in a query per 500 (not one per hit); ids are the index's ints
            rows: dict[int, tuple[Any, ...]] = {}
            for i in range(0, len(hits), 500):
                ids = ",".join(str(int(doc_id)) for doc_id, _ in hits[i : i + 500])
                sql = f"SELECT id, folder, name, state FROM docs WHERE id IN ({ids})"
                rows.update((row[0], row[1:]) for row in con.execute(sql))
            out = []
            for doc_id, score in hits:
                folder, name, raw = rows[doc_id]
                rel_dir, name_ = os.fsdecode(bytes(folder)), os.fsdecode(bytes(name))
                rec = history.record(cp, root, run, rel_dir, name_, tuple(json.loads(raw)))
                rec["score"] = round(score, 6)
                out.append(rec)
            return out


def output_line(hit: dict[str, Any], fmt: str = "jsonl", null: bool = False) -> bytes:
    """A hit as `search` prints it: its JSON line, or (``paths``) its path's own bytes
    ended by a newline or (`null`) a NUL, as `find -print0`."""
    if fmt == "jsonl":
        return json_line(hit)
    raw = hit.get("path_bytes_b64")
    path = base64.b64decode(raw) if isinstance(raw, str) else str(hit["path"]).encode()
    return path + (b"\0" if null else b"\n")
