"""`imgbatch dupes` (issue 22, item 3): exact copies and near-duplicates among the stored
files of ROOT, through the real CLI on the scikit-image photos and copies Pillow made of
them (resized, re-encoded, brightened, cropped by 5% of the area, byte copies); the
grouping's rules (keeper, no chaining, multi-index hashing) on records."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageEnhance

from imgbatch.dupes import Photo, groups, near_pairs
from tests.conftest import NOBODY, CliResult, run_cli, the_state_folder
from tests.fakegemini import FakeGemini

KEY = "test-key-SECRET-0123456789"
SKIMAGE = Path(__import__("skimage").__file__).parent / "data"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
#: photos unrelated to the others and to each other: never in a group
UNRELATED = ("camera.png", "coins.png", "hubble_deep_field.jpg", "horse.png")
VARIANTS = ("", "_half", "_q60", "_bright", "_crop", "_copy")


def make_tree(root: Path) -> Path:
    """Each photo of PHOTOS with its near and exact copies; UNRELATED photos alone; moon.png
    twice, byte for byte (an exact group)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        stem = name.split(".")[0]
        image = Image.open(SKIMAGE / name).convert("RGB")
        width, height = image.size
        image.save(root / f"{stem}.png")
        image.resize((width // 2, height // 2), Image.Resampling.LANCZOS).save(
            root / f"{stem}_half.png"
        )
        image.save(root / f"{stem}_q60.jpg", quality=60)
        ImageEnhance.Brightness(image).enhance(1.1).save(root / f"{stem}_bright.png")
        # 5% of the area: 1.27% off each side keeps (1 - 2 * 0.0127)^2 = 95%
        dx, dy = round(width * 0.0127), round(height * 0.0127)
        image.crop((dx, dy, width - dx, height - dy)).save(root / f"{stem}_crop.png")
        shutil.copyfile(root / f"{stem}.png", root / f"{stem}_copy.png")
    for name in UNRELATED:
        shutil.copyfile(SKIMAGE / name, root / name)
    shutil.copyfile(SKIMAGE / "moon.png", root / "moon.png")
    (root / "sky").mkdir(exist_ok=True)
    shutil.copyfile(SKIMAGE / "moon.png", root / "sky" / "moon again.png")
    # the older copy is the keeper of identical files
    os.utime(root / "sky" / "moon again.png", (1_000_000_000, 1_000_000_000))
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "photos")


def dupes(root: Path, *args: str, env: dict[str, str] | None = None, **kw: Any) -> CliResult:
    return run_cli(["dupes", root, *args], env=env, **kw)


def tree_state(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: its digest, mtime and mode (dupes must change none)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).digest()
            out[str(path.relative_to(root))] = (digest, st.st_mtime_ns, st.st_mode)
    return out


def named(group: dict[str, Any]) -> list[str]:
    return [Path(f["path"]).name for f in group["files"]]


def check_groups(root: Path, found: list[dict[str, Any]]) -> None:
    """The groups of make_tree's photos: one near group per photo with all its copies,
    one exact group of the moons, nothing else."""
    by_keeper = {Path(g["keep"]).stem.split("_")[0]: g for g in found}
    assert sorted(by_keeper) == sorted([*(n.split(".")[0] for n in PHOTOS), "moon again"])
    for name in PHOTOS:
        stem = name.split(".")[0]
        group = by_keeper[stem]
        assert group["kind"] == "near"
        expected = {f"{stem}{v}.{'jpg' if v == '_q60' else 'png'}" for v in VARIANTS}
        assert set(named(group)) == expected
        files = {Path(f["path"]).name: f for f in group["files"]}
        # the keeper: the largest resolution, then the largest file (the brightened PNG
        # here: as big as the original, a few more bytes)
        keep = files[Path(group["keep"]).name]
        assert group["files"][0] == keep and keep["distance"] == 0
        for f in group["files"]:
            assert 0 <= f["distance"] <= 8
            assert (f["width"], f["height"]) <= (keep["width"], keep["height"])
            assert os.path.getsize(f["path"]) == f["size"]
        sizes = [(f["width"] * f["height"], f["size"]) for f in group["files"]]
        assert sizes[0] == max(sizes)
        assert files[f"{stem}.png"]["hash"] == files[f"{stem}_copy.png"]["hash"]
        assert files[f"{stem}.png"]["distance"] == files[f"{stem}_copy.png"]["distance"]
        assert files[f"{stem}_half.png"]["width"] == keep["width"] // 2
        assert group["wasted_bytes"] == sum(f["size"] for f in group["files"]) - keep["size"]
    moons = by_keeper["moon again"]
    assert moons["kind"] == "exact" and moons["keep"] == str(root / "sky" / "moon again.png")
    assert named(moons) == ["moon again.png", "moon.png"]
    assert [f["distance"] for f in moons["files"]] == [0, 0]
    wasted = [g["wasted_bytes"] for g in found]
    assert wasted == sorted(wasted, reverse=True)
    everything = [f["path"] for g in found for f in g["files"]]
    assert len(everything) == len(set(everything))  # a file in at most one group
    assert not {Path(p).name for p in everything} & set(UNRELATED)


def test_copies_of_real_photos_are_grouped_after_a_local_analysis(photos: Path) -> None:
    res = run_cli(["analyze", "--provider", "local", photos])
    assert res.rc == 0, res.stderr
    before = tree_state(photos)
    state = the_state_folder()
    res = dupes(photos)
    assert res.rc == 0, res.stderr
    check_groups(photos, res.records)
    assert set(res.records[0]) == {"kind", "keep", "files", "wasted_bytes"}
    assert set(res.records[0]["files"][0]) == {
        "path",
        "hash",
        "size",
        "width",
        "height",
        "distance",
    }
    assert "5 groups (1 exact, 4 near) of 26 files among 30" in res.stderr
    assert "30 from stored results, 0 stored by dupes, 0 computed now" in res.stderr
    assert tree_state(photos) == before  # nothing moved, deleted or rewritten
    assert not (state / "phashes.db").exists()  # nothing to compute, nothing written


def test_after_a_gemini_run_phashes_are_computed_once_and_stored(photos: Path) -> None:
    with FakeGemini(keys={KEY}) as server:
        env = {
            "GEMINI_API_KEY": KEY,
            "IMGBATCH_GEMINI_BASE_URL": server.url,
            "IMGBATCH_RETRY_DELAY": "0.01",
            "IMGBATCH_RPM": "6000",
        }
        res = run_cli(["analyze", photos], env=env)
        assert res.rc == 0, res.stderr
    state = the_state_folder()
    before = tree_state(photos)
    first = dupes(photos)
    assert first.rc == 0, first.stderr
    check_groups(photos, first.records)
    # 30 files, 25 contents (4 photos and the moon have a byte copy each)
    assert "0 from stored results, 0 stored by dupes, 25 computed now" in first.stderr
    store = state / "phashes.db"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    second = dupes(photos)
    assert second.rc == 0, second.stderr
    assert second.records == first.records
    assert "0 from stored results, 25 stored by dupes, 0 computed now" in second.stderr
    assert tree_state(photos) == before


def test_the_same_phashes_as_the_offline_analyzer(photos: Path, tmp_path: Path) -> None:
    """Computed pHashes agree with stored ones: the same distances either way."""
    with FakeGemini(keys={KEY}) as server:
        env = {"GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url}
        assert run_cli(["analyze", photos, "--rpm", "6000"], env=env).rc == 0
    computed = dupes(photos).records
    local_env = {"XDG_CACHE_HOME": str(tmp_path / "other-cache")}
    assert run_cli(["analyze", "--provider", "local", photos], env=local_env).rc == 0
    stored = dupes(photos, env=local_env)
    assert "0 computed now" in stored.stderr
    assert stored.records == computed


def test_files_changed_or_gone_since_the_run_are_left_out(photos: Path) -> None:
    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    (photos / "chelsea_copy.png").unlink()
    (photos / "coffee_crop.png").write_bytes((photos / "camera.png").read_bytes())
    res = dupes(photos)
    assert res.rc == 0, res.stderr
    names = {Path(f["path"]).name for g in res.records for f in g["files"]}
    assert not names & {"chelsea_copy.png", "coffee_crop.png"}
    assert "left out: 1 changed, 1 gone (run `imgbatch analyze` again)" in res.stderr


def test_distance_zero_and_usage_errors(photos: Path, tmp_path: Path) -> None:
    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    res = dupes(photos, "--distance", "0")
    assert res.rc == 0, res.stderr
    assert all(f["distance"] == 0 for group in res.records for f in group["files"])
    assert {"exact"} <= {g["kind"] for g in res.records}
    assert dupes(photos, "--distance", "33").rc == 2
    never = tmp_path / "never"
    never.mkdir()
    res = dupes(never)
    assert res.rc == 2 and "imgbatch analyze" in res.stderr


def test_read_only_state_computes_in_memory_and_says_so_once(
    as_nobody: dict[str, str], shared_tmp: Path
) -> None:
    root = make_tree(shared_tmp / "photos")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    with FakeGemini(keys={KEY}) as server:
        env = {**as_nobody, "GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url}
        res = run_cli(["analyze", root, "--rpm", "6000"], env=env, user=NOBODY)
        assert res.rc == 0, res.stderr
    cache = Path(as_nobody["XDG_CACHE_HOME"]) / "imgbatch"
    (state,) = [p for p in cache.iterdir() if p.name != "results"]
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    res = dupes(root, env=as_nobody, user=NOBODY)
    assert res.rc == 0, res.stderr
    check_groups(root, res.records)
    assert res.stderr.count("in memory") == 1, res.stderr
    assert "25 computed now" in res.stderr
    assert not (state / "phashes.db").exists()


# -- the grouping's rules, on records ----------------------------------------------------


def photo(name: str, phash: int, size: int = 100, wh: int = 10, mtime: str = "2024") -> Photo:
    return Photo(name, f"h-{name}", size, wh, wh, mtime, phash)


def test_no_chaining_each_file_within_distance_of_its_keeper() -> None:
    a, b, c = 0, (1 << 5) - 1, (1 << 10) - 1  # a-b 5 bits, b-c 5 bits, a-c 10 bits
    found = groups([photo("c", c), photo("a", a, wh=30), photo("b", b, wh=20)], 8)
    assert [(g["keep"], [f["path"] for f in g["files"]]) for g in found] == [("a", ["a", "b"])]
    assert [f["distance"] for f in found[0]["files"]] == [0, 5]
    # when b is the best, it keeps both (each within 5 bits of it)
    found = groups([photo("c", c), photo("a", a), photo("b", b, wh=20)], 8)
    assert [f["path"] for f in found[0]["files"]] == ["b", "a", "c"]


def test_keeper_rule_resolution_then_size_then_age() -> None:
    ph = 0xF0F0F0F0F0F0F0F0
    files = [
        photo("small-big-file", ph, size=900, wh=10),
        photo("large", ph ^ 1, size=100, wh=20),
        photo("large-newer-bigger", ph ^ 2, size=200, wh=20, mtime="2025"),
        photo("large-older-bigger", ph ^ 3, size=200, wh=20, mtime="2023"),
    ]
    (group,) = groups(files)
    assert group["keep"] == "large-older-bigger"
    assert group["wasted_bytes"] == 900 + 100 + 200


def test_exact_copies_without_a_phash_still_group() -> None:
    undecodable = [Photo(n, "same", 7, mtime=m) for n, m in (("b", "2021"), ("a", "2022"))]
    assert groups(undecodable) == [
        {
            "kind": "exact",
            "keep": "b",
            "files": [
                {"path": p, "hash": "same", "size": 7, "width": None, "height": None, "distance": 0}
                for p in ("b", "a")
            ],
            "wasted_bytes": 7,
        }
    ]


@pytest.mark.parametrize("distance", [0, 3, 8, 12])
def test_near_pairs_finds_exactly_the_pairs_all_pairs_would(distance: int) -> None:
    rng = random.Random(distance)
    centres = [rng.getrandbits(64) for _ in range(40)]
    hashes = [c ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(14))) for c in centres]
    hashes += [rng.choice(hashes) ^ (1 << rng.randrange(64)) for _ in range(300)]
    hashes += [rng.choice(hashes) for _ in range(20)]  # the same pHash twice
    brute = [
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if (hashes[i] ^ hashes[j]).bit_count() <= distance
    ]
    assert len(brute) > 20
    assert near_pairs(hashes, distance) == brute


def test_near_pairs_in_a_crowded_band_as_all_pairs_would() -> None:
    """Hashes alike in most bits (dark, flat photos): buckets too big for the shifted
    comparisons, compared whole."""
    rng = random.Random(5)
    hashes = [0xABCD_0000_0000_0000 | rng.getrandbits(20) for _ in range(200)]
    brute = [
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if (hashes[i] ^ hashes[j]).bit_count() <= 6
    ]
    assert len(brute) > 20
    assert near_pairs(hashes, 6) == brute


def test_the_python_api_gives_the_clis_groups(photos: Path) -> None:
    import imgbatch
    from imgbatch.errors import UsageError

    assert run_cli(["analyze", "--provider", "local", photos]).rc == 0
    before = tree_state(photos)
    cli = dupes(photos).records
    found = imgbatch.find_dupes(photos)
    assert found == cli
    check_groups(photos, found)
    # distance 0: only pHashes that are equal (exact copies, and copies too alike to differ)
    assert imgbatch.find_dupes(photos, distance=0) == dupes(photos, "--distance", "0").records
    assert imgbatch.find_dupes(str(photos), 8) == cli
    assert tree_state(photos) == before  # nothing moved, deleted or rewritten
    with pytest.raises(UsageError, match="distance"):
        imgbatch.find_dupes(photos, distance=65)
    with pytest.raises(TypeError, match="distanse"):
        imgbatch.find_dupes(photos, distanse=3)
