"""A full disk never leaves a broken line, through the real CLI onto a real small tmpfs.

`imgbatch analyze ROOT >> FILE` (a shell redirection: a write-only O_APPEND stdout) onto
a disk that fills up mid-run exits 5 with one stderr line, leaves FILE with whole JSON
lines only, and records its run as FAILED (5); once there is room, the next `>>` run
appends whole lines and the two runs together hold every image. A FILE that did not end
with a newline gets one before the first record. Also: a run's failure messages are
counted within a bound.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.config import Settings
from imgbatch.output import JsonlSink
from imgbatch.pipeline import RunOptions, analyze_root
from imgbatch.pipeline.recorder import MAX_MESSAGES
from tests.conftest import REPO, make_image, run_cli

FULL = "imgbatch: error: cannot write output: No space left on device"
PAGE = 4096  # tmpfs counts whole pages


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves `leave` bytes (whole pages) free on `disk`."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == leave
    return filler


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """60 small images, each its own content; their lines (~600 bytes) need ~36 KB."""
    root = tmp_path / "photos"
    for i in range(60):
        make_image(root / f"img{i:03d}.png", size=(16, 12), color=(i, 255 - i, 7))
    return root


def analyze_onto(out: Path, args: Sequence[str | os.PathLike[str]]) -> tuple[int, str]:
    """`imgbatch analyze ARGS >> OUT` in a shell; returns the exit code and stderr."""
    command = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "imgbatch", *args])
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        f"{command} >> {shlex.quote(str(out))}",
        shell=True,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


def strict(line: bytes) -> dict[str, Any]:
    """One strict JSON object (no NaN or Infinity) from strict UTF-8."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    record: dict[str, Any] = json.loads(line.decode("utf-8"), parse_constant=refuse)
    return record


def whole_lines(out: Path) -> list[dict[str, Any]]:
    """The file as JSON Lines, failing on a half line at its end or a glued one."""
    data = out.read_bytes()
    assert data.endswith(b"\n"), data[-80:]
    return [strict(line) for line in data.splitlines()]


def names(records: list[dict[str, Any]]) -> list[str]:
    return [Path(r["path"]).name for r in records]


def history(state: Path) -> dict[int, tuple[str, int | None]]:
    """Each run's state and exit code, as `imgbatch runs --json` shows them."""
    res = run_cli(["runs", "--json", "--checkpoint", state])
    assert res.rc == 0, res.stderr
    return {r["id"]: (r["state"], r["exit_code"]) for r in res.records}


def test_a_full_disk_leaves_whole_lines_and_the_next_run_appends_the_rest(
    small_disk: Path, photos: Path, tmp_path: Path
) -> None:
    out, state = small_disk / "out.jsonl", tmp_path / "state"
    args = ["analyze", "--provider", "local", "--quiet", "--checkpoint", state, photos]
    filler = fill(small_disk, leave=2 * PAGE)  # room for ~13 of the 60 lines
    rc, stderr = analyze_onto(out, args)
    assert rc == 5, stderr
    assert stderr.splitlines() == [FULL]
    first = whole_lines(out)
    assert 0 < len(first) < 60
    assert history(state) == {1: ("FAILED", 5)}

    filler.unlink()  # room again: the next `>>` run resumes
    rc, stderr = analyze_onto(out, args)
    assert rc == 0, stderr
    both = whole_lines(out)
    assert both[: len(first)] == first  # appended after whole lines, none glued
    assert set(names(both)) == {p.name for p in photos.iterdir()}
    assert history(state) == {1: ("FAILED", 5), 2: ("COMPLETED", 0)}


def test_when_the_last_flush_fails_the_run_record_says_failed_with_exit_5(
    small_disk: Path, tmp_path: Path
) -> None:
    # A few fast items: their lines are held and go out together at the end of the run,
    # and that last write is the one the disk refuses (the record used to stay
    # PROCESSING, which the next run reported as an earlier run killed).
    root = tmp_path / "few"
    for i in range(30):
        make_image(root / f"{i:02d}.png", size=(16, 12), color=(i, 3, 250 - i))
    out, state = small_disk / "out.jsonl", tmp_path / "state"
    args = ["analyze", "--provider", "local", "--checkpoint", state, root]
    filler = fill(small_disk, leave=PAGE)
    rc, stderr = analyze_onto(out, args)
    assert rc == 5, stderr
    assert [line for line in stderr.splitlines() if "error" in line] == [FULL]
    assert history(state) == {1: ("FAILED", 5)}
    whole_lines(out)

    filler.unlink()
    rc, stderr = analyze_onto(out, args)
    assert rc == 0, stderr
    assert "an earlier run was killed" not in stderr
    assert set(names(whole_lines(out))) == {p.name for p in root.iterdir()}


def test_emit_all_reprinted_lines_onto_a_full_disk_leave_whole_lines(
    small_disk: Path, photos: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    done = run_cli(["analyze", "--provider", "local", "--checkpoint", state, photos])
    assert done.rc == 0, done.stderr
    out = small_disk / "out.jsonl"
    args = ["analyze", "--provider", "local", "--quiet", "--emit-all", "--checkpoint", state]
    filler = fill(small_disk, leave=PAGE)
    rc, stderr = analyze_onto(out, [*args, photos])  # every line a stored one, reprinted
    assert rc == 5, stderr
    assert stderr.splitlines() == [FULL]
    assert len(whole_lines(out)) < 60
    assert history(state)[2] == ("FAILED", 5)

    filler.unlink()
    rc, stderr = analyze_onto(out, [*args, photos])
    assert rc == 0, stderr
    assert sorted(set(names(whole_lines(out)))) == sorted(p.name for p in photos.iterdir())


def test_a_scan_onto_a_full_disk_leaves_whole_lines(small_disk: Path, photos: Path) -> None:
    # `imgbatch scan ROOT >> hashes.jsonl` keeps the same promise as analyze
    out = small_disk / "hashes.jsonl"
    args = ["scan", "--quiet", "--batch-size", "5", "--no-hash-cache", photos]
    filler = fill(small_disk, leave=PAGE)  # room for ~20 of the 60 lines
    rc, stderr = analyze_onto(out, args)
    assert rc == 5, stderr
    assert stderr.splitlines() == [FULL]
    assert 0 < len(whole_lines(out)) < 60

    filler.unlink()
    rc, stderr = analyze_onto(out, args)
    assert rc == 0, stderr
    assert set(names(whole_lines(out))) == {p.name for p in photos.iterdir()}


def test_appending_to_a_file_without_a_last_newline_writes_one_first(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"{i}.png", size=(16 + i, 12))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"written": "by something else", "cut": ')  # no newline at its end
    args = ["analyze", "--provider", "local", "--quiet", root]
    rc, stderr = analyze_onto(out, args)
    assert rc == 0, stderr
    foreign, *ours = out.read_bytes().splitlines(keepends=True)
    assert foreign == b'{"written": "by something else", "cut": \n'
    assert sorted(names([strict(line) for line in ours])) == ["0.png", "1.png", "2.png"]

    make_image(root / "3.png", size=(30, 12))
    rc, stderr = analyze_onto(out, args)  # the file ends with a newline: none added
    assert rc == 0, stderr
    _, *ours = out.read_bytes().splitlines(keepends=True)
    assert names([strict(line) for line in ours])[-1] == "3.png"
    assert b"\n\n" not in out.read_bytes()


def claims_pixels(path: Path, width: int, height: int) -> None:
    """A PNG made with Pillow whose header then claims `width` x `height` pixels: too
    large to decode, and its failure message names the count (one message each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path, "PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_a_run_counts_its_failure_messages_within_a_bound(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    for i in range(20):  # one message, 20 times, first
        (root / f"a{i:02d}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / f"a{i:02d}.png").write_bytes(b"")
    distinct = MAX_MESSAGES + 60
    for i in range(distinct):  # then a message of its own each
        claims_pixels(root / f"b{i:03d}.png", 20000 + i, 20000)
    with (tmp_path / "out.jsonl").open("wb") as fh:
        summary, _ = analyze_root(
            str(root), Settings(provider="local"), RunOptions(), JsonlSink(fh.fileno())
        )
    assert summary.errors == {"BAD_IMAGE": 20 + distinct}  # every failure counted
    assert len(summary.messages) <= MAX_MESSAGES
    top = summary.record()["top_errors"]
    assert top[0] == ["BAD_IMAGE", "not a decodable image: empty file", 20]
    assert top[1][1].startswith("image too large: ")
