"""Cron-grade operations through the real CLI: signals, status, history, export, prune."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgbatch.checkpoint import Checkpoint
from tests.conftest import REPO, make_image, run_cli, the_state_folder


def tree(root: Path, n: int) -> Path:
    for i in range(n):
        make_image(root / f"d{i % 2}" / f"{i:02d}.png", size=(20 + i, 16))
    return root


def start_fake(
    args: list[str | Path], delay: float, tmp_path: Path, **env: str
) -> subprocess.Popen[bytes]:
    """`imgbatch analyze` with the fake remote provider (`delay` seconds per request)."""
    full_env = {
        **os.environ,
        "IMGBATCH_RPM": "60000",
        "IMGBATCH_TEST_FAKE": json.dumps({"delay": delay, "log": str(tmp_path / "calls.log")}),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fake_cli", "analyze", "--provider", "fake", *map(str, args)],
        stdout=subprocess.PIPE,
        bufsize=0,  # readline() then communicate(): no buffer to lose
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=REPO,
    )


def wait_for_calls(tmp_path: Path, n: int) -> None:
    """Until the fake provider has started `n` requests (its log gets a line as each
    begins): however slowly a loaded machine starts the run."""
    log = tmp_path / "calls.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        assert time.monotonic() < deadline, f"fewer than {n} requests began in 2 minutes"
        time.sleep(0.05)


def wait_for_lines(proc: subprocess.Popen[bytes], n: int) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    return [json.loads(proc.stdout.readline()) for _ in range(n)]


class TestSignals:
    @pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
    def test_a_signal_stops_intake_lets_in_flight_items_finish_and_exits(
        self, tmp_path: Path, sig: int, code: int
    ) -> None:
        root = tree(tmp_path / "photos", 30)
        proc = start_fake(["--workers", "2", root], 0.3, tmp_path)
        first = wait_for_lines(proc, 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err.decode()
        records = first + [json.loads(line) for line in out.splitlines()]
        assert all(r["status"] == "ok" for r in records)
        assert len(records) < 30  # intake stopped
        assert "stopping" in err.decode() and "aborted:" in err.decode()  # the summary
        calls = len((tmp_path / "calls.log").read_text().splitlines())
        assert calls <= len(records) + 4  # nothing new was started after the signal
        again = start_fake([root], 0.0, tmp_path)
        rest, _ = again.communicate(timeout=60)
        assert len(records) + len(rest.splitlines()) == 30  # the next run does the rest

    def test_after_the_grace_period_in_flight_work_is_abandoned(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "photos", 6)
        proc = start_fake(["--workers", "2", "--grace", "0.5", root], 60.0, tmp_path)
        wait_for_calls(tmp_path, 2)  # both workers are inside a 60 s request
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err.decode()
        assert time.monotonic() - started < 10  # did not wait for the requests
        assert out == b"" and "abandoning 2 in-flight" in err.decode()  # 2 workers
        with Checkpoint(the_state_folder()) as cp:
            assert list(cp.iter_folders(cp.runs()[0]["fingerprint"])) == []  # unrecorded
            assert cp.runs()[0]["state"] == "ABORTED"

    def test_a_second_signal_exits_at_once(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "photos", 6)
        proc = start_fake(["--workers", "2", "--grace", "60", root], 60.0, tmp_path)
        wait_for_calls(tmp_path, 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 130 and time.monotonic() - started < 5
        res = run_cli(["status", root, "--json"])  # the checkpoint still opens
        assert res.rc == 0 and json.loads(res.stdout)["state"] == "ABORTED"

    def test_scan_exits_143_on_sigterm(self, tmp_path: Path) -> None:
        for i in range(3000):
            (tmp_path / f"{i:05d}.png").write_bytes(b"x")
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgbatch", "scan", "--batch-size", "1", str(tmp_path)],
            stdout=subprocess.PIPE,
            bufsize=0,  # readline() then communicate(): no buffer to lose
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and b"Traceback" not in err


class TestStatusAndHistory:
    def test_status_while_a_run_goes_on_and_after_it(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "photos", 12)
        proc = start_fake(["--workers", "1", root], 0.4, tmp_path)
        wait_for_lines(proc, 1)
        time.sleep(2.5)  # the run record is rewritten every 2 s
        live = run_cli(["status", root, "--json"])
        assert live.rc == 0
        s = json.loads(live.stdout)
        assert s["state"] == "PROCESSING" and s["counts"]["completed"] >= 1
        assert s["provider"] == "fake" and s["images_per_min"] > 0
        assert s["total"] == 12  # counted beside the run
        assert 0 < s["eta_seconds"] < 60
        proc.communicate(timeout=60)
        done = run_cli(["status", root])
        assert done.rc == 0
        assert b"COMPLETED" in done.stdout and b"completed 12" in done.stdout

    def test_status_gives_an_eta_when_the_total_is_known(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "photos", 12)
        # 1 s a request: the run is still going when a slowly started `status` looks
        proc = start_fake(["--workers", "1", "--limit", "10", root], 1.0, tmp_path)
        wait_for_lines(proc, 2)
        time.sleep(2.2)
        s = json.loads(run_cli(["status", root, "--json"]).stdout)
        proc.communicate(timeout=60)
        assert s["total"] == 10 and s["state"] == "PROCESSING"
        assert 0 < s["eta_seconds"] < 60

    def test_status_shows_a_killed_run_as_aborted_with_its_errors(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "photos", 20)
        (root / "broken.png").write_text("not an image")
        proc = start_fake(["--workers", "1", root], 0.2, tmp_path)
        wait_for_lines(proc, 3)
        time.sleep(2.2)
        proc.kill()
        proc.wait()
        res = run_cli(["status", root])
        assert res.rc == 0 and b": ABORTED" in res.stdout
        assert b"BAD_IMAGE" in res.stdout  # among the most common errors

    def test_runs_lists_the_history_newest_first(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "photos", 4)
        for _ in range(3):
            run_cli(["analyze", root])
        res = run_cli(["runs", root, "--json"])
        history = [json.loads(line) for line in res.stdout.splitlines()]
        assert [r["id"] for r in history] == [3, 2, 1]
        assert history[2]["counts"]["completed"] == 4 and history[0]["counts"]["skipped"] == 4
        table = run_cli(["runs", root])
        assert table.stdout.splitlines()[0].split()[:3] == [b"run", b"started", b"state"]
        assert len(table.stdout.splitlines()) == 4

    def test_status_without_a_checkpoint_is_a_usage_error(self, tmp_path: Path) -> None:
        res = run_cli(["status", tmp_path])
        assert res.rc == 2 and "no checkpoint" in res.stderr


class TestExportAndPrune:
    @pytest.fixture
    def analysed(self, tmp_path: Path) -> Path:
        root = tree(tmp_path / "photos", 4)
        two_colours = Image.new("RGB", (20, 16), (255, 255, 255))
        two_colours.paste((20, 60, 220), (0, 0, 15, 16))  # three quarters blue
        two_colours.save(root / "d0" / "00.png")
        (root / "bad.jpg").write_text("nope")
        assert run_cli(["analyze", root]).rc == 1
        return root

    def test_export_jsonl_has_every_stored_result(self, analysed: Path) -> None:
        res = run_cli(["export", analysed])
        assert res.rc == 0
        recs = {os.path.basename(r["path"]): r for r in res.records}
        assert len(recs) == 5 and recs["bad.jpg"]["error"]["code"] == "BAD_IMAGE"
        assert recs["00.png"]["result"]["width"] == 20 and recs["00.png"]["exists"] is True
        ok = run_cli(["export", analysed, "--status", "ok"]).records
        assert len(ok) == 4 and all(r["status"] == "ok" for r in ok)

    def test_export_csv_has_stable_columns_with_file_fields_first(self, analysed: Path) -> None:
        res = run_cli(["export", analysed, "--format", "csv"])
        rows = list(csv.DictReader(io.StringIO(res.stdout.decode())))
        assert list(rows[0])[:4] == ["path", "path_bytes_b64", "hash", "size"]
        row = next(r for r in rows if r["path"].endswith("00.png"))
        assert row["width"] == "20" and row["exists"] == "true"
        assert row["dominant_colors"] == (  # a list: its items joined, objects as JSON
            '{"hex": "#143cdc", "name": "blue", "fraction": 0.75}; '
            '{"hex": "#ffffff", "name": "white", "fraction": 0.25}'
        )
        assert row["exif"].startswith("{")
        bad = next(r for r in rows if r["path"].endswith("bad.jpg"))
        assert bad["error_code"] == "BAD_IMAGE" and bad["width"] == ""

    def test_export_to_a_file_is_atomic(self, analysed: Path, tmp_path: Path) -> None:
        target = tmp_path / "out.jsonl"
        target.write_text("old content\n")
        res = run_cli(["export", analysed, "--output", target])
        assert res.rc == 0 and len(target.read_text().splitlines()) == 5
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    def test_missing_files_are_marked_and_prune_drops_them(self, analysed: Path) -> None:
        (analysed / "d0" / "00.png").unlink()
        recs = run_cli(["export", analysed]).records
        assert [r["exists"] for r in recs if r["path"].endswith("00.png")] == [False]
        res = run_cli(["prune", analysed])
        assert res.rc == 0 and "pruned 1 records" in res.stderr
        assert len(run_cli(["export", analysed]).records) == 4


def test_wait_waits_for_the_lock_instead_of_exit_3(tmp_path: Path) -> None:
    root = tree(tmp_path / "photos", 2)
    state = tmp_path / "state"
    holder = Checkpoint(state)
    holder.lock("analyze")
    threading.Timer(2.0, holder.close).start()  # releases the lock in 2 s
    started = time.monotonic()
    res = run_cli(["analyze", "--wait", "--checkpoint", state, root])
    assert res.rc == 0 and len(res.records) == 2 and time.monotonic() - started >= 1.5


def test_json_logs_for_log_collectors(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    res = run_cli(["analyze", "--log-format", "json", tmp_path])
    entries = [json.loads(line) for line in res.stderr.splitlines()]
    assert res.rc == 0 and {e["level"] for e in entries} == {"info"}
    assert any(e["message"].startswith("completed: 1 ok") for e in entries)


def test_quiet_prints_only_errors(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    assert run_cli(["analyze", "--quiet", tmp_path]).stderr == ""


def test_scan_killed_with_sigkill_keeps_a_usable_hash_cache(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)  # kill moments are reproducible
    root = tmp_path / "tree"
    for i in range(4000):
        (root / f"d{i % 80:02d}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 80:02d}" / f"{i:05d}.png").write_bytes(os.urandom(64))
    state = tmp_path / "state"
    args = [
        sys.executable,
        "-m",
        "imgbatch",
        "scan",
        "--batch-size",
        "10",
        "--checkpoint",
        str(state),
        str(root),
    ]
    for _ in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
        assert proc.stdout is not None
        for _ in range(rng.randint(50, 3000)):
            proc.stdout.readline()
        proc.kill()
        proc.wait()
    cached = run_cli(["scan", "--checkpoint", state, root])
    fresh = run_cli(["scan", "--no-hash-cache", root])
    assert cached.rc == fresh.rc == 0
    assert cached.stdout == fresh.stdout  # every hash right, every file listed once
