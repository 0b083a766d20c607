"""The nine aspect buckets every training image is fitted into.

PixArt-Sigma trains at about one megapixel.  Batching needs every image in a batch to have
the same shape, and a photo cropped square loses its composition, so each photo goes into
the bucket whose aspect ratio is nearest its own (see "Buckets" in the design).  Sides are
multiples of 64 so the VAE's 8x downscale and the transformer's 2x2 patches divide them.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Bucket(NamedTuple):
    """One training shape, in pixels (width x height)."""

    width: int
    height: int

    @property
    def name(self) -> str:
        """The bucket's stable name, as stored in the cache: ``"1216x832"``."""
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        """Width divided by height (above 1 for landscape)."""
        return self.width / self.height


# The design's nine buckets, in its order: square, then each landscape/portrait pair.
BUCKETS: tuple[Bucket, ...] = (
    Bucket(1024, 1024),
    Bucket(1152, 896),
    Bucket(896, 1152),
    Bucket(1216, 832),
    Bucket(832, 1216),
    Bucket(1344, 768),
    Bucket(768, 1344),
    Bucket(1536, 640),
    Bucket(640, 1536),
)

_BY_NAME: dict[str, Bucket] = {bucket.name: bucket for bucket in BUCKETS}


def bucket_for(width: int, height: int) -> Bucket:
    """The bucket whose aspect ratio is nearest ``width / height``.

    Distance is measured between logarithms of the ratios, so 2:1 and 1:2 are equally far
    from square; on a tie the bucket listed first in :data:`BUCKETS` wins.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ratio = math.log(width / height)
    return min(BUCKETS, key=lambda bucket: abs(math.log(bucket.aspect) - log_ratio))


def bucket_named(name: str) -> Bucket:
    """The bucket called ``name`` (such as ``"1024x1024"``); ValueError if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise ValueError(f"unknown bucket {name!r}; known buckets: {known}") from None
