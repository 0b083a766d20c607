"""Turning a photo's bytes into the exact RGB pixels the VAE encodes.

One function, :func:`prepare_image`, gives every input a defined outcome: it is either
converted (orientation, colour space, bit depth, transparency) and fitted into its bucket,
or refused with an :class:`ImageRejected` whose ``reason`` says why.  Cheap refusals (a
decompression bomb, an extreme ratio, a photo too small) are decided from the header, before
any pixel is decoded.  The pixels are the same on every machine for the same bytes, rotation
and :class:`PrepConfig`, and :attr:`PreparedImage.crop_signature` names that recipe so the
cache can key a latent on it.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from typing import Literal

from PIL import ExifTags, Image, ImageCms, TiffImagePlugin, UnidentifiedImageError

from trainer.buckets import Bucket, bucket_for

# Bumped whenever the same bytes and settings would give different pixels, so cached latents
# made by an older recipe stop matching (the version is part of the crop signature).
PREP_VERSION = 1
ROTATIONS: tuple[int, ...] = (0, 90, 180, 270)
EIGHT_BIT_MAX = 255
SIXTEEN_BIT_MAX = 65535
# Formats a photo library holds.  Anything else (EPS runs Ghostscript, for one) is refused
# rather than handed to a decoder nobody meant to expose.
PHOTO_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "WEBP", "AVIF", "HEIF", "GIF", "BMP")
RESAMPLERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}

RejectReason = Literal["undecodable", "truncated", "too-large", "too-small", "extreme-ratio"]

# What a corrupt file makes Pillow's decoders raise (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# EXIF orientation -> the transpose that makes the photo upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_SWAPS_AXES = frozenset({5, 6, 7, 8})
# darkroom's clockwise rotation -> transpose (Pillow's ROTATE_n turns counter-clockwise).
_CLOCKWISE: dict[int, Image.Transpose] = {
    90: Image.Transpose.ROTATE_270,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = frozenset({90, 270})


class ImageRejected(ValueError):
    """A photo that cannot become a training image; ``reason`` is a short stable code."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        """Survive pickling, so preparation can run in a process pool."""
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class PrepConfig:
    """How photos are fitted into buckets, and which ones are refused."""

    max_upscale: float = 1.0  # how far a photo may be enlarged to cover its bucket (1 = never)
    max_aspect: float = 2.75  # long side / short side beyond which a photo is skipped
    max_pixels: int = 180_000_000  # decompression-bomb guard, checked before decoding pixels
    resample: str = "lanczos"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLERS:
            raise ValueError(f"resample {self.resample!r} is not one of {sorted(RESAMPLERS)}")
        if self.max_upscale < 1:
            raise ValueError(f"max_upscale must be at least 1, got {self.max_upscale}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {self.max_aspect}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


DEFAULT_CONFIG = PrepConfig()


@dataclass(frozen=True)
class CropPlan:
    """Where a photo of a given size goes: its bucket, the cover size, and the crop."""

    bucket: Bucket
    source_size: tuple[int, int]  # (w, h) after EXIF orientation and rotation
    resized_size: tuple[int, int]  # the photo scaled to just cover the bucket
    offset: tuple[int, int]  # top-left of the centred crop inside the resized photo
    signature: str

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The crop rectangle in the resized photo (left, top, right, bottom)."""
        left, top = self.offset
        return (left, top, left + self.bucket.width, top + self.bucket.height)


@dataclass(frozen=True)
class PreparedImage:
    """A photo ready for the VAE: RGB, sRGB, exactly the bucket's size."""

    image: Image.Image
    bucket: Bucket
    crop_signature: str  # names the recipe, e.g. "prep1/rot0/cover-center/lanczos/1365x1024+170+0"
    source_size: tuple[int, int]  # (w, h) after EXIF orientation and rotation
    conversions: tuple[str, ...]  # e.g. ("cmyk->rgb", "icc->srgb", "alpha->white", "16bit->8bit")


def _check_rotation(rotation: int) -> None:
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS} (clockwise), got {rotation!r}")


def plan_crop(
    size: tuple[int, int], *, rotation: int = 0, config: PrepConfig = DEFAULT_CONFIG
) -> CropPlan:
    """Plan the cover-and-centre-crop of a photo whose EXIF-oriented size is ``size``.

    ``rotation`` (clockwise) is applied on top, as :func:`prepare_image` does.  Needs no
    pixels, so a caller can tell from a size alone whether a photo would be accepted.
    Raises ImageRejected ("extreme-ratio" or "too-small") for photos that would be skipped.
    """
    _check_rotation(rotation)
    width, height = size
    if rotation in _QUARTER_TURNS:
        width, height = height, width
    if width <= 0 or height <= 0:
        raise ImageRejected("undecodable", f"image claims an empty size {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > config.max_aspect:
        raise ImageRejected(
            "extreme-ratio",
            f"{width}x{height} has aspect ratio {ratio:.2f}, beyond the limit {config.max_aspect}",
        )
    bucket = bucket_for(width, height)
    scale = max(bucket.width / width, bucket.height / height)
    if scale > config.max_upscale:
        raise ImageRejected(
            "too-small",
            f"{width}x{height} would need enlarging {scale:.3f}x to cover bucket {bucket.name}"
            f" (limit {config.max_upscale}x)",
        )
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    offset = ((resized[0] - bucket.width) // 2, (resized[1] - bucket.height) // 2)
    signature = (
        f"prep{PREP_VERSION}/rot{rotation}/cover-center/{config.resample}"
        f"/{resized[0]}x{resized[1]}+{offset[0]}+{offset[1]}"
    )
    return CropPlan(bucket, (width, height), resized, offset, signature)


def _decode_failure(exc: BaseException) -> ImageRejected:
    """Tell a file cut short (Pillow says "truncated") from one that is simply corrupt."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return ImageRejected("truncated", f"image data ends early: {text}")
    return ImageRejected("undecodable", f"image cannot be decoded: {text}")


def _open(data: bytes) -> Image.Image:
    """Open ``data`` lazily (header only), mapping every failure to ImageRejected."""
    Image.init()
    formats = tuple(name for name in PHOTO_FORMATS if name in Image.OPEN)
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fired while reading the header (a warning only when a
        # warnings filter has turned it into an error).
        raise ImageRejected("too-large", f"Pillow's decompression-bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "undecodable", f"{len(data)} bytes are not an image in {', '.join(formats)}"
        ) from None
    except _DECODE_ERRORS as exc:
        raise _decode_failure(exc) from None


def _check_pixels(size: tuple[int, int], config: PrepConfig) -> None:
    width, height = size
    if width * height > config.max_pixels:
        raise ImageRejected(
            "too-large",
            f"{width}x{height} is {width * height:,} pixels, over the limit of"
            f" {config.max_pixels:,}",
        )


def _exif_orientation(exif: Image.Exif) -> int:
    value = exif.get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and value in _EXIF_TRANSPOSE else 1


def _header_orientation(image: Image.Image) -> int:
    """The EXIF orientation known without decoding pixels.

    PNG's ``getexif`` decodes the whole image to look for an eXIf chunk after the pixel
    data, so for PNG only an eXIf chunk placed before the pixels is read here.
    """
    try:
        if image.format != "PNG":
            return _exif_orientation(image.getexif())
        exif = Image.Exif()
        raw = image.info.get("exif")
        if isinstance(raw, bytes):
            exif.load(raw)
        return _exif_orientation(exif)
    except _DECODE_ERRORS:
        return 1  # a corrupt EXIF block says nothing trustworthy about orientation


def _loaded_orientation(image: Image.Image) -> int:
    """The EXIF orientation of a decoded image (wherever its EXIF block was stored)."""
    try:
        return _exif_orientation(image.getexif())
    except _DECODE_ERRORS:
        return 1


def _exif_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    width, height = size
    return (height, width) if orientation in _EXIF_SWAPS_AXES else (width, height)


def _header_oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation, known without decoding pixels.

    Recent Pillow turns TIFFs upright itself while loading and already reports the turned
    size from the header; its stored width and height tell whether that happened.
    """
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        tags = image.tag_v2
        stored = (tags.get(TiffImagePlugin.IMAGEWIDTH), tags.get(TiffImagePlugin.IMAGELENGTH))
        if stored != image.size:
            return image.size
    return _exif_size(image.size, _header_orientation(image))


def oriented_size(data: bytes) -> tuple[int, int]:
    """The photo's (width, height) once EXIF orientation is applied, from the header only."""
    with _open(data) as image:
        return _header_oriented_size(image)


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _nominal_range(image: Image.Image) -> tuple[float, float]:
    """The value range a high-bit-depth greyscale image was meant to span.

    16-bit modes span 0..65535.  32-bit integer and float images carry no such promise:
    take the smallest usual range holding every value (0..1 for floats, then 8 and 16
    bits), else stretch the values actually present.
    """
    if image.mode.startswith("I;16"):
        return (0.0, float(SIXTEEN_BIT_MAX))
    low, high = image.getextrema()
    candidates = [(0.0, float(EIGHT_BIT_MAX)), (0.0, float(SIXTEEN_BIT_MAX))]
    if image.mode == "F":
        candidates.insert(0, (0.0, 1.0))
    for start, stop in candidates:
        if start <= low and high <= stop:
            return (start, stop)
    return (float(low), float(high))


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit or float greyscale image onto 0..255 (rounded, not clipped)."""
    low, high = _nominal_range(image)
    scale = EIGHT_BIT_MAX / ((high - low) or 1.0)
    offset = 0.5 - low * scale  # +0.5: the float -> L conversion truncates
    return image.convert("F").point(lambda value: value * scale + offset).convert("L")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a transparent colour) over white; L or RGB out."""
    grey = image.mode in ("L", "LA", "La")
    with_alpha = image.convert("LA" if grey else "RGBA")
    flat = Image.new("L" if grey else "RGB", image.size, "white")
    flat.paste(with_alpha.convert(flat.mode), mask=with_alpha.getchannel("A"))
    return flat


_HIGH_BIT_NOTES = {"I": "int32->8bit", "F": "float->8bit"}


def _to_base_mode(image: Image.Image, notes: list[str]) -> Image.Image:
    """Bring any mode to RGB, CMYK or L (the modes an ICC profile can describe)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in _HIGH_BIT_NOTES:
        notes.append(_HIGH_BIT_NOTES.get(mode, "16bit->8bit"))
        return _to_eight_bit(image)
    if mode == "1":
        notes.append("1bit->8bit")
    elif mode in ("P", "PA"):
        notes.append("palette->rgb")
    if image.has_transparency_data:
        notes.append("alpha->white")
        return _flatten_on_white(image)
    if mode in ("RGB", "CMYK", "L"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "LAB":
        notes.append("lab->srgb")
        lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
        return ImageCms.buildTransform(lab, _srgb(), "LAB", "RGB").apply(image)
    if mode not in ("P", "PA"):
        notes.append(f"{mode.lower()}->rgb")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageRejected("undecodable", f"image mode {mode} cannot become RGB: {exc}") from None


_ICC_SPACES = {"RGB": "RGB", "CMYK": "CMYK", "L": "GRAY"}
_TO_RGB_NOTES = {"CMYK": "cmyk->rgb", "L": "grey->rgb"}


def _profile_transform(
    icc: object, mode: str, notes: list[str]
) -> ImageCms.ImageCmsTransform | None:
    """A transform from the embedded ICC profile to sRGB if it fits ``mode``, else None."""
    if not isinstance(icc, bytes) or not icc:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError):
        notes.append("icc-invalid-ignored")
        return None
    if profile.profile.xcolor_space.strip() != _ICC_SPACES.get(mode):
        notes.append("icc-mismatch-ignored")
        return None
    try:
        return ImageCms.buildTransform(
            profile, _srgb(), mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
        )
    except ImageCms.PyCMSError:
        notes.append("icc-invalid-ignored")
        return None


def _to_srgb(base: Image.Image, icc: object, notes: list[str]) -> Image.Image:
    """Convert an RGB, CMYK or L image to 8-bit sRGB RGB, noting every conversion.

    An embedded ICC profile that fits the image is honoured (perceptual intent); a missing,
    broken or mismatched one means the pixels are taken as sRGB already, as browsers do.
    """
    transform = _profile_transform(icc, base.mode, notes)
    if base.mode in _TO_RGB_NOTES:
        notes.append(_TO_RGB_NOTES[base.mode])
    if transform is None:
        rgb = base if base.mode == "RGB" else base.convert("RGB")
    else:
        notes.append("icc->srgb")
        rgb = transform.apply(base)
    rgb.info = {}  # the pixels are sRGB now; stale profiles or EXIF would mislead a saver
    return rgb


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too-large", f"Pillow's decompression-bomb guard: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise _decode_failure(exc) from None


def _upright(image: Image.Image, orientation: int, rotation: int) -> Image.Image:
    """Apply the EXIF orientation, then darkroom's clockwise rotation."""
    if orientation in _EXIF_TRANSPOSE:
        image = image.transpose(_EXIF_TRANSPOSE[orientation])
    if rotation in _CLOCKWISE:
        image = image.transpose(_CLOCKWISE[rotation])
    return image


def prepare_image(
    data: bytes, *, rotation: int = 0, config: PrepConfig = DEFAULT_CONFIG
) -> PreparedImage:
    """Decode ``data`` and fit it into its bucket, or raise ImageRejected saying why.

    ``rotation`` is darkroom's clockwise correction (0/90/180/270), applied after the EXIF
    orientation.  The size checks run on the header before any pixel is decoded.  The ICC
    conversion runs last, on the bucket-sized crop: on a 24 MP photo it costs a second
    when run first, and the resampled result differs by rounding only.
    """
    _check_rotation(rotation)
    notes: list[str] = []
    with _open(data) as image:
        _check_pixels(image.size, config)
        # Refuse extreme ratios and small photos before decoding a single pixel.
        plan_crop(_header_oriented_size(image), rotation=rotation, config=config)
        _load(image)
        orientation = _loaded_orientation(image)
        icc = image.info.get("icc_profile")
        base = _to_base_mode(image, notes)
    plan = plan_crop(_exif_size(image.size, orientation), rotation=rotation, config=config)
    upright = _upright(base, orientation, rotation)
    fitted = upright.resize(plan.resized_size, RESAMPLERS[config.resample]).crop(plan.box)
    rgb = _to_srgb(fitted, icc, notes)
    return PreparedImage(rgb, plan.bucket, plan.signature, plan.source_size, tuple(notes))


def enable_heic() -> bool:
    """Let Pillow open HEIC/HEIF photos through pillow-heif; False when it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True
