"""`imgbatch dupes`: groups of exact copies and near-duplicates among ROOT's stored files.

The grouping (`Photo`, `near_pairs`, `groups`) is pure: functions over records, no
files. `find` feeds it the stored files of ROOT (`history.stored_items`, the last run's
settings: item states, no export records) with a perceptual hash for each content: one
this module computed before (`phashes.PhashStore`, by content hash), else the stored
offline result's (a result is read only then: reading and decoding results was most of
the time of a `dupes` whose pHashes are known), else one computed now from the file with
the offline analyzer's own function. It reads only; the one file it writes is that store
(none for state an earlier imgbatch wrote, read as it is).
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgbatch.jsontext import is_clean
from imgbatch.records import iso_utc, utf8_clean

if TYPE_CHECKING:
    from imgbatch.history import StoredItem
    from imgbatch.phashes import Answer

log = logging.getLogger("imgbatch")

#: `--distance` default: FIELD-NOTES measured near copies (resized, re-encoded,
#: brightened, 5%-cropped) within ~6 bits of 64 and unrelated photos at 20+
DEFAULT_DISTANCE = 8
#: the largest `--distance`: two unrelated 64-bit pHashes differ in ~32 bits
MAX_DISTANCE = 32
#: a bucket of more hashes than this is compared in blocks, one bucket at a time; the
#: others all at once (at most n x _CROWDED pairs per table)
_CROWDED = 64
#: rows of a bucket compared at once (bounds the memory of a big bucket's comparison)
_BLOCK = 1 << 20
#: at most this many tables (sorts of the hashes) in near_pairs
_MAX_TABLES = 64
_LAST = "\uffff"  # sorts after every ISO time: a file without one is never the oldest

_U64 = np.ndarray[Any, np.dtype[np.uint64]]
_I64 = np.ndarray[Any, np.dtype[np.int64]]


@dataclass(frozen=True, slots=True)
class Photo:
    """One stored file as `groups` sees it. `phash` is the 64-bit pHash as an int (None:
    unknown, the file can only be an exact copy); `mtime` an ISO UTC time (sortable)."""

    path: str
    hash: str
    size: int
    width: int | None = None
    height: int | None = None
    mtime: str | None = None
    phash: int | None = None
    #: the name's raw bytes, base64, when it is not UTF-8 (as records carry them)
    path_bytes_b64: str | None = None


def near_pairs(hashes: Sequence[int] | _U64, distance: int) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of `hashes` (64-bit ints) within `distance` bits.

    Multi-index hashing, not all pairs: the 64 bits are cut into bands, and two hashes
    within `distance` bits agree exactly on enough of them (pigeonhole: see _masks). For
    each table the hashes are sorted by its bits; neighbours that agree on them are
    verified with a popcount. The work is that of the pairs sharing a key, not n squared.
    """
    if not 0 <= distance <= MAX_DISTANCE:
        raise ValueError(f"distance must be 0..{MAX_DISTANCE}, got {distance}")
    ph = np.asarray(hashes, dtype=np.uint64)
    n = len(ph)
    if n < 2:
        return []
    found: list[_I64] = []
    positions = np.arange(n)
    for mask in _masks(n, distance):
        keys = ph & np.uint64(mask)
        order = np.argsort(keys)
        skeys, sph = keys[order], ph[order]
        starts = np.flatnonzero(np.r_[True, skeys[1:] != skeys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        # buckets of a few: every pair in them at once (sorted position p with each later
        # position of its bucket), no Python loop
        ends = np.repeat(np.where(sizes <= _CROWDED, starts + sizes, 0), sizes)
        counts = np.maximum(ends - positions - 1, 0)
        total = int(counts.sum())
        if total:
            left = np.repeat(positions, counts)
            right = left + 1 + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            close = np.bitwise_count(sph[left] ^ sph[right]) <= distance
            found.append(_pack(order[left[close]], order[right[close]], n))
        # crowded buckets (hashes alike in many bits): each against itself, in blocks
        for start, size in zip(starts[sizes > _CROWDED], sizes[sizes > _CROWDED], strict=True):
            members = order[start : start + size]
            rows = max(1, _BLOCK // int(size))
            for first in range(0, int(size), rows):
                block = ph[members[first : first + rows], None] ^ ph[None, members]
                i, j = np.nonzero(np.bitwise_count(block) <= distance)
                upper = i + first < j
                found.append(_pack(members[i[upper] + first], members[j[upper]], n))
    if not found:
        return []
    packed = np.unique(np.concatenate(found))
    return list(zip((packed // n).tolist(), (packed % n).tolist(), strict=True))


def _masks(n: int, distance: int) -> list[int]:
    """The bit masks of the tables: two hashes within `distance` bits agree on every bit
    of at least one mask.

    The 64 bits are cut into m >= distance + 1 bands; such a pair differs in at most
    `distance` bands, so it agrees on m - distance of them, and each choice of m -
    distance bands is a table. More bands, more tables with longer keys: m grows until a
    key has about log2(n) bits (buckets of a few hashes, not thousands), within
    _MAX_TABLES tables.
    """
    want = math.log2(max(n, 2)) - 1
    bands = distance + 1
    for m in range(distance + 1, 65):
        if math.comb(m, m - distance) > _MAX_TABLES:
            break
        bands = m
        if 64 * (m - distance) / m >= want:
            break
    bounds = [round(64 * i / bands) for i in range(bands + 1)]
    band_masks = [
        ((1 << (hi - lo)) - 1) << (64 - hi) for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    return [
        sum(band_masks[b] for b in chosen)
        for chosen in itertools.combinations(range(bands), bands - distance)
    ]


def _pack(a: Any, b: Any, n: int) -> _I64:
    """Pairs as one int64 each (smaller index first), so duplicates sort together."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    result: _I64 = np.minimum(a, b) * n + np.maximum(a, b)
    return result


def _file_key(p: Photo) -> tuple[str, str]:
    """Among copies of the same content: the oldest first, then by path."""
    return (p.mtime or _LAST, p.path)


def _rank(p: Photo) -> tuple[int, int, str, str]:
    """The keeper rule: largest resolution, then largest file, then oldest (then path)."""
    return (-(p.width or 0) * (p.height or 0), -p.size, p.mtime or _LAST, p.path)


def groups(photos: Iterable[Photo], distance: int = DEFAULT_DISTANCE) -> list[dict[str, Any]]:
    """The duplicate groups among `photos`, biggest waste first, as output records.

    Files with the same content hash are exact copies. Contents are taken best first
    by the keeper rule; each one not yet in a group becomes a keeper and takes every
    content not yet in a group within `distance` bits of it (never a neighbour's
    neighbour: no chaining), with all their copies. A file is in at most one group.
    """
    by_content: dict[str, list[Photo]] = {}
    for p in photos:
        by_content.setdefault(p.hash, []).append(p)
    contents = [sorted(files, key=_file_key) for files in by_content.values()]
    # a content's pHash and size are its copies' (the first copy that knows them)
    heads = [next((f for f in files if f.phash is not None), files[0]) for files in contents]
    ranks = [_rank(h) for h in heads]
    hashed = [c for c, h in enumerate(heads) if h.phash is not None]
    neighbours: dict[int, list[int]] = {}
    pairs = near_pairs([heads[c].phash or 0 for c in hashed], distance) if hashed else []
    for i, j in pairs:
        neighbours.setdefault(hashed[i], []).append(hashed[j])
        neighbours.setdefault(hashed[j], []).append(hashed[i])
    taken = [False] * len(contents)
    out: list[dict[str, Any]] = []
    for c in sorted(range(len(contents)), key=ranks.__getitem__):
        if taken[c]:
            continue
        taken[c] = True
        near = [m for m in neighbours.get(c, ()) if not taken[m]]
        for m in near:
            taken[m] = True
        if not near and len(contents[c]) < 2:
            continue  # alone
        keeper, keep = heads[c], contents[c][0]
        bits = {m: _distance(keeper.phash, heads[m].phash) for m in near}
        near.sort(key=lambda m: (bits[m], ranks[m]))
        members = [(f, 0, keeper) for f in contents[c]]
        members += [(f, bits[m], heads[m]) for m in near for f in contents[m]]
        out.append(
            {
                "kind": "near" if near else "exact",
                "keep": keep.path,
                "files": [_file(f, head, d) for f, d, head in members],
                "wasted_bytes": sum(f.size for f, _, _ in members) - keep.size,
            }
        )
    out.sort(key=lambda g: (-g["wasted_bytes"], g["keep"]))
    return out


def _distance(a: int | None, b: int | None) -> int:
    return ((a or 0) ^ (b or 0)).bit_count()


def _file(f: Photo, head: Photo, distance: int) -> dict[str, Any]:
    out: dict[str, Any] = {"path": f.path}
    if f.path_bytes_b64 is not None:
        out["path_bytes_b64"] = f.path_bytes_b64
    width, height = (f.width, f.height) if f.width is not None else (head.width, head.height)
    out.update(hash=f.hash, size=f.size, width=width, height=height, distance=distance)
    return out


# -- reading ROOT's stored records ---------------------------------------------------


@dataclass
class Found:
    """What `find` found: the groups (output records) and what went into them."""

    groups: list[dict[str, Any]]
    files: int = 0  #: stored files considered
    from_results: int = 0  #: pHashes read from stored offline results
    known: int = 0  #: pHashes computed by an earlier `dupes`
    computed: int = 0  #: pHashes computed now
    undecodable: int = 0  #: files that are no image Pillow decodes (exact copies only)
    skipped: dict[str, int] = field(default_factory=dict)  #: files left out, by reason
    #: stored results read for their pHash (only for contents without one from `dupes`)
    results_read: int = 0
    in_memory: bool = False  #: the computed pHashes could not be stored

    def lines(self) -> list[str]:
        """The summary for stderr."""
        exact = sum(g["kind"] == "exact" for g in self.groups)
        grouped = sum(len(g["files"]) for g in self.groups)
        wasted = sum(g["wasted_bytes"] for g in self.groups)
        lines = [
            f"{len(self.groups):,} groups ({exact:,} exact, {len(self.groups) - exact:,} near) "
            f"of {grouped:,} files among {self.files:,}; {_bytes(wasted)} in files other "
            "than the keepers",
            f"pHashes: {self.from_results:,} from stored results, {self.known:,} stored by "
            f"dupes, {self.computed:,} computed now"
            + (f", {self.undecodable:,} files not decodable" if self.undecodable else ""),
        ]
        if self.skipped:
            lines.append(
                "left out: "
                + ", ".join(f"{n:,} {why}" for why, n in sorted(self.skipped.items()))
                + (" (run `imgbatch analyze` again)" if "changed" in self.skipped else "")
            )
        return lines


def _bytes(n: int) -> str:
    """A byte count for people (decimal units)."""
    if n < 1000:
        return f"{n:,} bytes"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:,.1f} {unit}"


def _stored_phash(result: Any) -> tuple[int, int | None, int | None] | None:
    """(pHash, width, height) of a stored offline result, or None."""
    if not isinstance(result, dict):
        return None
    value = result.get("phash")
    if not isinstance(value, str) or len(value) != 16:
        return None
    try:
        ph = int(value, 16)
    except ValueError:
        return None
    w, h = result.get("width"), result.get("height")
    return ph, w if isinstance(w, int) else None, h if isinstance(h, int) else None


def find(
    state: Path,
    results: Path | None = None,
    distance: int = DEFAULT_DISTANCE,
    max_side: int = 768,
    threads: int | None = None,
    storage_options: tuple[str, ...] = (),
) -> Found:
    """The duplicate groups among ROOT's stored files (state folder `state`).

    Files gone or changed since the last run are left out (counted in `skipped`). A
    content's pHash is the one an earlier `dupes` stored, else its stored offline
    result's (a result is read only then: `results_read`), else computed now on
    `threads` threads with the offline analyzer's function at `max_side`, and stored in
    the state folder by content hash (in memory only where the folder cannot be
    written: `in_memory`). A bucket ROOT's objects are read with `storage_options`
    (KEY=VALUE pairs, as `analyze` read them).
    """
    from imgbatch import history
    from imgbatch.cpus import cores

    if not 0 <= distance <= MAX_DISTANCE:
        from imgbatch.errors import UsageError

        raise UsageError(f"--distance must be 0..{MAX_DISTANCE} bits of 64, not {distance}")
    found = Found(groups=[])
    photos: list[Photo] = []
    # content hash -> (a path to compute its pHash from, the settings' fingerprint if a
    # copy of it has an ok stored result, else None)
    contents: dict[str, tuple[str, str | None]] = {}
    # state an earlier imgbatch wrote is read as it is, and nothing is stored beside it
    with (
        history.open_checkpoint(state, legacy_ok=True) as cp,
        history.open_results(results, legacy_ok=True) as store,
    ):
        cp.results = store
        old = history.legacy_folder(cp, store)
        if old is not None:
            log.warning(
                "%s was written by an earlier imgbatch and is read as it is: the pHashes "
                "computed now are kept in memory only (one `imgbatch analyze %s` run "
                "migrates it)",
                old,
                cp.root() or "ROOT",
            )
        for item in history.stored_items(cp):
            found.files += 1
            why = _left_out(item)
            if why:
                found.skipped[why] = found.skipped.get(why, 0) + 1
                continue
            assert item.hash is not None and item.size is not None  # _left_out checked
            path, raw = item.path, None
            if not is_clean(path):  # as export records carry such a name
                path = utf8_clean(path)
                raw = base64.b64encode(os.fsencode(item.path)).decode("ascii")
            mtime = None if item.mtime_ns is None else iso_utc(item.mtime_ns)
            photos.append(Photo(path, item.hash, item.size, mtime=mtime, path_bytes_b64=raw))
            seen = contents.get(item.hash)
            if seen is None or (seen[1] is None and item.ok):
                contents[item.hash] = (item.path, item.fingerprint if item.ok else None)
        keep = old is None
        # what an earlier `dupes` stored first: those contents' results are never read
        known = _stored_phashes(state, contents, max_side) if keep else {}
        found.known = sum(1 for v in known.values() if v[0] is not None)
        from_results: set[str] = set()
        todo: dict[str, str] = {}  # content hash -> a path to compute its pHash from
        for h, (path, fp) in contents.items():
            if h in known:
                continue
            stored = None
            if fp is not None:
                found.results_read += 1
                result = cp.result(fp, h)
                stored = _stored_phash(result.get("result") if result else None)
            if stored is None:
                todo[h] = path
                continue
            known[h] = stored
            from_results.add(h)
    found.from_results = sum(1 for p in photos if p.hash in from_results)
    if todo:
        known.update(
            _phashes(state, todo, max_side, threads or cores(), found, keep, storage_options)
        )
    found.undecodable = sum(1 for v in known.values() if v[0] is None)
    photos = [_with(p, known.get(p.hash)) for p in photos]
    found.groups = groups(photos, distance)
    return found


def _stored_phashes(state: Path, contents: Iterable[str], max_side: int) -> dict[str, Answer]:
    """The answers an earlier `dupes` stored for these contents ({} if it stored none:
    no store is created only to be read)."""
    from imgbatch.phashes import NAME, PhashStore

    if not (state / NAME).exists():
        return {}
    with PhashStore(state, max_side) as phs:
        return phs.get_many(contents)


def _phashes(
    state: Path,
    todo: dict[str, str],
    max_side: int,
    threads: int,
    found: Found,
    keep: bool,
    storage_options: tuple[str, ...] = (),
) -> dict[str, Answer]:
    """The pHashes of `todo` (content hash: a path, none stored), computed now (and
    stored unless not `keep`: no store is opened then, nothing written)."""
    from imgbatch.phashes import PhashStore, compute

    known: dict[str, Answer] = {}
    with PhashStore(state, max_side) if keep else nullcontext(None) as phs:
        missing = list(todo.items())
        found.in_memory = bool(missing) and not keep
        if missing and phs is not None and not phs.writable:
            found.in_memory = True
            log.warning(
                "%s cannot be written: the %s pHashes computed now are kept in memory only",
                state,
                f"{len(missing):,}",
            )
        # Pillow decodes and resizes without the GIL: threads keep every core busy
        with ThreadPoolExecutor(max_workers=threads) as pool:
            answers = pool.map(
                lambda item: compute(item[1], item[0], max_side, storage_options), missing
            )
            done: list[tuple[str, int | None, int | None, int | None]] = []
            for (h, _), answer in zip(missing, answers, strict=True):
                if answer is None:  # unreadable now (changed, I/O): not stored
                    continue
                known[h] = answer
                done.append((h, *answer))
                found.computed += answer[0] is not None
                if len(done) >= 500 and phs is not None:
                    phs.put_many(done)
                    done = []
            if phs is not None:
                phs.put_many(done)
    return known


def _left_out(item: StoredItem) -> str | None:
    """Why a stored item takes no part (None: it does): gone, changed, never hashed. One
    stat per file (export's `exists` would be a second)."""
    if not item.hash or item.size is None:
        return "without a content hash"
    if not item.local:  # a URL or object (export cannot look): as recorded
        return None
    try:
        st = os.stat(item.path)
    except OSError:  # a dangling link as well: export's `exists`, then no stat
        return "gone"
    if st.st_size != item.size or (
        st.st_mtime_ns != item.mtime_ns
        # as recorded to the microsecond, as export's `mtime`
        and (item.mtime_ns is None or iso_utc(st.st_mtime_ns) != iso_utc(item.mtime_ns))
    ):
        return "changed"
    return None


def _with(p: Photo, answer: Answer | None) -> Photo:
    if p.phash is not None or answer is None:
        return p
    ph, w, h = answer
    return Photo(p.path, p.hash, p.size, w, h, p.mtime, ph, p.path_bytes_b64)
