"""The Python API (`imgbatch.scan_batches`, `imgbatch.scan`, `imgbatch.analyze`): the
records of the CLI, lazily, resumably, under the lock, with errors as exceptions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import imgbatch
from imgbatch.checkpoint import Checkpoint
from imgbatch.errors import ConfigError, LockHeldError, UsageError
from imgbatch.lockfile import StateLock
from tests.conftest import REPO, make_image, run_cli, the_state_folder


def photos(root: Path, n: int, broken: int = 0) -> Path:
    """`n` small images in two folders, and `broken` files that are not images."""
    for i in range(n):
        make_image(root / f"d{i % 2}" / f"{i:02d}.png", size=(20 + i, 16))
    for i in range(broken):
        (root / f"broken{i}.jpg").write_text("not a picture")
    return root


def paths(records: list[dict[str, Any]]) -> list[str]:
    return sorted(r["path"] for r in records)


def without_latency(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(({**r, "latency_ms": None} for r in records), key=lambda r: r["path"])


# -- import ------------------------------------------------------------------------


def test_importing_imgbatch_loads_nothing_until_the_api_is_used() -> None:
    code = (
        "import sys, imgbatch\n"
        "print(sorted(m for m in sys.modules if m.startswith('imgbatch')))\n"
        "imgbatch.scan\n"
        "print('imgbatch.api' in sys.modules, 'imgbatch.pipeline' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.splitlines() == ["['imgbatch']", "True False"]


# -- scan --------------------------------------------------------------------------


def test_scan_yields_the_records_the_cli_prints(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 5)
    (root / "notes.txt").write_text("not an image")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")  # an error record when following
    odd = make_image(root / "odd.jpg")
    os.rename(odd, os.path.join(os.fsencode(root), b"caf\xe9.jpg"))  # a name not UTF-8
    cli = run_cli(["scan", "--follow-symlinks", root])
    assert cli.rc == 1  # the loop
    assert any(r["status"] == "error" for r in cli.records)
    assert any("path_bytes_b64" in r for r in cli.records)

    assert list(imgbatch.scan(root, follow_symlinks=True)) == cli.records
    batches = list(imgbatch.scan_batches(root, batch_size=3, follow_symlinks=True))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [r for batch in batches for r in batch] == cli.records


def test_batches_come_as_the_tree_is_walked_not_after(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(150):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i:03d}.png").write_bytes(b"%d" % i)
    (root / "z").mkdir()
    (root / "z" / "early.png").write_bytes(b"early")

    batches = imgbatch.scan_batches(root)
    first = next(batches)
    (root / "z" / "late.png").write_bytes(b"late")  # z has not been listed yet
    rest = [r for batch in batches for r in batch]

    assert len(first) == 100 and all("/a/" in r["path"] for r in first)
    assert [Path(r["path"]).name for r in rest[-2:]] == ["early.png", "late.png"]
    assert len(rest) == 52


# -- analyze -----------------------------------------------------------------------


def test_analyze_yields_the_records_the_cli_prints(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 6, broken=2)
    cli = run_cli(
        ["analyze", "--checkpoint", tmp_path / "cli-state", root],
        env={"IMGBATCH_RESULTS": str(tmp_path / "cli-results")},
    )
    assert cli.rc == 1, cli.stderr  # the broken files

    records = list(
        imgbatch.analyze(
            root, checkpoint=str(tmp_path / "state"), results=str(tmp_path / "results")
        )
    )
    assert without_latency(records) == without_latency(cli.records)
    assert [r["error"]["code"] for r in records if r["status"] == "error"] == ["BAD_IMAGE"] * 2


def test_a_run_stopped_early_leaves_exactly_what_it_did_not_handle_to_the_next(
    tmp_path: Path,
) -> None:
    root = photos(tmp_path / "photos", 12)
    taken = []
    with imgbatch.analyze(root, workers=2) as records:  # items in flight when it stops
        for record in records:
            taken.append(record)
            if len(taken) == 5:
                break  # inside `with`: the 5th was handled
    rest = list(imgbatch.analyze(root))
    # what was handled was committed, what was not (finished, in flight) is redone
    assert len(rest) == 7
    assert paths(taken + rest) == paths(list(imgbatch.scan(root)))
    assert list(imgbatch.analyze(root)) == []
    with Checkpoint(the_state_folder(), create=False) as cp:
        first = cp.runs()[-1]
    assert (first["state"], first["counts"]["completed"]) == ("ABORTED", 5)


def test_the_run_holds_the_lock_while_it_is_iterated(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 4)
    with imgbatch.analyze(root) as records:
        next(records)
        res = run_cli(["analyze", root])
    assert res.rc == 3 and "holds the lock" in res.stderr and f"pid {os.getpid()}" in res.stderr


@pytest.mark.parametrize(("how", "left"), [("break", 8), ("with", 7), ("close", 8)])
def test_stopping_early_releases_the_lock(how: str, left: int, tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 8)
    if how == "break":
        for _ in imgbatch.analyze(root):
            break
    elif how == "with":
        with imgbatch.analyze(root) as records:
            next(records)
    else:
        records = imgbatch.analyze(root)
        next(records)
        records.close()
    lock = StateLock(the_state_folder())
    lock.acquire("test")  # at once: a LockHeldError if the run still held it
    lock.release()
    res = run_cli(["analyze", root])
    assert res.rc == 0, res.stderr
    # only a cleanly left `with` says the record taken was handled (a `break` without
    # it, like close(), cannot be told from an exception): the others yield it again
    assert len(res.records) == left


def test_a_run_left_open_when_the_program_exits_commits_what_it_handled(
    tmp_path: Path,
) -> None:
    root = photos(tmp_path / "photos", 30)
    script = (
        "import sys, imgbatch\n"
        "records = imgbatch.analyze(sys.argv[1], workers=2)\n"
        "print(next(records)['path']); print(next(records)['path'])\n"  # and no close()
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, root], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0 and proc.stderr == ""
    first, second = proc.stdout.split()
    rest = [r["path"] for r in imgbatch.analyze(root)]
    # the first was handled (the second was asked for); the second was not: it comes back
    assert second in rest
    assert sorted([first, *rest]) == paths(list(imgbatch.scan(root)))


def test_on_progress_counts_items_done_and_failed_against_the_total(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 4, broken=2)
    calls: list[tuple[int, int | None, int]] = []
    threads = set()

    def on_progress(done: int, total: int | None, failed: int) -> None:
        calls.append((done, total, failed))
        threads.add(threading.current_thread())

    records = list(imgbatch.analyze(root, on_progress=on_progress))
    assert len(records) == 6
    assert [done for done, _, _ in calls] == [1, 2, 3, 4, 5, 6]
    assert calls[-1][2] == 2  # the broken files
    totals = [total for _, total, _ in calls]
    # None until the count beside the work has ended, then the 6 files
    assert set(totals) <= {None, 6} and totals == sorted(totals, key=lambda t: t is not None)
    assert threads == {threading.current_thread()}  # the caller's own thread

    calls.clear()
    photos(tmp_path / "more", 5)
    list(imgbatch.analyze(tmp_path / "more", on_progress=on_progress, limit=3))
    assert calls == [(1, 3, 0), (2, 3, 0), (3, 3, 0)]  # the limit is the total from the start


def test_run_options_are_keyword_arguments(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 3)
    first = list(imgbatch.analyze(root))
    assert list(imgbatch.analyze(root)) == []
    again = list(imgbatch.analyze(root, emit_all=True))
    assert [r["cached"] for r in again] == [True] * 3
    assert {r["path"]: r["result"] for r in again} == {r["path"]: r["result"] for r in first}
    assert len(list(imgbatch.analyze(root, fresh=True, max_side=64))) == 3


# -- options and errors ------------------------------------------------------------


def test_options_override_the_config_file_and_environment_as_flags_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = photos(tmp_path / "photos", 4)
    (root / "notes.txt").write_text("not an image")
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "imgbatch" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[scan]\nbatch_size = 2\nall_files = true\n")
    monkeypatch.setenv("IMGBATCH_INCLUDE_HIDDEN", "1")
    (root / ".hidden.png").write_bytes(b"hidden")

    assert [len(b) for b in imgbatch.scan_batches(root)] == [2, 2, 2]  # the file's, and env's
    assert [len(b) for b in imgbatch.scan_batches(root, batch_size=4, all_files=False)] == [4, 1]
    assert len(list(imgbatch.scan(root, include_hidden=False))) == 5
    other = tmp_path / "other.toml"
    other.write_text("[scan]\nall_files = false\n")
    assert len(list(imgbatch.scan(root, config=other))) == 5  # images, the hidden one too


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda root: imgbatch.analyze(root, max_sides=512), "Did you mean 'max_side'?"),
        (lambda root: imgbatch.analyze(root, retry_faild=True), "Did you mean 'retry_failed'?"),
        (lambda root: imgbatch.scan_batches(root, batchsize=5), "Did you mean 'batch_size'?"),
        (lambda root: imgbatch.scan(root, workers=2), "(a setting of analyze only)"),
        (lambda root: imgbatch.scan(root, fresh=True), "argument 'fresh'"),
    ],
)
def test_an_unknown_option_is_a_type_error_naming_the_closest(
    call: Any, message: str, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        call(photos(tmp_path / "photos", 1))


@pytest.mark.parametrize("function", [imgbatch.scan, imgbatch.scan_batches, imgbatch.analyze])
def test_a_missing_root_is_a_usage_error_when_called(function: Any, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ROOT does not exist"):
        function(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="is not a folder"):
        function(tmp_path / "file.jpg")


def test_invalid_values_are_usage_errors(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 1)
    with pytest.raises(ConfigError, match="max_side must be at least 16"):
        imgbatch.analyze(root, max_side=8)
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        imgbatch.scan_batches(root, batch_size=0)
    with pytest.raises(UsageError, match="limit must be a whole number"):
        imgbatch.analyze(root, limit=0)
    with pytest.raises(UsageError, match="fresh must be True or False"):
        imgbatch.analyze(root, fresh="yes")


def test_run_level_stops_are_raised_while_iterating(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 2)
    records = imgbatch.analyze(root, provider="nope")  # chosen when the run starts
    with pytest.raises(UsageError, match="unknown provider 'nope'"):
        next(records)
    with Checkpoint(tmp_path / "state") as cp:
        cp.lock("analyze")
        with pytest.raises(LockHeldError, match="holds the lock"):
            list(imgbatch.analyze(root, checkpoint=str(tmp_path / "state")))


def test_nothing_prints(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 2)
    with Checkpoint(tmp_path / "state") as cp:  # a killed run: the next one logs a warning
        cp.save_run({"id": cp.next_run_id(), "state": "PROCESSING"})
    script = (
        "import sys, imgbatch\n"
        "records = list(imgbatch.analyze(sys.argv[1], checkpoint=sys.argv[2]))\n"
        "print(len(records))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, root, tmp_path / "state"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "2\n", "")


def test_the_readme_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    photos(Path.home() / "Pictures", 3)  # the example's folder, in the isolated HOME
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "3 files" in out and out.count(" ok ") == 3
