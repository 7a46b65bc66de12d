"""The worker process's protocol: scan jobs in, their answers out, as marshal frames.

A worker is `python -S -c "...serve()"` (see scanner.Workers): it reads length-prefixed
frames of jobs on stdin (`hashjob.AnyJob`, tuples) and answers each on stdout, in
order. Jobs and answers are the plain tuples of `hashjob` (marshal is fast and runs no
code); `encode` and `decode` turn the FileRecords and `Large` markers among an answer's
parts into tuples and back, so that on both sides an answer is what `hashjob.run`
returned. The scanner turns it into its own types (scanner.receive).
It imports only xxhash (through hashjob) at load time, so a worker starts in ~20 ms.
"""

from __future__ import annotations

import marshal
import os
import sys

from imgbatch.hashjob import Answer, Large, run

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


#: where a folder job's answer (hashjob.FolderDone) holds its records and parts
_ERRORS_AT, _PARTS_AT = 1, 5


def encode(answer: Answer) -> bytes:
    """A job's answer as marshal data: JSON lines travel as bytes, FileRecords and Large
    markers as tagged tuples, the rest as it is."""
    kind, body = answer
    if kind == "F":
        fields: list[object] = list(body)
        fields[_ERRORS_AT] = _plain(fields[_ERRORS_AT])  # type: ignore[arg-type]
        fields[_PARTS_AT] = _plain(fields[_PARTS_AT])  # type: ignore[arg-type]
        return marshal.dumps(("F", tuple(fields)))  # type: ignore[arg-type]
    segments, counts = body  # type: ignore[misc]
    return marshal.dumps(("S", ([(_plain(parts), rows) for parts, rows in segments], counts)))


def decode(data: bytes) -> Answer:
    """The answer `encode` sent, as the job gave it."""
    kind, body = marshal.loads(data)
    if kind == "F":
        fields = list(body)
        fields[_ERRORS_AT] = _parts(fields[_ERRORS_AT])
        fields[_PARTS_AT] = _parts(fields[_PARTS_AT])
        return "F", tuple(fields)
    segments, counts = body
    return "S", ([(_parts(parts), rows) for parts, rows in segments], counts)


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
