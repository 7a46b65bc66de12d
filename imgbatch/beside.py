"""Files imgbatch writes beside the user's images (XMP sidecars, captions): only inside the
image's own folder, never through a symlink, never over a file it should leave alone.

imgbatch runs as root over folders other people write into, so any name beside an image
may be a symlink to `/etc/ld.so.preload`, another user's photo, a FIFO or a directory.
The rules, for every writer of such files:

- The folder is opened once (`Folder`); every later step (stat, read, write, rename,
  sweep) is relative to that open folder, so a folder swapped for a link meanwhile
  cannot move a write elsewhere.
- An existing file is read only when it is a regular file, not a symlink, and writable
  by its owner (and, when not root, by us): otherwise it is `Refused`, left untouched.
- A new version goes to a temporary file created beside it with
  O_CREAT|O_EXCL|O_NOFOLLOW and its final mode, synced, then renamed over the name
  (a rename replaces a symlink put there meanwhile, never follows it).
- Temporary files left by a killed process are removed by the next one (`sweep`): only
  regular files named `.<name>.imgbatch-tmp-<hex>` that no live process holds locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
from dataclasses import dataclass
from types import TracebackType

#: What marks imgbatch's temporary files: `.IMG_0001.JPG.xmp.imgbatch-tmp-0123abcd4567ef89`.
TMP_MARK = ".imgbatch-tmp-"
_TMP_NAME = re.compile(r"\..*\.imgbatch-tmp-[0-9a-f]{16}\Z", re.S)
#: A file beside an image larger than this is not read (a sidecar is kilobytes).
MAX_READ = 64 << 20
_NAME_BYTES = 200  # of the name kept in a temporary file's name (a name has at most 255)
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """A file beside an image that imgbatch leaves as it is (a symlink, not a regular
    file, read-only, too large); `reason` says which, for a warning."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Existing:
    """The bytes of a file found beside an image, and its stat (mode and owner to keep)."""

    data: bytes
    st: os.stat_result


def new_mode(image_st: os.stat_result) -> int:
    """A new file's mode: the image's permission bits plus owner-write (a photo manager
    must be able to save its edits), never executable nor set-id."""
    return (image_st.st_mode & 0o666) | stat.S_IWUSR


def kept_mode(st: os.stat_result) -> int:
    """The mode a replaced file keeps: its own permission bits, never executable."""
    return st.st_mode & 0o666


def _refusal(st: os.stat_result) -> str | None:
    """Why a file with this (lstat) stat must be left alone, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink (imgbatch never writes through one)"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if not _writable(st):
        return "it is read-only (imgbatch does not replace it)"
    if st.st_size > MAX_READ:
        return f"it is larger than {MAX_READ >> 20} MiB"
    return None


def _writable(st: os.stat_result) -> bool:
    """Writable by its owner, and by us unless we are root. Renaming over it would need
    only the folder's permission: a file its owner (or we) may not write is theirs to keep."""
    if not st.st_mode & stat.S_IWUSR:
        return False
    euid = os.geteuid()
    if euid == 0 or st.st_uid == euid:
        return True
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def _plain(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


class Folder:
    """An image's folder, opened once: files beside the image are read, written and swept
    relative to it. The path is resolved when it is opened (a symlinked ROOT, or a folder
    reached with --follow-symlinks, is where its images are); nothing after moves it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the folder (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stat(self, name: str) -> os.stat_result:
        """The stat of the file `name` in this folder (an image: a symlink is followed)."""
        return os.stat(_plain(name), dir_fd=self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        """The stat of whatever is named `name` here (a symlink itself), None if nothing."""
        try:
            return os.stat(_plain(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, name: str) -> Existing | None:
        """The file `name`'s bytes and stat, None if there is none; `Refused` if it is a
        symlink, not a regular file, read-only or too large (then it was never opened,
        or opened without following a link, without blocking and without being written)."""
        try:
            lst = os.stat(_plain(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        reason = _refusal(lst)  # before opening: opening a device may do something
        if reason:
            raise Refused(reason)
        try:
            fd = os.open(name, _READ, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink since the lstat
                raise Refused("it is a symlink (imgbatch never writes through one)") from None
            raise
        try:
            st = os.fstat(fd)
            reason = _refusal(st)  # what was opened, which may not be what was lstat'ed
            if reason:
                raise Refused(reason)
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_READ:
                    raise Refused(f"it is larger than {MAX_READ >> 20} MiB")
            return Existing(b"".join(chunks), st)
        finally:
            os.close(fd)

    def write(
        self, name: str, data: bytes, mode: int, owner: tuple[int, int] | None = None
    ) -> None:
        """Replace (or create) `name` with `data`, atomically: a temporary file created
        beside it with `mode` (and `owner`), synced, renamed over `name`. On any error the
        temporary file is removed and `name` stays as it was."""
        stem = os.fsencode(_plain(name))[:_NAME_BYTES]
        while True:
            tmp = os.fsdecode(b"." + stem) + TMP_MARK + secrets.token_hex(8)
            try:
                # the umask may narrow `mode` here: the file is never more open than asked
                fd = os.open(tmp, _CREATE, mode, dir_fd=self.fd)
                break
            except FileExistsError:
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: `sweep` leaves it alone
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # the exact mode whatever the umask (after a chown)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def sweep(self) -> int:
        """Remove the temporary files that a killed process left here; returns how many.
        Only regular files named as `write` names them, and not locked by a live writer."""
        removed = 0
        with os.scandir(self.fd) as entries:
            # regular files only (a device is never opened: that alone may do something)
            names = [
                e.name
                for e in entries
                if _TMP_NAME.match(e.name) and e.is_file(follow_symlinks=False)
            ]
        for tmp in names:
            try:
                fd = os.open(tmp, _READ, dir_fd=self.fd)
            except OSError:
                continue  # gone, or a symlink (ELOOP): not ours to remove
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while being written
                os.unlink(tmp, dir_fd=self.fd)
                removed += 1
            except OSError:
                continue
            finally:
                os.close(fd)
        return removed
