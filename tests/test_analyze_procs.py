"""The offline analyzer on worker processes (pipeline.engines.procs): the same outcomes as on
threads, each item once, and nothing lost when a process dies. No timing is asserted."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from imgbatch.config import Settings
from imgbatch.pipeline.analyzer import Analyzer
from imgbatch.pipeline.engines.local import LocalEngine
from imgbatch.pipeline.items import Outcome, WorkItem
from imgbatch.providers.local import LocalProvider
from imgbatch.scanner import Scanner
from tests.conftest import make_image


def items_of(root: Path) -> list[WorkItem]:
    return [
        WorkItem(rec, os.path.dirname(rec.path), os.path.basename(rec.path))
        for rec in Scanner(str(root), Settings())
    ]


def tree(root: Path, n: int) -> list[WorkItem]:
    for i in range(n):
        make_image(root / f"{i:03d}.png", (8 + i % 5, 6 + i % 3), (i * 7 % 256, i % 256, 90))
    make_image(root / "broken.png").write_bytes(b"\x89PNG not really")  # a failed outcome
    return items_of(root)


def comparable(outcome: Outcome) -> dict[str, object]:
    fields = dataclasses.asdict(outcome)
    fields.pop("latency_ms", None)
    return fields


class Counted(Analyzer):
    """The run's own analyzer, counting the items it analysed in this process (the
    worker processes build theirs from the settings)."""

    here = 0

    def work(self, item: WorkItem) -> Outcome:
        Counted.here += 1
        return super().work(item)


def at_once(submitted: int) -> bool:
    """Start the worker processes with the first item, however busy the machine is."""
    return True


def engine_with_processes() -> tuple[LocalEngine, Counted]:
    """A local engine whose processes are started by its first item and usable."""
    settings = Settings()
    analyzer = Counted(settings, LocalProvider(settings))
    Counted.here = 0
    return LocalEngine(analyzer, workers=2, procs=2, start_procs=at_once), analyzer


def wait_usable(engine: LocalEngine) -> None:
    deadline = time.monotonic() + 120
    while not (engine._procs is not None and engine._procs.usable()):
        assert time.monotonic() < deadline, "the processes never started"
        time.sleep(0.05)


def results(engine: LocalEngine, futures: list[Future[Outcome]]) -> list[Outcome]:
    engine.flush()
    return [fut.result(timeout=120) for fut in futures]


def test_processes_give_the_outcomes_threads_give(tmp_path: Path) -> None:
    items = tree(tmp_path / "root", 40)
    settings = Settings()
    on_threads = LocalEngine(Analyzer(settings, LocalProvider(settings)), workers=2, procs=1)
    expected = results(on_threads, [on_threads.submit(item) for item in items])
    on_threads.shutdown(wait=True)

    engine, _ = engine_with_processes()
    first = engine.submit(items[0])  # starts the processes; analysed on a thread
    wait_usable(engine)
    rest = [engine.submit(item) for item in items[1:]]
    got = results(engine, [first, *rest])
    engine.shutdown(wait=True)
    assert Counted.here == 1  # every later item went to the processes
    assert [comparable(o) for o in got] == [comparable(o) for o in expected]
    assert [o.status for o in got].count("error") == 1  # broken.png


def test_a_dead_process_loses_no_item(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = tree(tmp_path / "root", 40)
    engine, _ = engine_with_processes()
    engine.submit(items[0]).result(timeout=120)
    wait_usable(engine)
    assert engine._procs is not None and engine._procs._pool is not None
    for pid in list(engine._procs._pool._processes):  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, "imgbatch"):
        got = results(engine, [engine.submit(item) for item in items[1:]])
        engine.shutdown(wait=True)
    assert len(got) == len(items) - 1 and [o.status for o in got].count("ok") == len(items) - 2
    assert Counted.here >= len(items) - 1  # the threads did them
    assert "an analysing process failed" in caplog.text


def test_a_remote_provider_never_starts_processes() -> None:
    class Remote(LocalProvider):
        remote = True

    settings = Settings()
    engine = LocalEngine(
        Analyzer(settings, Remote(settings)), workers=2, procs=2, start_procs=at_once
    )
    assert engine.capacity() == 0
    engine.shutdown(wait=True)
