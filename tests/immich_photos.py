"""Real test photos and the image work of the stand-in Immich server.

Split out of :mod:`tests.immich_library` to keep modules short; that module re-exports every
name here, so ``from tests.immich_library import make_jpeg`` keeps working. It holds the
scikit-image sample photos as real JPEGs (optionally turned, scaled or with an EXIF
orientation), Immich's checksum, the header facts Immich reads from a file (size, EXIF
orientation), and the rendering of derived images (previews, thumbnails, edited full size)
with Immich's edits applied. Nothing here knows about the library's state or HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from tests.immich_library import AssetEdit

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
EXIF_ORIENTATION_TAG = 0x0112
JPEG_QUALITY = 90
JPEG_MIME = "image/jpeg"
WEBP_MIME = "image/webp"
PREVIEW_SHORT_SIDE = 1440
THUMBNAIL_SHORT_SIDE = 250
PLACEHOLDER_SIZE = (640, 360)
PLACEHOLDER_GREY = (128, 128, 128)
FULL_TURN = 360
#: EXIF orientations 5–8 turn the picture a quarter, swapping width and height.
SIDE_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def checksum_of(data: bytes) -> str:
    """Immich's checksum: base64 of the SHA-1 of the file's bytes."""
    return base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


@cache
def sample_array(name: str) -> np.ndarray:
    """The RGB pixels of one scikit-image sample photo (see SAMPLE_PHOTOS)."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    return pixels[0] if isinstance(pixels, tuple) else pixels


def make_jpeg(
    name: str = "astronaut",
    *,
    rotate: int = 0,
    exif_orientation: int | None = None,
    scale: float = 1.0,
    quality: int = JPEG_QUALITY,
) -> bytes:
    """A real JPEG of a scikit-image photo.

    ``rotate`` turns the pixels clockwise (a photo saved sideways); ``exif_orientation``
    writes that EXIF tag with Pillow; ``scale`` resizes (the samples are ≤ 741 px, smaller
    than a 1440 px preview).
    """
    image = Image.fromarray(sample_array(name))
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)))
    if rotate % FULL_TURN:
        image = image.rotate(-rotate, expand=True)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    data = buffer.getvalue()
    return data if exif_orientation is None else with_exif_orientation(data, exif_orientation)


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """The same JPEG with its EXIF orientation tag set (pixels kept: ``quality="keep"``)."""
    image = Image.open(io.BytesIO(data))
    exif = image.getexif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality="keep", exif=exif.tobytes())
    return buffer.getvalue()


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Encode a Pillow image as JPEG bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageFacts:
    """What Immich reads from a file's header: stored size and EXIF orientation."""

    width: int | None
    height: int | None
    orientation: int | None

    @property
    def display_size(self) -> tuple[int | None, int | None]:
        """Width and height once the EXIF orientation is applied (5–8 swap the sides)."""
        swapped = self.orientation in SIDE_SWAPPING_ORIENTATIONS
        return (self.height, self.width) if swapped else (self.width, self.height)


def read_facts(data: bytes) -> ImageFacts:
    """Read size and orientation from an image header; unknown formats give Nones."""
    try:
        image = Image.open(io.BytesIO(data))
    except OSError:
        return ImageFacts(None, None, None)
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG)
    return ImageFacts(image.width, image.height, orientation)


def apply_edits(image: Image.Image, edits: Iterable[AssetEdit]) -> Image.Image:
    """Apply Immich edits in order: crop box, clockwise rotation, mirror."""
    for edit in edits:
        params = edit.parameters
        if edit.action == "crop":
            box = (
                params["x"],
                params["y"],
                params["x"] + params["width"],
                params["y"] + params["height"],
            )
            image = image.crop(box)
        elif edit.action == "rotate" and params["angle"] % FULL_TURN:
            image = image.rotate(-params["angle"], expand=True)
        elif edit.action == "mirror":
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            if params["axis"] == "vertical":
                flip = Image.Transpose.FLIP_TOP_BOTTOM
            image = image.transpose(flip)
    return image


RENDER_CACHE_SIZE = 1024
_RENDERED: dict[tuple[object, ...], tuple[bytes, bytes]] = {}


def render(data: bytes, short_side: int | None, edits: Iterable[AssetEdit], fmt: str) -> bytes:
    """A derived image like Immich's: orientation applied, edits applied, shrunk so the short
    side is ``short_side`` (never enlarged; None keeps full size), encoded as ``fmt``.

    Immich generates renditions once and serves files; so does the stand-in, from a small
    cache, so that serving a preview costs what it costs Immich (benchmarks rely on it).
    """
    edits = tuple(edits)
    key = (hash(data), len(data), short_side, repr(edits), fmt)
    hit = _RENDERED.get(key)
    if hit is not None and hit[0] == data:
        return hit[1]
    rendered = _render(data, short_side, edits, fmt)
    if len(_RENDERED) >= RENDER_CACHE_SIZE:
        _RENDERED.pop(next(iter(_RENDERED)), None)
    _RENDERED[key] = (data, rendered)
    return rendered


def _render(data: bytes, short_side: int | None, edits: tuple[AssetEdit, ...], fmt: str) -> bytes:
    """Render without the cache."""
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    except OSError:  # a video or other non-image: Immich shows a still frame; we show grey
        image = Image.new("RGB", PLACEHOLDER_SIZE, PLACEHOLDER_GREY)
    image = apply_edits(image, edits)
    shortest = min(image.size)
    if short_side is not None and shortest > short_side:
        factor = short_side / shortest
        image = image.resize(
            (
                max(short_side, round(image.width * factor)),
                max(short_side, round(image.height * factor)),
            ),
            Image.Resampling.LANCZOS,
        )
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=JPEG_QUALITY)
    return buffer.getvalue()
