"""Headless Chromium for the tests: the DOM of a page after its scripts ran, a screenshot,
and `Page`, a live page driven over the DevTools protocol.

Debian's `chromium` package (installed by .ci/run); the tests that need it are skipped
only where it is not installed. Every browser gets a fresh profile, so nothing (storage,
cache) leaks from one page load to the next.

`dump_dom` and `screenshot` run scripts in virtual time, which does not wait for a
response that is still streaming: a page that follows an event stream live is watched
with `Page` instead, in real time.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root on CI: Chromium's sandbox refuses to run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
)


def chromium() -> str:
    """The browser's path; skips the test where it is not installed."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="imgbatch-chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def dump_dom(url: str, budget_ms: int = 5000, timeout: float = 60) -> str:
    """The page's DOM, serialised, once its scripts had `budget_ms` of virtual time
    (timers run in virtual time; it stands still while requests are pending)."""
    proc = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode("utf-8")


def screenshot(
    url: str, path: Path, budget_ms: int = 5000, size: tuple[int, int] = (1280, 900)
) -> Path:
    """A PNG of the page at `size`, after `budget_ms` of virtual time."""
    proc = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={path}",
            url,
        ],
        timeout=60,
    )
    assert proc.returncode == 0 and path.exists(), proc.stderr.decode(errors="replace")[-2000:]
    return path


class Page:
    """One page in a headless Chromium driven over `--remote-debugging-pipe` (the DevTools
    protocol as NUL-separated JSON on file descriptors 3 and 4: no extra package).

    Use it as a context manager; `evaluate` runs JavaScript in the page, `wait_for` until
    an expression is true.
    """

    def __init__(self, url: str, size: tuple[int, int] = (1280, 900)) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="imgbatch-chromium-")
        to_browser, self._out_fd = os.pipe()
        self._in_fd, from_browser = os.pipe()

        def pipes() -> None:  # in the child: its fd 3 reads our commands, fd 4 answers
            a, b = os.dup(to_browser), os.dup(from_browser)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self._proc = subprocess.Popen(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={self._profile.name}",
                f"--window-size={size[0]},{size[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=pipes,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buf = b""
        self._next = 0
        try:
            target = self._call("Target.createTarget", {"url": url})["targetId"]
            attached = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})
        except BaseException:
            self.close()
            raise
        self._session = attached["sessionId"]
        viewport = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}
        self._call("Emulation.setDeviceMetricsOverride", viewport, self._session)

    def _call(self, method: str, params: dict[str, Any], session: str | None = None) -> Any:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out_fd, json.dumps(message).encode() + b"\0")
        while True:  # answers come in order of the calls; events in between are skipped
            while b"\0" not in self._buf:
                chunk = os.read(self._in_fd, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self._call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, self._session
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll until the expression is truthy (one that throws, e.g. while the page
        loads, is not yet); its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                html = self.evaluate("document.documentElement.outerHTML")
                raise AssertionError(f"timed out waiting for {expression}; the page:\n{html}")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> Path:
        shot = self._call("Page.captureScreenshot", {"format": "png"}, self._session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self._call("Browser.close", {})
        except (OSError, RuntimeError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._out_fd)
        os.close(self._in_fd)
        self._profile.cleanup()

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
