"""`--executor dask`: the work of a run on a Dask cluster (the `imgbatch[dask]` extra).

What runs where: the driver (this process) keeps the scan, the plan, the checkpoint,
the limiter and stdout. Workers get a path, the scan's hash and a key-free copy of the
settings (no API key ever leaves the driver) and read the file themselves, so they must
see ROOT at the same path (a shared filesystem; checked on a worker at start):
- the offline analyzer runs whole on the worker; only its result travels back;
- for a remote provider the worker decodes and encodes the upload (~70 KB, never the
  original file's bytes), and the driver sends it through its one shared limiter and
  key pool, from a few threads of its own.

A LocalCluster's workers inherit no secret from the environment (API keys, tokens,
base URLs, which may carry a credential: see `SECRET_VARIABLES`): they are withheld
while its processes start, and a worker the nanny starts again later drops them first.

`distributed.Client.get_executor()` is a real `concurrent.futures.Executor`, so the
loop in `pipeline/run.py` treats this engine as it treats local threads. A worker that dies
loses nothing: Dask runs its tasks again elsewhere. A lost scheduler stops the run.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from imgbatch.config import Settings
from imgbatch.errors import FatalError, ItemError, UsageError
from imgbatch.pipeline.analyzer import Analyzer, elapsed_ms
from imgbatch.pipeline.analyzer import analyse_file as analyse_on_worker
from imgbatch.pipeline.items import Outcome, WorkItem, item_failure
from imgbatch.records import FileRecord

log = logging.getLogger("imgbatch")

PIP = "pip install 'imgbatch[dask]'"
CONNECT_TIMEOUT = 20  # seconds to reach a scheduler, and to reconnect before giving up
#: the environment variables a LocalCluster's workers never see, beside the IMGBATCH_
#: ones of keys (`*API_KEY*`), tokens (`*_TOKEN`) and URLs that may carry a credential
SECRET_VARIABLES = frozenset(
    {
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_CUSTOM_HEADERS",  # may carry a credential too
    }
)
_environ_lock = threading.Lock()  # one LocalCluster starts at a time (os.environ is shared)


def is_secret_variable(name: str) -> bool:
    """Whether the environment variable `name` may hold a secret kept from workers."""
    return name in SECRET_VARIABLES or (
        name.startswith("IMGBATCH_")
        and ("API_KEY" in name or name.endswith(("_TOKEN", "_BASE_URL")))
    )


# -- on the workers --------------------------------------------------------------------


def root_visible(root: str) -> bool:
    """On a worker: whether it sees ROOT (a folder at the same path; for a bucket ROOT,
    the extra that reads it is installed: a UsageError naming it otherwise)."""
    from imgbatch import objectstore

    if objectstore.is_url(root):
        objectstore.check_root(root)
        return True
    return os.path.isdir(root)


def dask_setup(worker: Any) -> None:
    """A LocalCluster worker's preload (this module): drop the secrets from its
    environment before it runs a task. A worker started with the cluster never had them;
    one the nanny starts again later (after a crash) inherits the driver's environment
    as it is then."""
    for name in [n for n in os.environ if is_secret_variable(n)]:
        del os.environ[name]


def prepare_on_worker(
    path: str,
    content_hash: str,
    max_side: int,
    encoder: Any,
    storage_options: tuple[str, ...] = (),
) -> Any:
    """Decode (and encode, given the provider's key-free `encoder`) one file on a worker:
    returns (upload, its size), (PreparedImage, None) without an encoder, or an Outcome
    when the file cannot be decoded. A bucket object is downloaded here, on the worker,
    with the storage options that are no credential (its own credential chain)."""
    from imgbatch.imaging import prepare

    start = time.monotonic()
    try:
        image = prepare(path, max_side, content_hash, storage_options)
        return encoder(image) if encoder is not None else (image, None)
    except ItemError as exc:
        item = WorkItem(FileRecord(path, hash=content_hash), "", "")
        return item_failure(item, exc, "decoding", latency_ms=elapsed_ms(start))


# -- on the driver ----------------------------------------------------------------------


class DaskEngine:
    """Items analysed on a Dask cluster: an existing one (`address`), or a LocalCluster
    of `settings.workers` single-threaded processes on this machine."""

    def __init__(
        self, analyzer: Analyzer, settings: Settings, root: str, address: str | None = None
    ) -> None:
        try:  # typed as a module: distributed ships no annotations for mypy
            distributed = importlib.import_module("distributed")
        except ImportError:
            raise UsageError(f"--executor dask needs the dask extra: {PIP}") from None
        if not log.isEnabledFor(logging.DEBUG):  # its errors are ours to report, in one line
            quiet(logging.CRITICAL)
        self.analyzer = analyzer
        self.provider = analyzer.provider
        self.settings = settings
        # nor the base URLs, which may carry a credential (`?key=...`): no worker needs one
        self._worker_settings = settings.key_free().replace(
            openai_base_url=(), ollama_base_url=(), gemini_base_url="", anthropic_base_url=""
        )
        self._cluster: Any = None
        try:
            if address:
                self._client = distributed.Client(address, timeout=CONNECT_TIMEOUT)
            else:
                preload = importlib.import_module("dask").config.get(
                    "distributed.worker.preload", []
                )
                if isinstance(preload, str):  # one module named alone
                    preload = [preload]
                # both inherited by the worker processes it spawns
                with _sigint_ignored(), _secrets_withheld():
                    self._cluster = distributed.LocalCluster(
                        n_workers=settings.workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        silence_logs=logging.CRITICAL,
                        preload=[*preload, __name__],
                    )
                self._client = distributed.Client(self._cluster, timeout=CONNECT_TIMEOUT)
        except OSError as exc:  # TimeoutError included: no scheduler at that address
            raise UsageError(f"cannot reach the Dask scheduler {address}: {exc}") from None
        self._executor = self._client.get_executor(pure=False)
        self._requests: ThreadPoolExecutor | None = None
        encoder = getattr(self.provider, "upload_encoder", None)
        self._encoder = encoder() if encoder is not None else None
        self._check_root(root)
        where = address or f"a LocalCluster of {settings.workers} processes"
        log.info("executor: dask (%s)", where)

    def _check_root(self, root: str) -> None:
        """Workers read files by path: they must see ROOT where this process does."""
        try:
            seen = self._client.submit(root_visible, root, pure=False).result(
                timeout=CONNECT_TIMEOUT
            )
        except Exception as exc:
            self.shutdown(wait=False)
            raise FatalError(f"the Dask cluster cannot run a task: {exc}") from None
        if not seen:
            self.shutdown(wait=False)
            raise UsageError(
                f"ROOT {root} is not visible to the Dask workers at the same path; they "
                "read the files themselves and need them on a shared filesystem, mounted "
                "at the same path"
            )

    def submit(self, item: WorkItem) -> Future[Outcome]:
        rec = item.rec
        assert rec.hash is not None
        if not self.provider.remote:
            whole: Future[Outcome] = self._executor.submit(
                analyse_on_worker, rec.path, rec.hash, self.provider.name, self._worker_settings
            )
            return whole
        outcome: Future[Outcome] = Future()
        outcome.set_running_or_notify_cancel()
        start = time.monotonic()
        prepared = self._executor.submit(
            prepare_on_worker,
            rec.path,
            rec.hash,
            self.settings.max_side,
            self._encoder,
            self._worker_settings.storage_option,  # key_free: no credential travels
        )

        def send(done: Future[Any]) -> None:  # on the client's thread: hand over at once
            try:
                value = done.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting loop
                outcome.set_exception(exc)
                return
            if isinstance(value, Outcome):
                outcome.set_result(value)
                return
            try:
                future = self._request_pool().submit(self._send, item, value, start)
            except RuntimeError as exc:  # shut down meanwhile
                outcome.set_exception(exc)
                return
            future.add_done_callback(lambda f: _copy(f, outcome))

        prepared.add_done_callback(send)
        return outcome

    def _send(
        self, item: WorkItem, prepared: tuple[Any, tuple[int, int] | None], start: float
    ) -> Outcome:
        body, size = prepared
        if size is None:  # the provider has no worker-side encoder: encode here
            size = body.image.size
            body = self.provider.encode(body)
        return self.analyzer.send(item, body, self.analyzer.tokens(*size), start)

    def _request_pool(self) -> ThreadPoolExecutor:
        if self._requests is None:
            self._requests = ThreadPoolExecutor(self.settings.workers, "imgbatch-request")
        return self._requests

    def flush(self) -> None:
        pass  # every item is sent as it comes

    def capacity(self) -> int:
        return 0

    def check(self, failed: bool = False) -> None:
        """A lost scheduler stops the run. After a failed future (`failed`), a client
        that is not running (reconnecting, or given up) means the same."""
        status = self._client.status
        if status in ("closing", "closed") or (failed and status != "running"):
            raise FatalError(
                "lost the Dask scheduler; what finished is recorded: run again to resume"
            )

    def shutdown(self, wait: bool) -> None:
        if self._requests is not None:
            self._requests.shutdown(wait=wait, cancel_futures=True)
        try:
            self._executor.shutdown(wait=False)
            self._client.close(timeout=5)
            if self._cluster is not None:
                self._cluster.close(timeout=5)
        except Exception:  # closing is best effort: a lost scheduler cannot be told
            log.debug("closing the Dask client", exc_info=True)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a LocalCluster starts its processes, which inherit that (and
    Python keeps an ignored SIGINT ignored). A Ctrl-C in the terminal goes to the whole
    process group: the driver alone must see it and stop gracefully, while the workers
    finish the items in flight within the grace period instead of dying with them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal dispositions can only be changed from the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _secrets_withheld() -> Iterator[None]:
    """The secret variables (`is_secret_variable`) out of this process's environment
    while a LocalCluster spawns its workers, which inherit it: none of its processes
    starts with an API key. The driver's provider holds its keys already; the variables
    are back as they were as soon as the workers are up."""
    with _environ_lock:
        withheld = {n: v for n, v in os.environ.items() if is_secret_variable(n)}
        for name in withheld:
            del os.environ[name]
        try:
            yield
        finally:
            os.environ.update(withheld)


def quiet(level: int) -> None:
    """Dask's own loggers (it sets some levels itself, e.g. distributed.client) log at
    `level` and above only."""
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(level)
    logging.getLogger("distributed").setLevel(level)


def _copy(source: Future[Outcome], target: Future[Outcome]) -> None:
    if source.cancelled():
        target.cancel()
        return
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())
