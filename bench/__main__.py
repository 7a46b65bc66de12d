"""Run every benchmark module in turn (`make bench`); the result tables go to stdout."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import time

from bench.common import IMGBATCH, Table, child_env, generation_seconds, log

# each has BENCHMARKS: {name: function(table, quick)}
MODULES = ["scan", "analyze", "gemini", "gemini_batch", "openai", "dask", "dupes", "search"]
MODULES += ["ocr", "semantic", "s3"]
MODULES += ["batch_openai", "batch_anthropic"]


def main(argv: list[str] | None = None) -> int:
    benchmarks = {
        f"{mod}.{name}": fn
        for mod in MODULES
        for name, fn in importlib.import_module(f"bench.{mod}").BENCHMARKS.items()
    }
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    names = ", ".join(MODULES + [n.split(".")[1] for n in benchmarks])
    help_only = f"modules or benchmarks, comma-separated: {names}"
    ap.add_argument("--only", metavar="NAME[,NAME...]", help=help_only)
    ap.add_argument("--quick", action="store_true", help="smaller trees, for a smoke run")
    args = ap.parse_args(argv)
    wanted = args.only.split(",") if args.only else []
    for want in wanted:
        if not any(want in (name, *name.split(".")) for name in benchmarks):
            ap.error(f"no benchmark named {want!r}")
    chosen = [
        (name, fn)
        for name, fn in benchmarks.items()
        if not wanted or any(want in (name, *name.split(".")) for want in wanted)
    ]

    version = subprocess.run(
        [IMGBATCH, "--version"], capture_output=True, text=True, env=child_env(), check=True
    ).stderr.strip()
    print(f"# imgbatch benchmarks{' (--quick)' if args.quick else ''}\n")
    load = f"load average {os.getloadavg()[0]:.2f}"
    print(f"{os.cpu_count()} cores, Python {platform.python_version()}, {version}, {load}\n")

    table = Table()
    start = time.perf_counter()
    times: list[tuple[str, float, float]] = []
    for name, fn in chosen:
        t0, g0 = time.perf_counter(), generation_seconds()
        fn(table, args.quick)
        times.append((name, time.perf_counter() - t0, generation_seconds() - g0))
    total = time.perf_counter() - start
    log("")
    print(table.render())
    print("### runtime\n")
    for name, secs, gen in times:
        data = f" (of which data generation {gen:.0f} s)" if gen else ""
        print(f"- {name}: {secs:.0f} s{data}")
    print(f"- total: {total:.0f} s ({total / 60:.1f} min); load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
