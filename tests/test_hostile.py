"""Hostile trees: every case ends as an error record or a counted skip, never a crash or hang."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from imgbatch.config import Settings
from imgbatch.errors import ErrorCode
from imgbatch.scanner import Scanner
from tests.conftest import NOBODY, make_image, run_cli


def by_name(records: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {os.path.basename(str(r["path"])): r for r in records}


def test_unreadable_folder_and_file_are_error_records(
    shared_tmp: Path, as_nobody: dict[str, str]
) -> None:
    root = shared_tmp / "tree"
    make_image(root / "ok.jpg")
    make_image(root / "secret.jpg").chmod(0o000)
    make_image(root / "locked" / "inside.jpg")
    make_image(root / "open" / "seen.png")
    (root / "locked").chmod(0o000)
    for p in (root, root / "open", root / "ok.jpg", root / "open" / "seen.png"):
        p.chmod(p.stat().st_mode | 0o755 if p.is_dir() else 0o644)
    res = run_cli(["scan", root], env=as_nobody, user=NOBODY)
    recs = by_name(res.records)
    assert res.rc == 1, res.stderr
    # the readable files were listed: the test cannot pass because nothing was read
    assert recs["ok.jpg"]["status"] == "ok" and recs["seen.png"]["status"] == "ok"
    for name in ("secret.jpg", "locked"):
        assert recs[name]["status"] == "error"
        assert recs[name]["error"] == {
            "code": "IO_ERROR",
            "message": recs[name]["error"]["message"],
        }  # type: ignore[index]
        assert "Permission denied" in recs[name]["error"]["message"]  # type: ignore[index]
    assert "inside.jpg" not in recs
    assert "2 errors" in res.stderr


def test_fifo_socket_and_device_are_skipped_and_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_image(root / "ok.jpg")
    os.mkfifo(root / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    devices = 0
    if os.geteuid() == 0:
        os.mknod(root / "zero.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # like /dev/zero
        devices = 1
    try:
        cmd = ["scan", root]
        if shutil.which("strace"):
            log = tmp_path / "trace"
            res_proc = subprocess.run(
                [
                    "strace",
                    "-f",
                    "-qq",
                    "-e",
                    "trace=open,openat",
                    "-o",
                    str(log),
                    sys.executable,
                    "-m",
                    "imgbatch",
                    *map(str, cmd),
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            opened = log.read_text()
            assert "ok.jpg" in opened  # the trace works: the regular file was opened
            assert "pipe.jpg" not in opened and "sock.png" not in opened
            assert "zero.jpg" not in opened
            rc, stderr = res_proc.returncode, res_proc.stderr.decode()
        else:
            res = run_cli(cmd, timeout=60)
            rc, stderr = res.rc, res.stderr
    finally:
        sock.close()
    assert rc == 0, stderr
    assert f"{2 + devices} skipped ({2 + devices} not a regular file)" in stderr


def test_dangling_symlink_is_skipped_or_an_error_when_following(tmp_path: Path) -> None:
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    s = Scanner(str(tmp_path), Settings())
    assert list(s) == [] and s.stats.skipped["symlink"] == 1
    [rec] = list(Scanner(str(tmp_path), Settings(follow_symlinks=True)))
    assert rec.error_code is ErrorCode.IO_ERROR and "dangling symlink" in (rec.error_message or "")


def test_a_file_deleted_between_listing_and_hashing_is_an_io_error(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    gone = make_image(tmp_path / "b.png")
    it = iter(Scanner(str(tmp_path), Settings()))
    assert next(it).path.endswith("a.png")  # the folder is listed: b.png is on the list
    gone.unlink()
    rec = next(it)
    assert rec.path == str(gone) and rec.error_code is ErrorCode.IO_ERROR
    assert rec.error_message == "file vanished before it could be read"


def test_a_file_truncated_between_listing_and_hashing_is_hashed_as_it_is(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    b = make_image(tmp_path / "b.png")
    it = iter(Scanner(str(tmp_path), Settings()))
    next(it)
    b.write_bytes(b"")
    rec = next(it)
    assert rec.ok and rec.size == 0 and rec.hash == xxhash.xxh3_128_hexdigest(b"")


def test_zero_byte_file_is_listed_with_the_hash_of_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    [rec] = list(Scanner(str(tmp_path), Settings()))
    assert rec.ok and rec.size == 0 and rec.hash == xxhash.xxh3_128_hexdigest(b"")


def test_a_name_that_is_not_utf8_gets_a_readable_path_and_its_raw_bytes(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.jpg"
    with open(raw, "wb") as fh:
        fh.write(b"data")
    res = run_cli(["scan", tmp_path])
    [rec] = res.records  # parses as strict UTF-8
    assert res.rc == 0
    assert rec["path"] == str(tmp_path) + "/caf\ufffd-\ufffd.jpg"
    assert base64.b64decode(rec["path_bytes_b64"]) == raw
    with open(base64.b64decode(rec["path_bytes_b64"]), "rb") as fh:  # a consumer can open it
        assert fh.read() == b"data"


def test_names_with_newlines_quotes_and_leading_dashes(tmp_path: Path) -> None:
    names = ["new\nline.jpg", "quo\"te's.jpg", "-rf.jpg", "--help.png", "back\\slash.jpg"]
    for name in names:
        make_image(tmp_path / "-dir" / name)
    res = run_cli(["scan", "--", tmp_path / "-dir"])
    assert res.rc == 0, res.stderr
    assert sorted(os.path.basename(r["path"]) for r in res.records) == sorted(names)
    assert len(res.stdout.splitlines()) == len(names)  # a newline in a name stays escaped


def test_sixty_deep_nesting(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*[f"level{i:02d}" for i in range(60)])
    make_image(deep / "bottom.jpg")
    [rec] = list(Scanner(str(tmp_path), Settings()))
    assert rec.ok and rec.path == str(deep / "bottom.jpg")


def test_a_folder_that_vanishes_mid_walk_is_an_io_error(tmp_path: Path) -> None:
    make_image(tmp_path / "a" / "x.png")
    make_image(tmp_path / "b" / "y.png")
    it = iter(Scanner(str(tmp_path), Settings()))
    assert next(it).path.endswith("a/x.png")
    shutil.rmtree(tmp_path / "b")
    [rec] = list(it)
    assert rec.path == str(tmp_path / "b") and rec.error_code is ErrorCode.IO_ERROR
    assert "cannot list folder" in (rec.error_message or "")


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="needs O_NOFOLLOW")
def test_a_file_swapped_for_a_symlink_after_listing_is_not_followed(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    b = make_image(tmp_path / "b.png")
    outside = make_image(tmp_path.parent / f"{tmp_path.name}-outside.png")
    it = iter(Scanner(str(tmp_path), Settings()))
    next(it)
    b.unlink()
    b.symlink_to(outside)
    rec = next(it)
    assert rec.error_code is ErrorCode.IO_ERROR and rec.hash is None
