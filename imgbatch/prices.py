"""What tokens cost: the built-in price table of the remote models (dollars per million
tokens, dated, its sources named), config overrides, and the cost of a run's tokens.

A model is looked up by its name alone, whatever the server (a proxy or another server
of the same model costs what the table says, unless the config says otherwise): the
longest name of the table that is the model's name or a prefix of it ending before a
"-", "@" or ":" (`gpt-4.1-mini-2025-04-14` is `gpt-4.1-mini`; `gpt-5.4` is not `gpt-5`).
An unknown model has no price: its cost is unknown (None), never a guess. Imports nothing
of ours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: when the built-in prices were copied from the providers' pricing pages (SOURCES)
TABLE_DATE = "2026-12-07"
SOURCES = {
    "gemini": "https://ai.google.dev/gemini-api/docs/pricing",
    "openai": "https://platform.openai.com/docs/pricing",
    "anthropic": "https://docs.claude.com/en/docs/about-claude/pricing",
}
#: the Batch APIs of all three charge half the live price
BATCH_FACTOR = 0.5

#: model name -> (input, output) dollars per million tokens, standard (live) tier, for
#: prompts under 200k tokens (an image request is far below); text and image input alike
BUILTIN: dict[str, tuple[float, float]] = {
    # Google Gemini API (paid tier)
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-3-pro-preview": (2.00, 12.00),
    "gemini-3.1-pro-preview": (2.00, 12.00),
    "gemini-3.5-flash": (1.50, 9.00),
    # OpenAI
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5.4": (2.50, 15.00),
    "gpt-5.4-mini": (0.75, 4.50),
    "gpt-5.4-nano": (0.20, 1.25),
    "gpt-5.5": (5.00, 30.00),
    # Anthropic
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-haiku": (0.25, 1.25),
    "claude-sonnet-4": (3.00, 15.00),  # every Sonnet 4.x: 4, 4.5, 4.6
    "claude-opus-4-1": (15.00, 75.00),
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4-7": (5.00, 25.00),
}


@dataclass(frozen=True)
class Price:
    """A model's price: dollars per million input and output tokens, and where it came
    from ("built-in 2026-12-07", "config", "offline")."""

    input: float
    output: float
    source: str

    def cost(self, input_tokens: int, output_tokens: int, batch: bool = False) -> float:
        """Dollars for these tokens, live or at the Batch API's price."""
        live = (input_tokens * self.input + output_tokens * self.output) / 1_000_000
        return live * BATCH_FACTOR if batch else live

    def as_dict(self) -> dict[str, float | str]:
        """The plain form a run record keeps."""
        return {"input": self.input, "output": self.output, "source": self.source}


#: the offline analyzer sends nothing: it costs nothing
FREE = Price(0.0, 0.0, "offline")


def longest_match(model: str, names: Iterable[str]) -> str | None:
    """The longest name of `names` that `model` is, or starts with before a "-", "@" or
    ":" (the rule of the module docstring; also the providers' token rules')."""
    best: str | None = None
    for name in names:
        if model == name or (
            model.startswith(name) and model[len(name)] in "-@:" and len(name) > len(best or "")
        ):
            if model == name:
                return name
            best = name
    return best


def lookup(model: str, overrides: Mapping[str, tuple[float, float]] | None = None) -> Price | None:
    """The price of `model`: the config's (`[prices."MODEL"]`) before the built-in table,
    each by the rule of the module docstring; None when neither knows it. A path before
    the name (`models/gemini-2.5-flash`, a router's `openai/gpt-4o`) is left out."""
    name = model.rsplit("/", 1)[-1]
    for table, source in ((overrides or {}, "config"), (BUILTIN, f"built-in {TABLE_DATE}")):
        found = longest_match(name, table)
        if found is not None:
            return Price(*table[found], source)
    return None


def dollars(amount: float | None) -> str:
    """An amount for people: cents above a dollar, else three significant digits, so a
    few images' cost never shows as $0.00; "unknown" for None."""
    if amount is None:
        return "unknown"
    if amount == 0:
        return "$0"
    if amount >= 1:
        return f"${amount:,.2f}"
    decimals = max(2, 2 - math.floor(math.log10(amount)))
    return f"${amount:.{decimals}f}"
