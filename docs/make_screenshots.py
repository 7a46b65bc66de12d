"""Make the README's screenshots: docs/dashboard.png and docs/report.png.

    .venv/bin/python docs/make_screenshots.py

A real `imgbatch serve` on a free port analyses scikit-image's sample photos (and one
broken file) with the offline analyzer, in a throw-away home; headless Chromium (Debian's
`chromium`) takes the pictures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import Page  # noqa: E402

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
           "hubble_deep_field.jpg", "retina.jpg", "color.png", "brick.png", "grass.png",
           "gravel.png", "logo.png")  # fmt: skip


def main() -> None:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    with tempfile.TemporaryDirectory(prefix="imgbatch-shots-") as tmp:
        home = Path(tmp)
        photos = home / "Pictures" / "2024-summer"
        photos.mkdir(parents=True)
        for name in SAMPLES:
            shutil.copy(data / name, photos / name)
        (photos / "IMG_0042.jpg").write_bytes(b"\xff\xd8 a truncated download")
        env = {
            **os.environ,
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "NO_PROXY": "127.0.0.1,localhost",
        }
        log = home / "serve.log"
        with log.open("wb") as err:
            allow = str(home / "Pictures")
            server = subprocess.Popen(
                [sys.executable, "-m", "imgbatch", "serve", "--port", "0", "--allow-root", allow],
                stderr=err,
                env=env,
                cwd=REPO,
            )
        try:
            while not (found := re.search(r"serving on (http://\S+/)", log.read_text())):
                time.sleep(0.05)
            url = found.group(1)
            with httpx.Client(base_url=url, timeout=60) as client:
                run = client.post("/api/runs", json={"root": str(photos), "provider": "local"})
                run.raise_for_status()
                with client.stream("GET", f"/api/runs/{run.json()['id']}/events") as events:
                    for line in events.iter_lines():
                        if line == "event: done":
                            break
            with Page(url) as page:
                page.wait_for("document.getElementById('d-state').textContent === 'PARTIAL'")
                page.wait_for("document.querySelectorAll('#d-failures li').length === 1")
                time.sleep(0.5)  # the bar's width is animated
                page.screenshot(REPO / "docs" / "dashboard.png")
            report = home / "report.html"
            subprocess.run(
                [sys.executable, "-m", "imgbatch", "report", str(photos), "-o", str(report)],
                env=env,
                cwd=REPO,
                check=True,
            )
            with Page(report.as_uri()) as page:
                page.wait_for("(document.getElementById('shown') || {}).textContent")
                page.screenshot(REPO / "docs" / "report.png")
        finally:
            server.terminate()
            server.wait()
    print(json.dumps({"written": ["docs/dashboard.png", "docs/report.png"]}))


if __name__ == "__main__":
    main()
