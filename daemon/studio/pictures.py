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
OPAQUE = 255


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def normalised(values: np.ndarray) -> np.ndarray:
    """``values`` stretched to 0…1 between their minimum and maximum (a flat map is all 0):
    a token's share varies by a few percent across the image, and the overlay is there
    to show where it is larger, not to veil the whole picture."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def heatmap_png(values: np.ndarray, size: tuple[int, int]) -> bytes:
    """An RGBA PNG of ``size`` (width, height) showing ``values`` (rows, columns): colour and
    opacity both grow with the value, relative to the map's range, smoothly upsampled."""
    unit = normalised(values.astype(np.float32))
    grey = Image.fromarray(np.round(unit * OPAQUE).astype(np.uint8), mode="L")
    smooth = np.asarray(grey.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / OPAQUE
    anchors = np.linspace(0, 1, len(RAMP))
    rgb = np.stack([np.interp(smooth, anchors, RAMP[:, channel]) for channel in range(3)], -1)
    alpha = smooth * MAX_ALPHA * OPAQUE
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1).round().astype(np.uint8)
    return png_bytes(Image.fromarray(rgba, mode="RGBA"))
