"""Pictures the studio serves: PNG bytes of renders and colour-mapped attention overlays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A dark-to-bright ramp (black, purple, red, orange, pale yellow) for attention strength,
# readable over photographs; values between anchors are interpolated.
RAMP = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)
MAX_ALPHA = 0.85  # the strongest attention still lets the image show through
LEVELS = 256  # 8-bit
OVERLAY_SIDE = 512  # overlays are drawn this big at most; the browser scales them smoothly
FAST_PNG = 1  # zlib level: overlays are made on a click, where speed beats a few bytes


def _palette() -> np.ndarray:
    """The (256, 4) RGBA colour of each 8-bit level: colour and opacity grow together."""
    level = np.linspace(0, 1, LEVELS)
    anchors = np.linspace(0, 1, len(RAMP))
    rgb = np.stack([np.interp(level, anchors, RAMP[:, channel]) for channel in range(3)], -1)
    alpha = level * MAX_ALPHA * (LEVELS - 1)
    return np.concatenate([rgb, alpha[:, None]], axis=-1).round().astype(np.uint8)


PALETTE = _palette()


def png_bytes(image: Image.Image, *, compress_level: int = 6) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def normalised(values: np.ndarray) -> np.ndarray:
    """``values`` stretched to 0…1 between their minimum and maximum (a flat map is all 0):
    a token's share varies by a few percent across the image, and the overlay is there
    to show where it is larger, not to veil the whole picture."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def overlay_size(size: tuple[int, int]) -> tuple[int, int]:
    """The overlay's pixel size for an image of ``size``: its aspect, at most
    :data:`OVERLAY_SIDE` a side."""
    scale = min(1.0, OVERLAY_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def heatmap_png(values: np.ndarray, size: tuple[int, int]) -> bytes:
    """An RGBA PNG in the aspect of an image of ``size`` (width, height) showing ``values``
    (rows, columns) smoothly upsampled, coloured through :data:`PALETTE` relative to the
    map's range; drawn over the image, it is stretched to the image's box."""
    unit = normalised(values.astype(np.float32))
    grey = Image.fromarray(np.round(unit * (LEVELS - 1)).astype(np.uint8), mode="L")
    smooth = np.asarray(grey.resize(overlay_size(size), Image.Resampling.BILINEAR))
    return png_bytes(Image.fromarray(PALETTE[smooth], mode="RGBA"), compress_level=FAST_PNG)
