"""The faults imgbatch survives, each with its exit code, through the real CLI.

stdout full or failing (`> /dev/full`) ........ 5, "cannot write output: ...";
                                                nothing unwritten recorded as done
the reader of stdout gone (`| head`) .......... 0, quietly
an exception nobody expected .................. 5, one line (traceback on request)
another run holds the lock .................... 3, naming it
SIGTERM / SIGINT while waiting for the lock ... 143 / 130, no run recorded
`status` probing while runs start ............. never makes them exit 3; it tells
                                                a live run from a killed one
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from imgbatch import history
from imgbatch.checkpoint import Checkpoint
from imgbatch.errors import OutputError
from imgbatch.lockfile import StateLock, holder
from imgbatch.output import JsonlSink
from tests.conftest import REPO, make_image, run_cli

READERS = {  # the commands that only read the state, and print it
    "export": ["export"],
    "export-csv": ["export", "--format", "csv"],
    "status": ["status"],
    "status-json": ["status", "--json"],
    "runs": ["runs"],
    "runs-json": ["runs", "--json"],
}
FAST_FAKE = {"IMGBATCH_RPM": "60000"}  # the fake remote provider, unpaced


def run(
    args: Sequence[str | os.PathLike[str]],
    stdout: int | IO[bytes],
    env: dict[str, str] | None = None,
    module: str = "imgbatch",
) -> tuple[int, str]:
    """Run the CLI with stdout going to `stdout`; returns the exit code and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("imgbatch: error:")]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for i in range(4):
        make_image(tmp_path / "photos" / f"{i}.png", size=(20 + i, 20))
    return tmp_path / "photos"


@pytest.fixture
def state(tree: Path, tmp_path: Path) -> Path:
    """The state of `tree` after one completed run."""
    res = run_cli(["analyze", "--checkpoint", tmp_path / "state", tree])
    assert res.rc == 0, res.stderr
    return tmp_path / "state"


@pytest.fixture
def dev_full() -> Iterator[IO[bytes]]:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "wb") as fh:
        yield fh


@pytest.fixture
def reader_gone() -> Iterator[int]:
    """The write end of a pipe whose reader has gone (`| head` that already exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    yield write_end
    os.close(write_end)


# -- stdout cannot be written: 5 --------------------------------------------------


@pytest.mark.parametrize("command", ["scan", *READERS])
def test_a_full_stdout_is_exit_5_and_one_line(
    command: str, tree: Path, state: Path, dev_full: IO[bytes]
) -> None:
    args = ["scan", tree] if command == "scan" else [*READERS[command], "--checkpoint", state]
    rc, stderr = run(args, stdout=dev_full)
    assert rc == 5, stderr
    assert errors(stderr) == ["imgbatch: error: cannot write output: No space left on device"]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_analyze_into_a_full_stdout_is_exit_5_and_records_nothing_as_done(
    tree: Path, tmp_path: Path, dev_full: IO[bytes]
) -> None:
    args = ["analyze", "--checkpoint", tmp_path / "state", tree]
    rc, stderr = run(args, stdout=dev_full)
    assert rc == 5, stderr
    assert errors(stderr) == ["imgbatch: error: cannot write output: No space left on device"]
    assert "Traceback" not in stderr
    again = run_cli(args)  # every item comes again: none was recorded as done
    assert again.rc == 0, again.stderr
    assert sorted(Path(r["path"]).name for r in again.records) == [f"{i}.png" for i in range(4)]
    runs = run_cli(["runs", "--json", "--checkpoint", tmp_path / "state"]).records
    assert [(r["state"], r["exit_code"]) for r in runs] == [("COMPLETED", 0), ("FAILED", 5)]


def test_export_to_a_file_that_cannot_be_written_is_exit_5_and_one_line(
    state: Path, tmp_path: Path
) -> None:
    target = tmp_path / "no-such-folder" / "out.jsonl"
    rc, stderr = run(["export", "--checkpoint", state, "-o", target], stdout=subprocess.PIPE)
    assert rc == 5, stderr
    assert errors(stderr) == [f"imgbatch: error: cannot write {target}: No such file or directory"]


def test_a_failed_stdout_stays_failed_so_nothing_after_it_counts_as_written(
    dev_full: IO[bytes],
) -> None:
    sink = JsonlSink(dev_full.fileno(), flush_every=10)
    sink.write(b"held\n")
    with pytest.raises(OutputError, match="cannot write output"):
        sink.flush()
    with pytest.raises(OutputError):  # a caller that flushes before committing: not out
        sink.flush()
    with pytest.raises(OutputError):
        sink.write(b"later\n")


# -- the reader of stdout went away: 0, quietly ----------------------------------


@pytest.mark.parametrize("command", READERS)
def test_a_reader_gone_ends_a_reading_command_with_0_quietly(
    command: str, state: Path, reader_gone: int
) -> None:
    rc, stderr = run([*READERS[command], "--checkpoint", state], stdout=reader_gone)
    assert (rc, stderr) == (0, "")


# -- an unexpected exception: 5, one line -----------------------------------------


@pytest.mark.parametrize("where", ["init", "close"])
def test_an_unexpected_exception_is_exit_5_and_one_line(where: str, tree: Path) -> None:
    env = {"IMGBATCH_TEST_FAULT": where, **FAST_FAKE}
    res = run_cli(["analyze", "--provider", "faulty", tree], env=env, module="tests.faulty_cli")
    assert res.rc == 5, res.stderr
    assert errors(res.stderr) == [
        "imgbatch: error: unexpected RuntimeError: injected fault "
        + ("in __init__" if where == "init" else "in close()")
    ]
    assert "Traceback" not in res.stderr and "Aborted" not in res.stderr


def test_the_traceback_of_an_unexpected_exception_is_shown_with_verbose(tree: Path) -> None:
    env = {"IMGBATCH_TEST_FAULT": "init"}
    args = ["analyze", "--verbose", "--provider", "faulty", tree]
    res = run_cli(args, env=env, module="tests.faulty_cli")
    assert res.rc == 5 and "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1] == (
        "imgbatch: error: unexpected RuntimeError: injected fault in __init__"
    )


# -- the lock ----------------------------------------------------------------------


def test_another_run_holding_the_lock_is_exit_3_naming_it(tree: Path, state: Path) -> None:
    with Checkpoint(state) as holder:
        holder.lock("prune")
        res = run_cli(["analyze", "--checkpoint", state, tree])
    assert res.rc == 3 and res.stdout == b""
    [error] = errors(res.stderr)
    assert error.startswith(f"imgbatch: error: prune (pid {os.getpid()}) since ")
    assert error.endswith(f" holds the lock on {state}")


def test_a_lock_record_left_by_a_dead_process_or_a_reused_pid_names_no_holder(
    tmp_path: Path,
) -> None:
    lock = StateLock(tmp_path)
    lock.acquire("analyze")
    path = tmp_path / "lock"
    record = json.loads(path.read_bytes())
    assert holder(tmp_path) == record and record["pid"] == os.getpid()
    with subprocess.Popen(["true"]) as gone:
        pass
    path.write_text(json.dumps({**record, "pid": gone.pid}))  # killed: its record stays
    assert holder(tmp_path) is None
    path.write_text(json.dumps({**record, "start": record["start"] + 1}))  # same pid, reused
    assert holder(tmp_path) is None
    elsewhere = {**record, "start": record["start"] + 1, "host": "elsewhere"}
    path.write_text(json.dumps(elsewhere))  # another machine's: cannot be checked, believed
    assert holder(tmp_path) == elsewhere
    lock.release()
    assert path.read_bytes() == b"" and holder(tmp_path) is None


def wait_for_line(stream: IO[bytes], text: bytes, timeout: float = 10) -> None:
    """Read `stream` until a line holds `text`; give up quietly after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return
        line = stream.readline()
        if not line or text in line:
            return


@pytest.mark.parametrize(
    ("command", "signum", "code"),
    [
        ("analyze", signal.SIGTERM, 143),
        ("analyze", signal.SIGINT, 130),
        ("prune", signal.SIGTERM, 143),
        ("prune", signal.SIGINT, 130),
    ],
)
def test_a_signal_ends_waiting_for_the_lock_at_once_and_records_no_run(
    command: str, signum: int, code: int, tree: Path, state: Path
) -> None:
    args = [command, "--wait", "--checkpoint", state] + ([tree] if command == "analyze" else [])
    with Checkpoint(state) as holder:
        holder.lock("analyze")
        with subprocess.Popen(
            [sys.executable, "-m", "imgbatch", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
        ) as proc:
            try:
                assert proc.stderr is not None
                wait_for_line(proc.stderr, b"waiting for analyze (pid")
                proc.send_signal(signum)
                assert proc.wait(timeout=10) == code  # not blocked in the kernel
            finally:
                proc.kill()
    runs = run_cli(["runs", "--json", "--checkpoint", state]).records
    assert [r["id"] for r in runs] == [1]


# -- looking never blocks doing ------------------------------------------------------


PROBE = """
import sys
from pathlib import Path
from imgbatch import history
with history.open_checkpoint(Path(sys.argv[1])) as cp:
    print("ready", flush=True)
    while True:
        cp.locked_by_other()
"""


def test_looking_beside_starting_runs_never_makes_them_exit_3(tree: Path, state: Path) -> None:
    stop = threading.Event()
    looks = 0

    def status_loop() -> None:  # `status`, as fast as it goes
        nonlocal looks
        while not stop.is_set():
            history.status(state)
            looks += 1

    looker = threading.Thread(target=status_loop)
    looker.start()
    # and, far faster, its "is a run alive?" alone, in a process of its own
    with subprocess.Popen(
        [sys.executable, "-c", PROBE, str(state)], stdout=subprocess.PIPE, cwd=REPO
    ) as prober:
        try:
            assert prober.stdout is not None and prober.stdout.readline() == b"ready\n"
            codes = [run_cli(["analyze", "--checkpoint", state, tree]).rc for _ in range(10)]
            assert prober.poll() is None  # it was looking all along
        finally:
            prober.kill()
            stop.set()
            looker.join()
    assert looks > 10 and codes == [0] * 10


def _status(state: Path) -> str:
    res = run_cli(["status", "--json", "--checkpoint", state])
    assert res.rc == 0, res.stderr
    state_: str = res.records[0]["state"]
    return state_


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return False


def test_status_tells_a_live_run_from_a_killed_one(tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # each answer takes 3 s: the run is still going when `status` looks, however slowly
    # a loaded machine starts that process (0.5 s was not always enough)
    env = {**os.environ, **FAST_FAKE, "IMGBATCH_TEST_FAKE": json.dumps({"delay": 3.0})}
    args = ["analyze", "--provider", "fake", "--workers", "1", "--checkpoint", str(state)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_cli", *args, str(tree)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None
    first: dict[str, Any] = json.loads(proc.stdout.readline())  # the run is under way
    assert first["status"] == "ok"
    assert _status(state) == "PROCESSING"

    proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _zombie(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # dead but not yet reaped, as under a busy parent
    assert _status(state) == "ABORTED"
    proc.wait()
    proc.stdout.close()
    assert _status(state) == "ABORTED"
    res = run_cli([*args, tree], env={**FAST_FAKE}, module="tests.fake_cli")
    assert res.rc == 0 and "an earlier run was killed" in res.stderr
