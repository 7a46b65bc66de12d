"""`imgbatch export --format xmp | parquet` through the real CLI; the sidecars are read back
with exiftool, the Parquet files with DuckDB."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from imgbatch import exports
from imgbatch.records import iso_utc
from tests.conftest import REPO, CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini

FAKE = {"IMGBATCH_RPM": "60000"}  # the fake remote provider, unpaced: tags w<width>, fake
KEY = "test-key-SECRET-0123456789"

# A darktable sidecar as darktable 4 writes it (history, masks, a RAW+JPEG link), with a
# keyword, a Lightroom hierarchy and a French caption of the user's.
DARKTABLE_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   exif:DateTimeOriginal="2021:05:01 12:00:00"
   xmp:Rating="4"
   xmpMM:DerivedFrom="a.jpg"
   darktable:import_timestamp="63791222400000000"
   darktable:xmp_version="5"
   darktable:history_end="1">
   <darktable:history>
    <rdf:Seq>
     <rdf:li
      darktable:num="0"
      darktable:operation="exposure"
      darktable:enabled="1"
      darktable:modversion="6"
      darktable:params="0000000000000000cdcccc3d0000803f"
      darktable:multi_name=""/>
    </rdf:Seq>
   </darktable:history>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Holiday</rdf:li>
     <rdf:li>fake</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>Places|Paris</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <dc:description>
    <rdf:Alt>
     <rdf:li xml:lang="fr-FR">Une photo</rdf:li>
    </rdf:Alt>
   </dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

# -- helpers ----------------------------------------------------------------------------


def analyze_fake(root: Path) -> None:
    res = run_cli(["analyze", "--provider", "fake", root], env=FAKE, module="tests.fake_cli")
    assert res.rc == 0, res.stderr


def export(*args: str | Path) -> CliResult:
    return run_cli(["export", *args])


@pytest.fixture(scope="session")
def exiftool() -> str:
    path = shutil.which("exiftool")
    if path is None:
        pytest.skip("exiftool is not installed (Debian: apt-get install libimage-exiftool-perl)")
    return path


def read_xmp(exiftool: str, path: Path) -> dict[str, Any]:
    """Every tag exiftool reads in a sidecar, by group: {"XMP-dc:Subject": [...], ...}."""
    out = subprocess.run(
        [exiftool, "-j", "-G1", "-struct", "-XMP:all", path], capture_output=True, check=True
    )
    tags: dict[str, Any] = json.loads(out.stdout)[0]
    tags.pop("SourceFile")
    return tags


def as_list(value: Any) -> list[Any]:
    """exiftool's JSON gives a one-item list as the item itself."""
    return value if isinstance(value, list) else [] if value is None else [value]


def sidecars(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".xmp"))


def leftovers(root: Path) -> list[str]:
    """Temporary files of an atomic write."""
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def run_without(module: str, *args: str | Path) -> CliResult:
    """The CLI in a Python where `module` cannot be imported (an extra not installed)."""
    code = f"import sys; sys.modules[{module!r}] = None; from imgbatch.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


# -- XMP sidecars -----------------------------------------------------------------------


class TestXmp:
    @pytest.fixture
    def photos(self, tmp_path: Path) -> Path:
        root = tmp_path / "photos"
        make_image(root / "a.jpg", size=(20, 16))
        make_image(root / "sub" / "b.png", size=(21, 16))
        analyze_fake(root)
        return root

    def test_a_sidecar_beside_each_image_with_keywords_description_and_our_fields(
        self, photos: Path, exiftool: str
    ) -> None:
        res = export(photos, "--format", "xmp")
        assert res.rc == 0, res.stderr
        assert res.stdout == b""  # stdout is data only: nothing to say but in a dry run
        assert "xmp sidecars: 2 created, 0 updated, 0 unchanged" in res.stderr
        assert sidecars(photos) == ["a.jpg.xmp", "b.png.xmp"]
        tags = read_xmp(exiftool, photos / "sub" / "b.png.xmp")
        assert tags["XMP-dc:Subject"] == ["w21", "fake"]
        assert tags["XMP-dc:Description"] == "a test image"
        [record] = [r for r in export(photos).records if r["path"].endswith("b.png")]
        assert tags["XMP-imgbatch:Provider"] == "fake"
        assert tags["XMP-imgbatch:Model"] == "fake-1"
        assert tags["XMP-imgbatch:Hash"] == record["hash"]
        assert tags["XMP-imgbatch:Keywords"] == ["w21", "fake"]
        # dc:subject is an unordered array (rdf:Bag) in the Dublin Core schema
        rdf = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
        tree = ET.parse(photos / "sub" / "b.png.xmp")
        bag = tree.find(f".//{{http://purl.org/dc/elements/1.1/}}subject/{rdf}Bag")
        assert bag is not None and [li.text for li in bag] == ["w21", "fake"]

    def test_an_existing_sidecar_is_merged_and_only_our_keywords_are_replaced(
        self, photos: Path, exiftool: str
    ) -> None:
        sidecar = photos / "a.jpg.xmp"
        sidecar.write_text(DARKTABLE_XMP)
        before = read_xmp(exiftool, sidecar)
        assert export(photos, "--format", "xmp").rc == 0

        def theirs(tags: dict[str, Any]) -> dict[str, Any]:
            ours = ("XMP-dc:Subject", "XMP-dc:Description", "XMP-x:XMPToolkit")
            return {k: v for k, v in tags.items() if k not in ours and "imgbatch" not in k}

        after = read_xmp(exiftool, sidecar)
        assert theirs(after) == theirs(before)  # darktable's history, rating, hierarchy...
        assert after["XMP-darktable:History"][0]["Operation"] == "exposure"
        # "fake" was the user's keyword already: it stays theirs, only w20 is ours
        assert after["XMP-dc:Subject"] == ["Holiday", "fake", "w20"]
        assert as_list(after["XMP-imgbatch:Keywords"]) == ["w20"]
        assert after["XMP-dc:Description"] == "a test image"  # there was no x-default one
        assert after["XMP-dc:Description-fr-FR"] == "Une photo"

        # the picture changes, its new analysis replaces our keyword and nothing else
        make_image(photos / "a.jpg", size=(30, 16))
        analyze_fake(photos)
        res = export(photos, "--format", "xmp")
        assert res.rc == 0 and "0 created, 1 updated, 1 unchanged" in res.stderr
        again = read_xmp(exiftool, sidecar)
        assert again["XMP-dc:Subject"] == ["Holiday", "fake", "w30"]
        assert as_list(again["XMP-imgbatch:Keywords"]) == ["w30"]
        assert theirs(again) == theirs(before)

    def test_a_caption_someone_wrote_is_kept(self, photos: Path, exiftool: str) -> None:
        sidecar = photos / "a.jpg.xmp"
        subprocess.run(
            [exiftool, "-q", "-XMP-dc:Description=My caption", "-XMP-xmp:Rating=2", sidecar],
            check=True,
        )
        assert export(photos, "--format", "xmp").rc == 0
        tags = read_xmp(exiftool, sidecar)
        assert tags["XMP-dc:Description"] == "My caption"
        assert tags["XMP-xmp:Rating"] == 2
        assert tags["XMP-dc:Subject"] == ["w20", "fake"]
        assert "XMP-imgbatch:Description" not in tags  # so a later export leaves it alone

    def test_sidecars_get_the_images_permissions_and_are_written_atomically(
        self, photos: Path
    ) -> None:
        os.chmod(photos / "a.jpg", 0o604)  # neither mkstemp's 0600 nor the umask's 0644
        os.chmod(photos / "sub" / "b.png", 0o640)
        existing = photos / "sub" / "b.png.xmp"
        existing.write_text(DARKTABLE_XMP)
        existing.chmod(0o660)  # an existing sidecar keeps its own
        assert export(photos, "--format", "xmp").rc == 0
        assert (photos / "a.jpg.xmp").stat().st_mode & 0o7777 == 0o604
        assert existing.stat().st_mode & 0o7777 == 0o660
        assert leftovers(photos) == [] and leftovers(photos / "sub") == []

    @pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
    def test_as_root_a_sidecar_belongs_to_the_images_owner(self, photos: Path) -> None:
        os.chown(photos / "a.jpg", 65534, 65534)
        assert export(photos, "--format", "xmp").rc == 0
        st = (photos / "a.jpg.xmp").stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534)

    def test_dry_run_lists_what_would_change_and_writes_nothing(self, photos: Path) -> None:
        existing = photos / "a.jpg.xmp"
        existing.write_text(DARKTABLE_XMP)
        res = export(photos, "--format", "xmp", "--dry-run")
        assert res.rc == 0, res.stderr
        assert res.records == [
            {
                "image": str(photos / "a.jpg"),
                "sidecar": str(existing),
                "action": "update",
                "add_keywords": ["w20"],
                "remove_keywords": [],
                "description": "a test image",
            },
            {
                "image": str(photos / "sub" / "b.png"),
                "sidecar": str(photos / "sub" / "b.png.xmp"),
                "action": "create",
                "add_keywords": ["w21", "fake"],
                "remove_keywords": [],
                "description": "a test image",
            },
        ]
        assert "(dry run, nothing written): 1 to create, 1 to update" in res.stderr
        assert existing.read_text() == DARKTABLE_XMP and sidecars(photos) == ["a.jpg.xmp"]

        assert export(photos, "--format", "xmp").rc == 0
        st = existing.stat()
        res = export(photos, "--format", "xmp", "--dry-run")
        assert res.stdout == b"" and "0 to create, 0 to update, 2 unchanged" in res.stderr
        res = export(photos, "--format", "xmp")  # nothing to change: nothing rewritten
        assert "0 created, 0 updated, 2 unchanged" in res.stderr
        assert (existing.stat().st_ino, existing.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    def test_basename_naming_skips_images_that_share_a_name(
        self, tmp_path: Path, exiftool: str
    ) -> None:
        root = tmp_path / "photos"
        make_image(root / "IMG_0001.JPG", size=(20, 16))
        make_image(root / "IMG_0001.png", size=(21, 16))
        make_image(root / "IMG_0002.jpg", size=(22, 16))
        analyze_fake(root)
        res = export(root, "--format", "xmp", "--xmp-naming", "basename")
        assert res.rc == 0, res.stderr
        assert sidecars(root) == ["IMG_0002.xmp"]
        assert read_xmp(exiftool, root / "IMG_0002.xmp")["XMP-dc:Subject"] == ["w22", "fake"]
        warned = [line for line in res.stderr.splitlines() if "IMG_0001.xmp" in line]
        assert len(warned) == 2 and "IMG_0001.JPG" in warned[0] and "IMG_0001.png" in warned[1]
        assert "2 skipped: basename shared with another image" in res.stderr

    def test_results_without_tags_or_description_get_no_sidecar(self, tmp_path: Path) -> None:
        root = tmp_path / "photos"
        for i in range(3):
            make_image(root / f"{i}.jpg", size=(20 + i, 16))
        assert run_cli(["analyze", root]).rc == 0  # the offline analyzer: no tags
        res = export(root, "--format", "xmp")
        assert res.rc == 0, res.stderr
        assert sidecars(root) == []
        assert "0 created, 0 updated, 0 unchanged, 3 results without tags" in res.stderr

    def test_images_gone_or_changed_since_analysed_get_no_sidecar(self, photos: Path) -> None:
        (photos / "a.jpg").unlink()
        make_image(photos / "sub" / "b.png", size=(40, 40))  # not what was analysed
        res = export(photos, "--format", "xmp")
        assert res.rc == 0, res.stderr
        assert sidecars(photos) == []
        assert "2 skipped: image gone or changed since analysed" in res.stderr

    def test_a_sidecar_that_is_not_xmp_is_left_alone_and_the_exit_code_says_so(
        self, photos: Path
    ) -> None:
        (photos / "a.jpg.xmp").write_text("not XMP at all\n")
        res = export(photos, "--format", "xmp")
        assert res.rc == 1
        assert f"{photos / 'a.jpg.xmp'} is not readable XMP" in res.stderr
        assert "1 created" in res.stderr and "1 failed" in res.stderr
        assert (photos / "a.jpg.xmp").read_text() == "not XMP at all\n"

    def test_odd_keywords_and_captions_survive_the_round_trip(
        self, tmp_path: Path, exiftool: str
    ) -> None:
        image = make_image(tmp_path / "x.jpg")
        st = image.stat()
        record = {
            "path": str(image),
            "hash": "0" * 32,
            "size": st.st_size,
            "mtime": iso_utc(st.st_mtime_ns),
            "status": "ok",
            "provider": "gemini",
            "model": "m",
            "result": {
                "tags": ['say "cheese" & <smile>', "café, crème", "type=Bag", "bell\x07", "  "],
                "description": 'Two lines,\nthen, lang="fr" <b>this</b>',
            },
        }
        for expected in ("1 created", "1 unchanged"):  # read back as it was written
            writer = exports.SidecarWriter(emit=lambda line: None)
            assert expected in writer.write_all([record]).line()
        tags = read_xmp(exiftool, tmp_path / "x.jpg.xmp")
        assert tags["XMP-dc:Subject"] == ['say "cheese" & <smile>', "café, crème", "bell"]
        assert tags["XMP-dc:Description"] == 'Two lines,\nthen,\u00a0lang="fr" <b>this</b>'

    def test_usage_errors(self, photos: Path, tmp_path: Path) -> None:
        for args, message in [
            (["--xmp-naming", "stem"], "--xmp-naming must be full or basename"),
            (["-o", tmp_path / "x.xmp"], "no --output"),
            (["--status", "error"], "ok results only"),
        ]:
            res = export(photos, "--format", "xmp", *args)
            assert res.rc == 2 and message in res.stderr, res.stderr
        res = export(photos, "--dry-run")
        assert res.rc == 2 and "go with --format xmp" in res.stderr

    def test_without_the_extra_it_is_exit_2_with_the_pip_command(self, photos: Path) -> None:
        res = run_without("pyexiv2", "export", photos, "--format", "xmp")
        assert res.rc == 2
        assert res.stderr.strip() == (
            "imgbatch: error: --format xmp needs pyexiv2, which is not installed: "
            "pip install 'imgbatch[xmp]'"
        )
        assert sidecars(photos) == []


# -- Parquet ----------------------------------------------------------------------------


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY}, seed=3) as fake:
        yield fake
        assert fake.errors == []


def analyze_gemini(server: FakeGemini, root: Path, *args: str | Path) -> None:
    env = {"GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url, "IMGBATCH_RPM": "6000"}
    res = run_cli(["analyze", *args, root], env=env)
    assert res.rc == 0, res.stderr


def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return duckdb.connect().execute(sql, list(params)).fetchall()


def columns(path: Path) -> dict[str, str]:
    described = query("DESCRIBE SELECT * FROM read_parquet(?)", str(path))
    return {name: typ for name, typ, *_ in described}


class TestParquet:
    def test_ai_results_as_typed_columns_and_tags_unnested_in_duckdb(
        self, gemini: FakeGemini, tmp_path: Path
    ) -> None:
        root = tmp_path / "photos"
        for i in range(5):
            make_image(root / f"{i}.jpg", size=(40, 30), color=(50 * i, 90, 150))
        analyze_gemini(gemini, root)
        target = tmp_path / "results.parquet"
        res = export(root, "--format", "parquet", "-o", target)
        assert res.rc == 0, res.stderr
        assert "exported 5 records" in res.stderr
        umask = os.umask(0o022)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as `> file` would, not 0600
        jsonl = {r["path"]: r for r in export(root).records}

        f = str(target)
        tags = query(
            "SELECT tag, count(*) FROM (SELECT unnest(result.tags) AS tag FROM read_parquet(?))"
            " GROUP BY tag",
            f,
        )
        expected = Counter(t for r in jsonl.values() for t in r["result"]["tags"])
        assert dict(tags) == expected and sum(expected.values()) >= 5
        rows = query(
            "SELECT path, hash, size, status, provider, model, input_tokens, output_tokens,"
            " result.description, result.tags, result.objects, result.colors, result.mood,"
            " result.text, result.width, result_other FROM read_parquet(?)",
            f,
        )
        assert len(rows) == 5
        for path, hash_, size, status, provider, model, tin, tout, *ai, width, other in rows:
            rec = jsonl[path]
            assert (hash_, size, status, provider, model) == (
                rec["hash"],
                rec["size"],
                "ok",
                "gemini",
                "gemini-2.5-flash-lite",
            )
            assert tin == rec["input_tokens"] and tin > 0 and tout == rec["output_tokens"] > 0
            keys = ["description", "tags", "objects", "colors", "mood", "text"]
            assert ai == [rec["result"][k] for k in keys]
            assert width is None and other is None  # the offline fields stay empty
        types = columns(target)
        assert types["mtime"] == "TIMESTAMP WITH TIME ZONE"
        assert types["input_tokens"] == "BIGINT"
        assert "tags VARCHAR[]" in types["result"]

    def test_offline_results_and_errors_are_typed_too_in_the_same_schema(
        self, tmp_path: Path
    ) -> None:
        offline = tmp_path / "offline"
        make_image(offline / "blue.png", size=(20, 16), color=(20, 60, 220))
        (offline / "bad.jpg").write_text("not an image")
        assert run_cli(["analyze", offline]).rc == 1
        remote = tmp_path / "remote"
        make_image(remote / "a.jpg")
        analyze_fake(remote)
        for root in (offline, remote):
            assert export(root, "--format", "parquet", "-o", tmp_path / f"{root.name}.pq").rc == 0
        assert columns(tmp_path / "offline.pq") == columns(tmp_path / "remote.pq")

        f = str(tmp_path / "offline.pq")
        ok = query(
            "SELECT result.width, result.height, result.format, result.exif.orientation,"
            " result.dominant_colors[1].name, result.dominant_colors[1].fraction,"
            " result.blurry, typeof(result.brightness), result.tags, error FROM read_parquet(?)"
            " WHERE status = 'ok'",
            f,
        )
        assert ok == [(20, 16, "PNG", None, "blue", 1.0, True, "DOUBLE", None, None)]
        [(code, message, result)] = query(
            "SELECT error.code, error.message, result FROM read_parquet(?) WHERE status='error'",
            f,
        )
        assert code == "BAD_IMAGE" and message and result is None
        only_errors = tmp_path / "errors.pq"
        res = export(offline, "--format", "parquet", "--status", "error", "-o", only_errors)
        assert res.rc == 0, res.stderr
        assert query("SELECT count(*) FROM read_parquet(?)", str(only_errors)) == [(1,)]

    def test_a_custom_schemas_result_is_json_text(self, gemini: FakeGemini, tmp_path: Path) -> None:
        schema = {
            "type": "object",
            "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
            "required": ["animal", "count"],
        }
        (tmp_path / "schema.json").write_text(json.dumps(schema))
        root = tmp_path / "photos"
        make_image(root / "a.jpg")
        analyze_gemini(gemini, root, "--schema", tmp_path / "schema.json")
        target = tmp_path / "custom.parquet"
        assert export(root, "--format", "parquet", "-o", target).rc == 0
        [(result, animal, count)] = query(
            "SELECT result, json_extract_string(result_other, '$.animal'),"
            " json_extract(result_other, '$.count')::INTEGER FROM read_parquet(?)",
            str(target),
        )
        [rec] = export(root).records
        assert result is None
        assert (animal, count) == (rec["result"]["animal"], rec["result"]["count"])

    def test_written_in_row_groups_with_odd_values_kept_as_json(self, tmp_path: Path) -> None:
        def records() -> Iterator[dict[str, Any]]:
            for i in range(25):
                result: dict[str, Any] = {"tags": [f"t{i}"], "description": "d\udcff"}
                if i == 7:
                    result = {"tags": [{"name": "cat"}], "width": "wide", "mood": "calm"}
                yield {"path": f"/p/{i}.jpg", "mtime": "2024-05-01T12:00:00.000001Z",
                       "status": "ok", "result": result}  # fmt: skip

        target = tmp_path / "rows.parquet"
        with target.open("wb") as fh:
            assert exports.write_parquet(records(), fh, row_group=10) == 25
        f = str(target)
        assert query("SELECT count(DISTINCT row_group_id) FROM parquet_metadata(?)", f) == [(3,)]
        [odd] = query(
            "SELECT result.mood, result.tags, result_other, mtime::VARCHAR FROM read_parquet(?)"
            " WHERE path = '/p/7.jpg'",
            f,
        )
        assert odd[:2] == ("calm", None)
        assert json.loads(odd[2]) == {"tags": [{"name": "cat"}], "width": "wide"}
        assert odd[3] == "2024-05-01 12:00:00.000001+00"
        assert query("SELECT result.description FROM read_parquet(?) LIMIT 1", f) == [("d\ufffd",)]

    def test_parquet_needs_an_output_file(self, tmp_path: Path) -> None:
        root = tmp_path / "photos"
        make_image(root / "a.jpg")
        assert run_cli(["analyze", root]).rc == 0
        res = export(root, "--format", "parquet")
        assert res.rc == 2 and "--format parquet needs --output FILE" in res.stderr
        assert res.stdout == b""

    def test_without_the_extra_it_is_exit_2_with_the_pip_command(self, tmp_path: Path) -> None:
        root = tmp_path / "photos"
        make_image(root / "a.jpg")
        assert run_cli(["analyze", root]).rc == 0
        res = run_without("pyarrow", "export", root, "--format", "parquet", "-o", tmp_path / "x")
        assert res.rc == 2
        assert res.stderr.strip() == (
            "imgbatch: error: --format parquet needs pyarrow, which is not installed: "
            "pip install 'imgbatch[parquet]'"
        )
        assert not (tmp_path / "x").exists()
