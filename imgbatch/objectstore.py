"""Bucket roots (`s3://bucket/prefix/`, `gs://bucket/prefix/`): the only importer of fsspec,
s3fs and gcsfs (the `s3` and `gcs` extras).

What it owns: telling a URL from a path (`is_url`, `split`), the storage options
(`--storage-option KEY=VALUE` and `[storage]`: `options`, `shareable`), the filesystem
(`filesystem`, cached per protocol and options), the paginated listing, streamed page by
page (`list_pages`, `list_objects`: one `ObjectInfo` per object, key order, folder
markers left out), the hashing read (`hash_object`: ranged GETs of the listed version,
never a temp copy)
and the reading of an object's bytes for decoding (`open_object`). Run-level failures
(a missing bucket, an unreachable endpoint) are FatalErrors naming the bucket and the
endpoint; a missing extra is a UsageError naming the pip command. Credentials given as
options are never put in a message, a log line or a record.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, cast

from imgbatch.errors import ErrorCode, FatalError, ItemError, UsageError

__all__ = [
    "CREDENTIAL_OPTIONS",
    "ObjectInfo",
    "check_root",
    "filesystem",
    "hash_object",
    "is_url",
    "list_objects",
    "list_pages",
    "normalize",
    "open_object",
    "options",
    "shareable",
    "split",
]

#: scheme -> (the fsspec protocol, the package, the extra that installs it)
SCHEMES = {
    "s3": ("s3", "s3fs", "s3"),
    "s3a": ("s3", "s3fs", "s3"),
    "gs": ("gcs", "gcsfs", "gcs"),
    "gcs": ("gcs", "gcsfs", "gcs"),
}
#: storage options that are credentials: never sent to a Dask worker, never shown
CREDENTIAL_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "username",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "client_kwargs",  # may carry any of the above
        "config_kwargs",
        "credentials",
    }
)
PAGE = 1000  # objects per gcs listing page (maxResults), as an S3 listing page holds
CHUNK = 8 << 20  # bytes per ranged GET while hashing: one request for most images
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str) -> bool:
    """Whether `path` is a bucket URL (`s3://`, `gs://`), not a local path."""
    found = _URL.match(path)
    return found is not None and found.group(1).lower() in SCHEMES


def split(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a bucket URL; the key as written (not percent-decoded)."""
    found = _URL.match(url)
    if found is None or found.group(1).lower() not in SCHEMES:
        raise UsageError(f"not a bucket URL (s3://, gs://): {url}")
    scheme = found.group(1).lower()
    bucket, _, key = url[found.end() :].partition("/")
    if not bucket:
        raise UsageError(f"no bucket in {url}")
    return scheme, bucket, key


def normalize(root: str) -> str:
    """A bucket ROOT as records and its state folder name it: `scheme://bucket/prefix/`
    (a prefix always ends in "/", so `s3://b/p` covers `p/...` and not `p2/...`)."""
    scheme, bucket, key = split(root)
    key = key.lstrip("/")
    if key and not key.endswith("/"):
        key += "/"
    return f"{scheme}://{bucket}/{key}"


def check_root(root: str) -> str:
    """`normalize(root)`; a UsageError when it has no bucket or the extra of its scheme
    is missing."""
    root = normalize(root)
    _module(split(root)[0])
    return root


def options(pairs: Iterable[str]) -> dict[str, Any]:
    """The storage options as fsspec keywords, from `KEY=VALUE` pairs (later pairs
    override earlier ones: flags after the config file); "true"/"false" become booleans.
    A pair without "=" is a UsageError that shows none of it."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:  # never echoed: it may be a credential typed without its key
            raise UsageError("--storage-option takes KEY=VALUE (one has no KEY=)")
        low = value.strip().lower()
        out[key] = True if low == "true" else False if low == "false" else value
    return out


def shareable(pairs: Iterable[str]) -> tuple[str, ...]:
    """The pairs that may travel to another machine (a Dask worker): no credential."""
    return tuple(p for p in pairs if p.partition("=")[0].strip() not in CREDENTIAL_OPTIONS)


def _module(scheme: str) -> Any:
    """The fsspec implementation of `scheme`, imported; a UsageError naming the extra."""
    _, package, extra = SCHEMES[scheme]
    try:
        if package == "s3fs":
            import s3fs

            return s3fs
        import gcsfs

        return gcsfs
    except ImportError:
        raise UsageError(
            f"{scheme}:// roots need the {extra} extra: pip install 'imgbatch[{extra}]'"
        ) from None


_filesystems: dict[tuple[str, tuple[str, ...]], Any] = {}
_fs_lock = threading.Lock()


def filesystem(url: str, pairs: Iterable[str] = ()) -> Any:
    """The fsspec filesystem of `url`'s scheme with the storage options, one per process
    and options. s3fs reads AWS_ENDPOINT_URL itself, as botocore does."""
    scheme = split(url)[0]
    key = (SCHEMES[scheme][0], tuple(pairs))
    with _fs_lock:
        fs = _filesystems.get(key)
        if fs is None:
            _module(scheme)
            import fsspec

            try:
                if key[0] == "gcs" and _emulated(options(key[1])):
                    # gcsfs's default class (ExtendedGcsFileSystem) asks the Storage Control
                    # gRPC API for each bucket's layout before opening an object; an emulator
                    # serves only the JSON API, so that call fails after ~60 s, every open.
                    # The JSON-API class reads a standard bucket alike.
                    from gcsfs.core import GCSFileSystem

                    fs = GCSFileSystem(**options(key[1]))
                else:
                    fs = fsspec.filesystem(key[0], **options(key[1]))
            except TypeError as exc:  # an unknown keyword: its name, never its value
                raise UsageError(f"invalid --storage-option for {scheme}://: {exc}") from None
            _filesystems[key] = fs
        return fs


def _emulated(opts: dict[str, Any]) -> bool:
    """Whether gcs requests go to an emulator (`STORAGE_EMULATOR_HOST`, as gcsfs reads it,
    or an `endpoint_url` option) rather than Google's endpoint."""
    import os

    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return bool(opts.get("endpoint_url")) or host not in ("", "default")


def endpoint(fs: Any) -> str:
    """Where the filesystem's requests go, for messages (no credential: scheme, host, port)."""
    from urllib.parse import urlsplit

    url = getattr(fs, "endpoint_url", None) or ""
    if not url and not hasattr(fs, "_s3"):  # gcsfs: its JSON API's base (an emulator's too)
        url = str(getattr(fs, "_location", "") or "")
    if not url:
        s3 = getattr(fs, "_s3", None)
        url = getattr(getattr(s3, "meta", None), "endpoint_url", "") or ""
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as the listing gave it."""

    url: str  # scheme://bucket/key, the key as stored
    key: str
    size: int
    mtime_ns: int  # LastModified
    etag: str  # not a content hash: a version stamp for the hash cache only
    generation: str = ""  # gcs: the listed version, which the hashing reads pin


def _mtime_ns(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000) * 1000
    if isinstance(value, str) and value:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e6) * 1000
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    return 0


def _run_level(exc: BaseException, root: str, fs: Any) -> FatalError:
    """A failed listing as one line naming the bucket and the endpoint."""
    scheme, bucket, _ = split(root)
    where = endpoint(fs)
    at = f" at {where}" if where else ""
    if isinstance(exc, FileNotFoundError):
        return FatalError(f"bucket not found: {scheme}://{bucket}{at}")
    if isinstance(exc, PermissionError):
        return FatalError(f"access denied listing {scheme}://{bucket}{at}")
    name = type(exc).__name__
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return FatalError(f"cannot list {scheme}://{bucket}{at}: {name}{': ' + text if text else ''}")


def list_objects(root: str, pairs: Iterable[str] = ()) -> Iterator[ObjectInfo]:
    """Every object under the prefix ROOT, in key order, one listing page at a time
    (memory stays flat however many keys); folder markers (keys ending in "/") are left
    out. A missing bucket or unreachable endpoint is a FatalError naming them."""
    for page in list_pages(root, pairs):
        yield from page


def list_pages(root: str, pairs: Iterable[str] = ()) -> Iterator[list[ObjectInfo]]:
    """`list_objects` a listing page at a time (up to 1,000 objects: s3 ListObjectsV2,
    gcs objects.list), so a caller can look a page's objects up at once (the hash cache).
    Pages come in key order (gcs lists in lexicographic order of the names)."""
    root = check_root(root)
    scheme, bucket, prefix = split(root)
    fs = filesystem(root, pairs)
    if SCHEMES[scheme][0] == "s3":
        yield from _list_s3(fs, root, scheme, bucket, prefix)
        return
    yield from _list_gcs(fs, root, scheme, bucket, prefix)


def _list_gcs(
    fs: Any, root: str, scheme: str, bucket: str, prefix: str
) -> Iterator[list[ObjectInfo]]:
    """The JSON API's objects.list, a page at a time (gcsfs's `find` gathers them all)."""
    token: str | None = None
    while True:
        try:
            page = fs.call(
                "GET",
                "b/{}/o",
                bucket,
                json_out=True,
                prefix=prefix or None,
                maxResults=PAGE,
                pageToken=token,
            )
        except Exception as exc:
            raise _run_level(exc, root, fs) from None
        yield [
            ObjectInfo(
                f"{scheme}://{bucket}/{item['name']}",
                item["name"],
                int(item.get("size") or 0),
                _mtime_ns(item.get("updated")),
                str(item.get("etag") or item.get("generation") or ""),
                str(item.get("generation") or ""),
            )
            for item in sorted(page.get("items", ()), key=lambda item: str(item["name"]))
            if not item["name"].endswith("/")  # a folder marker
        ]
        token = page.get("nextPageToken")
        if not token:
            return


def _list_s3(
    fs: Any, root: str, scheme: str, bucket: str, prefix: str
) -> Iterator[list[ObjectInfo]]:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        try:
            # one ListObjectsV2 page (<= 1,000 keys), retried on throttling by s3fs
            page = fs.call_s3("list_objects_v2", **kwargs)
        except Exception as exc:
            raise _run_level(exc, root, fs) from None
        yield [
            ObjectInfo(
                f"{scheme}://{bucket}/{item['Key']}",
                item["Key"],
                int(item.get("Size") or 0),
                _mtime_ns(item.get("LastModified")),
                str(item.get("ETag") or ""),
            )
            for item in page.get("Contents", ())
            if not item["Key"].endswith("/")  # a folder marker
        ]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        kwargs["ContinuationToken"] = token


def _item_error(exc: BaseException, doing: str) -> ItemError:
    """One object's failure as an IO_ERROR (no credential is in s3fs's messages)."""
    if isinstance(exc, ItemError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ItemError(ErrorCode.IO_ERROR, f"cannot {doing}: no such object (gone since listed)")
    if isinstance(exc, PermissionError):
        return ItemError(ErrorCode.IO_ERROR, f"cannot {doing}: access denied")
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    if "PreconditionFailed" in text or "412" in text:
        return ItemError(ErrorCode.IO_ERROR, f"cannot {doing}: object changed since it was listed")
    name = type(exc).__name__
    return ItemError(ErrorCode.IO_ERROR, f"cannot {doing}: {name}{': ' + text if text else ''}")


def _read_range(fs: Any, info: ObjectInfo, start: int, end: int) -> bytes:
    """Bytes [start, end) of the listed version of an object: one ranged GET (s3: with
    If-Match on the listed ETag, so an object overwritten since is refused, not mixed)."""
    if not hasattr(fs, "_call_s3"):  # gcs: `generation` pins the listed version (404 if gone)
        data: bytes = fs.cat_file(
            info.url, start=start, end=end, generation=info.generation or None
        )
        return data
    from fsspec.asyn import sync

    _, bucket, key = split(info.url)
    extra = {"IfMatch": info.etag} if info.etag else {}

    async def get() -> bytes:
        resp = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra
        )
        body = resp["Body"]
        try:
            return bytes(await body.read())
        finally:
            body.close()

    result: bytes = sync(fs.loop, get)
    return result


def hash_object(info: ObjectInfo, pairs: Iterable[str] = ()) -> str:
    """The xxh3-128 hex digest of the object's bytes, read as a stream of ranged GETs of
    CHUNK bytes (never a whole copy); an ItemError (IO_ERROR) when it cannot be read, or
    the bytes read are not the size listed (a read cut short, an object changed)."""
    import xxhash

    fs = filesystem(info.url, pairs)
    h = xxhash.xxh3_128()
    done = 0
    try:
        while done < info.size:
            end = min(info.size, done + CHUNK)
            data = _read_range(fs, info, done, end)
            if len(data) != end - done:
                raise ItemError(
                    ErrorCode.IO_ERROR,
                    f"read cut short: {done + len(data):,} of {info.size:,} bytes",
                )
            h.update(data)
            done = end
    except Exception as exc:
        raise _item_error(exc, "read object") from None
    return str(h.hexdigest())


def open_object(url: str, pairs: Iterable[str] = ()) -> IO[bytes]:
    """The object at `url` as a seekable binary file (read in blocks as it is read);
    an ItemError (IO_ERROR) when it cannot be opened."""
    fs = filesystem(url, pairs)
    try:
        fp: IO[bytes] = fs.open(url, "rb", block_size=CHUNK, cache_type="readahead")
    except Exception as exc:
        raise _item_error(exc, "open object") from None
    return cast(IO[bytes], _Guarded(fp))


class _Guarded:
    """A remote file whose read failures are ItemErrors (IO_ERROR), as a local file's are."""

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp

    def read(self, n: int = -1) -> bytes:
        try:
            return self._fp.read(n)
        except Exception as exc:
            raise _item_error(exc, "read object") from None

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return int(getattr(self._fp, "size", 0) or 0)

    def close(self) -> None:
        try:
            self._fp.close()
        except Exception:  # closing a read-only remote file: nothing to lose
            pass

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
