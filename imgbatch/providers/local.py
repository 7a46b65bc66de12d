"""`local`, the offline analyzer: Pillow features, no key, no network, not throttled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgbatch.config import Settings
from imgbatch.providers.base import Analysis

if TYPE_CHECKING:
    from imgbatch.imaging import PreparedImage

#: written as `model` in every record, and part of the fingerprint: bump it when a
#: feature's computation changes, so stored results are recomputed
ANALYZER_VERSION = "local-1"


class LocalProvider:
    """Size, format, EXIF, dominant colours, brightness, sharpness and a perceptual hash."""

    name = "local"
    remote = False

    def __init__(self, settings: Settings) -> None:
        self._max_side = settings.max_side

    @property
    def model(self) -> str:
        return ANALYZER_VERSION

    def fingerprint(self) -> dict[str, Any]:
        # sharpness and colours are measured on the downscaled image: max_side counts
        return {"analyzer": ANALYZER_VERSION, "max_side": self._max_side}

    def estimate_tokens(self, image: PreparedImage) -> int:
        return 0

    def encode(self, image: PreparedImage) -> PreparedImage:
        return image

    def analyze(self, image: PreparedImage) -> Analysis:
        # imported on the first image: a re-run with nothing to analyse never loads Pillow
        from imgbatch.providers.local_features import features

        return Analysis(features(image))

    def close(self) -> None:
        pass
