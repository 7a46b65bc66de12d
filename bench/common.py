"""Shared benchmark helpers: seeded trees, best-of-N child runs with peak RSS, result tables."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / ".data"
BIN = Path(sys.executable).parent
IMGBATCH = shutil.which("imgbatch", path=str(BIN)) or "imgbatch"
MiB = 1 << 20
_generation: list[float] = []  # seconds spent generating trees in this process


def log(msg: str) -> None:
    """Progress on stderr; the result tables go to stdout."""
    print(msg, file=sys.stderr, flush=True)


# -- trees -------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSpec:
    """A tree of `files` files of random sizes in `sizes` (bytes, inclusive), `per_dir`
    per folder (0: all in one flat folder), random bytes from a fixed seed."""

    name: str
    files: int
    sizes: tuple[int, int]
    per_dir: int
    ext: str = ".jpg"
    seed: int = 20240601


@dataclass(frozen=True)
class Tree:
    path: Path
    files: int
    bytes: int


def make_tree(spec: TreeSpec) -> Tree:
    """The tree of `spec` under bench/.data, generated once; reused while its marker
    file (next to it, outside the tree) records the same parameters."""
    path, marker = DATA / spec.name, DATA / f"{spec.name}.json"
    params = json.loads(json.dumps(asdict(spec)))  # tuples as lists, to compare with the file
    try:
        info = json.loads(marker.read_text())
        if info["params"] == params and path.is_dir():
            return Tree(path, spec.files, info["bytes"])
    except (OSError, ValueError, KeyError):
        pass
    start = time.perf_counter()
    log(f"data: generating {spec.name} ({spec.files:,} files)...")
    marker.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = random.Random(spec.seed)
    # each file is a slice of a seeded random pool: random content, and 170 MB/s of
    # randbytes would make the 4 GiB tree slow to build
    pool_mib = max(4, 2 * spec.sizes[1] // MiB + 1)
    pool = memoryview(b"".join(rng.randbytes(MiB) for _ in range(pool_mib)))
    folder, total = path, 0
    for i in range(spec.files):
        if spec.per_dir and i % spec.per_dir == 0:
            folder = path / f"d{i // spec.per_dir:05d}"
            folder.mkdir()
        size = rng.randint(*spec.sizes)
        off = rng.randrange(len(pool) - size)
        with open(folder / f"{i:07d}{spec.ext}", "wb") as f:
            f.write(pool[off : off + size])
        total += size
    os.sync()  # no writeback left to disturb the timings
    marker.write_text(json.dumps({"params": params, "bytes": total}))
    took = time.perf_counter() - start
    _generation.append(took)
    log(f"data: {spec.name} generated in {took:.1f}s")
    return Tree(path, spec.files, total)


def generation_seconds() -> float:
    return sum(_generation)


def generated(seconds: float) -> None:
    """Count `seconds` of data generation done elsewhere (bench/images.py)."""
    _generation.append(seconds)


def scratch(name: str) -> Path:
    """An empty folder bench/.data/scratch/NAME (emptied if it exists)."""
    path = DATA / "scratch" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- running children --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    maxrss_kib: int  # ru_maxrss of the child (and of the descendants it waited for)
    stderr: str
    returncode: int = 0

    @property
    def maxrss_mb(self) -> float:
        return self.maxrss_kib * 1024 / 1e6


def child_env() -> dict[str, str]:
    """The environment less IMGBATCH_* settings, with XDG folders of our own: no user
    config file changes what is measured, and nothing is cached in the user's home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGBATCH_")}
    env["XDG_CONFIG_HOME"] = str(DATA / "xdg" / "config")
    env["XDG_CACHE_HOME"] = str(DATA / "xdg" / "cache")
    return env


def sh(cmd: str, *paths: Path | str) -> list[str]:
    """A bash pipeline, stdout to /dev/null; `{}` in `cmd` are filled with the quoted `paths`."""
    cmd = cmd.format(*(shlex.quote(str(p)) for p in paths))
    return ["bash", "-o", "pipefail", "-c", f"{cmd} > /dev/null"]


# ru_maxrss survives exec: a child started straight from this process (by vfork or fork)
# inherits our high-water mark (~200 MB once a tree is built). So each child is started
# by a tiny launcher interpreter, which times it and reads its rusage with os.wait4; the
# launcher's own ~10 MB is then the floor of what can be measured.
_LAUNCHER = """\
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
    check: bool = True,
) -> Run:
    """Run `argv` (stdout to /dev/null, or to the file `stdout`): its wall time, peak RSS
    and stderr. `env` is added to child_env(); `check`: raise if it exits non-zero."""
    launcher = [sys.executable, "-S", "-c", _LAUNCHER]
    with (
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as res,
        open(stdout or os.devnull, "wb") as out,
    ):
        proc = subprocess.run(
            [*launcher, res.name, *argv], stdout=out, stderr=err, env={**child_env(), **(env or {})}
        )
        err.seek(0)
        text = err.read().decode(errors="replace")
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}:\n{text[-2000:]}")
        seconds, maxrss = res.read().split()
    return Run(float(seconds), int(maxrss), text, proc.returncode)


def analyze_against(
    provider: str,
    root: Path,
    state: Path,
    env: Mapping[str, str],
    server_errors: list[str],
    *opts: str,
) -> tuple[Run, list[dict[str, Any]]]:
    """One `imgbatch analyze --provider PROVIDER` run of `root` against a fake server
    (`env` names it and its key) with state folder `state` and its own results store
    (nothing is answered from another benchmark's results): the run and its records;
    an exit other than 0/1, or an error the fake server recorded, raises."""
    out = state.parent / f"{state.name}-stdout.jsonl"
    argv = [IMGBATCH, "analyze", str(root), "--provider", provider, "--checkpoint", str(state)]
    env = {
        **env,
        "IMGBATCH_RESULTS": str(state / "results"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    r = run([*argv, *opts], env=env, stdout=out, check=False)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"imgbatch analyze exited {r.returncode}:\n{r.stderr[-2000:]}")
    if server_errors:
        raise RuntimeError(f"the fake server failed:\n{server_errors[0]}")
    return r, [json.loads(line) for line in out.read_bytes().splitlines() if line.strip()]


def best_of(
    argv: list[str],
    runs: int = 3,
    setup: Callable[[], object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
) -> Run:
    """One warm-up run (warms the page cache), then the fastest of `runs` timed runs;
    `setup` is called, untimed, before each. `env`, `stdout`: as for run()."""
    timed: list[Run] = []
    for i in range(runs + 1):
        if setup is not None:
            setup()
        r = run(argv, env=env, stdout=stdout)
        if i:  # the first run is the warm-up
            timed.append(r)
    return min(timed, key=lambda r: r.seconds)


_SUMMARY = re.compile(
    r"scanned ([\d,]+) files .*; read ([\d.]+) (B|KB|MB|GB|TB), ([\d,]+) from the hash cache"
)
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


@dataclass(frozen=True)
class Summary:
    files: int
    bytes_read: int  # as printed: 3 significant digits
    cache_hits: int


def summary(r: Run) -> Summary:
    """The figures of imgbatch's summary line on stderr."""
    m = _SUMMARY.search(r.stderr)
    if not m:
        raise RuntimeError(f"no summary line in imgbatch's stderr:\n{r.stderr[-2000:]}")
    n, read, unit, hits = m.groups()
    return Summary(
        int(n.replace(",", "")), round(float(read) * _UNITS[unit]), int(hits.replace(",", ""))
    )


# -- the results table -------------------------------------------------------------


def secs(s: float) -> str:
    return f"{s:.2f} s"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def check(ok: bool) -> str:
    return "OK" if ok else "MISSED"


class Table:
    """Results in sections, rendered as Markdown tables (plain text reads as well)."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, list[tuple[str, str, str]]]] = []

    def section(self, title: str) -> None:
        self.sections.append((title, []))
        log(f"== {title}")

    def add(self, what: str, value: str, note: str = "") -> None:
        self.sections[-1][1].append((what, value, note))
        log(f"   {what}: {value}  {note}".rstrip())

    def render(self) -> str:
        out: list[str] = []
        for title, rows in self.sections:
            rows = [("what", "result", "notes"), *rows]
            w = [max(len(r[i]) for r in rows) for i in range(3)]
            lines = [f"| {a:<{w[0]}} | {b:>{w[1]}} | {c:<{w[2]}} |" for a, b, c in rows]
            lines.insert(1, f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 1)}:|{'-' * (w[2] + 2)}|")
            out += [f"### {title}", "", *lines, ""]
        return "\n".join(out)
