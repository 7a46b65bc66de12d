"""Offline OCR (`analyze --ocr`, issue 25.3): rapidocr on images Pillow rendered with known
text, through the real CLI; the box frame of an EXIF-rotated image; the missing extra."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.conftest import REPO, CliResult, run_cli

pytest.importorskip("rapidocr")
pytest.importorskip("onnxruntime")

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
if not os.path.exists(FONT):  # pragma: no cover - CI images have DejaVu
    pytest.skip("needs the DejaVu fonts", allow_module_level=True)

pytestmark = pytest.mark.slow

#: a download would go to these and fail: OCR must read the models from the wheel
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}

#: name: (size, lines, font size, ink, paper); the text is what OCR must read
RENDERS: dict[str, tuple[tuple[int, int], list[str], int, Any, Any]] = {
    "poster.png": (
        (1400, 600),
        ["Harbour lights at midnight", "Platform seven closed"],
        56,
        0,
        255,
    ),
    # a camera-sized page: OCR reads the full-size file (coordinates: the rotated test)
    "big_page.png": ((3000, 2000), ["Return before Friday noon"], 40, 0, 255),
    "low_contrast.jpg": ((1200, 400), ["grey lantern market"], 44, (95, 95, 95), (150, 150, 150)),
    "inverted.jpg": ((1200, 400), ["WHITE ORCHID STREET"], 48, (250, 250, 250), (20, 30, 110)),
}
BLANKS = {"white.png": 255, "gray.jpg": (128, 128, 128)}
ROTATED = "rotated.jpg"
ROTATED_WORDS = "Turnip festival tickets"


def render(
    path: Path, size: tuple[int, int], lines: list[str], px: int, ink: Any, paper: Any
) -> list[tuple[int, int, int, int]]:
    """Draw `lines` on a new image; the bounding box of each line, in pixels."""
    image = Image.new("RGB", size, paper if isinstance(paper, tuple) else (paper,) * 3)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, px)
    boxes = []
    y = size[1] // 6
    for line in lines:
        fill = ink if isinstance(ink, tuple) else (ink,) * 3
        draw.text((size[0] // 12, y), line, font=font, fill=fill)
        left, top, right, bottom = draw.textbbox((size[0] // 12, y), line, font=font)
        boxes.append((left, top, right, bottom))
        y += int(px * 1.8)
    image.save(path, quality=92) if path.suffix == ".jpg" else image.save(path)
    return boxes


def render_rotated(path: Path) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """An upright 900x1400 page stored as 1400x900 pixels plus EXIF orientation 6 (a
    camera held upright): its upright size and the line's box in the upright frame."""
    upright = Image.new("RGB", (900, 1400), (255, 255, 255))
    draw = ImageDraw.Draw(upright)
    font = ImageFont.truetype(FONT, 52)
    where = (80, 1000)  # low on the page: a box left unrotated lands elsewhere
    draw.text(where, ROTATED_WORDS, font=font, fill=(0, 0, 0))
    bbox = draw.textbbox(where, ROTATED_WORDS, font=font)
    # orientation 6 means "rotate 90 degrees clockwise to view": store it the other way
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=92)
    return upright.size, bbox


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def recall(expected: list[str], text: str) -> float:
    seen = words(text)
    want = words(" ".join(expected))
    hits = 0
    for word in want:
        if word in seen:
            seen.remove(word)
            hits += 1
    return hits / len(want)


def results(res: CliResult) -> dict[str, dict[str, Any]]:
    assert res.rc == 0, res.stderr
    return {Path(r["path"]).name: r["result"] for r in res.records if r.get("status") == "ok"}


def isolated(base: Path) -> dict[str, str]:
    home = base / "home"
    for sub in ("", ".cache", ".config"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        **NO_NETWORK,
    }


class Rendered:
    """One OCR run over the rendered tree, shared by the tests of this module."""

    def __init__(self, base: Path) -> None:
        self.root = base / "photos"
        self.root.mkdir()
        self.env = isolated(base)
        self.lines = {}
        for name, (size, lines, px, ink, paper) in RENDERS.items():
            render(self.root / name, size, lines, px, ink, paper)
            self.lines[name] = lines
        for name, paper in BLANKS.items():
            render(self.root / name, (800, 600), [], 10, 0, paper)
        self.upright, self.bbox = render_rotated(self.root / ROTATED)
        self.run = run_cli(["analyze", "--provider", "local", "--ocr", self.root], env=self.env)
        self.results = results(self.run)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendered]:
    yield Rendered(tmp_path_factory.mktemp("ocr"))


def test_rendered_text_is_read_with_word_recall(rendered: Rendered) -> None:
    total = found = 0
    for name, lines in rendered.lines.items():
        result = rendered.results[name]
        score = recall(lines, result["text"])
        n = len(words(" ".join(lines)))
        total, found = total + n, found + score * n
        print(f"OCR word recall {name}: {score:.2f} ({result['text']!r})")
        assert score >= 0.75, (name, result["text"])
    print(f"OCR word recall, all renders: {found / total:.3f} of {total} words")
    assert found / total >= 0.9


def test_boxes_are_in_reading_order_with_text_joined(rendered: Rendered) -> None:
    result = rendered.results["poster.png"]
    boxes = result["text_boxes"]
    assert [b["text"] for b in boxes] == result["text"].split("\n")
    assert len(boxes) == 2 and boxes[0]["box"][0][1] < boxes[1]["box"][0][1]  # top first
    for box in boxes:
        assert set(box) == {"text", "confidence", "box"}
        assert 0.0 <= box["confidence"] <= 1.0
        assert len(box["box"]) == 4 and all(
            len(c) == 2 and all(isinstance(v, int) for v in c) for c in box["box"]
        )


def test_boxes_are_in_the_exif_rotated_full_size_frame(rendered: Rendered) -> None:
    result = rendered.results[ROTATED]
    assert (result["width"], result["height"]) == rendered.upright  # 900 x 1400, upright
    assert recall([ROTATED_WORDS], result["text"]) == 1.0, result["text"]
    (box,) = [b["box"] for b in result["text_boxes"] if "festival" in b["text"].lower()]
    xs, ys = [x for x, _ in box], [y for _, y in box]
    left, top, right, bottom = rendered.bbox
    slack = 25  # the detector's box is a little larger than the glyphs' one
    assert abs(min(xs) - left) <= slack and abs(max(xs) - right) <= slack, (box, rendered.bbox)
    assert abs(min(ys) - top) <= slack and abs(max(ys) - bottom) <= slack, (box, rendered.bbox)


def test_an_image_without_text_has_empty_text_and_no_boxes(rendered: Rendered) -> None:
    for name in BLANKS:
        assert rendered.results[name]["text"] == ""
        assert rendered.results[name]["text_boxes"] == []


def test_rapidocrs_own_log_lines_stay_off_stderr(rendered: Rendered) -> None:
    lines = rendered.run.stderr.strip().splitlines()
    assert lines and all(line.startswith("imgbatch:") for line in lines), rendered.run.stderr


def test_search_finds_ocr_text(rendered: Rendered) -> None:
    res = run_cli(["search", rendered.root, "orchid"], env=rendered.env)
    assert res.rc == 0, res.stderr
    assert [Path(r["path"]).name for r in res.records] == ["inverted.jpg"]
    res = run_cli(["search", rendered.root, "festival", "tickets"], env=rendered.env)
    assert [Path(r["path"]).name for r in res.records] == [ROTATED]


# -- the setting, the fingerprint, remote providers, logs ---------------------------------


@pytest.fixture
def one_page(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    render(root / "page.png", (900, 300), ["Quiet library hours"], 48, 0, 255)
    return root


def fingerprints() -> list[str]:
    res = run_cli(["runs", "--json", "--checkpoint", str(state_folder())])
    assert res.rc == 0, res.stderr
    return [r["fingerprint"] for r in res.records]


def state_folder() -> Path:
    base = Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"
    (folder,) = [p for p in base.iterdir() if p.name != "results"]
    return folder


def test_ocr_changes_the_fingerprint_and_the_config_file_turns_it_on(
    one_page: Path, tmp_path: Path
) -> None:
    plain = results(run_cli(["analyze", "--provider", "local", one_page], env=NO_NETWORK))
    assert "text" not in plain["page.png"]
    config = tmp_path / "config.toml"
    config.write_text("[local]\nocr = true\n")
    # other settings, other results: the stored ones are not reused, OCR runs
    res = run_cli(["analyze", "--provider", "local", "--config", config, one_page], env=NO_NETWORK)
    read = results(res)
    assert recall(["Quiet library hours"], read["page.png"]["text"]) == 1.0
    again = run_cli(["analyze", "--provider", "local", "--ocr", one_page], env=NO_NETWORK)
    assert again.rc == 0 and again.records == []  # same fingerprint: nothing to do
    newest, ocr, first = fingerprints()[:3]
    assert newest == ocr != first


def test_verbose_shows_rapidocrs_log_lines(one_page: Path) -> None:
    res = run_cli(
        ["analyze", "--provider", "local", "--ocr", "--verbose", "--workers", "1", one_page],
        env=NO_NETWORK,
    )
    assert res.rc == 0, res.stderr
    assert "PP-OCRv6_det_small.onnx" in res.stderr


def test_a_remote_provider_ignores_ocr_with_a_warning(one_page: Path) -> None:
    res = run_cli(["analyze", "--provider", "fake", "--ocr", one_page], module="tests.fake_cli")
    assert res.rc == 0, res.stderr
    assert "--ocr is for the offline analyzer: fake ignores it" in res.stderr
    assert "text_boxes" not in res.records[0]["result"]


# -- without the extra -----------------------------------------------------------------------

BLOCKER = '''
import sys

class _NoOcr:
    """rapidocr is not installed (for this interpreter)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "rapidocr":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoOcr())
'''


def run_without_rapidocr(tmp_path: Path, *args: str | Path) -> CliResult:
    """The real CLI in an interpreter where `import rapidocr` fails (a sitecustomize)."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, **NO_NETWORK, "PYTHONPATH": str(shim)}
    proc = subprocess.run(
        [sys.executable, "-m", "imgbatch", *map(str, args)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


def test_without_the_extra_ocr_is_exit_2_naming_the_pip_command(
    one_page: Path, tmp_path: Path
) -> None:
    res = run_without_rapidocr(tmp_path, "analyze", "--provider", "local", "--ocr", one_page)
    # the shim works: rapidocr cannot be imported there
    proc = subprocess.run(
        [sys.executable, "-c", "import rapidocr"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "shim")},
        capture_output=True,
        check=False,
    )
    assert proc.returncode != 0 and b"ModuleNotFoundError" in proc.stderr
    res = run_without_rapidocr(tmp_path, "analyze", "--provider", "local", "--ocr", one_page)
    assert res.rc == 2, (res.rc, res.stderr)
    assert res.stdout == b""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'imgbatch[ocr]'" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    # without --ocr the offline analyzer needs no extra
    res = run_without_rapidocr(tmp_path, "analyze", "--provider", "local", one_page)
    assert res.rc == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["status"] == "ok"
