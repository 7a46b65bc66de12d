"""The analyze pipeline as a library: what is processed, stored, reused and retried."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from imgbatch import statedb
from imgbatch.checkpoint import LARGE_FOLDER, Checkpoint
from imgbatch.config import Settings, load_settings
from imgbatch.errors import CheckpointError, LockHeldError
from imgbatch.output import JsonlSink
from imgbatch.pipeline import Pipeline, RunContext, RunOptions, RunSummary
from imgbatch.providers import base
from imgbatch.providers.local import LocalProvider
from tests.conftest import make_image
from tests.fakeprovider import FakeRemote


class CountingLimiter:
    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def acquire(self, tokens: int = 0, max_pause: float | None = None) -> bool:
        with self._lock:
            self.n += 1
        return False

    def accepted(self) -> None:
        pass

    def rate_limited_for(self, retry_after: float | None) -> None:
        pass


def run(
    root: Path,
    state: Path,
    provider: Any = None,
    options: RunOptions | None = None,
    limiter: Any = None,
    large_folder: int = LARGE_FOLDER,
    **settings: Any,
) -> tuple[RunSummary, list[dict[str, Any]]]:
    """One pipeline run; returns its summary and the records it printed."""
    s = Settings(retry_delay=0.001, **settings)
    provider = provider or LocalProvider(s)
    out = state.parent / f"out-{os.urandom(4).hex()}.jsonl"
    with out.open("wb") as fh, Checkpoint(state, large_folder=large_folder) as cp:
        sink = JsonlSink(fh.fileno(), flush_every=1)
        ctx = RunContext(str(root), s, options or RunOptions(), provider, cp, sink, limiter=limiter)
        summary = Pipeline(ctx).run()
        sink.close()
    return summary, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(6):
        make_image(root / f"d{i % 2}" / f"img{i}.png", size=(40 + i, 30), color=(i * 40, 10, 90))
    return root


def names(records: list[dict[str, Any]]) -> list[str]:
    return sorted(os.path.basename(r["path"]) for r in records)


def test_every_image_gets_one_ok_record_with_the_analysis(tree: Path, tmp_path: Path) -> None:
    summary, recs = run(tree, tmp_path / "state")
    assert names(recs) == [f"img{i}.png" for i in range(6)]
    for r in recs:
        assert r["status"] == "ok" and r["provider"] == "local" and r["model"] == "local-1"
        assert r["result"]["width"] == int(r["path"][-5]) + 40
        assert r["cached"] is False and r["latency_ms"] >= 0
    assert summary.counts["completed"] == 6 and summary.state == "COMPLETED"


def test_a_rerun_processes_nothing_and_prints_nothing(tree: Path, tmp_path: Path) -> None:
    run(tree, tmp_path / "state")
    summary, recs = run(tree, tmp_path / "state")
    assert recs == [] and summary.counts["skipped"] == 6 and summary.exit_code == 0


def test_a_rerun_processes_new_and_changed_files_only(tree: Path, tmp_path: Path) -> None:
    run(tree, tmp_path / "state")
    make_image(tree / "d0" / "img0.png", size=(99, 30))  # changed content
    make_image(tree / "new.png", size=(77, 30))
    summary, recs = run(tree, tmp_path / "state")
    assert names(recs) == ["img0.png", "new.png"]
    assert {r["result"]["width"] for r in recs} == {99, 77}


def test_emit_all_reprints_stored_results_as_cached(tree: Path, tmp_path: Path) -> None:
    _, first = run(tree, tmp_path / "state")
    _, again = run(tree, tmp_path / "state", options=RunOptions(emit_all=True))
    assert names(again) == names(first) and all(r["cached"] for r in again)
    key = {r["path"]: r["result"] for r in first}
    assert all(key[r["path"]] == r["result"] for r in again)


def test_identical_content_is_analysed_once(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(5):
        make_image(root / f"copy{i}.png", size=(50, 50))  # five copies of one image
    make_image(root / "other.png", size=(51, 50))
    fake = FakeRemote(Settings())
    summary, recs = run(root, tmp_path / "state", provider=fake, workers=3)
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs)
    assert dict(fake.calls) == {50: 1, 51: 1}
    assert sum(r["cached"] for r in recs) == 4 and summary.counts["cached"] == 4


def test_remote_providers_take_a_limiter_token_per_request(tree: Path, tmp_path: Path) -> None:
    limiter = CountingLimiter()
    run(tree, tmp_path / "s1", provider=FakeRemote(Settings()), limiter=limiter)
    assert limiter.n == 6
    local = CountingLimiter()
    run(tree, tmp_path / "s2", limiter=local)
    assert local.n == 0  # the offline analyzer runs unthrottled


def test_transient_errors_are_retried_within_the_run(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGBATCH_TEST_FAKE", json.dumps({"fail": {"41": ["TIMEOUT", "AI_ERROR"]}}))
    fake = FakeRemote(Settings())
    _, recs = run(tree, tmp_path / "state", provider=fake)
    [r] = [r for r in recs if r["result"] and r["result"]["tags"][0] == "w41"]
    assert r["status"] == "ok" and r["attempts"] == 3 and fake.calls[41] == 3
    assert r["input_tokens"] == 258 and r["output_tokens"] == 12


def test_transient_failures_are_retried_by_the_next_run(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGBATCH_TEST_FAKE", json.dumps({"fail": {"42": ["TIMEOUT"] * 2}}))
    summary, recs = run(tree, tmp_path / "state", provider=FakeRemote(Settings()), max_attempts=2)
    [failed] = [r for r in recs if r["status"] == "error"]
    assert failed["error"]["code"] == "TIMEOUT" and failed["attempts"] == 2
    assert summary.exit_code == 1 and summary.state == "PARTIAL"
    monkeypatch.delenv("IMGBATCH_TEST_FAKE")
    summary, recs = run(tree, tmp_path / "state", provider=FakeRemote(Settings()))
    assert names(recs) == ["img2.png"] and recs[0]["status"] == "ok"


def test_permanent_errors_are_kept_unless_retry_failed(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_image(root / "good.png")
    (root / "text.jpg").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    summary, recs = run(root, tmp_path / "state")
    bad = {os.path.basename(r["path"]): r["error"]["code"] for r in recs if r["status"] == "error"}
    assert bad == {"text.jpg": "BAD_IMAGE", "empty.png": "BAD_IMAGE"}
    assert summary.exit_code == 1
    _, again = run(root, tmp_path / "state")
    assert again == []
    _, retried = run(root, tmp_path / "state", options=RunOptions(retry_failed=True))
    assert names(retried) == ["empty.png", "text.jpg"]


def test_fresh_reprocesses_everything(tree: Path, tmp_path: Path) -> None:
    fake = FakeRemote(Settings())
    run(tree, tmp_path / "state", provider=fake)
    _, recs = run(tree, tmp_path / "state", provider=fake, options=RunOptions(fresh=True))
    assert len(recs) == 6 and not any(r["cached"] for r in recs)
    assert all(n == 2 for n in fake.calls.values())


def test_limit_caps_a_run_and_the_next_run_continues(tree: Path, tmp_path: Path) -> None:
    _, first = run(tree, tmp_path / "state", options=RunOptions(limit=4), workers=1)
    assert len(first) == 4
    _, rest = run(tree, tmp_path / "state")
    assert sorted(names(first) + names(rest)) == [f"img{i}.png" for i in range(6)]


def test_a_changed_setting_changes_the_fingerprint(tree: Path, tmp_path: Path) -> None:
    run(tree, tmp_path / "state", max_side=768)
    _, same = run(tree, tmp_path / "state", max_side=768)
    _, other = run(tree, tmp_path / "state", max_side=256)
    assert same == [] and len(other) == 6


def test_runs_are_recorded_in_the_checkpoint(tree: Path, tmp_path: Path) -> None:
    run(tree, tmp_path / "state")
    run(tree, tmp_path / "state")
    with Checkpoint(tmp_path / "state") as cp:
        runs = cp.runs()
    assert [r["id"] for r in runs] == [2, 1]
    assert runs[1]["state"] == "COMPLETED" and runs[1]["counts"]["completed"] == 6
    assert runs[0]["counts"]["skipped"] == 6 and runs[0]["ended"] >= runs[0]["started"]


def test_an_incompatible_checkpoint_format_is_a_clear_error(tmp_path: Path) -> None:
    with Checkpoint(tmp_path / "state"):
        pass
    # as a later imgbatch would leave it (the layout in checkpoint.py's docstring)
    with statedb.open_cache(tmp_path / "state" / "checkpoint") as db:
        db.set(b"format", 999)
    with pytest.raises(CheckpointError, match="format version 999"):
        Checkpoint(tmp_path / "state")


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    with Checkpoint(tmp_path / "state") as first:
        first.lock("analyze")
        with (
            Checkpoint(tmp_path / "state") as second,
            pytest.raises(LockHeldError, match=rf"analyze \(pid {os.getpid()}\) since"),
        ):
            second.lock("analyze")
    with Checkpoint(tmp_path / "state") as third:
        third.lock("analyze")  # released when the holder closed


def test_auto_picks_a_remote_provider_only_with_a_key_for_imgbatch() -> None:
    def choose(env: dict[str, str]) -> str:  # settings loaded as the CLI loads them
        return base.choose("auto", load_settings(None, {}, env), env)

    assert choose({}) == "local"
    assert choose({"GOOGLE_API_KEY": "k"}) == "local"
    assert choose({"GEMINI_API_KEY": "k"}) == "gemini"
    assert choose({"IMGBATCH_GEMINI_API_KEYS": "a,b"}) == "gemini"


def test_a_dry_run_records_nothing(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_image(root / "a.png", size=(40, 40))
    make_image(root / "b.png", size=(41, 40))
    run(
        root,
        tmp_path / "state",
        provider=FakeRemote(Settings()),
        options=RunOptions(limit=1),
        workers=1,
    )
    make_image(root / "copy-of-a.png", size=(40, 40))  # its result is already stored
    (root / "bad.png").write_text("x")
    summary, recs = run(
        root, tmp_path / "state", provider=FakeRemote(Settings()), options=RunOptions(dry_run=True)
    )
    assert {os.path.basename(r["path"]): r["status"] for r in recs} == {
        "b.png": "would-send",
        "bad.png": "error",
    }
    assert summary.counts["cached"] == 1 and summary.counts["would_send"] == 1
    _, real = run(root, tmp_path / "state", provider=FakeRemote(Settings()))
    assert names(real) == ["b.png", "bad.png", "copy-of-a.png"]  # the dry run recorded nothing


def test_a_large_folder_is_stored_one_row_per_item(tmp_path: Path) -> None:
    from imgbatch import history

    root = tmp_path / "photos"
    for i in range(12):
        make_image(root / f"{i:02d}.png", size=(20 + i, 20))
    (root / "bad.png").write_text("x")
    _, first = run(root, tmp_path / "state", large_folder=5)
    assert len(first) == 13
    with Checkpoint(tmp_path / "state", large_folder=5) as cp:
        fp = cp.runs()[0]["fingerprint"]
        assert len(cp.folder(fp, "")) == 1  # the folder's row (a marker) no longer grows
        assert cp.state(fp, "", "03.png")[1] is None
        assert cp.state(fp, "", "bad.png")[1] == "BAD_IMAGE"
    _, again = run(root, tmp_path / "state", large_folder=5)
    assert again == []  # every item found
    out = io.BytesIO()
    assert history.export(tmp_path / "state", "jsonl", None, out) == 13
    (root / "04.png").unlink()
    assert history.prune(tmp_path / "state") == 1
    assert history.export(tmp_path / "state", "jsonl", None, io.BytesIO()) == 12
