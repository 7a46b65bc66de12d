"""The results store is true to its server: a result of one OpenAI-compatible server is
never served for another's model of the same name. The real CLI against two fake
llama.cpp servers (each serves whatever model name it is asked for); OpenAI's own API,
Ollama and Gemini keep the fingerprints they had, so their stored results stay valid."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbatch.config import Settings
from imgbatch.providers.base import endpoint_identity, fingerprint_id
from imgbatch.providers.gemini import GeminiProvider
from imgbatch.providers.openai import OllamaProvider, OpenAIProvider
from tests.conftest import CliResult, make_image, run_cli
from tests.fakeopenai import FakeOpenAI

MODEL = "gpt-4.1-mini"  # what a llama.cpp server answers to, whatever it runs


@pytest.fixture
def servers() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI(dialect="llamacpp") as a, FakeOpenAI(dialect="llamacpp") as b:
        yield a, b
        assert a.errors == [] and b.errors == []


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"img{i}.jpg", size=(64 + i, 48), color=(40 * i, 90, 150))
    return root


def analyze(root: Path, base_url: str, state: Path, results: Path) -> CliResult:
    env = {
        "IMGBATCH_RESULTS": str(results),
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "0",
    }
    args = ["analyze", "--provider", "openai", "--model", MODEL, "--base-url", base_url]
    return run_cli([*args, "--checkpoint", str(state), root], env=env)


def answered(server: FakeOpenAI) -> int:
    """Requests answered with a result (llama.cpp first refuses the json_schema form)."""
    return server.count_by_status().get(200, 0)


def fp(provider: OpenAIProvider | GeminiProvider) -> str:
    """The fingerprint id a run records (as pipeline.stages computes it)."""
    return fingerprint_id({"provider": provider.name, **provider.fingerprint()})


def test_the_same_root_against_another_server_is_analysed_afresh_there(
    servers: tuple[FakeOpenAI, FakeOpenAI], photos: Path, tmp_path: Path
) -> None:
    a, b = servers
    state, results = tmp_path / "state", tmp_path / "results"
    first = analyze(photos, a.base_url, state, results)
    assert first.rc == 0, first.stderr
    assert [r["cached"] for r in first.records] == [False] * 4 and answered(a) == 4

    other = analyze(photos, b.base_url, state, results)
    assert other.rc == 0, other.stderr
    assert answered(b) == 4  # B's own answers, not A's stored ones
    assert [(r["status"], r["cached"]) for r in other.records] == [("ok", False)] * 4

    back = analyze(photos, a.base_url, state, results)
    assert back.rc == 0, back.stderr
    assert back.records == [] and answered(a) == 4  # A's results are still A's

    elsewhere = analyze(photos, a.base_url, tmp_path / "state2", results)
    assert elsewhere.rc == 0, elsewhere.stderr
    assert [r["cached"] for r in elsewhere.records] == [True] * 4  # from the store
    assert answered(a) == 4 and answered(b) == 4

    # the identity is a hash: no URL of either server is kept in clear
    read = 0
    for folder in (state, results):
        for path in folder.rglob("*"):
            if path.is_file():
                read += 1
                data = path.read_bytes()
                for server in (a, b):
                    assert server.base_url.encode() not in data, path
                    assert server.url.removeprefix("http://").encode() not in data, path
    assert read > 2  # a checkpoint and a results store were read


def test_a_pool_of_endpoints_shares_one_identity_whatever_their_order(
    servers: tuple[FakeOpenAI, FakeOpenAI], photos: Path, tmp_path: Path
) -> None:
    a, b = servers
    results = tmp_path / "results"
    first = analyze(photos, f"{a.base_url},{b.base_url}", tmp_path / "s1", results)
    assert first.rc == 0, first.stderr
    sent = answered(a) + answered(b)
    assert sent == 4
    again = analyze(photos, f"{b.base_url}/,{a.base_url}", tmp_path / "s2", results)
    assert again.rc == 0, again.stderr
    assert [r["cached"] for r in again.records] == [True] * 4
    assert answered(a) + answered(b) == sent
    # one of the pool alone is another server set: analysed afresh
    alone = analyze(photos, a.base_url, tmp_path / "s3", results)
    assert [r["cached"] for r in alone.records] == [False] * 4


def test_the_identity_is_scheme_host_port_and_path_not_the_query() -> None:
    same = endpoint_identity(["http://h:80/v1"])
    assert endpoint_identity(["http://H/v1/?key=a"]) == same  # default port, no query
    assert endpoint_identity(["http://h:8080/v1"]) != same
    assert endpoint_identity(["https://h:80/v1"]) != same
    assert endpoint_identity(["http://h:80/token/x/v1"]) != same
    assert endpoint_identity(["http://g:80/v1"]) != same
    pool = endpoint_identity(["http://a/v1", "http://b/v1"])
    assert endpoint_identity(["http://b/v1", "http://a/v1"]) == pool


def test_openai_ollama_and_gemini_keep_their_fingerprints() -> None:
    """The ids these settings had before endpoints were told apart (computed on that
    code): their stored results stay valid. Another server's results do not."""
    official = Settings(provider="openai", openai_api_key="k")
    assert fp(OpenAIProvider(official, env={})) == "c2d8515bb945219b"
    slash = official.replace(openai_base_url=("https://api.openai.com/v1/",))
    assert fp(OpenAIProvider(slash, env={})) == "c2d8515bb945219b"
    ollama = Settings(provider="ollama", ollama_model="gemma3")
    assert fp(OllamaProvider(ollama, env={})) == "eb8cf3e32d29d786"
    assert fp(OllamaProvider(ollama, env={"OLLAMA_HOST": "10.0.0.9:1234"})) == "eb8cf3e32d29d786"
    gemini = Settings(provider="gemini", gemini_api_keys=("k",))
    assert fp(GeminiProvider(gemini, env={})) == "639758e94dce4047"
    moved = gemini.replace(gemini_base_url="http://127.0.0.1:9/x")
    assert fp(GeminiProvider(moved, env={})) == "639758e94dce4047"
    local = Settings(provider="openai", openai_base_url=("http://127.0.0.1:8080/v1",))
    assert fp(OpenAIProvider(local, env={})) != "c2d8515bb945219b"


def test_runs_record_a_fingerprint_per_server(
    servers: tuple[FakeOpenAI, FakeOpenAI], photos: Path, tmp_path: Path
) -> None:
    a, b = servers
    state = tmp_path / "state"
    for server in (a, b):
        assert analyze(photos, server.base_url, state, tmp_path / "r").rc == 0
    history = run_cli(["runs", "--json", "--checkpoint", state]).records
    assert len({run["fingerprint"] for run in history}) == 2
    assert os.fsencode(a.base_url) not in json.dumps(history).encode()
