"""ARCHITECTURE.md against the tree: every module named in it, no file name it gives stale."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "imgbatch"


def _modules(package: Path = PACKAGE) -> list[Path]:
    """Every module and subpackage of imgbatch, relative to it (`pipeline`, `pipeline/run.py`).

    A package's `__init__.py` is the package itself; `__main__.py` is a module of its own.
    """
    found = []
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(package)
        found.append(rel.parent if rel.name == "__init__.py" else rel)
    return [rel for rel in found if rel != Path(".")]


def _named(rel: Path, text: str) -> bool:
    """Whether ARCHITECTURE.md names the module: its path (`pipeline/run.py`,
    `pipeline/`), its dotted path (`pipeline.run`, `imgbatch.pipeline.run`), or, as the
    map lists a package's modules under it, its bare file name standing alone (`run.py`,
    not the tail of another path such as `web/report.py`).
    """
    parts = rel.with_suffix("").parts if rel.suffix else rel.parts
    dotted = ".".join(parts)
    if rel.suffix:
        names = [rf"(?<![\w./]){re.escape(rel.name)}"]
        if len(parts) > 1:
            names.append(rf"(?<![\w.]){re.escape(rel.as_posix())}")
    else:  # a package: `web/` (or `imgbatch/web/`)
        names = [rf"(?<![\w.]){re.escape(rel.as_posix())}/"]
    names.append(rf"(?<![\w.])imgbatch\.{re.escape(dotted)}")
    if len(parts) > 1:  # a bare word is no name for a top-level module: `report`, `api`
        names.append(rf"(?<![\w.]){re.escape(dotted)}")
    return any(re.search(name + r"(?![\w])", text) for name in names)


def test_every_module_is_named_in_architecture_md() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    modules = _modules()
    assert len(modules) > 30  # the walk found the package
    missing = [str(rel) for rel in modules if not _named(rel, text)]
    assert not missing, f"ARCHITECTURE.md does not name these modules of imgbatch: {missing}"


def _stale_files(text: str) -> list[str]:
    """The file names (`run.py`, `pipeline/run.py`, `tests/fakegemini.py`) that `text`
    gives and no file of imgbatch/, tests/ or bench/ has."""
    files = [
        path.relative_to(REPO).as_posix()
        for top in ("imgbatch", "tests", "bench")
        for path in (REPO / top).rglob("*.py")
    ]
    named = set(re.findall(r"(?<![\w./])[\w/]+\.py(?![\w])", text))
    return sorted(n for n in named if not any(f == n or f.endswith("/" + n) for f in files))


def test_every_file_architecture_md_names_exists() -> None:
    """A renamed or removed module leaves no stale file name behind in the map."""
    stale = _stale_files((REPO / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    assert not stale, f"ARCHITECTURE.md names files that do not exist: {stale}"
