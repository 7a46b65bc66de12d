"""What a run tells while it goes: the bar, the cron progress lines, `status` and the run
record count images against a total known early (a count beside the work, capped by
--limit), with a rate and an ETA; a run is QUEUED until its first item is written."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

from imgbatch.output import Progress
from imgbatch.pipeline import MAX_TAGS, RunSummary
from tests.conftest import REPO, make_image, run_cli


def photos(root: Path, n: int, folder: str = "d") -> Path:
    for i in range(n):
        make_image(root / folder / f"{i:02d}.png", size=(20 + i, 16))
    return root


def fake_env(delay: float) -> dict[str, str]:
    """The fake remote provider answering after `delay` seconds; no rate limit to speak of."""
    return {"IMGBATCH_RPM": "60000", "IMGBATCH_TEST_FAKE": json.dumps({"delay": delay})}


def analyze_fake(args: list[str | Path], delay: float, **popen: Any) -> subprocess.Popen[bytes]:
    """`imgbatch analyze --provider fake ARGS` in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fake_cli", "analyze", "--provider", "fake", *map(str, args)],
        env={**os.environ, **fake_env(delay)},
        cwd=REPO,
        **popen,
    )


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("imgbatch: progress: ")]


# --- off a terminal (cron): a line every --log-every seconds ------------------------------


def test_cron_lines_count_images_against_the_counted_total_with_an_eta(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 6)
    args = ["analyze", "--provider", "fake", "--workers", "2", "--log-every", "0.000001", root]
    res = run_cli(args, env=fake_env(0.3), module="tests.fake_cli")
    assert res.rc == 0 and len(res.records) == 6
    lines = progress_lines(res.stderr)
    # no --limit: the total is the count made beside the run
    assert any(
        re.search(r"progress: [1-5]/6 images \(\d+%\), [\d.,]+/(s|min), ETA ", line)
        for line in lines
    ), lines
    assert lines[-1].startswith("imgbatch: progress: 6/6 images (100%), ")
    assert "ETA" not in lines[-1]  # nothing left
    assert not any("B/s" in line or " MB" in line for line in lines)  # no bytes counted here


def test_a_rerun_counts_only_what_is_left_to_do(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 4)
    first = run_cli(["analyze", "--provider", "fake", root], fake_env(0), module="tests.fake_cli")
    assert first.rc == 0
    photos(root, 3, folder="new")  # after the unchanged ones in the walk
    args = ["analyze", "--provider", "fake", "--workers", "1", "--log-every", "0.000001", root]
    res = run_cli(args, env=fake_env(0.3), module="tests.fake_cli")
    assert res.rc == 0 and len(res.records) == 3
    lines = progress_lines(res.stderr)
    assert [line.split(", ")[0] for line in lines] == [
        "imgbatch: progress: 1/3 images (33%)",
        "imgbatch: progress: 2/3 images (67%)",
        "imgbatch: progress: 3/3 images (100%)",
    ]
    [last_run] = [
        json.loads(line)
        for line in run_cli(["runs", root, "--json", "--limit", "1"]).stdout.splitlines()
    ]
    assert last_run["total"] == 3 and last_run["counts"]["skipped"] == 4


def test_progress_lines_give_a_readable_rate_and_bytes_only_when_counted() -> None:
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("imgbatch")
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        images = Progress("images", log_every=1e-9, stream=io.StringIO())  # not a terminal
        images.update(0)
        images.update(1, total=4, failed=1, cached=0)
        files = Progress("files", log_every=1e-9, stream=io.StringIO())
        files.update(3, nbytes=4_500_000)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
    assert re.fullmatch(r"progress: 0 images, 0\.0/min", seen[0]), seen
    # a rate per second, or per minute below one a second; an ETA for the other 3
    assert re.fullmatch(
        r"progress: 1/4 images \(25%\), [\d.,]+/(s|min), ETA [\dhms.]+, 1 failed, cached 0",
        seen[1],
    ), seen
    assert re.fullmatch(
        r"progress: 3 files, [\d.,]+/(s|min), 4\.5 MB \([\d.]+ [KMGT]?B/s\)", seen[2]
    )


# --- on a terminal: a tqdm bar ---------------------------------------------------------


def test_the_bar_on_a_terminal_counts_images_to_the_limit(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 5)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = analyze_fake(
        ["--workers", "1", "--limit", "3", root], 0.2, stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    shown = b""
    while True:  # until the process closes the terminal (EIO on Linux)
        ready, _, _ = select.select([controller], [], [], 60)
        assert ready, "the bar stalled"
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and len(out.splitlines()) == 3
    text = shown.decode("utf-8", "replace")
    assert re.search(r"100%\|[^|]*\| 3/3 images \[", text), text  # the total is --limit
    assert re.search(r"[\d.]+ images/s", text), text
    bar = text.split("imgbatch: ")[0]  # the summary follows on stderr
    assert "files" not in bar and "MB/s" not in bar


# --- status and the run record ---------------------------------------------------------


def test_a_run_is_queued_until_its_first_item_is_written(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 2)
    proc = analyze_fake(
        ["--workers", "1", root], 3.0, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        queued = None
        deadline = time.monotonic() + 30
        while queued is None and time.monotonic() < deadline:
            res = run_cli(["runs", root, "--json"])
            written = select.select([proc.stdout], [], [], 0)[0]
            assert not written, "the first item was written before its run record was seen"
            if res.rc == 0 and res.stdout.strip():
                queued = json.loads(res.stdout.splitlines()[0])
        assert queued is not None and queued["state"] == "QUEUED"
        assert queued["counts"].get("completed", 0) == 0
        assert json.loads(proc.stdout.readline())["status"] == "ok"  # after 3 s
        live = json.loads(run_cli(["status", root, "--json"]).stdout)  # the second: 3 s more
        assert live["state"] == "PROCESSING" and live["counts"]["completed"] == 1
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert json.loads(run_cli(["status", root, "--json"]).stdout)["state"] == "COMPLETED"


def test_status_sees_the_run_under_way_as_soon_as_its_first_item_is_written(
    tmp_path: Path,
) -> None:
    # items of 1.2 s: the first is written before the run record's 2-second refresh
    root = photos(tmp_path / "photos", 2)
    proc = analyze_fake(
        ["--workers", "1", root], 1.2, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        proc.stdout.readline()
        between: list[str] = []  # states seen after the first line, before the second
        while True:
            state = json.loads(run_cli(["status", root, "--json"]).stdout)["state"]
            if select.select([proc.stdout], [], [], 0)[0]:
                break  # the second line is out: this reading may be later than that
            between.append(state)
    finally:
        proc.communicate(timeout=60)
    assert between, "no status could be read within 1.2 s (a very slow machine?)"
    assert set(between) == {"PROCESSING"}


def test_the_tag_counter_keeps_the_common_tags_within_bounds() -> None:
    summary = RunSummary(1, "fake", "fake-1", "fp", "/photos")
    for i in range(10_000):  # free-form tags: one of a kind on every picture
        summary.count_tags(["photo", f"unique {i}", *(["sky"] if i % 10 == 0 else []), 3, None])
        assert len(summary.tags) <= MAX_TAGS
    assert summary.tags.most_common(2) == [("photo", 10_000), ("sky", 1_000)]
