"""A Dask scheduler preload for the tests: appends every submitted task, pickled, to the
file named by IMGBATCH_TEST_SPY, so a test can check what travels to the cluster."""

from __future__ import annotations

import os
import pickle
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


class Spy(SchedulerPlugin):
    def __init__(self, path: str) -> None:
        self.path = path

    def update_graph(self, scheduler: Any, *, tasks: list[Any], **kwargs: Any) -> None:
        with open(self.path, "ab") as fh:
            for key in tasks:
                ts = scheduler.tasks.get(key)
                if ts is not None and ts.run_spec is not None:
                    fh.write(pickle.dumps(ts.run_spec) + b"\n")


def dask_setup(scheduler: Any) -> None:
    path = os.environ.get("IMGBATCH_TEST_SPY")
    if path:
        scheduler.add_plugin(Spy(path))
