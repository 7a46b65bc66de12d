"""The dashboard's search box (issue 22, item 1) in headless Chromium against a real
`imgbatch serve`: opened with the printed token, it asks `GET /api/search` and lists the
hits (path, score, description, tags); a malformed query shows the server's one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.browser import Page
from tests.test_search import (
    gemini,  # noqa: F401 (the fake Gemini the fixture uses)
    photos,  # noqa: F401 (the fixture: four described photos)
)
from tests.test_serve import Server, serve  # noqa: F401 (the fixture)

HITS = "[...document.querySelectorAll('#s-hits li')]"


def submit(page: Page, root: Path | None, query: str, tag: str = "") -> None:
    """Type into the search form (the root only when given) and submit it."""
    fill = f"f.root.value = {json.dumps(str(root))};" if root is not None else ""
    page.evaluate(
        f"(() => {{ const f = document.getElementById('search'); {fill}"
        f" f.q.value = {json.dumps(query)}; f.tag.value = {json.dumps(tag)};"
        " f.requestSubmit(); })()"
    )


def test_the_search_box_lists_the_hits_of_a_query(
    photos: Path,  # noqa: F811
    serve: Callable[..., Server],  # noqa: F811
    tmp_path: Path,
) -> None:
    server = serve("--allow-root", photos.parent)  # the token made and printed at start
    with Page(server.url + f"#token={server.token}") as page:
        page.wait_for("!document.getElementById('no-runs').hidden")  # the API answered
        submit(page, photos, "beach")
        page.wait_for(f"{HITS}.length === 2")
        paths = page.evaluate(f"{HITS}.map(li => li.querySelector('.path').textContent)")
        assert sorted(Path(p).name for p in paths) == ["car.jpg", "dog.jpg"]
        assert all(Path(p).parent == photos for p in paths)
        assert page.evaluate("document.getElementById('s-count').textContent") == "(2 hits)"
        # each hit says its score, description and tags
        text = page.evaluate(f"{HITS}.map(li => li.textContent).join('|')")
        assert "A brown dog on the beach with a red ball." in text
        assert "A red car parked by the beach at sunset." in text
        assert "score " in text
        tags = page.evaluate(
            f"{HITS}.map(li => [...li.querySelectorAll('.tag')].map(t => t.textContent))"
        )
        assert sorted(tags) == [["car", "Beach", "sunset"], ["dog", "beach"]]
        # a filter narrows it; the form keeps the root typed before
        submit(page, None, "beach", tag="dog")
        page.wait_for(f"{HITS}.length === 1")
        assert page.evaluate("document.querySelector('#s-hits .path').textContent") == str(
            photos / "dog.jpg"
        )
        # the order is the CLI's: the receipt is found by its legible text
        submit(page, None, "march")
        page.wait_for("document.querySelector('#s-hits .path').textContent.endsWith('.png')")
        assert page.evaluate(f"{HITS}.length") == 1
        assert page.evaluate("document.querySelector('#s-hits .path').textContent") == str(
            photos / "docs" / "receipt.png"
        )
        # no hits, then a malformed query: the server's one line, and no list
        submit(page, None, "giraffe")
        page.wait_for("document.getElementById('s-count').textContent === '(no hits)'")
        assert page.evaluate(f"{HITS}.length") == 0
        submit(page, None, '"red car')
        error = page.wait_for("document.getElementById('s-error').textContent")
        assert "unterminated" in error and "\n" not in error
        page.screenshot(tmp_path / "search.png")
    # no token: the API refuses, and the box says why instead of listing anything
    with Page(server.url) as bare:
        bare.wait_for("document.getElementById('api-error').textContent")
        submit(bare, photos, "beach")
        error = bare.wait_for("document.getElementById('s-error').textContent")
        assert bare.evaluate(f"{HITS}.length") == 0
        assert error  # the 401's one line
