"""Benchmark of `imgbatch analyze --ocr` (issue 25.3): OCR images/s with the defaults and
with `--workers 1`, against rapidocr called directly in a plain loop, in the same run."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from bench.analyze import analyze, analyze_summary
from bench.common import Run, Table, check, ratio, run, scratch, secs

NAIVE = Path(__file__).with_name("naive_rapidocr.py")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SIZES = {"full": 12, "quick": 4}
WORDS = "harbour lantern orchid ticket market quiet library festival river station".split()


def per_sec(n: int, seconds: float) -> str:
    return f"{n / seconds:.2f} images/s"


def pages(n: int, seed: int = 25) -> Path:
    """`n` photo-sized JPEGs (2000x1500): a noisy gradient with a few lines of text."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    root = scratch("ocr-pages")
    for i in range(n):
        image = Image.linear_gradient("L").resize((2000, 1500)).convert("RGB")
        noise = Image.effect_noise((2000, 1500), 24).convert("RGB")
        image = Image.blend(image, noise, 0.3)
        draw = ImageDraw.Draw(image)
        for line in range(rng.randint(2, 5)):
            font = ImageFont.truetype(FONT, rng.choice((36, 48, 64)))
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            where = (rng.randint(40, 600), 120 + line * 260)
            draw.text(where, text, font=font, fill=rng.choice(((0, 0, 0), (255, 255, 255))))
        image.save(root / f"page_{i:03}.jpg", quality=90)
    return root


def ocr_vs_plain_loop(table: Table, quick: bool) -> None:
    n = SIZES["quick" if quick else "full"]
    root = pages(n)
    table.section(f"ocr. analyze --provider local --ocr: {n} JPEGs of 2000x1500 with text")
    naive = run([sys.executable, str(NAIVE), str(root)])  # also warms the page cache
    if f"naive_rapidocr: {n} images" not in naive.stderr:
        raise RuntimeError(f"naive_rapidocr.py did not read {n} images:\n{naive.stderr}")
    note = f"{per_sec(n, naive.seconds)}; RapidOCR() defaults, one file after another"
    table.add("rapidocr in a plain loop (naive_rapidocr.py)", secs(naive.seconds), note)
    runs: dict[str, Run] = {}
    for label, opts in (("defaults", ()), ("--workers 1", ("--workers", "1"))):
        r = run(analyze(root, scratch("ocr-state"), "--ocr", *opts))
        s = analyze_summary(r)
        if s.ok != n:
            raise RuntimeError(f"imgbatch analyzed {s.ok} of {n}: {r.stderr[-2000:]}")
        runs[label] = r
        note = f"{per_sec(n, r.seconds)}, peak RSS {r.maxrss_mb:.0f} MB (its largest process)"
        table.add(f"imgbatch analyze --ocr, {label}, fresh state", secs(r.seconds), note)
    fast = naive.seconds / runs["defaults"].seconds
    table.add(
        "ratio images/s defaults / plain loop",
        ratio(naive.seconds, runs["defaults"].seconds),
        f"target >= 1: {check(fast >= 1)}",
    )
    one = naive.seconds / runs["--workers 1"].seconds
    table.add(
        "ratio images/s --workers 1 / plain loop",
        ratio(naive.seconds, runs["--workers 1"].seconds),
        f"target >= 1/1.3 (0.77): {check(one >= 1 / 1.3)}",
    )


BENCHMARKS = {"ocr": ocr_vs_plain_loop}
