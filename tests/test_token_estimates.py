"""A dry run's token estimate is the provider's own rule (issue 21.4): OpenAI's image
tokens for `--provider openai`, Gemini's tiles for `gemini`, none for the offline
analyzer. Through the real CLI; the dry run sends nothing to the fake server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.providers.openai import image_tokens
from imgbatch.providers.prompt import DEFAULT_PROMPT
from tests.conftest import make_image, run_cli
from tests.fakeopenai import FakeOpenAI

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dialect="openai", keys={KEY}) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three 1600x1200 photos: uploaded at 768x576 (the default max side)."""
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"img{i}.jpg", size=(1600, 1200), color=(40 * i, 90, 150))
    return root


def dry_run(server: FakeOpenAI, root: Path, *args: str) -> list[int]:
    """`analyze --provider openai --dry-run`: each line's estimated tokens."""
    env = {"IMGBATCH_OPENAI_API_KEY": KEY, "IMGBATCH_OPENAI_BASE_URL": server.base_url}
    res = run_cli(["analyze", "--provider", "openai", "--dry-run", *args, str(root)], env=env)
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["would-send"] * 3
    assert server.requests == []  # a dry run sends nothing
    return [r["estimated_tokens"] for r in res.records]


def test_openai_dry_run_estimates_openais_image_tokens(server: FakeOpenAI, photos: Path) -> None:
    # GPT-4o, 768x576 at high (or unsent) detail: 2 x 2 tiles of 512 px, 170 each, plus
    # 85; Gemini's rule, used before for every provider, said 258 (one 768 px tile). Each
    # line adds the prompt's tokens (issue 23.3; the default model's rule: test_costs.py)
    assert image_tokens(768, 576, "") == 85 + 170 * 4
    gpt4o, prompt = ("--model", "gpt-4o"), len(DEFAULT_PROMPT) // 4
    assert dry_run(server, photos, *gpt4o) == [765 + prompt] * 3
    assert dry_run(server, photos, *gpt4o, "--detail", "high") == [765 + prompt] * 3
    assert dry_run(server, photos, *gpt4o, "--detail", "low") == [85 + prompt] * 3


def test_openai_rule_fits_2048_then_the_short_side_to_768() -> None:
    assert image_tokens(4096, 2048, "high") == 85 + 170 * 3 * 2  # -> 2048x1024 -> 1536x768
    assert image_tokens(512, 512, "high") == 85 + 170  # never upscaled
    assert image_tokens(4000, 3000, "low") == 85


def test_local_dry_run_estimates_no_tokens(photos: Path) -> None:
    res = run_cli(["analyze", "--provider", "local", "--dry-run", str(photos)])
    assert res.rc == 0, res.stderr
    assert [r["estimated_tokens"] for r in res.records] == [0] * 3
