"""A model card beside a checkpoint: what it was trained from, on what, at what cost, and
how it did on photos it never saw.

``MODEL_CARD.md`` is Markdown with a Hugging Face metadata header, so the checkpoint folder
reads well in a file browser and uploads as is.  Every figure comes from a record: the
training cache's index (:func:`dataset_stats`), the training log (:func:`compute_from_log`),
the held-out evaluations and CLIP scores of ``darkroom samples``.  A figure nobody measured
is None and the card says so ("not measured"); nothing is estimated to fill a gap.

Torch-free at import: the cache is only passed in, the validation points only read.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.buckets import BUCKETS
from trainer.progress_file import LOG_FILE, replace_atomically

if TYPE_CHECKING:
    from trainer.cache import Cache
    from trainer.charts import ValidationPoint

MODEL_CARD_NAME = "MODEL_CARD.md"
NOT_MEASURED = "not measured"
NOT_RECORDED = "not recorded"
SECONDS_PER_HOUR = 3600.0
WH_PER_KWH = 1000.0
SMALL_DATASET = 100  # photos below which a fine-tune tends to memorise rather than generalise
LOSS_FORMAT = ".4f"
CARD_TAGS = ("text-to-image", "pixart-sigma", "darkroom", "fine-tune")
STAR = "★"
BASE_STEP = 0  # the base model's evaluation, before any fine-tuning


@dataclass(frozen=True)
class DatasetStats:
    """The training set as the cache holds it: photos, buckets, caption lengths, and the
    curation's ratings (stars -> photos) and mean quality scores (factor -> mean)."""

    photos: int
    buckets: dict[str, int]
    caption_tokens_min: int | None
    caption_tokens_median: float | None
    caption_tokens_max: int | None
    ratings: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Compute:
    """What training up to a checkpoint took, from the training log.

    ``measured_steps`` of the ``steps`` are covered by log records; the other figures are
    over those (in a distributed run, as the main process logged them).  None: the log does
    not hold that figure (no energy reading, no price)."""

    steps: int
    measured_steps: int
    images_seen: int | None
    device: str | None
    device_hours: float | None
    energy_kwh: float | None
    cost: float | None


@dataclass(frozen=True)
class ModelCard:
    """Everything the card says; ``validation`` holds the held-out loss per checkpoint."""

    base_model: str
    step: int
    created_at: str
    preset: str
    learning_rate: float
    dataset: DatasetStats
    compute: Compute
    validation: list[ValidationPoint] = field(default_factory=list)
    clip: float | None = None
    clip_note: str | None = None
    limitations: list[str] = field(default_factory=list)
    held_out_photos: int | None = None


# --- gathering the figures -----------------------------------------------------------------


def dataset_stats(
    cache: Cache,
    ratings: Mapping[str, int],
    scores: Mapping[str, float],
    *,
    generation: int | None = None,
) -> DatasetStats:
    """Statistics of a training cache's samples, read from its index alone: those live now,
    or those live at ``generation`` (a checkpoint's ``cache_generation``: what it trained on).

    Caption lengths are the stored embeddings' token counts: T5 tokens with the end token,
    at most the encoder's limit (longer captions were cut there when encoded).  None when a
    sample of that generation has since lost its tensors to gc (a partial figure would lie).
    """
    members = _members(cache, generation)
    buckets = Counter(bucket for bucket, _ in members)
    tokens = [count for _, count in members if count is not None]
    if len(tokens) < len(members):
        tokens = []
    return DatasetStats(
        photos=len(members),
        buckets=dict(sorted(buckets.items(), key=lambda item: _bucket_order(item[0]))),
        caption_tokens_min=min(tokens, default=None),
        caption_tokens_median=float(statistics.median(tokens)) if tokens else None,
        caption_tokens_max=max(tokens, default=None),
        ratings=dict(ratings),
        scores=dict(scores),
    )


def _members(cache: Cache, generation: int | None) -> list[tuple[str, int | None]]:
    """(bucket, caption tokens or None when no longer stored) of each sample counted."""
    if generation is None:
        return [(place.bucket, place.tokens) for place in cache.sample_locations().values()]
    rows = cache.members_at(generation)
    found = cache.sample_locations(row[0] for row in rows)
    return [(bucket, found[sid].tokens if sid in found else None) for sid, bucket, _ in rows]


def _bucket_order(name: str) -> tuple[int, str]:
    """Buckets in the design's order; unknown names after them, alphabetically."""
    names = [bucket.name for bucket in BUCKETS]
    return (names.index(name), "") if name in names else (len(names), name)


def _read_log(output_dir: Path) -> list[dict[str, Any]]:
    """The training history: the last record of each step (a resumed run re-did the steps
    a crashed one had logged after its checkpoint), by step."""
    path = output_dir / LOG_FILE
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _covered(history: list[dict[str, Any]], up_to_step: int) -> Iterator[tuple[dict, int]]:
    """(record, steps of it up to ``up_to_step``): each record covers the steps since the
    previous one; the one straddling ``up_to_step`` counts only the steps before it."""
    previous = 0
    for record in history:
        if previous >= up_to_step:
            return
        yield record, min(record["step"], up_to_step) - previous
        previous = record["step"]


def _number(record: dict[str, Any], name: str) -> float | None:
    """A finite number the record holds under ``name``, else None."""
    value = record.get(name)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _images_per_step(record: dict[str, Any]) -> float | None:
    """Images per optimizer step over the record's interval."""
    rate, seconds = _number(record, "images_per_s"), _number(record, "seconds_per_step")
    return None if rate is None or seconds is None else rate * seconds


def _total(
    covered: list[tuple[dict, int]], per_step: Callable[[dict[str, Any]], float | None]
) -> float | None:
    """Sum of ``per_step(record) * steps`` over the covered records; None when any of them
    lacks the figure (a partial sum would understate it) or none is covered."""
    if not covered:
        return None
    total = 0.0
    for record, steps in covered:
        value = per_step(record)
        if value is None:
            return None
        total += value * steps
    return total


def compute_from_log(output_dir: Path, up_to_step: int, *, device: str | None = None) -> Compute:
    """The compute of the training history that led to the checkpoint at ``up_to_step``,
    from ``<output_dir>/train_log.jsonl``.

    Steps a crashed run did twice are counted once (the resumed run's record wins), so the
    figures are those of the checkpoint's own history, not of everything the machine spent.
    ``device`` names the training device; without it, the device the log's last covered
    record names (logs before darkroom recorded it: not recorded).  Device hours are
    the training process's wall-clock hours: a run on several devices used that many times
    more.
    """
    covered = list(_covered(_read_log(output_dir), up_to_step))
    images = _total(covered, _images_per_step)
    seconds = _total(covered, lambda record: _number(record, "seconds_per_step"))
    energy_wh = _total(covered, lambda record: _number(record, "wh_per_step"))
    return Compute(
        steps=up_to_step,
        measured_steps=sum(steps for _, steps in covered),
        images_seen=None if images is None else round(images),
        device=device or _logged_device(covered),
        device_hours=None if seconds is None else seconds / SECONDS_PER_HOUR,
        energy_kwh=None if energy_wh is None else energy_wh / WH_PER_KWH,
        cost=_total(covered, lambda record: _number(record, "cost_per_step")),
    )


def _logged_device(covered: list[tuple[dict, int]]) -> str | None:
    """The device type the newest covered log record names, if any."""
    named = [record["device"] for record, _ in covered if isinstance(record.get("device"), str)]
    return named[-1] if named else None


def default_limitations(dataset: DatasetStats) -> list[str]:
    """What every darkroom card should warn about, plus what this dataset's numbers show."""
    notes = [
        "Fine-tuned on one person's photo library: it leans towards the people, places and "
        "look of those photos and can reproduce recognisable people and places from them.",
        "It keeps the base model's weaknesses (hands, text in images, counting objects).",
        "The held-out loss measures how well the model predicts noise on photos it never "
        "trained on; it is not a measure of how good its images look. Compare the renders.",
    ]
    if dataset.photos < SMALL_DATASET:
        notes.append(
            f"Only {dataset.photos} photos: with this few, a fine-tune tends to memorise "
            "them rather than learn a general look."
        )
    missing = [bucket.name for bucket in BUCKETS if bucket.name not in dataset.buckets]
    if missing:
        notes.append(
            f"No training photos in the {', '.join(missing)} buckets: images of those sizes "
            "follow the fine-tune less closely."
        )
    return notes


# --- rendering -----------------------------------------------------------------------------


def _or(value: str | None, missing: str = NOT_MEASURED) -> str:
    """``value``, or what the card says in its place."""
    return missing if value is None else value


def _figure(value: float | None, spec: str, unit: str = "") -> str:
    """A measured figure formatted with its unit, or "not measured"."""
    return NOT_MEASURED if value is None else f"{value:{spec}}{unit}"


def _header(card: ModelCard) -> list[str]:
    """Hugging Face metadata (so the folder uploads as a model repo), title, settings."""
    tags = "".join(f"\n  - {tag}" for tag in CARD_TAGS)
    return [
        "---",
        f"base_model: {card.base_model}",
        "library_name: diffusers",
        f"tags:{tags}",
        "---",
        "",
        f"# darkroom fine-tune of {card.base_model}, step {card.step}",
        "",
        f"Created {card.created_at} by darkroom: the base model's transformer, fine-tuned "
        "on a curated personal photo library.",
        "",
        "## Training",
        "",
        f"- Base model: `{card.base_model}`",
        f"- Memory preset: `{card.preset}`",
        f"- Peak learning rate: {card.learning_rate:g}",
    ]


def _dataset_section(stats: DatasetStats) -> list[str]:
    """Photos, caption lengths, ratings, quality scores and a bucket table."""
    lengths = NOT_RECORDED
    if stats.caption_tokens_median is not None:
        lengths = (
            f"min {stats.caption_tokens_min}, median {stats.caption_tokens_median:g}, "
            f"max {stats.caption_tokens_max}"
        )
    lines = ["", "## Dataset", "", f"- Photos: {stats.photos}"]
    lines.append(f"- Caption length in T5 tokens (end token included): {lengths}")
    lines.append(f"- Ratings: {_ratings_text(stats.ratings)}")
    scores = ", ".join(f"{name} {value:.2f}" for name, value in sorted(stats.scores.items()))
    lines.append(f"- Mean quality scores: {scores or NOT_RECORDED}")
    lines += ["", "| Bucket (px) | Photos |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in stats.buckets.items()]
    return lines


def _ratings_text(ratings: Mapping[str, int]) -> str:
    """``5★: 12, 4★: 30`` (most stars first), or "not recorded"."""
    if not ratings:
        return NOT_RECORDED

    def order(stars: str) -> tuple[int, float, str]:
        try:
            return (0, -float(stars), stars)
        except ValueError:
            return (1, 0.0, stars)

    return ", ".join(f"{stars}{STAR}: {ratings[stars]}" for stars in sorted(ratings, key=order))


def _compute_section(compute: Compute) -> list[str]:
    """Steps, images, device time, energy and cost, each or "not measured"."""
    covered = ""
    if compute.measured_steps < compute.steps:
        covered = f" (figures below cover the {compute.measured_steps} steps the log records)"
    images = NOT_RECORDED if compute.images_seen is None else f"{compute.images_seen:,}"
    return [
        "",
        "## Training compute",
        "",
        f"- Optimizer steps: {compute.steps:,}{covered}",
        f"- Images seen: {images}",
        f"- Device: {_or(compute.device, NOT_RECORDED)}",
        f"- Device hours: {_figure(compute.device_hours, '.2f')}",
        f"- Energy: {_figure(compute.energy_kwh, '.3f', ' kWh')}",
        f"- Electricity cost: {_figure(compute.cost, '.2f', ' (currency of the price per kWh)')}",
    ]


def _validation_section(card: ModelCard) -> list[str]:
    """A table of the held-out loss of every checkpoint up to this one (in bold)."""
    points = sorted((p for p in card.validation if p.step <= card.step), key=lambda p: p.step)
    photos = "" if card.held_out_photos is None else f" on {card.held_out_photos} photos"
    lines = [
        "",
        "## Held-out loss",
        "",
        f"MSE on the noise{photos} never trained on, by third of the timesteps: early "
        "(noisiest: composition), middle, late (fine detail). Lower is better; compare a "
        "column with itself across checkpoints.",
        "",
    ]
    if not points:
        return [*lines, NOT_MEASURED]
    lines += ["| Step | Early | Middle | Late |", "|---:|---:|---:|---:|"]
    for point in points:
        step = f"{point.step} (base model)" if point.step == BASE_STEP else str(point.step)
        step = f"**{step}**" if point.step == card.step else step
        figures = (
            format(getattr(point, name), LOSS_FORMAT) for name in ("early", "middle", "late")
        )
        lines.append(f"| {step} | {' | '.join(figures)} |")
    return lines


def _clip_section(card: ModelCard) -> list[str]:
    """The mean CLIP score, or why there is none."""
    if card.clip is not None:
        text = (
            f"{card.clip:.2f}: the mean over the validation renders of CLIPScore, 100 x the "
            "cosine of the CLIP embeddings of image and prompt (0 when negative)."
        )
    else:
        text = f"{NOT_MEASURED}: {card.clip_note}" if card.clip_note else NOT_MEASURED
    return ["", "## CLIP score of the validation renders", "", text]


def render_card(card: ModelCard) -> str:
    """The card as Markdown."""
    lines = _header(card)
    lines += _dataset_section(card.dataset)
    lines += _compute_section(card.compute)
    lines += _validation_section(card)
    lines += _clip_section(card)
    lines += ["", "## Limitations", "", *(f"- {note}" for note in card.limitations)]
    return "\n".join(lines) + "\n"


def write_model_card(checkpoint_path: Path, card: ModelCard) -> Path:
    """Write ``MODEL_CARD.md`` into the checkpoint folder (atomically: temp file, rename).

    The checkpoint's manifest does not list it, and verification ignores unlisted files."""
    text = render_card(card)
    return replace_atomically(
        Path(checkpoint_path) / MODEL_CARD_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8")
    )
