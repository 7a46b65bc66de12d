"""The real imgbatch CLI with a provider that fails the way a bug would (`--provider faulty`).

IMGBATCH_TEST_FAULT says where it raises RuntimeError: "init" (building it) or "close"
(after the run). Otherwise it is the fake remote provider of tests/fakeprovider.py.
"""

from __future__ import annotations

import os

from imgbatch.config import Settings
from imgbatch.providers import base
from tests.fakeprovider import FakeRemote


class Faulty(FakeRemote):
    name = "faulty"

    def __init__(self, settings: Settings) -> None:
        if os.environ.get("IMGBATCH_TEST_FAULT") == "init":
            raise RuntimeError("injected fault\nin __init__")  # two lines: shown as one
        super().__init__(settings)

    def close(self) -> None:
        if os.environ.get("IMGBATCH_TEST_FAULT") == "close":
            raise RuntimeError("injected fault in close()")


base.register("faulty", Faulty)

if __name__ == "__main__":
    from imgbatch.cli import main

    main()
