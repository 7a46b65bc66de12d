"""Training-set manifests of the analysed images: Hugging Face `imagefolder` metadata
(`export --format hf`, a `metadata.jsonl`) and Label Studio tasks with pre-annotations
(`export --format labelstudio`, a JSON array).

Each writer takes the stream of export records and holds one line or task at a time. An
image gone or changed since it was analysed is left out with a warning (`datasets`
fails on a listed file that is missing; a changed image's analysis describes something
else), and so is a name that JSON cannot carry (not UTF-8) where the format needs it.
It reads no checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

from imgbatch.errors import UsageError
from imgbatch.exports import Record, image_path, same_file
from imgbatch.records import json_line

log = logging.getLogger("imgbatch")


@dataclass
class ManifestSummary:
    """What a manifest export wrote and left out."""

    written: int = 0
    gone: int = 0  # the image no longer exists, or changed since it was analysed
    not_utf8: int = 0  # a name the format cannot carry


def _strings(value: Any) -> list[str]:
    """A result's list field as strings only (anything else: an empty list), so every
    line has the same types and `datasets` infers one schema."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _description(result: dict[str, Any]) -> str:
    value = result.get("description")
    return value if isinstance(value, str) else ""


def _result(rec: Record) -> dict[str, Any]:
    result = rec.get("result")
    return result if isinstance(result, dict) else {}


class _Manifest:
    """The rules both manifests share: which records, which images are left out."""

    summary: ManifestSummary

    def entry(self, rec: Record, image: str) -> dict[str, Any] | None:
        """The line or task of one image still as analysed (None: left out)."""
        raise NotImplementedError

    def entries(self, records: Iterable[Record]) -> Iterable[dict[str, Any]]:
        """The entries of the ok records whose image is still the one analysed."""
        for rec in records:
            if rec.get("status") != "ok":
                continue
            image = image_path(rec)
            try:
                same = same_file(os.stat(image), rec)
            except OSError:
                same = False
            if not same:
                self.summary.gone += 1
                log.warning("left out %s: gone or changed since it was analysed", rec["path"])
                continue
            entry = self.entry(rec, image)
            if entry is not None:
                self.summary.written += 1
                yield entry


def _not_utf8(summary: ManifestSummary, rec: Record, why: str) -> None:
    summary.not_utf8 += 1
    log.warning("left out %s: its name is not UTF-8, which %s", rec["path"], why)


class HfWriter(_Manifest):
    """Hugging Face `imagefolder` metadata: one JSON line per image, `file_name` relative
    to the output file's folder, `text` the description, then `tags`, `objects`,
    `colors` and `hash`."""

    def __init__(self, root: str, output: str) -> None:
        """UsageError if ROOT (resolved) is not inside the output file's folder: then
        `imagefolder` could not reach the images."""
        base = os.path.realpath(os.path.dirname(os.path.abspath(output)))
        real_root = os.path.realpath(root)
        to_root = os.path.relpath(real_root, base)
        if to_root == os.pardir or to_root.startswith(os.pardir + os.sep):
            raise UsageError(
                f"--format hf: ROOT ({real_root}) must be inside the folder of {output} "
                f"({base}), where `imagefolder` looks for the images"
            )
        if os.path.basename(output) != "metadata.jsonl":
            log.warning("--format hf: `imagefolder` reads a file named metadata.jsonl only")
        self.root = root
        self.to_root = "" if to_root == os.curdir else to_root
        self.summary = ManifestSummary()

    def entry(self, rec: Record, image: str) -> dict[str, Any] | None:
        """One metadata line."""
        if rec.get("path_bytes_b64"):
            _not_utf8(self.summary, rec, "metadata.jsonl cannot hold")
            return None
        name = os.path.join(self.to_root, os.path.relpath(image, self.root))
        result = _result(rec)
        return {
            "file_name": name.replace(os.sep, "/"),
            "text": _description(result),
            "tags": _strings(result.get("tags")),
            "objects": _strings(result.get("objects")),
            "colors": _strings(result.get("colors")),
            "hash": rec.get("hash"),
        }

    def write_all(self, records: Iterable[Record], out: IO[bytes]) -> ManifestSummary:
        """Every line to `out`; returns what was written and left out."""
        for entry in self.entries(records):
            out.write(json_line(entry))
        return self.summary


class LabelStudioWriter(_Manifest):
    """Label Studio tasks with pre-annotations, one per image: the tags as `choices`
    (from_name "tags"), the description as `textarea` (from_name "caption"), both
    to_name "image", under the model's name as `model_version`."""

    def __init__(self, root: str, root_url: str | None = None) -> None:
        """With `root_url`, `data.image` is that URL followed by the path relative to
        ROOT, percent-encoded (Label Studio's local files: '/data/local-files/?d=...');
        else the image's absolute path."""
        self.root = root
        self.root_url = root_url
        self.summary = ManifestSummary()

    def entry(self, rec: Record, image: str) -> dict[str, Any] | None:
        """One task."""
        if self.root_url is not None:
            rel = os.fsencode(os.path.relpath(image, self.root))  # a name's own bytes
            where = self.root_url + quote(rel, safe="/")
        elif rec.get("path_bytes_b64"):
            _not_utf8(self.summary, rec, "JSON cannot hold (--ls-root-url can)")
            return None
        else:
            where = os.path.abspath(image)
        result = _result(rec)
        found: list[dict[str, Any]] = []
        if tags := _strings(result.get("tags")):
            found.append(_region("tags", "choices", {"choices": tags}))
        if description := _description(result):
            found.append(_region("caption", "textarea", {"text": [description]}))
        prediction = {"model_version": rec.get("model"), "result": found}
        return {"data": {"image": where}, "predictions": [prediction]}

    def write_all(self, records: Iterable[Record], out: IO[bytes]) -> ManifestSummary:
        """The JSON array of tasks to `out`, one task a line; returns what was written."""
        out.write(b"[")
        for i, entry in enumerate(self.entries(records)):
            out.write(b",\n" if i else b"\n")
            out.write(json_line(entry)[:-1])
        out.write(b"\n]\n" if self.summary.written else b"]\n")
        return self.summary


def _region(from_name: str, typ: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"from_name": from_name, "to_name": "image", "type": typ, "value": value}
