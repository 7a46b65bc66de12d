"""Configuration: precedence defaults < file < environment < flags, and clear errors."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from imgbatch.config import Settings, env_var, file_key, load_settings, state_dir
from imgbatch.errors import ConfigError
from tests.conftest import make_image, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_is_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[scan]\nbatch_size = 7\nhash_threads = 3\n")
    env = {"IMGBATCH_HASH_THREADS": "5", "IMGBATCH_INCLUDE_HIDDEN": "yes"}
    assert load_settings(None, {}, {}).batch_size == 100
    s = load_settings(cfg, {}, env)
    assert (s.batch_size, s.hash_threads, s.include_hidden) == (7, 5, True)
    s = load_settings(cfg, {"hash_threads": 1, "batch_size": None}, env)
    assert (s.batch_size, s.hash_threads) == (7, 1)


def test_the_user_config_dir_is_read_but_never_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    write(xdg / "imgbatch" / "config.toml", "[scan]\nbatch_size = 9\n")
    write(tmp_path / "cwd" / "config.toml", "[scan]\nbatch_size = 3\n")
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_settings(None, {}, {"XDG_CONFIG_HOME": str(xdg)}).batch_size == 9
    assert load_settings(None, {}, {"XDG_CONFIG_HOME": str(tmp_path / "none")}).batch_size == 100


def test_an_unknown_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[scan]\nbatchsize = 7\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown setting 'scan.batchsize'; did you mean "
        r"'scan.batch_size'\?",
    ):
        load_settings(cfg, {}, {})


def test_wrong_types_and_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        load_settings(write(tmp_path / "a.toml", '[scan]\nbatch_size = "many"\n'), {}, {})
    with pytest.raises(ConfigError, match="IMGBATCH_HASH"):
        load_settings(None, {}, {"IMGBATCH_HASH": "perhaps"})
    with pytest.raises(ConfigError, match="at least 1"):
        load_settings(None, {"batch_size": 0}, {})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", {}, {})


def test_api_keys_never_show_in_the_settings_repr(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", '[gemini]\napi_keys = ["test-key-FROMFILE"]\n')
    env = {"IMGBATCH_GEMINI_API_KEYS": "test-key-FROMENV1, test-key-FROMENV2"}
    from_env = load_settings(None, {}, env)
    from_file = load_settings(cfg, {}, {})
    assert from_env.gemini_api_keys == ("test-key-FROMENV1", "test-key-FROMENV2")  # still usable
    for settings in (from_env, from_file, from_env.replace(workers=2)):
        for text in (repr(settings), str(settings), f"{settings}", repr({"s": [settings]})):
            assert "test-key-" not in text
    assert "gemini_api_keys=('***', '***'), gemini_model=" in repr(from_env)
    assert "gemini_api_keys=()" in repr(Settings())  # no key: nothing to hide
    assert "workers=4" in repr(from_env)  # the rest is shown as it was


def test_the_shipped_config_toml_documents_every_setting_with_its_default() -> None:
    shipped = tomllib.loads((REPO / "config.toml").read_text())
    documented = {(s, k): v for s, table in shipped.items() for k, v in table.items()}
    # [storage] holds any KEY = VALUE pairs, [prices] a table per model (commented examples)
    free = {"storage_option", "prices"}
    for f in dataclasses.fields(Settings):
        if f.name in free:
            continue
        key = file_key(f.name)
        assert key in documented, f"config.toml lacks [{key[0]}] {key[1]}"
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert documented[key] == default, f"config.toml's default for {f.name} differs"
    assert len(documented) == len(dataclasses.fields(Settings)) - len(free)
    assert load_settings(REPO / "config.toml", {}, {}) == Settings()


def test_environment_variable_names() -> None:
    assert env_var("batch_size") == "IMGBATCH_BATCH_SIZE"


def test_state_lives_per_root_under_the_cache_dir(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "c")}
    a = state_dir("/data/photos", Settings(), env)
    b = state_dir("/other/photos", Settings(), env)
    assert a.parent == b.parent == tmp_path / "c" / "imgbatch" and a != b
    assert a.name.startswith("photos-")
    assert state_dir("/x", Settings(checkpoint=str(tmp_path / "s")), env) == tmp_path / "s"


def test_the_cli_reports_a_bad_config_file_with_exit_code_2(tmp_path: Path) -> None:
    make_image(tmp_path / "tree" / "a.jpg")
    cfg = write(tmp_path / "c.toml", "[scan]\nfollow_symlink = true\n")
    res = run_cli(["scan", "--config", cfg, tmp_path / "tree"])
    assert res.rc == 2 and res.stdout == b""
    assert "did you mean 'scan.follow_symlinks'?" in res.stderr


def test_the_cli_takes_settings_from_env_and_flags_over_the_file(tmp_path: Path) -> None:
    make_image(tmp_path / "tree" / "a.jpg")
    (tmp_path / "tree" / "b.txt").write_text("x")
    cfg = write(tmp_path / "c.toml", "[scan]\nall_files = true\n")
    assert len(run_cli(["scan", "--config", cfg, tmp_path / "tree"]).records) == 2
    env = {"IMGBATCH_ALL_FILES": "0"}
    assert len(run_cli(["scan", "--config", cfg, tmp_path / "tree"], env=env).records) == 1
    res = run_cli(["scan", "--config", cfg, "--all-files", tmp_path / "tree"], env=env)
    assert len(res.records) == 2


def test_the_cli_reads_the_user_config_dir_and_ignores_the_cwd(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    make_image(tmp_path / "tree" / "a.jpg")
    (tmp_path / "tree" / "b.txt").write_text("x")
    write(tmp_path / "cwd" / "config.toml", "[scan]\nall_files = true\n")
    base = [sys.executable, "-m", "imgbatch", "scan", str(tmp_path / "tree")]
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    cwd_run = subprocess.run(base, capture_output=True, cwd=tmp_path / "cwd", env=env, check=False)
    assert len(cwd_run.stdout.splitlines()) == 1  # the file in the cwd was not read
    write(tmp_path / "xdg" / "imgbatch" / "config.toml", "[scan]\nall_files = true\n")
    xdg_run = subprocess.run(base, capture_output=True, cwd=tmp_path / "cwd", env=env, check=False)
    assert len(xdg_run.stdout.splitlines()) == 2
