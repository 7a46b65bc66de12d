"""The fast paths of issue 14 give exactly what the plain ones gave: the offline
analyzer's features (vectorised pHash, colour names, brightness, the thumbnail colour
shortcut), the scan's read-ahead for cold caches, its worker processes when one is lost,
and the grouped commits of `analyze`. No timing is asserted: clocks are fakes."""

from __future__ import annotations

import errno
import logging
import math
import operator
import os
import random
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageStat

from imgbatch import cpus, hashjob
from imgbatch.config import Settings
from imgbatch.output import JsonlSink
from imgbatch.providers import local_features
from imgbatch.providers.local_features import brightness, color_names, dominant_colors, phash
from imgbatch.records import FileRecord
from imgbatch.scanner import Scanner, Schedule, Ticket, Workers, run_scan

# -- the offline analyzer: the same values as the plain computations ----------------------

_COS = {u: [math.cos((2 * x + 1) * u * math.pi / 64) for x in range(32)] for u in range(1, 9)}


def reference_phash(image: Image.Image) -> str:
    """The pHash as imgbatch computed it before numpy: pure Python, left-to-right sums."""
    gray = image if image.mode == "L" else image.convert("L")
    pixels = gray.resize((32, 32), Image.Resampling.BOX).tobytes()
    rows = [pixels[y * 32 : (y + 1) * 32] for y in range(32)]
    columns = [[sum(map(operator.mul, _COS[u], row)) for row in rows] for u in range(1, 9)]
    coefficients = [
        round(sum(map(operator.mul, _COS[v], column)), 6) for v in range(1, 9) for column in columns
    ]
    median = statistics.median(coefficients)
    bits = 0
    for value in coefficients:
        bits = (bits << 1) | (value > median)
    return f"{bits:016x}"


def random_images(n: int, seed: int) -> list[Image.Image]:
    """Noise, flat, two-tone and gradient images of many sizes, from a fixed seed."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = rng.randint(1, 200), rng.randint(1, 200)
        kind = rng.random()
        if kind < 0.5:
            arr = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind < 0.75:
            arr = np.full((h, w, 3), rng.randrange(256), np.uint8)
            arr[: h // 2] = rng.randrange(256)
        else:
            ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
            arr = ramp.astype(np.uint8)
        images.append(Image.fromarray(arr))
    return images


def test_the_vectorised_phash_is_bit_for_bit_the_pure_python_one() -> None:
    for image in random_images(400, seed=14):
        assert phash(image) == reference_phash(image), image.size


def test_rounding_near_a_half_millionth_is_pythons() -> None:
    # values whose sixth decimal is decided by the rounding: numpy's multiply-and-rint
    # gets some of these wrong; round6 hands them to Python's round()
    values = np.array([0.0000005, 1.0000005, -2.5000005, 0.1234565, 7.0000015, 1e-13, -0.0])
    values = np.concatenate([values, np.nextafter(values, 1), np.nextafter(values, -1)])
    expected = [round(float(v), 6) for v in values]
    assert local_features.round6(values).tolist() == expected


def reference_color_name(rgb: tuple[int, int, int]) -> str:
    lab = local_features.srgb_to_lab(rgb)
    return min(local_features.NAMED_LAB, key=lambda named: math.dist(lab, named[1]))[0]


def test_colour_names_are_those_of_the_nearest_prototype_by_math_dist() -> None:
    rng = random.Random(5)
    colors = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(3000)]
    colors += [rgb for _, shades in local_features.NAMED_SRGB.items() for rgb in shades]
    names = color_names(colors)  # type: ignore[arg-type]
    assert names == [reference_color_name(c) for c in colors]  # type: ignore[arg-type]


def test_brightness_is_imagestats_mean() -> None:
    for image in random_images(100, seed=3):
        gray = image.convert("L")
        assert brightness(gray) == ImageStat.Stat(gray).mean[0] / 255


def test_thumbnails_quantized_as_they_are_give_the_colours_of_their_48x48_upscale() -> None:
    rng = random.Random(8)
    sides = [1, 2, 3, 4, 6, 8, 12, 16, 24]
    for _ in range(300):
        w, h = rng.choice(sides), rng.choice(sides)
        palette = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(rng.randint(1, 9))]
        image = Image.new("RGB", (w, h))
        image.putdata([rng.choice(palette) for _ in range(w * h)])
        upscaled = image.resize((48, 48), Image.Resampling.BOX)
        assert dominant_colors(image) == dominant_colors(upscaled), (w, h)


# -- the scan: cold caches, worker processes ------------------------------------------------


def make_tree(root: Path, folders: int = 3, files: int = 40) -> None:
    rng = random.Random(1)
    for d in range(folders):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(files):
            (root / f"d{d}" / f"{i:03d}.jpg").write_bytes(rng.randbytes(rng.randint(0, 9000)))


def scan_lines(root: Path, schedule: Schedule | None = None, **settings: Any) -> bytes:
    return b"".join(Scanner(str(root), Settings(**settings), schedule=schedule).lines())


#: the flag of a read that must not block (RWF_NOWAIT): the fake preadv below sees it
NOWAIT = getattr(os, "RWF_NOWAIT", 8)


def test_reads_that_would_block_open_the_next_files_ahead_and_say_so_to_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    warm = scan_lines(tmp_path)
    advised: list[int] = []
    real_preadv = os.preadv

    def cold_preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:  # RWF_NOWAIT: the content is not in the page cache
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", cold_preadv)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice))
    assert scan_lines(tmp_path, Schedule(nowait=0)) == warm and not advised  # plain reads
    assert scan_lines(tmp_path, Schedule(nowait=NOWAIT)) == warm
    assert advised and set(advised) == {os.POSIX_FADV_WILLNEED}
    assert len(advised) > 100  # most files were announced before their turn


def test_a_file_opened_ahead_that_fails_is_reported_in_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    real_open, real_preadv = os.open, os.preadv
    opened: list[str] = []

    def open_fails_for_c(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(os.path.basename(str(path)))
        if str(path).endswith("c.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    def cold_preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", cold_preadv)
    monkeypatch.setattr(os, "open", open_fails_for_c)
    job: hashjob.Job = ([(str(tmp_path), names, [".jpg"] * 4, None)], False, False, NOWAIT)
    [(parts, rows)], counts = hashjob.run_job(job)
    # a's read would block: when b's turn comes, c and d are opened ahead of it
    assert opened[1:] == ["a.jpg", "c.jpg", "d.jpg", "b.jpg"]
    records = [p for p in parts if isinstance(p, FileRecord)]
    assert [os.path.basename(r.path) for r in records] == names
    assert [r.ok for r in records] == [True, True, False, True]
    assert records[2].error_message == "cannot open: Permission denied"
    assert counts[hashjob.ERRORS] == 1 and [name for name, _ in rows] == ["a.jpg", "b.jpg", "d.jpg"]


def test_a_lost_worker_process_leaves_its_jobs_to_the_scan_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tree(tmp_path / "root", folders=6)
    expected = scan_lines(tmp_path / "root")
    sent: list[int] = []

    class DyingWorkers(Workers):
        def submit(self, job: Any) -> Ticket:
            ticket = super().submit(job)
            sent.append(1)
            if len(sent) == 2:  # the second job's worker dies with it
                self.processes[ticket.worker].kill()
            return ticket

    schedule = Schedule(  # workers from the first file, however busy the machine
        worker_job_files=30,
        start_workers=lambda files: True,
        workers=lambda n: DyingWorkers(n, wait=True),
    )
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, "imgbatch"), out.open("wb") as fh:
        sink = JsonlSink(fh.fileno())
        stats = run_scan(str(tmp_path / "root"), Settings(hash_procs=2), sink, schedule=schedule)
        sink.close()
    assert out.read_bytes() == expected
    assert stats.files == 240 and len(sent) >= 2
    assert "a hashing process" in caplog.text and "hashing in this process" in caplog.text


def test_worker_processes_end_with_the_scan(tmp_path: Path) -> None:
    make_tree(tmp_path / "root")
    started: list[Workers] = []
    procs: list[Any] = []

    class SeenWorkers(Workers):
        def close(self) -> None:
            procs.extend(self.processes)
            super().close()

    def workers(n: int) -> Workers:
        started.append(SeenWorkers(n, wait=True))
        return started[-1]

    schedule = Schedule(start_workers=lambda files: True, workers=workers)
    it = Scanner(str(tmp_path / "root"), Settings(), procs=2, schedule=schedule).lines()
    next(it)
    it.close()  # stopped early, as `scan | head` does
    assert started and len(procs) == 2
    for proc in procs:
        assert proc.wait(timeout=30) == 0  # stdin closed: it ended on its own


# -- analyze: commits grouped by time ----------------------------------------------------------


def test_finished_items_are_committed_at_least_every_100_ms(tmp_path: Path) -> None:
    """The offline analyzer's items are committed in groups: a group waits at most
    100 ms from its first item (a real checkpoint and sink; the clock is the test's)."""
    from imgbatch.checkpoint import Checkpoint
    from imgbatch.output import JsonlSink
    from imgbatch.pipeline import RunOptions
    from imgbatch.pipeline.recorder import Recorder, RunSummary
    from imgbatch.results import ResultStore

    now = [0.0]
    out = os.open(tmp_path / "out.jsonl", os.O_WRONLY | os.O_CREAT, 0o600)
    summary = RunSummary(id=1, provider="local", model="local-1", fingerprint="fp", root="/")
    with (
        ResultStore(tmp_path / "results") as store,
        Checkpoint(tmp_path / "state", results=store) as cp,
    ):
        sink = JsonlSink(fd=out)
        rec = Recorder(cp, sink, summary, RunOptions(), clock=lambda: now[0])
        groups, pending = [], 0
        for i, t in enumerate((0.0, 0.03, 0.06, 0.09, 0.1, 0.15, 0.2, 0.25)):
            now[0] = t
            sink.write(b'{"n": %d}\n' % i)
            cp.commit("fp", "", f"{i}.png", (f"h{i}", None, 1, 1, 1, None))
            pending += 1
            rec.commit_written()
            if cp.pending == 0:  # the group went to the database
                groups.append(pending)
                pending = 0
        # written after its lines: the ones of each group reached the file first
        assert groups == [5, 3] and cp.pending == 0
        assert (tmp_path / "out.jsonl").read_bytes().count(b"\n") == 8
        assert cp.state("fp", "", "4.png") is not None
    os.close(out)


def test_spare_cores_count_what_other_processes_use_not_what_we_use() -> None:
    """Over one second of a 2-core machine (2 CPU-seconds in all): while another process
    keeps a core busy, one core less is spare than while we keep one busy ourselves or
    nobody does. Samples are (machine idle, machine total, this process's CPU seconds),
    as cpu_times() reads them, so the rule is judged on numbers the test controls."""
    start = (100.0, 200.0, 5.0)

    def spare_while(idle: float, ours: float) -> float:
        return cpus.spare_between(start, (start[0] + idle, start[1] + 2.0, start[2] + ours), 2)

    quiet = spare_while(idle=2.0, ours=0.0)  # nothing runs
    we = spare_while(idle=1.0, ours=1.0)  # our threads keep one core busy
    theirs = spare_while(idle=1.0, ours=0.0)  # another process does
    assert (quiet, we, theirs) == (1.0, 1.0, 0.0)


def test_cpu_times_reads_this_machine() -> None:
    """The samples come from /proc/stat and this process's clock: totals only grow."""
    first = cpus.cpu_times()
    if first is None:
        pytest.skip("no /proc/stat here")
    sum(range(200_000))  # some CPU time of ours
    second = cpus.cpu_times()
    assert second is not None
    assert second[1] >= first[1] and second[0] >= first[0] and second[2] > first[2]


def test_a_scan_leaves_no_hash_cache_database_open_behind(tmp_path: Path) -> None:
    """Jobs read folders' cache entries through their own SQLite connection: it ends
    with the scan (a served process scans many roots, in many threads), so once the
    cache itself is closed no descriptor of its database is left."""
    from imgbatch.hashcache import HashCache

    def open_on(db: Path) -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(db))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd here")
    make_tree(tmp_path / "root")
    with HashCache(tmp_path / "cache") as cache:
        db = Path(cache.db_path).resolve()
        for _ in range(2):  # the second scan reads entries the first one stored
            records = list(Scanner(str(tmp_path / "root"), Settings(), cache))
            cache.flush()
        assert records and open_on(db) >= 1  # the cache's own connection
    assert open_on(db) == 0
