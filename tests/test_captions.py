"""`imgbatch export --format captions` through the real CLI, over results of the fake
Gemini server: one-line caption files beside the images, under the sidecar rules."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini, RecordedRequest

KEY = "test-key-SECRET-0123456789"

# The answers, by the width of the image analysed (each test image has its own width).
ANSWERS: dict[int, dict[str, Any]] = {
    40: {"description": "A red\n  car  on\ta road.\r\n", "tags": ["car", " road\n", "red"]},
    41: {"description": "A blue sky.", "tags": ["sky"]},
    42: {"description": "Café au lait, crème.", "tags": ["cup", "café"]},
    43: {"description": "", "tags": []},  # nothing to caption with
    44: {"description": "A dog.", "tags": ["dog"]},
}


def answer(request: RecordedRequest) -> dict[str, Any]:
    found = ANSWERS.get(request.images[0].width or 0, {"description": "Other.", "tags": []})
    return {"objects": [], "colors": ["gray"], "mood": "calm", "text": "", **found}


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY}, seed=3) as fake:
        fake.set_responder(answer)
        yield fake
        assert fake.errors == []


def analyze(server: FakeGemini, root: Path) -> None:
    env = {"GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url, "IMGBATCH_RPM": "6000"}
    res = run_cli(["analyze", root], env=env)
    assert res.rc == 0, res.stderr


def export(root: Path, *args: str | Path) -> CliResult:
    return run_cli(["export", root, "--format", "captions", *args])


def image(path: Path, width: int) -> Path:
    return make_image(path, size=(width, 30))


def snapshot(root: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under root: its bytes (a symlink: its target) and mode."""
    out: dict[str, tuple[bytes | str, int]] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            st = p.lstat()
            data = os.readlink(p) if p.is_symlink() else p.read_bytes()
            out[str(p.relative_to(root))] = (data, st.st_mode)
    return out


@pytest.fixture
def photos(gemini: FakeGemini, tmp_path: Path) -> Path:
    """a.jpg (the red car), sub/b.png (the blue sky) with an existing caption,
    c.jpg (the café) whose caption holds the café text already, d.jpg (no description)."""
    root = tmp_path / "photos"
    image(root / "a.jpg", 40)
    image(root / "sub" / "b.png", 41)
    image(root / "c.jpg", 42)
    image(root / "d.jpg", 43)
    analyze(gemini, root)
    (root / "sub" / "b.txt").write_text("an old caption  \n\n", encoding="utf-8")
    (root / "c.txt").write_text("mine, Café au lait, crème.\n", encoding="utf-8")
    return root


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "strict")


class TestOnExisting:
    def test_skip_is_the_default_new_captions_are_one_line(self, photos: Path) -> None:
        res = export(photos)
        assert res.rc == 0, res.stderr
        assert res.stdout == b""
        # newlines and runs of white space become single spaces; one trailing newline
        assert read(photos / "a.txt") == "A red car on a road.\n"
        assert read(photos / "sub" / "b.txt") == "an old caption  \n\n"  # kept
        assert read(photos / "c.txt") == "mine, Café au lait, crème.\n"  # kept
        assert not (photos / "d.txt").exists()  # no description: no caption
        assert (
            "captions: 1 created, 0 overwritten, 0 appended to, 0 unchanged, 2 existing kept, "
            "1 results without a description (no caption)"
        ) in res.stderr
        assert not list(photos.rglob(".*"))  # no temporary file left

    def test_overwrite_replaces_and_leaves_an_equal_caption_alone(self, photos: Path) -> None:
        res = export(photos, "--on-existing", "overwrite")
        assert res.rc == 0, res.stderr
        assert read(photos / "sub" / "b.txt") == "A blue sky.\n"
        assert read(photos / "c.txt") == "Café au lait, crème.\n"
        assert "1 created, 2 overwritten" in res.stderr
        again = export(photos, "--on-existing", "overwrite")
        assert "0 created, 0 overwritten, 0 appended to, 3 unchanged" in again.stderr

    def test_append_adds_once_and_running_it_twice_changes_nothing(self, photos: Path) -> None:
        res = export(photos, "--on-existing", "append")
        assert res.rc == 0, res.stderr
        # trailing white space removed, ", ", the new text, one newline
        assert read(photos / "sub" / "b.txt") == "an old caption, A blue sky.\n"
        assert read(photos / "c.txt") == "mine, Café au lait, crème.\n"  # held it already
        assert read(photos / "a.txt") == "A red car on a road.\n"  # none: created
        assert "1 created, 0 overwritten, 1 appended to, 1 unchanged" in res.stderr
        before = snapshot(photos)
        again = export(photos, "--on-existing", "append")
        assert again.rc == 0, again.stderr
        assert snapshot(photos) == before
        assert "0 created, 0 overwritten, 0 appended to, 3 unchanged" in again.stderr

    def test_dry_run_prints_each_change_and_writes_nothing(self, photos: Path) -> None:
        before = snapshot(photos)
        res = export(photos, "--on-existing", "append", "--dry-run", "--prefix", "sks")
        assert res.rc == 0, res.stderr
        assert snapshot(photos) == before
        lines = sorted(res.records, key=lambda r: r["image"])
        assert lines == [
            {
                "image": str(photos / "a.jpg"),
                "caption": str(photos / "a.txt"),
                "action": "create",
                "text": "sks, A red car on a road.",
            },
            {
                "image": str(photos / "c.jpg"),
                "caption": str(photos / "c.txt"),
                "action": "append",
                "text": "mine, Café au lait, crème., sks, Café au lait, crème.",
            },
            {
                "image": str(photos / "sub" / "b.png"),
                "caption": str(photos / "sub" / "b.txt"),
                "action": "append",
                "text": "an old caption, sks, A blue sky.",
            },
        ]
        assert "captions (dry run, nothing written): 1 to create" in res.stderr
        over = export(photos, "--on-existing", "overwrite", "--dry-run")
        assert {r["action"] for r in over.records} == {"create", "overwrite"}
        assert snapshot(photos) == before


class TestText:
    def test_caption_from_prefix_and_full_naming(self, gemini: FakeGemini, tmp_path: Path) -> None:
        root = tmp_path / "photos"
        image(root / "a.jpg", 40)
        image(root / "e.JPG", 44)
        analyze(gemini, root)
        res = export(root, "--caption-from", "tags")
        assert res.rc == 0, res.stderr
        assert read(root / "a.txt") == "car, road, red\n"
        assert read(root / "e.txt") == "dog\n"
        res = export(root, "--caption-from", "both", "--caption-naming", "full")
        assert res.rc == 0, res.stderr
        assert read(root / "a.jpg.txt") == "A red car on a road., car, road, red\n"
        assert read(root / "e.JPG.txt") == "A dog., dog\n"
        res = export(root, "--prefix", "  ohwx\nman ", "--on-existing", "overwrite")
        assert res.rc == 0, res.stderr
        assert read(root / "a.txt") == "ohwx man, A red car on a road.\n"
        assert read(root / "e.txt") == "ohwx man, A dog.\n"

    def test_results_without_the_field_are_counted_not_failures(
        self, gemini: FakeGemini, tmp_path: Path
    ) -> None:
        root = tmp_path / "photos"
        image(root / "d.jpg", 43)
        image(root / "e.jpg", 44)
        analyze(gemini, root)
        res = export(root, "--caption-from", "both")
        assert res.rc == 0, res.stderr
        assert "1 created" in res.stderr
        assert "1 results without description or tags (no caption)" in res.stderr
        assert sorted(p.name for p in root.iterdir()) == ["d.jpg", "e.jpg", "e.txt"]


class TestSidecarRules:
    def test_a_symlinked_caption_is_never_written_through(
        self, photos: Path, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside.txt"
        outside.write_text("not yours\n")
        (photos / "a.txt").symlink_to(outside)
        for mode in ("overwrite", "append"):
            res = export(photos, "--on-existing", mode)
            assert res.rc == 1, res.stderr
            assert f"skipped {photos / 'a.txt'}: it is a symlink" in res.stderr
            assert "1 failed" in res.stderr
            assert outside.read_text() == "not yours\n"
            assert os.readlink(photos / "a.txt") == str(outside)
        # skip leaves whatever is there, unopened: not a failure
        res = export(photos)
        assert res.rc == 0, res.stderr
        assert outside.read_text() == "not yours\n"

    def test_a_caption_that_is_not_a_regular_file_is_left_alone(self, photos: Path) -> None:
        (photos / "a.txt").mkdir()
        (photos / "sub" / "b.txt").unlink()
        os.mkfifo(photos / "sub" / "b.txt")
        res = export(photos, "--on-existing", "overwrite")
        assert res.rc == 1
        assert f"skipped {photos / 'a.txt'}: it is not a regular file" in res.stderr
        assert f"skipped {photos / 'sub' / 'b.txt'}: it is not a regular file" in res.stderr
        assert (photos / "a.txt").is_dir()
        assert stat.S_ISFIFO((photos / "sub" / "b.txt").lstat().st_mode)

    def test_a_hard_linked_caption_is_replaced_the_other_link_keeps_its_text(
        self, photos: Path, tmp_path: Path
    ) -> None:
        other = tmp_path / "elsewhere.txt"
        other.write_text("shared text\n")
        os.link(other, photos / "a.txt")
        res = export(photos, "--on-existing", "overwrite")
        assert res.rc == 0, res.stderr
        assert read(photos / "a.txt") == "A red car on a road.\n"
        assert other.read_text() == "shared text\n"
        assert (photos / "a.txt").stat().st_ino != other.stat().st_ino
        assert other.stat().st_nlink == 1

    def test_a_new_caption_has_the_images_mode_plus_owner_write(
        self, gemini: FakeGemini, tmp_path: Path
    ) -> None:
        root = tmp_path / "photos"
        image(root / "a.jpg", 40)
        image(root / "b.jpg", 41)
        analyze(gemini, root)
        os.chmod(root / "a.jpg", 0o444)  # read-only
        os.chmod(root / "b.jpg", 0o640)
        umask = os.umask(0o077)  # the umask does not narrow it
        try:
            res = export(root)
        finally:
            os.umask(umask)
        assert res.rc == 0, res.stderr
        assert stat.S_IMODE((root / "a.txt").stat().st_mode) == 0o644
        assert stat.S_IMODE((root / "b.txt").stat().st_mode) == 0o640
        # an existing caption keeps its own mode when replaced
        os.chmod(root / "a.txt", 0o600)
        res = export(root, "--on-existing", "overwrite", "--caption-from", "tags")
        assert res.rc == 0, res.stderr
        assert stat.S_IMODE((root / "a.txt").stat().st_mode) == 0o600

    def test_a_basename_collision_is_skipped_with_a_warning_naming_both(
        self, gemini: FakeGemini, tmp_path: Path
    ) -> None:
        root = tmp_path / "photos"
        image(root / "IMG_1.jpg", 40)
        image(root / "IMG_1.png", 41)
        image(root / "IMG_2.jpg", 44)
        analyze(gemini, root)
        res = export(root)
        assert res.rc == 0, res.stderr
        assert not (root / "IMG_1.txt").exists()
        assert read(root / "IMG_2.txt") == "A dog.\n"
        for name in ("IMG_1.jpg", "IMG_1.png"):
            assert (
                f"skipped {root / name}: IMG_1.jpg and IMG_1.png would share the caption IMG_1.txt"
            ) in res.stderr
        assert "2 skipped: basename shared with another image" in res.stderr
        res = export(root, "--caption-naming", "full")  # each its own
        assert res.rc == 0, res.stderr
        assert read(root / "IMG_1.jpg.txt") == "A red car on a road.\n"
        assert read(root / "IMG_1.png.txt") == "A blue sky.\n"

    def test_an_image_changed_since_analysed_gets_no_caption(
        self, gemini: FakeGemini, tmp_path: Path
    ) -> None:
        root = tmp_path / "photos"
        image(root / "a.jpg", 40)
        image(root / "b.jpg", 41)
        analyze(gemini, root)
        image(root / "a.jpg", 60)  # another picture now
        res = export(root)
        assert res.rc == 0, res.stderr
        assert not (root / "a.txt").exists()
        assert "1 skipped: image gone or changed since analysed" in res.stderr


def test_usage_errors(photos: Path, tmp_path: Path) -> None:
    for args, message in [
        (["--caption-from", "title"], "--caption-from must be description or tags or both"),
        (["--on-existing", "merge"], "--on-existing must be skip or overwrite or append"),
        (["--caption-naming", "stem"], "--caption-naming must be basename or full"),
        (["-o", tmp_path / "x.txt"], "no --output"),
        (["--status", "error"], "ok results only"),
        (["--ls-root-url", "/x/"], "--ls-root-url goes with --format labelstudio"),
    ]:
        res = export(photos, *args)
        assert res.rc == 2 and message in res.stderr, (args, res.stderr)
    res = run_cli(["export", photos, "--prefix", "sks"])
    assert res.rc == 2 and "--prefix goes with --format captions" in res.stderr
    assert not (photos / "a.txt").exists()
