"""A fake remote provider registered through the registry, to prove the provider seam.

Configured by the environment variable IMGBATCH_TEST_FAKE (JSON), so that the real CLI
in a subprocess (`python -m tests.fake_cli`) can use it too:
  {"delay": seconds per call, "log": file that gets one line per call,
   "fail": {"<image width>": ["TIMEOUT", "TIMEOUT"]}  # codes raised by successive calls
  }
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from typing import Any

from imgbatch.config import Settings
from imgbatch.errors import ErrorCode, ItemError
from imgbatch.imaging import PreparedImage
from imgbatch.providers import base
from imgbatch.providers.base import Analysis


class FakeRemote:
    """Answers with the image's size as tags; fails on cue; logs every call."""

    name = "fake"
    remote = True

    def __init__(self, settings: Settings) -> None:
        cfg: dict[str, Any] = json.loads(os.environ.get("IMGBATCH_TEST_FAKE", "{}"))
        self.delay = float(cfg.get("delay", 0.0))
        self.log = cfg.get("log")
        self.fail: dict[int, list[str]] = {int(k): list(v) for k, v in cfg.get("fail", {}).items()}
        self.max_side = settings.max_side
        self.calls: defaultdict[int, int] = defaultdict(int)
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return "fake-1"

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.model, "max_side": self.max_side}

    prompt_tokens = 0

    def estimate_tokens(self, width: int, height: int) -> int:
        return 258

    def encode(self, image: PreparedImage) -> PreparedImage:
        return image

    def analyze(self, image: PreparedImage) -> Analysis:
        with self._lock:
            n = self.calls[image.width]
            self.calls[image.width] += 1
            if self.log:
                with open(self.log, "a") as fh:
                    fh.write(f"{image.width}\n")
        time.sleep(self.delay)
        codes = self.fail.get(image.width, [])
        if n < len(codes):
            raise ItemError(ErrorCode(codes[n]), f"injected {codes[n]}")
        return Analysis(
            {"tags": [f"w{image.width}", "fake"], "description": "a test image"},
            input_tokens=258,
            output_tokens=12,
        )

    def close(self) -> None:
        pass


def register_fake() -> None:
    base.register("fake", FakeRemote)
