"""Secrets stay secret, and every answer kept is strict JSON. Through the real CLI in a
subprocess, against the fake OpenAI-compatible and Gemini servers:

- a `--base-url` carrying a credential in its path (`/token/SECRET/v1`) or its query
  (`?key=SECRET`) reaches the server, but never stdout, stderr, `status`, `runs` or any
  file of the state folder or the results store, on the happy path and on error paths
  (connection refused, the 404 of a wrong path, a URL of another scheme);
- the workers of a Dask LocalCluster inherit no API key from the environment;
- an answer holding NaN or Infinity (or a number out of range) is an AI_ERROR, retried,
  from both providers, and every line written parses with a strict JSON parser; Gemini's
  answers are checked against the schema as OpenAI's are.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini
from tests.fakeopenai import FakeOpenAI, RecordedRequest

PATH_SECRET = "PathSECRET-7f3a9c1e5b"
QUERY_SECRET = "QuerySECRET-2d8e4b6a0c"
KEY = "sk-test-KeySECRET-0123456789"
GEMINI_KEY = "test-key-GeminiSECRET-0123456789"
SECRETS = (PATH_SECRET, QUERY_SECRET, KEY, GEMINI_KEY)
FIELDS = {"description", "tags", "objects", "colors", "mood", "text"}


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(4):
        make_image(root / f"img{i}.jpg", size=(64 + i, 48), color=(40 * i, 90, 150))
    return root


@pytest.fixture
def proxy() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible server behind a path that holds a credential."""
    with FakeOpenAI(dialect="openai", keys={KEY}, prefix=f"/token/{PATH_SECRET}") as fake:
        yield fake
        assert fake.errors == []


def secret_url(server: FakeOpenAI) -> str:
    return f"{server.base_url}?key={QUERY_SECRET}"


def openai_run(
    root: Path, base_url: str, *args: str | Path, env: dict[str, str] | None = None
) -> CliResult:
    full_env = {
        "IMGBATCH_OPENAI_API_KEY": KEY,
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "0",
        **(env or {}),
    }
    args = ("--provider", "openai", "--base-url", base_url, "--verbose", *args)
    return run_cli(["analyze", *args, root], env=full_env)


def assert_nowhere(*outputs: CliResult) -> None:
    """No secret in these outputs, nor in any file under the cache dir (every state
    folder and the results store)."""
    for res in outputs:
        for secret in SECRETS:
            assert secret.encode() not in res.stdout, secret
            assert secret not in res.stderr, (secret, res.stderr)
    cache = Path(os.environ["XDG_CACHE_HOME"])
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files  # a state folder was written
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, (secret, path)


def reports(root: Path) -> list[CliResult]:
    """What `status` and `runs` (text and JSON) say of ROOT."""
    out = [
        run_cli(["status", root]),
        run_cli(["status", "--json", root]),
        run_cli(["runs", root]),
        run_cli(["runs", "--json", root]),
    ]
    assert all(r.rc in (0, 1) for r in out), [r.stderr for r in out]
    return out


def strict_lines(res: CliResult) -> list[dict[str, Any]]:
    """stdout as JSON Lines, read as a strict parser reads them (no NaN, no Infinity)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a line written")

    text = res.stdout.decode("utf-8", errors="strict")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


# -- credentials in base URLs ----------------------------------------------------------


def test_a_credential_in_the_base_url_reaches_the_server_and_nothing_else(
    proxy: FakeOpenAI, photos: Path
) -> None:
    res = openai_run(photos, secret_url(proxy))
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["ok"] * 4
    # the credentials did their work: sent with every request
    sent = proxy.requests[-1]
    assert sent.path == f"/token/{PATH_SECRET}/v1/chat/completions?key={QUERY_SECRET}"
    assert sent.api_key == KEY
    first_reports = reports(photos)
    prefix = f"/token/{PATH_SECRET}"
    with (
        FakeOpenAI(dialect="openai", keys={KEY}, prefix=prefix) as a,
        FakeOpenAI(dialect="openai", keys={KEY}, prefix=prefix) as b,
    ):
        # two endpoints, failing: the error records name which (scheme, host, port)
        a.fail_next(1000, 500)
        b.fail_next(1000, 500)
        urls = f"{secret_url(a)},{secret_url(b)}"
        failed = openai_run(photos, urls, "--fresh", "--max-attempts", "2", "--workers", "1")
        named = (a.url, b.url)
    assert failed.rc == 1, failed.stderr
    records = failed.records
    assert {r["error"]["code"] for r in records} == {"AI_ERROR"}
    assert any(url in r["error"]["message"] for r in records for url in named)
    assert_nowhere(res, failed, *first_reports, *reports(photos))


def test_a_server_that_cannot_be_reached_is_named_without_its_credentials(
    photos: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/token/{PATH_SECRET}/v1?key={QUERY_SECRET}"
    res = openai_run(photos, url)
    assert res.rc == 5 and res.records == []
    assert f"cannot reach http://127.0.0.1:{port}: is the server running?" in res.stderr
    assert_nowhere(res, *reports(photos))


def test_a_wrong_path_is_a_hint_without_the_path(proxy: FakeOpenAI, photos: Path) -> None:
    """The server's 404 echoes the path it was asked for (the openai dialect does):
    the credential in it is scrubbed, and the hint needs no path."""
    wrong = f"{proxy.url}/token/{PATH_SECRET}/v2?key={QUERY_SECRET}"
    res = openai_run(photos, wrong)
    assert res.rc == 2 and res.records == []
    assert proxy.requests and PATH_SECRET in proxy.requests[0].path  # it was echoed...
    assert "it usually ends in /v1" in res.stderr and proxy.url in res.stderr
    assert "Invalid URL" in res.stderr  # ...and shown, scrubbed
    assert_nowhere(res, *reports(photos))


def test_a_base_url_of_another_scheme_is_refused_without_showing_it(photos: Path) -> None:
    res = openai_run(photos, f"ftp://example.invalid/token/{PATH_SECRET}?key={QUERY_SECRET}")
    assert res.rc == 2 and "must be http:// or https:// URLs, not a ftp:// URL" in res.stderr
    for secret in SECRETS:
        assert secret not in res.stderr


# -- Dask workers ------------------------------------------------------------------------

#: a Dask preload (given through the DASK_ environment): what a LocalCluster worker
#: sees of the variables below, in os.environ and in the environment it was started with
#: (/proc/self/environ), at its start and in each analysis task. The first task kills its
#: worker, so that the nanny starts another one (which inherits the driver's environment
#: as it is then).
SPY = """
import json, os

WATCHED = {watched!r}
OUT, MARK = {out!r}, {mark!r}


def seen(phase):
    with open("/proc/self/environ", "rb") as fh:
        initial = [e.split(b"=", 1)[0].decode() for e in fh.read().split(b"\\0") if e]
    entry = {{
        "phase": phase,
        "pid": os.getpid(),
        "environ": sorted(n for n in os.environ if n in WATCHED),
        "initial": sorted(n for n in initial if n in WATCHED),
    }}
    with open(OUT, "a") as fh:
        fh.write(json.dumps(entry) + "\\n")


def dask_setup(worker):
    seen("start")
    import imgbatch.pipeline.analyzer as analyzer

    analyse = analyzer.analyse_file

    def spied(*args, **kwargs):
        seen("task")
        if not os.path.exists(MARK):
            open(MARK, "w").close()
            os._exit(1)
        return analyse(*args, **kwargs)

    analyzer.analyse_file = spied
"""


def test_local_cluster_workers_inherit_no_api_key(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / f"{i}.png", size=(40 + i, 30))
    keys = {
        "GEMINI_API_KEY": GEMINI_KEY,
        "GOOGLE_API_KEY": GEMINI_KEY,
        "OPENAI_API_KEY": KEY,
        "IMGBATCH_OPENAI_API_KEY": KEY,
        "IMGBATCH_GEMINI_API_KEYS": GEMINI_KEY,
        "IMGBATCH_SERVE_TOKEN": KEY,
        "IMGBATCH_OPENAI_BASE_URL": f"http://127.0.0.1:1/token/{PATH_SECRET}/v1",
    }
    canary = "SPY_CANARY"  # no secret: inherited, so the spy is seen to see
    out, mark = tmp_path / "seen.jsonl", tmp_path / "killed"
    spy = tmp_path / "env_spy.py"
    spy.write_text(SPY.format(watched=sorted([*keys, canary]), out=str(out), mark=str(mark)))
    env = {
        **keys,
        canary: "1",
        "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(spy)]),
        "IMGBATCH_RESULTS": str(tmp_path / "results"),
    }
    args = ["analyze", root, "--provider", "local", "--executor", "dask", "--workers", "1"]
    res = run_cli(args, env=env, timeout=240)
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["ok"] * 3
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    starts = [s for s in seen if s["phase"] == "start"]
    tasks = [s for s in seen if s["phase"] == "task"]
    assert mark.exists() and len(starts) >= 2  # the first worker died; another started
    # started with the cluster: never had them, in any form
    assert starts[0]["environ"] == starts[0]["initial"] == [canary]
    # in every task, the restarted worker's included: none
    assert len(tasks) >= 4 and all(t["environ"] == [canary] for t in tasks)
    for secret in SECRETS:
        assert secret.encode() not in res.stdout and secret not in res.stderr


# -- answers: strict JSON, of the schema -------------------------------------------------

NOT_STRICT = (
    '{"description": NaN, "tags": [], "objects": [], "colors": [], "mood": "", "text": ""}',
    '{"description": "x", "tags": [], "objects": [], "colors": [], "mood": "", '
    '"text": "", "score": Infinity}',
    '{"description": "x", "tags": [], "objects": [], "colors": [], "mood": "", '
    '"text": "", "score": -1e999}',
)


def answers_then_default(texts: tuple[str, ...]) -> Any:
    """A responder answering `texts` in turn, then the server's default answer."""
    queue = list(texts)

    def respond(rec: Any) -> str | None:
        return queue.pop(0) if queue else None

    return respond


def test_openai_answers_with_nan_or_infinity_are_retried_ai_errors(photos: Path) -> None:
    with FakeOpenAI(dialect="openai", keys={KEY}) as server:
        server.set_responder(answers_then_default(NOT_STRICT))
        res = openai_run(photos, server.base_url, "--workers", "1")
        assert res.rc == 0, res.stderr
        lines = strict_lines(res)
        assert [r["status"] for r in lines] == ["ok"] * 4
        assert sum(r["attempts"] for r in lines) == 4 + len(NOT_STRICT)  # each retried
        assert all(set(r["result"]) == FIELDS for r in lines)

        def never_strict(rec: RecordedRequest) -> str:
            return NOT_STRICT[rec.index % len(NOT_STRICT)]

        server.set_responder(never_strict)
        again = openai_run(photos, server.base_url, "--fresh", "--max-attempts", "2")
        assert again.rc == 1
        lines = strict_lines(again)
        assert {(r["error"]["code"], r["attempts"]) for r in lines} == {("AI_ERROR", 2)}
        assert all("not valid JSON" in r["error"]["message"] for r in lines)


def gemini_run(server: FakeGemini, root: Path, *args: str) -> CliResult:
    env = {
        "GEMINI_API_KEY": GEMINI_KEY,
        "IMGBATCH_GEMINI_BASE_URL": server.url,
        "IMGBATCH_RETRY_DELAY": "0.01",
        "IMGBATCH_RPM": "6000",
    }
    return run_cli(["analyze", *args, root], env=env)


def test_gemini_answers_with_nan_or_infinity_are_retried_ai_errors(photos: Path) -> None:
    with FakeGemini(keys={GEMINI_KEY}, seed=3) as server:
        server.set_responder(answers_then_default(NOT_STRICT))
        res = gemini_run(server, photos, "--workers", "1")
        assert res.rc == 0, res.stderr
        lines = strict_lines(res)
        assert [r["status"] for r in lines] == ["ok"] * 4
        assert sum(r["attempts"] for r in lines) == 4 + len(NOT_STRICT)

        server.set_responder(lambda rec: NOT_STRICT[0])
        again = gemini_run(server, photos, "--fresh", "--max-attempts", "2")
        assert again.rc == 1
        lines = strict_lines(again)
        assert {(r["error"]["code"], r["attempts"]) for r in lines} == {("AI_ERROR", 2)}
        assert server.errors == []


def test_gemini_answers_are_checked_against_the_schema(photos: Path) -> None:
    """The server is asked for the schema, but an answer that is not of it (a proxy, a
    model that strays) is an AI_ERROR, retried, as for the OpenAI-compatible provider."""
    wrong: tuple[dict[str, Any], ...] = (
        {"description": 5, "tags": [], "objects": [], "colors": [], "mood": "", "text": ""},
        {"description": "no tags", "objects": [], "colors": [], "mood": "", "text": ""},
        {"description": "x", "tags": [1], "objects": [], "colors": [], "mood": "", "text": ""},
    )
    with FakeGemini(keys={GEMINI_KEY}, seed=3) as server:
        server.set_responder(answers_then_default(tuple(json.dumps(w) for w in wrong)))
        res = gemini_run(server, photos, "--workers", "1")
        assert res.rc == 0, res.stderr
        assert sum(r["attempts"] for r in res.records) == 4 + len(wrong)
        assert all(set(r["result"]) == FIELDS for r in res.records)

        server.set_responder(lambda rec: wrong[1])
        again = gemini_run(server, photos, "--fresh", "--max-attempts", "2")
        assert again.rc == 1
        messages = {r["error"]["message"] for r in again.records}
        assert messages == {"the answer does not match the schema: the answer: missing 'tags'"}


def test_the_writer_of_records_never_writes_nan_or_infinity() -> None:
    """The last line of defence behind the providers' refusal: every line a run or an
    export writes goes through records.json_line, which writes a non-finite number as
    null (whatever a provider, or a store written before, holds)."""
    from imgbatch.records import json_line

    line = json_line({"result": {"score": float("nan"), "all": [float("inf"), 1.5]}})
    assert json.loads(line, parse_constant=lambda name: pytest.fail(name)) == {
        "result": {"score": None, "all": [None, 1.5]}
    }


def test_the_settings_repr_names_servers_by_origin_only() -> None:
    """A repr of the settings ends up in logs and tracebacks: a base URL shows its
    scheme, host and port, never its user, path or query."""
    from imgbatch.config import Settings

    settings = Settings(
        openai_base_url=("http://user:pw-SECRET@127.0.0.1:8000/token/SECRET/v1?key=SECRET",),
        gemini_base_url="https://proxy.example:8443/v1beta?key=SECRET",
    )
    shown = repr(settings)
    assert "SECRET" not in shown
    assert "openai_base_url=('http://127.0.0.1:8000/...',)" in shown
    assert "gemini_base_url='https://proxy.example:8443/...'" in shown
