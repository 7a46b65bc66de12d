"""`imgbatch.analyze` is at-least-once: a record is committed only once the caller has
handled it (asked for the next one, or ended the iteration cleanly), and `stop(grace)`
ends the iteration gracefully. Through the real Python API, with the offline analyzer
and with a fake remote provider that logs every request (to show nothing is paid twice).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import imgbatch
from imgbatch.api import Records
from imgbatch.checkpoint import Checkpoint
from imgbatch.errors import UsageError
from tests.conftest import make_image, run_cli, the_state_folder
from tests.fakeprovider import register_fake

register_fake()  # `provider="fake"`: a remote provider that logs its requests

FAST = {"rpm": 6000}  # the fake is remote: no pacing to speak of


class BodyFailed(Exception):
    """What the loop's body raises (say, a database write failed)."""


def photos(root: Path, n: int) -> Path:
    """`n` small images, each of its own width (the fake's log names the width)."""
    for i in range(n):
        make_image(root / f"d{i % 2}" / f"{i:02d}.png", size=(20 + i, 16))
    return root


def paths(records: list[dict[str, Any]]) -> list[str]:
    return sorted(r["path"] for r in records)


def every_path(root: Path) -> list[str]:
    return paths(list(imgbatch.scan(root)))


def use_fake(monkeypatch: pytest.MonkeyPatch, log: Path, delay: float = 0.0) -> None:
    """The fake provider's settings for the runs started from now on."""
    monkeypatch.setenv("IMGBATCH_TEST_FAKE", json.dumps({"delay": delay, "log": str(log)}))


def requests(log: Path) -> Counter[int]:
    """The fake's requests so far, by image width."""
    return Counter(int(w) for w in log.read_text().split()) if log.exists() else Counter()


def width(record: dict[str, Any]) -> int:
    return int(record["result"]["tags"][0][1:])  # the fake's first tag: "w<width>"


def last_run(before: int = 0) -> dict[str, Any]:
    """The newest run record (or the one `before` runs before it)."""
    with Checkpoint(the_state_folder(), create=False) as cp:
        return cp.runs()[before]


# -- at-least-once -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["with", "bare"])
def test_a_record_whose_handling_raised_comes_back_and_is_not_paid_for_twice(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = photos(tmp_path / "photos", 8)
    log = tmp_path / "requests.log"
    use_fake(monkeypatch, log)
    handled: list[dict[str, Any]] = []
    failed: dict[str, Any] = {}

    def consume(records: Records) -> None:
        for record in records:
            if len(handled) == 3:
                failed.update(record)
                raise BodyFailed("the database write failed")
            handled.append(record)

    with pytest.raises(BodyFailed):
        if how == "with":
            with imgbatch.analyze(root, "fake", **FAST) as records:
                consume(records)
        else:  # the iterator is dropped after the exception
            consume(imgbatch.analyze(root, "fake", **FAST))

    rest = list(imgbatch.analyze(root, "fake", **FAST))
    # the one whose handling raised comes back, from the results store: not paid twice
    [again] = [r for r in rest if r["path"] == failed["path"]]
    assert again["cached"] is True and again["result"] == failed["result"]
    assert requests(log)[width(failed)] == 1
    # the ones asked past never come back
    assert not set(paths(handled)) & set(paths(rest))
    assert paths(handled + rest) == every_path(root)


def test_records_asked_past_are_committed_though_a_later_one_of_their_group_failed(
    tmp_path: Path,
) -> None:
    # the offline analyzer commits in groups (record.COMMIT_EVERY): the group the failing
    # record belongs to is committed without it
    root = photos(tmp_path / "photos", 30)
    taken: list[dict[str, Any]] = []
    with pytest.raises(BodyFailed):
        for record in imgbatch.analyze(root, workers=2):
            taken.append(record)
            if len(taken) == 10:
                raise BodyFailed
    rest = list(imgbatch.analyze(root))
    assert len(rest) == 21
    [again] = [r for r in rest if r["path"] == taken[-1]["path"]]
    assert again["cached"] is True  # its result was kept
    assert paths(taken[:-1] + rest) == every_path(root)
    assert last_run(before=1)["counts"]["completed"] == 9


@pytest.mark.parametrize(("how", "comes_back"), [("with", False), ("bare", True)])
def test_break_inside_with_handled_the_record_and_without_it_at_least_once(
    how: str, comes_back: bool, tmp_path: Path
) -> None:
    root = photos(tmp_path / "photos", 8)
    taken: list[dict[str, Any]] = []
    if how == "with":
        with imgbatch.analyze(root) as records:
            for record in records:
                taken.append(record)
                if len(taken) == 3:
                    break
    else:  # a generator cannot tell this `break` from an exception
        for record in imgbatch.analyze(root):
            taken.append(record)
            if len(taken) == 3:
                break
    rest = paths(list(imgbatch.analyze(root)))
    assert (taken[-1]["path"] in rest) is comes_back
    assert not set(paths(taken[:-1])) & set(rest)
    assert sorted(set(paths(taken)) | set(rest)) == every_path(root)


# -- stop(grace) -------------------------------------------------------------------


def test_stop_from_the_loop_lets_the_in_flight_records_arrive_and_leaves_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = photos(tmp_path / "photos", 12)
    log = tmp_path / "requests.log"
    use_fake(monkeypatch, log, delay=0.3)
    first: list[dict[str, Any]] = []
    with imgbatch.analyze(root, "fake", workers=3, **FAST) as records:
        for record in records:
            if not first:
                # returns at once: were it to wait for the run, which waits for this
                # loop to ask for the next record, this would never return
                records.stop(grace=60)
            first.append(record)
    # the loop ended normally; every request sent came back as a record, intake stopped
    assert 1 < len(first) < 12
    assert Counter(width(r) for r in first) == requests(log)
    assert last_run()["state"] == "ABORTED"

    use_fake(monkeypatch, log)  # quick now
    rest = list(imgbatch.analyze(root, "fake", **FAST))
    assert paths(first + rest) == every_path(root)
    assert set(requests(log).values()) == {1}  # the items never sent: sent once, now


def test_stop_from_another_thread_abandons_what_is_still_out_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = photos(tmp_path / "photos", 6)
    log = tmp_path / "requests.log"
    use_fake(monkeypatch, log, delay=4.0)  # far longer than the grace
    records = imgbatch.analyze(root, "fake", workers=2, **FAST)

    def stop_once_sent() -> None:
        for _ in range(3000):  # the two first requests are out (or 30 s have passed)
            if len(requests(log)) >= 2:
                break
            time.sleep(0.01)
        records.stop(grace=0.5)

    stopper = threading.Thread(target=stop_once_sent)
    stopper.start()
    got = list(records)  # ends normally: no exception
    stopper.join()
    assert got == []
    assert last_run()["state"] == "ABORTED"

    use_fake(monkeypatch, log)
    res = run_cli(["analyze", root])  # the lock is free; nothing was recorded as done
    assert res.rc == 0, res.stderr
    assert paths(res.records) == every_path(root)


def test_stop_before_the_first_record_ends_the_iteration_without_a_run(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 3)
    records = imgbatch.analyze(root)
    records.stop()
    assert list(records) == []
    assert not (Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch").exists()  # no state at all
    assert len(list(imgbatch.analyze(root))) == 3


@pytest.mark.parametrize("grace", [-1, float("nan"), "10", True])
def test_stop_takes_a_number_of_seconds(grace: Any, tmp_path: Path) -> None:
    with (
        imgbatch.analyze(photos(tmp_path / "photos", 1)) as records,
        pytest.raises(UsageError, match="grace must be a number of seconds"),
    ):
        records.stop(grace)
