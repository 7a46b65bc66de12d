"""The JSONL sink: lines are written together, but a slow stream still reaches its reader
(the producer flushes before it waits)."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imgbatch.config import Settings
from imgbatch.errors import OutputClosed
from imgbatch.output import JsonlSink
from imgbatch.scanner import LARGE_FILE, run_scan
from tests.conftest import make_image


def test_lines_are_held_for_a_batch_then_written_together() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    sink = JsonlSink(w, flush_every=3, max_delay=60)
    sink.write(b"1\n")
    sink.write(b"2\n")
    with pytest.raises(BlockingIOError):
        os.read(r, 100)  # not yet: the batch is not full
    sink.write(b"3\n")
    assert os.read(r, 100) == b"1\n2\n3\n"


def test_a_write_after_max_delay_writes_what_was_held() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    sink = JsonlSink(w, flush_every=100, max_delay=0.05)
    sink.write(b"a\n")
    with pytest.raises(BlockingIOError):
        os.read(r, 100)  # held: the batch is far off
    time.sleep(0.06)
    sink.write(b"b\n")  # the reader has waited long enough
    assert os.read(r, 100) == b"a\nb\n"


# A writer alone cannot send a line held in a buffer when nothing else is written: the
# producer must flush before it waits. `scan` does, whether it waits for a folder's
# listing (a network share) or for a large file's contents; a slow filesystem is played
# by holding those calls until the line has arrived. The sink's own max_delay is 60 s
# and its batch 100 lines, so neither of them writes the line.


def scan_beside(root: Path, sink: JsonlSink, **settings: Any) -> threading.Thread:
    """`scan ROOT` (no hash cache) into `sink`, in a thread."""
    failures: list[BaseException] = []

    def scan() -> None:
        try:
            run_scan(str(root), Settings(**settings), sink)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    thread = threading.Thread(target=scan, daemon=True)
    thread.failures = failures  # type: ignore[attr-defined]
    thread.start()
    return thread


def read_within(fd: int, seconds: float) -> bytes:
    """What arrives on `fd` within `seconds` (b"" if nothing does)."""
    ready, _, _ = select.select([fd], [], [], seconds)
    return os.read(fd, 1 << 16) if ready else b""


def test_scan_writes_a_held_line_before_it_waits_for_a_slow_folder_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    make_image(root / "a" / "1.png")
    make_image(root / "b" / "2.png")
    listed = threading.Event()
    real_scandir = os.scandir

    def slow_scandir(path: str) -> Any:
        if os.path.basename(path) == "b":  # a folder that takes its time to list
            listed.wait(30)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", slow_scandir)
    r, w = os.pipe()
    sink = JsonlSink(w, flush_every=100, max_delay=60)
    scan = scan_beside(root, sink)
    try:
        first = read_within(r, 10)
    finally:
        listed.set()
        scan.join(30)
    sink.close()
    assert scan.failures == []  # type: ignore[attr-defined]
    assert first.count(b"\n") == 1 and b"/a/1.png" in first
    assert b"/b/2.png" in read_within(r, 10)


@pytest.mark.parametrize("threads", [1, 2])  # hashed inline, or by a hashing thread
def test_scan_writes_a_held_line_before_it_waits_for_a_large_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    root = tmp_path / "root"
    make_image(root / "1.png")
    (root / "2.png").write_bytes(b"\0" * LARGE_FILE)  # the last: no listing follows it
    read = threading.Event()
    real_readv = os.readv

    def slow_readv(fd: int, buffers: Any) -> int:
        if os.fstat(fd).st_size >= LARGE_FILE:  # a large file on a slow disk
            read.wait(30)
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", slow_readv)
    r, w = os.pipe()
    sink = JsonlSink(w, flush_every=100, max_delay=60)
    scan = scan_beside(root, sink, hash_threads=threads)
    try:
        first = read_within(r, 10)
    finally:
        read.set()
        scan.join(30)
    sink.close()
    assert scan.failures == []  # type: ignore[attr-defined]
    assert first.count(b"\n") == 1 and b"/1.png" in first
    assert b"/2.png" in read_within(r, 10)


def test_flush_and_close_write_what_is_held() -> None:
    r, w = os.pipe()
    sink = JsonlSink(w, flush_every=100)
    sink.write(b"x\n")
    sink.flush()
    assert os.read(r, 100) == b"x\n"
    sink.write(b"y\n")
    sink.close()
    assert os.read(r, 100) == b"y\n"


def test_a_closed_pipe_raises_output_closed_once_then_refuses() -> None:
    r, w = os.pipe()
    saved = os.dup(w)  # the sink points a broken fd at /dev/null: use a spare one
    os.close(r)
    sink = JsonlSink(saved, flush_every=1)
    with pytest.raises(OutputClosed):
        sink.write(b"lost\n")
    with pytest.raises(OutputClosed):
        sink.write(b"again\n")
    os.close(saved)
    os.close(w)
