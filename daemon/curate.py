"""Stage 2, curate: ask the vision model to describe, score and orient one photo.

The photo is Immich's preview JPEG (EXIF orientation already applied), downscaled once;
the model sees it as is for the description and the score, and at four rotations for the
orientation vote.  Every answer is validated; an answer that never validates within
``max_attempts`` quarantines the photo with the reason.  Nothing is ever defaulted.
The result is stored, and the asset moves on to the write-back stage.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from daemon import prompts
from daemon.captions import clean_caption
from daemon.orientation import (
    ANGLES,
    Decision,
    correction_for_original,
    decide,
    orientation_schema,
    parse_answer,
)
from daemon.scoring import ScoreRejectedError, Scores, parse_scores, score_schema
from daemon.settings import CurationSettings
from daemon.store import Store
from daemon.vision import AnswerRejectedError, Provenance, VisionPool

log = logging.getLogger("darkroom.curate")

STAGE = "curate"
NEXT_STAGE = "writeback"
JPEG_QUALITY = 85
# Sizes within this fraction of a target long side are used as they come.
SIZE_TOLERANCE = 0.1
CLOCKWISE = {
    90: Image.Transpose.ROTATE_270,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_90,
}
T = TypeVar("T")


class QuarantineError(Exception):
    """This photo cannot be curated as it is; the message is the reason kept in the store."""


@dataclass(frozen=True)
class Curation:
    """What the model said about one photo; None where that question was not asked."""

    description: str | None
    scores: Scores | None
    orientation: Decision | None
    provenance: Provenance

    def as_dict(self) -> dict[str, object]:
        """The full result, as stored and as written into Immich's metadata."""
        return {
            "description": self.description,
            "scores": self.scores.model_dump() if self.scores else None,
            "overall": self.scores.overall if self.scores else None,
            "stars": self.scores.stars if self.scores else None,
            "orientation": self.orientation.as_dict() if self.orientation else None,
            "provenance": self.provenance.as_dict(),
        }


@dataclass(frozen=True)
class PreparedImage:
    """The photo as the model sees it: as Immich shows it, and (smaller) at each rotation."""

    upright: bytes
    views: dict[int, bytes]


def prepare_image(jpeg: bytes, long_side: int, orientation_long_side: int | None) -> PreparedImage:
    """Decode at about ``long_side``, re-encode; add the four orientation views.

    The orientation views are smaller (``orientation_long_side``; None: no views): which
    way is up needs no fine detail, and four small images cost the model far fewer image
    tokens than four large ones.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as opened:
            # Let the JPEG decoder scale by 1/2, 1/4 or 1/8 down to about the target: a
            # 1440 px preview then decodes a quarter of its pixels, and often needs no
            # resampling at all.
            opened.draft("RGB", _fit(opened.size, round(long_side * (1 - SIZE_TOLERANCE))))
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise QuarantineError(f"preview cannot be decoded: {exc}") from None
    image = _shrink(image, long_side)
    if orientation_long_side is None:
        return PreparedImage(_jpeg(image), {})
    small = _shrink(image, orientation_long_side)
    # A transpose turns the view clockwise exactly (PIL's rotate() turns the other way).
    views = {a: _jpeg(small.transpose(CLOCKWISE[a]) if a else small) for a in ANGLES}
    return PreparedImage(_jpeg(image), views)


def _shrink(image: Image.Image, long_side: int) -> Image.Image:
    """Bring the long side to about ``long_side``, never enlarging.

    Within ``SIZE_TOLERANCE`` of the target the image is left as it is: resampling costs
    more CPU than a few percent of pixels cost the model.
    """
    if max(image.size) <= long_side * (1 + SIZE_TOLERANCE):
        return image
    factor = max(image.size) // long_side
    if factor >= 2:
        image = image.reduce(factor)  # a fast integer box filter first
    if max(image.size) <= long_side * (1 + SIZE_TOLERANCE):
        return image
    return image.resize(_fit(image.size, long_side), Image.Resampling.BILINEAR)


def _fit(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """``size`` scaled so its long side is at most ``long_side`` (never enlarged)."""
    width, height = size
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _attempts(what: str, tries: int, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` until it gives a valid answer, at most ``tries`` times."""
    reasons: list[str] = []
    for _ in range(tries):
        try:
            return attempt()
        except (AnswerRejectedError, ScoreRejectedError) as exc:
            reasons.append(str(exc))
            log.debug("%s answer rejected: %s", what, exc)
    raise QuarantineError(f"{what}: no valid answer in {tries} attempts (last: {reasons[-1]})")


def describe(pool: VisionPool, image: PreparedImage, settings: CurationSettings) -> str:
    """A clean, bounded caption of the photo."""

    def attempt() -> str:
        raw = pool.ask(prompts.DESCRIBE, image.upright)
        return clean_caption(
            raw, max_chars=settings.description_max_chars, keep_preamble=settings.keep_preamble
        )

    return _attempts("description", settings.max_attempts, attempt)


def score(pool: VisionPool, image: PreparedImage, settings: CurationSettings) -> Scores:
    """The nine factors, validated; never defaulted."""
    schema = score_schema()
    return _attempts(
        "score",
        settings.max_attempts,
        lambda: parse_scores(pool.ask(prompts.SCORE, image.upright, schema)),
    )


def orient(pool: VisionPool, image: PreparedImage, settings: CurationSettings) -> Decision:
    """Votes from the four views; a view with no valid answer is an abstention."""
    schema = orientation_schema()
    votes: dict[int, int | None] = {}
    for shown, view in image.views.items():
        try:
            answer = _attempts(
                f"orientation at {shown}°",
                settings.max_attempts,
                lambda v=view: parse_answer(pool.ask(prompts.ORIENT, v, schema)),
            )
        except QuarantineError as exc:
            log.info("%s", exc)
            votes[shown] = None
        else:
            votes[shown] = correction_for_original(shown, answer)
    return decide(votes, settings.orientation_rule)


def curate_image(
    pool: VisionPool, image: PreparedImage, settings: CurationSettings, provenance: Provenance
) -> Curation:
    """Ask every question the settings enable."""
    return Curation(
        description=describe(pool, image, settings) if settings.describe else None,
        scores=score(pool, image, settings) if settings.score else None,
        orientation=orient(pool, image, settings) if settings.orient else None,
        provenance=provenance,
    )


def save_curation(store: Store, asset_id: str, curation: Curation) -> None:
    """Store the result and hand the asset to write-back, in one transaction."""
    scores = curation.scores
    row = {
        "description": curation.description,
        "scores": json.dumps(scores.model_dump()) if scores else None,
        "overall": scores.overall if scores else None,
        "stars": scores.stars if scores else None,
        "orientation": json.dumps(curation.orientation.as_dict()) if curation.orientation else None,
        "model": curation.provenance.model,
        "digest": curation.provenance.digest,
        "prompt_version": curation.provenance.prompt_version,
        "provenance": json.dumps(curation.provenance.as_dict(), sort_keys=True),
    }
    store.save_curation(asset_id, row, done_stage=STAGE, next_stage=NEXT_STAGE)
