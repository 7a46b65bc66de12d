"""What `scan` and `analyze` print is kept byte for byte (analyze: but for `latency_ms`):
the golden files of tests/golden/ were made with the code of before the speed work of
issue 14, and every faster path (the hash cache, threads, worker processes) must still
print exactly them. See tests/golden/generate.py to regenerate one on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbatch import cpus, scanner
from imgbatch.config import Settings, load_settings
from imgbatch.output import JsonlSink
from imgbatch.scanner import run_scan
from tests.golden.generate import (
    CASES,
    HERE,
    Case,
    build_trees,
    isolated_env,
    normalise,
    run_case,
)

PARAMS = [
    pytest.param(case, extra, id=" ".join([case.name, *extra]))
    for case in CASES
    for extra in ((), *case.variants)
]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every golden tree, built once (read-only for the cases) and no longer racy."""
    return build_trees(tmp_path_factory.mktemp("golden"))


def lines(data: bytes) -> list[str]:
    """Lines to compare: pytest then shows which differ (surrogateescape keeps bytes)."""
    return data.decode("utf-8", "surrogateescape").splitlines(keepends=True)


def golden(name: str) -> bytes:
    return (HERE / name).read_bytes()


@pytest.mark.parametrize(("case", "extra"), PARAMS)
def test_the_output_is_the_golden_one(
    case: Case, extra: tuple[str, ...], roots: dict[str, Path], tmp_path: Path
) -> None:
    root = roots[case.tree.__name__]
    first, again = run_case(case, root, tmp_path / "state", isolated_env(tmp_path), extra)
    summaries = (HERE / f"{case.name}.summary").read_text().split("-- re-run\n")
    assert lines(first.stdout) == lines(golden(f"{case.name}.jsonl"))
    assert f"exit {first.rc}\n{first.summary}\n" == summaries[0]
    if again is None:
        return
    if case.name.startswith("scan"):  # from the hash cache: the same lines
        assert lines(again.stdout) == lines(golden(f"{case.name}.jsonl"))
    else:
        assert lines(again.stdout) == lines(golden(f"{case.name}.rerun.jsonl"))
    if not extra:  # a variant may read more (--no-hash-cache): only its lines are kept
        assert f"exit {again.rc}\n{again.summary}\n" == summaries[1]


# -- the same outputs from every path of the scanner --------------------------------------

SCAN_PARAMS = [
    pytest.param(case, id=case.name)
    for case in CASES
    if case.name.startswith("scan") and "--no-hash" not in case.args
]


def scan_settings(args: tuple[str, ...], state: Path) -> Settings:
    """The Settings a golden scan case's flags give (the flags the cases use)."""
    flags: dict[str, object] = {"checkpoint": str(state)}
    exclude: list[str] = []
    it = iter(args[2:])
    for arg in it:
        if arg == "--exclude":
            exclude.append(next(it))
        elif arg == "--checkpoint":
            next(it)
        else:
            flags[arg.lstrip("-").replace("-", "_")] = True
    return load_settings(None, {**flags, "exclude": tuple(exclude) or None})


@pytest.mark.parametrize("case", SCAN_PARAMS)
@pytest.mark.parametrize("procs", [1, 2], ids=["inline", "2 procs"])
def test_worker_processes_and_small_jobs_print_the_golden_lines(
    case: Case,
    procs: int,
    roots: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Jobs of a few files, cut anywhere in a folder (several folders per job for the
    workers), worker processes from the first file: the lines do not change, first from
    the files and then from the hash cache."""
    answers = small_jobs_and_workers_at_once(monkeypatch)
    root = roots[case.tree.__name__]
    settings = scan_settings(case.args, tmp_path / "state").replace(hash_procs=procs)
    for _ in ("from the files", "from the hash cache"):
        out = tmp_path / "out.jsonl"
        with out.open("wb") as fh:
            sink = JsonlSink(fh.fileno())
            run_scan(str(root), settings, sink, state=tmp_path / "state")
            sink.close()
        assert lines(normalise(out.read_bytes(), root)) == lines(golden(f"{case.name}.jsonl"))
    assert (answers[0] > 2) == (procs > 1)


def small_jobs_and_workers_at_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Jobs of a few files, cut anywhere in a folder, worker processes from the first
    file however busy the machine: [jobs the workers answered], counted."""
    monkeypatch.setattr(scanner, "PROCS_AFTER", 0)
    monkeypatch.setattr(scanner, "PROCS_AFTER_SECONDS", 0)
    monkeypatch.setattr(cpus, "spare_cores", lambda **_: 2.0)
    monkeypatch.setattr(scanner, "JOB_FILES", 3)
    monkeypatch.setattr(scanner, "WORKER_JOB_FILES", 7)
    return count_worker_answers(monkeypatch)


def count_worker_answers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Worker processes in use as soon as they are asked for (not once they have
    started in the background): [jobs they answered], counted."""
    answers = [0]
    ready, result = scanner._Workers.ready, scanner._Workers.result

    def ready_now(self: scanner._Workers) -> bool:
        self._ready.wait(30)
        return ready(self)

    def counted(self: scanner._Workers, ticket: scanner._Ticket) -> object:
        answers[0] += 1
        return result(self, ticket)

    monkeypatch.setattr(scanner._Workers, "ready", ready_now)
    monkeypatch.setattr(scanner._Workers, "result", counted)
    return answers


@pytest.mark.parametrize("case", SCAN_PARAMS)
def test_worker_processes_give_analyze_the_records_the_scan_itself_gives(
    case: Case, roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`analyze` iterates FileRecords (not lines): from the workers they travel as
    tuples and must come back equal, field for field (errors, inode and ctime too)."""
    import dataclasses

    from imgbatch.hashcache import HashCache

    root = str(roots[case.tree.__name__])
    settings = scan_settings(case.args, tmp_path / "state")

    def records(procs: int) -> list[tuple[object, ...]]:
        with HashCache(tmp_path / f"cache-{procs}") as cache:
            return [
                dataclasses.astuple(r) for r in scanner.Scanner(root, settings, cache, procs=procs)
            ]

    inline = records(0)
    answers = small_jobs_and_workers_at_once(monkeypatch)
    assert records(2) == inline and answers[0] > 2
