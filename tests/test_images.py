"""Buckets and image preparation, on real photographs from scikit-image.

Every odd input the cache can meet is built here with Pillow from a real photo (EXIF
orientation, CMYK, 16-bit, palette and alpha, ICC profiles, cut-off files, bombs) and must
come out either as exact-size sRGB pixels or as a refusal with the right reason.
"""

from __future__ import annotations

import functools
import io
import pickle
import random
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageStat
from skimage import data as skdata

from trainer.buckets import BUCKETS, Bucket, bucket_for, bucket_named
from trainer.images import (
    ImageRejected,
    PreparedImage,
    PrepConfig,
    enable_heic,
    oriented_size,
    plan_crop,
    prepare_image,
)

LANDSCAPE = Bucket(1216, 832)
PORTRAIT = Bucket(832, 1216)
MARK = 160  # side of the red square painted in a corner to follow orientation
RED = (255, 0, 0)
ORIENTATION_TAG = 0x0112


@functools.cache
def _photo_pixels(name: str) -> np.ndarray:
    return getattr(skdata, name)()


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A scikit-image photograph as RGB, resized to ``size`` (enlarged where needed)."""
    image = Image.fromarray(_photo_pixels(name)).convert("RGB")
    return image.resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """``image`` saved as ``fmt`` (PNGs with light compression, for speed)."""
    if fmt == "PNG":
        params.setdefault("compress_level", 1)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def reopened_mode(payload: bytes) -> str:
    with Image.open(io.BytesIO(payload)) as image:
        return image.mode


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def marked(size: tuple[int, int]) -> Image.Image:
    """The astronaut with a red square in its top-left corner."""
    image = photo("astronaut", size)
    image.paste(RED, (0, 0, MARK, MARK))
    return image


def corner_mean(image: Image.Image, corner: str) -> tuple[float, ...]:
    """Mean colour of a patch well inside the marker's area at ``corner``."""
    width, height = image.size
    inset, side = MARK // 4, MARK // 2
    left = inset if "left" in corner else width - inset - side
    top = inset if "top" in corner else height - inset - side
    return tuple(ImageStat.Stat(image.crop((left, top, left + side, top + side))).mean)


def red_corners(image: Image.Image) -> list[str]:
    corners = ("top-left", "top-right", "bottom-left", "bottom-right")
    return [c for c in corners if _is_red(corner_mean(image, c))]


def _is_red(colour: tuple[float, ...]) -> bool:
    red, green, blue = colour[:3]
    return red > 200 and green < 60 and blue < 60


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` RGB pixels, with no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rejected(payload: bytes, **kwargs: Any) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        prepare_image(payload, **kwargs)
    return caught.value


# --- buckets -------------------------------------------------------------------------


def test_the_nine_buckets_are_about_a_megapixel_in_multiples_of_64() -> None:
    assert len(BUCKETS) == len(set(BUCKETS)) == 9
    assert BUCKETS[0] == Bucket(1024, 1024)
    for bucket in BUCKETS:
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert 0.8e6 < bucket.width * bucket.height < 1.1e6
        assert Bucket(bucket.height, bucket.width) in BUCKETS
        assert bucket_named(bucket.name) == bucket
    assert Bucket(1216, 832).name == "1216x832"
    assert Bucket(1216, 832).aspect == pytest.approx(1216 / 832)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 1000), Bucket(1024, 1024)),
        ((4032, 3024), Bucket(1152, 896)),  # 4:3 phone photo
        ((3024, 4032), Bucket(896, 1152)),
        ((6000, 4000), Bucket(1216, 832)),  # 3:2 camera photo
        ((4000, 6000), Bucket(832, 1216)),
        ((1920, 1080), Bucket(1344, 768)),  # 16:9
        ((1080, 1920), Bucket(768, 1344)),
        ((2400, 1000), Bucket(1536, 640)),  # panorama
        ((1000, 2400), Bucket(640, 1536)),
        ((100, 1), Bucket(1536, 640)),  # beyond the widest bucket: the widest
    ],
)
def test_bucket_for_picks_the_nearest_aspect(size: tuple[int, int], expected: Bucket) -> None:
    assert bucket_for(*size) == expected


def test_bucket_errors() -> None:
    with pytest.raises(ValueError, match="unknown bucket"):
        bucket_named("1000x1000")
    with pytest.raises(ValueError, match="positive"):
        bucket_for(0, 10)


# --- fitting photos into buckets -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("chelsea", (1830, 1217), Bucket(1216, 832)),  # landscape
        ("rocket", (1240, 1860), Bucket(832, 1216)),  # portrait
        ("astronaut", (1100, 1100), Bucket(1024, 1024)),  # square
        ("coffee", (1600, 900), Bucket(1344, 768)),  # 16:9
        ("coffee", (2600, 1080), Bucket(1536, 640)),  # panorama
        ("rocket", (900, 2100), Bucket(640, 1536)),  # tall strip
    ],
)
def test_photos_are_covered_and_centre_cropped_to_their_bucket(
    name: str, size: tuple[int, int], expected: Bucket
) -> None:
    source = photo(name, size)
    prepared = prepare_image(encode(source, "PNG"))
    assert prepared.bucket == expected
    assert prepared.image.size == (expected.width, expected.height)
    assert prepared.image.mode == "RGB"
    assert prepared.source_size == size
    assert prepared.conversions == ()
    # Independent reference: scale so the photo just covers the bucket, crop the middle.
    scale = max(expected.width / size[0], expected.height / size[1])
    cover = (
        max(expected.width, round(size[0] * scale)),
        max(expected.height, round(size[1] * scale)),
    )
    left, top = (cover[0] - expected.width) // 2, (cover[1] - expected.height) // 2
    reference = source.resize(cover, Image.Resampling.LANCZOS).crop(
        (left, top, left + expected.width, top + expected.height)
    )
    assert np.array_equal(pixels(prepared.image), pixels(reference))
    assert prepared.crop_signature.endswith(f"/lanczos/{cover[0]}x{cover[1]}+{left}+{top}")


def test_a_photo_of_exactly_bucket_size_passes_through_untouched() -> None:
    source = photo("astronaut", (1024, 1024))
    prepared = prepare_image(encode(source, "PNG"))
    assert np.array_equal(pixels(prepared.image), pixels(source))
    assert prepared.crop_signature == "prep1/rot0/cover-center/lanczos/1024x1024+0+0"
    assert not prepared.image.info  # no stale profile or EXIF rides along


@pytest.mark.parametrize(("fmt", "params"), [("JPEG", {"quality": 92}), ("TIFF", {}), ("WEBP", {})])
def test_common_photo_formats_are_read(fmt: str, params: dict[str, Any]) -> None:
    source = photo("chelsea", (1216, 832))
    prepared = prepare_image(encode(source, fmt, **params))
    assert prepared.image.size == (1216, 832)
    assert mean_difference(prepared.image, source) < 4


def test_preparation_is_deterministic() -> None:
    payload = encode(photo("coffee", (1500, 1000)), "JPEG", quality=90)
    first, second = prepare_image(payload), prepare_image(payload)
    assert first.crop_signature == second.crop_signature
    assert np.array_equal(pixels(first.image), pixels(second.image))


def test_crop_signature_names_size_rotation_and_resampling() -> None:
    plan = plan_crop((2730, 2048))
    assert plan.bucket == Bucket(1152, 896)
    assert plan.signature == "prep1/rot0/cover-center/lanczos/1194x896+21+0"
    assert plan_crop((2730, 2048)).signature == plan.signature
    others = {
        plan_crop((2800, 2048)).signature,
        plan_crop((2730, 2048), rotation=180).signature,
        plan_crop((2730, 2048), config=PrepConfig(resample="bicubic")).signature,
    }
    assert plan.signature not in others and len(others) == 3
    turned = plan_crop((2730, 2048), rotation=90)
    assert turned.source_size == (2048, 2730) and turned.bucket == Bucket(896, 1152)


def test_max_upscale_lets_a_slightly_small_photo_in() -> None:
    payload = encode(photo("chelsea", (1100, 750)), "JPEG", quality=90)
    assert rejected(payload).reason == "too-small"
    prepared = prepare_image(payload, config=PrepConfig(max_upscale=1.2))
    assert prepared.image.size == (1216, 832)


# --- orientation ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize(
    ("orientation", "corner"),
    [(1, "top-left"), (3, "bottom-right"), (6, "top-right"), (8, "bottom-left"), (2, "top-right")],
)
def test_exif_orientation_turns_the_photo_upright(fmt: str, orientation: int, corner: str) -> None:
    payload = encode(marked((1216, 832)), fmt, exif=exif_with(orientation))
    turned = orientation in (6, 8)
    expected_size = (832, 1216) if turned else (1216, 832)
    assert oriented_size(payload) == expected_size
    prepared = prepare_image(payload)
    assert prepared.source_size == expected_size
    assert prepared.bucket == (PORTRAIT if turned else LANDSCAPE)
    assert red_corners(prepared.image) == [corner]


@pytest.mark.parametrize(
    ("rotation", "orientation", "corner"),
    [
        (0, 1, "top-left"),
        (90, 1, "top-right"),  # clockwise: the top-left corner goes to the top-right
        (180, 1, "bottom-right"),
        (270, 1, "bottom-left"),
        (90, 6, "bottom-right"),  # EXIF turns a quarter, darkroom another quarter
        (270, 6, "top-left"),
    ],
)
def test_darkroom_rotation_is_clockwise_after_exif(
    rotation: int, orientation: int, corner: str
) -> None:
    payload = encode(marked((1216, 832)), "JPEG", quality=95, exif=exif_with(orientation))
    prepared = prepare_image(payload, rotation=rotation)
    quarter_turns = (rotation // 90) + (1 if orientation == 6 else 0)
    expected = PORTRAIT if quarter_turns % 2 else LANDSCAPE
    assert prepared.bucket == expected
    assert prepared.image.size == (expected.width, expected.height)
    assert red_corners(prepared.image) == [corner]
    assert f"/rot{rotation}/" in prepared.crop_signature


def test_a_rotation_that_is_not_a_quarter_turn_is_a_programming_error() -> None:
    payload = encode(photo("astronaut", (1024, 1024)), "PNG")
    with pytest.raises(ValueError, match="rotation") as caught:
        prepare_image(payload, rotation=45)
    assert not isinstance(caught.value, ImageRejected)


def test_oriented_size_reads_only_the_header() -> None:
    # A header claiming 9000x9000 with no pixels at all: decoding would fail.
    assert oriented_size(png_header_only(9000, 9000)) == (9000, 9000)
    with pytest.raises(ImageRejected) as caught:
        oriented_size(b"not an image")
    assert caught.value.reason == "undecodable"


# --- colour modes and profiles -------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    source = photo("chelsea", (1400, 950))  # not bucket-sized: resampled as well
    payload = encode(source.convert("CMYK"), "JPEG", quality=95)
    assert reopened_mode(payload) == "CMYK"
    prepared = prepare_image(payload)
    assert prepared.image.mode == "RGB"
    assert prepared.image.size == (1216, 832)
    assert prepared.conversions == ("cmyk->rgb",)
    assert mean_difference(prepared.image, prepare_image(encode(source, "PNG")).image) < 6


def _gradient(mode: str, top: float) -> Image.Image:
    """A horizontal ramp from 0 to ``top`` across a 1024x1024 image of ``mode``."""
    ramp = np.tile(np.linspace(0, top, 1024), (1024, 1))
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32), mode="F")
    if mode == "I":
        return Image.fromarray(ramp.round().astype(np.int32), mode="I")
    little = Image.fromarray(ramp.round().astype(np.uint16))
    if mode == "I;16":
        return little
    return Image.frombytes(mode, little.size, ramp.round().astype(">u2").tobytes())


@pytest.mark.parametrize(
    ("fmt", "mode", "top", "note"),
    [
        ("PNG", "I;16", 65535, "16bit->8bit"),
        ("TIFF", "I;16B", 65535, "16bit->8bit"),
        ("TIFF", "I", 65535, "int32->8bit"),
        ("TIFF", "F", 1.0, "float->8bit"),
    ],
)
def test_high_bit_depth_greyscale_keeps_its_full_range(
    fmt: str, mode: str, top: float, note: str
) -> None:
    payload = encode(_gradient(mode, top), fmt)
    assert reopened_mode(payload) == mode
    prepared = prepare_image(payload)
    assert prepared.conversions == (note, "grey->rgb")
    row = pixels(prepared.image)[512, :, 0]
    assert row[0] <= 1 and row[-1] >= 254
    assert np.all(np.diff(row) >= 0)  # a ramp stays a ramp
    assert len(np.unique(row)) > 240  # scaled, not clipped to a few values


def test_a_16_bit_photo_is_scaled_not_clipped() -> None:
    grey = np.asarray(photo("astronaut", (1024, 1024)).convert("L"), dtype=np.uint16)
    payload = encode(Image.fromarray(grey * 257), "PNG")
    prepared = prepare_image(payload)
    assert np.abs(pixels(prepared.image)[..., 0] - grey).max() <= 1


def test_palette_png_with_transparency_is_flattened_on_white() -> None:
    palette_image = photo("coffee", (1216, 832)).quantize(colors=255)
    palette = palette_image.getpalette() or []
    palette_image.putpalette([*palette[: 255 * 3], 0, 0, 0])  # index 255: black, transparent
    hole = (400, 300, 800, 500)
    palette_image.paste(255, hole)
    payload = encode(palette_image, "PNG", transparency=255)
    assert reopened_mode(payload) == "P"
    prepared = prepare_image(payload)
    assert prepared.conversions == ("palette->rgb", "alpha->white")
    inside = pixels(prepared.image.crop((420, 320, 780, 480)))
    assert np.all(inside == 255)
    outside = (0, 600, 1216, 832)
    expected = palette_image.convert("RGB").crop(outside)
    assert np.array_equal(pixels(prepared.image.crop(outside)), pixels(expected))


def test_rgba_png_is_flattened_on_white() -> None:
    source = photo("rocket", (832, 1216)).convert("RGBA")
    source.paste((0, 0, 0, 0), (100, 100, 300, 300))  # fully transparent
    source.paste((0, 0, 0, 128), (400, 400, 600, 600))  # black at half opacity
    prepared = prepare_image(encode(source, "PNG"))
    assert prepared.conversions == ("alpha->white",)
    result = pixels(prepared.image)
    assert np.all(result[120:280, 120:280] == 255)
    assert np.all(np.abs(result[420:580, 420:580] - 127) <= 1)
    opaque = source.convert("RGB").crop((0, 700, 832, 1216))
    assert mean_difference(prepared.image.crop((0, 700, 832, 1216)), opaque) == 0


def test_greyscale_with_alpha_is_flattened_on_white() -> None:
    source = photo("astronaut", (1024, 1024)).convert("LA")
    source.paste((0, 0), (0, 0, 200, 200))
    prepared = prepare_image(encode(source, "PNG"))
    assert prepared.conversions == ("alpha->white", "grey->rgb")
    assert np.all(pixels(prepared.image)[:200, :200] == 255)


def test_greyscale_and_one_bit_become_rgb() -> None:
    grey = photo("astronaut", (1024, 1024)).convert("L")
    prepared = prepare_image(encode(grey, "JPEG", quality=90))
    assert prepared.conversions == ("grey->rgb",)
    channels = pixels(prepared.image)
    assert np.array_equal(channels[..., 0], channels[..., 1])
    one_bit = prepare_image(encode(grey.convert("1"), "PNG"))
    assert one_bit.conversions == ("1bit->8bit", "grey->rgb")
    assert set(np.unique(pixels(one_bit.image))) <= {0, 255}


def _srgb_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _red_green_swapped_profile() -> bytes:
    """An sRGB profile whose first channel is green and second red (a real RGB profile)."""
    profile = bytearray(_srgb_bytes())
    (count,) = struct.unpack(">I", profile[128:132])
    entries = {bytes(profile[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, green = entries[b"rXYZ"], entries[b"gXYZ"]
    red_pointer, green_pointer = profile[red + 4 : red + 12], profile[green + 4 : green + 12]
    profile[red + 4 : red + 12], profile[green + 4 : green + 12] = green_pointer, red_pointer
    profile[84:100] = bytes(16)  # the profile ID (an MD5) no longer holds
    return bytes(profile)


def test_an_icc_profile_is_converted_to_srgb() -> None:
    source = photo("coffee", (1400, 950))
    payload = encode(source, "PNG", icc_profile=_red_green_swapped_profile())
    prepared = prepare_image(payload)
    assert prepared.conversions == ("icc->srgb",)
    red, green, blue = source.split()
    swapped = prepare_image(encode(Image.merge("RGB", (green, red, blue)), "PNG")).image
    assert mean_difference(prepared.image, swapped) < 2
    assert mean_difference(prepared.image, prepare_image(encode(source, "PNG")).image) > 10


def test_an_srgb_profile_leaves_the_pixels_as_they_are() -> None:
    source = photo("chelsea", (1216, 832))
    prepared = prepare_image(encode(source, "JPEG", quality=95, icc_profile=_srgb_bytes()))
    assert prepared.conversions == ("icc->srgb",)
    assert mean_difference(prepared.image, source) < 3


@pytest.mark.parametrize(
    ("profile", "note"),
    [
        (b"not a profile at all" * 10, "icc-invalid-ignored"),
        (ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes(), "icc-mismatch-ignored"),
    ],
)
def test_an_unusable_profile_is_ignored_and_noted(profile: bytes, note: str) -> None:
    source = photo("chelsea", (1216, 832))
    prepared = prepare_image(encode(source, "PNG", icc_profile=profile))
    assert prepared.conversions == (note,)
    assert np.array_equal(pixels(prepared.image), pixels(source))


# --- refusals ------------------------------------------------------------------------


def _cut(payload: bytes, fraction: float) -> bytes:
    return payload[: int(len(payload) * fraction)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("fraction", [0.02, 0.6, 0.98])
def test_a_cut_off_file_is_truncated(fmt: str, fraction: float) -> None:
    payload = encode(photo("chelsea", (1216, 832)), fmt)
    error = rejected(_cut(payload, fraction))
    assert error.reason == "truncated", error


def test_a_corrupt_png_is_undecodable() -> None:
    payload = bytearray(encode(photo("chelsea", (1216, 832)), "PNG"))
    middle = len(payload) // 2
    payload[middle : middle + 64] = bytes(64)
    assert rejected(bytes(payload)).reason == "undecodable"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        random.Random(6).randbytes(5000),
        b"<html><body>404 not found</body></html>",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1200 1200\n" + b"0 0 moveto\n" * 50,
    ],
    ids=["empty", "random", "html", "eps"],
)
def test_what_is_not_a_photo_is_undecodable(payload: bytes) -> None:
    error = rejected(payload)
    assert error.reason == "undecodable"
    assert "not an image" in str(error)


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    header = png_header_only(9000, 9000)
    error = rejected(header, config=PrepConfig(max_pixels=50_000_000))
    assert error.reason == "too-large"
    assert "9000x9000" in str(error) and "81,000,000" in str(error)
    # Under the default limit the same header goes on to decoding, and has no pixels.
    assert rejected(header).reason == "truncated"
    # Pillow's own guard (far beyond its limit) is reported the same way.
    assert rejected(png_header_only(40000, 40000)).reason == "too-large"


def test_a_real_photo_over_the_pixel_limit_is_too_large() -> None:
    payload = encode(photo("astronaut", (1024, 1024)), "JPEG")
    error = rejected(payload, config=PrepConfig(max_pixels=1_000_000))
    assert error.reason == "too-large"
    assert "1,048,576" in str(error)


def test_a_small_photo_is_too_small() -> None:
    error = rejected(encode(photo("chelsea", (300, 200)), "JPEG"))
    assert error.reason == "too-small"
    assert "300x200" in str(error) and "1216x832" in str(error)


@pytest.mark.parametrize("size", [(3000, 500), (500, 3000)])
def test_an_extreme_strip_is_refused(size: tuple[int, int]) -> None:
    error = rejected(encode(photo("coffee", size), "JPEG"))
    assert error.reason == "extreme-ratio"
    assert f"{size[0]}x{size[1]}" in str(error) and "6.00" in str(error)


def test_a_refusal_survives_pickling() -> None:
    error = ImageRejected("too-small", "300x200 is too small")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, str(copy)) == ("too-small", "300x200 is too small")


# --- settings and options ------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [{"resample": "sinc"}, {"max_upscale": 0.5}, {"max_aspect": 0.9}, {"max_pixels": 0}],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PrepConfig(**settings)


def test_enable_heic_reports_whether_it_worked() -> None:
    assert isinstance(enable_heic(), bool)


def test_prepared_image_carries_what_the_cache_needs() -> None:
    prepared = prepare_image(encode(photo("rocket", (832, 1216)), "JPEG", quality=90))
    assert isinstance(prepared, PreparedImage)
    assert prepared.bucket.name == "832x1216"
    assert prepared.source_size == (832, 1216)
