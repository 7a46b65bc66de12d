"""Image trees for the analyze and gemini benchmarks, generated once under bench/.data.

- photos: 12-megapixel (4000x3000) JPEGs made from scikit-image's sample photos,
  cropped to 4:3 at seeded offsets, upscaled and given seeded noise (every file differs),
  quality 90, with EXIF (camera, date, GPS) that an upload must not carry;
- tiny: 8x8 PNGs of seeded random pixels (every file differs);
- small: small JPEGs (96x72) of seeded random colour blocks (every file differs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import DATA, generated, log

PHOTO_SIZE = (4000, 3000)
SOURCES = ("astronaut", "chelsea", "coffee", "rocket")  # skimage.data photos


@dataclass(frozen=True)
class ImageTree:
    path: Path
    files: int
    bytes: int

    def paths(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())


def _cached(name: str, params: dict[str, Any], build: Callable[[Path], None]) -> ImageTree:
    """The tree `name` under bench/.data, built by `build` once; reused while its marker
    file (next to it, outside the tree) records the same parameters."""
    path, marker = DATA / name, DATA / f"{name}.json"
    try:
        info = json.loads(marker.read_text())
        if info["params"] == params and path.is_dir():
            return ImageTree(path, info["files"], info["bytes"])
    except (OSError, ValueError, KeyError):
        pass
    start = time.perf_counter()
    log(f"data: generating {name}...")
    marker.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    build(path)
    files = [p for p in path.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    os.sync()  # no writeback left to disturb the timings
    marker.write_text(json.dumps({"params": params, "files": len(files), "bytes": total}))
    took = time.perf_counter() - start
    generated(took)
    log(f"data: {name} generated in {took:.1f}s ({len(files):,} files, {total / 1e6:.1f} MB)")
    return ImageTree(path, len(files), total)


def _folder(root: Path, i: int, per_dir: int) -> Path:
    folder = root / f"d{i // per_dir:05d}"
    folder.mkdir(exist_ok=True)
    return folder


def photos(n: int, seed: int = 12) -> ImageTree:
    """`n` 12-megapixel JPEGs with EXIF, 10 per folder."""

    def build(root: Path) -> None:
        import numpy as np
        from PIL import Image, ImageChops
        from skimage import data

        sources = [getattr(data, s)() for s in SOURCES]
        rng = random.Random(seed)
        noise_rng = np.random.default_rng(seed)
        for i in range(n):
            src = sources[i % len(sources)]
            h, w = src.shape[:2]
            cw, ch = min(w, h * 4 // 3), min(h, w * 3 // 4)  # the largest 4:3 crop...
            cw, ch = int(cw * rng.uniform(0.8, 1.0)), int(ch * rng.uniform(0.8, 1.0))
            x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)  # ...somewhere
            img = Image.fromarray(src[y : y + ch, x : x + cw]).convert("RGB")
            img = img.resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
            grain = noise_rng.integers(0, 9, size=PHOTO_SIZE[::-1], dtype=np.uint8)
            g = Image.fromarray(grain, "L")
            img = ImageChops.add(img, Image.merge("RGB", (g, g, g)), offset=-4)
            exif = Image.Exif()
            exif[0x010F] = "BenchCam"  # Make
            exif[0x0110] = "BC-12"  # Model
            exif[0x0132] = f"2024:06:{1 + i % 28:02d} 12:00:00"  # DateTime
            exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}  # GPS
            img.save(_folder(root, i, 10) / f"photo{i:04d}.jpg", "JPEG", quality=90, exif=exif)

    params = {"n": n, "seed": seed, "size": list(PHOTO_SIZE), "sources": list(SOURCES), "v": 1}
    return _cached(f"photos12mp-{n}", params, build)


def tiny_pngs(n: int, seed: int = 8) -> ImageTree:
    """`n` distinct 8x8 PNGs, 100 per folder."""

    def build(root: Path) -> None:
        from PIL import Image

        rng = random.Random(seed)
        folder = root
        for i in range(n):
            if i % 100 == 0:
                folder = _folder(root, i, 100)
            img = Image.frombytes("RGB", (8, 8), rng.randbytes(8 * 8 * 3))
            img.save(folder / f"{i:07d}.png", "PNG")

    return _cached(f"tinypng-{n}", {"n": n, "seed": seed, "v": 1}, build)


def small_jpegs(n: int, seed: int = 9) -> ImageTree:
    """`n` distinct 96x72 JPEGs of random colour blocks, 100 per folder."""

    def build(root: Path) -> None:
        from PIL import Image

        rng = random.Random(seed)
        folder = root
        for i in range(n):
            if i % 100 == 0:
                folder = _folder(root, i, 100)
            blocks = Image.frombytes("RGB", (12, 9), rng.randbytes(12 * 9 * 3))
            img = blocks.resize((96, 72), Image.Resampling.BILINEAR)
            img.save(folder / f"{i:05d}.jpg", "JPEG", quality=90)

    return _cached(f"smalljpeg-{n}", {"n": n, "seed": seed, "v": 1}, build)
