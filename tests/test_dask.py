"""`--executor dask`: the same records as local threads, on a real LocalCluster and on a
real `dask scheduler` with `dask worker` subprocesses (one of them killed mid-run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import NOBODY, REPO, make_image, run_cli

TIMINGS = ("latency_ms",)


def records_by_path(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records keyed by path, without their timings (which differ run to run)."""
    return {r["path"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in records}


def photos(root: Path, n: int, side: int = 64) -> Path:
    for i in range(n):
        make_image(root / f"d{i % 3}" / f"{i:03d}.png", (side + i, side), (i * 7 % 256, 90, 30))
    make_image(root / "d0" / "copy.png", (side, side), (0, 90, 30))  # a duplicate of 000
    (root / "d1").mkdir(parents=True, exist_ok=True)
    (root / "d1" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return root


def analyze(root: Path, *args: str, results: Path, env: dict[str, str] | None = None) -> Any:
    return run_cli(
        ["analyze", str(root), *args],
        env={"IMGBATCH_RESULTS": str(results), **(env or {})},
        timeout=180,
    )


def test_a_local_cluster_run_gives_the_records_of_a_threads_run(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 12)
    local = analyze(root, "--checkpoint", str(tmp_path / "s1"), results=tmp_path / "r1")
    dask = analyze(
        root,
        *("--executor", "dask", "--workers", "2", "--checkpoint", str(tmp_path / "s2")),
        results=tmp_path / "r2",
    )
    assert local.rc == dask.rc == 1  # broken.jpg
    assert "executor: dask (a LocalCluster of 2 processes)" in dask.stderr
    assert len(dask.records) == 14
    assert records_by_path(dask.records) == records_by_path(local.records)
    history = run_cli(["runs", "--json", "--checkpoint", tmp_path / "s2"]).records
    assert history[0]["executor"] == "dask"


def test_a_remote_provider_decodes_on_workers_and_sends_from_the_driver(tmp_path: Path) -> None:
    """The fake remote provider exists in the driver only (tests.fake_cli registers it):
    the workers decode, the driver sends through its limiter."""
    root = photos(tmp_path / "photos", 6)
    log = tmp_path / "calls.log"
    env = {"IMGBATCH_TEST_FAKE": json.dumps({"log": str(log)}), "IMGBATCH_RPM": "6000"}

    def run(*args: str, results: Path) -> Any:
        return run_cli(
            ["analyze", str(root), "--provider", "fake", *args],
            env={"IMGBATCH_RESULTS": str(results), **env},
            module="tests.fake_cli",
            timeout=180,
        )

    local = run("--checkpoint", str(tmp_path / "s1"), results=tmp_path / "r1")
    dask = run(
        *("--executor", "dask", "--workers", "2", "--checkpoint", str(tmp_path / "s2")),
        results=tmp_path / "r2",
    )
    assert dask.rc == local.rc == 1, dask.stderr
    assert records_by_path(dask.records) == records_by_path(local.records)
    assert len(log.read_text().split()) == 2 * 6  # 6 distinct pictures, each run


def test_without_the_extra_dask_is_exit_2_with_the_pip_command(tmp_path: Path) -> None:
    root = photos(tmp_path / "photos", 1)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['distributed'] = None\n")
    proc = subprocess.run(
        [sys.executable, "-m", "imgbatch", "analyze", str(root), "--executor", "dask"],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(hide)},
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "pip install 'imgbatch[dask]'" in proc.stderr.decode()
    assert proc.stdout == b""


# -- a real scheduler and workers, as on a cluster ---------------------------------------


class Cluster:
    """`dask scheduler` and `dask worker` subprocesses."""

    def __init__(self, base: Path, spy: Path) -> None:
        self.base = base
        self.file = base / "scheduler.json"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "IMGBATCH_TEST_SPY": str(spy)}
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler"]
            + ["--scheduler-file", str(self.file)]
            # a free port: two test workers (xdist) may each run a cluster at once
            + ["--no-dashboard", "--host", "127.0.0.1", "--port", "0"]
            + ["--preload", "tests.dask_spy"],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.workers: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + 180  # a loaded machine imports distributed slowly
        while not self.file.exists() and time.monotonic() < deadline:
            assert self.scheduler.poll() is None, "the scheduler exited"
            time.sleep(0.1)
        assert self.file.exists(), "the scheduler did not start"

    @property
    def address(self) -> str:
        return str(json.loads(self.file.read_text())["address"])

    def add_worker(self, user: int | None = None) -> subprocess.Popen[bytes]:
        local = self.base / f"worker-{len(self.workers)}"
        local.mkdir(mode=0o777)
        local.chmod(0o777)
        cmd = [sys.executable, "-m", "distributed.cli.dask_worker", self.address]
        cmd += ["--nthreads", "1"]
        cmd += ["--no-dashboard", "--local-directory", str(local)]
        if user is not None:  # its nanny cannot spawn here: the worker runs on its own
            cmd += ["--no-nanny"]
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        env = {**self.env, "HOME": str(local)}
        worker = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(n, timeout=180)

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def cluster(shared_tmp: Path) -> Iterator[Cluster]:
    c = Cluster(shared_tmp, shared_tmp / "spy.bin")
    try:
        yield c
    finally:
        c.close()


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    victim = cluster.add_worker()
    cluster.add_worker()
    cluster.wait_for_workers(2)
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(60):  # noise: a few tens of ms each to analyse
        Image.effect_noise((900, 700), 40 + i).convert("RGB").save(root / f"{i:02d}.png")
    env = {**os.environ, "IMGBATCH_RESULTS": str(tmp_path / "results")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "analyze", str(root)]
        + ["--executor", "dask", "--dask-scheduler", cluster.address, "--workers", "2"],
        stdout=subprocess.PIPE,
        bufsize=0,  # readline() then communicate(): no buffer to lose
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(10)]  # the run is under way
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    records = [json.loads(line) for line in [*lines, *out.splitlines()]]
    assert proc.returncode == 0, err.decode()
    assert sorted(Path(r["path"]).name for r in records) == [f"{i:02d}.png" for i in range(60)]
    assert all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_no_api_key_travels_to_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    cluster.add_worker()
    cluster.wait_for_workers(1)
    root = photos(tmp_path / "photos", 3)
    secret = "test-key-SECRET-dask-7d1e0123456789"
    res = run_cli(
        ["analyze", str(root), "--provider", "local", "--executor", "dask"]
        + ["--dask-scheduler", cluster.address],
        env={"IMGBATCH_GEMINI_API_KEYS": secret, "IMGBATCH_RESULTS": str(tmp_path / "r")},
        timeout=120,
    )
    assert res.rc == 1, res.stderr  # broken.jpg
    submitted = (cluster.base / "spy.bin").read_bytes()
    assert str(root / "d0" / "000.png").encode() in submitted  # the spy saw the tasks
    assert secret.encode() not in submitted


@pytest.mark.slow
def test_workers_that_cannot_see_root_are_exit_2(cluster: Cluster, tmp_path: Path) -> None:
    """A worker as another user cannot enter pytest's 0700 tmp_path: as a worker on a
    machine without the shared filesystem would not find ROOT."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a worker as another user")
    cluster.add_worker(user=NOBODY)
    cluster.wait_for_workers(1)
    root = photos(tmp_path / "photos", 1)
    res = run_cli(
        ["analyze", str(root), "--executor", "dask", "--dask-scheduler", cluster.address],
        env={"IMGBATCH_RESULTS": str(tmp_path / "r")},
        timeout=120,
    )
    assert res.rc == 2
    assert "not visible to the Dask workers at the same path" in res.stderr
    assert res.stdout == b""


@pytest.mark.slow
def test_a_lost_scheduler_is_exit_5_with_what_finished_recorded(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.add_worker()
    cluster.wait_for_workers(1)
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(60):
        Image.effect_noise((900, 700), 40 + i).convert("RGB").save(root / f"{i:02d}.png")
    state = tmp_path / "state"
    env = {**os.environ, "IMGBATCH_RESULTS": str(tmp_path / "results")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "analyze", str(root), "--checkpoint", str(state)]
        + ["--executor", "dask", "--dask-scheduler", cluster.address],
        stdout=subprocess.PIPE,
        bufsize=0,  # readline() then communicate(): no buffer to lose
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(5)]
    cluster.scheduler.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    printed = [json.loads(line) for line in [*lines, *out.splitlines()]]
    assert proc.returncode == 5
    errors = [line for line in err.decode().splitlines() if "error" in line]
    assert errors == [
        "imgbatch: error: lost the Dask scheduler; what finished is recorded: run again to resume"
    ]
    assert 5 <= len(printed) < 60
    exported = run_cli(
        ["export", "--checkpoint", state], env={"IMGBATCH_RESULTS": env["IMGBATCH_RESULTS"]}
    )
    assert {r["path"] for r in exported.records} == {r["path"] for r in printed}


def test_ctrl_c_stops_a_local_cluster_run_like_a_threads_run(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group: the driver stops gracefully
    (exit 130), the workers finish what is in flight instead of dying with tracebacks."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(40):
        Image.effect_noise((900, 700), 40 + i).convert("RGB").save(root / f"{i:02d}.png")
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgbatch", "analyze", str(root), "--checkpoint", str(state)]
        + ["--executor", "dask", "--workers", "2", "--grace", "60"],
        stdout=subprocess.PIPE,
        bufsize=0,  # readline() then communicate(): no buffer to lose
        stderr=subprocess.PIPE,
        env={**os.environ, "IMGBATCH_RESULTS": str(tmp_path / "results")},
        cwd=REPO,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    printed = [json.loads(line) for line in [*lines, *out.splitlines()]]
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
    assert "abandoning" not in err.decode()  # in-flight items finished within the grace
    assert all(r["status"] == "ok" for r in printed) and len(printed) < 40
    again = run_cli(
        ["analyze", str(root), "--checkpoint", str(state)],
        env={"IMGBATCH_RESULTS": str(tmp_path / "results")},
    )
    assert again.rc == 0
    assert len(again.records) + len(printed) == 40  # resumed where it stopped


def test_gemini_through_dask_sends_the_same_uploads_as_threads(tmp_path: Path) -> None:
    """The worker decodes and encodes (a key-free encoder); the driver, which alone holds
    the key, sends: the fake Gemini server sees the same uploads as from threads."""
    from tests.fakegemini import FakeGemini

    key = "test-key-SECRET-dask-0123456789"
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"img{i}.jpg", size=(1600 + 10 * i, 1200), color=(30 * i, 90, 150))
    with FakeGemini(keys={key}, seed=7) as server:
        env = {
            "GEMINI_API_KEY": key,
            "IMGBATCH_GEMINI_BASE_URL": server.url,
            "IMGBATCH_RPM": "6000",
        }

        def run(*args: str, n: int) -> Any:
            return run_cli(
                ["analyze", str(root), "--checkpoint", str(tmp_path / f"s{n}"), *args],
                env={**env, "IMGBATCH_RESULTS": str(tmp_path / f"r{n}")},
                timeout=180,
            )

        local = run(n=1)
        dask = run("--executor", "dask", "--workers", "2", n=2)
        assert local.rc == dask.rc == 0, dask.stderr
        assert records_by_path(dask.records) == records_by_path(local.records)
        sent = server.requests
        assert len(sent) == 8 and {r.api_key for r in sent} == {key}
        uploads = [sorted(i.data for r in part for i in r.images) for part in (sent[:4], sent[4:])]
        assert uploads[0] == uploads[1]  # the same bytes uploaded, whoever encoded them
        assert server.errors == []
