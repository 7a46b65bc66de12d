"""local_features: what the offline analyzer reports about a prepared image."""

from __future__ import annotations

import io
import itertools
import json
import pathlib
import re

import pytest
import skimage
from PIL import Image, ImageColor, ImageFilter

from imgbatch.imaging import ExifInfo, PreparedImage, prepare
from imgbatch.providers.local import ANALYZER_VERSION
from imgbatch.providers.local_features import (
    BLUR_THRESHOLD,
    color_name,
    dominant_colors,
    features,
    phash,
    phash_distance,
    sharpness,
)

SAMPLES = pathlib.Path(skimage.__file__).parent / "data"  # real photos, shipped offline
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png"]
BASIC_NAMES = {
    "black",
    "gray",
    "white",
    "red",
    "orange",
    "yellow",
    "olive",
    "green",
    "teal",
    "cyan",
    "blue",
    "navy",
    "purple",
    "magenta",
    "pink",
    "brown",
    "beige",
}
NO_EXIF: ExifInfo = {
    "datetime": None,
    "make": None,
    "model": None,
    "orientation": None,
    "gps": None,
}


def prepared(image: Image.Image) -> PreparedImage:
    """A PreparedImage straight from pixels, as prepare() hands it over."""
    rgb = image.convert("RGB")
    return PreparedImage(rgb, rgb.width, rgb.height, "PNG", image.mode, NO_EXIF)


def sample(name: str) -> PreparedImage:
    return prepare(SAMPLES / name)


def recompressed(image: Image.Image, scale: float, quality: int) -> Image.Image:
    """The same picture resized and saved again as a lower-quality JPEG."""
    size = (round(image.width * scale), round(image.height * scale))
    buf = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_features_are_json_with_the_documented_fields() -> None:
    result = features(sample("chelsea.png"))

    assert json.loads(json.dumps(result)) == result
    assert set(result) == {
        "width",
        "height",
        "format",
        "mode",
        "exif",
        "dominant_colors",
        "brightness",
        "sharpness",
        "blurry",
        "phash",
    }
    assert (result["width"], result["height"], result["format"]) == (451, 300, "PNG")
    assert result["mode"] == "RGB"
    assert set(result["exif"]) == {"datetime", "make", "model", "orientation", "gps"}
    assert re.fullmatch(r"[0-9a-f]{16}", result["phash"])
    assert ANALYZER_VERSION == "local-1"


def test_exif_is_passed_through(tmp_path: pathlib.Path) -> None:
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Nikon"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 0.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (2.0, 21.0, 0.0)
    Image.new("RGB", (40, 30)).save(tmp_path / "paris.jpg", exif=exif)

    result = features(prepare(tmp_path / "paris.jpg"))

    assert result["exif"]["make"] == "Nikon"
    assert result["exif"]["gps"] == {"lat": 48.85, "lon": 2.35, "alt": None}


# --- dominant colours ------------------------------------------------------------------


def test_dominant_colours_give_shares_of_the_picture() -> None:
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    image.paste((20, 60, 220), (0, 0, 300, 300))  # three quarters blue

    colours = dominant_colors(image)

    assert colours == [
        {"hex": "#143cdc", "name": "blue", "fraction": 0.75},
        {"hex": "#ffffff", "name": "white", "fraction": 0.25},
    ]


def test_five_colours_each_get_their_share_and_their_name() -> None:
    stripes = [  # (colour, width in 48ths of the picture): median cut sees pure colours
        ((30, 40, 100), 19),
        ((250, 150, 40), 12),
        ((60, 150, 70), 8),
        ((200, 40, 40), 5),
        ((140, 140, 140), 4),
    ]
    image = Image.new("RGB", (480, 480))
    left = 0
    for colour, width in stripes:
        image.paste(colour, (10 * left, 0, 10 * (left + width), 480))
        left += width

    colours = dominant_colors(image)

    assert colours == [
        {"hex": "#1e2864", "name": "navy", "fraction": 0.396},
        {"hex": "#fa9628", "name": "orange", "fraction": 0.25},
        {"hex": "#3c9646", "name": "green", "fraction": 0.167},
        {"hex": "#c82828", "name": "red", "fraction": 0.104},
        {"hex": "#8c8c8c", "name": "gray", "fraction": 0.083},
    ]


@pytest.mark.parametrize("name", PHOTOS)
def test_dominant_colours_of_photos_are_at_most_five_largest_first(name: str) -> None:
    colours = features(sample(name))["dominant_colors"]

    assert 1 <= len(colours) <= 5
    fractions = [colour["fraction"] for colour in colours]
    assert fractions == sorted(fractions, reverse=True)
    assert sum(fractions) == pytest.approx(1.0, abs=0.01)
    for colour in colours:
        assert re.fullmatch(r"#[0-9a-f]{6}", colour["hex"])
        assert colour["name"] in BASIC_NAMES


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chelsea.png", {"brown", "orange"}),  # a ginger tabby cat
        ("coffee.png", {"red", "orange", "brown"}),  # a red cup of coffee
        ("rocket.jpg", {"navy", "blue"}),  # a launch at dusk
    ],
)
def test_the_main_colour_of_real_photos_has_the_right_name(name: str, expected: set[str]) -> None:
    assert features(sample(name))["dominant_colors"][0]["name"] in expected


def test_the_astronaut_has_a_dark_background_and_a_white_suit() -> None:
    names = {colour["name"] for colour in features(sample("astronaut.png"))["dominant_colors"]}
    assert "black" in names
    assert names & {"white", "gray"}


@pytest.mark.parametrize(
    ("css", "name"),
    [
        ("black", "black"),
        ("white", "white"),
        ("gray", "gray"),
        ("silver", "gray"),
        ("red", "red"),
        ("maroon", "red"),
        ("orange", "orange"),
        ("yellow", "yellow"),
        ("gold", "yellow"),
        ("olive", "olive"),
        ("green", "green"),
        ("lime", "green"),
        ("teal", "teal"),
        ("cyan", "cyan"),
        ("blue", "blue"),
        ("skyblue", "blue"),
        ("navy", "navy"),
        ("purple", "purple"),
        ("indigo", "purple"),
        ("magenta", "magenta"),
        ("pink", "pink"),
        ("hotpink", "pink"),
        ("saddlebrown", "brown"),
        ("sienna", "brown"),
        ("tan", "beige"),
        ("wheat", "beige"),
    ],
)
def test_colour_names(css: str, name: str) -> None:
    rgb = ImageColor.getrgb(css)
    assert color_name((rgb[0], rgb[1], rgb[2])) == name


# --- brightness and sharpness ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fill", "brightness"), [((255, 255, 255), 1.0), ((0, 0, 0), 0.0), ((128, 128, 128), 0.502)]
)
def test_brightness_is_mean_luminance(fill: tuple[int, int, int], brightness: float) -> None:
    assert features(prepared(Image.new("RGB", (64, 48), fill)))["brightness"] == brightness


def test_brightness_weighs_green_over_blue_like_the_eye() -> None:
    green = features(prepared(Image.new("RGB", (8, 8), (0, 255, 0))))["brightness"]
    blue = features(prepared(Image.new("RGB", (8, 8), (0, 0, 255))))["brightness"]
    assert green > 0.5 > 0.2 > blue


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"])
def test_a_blurred_photo_is_much_less_sharp_and_called_blurry(
    tmp_path: pathlib.Path, name: str
) -> None:
    original = Image.open(SAMPLES / name).convert("RGB")
    original.filter(ImageFilter.GaussianBlur(4)).save(tmp_path / "blurred.png")

    sharp = features(prepare(SAMPLES / name))
    blurred = features(prepare(tmp_path / "blurred.png"))

    assert sharp["sharpness"] > BLUR_THRESHOLD
    assert not sharp["blurry"]
    assert blurred["sharpness"] < sharp["sharpness"] / 20
    assert blurred["blurry"]


def test_a_motion_blurred_photo_is_called_blurry() -> None:
    result = features(sample("clock_motion.png"))  # a clock photographed while moving
    assert result["blurry"]
    assert 10 < result["sharpness"] < BLUR_THRESHOLD


def test_a_flat_image_has_no_sharpness() -> None:
    assert sharpness(Image.new("L", (300, 200), 77)) == 0.0
    for size in ((1, 1), (2, 2), (2, 5)):  # too small for a 3x3 kernel
        assert sharpness(Image.new("L", size, 77)) == 0.0


@pytest.mark.parametrize("name", ["hubble_deep_field.jpg", "motorcycle_left.png"])
def test_sharpness_hardly_depends_on_max_side(name: str) -> None:
    # Measured at <= 512 px: the same photo prepared at 512, 768 or 1024 px scores alike.
    scores = [features(prepare(SAMPLES / name, side))["sharpness"] for side in (512, 768, 1024)]
    assert max(scores) < 1.15 * min(scores)


def test_sharpness_is_the_exact_variance_of_the_laplacian() -> None:
    np = pytest.importorskip("numpy")
    photo = Image.open(SAMPLES / "camera.png").convert("L")  # 512x512: no resize
    a = np.asarray(photo, dtype=np.float64)
    laplacian = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]
    # Laplacian responses here reach +-400: an 8-bit filter would have clipped them.
    assert abs(laplacian).max() > 255
    assert sharpness(photo) == pytest.approx(float(laplacian.var()), rel=1e-6)


# --- perceptual hash -------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_survives_resizing_and_recompression(name: str) -> None:
    photo = Image.open(SAMPLES / name).convert("RGB")
    copies = [recompressed(photo, 0.5, 60), recompressed(photo, 1.0, 30)]
    for copy in copies:
        assert phash_distance(phash(photo), phash(copy)) <= 6


def test_phash_tells_different_photos_apart() -> None:
    hashes = {name: features(sample(name))["phash"] for name in PHOTOS}
    for (a, hash_a), (b, hash_b) in itertools.combinations(hashes.items(), 2):
        assert phash_distance(hash_a, hash_b) > 16, (a, b)


def test_phash_is_libphash_dct_of_32x32_without_the_zero_frequencies() -> None:
    np = pytest.importorskip("numpy")
    fft = pytest.importorskip("scipy.fft")
    photo = Image.open(SAMPLES / "coffee.png").convert("L")
    small = np.asarray(photo.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    block = fft.dct(fft.dct(small, axis=0), axis=1)[1:9, 1:9].flatten()
    bits = "".join("1" if value > np.median(block) else "0" for value in block)
    assert phash(photo) == f"{int(bits, 2):016x}"


def test_phash_of_a_flat_image_is_zero_and_distance_counts_bits() -> None:
    assert phash(Image.new("RGB", (50, 40), (10, 200, 30))) == "0000000000000000"
    assert phash_distance("0000000000000000", "000000000000000f") == 4
    assert phash_distance("ffffffffffffffff", "0000000000000000") == 64
