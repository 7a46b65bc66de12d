"""The JSONL sink on stdout, and progress and logs on stderr.

stdout carries data only. Records go through our own buffered writer: with
PYTHONUNBUFFERED=1 (set on these machines) `sys.stdout` would cost one syscall per
record. A closed pipe becomes `OutputClosed`, which the CLI turns into a quiet exit 0;
a stdout that cannot be written (a full disk, an I/O error) becomes `OutputError` (5).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from imgbatch.errors import ImgbatchError, OutputClosed, OutputError

log = logging.getLogger("imgbatch")


class SinkFile(io.RawIOBase):
    """A JsonlSink as a binary file, for writers that want one (CSV through a
    TextIOWrapper): same buffering, OutputClosed and OutputError."""

    def __init__(self, sink: JsonlSink) -> None:
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._sink.write(chunk)
        return len(chunk)


class JsonlSink:
    """Buffered JSON Lines writer: lines are kept and written together every
    `flush_every` records, when asked (`flush`), and when `max_delay` seconds have
    passed since the last write, so a slow stream still reaches its reader.

    With `whole_lines` (every `write` is whole lines, as `analyze`'s records are) a
    regular file keeps whole lines only: before the first write, a newline is added
    when the file does not end with one (a record of ours never joins another line),
    and a write that fails is cut back to the end of the last whole line written.
    """

    def __init__(
        self,
        fd: int = 1,
        flush_every: int = 100,
        max_delay: float = 1.0,
        whole_lines: bool = False,
    ) -> None:
        self._fd = fd
        self._flush_every = flush_every
        self._max_delay = max_delay
        self._lines: list[bytes] = []
        self._last = time.monotonic()
        self.closed = False
        self.written = 0
        self._error: str | None = None  # why stdout failed, once it did
        self._regular: bool | None = None  # whether fd is a regular file (checked once)
        self._whole_lines = whole_lines
        #: with whole_lines on a regular file: where the last whole line written ends
        #: (None until the first write, or when the file is not a regular one)
        self._line_end: int | None = None
        self._started = False  # the first write has been prepared (see _start)
        self._append = False  # the fd was opened O_APPEND (`>>`)

    def write(self, line: bytes) -> None:
        """Write one record (a complete line); raises OutputClosed if the pipe closed,
        OutputError if stdout cannot be written."""
        if self.closed:
            raise OutputError(self._error) if self._error else OutputClosed
        self._lines.append(line)
        self.written += 1
        if (
            len(self._lines) >= self._flush_every
            or time.monotonic() - self._last >= self._max_delay
        ):
            self.flush()

    def flush(self) -> None:
        """Write what is buffered, in one system call where the pipe takes it whole.

        A failed write loses what was buffered and closes the sink (with whole_lines,
        a regular file is cut back to the end of the last whole line before it): it
        raises OutputError, now and on every later write or flush, so a caller that
        commits after flushing never records a line that did not go out.
        """
        if self._error:
            raise OutputError(self._error)
        if self.closed or not self._lines:
            return
        data = memoryview(b"".join(self._lines))
        self._lines.clear()
        try:
            if not self._started:
                self._start()
            while data:
                data = data[os.write(self._fd, data) :]
        except BrokenPipeError:
            self._broken()
        except OSError as exc:  # a full disk, an I/O error
            self.closed = True
            self._error = f"cannot write output: {exc.strerror or exc}"
            self._cut_back()
            raise OutputError(self._error) from exc
        if self._line_end is not None:
            self._line_end = self._end()
        self._last = time.monotonic()

    def _start(self) -> None:
        """Before the first write with whole_lines to a regular file: note where its
        whole lines end, after writing a newline if the byte before ours is not one."""
        self._started = True
        if not (self._whole_lines and self._is_regular()):
            return
        self._append = bool(fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_APPEND)
        self._line_end = end = self._end()
        if end and _byte_at(self._fd, end - 1) not in (b"\n", b""):
            os.write(self._fd, b"\n")  # a failure is cut back to `end` like any other
            self._line_end = self._end()

    def _end(self) -> int:
        """Where our next write goes: the end of the file when appending (`>>`), else
        the fd's offset (`>`, or a file shared with commands before us)."""
        if self._append:
            return os.fstat(self._fd).st_size
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def _cut_back(self) -> None:
        """After a failed write: drop what it left after the last whole line (half a
        record would otherwise glue the next `>>` run's first record onto it)."""
        if self._line_end is None:
            return
        try:
            os.ftruncate(self._fd, self._line_end)  # a write-only fd may be truncated
            if not self._append:  # no hole if a command after us writes on this fd
                os.lseek(self._fd, self._line_end, os.SEEK_SET)
        except OSError as exc:  # the write's error is the one to report
            log.debug("cannot cut the output back to its last whole line: %s", exc)

    def _is_regular(self) -> bool:
        if self._regular is None:
            try:
                self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
            except OSError:
                self._regular = False
        return self._regular

    def _broken(self) -> None:
        self.closed = True
        # Point fd 1 at /dev/null so nothing (the interpreter's exit flush) tries the
        # dead pipe again and prints a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._fd)
        os.close(devnull)
        raise OutputClosed

    def sync(self) -> None:
        """Make what was written durable when the output is a regular file (`> out.jsonl`),
        so a power loss cannot keep a checkpoint commit whose line was lost; a no-op on
        pipes and terminals."""
        if self._is_regular() and not self.closed:
            try:
                if hasattr(os, "fdatasync"):
                    os.fdatasync(self._fd)
                else:  # macOS
                    os.fsync(self._fd)
            except OSError as exc:  # EIO, ENOSPC on a delayed write
                self.closed = True
                self._error = f"cannot write output: {exc.strerror or exc}"
                raise OutputError(self._error) from exc

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def _byte_at(fd: int, offset: int) -> bytes:
    """The byte at `offset` of the regular file open as `fd`, read through a fresh
    read-only open of the same file (stdout opened by `>>` is write-only); b"" when
    there is none or the file cannot be reopened (neither /proc nor F_GETPATH)."""
    path = f"/proc/self/fd/{fd}"
    if not os.path.exists(path):  # macOS: the fd's path from the kernel
        getpath = getattr(fcntl, "F_GETPATH", None)
        try:
            raw = fcntl.fcntl(fd, getpath, bytes(1024)) if getpath is not None else b""
        except OSError:
            raw = b""
        path = os.fsdecode(raw.split(b"\0", 1)[0])
    if not path:
        return b""
    try:
        reader = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("cannot read the output's last byte: %s", exc)
        return b""
    try:
        return os.pread(reader, 1, offset)
    finally:
        os.close(reader)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """A tqdm bar when stderr is a terminal; else a plain log line every `log_every` s.

    Both count `what` ("images", "files"), show the total once it is known (it may
    arrive late and change: a count running beside the work), the rate, and the ETA
    when there is a total; bytes only when some are counted. `update()` takes totals so
    far, which keeps callers free of bookkeeping.
    """

    def __init__(
        self,
        what: str,
        log_every: float = 30.0,
        total: int | None = None,
        stream: IO[str] | None = None,
        enabled: bool = True,
    ) -> None:
        self._stream = stream or sys.stderr
        self._what = what
        self._log_every = log_every
        self._start = self._last_log = time.monotonic()
        self._bar: Any = None
        self._done = 0
        self._total = total
        if enabled and self._stream.isatty():
            from tqdm import tqdm  # only a terminal pays for the import

            self._bar = tqdm(
                total=total,
                unit=f" {what}",
                bar_format=_bar_format(total),
                file=self._stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(
        self,
        done: int,
        nbytes: int = 0,
        failed: int = 0,
        total: int | None = None,
        **extra: Any,
    ) -> None:
        """`done` of `total` (None: unchanged) so far, `nbytes` read, `failed` items;
        `extra` counters are shown as they are."""
        now = time.monotonic()
        if total is not None:
            self._total = total
        elapsed = max(now - self._start, 1e-9)
        if self._bar is not None:
            if self._bar.total != self._total:
                self._bar.total = self._total
                self._bar.bar_format = _bar_format(self._total)
            postfix = {"MB/s": f"{nbytes / elapsed / 1e6:.1f}"} if nbytes else {}
            self._bar.set_postfix({**postfix, "failed": failed, **extra}, refresh=False)
            self._bar.update(done - self._done)
        elif now - self._last_log >= self._log_every:
            self._last_log = now
            rate = done / elapsed
            count = f"{done:,} {self._what}"
            if self._total is not None:
                share = f" ({100 * done / self._total:.0f}%)" if self._total else ""
                count = f"{done:,}/{self._total:,} {self._what}{share}"
            parts = [count, _rate(rate)]
            if self._total is not None and rate > 0 and done < self._total:
                parts.append(f"ETA {human_duration((self._total - done) / rate)}")
            if nbytes:
                parts.append(f"{human_bytes(nbytes)} ({human_bytes(nbytes / elapsed)}/s)")
            if failed:
                parts.append(f"{failed:,} failed")
            parts += [f"{k} {v}" for k, v in extra.items()]
            log.info("progress: %s", ", ".join(parts))
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bar_format(total: int | None) -> str:
    """tqdm's layouts, with the rate always as `what` per second ("0.50 images/s", not
    tqdm's "2.00s/ images" below one a second)."""
    if total is None:
        return "{n_fmt}{unit} [{elapsed}, {rate_noinv_fmt}{postfix}]"
    return (
        "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    )


def _rate(per_second: float) -> str:
    """A rate people can read: per minute below one a second."""
    if per_second >= 10:
        return f"{per_second:,.0f}/s"
    if per_second >= 1:
        return f"{per_second:.1f}/s"
    return f"{60 * per_second:.1f}/min"


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, for log collectors (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(verbose: bool = False, quiet: bool = False, fmt: str = "text") -> None:
    """Send imgbatch's log records to stderr: one plain line each, or one JSON object."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("imgbatch: %(message)s")
    )
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def close_quietly(close: Callable[[], None]) -> None:
    """`close()` while already failing: its own error is dropped, as the first one is
    the one to report."""
    try:
        close()
    except (OutputClosed, ImgbatchError, OSError):
        pass
