"""Bucket roots (issue 24 item 1) through the real CLI and the real s3fs, against moto's S3
server on 127.0.0.1 (a WSGI middleware in front of it counts requests and scripts faults)."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import boto3  # noqa: E402  (after the skips: moto brings boto3)
import xxhash  # noqa: E402
from PIL import Image  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from tests.conftest import REPO, run_and_kill, run_cli  # noqa: E402

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3:
    """moto's S3 server, its request log and scripted faults."""

    url: str
    client: Any
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    signers: list[tuple[str, str, str]] = field(default_factory=list)  # + access key id
    busy: int = 0  # object GETs being answered now
    most_busy: int = 0  # the most at once
    #: (method, path) -> a WSGI responder used instead of moto, as many times as listed
    faults: dict[tuple[str, str], list[Callable[..., Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bucket(self, objects: dict[str, bytes]) -> str:
        name = "b-" + uuid.uuid4().hex[:12]
        self.client.create_bucket(Bucket=name)
        for key, body in objects.items():
            self.client.put_object(Bucket=name, Key=key, Body=body)
        self.log.clear()
        self.signers.clear()
        return name

    def reads(self, bucket: str) -> list[tuple[str, str]]:
        """The GET and HEAD requests of objects (not listings) in `bucket`."""
        return [
            (m, p)
            for m, p in self.log
            if m in ("GET", "HEAD") and p.startswith(f"/{bucket}/") and p != f"/{bucket}/"
        ]

    def lists(self, bucket: str) -> int:
        return sum(1 for m, p in self.log if m == "GET" and p.rstrip("/") == f"/{bucket}")

    def env(self, **more: str) -> dict[str, str]:
        return {**CREDS, "AWS_ENDPOINT_URL": self.url, **more}


def _error(status: str, code: str) -> Callable[..., Any]:
    def respond(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        start(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    return respond


def _cut_short(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
    """Promise 5,000 bytes, send 10, then close the connection."""
    start(
        "206 Partial Content", [("Content-Length", "5000"), ("Content-Range", "bytes 0-4999/5000")]
    )
    return [b"0123456789"]


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3]:
    from moto.server import DomainDispatcherApplication, create_backend_app

    app = DomainDispatcherApplication(create_backend_app)
    state = S3("", None)

    def counted(environ: dict[str, Any], start: Callable[..., Any]) -> Any:
        key = (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
        signed = re.search(r"Credential=([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        with state.lock:
            state.log.append(key)
            state.signers.append((*key, signed.group(1) if signed else ""))
            scripted = state.faults.get(key) or state.faults.get((key[0], "*"))
            fault = scripted.pop(0) if scripted else None
        if fault is not None:
            return fault(environ, start)
        reading = key[0] == "GET" and key[1].count("/") > 1  # an object, not a listing
        if not reading:
            return app(environ, start)
        with state.lock:
            state.busy += 1
            state.most_busy = max(state.most_busy, state.busy)
        try:
            return app(environ, start)
        finally:
            with state.lock:
                state.busy -= 1

    server = make_server("127.0.0.1", 0, counted, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}"
    state.client = boto3.client("s3", endpoint_url=state.url, **_boto_creds())
    yield state
    server.shutdown()


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
    }


@pytest.fixture
def s3(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for name, value in CREDS.items():
        monkeypatch.setenv(name, value)
    s3_server.log.clear()
    s3_server.signers.clear()
    s3_server.faults.clear()
    s3_server.most_busy = 0
    yield s3_server
    s3_server.faults.clear()


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (33, 21), (seed % 256, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


# -- scan ---------------------------------------------------------------------------


def test_scan_lists_a_prefix_with_hashes_of_the_bytes(s3: S3) -> None:
    objects = {
        "photos/a.jpg": jpeg(1),
        "photos/sub/b c ü.png": png(2),  # the key as stored, never percent-encoded
        "photos/sub/": b"",  # a folder marker
        "photos/notes.txt": b"not an image",
        "photos/.hidden/d.jpg": jpeg(3),
        "photos2/e.jpg": jpeg(4),  # beside the prefix, not under it
        "other/f.jpg": jpeg(5),
    }
    bucket = s3.bucket(objects)
    res = run_cli(["scan", f"s3://{bucket}/photos"], env=s3.env())
    assert res.rc == 0, res.stderr
    recs = res.records
    assert [r["path"] for r in recs] == [
        f"s3://{bucket}/photos/a.jpg",
        f"s3://{bucket}/photos/sub/b c ü.png",
    ]
    for rec in recs:
        body = objects[rec["path"].split("/", 3)[3]]
        assert rec["hash"] == xxh(body)
        assert rec["size"] == len(body)
        assert rec["status"] == "ok" and rec["mtime"].endswith("Z")
    head = s3.client.head_object(Bucket=bucket, Key="photos/a.jpg")
    assert recs[0]["mtime"].startswith(head["LastModified"].strftime("%Y-%m-%dT%H:%M:%S"))
    # --all-files and --include-hidden as on disk; still no folder marker
    res = run_cli(
        ["scan", f"s3://{bucket}/photos/", "--all-files", "--include-hidden"], env=s3.env()
    )
    keys = [r["path"].split("/", 3)[3] for r in res.records]
    assert keys == [
        "photos/.hidden/d.jpg",
        "photos/a.jpg",
        "photos/notes.txt",
        "photos/sub/b c ü.png",
    ]


@pytest.mark.slow
def test_listing_is_paginated_and_reads_are_bounded(s3: S3) -> None:
    from concurrent.futures import ThreadPoolExecutor

    objects = {f"p/{i:04d}.jpg": jpeg(i, (8, 8)) for i in range(1005)}
    bucket = s3.bucket({})
    with ThreadPoolExecutor(8) as pool:  # moto pages at 1,000 keys like S3
        list(
            pool.map(
                lambda kv: s3.client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]),
                objects.items(),
            )
        )
    s3.log.clear()
    s3.most_busy = 0
    res = run_cli(["scan", f"s3://{bucket}/", "--hash-threads", "3"], env=s3.env(), timeout=300)
    assert res.rc == 0, res.stderr
    assert [r["path"] for r in res.records] == [f"s3://{bucket}/{k}" for k in sorted(objects)]
    assert all(r["hash"] == xxh(objects[r["path"].split("/", 3)[3]]) for r in res.records)
    assert s3.lists(bucket) == 2  # two pages
    assert len(s3.reads(bucket)) == 1005  # one GET each, no HEAD
    assert 1 <= s3.most_busy <= 3  # --hash-threads objects read at once, at most


def test_rescan_of_an_unchanged_bucket_makes_list_requests_only(s3: S3) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1), "b/c.jpg": jpeg(2), "b/d.png": png(3)})
    first = run_cli(["scan", f"s3://{bucket}"], env=s3.env())
    assert first.rc == 0 and len(s3.reads(bucket)) == 3
    s3.log.clear()
    again = run_cli(["scan", f"s3://{bucket}"], env=s3.env())
    assert again.rc == 0, again.stderr
    assert again.records == first.records
    assert s3.reads(bucket) == [] and s3.lists(bucket) == 1
    assert "3 from the hash cache" in again.stderr
    # an overwritten object (new LastModified, ETag) is read again, and only it
    s3.client.put_object(Bucket=bucket, Key="b/c.jpg", Body=jpeg(9))
    s3.log.clear()
    third = run_cli(["scan", f"s3://{bucket}"], env=s3.env())
    assert s3.reads(bucket) == [("GET", f"/{bucket}/b/c.jpg")]
    assert third.records[1]["hash"] == xxh(jpeg(9))


def test_analyze_shares_the_scan_hash_cache(s3: S3) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1), "x/b.png": png(2)})
    assert run_cli(["scan", f"s3://{bucket}/"], env=s3.env()).rc == 0
    s3.log.clear()
    res = run_cli(["analyze", f"s3://{bucket}/", "--provider", "local"], env=s3.env())
    assert res.rc == 0, res.stderr
    widths = {r["path"]: r["result"]["width"] for r in res.records if r["status"] == "ok"}
    assert widths == {f"s3://{bucket}/a.jpg": 40, f"s3://{bucket}/x/b.png": 33}
    gets = [p for m, p in s3.reads(bucket) if m == "GET"]
    # each object downloaded once, to be analysed (the scan's hashes came from the cache)
    assert sorted(gets) == [f"/{bucket}/a.jpg", f"/{bucket}/x/b.png"]
    s3.log.clear()
    again = run_cli(["analyze", f"s3://{bucket}/", "--provider", "local"], env=s3.env())
    assert again.rc == 0 and again.records == []
    assert s3.reads(bucket) == []


# -- failures -------------------------------------------------------------------------


def test_per_object_failures_are_io_error_records(s3: S3) -> None:
    bucket = s3.bucket(
        {"a.jpg": jpeg(1), "denied.jpg": jpeg(2), "gone.jpg": jpeg(3), "short.jpg": jpeg(4)}
    )
    s3.faults[("GET", f"/{bucket}/denied.jpg")] = [_error("403 Forbidden", "AccessDenied")] * 9
    s3.faults[("GET", f"/{bucket}/gone.jpg")] = [_error("404 Not Found", "NoSuchKey")] * 9
    s3.faults[("GET", f"/{bucket}/short.jpg")] = [_cut_short] * 9
    res = run_cli(["scan", f"s3://{bucket}/"], env=s3.env(), timeout=300)
    assert res.rc == 1, res.stderr
    by_key = {r["path"].rsplit("/", 1)[1]: r for r in res.records}
    assert by_key["a.jpg"]["status"] == "ok"
    for key in ("denied.jpg", "gone.jpg", "short.jpg"):
        rec = by_key[key]
        assert rec["status"] == "error" and rec["error"]["code"] == "IO_ERROR", rec
        assert rec["hash"] is None
    assert "access denied" in by_key["denied.jpg"]["error"]["message"]
    assert "no such object" in by_key["gone.jpg"]["error"]["message"]
    assert "testing" not in res.stdout.decode() + res.stderr


def test_throttling_is_retried(s3: S3) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    slow = _error("503 Slow Down", "SlowDown")
    s3.faults[("GET", f"/{bucket}")] = [slow, slow]  # the listing
    s3.faults[("GET", f"/{bucket}/b.jpg")] = [slow]
    res = run_cli(["scan", f"s3://{bucket}"], env=s3.env())
    assert res.rc == 0, res.stderr
    assert [r["hash"] for r in res.records] == [xxh(jpeg(1)), xxh(jpeg(2))]
    assert s3.lists(bucket) == 3


def test_missing_bucket_is_fatal_and_named(s3: S3) -> None:
    res = run_cli(["scan", "s3://no-such-bucket-here/p/"], env=s3.env())
    assert res.rc == 5
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bucket-here" in lines[0] and s3.url in lines[0]
    res = run_cli(["analyze", "s3://no-such-bucket-here/", "--provider", "local"], env=s3.env())
    assert res.rc == 5
    (line,) = res.stderr.strip().splitlines()  # nothing seen: the error alone, no summary
    assert "bucket not found: s3://no-such-bucket-here" in line


def test_unreachable_endpoint_is_fatal_and_named(s3: S3) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_MAX_ATTEMPTS="1")
    res = run_cli(["scan", "s3://any/"], env=env, timeout=300)
    assert res.rc == 5, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "s3://any" in lines[0]


@pytest.mark.parametrize(
    ("url", "module", "extra"), [("s3://b/p/", "s3fs", "s3"), ("gs://b/p/", "gcsfs", "gcs")]
)
def test_missing_extra_is_a_usage_error(url: str, module: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv = ['imgbatch', 'scan', {url!r}]; "
        "from imgbatch.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 2
    assert f"pip install 'imgbatch[{extra}]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- options and credentials ---------------------------------------------------------


def test_a_dry_run_reads_each_header_with_the_storage_options(s3: S3) -> None:
    """The endpoint only in `--storage-option`: a dry run measures each object there, as
    the run itself would read it (a 120x90 image: 120*90/750 = 14 tokens for Anthropic,
    plus the prompt's)."""
    bucket = s3.bucket({"a.jpg": jpeg(1, (120, 90)), "b.jpg": jpeg(2, (120, 90))})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(CREDS, AWS_EC2_METADATA_DISABLED="true")
    res = run_cli(
        ["analyze", f"s3://{bucket}/", "--provider", "anthropic", "--dry-run"]
        + ["--storage-option", f"endpoint_url={s3.url}"],
        env={**env, "IMGBATCH_ANTHROPIC_API_KEY": "sk-ant-dry"},
        timeout=300,
    )
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["would-send", "would-send"], res.records
    image_tokens = round(120 * 90 / 750)
    assert all(r["estimated_tokens"] > image_tokens for r in res.records)
    assert res.records[0]["estimated_tokens"] == res.records[1]["estimated_tokens"]


def test_storage_options_from_flags_and_config_and_no_credential_stored(
    s3: S3, tmp_path: Path
) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    key_id, secret = "AKIDSECRETIDENT1", "s3cr3t-VALUE-never-shown"
    flags = [
        "--storage-option",
        f"endpoint_url={s3.url}",
        "--storage-option",
        f"key={key_id}",
        "--storage-option",
        f"secret={secret}",
    ]
    res = run_cli(["scan", f"s3://{bucket}", *flags, "--verbose"], env=env)
    assert res.rc == 0, res.stderr
    assert res.records[0]["hash"] == xxh(jpeg(1))
    # the config file's [storage] pairs (a flag overrides one)
    conf = tmp_path / "imgbatch.toml"
    conf.write_text(
        f'[storage]\nendpoint_url = "http://127.0.0.1:9"\nkey = "{key_id}"\nsecret = "{secret}"\n'
    )
    res = run_cli(
        ["analyze", f"s3://{bucket}", "--provider", "local", "--config", str(conf), "--verbose"]
        + ["--storage-option", f"endpoint_url={s3.url}"],
        env=env,
    )
    assert res.rc == 0, res.stderr
    assert [r["status"] for r in res.records] == ["ok"]
    outputs = [res.stdout.decode(), res.stderr]
    for cmd in (["runs", "--json"], ["status", "--json"], ["export"]):
        shown = run_cli([*cmd, f"s3://{bucket}"], env=env)
        assert shown.rc == 0, shown.stderr
        outputs += [shown.stdout.decode(), shown.stderr]
    cache = Path(os.environ["XDG_CACHE_HOME"])
    for path in cache.rglob("*"):
        if path.is_file():
            outputs.append(path.read_bytes().decode("latin-1"))
    assert outputs and all(secret not in text and key_id not in text for text in outputs)


# -- a run killed, then resumed -------------------------------------------------------


def test_analyze_killed_then_resumed(s3: S3) -> None:
    objects = {f"k/{i:02d}.jpg": jpeg(i) for i in range(30)}
    bucket = s3.bucket(objects)
    # the fake remote provider: each item committed on its own, a little slow
    env = {**os.environ, **s3.env(), "IMGBATCH_TEST_FAKE": json.dumps({"delay": 0.05})}
    env["IMGBATCH_RPM"] = "60000"
    env.pop("PYTHONPATH", None)
    args = [sys.executable, "-m", "tests.fake_cli", "analyze", "--provider", "fake"]
    args += ["--workers", "2", f"s3://{bucket}/"]
    rng = random.Random(24)
    outputs = run_and_kill(args, env, rng, (3, 10))
    final = subprocess.run(args, capture_output=True, env=env, cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr.decode()
    assert "an earlier run was killed" in final.stderr.decode()
    resumed = [json.loads(line) for line in final.stdout.splitlines()]
    assert 0 < len(resumed) < 30  # the first run's committed items are not done again
    ok = Counter(r["path"] for r in outputs + resumed if r["status"] == "ok")
    assert set(ok) == {f"s3://{bucket}/{k}" for k in objects}
    # a line is repeated only if the kill fell between writing it and committing it
    assert sum(ok.values()) - len(objects) <= 1


# -- the reading surfaces ------------------------------------------------------------


def test_status_runs_export_over_a_bucket_root(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1), "d/b.jpg": jpeg(2)})
    root = f"s3://{bucket}/"
    assert run_cli(["analyze", root, "--provider", "local"], env=s3.env()).rc == 0
    status = run_cli(["status", root, "--json"], env=s3.env())
    assert status.rc == 0, status.stderr
    assert json.loads(status.stdout)["root"] == root
    runs = run_cli(["runs", root, "--json"], env=s3.env())
    assert runs.rc == 0 and len(runs.stdout.splitlines()) == 1
    exported = run_cli(["export", root], env=s3.env())
    assert exported.rc == 0, exported.stderr
    assert [r["path"] for r in exported.records] == [f"{root}a.jpg", f"{root}d/b.jpg"]
    csv = run_cli(["export", root, "--format", "csv"], env=s3.env())
    assert csv.rc == 0 and f"{root}d/b.jpg" in csv.stdout.decode()
    for fmt in ("xmp", "captions"):
        res = run_cli(["export", root, "--format", fmt], env=s3.env())
        assert res.rc == 2 and "bucket" in res.stderr, res.stderr
    res = run_cli(
        ["export", root, "--format", "hf", "--output", str(tmp_path / "metadata.jsonl")],
        env=s3.env(),
    )
    assert res.rc == 2 and "bucket" in res.stderr, res.stderr


# -- Dask -----------------------------------------------------------------------------


@pytest.mark.slow
def test_dask_workers_download_with_their_own_credentials(s3: S3) -> None:
    pytest.importorskip("distributed")
    bucket = s3.bucket({"a.jpg": jpeg(1), "d/b.png": png(2), "d/c.jpg": jpeg(3)})
    driver_key, driver_secret = "AKIDDRIVERONLY", "driver-secret-not-for-workers"
    # the workers' credential chain: the environment's AWS_* variables (moto takes any)
    env = s3.env(AWS_ACCESS_KEY_ID="AKIDWORKERENV")
    res = run_cli(
        ["analyze", f"s3://{bucket}/", "--provider", "local", "--executor", "dask"]
        + ["--workers", "1", "--storage-option", f"key={driver_key}"]
        + ["--storage-option", f"secret={driver_secret}"],
        env=env,
        timeout=300,
    )
    assert res.rc == 0, res.stderr
    assert sorted(r["status"] for r in res.records) == ["ok"] * 3
    reads = [(m, p, who) for m, p, who in s3.signers if p.startswith(f"/{bucket}/")]
    listing = [who for m, p, who in s3.signers if p.rstrip("/") == f"/{bucket}"]
    assert listing and set(listing) == {driver_key}  # the driver lists with its options
    # the driver hashed each object once (the scan); the worker downloaded each to analyse
    # it, signed with its own chain: the driver's key and secret never reached it
    gets = Counter(who for m, _, who in reads if m == "GET")
    assert gets == {driver_key: 3, "AKIDWORKERENV": 3}, reads
    assert {who for m, _, who in reads if m == "HEAD"} <= {"AKIDWORKERENV"}
    assert driver_secret not in res.stderr and driver_key not in res.stderr


def test_report_reads_its_thumbnails_from_the_objects(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    root = f"s3://{bucket}/"
    assert run_cli(["analyze", root, "--provider", "local"], env=s3.env()).rc == 0
    s3.client.put_object(Bucket=bucket, Key="b.jpg", Body=jpeg(7))  # changed since
    out = tmp_path / "report.html"
    res = run_cli(["report", root, "--output", str(out)], env=s3.env())
    assert res.rc == 0, res.stderr
    assert "2 items, 1 with a thumbnail" in res.stderr
    html = out.read_text()
    assert html.count("data:image/jpeg;base64,") == 1
    assert "changed since it was analysed" in html


def test_python_api_scans_a_bucket_and_bad_options_are_usage_errors(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgbatch
    from imgbatch.errors import UsageError

    bucket = s3.bucket({"p/a.jpg": jpeg(1), "p/b.txt": b"text"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    recs = list(imgbatch.scan(f"s3://{bucket}/p"))
    assert [(r["path"], r["hash"]) for r in recs] == [(f"s3://{bucket}/p/a.jpg", xxh(jpeg(1)))]
    listed = list(imgbatch.scan(f"s3://{bucket}/p", hash=False, all_files=True))
    assert [(r["path"], r["hash"], r["size"]) for r in listed] == [
        (f"s3://{bucket}/p/a.jpg", None, len(jpeg(1))),
        (f"s3://{bucket}/p/b.txt", None, 4),
    ]
    with pytest.raises(UsageError, match="KEY=VALUE") as raised:
        list(imgbatch.scan(f"s3://{bucket}/p", storage_option=("s3cr3t-without-equals",)))
    assert "s3cr3t" not in str(raised.value)
    res = run_cli(["scan", f"s3://{bucket}/", "--storage-option", "not-a-pair"], env=s3.env())
    assert res.rc == 2 and "KEY=VALUE" in res.stderr and res.stdout == b""
    res = run_cli(["scan", "s3:///nobucket"], env=s3.env())
    assert res.rc == 2 and "no bucket" in res.stderr


def test_watch_and_ocr_refuse_a_bucket_root(s3: S3) -> None:
    bucket = s3.bucket({"a.jpg": jpeg(1)})
    res = run_cli(["watch", f"s3://{bucket}/"], env=s3.env())
    assert res.rc == 2 and "local folder" in res.stderr, res.stderr
    res = run_cli(["analyze", f"s3://{bucket}/", "--provider", "local", "--ocr"], env=s3.env())
    assert res.rc == 2 and "--ocr is for local folders" in res.stderr, res.stderr
    assert s3.reads(bucket) == []


def test_offline_worker_processes_read_objects_with_the_storage_options(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big offline run moves to worker processes (engines.procs): on this machine, they
    get the storage options whole, credentials included (no AWS_* variable here)."""
    from imgbatch.config import Settings
    from imgbatch.pipeline.analyzer import Analyzer
    from imgbatch.pipeline.engines.local import LocalEngine
    from imgbatch.pipeline.items import WorkItem
    from imgbatch.providers.local import LocalProvider
    from imgbatch.scanner import Scanner

    bucket = s3.bucket({f"{i}.jpg": jpeg(i) for i in range(6)})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    pairs = (f"endpoint_url={s3.url}", "key=AKIDOPTIONSONLY", "secret=from-the-options")
    settings = Settings(storage_option=pairs)
    items = [WorkItem(rec, "", rec.path) for rec in Scanner(f"s3://{bucket}/", settings)]
    assert [rec.ok for rec in (item.rec for item in items)] == [True] * 6
    engine = LocalEngine(
        Analyzer(settings, LocalProvider(settings)), workers=2, procs=2, start_procs=lambda n: True
    )
    try:
        first = engine.submit(items[0])  # starts the processes
        first.result(timeout=120)
        deadline = time.monotonic() + 120
        while not (engine._procs is not None and engine._procs.usable()):
            assert time.monotonic() < deadline, "the processes never started"
            time.sleep(0.05)
        futures = [engine.submit(item) for item in items[1:]]
        engine.flush()
        outcomes = [f.result(timeout=120) for f in futures]
    finally:
        engine.shutdown(wait=True)
    assert [o.status for o in outcomes] == ["ok"] * 5, [o.error_message for o in outcomes]
    signers = {who for m, p, who in s3.signers if m == "GET" and p.startswith(f"/{bucket}/")}
    assert signers == {"AKIDOPTIONSONLY"}
