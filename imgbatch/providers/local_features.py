"""The offline analyzer's features, computed with Pillow alone from a PreparedImage."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageMath

from ..imaging import PreparedImage

__all__ = [
    "BLUR_THRESHOLD",
    "SHARPNESS_SIDE",
    "color_name",
    "color_names",
    "dominant_colors",
    "features",
    "phash",
    "phash_distance",
    "sharpness",
]

# providers/local.py's ANALYZER_VERSION is part of the results' fingerprint: bump it
# whenever a value below changes. It lives there, not here, so that a re-run need not
# import Pillow; this module imports nothing of local.py (local.py imports this one).

# Sharpness is measured on a grayscale copy whose long side is at most this many pixels
# (bicubic, like prepare()), so that it hardly depends on the original's resolution or
# on max_side: the same photo prepared at 512, 768 or 1024 px scores within ~10%.
SHARPNESS_SIDE = 512

# Variance of the Laplacian (at SHARPNESS_SIDE) below which an image is called blurry;
# 100 is the usual threshold for 8-bit images. Measured on the scikit-image sample
# photos: sharp ones score 170-5300, the same after GaussianBlur(2) all below 65, a
# motion-blurred one 24. It measures fine detail, not focus: naturally smooth pictures
# (the moon, a retina, a colour gradient) also score low and are called blurry.
BLUR_THRESHOLD = 100.0

# 4-neighbour Laplacian. The offset keeps negative responses from clipping at 0 in mode
# "I" (Pillow clips them); it is subtracted again before the variance.
_LAPLACIAN_OFFSET = 1024
_LAPLACIAN = ImageFilter.Kernel(
    (3, 3), [0, 1, 0, 1, -4, 1, 0, 1, 0], scale=1, offset=_LAPLACIAN_OFFSET
)

# pHash: the lowest 8x8 DCT frequencies of a 32x32 grayscale, the zero-frequency row
# and column excluded (as in libpHash). The cosine table covers frequencies 1..8 only,
# laid out [x, u, 1] so that one product broadcasts over a [x, 1, y] block of pixels.
_HASH_N = 32
_HASH_FREQS = range(1, 9)
_COS = np.array(
    [
        [[math.cos((2 * x + 1) * u * math.pi / (2 * _HASH_N))] for u in _HASH_FREQS]
        for x in range(_HASH_N)
    ]
)
_HASH_BITS = len(_HASH_FREQS) ** 2

# Basic colour names, each with a few sRGB prototypes; a colour gets the name of its
# nearest prototype in CIELAB (where distance roughly follows perceived difference).
# Several prototypes per name shape the borders: dark and light greys, brown/tan...
NAMED_SRGB: dict[str, list[tuple[int, int, int]]] = {
    "black": [(0, 0, 0), (25, 25, 25)],
    "gray": [(70, 70, 70), (128, 128, 128), (190, 190, 190)],
    "white": [(255, 255, 255), (242, 242, 242)],
    "red": [(220, 30, 30), (170, 20, 20)],
    "orange": [(245, 140, 30), (220, 120, 50)],
    "yellow": [(250, 225, 40), (235, 215, 100)],
    "olive": [(120, 120, 30)],
    "green": [(40, 160, 50), (30, 90, 30), (140, 210, 110)],
    "teal": [(0, 128, 128)],
    "cyan": [(0, 230, 230), (60, 210, 230), (150, 230, 240)],
    "blue": [(0, 0, 255), (40, 80, 210), (100, 150, 220), (135, 190, 235)],
    "navy": [(0, 0, 128), (20, 30, 90), (40, 50, 80)],
    "purple": [(120, 50, 160), (70, 20, 80), (75, 0, 130), (148, 0, 211)],
    "magenta": [(200, 30, 150), (255, 0, 255)],
    "pink": [(245, 150, 190), (230, 180, 190), (255, 105, 180)],
    "brown": [(140, 90, 50), (100, 60, 35), (170, 120, 90), (90, 40, 20)],
    "beige": [(225, 205, 170), (200, 180, 150)],
}


def features(prep: PreparedImage) -> dict[str, Any]:
    """All offline features of a prepared image, as JSON-serialisable data.

    The image is converted to grayscale once; brightness, sharpness and the pHash are
    measured on that copy, the colours on the RGB image itself.
    """
    gray = prep.image.convert("L")
    score = sharpness(gray)
    return {
        "width": prep.width,
        "height": prep.height,
        "format": prep.format,
        "mode": prep.mode,
        "exif": {**prep.exif, "gps": dict(gps) if (gps := prep.exif["gps"]) else None},
        "dominant_colors": dominant_colors(prep.image),
        # ITU-R 601 luma of the gamma-encoded pixels, 0 black .. 1 white.
        "brightness": round(brightness(gray), 4),
        "sharpness": round(score, 2),
        "blurry": score < BLUR_THRESHOLD,
        "phash": phash(gray),
    }


def brightness(gray: Image.Image) -> float:
    """Mean of a grayscale image's pixels, 0 .. 1: the exact sum over the histogram (as
    ImageStat's mean, without its Python loops)."""
    histogram = gray.histogram()
    total: int = sum(map(operator.mul, histogram, range(256)))
    return total / sum(histogram) / 255


def dominant_colors(image: Image.Image, count: int = 5) -> list[dict[str, Any]]:
    """Up to `count` main colours by median cut, largest share first: hex, name, fraction."""
    # Median cut costs ~0.5 us per distinct colour: 48x48 gives the same shares as 64x64
    # (within 1-2%) at half the cost. Squashing the aspect does not change the shares.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    factor = min(rgb.size) // 48
    if factor >= 2:
        rgb = rgb.reduce(factor)  # the same box average, 3x cheaper than resize's
    width, height = rgb.size
    if _SIDE % width == 0 and _SIDE % height == 0:
        # A box upscale by whole factors only repeats pixels, and median cut depends on
        # the colours' counts only through their ratios: quantizing the small image and
        # scaling its counts gives the same palette and shares, 4x cheaper for thumbnails.
        small, repeat = rgb, (_SIDE // width) * (_SIDE // height)
    else:
        small, repeat = rgb.resize((_SIDE, _SIDE), Image.Resampling.BOX), 1
    quantized = small.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
    palette = quantized.getpalette() or []
    total = _SIDE * _SIDE
    counts = sorted(quantized.getcolors() or [], reverse=True)
    colors: list[tuple[int, int, int]] = []
    for _, index in counts:
        assert isinstance(index, int)  # a "P" image's colours are palette indices
        red, green, blue = palette[3 * index : 3 * index + 3]
        colors.append((red, green, blue))
    return [
        {
            "hex": f"#{red:02x}{green:02x}{blue:02x}",
            "name": name,
            "fraction": round(pixels * repeat / total, 3),
        }
        for (pixels, _), (red, green, blue), name in zip(
            counts, colors, color_names(colors), strict=True
        )
    ]


_SIDE = 48  # dominant colours are counted on a 48x48 copy


def color_name(rgb: tuple[int, int, int]) -> str:
    """The nearest basic colour name ("brown", "navy"...) of an sRGB colour."""
    return color_names([rgb])[0]


def color_names(colors: list[tuple[int, int, int]]) -> list[str]:
    """color_name() of each colour, measured all at once."""
    if not colors:
        return []
    labs = np.array([srgb_to_lab(rgb) for rgb in colors])
    # Distances to every prototype at once; those within a hair of the nearest (numpy's
    # rounding is not math.dist's) are compared again by math.dist, in order, so each
    # name is the one min() over math.dist gives: its first nearest prototype's.
    approx = np.sqrt(np.square(labs[:, None, :] - _PROTOTYPES[None, :, :]).sum(axis=2))
    near = approx <= approx.min(axis=1, keepdims=True) * (1 + 1e-9) + 1e-12
    names = []
    for lab, row in zip(labs.tolist(), near, strict=True):
        candidates = np.flatnonzero(row).tolist()
        if len(candidates) > 1:
            candidates.sort(key=lambda i: math.dist(lab, NAMED_LAB[i][1]))
        names.append(NAMED_LAB[candidates[0]][0])
    return names


def sharpness(gray: Image.Image) -> float:
    """Variance of the Laplacian of a grayscale image, bicubic-reduced to <= SHARPNESS_SIDE."""
    if gray.mode != "L":
        gray = gray.convert("L")
    scale = SHARPNESS_SIDE / max(gray.size)
    if scale < 1:
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        gray = gray.resize(size, Image.Resampling.BICUBIC)
    if gray.width < 3 or gray.height < 3:
        return 0.0
    # Mode "I" keeps the full -1020..1020 range (an 8-bit result would clip at 0..255);
    # the 1-pixel border, where Pillow does not apply the kernel, is cropped off.
    lap = gray.convert("I").filter(_LAPLACIAN).crop((1, 1, gray.width - 1, gray.height - 1))
    centred = lap.convert("F").point(lambda v: v - _LAPLACIAN_OFFSET)
    squared = ImageMath.lambda_eval(lambda args: args["x"] * args["x"], x=centred)
    assert isinstance(squared, Image.Image)
    # A box resize to 1x1 is an exact mean, computed in C (ImageStat bins "F" images).
    mean = _mean(centred)
    return max(0.0, _mean(squared) - mean * mean)


def phash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex digits (libpHash's definition).

    The image is reduced to a 32x32 grayscale by area averaging (libpHash: a 7x7 mean
    filter, then a resize), transformed by a 2-D DCT-II, and the 8x8 frequencies
    1..8 x 1..8 are compared with their median: bit = coefficient > median, row-major,
    most significant bit first. Near-duplicates differ in a few bits (see phash_distance).
    """
    gray = image if image.mode == "L" else image.convert("L")
    # A box filter is libpHash's mean filter and resize in one step (and 5x cheaper than
    # Lanczos at this reduction).
    small = gray.resize((_HASH_N, _HASH_N), Image.Resampling.BOX)
    pixels = np.frombuffer(small.tobytes(), dtype=np.uint8).reshape(_HASH_N, _HASH_N)
    # Separable DCT, only the 8 frequencies we keep: along the rows, then down the
    # columns. Each sum runs over the first axis, which numpy adds up one slice after the
    # other, in order: the very floating-point sums of a left-to-right loop, so hashes
    # stay bit for bit those of the pure-Python version (a matrix product would not).
    columns = np.add.reduce(_COS * pixels.T[:, None, :], axis=0)  # [u, y]
    coefficients = np.add.reduce(_COS * columns.T[:, None, :], axis=0).ravel()  # [v, u]
    # Rounded so that floating-point noise (a flat image's "zero" coefficients are
    # +-1e-13) cannot decide a bit: such images hash to all zeros.
    values = round6(coefficients)
    ordered = np.sort(values)
    middle = _HASH_BITS // 2
    median = (float(ordered[middle - 1]) + float(ordered[middle])) / 2
    return np.packbits(values > median).tobytes().hex()


_Floats = np.ndarray[Any, np.dtype[np.float64]]


def round6(values: _Floats) -> _Floats:
    """round(v, 6) of each value, exactly as Python's correctly rounded round(): numpy's
    (a multiplication, then rint) can differ when v * 1e6 is within a rounding error
    of a half, so those few values are rounded by Python."""
    scaled = values * 1e6
    rounded = np.rint(scaled) / 1e6
    near_half = np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-3
    for i in np.flatnonzero(near_half):
        rounded[i] = round(float(values[i]), 6)
    return rounded


def phash_distance(first: str, second: str) -> int:
    """Hamming distance between two phash() values: 0 identical, <= ~6 near-duplicates."""
    return (int(first, 16) ^ int(second, 16)).bit_count()


def _mean(image: Image.Image) -> float:
    value = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    assert isinstance(value, float)
    return value


def _linear(channel: int) -> float:
    """An sRGB channel (0..255) as linear light (0..1)."""
    c = channel / 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


_LINEAR = [_linear(channel) for channel in range(256)]


def srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (0..255) to CIELAB, D65 white."""
    r, g, b = (_LINEAR[channel] for channel in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


NAMED_LAB = [(name, srgb_to_lab(rgb)) for name, shades in NAMED_SRGB.items() for rgb in shades]
_PROTOTYPES = np.array([lab for _, lab in NAMED_LAB])
