"""Costs before and after (issue 23.3): a dry run's tokens by each provider's own image
rule plus the prompt, and its price live and at batch price; a run's spent tokens and
estimated cost in its summary, `status` (and `--json`) and `runs`, a Batch API answer's
at half price. Through the real CLI in a subprocess and the real SDKs against the fake
servers; the expected figures are worked out here from the providers' documented rules
and the price table's published prices, not by calling imgbatch."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.providers.prompt import DEFAULT_JSON_SCHEMA, DEFAULT_PROMPT
from tests.conftest import CliResult, make_image, run_cli
from tests.fakeanthropic import FakeAnthropic
from tests.fakegemini import FakeGemini
from tests.fakeopenai import FakeOpenAI

OPENAI_KEY = "sk-test-SECRET-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-SECRET-0123456789abcdef"
GEMINI_KEY = "test-key-COSTS-0123456789"
#: every request's prompt, at 4 characters a token (the providers' estimate)
PROMPT = len(DEFAULT_PROMPT) // 4
#: each provider's default cap on answer tokens: a dry run's output bound per image
MAX_OUTPUT = 1024
#: published prices, dollars per million (input, output) tokens, of the default models
GPT_41_MINI = (0.40, 1.60)
CLAUDE_HAIKU_45 = (1.00, 5.00)
GEMINI_25_FLASH_LITE = (0.10, 0.40)
GPT_4O = (2.50, 10.00)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three 1600x1200 photos: uploaded at 768x576 (the default max side of 768)."""
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"img{i}.jpg", size=(1600, 1200), color=(40 * i, 90, 150))
    return root


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dialect="openai", keys={OPENAI_KEY}) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(keys={ANTHROPIC_KEY}) as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def gemini_server() -> Iterator[FakeGemini]:
    with FakeGemini(keys={GEMINI_KEY}, seed=5) as fake:
        yield fake
        assert fake.errors == []


def openai_env(server: FakeOpenAI) -> dict[str, str]:
    return {
        "IMGBATCH_OPENAI_API_KEY": OPENAI_KEY,
        "IMGBATCH_OPENAI_BASE_URL": server.base_url,
        "IMGBATCH_RPM": "6000",
    }


def openai(server: FakeOpenAI, *args: str | Path, env: dict[str, str] | None = None) -> CliResult:
    """`imgbatch analyze --provider openai ARGS` against the fake."""
    return run_cli(
        ["analyze", "--provider", "openai", *args], env={**openai_env(server), **(env or {})}
    )


def dollars(stderr: str, label: str) -> float:
    """The amount before `label` in the dry run's cost line (e.g. "live")."""
    match = re.search(r"\$([0-9.,]+) " + re.escape(label), stderr)
    assert match, f"no amount {label!r} in {stderr!r}"
    return float(match.group(1).replace(",", ""))


def runs_cost(root: Path) -> str:
    """The cost column of `imgbatch runs`' latest run."""
    header, latest = run_cli(["runs", root]).stdout.decode().splitlines()[:2]
    start = header.index("tokens") + len("tokens")  # right-aligned under "cost"
    end = header.index("cost") + len("cost")
    return latest[start:end].strip()


def cost(tokens_in: int, tokens_out: int, price: tuple[float, float]) -> float:
    return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000


def check_dry_run(res: CliResult, per_image: int, price: tuple[float, float]) -> None:
    """Three would-send lines of `per_image` tokens, and the summary's tokens and dollars
    (three significant digits are shown: within 1%)."""
    assert res.rc == 0, res.stderr
    assert [r["estimated_tokens"] for r in res.records] == [per_image] * 3
    tokens_in, tokens_out = 3 * per_image, 3 * MAX_OUTPUT
    assert f"about {tokens_in:,} input tokens" in res.stderr
    assert f"at most {tokens_out:,} output tokens" in res.stderr
    live = cost(tokens_in, tokens_out, price)
    assert dollars(res.stderr, "live") == pytest.approx(live, rel=0.01)
    assert dollars(res.stderr, "at the Batch API price") == pytest.approx(live / 2, rel=0.01)
    assert dollars(res.stderr, "at the Batch API price") > 0


# -- dry runs: each provider's image rule, the prompt, the price ----------------------


def test_openai_default_model_dry_run_counts_32px_patches(
    openai_server: FakeOpenAI, photos: Path
) -> None:
    # gpt-4.1-mini: ceil(768/32) x ceil(576/32) = 24 x 18 = 432 patches (under the cap of
    # 1536), times its multiplier 1.62 = 699.84, rounded up to 700
    res = openai(openai_server, "--dry-run", photos)
    check_dry_run(res, 700 + PROMPT, GPT_41_MINI)
    assert "gpt-4.1-mini" in res.stderr and "built-in" in res.stderr
    assert openai_server.requests == []  # a dry run sends nothing


def test_openai_gpt4o_dry_run_counts_512px_tiles(openai_server: FakeOpenAI, photos: Path) -> None:
    # GPT-4o: 768x576 (within 2048, its short side under 768) is 2 x 2 tiles of 512 px,
    # 170 tokens each, plus 85; at low detail 85 alone
    check_dry_run(
        openai(openai_server, "--dry-run", "--model", "gpt-4o", photos),
        85 + 4 * 170 + PROMPT,
        GPT_4O,
    )
    low = openai(openai_server, "--dry-run", "--model", "gpt-4o", "--detail", "low", photos)
    check_dry_run(low, 85 + PROMPT, GPT_4O)


def test_openai_patch_rule_shrinks_a_large_upload_to_1536_patches(
    openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    # OpenAI's own example: 1800x2400 is 57 x 75 = 4275 patches, over 1536: shrunk by
    # sqrt(1536 * 32^2 / (1800 * 2400)) = 0.603, then so that 1086 px / 32 = 33.94 becomes
    # 33 whole patches (x 0.972): 1056 x 1408, 33 x 44 = 1452 patches; x 1.62 = 2352.24
    root = tmp_path / "big"
    make_image(root / "tall.png", size=(1800, 2400))
    res = openai(openai_server, "--dry-run", "--max-side", "2400", root)
    assert res.rc == 0, res.stderr
    assert [r["estimated_tokens"] for r in res.records] == [2353 + PROMPT]


def test_anthropic_dry_run_is_width_times_height_over_750(
    anthropic_server: FakeAnthropic, photos: Path
) -> None:
    # 768 x 576 / 750 = 589.8 -> 590; the tool's input schema is sent with every prompt
    prompt = (len(DEFAULT_PROMPT) + len(json.dumps(DEFAULT_JSON_SCHEMA))) // 4
    env = {
        "IMGBATCH_ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "IMGBATCH_ANTHROPIC_BASE_URL": anthropic_server.url,
    }
    res = run_cli(["analyze", "--provider", "anthropic", "--dry-run", photos], env=env)
    check_dry_run(res, 590 + prompt, CLAUDE_HAIKU_45)
    assert "claude-haiku-4-5" in res.stderr
    assert anthropic_server.requests == []


def test_gemini_dry_run_is_258_per_768px_tile(gemini_server: FakeGemini, photos: Path) -> None:
    # 768x576 fits one 768 px tile: 258 tokens; media resolution low: 64
    env = {"GEMINI_API_KEY": GEMINI_KEY, "IMGBATCH_GEMINI_BASE_URL": gemini_server.url}
    res = run_cli(["analyze", "--provider", "gemini", "--dry-run", photos], env=env)
    check_dry_run(res, 258 + PROMPT, GEMINI_25_FLASH_LITE)
    args = ["analyze", "--provider", "gemini", "--dry-run", "--media-resolution", "low", photos]
    check_dry_run(run_cli(args, env=env), 64 + PROMPT, GEMINI_25_FLASH_LITE)
    assert gemini_server.requests == []


def test_the_offline_analyzer_costs_nothing_and_says_no_price(photos: Path) -> None:
    res = run_cli(["analyze", "--provider", "local", "--dry-run", photos])
    assert res.rc == 0, res.stderr
    assert [r["estimated_tokens"] for r in res.records] == [0] * 3
    assert "estimated cost" not in res.stderr


# -- prices from the config, and none for an unknown model ----------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_config_prices_override_the_table_and_zero_is_a_price(
    openai_server: FakeOpenAI, photos: Path, tmp_path: Path
) -> None:
    per_image = 700 + PROMPT
    free = write_config(tmp_path, '[prices."gpt-4.1-mini"]\ninput = 0\noutput = 0\n')
    res = openai(openai_server, "--config", free, "--dry-run", photos)
    assert res.rc == 0, res.stderr
    assert "up to $0 live, $0 at the Batch API price" in res.stderr
    assert "$0 in, $0 out per million tokens, config)" in res.stderr

    # a dated snapshot's name is the model's (the longest known prefix); input only here
    dear = write_config(tmp_path, '[prices."gpt-4.1-mini"]\ninput = 100\noutput = 0.0\n')
    res = openai(
        openai_server, "--config", dear, "--dry-run", "--model", "gpt-4.1-mini-2025-04-14", photos
    )
    assert res.rc == 0, res.stderr
    assert dollars(res.stderr, "live") == pytest.approx(3 * per_image * 100 / 1e6, rel=0.01)

    # the environment's form, over the file's
    env = {"IMGBATCH_PRICES": "gpt-4.1-mini=2/0"}
    res = openai(openai_server, "--config", dear, "--dry-run", photos, env=env)
    assert dollars(res.stderr, "live") == pytest.approx(3 * per_image * 2 / 1e6, rel=0.01)


@pytest.mark.parametrize(
    "text",
    [
        '[prices."m"]\ninput = -1\noutput = 0\n',
        '[prices."m"]\ninput = 1\n',
        '[prices."m"]\ninput = "cheap"\noutput = 1\n',
        '[prices."m"]\ninput = 1\noutput = 1\ncached = 0.5\n',
    ],
)
def test_a_bad_price_is_a_usage_error_of_one_line(
    openai_server: FakeOpenAI, photos: Path, tmp_path: Path, text: str
) -> None:
    res = openai(openai_server, "--config", write_config(tmp_path, text), "--dry-run", photos)
    assert res.rc == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "[prices.'m']" in res.stderr
    assert res.records == []


def test_an_unknown_model_has_an_unknown_cost_never_a_guess(
    openai_server: FakeOpenAI, photos: Path
) -> None:
    # a local server's model: no price in the table (GPT-4o's image rule estimates it)
    dry = openai(openai_server, "--dry-run", "--model", "llava-13b", photos)
    assert dry.rc == 0, dry.stderr
    assert "estimated cost: unknown, for about" in dry.stderr and "$" not in dry.stderr
    assert '[prices."llava-13b"]' in dry.stderr  # how to give it one

    res = openai(openai_server, "--model", "llava-13b", photos)
    assert res.rc == 0, res.stderr
    assert "estimated cost unknown" in res.stderr
    status = json.loads(run_cli(["status", photos, "--json"]).stdout)
    assert status["tokens"]["input"] > 0 and status["cost_usd"] is None
    assert status["price"] is None
    assert runs_cost(photos) == "unknown"


# -- after a run: the summary, status and runs ----------------------------------------


def spent(records: list[dict[str, object]]) -> tuple[int, int]:
    """The tokens the records say were spent (stored results cost nothing)."""
    fresh = [r for r in records if not r["cached"]]
    tokens_in = sum(int(str(r["input_tokens"])) for r in fresh)
    tokens_out = sum(int(str(r["output_tokens"])) for r in fresh)
    assert tokens_in > 0 and tokens_out > 0  # the fake reports usage
    return tokens_in, tokens_out


def test_a_run_shows_spent_tokens_and_their_cost(openai_server: FakeOpenAI, photos: Path) -> None:
    make_image(photos / "copy.jpg", size=(1600, 1200), color=(0, 90, 150))  # = img0.jpg
    res = openai(openai_server, photos)
    assert res.rc == 0, res.stderr
    assert len(res.records) == 4 and len(openai_server.requests) == 3
    tokens_in, tokens_out = spent(res.records)
    expected = cost(tokens_in, tokens_out, GPT_41_MINI)
    match = re.search(
        r"tokens: ([0-9,]+) in, ([0-9,]+) out; estimated cost \$([0-9.]+)", res.stderr
    )
    assert match, res.stderr
    assert match.group(1, 2) == (f"{tokens_in:,}", f"{tokens_out:,}")
    assert float(match.group(3)) == pytest.approx(expected, rel=0.01)

    status = json.loads(run_cli(["status", photos, "--json"]).stdout)
    assert status["tokens"] == {"input": tokens_in, "output": tokens_out}
    assert status["cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert status["price"] == {"input": 0.4, "output": 1.6, "source": status["price"]["source"]}
    text = run_cli(["status", photos]).stdout.decode()
    shown = re.search(r"estimated cost \$([0-9.]+)", text)
    assert shown and float(shown.group(1)) == pytest.approx(expected, rel=0.01)

    assert float(runs_cost(photos).lstrip("$")) == pytest.approx(expected, rel=0.01)

    # a run that sends nothing costs nothing
    again = openai(openai_server, photos)
    assert again.rc == 0 and again.records == []
    assert json.loads(run_cli(["status", photos, "--json"]).stdout)["cost_usd"] == 0


def test_batch_answers_cost_half(gemini_server: FakeGemini, photos: Path) -> None:
    env = {
        "GEMINI_API_KEY": GEMINI_KEY,
        "IMGBATCH_GEMINI_BASE_URL": gemini_server.url,
        "IMGBATCH_BATCH_POLL": "0.05",
    }
    res = run_cli(["analyze", "--batch", "--batch-wait", photos], env=env)
    assert res.rc == 0, res.stderr
    assert len(res.records) == 3 and all(r["batch"] for r in res.records)
    tokens_in, tokens_out = spent(res.records)
    half = cost(tokens_in, tokens_out, GEMINI_25_FLASH_LITE) / 2
    status = json.loads(run_cli(["status", photos, "--json"]).stdout)
    assert status["mode"] == "batch"
    assert status["tokens"] == {"input": tokens_in, "output": tokens_out}
    assert status["cost_usd"] == pytest.approx(half, rel=1e-9)
    text = run_cli(["status", photos]).stdout.decode()
    assert "(batch answers at half price)" in text
    shown = re.search(r"estimated cost \$([0-9.]+)", text)
    assert shown and float(shown.group(1)) == pytest.approx(half, rel=0.01)
    assert math.isclose(float(runs_cost(photos).lstrip("$")), half, rel_tol=0.01)


def test_anthropic_and_gemini_runs_cost_their_models_price(
    anthropic_server: FakeAnthropic, gemini_server: FakeGemini, photos: Path, tmp_path: Path
) -> None:
    runs = [
        (
            "anthropic",
            {
                "IMGBATCH_ANTHROPIC_API_KEY": ANTHROPIC_KEY,
                "IMGBATCH_ANTHROPIC_BASE_URL": anthropic_server.url,
            },
            CLAUDE_HAIKU_45,
        ),
        (
            "gemini",
            {"GEMINI_API_KEY": GEMINI_KEY, "IMGBATCH_GEMINI_BASE_URL": gemini_server.url},
            GEMINI_25_FLASH_LITE,
        ),
    ]
    for provider, env, price in runs:
        state = tmp_path / f"state-{provider}"
        args = ["analyze", "--provider", provider, "--checkpoint", state, "--rpm", "6000", photos]
        res = run_cli(args, env=env)
        assert res.rc == 0, res.stderr
        tokens_in, tokens_out = spent(res.records)
        status = json.loads(run_cli(["status", photos, "--checkpoint", state, "--json"]).stdout)
        assert status["provider"] == provider
        assert status["tokens"] == {"input": tokens_in, "output": tokens_out}
        assert status["cost_usd"] == pytest.approx(cost(tokens_in, tokens_out, price), rel=1e-9)
