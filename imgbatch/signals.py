"""SIGINT / SIGTERM for the commands: a graceful stop first, an immediate exit on a second."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from imgbatch.errors import SignalStop

log = logging.getLogger("imgbatch")


class Signals:
    """SIGINT / SIGTERM. The first one sets `stop` (graceful commands: intake stops,
    in-flight items get the grace period) or raises errors.SignalStop; a second one exits at
    once, which corrupts nothing: every checkpoint write is one SQLite transaction."""

    def __init__(self, graceful: bool) -> None:
        self.graceful = graceful
        self.stop = threading.Event()
        self.received: int | None = None

    def install(self) -> Signals:
        """Handle SIGINT and SIGTERM from now on (main thread only)."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + self.received)
        self.received = signum
        if not self.graceful:
            raise SignalStop(signum)
        self.stop.set()
        log.warning(
            "%s: stopping; in-flight items may finish (a second signal quits now)",
            signal.Signals(signum).name,
        )

    @property
    def exit_code(self) -> int | None:
        """128 + the signal received, or None."""
        return None if self.received is None else 128 + self.received


def must_exit_now() -> bool:
    """Whether exiting must skip joining threads (some may be blocked in a request):
    when so, stdout and stderr are flushed here and the caller uses os._exit."""
    if threading.active_count() <= 1:
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return True
