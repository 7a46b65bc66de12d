"""The writer's lock on a state folder, and who holds it, told without taking it.

One process writes at a time: `StateLock.acquire()` takes an exclusive `flock` on
``<state>/lock``, which the kernel releases when the process dies, so a crash never
leaves a stale lock. `--wait` polls a non-blocking attempt every `POLL` seconds instead
of blocking in the kernel, so a stop (SIGINT/SIGTERM) ends the wait at once.

Readers (`status`, `runs`, `export`) never take the lock, not even shared for an
instant: a run starting at that instant would find it taken and exit 3. `holder()`
tells who holds it from the record the holder writes into the lock file after taking
it (pid, process start time, host, command, since) and empties before releasing it.
A record is believed while its process lives: the pid exists, is not a zombie, and its
start time (field 22 of /proc/<pid>/stat) is the recorded one, so a reused pid is not
taken for the holder; where /proc is absent or hides the pid, `os.kill(pid, 0)` says
whether it exists. A record written on another host (or in another container) cannot
be checked and is believed.

This was chosen over the kernel's lock table (/proc/locks): that names the file by
device and inode, which stat() reports differently on overlay and btrfs mounts, and it
is Linux only. What the record cannot tell: for the few microseconds between taking the
lock and writing the record, and after a holder closed the lock's descriptor without
`release()`, while that process still lives.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from imgbatch.errors import CheckpointError, LockHeldError, WaitInterrupted

log = logging.getLogger("imgbatch")

POLL = 0.1  # seconds between attempts while waiting for the lock
LOCK_NAME = "lock"


class StateLock:
    """The exclusive writer's lock of one state folder."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(
        self, command: str, wait: bool = False, stop: threading.Event | None = None
    ) -> None:
        """Take the lock, then record this process as its holder.

        Without `wait`, a lock held by another process raises LockHeldError naming it.
        With `wait`, try again every POLL seconds until it is free; setting `stop`
        raises WaitInterrupted, and a signal handler's exception gets through between tries.
        """
        try:
            # 0600: its record names the command; state at rest is the owner's only
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CheckpointError(
                f"cannot open the lock file {self.path}: {exc.strerror}"
            ) from None
        try:
            announced = False
            while not _try_lock(fd):
                if not wait:
                    raise LockHeldError(f"{self._who()} holds the lock on {self.path.parent}")
                if not announced:
                    announced = True
                    log.info(
                        "waiting for %s to release the lock on %s", self._who(), self.path.parent
                    )
                if stop is None:
                    time.sleep(POLL)
                elif stop.wait(POLL):
                    raise WaitInterrupted(
                        f"interrupted while waiting for the lock on {self.path.parent}; "
                        "nothing was done"
                    )
            record = json.dumps(
                {
                    "pid": os.getpid(),
                    "start": _start_time(os.getpid()),
                    "host": socket.gethostname(),
                    "since": time.time(),
                    "command": command,
                }
            ).encode()
            # write over the old record, then cut it: JSON allows the trailing spaces a
            # reader may see in between, so it never reads an empty file as "free"
            old = os.fstat(fd).st_size
            os.pwrite(fd, record.ljust(old), 0)
            os.ftruncate(fd, len(record))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        """Empty the record, then release the lock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def _who(self) -> str:
        info = holder(self.path.parent)
        return describe(info) if info else "another imgbatch process"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder(directory: Path) -> dict[str, Any] | None:
    """The record of the live process holding `directory`'s lock, or None.

    Reads the lock file only; never takes the lock (see the module's docstring).
    """
    try:
        info: dict[str, Any] = json.loads((directory / LOCK_NAME).read_bytes())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # no record, or half written
        return None
    if pid <= 0:
        return None
    host = info.get("host")
    if host is not None and host != socket.gethostname():
        return info  # another machine's process: nothing here can check it
    return info if _alive(pid, info.get("start")) else None


def describe(info: dict[str, Any]) -> str:
    """A holder's record for people: "analyze (pid 123) since 2025-01-31 12:00:00"."""
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"{info['command']} (pid {info['pid']}) since {since}"
    except (KeyError, TypeError, ValueError, OverflowError):
        return f"pid {info.get('pid')}"


def _alive(pid: int, start: object) -> bool:
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in ("Z", "X") and (start is None or start == started)
    try:  # no /proc, or this pid hidden from us (hidepid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None without /proc."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, the rest not
    fields = data.rpartition(b")")[2].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None
