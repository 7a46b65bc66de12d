"""`--from-list` follow-ups (issue 24 item 2) through the real CLI and a real HTTP server
on 127.0.0.1: prune keeps what it cannot check, a dry run estimates URLs, export says
"unknown" for a URL's existence, a SIGKILL mid-run then a resume, `dupes` and `report`
of a list run, and the Python API's `from_list`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from imgbatch.checkpoint import Checkpoint
from tests.conftest import REPO, make_image, run_and_kill, run_cli
from tests.test_from_list import Site, image_bytes, site, write_list  # noqa: F401 - a fixture

FAKE = "tests.fake_cli"  # the CLI with the fake remote provider registered


def list_state_folder(name: str) -> Path:
    """The state folder of the list file called `name` (under the test's cache dir)."""
    (folder,) = (Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch").glob(f"{name}-*")
    return folder


def test_prune_of_a_list_run_keeps_urls_and_drops_only_missing_local_files(
    site: Site,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    red = site.serve("red.png", image_bytes(tmp_path, "red.png", (250, 0, 0)), etag='"r1"')
    kept = make_image(tmp_path / "pics" / "kept.jpg", color=(0, 0, 250))
    gone = make_image(tmp_path / "pics" / "gone.jpg", color=(0, 250, 0))
    listed = write_list(tmp_path / "items.txt", red, str(kept), str(gone))
    assert run_cli(["analyze", "--provider", "local", "--from-list", listed]).rc == 0
    gone.unlink()

    pruned = run_cli(["prune", "--checkpoint", list_state_folder("items.txt")])

    assert pruned.rc == 0, pruned.stderr
    assert "pruned 1 records" in pruned.stderr
    assert "kept 1 items of a list that prune cannot check" in pruned.stderr
    exported = run_cli(["export", "--from-list", listed])
    assert exported.rc == 0, exported.stderr
    assert sorted(r["path"] for r in exported.records) == sorted([red, str(kept)])


def test_a_dry_run_estimates_a_url_from_its_download(
    site: Site,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    url = site.serve("wide.png", image_bytes(tmp_path, "wide.png", (1, 2, 3)))
    local = make_image(tmp_path / "pics" / "here.png", color=(4, 5, 6))
    listed = write_list(tmp_path / "items.txt", url, str(local))

    dry = run_cli(
        ["analyze", "--provider", "fake", "--dry-run", "--from-list", listed], module=FAKE
    )

    assert dry.rc == 0, dry.stderr
    recs = {r["path"]: r for r in dry.records}
    assert recs[url]["status"] == "would-send", recs[url]
    assert recs[url]["estimated_tokens"] == 258  # the fake provider's rule
    assert recs[str(local)]["status"] == "would-send"
    assert "2 images would be sent" in dry.stderr
    assert len(site.requests("/img/wide.png")) == 1  # hashed and measured from one download
    assert not (list_state_folder("items.txt") / "downloads").exists() or not list(
        (list_state_folder("items.txt") / "downloads").iterdir()
    )


def test_export_of_a_list_run_has_the_meta_and_says_a_urls_existence_is_unknown(
    site: Site,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    red = site.serve("red.png", image_bytes(tmp_path, "red.png", (250, 0, 0)))
    local = make_image(tmp_path / "pics" / "blue.jpg", color=(0, 0, 250))
    gone = site.url("/img/gone.png")
    listed = write_list(
        tmp_path / "items.jsonl",
        {"url": red, "caption": "rouge", "id": 1},
        str(local),
        {"url": gone, "id": 2},
    )
    assert run_cli(["analyze", "--provider", "local", "--from-list", listed]).rc == 1

    exported = run_cli(["export", "--from-list", listed])

    assert exported.rc == 0, exported.stderr
    recs = {r["path"]: r for r in exported.records}
    assert recs[red]["exists"] is None and recs[red]["meta"] == {"caption": "rouge", "id": 1}
    assert recs[str(local)]["exists"] is True and "meta" not in recs[str(local)]
    assert recs[gone]["status"] == "error" and recs[gone]["meta"] == {"id": 2}
    # a later version of the list changes an item's meta: the export follows it
    write_list(listed, {"url": red, "caption": "red"}, str(local), {"url": gone, "id": 2})
    assert run_cli(["analyze", "--provider", "local", "--from-list", listed]).rc == 0
    again = {r["path"]: r for r in run_cli(["export", "--from-list", listed]).records}
    assert again[red]["meta"] == {"caption": "red"}


def test_a_list_run_killed_with_sigkill_resumes_losing_nothing(
    site: Site,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    rng = random.Random(20261207)  # kill moments are reproducible
    files, kills, workers, in_flight = 30, 3, 2, 4
    urls = [  # each its own width: the fake provider logs the width of every request
        site.serve(f"{i:02d}.png", image_bytes(tmp_path, f"{i:02d}.png", (i, 2 * i, 3)), f'"{i}"')
        for i in range(files)
    ]
    for i in range(files):  # image_bytes makes 32x24: remake each at its own width
        path = make_image(tmp_path / "w" / f"{i:02d}.png", size=(20 + i, 16), color=(i, 9, 9))
        site.files[f"{i:02d}.png"] = path.read_bytes()
    listed = write_list(tmp_path / "items.txt", *urls)
    calls = tmp_path / "calls.log"
    env = {
        **os.environ,
        "IMGBATCH_TEST_FAKE": json.dumps({"delay": 0.03, "log": str(calls)}),
        "IMGBATCH_RPM": "60000",
    }
    env.pop("PYTHONPATH", None)
    args = [sys.executable, "-m", FAKE, "analyze", "--provider", "fake", "--workers"]
    args += [str(workers), "--from-list", str(listed)]  # in flight: 2 x workers

    outputs = []
    for _ in range(kills):
        outputs += run_and_kill(args, env, rng, lines=(3, 8))
    final = subprocess.run(args, capture_output=True, env=env, cwd=REPO, timeout=120)

    assert final.returncode == 0, final.stderr.decode()
    assert "an earlier run was killed" in final.stderr.decode()
    outputs += [json.loads(line) for line in final.stdout.splitlines()]
    ok = Counter(str(r["path"]) for r in outputs if r["status"] == "ok")
    assert set(ok) == set(urls)  # nothing lost
    assert sum(ok.values()) - files <= kills  # a line repeats only if killed before its commit
    requested = Counter(calls.read_text().split())
    assert len(requested) == files
    # an item is requested again only if it was in flight at a kill
    assert sum(requested.values()) - files <= kills * in_flight
    with Checkpoint(list_state_folder("items.txt")) as cp:
        states = [r["state"] for r in cp.runs()]
    assert states == ["COMPLETED"] + ["ABORTED"] * kills
    again = run_cli(["analyze", "--provider", "fake", "--from-list", listed], env, module=FAKE)
    assert again.rc == 0 and again.records == []  # all done: nothing more to request
    assert sum(Counter(calls.read_text().split()).values()) == sum(requested.values())


def test_dupes_and_report_read_a_list_run_by_its_list(
    site: Site,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    body = image_bytes(tmp_path, "same.png", (30, 60, 90))
    a, b = site.serve("a.png", body), site.serve("b.png", body)  # one content, two URLs
    other = tmp_path / "other.png"  # noise: no near copy of a flat square
    Image.effect_noise((64, 48), 80).convert("RGB").save(other)
    listed = write_list(tmp_path / "items.txt", a, b, str(other))
    assert run_cli(["analyze", "--provider", "local", "--from-list", listed]).rc == 0

    dupes = run_cli(["dupes", "--from-list", listed])

    assert dupes.rc == 0, dupes.stderr
    (group,) = dupes.records
    assert sorted(m["path"] for m in group["files"]) == sorted([a, b]), group

    report = run_cli(["report", "--from-list", listed])

    assert report.rc == 0, report.stderr
    page = report.stdout.decode()
    assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype")
    assert "report of 3 items, 1 with a thumbnail" in report.stderr  # URLs: none
    assert run_cli(["dupes", str(tmp_path), "--from-list", listed]).rc == 2


def test_the_python_api_scans_and_analyses_a_list(
    site: Site,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    import imgbatch
    from imgbatch.errors import UsageError

    red = site.serve("red.png", image_bytes(tmp_path, "red.png", (250, 0, 0)), etag='"r1"')
    local = make_image(tmp_path / "pics" / "here.jpg", size=(40, 30), color=(10, 20, 30))
    listed = write_list(tmp_path / "items.jsonl", {"url": red, "id": 1}, str(local))

    scanned = list(imgbatch.scan(from_list=listed, download_timeout=5))

    assert [(r["path"], r.get("meta")) for r in scanned] == [(red, {"id": 1}), (str(local), None)]
    with imgbatch.analyze(provider="local", from_list=listed) as records:
        done = {r["path"]: r for r in records}
    assert done[red]["status"] == "ok" and done[red]["meta"] == {"id": 1}
    assert done[red]["result"]["format"] == "PNG"
    assert done[str(local)]["result"]["width"] == 40
    with imgbatch.analyze(provider="local", from_list=listed) as again:
        assert list(again) == []  # the same state: resumed, nothing new
    assert [len(b) for b in imgbatch.scan_batches(from_list=listed, batch_size=1)] == [1, 1]
    with pytest.raises(UsageError, match="one of the two"):
        imgbatch.scan(tmp_path, from_list=listed)
    with pytest.raises(UsageError, match="--batch is not available"):
        list(imgbatch.analyze(provider="local", from_list=listed, batch=True))
