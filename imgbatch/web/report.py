"""`imgbatch report`: one self-contained HTML contact sheet of a ROOT's stored results.

The file needs no network: CSS, script and thumbnails (small JPEG data URIs made from
the files) are inside it, and its Content-Security-Policy allows nothing else (the
script only by its hash, so no injected script or event handler can run). Every file
name and every word of model text is escaped.

It is streamed: items are read from the checkpoint one at a time and written as they
come, thumbnails made a few at a time in order, and the summary, counted on the way,
comes last in the file and first on the page (CSS `order`). So memory stays flat with
100,000 items; past `max_thumbnails` items are text rows, which a browser opens fast.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imgbatch.checkpoint import Checkpoint
from imgbatch.errors import ContentChanged, ItemError, UsageError
from imgbatch.history import items, open_checkpoint, run_status
from imgbatch.results import ResultStore
from imgbatch.web import static

MAX_THUMBNAILS = 2000  # thumbnails embedded at most; later items are text rows
THUMB_SIDE = 160  # long side of a thumbnail, in pixels
THUMB_QUALITY = 70
THUMB_THREADS = 4  # Pillow releases the GIL while decoding and resizing
CHUNK = 64 * 1024  # bytes handed on at a time
TOP_TAGS = 30  # tags shown in the summary
CHART_SLOTS = 30  # bars the run history's chart has room for, at least
MAX_TAGS, KEEP_TAGS = 5000, 1000  # the tag counter is pruned to the top 1000 past 5000
_HEX = re.compile(r"#[0-9a-fA-F]{6}")  # a colour a model gave, checked before it styles


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


#: the report's script, and its hash for a Content-Security-Policy (also the dashboard's,
#: which opens reports from blob: URLs that inherit its policy)
SCRIPT = static("report.js")
SCRIPT_HASH = _csp_hash(SCRIPT)
CSP = (
    f"default-src 'none'; script-src {SCRIPT_HASH}; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)


@dataclass
class _Tally:
    """What the summary says, counted while the items stream by."""

    ok: int = 0
    failed: int = 0
    missing: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    tags: Counter[str] = field(default_factory=Counter)

    def add(self, rec: dict[str, Any]) -> None:
        if rec["status"] == "ok":
            self.ok += 1
            result = rec.get("result")
            tags = result.get("tags") if isinstance(result, dict) else None
            if isinstance(tags, list):
                self.tags.update(t for t in tags if isinstance(t, str))
                if len(self.tags) > MAX_TAGS:  # free-form tags are countless
                    self.tags = Counter(dict(self.tags.most_common(KEEP_TAGS)))
        else:
            self.failed += 1
            self.errors[(rec.get("error") or {}).get("code") or "?"] += 1
        if rec.get("exists") is False:  # None: an object, not looked up
            self.missing += 1


def thumbnail(
    rec: dict[str, Any], storage_options: tuple[str, ...] = ()
) -> tuple[str | None, tuple[int, int], str | None]:
    """(a JPEG data URI, its size, None), or (None, (0, 0), why there is none).

    The bytes decoded must still be the bytes analysed (their hash is checked on the
    way), or the picture would be shown beside another picture's tags. A bucket object
    is read with `storage_options` (KEY=VALUE pairs).
    """
    from imgbatch import imaging

    if rec.get("exists") is False:
        return None, (0, 0), "file no longer exists"
    raw = rec.get("path_bytes_b64")
    path = os.fsdecode(base64.b64decode(raw)) if raw else rec["path"]
    try:
        prep = imaging.prepare(path, THUMB_SIDE, rec.get("hash"), storage_options)
    except ContentChanged:
        return None, (0, 0), "changed since it was analysed"
    except ItemError as exc:
        return None, (0, 0), exc.message
    data, mime = imaging.encode_for_upload(prep, "JPEG", THUMB_QUALITY)
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return uri, prep.image.size, None


class Report:
    """The report of one state folder, for the last run's settings.

    Args:
        state: the state folder of ROOT.
        results: the shared results store's folder.
        max_thumbnails: items shown as cards with a thumbnail; the rest are text rows.
        storage_options: KEY=VALUE pairs reading a bucket ROOT's objects.
    """

    def __init__(
        self,
        state: Path,
        results: Path,
        max_thumbnails: int = MAX_THUMBNAILS,
        storage_options: tuple[str, ...] = (),
    ) -> None:
        if max_thumbnails < 0:
            raise UsageError("--max-thumbnails must be at least 0")
        self.storage_options = storage_options
        self.state = state
        self.results = results
        self.max_thumbnails = max_thumbnails
        self.items = 0
        self.thumbnails = 0

    def chunks(self) -> Iterator[bytes]:
        """The HTML file, in UTF-8 chunks of about CHUNK bytes."""
        parts: list[str] = []
        size = 0
        for text in self._html():
            parts.append(text)
            size += len(text)
            if size >= CHUNK:
                yield "".join(parts).encode("utf-8", "replace")  # "replace": lone surrogates
                parts.clear()
                size = 0
        yield "".join(parts).encode("utf-8", "replace")

    def write(self, out: IO[bytes]) -> None:
        for chunk in self.chunks():
            out.write(chunk)

    # -- the document --------------------------------------------------------------

    def _html(self) -> Iterator[str]:
        with open_checkpoint(self.state) as cp, ResultStore(self.results, readonly=True) as store:
            cp.results = store
            root = cp.root() or ""
            runs = cp.runs()
            last = next((r for r in runs if r.get("fingerprint")), None)
            yield self._head(root, last)
            tally = _Tally()
            yield '<main id="items">'
            yield from self._items(cp, root, tally)
            if not self.items:
                yield (
                    f'<p class="note">No stored results for {_esc(root or self.state)} yet: '
                    "run <code>imgbatch analyze</code> first.</p>"
                )
            yield "</main>"
            yield self._summary(cp, runs, tally)
            yield f"<script>{SCRIPT}</script></body></html>\n"

    def _head(self, root: str, last: dict[str, Any] | None) -> str:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        about = (
            f"{_esc(last['provider'])} ({_esc(last['model'])}), the settings of run "
            f"{last['id']} · made {made}"
            if last
            else f"made {made}"
        )
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="{_esc(CSP)}">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>imgbatch report: {_esc(os.path.basename(root) or root)}</title>"
            f"<style>{static('report.css')}</style></head><body>"
            f'<header><h1>imgbatch report</h1><p class="root">{_esc(root)}</p>'
            f'<p class="meta">{about}</p></header>'
            '<nav class="filters"><input id="q" type="search" autocomplete="off" '
            'placeholder="Filter: name, folder, tag, description, error…" aria-label="Filter">'
            '<select id="st" aria-label="Status"><option value="">all</option>'
            '<option value="ok">ok</option><option value="error">errors</option>'
            '<option value="missing">files gone</option></select>'
            '<span id="shown"></span></nav>'
        )

    def _items(self, cp: Checkpoint, root: str, tally: _Tally) -> Iterator[str]:
        """Cards for the first `max_thumbnails` items (thumbnails made by a few threads,
        at most 2 x threads ahead, written in order), then text rows."""
        window: deque[tuple[dict[str, Any], Future[Any] | None]] = deque()
        opened = ""
        with ThreadPoolExecutor(THUMB_THREADS, thread_name_prefix="imgbatch-thumb") as pool:
            for rec in items(cp):
                card = self.items < self.max_thumbnails
                self.items += 1
                tally.add(rec)
                thumb = pool.submit(thumbnail, rec, self.storage_options) if card else None
                window.append((rec, thumb))
                while window and (len(window) > 2 * THUMB_THREADS or window[0][1] is None):
                    text, opened = self._item(root, *window.popleft(), opened)
                    yield text
            while window:
                text, opened = self._item(root, *window.popleft(), opened)
                yield text
        if opened:
            yield f"</{opened}>"

    def _item(
        self, root: str, rec: dict[str, Any], thumb: Future[Any] | None, opened: str
    ) -> tuple[str, str]:
        """One item's HTML (opening the grid or the list of rows first), and which of
        them is open now."""
        status = "ok" if rec["status"] == "ok" else "error"
        attrs = f'data-s="{status}" data-x="{0 if not rec.get("exists", True) else 1}"'
        rel = _relative(rec["path"], root)
        folder, name = os.path.split(rel)
        label = f'<span class="name" title="{_esc(rec["path"])}">{_esc(name)}</span>' + (
            f'<span class="dir">{_esc(folder)}/</span>' if folder else ""
        )
        if thumb is None:
            prefix = "" if opened == "ol" else ("</div>" if opened else "") + '<ol class="rows">'
            return f'{prefix}<li class="it row" {attrs}>{label}{_details(rec)}</li>', "ol"
        uri, (w, h), why = thumb.result()
        if uri is not None:
            self.thumbnails += 1
            picture = f'<img src="{uri}" width="{w}" height="{h}" alt="" decoding="async">'
        else:
            picture = f'<span class="none">{_esc(why)}</span>'
        prefix = "" if opened == "div" else '<div class="grid">'
        return (
            f'{prefix}<figure class="it card {status}" {attrs}><div class="thumb">{picture}'
            f"</div><figcaption>{label}{_details(rec)}</figcaption></figure>",
            "div",
        )

    def _summary(self, cp: Checkpoint, runs: list[dict[str, Any]], tally: _Tally) -> str:
        errors = (
            "<dl>"
            + "".join(f"<dt>{_esc(c)}</dt><dd>{n:,}</dd>" for c, n in tally.errors.most_common())
            + "</dl>"
            if tally.errors
            else '<p class="meta">none</p>'
        )
        tags = (
            '<ul class="tags">'
            + "".join(
                f"<li>{_esc(t)} <b>{n:,}</b></li>" for t, n in tally.tags.most_common(TOP_TAGS)
            )
            + "</ul>"
            if tally.tags
            else '<p class="meta">no tags in these results</p>'
        )
        thumbs = f"<dt>thumbnails</dt><dd>{self.thumbnails:,}</dd>"
        return (
            '<div id="summary">'
            f'<section class="counts"><h2>Items</h2><div class="big">{self.items:,}</div><dl>'
            f"<dt>ok</dt><dd>{tally.ok:,}</dd><dt>failed</dt><dd>{tally.failed:,}</dd>"
            f"<dt>files gone</dt><dd>{tally.missing:,}</dd>{thumbs}</dl></section>"
            f'<section class="errors"><h2>Errors by code</h2>{errors}</section>'
            f'<section class="toptags"><h2>Top tags</h2>{tags}</section>'
            f'<section class="history"><h2>Runs</h2>{_history(cp, runs)}</section>'
            "</div>"
        )


def _relative(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if root and path.startswith(prefix) else path


def _details(rec: dict[str, Any]) -> str:
    """An item's description and tags, or its error, or a few facts of its result."""
    parts = []
    if rec["status"] != "ok":
        err = rec.get("error") or {}
        parts.append(
            f'<p class="err"><b>{_esc(err.get("code") or "?")}</b> '
            f"{_esc(err.get('message') or '')}</p>"
        )
    result = rec.get("result")
    if isinstance(result, dict):
        desc = result.get("description")
        if isinstance(desc, str) and desc:
            parts.append(f'<p class="desc">{_esc(desc)}</p>')
        tags = result.get("tags")
        if isinstance(tags, list) and tags:
            parts.append(
                '<ul class="tags">'
                + "".join(f"<li>{_esc(t)}</li>" for t in tags[:20] if isinstance(t, str))
                + "</ul>"
            )
        facts = _facts(result)
        if facts:
            parts.append(f'<p class="facts">{facts}</p>')
    if not rec.get("exists", True):
        parts.append('<span class="missing">file gone</span>')
    return "".join(parts)


def _facts(result: dict[str, Any]) -> str:
    """A short line of a result's plain facts: size, format, colours (swatches only for
    colours that are really #rrggbb), blur, mood."""
    facts = []
    w, h = result.get("width"), result.get("height")
    if isinstance(w, int) and isinstance(h, int):
        facts.append(f"{w}×{h}")
    for key in ("format", "mood"):
        value = result.get(key)
        if isinstance(value, str) and value:
            facts.append(_esc(value))
    colors = result.get("dominant_colors")
    if isinstance(colors, list):
        swatches = "".join(
            f'<i class="sw" style="background:{c["hex"]}" '
            f'title="{_esc(c.get("name") or c["hex"])}"></i>'
            for c in colors[:5]
            if isinstance(c, dict) and isinstance(c.get("hex"), str) and _HEX.fullmatch(c["hex"])
        )
        if swatches:
            facts.append(swatches)
    if result.get("blurry") is True:
        facts.append("blurry")
    return " · ".join(facts)


def _history(cp: Checkpoint, runs: list[dict[str, Any]]) -> str:
    """The runs kept in the checkpoint as a small bar chart (ok and failed items per run,
    oldest first), and the tokens they spent."""
    if not runs:
        return '<p class="meta">no run recorded</p>'
    live = cp.locked_by_other()
    shown = [run_status(cp, r, live and i == 0) for i, r in enumerate(runs)][::-1]
    peak = max(
        (r.get("counts", {}).get("completed", 0) + r.get("counts", {}).get("failed", 0))
        for r in shown
    )
    n = len(shown)
    slots = max(n, CHART_SLOTS)  # a few runs are thin bars at the right, not wide blocks
    bars = []
    for i, r in enumerate(shown, start=slots - n):
        c = r.get("counts", {})
        ok, bad = c.get("completed", 0), c.get("failed", 0)
        h_ok = 100 * ok / peak if peak else 0
        h_bad = 100 * bad / peak if peak else 0
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
        title = f"run {r['id']} · {r['state']} · {started} · {ok:,} ok, {bad:,} failed"
        bars.append(
            f"<g><title>{_esc(title)}</title>"
            f'<rect class="ok" x="{i * 10 + 1}" y="{100 - h_ok:.2f}" width="8" '
            f'height="{h_ok:.2f}"/>'
            f'<rect class="bad" x="{i * 10 + 1}" y="{100 - h_ok - h_bad:.2f}" width="8" '
            f'height="{h_bad:.2f}"/></g>'
        )
    tokens_in = sum(r.get("tokens", {}).get("input", 0) for r in shown)
    tokens_out = sum(r.get("tokens", {}).get("output", 0) for r in shown)
    newest = shown[-1]
    return (
        f'<svg class="chart" viewBox="0 0 {slots * 10} 100" preserveAspectRatio="none" '
        f'role="img" aria-label="items per run">{"".join(bars)}</svg>'
        '<p class="legend"><i style="background:var(--ok)"></i>ok'
        '<i style="background:var(--err)"></i>failed</p>'
        f'<p class="meta">{n} run{"s" if n != 1 else ""}; the last, run {newest["id"]}: '
        f"{_esc(newest['state'])}; tokens {tokens_in:,} in / {tokens_out:,} out</p>"
    )


def write_report(
    state: Path,
    results: Path,
    output: str | None,
    out: IO[bytes],
    max_thumbnails: int = MAX_THUMBNAILS,
    storage_options: tuple[str, ...] = (),
) -> Report:
    """Write the report to `output` (atomically: a reader never sees half a file) or
    `out`; returns it, with its counts."""
    from imgbatch import exports

    report = Report(state, results, max_thumbnails, storage_options)
    if output is None:
        report.write(out)
        return report
    exports.write_output(output, report.write)
    return report
