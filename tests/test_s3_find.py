"""`search` and `dupes` over a bucket root (issue 24 item 1), through the real CLI and the
real s3fs against moto's S3 server (tests/test_s3.py's fixtures)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from PIL import Image  # noqa: E402

from tests import test_s3  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.test_s3 import CREDS, S3, jpeg  # noqa: E402

# moto's server and the per-test view of it, as tests/test_s3.py has them
s3_server, s3 = test_s3.s3_server, test_s3.s3


def blocks(seed: int, quality: int = 90) -> bytes:
    """A JPEG of random grey blocks (a flat image's pHash says little): the same `seed` at
    another `quality` is other bytes of the same picture, a near-duplicate."""
    rnd = random.Random(seed)
    small = Image.new("L", (16, 12))
    small.putdata([rnd.randrange(256) for _ in range(16 * 12)])
    buf = io.BytesIO()
    small.resize((64, 48)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_search_finds_objects_of_a_bucket_root(s3: S3) -> None:
    bucket = s3.bucket(
        {"p/sunset.jpg": jpeg(1), "p/d/harbour.jpg": jpeg(2), "other/sunset.jpg": jpeg(3)}
    )
    root = f"s3://{bucket}/p/"
    analyzed = run_cli(["analyze", root, "--provider", "local"], env=s3.env())
    assert analyzed.rc == 0, analyzed.stderr
    found = run_cli(["search", root, "sunset"], env=s3.env())
    assert found.rc == 0, found.stderr
    assert [r["path"] for r in found.records] == [f"{root}sunset.jpg"]
    paths = run_cli(["search", root, "harbour", "--format", "paths"], env=s3.env())
    assert paths.rc == 0 and paths.stdout.decode().split() == [f"{root}d/harbour.jpg"]
    assert run_cli(["search", root, "nowhere"], env=s3.env()).rc == 1


def _dupes_objects() -> dict[str, bytes]:
    same = blocks(1)
    return {
        "p/a.jpg": same,
        "p/d/copy-of-a.jpg": same,  # an exact copy
        "p/near.jpg": blocks(1, quality=60),  # the same picture, other bytes
        "p/z.jpg": blocks(2),  # nothing like them
        "other/a.jpg": same,  # outside the root
    }


def _grouped(stdout: bytes) -> list[list[str]]:
    groups = [json.loads(line) for line in stdout.decode().splitlines()]
    return [sorted(f["path"] for f in g["files"]) for g in groups]


def test_dupes_groups_objects_after_analyze(s3: S3) -> None:
    bucket = s3.bucket(_dupes_objects())
    root = f"s3://{bucket}/p/"
    analyzed = run_cli(["analyze", root, "--provider", "local"], env=s3.env())
    assert analyzed.rc == 0, analyzed.stderr
    res = run_cli(["dupes", root], env=s3.env())
    assert res.rc == 0, res.stderr
    assert _grouped(res.stdout) == [[f"{root}a.jpg", f"{root}d/copy-of-a.jpg", f"{root}near.jpg"]]


FAKE = ["--provider", "fake"]  # a remote provider's results: no pHash to take


def test_dupes_computes_phashes_from_the_objects(s3: S3) -> None:
    bucket = s3.bucket(_dupes_objects())
    root = f"s3://{bucket}/p/"
    analyzed = run_cli(["analyze", root, *FAKE], env=s3.env(), module="tests.fake_cli")
    assert analyzed.rc == 0, analyzed.stderr
    s3.log.clear()
    res = run_cli(["dupes", root], env=s3.env())
    assert res.rc == 0, res.stderr
    assert _grouped(res.stdout) == [[f"{root}a.jpg", f"{root}d/copy-of-a.jpg", f"{root}near.jpg"]]
    assert s3.reads(bucket)  # computed from the objects' bytes
    again = run_cli(["dupes", root], env=s3.env())  # now stored: nothing read
    assert again.rc == 0 and again.stdout == res.stdout, again.stderr


def test_dupes_reads_the_objects_with_the_storage_options(s3: S3) -> None:
    """No AWS_ENDPOINT_URL: the endpoint is only in --storage-option, which `dupes` must
    pass to the reads of the pHashes it computes (a remote provider stored none)."""
    bucket = s3.bucket(_dupes_objects())
    root = f"s3://{bucket}/p/"
    option = ["--storage-option", f"endpoint_url={s3.url}"]
    analyzed = run_cli(["analyze", root, *FAKE, *option], env=CREDS, module="tests.fake_cli")
    assert analyzed.rc == 0, analyzed.stderr
    s3.log.clear()
    res = run_cli(["dupes", root, *option], env=CREDS)
    assert res.rc == 0, res.stderr
    assert _grouped(res.stdout) == [[f"{root}a.jpg", f"{root}d/copy-of-a.jpg", f"{root}near.jpg"]]
    assert s3.reads(bucket)  # read at that endpoint


def test_dupes_takes_the_storage_options_of_the_config_file_and_the_api(
    s3: S3, tmp_path: Path
) -> None:
    import imgbatch

    bucket = s3.bucket(_dupes_objects())
    root = f"s3://{bucket}/p/"
    conf = tmp_path / "imgbatch.toml"
    conf.write_text(f'[storage]\nendpoint_url = "{s3.url}"\n')
    analyzed = run_cli(
        ["analyze", root, *FAKE, "--config", str(conf)], env=CREDS, module="tests.fake_cli"
    )
    assert analyzed.rc == 0, analyzed.stderr
    expected = [[f"{root}a.jpg", f"{root}d/copy-of-a.jpg", f"{root}near.jpg"]]
    # the Python API first: it must not store pHashes it could not compute
    groups = imgbatch.find_dupes(root, storage_option=(f"endpoint_url={s3.url}",))
    assert [sorted(f["path"] for f in g["files"]) for g in groups] == expected
    s3.log.clear()
    res = run_cli(["dupes", root, "--config", str(conf)], env=CREDS)
    assert res.rc == 0, res.stderr
    assert _grouped(res.stdout) == expected
    assert not s3.reads(bucket)  # the API stored them: nothing read again
