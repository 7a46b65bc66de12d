"""A pool of interchangeable request targets with failover: Gemini's API keys, or the
endpoints (URLs) of an OpenAI-compatible provider.

A member that is answered 429, or fails for a while, cools down and the others take its
requests; a member that is rejected, or whose quota is used up, leaves for good, and the
pool remembers why, so that when none is left the run stops with the right error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from imgbatch.errors import ImgbatchError

log = logging.getLogger("imgbatch")

#: why a member left the pool
REJECTED = "rejected"
DAILY_QUOTA = "daily quota"

#: (why, the server's status) of every member that left -> the run-level error
OnEmpty = Callable[[list[tuple[str, str]]], ImgbatchError]


class KeyPool:
    """Members with failover: pick the next ready one in turn, cool one down, drop one
    for good. `describe(index)` names a member in logs (never a key itself);
    `on_empty` builds the error that stops the run once none is left; `secrets` are
    scrubbed from texts (by default the members themselves: API keys)."""

    def __init__(
        self,
        members: Sequence[str],
        on_empty: OnEmpty,
        describe: Callable[[int], str] | None = None,
        secrets: Iterable[str] | None = None,
    ) -> None:
        self._members = list(members)
        self._on_empty = on_empty
        self._describe = describe or (lambda i: f"member {i + 1} of {len(self._members)}")
        self._secrets = [s for s in (self._members if secrets is None else secrets) if s]
        self._cool_until = dict.fromkeys(range(len(members)), 0.0)
        self._left: dict[int, tuple[str, str]] = {}  # index -> (why, the server's status)
        self._lock = threading.Lock()
        self._turn = 0

    def __len__(self) -> int:
        return len(self._cool_until)

    def pick(self) -> int:
        """The index of the member to use next: a ready one, in turn, else the one ready
        soonest; when none is left, raises the run-level error that says why (another
        thread may have emptied the pool)."""
        with self._lock:
            if not self._cool_until:
                raise self._on_empty(list(self._left.values()))
            now = time.monotonic()
            order = sorted(self._cool_until)
            self._turn += 1
            ready = [i for i in order if self._cool_until[i] <= now]
            if ready:
                return ready[self._turn % len(ready)]
            return min(order, key=lambda i: self._cool_until[i])

    def key(self, index: int) -> str:
        return self._members[index]

    def cool(self, index: int, seconds: float) -> None:
        with self._lock:
            if index in self._cool_until:
                self._cool_until[index] = time.monotonic() + seconds

    def ready_in(self) -> float | None:
        """Seconds until some member is off its cool-down (0: one is ready now)."""
        with self._lock:
            if not self._cool_until:
                return None
            return max(0.0, min(self._cool_until.values()) - time.monotonic())

    def leave(self, index: int, why: str, status: str) -> int:
        """Drop a member for good (`why`: REJECTED or DAILY_QUOTA, `status` the server's
        answer); returns how many are left. A member that already left keeps its reason."""
        with self._lock:
            dropped = self._cool_until.pop(index, None) is not None
            if dropped:
                self._left[index] = (why, status)
            left = len(self._cool_until)
        if dropped and left:
            log.warning(
                "%s left the pool (%s: %s); %d left", self._describe(index), why, status, left
            )
        return left

    def exhausted(self) -> ImgbatchError:
        """The error that stops the run once no member is left (see `on_empty`)."""
        with self._lock:
            return self._on_empty(list(self._left.values()))

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
