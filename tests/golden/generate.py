"""Golden outputs: what `scan` and `analyze` print for fixed trees, kept byte for byte.

`python -m tests.golden.generate` (from the repository's top folder) builds each tree in
a temporary folder, runs the CLI on it and writes what it printed to tests/golden/:
`<case>.jsonl` (stdout, ROOT written as `<ROOT>`, `"latency_ms":N` as `"latency_ms":0`)
and `<case>.summary` (exit code and the summary lines, durations and rates masked).
tests/test_golden.py runs the same cases (and variants that must print the same, such as
a re-run from the hash cache) and compares. Regenerate only when an output is meant to
change, and say why in the commit.

`--images` also remakes the analyze tree's images (tests/golden/images/), which are
committed: their bytes must not depend on the Pillow or zlib of the day.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMAGES = HERE / "images"
MTIME_NS = 1_700_000_000_123_456_789  # the first file's mtime; each next one 1.000001 s later
MiB = 1 << 20


# -- trees ----------------------------------------------------------------------------


class _Builder:
    """Writes files of seeded random bytes with fixed mtimes under `root`."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.n = 0

    def file(self, rel: str | bytes, size: int) -> None:
        path = os.path.join(os.fsencode(self.root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.rng.randbytes(size))
        self.stamp(path)

    def stamp(self, path: bytes | str) -> None:
        t = MTIME_NS + self.n * 1_000_001_000
        self.n += 1
        os.utime(path, ns=(t, t))

    def symlink(self, rel: str, target: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)


def build_mixed(root: Path) -> None:
    """Odd names, sizes around the read chunk and the large-file threshold, hidden files,
    symlinks (to a file, a folder, nowhere, themselves), a FIFO, nested folders."""
    b = _Builder(root, seed=14)
    for rel, size in [
        ("a.jpg", 100),
        ("B.JPG", 5000),
        ("UPPER.JpEg", 7),
        ("c.png", 0),
        ("chunk.jpg", MiB),
        ("chunk-plus-one.jpg", MiB + 1),
        ("big-at-threshold.png", 4 * MiB),
        ("big.tif", 5 * MiB + 3),
        ('q"uote\\back.jpg', 10),
        ("new\nline.png", 11),
        ("tab\there.gif", 12),
        ("é-unicode.webp", 13),
        ("日本.heic", 14),
        ("emoji-😀.avif", 15),
        (b"bad-\xff\xfe.jpg", 16),
        (b"sub/lat1-\xe9t\xe9.bmp", 17),
        ("notes.txt", 18),
        ("noext", 19),
        ("trailing.", 20),
        ("x.tar.gz", 21),
        (".hidden.jpg", 22),
        (".jpg", 23),
        ("..dots.jpg", 24),
        ("sub/s1.jpg", 3000),
        ("sub/s0.png", 4000),
        ("sub/deeper/d.gif", 900),
        ("sub/deeper/e.txt", 901),
        ("sub/deeper/evendeeper/f.jpeg", 902),
        (".hiddendir/h.jpg", 30),
        ("z-last/z.png", 31),
        ("Z-upper/Z.png", 32),
        ("a-before-sub/a.jpg", 33),
    ]:
        b.file(rel, size)
    (root / "empty-dir").mkdir()
    b.symlink("link-to-a.jpg", "a.jpg")
    b.symlink("link-dir", "sub")
    b.symlink("dangling.jpg", "missing.jpg")
    b.symlink("loop.jpg", "loop.jpg")
    b.symlink("sub/deeper/up", "..")  # a folder loop when following
    os.mkfifo(root / "fifo.jpg")


def build_many(root: Path) -> None:
    """Some thousands of small files: enough for the hashing pool's chunks and the
    read-ahead window to matter, in folders of very different sizes."""
    b = _Builder(root, seed=15)
    for folder, count in (("f0", 2500), ("f1", 1), ("f2/g", 700), ("f3", 0), ("f4", 64)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            ext = (".jpg", ".png", ".txt", ".webp")[i % 4]
            b.file(f"{folder}/{i:05d}{ext}", b.rng.randint(0, 300))
    for i in range(40):  # ROOT's own files after listing its folders
        b.file(f"r{i:02d}.jpg", b.rng.randint(0, 9000))


def build_images(root: Path) -> None:
    """The analyze tree: the committed images, one duplicated, plus empty and broken files."""
    shutil.copytree(IMAGES, root)
    shutil.copyfile(IMAGES / "photo-chelsea.jpg", root / "sub" / "copy-of-chelsea.jpg")
    (root / "sub" / "empty.png").write_bytes(b"")
    (root / "sub" / "broken.jpg").write_bytes(b"not an image at all")
    head = (IMAGES / "photo-coffee.jpg").read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(head[: len(head) // 2])
    b = _Builder(root, seed=16)
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            b.stamp(os.path.join(dirpath, name))


def make_images() -> None:
    """(Re)make tests/golden/images/: real photos (scikit-image's samples, downscaled) and
    synthetic images in many modes and formats."""
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    shutil.rmtree(IMAGES, ignore_errors=True)
    (IMAGES / "tiny").mkdir(parents=True)
    (IMAGES / "sub").mkdir()
    for name, side in (("chelsea", 256), ("coffee", 300), ("astronaut", 256), ("rocket", 200)):
        src = next(data.glob(f"{name}.*"))
        with Image.open(src) as img:
            img = img.convert("RGB")
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
            img.save(IMAGES / f"photo-{name}.jpg", quality=85)
    from PIL import ImageDraw

    drawing = Image.linear_gradient("L").resize((1000, 800))  # grayscale, over max_side
    draw = ImageDraw.Draw(drawing)
    for i in range(12):
        box = (40 + 70 * i, 30 + 50 * i, 200 + 60 * i, 160 + 45 * i)
        draw.ellipse(box, fill=(37 * i) % 256, outline=255 - 20 * i, width=3)
    drawing.save(IMAGES / "drawing-1000.png")
    with Image.open(data / "coffee.png") as img:  # a JPEG that prepare() drafts down
        big = img.convert("RGB").resize((1600, 1000))
        big.save(IMAGES / "sub" / "coffee-large.jpg", quality=30)
    with Image.open(data / "astronaut.png") as img:
        small = img.convert("RGB").resize((120, 90))
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: turned 90 degrees
        exif[0x010F], exif[0x0110] = "Golden", "Camera 1"
        exif[0x0132] = "2021:05:01 12:00:00"
        gps = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
        exif[0x8825] = gps
        small.save(IMAGES / "exif-rotated.jpg", exif=exif, quality=90)
        small.convert("RGBA").save(IMAGES / "sub" / "rgba.png")
        small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(IMAGES / "palette.gif")
        small.convert("CMYK").save(IMAGES / "cmyk.jpg", quality=90)
        small.convert("L").save(IMAGES / "gray.tif")
        small.convert("1").save(IMAGES / "bilevel.bmp")
        small.save(IMAGES / "photo.webp", quality=80)
    rng = random.Random(8)
    for i in range(12):  # 8x8 noise, the benchmark's kind of image
        img = Image.new("RGB", (8, 8))
        img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64)])
        img.save(IMAGES / "tiny" / f"t{i:02d}.png")
    Image.new("RGB", (64, 48), (120, 200, 40)).save(IMAGES / "flat.png")
    grad = Image.linear_gradient("L").resize((200, 100))
    grad.save(IMAGES / "gradient.png")
    deep = Image.new("I;16", (40, 30))
    deep.putdata([(x * 1600 + y * 7) % 65536 for y in range(30) for x in range(40)])
    deep.save(IMAGES / "deep16.png")
    la = Image.new("LA", (30, 30), (90, 128))
    la.save(IMAGES / "sub" / "gray-alpha.png")


# -- cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One golden: a tree and the CLI arguments run on it (`{root}`, `{state}` filled in).
    `rerun`: also run it again on the same state folder, after the tree's files are
    no longer racy (2 s), and keep that run's summary; its stdout is `rerun_same` the
    first run's (scan, from the hash cache) or its own golden (analyze)."""

    name: str
    tree: Callable[[Path], None]
    args: tuple[str, ...]
    rerun: tuple[str, ...] | None = None
    sort: bool = False  # lines in completion order: compared sorted
    variants: tuple[tuple[str, ...], ...] = field(default=())  # extra args, same output


SCAN = ("scan", "{root}", "--checkpoint", "{state}")
ANALYZE = ("analyze", "{root}", "--provider", "local", "--checkpoint", "{state}")
CASES = [
    Case(
        "scan-mixed",
        build_mixed,
        SCAN,
        rerun=(),
        variants=(("--hash-threads", "1"), ("--no-hash-cache",), ("--hash-procs", "1")),
    ),
    Case("scan-mixed-all", build_mixed, (*SCAN, "--all-files", "--include-hidden"), rerun=()),
    Case("scan-mixed-follow", build_mixed, (*SCAN, "--follow-symlinks", "--all-files"), rerun=()),
    Case("scan-mixed-nohash", build_mixed, (*SCAN, "--no-hash", "--all-files")),
    Case(
        "scan-mixed-exclude",
        build_mixed,
        (*SCAN, "--exclude", "sub/deeper", "--exclude", "*.png", "--exclude", "z-last/"),
    ),
    Case(
        "scan-many",
        build_many,
        (*SCAN, "--all-files"),
        rerun=(),
        variants=(("--hash-threads", "1"), ("--hash-procs", "2")),
    ),
    # analyze writes lines as items finish (even one worker's: two done at once come in
    # any order), so its lines are kept sorted
    Case(
        "analyze-images",
        build_images,
        (*ANALYZE, "--workers", "1"),
        rerun=("--emit-all",),
        sort=True,
        variants=(("--workers", "4"),),
    ),
]


@dataclass
class Output:
    rc: int
    stdout: bytes
    summary: str


_B64 = re.compile(rb'"path_bytes_b64":"([A-Za-z0-9+/=]*)"')
_LATENCY = re.compile(rb'"latency_ms":\d+')
_DURATION = re.compile(r" in (\d+h)?(\d+m)?[\d.]+s")
_RATE = re.compile(r"[\d,]+ images/min")


def normalise(stdout: bytes, root: Path) -> bytes:
    """ROOT as `<ROOT>` (in `path` and inside `path_bytes_b64`), latencies as 0."""
    raw = os.fsencode(root)

    def b64(m: re.Match[bytes]) -> bytes:
        path = base64.b64decode(m.group(1)).replace(raw, b"<ROOT>")
        return b'"path_bytes_b64":"' + base64.b64encode(path) + b'"'

    out = _B64.sub(b64, stdout).replace(raw, b"<ROOT>")
    return _LATENCY.sub(b'"latency_ms":0', out)


def summary_of(stderr: str, root: Path) -> str:
    """The summary lines of a run's stderr, durations and rates masked."""
    lines = [
        line
        for line in stderr.splitlines()
        if line.startswith("imgbatch: ")
        and any(k in line for k in ("scanned ", " ok, ", "errors: ", "top tags: "))
    ]
    text = "\n".join(lines).replace(str(root), "<ROOT>")
    return _RATE.sub("<N> images/min", _DURATION.sub(" in <T>", text))


def cli(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "imgbatch", *args]
    return subprocess.run(cmd, capture_output=True, env=env, cwd=REPO, timeout=300, check=False)


def run_case(
    case: Case, root: Path, state: Path, env: dict[str, str], extra: Sequence[str] = ()
) -> tuple[Output, Output | None]:
    """Run a case on its tree (built at `root`, and settled if the case re-runs) with a
    fresh state folder: the normalised outputs of the run and of its re-run."""
    fill = {"root": str(root), "state": str(state)}
    args = [a.format(**fill) for a in case.args] + list(extra)

    def once(argv: Sequence[str]) -> Output:
        p = cli(argv, env)
        out = normalise(p.stdout, root)
        if case.sort:
            out = b"".join(sorted(out.splitlines(keepends=True)))
        return Output(p.returncode, out, summary_of(p.stderr.decode("utf-8", "replace"), root))

    first = once(args)
    if case.rerun is None:
        return first, None
    return first, once(args + list(case.rerun))


def build_trees(work: Path) -> dict[str, Path]:
    """Every case's tree under `work`, once, then settled: {builder name: root}."""
    roots = {}
    for case in CASES:
        name = case.tree.__name__
        if name not in roots:
            roots[name] = work / name
            case.tree(roots[name])
    settle()
    return roots


def settle() -> None:
    """Wait until the files just written are no longer "racy" (scanner.RACY_NS: a file
    whose ctime is within 2 s of the listing is not cached, and ctime cannot be set)."""
    time.sleep(2.05)


def isolated_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGBATCH_")}
    for k in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY", "PYTHONPATH"):
        env.pop(k, None)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "c"), XDG_CONFIG_HOME=str(home / "f"))
    return env


def write_golden(case: Case, first: Output, again: Output | None) -> None:
    (HERE / f"{case.name}.jsonl").write_bytes(first.stdout)
    text = f"exit {first.rc}\n{first.summary}\n"
    if again is not None:
        text += f"-- re-run\nexit {again.rc}\n{again.summary}\n"
        if case.name.startswith("analyze"):
            (HERE / f"{case.name}.rerun.jsonl").write_bytes(again.stdout)
    (HERE / f"{case.name}.summary").write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", action="store_true", help="remake tests/golden/images/ first")
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    args = ap.parse_args(argv)
    if args.images or not IMAGES.is_dir():
        make_images()
    with tempfile.TemporaryDirectory(prefix="imgbatch-golden-") as tmp:
        work = Path(tmp)
        roots = build_trees(work)
        for case in CASES:
            if args.cases and case.name not in args.cases:
                continue
            root, state = roots[case.tree.__name__], work / "state" / case.name
            first, again = run_case(case, root, state, isolated_env(work / "home" / case.name))
            if case.name.startswith("scan") and again and again.stdout != first.stdout:
                raise SystemExit(f"{case.name}: the re-scan printed something else than the scan")
            write_golden(case, first, again)
            lines = first.stdout.count(b"\n")
            print(f"{case.name}: {lines} lines, exit {first.rc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
