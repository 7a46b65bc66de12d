"""FileRecord, the identity of one file, and its strict-UTF-8 JSON form.

Paths are kept as `str` decoded with the filesystem encoding (surrogateescape), so
they round-trip to the exact bytes of the name. JSON output never carries a lone
surrogate: a name that is not valid UTF-8 is written with U+FFFD in `path` and its
raw bytes, base64-encoded, in `path_bytes_b64`.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgbatch.errors import ErrorCode
from imgbatch.jsontext import is_clean as is_clean  # the scan's fast lines use it too
from imgbatch.jsontext import iso_seconds

#: strict JSON: NaN and Infinity, which Python writes by default, are refused (ValueError)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_quote: Callable[[str], str] = json.encoder.encode_basestring


def utf8_clean(text: str) -> str:
    """`text` with every undecodable byte (or lone surrogate) replaced by U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def iso_utc(ns: int) -> str:
    """ISO-8601 UTC timestamp with microseconds, e.g. ``2024-05-01T12:00:00.123456Z``."""
    sec, rem = divmod(ns, 1_000_000_000)
    return f"{iso_seconds(sec)}.{rem // 1000:06d}Z"


def extension_of(path: str) -> str:
    """Lower-case extension with its dot, or '' when the name has none (as os.path.splitext,
    ~4x faster: this runs for every entry of the tree)."""
    base = path[path.rfind("/") + 1 :]
    i = base.rfind(".")
    if i <= 0 or (base[0] == "." and not base[:i].strip(".")):
        return ""
    return base[i:].lower()


@dataclass(slots=True)
class FileRecord:
    """One file as the scanner saw it.

    `hash` is the xxh3-128 hex digest of the content (None with `--no-hash` or on
    error); `ino`/`ctime_ns` are kept for the hash cache and never written out.
    """

    path: str
    size: int | None = None
    mtime_ns: int | None = None
    hash: str | None = None
    ino: int = 0
    ctime_ns: int = 0
    error_code: ErrorCode | None = None
    error_message: str | None = None
    ext: str | None = None  # the extension, when the scanner already computed it

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def extension(self) -> str:
        return self.ext if self.ext is not None else extension_of(self.path)

    def fields(self) -> dict[str, Any]:
        """The JSON object of this record (strings cleaned to strict UTF-8)."""
        out: dict[str, Any] = {"path": self.path}
        if not is_clean(self.path):
            out["path"] = utf8_clean(self.path)
            raw = os.fsencode(self.path)
            out["path_bytes_b64"] = base64.b64encode(raw).decode("ascii")
        out["hash"] = self.hash
        out["size"] = self.size
        out["extension"] = utf8_clean(self.extension)
        out["mtime"] = None if self.mtime_ns is None else iso_utc(self.mtime_ns)
        if self.error_code is None:
            out["status"] = "ok"
        else:
            out["status"] = "error"
            out["error"] = {
                "code": self.error_code.value,
                "message": utf8_clean(self.error_message or ""),
            }
        return out

    def to_json(self) -> bytes:
        """One JSON line (with its newline) as UTF-8 bytes."""
        if self.error_code is None and self.mtime_ns is not None:
            # Fast path for the common case, ~3x quicker than json over a dict;
            # falls back when the name is not valid UTF-8.
            line = (
                '{"path":'
                + _quote(self.path)
                + ',"hash":'
                + ("null" if self.hash is None else '"' + self.hash + '"')
                + ',"size":'
                + str(self.size)
                + ',"extension":'
                + _quote(self.extension)
                + ',"mtime":"'
                + iso_utc(self.mtime_ns)
                + '","status":"ok"}\n'
            )
            try:
                return line.encode("utf-8")
            except UnicodeEncodeError:
                pass
        return (_dumps(self.fields()) + "\n").encode("utf-8")


def _clean(obj: Any) -> Any:
    if isinstance(obj, str):
        return utf8_clean(obj)
    if isinstance(obj, dict):
        return {_clean(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_line(obj: Any) -> bytes:
    """`obj` as one strict-UTF-8 JSON line; any lone surrogate becomes U+FFFD, and any
    NaN or Infinity null (the providers refuse answers holding them: this is the last
    line of defence, so that no strict JSON parser ever rejects a line)."""
    try:
        text = _dumps(obj)
    except ValueError:
        obj = _finite(obj)
        text = _dumps(obj)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (_dumps(_clean(obj)) + "\n").encode("utf-8")


def error_record(
    path: str, code: ErrorCode, message: str, st: os.stat_result | None = None
) -> FileRecord:
    """A FileRecord for a file (or folder) that could not be read."""
    rec = FileRecord(path=path, error_code=code, error_message=message)
    if st is not None:
        rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
        rec.ino, rec.ctime_ns = st.st_ino, st.st_ctime_ns
    return rec
