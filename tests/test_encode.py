"""``darkroom encode`` end to end: stand-in Immich and Ollama, a tiny PixArt-Sigma, a real cache.

Photos are curated and written back by the real pipeline, then encoded into a cache on
disk; the tests change things in Immich the way a person would and check what the next
run encodes, reuses, retires and collects.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import training_set
from daemon.cache_commands import EXIT_OK
from daemon.encode import EncodeSummary, run_encode
from daemon.held_out import HELD_OUT_REASON, OVER_CAP_REASON, held_out_rank
from daemon.pipeline import Context
from tests.curation_harness import process
from tests.immich_library import make_jpeg
from tests.immich_server import ImmichServer
from trainer.cache import Cache

torch = pytest.importorskip("torch")

# (photo, scale): every one at least 1024 px on its short side, so it fills a bucket.
PHOTOS = {
    "astronaut": 2.1,  # 512 x 512 -> square
    "chelsea": 3.5,  # 451 x 300 -> landscape 3:2
    "stereo_motorcycle": 2.1,  # 741 x 500 -> landscape ~3:2
}
BUCKETS = {"astronaut": "1024x1024", "chelsea": "1216x832", "stereo_motorcycle": "1216x832"}
VAE_DOWNSCALE = 8
DOWNLOADS = ("downloadAsset", "viewAsset")


@pytest.fixture
def photos(immich: ImmichServer) -> dict[str, str]:
    return {name: immich.add_asset(make_jpeg(name, scale=s)) for name, s in PHOTOS.items()}


@pytest.fixture
def encoded(
    make_ctx: Callable[..., Context], tiny_pixart: Path, photos: dict[str, str]
) -> Callable[..., Any]:
    """Curate the library, then return ``encode()`` running the stage with these settings."""
    ctx = make_ctx(DARKROOM_CACHE__MODEL=str(tiny_pixart), DARKROOM_CACHE__VAE_DEVICE="cpu")
    process(ctx)

    def encode(**changes: Any) -> EncodeSummary:
        settings = ctx.settings
        if changes:
            cache = settings.cache.model_copy(update=changes)
            settings = settings.model_copy(update={"cache": cache})
        return run_encode(settings, bar=False)

    encode.ctx = ctx  # type: ignore[attr-defined]
    return encode


def open_cache(ctx: Context) -> Cache:
    return Cache.open(ctx.settings.paths.cache_dir)


def test_curated_photos_land_in_their_buckets(encoded: Any, photos: dict[str, str]) -> None:
    summary = encoded()
    report = summary.report
    assert report.samples == {photos[name]: BUCKETS[name] for name in PHOTOS}
    assert sorted(report.encoded) == sorted(photos.values())
    with open_cache(encoded.ctx) as cache:
        samples = cache.live_samples()
        for name, asset_id in photos.items():
            width, height = (int(side) for side in BUCKETS[name].split("x"))
            latent = cache.load_latent(samples[asset_id].latent_key)
            assert latent.shape == (4, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
            assert latent.dtype == torch.float16
            text = cache.load_text(samples[asset_id].text_key)
            assert text.dtype == torch.bfloat16 and text.ndim == 2 and text.shape[0] > 1
        assert cache.verify().ok
    counts = encoded.ctx.store.stage_counts()[training_set.STAGE]
    assert counts == {"done": len(PHOTOS)}


def test_a_second_run_downloads_and_encodes_nothing(encoded: Any, immich: ImmichServer) -> None:
    encoded()
    downloads = sum(immich.request_count(op) for op in DOWNLOADS)
    asset_reads = immich.request_count("getAssetInfo")
    again = encoded().report
    assert (again.encoded, again.texts_encoded) == ([], 0)
    assert len(again.reused) == len(PHOTOS)
    assert sum(immich.request_count(op) for op in DOWNLOADS) == downloads
    assert immich.request_count("getAssetInfo") == asset_reads  # nothing changed in Immich


def test_a_persons_new_description_gets_a_new_embedding_and_gc_drops_the_old(
    encoded: Any, immich: ImmichServer, photos: dict[str, str]
) -> None:
    encoded()
    asset_id = photos["chelsea"]
    with open_cache(encoded.ctx) as cache:
        old_text = cache.live_samples()[asset_id].text_key
    immich.human_update(asset_id, description="A ginger cat asleep on a sunny windowsill.")
    process(encoded.ctx)  # discovery notices the change
    report = encoded().report
    assert report.texts_encoded == 1 and asset_id in report.reused
    with open_cache(encoded.ctx) as cache:
        assert cache.live_samples()[asset_id].text_key != old_text
        assert cache.has_text(old_text)
        cache.gc()
        assert not cache.has_text(old_text)
        assert cache.verify().ok


def test_a_replaced_photo_gets_a_new_latent(
    encoded: Any, immich: ImmichServer, photos: dict[str, str]
) -> None:
    encoded()
    asset_id = photos["astronaut"]
    with open_cache(encoded.ctx) as cache:
        old_latent = cache.live_samples()[asset_id].latent_key
    immich.replace_file(asset_id, make_jpeg("coffee", scale=2.7))  # 600 x 400 -> 3:2
    process(encoded.ctx)
    report = encoded().report
    assert report.encoded == [asset_id]
    assert report.samples[asset_id] == "1216x832"
    with open_cache(encoded.ctx) as cache:
        assert cache.live_samples()[asset_id].latent_key != old_latent
        cache.gc()
        assert not cache.has_latent(old_latent)


def test_a_persons_rejection_retires_the_sample(
    encoded: Any, immich: ImmichServer, photos: dict[str, str]
) -> None:
    encoded()
    asset_id = photos["stereo_motorcycle"]
    immich.human_update(asset_id, rating=-1)
    process(encoded.ctx)
    summary = encoded()
    assert summary.retired == 1
    with open_cache(encoded.ctx) as cache:
        assert asset_id not in cache.live_samples()
    status, _, reason = encoded.ctx.store.stage_of(asset_id, training_set.STAGE)
    assert status == "skipped" and "rejected by a person" in reason


def test_a_rotation_edit_turns_the_original_before_encoding(
    encoded: Any, immich: ImmichServer, photos: dict[str, str]
) -> None:
    asset_id = photos["chelsea"]  # landscape; a quarter turn makes it portrait
    immich.human_update(asset_id, edits=[{"action": "rotate", "parameters": {"angle": 90}}])
    process(encoded.ctx)
    report = encoded().report
    assert report.samples[asset_id] == "832x1216"
    verdict = training_set.TrainingSet(encoded.ctx.store).verdict(asset_id)
    assert verdict is not None and (verdict["pixels"], verdict["rotation"]) == ("original", 90)


def test_bursts_are_thinned_to_the_best_rated_photo(
    encoded: Any, immich: ImmichServer, photos: dict[str, str]
) -> None:
    keep, drop = photos["astronaut"], photos["stereo_motorcycle"]
    immich.group_duplicates([keep, drop])
    immich.human_update(keep, rating=5)
    process(encoded.ctx)
    report = encoded(thin_duplicates=True).report
    assert keep in report.samples and drop not in report.samples
    status, _, reason = encoded.ctx.store.stage_of(drop, training_set.STAGE)
    assert status == "skipped" and keep in reason


def test_held_out_photos_go_to_their_own_cache_and_never_train(
    encoded: Any, photos: dict[str, str]
) -> None:
    # Every photo is held out (1 in 1), the evaluation set holds one: the lowest hash.
    summary = encoded(held_out_every=1, held_out_max=1)
    ids = sorted(photos.values(), key=held_out_rank)
    assert summary.wanted == 0 and summary.report.samples == {}
    assert summary.held_out is not None and list(summary.held_out.samples) == ids[:1]
    with open_cache(encoded.ctx) as cache:
        assert cache.live_samples() == {}  # none of them is trained on
    with Cache.open(encoded.ctx.settings.paths.held_out_dir) as held_out:
        assert list(held_out.live_samples()) == ids[:1]
        assert held_out.verify().ok
    store = encoded.ctx.store
    assert store.stage_of(ids[0], training_set.STAGE)[::2] == ("done", HELD_OUT_REASON)
    for other in ids[1:]:
        assert store.stage_of(other, training_set.STAGE)[::2] == ("skipped", OVER_CAP_REASON)
    # Holding out nothing again: the photos train, and the held-out cache is emptied.
    summary = encoded(held_out_every=0)
    assert sorted(summary.report.samples) == sorted(ids)
    with Cache.open(encoded.ctx.settings.paths.held_out_dir) as held_out:
        assert held_out.live_samples() == {}


def test_cli_verify_gc_and_stats(encoded: Any) -> None:
    encoded()
    config = write_config(encoded.ctx.settings)

    def darkroom(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "daemon.cli", "--config", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    verify = darkroom("cache", "verify")
    assert verify.returncode == EXIT_OK, verify.stderr
    gc = darkroom("cache", "gc")
    assert gc.returncode == EXIT_OK and "0 sample(s) retired" in gc.stdout, gc.stderr
    stats = darkroom("cache", "stats")
    assert stats.returncode == EXIT_OK and f"samples={len(PHOTOS)}" in stats.stdout


def write_config(settings: Any) -> Path:
    """A TOML file with the paths and cache model of ``settings`` (no secrets needed)."""
    path = settings.paths.state_dir / "darkroom.toml"
    path.write_text(
        "[paths]\n"
        f'state_dir = "{settings.paths.state_dir}"\n'
        f'cache_dir = "{settings.paths.cache_dir}"\n'
        "[cache]\n"
        f'model = "{settings.cache.model}"\n'
    )
    return path
