"""Time-lapses, contact sheets and before/after pairs, from the renders on disk.

Built from what the ``renders`` table holds (``daemon/samples.py`` renders), so frames of
checkpoints that retention has since deleted stay in the time-lapse.  Every file's name
carries the newest step it shows: a later checkpoint makes new files (and new uploads),
rebuilding with nothing new rewrites the same names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from daemon.results import Render, Results
from daemon.samples import BASE_STEP, Prompt
from trainer.progress_file import step_folder
from trainer.sample_defaults import step_label

log = logging.getLogger("darkroom.timelapse")

TIMELAPSE_DIR = "timelapse"
SHEETS_DIR = "sheets"
SHEET_CELL = 256  # pixels per contact-sheet cell: small enough for many checkpoints
ANIMATION_PREFERENCE = (".mp4", ".gif")  # what goes to Immich: a video when one was made
ANIMATION_FORMATS = (".gif", ".webp")  # always written (MP4 only when ffmpeg is there)


@dataclass(frozen=True)
class Built:
    """A file made for the owner, with what it shows (for its upload key and description)."""

    kind: str
    path: Path
    last_step: int
    prompt: Prompt | None
    description: str


def _load(render: Render) -> Image.Image:
    with Image.open(render.path) as image:
        return image.convert("RGB")


def animation(
    results: Results, kind: str, prompt: Prompt, root: Path, *, frame_ms: int, hold_last_ms: int
) -> list[Built]:
    """The prompt's renders in step order as an animation (GIF, WebP, MP4 when possible)."""
    from trainer.sheets import write_animation

    renders = results.renders(kind, prompt.key)
    if len(renders) < 2:
        return []
    last = renders[-1].step
    # The name tells the frames apart: the same name means the same animation, not redrawn.
    name = f"{prompt.index:02d}-{prompt.key}-{len(renders)}-frames-to-{step_folder(last)}"
    stem = root / TIMELAPSE_DIR / name
    made = sorted(stem.parent.glob(f"{name}.*"))
    if not {path.suffix for path in made} >= set(ANIMATION_FORMATS):
        frames = [_load(render) for render in renders]
        labels = [step_label(render.step) for render in renders]
        made = write_animation(frames, labels, stem, frame_ms=frame_ms, hold_last_ms=hold_last_ms)
    description = (
        f"darkroom time-lapse, {step_label(renders[0].step)} to {step_label(last)} "
        f"({len(renders)} checkpoints): “{prompt.text}”, seed {prompt.seed}"
    )
    return [Built("timelapse", path, last, prompt, description) for path in made]


def contact_sheet(
    results: Results, kind: str, prompts: Sequence[Prompt], root: Path
) -> Built | None:
    """Checkpoints (rows) x prompts (columns) in one PNG."""
    from trainer.sampling import save_png, software
    from trainer.sheets import contact_sheet as draw_sheet

    by_prompt = {p.key: {r.step: r for r in results.renders(kind, p.key)} for p in prompts}
    steps = sorted({step for renders in by_prompt.values() for step in renders})
    if not steps:
        return None
    rows = [
        [_load(by_prompt[p.key][step]) if step in by_prompt[p.key] else None for p in prompts]
        for step in steps
    ]
    image = draw_sheet(
        rows, [step_label(s) for s in steps], [f"{p.index + 1}. {p.text}" for p in prompts],
        cell=SHEET_CELL,
    )  # fmt: skip
    path = root / SHEETS_DIR / f"contact-sheet-to-{step_folder(steps[-1])}.png"
    save_png(image, path, {"software": software(), "prompts": " | ".join(p.text for p in prompts)})
    description = (
        f"darkroom contact sheet: {len(steps)} checkpoints (up to {step_label(steps[-1])}) "
        f"x {len(prompts)} validation prompts"
    )
    return Built("contact-sheet", path, steps[-1], None, description)


def before_after(results: Results, kind: str, prompt: Prompt, root: Path) -> Built | None:
    """The base model's render beside the newest checkpoint's."""
    from trainer.sampling import save_png, software
    from trainer.sheets import before_after as draw_pair

    renders = results.renders(kind, prompt.key)
    if len(renders) < 2 or renders[0].step != BASE_STEP:
        return None
    newest = renders[-1]
    image = draw_pair(
        _load(renders[0]), _load(newest), "base", step_label(newest.step), title=prompt.text
    )
    name = f"{prompt.index:02d}-{prompt.key}-before-after-{step_folder(newest.step)}.png"
    path = root / SHEETS_DIR / name
    save_png(image, path, {"software": software(), "prompt": prompt.text})
    description = (
        f"darkroom before/after: base model vs {step_label(newest.step)}: “{prompt.text}”, "
        f"seed {prompt.seed}"
    )
    return Built("before-after", path, newest.step, prompt, description)


def upload_choice(built: Sequence[Built]) -> list[Built]:
    """Of one animation's formats, the one Immich gets (a video when made, else the GIF)."""
    for suffix in ANIMATION_PREFERENCE:
        chosen = [b for b in built if b.path.suffix == suffix]
        if chosen:
            return chosen[:1]
    return []
