"""`imgbatch watch ROOT` (issue 24.3): the real CLI in a subprocess, real inotify events.

No timing assertions: every wait is for a line or a state, with a generous deadline.
"""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from PIL import Image

from tests.conftest import REPO, make_image, run_cli

WAIT = 90.0  # seconds any one expected line or state may take on a loaded machine


class Watch:
    """A running `watch` subprocess: its stdout lines, parsed, as they come."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        stderr: Path,
        module: str = "imgbatch",
        prefix: tuple[str, ...] = (),
    ) -> None:
        full_env = {**os.environ, **env}
        full_env.pop("PYTHONPATH", None)
        self._err = stderr.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", module, "watch", *args],
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=full_env,
            cwd=REPO,
        )
        self.stderr = stderr
        self.lines: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._queue.put(json.loads(raw))
        self._queue.put(None)

    def next_line(self) -> dict[str, Any]:
        """The next stdout line (fails after WAIT seconds, or when the process ended)."""
        line = self._queue.get(timeout=WAIT)
        assert line is not None, f"watch ended: {self.stderr.read_text()}"
        self.lines.append(line)
        return line

    def wait_stderr(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.stderr.read_text():
            assert self.proc.poll() is None, self.stderr.read_text()
            assert time.monotonic() < deadline, f"no {text!r} in: {self.stderr.read_text()}"
            time.sleep(0.1)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum`; every line left, then the exit code."""
        self.proc.send_signal(signum)
        rc = self.proc.wait(timeout=WAIT)
        while (line := self._queue.get(timeout=WAIT)) is not None:
            self.lines.append(line)
        self._err.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


@pytest.fixture
def watching() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        w.kill()


def png_bytes(size: tuple[int, int]) -> bytes:
    """A PNG of noise (it does not compress: big enough to be written in chunks)."""
    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def calls(log: Path) -> list[int]:
    """The widths of the images the fake remote provider was asked about, in order."""
    return [int(w) for w in log.read_text().split()] if log.exists() else []


def test_watch_catches_up_then_analyses_settled_changes(
    tmp_path: Path, watching: list[Watch]
) -> None:
    root = tmp_path / "photos"
    make_image(root / "a.png", (30, 20))
    make_image(root / "sub" / "b.png", (31, 20))
    (root / "notes.txt").write_text("not an image")
    log = tmp_path / "calls.log"
    env = {"IMGBATCH_TEST_FAKE": json.dumps({"log": str(log)}), "IMGBATCH_RPM": "6000"}
    w = Watch(
        [str(root), "--settle", "3", "--provider", "fake"],
        env,
        tmp_path / "stderr",
        "tests.fake_cli",
    )
    watching.append(w)

    # the catch-up: ROOT as analyze sees it
    catch_up = {w.next_line()["path"] for _ in range(2)}
    assert catch_up == {str(root / "a.png"), str(root / "sub" / "b.png")}
    w.wait_stderr("caught up")

    # a cron analyze meanwhile: the lock is held
    res = run_cli(["analyze", str(root), "--provider", "local"])
    assert res.rc == 3, res.stderr
    assert "watch" in res.stderr and "holds the lock" in res.stderr

    # a file written slowly: analysed once, only after it settled (its final bytes)
    data = png_bytes((120, 90))
    slow = root / "slow.png"
    with slow.open("wb") as fh:
        step = len(data) // 4 + 1
        for k in range(0, len(data), step):
            fh.write(data[k : k + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(0.8)
    (root / "more-notes.txt").write_text("still not an image")  # ignored
    line = w.next_line()
    assert line["path"] == str(slow)
    assert line["hash"] == xxhash.xxh3_128_hexdigest(data)
    assert line["status"] == "ok" and line["cached"] is False

    # a changed file: a new line
    make_image(root / "a.png", (32, 20), color=(10, 200, 10))
    line = w.next_line()
    assert line["path"] == str(root / "a.png")
    assert line["result"]["tags"][0] == "w32" and line["cached"] is False

    # a renamed file, and a folder moved in: one line each at the new path, no request
    before = calls(log)
    (root / "sub" / "b.png").rename(root / "b-renamed.png")
    outside = tmp_path / "incoming"
    make_image(outside / "c.png", (33, 20))
    shutil.copy(root / "b-renamed.png", outside / "b-copy.png")
    line = w.next_line()
    assert line["path"] == str(root / "b-renamed.png") and line["cached"] is True
    assert calls(log) == before
    outside.rename(root / "incoming")
    moved = {w.next_line()["path"]: w.lines[-1] for _ in range(2)}
    assert set(moved) == {str(root / "incoming" / "c.png"), str(root / "incoming" / "b-copy.png")}
    assert moved[str(root / "incoming" / "b-copy.png")]["cached"] is True
    assert moved[str(root / "incoming" / "c.png")]["cached"] is False
    assert calls(log) == [*before, 33]

    # SIGTERM: exit 143, everything printed is recorded
    assert w.stop(signal.SIGTERM) == 143
    paths = [line["path"] for line in w.lines]
    assert len(paths) == 7
    assert paths.count(str(slow)) == 1
    assert not [p for p in paths if p.endswith(".txt")]
    assert sorted(calls(log)) == sorted([30, 31, 120, 32, 33])
    status = run_cli(["status", str(root), "--json"])
    assert status.rc == 0, status.stderr
    run = json.loads(status.stdout)
    assert run["state"] == "ABORTED"
    assert run["counts"]["completed"] == 7 and run["counts"]["cached"] == 2
    # and the next analyze finds nothing to do
    res = run_cli(["analyze", str(root), "--provider", "fake"], env=env, module="tests.fake_cli")
    assert res.rc == 0, res.stderr
    assert res.records == []
    assert len(calls(log)) == 5


def test_missing_extra_is_a_usage_error(tmp_path: Path) -> None:
    """Without watchfiles: exit 2 naming the pip command, before anything is locked."""
    root = tmp_path / "photos"
    make_image(root / "a.png")
    # a None in sys.modules makes `import watchfiles` fail as a missing package does
    code = (
        "import sys; sys.modules['watchfiles'] = None; from imgbatch.cli import main; "
        f"sys.argv = ['imgbatch', 'watch', {str(root)!r}, '--provider', 'local']; main()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert res.returncode == 2, res.stderr
    assert "pip install 'imgbatch[watch]'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _userns() -> bool:
    """Whether this machine lets us make a user namespace (to lower its inotify limit)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 1 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _userns(), reason="needs unprivileged user namespaces (unshare -U -r)")
def test_inotify_limit_falls_back_to_polling(tmp_path: Path, watching: list[Watch]) -> None:
    """With the inotify watch limit reached (2 watches, in a user namespace of its own:
    the machine's limit is untouched), watch says so once, naming the sysctl, and polls."""
    root = tmp_path / "photos"
    make_image(root / "a.png", (30, 20))
    for sub in ("s1", "s2", "s3", "s4"):
        (root / sub).mkdir()
    limit = 'echo 2 > /proc/sys/user/max_inotify_watches && exec "$@"'
    w = Watch(
        [str(root), "--settle", "1", "--provider", "local"],
        {},
        tmp_path / "stderr",
        prefix=("unshare", "-U", "-r", "sh", "-c", limit, "sh"),
    )
    watching.append(w)
    assert w.next_line()["path"] == str(root / "a.png")
    w.wait_stderr("caught up")
    make_image(root / "s3" / "b.png", (31, 20))
    line = w.next_line()
    assert line["path"] == str(root / "s3" / "b.png") and line["status"] == "ok"
    assert w.stop(signal.SIGINT) == 130
    err = w.stderr.read_text()
    assert err.count("inotify watch limit is reached") == 1, err
    assert "sysctl fs.inotify.max_user_watches=" in err
