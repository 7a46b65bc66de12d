"""One exception hierarchy, the normalised per-item error codes, and the exit codes."""

from __future__ import annotations

from enum import Enum, IntEnum

#: The start of the message of an image that a missing decoder could not read (HEIF
#: without imgbatch[heif], AVIF without Pillow's AVIF support): not the file's fault, so
#: not a permanent verdict; a later run retries it once the decoder is installed. Keep
#: it stable: it is stored in checkpoints.
DECODER_MISSING = "decoder missing: "


class ExitCode(IntEnum):
    """Process exit codes; the README's table is generated from the same meanings."""

    OK = 0  # every item of this run ok, or nothing to do
    ITEM_FAILURES = 1  # finished, but some items of this run failed
    USAGE = 2  # usage or configuration error
    LOCKED = 3  # another run holds the checkpoint's lock
    QUOTA = 4  # the daily quota is exhausted: stopped early, resume later
    FATAL = 5  # key rejected, checkpoint unusable, anything unexpected
    SIGINT = 130
    SIGTERM = 143


class ErrorCode(str, Enum):
    """Normalised per-item error codes, the `error.code` of a failed record."""

    TIMEOUT = "TIMEOUT"
    RATE_LIMIT = "RATE_LIMIT"
    NETWORK_ERROR = "NETWORK_ERROR"
    AI_ERROR = "AI_ERROR"
    BLOCKED = "BLOCKED"
    BAD_IMAGE = "BAD_IMAGE"
    IO_ERROR = "IO_ERROR"
    AUTH_ERROR = "AUTH_ERROR"

    @property
    def transient(self) -> bool:
        """Whether an item that ended with this code is retried by the next run."""
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {ErrorCode.TIMEOUT, ErrorCode.RATE_LIMIT, ErrorCode.NETWORK_ERROR, ErrorCode.AI_ERROR}
)


class ImgbatchError(Exception):
    """Base of every error that stops a command; the CLI maps it to `exit_code`."""

    exit_code: ExitCode = ExitCode.FATAL


class UsageError(ImgbatchError):
    """Bad arguments, a missing root, an invalid configuration file."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """The configuration file or environment holds something invalid."""


class LockHeldError(ImgbatchError):
    """Another run holds the checkpoint's lock."""

    exit_code = ExitCode.LOCKED


class QuotaExhaustedError(ImgbatchError):
    """The provider's per-day quota is used up; the next run resumes."""

    exit_code = ExitCode.QUOTA


class FatalError(ImgbatchError):
    """Nothing more can be done in this run: key rejected, checkpoint unusable."""

    exit_code = ExitCode.FATAL


class CheckpointError(FatalError):
    """The checkpoint cannot be opened or has an incompatible format version."""


class AuthError(FatalError):
    """Every configured API key was rejected."""


class OutputError(FatalError):
    """stdout cannot be written (a full disk, an I/O error); nothing unwritten is recorded."""


# -- stops: a run ending early on purpose, each with its own name ----------------------


class SignalStop(BaseException):
    """A signal asked a command without a graceful stop to end (`signals.Signals`).

    A BaseException, like KeyboardInterrupt: raised from the signal handler wherever
    the main thread is, it must get through `except Exception` (logging's own, when it
    lands while a log line is written) rather than be swallowed there.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class OutputClosed(Exception):
    """The reader of stdout went away (`| head`): the command ends quietly (exit 0), and
    nothing more is written or recorded."""


class LimiterClosed(Exception):
    """The rate limiter was closed (the run is stopping) while a thread waited in it."""


class Abandoned(Exception):
    """An item given up because the run is stopping: it is not recorded."""


class WaitInterrupted(ImgbatchError):
    """A stop (SIGINT/SIGTERM) ended a wait (for the lock) before the command did
    anything; nothing was recorded. The CLI exits with the signal's code."""

    exit_code = ExitCode.SIGINT


class ItemError(Exception):
    """A failure of one item; it becomes an error record, never stops a run."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        #: whether to retry within this run; None: as the code says (`transient`)
        self.retryable = code.transient if retryable is None else retryable


class ContentChanged(ItemError):
    """The file's bytes no longer match the hash the scan gave it: it changed in between.

    Its analysis would describe other bytes than its hash says, so none is stored: the
    item is recorded as changed (without a hash) and the next run scans and analyses it.
    """

    def __init__(self) -> None:
        super().__init__(
            ErrorCode.IO_ERROR,
            "file changed since it was scanned; the next run analyses its new content",
            retryable=False,
        )
