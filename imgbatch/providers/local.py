"""`local`, the offline analyzer: Pillow features, no key, no network, not throttled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgbatch.config import Settings
from imgbatch.providers.base import Analysis

if TYPE_CHECKING:
    from imgbatch.imaging import PreparedImage
    from imgbatch.ocr import TextReader

#: written as `model` in every record, and part of the fingerprint: bump it when a
#: feature's computation changes, so stored results are recomputed
ANALYZER_VERSION = "local-1"


class LocalProvider:
    """Size, format, EXIF, dominant colours, brightness, sharpness and a perceptual hash;
    with `--ocr`, the text read (imgbatch.ocr)."""

    name = "local"
    remote = False

    def __init__(self, settings: Settings) -> None:
        self._max_side = settings.max_side
        #: `--ocr`: the text read, and by what (None: no OCR)
        self._ocr: TextReader | None = None
        self._ocr_version = ""
        if settings.local_ocr:
            from imgbatch.cpus import cores
            from imgbatch.ocr import TextReader, model_version

            self._ocr_version = model_version()  # a UsageError without the extra
            # one process per core; `--workers 1` means one
            self._ocr = TextReader(min(settings.workers, cores()))

    @property
    def model(self) -> str:
        return ANALYZER_VERSION

    def fingerprint(self) -> dict[str, Any]:
        # sharpness and colours are measured on the downscaled image: max_side counts
        parts = {"analyzer": ANALYZER_VERSION, "max_side": self._max_side}
        if self._ocr_version:  # absent without OCR: the results of before stay valid
            parts["ocr"] = self._ocr_version
        return parts

    #: no request, no tokens
    prompt_tokens = 0

    def estimate_tokens(self, width: int, height: int) -> int:
        return 0

    def encode(self, image: PreparedImage) -> PreparedImage:
        return image

    def analyze(self, image: PreparedImage) -> Analysis:
        # imported on the first image: a re-run with nothing to analyse never loads Pillow
        from imgbatch.providers.local_features import features

        result = features(image)
        if self._ocr is not None:
            boxes = self._ocr.read(image.path)  # the full-size file, decoded again
            result["text"] = "\n".join(box["text"] for box in boxes)
            result["text_boxes"] = boxes
        return Analysis(result)

    def close(self) -> None:
        if self._ocr is not None:
            self._ocr.close()
