"""`imgbatch dupes` reads ROOT's stored files lean (issue 22, item 3, its speed): a stored
result is read only for a content whose pHash no earlier `dupes` stored, each file is
looked at once, and the groups are those of the export records (non-UTF-8 names,
mtimes to the microsecond), through the real CLI and the Python API on real images."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

from PIL import Image

from imgbatch.config import Settings, results_dir
from imgbatch.dupes import find
from tests.conftest import run_cli, the_state_folder
from tests.fakegemini import FakeGemini
from tests.test_dupes import KEY, SKIMAGE, check_groups, dupes, make_tree


def gemini_env(server: FakeGemini) -> dict[str, str]:
    return {
        "GEMINI_API_KEY": KEY,
        "IMGBATCH_GEMINI_BASE_URL": server.url,
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "6000",
    }


def test_a_result_is_not_read_when_dupes_stored_its_phash(tmp_path: Path) -> None:
    """After a Gemini run and a `dupes` (25 contents' pHashes stored), a local run leaves
    results with pHashes: the next `dupes` reads only the result of the one content
    added since, and groups as before."""
    photos = make_tree(tmp_path / "photos")
    with FakeGemini(keys={KEY}) as server:
        assert run_cli(["analyze", photos], env=gemini_env(server)).rc == 0
    first = dupes(photos)
    assert first.rc == 0, first.stderr
    assert "25 computed now" in first.stderr
    # one new content: unrelated to every other photo
    shutil.copyfile(SKIMAGE / "page.png", photos / "page.png")
    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    res = dupes(photos)
    assert res.rc == 0, res.stderr
    assert res.records == first.records
    check_groups(photos, res.records)
    # the 25 contents dupes knows are not taken from their results; the new one is
    assert "1 from stored results, 25 stored by dupes, 0 computed now" in res.stderr
    found = find(the_state_folder(), results_dir(Settings()))
    assert found.results_read == 1
    assert (found.from_results, found.known, found.computed) == (1, 25, 0)
    assert found.groups == res.records


def test_results_are_read_once_per_content_without_a_stored_phash(tmp_path: Path) -> None:
    photos = make_tree(tmp_path / "photos")
    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    state = the_state_folder()
    found = find(state, results_dir(Settings()))
    # 30 files, 25 contents: one read per content, every file's pHash from a result
    assert found.results_read == 25
    assert (found.from_results, found.known, found.computed) == (30, 0, 0)
    assert not (state / "phashes.db").exists()  # nothing computed, nothing written
    check_groups(photos, found.groups)


def test_a_non_utf8_name_keeps_its_bytes_in_the_groups(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(SKIMAGE / "chelsea.png").convert("RGB").save(photos / "cat.png")
    raw = os.fsencode(str(photos)) + b"/chat \xe9t\xe9.png"
    shutil.copyfile(photos / "cat.png", os.fsdecode(raw))
    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    res = dupes(photos)
    assert res.rc == 0, res.stderr
    (group,) = res.records
    odd = next(f for f in group["files"] if "path_bytes_b64" in f)
    assert base64.b64decode(odd["path_bytes_b64"]) == raw
    assert odd["path"] == str(photos / "chat \ufffdt\ufffd.png")
    # as export shows the file
    exported = run_cli(["export", photos]).records
    (record,) = [r for r in exported if "path_bytes_b64" in r]
    assert (record["path"], record["path_bytes_b64"]) == (odd["path"], odd["path_bytes_b64"])


def test_gone_changed_and_dangling_files_and_microsecond_mtimes(tmp_path: Path) -> None:
    """Left out as export's records would have them: a file deleted or replaced by a
    dangling link is gone, one rewritten (same size, new mtime) changed; an mtime moved
    within its microsecond is the mtime recorded (export's `mtime` is to the us)."""
    photos = make_tree(tmp_path / "photos")
    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    (photos / "chelsea_copy.png").unlink()
    (photos / "coffee_copy.png").unlink()
    (photos / "coffee_copy.png").symlink_to(photos / "nowhere.png")
    st = (photos / "rocket_copy.png").stat()
    os.utime(photos / "rocket_copy.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    # the same microsecond: the mtime as recorded
    st = (photos / "astronaut_copy.png").stat()
    ns = st.st_mtime_ns - st.st_mtime_ns % 1000
    os.utime(
        photos / "astronaut_copy.png",
        ns=(st.st_atime_ns, ns + (999 if ns == st.st_mtime_ns else 0)),
    )
    if (photos / "astronaut_copy.png").stat().st_mtime_ns == st.st_mtime_ns:
        raise AssertionError("the file system keeps no nanoseconds: nothing tested")
    res = dupes(photos)
    assert res.rc == 0, res.stderr
    assert "left out: 1 changed, 2 gone (run `imgbatch analyze` again)" in res.stderr
    names = {Path(f["path"]).name for g in res.records for f in g["files"]}
    assert not names & {"chelsea_copy.png", "coffee_copy.png", "rocket_copy.png"}
    assert "astronaut_copy.png" in names
