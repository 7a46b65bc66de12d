"""`imgbatch search ROOT red -car`: a shell word starting with "-" that is no option of
`search` is a query word (an exclusion), wherever it stands among the options."""

from __future__ import annotations

from pathlib import Path

from tests.test_search import found, gemini, photos, search  # noqa: F401 (fixtures)


def test_an_exclusion_needs_no_double_dash(photos: Path) -> None:  # noqa: F811
    assert found(search(photos, "red", "-car")) == ["dog.jpg"]
    assert found(search(photos, "-car", "red")) == ["dog.jpg"]
    assert found(search(photos, "beach", '-"red car"')) == ["dog.jpg"]


def test_options_mixed_with_words_keep_their_meaning(photos: Path) -> None:  # noqa: F811
    res = search(photos, "red", "--format", "paths", "-car", "--limit=5")
    assert res.rc == 0, res.stderr
    assert [Path(p).name for p in res.stdout.decode().split()] == ["dog.jpg"]
    res = search(photos, "-0", "red", "--format", "paths", "-car")
    assert res.rc == 0, res.stderr
    assert res.stdout.endswith(b"\0") and Path(res.stdout[:-1].decode()).name == "dog.jpg"
