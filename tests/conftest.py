"""Shared fixtures: an isolated environment, tree factories, and the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """No test sees the user's config, cache, keys or proxies."""
    home = tmp_path / "home"
    for sub in ("", ".cache", ".config"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for name in list(os.environ):
        if name.startswith("IMGBATCH_") or name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
            monkeypatch.delenv(name)
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def make_image(path: Path, size: tuple[int, int] = (32, 24), color: Any = (200, 30, 30)) -> Path:
    """A small real image; the format follows the extension (JPEG for unknown ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF"}.get(
        path.suffix.lower(), "JPEG"
    )
    with path.open("wb") as fh:
        Image.new("RGB", size, color).save(fh, format=fmt)
    return path


@dataclass
class CliResult:
    rc: int
    stdout: bytes
    stderr: str

    @property
    def records(self) -> list[dict[str, Any]]:
        """stdout parsed as strict UTF-8 JSON Lines (fails on anything else)."""
        text = self.stdout.decode("utf-8", errors="strict")
        return [json.loads(line) for line in text.splitlines()]


def run_cli(
    args: Sequence[str | os.PathLike[str]],
    env: dict[str, str] | None = None,
    user: int | None = None,
    timeout: float = 120,
    module: str = "imgbatch",
) -> CliResult:
    """Run `python -m imgbatch ARGS` in a subprocess (optionally as another user).

    `module="tests.fake_cli"` runs the same CLI with the fake remote provider registered.
    """
    cmd: list[str | os.PathLike[str]] = [sys.executable, "-m", module, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        cmd, capture_output=True, env=full_env, timeout=timeout, check=False, cwd=REPO
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder that an unprivileged user can traverse (tmp_path cannot)."""
    path = Path(tempfile.mkdtemp(prefix="imgbatch-test-"))
    path.chmod(0o755)
    yield path
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def as_nobody(shared_tmp: Path) -> dict[str, str]:
    """Environment for running the CLI as an unprivileged user (root reads anything)."""
    if os.geteuid() != 0 and not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to test unreadable files")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    home = shared_tmp / "nobody-home"
    home.mkdir()
    home.chmod(0o777)
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import imgbatch",
        ],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot run this Python: {probe.stderr[-200:]!r}")
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }


def run_and_kill(
    args: Sequence[str], env: dict[str, str], rng: random.Random, lines: tuple[int, int]
) -> list[dict[str, Any]]:
    """Run a command, SIGKILL it after a random number of output lines (drawn from `rng`,
    so a failure can be reproduced) and return every line it printed."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO
    )
    assert proc.stdout is not None
    out = [json.loads(proc.stdout.readline()) for _ in range(rng.randint(*lines))]
    proc.send_signal(signal.SIGKILL)
    out += [json.loads(line) for line in proc.stdout.read().splitlines()]
    proc.wait(timeout=30)
    return out


def the_state_folder() -> Path:
    """The one ROOT state folder under the test's cache dir (not the shared results store)."""
    base = Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"
    (folder,) = [p for p in base.iterdir() if p.name != "results"]
    return folder


def settle() -> None:
    """Wait until files just written are no longer "racy" for the hash cache (their
    mtime/ctime within 2 s of being hashed: see scanner.RACY_NS), so a re-scan may
    answer them from the cache. ctime cannot be set back: only waiting ages a file."""
    import time

    time.sleep(2.05)
