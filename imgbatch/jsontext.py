"""Text helpers shared by the JSON form of records and the scan's fast lines (a leaf).

It imports nothing of ours and only `time`, so the scan's worker processes (which
import it through the scan jobs) still start in ~20 ms.
"""

from __future__ import annotations

import time

__all__ = ["is_clean", "iso_seconds"]


def is_clean(text: str) -> bool:
    """Whether `text` encodes to UTF-8 as it is (no surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_iso: dict[int, str] = {}


def iso_seconds(sec: int) -> str:
    """``2024-05-01T12:00:00`` (UTC) for a Unix time in seconds; remembered, as files of
    one folder often share their second (strftime once per second seen)."""
    text = _iso.get(sec)
    if text is None:
        if len(_iso) >= 4096:
            _iso.clear()
        text = _iso[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return text
