"""The JSONL sink: lines are written together, but a slow stream still reaches its reader."""

from __future__ import annotations

import os
import time

import pytest

from imgbatch.output import JsonlSink, OutputClosed


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


def test_a_trickle_is_written_once_max_delay_has_passed() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    sink = JsonlSink(w, flush_every=100, max_delay=0.05)
    sink.write(b"a\n")
    time.sleep(0.06)
    sink.write(b"b\n")  # a batch is far off, but the reader has waited long enough
    assert os.read(r, 100) == b"a\nb\n"


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
