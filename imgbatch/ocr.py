"""Offline OCR (`analyze --ocr`): rapidocr's PP-OCRv6 models from its wheel, on processes.

The only module that imports rapidocr and onnxruntime (the `ocr` extra). OCR reads the
full-size, EXIF-rotated image (a second decode: the analyzer's 768 px image is too small
for small print). Recognition costs 0.5-3 s of onnxruntime per image, whose own thread
pool overloads the cores when several images run at once, so `TextReader` runs it on
worker processes of its own, one per core (or fewer, `--workers`), each with one
onnxruntime thread and the models loaded once. In a process that is itself a worker
(the analyzer's processes, a Dask worker) it reads inline: that process is the one per
core already.

Nothing is downloaded: the model files are given by path, from rapidocr's own wheel
(3.9 or later ships them), so rapidocr never reaches its download code.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from imgbatch.errors import ErrorCode, ItemError, UsageError

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("imgbatch")

INSTALL = "pip install 'imgbatch[ocr]'"
#: the models rapidocr >= 3.9 ships inside its wheel (det, rec, and the 0/180 degree
#: classifier), by rapidocr's config section; their names are part of the fingerprint
MODELS = {
    "Det": "PP-OCRv6_det_small.onnx",
    "Rec": "PP-OCRv6_rec_small.onnx",
    "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}


class TextBox(TypedDict):
    """One line of text read: its text, confidence 0-1 and four [x, y] corners in pixels
    of the full-size, EXIF-rotated image (clockwise from top left)."""

    text: str
    confidence: float
    box: list[list[int]]


def _spec_dir(name: str) -> Path | None:
    """The package folder of `name`, without importing it (None: not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def model_version() -> str:
    """rapidocr's version and the model files it reads: part of the fingerprint.

    Raises:
        UsageError: rapidocr or onnxruntime is not installed, or this rapidocr does not
            ship the PP-OCRv6 models (older than 3.9), naming the pip command.
    """
    found = _spec_dir("rapidocr")
    if found is None or _spec_dir("onnxruntime") is None:
        raise UsageError(f"--ocr needs rapidocr and onnxruntime: {INSTALL}")
    version = metadata.version("rapidocr")
    if not all((found / "models" / file).is_file() for file in MODELS.values()):
        raise UsageError(
            f"--ocr needs rapidocr 3.9 or later (its wheel ships the PP-OCRv6 models), "
            f"not {version}: {INSTALL} --upgrade"
        )
    return f"rapidocr-{version}:" + "+".join(file.removesuffix(".onnx") for file in MODELS.values())


# -- in the process that reads ------------------------------------------------------------

_engine: Any = None
_engine_lock = threading.Lock()
_verbose = False


def _load() -> Any:
    """This process's RapidOCR, built once: the wheel's models, one onnxruntime thread."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from rapidocr import RapidOCR

            models = _spec_dir("rapidocr")
            assert models is not None
            params: dict[str, Any] = {
                # rapidocr logs each model it loads at INFO on stderr: only with --verbose
                "Global.log_level": "info" if _verbose else "critical",
                "EngineConfig.onnxruntime.intra_op_num_threads": 1,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
            for section, file in MODELS.items():
                params[f"{section}.model_path"] = str(models / "models" / file)
            _engine = RapidOCR(params=params)
        return _engine


def read_text(path: str) -> list[TextBox]:
    """The text of the image at `path`, read in this process, in reading order (top to
    bottom, then left to right, as rapidocr sorts its boxes)."""
    from PIL import Image, ImageOps

    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    found = _load()(image)
    if found.boxes is None or found.txts is None:
        return []
    return [
        {
            "text": str(text),
            "confidence": round(float(score), 4),
            "box": [[round(float(x)), round(float(y))] for x, y in box],
        }
        for box, text, score in zip(found.boxes, found.txts, found.scores, strict=True)
    ]


def _worker_init(verbose: bool) -> None:
    import signal

    global _verbose
    # a terminal's Ctrl-C reaches the whole process group: the run stops intake and lets
    # what is in flight finish, so a reader must not die of it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _verbose = verbose
    _load()  # the models load while the run decodes its first images


# -- in the run's process -----------------------------------------------------------------


class TextReader:
    """OCR for the offline analyzer: `read(path)` from any thread, on `processes` worker
    processes started at the first image (inline in a process that is a worker itself).

    Args:
        processes: worker processes (one per core, or fewer as `--workers` asks).
    """

    def __init__(self, processes: int) -> None:
        import multiprocessing

        self._processes = max(1, processes)
        # the analyzer's own processes and Dask's workers are one per core already
        self._inline = multiprocessing.parent_process() is not None
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def read(self, path: str) -> list[TextBox]:
        """The text boxes of the image at `path` (see `read_text`).

        Raises:
            ItemError: AI_ERROR (transient: retried, and by the next run) when OCR fails.
        """
        from concurrent.futures.process import BrokenProcessPool

        try:
            if self._inline:
                return read_text(path)
            pool = self._started()
            return pool.submit(read_text, path).result()
        except BrokenProcessPool as exc:
            with self._lock:  # the next item starts new processes
                self._pool = None
            raise ItemError(ErrorCode.AI_ERROR, f"OCR process died: {exc}") from None
        except (ItemError, UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 (one image's failure, not the run's)
            raise ItemError(ErrorCode.AI_ERROR, f"OCR failed: {exc}") from None

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ItemError(ErrorCode.AI_ERROR, "OCR stopped", retryable=False)
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                # spawn: this process has threads (fork is unsafe), and the analyzer's
                # forkserver keeps its own preloads
                self._pool = ProcessPoolExecutor(
                    self._processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(log.isEnabledFor(logging.DEBUG),),
                )
            return self._pool

    def close(self) -> None:
        """Stop the processes (queued reads are cancelled)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
