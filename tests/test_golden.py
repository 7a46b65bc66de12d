"""What `scan` and `analyze` print is kept byte for byte (analyze: but for `latency_ms`):
the golden files of tests/golden/ were made with the code of before the speed work of
issue 14, and every faster path (the hash cache, threads, worker processes) must still
print exactly them. See tests/golden/generate.py to regenerate one on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbatch.config import Settings, load_settings
from imgbatch.output import JsonlSink
from imgbatch.scanner import Scanner, Schedule, Ticket, Workers, run_scan
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
    case: Case, procs: int, roots: dict[str, Path], tmp_path: Path
) -> None:
    """Jobs of a few files, cut anywhere in a folder (several folders per job for the
    workers), worker processes from the first file: the lines do not change, first from
    the files and then from the hash cache."""
    answers, schedule = small_jobs_and_workers_at_once()
    root = roots[case.tree.__name__]
    settings = scan_settings(case.args, tmp_path / "state").replace(hash_procs=procs)
    for _ in ("from the files", "from the hash cache"):
        out = tmp_path / "out.jsonl"
        with out.open("wb") as fh:
            sink = JsonlSink(fh.fileno())
            run_scan(str(root), settings, sink, state=tmp_path / "state", schedule=schedule)
            sink.close()
        assert lines(normalise(out.read_bytes(), root)) == lines(golden(f"{case.name}.jsonl"))
    assert (answers[0] > 2) == (procs > 1)


def small_jobs_and_workers_at_once() -> tuple[list[int], Schedule]:
    """Jobs of a few files, cut anywhere in a folder, and worker processes in use from
    the first file however busy the machine (started before the walk goes on, not in
    the background): [jobs the workers answered], counted, and that schedule."""
    answers = [0]

    class CountedWorkers(Workers):
        def result(self, ticket: Ticket) -> object:  # type: ignore[override]
            answers[0] += 1
            return super().result(ticket)

    schedule = Schedule(
        job_files=3,
        worker_job_files=7,
        start_workers=lambda files: True,
        workers=lambda n: CountedWorkers(n, wait=True),
    )
    return answers, schedule


@pytest.mark.parametrize("case", SCAN_PARAMS)
def test_worker_processes_give_analyze_the_records_the_scan_itself_gives(
    case: Case, roots: dict[str, Path], tmp_path: Path
) -> None:
    """`analyze` iterates FileRecords (not lines): from the workers they travel as
    tuples and must come back equal, field for field (errors, inode and ctime too)."""
    import dataclasses

    from imgbatch.hashcache import HashCache

    root = str(roots[case.tree.__name__])
    settings = scan_settings(case.args, tmp_path / "state")
    answers, schedule = small_jobs_and_workers_at_once()

    def records(procs: int) -> list[tuple[object, ...]]:
        with HashCache(tmp_path / f"cache-{procs}") as cache:
            chosen = schedule if procs else None  # inline: the scan as it is
            walk = Scanner(root, settings, cache, procs=procs, schedule=chosen)
            return [dataclasses.astuple(r) for r in walk]

    inline = records(0)
    assert records(2) == inline and answers[0] > 2
