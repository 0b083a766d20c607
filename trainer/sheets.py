"""Pictures made of renders (a labelled frame, a time-lapse, a contact sheet, a before/after)
and the PNG files renders are kept in.

What a fine-tune learned is easiest to see side by side: the same prompts and seeds rendered
by successive checkpoints.  This module only arranges finished images (Pillow, no torch), so
the daemon can build sheets from PNGs on disk, and read how each was made
(:func:`read_png_text`), without loading a model.

* :func:`stamp` writes a label (``"step 500"``) in a dark box at an image's bottom-left;
* :func:`write_animation` turns stamped frames into a looping GIF and WebP (and an MP4 when
  an ``ffmpeg`` executable is on PATH);
* :func:`contact_sheet` lays out checkpoints (rows) against prompts (columns);
* :func:`before_after` puts two renders next to each other;
* :func:`save_png` keeps a render with its prompt, seed, settings and checkpoint in the
  PNG's text chunks, :func:`read_png_text` reads them back.

Every file is written to a temporary name beside its target and renamed into place, so a
reader (an upload, a browser) sees the old file or the new one, whole.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from trainer.progress_file import replace_atomically

log = logging.getLogger("darkroom.sheets")

# What ImageFont.load_default gives: a scalable font when Pillow has FreeType, else a bitmap.
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# Text is sized by the picture it sits on, so a label reads the same on a 1024 px render
# and on a 256 px contact-sheet cell.
FONT_FRACTION = 1 / 32  # font size as a fraction of the shorter side
MIN_FONT_PX = 10  # below this the default font is unreadable
PADDING_FRACTION = 0.4  # space around text inside its box, in font sizes
ELLIPSIS = "…"

TRANSPARENT = (0, 0, 0, 0)
BOX_RGBA = (0, 0, 0, 176)  # translucent black: the render stays visible behind the label
TEXT_RGB = (255, 255, 255)
SHEET_BACKGROUND_RGB = (24, 24, 24)
MISSING_RGB = (128, 128, 128)
MISSING_TEXT = "not rendered"

# Contact sheet bands, as fractions of the cell size.
HEADER_FRACTION = 1 / 4  # column labels (prompts): room for a few wrapped lines
ROW_LABEL_FRACTION = 1 / 2  # row labels ("step 12000")
CELL_FONT_FRACTION = 1 / 16  # text size on a sheet, relative to the cell
HEADER_LINES = 3
DIVIDER_FRACTION = 1 / 128  # before/after: the gap between the two images

LOOP_FOREVER = 0  # Pillow's ``loop`` value for an endlessly repeating animation
WEBP_QUALITY = 90
# MP4: frames are held by repeating them at a constant frame rate whose period divides every
# frame's duration; durations are rounded to this resolution so the rate stays sane.
MP4_MIN_TICK_MS = 40
MS_PER_S = 1000
FFMPEG = "ffmpeg"
PNG_FORMAT = "PNG"


# --- PNG files with their making in them ---------------------------------------------------


def png_text(metadata: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    """PNG text chunks for ``metadata``: tEXt, or iTXt (UTF-8) for text Latin-1 lacks."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    return info


def save_png(image: Image.Image, path: Path, metadata: Mapping[str, str]) -> Path:
    """Write ``image`` to ``path`` as a PNG carrying ``metadata`` as text, atomically."""
    chunks = png_text(metadata)
    return replace_atomically(
        Path(path), lambda tmp: image.save(tmp, format=PNG_FORMAT, pnginfo=chunks)
    )


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG (what :func:`save_png` wrote)."""
    with Image.open(path) as image:
        image.load()  # text chunks after the pixels are read only with them
        return {str(key): str(value) for key, value in image.text.items()}


def font_size(height_px: float) -> int:
    """A font size for text meant to be ``height_px`` tall, at least :data:`MIN_FONT_PX`."""
    return max(MIN_FONT_PX, round(height_px))


def font_for(size: int) -> Font:
    """Pillow's default font (a scalable one, bundled with Pillow) at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Font) -> float:
    """How wide ``text`` draws in ``font``, in pixels."""
    return draw.textlength(text, font=font)


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> str:
    """``text`` cut (ending in an ellipsis) so it draws within ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + ELLIPSIS, font) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float, lines: int) -> list[str]:
    """``text`` word-wrapped into at most ``lines`` lines of ``width`` px (the last one cut)."""
    wrapped: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and _text_width(draw, candidate, font) > width:
            wrapped.append(current)
            current = word
        else:
            current = candidate
    wrapped.append(current)
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], " ".join(wrapped[lines - 1 :]) + ELLIPSIS]
    return [_ellipsize(draw, line, font, width) for line in wrapped]


def stamp(image: Image.Image, text: str) -> Image.Image:
    """A copy of ``image`` with ``text`` in a translucent dark box at its bottom-left.

    The font is :data:`FONT_FRACTION` of the shorter side; text too long for the image is
    cut with an ellipsis.  The original is left unchanged; the copy keeps its mode.
    """
    size = font_size(min(image.size) * FONT_FRACTION)
    font = font_for(size)
    pad = round(size * PADDING_FRACTION)
    overlay = Image.new("RGBA", image.size, TRANSPARENT)
    draw = ImageDraw.Draw(overlay)
    fitted = _ellipsize(draw, text, font, image.width - 4 * pad)
    left, top, right, bottom = draw.textbbox((0, 0), fitted, font=font)
    box_top = image.height - pad - (bottom - top) - 2 * pad
    box_right = pad + (right - left) + 2 * pad
    draw.rectangle((pad, box_top, box_right, image.height - pad), fill=BOX_RGBA)
    draw.text((2 * pad - left, box_top + pad - top), fitted, font=font, fill=TEXT_RGB)
    stamped = Image.alpha_composite(image.convert("RGBA"), overlay)
    return stamped.convert(image.mode)


# --- animations ----------------------------------------------------------------------------


def write_animation(
    frames: Sequence[Image.Image],
    labels: Sequence[str],
    stem: Path,
    *,
    frame_ms: int,
    hold_last_ms: int,
) -> list[Path]:
    """Write ``stem.gif`` and ``stem.webp`` (and ``stem.mp4`` with ffmpeg), looping forever.

    Each frame is stamped with its label and shown ``frame_ms``; the last one is held
    ``hold_last_ms`` so the newest checkpoint can be studied before the loop restarts.
    Frames must share one size.  Returns the paths written, in that order.  (Two equal
    frames in a row, labels included, become one longer GIF frame: Pillow merges them.)
    """
    _check_frames(frames, labels, frame_ms, hold_last_ms)
    stamped = [
        stamp(frame.convert("RGB"), label) for frame, label in zip(frames, labels, strict=True)
    ]
    durations = [frame_ms] * (len(stamped) - 1) + [hold_last_ms]
    written = [
        replace_atomically(_beside(stem, ".gif"), _saver(stamped, durations, "GIF")),
        replace_atomically(_beside(stem, ".webp"), _saver(stamped, durations, "WEBP")),
    ]
    mp4 = _write_mp4(stamped, durations, _beside(stem, ".mp4"))
    return [*written, mp4] if mp4 is not None else written


def _beside(stem: Path, suffix: str) -> Path:
    """``stem`` plus ``suffix`` (``with_suffix`` would eat a dot in the stem's name)."""
    return stem.with_name(stem.name + suffix)


def _check_frames(
    frames: Sequence[Image.Image], labels: Sequence[str], frame_ms: int, hold_last_ms: int
) -> None:
    """ValueError unless there are frames, one label each, one size, positive durations."""
    if not frames:
        raise ValueError("an animation needs at least one frame")
    if len(frames) != len(labels):
        raise ValueError(f"{len(frames)} frames but {len(labels)} labels")
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"animation frames must share one size, got {sizes}")
    if frame_ms <= 0 or hold_last_ms <= 0:
        raise ValueError(f"durations must be positive (got {frame_ms} and {hold_last_ms} ms)")


def _saver(
    frames: Sequence[Image.Image], durations: Sequence[int], image_format: str
) -> Callable[[Path], None]:
    """A writer of an animated, endlessly looping GIF or WebP of ``frames``."""

    def save(path: Path) -> None:
        extra = {"quality": WEBP_QUALITY} if image_format == "WEBP" else {}
        frames[0].save(
            path,
            format=image_format,
            save_all=True,
            append_images=list(frames[1:]),
            duration=list(durations),
            loop=LOOP_FOREVER,
            **extra,
        )

    return save


def _write_mp4(frames: Sequence[Image.Image], durations: Sequence[int], path: Path) -> Path | None:
    """Encode ``frames`` with ffmpeg into ``path``; None (logged) when there is no ffmpeg or
    it fails: the MP4 is a convenience beside the GIF and WebP, never required."""
    ffmpeg = shutil.which(FFMPEG)
    if ffmpeg is None:
        log.info("no %s on PATH: %s not written (the GIF and WebP are)", FFMPEG, path.name)
        return None
    tick = max(math.gcd(*durations), MP4_MIN_TICK_MS)
    repeats = [max(1, round(duration / tick)) for duration in durations]
    width, height = frames[0].size
    command = [
        ffmpeg, "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-framerate", f"{MS_PER_S}/{tick}", "-i", "-",
        # yuv420p (the pixel format every player takes) needs even sides.
        "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2,format=yuv420p",
        "-movflags", "+faststart", "-f", "mp4",
    ]  # fmt: skip
    try:
        replace_atomically(path, lambda tmp: _run_ffmpeg([*command, str(tmp)], frames, repeats))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("ffmpeg could not write %s: %s", path.name, error)
        return None
    return path


def _run_ffmpeg(command: list[str], frames: Sequence[Image.Image], repeats: Sequence[int]) -> None:
    """Pipe raw RGB frames (each repeated to last its duration) into ffmpeg; SubprocessError
    with ffmpeg's own message when it fails."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=errors)
        assert process.stdin is not None  # stdin=PIPE
        # A broken pipe means ffmpeg stopped reading: its exit code and message say why.
        with contextlib.suppress(BrokenPipeError):
            try:
                for frame, count in zip(frames, repeats, strict=True):
                    pixels = frame.tobytes()
                    for _ in range(count):
                        process.stdin.write(pixels)
            finally:
                process.stdin.close()  # flushes (may break too), then closes the pipe
        code = process.wait()
        if code != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
            raise subprocess.SubprocessError(f"ffmpeg exited with {code}: {message}")


# --- sheets --------------------------------------------------------------------------------


def sheet_size(rows: int, columns: int, cell: int) -> tuple[int, int]:
    """The pixel size of a contact sheet: the label bands plus a ``cell``-sized square each."""
    left, top = _bands(cell)
    return left + columns * cell, top + rows * cell


def _bands(cell: int) -> tuple[int, int]:
    """The row-label band's width and the column-label band's height for ``cell``."""
    return round(cell * ROW_LABEL_FRACTION), round(cell * HEADER_FRACTION)


def contact_sheet(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    cell: int,
) -> Image.Image:
    """A grid of renders: one row per checkpoint, one column per prompt, labelled.

    Each render is fitted (aspect kept) into a ``cell`` px square; None stands for a render
    that does not exist and becomes a grey cell saying so.  The size is :func:`sheet_size`.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    if any(len(row) != len(column_labels) for row in rows):
        raise ValueError(f"every row needs {len(column_labels)} cells, one per column label")
    sheet = Image.new("RGB", sheet_size(len(rows), len(column_labels), cell), SHEET_BACKGROUND_RGB)
    draw = ImageDraw.Draw(sheet)
    font = font_for(font_size(cell * CELL_FONT_FRACTION))
    left, top = _bands(cell)
    for column, label in enumerate(column_labels):
        lines = _wrap(draw, label, font, cell - 2 * MIN_FONT_PX, HEADER_LINES)
        _draw_lines(draw, lines, font, (left + column * cell + cell // 2, top // 2))
    for row, (label, images) in enumerate(zip(row_labels, rows, strict=True)):
        y = top + row * cell
        text = _ellipsize(draw, label, font, left - MIN_FONT_PX)
        _draw_lines(draw, [text], font, (left // 2, y + cell // 2))
        for column, image in enumerate(images):
            sheet.paste(_cell(image, cell, font), (left + column * cell, y))
    return sheet


def _cell(image: Image.Image | None, cell: int, font: Font) -> Image.Image:
    """One square of a sheet: the render fitted and centred, or a grey "not rendered"."""
    if image is None:
        square = Image.new("RGB", (cell, cell), MISSING_RGB)
        _draw_lines(ImageDraw.Draw(square), [MISSING_TEXT], font, (cell // 2, cell // 2))
        return square
    square = Image.new("RGB", (cell, cell), SHEET_BACKGROUND_RGB)
    fitted = image.convert("RGB")
    fitted.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    square.paste(fitted, ((cell - fitted.width) // 2, (cell - fitted.height) // 2))
    return square


def _draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: Sequence[str],
    font: Font,
    centre: tuple[int, int],
) -> None:
    """Draw ``lines`` as a block centred on ``centre``."""
    draw.multiline_text(
        centre,
        "\n".join(lines),
        font=font,
        fill=TEXT_RGB,
        anchor="mm",
        align="center",
    )


def before_after(
    before: Image.Image,
    after: Image.Image,
    before_label: str,
    after_label: str,
    *,
    title: str | None = None,
) -> Image.Image:
    """``before`` and ``after`` side by side, each stamped with its label, under an optional
    title band.  ``after`` is scaled to ``before``'s height when they differ."""
    if after.height != before.height:
        width = round(after.width * before.height / after.height)
        after = after.resize((width, before.height), Image.Resampling.LANCZOS)
    gap = max(1, round(before.width * DIVIDER_FRACTION))
    size = font_size(min(before.size) * FONT_FRACTION)
    font = font_for(size)
    band = 0 if title is None else round(size * (1 + 2 * PADDING_FRACTION))
    width = before.width + gap + after.width
    combined = Image.new("RGB", (width, band + before.height), SHEET_BACKGROUND_RGB)
    combined.paste(stamp(before.convert("RGB"), before_label), (0, band))
    combined.paste(stamp(after.convert("RGB"), after_label), (before.width + gap, band))
    if title is not None:
        draw = ImageDraw.Draw(combined)
        fitted = _ellipsize(draw, title, font, width - 2 * MIN_FONT_PX)
        _draw_lines(draw, [fitted], font, (width // 2, band // 2))
    return combined
