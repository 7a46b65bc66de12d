"""imgbatch: stream huge image folders through hashing and AI analysis, as JSON Lines.

The public API (`scan_batches`, `scan`, `analyze`, `search`, `find_dupes`: see
imgbatch/api.py) is imported lazily, on first use: `import imgbatch` stays cheap, and the
Gemini SDK (0.6 s, 50 MB) is only imported by the provider that needs it.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "analyze", "find_dupes", "scan", "scan_batches", "search"]

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (mypy knows it)
if TYPE_CHECKING:
    from typing import Any

    from imgbatch.api import analyze, find_dupes, scan, scan_batches, search

_API = frozenset({"analyze", "find_dupes", "scan", "scan_batches", "search"})


def __getattr__(name: str) -> Any:
    if name in _API:
        from imgbatch import api

        value = getattr(api, name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'imgbatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
