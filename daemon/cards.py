"""Model cards beside milestone checkpoints: what the model was trained on, with what, and
how it does on held-out photos (``trainer/model_card.py`` renders and writes them).

The figures come from where they are recorded, never estimated here: the dataset from the
training cache and the store, compute from the trainer's ``train_log.jsonl``, validation from
the store's evaluations, CLIP from the renders' scores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from statistics import fmean

from daemon.results import SAMPLE, Results
from daemon.samples import Checkpoint
from daemon.settings import Settings
from daemon.store import Store, utc_now
from daemon.training_set import TrainingSet

log = logging.getLogger("darkroom.cards")

NO_CLIP_RENDERS = "no CLIP scores for this checkpoint's renders"


def write_card(
    settings: Settings, store: Store, results: Results, checkpoint: Checkpoint, notes: list[str]
) -> Path | None:
    """Write the checkpoint's model card unless it has one; the card's path when written."""
    from trainer.cache import Cache
    from trainer.charts import ValidationPoint
    from trainer.checkpoints import read_config, verify_checkpoint
    from trainer.model_card import (
        MODEL_CARD_NAME,
        ModelCard,
        compute_from_log,
        dataset_stats,
        default_limitations,
        write_model_card,
    )

    assert checkpoint.path is not None
    if (checkpoint.path / MODEL_CARD_NAME).exists():
        return None
    config = read_config(checkpoint.path)
    generation = verify_checkpoint(checkpoint.path, hashes=False).get("cache_generation")
    training = TrainingSet(store)
    with Cache.open(settings.paths.cache_dir) as cache:  # the samples it trained on
        stats = dataset_stats(
            cache, training.rating_counts(), training.mean_scores(), generation=generation
        )
    evaluations = [e for e in results.latest_evaluations() if e.step <= checkpoint.step]
    clip, clip_note = _clip(results, checkpoint.step, notes)
    card = ModelCard(
        base_model=settings.cache.model,
        step=checkpoint.step,
        created_at=utc_now(),
        preset=str(config.get("preset")),
        learning_rate=float(config["learning_rate"]),
        dataset=stats,
        compute=compute_from_log(
            settings.paths.checkpoint_dir, checkpoint.step, device=_named(config.get("device"))
        ),
        validation=[ValidationPoint(e.step, e.early, e.middle, e.late) for e in evaluations],
        clip=clip,
        clip_note=clip_note,
        limitations=default_limitations(stats),
        held_out_photos=evaluations[-1].samples if evaluations else None,
    )
    path = write_model_card(checkpoint.path, card)
    log.info("%s: model card written to %s", checkpoint.label, path)
    return path


def _clip(results: Results, step: int, notes: list[str]) -> tuple[float | None, str | None]:
    """The mean CLIP score of the step's renders, or why there is none."""
    scores = [
        r.clip_score for r in results.renders(SAMPLE) if r.step == step and r.clip_score is not None
    ]
    if scores:
        return fmean(scores), None
    skipped = [note for note in notes if note.startswith("CLIP scores skipped")]
    return None, skipped[0] if skipped else NO_CLIP_RENDERS


def _named(device: object) -> str | None:
    """The configured device when it names one (``auto`` says nothing: the log then does)."""
    return device if isinstance(device, str) and device != "auto" else None
