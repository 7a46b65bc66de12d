"""Seeing results: `report` (the HTML contact sheet) and `server` (the HTTP API, the
event stream and the dashboard of `imgbatch serve`, the `imgbatch[serve]` extra)."""

from __future__ import annotations

import importlib
from importlib import resources
from types import ModuleType

from imgbatch.errors import UsageError

PIP_SERVE = "pip install 'imgbatch[serve]'"


def static(name: str) -> str:
    """A file of the pages (CSS, JS, HTML) shipped with the package, as text."""
    return resources.files("imgbatch.web").joinpath("static").joinpath(name).read_text("utf-8")


def load_server() -> ModuleType:
    """imgbatch.web.server, or a UsageError naming the pip command when the extra that
    it needs (Starlette, uvicorn, sse-starlette) is missing."""
    try:
        return importlib.import_module("imgbatch.web.server")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("starlette", "uvicorn", "sse_starlette"):
            raise UsageError(
                f"imgbatch serve needs {exc.name.split('.')[0]}, which is not installed: "
                f"{PIP_SERVE}"
            ) from None
        raise
