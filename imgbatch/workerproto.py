"""The worker process's protocol: scan jobs in, their answers out, as marshal frames.

A worker is `python -S -c "...serve()"` (see scanner.Workers): it reads length-prefixed
frames of jobs on stdin (`hashjob.AnyJob`, tuples) and answers each on stdout, in
order. On the wire everything is plain tuples and lists (marshal is fast and runs no
code); `encode` and `decode` convert at the boundary, so that on both sides a job's
answer is a `hashjob.FolderDone` or `Done` with FileRecords and `Large` markers.
It imports only xxhash (through hashjob) at load time, so a worker starts in ~20 ms.
"""

from __future__ import annotations

import marshal
import os
import sys

from imgbatch.hashjob import Done, FolderDone, Large, run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from imgbatch.records import FileRecord


def _read_exactly(fd: int, n: int) -> bytes | None:
    """`n` bytes from `fd`, or None at end of file."""
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    """One length-prefixed frame from `fd`, or None at end of file."""
    head = _read_exactly(fd, 8)
    if head is None:
        return None
    return _read_exactly(fd, int.from_bytes(head, "little"))


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:
        view = view[os.write(fd, view) :]


def encode(done: FolderDone | Done) -> bytes:
    """A job's answer as marshal data: JSON lines travel as bytes, FileRecords and Large
    markers as tagged tuples."""
    if isinstance(done, FolderDone):
        state = [getattr(done, k) for k in FolderDone.__slots__]
        for k in ("errors", "parts"):
            state[FolderDone.__slots__.index(k)] = _plain(getattr(done, k))
        return marshal.dumps(("F", state))
    segments, counts = done
    return marshal.dumps(("S", ([(_plain(parts), rows) for parts, rows in segments], counts)))


def decode(data: bytes) -> FolderDone | Done:
    """The answer `encode` sent."""
    kind, body = marshal.loads(data)
    if kind == "F":
        done = FolderDone()
        for k, v in zip(FolderDone.__slots__, body, strict=True):
            setattr(done, k, _parts(v) if k in ("errors", "parts") else v)
        return done
    segments, counts = body
    return [(_parts(parts), rows) for parts, rows in segments], counts


def _plain(parts: list[bytes | FileRecord | Large]) -> list[object]:
    out: list[object] = []
    for p in parts:
        if isinstance(p, bytes):
            out.append(p)
        elif isinstance(p, Large):
            out.append(("L", p.name, p.ext))
        else:
            code = p.error_code.value if p.error_code is not None else None
            out.append(
                ("R", p.path, p.size, p.mtime_ns, p.hash, p.ino, p.ctime_ns)
                + (code, p.error_message, p.ext)
            )
    return out


def _parts(plain: Iterable[object]) -> list[bytes | FileRecord | Large]:
    out: list[bytes | FileRecord | Large] = []
    for p in plain:
        if isinstance(p, bytes):
            out.append(p)
        elif isinstance(p, tuple) and p[0] == "L":
            out.append(Large(p[1], p[2]))
        else:
            from imgbatch.errors import ErrorCode
            from imgbatch.records import FileRecord

            assert isinstance(p, tuple)
            _, path, size, mtime, digest, ino, ctime, code, message, ext = p
            error = ErrorCode(code) if code is not None else None
            out.append(FileRecord(path, size, mtime, digest, ino, ctime, error, message, ext))
    return out


def serve() -> None:
    """A worker's loop: jobs from stdin, results to stdout, until stdin ends."""
    import _signal  # type: ignore[import-not-found]  # not signal: it imports enum

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # the scanner stops us (stdin ends)
    out = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the results
    sys.stdout = sys.stderr
    try:
        write_frame(out, b"")  # started: jobs may come
        while (frame := read_frame(0)) is not None:
            write_frame(out, encode(run(marshal.loads(frame))))
    except BrokenPipeError:  # the scanner went away
        pass
