"""The export formats: JSONL and CSV streams, Parquet files, XMP sidecars beside the images.

Every writer takes the stream of export records (the `analyze` record shape, read from
the checkpoint by history.py) and holds at most one Parquet row group or one sidecar in
memory. pyarrow and pyexiv2 are optional extras, imported only when their format is
asked for; a missing one is a usage error naming the pip command. What every writer
beside the images shares (the open folders, stems, "still as analysed") is here too, for
captions.py; the training-set manifests are in datasets.py.
"""

from __future__ import annotations

import base64
import csv
import errno
import importlib
import io
import json
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

from imgbatch import beside
from imgbatch.errors import OutputError, UsageError
from imgbatch.listing import IMAGE_EXTENSIONS
from imgbatch.records import extension_of, is_clean, iso_utc, json_line, utf8_clean

T = TypeVar("T")

log = logging.getLogger("imgbatch")

Record = dict[str, Any]

# -- shared -----------------------------------------------------------------------

_EXTRAS = {"xmp": "pyexiv2", "parquet": "pyarrow"}


def require(extra: str) -> Any:
    """The module behind an optional extra, or a UsageError naming the pip command."""
    module = _EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        reason = f"{module}, which is not installed"
    except (ImportError, OSError) as exc:  # installed, but its native library cannot load
        reason = f"{module}, which cannot be loaded ({exc})"
    raise UsageError(f"--format {extra} needs {reason}: pip install 'imgbatch[{extra}]'")


@contextmanager
def replacing(
    target: Path, mode: int | None = None, owner: tuple[int, int] | None = None
) -> Iterator[IO[bytes]]:
    """A temporary file beside `target`, synced and renamed over it when the block ends
    without error, so a reader never sees half a file; otherwise removed, and `target`
    stays as it was. It gets `mode` and `owner` when given, else what a plain `open()`
    would give a new file (0666 less the umask; mkstemp's 0600 would hide it)."""
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # after chown, which may clear set-id bits
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


# -- JSONL and CSV ------------------------------------------------------------------

FILE_COLUMNS = [
    "path",
    "path_bytes_b64",
    "hash",
    "size",
    "extension",
    "mtime",
    "exists",
    "status",
    "provider",
    "model",
    "error_code",
    "error_message",
]


def write_output(output: str | os.PathLike[str], write: Callable[[IO[bytes]], T]) -> T:
    """`write(file)` into `output`, replaced atomically (`replacing`); a file replaced
    keeps its mode. A full disk or a missing folder is an OutputError naming it, and the
    old file stays as it was."""
    target = Path(output)
    try:
        mode: int | None = target.stat().st_mode & 0o777
    except OSError:
        mode = None
    try:
        with replacing(target, mode=mode) as fh:
            return write(fh)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None


def write_jsonl(records: Iterable[Record], out: IO[bytes]) -> int:
    """One JSON line per record; returns how many."""
    n = 0
    for rec in records:
        out.write(json_line(rec))
        n += 1
    return n


# A spreadsheet runs a cell starting with one of these as a formula (`=HYPERLINK(...)`
# read off a photo by the model ends up in `text`): such text gets a leading quote.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """A CSV cell: text that a spreadsheet would take for a formula starts with `'`;
    numbers stay numbers (a negative one too)."""
    value = _csv_value(value)
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "; ".join(
            v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value
        )
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if value is None:
        return ""
    return value


def write_csv(records: Iterable[Record], out: IO[bytes], result_cols: list[str]) -> int:
    """CSV with stable columns: the file fields, then `result_cols`, then the result's
    other fields as JSON text (`result_other`); returns how many rows. No text cell can
    become a formula (see `_csv_cell`)."""
    n = 0
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.writer(text)
    writer.writerow([_csv_cell(c) for c in FILE_COLUMNS + result_cols + ["result_other"]])
    for rec in records:
        result = rec.get("result") or {}
        error = rec.get("error") or {}
        row = [_csv_cell(rec.get(c)) for c in FILE_COLUMNS[:10]]
        row += [_csv_cell(error.get("code")), _csv_cell(error.get("message"))]
        row += [_csv_cell(result.get(c)) for c in result_cols]
        other = {k: v for k, v in result.items() if k not in result_cols}
        row.append(_csv_cell(other) if other else "")
        writer.writerow(row)
        n += 1
    text.detach()
    return n


# -- Parquet ------------------------------------------------------------------------

ROW_GROUP = 10_000  # rows held in memory, and written, at a time


def parquet_schema() -> Any:
    """The Parquet export's schema: the JSONL record's names, typed.

    `result` holds the fields of both built-in results (the offline analyzer's and the
    Gemini schema's); result fields outside them, or not of the expected type (a custom
    --schema), are kept as JSON text in `result_other`. Changing a type here breaks
    readers' queries: add fields, never change them.
    """
    pa = require("parquet")
    text_list = pa.list_(pa.string())
    gps = pa.struct([("lat", pa.float64()), ("lon", pa.float64()), ("alt", pa.float64())])
    exif = pa.struct(
        [
            ("datetime", pa.string()),  # ISO 8601 local time, with an offset when known
            ("make", pa.string()),
            ("model", pa.string()),
            ("orientation", pa.int64()),
            ("gps", gps),
        ]
    )
    colour = pa.struct([("hex", pa.string()), ("name", pa.string()), ("fraction", pa.float64())])
    result = pa.struct(
        [
            # the offline analyzer (providers/local_features.py)
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("format", pa.string()),
            ("mode", pa.string()),
            ("exif", exif),
            ("dominant_colors", pa.list_(colour)),
            ("brightness", pa.float64()),
            ("sharpness", pa.float64()),
            ("blurry", pa.bool_()),
            ("phash", pa.string()),
            # the AI schema (providers/gemini.py DEFAULT_SCHEMA)
            ("description", pa.string()),
            ("tags", text_list),
            ("objects", text_list),
            ("colors", text_list),
            ("mood", pa.string()),
            ("text", pa.string()),
        ]
    )
    return pa.schema(
        [
            ("path", pa.string()),
            ("path_bytes_b64", pa.string()),
            ("hash", pa.string()),
            ("size", pa.int64()),
            ("extension", pa.string()),
            ("mtime", pa.timestamp("us", tz="UTC")),
            ("exists", pa.bool_()),
            ("status", pa.string()),
            ("provider", pa.string()),
            ("model", pa.string()),
            ("input_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
            ("result", result),
            ("result_other", pa.string()),
        ]
    )


class _Misfit:
    """A value that does not have its column's type."""


_MISFIT = _Misfit()
_INT64 = range(-(2**63), 2**63)
Converter = Callable[[Any], Any]


def _to_str(v: Any) -> Any:
    if v is None or (isinstance(v, str) and is_clean(v)):
        return v
    return utf8_clean(v) if isinstance(v, str) else _MISFIT


def _to_int(v: Any) -> Any:
    ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v in _INT64)
    return v if ok else _MISFIT


def _to_float(v: Any) -> Any:
    if v is None:
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _MISFIT


def _to_bool(v: Any) -> Any:
    return v if v is None or isinstance(v, bool) else _MISFIT


def _converter(typ: Any) -> Converter:
    """A function giving a value as Arrow type `typ` takes it (strings made strict UTF-8,
    ints widened to floats), or _MISFIT. Checked here rather than by pyarrow, which
    would fail the whole row group over one odd value; built once per type."""
    pa = require("parquet")
    if pa.types.is_string(typ):
        return _to_str
    if pa.types.is_integer(typ):
        return _to_int
    if pa.types.is_floating(typ):
        return _to_float
    if pa.types.is_boolean(typ):
        return _to_bool
    if pa.types.is_list(typ):
        item = _converter(typ.value_type)

        def to_list(v: Any) -> Any:
            if v is None:
                return None
            if not isinstance(v, list):
                return _MISFIT
            out = [item(x) for x in v]
            return _MISFIT if any(x is _MISFIT for x in out) else out

        return to_list
    if pa.types.is_struct(typ):
        fields = {f.name: _converter(f.type) for f in typ}

        def to_struct(v: Any) -> Any:
            if v is None:
                return None
            if not isinstance(v, dict) or not fields.keys() >= v.keys():
                return _MISFIT
            out = {k: fields[k](x) for k, x in v.items()}
            return _MISFIT if any(x is _MISFIT for x in out.values()) else out

        return to_struct
    raise AssertionError(f"no converter for {typ}")


def _json_text(value: Any) -> str:
    return utf8_clean(json.dumps(value, ensure_ascii=False, sort_keys=True))


def _mtime(text: str | None) -> datetime | None:
    # "...Z": fromisoformat takes the Z only from Python 3.11
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc) if text else None


class _ParquetRows:
    """Export records as rows of `parquet_schema()`."""

    def __init__(self, schema: Any) -> None:
        special = ("mtime", "result", "result_other")
        self._file = {f.name: _converter(f.type) for f in schema if f.name not in special}
        self._result = {f.name: _converter(f.type) for f in schema.field("result").type}

    def row(self, rec: Record) -> Record:
        row: Record = {}
        for name, convert in self._file.items():
            value = convert(rec.get(name))
            row[name] = None if value is _MISFIT else value
        row["mtime"] = _mtime(rec.get("mtime"))
        result = rec.get("result")
        typed: Record = {}
        other: Any = None
        if isinstance(result, dict):
            extra: Record = {}
            for k, v in result.items():
                to_type = self._result.get(k)
                value = _MISFIT if to_type is None else to_type(v)
                if value is _MISFIT:
                    extra[k] = v
                else:
                    typed[k] = value
            other = extra or None
        else:
            other = result  # a custom schema's top-level array or scalar
        row["result"] = typed or None
        row["result_other"] = None if other is None else _json_text(other)
        return row


def write_parquet(records: Iterable[Record], out: IO[bytes], row_group: int = ROW_GROUP) -> int:
    """A Parquet file of `parquet_schema()`, written `row_group` rows at a time (one
    row group each); returns how many rows."""
    pa = require("parquet")
    import pyarrow.parquet as pq

    schema = parquet_schema()
    convert = _ParquetRows(schema)
    n = 0
    rows: list[Record] = []
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for rec in records:
            rows.append(convert.row(rec))
            if len(rows) >= row_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                n += len(rows)
                rows.clear()
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            n += len(rows)
    return n


# -- XMP sidecars -------------------------------------------------------------------

#: Our XMP namespace: what imgbatch wrote, so a later export replaces only that.
XMP_NS = "urn:imgbatch:xmp:1.0/"
XMP_PREFIX = "imgbatch"
_OURS = f"Xmp.{XMP_PREFIX}"
_SUBJECT = "Xmp.dc.subject"
_DESCRIPTION = "Xmp.dc.description"
_DEFAULT_LANG = 'lang="x-default"'
_EMPTY_PACKET = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"></x:xmpmeta><?xpacket end="w"?>'
)
# Errors that no other sidecar would escape: stop rather than fail every image alike.
SYSTEMIC = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10, 13))
# What may come before a packet: a byte-order mark, white space, an XML declaration
_PROLOGUE = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*\?>\s*)?")
_PACKET_STARTS = (b"<?xpacket", b"<x:xmpmeta")


def is_xmp_packet(data: bytes) -> bool:
    """Whether `data` is an XMP packet (`<?xpacket` or `<x:xmpmeta` first, after an optional
    BOM, white space and XML declaration): only such bytes are given to the XMP library."""
    prologue = _PROLOGUE.match(data)
    return data[prologue.end() if prologue else 0 :].startswith(_PACKET_STARTS)


class _NotXmp(Exception):
    """An existing sidecar that is not an XMP packet: left as it is."""


@dataclass
class SidecarSummary:
    """What an XMP export did (or, in a dry run, would do)."""

    dry_run: bool = False
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    no_keywords: int = 0  # results without tags or description (the offline analyzer's)
    shared_basename: int = 0  # --xmp-naming basename: another image has the same name
    gone: int = 0  # the image no longer exists, or changed since it was analysed
    failed: int = 0  # a sidecar that could not be read or written, or was left alone

    def line(self) -> str:
        """The summary for people."""
        head = "xmp sidecars (dry run, nothing written)" if self.dry_run else "xmp sidecars"
        parts = [
            f"{self.created:,} {'to create' if self.dry_run else 'created'}",
            f"{self.updated:,} {'to update' if self.dry_run else 'updated'}",
            f"{self.unchanged:,} unchanged",
            f"{self.no_keywords:,} results without tags or description (no sidecar)",
        ]
        if self.shared_basename:
            parts.append(f"{self.shared_basename:,} skipped: basename shared with another image")
        if self.gone:
            parts.append(f"{self.gone:,} skipped: image gone or changed since analysed")
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        return f"{head}: " + ", ".join(parts)


def _xmp_text(text: str) -> str:
    """`text` as XML can carry it: strict UTF-8, no control characters, trimmed."""
    return utf8_clean(text).translate(CONTROL).strip()


def _keywords(result: Record) -> list[str]:
    tags = result.get("tags")
    out: list[str] = []
    seen: set[str] = set()
    for tag in tags if isinstance(tags, list) else []:
        if not isinstance(tag, str):
            continue
        tag = _xmp_text(tag)
        # exiv2 reads a leading "type=" as an array type, not as text
        if tag and not tag.startswith("type=") and tag.casefold() not in seen:
            seen.add(tag.casefold())
            out.append(tag)
    return out


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def image_path(rec: Record) -> str:
    """The image's real name: `path` has U+FFFD where the name is not UTF-8."""
    raw = rec.get("path_bytes_b64")
    return os.fsdecode(base64.b64decode(raw)) if raw else str(rec["path"])


def same_file(st: os.stat_result, rec: Record) -> bool:
    """Whether the file with stat `st` is still the one `rec` analysed (size and mtime)."""
    return st.st_size == rec.get("size") and iso_utc(st.st_mtime_ns) == rec.get("mtime")


class Stems:
    """The images that share each name stem (case-insensitively, as on macOS), for the
    folders seen last: a folder's items mostly come together.

    Only image extensions count: RAW files are not among them, and `IMG_0001.xmp` beside
    `IMG_0001.CR2` + `IMG_0001.JPG` is the RAW's sidecar in Lightroom, where the JPEG's
    tags belong."""

    def __init__(self, keep: int = 8) -> None:
        self._folders: OrderedDict[str, dict[str, list[str]]] = OrderedDict()
        self._keep = keep

    def count(self, path: str) -> int:
        """How many images of `path`'s folder share its stem (itself included)."""
        return len(self.sharing(path))

    def sharing(self, path: str) -> list[str]:
        """The names of the images of `path`'s folder that share its stem, sorted."""
        folder, name = os.path.split(path)
        stems = self._folders.get(folder)
        if stems is None:
            stems = {}
            with suppress(OSError), os.scandir(folder or ".") as entries:
                for e in entries:
                    if extension_of(e.name) in IMAGE_EXTENSIONS:
                        stems.setdefault(os.path.splitext(e.name)[0].casefold(), []).append(e.name)
            for names in stems.values():
                names.sort()
            self._folders[folder] = stems
            if len(self._folders) > self._keep:
                self._folders.popitem(last=False)
        else:
            self._folders.move_to_end(folder)
        return stems.get(os.path.splitext(name)[0].casefold(), [])


class ImageFolders:
    """The image folders of the last few images, each opened once (`beside.Folder`): a
    folder's items mostly come together. Unless `dry_run`, the temporary files of an
    export killed in a folder are removed when it is first opened."""

    def __init__(self, dry_run: bool = False, keep: int = 8) -> None:
        self._open: OrderedDict[str, beside.Folder] = OrderedDict()
        self._dry_run = dry_run
        self._keep = keep

    def get(self, path: str) -> beside.Folder:
        """The folder `path`, opened (OSError if it cannot be)."""
        folder = self._open.get(path)
        if folder is not None:
            self._open.move_to_end(path)
            return folder
        folder = beside.Folder(path)
        self._open[path] = folder
        if len(self._open) > self._keep:
            self._open.popitem(last=False)[1].close()
        if not self._dry_run:
            with suppress(OSError):  # an unlistable folder: its files will say why
                if removed := folder.sweep():
                    log.info(
                        "removed %d temporary file(s) of an interrupted export in %s",
                        removed,
                        path or ".",
                    )
        return folder

    def close(self) -> None:
        """Close the folders held open."""
        while self._open:
            self._open.popitem()[1].close()


@dataclass
class _Change:
    """The new values of our fields in one sidecar, and what differs from before."""

    subject: list[str]
    ours: list[str]
    languages: dict[str, str]
    our_description: str | None
    added: list[str]
    removed: list[str]
    description_changed: bool
    fields: dict[str, str]


class SidecarWriter:
    """Writes or merges the XMP sidecar of each analysed image.

    Keywords go to dc:subject and the description to dc:description (x-default), with
    what imgbatch wrote recorded in its own namespace: a later export replaces only
    those keywords, and only a description that is still ours; everything else in an
    existing sidecar (other tools' fields, the user's keywords and captions) is kept.
    """

    def __init__(
        self, emit: Callable[[bytes], None], naming: str = "full", dry_run: bool = False
    ) -> None:
        """`emit` takes the dry run's lines (one JSON object per sidecar that would change)."""
        if naming not in ("full", "basename"):
            raise UsageError(f"--xmp-naming must be full or basename, not {naming!r}")
        self._xmp = require("xmp")
        self._xmp.set_log_level(3)  # errors raise; warnings would be bare stderr lines
        self._xmp.registerNs(XMP_NS, XMP_PREFIX)  # process-wide; registering again is fine
        self.naming = naming
        self.summary = SidecarSummary(dry_run=dry_run)
        self._emit = emit
        self._stems = Stems()
        self._root = os.geteuid() == 0  # then sidecars are given to the image's owner
        self._folders = ImageFolders(dry_run)

    def sidecar_of(self, image: str) -> str:
        """The sidecar's path: `IMG_0001.JPG.xmp` (darktable, digiKam), or `IMG_0001.xmp`
        with basename naming (Lightroom)."""
        return (os.path.splitext(image)[0] if self.naming == "basename" else image) + ".xmp"

    def write_all(self, records: Iterable[Record]) -> SidecarSummary:
        """One sidecar per ok record with tags or a description."""
        try:
            for rec in records:
                if rec.get("status") == "ok":
                    self.write(rec)
        finally:
            self.close()
        return self.summary

    def close(self) -> None:
        """Close the image folders held open."""
        self._folders.close()

    def write(self, rec: Record) -> None:
        """The sidecar of one ok record: created, merged, or left as it is."""
        s = self.summary
        result = rec.get("result")
        if not isinstance(result, dict):
            result = {}
        keywords = _keywords(result)
        description = result.get("description")
        description = _xmp_text(description) if isinstance(description, str) else ""
        # pyexiv2 passes a lang-alt as 'lang="x-default" text, lang="fr" text': a caption
        # holding ', lang="' would come back split in two (a no-break space defuses it)
        description = description.replace(', lang="', ',\u00a0lang="')
        if not keywords and not description:
            s.no_keywords += 1
            return
        image = image_path(rec)
        folder_path, name = os.path.split(image)
        try:
            # everything beside the image happens in its folder as opened here: a folder
            # path swapped for a symlink later cannot send a write elsewhere
            folder = self._folders.get(folder_path)
            st = folder.stat(name)
            same = same_file(st, rec)
        except OSError:
            same = False
        if not same:
            s.gone += 1  # describing the new content with the old analysis would be wrong
            log.debug("skipped %s: gone or changed since it was analysed", image)
            return
        sidecar = self.sidecar_of(image)
        if self.naming == "basename" and self._stems.count(image) > 1:
            s.shared_basename += 1
            log.warning(
                "skipped %s: another image in its folder has the same name, and %s would "
                "mix their keywords (the default --xmp-naming full gives each its own)",
                image,
                os.path.basename(sidecar),
            )
            return
        try:
            self._write(rec, image, st, folder, sidecar, keywords, description)
        except beside.Refused as exc:
            s.failed += 1
            log.warning("skipped %s: %s", sidecar, exc.reason)
        except OSError as exc:
            if exc.errno in SYSTEMIC:
                raise OutputError(f"cannot write {sidecar}: {exc.strerror or exc}") from None
            s.failed += 1
            log.warning("cannot write %s: %s", sidecar, exc.strerror or exc)
        except (_NotXmp, RuntimeError) as exc:  # RuntimeError: pyexiv2 cannot read it
            s.failed += 1
            log.warning("%s is not readable XMP (%s): left as it is", sidecar, exc)

    def _write(
        self,
        rec: Record,
        image: str,
        image_st: os.stat_result,
        folder: beside.Folder,
        sidecar: str,
        keywords: list[str],
        description: str,
    ) -> None:
        # a symlink, a FIFO, a read-only sidecar... raise beside.Refused: left untouched
        found = folder.read(os.path.basename(sidecar))
        existing = None if found is None else found.data
        if existing and existing.strip() and not is_xmp_packet(existing):
            raise _NotXmp("no <?xpacket or <x:xmpmeta at its start")
        fields = {"provider": rec.get("provider"), "model": rec.get("model"), "hash": rec["hash"]}
        # an empty file holds nothing to lose: it is filled like a new sidecar
        packet = existing if existing and existing.strip() else _EMPTY_PACKET
        with self._xmp.ImageData(packet) as img:
            # exiv2 mirrors a sidecar's XMP into EXIF and IPTC when reading it and back when
            # writing it, which would undo our edits (a keyword removed comes back from IPTC)
            img.clear_exif()
            img.clear_iptc()
            change = self._change(img.read_xmp(), keywords, description, fields)
            if change is not None and not self.summary.dry_run:
                self._apply(img, change)
                data = img.get_bytes()
        if change is None:
            self.summary.unchanged += 1
            return
        if existing is None:
            self.summary.created += 1
        else:
            self.summary.updated += 1
        if self.summary.dry_run:
            new_description = change.languages.get(_DEFAULT_LANG)
            line = {
                "image": image,
                "sidecar": sidecar,
                "action": "create" if existing is None else "update",
                "add_keywords": change.added,
                "remove_keywords": change.removed,
                "description": new_description if change.description_changed else None,
            }
            self._emit(json_line(line))
            return
        # a new sidecar: the image's permission bits plus owner-write and, as root, its
        # owner; an existing one keeps its own
        if found is None:
            mode, st = beside.new_mode(image_st), image_st
        else:
            mode, st = beside.kept_mode(found.st), found.st
        owner = (st.st_uid, st.st_gid) if self._root else None
        folder.write(os.path.basename(sidecar), data, mode, owner)

    def _change(
        self, xmp: dict[str, Any], keywords: list[str], description: str, fields: dict[str, Any]
    ) -> _Change | None:
        """Our fields merged into what the sidecar holds, or None if nothing changes."""
        subject = _as_list(xmp.get(_SUBJECT))
        before = _as_list(xmp.get(f"{_OURS}.keywords"))
        theirs = [k for k in subject if k not in before]
        taken = {k.casefold() for k in theirs}
        ours = [k for k in keywords if k.casefold() not in taken]  # theirs stay theirs
        # in place: a sidecar whose keywords someone reordered is not rewritten for it
        new_subject = [k for k in subject if k not in before or k in ours]
        new_subject += [k for k in ours if k not in new_subject]

        raw = xmp.get(_DESCRIPTION)
        # a plain text is not the lang-alt array it should be, but it is the caption
        languages = {_DEFAULT_LANG: raw} if isinstance(raw, str) else dict(raw or {})
        current = languages.get(_DEFAULT_LANG)
        our_before = xmp.get(f"{_OURS}.description")
        our_description: str | None = None
        if current is None or current == our_before:  # absent, or ours: ours to replace
            if description:
                languages[_DEFAULT_LANG] = our_description = description
            else:
                languages.pop(_DEFAULT_LANG, None)
        new_fields = {k: str(v) for k, v in fields.items() if v is not None}
        old_fields = {k: xmp.get(f"{_OURS}.{k}") for k in new_fields}
        description_changed = languages.get(_DEFAULT_LANG) != current
        if (
            new_subject == subject
            and ours == before
            and not description_changed
            and our_description == our_before
            and new_fields == old_fields
        ):
            return None
        return _Change(
            subject=new_subject,
            ours=ours,
            languages=languages,
            our_description=our_description,
            added=[k for k in new_subject if k not in subject],
            removed=[k for k in subject if k not in new_subject],
            description_changed=description_changed,
            fields=new_fields,
        )

    def _apply(self, img: Any, change: _Change) -> None:
        # pyexiv2 writes a list as an rdf:Seq, but dc:subject is an rdf:Bag: build the
        # Bags item by item (a key given replaces the old array; None deletes it)
        data: dict[str, Any] = {}
        for key, values in ((_SUBJECT, change.subject), (f"{_OURS}.keywords", change.ours)):
            data[key] = "type=Bag" if values else None
            data.update({f"{key}[{i}]": v for i, v in enumerate(values, 1)})
        data[_DESCRIPTION] = change.languages or None
        data[f"{_OURS}.description"] = change.our_description
        data.update({f"{_OURS}.{k}": v for k, v in change.fields.items()})
        img.modify_xmp(data)
