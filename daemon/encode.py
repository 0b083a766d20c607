"""Stage 4, encode: turn curated photos into training samples (``darkroom encode``).

Runs in a process of its own, started by the daemon's hooks or by hand, in order:

1. examine -- each curated photo that changed in Immich: rating, caption, pixels
              (``training_set``); one or two requests per changed photo, none otherwise;
2. select  -- the eligible photos, bursts thinned when ``cache.thin_duplicates`` is on,
              one in ``cache.held_out_every`` held out of training (``held_out``);
3. encode  -- latents and caption embeddings the cache lacks (``trainer.encode``), the
              held-out photos into a cache of their own (``paths.held_out_dir``);
4. retire  -- samples of photos no longer wanted leave the sampler (``darkroom cache gc``
              frees their bytes later);
5. record  -- each photo's outcome in the store's ``encode`` stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from daemon.held_out import HELD_OUT_REASON, OVER_CAP_REASON, HeldOutSplit, split_held_out
from daemon.immich import open_immich
from daemon.pipeline import BYTES_PER_MB
from daemon.settings import CacheSettings, Settings
from daemon.store import Store
from daemon.training_set import EDITED, ORIGINAL, Candidate, TrainingSet, judge
from immich_client import ImmichClient
from immich_client.errors import (
    ImmichNotFoundError,
    ImmichTooLargeError,
    ImmichValidationError,
)
from trainer.cache import Cache
from trainer.encode import (
    EncodeConfig,
    EncodeReport,
    SampleSource,
    SourceUnavailable,
    encode_sources,
)
from trainer.images import PrepConfig, enable_heic

log = logging.getLogger("darkroom.encode")

# Per-photo problems: the photo is skipped this run, the others go on.  Anything else
# from Immich (unreachable, 5xx, a revoked key) stops the run; committed work is kept.
PER_PHOTO_ERRORS = (ImmichNotFoundError, ImmichTooLargeError, ImmichValidationError)


@dataclass(frozen=True)
class EncodeSummary:
    """What one ``darkroom encode`` did."""

    examined: int
    wanted: int
    thinned: int
    retired: int
    report: EncodeReport
    held_out: EncodeReport | None = None


def encode_config(cache: CacheSettings) -> EncodeConfig:
    """The trainer's view of the cache settings."""
    prep = PrepConfig(max_upscale=cache.max_upscale, max_aspect=cache.max_aspect)
    return EncodeConfig(
        model=cache.model,
        prep=prep,
        vae_device=cache.vae_device,
        vae_precision=cache.vae_precision,
        vae_batch_size=cache.vae_batch_size,
        text_device=cache.text_device,
        text_precision=cache.text_precision,
        text_offload=cache.text_offload,
        text_batch_size=cache.text_batch_size,
        max_length=cache.max_caption_tokens,
        latent_dtype=cache.latent_dtype,
        commit_every=cache.commit_every,
    )


def examine(training: TrainingSet, immich: ImmichClient, cache: CacheSettings) -> int:
    """Judge every curated photo that changed since it was last judged; how many were."""
    heic = cache.heic and enable_heic()
    examined = 0
    for asset_id, updated_at in training.to_examine():
        try:
            asset = immich.get_asset(asset_id)
            edits = immich.get_edits(asset_id).edits if asset.is_edited else []
        except PER_PHOTO_ERRORS as exc:
            log.warning("asset %s: cannot examine for training: %s", asset_id, exc)
            continue
        written, claimed = training.written(asset_id)
        curation = training.store.curation(asset_id) or {}
        verdict = judge(
            asset, edits, curation,
            written=written, claimed=claimed, min_rating=cache.min_rating, heic=heic,
        )  # fmt: skip
        training.record(asset_id, updated_at, verdict)
        examined += 1
    return examined


def _fetcher(immich: ImmichClient, what: Callable[[], bytes], asset_id: str) -> Callable[[], bytes]:
    """``what`` with per-photo Immich errors turned into the trainer's SourceUnavailable."""

    def fetch() -> bytes:
        try:
            return what()
        except PER_PHOTO_ERRORS as exc:
            raise SourceUnavailable(f"Immich: {exc}") from None

    return fetch


def sample_source(immich: ImmichClient, candidate: Candidate, settings: Settings) -> SampleSource:
    """Where a candidate's pixels come from: the original (or Immich's edited full-size
    rendition), falling back to the edited preview.
    """
    asset_id = candidate.asset_id
    original_cap = int(settings.cache.max_original_mb * BYTES_PER_MB)
    preview_cap = int(settings.immich.download_cap_mb * BYTES_PER_MB)

    def preview() -> bytes:
        return immich.thumbnail_bytes(asset_id, max_bytes=preview_cap, edited=True)

    def original() -> bytes:
        edited = candidate.pixels == EDITED
        return immich.original_bytes(asset_id, max_bytes=original_cap, edited=edited)

    use_original = candidate.pixels in (ORIGINAL, EDITED) and settings.cache.prefer_original
    main, fallback = (original, preview) if use_original else (preview, None)
    return SampleSource(
        ref=asset_id,
        source_id=f"{candidate.checksum}/{candidate.pixels if use_original else 'preview'}",
        caption=candidate.caption,
        fetch=_fetcher(immich, main, asset_id),
        rotation=candidate.rotation if candidate.pixels == ORIGINAL and use_original else 0,
        fallback=_fetcher(immich, fallback, asset_id) if fallback else None,
    )


def record(
    training: TrainingSet,
    report: EncodeReport,
    thinned: dict[str, str],
    held_out: tuple[HeldOutSplit, EncodeReport] | None = None,
) -> None:
    """Each photo's outcome in the encode stage."""
    outcomes = [(ref, "done", None) for ref in report.samples]
    if held_out is not None:
        split, held_report = held_out
        outcomes += [(ref, "done", HELD_OUT_REASON) for ref in held_report.samples]
        outcomes += [(ref, "skipped", reason) for ref, reason in held_report.skipped.items()]
        outcomes += [(ref, "failed", reason) for ref, reason in held_report.failed.items()]
        outcomes += [(ref, "skipped", OVER_CAP_REASON) for ref in split.over_cap]
    outcomes += [(ref, "skipped", reason) for ref, reason in report.skipped.items()]
    outcomes += [(ref, "failed", reason) for ref, reason in report.failed.items()]
    outcomes += [
        (ref, "skipped", f"burst: {kept} kept instead (thin_duplicates)")
        for ref, kept in thinned.items()
    ]
    training.record_outcomes(outcomes)


def run_encode(settings: Settings, *, bar: bool | None = None) -> EncodeSummary:
    """The whole stage, from the store and Immich into the caches."""
    with (
        Store(settings.paths.database) as store,
        open_immich(settings) as immich,
        Cache.open(settings.paths.cache_dir, create=True) as cache,
        Cache.open(settings.paths.held_out_dir, create=True) as held_out_cache,
    ):
        training = TrainingSet(store)
        examined = examine(training, immich, settings.cache)
        wanted, thinned = training.wanted(thin_duplicates=settings.cache.thin_duplicates)
        split = split_held_out(
            wanted,
            every=settings.cache.held_out_every,
            cap=settings.cache.held_out_max,
            already=held_out_cache.live_samples().keys(),
        )
        log.info(
            "%d photos examined; %d wanted for training, %d held out for evaluation",
            examined, len(split.train), len(split.held_out) + len(split.over_cap),
        )  # fmt: skip
        report = _encode_into(cache, split.train, immich, settings, bar)
        retired = _retire(cache, report)
        held_report = _encode_into(held_out_cache, split.held_out, immich, settings, bar)
        _retire(held_out_cache, held_report)
        record(training, report, thinned, (split, held_report))
    return EncodeSummary(examined, len(split.train), len(thinned), retired, report, held_report)


def _encode_into(
    cache: Cache,
    candidates: list[Candidate],
    immich: ImmichClient,
    settings: Settings,
    bar: bool | None,
) -> EncodeReport:
    """Encode the candidates the cache lacks (nothing is loaded when there are none)."""
    if not candidates:
        return EncodeReport()
    sources = [sample_source(immich, candidate, settings) for candidate in candidates]
    return encode_sources(cache, sources, encode_config(settings.cache), bar=bar)


def _retire(cache: Cache, report: EncodeReport) -> int:
    """Retire the samples of photos no longer wanted; a photo not fetched this time stays."""
    return cache.retire_all_except(set(report.samples) | set(report.failed))
