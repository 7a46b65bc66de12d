"""`imgbatch analyze` through the real CLI in a subprocess: the main job, crashes, pipes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import skimage
from PIL import Image

from imgbatch import statedb
from imgbatch.checkpoint import Checkpoint
from tests.conftest import REPO, make_image, run_and_kill, run_cli, the_state_folder

PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"):
        shutil.copy(PHOTOS / name, root / name)
    return root


def test_the_main_job_works_with_no_key_through_the_offline_analyzer(photos: Path) -> None:
    res = run_cli(["analyze", photos])
    assert res.rc == 0, res.stderr
    assert "provider: local (no API key configured" in res.stderr
    recs = {os.path.basename(r["path"]): r for r in res.records}
    assert sorted(recs) == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    cat = recs["chelsea.png"]
    assert cat["status"] == "ok" and cat["provider"] == "local"
    assert (cat["result"]["width"], cat["result"]["height"]) == (451, 300)
    assert len(cat["result"]["phash"]) == 16 and cat["result"]["dominant_colors"]
    assert "completed: 4 ok, 0 failed" in res.stderr


def test_broken_files_become_bad_image_records_and_exit_code_1(photos: Path) -> None:
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.jpg").write_text("hello, not a picture")
    data = (photos / "rocket.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with (photos / "bomb.png").open("wb") as fh:  # tiny on disk, 400 megapixels decoded
        Image.new("1", (20000, 20000)).save(fh, "PNG")
    res = run_cli(["analyze", photos])
    codes = {os.path.basename(r["path"]): r.get("error", {}).get("code") for r in res.records}
    assert res.rc == 1
    for name in ("empty.jpg", "text.jpg", "truncated.jpg", "bomb.png"):
        assert codes[name] == "BAD_IMAGE", name
    assert codes["chelsea.png"] is None
    assert "errors: BAD_IMAGE 4" in res.stderr


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(40):
        make_image(root / f"{i:02d}.png", size=(20 + i, 20))
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "analyze", "--workers", "1", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = [json.loads(proc.stdout.readline()) for _ in range(2)]  # like `| head -2`
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "Broken pipe" not in stderr
    assert all(r["status"] == "ok" for r in first)


def test_what_could_not_be_written_is_not_recorded_as_done(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(10):
        make_image(root / f"{i:02d}.png", size=(20 + i, 20))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    proc = subprocess.run(
        [sys.executable, "-m", "imgbatch", "analyze", str(root)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        cwd=REPO,
        timeout=60,
    )
    os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr
    rest = run_cli(["analyze", root])
    assert len(rest.records) == 10  # nothing was recorded as done


def test_a_run_killed_with_sigkill_loses_nothing_and_repeats_only_in_flight_work(
    tmp_path: Path,
) -> None:
    rng = random.Random(20261123)  # kill moments are reproducible
    root = tmp_path / "photos"
    files = 60
    for i in range(files):
        make_image(root / f"d{i % 3}" / f"{i:02d}.png", size=(20 + i, 16))
    calls = tmp_path / "calls.log"
    env = {
        **os.environ,
        "IMGBATCH_TEST_FAKE": json.dumps({"delay": 0.03, "log": str(calls)}),
        "IMGBATCH_RPM": "60000",
    }
    workers, in_flight = 2, 4
    args = [
        sys.executable,
        "-m",
        "tests.fake_cli",
        "analyze",
        "--provider",
        "fake",
        "--workers",
        str(workers),
        str(root),
    ]
    outputs: list[dict[str, object]] = []
    kills = 3
    for _ in range(kills):
        outputs += run_and_kill(args, env, rng, lines=(3, 12))
    final = subprocess.run(args, capture_output=True, env=env, cwd=REPO, timeout=120)
    assert final.returncode == 0, final.stderr.decode()
    assert "an earlier run was killed" in final.stderr.decode()
    outputs += [json.loads(line) for line in final.stdout.splitlines()]

    ok = Counter(str(r["path"]) for r in outputs if r["status"] == "ok")
    assert len(ok) == files  # every file has an ok line across the runs
    # a line is repeated only if the kill fell between writing it and committing it
    assert sum(ok.values()) - files <= kills
    n_calls = len(calls.read_text().splitlines())
    assert files <= n_calls <= files + kills * in_flight
    state = the_state_folder()
    with Checkpoint(state) as cp:  # opens cleanly
        runs = cp.runs()
    assert [r["state"] for r in runs] == ["COMPLETED"] + ["ABORTED"] * kills


def test_another_run_holding_the_lock_gives_exit_code_3(photos: Path, tmp_path: Path) -> None:
    with Checkpoint(tmp_path / "state") as cp:
        cp.lock("analyze")
        res = run_cli(["analyze", "--checkpoint", tmp_path / "state", photos])
    assert res.rc == 3 and res.stdout == b""
    assert "holds the lock" in res.stderr and f"pid {os.getpid()}" in res.stderr


def test_an_unusable_checkpoint_gives_exit_code_5(photos: Path, tmp_path: Path) -> None:
    with Checkpoint(tmp_path / "state"):
        pass
    # as a later imgbatch would leave it (the layout in checkpoint.py's docstring)
    with statedb.open_cache(tmp_path / "state" / "checkpoint") as db:
        db.set(b"format", 999)
    res = run_cli(["analyze", "--checkpoint", tmp_path / "state", photos])
    assert res.rc == 5 and "format version 999" in res.stderr


def test_an_unknown_provider_is_a_usage_error(photos: Path) -> None:
    res = run_cli(["analyze", "--provider", "nope", photos])
    assert res.rc == 2 and "unknown provider 'nope'" in res.stderr
