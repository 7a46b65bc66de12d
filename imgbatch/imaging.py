"""Decode an image once, EXIF-rotate and downscale it, and re-encode it for upload."""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, TypedDict

from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import DECODER_MISSING, ContentChanged, ErrorCode, ItemError
from .sources import open_item

__all__ = [
    "DECODER_MISSING",
    "DEFAULT_MAX_SIDE",
    "ExifInfo",
    "GpsInfo",
    "PreparedImage",
    "avif_available",
    "decoder_available",
    "decoder_missing",
    "encode_for_upload",
    "fitted_size",
    "heif_available",
    "prepare",
]

DEFAULT_MAX_SIDE = 768

# Pillow only *warns* between MAX_IMAGE_PIXELS and twice that, and prints the warning.
# We treat both levels as BAD_IMAGE. `warnings.catch_warnings()` is not thread-safe
# (it swaps the process-wide filter list) and analysis decodes in a thread pool, so we
# install one narrow filter for this category at import, and `prepare` also checks the
# pixel count itself, in case something (pytest, a host application) resets the filters.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
# A Pillow without AVIF support also warns (on stderr) for every AVIF file it cannot
# identify; our BAD_IMAGE message says it, and says what to install.
warnings.filterwarnings(
    "ignore", "image file could not be identified because AVIF support not installed"
)

# Same table as ImageOps.exif_transpose; we apply it after downscaling, which is cheaper
# than transposing the decoded image, and reuse the orientation we already parsed.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# ISO-BMFF brands (the ftyp box: a major brand, then compatible ones) of HEIF/HEIC and
# AVIF files. "mif1"/"msf1" are generic container brands that both use: Pillow's own
# AVIF plugin gets the first try at those.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_CONTAINER_BRANDS = frozenset({b"mif1", b"msf1"})

_HEIF_MISSING = (
    DECODER_MISSING + "HEIF/HEIC image: install imgbatch[heif] (pip install 'imgbatch[heif]')"
)
_AVIF_MISSING = (
    DECODER_MISSING + "AVIF image: this Pillow has no AVIF decoder; install a Pillow with "
    "AVIF support (pip install --upgrade pillow)"
)

_UPLOAD_MIME = {"JPEG": "image/jpeg", "WEBP": "image/webp"}

# Pillow calls a JPEG with a multi-picture (MPF) extension "MPO": most phone photos with
# a depth or gain map. To users and every viewer they are JPEGs (decoded as one, too).
_FORMAT_NAMES = {"MPO": "JPEG"}

_EXIF_DATETIME = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"[+-]\d{2}:\d{2}")
_MAX_TEXT = 100  # longer EXIF strings are garbage (or an attack on the output's size)


class GpsInfo(TypedDict):
    """GPS position from EXIF, in signed decimal degrees (south and west negative)."""

    lat: float
    lon: float
    alt: float | None  # metres above sea level, negative below


class ExifInfo(TypedDict):
    """The EXIF fields imgbatch reports; each is None when absent or malformed."""

    datetime: str | None  # ISO 8601 local time, e.g. "2021-05-01T12:00:00[+02:00]"
    make: str | None
    model: str | None
    orientation: int | None  # 1..8, already applied to PreparedImage.image
    gps: GpsInfo | None


@dataclass(frozen=True)
class PreparedImage:
    """An image decoded once: RGB, upright, long side <= max_side, metadata parsed."""

    image: Image.Image  # RGB, EXIF-transposed, no metadata in .info
    width: int  # size of the original, after EXIF rotation
    height: int
    format: str  # as Pillow names it ("JPEG", "PNG", "WEBP", "GIF", "TIFF"...), MPO as JPEG
    mode: str  # the original pixel mode: "RGB", "RGBA", "P", "L", "I;16"...
    exif: ExifInfo
    path: str = ""  # the file decoded: a second reader (OCR) decodes it at full size


def prepare(
    path: str | os.PathLike[str],
    max_side: int = DEFAULT_MAX_SIDE,
    expect_hash: str | None = None,
    storage_options: tuple[str, ...] = (),
) -> PreparedImage:
    """Decode the image at `path` once into a small upright RGB image plus its metadata.

    Args:
        path: the image file; read once.
        max_side: the long side of the result; smaller images are never upscaled.
        expect_hash: the xxh3-128 hex digest the scan gave the file. The bytes decoded
            are then the bytes hashed (one read feeds both), and a file that changed
            since its scan raises ContentChanged instead of describing other content.
        storage_options: KEY=VALUE pairs for a bucket URL's filesystem (sources.open_item).

    Raises:
        ItemError: BAD_IMAGE for anything that is not a decodable image (empty,
            truncated, not an image, over Pillow's decompression-bomb limit, an
            unsupported variant); IO_ERROR when the file cannot be read;
            ContentChanged (an IO_ERROR) when its bytes do not match `expect_hash`.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    opened = open_item(path, storage_options)
    with opened as raw, _pillow_errors(), _verified(raw, expect_hash) as fp:
        img = _identify(fp)
        with img:
            _check_pixels(img.width, img.height)
            stored_size = img.size
            fmt = _FORMAT_NAMES.get(img.format or "", img.format or "UNKNOWN")
            mode = img.mode
            if max(stored_size) > max_side:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale while staying >= the box; the box
                # must have the image's aspect, or the short side caps the scale (a square
                # box only halves a 4:3 photo where this quarters it). No-op for others.
                img.draft("RGB", _fit(stored_size, max_side))
            img.load()
            exif = _parse_exif(img)
            small = _to_rgb(img)
            target = _fit(stored_size, max_side)
            if small.size != target:
                small = small.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
            elif small is img:
                # An RGB file already small enough: detach it before the file object closes.
                small = small.copy()
    orientation = exif["orientation"] or 1
    if orientation in _TRANSPOSE:
        small = small.transpose(_TRANSPOSE[orientation])
    width, height = stored_size
    if orientation >= 5:  # 5..8 turn the picture by 90 degrees
        width, height = height, width
    # Nothing of the file's metadata (EXIF, GPS, ICC, XMP, comments) travels further.
    small.info = {}
    return PreparedImage(small, width, height, fmt, mode, exif, os.fspath(path))


def encode_for_upload(
    prep: PreparedImage, fmt: str = "JPEG", quality: int = 85
) -> tuple[bytes, str]:
    """Encode the prepared image as JPEG or WEBP without any metadata; return (bytes, mime)."""
    name = fmt.upper()
    if name == "JPG":
        name = "JPEG"
    if name not in _UPLOAD_MIME:
        raise ValueError(f"upload format must be JPEG or WEBP, got {fmt!r}")
    image = prep.image
    if image.info:
        # Some encoders fall back to image.info (JPEG takes its "comment" from there).
        image = image.copy()
        image.info = {}
    buf = io.BytesIO()
    # exif=b"" and no icc_profile/xmp: nothing identifying leaves the machine.
    image.save(buf, format=name, quality=quality, exif=b"")
    return buf.getvalue(), _UPLOAD_MIME[name]


def upload_and_size(
    prep: PreparedImage, fmt: str = "JPEG", quality: int = 85
) -> tuple[tuple[bytes, str], tuple[int, int]]:
    """The upload (bytes, mime) of a prepared image and its size, from which the driver
    estimates its tokens: what a remote provider's worker-side encoder returns."""
    return encode_for_upload(prep, fmt, quality), prep.image.size


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size with the same aspect whose long side is max_side (never larger than size)."""
    width, height = size
    scale = max_side / max(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


#: a file checked against its hash is copied in memory up to this size, beyond into a
#: temporary file: the decoder must read the very bytes that were hashed
_SPOOL_MAX = 64 << 20
_CHUNK = 1 << 20


@contextmanager
def _verified(raw: IO[bytes], expect_hash: str | None) -> Iterator[IO[bytes]]:
    """`raw` itself, or (given the scan's hash) a copy of its bytes whose hash matched."""
    if expect_hash is None:
        yield raw
        return
    import tempfile

    import xxhash

    h = xxhash.xxh3_128()
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX) as copy:
        while chunk := raw.read(_CHUNK):
            h.update(chunk)
            copy.write(chunk)
        if h.hexdigest() != expect_hash:
            raise ContentChanged
        copy.seek(0)
        yield copy


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Translate what Pillow raises on a bad file into ItemError.

    Pillow only ever sees the open file object, never the path, so its messages (passed
    on for the rarer errors) cannot leak the path into the error record.
    """
    try:
        yield
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else 0
        raise ItemError(ErrorCode.BAD_IMAGE, _too_large(pixels)) from exc
    except UnidentifiedImageError as exc:
        # Pillow's message shows the file object; the record already names the file.
        raise ItemError(
            ErrorCode.BAD_IMAGE, "not a decodable image: cannot identify image file"
        ) from exc
    except OSError as exc:
        if exc.errno is not None:
            # A real read error (EIO, a file truncated under us...): not the image's fault.
            raise ItemError(ErrorCode.IO_ERROR, f"cannot read file: {exc.strerror}") from exc
        # Pillow's decoders raise errno-less OSErrors: "image file is truncated", "broken
        # data stream", "decoder error -2"...
        if "truncated" in str(exc).lower():
            raise ItemError(ErrorCode.BAD_IMAGE, "truncated image data") from exc
        raise ItemError(ErrorCode.BAD_IMAGE, f"not a decodable image: {exc}") from exc
    except MemoryError:
        raise  # the machine is out of memory: not this file's verdict
    except Exception as exc:
        # Pillow's plugins raise many types on malformed data (SyntaxError, ValueError,
        # EOFError, struct.error, IndexError, KeyError...); any of them means "not decodable".
        detail = str(exc) or type(exc).__name__
        raise ItemError(ErrorCode.BAD_IMAGE, f"not a decodable image: {detail}") from exc


def _too_large(pixels: int) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return f"image too large: {pixels} pixels exceeds the limit of {limit} pixels"


def _check_pixels(width: int, height: int) -> None:
    """BAD_IMAGE above Image.MAX_IMAGE_PIXELS, whatever the warnings filters say."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = max(1, width) * max(1, height)
    if limit is not None and pixels > limit:
        raise ItemError(ErrorCode.BAD_IMAGE, _too_large(pixels))


def _identify(fp: IO[bytes]) -> Image.Image:
    """Image.open; a HEIF file registers the HEIF plugin first, and a HEIF or AVIF file
    whose decoder is not installed is a BAD_IMAGE that says so (DECODER_MISSING)."""
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        fp.seek(0)
        brands = _ftyp_brands(fp.read(64))
        avif = bool(brands & _AVIF_BRANDS)
        heif = bool(brands & _HEIF_BRANDS) or (bool(brands & _CONTAINER_BRANDS) and not avif)
        if avif and not heif and not avif_available():
            raise ItemError(ErrorCode.BAD_IMAGE, _AVIF_MISSING) from None
        if not heif:
            raise
    if not _register_heif():
        raise ItemError(ErrorCode.BAD_IMAGE, _HEIF_MISSING)
    fp.seek(0)
    return Image.open(fp)


def _ftyp_brands(head: bytes) -> frozenset[bytes]:
    """The major and compatible brands of an ISO-BMFF file's leading ftyp box, if any."""
    end = min(len(head), int.from_bytes(head[:4], "big"))
    if head[4:8] != b"ftyp" or end < 12:
        return frozenset()
    # the major brand at 8, a minor version at 12, then the compatible brands
    return frozenset([head[8:12], *(head[i : i + 4] for i in range(16, end - 3, 4))])


def decoder_missing(message: str | None) -> bool:
    """Whether an item's error message says its decoder was not installed (HEIF without
    the heif extra, AVIF without Pillow's AVIF support): worth retrying once it is."""
    return message is not None and message.startswith(DECODER_MISSING)


def decoder_available(message: str | None) -> bool:
    """Whether the decoder a `decoder_missing` message asked for can now be loaded."""
    if message is None or not decoder_missing(message):
        return False
    return avif_available() if "AVIF" in message else heif_available()


def heif_available() -> bool:
    """Whether HEIF/HEIC files can be decoded: pillow-heif (imgbatch[heif]) imports, and
    then its opener is registered with Pillow."""
    return _register_heif()


def avif_available() -> bool:
    """Whether the installed Pillow decodes AVIF itself (its optional `avif` module)."""
    from PIL import features

    return "avif" in features.modules and features.check_module("avif")


_heif_lock = threading.Lock()
_heif_registered: object = None  # the pillow_heif module whose opener Pillow has


def _register_heif() -> bool:
    """Register pillow-heif's opener once it imports; return whether it is registered.

    The import is asked each time: a failed one is tried again (it costs a path search,
    and only files that are HEIF pay it), as a long-lived process may see the extra
    installed meanwhile; a module already imported costs a dictionary look-up, and its
    opener is registered once.
    """
    global _heif_registered
    with _heif_lock:
        try:
            import pillow_heif  # optional extra: imgbatch[heif]
        except ImportError:
            return False
        if _heif_registered is not pillow_heif:
            pillow_heif.register_heif_opener()
            _heif_registered = pillow_heif
        return True


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB: transparency onto white, high bit depths scaled to 8 bits."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # Transparent pixels often hold black or garbage; white is what viewers show.
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_8bit_gray(img).convert("RGB")
    return img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float grayscale image to 8 bits.

    Pillow's own conversion clips (65535 becomes 255 and so does 256), which turns most
    16-bit photos white. Known ranges are scaled: 16-bit by 1/257, floats in 0..1 by
    255; anything else (scientific data) is stretched from its minimum to its maximum.
    """
    if img.mode.startswith("I;16"):
        img = img.convert("I")
        low, high = 0.0, 65535.0
    else:
        first, last = img.getextrema()
        assert isinstance(first, (int, float)) and isinstance(last, (int, float))  # one band
        low, high = float(first), float(last)
        if img.mode == "F" and 0.0 <= low and high <= 1.0:
            low, high = 0.0, 1.0
        elif 0.0 <= low and high <= 255.0:
            low, high = 0.0, 255.0
        elif img.mode == "I" and 0.0 <= low and high <= 65535.0:
            low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 1.0
    return img.point(lambda v: (v - low) * scale).convert("L")


def _parse_exif(img: Image.Image) -> ExifInfo:
    """Pick datetime, camera, orientation and GPS out of EXIF; malformed parts become None."""
    info: ExifInfo = {
        "datetime": None,
        "make": None,
        "model": None,
        "orientation": None,
        "gps": None,
    }
    # Metadata is untrusted and Pillow's parser raises many types on broken IFDs; a
    # decodable picture with garbled EXIF is still a good image, so each part is guarded.
    try:
        exif = img.getexif()
    except Exception:
        return info
    orientation = exif.get(ExifTags.Base.Orientation)
    if isinstance(orientation, int) and 1 <= orientation <= 8:
        info["orientation"] = orientation
    info["make"] = _text(exif.get(ExifTags.Base.Make))
    info["model"] = _text(exif.get(ExifTags.Base.Model))
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
    except Exception:
        sub = {}
    info["datetime"] = (
        _datetime(
            sub.get(ExifTags.Base.DateTimeOriginal), sub.get(ExifTags.Base.OffsetTimeOriginal)
        )
        or _datetime(
            sub.get(ExifTags.Base.DateTimeDigitized), sub.get(ExifTags.Base.OffsetTimeDigitized)
        )
        or _datetime(exif.get(ExifTags.Base.DateTime), sub.get(ExifTags.Base.OffsetTime))
    )
    try:
        info["gps"] = _gps(exif.get_ifd(ExifTags.IFD.GPSInfo))
    except Exception:
        info["gps"] = None
    return info


def _text(value: Any) -> str | None:
    """An EXIF ASCII value as a clean str, or None when empty."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", " ").strip()
    # Keep JSON strict: no lone surrogates, no control characters.
    value = "".join(ch for ch in value if ch.isprintable())[:_MAX_TEXT]
    return value or None


def _datetime(value: Any, offset: Any = None) -> str | None:
    """EXIF "YYYY:MM:DD HH:MM:SS" (plus optional "+HH:MM" offset tag) as ISO 8601."""
    text = _text(value)
    found = _EXIF_DATETIME.match(text) if text else None
    if found is None:
        return None
    try:
        # Validates the fields: cameras without a clock write "0000:00:00 00:00:00".
        year, month, day, hour, minute, second = (int(part) for part in found.groups())
        stamp = datetime(year, month, day, hour, minute, second).isoformat()
    except ValueError:
        return None
    offset_text = _text(offset)
    if offset_text and _EXIF_OFFSET.fullmatch(offset_text):
        stamp += offset_text
    return stamp


def _gps(ifd: dict[int, Any]) -> GpsInfo | None:
    """Decimal degrees from the GPS IFD; None without a usable position."""
    lat = _degrees(ifd.get(ExifTags.GPS.GPSLatitude), ifd.get(ExifTags.GPS.GPSLatitudeRef), "S")
    lon = _degrees(ifd.get(ExifTags.GPS.GPSLongitude), ifd.get(ExifTags.GPS.GPSLongitudeRef), "W")
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return None
    if lat == 0 and lon == 0:
        return None  # phones write zeros when they had no fix
    alt: float | None = None
    raw_alt = ifd.get(ExifTags.GPS.GPSAltitude)
    if raw_alt is not None:
        try:
            alt = float(raw_alt)
        except (TypeError, ValueError, ZeroDivisionError):
            alt = None
        if alt is not None and math.isfinite(alt):
            ref = ifd.get(ExifTags.GPS.GPSAltitudeRef)
            if ref in (1, b"\x01", (1,)):  # 1: below sea level
                alt = -alt
            alt = round(alt, 2)
        else:
            alt = None
    return {"lat": round(lat, 7), "lon": round(lon, 7), "alt": alt}


def _degrees(value: Any, ref: Any, negative_ref: str) -> float | None:
    """(degrees, minutes, seconds) rationals and an N/S/E/W ref as signed degrees."""
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(part) for part in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    # Shorter tuples happen: some writers store decimal degrees, or degrees and minutes.
    degrees = sum(part / unit for part, unit in zip(parts, (1.0, 60.0, 3600.0), strict=False))
    if not math.isfinite(degrees):  # a 0/0 rational reads as NaN
        return None
    if (_text(ref) or "").upper().startswith(negative_ref):
        degrees = -degrees
    return degrees


def fitted_size(
    path: str | os.PathLike[str],
    max_side: int = DEFAULT_MAX_SIDE,
    storage_options: Iterable[str] = (),
) -> tuple[int, int]:
    """The size `prepare()` would produce, read from the header only (for --dry-run); a
    bucket object is read with `storage_options` (KEY=VALUE pairs), as `prepare` reads it.

    EXIF rotation is not applied (finding it can cost a full decode, e.g. in PNG): the
    sides may come out swapped, which changes no token estimate.
    """
    with open_item(path, storage_options) as fp, _pillow_errors(), _identify(fp) as img:
        _check_pixels(img.width, img.height)
        return _fit(img.size, max_side)
