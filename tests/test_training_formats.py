"""`imgbatch export --format hf | labelstudio` through the real CLI, over results of the
fake Gemini server: the `metadata.jsonl` is loaded by the real Hugging Face `datasets`
library (offline), the Label Studio tasks are checked against their documented shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, make_image, run_cli
from tests.fakegemini import FakeGemini, RecordedRequest

KEY = "test-key-SECRET-0123456789"

ANSWERS: dict[int, dict[str, Any]] = {
    40: {"description": "A red car.", "tags": ["car", "red"], "objects": ["car"]},
    41: {"description": "A blue\nsky.", "tags": ["sky"], "objects": []},
    42: {"description": "Café crème.", "tags": [], "objects": ["cup"]},
}


def answer(request: RecordedRequest) -> dict[str, Any]:
    found = ANSWERS.get(request.images[0].width or 0, {"description": "Other.", "tags": ["x"]})
    return {"objects": [], "colors": ["gray"], "mood": "calm", "text": "", **found}


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(keys={KEY}, seed=3) as fake:
        fake.set_responder(answer)
        yield fake
        assert fake.errors == []


def analyze(server: FakeGemini, root: Path) -> None:
    env = {"GEMINI_API_KEY": KEY, "IMGBATCH_GEMINI_BASE_URL": server.url, "IMGBATCH_RPM": "6000"}
    res = run_cli(["analyze", root], env=env)
    assert res.rc == 0, res.stderr


def export(root: Path, *args: str | Path) -> CliResult:
    return run_cli(["export", root, *args])


def image(path: Path, width: int) -> Path:
    return make_image(path, size=(width, 30))


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# A name that is not UTF-8 (Latin-1 "é"), as an old camera or a Windows share leaves them.
LATIN1 = os.fsdecode(b"caf\xe9.jpg")


@pytest.fixture
def dataset(gemini: FakeGemini, tmp_path: Path) -> Path:
    """D/images (ROOT): a.jpg, sub/b.png, c.jpg, and a Latin-1 name; analysed."""
    root = tmp_path / "D" / "images"
    image(root / "a.jpg", 40)
    image(root / "sub" / "b.png", 41)
    image(root / "c.jpg", 42)
    image(root / LATIN1, 43)
    analyze(gemini, root)
    return root


class TestHuggingFace:
    def test_metadata_loads_in_the_real_datasets_library(
        self, dataset: Path, tmp_path: Path
    ) -> None:
        pytest.importorskip("datasets")
        target = dataset.parent / "metadata.jsonl"
        image(dataset / "c.jpg", 60)  # changed since it was analysed
        res = export(dataset, "--format", "hf", "-o", target)
        assert res.rc == 0, res.stderr
        assert "exported 2 records" in res.stderr
        assert f"left out {dataset / 'c.jpg'}: gone or changed" in res.stderr
        assert "its name is not UTF-8" in res.stderr
        lines = jsonl(target)
        assert [line["file_name"] for line in lines] == ["images/a.jpg", "images/sub/b.png"]
        assert lines[0] == {
            "file_name": "images/a.jpg",
            "text": "A red car.",
            "tags": ["car", "red"],
            "objects": ["car"],
            "colors": ["gray"],
            "hash": lines[0]["hash"],
        }
        assert len(lines[0]["hash"]) > 8

        loaded = load_imagefolder(target.parent, tmp_path)
        assert loaded == [
            [str(dataset / "a.jpg"), "A red car.", ["car", "red"], lines[0]["hash"]],
            [str(dataset / "sub" / "b.png"), "A blue\nsky.", ["sky"], lines[1]["hash"]],
        ]

    def test_root_outside_the_output_folder_is_exit_2_writing_nothing(
        self, dataset: Path, tmp_path: Path
    ) -> None:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        res = export(dataset, "--format", "hf", "-o", elsewhere / "metadata.jsonl")
        assert res.rc == 2
        assert "must be inside the folder of" in res.stderr
        assert list(elsewhere.iterdir()) == []
        # a sibling whose name starts the same is not "inside" either
        sibling = tmp_path / "D" / "imag"
        sibling.mkdir()
        res = export(dataset, "--format", "hf", "-o", sibling / "metadata.jsonl")
        assert res.rc == 2 and list(sibling.iterdir()) == []
        # inside a folder reached through a symlink: the resolved ROOT counts
        link = tmp_path / "link"
        link.symlink_to(tmp_path / "D")
        res = export(dataset, "--format", "hf", "-o", link / "metadata.jsonl")
        assert res.rc == 0, res.stderr
        res = export(dataset, "--format", "hf")
        assert res.rc == 2 and "--format hf needs --output" in res.stderr
        res = export(dataset, "--format", "hf", "-o", link / "m.jsonl", "--status", "error")
        assert res.rc == 2 and "ok results only" in res.stderr


def load_imagefolder(data_dir: Path, tmp_path: Path) -> list[list[Any]]:
    """The rows `load_dataset("imagefolder", data_dir=...)` gives (image path, text, tags,
    hash), offline, with its caches under tmp_path; in a subprocess, as `datasets` reads
    its settings from the environment when it is imported."""
    code = (
        "import json, sys\n"
        "from datasets import Image, load_dataset\n"
        "ds = load_dataset('imagefolder', data_dir=sys.argv[1], split='train')\n"
        "ds = ds.cast_column('image', Image(decode=False))\n"
        "rows = [[r['image']['path'], r['text'], r['tags'], r['hash']] for r in ds]\n"
        "print(json.dumps(rows))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data_dir)],
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    rows: list[list[Any]] = json.loads(proc.stdout.splitlines()[-1])
    return sorted(rows)


class TestLabelStudio:
    def test_tasks_have_the_documented_shape(self, dataset: Path, tmp_path: Path) -> None:
        target = tmp_path / "tasks.json"
        res = export(dataset, "--format", "labelstudio", "-o", target)
        assert res.rc == 0, res.stderr
        assert "its name is not UTF-8" in res.stderr  # an absolute path JSON cannot hold
        tasks = json.loads(target.read_text(encoding="utf-8"))
        assert isinstance(tasks, list) and len(tasks) == 3
        by_image = {t["data"]["image"]: t for t in tasks}
        assert sorted(by_image) == sorted(str(dataset / n) for n in ("a.jpg", "sub/b.png", "c.jpg"))
        for task in tasks:
            assert set(task) == {"data", "predictions"}
            assert set(task["data"]) == {"image"}
            (prediction,) = task["predictions"]
            assert set(prediction) == {"model_version", "result"}
            assert prediction["model_version"].startswith("gemini")
            for region in prediction["result"]:
                assert set(region) == {"from_name", "to_name", "type", "value"}
                assert region["to_name"] == "image"
        assert by_image[str(dataset / "a.jpg")]["predictions"][0]["result"] == [
            {
                "from_name": "tags",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["car", "red"]},
            },
            {
                "from_name": "caption",
                "to_name": "image",
                "type": "textarea",
                "value": {"text": ["A red car."]},
            },
        ]
        # no tags: no empty choices region
        assert by_image[str(dataset / "c.jpg")]["predictions"][0]["result"] == [
            {
                "from_name": "caption",
                "to_name": "image",
                "type": "textarea",
                "value": {"text": ["Café crème."]},
            }
        ]
        # to stdout as well
        res = export(dataset, "--format", "labelstudio")
        assert res.rc == 0 and json.loads(res.stdout) == tasks

    def test_root_url_quotes_the_path_relative_to_root(
        self, gemini: FakeGemini, tmp_path: Path
    ) -> None:
        root = tmp_path / "photos"
        image(root / "Été 2024" / "my photo é#1.jpg", 40)
        image(root / LATIN1, 41)
        analyze(gemini, root)
        url = "/data/local-files/?d=Pictures/"
        res = export(root, "--format", "labelstudio", "--ls-root-url", url)
        assert res.rc == 0, res.stderr
        images = sorted(t["data"]["image"] for t in json.loads(res.stdout))
        assert images == [
            "/data/local-files/?d=Pictures/%C3%89t%C3%A9%202024/my%20photo%20%C3%A9%231.jpg",
            "/data/local-files/?d=Pictures/caf%E9.jpg",  # the name's own byte
        ]
        res = export(root, "--format", "jsonl", "--ls-root-url", url)
        assert res.rc == 2 and "--ls-root-url goes with --format labelstudio" in res.stderr

    def test_an_empty_export_is_an_empty_array(self, tmp_path: Path, gemini: FakeGemini) -> None:
        root = tmp_path / "photos"
        image(root / "a.jpg", 40)
        analyze(gemini, root)
        (root / "a.jpg").unlink()
        res = export(root, "--format", "labelstudio")
        assert res.rc == 0, res.stderr
        assert json.loads(res.stdout) == []
        assert f"left out {root / 'a.jpg'}: gone or changed" in res.stderr
