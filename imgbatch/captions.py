"""Caption files beside the images (`export --format captions`), for training sets:
kohya's sd-scripts, taggui and wd14-tagger read `IMG_0001.txt` beside `IMG_0001.jpg`.

A caption is one line (sd-scripts reads only the first), UTF-8, with one trailing
newline. It is written under the rules of beside.py, as XMP sidecars are: in the image's
folder only, never through a symlink or into anything but a regular file, atomically
(a temporary file renamed over the name: a caption hard-linked elsewhere is replaced,
and the other link keeps its text). It reads no checkpoint: it takes the stream of
export records and holds one caption at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from imgbatch import beside
from imgbatch.errors import OutputError, UsageError
from imgbatch.exports import SYSTEMIC, ImageFolders, Record, Stems, image_path, same_file
from imgbatch.records import json_line, utf8_clean

log = logging.getLogger("imgbatch")

NAMING = ("basename", "full")
CAPTION_FROM = ("description", "tags", "both")
ON_EXISTING = ("skip", "overwrite", "append")

# control characters become spaces before white space is collapsed (str.split() alone
# keeps NUL, BEL, ESC... inside a word)
_SPACE = dict.fromkeys([*range(32), 127], " ")


def one_line(text: str) -> str:
    """`text` as (part of) one caption line: strict UTF-8, every run of white space or
    control characters a single space, trimmed."""
    return " ".join(utf8_clean(text).translate(_SPACE).split())


def caption_text(result: Any, caption_from: str = "description") -> str | None:
    """A result's caption text (without prefix), or None when it lacks the chosen field:
    the description, the tags joined with `, `, or both (the description, `, `, the tags;
    either alone when the other is missing)."""
    if not isinstance(result, dict):
        return None
    raw = result.get("description")
    description = one_line(raw) if isinstance(raw, str) else ""
    raw = result.get("tags")
    tags = [one_line(t) for t in raw if isinstance(t, str)] if isinstance(raw, list) else []
    tags_text = ", ".join(dict.fromkeys(t for t in tags if t))
    parts = {
        "description": [description],
        "tags": [tags_text],
        "both": [description, tags_text],
    }[caption_from]
    return ", ".join(p for p in parts if p) or None


@dataclass
class CaptionSummary:
    """What a captions export did (or, in a dry run, would do)."""

    dry_run: bool = False
    caption_from: str = "description"
    created: int = 0
    overwritten: int = 0
    appended: int = 0
    unchanged: int = 0  # already the caption (overwrite), or already holding it (append)
    kept: int = 0  # an existing caption left by --on-existing skip
    without: int = 0  # results without the chosen field
    shared_basename: int = 0  # another image has the same name stem
    gone: int = 0  # the image no longer exists, or changed since it was analysed
    failed: int = 0  # a caption refused (symlink, not a regular file...) or not written

    def line(self) -> str:
        """The summary for people."""
        head = "captions (dry run, nothing written)" if self.dry_run else "captions"
        field = {"description": "a description", "tags": "tags", "both": "description or tags"}
        parts = [
            f"{self.created:,} {'to create' if self.dry_run else 'created'}",
            f"{self.overwritten:,} {'to overwrite' if self.dry_run else 'overwritten'}",
            f"{self.appended:,} {'to append to' if self.dry_run else 'appended to'}",
            f"{self.unchanged:,} unchanged",
            f"{self.kept:,} existing kept",
            f"{self.without:,} results without {field[self.caption_from]} (no caption)",
        ]
        if self.shared_basename:
            parts.append(f"{self.shared_basename:,} skipped: basename shared with another image")
        if self.gone:
            parts.append(f"{self.gone:,} skipped: image gone or changed since analysed")
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        return f"{head}: " + ", ".join(parts)


class CaptionWriter:
    """Writes, replaces or extends the caption file of each analysed image."""

    def __init__(
        self,
        emit: Callable[[bytes], None],
        naming: str = "basename",
        caption_from: str = "description",
        prefix: str = "",
        on_existing: str = "skip",
        dry_run: bool = False,
    ) -> None:
        """`emit` takes the dry run's lines (one JSON object per caption that would change)."""
        for flag, value, allowed in (
            ("--caption-naming", naming, NAMING),
            ("--caption-from", caption_from, CAPTION_FROM),
            ("--on-existing", on_existing, ON_EXISTING),
        ):
            if value not in allowed:
                raise UsageError(f"{flag} must be {' or '.join(allowed)}, not {value!r}")
        self.naming = naming
        self.caption_from = caption_from
        self.prefix = one_line(prefix)
        self.on_existing = on_existing
        self.summary = CaptionSummary(dry_run=dry_run, caption_from=caption_from)
        self._emit = emit
        self._stems = Stems()
        self._root = os.geteuid() == 0  # then new captions are given to the image's owner
        self._folders = ImageFolders(dry_run)

    def caption_of(self, image: str) -> str:
        """The caption's path: `IMG_0001.txt`, or `IMG_0001.JPG.txt` with full naming."""
        return (os.path.splitext(image)[0] if self.naming == "basename" else image) + ".txt"

    def write_all(self, records: Iterable[Record]) -> CaptionSummary:
        """One caption per ok record that has the chosen field."""
        try:
            for rec in records:
                if rec.get("status") == "ok":
                    self.write(rec)
        finally:
            self._folders.close()
        return self.summary

    def write(self, rec: Record) -> None:
        """The caption of one ok record: created, replaced, extended or left as it is."""
        s = self.summary
        text = caption_text(rec.get("result"), self.caption_from)
        if text is None:
            s.without += 1
            return
        if self.prefix:
            text = f"{self.prefix}, {text}"
        image = image_path(rec)
        folder_path, name = os.path.split(image)
        try:
            # everything beside the image happens in its folder as opened here
            folder = self._folders.get(folder_path)
            st = folder.stat(name)
            same = same_file(st, rec)
        except OSError:
            same = False
        if not same:
            s.gone += 1  # captioning new content with the old analysis would be wrong
            log.debug("skipped %s: gone or changed since it was analysed", image)
            return
        caption = self.caption_of(image)
        if self.naming == "basename":
            sharing = self._stems.sharing(image)
            if len(sharing) > 1:
                s.shared_basename += 1
                log.warning(
                    "skipped %s: %s would share the caption %s (--caption-naming full "
                    "gives each its own)",
                    image,
                    " and ".join(sharing),
                    os.path.basename(caption),
                )
                return
        try:
            self._write(image, st, folder, caption, text)
        except beside.Refused as exc:
            s.failed += 1
            log.warning("skipped %s: %s", caption, exc.reason)
        except OSError as exc:
            if exc.errno in SYSTEMIC:
                raise OutputError(f"cannot write {caption}: {exc.strerror or exc}") from None
            s.failed += 1
            log.warning("cannot write %s: %s", caption, exc.strerror or exc)

    def _write(
        self, image: str, image_st: os.stat_result, folder: beside.Folder, caption: str, text: str
    ) -> None:
        s = self.summary
        name = os.path.basename(caption)
        new = (text + "\n").encode("utf-8")
        if self.on_existing == "skip":
            # whatever is there (even a symlink) is the user's to keep: it is not opened
            if folder.lstat(name) is not None:
                s.kept += 1
                return
            found = None
        else:
            # a symlink, a FIFO, a read-only caption... raise beside.Refused: left untouched
            found = folder.read(name)
        if found is None:
            action, data = "create", new
        elif self.on_existing == "overwrite":
            action, data = "overwrite", new
            if found.data == new:
                s.unchanged += 1
                return
        else:
            if text.encode("utf-8") in found.data:  # appended before: twice changes nothing
                s.unchanged += 1
                return
            before = found.data.rstrip()
            action, data = "append", (before + b", " if before else b"") + new
        if action == "create":
            s.created += 1
        elif action == "overwrite":
            s.overwritten += 1
        else:
            s.appended += 1
        if s.dry_run:
            text_after = data.decode("utf-8", "replace").removesuffix("\n")
            line = {"image": image, "caption": caption, "action": action, "text": text_after}
            self._emit(json_line(line))
            return
        # a new caption: the image's permission bits plus owner-write and, as root, its
        # owner; an existing one keeps its own
        if found is None:
            mode, st = beside.new_mode(image_st), image_st
        else:
            mode, st = beside.kept_mode(found.st), found.st
        owner = (st.st_uid, st.st_gid) if self._root else None
        folder.write(name, data, mode, owner)
