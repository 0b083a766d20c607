"""Sheets and animations, read back with Pillow (and ffprobe for the MP4, when ffmpeg is here).

Frames are solid colours, so each frame of an animation can be told apart by a pixel away
from its label, and a stamp's footprint is exactly where the pixels changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from trainer.sheets import (
    MISSING_RGB,
    before_after,
    contact_sheet,
    sheet_size,
    stamp,
    write_animation,
)

SIDE = 256
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]
LABELS = ["base", "step 500", "step 1000"]
FRAME_MS, HOLD_LAST_MS = 600, 2000  # multiples of 10 ms: GIF stores centiseconds
WEBP_TOLERANCE = 12  # lossy WebP moves a flat colour by a few levels
PROBE = (SIDE - 8, 8)  # top-right: never under a label


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    return Image.new("RGB", size, colour)


def frames_of(path: Path) -> list[tuple[tuple[int, ...], int]]:
    """Each frame's probe colour (RGB) and duration in ms, in order."""
    found = []
    with Image.open(path) as animation:
        for index in range(animation.n_frames):
            animation.seek(index)
            colour = animation.convert("RGB").getpixel(PROBE)
            found.append((tuple(colour), animation.info["duration"]))  # type: ignore[arg-type]
    return found


def close(left: tuple[int, ...], right: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(left, right, strict=True))


def test_stamp_changes_only_the_bottom_left_corner() -> None:
    image = solid(COLOURS[0])
    stamped = stamp(image, "step 500")
    assert stamped.size == image.size and stamped.mode == image.mode
    assert image.getpixel((0, SIDE - 1)) == COLOURS[0]  # the original is untouched
    box = ImageChops.difference(image, stamped).getbbox()
    assert box is not None
    left, top, right, bottom = box
    assert left < SIDE // 16 and bottom > SIDE - SIDE // 16  # hugs the bottom-left corner
    assert right < SIDE // 2 and top > SIDE // 2  # and stays in that quarter


def test_stamp_text_grows_with_the_image() -> None:
    small = ImageChops.difference(solid(COLOURS[0]), stamp(solid(COLOURS[0]), "step 500"))
    large_image = solid(COLOURS[0], (4 * SIDE, 4 * SIDE))
    large = ImageChops.difference(large_image, stamp(large_image, "step 500"))
    small_box, large_box = small.getbbox(), large.getbbox()
    assert small_box is not None and large_box is not None
    assert large_box[2] - large_box[0] > 3 * (small_box[2] - small_box[0])


def test_a_too_long_label_is_cut_to_fit() -> None:
    stamped = stamp(solid(COLOURS[0]), "a very long label " * 20)
    box = ImageChops.difference(solid(COLOURS[0]), stamped).getbbox()
    assert box is not None and box[2] < SIDE


def test_animation_frames_come_in_order_with_their_durations(tmp_path: Path) -> None:
    frames = [solid(colour) for colour in COLOURS]
    written = write_animation(
        frames, LABELS, tmp_path / "timelapse", frame_ms=FRAME_MS, hold_last_ms=HOLD_LAST_MS
    )
    gif, webp = tmp_path / "timelapse.gif", tmp_path / "timelapse.webp"
    assert written[:2] == [gif, webp]
    durations = [FRAME_MS, FRAME_MS, HOLD_LAST_MS]
    for path, tolerance in ((gif, 0), (webp, WEBP_TOLERANCE)):
        found = frames_of(path)
        assert [duration for _, duration in found] == durations, path.name
        for (colour, _), expected in zip(found, COLOURS, strict=True):
            assert close(colour, expected, tolerance), (path.name, colour, expected)
        with Image.open(path) as animation:
            assert animation.info["loop"] == 0 and animation.size == (SIDE, SIDE)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


def test_animation_stamps_each_frame_with_its_label(tmp_path: Path) -> None:
    same = [solid(COLOURS[0])] * 2
    write_animation(same, ["base", "step 500"], tmp_path / "a", frame_ms=100, hold_last_ms=100)
    with Image.open(tmp_path / "a.gif") as animation:
        first = animation.convert("RGB")
        animation.seek(1)
        second = animation.convert("RGB")
    # The same picture twice, told apart only by the labels in the corner.
    assert ImageChops.difference(first, second).getbbox() is not None


def test_animation_refuses_what_cannot_work(tmp_path: Path) -> None:
    stem = tmp_path / "bad"
    with pytest.raises(ValueError, match="2 frames but 1 labels"):
        write_animation([solid(COLOURS[0])] * 2, ["base"], stem, frame_ms=100, hold_last_ms=100)
    with pytest.raises(ValueError, match="one size"):
        mixed = [solid(COLOURS[0]), solid(COLOURS[1], (SIDE, SIDE // 2))]
        write_animation(mixed, LABELS[:2], stem, frame_ms=100, hold_last_ms=100)
    with pytest.raises(ValueError, match="at least one frame"):
        write_animation([], [], stem, frame_ms=100, hold_last_ms=100)
    assert list(tmp_path.iterdir()) == []


def test_mp4_is_written_when_ffmpeg_is_on_path(tmp_path: Path) -> None:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("no ffmpeg/ffprobe on PATH: the MP4 is optional and not written")
    frames = [solid(colour) for colour in COLOURS]
    written = write_animation(
        frames, LABELS, tmp_path / "t", frame_ms=FRAME_MS, hold_last_ms=HOLD_LAST_MS
    )
    mp4 = tmp_path / "t.mp4"
    assert written == [tmp_path / "t.gif", tmp_path / "t.webp", mp4]
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=width,height",
         "-of", "json", str(mp4)],
        capture_output=True, check=True, text=True,
    )  # fmt: skip
    info = json.loads(probe.stdout)
    assert (info["streams"][0]["width"], info["streams"][0]["height"]) == (SIDE, SIDE)
    expected_s = (2 * FRAME_MS + HOLD_LAST_MS) / 1000
    assert abs(float(info["format"]["duration"]) - expected_s) < FRAME_MS / 1000


def test_without_ffmpeg_the_mp4_is_skipped_with_a_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no executables at all
    frames = [solid(colour) for colour in COLOURS]
    with caplog.at_level(logging.INFO, logger="darkroom.sheets"):
        written = write_animation(frames, LABELS, tmp_path / "t", frame_ms=100, hold_last_ms=100)
    assert written == [tmp_path / "t.gif", tmp_path / "t.webp"]
    assert "no ffmpeg on PATH: t.mp4 not written" in caplog.text


def test_contact_sheet_is_the_grid_with_a_grey_cell_for_a_missing_render() -> None:
    cell = 128
    rows = [[solid(COLOURS[0]), solid(COLOURS[1])], [solid(COLOURS[2]), None]]
    sheet = contact_sheet(
        rows, ["base", "step 500"], ["a cat on a table", "a lake at dawn"], cell=cell
    )
    width, height = sheet_size(rows=2, columns=2, cell=cell)
    assert sheet.size == (width, height)
    left, top = width - 2 * cell, height - 2 * cell  # the label bands
    assert left > 0 and top > 0

    def cell_at(row: int, column: int) -> Image.Image:
        x, y = left + column * cell, top + row * cell
        return sheet.crop((x, y, x + cell, y + cell))

    assert cell_at(0, 0).getpixel((cell // 2, cell // 2)) == COLOURS[0]
    assert cell_at(1, 0).getpixel((cell // 2, cell // 2)) == COLOURS[2]
    missing = cell_at(1, 1)
    assert missing.getpixel((2, 2)) == MISSING_RGB
    assert len(missing.getcolors(cell * cell) or []) > 1  # it says "not rendered"
    header = sheet.crop((left, 0, width, top))
    assert len(header.getcolors(header.width * header.height) or []) > 1  # prompts written


def test_contact_sheet_fits_other_aspects_into_the_cell() -> None:
    portrait = solid(COLOURS[1], (SIDE // 2, SIDE))
    sheet = contact_sheet([[portrait]], ["base"], ["tall"], cell=SIDE // 2)
    assert sheet.size == sheet_size(rows=1, columns=1, cell=SIDE // 2)


def test_contact_sheet_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        contact_sheet([[None]], ["base"], ["a", "b"], cell=64)
    with pytest.raises(ValueError, match="1 rows but 2 row labels"):
        contact_sheet([[None]], ["base", "step 500"], ["a"], cell=64)


def test_before_after_puts_the_two_side_by_side_under_a_title() -> None:
    before, after = solid(COLOURS[0]), solid(COLOURS[2])
    plain = before_after(before, after, "base", "step 500")
    titled = before_after(before, after, "base", "step 500", title="a cat on a table")
    assert plain.height == SIDE and plain.width > 2 * SIDE
    assert titled.width == plain.width and titled.height > SIDE
    band = titled.crop((0, 0, titled.width, titled.height - SIDE))
    assert len(band.getcolors(band.width * band.height) or []) > 1  # the title is written
    top = band.height + 8
    assert titled.getpixel((SIDE - 8, top)) == COLOURS[0]  # before on the left
    assert titled.getpixel((titled.width - 8, top)) == COLOURS[2]  # after on the right
    gap = plain.width - 2 * SIDE
    tall = solid(COLOURS[2], (SIDE, 2 * SIDE))
    assert before_after(before, tall, "base", "step 500").size == (SIDE + gap + SIDE // 2, SIDE)
