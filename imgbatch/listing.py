"""Listing one folder for the scan: sorted, files told from folders, the filters.

`list_folder` is the listing of a folder job (`hashjob`) and of the `--no-hash` walk:
its selected files (names, extensions; images only unless every file is wanted),
its subfolders, and error records of entries that could not be stat'ed. It also owns
the error texts of file system failures. Worker processes import it: only the
standard library's light modules at load time (errors, records, re where needed).
"""

from __future__ import annotations

import errno
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from imgbatch.records import FileRecord

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)

#: how folders are listed: follow symlinks, hidden files, every file (not only images),
#: the --exclude globs
Listing = tuple[bool, bool, bool, tuple[str, ...]]
#: a subfolder found by a folder job: path, path relative to ROOT, (device, inode) when
#: following symlinks (the scanner skips folders it visited through another link)
Subfolder = tuple[str, str, "tuple[int, int] | None"]


def io_error(path: str, message: str, st: os.stat_result | None = None) -> FileRecord:
    """An IO_ERROR record."""
    from imgbatch.errors import ErrorCode
    from imgbatch.records import error_record

    return error_record(path, ErrorCode.IO_ERROR, message, st)


def errmsg(exc: OSError, what: str) -> str:
    # never the path: the record carries it, and strerror is always clean text
    return f"{what}: {exc.strerror or exc.__class__.__name__}"


def stat_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return errmsg(exc, "symlink loop")
    if exc.errno == errno.ENOENT:
        return errmsg(exc, "dangling symlink or vanished file")
    return errmsg(exc, "cannot stat")


def ext_of(name: str) -> str:
    """records.extension_of for a bare name (no '/'): the listing's hot path."""
    i = name.rfind(".")
    if i <= 0 or (name[0] == "." and not name[:i].strip(".")):
        return ""
    return name[i:].lower()


class Excluder:
    """`--exclude` globs: with a '/', matched against the path relative to ROOT;
    without, against any basename (as in .gitignore). A trailing '/' means folders only."""

    def __init__(self, patterns: Iterable[str]) -> None:
        import fnmatch
        import re

        groups: dict[tuple[bool, bool], list[str]] = {}
        for pat in patterns:
            dir_only = pat.endswith("/")
            pat = pat.rstrip("/")
            if not pat:
                continue
            anchored = "/" in pat
            groups.setdefault((anchored, dir_only), []).append(fnmatch.translate(pat.lstrip("/")))
        self._res = {k: re.compile("|".join(v)) for k, v in groups.items()}

    def __bool__(self) -> bool:
        return bool(self._res)

    def excluded(self, name: str, rel: str, is_dir: bool) -> bool:
        for (anchored, dir_only), rx in self._res.items():
            if dir_only and not is_dir:
                continue
            if rx.match(rel if anchored else name):
                return True
        return False


_excluders: dict[tuple[str, ...], Excluder] = {}


def select_key(rel: str, listing: Listing) -> str | None:
    """A bucket object's extension when the walk's filters select it, else None. `rel`
    is its key below ROOT's prefix: each "/"-separated part but the last is a folder, as
    on disk (hidden parts, `--exclude` of folders and files, image extensions)."""
    _, include_hidden, all_files, exclude = listing
    parts = rel.split("/")
    if any(not p for p in parts):
        return None  # an empty part ("a//b"): no name a folder walk could give
    if not include_hidden and any(p.startswith(".") for p in parts):
        return None
    if exclude:
        ex = _excluder(exclude)
        for i, name in enumerate(parts):
            if ex.excluded(name, "/".join(parts[: i + 1]), i < len(parts) - 1):
                return None
    ext = ext_of(parts[-1])
    if not all_files and ext not in IMAGE_EXTENSIONS:
        return None
    return ext


def _excluder(patterns: tuple[str, ...]) -> Excluder:
    ex = _excluders.get(patterns)
    if ex is None:
        ex = _excluders[patterns] = Excluder(patterns)
    return ex


class Listed:
    """One folder's listing (see list_folder)."""

    __slots__ = (
        "errors",
        "exts",
        "listed",
        "listed_ns",
        "names",
        "skipped_links",
        "skipped_other",
        "subfolders",
    )

    def __init__(self, listed_ns: int) -> None:
        self.errors: list[FileRecord] = []
        self.names: list[str] = []
        self.exts: list[str] = []
        self.subfolders: list[Subfolder] = []
        self.listed: frozenset[str] = frozenset()
        self.listed_ns = listed_ns
        self.skipped_links = 0
        self.skipped_other = 0


def list_folder(path: str, rel: str, listing: Listing, keep_names: bool) -> Listed:
    """List one folder, sorted by name: its selected files (names, extensions), its
    subfolders, error records of entries that could not be told apart, and (`keep_names`)
    every name listed. Raises the OSError of listing the folder itself."""
    follow, hidden, every, patterns = listing
    exclude = _excluder(patterns) if patterns else None
    out = Listed(time.time_ns())
    with os.scandir(path) as it:
        entries = sorted(it, key=_by_name)
    names, exts, subfolders, errors = out.names, out.exts, out.subfolders, out.errors
    images = IMAGE_EXTENSIONS
    for e in entries:
        name = e.name
        if name[0] == "." and not hidden:
            continue
        try:
            if not follow and exclude is None and e.is_file(follow_symlinks=False):
                # the common case first: a regular file (not a symlink), nothing excluded
                ext = ext_of(name)
                if every or ext in images:
                    names.append(name)
                    exts.append(ext)
                continue
            if e.is_symlink():
                if not follow:
                    if every or ext_of(name) in images or e.is_dir():
                        out.skipped_links += 1
                    continue
                is_dir = e.is_dir(follow_symlinks=True)
            else:
                is_dir = e.is_dir(follow_symlinks=False)
            if exclude is not None and exclude.excluded(
                name, f"{rel}/{name}" if rel else name, is_dir
            ):
                continue
            if is_dir:
                key = None
                if follow:
                    st = e.stat()
                    key = (st.st_dev, st.st_ino)
                subfolders.append((e.path, f"{rel}/{name}" if rel else name, key))
                continue
            ext = ext_of(name)
            if not every and ext not in images:
                continue
            if e.is_file(follow_symlinks=follow):
                names.append(name)
                exts.append(ext)
            elif follow and e.is_symlink():
                # following symlinks, and the target is neither file nor folder
                try:
                    os.stat(e.path)
                except OSError as exc:
                    errors.append(io_error(e.path, stat_error(exc)))
                else:
                    out.skipped_other += 1
            else:
                out.skipped_other += 1
        except OSError as exc:  # a stat was needed and failed
            errors.append(io_error(e.path, stat_error(exc)))
    if keep_names:
        out.listed = frozenset([e.name for e in entries])
    return out


def _by_name(e: os.DirEntry[str]) -> str:
    return e.name
