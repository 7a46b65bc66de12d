"""`imgbatch scan` through the real CLI: stdout is JSONL only, stderr the rest, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_image, run_cli


def test_scan_prints_one_json_line_per_image_and_a_summary_on_stderr(tmp_path: Path) -> None:
    for i in range(5):
        make_image(tmp_path / "pics" / f"{i}.jpg")
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    res = run_cli(["scan", tmp_path / "pics"])
    assert res.rc == 0
    assert [os.path.basename(r["path"]) for r in res.records] == [f"{i}.jpg" for i in range(5)]
    assert all(r["status"] == "ok" and len(r["hash"]) == 32 for r in res.records)
    assert "scanned 5 files" in res.stderr and "0 errors" in res.stderr


def test_a_missing_root_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    res = run_cli(["scan", tmp_path / "missing"])
    assert res.rc == 2 and res.stdout == b""
    assert res.stderr.strip().splitlines() == [
        f"imgbatch: error: ROOT does not exist: {tmp_path / 'missing'}"
    ]
    (tmp_path / "file.jpg").write_bytes(b"x")
    res = run_cli(["scan", tmp_path / "file.jpg"])
    assert res.rc == 2 and "is not a folder" in res.stderr


def test_per_file_errors_give_exit_code_1(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    res = run_cli(["scan", "--follow-symlinks", tmp_path])
    assert res.rc == 1
    assert [r["status"] for r in res.records] == ["error", "ok"]
    assert res.records[0]["error"]["code"] == "IO_ERROR"


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    for i in range(3000):
        (tmp_path / f"{i:05d}.png").write_bytes(b"%d" % i)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "scan", "--batch-size", "10", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # like `| head -3`
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert all(line.startswith(b'{"path":') for line in lines)
    assert "Traceback" not in stderr and "Broken pipe" not in stderr


def test_a_rescan_gives_the_same_output_from_the_hash_cache(tmp_path: Path) -> None:
    for i in range(20):
        make_image(tmp_path / "tree" / f"{i % 4}" / f"{i}.png", color=(i, i, i))
    first = run_cli(["scan", tmp_path / "tree"])
    second = run_cli(["scan", tmp_path / "tree"])
    assert first.rc == second.rc == 0
    assert first.stdout == second.stdout
    # the cache lives per ROOT under the user's cache folder, not in the tree
    assert any((Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch").iterdir())
    assert sorted(p.name for p in (tmp_path / "tree").iterdir()) == ["0", "1", "2", "3"]


def test_no_hash_lists_metadata_only(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    res = run_cli(["scan", "--no-hash", tmp_path])
    assert res.rc == 0
    [rec] = res.records
    assert rec["hash"] is None and rec["size"] == (tmp_path / "a.png").stat().st_size


def test_checkpoint_option_places_the_hash_cache(tmp_path: Path) -> None:
    make_image(tmp_path / "tree" / "a.png")
    res = run_cli(["scan", "--checkpoint", tmp_path / "state", tmp_path / "tree"])
    assert res.rc == 0
    assert (tmp_path / "state" / "hashcache").is_dir()


def test_progress_lines_go_to_stderr_when_it_is_not_a_terminal(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"{i}.png").write_bytes(b"x" * i)
    res = run_cli(["scan", "--log-every", "0.000001", "--batch-size", "50", tmp_path])
    assert res.rc == 0 and len(res.records) == 300
    assert "progress: " in res.stderr and "files" in res.stderr
    assert all(line.startswith(b'{"path":') for line in res.stdout.splitlines())


def test_version_and_help_work_without_a_root() -> None:
    res = run_cli(["--version"])
    assert res.rc == 0 and res.stderr.startswith("imgbatch ")
    res = run_cli(["scan", "--help"])
    assert res.rc == 0 and b"--exclude" in res.stdout
    res = run_cli(["analyze", "--help"], env={"COLUMNS": "200"})
    # defaults are shown (square brackets would be swallowed as rich markup)
    assert b"gemini-2.5-flash-lite" in res.stdout and b"no limit" in res.stdout


def test_batch_size_is_an_option_of_scan_only(tmp_path: Path) -> None:
    assert b"--batch-size" in run_cli(["scan", "--help"], env={"COLUMNS": "200"}).stdout
    assert b"--batch-size" not in run_cli(["analyze", "--help"], env={"COLUMNS": "200"}).stdout
    res = run_cli(["analyze", "--batch-size", "5", tmp_path])  # it did nothing there
    assert res.rc == 2 and "No such option: --batch-size" in res.stderr
