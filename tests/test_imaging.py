"""imaging: decode once, EXIF-rotate, downscale, strip metadata, and fail cleanly."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import sys
import threading
import types
import zlib

import pytest
import skimage
from PIL import ExifTags, Image, ImageCms, ImageOps, JpegImagePlugin, features

from imgbatch.errors import ErrorCode, ItemError
from imgbatch.imaging import (
    DECODER_MISSING,
    PreparedImage,
    avif_available,
    decoder_available,
    decoder_missing,
    encode_for_upload,
    fitted_size,
    heif_available,
    prepare,
)

SAMPLES = pathlib.Path(skimage.__file__).parent / "data"  # real photos, shipped offline

# A marker in every broken file's directory name: error messages must not carry the path.
PATH_MARKER = "PATHMARKER"


@pytest.fixture(scope="module")
def photo_12mp(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A 4000x3000 camera-like JPEG: a real photo upscaled, with sensor-like noise."""
    photo = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    big = photo.resize((4000, 3000), Image.Resampling.BICUBIC)
    noise = Image.effect_noise((4000, 3000), 40).convert("RGB")
    path = tmp_path_factory.mktemp("big") / "camera.jpg"
    Image.blend(big, noise, 0.15).save(path, quality=92)
    return path


@pytest.fixture
def broken_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / PATH_MARKER
    folder.mkdir()
    return folder


def save_jpeg(path: pathlib.Path, image: Image.Image, **params: object) -> pathlib.Path:
    image.save(path, "JPEG", quality=95, **params)
    return path


def bad_image_message(path: pathlib.Path) -> str:
    """prepare(path) must fail with BAD_IMAGE; returns the message."""
    with pytest.raises(ItemError) as caught:
        prepare(path)
    assert caught.value.code is ErrorCode.BAD_IMAGE, caught.value.message
    assert PATH_MARKER not in caught.value.message
    assert path.name not in caught.value.message
    return caught.value.message


def png_claiming(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims width x height 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def float64_tiff(width: int = 4, height: int = 4) -> bytes:
    """A valid little-endian TIFF of 64-bit float samples, which Pillow cannot decode."""
    pixels = struct.pack(f"<{width * height}d", *([0.5] * (width * height)))
    short, long_ = 3, 4
    entries = [
        (256, short, width),  # ImageWidth
        (257, short, height),  # ImageLength
        (258, short, 64),  # BitsPerSample
        (259, short, 1),  # Compression: none
        (262, short, 1),  # PhotometricInterpretation: black is zero
        (273, long_, 0),  # StripOffsets, patched below
        (277, short, 1),  # SamplesPerPixel
        (278, short, height),  # RowsPerStrip
        (279, long_, len(pixels)),  # StripByteCounts
        (339, short, 3),  # SampleFormat: IEEE float
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


def rgb_at(prep: PreparedImage, x: int, y: int) -> tuple[int, int, int]:
    pixel = prep.image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


def is_red(rgb: tuple[int, int, int]) -> bool:
    return rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60


def is_blue(rgb: tuple[int, int, int]) -> bool:
    return rgb[0] < 60 and rgb[1] < 60 and rgb[2] > 200


# --- size: decoded once, drafted with an aspect-correct box, fitted to max_side ---------


def test_a_12mp_jpeg_is_decoded_at_quarter_scale_and_fitted_to_max_side(
    photo_12mp: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drafts: list[tuple[tuple[int, int] | None, tuple[int, int]]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> tuple[str, tuple[int, int, float, float]] | None:
        result = original_draft(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)

    prep = prepare(photo_12mp)

    # A 4:3 box lets libjpeg decode at 1/4 (1000x750); a square one would stop at 1/2.
    assert drafts == [((768, 576), (1000, 750))]
    assert prep.image.size == (768, 576)
    assert (prep.width, prep.height) == (4000, 3000)
    assert (prep.format, prep.mode) == ("JPEG", "RGB")


@pytest.mark.parametrize(
    ("size", "max_side", "box", "decoded", "result"),
    [
        ((1600, 1200), 768, (768, 576), (800, 600), (768, 576)),  # 1/2
        ((1600, 1200), 200, (200, 150), (200, 150), (200, 150)),  # 1/8, exact
        ((1800, 1200), 300, (300, 200), (450, 300), (300, 200)),  # 3:2 at 1/4
        ((1200, 1600), 200, (150, 200), (150, 200), (150, 200)),  # portrait
        ((1000, 10), 100, (100, 1), (125, 2), (100, 1)),  # extreme aspect: box >= 1 px
    ],
)
def test_the_draft_box_has_the_image_aspect_and_the_long_side_becomes_max_side(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    size: tuple[int, int],
    max_side: int,
    box: tuple[int, int],
    decoded: tuple[int, int],
    result: tuple[int, int],
) -> None:
    path = save_jpeg(tmp_path / "a.jpg", Image.new("RGB", size, (30, 120, 200)))
    drafts: list[tuple[tuple[int, int] | None, tuple[int, int]]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> tuple[str, tuple[int, int, float, float]] | None:
        answer = original_draft(self, mode, size)
        drafts.append((size, self.size))
        return answer

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)

    prep = prepare(path, max_side=max_side)

    assert drafts == [(box, decoded)]
    assert prep.image.size == result
    assert (prep.width, prep.height) == size


def test_a_phone_jpeg_with_extra_pictures_is_a_jpeg_drafted_like_any(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main, depth = Image.new("RGB", (1600, 1200), "red"), Image.new("RGB", (1600, 1200), "blue")
    main.save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[depth])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    drafts: list[tuple[int, int] | None] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> tuple[str, tuple[int, int, float, float]] | None:
        drafts.append(size)
        return original_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)

    prep = prepare(tmp_path / "phone.jpg")

    assert (prep.format, prep.image.size, drafts) == ("JPEG", (768, 576), [(768, 576)])
    assert is_red(rgb_at(prep, 10, 10))  # the main picture, not the depth map


@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg"])
def test_small_images_are_not_upscaled(name: str) -> None:
    original = Image.open(SAMPLES / name)
    prep = prepare(SAMPLES / name, max_side=768)
    assert prep.image.size == original.size
    assert (prep.width, prep.height) == original.size


def test_a_large_png_is_fitted_too() -> None:
    prep = prepare(SAMPLES / "astronaut.png", max_side=200)  # 512x512
    assert prep.image.size == (200, 200)
    assert (prep.width, prep.height, prep.format) == (512, 512, "PNG")


def test_the_file_is_opened_once(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    original_open = Image.open

    def spy(fp: object, *args: object, **kwargs: object) -> Image.Image:
        opened.append(fp)
        return original_open(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    prepare(SAMPLES / "rocket.jpg")
    assert len(opened) == 1


def test_prepared_image_carries_no_metadata() -> None:
    prep = prepare(SAMPLES / "rocket.jpg")
    assert prep.image.mode == "RGB"
    assert prep.image.info == {}


# --- EXIF ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "size", "red_at", "blue_at"),
    [
        # The stored picture is 60x30: red left half, blue right half.
        (1, (60, 30), (5, 15), (55, 15)),
        (3, (60, 30), (55, 15), (5, 15)),  # turned 180 degrees
        (6, (30, 60), (15, 5), (15, 55)),  # turned 90 clockwise: left goes to the top
        (8, (30, 60), (15, 55), (15, 5)),  # turned 90 anticlockwise: left goes to the bottom
    ],
)
def test_exif_orientation_is_applied(
    tmp_path: pathlib.Path,
    orientation: int,
    size: tuple[int, int],
    red_at: tuple[int, int],
    blue_at: tuple[int, int],
) -> None:
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = save_jpeg(tmp_path / "turned.jpg", stored, exif=exif)

    prep = prepare(path)

    assert prep.exif["orientation"] == orientation
    assert (prep.width, prep.height) == size
    assert prep.image.size == size
    assert is_red(rgb_at(prep, *red_at))
    assert is_blue(rgb_at(prep, *blue_at))


def test_a_rotated_12mp_jpeg_reports_the_upright_size(
    photo_12mp: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = save_jpeg(tmp_path / "portrait.jpg", Image.open(photo_12mp), exif=exif)
    prep = prepare(path)
    assert (prep.width, prep.height) == (3000, 4000)
    assert prep.image.size == (576, 768)


def camera_exif() -> Image.Exif:
    """EXIF as a phone writes it: camera, times (with offset) and a GPS position."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "EOS 5D Mark IV\x00"
    exif[ExifTags.Base.DateTime] = "2022:02:02 08:00:00"  # last edit: not the capture time
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[ExifTags.Base.DateTimeOriginal] = "2021:05:01 12:00:00"
    sub[ExifTags.Base.OffsetTimeOriginal] = "+10:00"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "S"
    gps[ExifTags.GPS.GPSLatitude] = (33.0, 51.0, 21.6)  # Sydney Opera House
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (151.0, 12.0, 54.0)
    gps[ExifTags.GPS.GPSAltitudeRef] = b"\x00"
    gps[ExifTags.GPS.GPSAltitude] = 4.5
    return exif


def test_exif_date_camera_and_gps_are_parsed(tmp_path: pathlib.Path) -> None:
    path = save_jpeg(tmp_path / "phone.jpg", Image.new("RGB", (40, 30)), exif=camera_exif())

    exif = prepare(path).exif

    assert exif == {
        "datetime": "2021-05-01T12:00:00+10:00",  # DateTimeOriginal wins over DateTime
        "make": "Canon",
        "model": "EOS 5D Mark IV",
        "orientation": None,
        "gps": {"lat": -33.856, "lon": 151.215, "alt": 4.5},
    }


def test_west_longitudes_and_altitudes_below_sea_level_are_negative(
    tmp_path: pathlib.Path,
) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.DateTime] = "2019:12:31 23:59:59"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (31.0, 30.0, 0.0)  # the Dead Sea shore
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"  # (not really: the sign is what is tested)
    gps[ExifTags.GPS.GPSLongitude] = (35.0, 30.0, 0.0)
    gps[ExifTags.GPS.GPSAltitudeRef] = b"\x01"
    gps[ExifTags.GPS.GPSAltitude] = 430.0
    path = save_jpeg(tmp_path / "sea.jpg", Image.new("RGB", (40, 30)), exif=exif)

    exif_info = prepare(path).exif

    assert exif_info["datetime"] == "2019-12-31T23:59:59"
    assert exif_info["gps"] == {"lat": 31.5, "lon": -35.5, "alt": -430.0}


def test_missing_or_meaningless_exif_gives_nones(tmp_path: pathlib.Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.DateTime] = "0000:00:00 00:00:00"  # a camera without a clock
    exif[ExifTags.Base.Make] = "   "
    exif[ExifTags.Base.Orientation] = 42
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitude] = (0.0, 0.0, 0.0)  # no fix
    gps[ExifTags.GPS.GPSLongitude] = (0.0, 0.0, 0.0)
    path = save_jpeg(tmp_path / "odd.jpg", Image.new("RGB", (40, 30)), exif=exif)
    empty = {"datetime": None, "make": None, "model": None, "orientation": None, "gps": None}
    exif[ExifTags.Base.Model] = "Garbage\n\x01" * 1000
    garbled = save_jpeg(tmp_path / "garbled.jpg", Image.new("RGB", (40, 30)), exif=exif)
    assert prepare(garbled).exif["model"] == "Garbage" * 14 + "Ga"  # printable, 100 chars

    Image.new("RGB", (40, 30)).save(tmp_path / "plain.png")

    assert prepare(path).exif == empty
    assert prepare(tmp_path / "plain.png").exif == empty


# --- upload: small, and nothing but pixels -------------------------------------------


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("webp", "image/webp")])
def test_upload_bytes_carry_no_exif_gps_icc_or_comment(
    tmp_path: pathlib.Path, fmt: str, mime: str
) -> None:
    source = Image.open(SAMPLES / "astronaut.png").convert("RGB")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = save_jpeg(
        tmp_path / "private.jpg", source, exif=camera_exif(), icc_profile=icc, comment=b"Alice"
    )
    assert Image.open(path).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the source has GPS

    data, mime_type = encode_for_upload(prepare(path, max_side=256), fmt)

    assert mime_type == mime
    uploaded = Image.open(io.BytesIO(data))
    assert uploaded.format == fmt.upper()
    assert max(uploaded.size) == 256
    assert len(uploaded.getexif()) == 0
    assert not {"exif", "icc_profile", "comment", "xmp"} & set(uploaded.info)
    for marker in (b"Exif", b"Canon", b"Alice", b"ICC_PROFILE"):
        assert marker not in data


def test_a_12mp_jpeg_uploads_in_under_150_kb(photo_12mp: pathlib.Path) -> None:
    data, mime = encode_for_upload(prepare(photo_12mp))
    assert mime == "image/jpeg"
    assert Image.open(io.BytesIO(data)).size == (768, 576)
    assert len(data) < 150_000


def test_only_jpeg_and_webp_are_upload_formats() -> None:
    prep = prepare(SAMPLES / "rocket.jpg")
    with pytest.raises(ValueError, match="JPEG or WEBP"):
        encode_for_upload(prep, "PNG")


# --- pixel modes -----------------------------------------------------------------------


def test_transparency_is_composited_on_white(tmp_path: pathlib.Path) -> None:
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # transparent red: must not show
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 20))
    rgba.save(tmp_path / "alpha.png")
    palette = Image.new("P", (40, 20), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.paste(1, (0, 0, 20, 20))
    palette.save(tmp_path / "palette.png", transparency=0)  # index 0 (black) transparent

    for name, mode in (("alpha.png", "RGBA"), ("palette.png", "P")):
        prep = prepare(tmp_path / name)
        assert (prep.mode, prep.image.mode) == (mode, "RGB")
        assert is_blue(rgb_at(prep, 5, 10))
        assert rgb_at(prep, 35, 10) == (255, 255, 255)


@pytest.mark.parametrize(
    ("mode", "name", "fmt", "scale"),
    [
        ("I;16", "deep.png", "<H", 257),  # 16-bit PNG: 0..65535
        ("F", "float.tif", "<f", 1 / 255),  # float TIFF: 0..1
    ],
)
def test_deep_grayscale_is_scaled_not_clipped(
    tmp_path: pathlib.Path, mode: str, name: str, fmt: str, scale: float
) -> None:
    ramp = b"".join(struct.pack(fmt, value * scale) for value in range(256))
    Image.frombytes(mode, (256, 1), ramp).save(tmp_path / name)

    prep = prepare(tmp_path / name)

    assert prep.mode == mode
    assert [rgb_at(prep, x, 0) for x in (0, 1, 128, 255)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_grayscale_cmyk_and_animated_images_become_rgb(tmp_path: pathlib.Path) -> None:
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)
    red, blue = Image.new("RGB", (20, 20), "red"), Image.new("RGB", (20, 20), "blue")
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=100)

    cmyk = prepare(tmp_path / "print.jpg")
    assert (cmyk.mode, cmyk.image.mode) == ("CMYK", "RGB")
    assert is_red(rgb_at(cmyk, 10, 10))
    gif = prepare(tmp_path / "anim.gif")
    assert (gif.format, gif.image.mode) == ("GIF", "RGB")
    assert is_red(rgb_at(gif, 10, 10))  # the first frame
    gray = prepare(SAMPLES / "camera.png")
    assert (gray.mode, gray.image.mode) == ("L", "RGB")


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif_decodes_with_pillows_own_codec(tmp_path: pathlib.Path) -> None:
    Image.open(SAMPLES / "chelsea.png").save(tmp_path / "cat.avif", quality=60)
    prep = prepare(tmp_path / "cat.avif")
    assert (prep.format, prep.image.size) == ("AVIF", (451, 300))


# --- bad files: BAD_IMAGE, IO_ERROR, never the path ------------------------------------


def test_an_empty_file_is_a_bad_image(broken_dir: pathlib.Path) -> None:
    (broken_dir / "empty.jpg").write_bytes(b"")
    assert bad_image_message(broken_dir / "empty.jpg") == "not a decodable image: empty file"


def test_a_text_file_named_jpg_is_a_bad_image(broken_dir: pathlib.Path) -> None:
    (broken_dir / "notes.jpg").write_text("not a picture\n" * 20)
    message = bad_image_message(broken_dir / "notes.jpg")
    assert message == "not a decodable image: cannot identify image file"


@pytest.mark.parametrize("name", ["rocket.jpg", "chelsea.png"])
def test_a_truncated_image_is_a_bad_image(broken_dir: pathlib.Path, name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    (broken_dir / name).write_bytes(data[: len(data) // 2])
    assert bad_image_message(broken_dir / name) == "truncated image data"


def test_a_decompression_bomb_is_a_bad_image(broken_dir: pathlib.Path) -> None:
    path = broken_dir / "bomb.png"
    path.write_bytes(png_claiming(20_000, 20_000))  # 400 Mpx, over twice Pillow's limit
    assert path.stat().st_size < 200
    message = bad_image_message(path)
    assert message == (
        f"image too large: 400000000 pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS} pixels"
    )


# Pillow only warns between its limit and twice that. imaging turns that warning into an
# error at import, but whoever runs us may reset the filters (pytest does, per test) to
# show or ignore it: the file must be refused in every case.
@pytest.mark.parametrize(
    "action",
    [
        pytest.param(
            "error", marks=pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
        ),
        pytest.param(
            "ignore", marks=pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
        ),
    ],
)
def test_an_image_over_the_limit_but_under_twice_it_is_also_refused(
    broken_dir: pathlib.Path, action: str
) -> None:
    path = broken_dir / "big.png"
    path.write_bytes(png_claiming(10_000, 10_000))  # 100 Mpx: only a warning for Pillow
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 100_000_000 < 2 * Image.MAX_IMAGE_PIXELS
    assert bad_image_message(path) == (
        f"image too large: 100000000 pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS} pixels"
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_limit_is_pillows_own(
    broken_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (200, 100)).save(broken_dir / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # warning level for 20 000 px
    assert bad_image_message(broken_dir / "small.png").startswith("image too large: 20000")


def test_a_float64_tiff_is_a_bad_image(broken_dir: pathlib.Path) -> None:
    (broken_dir / "science.tif").write_bytes(float64_tiff())
    assert bad_image_message(broken_dir / "science.tif").startswith("not a decodable image")


# --- a missing decoder: BAD_IMAGE for now, but not the file's fault ------------------

HEIC_HEADER = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"  # major brand, minor, compatible


@pytest.fixture
def without_pillow_heif(monkeypatch: pytest.MonkeyPatch) -> None:
    """pillow-heif cannot be imported (whether or not this process registered it before)."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` fails


@pytest.mark.usefixtures("without_pillow_heif")
def test_heic_without_pillow_heif_says_what_to_install(broken_dir: pathlib.Path) -> None:
    path = broken_dir / "IMG_0001.HEIC"
    path.write_bytes(HEIC_HEADER + b"\x00" * 64)
    message = bad_image_message(path)
    assert message == (
        "decoder missing: HEIF/HEIC image: install imgbatch[heif] (pip install 'imgbatch[heif]')"
    )
    assert decoder_missing(message) and message.startswith(DECODER_MISSING)
    assert not heif_available() and not decoder_available(message)
    with pytest.raises(ItemError) as caught:
        fitted_size(path)  # --dry-run says the same
    assert caught.value.message == message


@pytest.mark.usefixtures("without_pillow_heif")
def test_the_heif_decoder_counts_as_available_once_pillow_heif_imports(
    broken_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = broken_dir / "IMG_0002.HEIC"
    path.write_bytes(HEIC_HEADER + b"\x00" * 64)
    message = bad_image_message(path)
    registered: list[bool] = []
    installed = types.ModuleType("pillow_heif")  # the extra, installed after that run
    installed.register_heif_opener = lambda: registered.append(True)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pillow_heif", installed)
    assert heif_available() and decoder_available(message)
    assert heif_available() and registered == [True]  # registered with Pillow once


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
@pytest.mark.filterwarnings("ignore:image file could not be identified because AVIF")
def test_avif_without_pillows_avif_module_says_so(tmp_path: pathlib.Path) -> None:
    Image.new("RGB", (20, 10), "red").save(tmp_path / "pic.avif")
    assert avif_available()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "PIL._avif", None)
        from PIL import AvifImagePlugin

        patch.setattr(AvifImagePlugin, "SUPPORTED", False)
        assert not avif_available()
        message = bad_image_message(tmp_path / "pic.avif")
        assert not decoder_available(message)
    assert message.startswith(DECODER_MISSING + "AVIF image: ")
    assert "pip install --upgrade pillow" in message
    assert decoder_available(message)  # this Pillow decodes AVIF: a later run retries it
    assert prepare(tmp_path / "pic.avif").format == "AVIF"


@pytest.mark.usefixtures("without_pillow_heif")
def test_a_broken_file_with_a_decoder_installed_is_a_permanent_bad_image(
    broken_dir: pathlib.Path,
) -> None:
    (broken_dir / "notes.jpg").write_text("not a picture\n" * 20)
    (broken_dir / "odd.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isomavc1")
    messages = [bad_image_message(broken_dir / name) for name in ("notes.jpg", "odd.mp4")]
    if features.check("avif"):  # Pillow decodes AVIF, and this one is broken
        (broken_dir / "cut.avif").write_bytes(b"\x00\x00\x00\x1cftypavif\x00" * 3)
        messages.append(bad_image_message(broken_dir / "cut.avif"))
    for message in messages:
        assert message == "not a decodable image: cannot identify image file"
        assert not decoder_missing(message) and not decoder_available(message)
    assert not decoder_missing(None)


def test_a_missing_file_or_a_directory_is_an_io_error(broken_dir: pathlib.Path) -> None:
    for path, message in (
        (broken_dir / "gone.jpg", "cannot open file: No such file or directory"),
        (broken_dir, "not a regular file"),
    ):
        with pytest.raises(ItemError) as caught:
            prepare(path)
        assert caught.value.code is ErrorCode.IO_ERROR
        assert caught.value.message == message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_an_io_error_and_never_blocks(broken_dir: pathlib.Path) -> None:
    fifo = broken_dir / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            prepare(fifo)
        except BaseException as exc:  # reported to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "prepare() blocked on a FIFO"
    assert isinstance(outcome[0], ItemError)
    assert outcome[0].code is ErrorCode.IO_ERROR


def test_exif_transpose_agrees_with_pillow(tmp_path: pathlib.Path) -> None:
    source = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        path = tmp_path / f"o{orientation}.png"
        source.save(path, exif=exif)  # PNG: lossless, so pixels compare exactly
        expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        assert prepare(path).image.tobytes() == expected.tobytes(), orientation


# --- dry run: the size from the header alone -------------------------------------------


def test_fitted_size_is_prepares_size_read_from_the_header_only(
    photo_12mp: pathlib.Path, broken_dir: pathlib.Path
) -> None:
    assert fitted_size(photo_12mp) == prepare(photo_12mp).image.size == (768, 576)
    assert fitted_size(photo_12mp, 1000) == (1000, 750)
    assert fitted_size(SAMPLES / "chelsea.png") == (451, 300)  # never upscaled
    data = photo_12mp.read_bytes()
    (broken_dir / "cut.jpg").write_bytes(data[: len(data) // 3])
    assert fitted_size(broken_dir / "cut.jpg") == (768, 576)  # the pixels are never read
    (broken_dir / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    (broken_dir / "notes.jpg").write_text("not a picture")
    for name in ("bomb.png", "notes.jpg"):
        with pytest.raises(ItemError) as caught:
            fitted_size(broken_dir / name)
        assert caught.value.code is ErrorCode.BAD_IMAGE
