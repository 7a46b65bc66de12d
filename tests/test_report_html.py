"""`imgbatch report`: one self-contained HTML file, escaped, thumbnails capped, streamed;
opened in headless Chromium."""

from __future__ import annotations

import base64
import html
import html.parser
import io
import re
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

import imgbatch
from imgbatch.checkpoint import Checkpoint
from imgbatch.config import Settings, results_dir, state_dir
from imgbatch.imaging import PreparedImage
from imgbatch.providers import base
from imgbatch.providers.base import Analysis
from imgbatch.results import ResultStore
from imgbatch.web.report import SCRIPT_HASH, Report
from tests.browser import dump_dom, screenshot
from tests.conftest import make_image, run_cli

HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_TEXT = '</p><script>alert("desc")</script><img src=y onerror=alert(2)>'


class HostileModel:
    """A provider whose answers try to inject markup, with tags to count."""

    name = "hostile"
    remote = False
    model = "hostile-1"

    def __init__(self, settings: Settings) -> None:
        pass

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.model}

    prompt_tokens = 0

    def estimate_tokens(self, width: int, height: int) -> int:
        return 0

    def encode(self, image: PreparedImage) -> PreparedImage:
        return image

    def analyze(self, image: PreparedImage) -> Analysis:
        return Analysis(
            {
                "description": HOSTILE_TEXT,
                "tags": ["cat", "<b>bold</b>", f"w{image.width}"],
                "dominant_colors": [
                    {"hex": "#ff0000", "name": "red"},
                    {"hex": "red;background:url(http://x)", "name": "sneaky"},
                ],
            },
            input_tokens=10,
            output_tokens=5,
        )

    def close(self) -> None:
        pass


base.register("hostile", HostileModel)


def analysed_tree(root: Path, n: int = 5, provider: str = "hostile") -> Path:
    """`n` red images (one with a hostile name), one broken file, analysed."""
    for i in range(n - 1):
        make_image(root / "a" / f"{i:02d}.jpg", size=(320 + i, 240), color=(220, 20, 20))
    make_image(root / "b" / HOSTILE_NAME, size=(200, 200), color=(220, 20, 20))
    (root / "b" / "broken.jpg").write_bytes(b"not a picture")
    list(imgbatch.analyze(root, provider))
    return root


def state_of(root: Path) -> Path:
    return state_dir(str(root), Settings())


def report_html(root: Path, max_thumbnails: int = 2000) -> str:
    out = io.BytesIO()
    Report(state_of(root), results_dir(Settings()), max_thumbnails).write(out)
    return out.getvalue().decode("utf-8")


class Elements(html.parser.HTMLParser):
    """Every element of a page with its attributes, and the text of its scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]

    def items(self) -> list[dict[str, str | None]]:
        """The report's items: cards and rows."""
        return [a for _t, a in self.tags if (a.get("class") or "").startswith("it ")]


def test_the_report_is_one_self_contained_file_with_thumbnails_and_a_summary(
    tmp_path: Path,
) -> None:
    root = analysed_tree(tmp_path / "photos")
    page = report_html(root)
    doc = Elements(page)
    # nothing from the network: every picture a data URI, no external script or style
    imgs = doc.all("img")
    assert len(imgs) == 5  # the broken file has no thumbnail
    assert all((a["src"] or "").startswith("data:image/jpeg;base64,") for a in imgs)
    picture = Image.open(io.BytesIO(base64.b64decode((imgs[0]["src"] or "").split(",", 1)[1])))
    assert picture.format == "JPEG" and max(picture.size) <= 160
    assert not doc.all("link") and all("src" not in a for a in doc.all("script"))
    (csp,) = [a for a in doc.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in (csp["content"] or "")
    assert SCRIPT_HASH in (csp["content"] or "")
    # the summary: counts, errors by code, top tags, the run history
    assert re.search(r"<dt>ok</dt><dd>5</dd><dt>failed</dt><dd>1</dd>", page)
    assert "<dt>BAD_IMAGE</dt><dd>1</dd>" in page
    assert "<li>cat <b>5</b></li>" in page
    assert '<svg class="chart"' in page and "run 1 · PARTIAL" in page


def test_file_names_and_model_text_are_escaped(tmp_path: Path) -> None:
    page = report_html(analysed_tree(tmp_path / "photos"))
    doc = Elements(page)
    assert len(doc.scripts) == 1  # ours, and no other
    for _tag, attrs in doc.tags:
        assert not any(name.startswith("on") for name in attrs), attrs
    assert all((a["src"] or "").startswith("data:") for a in doc.all("img"))
    assert html_escaped(HOSTILE_NAME) in page and html_escaped(HOSTILE_TEXT) in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    # a colour that is not #rrggbb never reaches a style attribute
    styles = [a["style"] for a in doc.all("i") if a.get("style")]
    assert "background:#ff0000" in styles and not any("url(" in (s or "") for s in styles)


def html_escaped(text: str) -> str:
    return html.escape(text, quote=True)


def test_thumbnails_are_capped_and_the_rest_are_text_rows(tmp_path: Path) -> None:
    page = report_html(analysed_tree(tmp_path / "photos", n=6), max_thumbnails=2)
    doc = Elements(page)
    assert len(doc.all("img")) == 2
    assert Counter(a.get("class") for a in doc.items()) == {
        "it card ok": 2,
        "it row": 5,
    }


def test_a_file_changed_since_it_was_analysed_gets_no_thumbnail_of_its_new_content(
    tmp_path: Path,
) -> None:
    root = analysed_tree(tmp_path / "photos")
    make_image(root / "a" / "00.jpg", size=(320, 240), color=(20, 20, 220))  # now blue
    page = report_html(root)
    assert "changed since it was analysed" in page
    assert len(Elements(page).all("img")) == 4


def test_memory_stays_flat_however_many_items(tmp_path: Path) -> None:
    """Items are streamed from the checkpoint to the output: ten times the items, not
    ten times the memory (a list of the items would be)."""

    def peak(n: int) -> int:
        state = tmp_path / f"state-{n}"
        with ResultStore(tmp_path / "results") as store, Checkpoint(state, results=store) as cp:
            cp.set_root(str(tmp_path / "nowhere"))
            fp = "f" * 16
            for i in range(n):
                name, folder = f"{i:06d}-{'x' * 40}.jpg", f"d{i // 100:04d}"
                cp.commit(fp, folder, name, (f"{i:032x}", None, 1, 10, 0, None), {"result": {}})
            cp.flush()
            cp.save_run({"id": cp.next_run_id(), "fingerprint": fp, "provider": "p", "model": "m",
                         "started": 0.0, "updated": 0.0, "state": "COMPLETED",
                         "tokens": {"input": 0, "output": 0}, "counts": {}})  # fmt: skip
        report = Report(state, tmp_path / "results", max_thumbnails=0)
        tracemalloc.start()
        size = sum(len(chunk) for chunk in report.chunks())
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.items == n and size > n * 100
        return top

    small, large = peak(500), peak(5_000)
    assert large < 2 * small, (small, large)


def test_the_command_writes_the_file_and_says_what_it_holds(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"{i}.png", size=(30 + i, 20))
    assert run_cli(["analyze", root]).rc == 0
    out = tmp_path / "report.html"
    res = run_cli(["report", root, "-o", out, "--max-thumbnails", "2"])
    assert res.rc == 0, res.stderr
    assert res.stdout == b""
    assert "report of 3 items, 2 with a thumbnail, written to" in res.stderr
    assert out.read_text().count("<img ") == 2
    to_stdout = run_cli(["report", root])
    assert to_stdout.rc == 0 and to_stdout.stdout.startswith(b"<!doctype html>")


def test_the_command_needs_an_analysed_root(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    res = run_cli(["report", tmp_path / "photos"])
    assert res.rc == 2 and "run `imgbatch analyze` first" in res.stderr


# -- in the browser ------------------------------------------------------------------


def test_chromium_shows_the_thumbnails_and_filters(tmp_path: Path) -> None:
    root = analysed_tree(tmp_path / "photos")
    out = tmp_path / "report.html"
    out.write_text(report_html(root))
    dom = dump_dom(out.as_uri())
    assert 'id="shown">6 of 6 shown<' in dom  # the script ran (its CSP hash is right)
    assert dom.count("<img ") == 5
    assert "alert" not in "".join(Elements(dom).scripts)  # nothing injected ran or stayed
    for _tag, attrs in Elements(dom).tags:
        assert not any(name.startswith("on") for name in attrs)
    errors_only = dump_dom(out.as_uri() + "#status=error")
    assert 'id="shown">1 of 6 shown<' in errors_only
    by_name = dump_dom(out.as_uri() + "#q=" + quote("src=x onerror"))
    assert 'id="shown">1 of 6 shown<' in by_name  # the hostile name, found as text
    shot = screenshot(out.as_uri(), tmp_path / "report.png")
    with Image.open(shot) as img:
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
    red = sum(n for n, (r, g, b) in colors if r > 180 and g < 80 and b < 80)
    # four thumbnails of 160 x 120 and one of 160 x 160 (most of the rest is grey or white)
    assert red > 4 * 160 * 120, "the red thumbnails are not on the screen"
