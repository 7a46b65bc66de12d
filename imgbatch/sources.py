"""Where an item's bytes come from: `open_item`, the one reading function of every item
(a local path, or a bucket URL through objectstore), used by imaging to decode it.

A URL list's `http(s)://` items do not come through here: `--from-list` downloads each
once (httpfetch.py) and hands the bytes it kept to the analysis (listfile.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO

from imgbatch import objectstore
from imgbatch.errors import ErrorCode, ItemError

__all__ = ["is_url", "open_item"]


def is_url(path: str) -> bool:
    """Whether `path` names a remote item (a bucket URL) rather than a local file."""
    return "://" in path and objectstore.is_url(path)


@contextmanager
def open_item(
    path: str | os.PathLike[str], storage_options: Iterable[str] = ()
) -> Iterator[IO[bytes]]:
    """An item's bytes as a binary file, closed on exit: a local regular file, or a
    bucket object (`s3://`, `gs://`) read with `storage_options` (KEY=VALUE pairs).

    Raises:
        ItemError: IO_ERROR when it cannot be opened (not found, access denied, not a
            regular file); BAD_IMAGE when it is empty.
    """
    name = os.fspath(path)
    if is_url(name):
        fp = objectstore.open_object(name, tuple(storage_options))
        with fp:
            if getattr(fp, "size", 1) == 0:
                raise ItemError(ErrorCode.BAD_IMAGE, "not a decodable image: empty file")
            yield fp
        return
    try:
        # O_NONBLOCK: a FIFO swapped in since the scan must not block the worker forever.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ItemError(ErrorCode.IO_ERROR, f"cannot open file: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ItemError(ErrorCode.IO_ERROR, f"cannot stat file: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ItemError(ErrorCode.IO_ERROR, "not a regular file")
    if st.st_size == 0:
        os.close(fd)
        raise ItemError(ErrorCode.BAD_IMAGE, "not a decodable image: empty file")
    with os.fdopen(fd, "rb") as fp:
        yield fp
