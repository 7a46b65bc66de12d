"""The JSONL sink on stdout, and progress and logs on stderr.

stdout carries data only. Records go through our own buffered writer: with
PYTHONUNBUFFERED=1 (set on these machines) `sys.stdout` would cost one syscall per
record. A closed pipe becomes `OutputClosed`, which the CLI turns into a quiet exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

log = logging.getLogger("imgbatch")


class OutputClosed(Exception):
    """The reader of stdout went away (`| head`); nothing more can be written."""


class JsonlSink:
    """Buffered JSON Lines writer: lines are kept and written together every
    `flush_every` records, when asked (`flush`), and when `max_delay` seconds have
    passed since the last write, so a slow stream still reaches its reader."""

    def __init__(self, fd: int = 1, flush_every: int = 100, max_delay: float = 1.0) -> None:
        self._fd = fd
        self._flush_every = flush_every
        self._max_delay = max_delay
        self._lines: list[bytes] = []
        self._last = time.monotonic()
        self.closed = False
        self.written = 0

    def write(self, line: bytes) -> None:
        """Write one record (a complete line); raises OutputClosed if the pipe closed."""
        if self.closed:
            raise OutputClosed
        self._lines.append(line)
        self.written += 1
        if (
            len(self._lines) >= self._flush_every
            or time.monotonic() - self._last >= self._max_delay
        ):
            self.flush()

    def flush(self) -> None:
        """Write what is buffered, in one system call where the pipe takes it whole."""
        if self.closed or not self._lines:
            return
        data = memoryview(b"".join(self._lines))
        self._lines.clear()
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except BrokenPipeError:
            self._broken()
        self._last = time.monotonic()

    def _broken(self) -> None:
        self.closed = True
        # Point fd 1 at /dev/null so nothing (the interpreter's exit flush) tries the
        # dead pipe again and prints a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._fd)
        os.close(devnull)
        raise OutputClosed

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


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

    `update()` takes totals so far, which keeps callers free of bookkeeping.
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
        if enabled and self._stream.isatty():
            from tqdm import tqdm  # only a terminal pays for the import

            self._bar = tqdm(
                total=total, unit=" files", file=self._stream, dynamic_ncols=True, smoothing=0.1
            )

    def update(self, done: int, nbytes: int = 0, failed: int = 0, **extra: Any) -> None:
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(done - self._done)
            elapsed = max(now - self._start, 1e-9)
            postfix = {"MB/s": f"{nbytes / elapsed / 1e6:.1f}", "failed": failed, **extra}
            self._bar.set_postfix(postfix, refresh=False)
        elif now - self._last_log >= self._log_every:
            self._last_log = now
            rate = done / max(now - self._start, 1e-9)
            parts = [f"{done:,} {self._what}", f"{rate:,.0f}/s"]
            if nbytes:
                parts.append(human_bytes(nbytes))
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
