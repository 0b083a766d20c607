"""``darkroom samples`` and ``darkroom timelapse``: the stages of ``daemon/samples.py`` in order.

``run_samples``: render, evaluate, cards, timelapse, upload (see ``daemon/samples.py``).
``run_timelapse``: the same prompt and seed across every checkpoint -- the validation prompts
(rendering what is missing) or one prompt given on the command line -- then the animations,
contact sheet and before/after pairs, uploaded unless told not to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import timelapse
from daemon.cards import write_card
from daemon.gallery import Gallery, uploads_enabled
from daemon.immich import open_immich
from daemon.results import FRAME, SAMPLE, Results
from daemon.samples import (
    Checkpoint,
    HeldOut,
    LazySampler,
    Prompt,
    SamplesReport,
    checkpoints,
    evaluate_missing,
    prompt_key,
    render_missing,
    sample_settings,
    samples_root,
    validation_prompts,
)
from daemon.settings import Settings
from daemon.store import Store
from trainer.sample_defaults import step_label

if TYPE_CHECKING:
    from trainer.clip_score import ClipScorer

log = logging.getLogger("darkroom.samples")


@dataclass(frozen=True)
class JobOptions:
    """What a run was asked for on the command line."""

    upload: bool = True  # False: nothing goes to Immich this run (``--no-upload``)
    evaluate: bool = True


def run_samples(settings: Settings, options: JobOptions) -> SamplesReport:
    """Render, evaluate, write cards, build the time-lapses, upload (module docstring)."""
    report = SamplesReport()
    prompts = validation_prompts(settings)
    with Store(settings.paths.database) as store, ExitStack() as stack:
        results = Results(store)
        sampler = LazySampler(settings)
        scorer = _clip_scorer(settings, report)
        held_out = _held_out_cache(settings, stack, report) if options.evaluate else None
        found, done = checkpoints(settings), results.rendered(SAMPLE)
        for checkpoint in found:
            _checkpoint_work(settings, results, sampler, checkpoint, prompts, done, held_out,
                             scorer, report)  # fmt: skip
        _plot(settings, results)
        report.cards += _cards(settings, store, results, found, report)
        _sheets_and_upload(settings, results, SAMPLE, prompts, options, report)
    return report


def run_timelapse(
    settings: Settings, options: JobOptions, prompt: str | None, seed: int
) -> SamplesReport:
    """The time-lapse of the validation prompts, or of ``prompt`` with ``seed``."""
    report = SamplesReport()
    if prompt is None:
        kind, prompts = SAMPLE, validation_prompts(settings)
    else:
        key = prompt_key(prompt, seed, sample_settings(settings, seed), settings.cache.model)
        kind, prompts = FRAME, [Prompt(0, prompt, seed, key)]
    with Store(settings.paths.database) as store:
        results = Results(store)
        sampler, done = LazySampler(settings), results.rendered(kind)
        for checkpoint in checkpoints(settings):
            _render_one(settings, results, sampler, checkpoint, prompts, done, kind, None, report)
        _sheets_and_upload(settings, results, kind, prompts, options, report)
    return report


def _sheets_and_upload(
    settings: Settings,
    results: Results,
    kind: str,
    prompts: Sequence[Prompt],
    options: JobOptions,
    report: SamplesReport,
) -> None:
    """The last two stages of both commands: time-lapses and sheets, then the uploads."""
    built = _build_sheets(settings, results, kind, prompts)
    report.sheets += [b.path for b in built]
    if options.upload:
        report.uploaded = _upload(settings, results, kind, prompts, built)


def _checkpoint_work(
    settings: Settings,
    results: Results,
    sampler: LazySampler,
    checkpoint: Checkpoint,
    prompts: Sequence[Prompt],
    done: set[tuple[int, str]],
    held_out: HeldOut | None,
    scorer: ClipScorer | None,
    report: SamplesReport,
) -> None:
    """Renders and evaluation of one checkpoint; its failure is logged and skipped."""
    _render_one(settings, results, sampler, checkpoint, prompts, done, SAMPLE, scorer, report)
    if held_out is None or checkpoint.label in report.skipped:
        return
    from trainer.checkpoints import CheckpointError

    try:
        evaluation = evaluate_missing(
            results, sampler, checkpoint, held_out, seed=settings.train.seed
        )
    except (CheckpointError, OSError, RuntimeError) as exc:
        log.error("%s: not evaluated: %s", checkpoint.label, exc)
        report.skipped[checkpoint.label] = str(exc)
        return
    if evaluation is not None:
        report.evaluated.append(checkpoint.step)


def _render_one(
    settings: Settings,
    results: Results,
    sampler: LazySampler,
    checkpoint: Checkpoint,
    prompts: Sequence[Prompt],
    done: set[tuple[int, str]],
    kind: str,
    scorer: ClipScorer | None,
    report: SamplesReport,
) -> None:
    """Render what ``checkpoint`` lacks; a checkpoint that cannot load is skipped."""
    from trainer.checkpoints import CheckpointError

    try:
        report.rendered += render_missing(
            settings, results, sampler, checkpoint, prompts, done, kind=kind, scorer=scorer
        )
    except (CheckpointError, OSError, RuntimeError) as exc:
        # A corrupt or mismatched checkpoint (load_state_dict raises RuntimeError): the
        # others still render.
        log.error("%s: not rendered: %s", checkpoint.label, exc)
        report.skipped[checkpoint.label] = str(exc)


def _clip_scorer(settings: Settings, report: SamplesReport) -> ClipScorer | None:
    """The CLIP scorer when a local CLIP model is configured and loads; else a note."""
    from trainer.clip_score import ClipScorer, clip_unavailable
    from trainer.devices import pick_device

    reason = clip_unavailable(settings.samples.clip_model)
    if reason is not None:
        report.notes.append(f"CLIP scores skipped: {reason}")
        log.info("CLIP scores skipped: %s", reason)
        return None
    assert settings.samples.clip_model is not None
    return ClipScorer.load(settings.samples.clip_model, pick_device(settings.samples.device))


def _held_out_cache(settings: Settings, stack: ExitStack, report: SamplesReport) -> HeldOut | None:
    """The held-out cache and its digest, when it holds photos to evaluate on."""
    from trainer.cache import Cache, CacheError
    from trainer.evaluate import held_out_digest

    folder = settings.paths.held_out_dir
    if not settings.samples.evaluate:
        return None
    try:
        cache = stack.enter_context(Cache.open(folder))
    except (CacheError, OSError) as exc:
        report.notes.append(f"held-out evaluation skipped: no held-out cache ({exc})")
        return None
    if not cache.live_samples():
        report.notes.append("held-out evaluation skipped: no held-out photos encoded yet")
        return None
    return HeldOut(cache, held_out_digest(cache))


def _plot(settings: Settings, results: Results) -> Path | None:
    """The loss curve with the held-out loss per bin at each checkpoint."""
    from trainer.charts import ValidationPoint, plot_loss, save_validation

    points = [
        ValidationPoint(e.step, e.early, e.middle, e.late) for e in results.latest_evaluations()
    ]
    save_validation(settings.paths.checkpoint_dir, points)  # the trainer's redraws keep them
    return plot_loss(settings.paths.checkpoint_dir, points)


def _cards(
    settings: Settings,
    store: Store,
    results: Results,
    found: Sequence[Checkpoint],
    report: SamplesReport,
) -> list[Path]:
    """A model card beside each milestone checkpoint that has none."""
    written = []
    for checkpoint in found:
        if checkpoint.milestone and checkpoint.path is not None:
            path = write_card(settings, store, results, checkpoint, report.notes)
            if path is not None:
                written.append(path)
    return written


def _build_sheets(
    settings: Settings, results: Results, kind: str, prompts: Sequence[Prompt]
) -> list[timelapse.Built]:
    """Animations per prompt, a contact sheet, and a before/after per prompt."""
    root = samples_root(settings)
    built: list[timelapse.Built] = []
    for prompt in prompts:
        built += timelapse.animation(
            results, kind, prompt, root,
            frame_ms=settings.samples.frame_ms, hold_last_ms=settings.samples.hold_last_ms,
        )  # fmt: skip
        pair = timelapse.before_after(results, kind, prompt, root)
        if pair is not None:
            built.append(pair)
    sheet = timelapse.contact_sheet(results, kind, prompts, root)
    if sheet is not None:
        built.append(sheet)
    return built


def _upload(
    settings: Settings,
    results: Results,
    kind: str,
    prompts: Sequence[Prompt],
    built: Sequence[timelapse.Built],
) -> int:
    """Put renders, animations and sheets that Immich lacks into the album."""
    with open_immich(settings) as immich:
        if not uploads_enabled(settings.samples, immich):
            return 0
        gallery = Gallery(immich, results, settings.samples.album)
        return gallery.put_each(upload_items(settings, results, kind, prompts, built))


def upload_items(
    settings: Settings,
    results: Results,
    kind: str,
    prompts: Sequence[Prompt],
    built: Sequence[timelapse.Built],
) -> list[tuple[str, Path, str]]:
    """(key, file, description) of everything that belongs in the album."""
    items = []
    for prompt in prompts:
        sample = sample_settings(settings, prompt.seed)
        for render in results.renders(kind, prompt.key):
            label = step_label(render.step)
            description = (
                f"darkroom {label}: “{prompt.text}” ({sample.describe()}; "
                f"base model {settings.cache.model})"
            )
            items.append((f"{kind}/{render.step}/{prompt.key}", render.path, description))
    animations = [b for b in built if b.kind == "timelapse"]
    for prompt in prompts:
        mine = [b for b in animations if b.prompt == prompt]
        for chosen in timelapse.upload_choice(mine):
            items.append((f"timelapse/{prompt.key}/{chosen.last_step}", chosen.path,
                          chosen.description))  # fmt: skip
    for other in built:
        if other.kind != "timelapse":
            subject = other.prompt.key if other.prompt else "all"
            items.append((f"{other.kind}/{subject}/{other.last_step}", other.path,
                          other.description))  # fmt: skip
    return items
