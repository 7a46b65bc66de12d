"""Looking never writes (issue 20, item 6): `status`, `runs`, `export` and `report` open
the state folder and the results store read-only. They work on state its user made
read-only, and change no byte of it, writable or not (SQLite's -wal/-shm aside)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.conftest import NOBODY, CliResult, make_image, run_cli

LOOKS = (
    ["status"],
    ["status", "--json"],
    ["runs"],
    ["export"],
    ["export", "--format", "csv"],
    ["export", "--status", "error"],
)


def fingerprints(*folders: Path, skip_sqlite_own: bool = False) -> dict[str, str]:
    """Path -> sha256 of every file under `folders` (and the set of folders, by name)."""
    out: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                out[str(path)] = "folder"
            elif not (skip_sqlite_own and path.name.endswith(("-wal", "-shm"))):
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def tree(base: Path) -> Path:
    root = base / "photos"
    for i in range(3):
        make_image(root / f"{i}.png", (20 + i, 10))
    make_image(root / "sub" / "deep.png", (40, 10))
    (root / "sub" / "broken.png").write_bytes(b"not a png")
    root.chmod(0o755)
    (root / "sub").chmod(0o755)
    return root


def check_looks(root: Path, env: dict[str, str] | None, user: int | None, out: Path) -> None:
    """Every looking command works, and says what the analysis stored."""
    results: dict[str, CliResult] = {}
    for args in LOOKS:
        res = run_cli([*args, root], env=env, user=user)
        assert res.rc == 0, (args, res.stderr)
        results[" ".join(args)] = res
    assert "run 1: PARTIAL" in results["status"].stdout.decode()  # 4 ok, 1 failed
    exported = results["export"].records
    assert len(exported) == 5
    assert {Path(r["path"]).name for r in exported if r["status"] == "ok"} == {
        "0.png",
        "1.png",
        "2.png",
        "deep.png",
    }
    assert all(r["result"]["width"] for r in exported if r["status"] == "ok")
    assert [r["error"]["code"] for r in results["export --status error"].records] == ["BAD_IMAGE"]
    assert len(results["export --format csv"].stdout.splitlines()) == 6
    report = run_cli(["report", root, "-o", out], env=env, user=user)
    assert report.rc == 0, report.stderr
    assert "deep.png" in out.read_text()


def test_read_only_state_can_be_looked_at_and_is_not_changed(
    as_nobody: dict[str, str], shared_tmp: Path
) -> None:
    """As an unprivileged user (root writes anything): state made read-only by its user."""
    root = tree(shared_tmp)
    res = run_cli(["analyze", root], env=as_nobody, user=NOBODY)
    assert res.rc == 1, res.stderr  # broken.png
    cache = Path(as_nobody["XDG_CACHE_HOME"]) / "imgbatch"
    folders = sorted(cache.iterdir())
    assert [p.name for p in folders].count("results") == 1 and len(folders) == 2
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    before = fingerprints(cache)
    assert any(p.endswith("checkpoint/cache.db") for p in before)
    out = shared_tmp / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    check_looks(root, as_nobody, NOBODY, out / "report.html")
    assert fingerprints(cache) == before


def test_looking_at_writable_state_changes_no_byte(tmp_path: Path) -> None:
    root = tree(tmp_path)
    res = run_cli(["analyze", root])
    assert res.rc == 1, res.stderr
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "imgbatch"
    before = fingerprints(cache, skip_sqlite_own=True)
    check_looks(root, None, None, tmp_path / "report.html")
    after = fingerprints(cache, skip_sqlite_own=True)
    assert after == before
