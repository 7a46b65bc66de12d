"""The CLI's shape (issue 21): options that are settings come from `Settings` (help and
default from one place), every command takes --log-format, and cli.py stays thin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer.main

from imgbatch import cli
from imgbatch.config import PROVIDERS, Settings
from tests.conftest import run_cli

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
#: the options of every command that are not settings
SHARED = {"config", "verbose", "quiet", "log_format"}
#: analyze's options that are not settings: the run options and --wait
ANALYZE_RUN = {"limit", "fresh", "retry_failed", "wait", "dry_run", "emit_all", "batch"}
ANALYZE_RUN |= {"batch_wait", "from_list"}  # --from-list: a list instead of ROOT
#: analyze's options that set the setting of every provider that has it
PROVIDER = {"model", "base_url", "prompt", "prompt_file", "schema", "temperature"}
PROVIDER |= {"max_output_tokens", "media_resolution", "detail", "timeout"}
COMMANDS = ["scan", "analyze", "status", "runs", "export", "report", "serve", "prune"]


def options(command: str) -> dict[str, list[str]]:
    """The options of `command`: parameter name -> its flags."""
    group = typer.main.get_command(cli.app)
    assert hasattr(group, "commands")
    params = group.commands[command].params
    return {
        p.name: [*p.opts, *p.secondary_opts] for p in params if p.name and p.opts[0][:2] == "--"
    }


def expected_default(name: str) -> str:
    """How the help shows the Settings default of `name`."""
    value = FIELDS[name].default
    if isinstance(value, bool):
        return f"--{name.replace('_', '-')}" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    return value or "''"


@pytest.mark.parametrize("command", ["scan", "analyze"])
def test_every_setting_option_shows_its_settings_default(command: str) -> None:
    res = run_cli([command, "--help"], env={"COLUMNS": "1000", "TERM": "dumb"})
    assert res.rc == 0
    lines = res.stdout.decode().splitlines()
    checked = 0
    for name, flags in options(command).items():
        names = [name] if name in FIELDS else [f"{p}_{name}" for p in ("gemini", "openai")]
        names = [n for n in names if n in FIELDS]
        if name not in FIELDS and name not in PROVIDER:
            continue
        (line,) = [ln for ln in lines if f" {flags[0].split('/')[0]} " in ln]
        for field in names:
            shown = expected_default(field)
            if shown == "off":  # a switch off by default: its off flag is shown
                assert f"(default: {flags[-1]})" in line, line
            else:
                assert shown in line.split("(default: ", 1)[1], (field, line)
            checked += 1
    assert checked >= (10 if command == "scan" else 30)


def test_analyze_options_are_settings_or_a_short_documented_list() -> None:
    """A new setting needs no CLI code: every option of analyze is a setting, a provider
    option that sets the setting of every provider having it, or one of a few others."""
    for name in options("analyze"):
        if name in SHARED | ANALYZE_RUN:
            continue
        if name in PROVIDER:
            assert [p for p in PROVIDERS if f"{p}_{name}" in FIELDS]
            continue
        assert name in FIELDS, f"--{name} of analyze is neither a setting nor documented"
    assert set(options("scan")) - SHARED - {"from_list"} <= set(FIELDS)


def test_the_provider_option_mapping_is_shared_with_serve() -> None:
    from imgbatch.web.runs import api_options

    assert api_options({"provider": "openai", "model": "m", "workers": 2}) == {
        "gemini_model": "m",
        "openai_model": "m",
        "ollama_model": "m",
        "anthropic_model": "m",
        "workers": 2,
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_log_format_json(command: str, tmp_path: Path) -> None:
    # each fails in its own code (a missing ROOT, a missing config file): JSON lines
    args = {
        "scan": [str(tmp_path / "missing")],
        "analyze": [str(tmp_path / "missing")],
        "serve": ["--config", str(tmp_path / "missing.toml")],
    }.get(command, [])
    res = run_cli([command, "--log-format", "json", *args])
    assert res.rc == 2, res.stderr
    logged = [json.loads(line) for line in res.stderr.splitlines()]  # every line JSON
    assert logged[-1]["level"] == "error" and logged[-1]["message"].startswith("error: ")


def test_cli_py_is_thin() -> None:
    assert len(Path(cli.__file__).read_text().splitlines()) <= 400
